"""End to end: `slipstream run` on the tiny example, every role a real process.

- the default run (its model given as a hub id, from a local fake hub cache) learns (reward margin
  stated below), keeps staleness within η, publishes weights
  that the engine holds bit for bit, balances its trajectory account and leaves no process behind;
  how long it takes is measured by the benchmarks (bench/results/), not asserted here: a wall-clock
  bound ("within 5 minutes") failed on a loaded machine while everything it guarded was right;
  ``slipstream status`` on the finished run shows its last step, reward and summary;
- η = 0 is on-policy: every consumed token was sampled by the version being trained (and a tracker
  that raises on every record neither stops nor slows that run: summary.json counts each failure);
- η = 2 completes and never consumes anything staler than 2;
- Ctrl-C stops every process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"

# Stated learning margin: mean reward of the last 10 steps minus the first 10 (0..1 reward).
LEARNING_MARGIN = 0.3


def _run(tmp_path: Path, *overrides: str, timeout_s: float = 600) -> tuple[subprocess.CompletedProcess[str], Path]:
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'"]
    for o in overrides:
        args += ["--set", o]
    r = subprocess.run(slipstream(*args), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=timeout_s)
    return r, run_dir


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def _consumed(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]


def _assert_no_orphans(run_dir: Path) -> None:
    for p in json.loads((run_dir / "processes.json").read_text()):
        pid = p["pid"]
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # A zombie would already be reaped by the launcher; anything alive is an orphan.
        state = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "?"
        raise AssertionError(f"{p['name']} (pid {pid}) still running after the run ended (state {state})")


def _assert_account_balances(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["trajectories"]
    assert t["balanced"] is True, t
    assert t["accepted"] == t["consumed"] + sum(t["dropped"].values()) + t["still_queued"]
    consumed_ids = [c["trajectory_id"] for c in _consumed(run_dir)]
    assert len(consumed_ids) == len(set(consumed_ids)), "a trajectory reached the trainer twice"
    assert len(consumed_ids) == t["consumed"]
    return summary


@pytest.mark.slow
def test_tiny_example_learns_within_bounds(tmp_path: Path) -> None:
    """The quick start's run, with ``model.path`` a hub id from a local fake hub cache (one run
    serves both: it was two, the same model and the same 150-step job; see tests/test_hub.py)."""
    from tests.test_hub import REPO_ID, fill_cache

    snapshot = fill_cache(tmp_path / "hub")
    run_dir = tmp_path / "run"
    e = {**env(), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{REPO_ID}'", "--set", "model.make_tiny_if_missing=false"]
    r = subprocess.run(slipstream(*args), capture_output=True, text=True, env=e, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _steps(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert len(steps) == cfg["run"]["steps"]
    first = sum(s["reward_mean"] for s in steps[:10]) / 10
    last = sum(s["reward_mean"] for s in steps[-10:]) / 10
    assert last - first >= LEARNING_MARGIN, f"reward {first:.3f} -> {last:.3f}"
    # Staleness: recorded per trajectory, never above the bound.
    eta = cfg["queue"]["max_staleness"]
    for c in _consumed(run_dir):
        assert c["trained_from_version"] - c["min_version"] <= eta
    # Every published version reached the engine bit for bit.
    for s in steps:
        assert s["engine_checksums"] and all(c == s["weights_checksum"] for c in s["engine_checksums"]), s["step"]
    assert [s["policy_version"] for s in steps] == list(range(1, len(steps) + 1))
    summary = _assert_account_balances(run_dir)
    assert summary["exit_code"] == 0
    assert "step  150 | v150" in r.stdout  # the console's per-step line (stdout; the bar is on stderr)
    _assert_no_orphans(run_dir)
    for name in ("config.json", "processes.json", "logs/broker.log", "logs/trainer.log", "logs/engine-0.log", "logs/producer-0.log", "cmds/trainer.sh"):
        assert (run_dir / name).exists(), name
    # engine.mem_fraction = 0 (auto) reaches the engine resolved by the placement: 0.5 of host RAM on CPU
    assert "mem_fraction=0.5 " in (run_dir / "cmds" / "engine-0.sh").read_text() + " "
    # The hub id was resolved once, by the launcher, offline: every process got the snapshot's path.
    assert f"model.path '{REPO_ID}' resolved to {snapshot}" in r.stderr
    assert cfg["model"]["path"] == str(snapshot)
    assert f"--model {snapshot}" in (run_dir / "cmds" / "engine-0.sh").read_text()
    # status of the finished run: from its files, exit 0
    st = subprocess.run(slipstream("status", str(run_dir), "--once"), capture_output=True, text=True, env=e, timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"step       150 (policy version {steps[-1]['policy_version']}), reward {steps[-1]['reward_mean']:.3f}" in st.stdout
    assert "(finished; wall time" in st.stdout and "balanced=True" in st.stdout
    assert f"reward     first 10 steps {first:.3f} -> last 10 steps {last:.3f}" in st.stdout
    assert "DOWN" not in st.stdout


@pytest.mark.slow
def test_synchronous_mode_is_on_policy(tmp_path: Path) -> None:
    """η = 0, with a tracker that raises on every record (tests/test_tracking.py's sink; the run it
    needs is this one): the run finishes and summary.json counts every failed record."""
    r, run_dir = _run(tmp_path, "queue.max_staleness=0", "run.steps=12", 'tracking.backend="tests.test_tracking:make_raising_sink"')
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_completed"] == 12
    assert summary["tracking"]["failed"] == 12 and summary["tracking"]["errors_log"] == 12 and summary["tracking"]["logged"] == 0
    assert "tracker service is down" in (run_dir / "logs" / "trainer.log").read_text()
    consumed = _consumed(run_dir)
    assert len(consumed) == 12 * 8 * 8
    for c in consumed:
        assert c["min_version"] == c["max_version"] == c["trained_from_version"], c
    _assert_account_balances(run_dir)
    _assert_no_orphans(run_dir)
    # the trainer records each engine's weight transport (on CPU, weights.transport = auto broadcasts)
    transports = json.loads((run_dir / "ports" / "trainer.json").read_text())["weight_transports"]
    assert transports and set(transports.values()) == {"broadcast"}, transports


@pytest.mark.slow
def test_staleness_two_completes_within_bound(tmp_path: Path) -> None:
    r, run_dir = _run(tmp_path, "queue.max_staleness=2", "run.steps=15", "producer.max_inflight_groups=16")
    assert r.returncode == 0, r.stderr[-3000:]
    consumed = _consumed(run_dir)
    stale = [c["trained_from_version"] - c["min_version"] for c in consumed]
    assert max(stale) <= 2
    assert max(stale) >= 1, "with η = 2 the run should actually be asynchronous"
    _assert_account_balances(run_dir)
    _assert_no_orphans(run_dir)


@pytest.mark.slow
def test_pipeline_parallel_run_publishes_each_stage_from_its_own_rank(tmp_path: Path) -> None:
    """PP = 2 through the launcher: each stage's leader broadcasts its own layers (its own weight
    group), rank 0 drives the engine, and every version still lands bit for bit."""
    r, run_dir = _run(tmp_path, "trainer.pipeline_parallel=2", "run.steps=6", "run.verify_weights=true")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = _steps(run_dir)
    assert [s["policy_version"] for s in steps] == list(range(1, 7))
    for s in steps:
        assert s["engine_checksums"] and all(c == s["weights_checksum"] for c in s["engine_checksums"]), s["step"]
    log = (run_dir / "logs" / "trainer.log").read_text()
    # trainer rank 1 (stage 1's leader) sent its part of every version over its own group ...
    sent = re.findall(r"trainer-1 consumers.stage_publish: stage 1: version (\d+): [\d.]+ MiB .* over group '[^']*-pp1'", log)
    assert sorted(map(int, sent)) == list(range(1, 7)), sent
    # ... and rank 0 saw the engine receive both parts of every version, each over its group
    for stage, group in ((0, "weight_update_group"), (1, "weight_update_group-pp1")):
        got = re.findall(rf"trainer-0 consumers.publisher: version (\d+), stage {stage}: [\d.]+ MiB over group '{group}'", log)
        assert sorted(map(int, got)) == list(range(1, 7)), (stage, got)
    _assert_account_balances(run_dir)
    _assert_no_orphans(run_dir)


@pytest.mark.slow
def test_interrupt_stops_every_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'", "--set", "run.steps=1000"]
    proc = subprocess.Popen(slipstream(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not ((run_dir / "steps.jsonl").exists() and len((run_dir / "steps.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "run did not reach step 3"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=90)
    assert proc.returncode == 130
    _assert_no_orphans(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == 130 and summary["trajectories"]["balanced"] is True
