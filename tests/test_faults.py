"""Fault injection with real processes: `slipstream run` on the tiny example, SIGKILL one role
mid-stream, and audit every trajectory id.

The audit: every trajectory a producer got acked (RUN_DIR/acked/*.jsonl) is consumed exactly once
(RUN_DIR/consumed.jsonl), dropped/requeued for staleness, or still queued at the end (the
broker's journal, replayed offline); no id reaches the trainer twice; the summary balances and
counts the restart.

Not covered here: killing the trainer (resume needs trainer checkpoints, owned by consumers/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.journal import replay, scan
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


def _start(tmp_path: Path, steps: int) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir = tmp_path / "run"
    model = tmp_path.parent / "tiny-qwen3"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{model}'", "--set", f"run.steps={steps}",
            "--set", "run.restart_backoff_s=0.2", "--set", "run.verify_weights=false"]
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen(slipstream(*args), stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
    return proc, run_dir


def _wait_steps(proc: subprocess.Popen[bytes], run_dir: Path, n: int, tmp_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    path = run_dir / "steps.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, _logs(tmp_path)
        assert time.monotonic() < deadline, f"the run did not reach step {n} in {timeout_s}s\n{_logs(tmp_path)}"
        time.sleep(0.2)


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
    consumed = [json.loads(line)["trajectory_id"] for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    assert len(consumed) == len(set(consumed)), "a trajectory reached the trainer twice"
    assert len(consumed) == t["consumed"], (len(consumed), t)
    state = replay(run_dir / "journal", truncate_torn_tail=False)
    queued = {tid.trajectory_id for g in state.groups for tid in g.trajectories}
    assert len(queued) == t["still_queued"], (len(queued), t)
    dropped_keys = {tuple(k) for _, kind, p in scan(run_dir / "journal") if kind == "dropped" for k, _ in p["groups"]}
    dropped = {tid for key, ids in acked.items() if key in dropped_keys for tid in ids}
    lost = {tid for ids in acked.values() for tid in ids} - set(consumed) - queued - dropped
    assert not lost, f"{len(lost)} acked trajectories were lost, e.g. {sorted(lost)[:5]}"
    assert acked, "no acked trajectories were recorded"
    return summary


@pytest.mark.slow
def test_broker_sigkill_recovers_from_journal(tmp_path: Path) -> None:
    proc, run_dir = _start(tmp_path, steps=16)
    try:
        _wait_steps(proc, run_dir, 4, tmp_path)
        _kill_and_wait_restart(run_dir, "broker")
        _wait_steps(proc, run_dir, 8, tmp_path)
        _kill_and_wait_restart(run_dir, "broker")  # twice: the second recovery replays a recovered journal
        assert proc.wait(timeout=180) == 0, _logs(tmp_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    summary = _audit(run_dir)
    assert summary["restarts"]["broker"] == 2
    assert summary["steps_completed"] == 16
    log = (run_dir / "logs" / "broker.log").read_text()
    assert log.count("recovered from the journal") == 2


@pytest.mark.slow
def test_producer_sigkill_is_restarted(tmp_path: Path) -> None:
    proc, run_dir = _start(tmp_path, steps=12)
    try:
        _wait_steps(proc, run_dir, 3, tmp_path)
        _kill_and_wait_restart(run_dir, "producer-0")
        assert proc.wait(timeout=180) == 0, _logs(tmp_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    summary = _audit(run_dir)
    assert summary["restarts"]["producer"] == 1
    assert summary["steps_completed"] == 12
    epochs = {json.loads(line)["epoch"] for line in (run_dir / "acked" / "producer-0.jsonl").read_text().splitlines()}
    assert len(epochs) == 2, "groups of both producer incarnations should have been acked"
    assert (run_dir / "stats" / "producer-0.incarnation-0.json").exists(), "the killed producer's last counts are kept"
