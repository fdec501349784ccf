"""Fault injection with real processes: `slipstream run` on the tiny example, SIGKILL one role
mid-stream, and audit every trajectory id.

The audit: every trajectory the broker acked (RUN_DIR/acked/*.jsonl, written by the broker before each ack) is consumed exactly once
(RUN_DIR/consumed.jsonl), dropped/requeued for staleness, or still queued at the end (the
broker's journal, replayed offline); no id reaches the trainer twice; the summary balances and
counts the restart.

Killing the trainer needs trainer checkpoints (``trainer.checkpoint_every``): the launcher restarts it
with ``trainer.resume_from = "latest"``; batches committed after its checkpoint stay consumed
(counted once) and the broker, which retained them, replays them to the resumed trainer at the same
steps (``consumed.jsonl`` lines with ``"replay": true``): it trains what the killed trainer trained.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.journal import replay, scan
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"
#: The replayed step's loss against the killed trainer's at that step (fixed seed, CPU, one thread):
#: same weights, optimizer state, RNG and batch, so it should be bit-identical; this allows for
#: nothing but float32 rounding.
LOSS_TOLERANCE = 1e-6


@contextlib.contextmanager
def _run(tmp_path: Path, steps: int, *sets: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Start ``slipstream run`` on the tiny example; on leaving, interrupt it if it still runs."""
    run_dir = tmp_path / "run"
    model = tmp_path.parent / "tiny-qwen3"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{model}'", "--set", f"run.steps={steps}",
            "--set", "run.restart_backoff_s=0.2", "--set", "run.verify_weights=false", *[a for kv in sets for a in ("--set", kv)]]
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen(slipstream(*args), stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
    try:
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def _wait_steps(proc: subprocess.Popen[bytes], run_dir: Path, n: int, tmp_path: Path, timeout_s: float = 120, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "steps.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, _logs(tmp_path)
        assert time.monotonic() < deadline, f"the run did not reach step {n} in {timeout_s}s\n{_logs(tmp_path)}"
        time.sleep(poll_s)


def _logs(tmp_path: Path) -> str:
    """The launcher's log and the tail of every process log (for a failure message)."""
    parts = [(tmp_path / "launcher.log").read_text()[-3000:]]
    for log in sorted((tmp_path / "run" / "logs").glob("*.log")):
        parts.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(parts)


def _pid(run_dir: Path, name: str) -> int:
    return next(p["pid"] for p in json.loads((run_dir / "processes.json").read_text()) if p["name"] == name)


def _kill_and_wait_restart(run_dir: Path, name: str, timeout_s: float = 60) -> None:
    old = _pid(run_dir, name)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while _pid(run_dir, name) == old:
        assert time.monotonic() < deadline, f"{name} was not restarted within {timeout_s}s"
        time.sleep(0.1)


def _audit(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["trajectories"]
    assert t["balanced"] is True, t
    acked: dict[tuple, list[str]] = {}
    for path in (run_dir / "acked").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            a = json.loads(line)
            acked[(path.stem, a["epoch"], a["seq"])] = a["trajectory_ids"]
    lines = [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    consumed = [c["trajectory_id"] for c in lines if not c.get("replay")]
    assert len(consumed) == len(set(consumed)), "a trajectory reached the trainer twice (outside a replay)"
    assert len(consumed) == t["consumed"], (len(consumed), t)
    replayed = [c for c in lines if c.get("replay")]
    assert len(replayed) == t.get("replayed", 0), (len(replayed), t)
    first_step = {c["trajectory_id"]: c["step"] for c in lines if not c.get("replay")}
    assert all(first_step.get(c["trajectory_id"]) == c["step"] for c in replayed), "a replay trained a trajectory at another step"
    state = replay(run_dir / "journal", truncate_torn_tail=False)
    queued = {tid.trajectory_id for g in state.groups for tid in g.trajectories}
    assert len(queued) == t["still_queued"], (len(queued), t)
    dropped_keys = {tuple(k) for _, kind, p in scan(run_dir / "journal") if kind == "dropped" for k, _ in p["groups"]}
    dropped = {tid for key, ids in acked.items() if key in dropped_keys for tid in ids}
    lost = {tid for ids in acked.values() for tid in ids} - set(consumed) - queued - dropped
    assert not lost, f"{len(lost)} acked trajectories were lost, e.g. {sorted(lost)[:5]}"
    assert acked, "no acked trajectories were recorded"
    # The broker writes the audit line before it sends the ack: every trajectory it accepted is in the
    # trail, whoever was killed (the producer's own view, acked/client/, may miss acks in flight).
    audited = {tid for ids in acked.values() for tid in ids}
    unaudited = (set(consumed) | queued) - audited
    assert not unaudited, f"{len(unaudited)} accepted trajectories are missing from the audit trail, e.g. {sorted(unaudited)[:5]}"
    assert len(audited) == t["accepted"], (len(audited), t)
    return summary


@pytest.mark.slow
def test_broker_sigkill_recovers_from_journal(tmp_path: Path) -> None:
    with _run(tmp_path, steps=16) as (proc, run_dir):
        _wait_steps(proc, run_dir, 4, tmp_path)
        _kill_and_wait_restart(run_dir, "broker")
        _wait_steps(proc, run_dir, 8, tmp_path)
        _kill_and_wait_restart(run_dir, "broker")  # twice: the second recovery replays a recovered journal
        assert proc.wait(timeout=180) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"]["broker"] == 2
    assert summary["steps_completed"] == 16
    log = (run_dir / "logs" / "broker.log").read_text()
    assert log.count("recovered from the journal") == 2


@pytest.mark.slow
def test_producer_sigkill_is_restarted(tmp_path: Path) -> None:
    with _run(tmp_path, steps=12) as (proc, run_dir):
        _wait_steps(proc, run_dir, 3, tmp_path)
        _kill_and_wait_restart(run_dir, "producer-0")
        assert proc.wait(timeout=180) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"]["producer"] == 1
    assert summary["steps_completed"] == 12
    epochs = {json.loads(line)["epoch"] for line in (run_dir / "acked" / "producer-0.jsonl").read_text().splitlines()}
    assert len(epochs) == 2, "groups of both producer incarnations should have been acked"
    assert (run_dir / "stats" / "producer-0.incarnation-0.json").exists(), "the killed producer's last counts are kept"
    # Each producer writes its stats before a group's first send: the killed one's count covers all it sent.
    assert summary["trajectories"]["generated"] >= summary["trajectories"]["accepted"], summary["trajectories"]


@pytest.mark.slow
def test_engine_sigkill_is_restarted_with_the_current_weights(tmp_path: Path) -> None:
    """SIGKILL the only engine just after a step: the launcher restarts it on its port, paused; the
    trainer (waiting for data only that engine can make) re-creates the weight group, sends it the
    current version and continues it.  The run finishes with every engine checksum matching the
    trainer's after every step (run.verify_weights), 0 lost, 0 duplicated, the restart counted.
    Checkpoints are on so that a kill landing inside a publish (its broadcast then fails) ends in a
    trainer resume rather than a failed run; the kill follows a step line within ~20 ms, well before
    the next publish starts."""
    with _run(tmp_path, 12, "run.verify_weights=true", "trainer.checkpoint_every=2") as (proc, run_dir):
        _wait_steps(proc, run_dir, 3, tmp_path, poll_s=0.02)
        url = next(p for p in json.loads((run_dir / "processes.json").read_text()) if p["name"] == "engine-0")["url"]
        _kill_and_wait_restart(run_dir, "engine-0")
        assert proc.wait(timeout=240) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"]["engine"] == 1
    assert summary["steps_completed"] == 12
    engine = next(p for p in json.loads((run_dir / "processes.json").read_text()) if p["name"] == "engine-0")
    assert engine["url"] == url and "--start-paused" in engine["cmd"], "same port, restarted paused"
    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert all(r["engine_checksums"] == [r["weights_checksum"]] for r in records), "an engine served other weights than the trainer's"
    engine_log = (run_dir / "logs" / "engine-0.log").read_text()
    assert "generation paused until the trainer sends the current weights" in engine_log
    assert engine_log.index("generation paused until") < engine_log.index("generation continued", engine_log.index("generation paused until"))
    trainer_log = (run_dir / "logs" / "trainer.log").read_text()
    assert summary["restarts"]["trainer"] or re.search(r"engine rejoin: \S+ serves v\d+ again", trainer_log), trainer_log[-3000:]


def _gone(pid: int) -> bool:
    """The process no longer exists (or is a zombie nobody will wait for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.slow
def test_trainer_sigkill_resumes_from_checkpoint(tmp_path: Path) -> None:
    """Checkpoints every 3 steps, SIGKILL the trainer just after step 4 is recorded (mid step 5):
    step 4 (and maybe 5) was committed after the checkpoint of step 3.  Those batches stay consumed
    (counted once); the broker retained them and replays them to the resumed trainer, which trains
    exactly the same trajectories at those steps, in the same order, with the same loss."""
    steps, gps, group_size = 10, 8, 8
    with _run(tmp_path, steps, "trainer.checkpoint_every=3") as (proc, run_dir):
        _wait_steps(proc, run_dir, 4, tmp_path, poll_s=0.02)
        old = _pid(run_dir, "trainer")
        _kill_and_wait_restart(run_dir, "trainer")
        assert proc.wait(timeout=180) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"]["trainer"] == 1
    assert summary["steps_completed"] == steps
    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "steps.jsonl: one line per step, resumed steps continuing"
    assert [r["policy_version"] for r in records] == list(range(1, steps + 1)), "the policy version continues from the checkpoint"
    log = (run_dir / "logs" / "trainer.log").read_text()
    resumed = int(re.search(r"resumed from \S+: step (\d+)", log).group(1))  # type: ignore[union-attr]
    assert resumed == 3, f"killed after step 4, the trainer should resume from the checkpoint of step 3\n{log[-2000:]}"
    # The steps committed after the checkpoint were trained twice on the same trajectories: by the
    # dead trainer, then by the resumed one on the broker's replay.  Nothing else was consumed.
    lines = [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    first = collections.defaultdict(list)
    again = collections.defaultdict(list)
    for c in lines:
        (again if c["replay"] else first)[c["step"]].append(c["trajectory_id"])
    assert sorted(first) == list(range(1, steps + 1)) and all(len(ids) == gps * group_size for ids in first.values()), \
        {s: len(ids) for s, ids in first.items()}
    assert sorted(again) in ([4], [4, 5]), sorted(again)
    for s, ids in again.items():
        assert ids == first[s], f"step {s}: the replay trained other trajectories (or another order) than the killed trainer"
    assert summary["trajectories"]["consumed"] == steps * gps * group_size, "zero lost, zero counted twice"
    assert summary["trajectories"]["replayed"] == sum(len(ids) for ids in again.values())
    assert summary["trajectories"]["retained"] == 0, "the final checkpoint released every retained batch"
    # The dead trainer's step lines after its checkpoint moved aside; the replayed step trained the
    # same batch from the same checkpointed weights, optimizer and RNG: the same loss.
    superseded = {r["step"]: r for r in map(json.loads, (run_dir / "steps.superseded.jsonl").read_text().splitlines())}
    assert 4 in superseded and all(s > resumed for s in superseded), sorted(superseded)
    redone = {r["step"]: r for r in records if r["step"] in superseded}
    for s, before in superseded.items():
        after = redone[s]
        assert after["replay"] is True and before["replay"] is False
        assert (after["reward_mean"], after["tokens_trained"]) == (before["reward_mean"], before["tokens_trained"])
    assert abs(redone[4]["loss"] - superseded[4]["loss"]) <= LOSS_TOLERANCE, (redone[4]["loss"], superseded[4]["loss"])
    assert "replaying step 4 to the resumed trainer" in (run_dir / "logs" / "broker.log").read_text()
    processes = json.loads((run_dir / "processes.json").read_text())
    trainer = next(p for p in processes if p["name"] == "trainer")
    assert 'trainer.resume_from="latest"' in trainer["cmd"]
    orphans = [p for p in [old, *(p["pid"] for p in processes)] if not _gone(p)]
    assert not orphans, f"processes outlived the run: {orphans}"


@pytest.mark.parametrize(("every", "code", "restarts"), [(0, 1, False), (2, 2, False), (2, 1, True)])
def test_trainer_restart_needs_checkpoints(tmp_path: Path, every: int, code: int, restarts: bool) -> None:
    """A crashed trainer is restarted (resuming from 'latest') only with trainer.checkpoint_every > 0,
    never after a config error (exit 2).  The fake trainer here writes its port file at once."""
    from pipeline.config import load_config
    from pipeline.launcher import Child, Launcher
    from pipeline.rundir import port_file

    cfg = load_config(TINY, [f"trainer.checkpoint_every={every}", "run.restart_backoff_s=0.01"])
    launcher = Launcher(cfg, tmp_path)
    stale = port_file(tmp_path, "trainer")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(json.dumps({"metrics_port": 1}))  # left by the dead trainer: must not be read as fresh
    script = f"import json, pathlib; pathlib.Path({str(stale)!r}).write_text(json.dumps({{'metrics_port': 2}}))"
    child = Child("trainer", "trainer", [sys.executable, "-c", script], tmp_path / "trainer.log")
    child.proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    child.proc.wait()
    assert launcher.restart(child) is restarts
    if restarts:
        assert child.cmd[-2:] == ["--set", 'trainer.resume_from="latest"']
        assert child.metrics_url.endswith(":2/metrics") and launcher.restarts_by_role["trainer"] == 1
        child.wait(10)
    child.close()
