"""``slipstream status RUN_DIR --once`` against real metrics endpoints (no pipeline needed).

Each process's real metrics class is served with ``serve_metrics`` and set to known values; the
printed step, versions, queue, credits, staleness, drops, rejections and up/down states must be
exactly those, tokens/s must come from two scrapes, and a process whose endpoint is gone is DOWN.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.loop import TrainerMetrics
from pipeline.broker import BrokerMetrics
from pipeline.metrics import new_registry, serve_metrics
from producers.engine.metrics import EngineMetrics
from producers.producer import ProducerMetrics
from tests.helpers import env, slipstream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fake_run(tmp_path: Path) -> Iterator[tuple[Path, dict]]:
    b, p, t = BrokerMetrics(), ProducerMetrics(), TrainerMetrics()
    e_reg = new_registry("engine")
    e = EngineMetrics(e_reg)
    b.depth.set(24)
    b.depth_groups.set(3)
    b.leased.set(1)
    b.bytes.set(4096)
    b.in_flight.set(5)
    b.capacity.set(2)
    b.dropped.labels("stale_requeued").inc(7)
    b.rejected.labels("bad_dtype").inc(2)
    b.producers_alive.set(1)
    b.trainer_alive.set(1)
    b.version.labels("broker").set(12)
    for s in (0, 1, 1, 1):
        b.staleness.observe(s)
    p.version.labels("producer").set(12)
    t.version.labels("trainer").set(13)
    t.steps.inc(13)
    t.staleness_mean.set(0.75)
    t.staleness_max.set(1)
    e.version.set(12)
    servers = []
    procs = []
    for name, role, reg in (("broker", "broker", b.registry), ("engine-0", "engine", e_reg),
                            ("producer-0", "producer", p.registry), ("trainer", "trainer", t.registry)):
        server, port = serve_metrics(reg, "127.0.0.1", 0)
        servers.append(server)
        procs.append({"name": name, "role": role, "pid": None, "metrics_url": f"http://127.0.0.1:{port}/metrics"})
    procs.append({"name": "producer-1", "role": "producer", "pid": None, "metrics_url": f"http://127.0.0.1:{_free_port()}/metrics"})
    (tmp_path / "processes.json").write_text(json.dumps(procs))
    stop = threading.Event()

    def generate() -> None:  # ~1000 tokens/s generated while the test runs
        while not stop.wait(0.05):
            p.tokens.inc(50)

    th = threading.Thread(target=generate, daemon=True)
    th.start()
    yield tmp_path, {"producer": p, "trainer": t}
    stop.set()
    th.join(timeout=5)
    for s in servers:
        s.shutdown()


def _line(out: str, key: str) -> str:
    m = re.search(rf"^{key}\s+(.*)$", out, re.MULTILINE)
    assert m, f"no {key!r} line in:\n{out}"
    return m.group(1)


def test_status_once_prints_the_metrics(fake_run: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    run_dir, _ = fake_run
    t0 = time.monotonic()
    assert main(["status", str(run_dir), "--once"]) == 0
    assert time.monotonic() - t0 < 10
    out = capsys.readouterr().out
    assert _line(out, "step") == "13"
    assert _line(out, "versions") == "broker=12 engine-0=12 producer-0=12 trainer=13 producer-1=-"
    assert _line(out, "queue") == "depth=24 trajectories groups=3 leased=1 bytes=4096"
    assert _line(out, "credits") == "in_flight=5 available=2"
    assert _line(out, "staleness") == "batch_mean=0.75 batch_max=1 consumed_mean=0.75"
    assert _line(out, "dropped") == "total=7 stale_requeued=7"
    assert _line(out, "rejected") == "total=2 bad_dtype=2"
    assert _line(out, "peers") == "producers_alive=1/2 trainer_alive=1"
    tokens = re.fullmatch(r"generated=(\d+) trained=(\d+)", _line(out, "tokens/s"))
    assert tokens, out
    assert 300 < int(tokens.group(1)) < 1500, out  # 1000/s nominal, scheduling on 2 cores aside
    assert tokens.group(2) == "0"
    states = dict(re.findall(r"^  (\S+)\s+\S+\s+(up|DOWN)", out, re.MULTILINE))
    assert states == {"broker": "up", "engine-0": "up", "producer-0": "up", "trainer": "up", "producer-1": "DOWN"}


def test_status_without_run_dir_fails(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("status", str(tmp_path), "--once"), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 1 and "processes.json not found" in r.stdout, r.stdout + r.stderr


def test_finished_run_is_shown_from_its_files(tmp_path: Path) -> None:
    """A finished run (summary.json newer than processes.json): final step, reward and the
    summary from its files, exit 0; no endpoint is scraped (they are gone)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "processes.json").write_text(json.dumps([{"name": "broker", "role": "broker", "pid": None, "metrics_url": "http://127.0.0.1:9/metrics"}]))
    steps = [{"step": s, "policy_version": s, "reward_mean": 0.1 * s, "staleness_mean": 0.5, "staleness_max": 1} for s in (1, 2, 3)]
    (run / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    summary = {"exit_code": 0, "wall_time_s": 42.5, "steps_completed": 3, "final_policy_version": 3,
               "trajectories": {"generated": 200, "accepted": 192, "consumed": 180, "dropped": {"stale_requeued": 4}, "still_queued": 8,
                                "duplicates_rejected_groups": 0, "balanced": True},
               "rejected_messages": {"bad_dtype": 2}, "restarts": {"broker": 0, "engine": 1, "producer": 0, "trainer": 0},
               "reward_first10_mean": 0.1, "reward_last10_mean": 0.9}
    (run / "summary.json").write_text(json.dumps(summary))
    r = subprocess.run(slipstream("status", str(run), "--once"), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert f"slipstream status: {run}  (finished; wall time 42.5 s)" in out
    assert "step       3 (policy version 3), reward 0.300, staleness 0.50/1" in out
    assert "reward     first 10 steps 0.100 -> last 10 steps 0.900" in out
    assert "trajectories generated=200 accepted=192 consumed=180 dropped=4 still_queued=8 duplicates=0 balanced=True" in out
    assert "dropped    stale_requeued=4" in out and "rejected   total=2 bad_dtype=2" in out and "engine=1" in out
    assert "DOWN" not in out
    summary["exit_code"] = 1
    (run / "summary.json").write_text(json.dumps(summary))
    assert "(failed (exit code 1); wall time" in subprocess.run(slipstream("status", str(run), "--once"), capture_output=True, text=True,
                                                               env=env(), timeout=60).stdout
    # the run directory was reused by a new run (processes.json is newer): live view again
    os.utime(run / "summary.json", (time.time() - 100, time.time() - 100))
    r = subprocess.run(slipstream("status", str(run), "--once"), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 1 and "DOWN" in r.stdout
