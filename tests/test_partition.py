"""A network partition between a producer and the broker, with real processes and a real link.

The producer and its embedded engine run in their own network namespace, joined to the broker's by
a veth pair; the broker binds the veth address (non-loopback, so ``queue.insecure = true``). The
test plays the trainer. Mid-stream the link goes down for longer than ``peer_timeout_s``: the
broker must declare the producer dead and reclaim its credits. After the link comes back the
producer re-registers and resends its outbox, consumption resumes, and the audit holds: no
trajectory consumed twice, every acked trajectory consumed or still queued.

Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.journal import replay
from schemas.messages import Batch, BatchRequest, Commit, CommitAck, Hello, Published, Welcome
from tests.helpers import REPO, process, scrape, slipstream, wait_json
from tests.test_broker import Peer

TINY = REPO / "examples" / "tiny" / "config.toml"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[dict]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 ('ip netns') to build a partitionable link")
    tag = os.getpid() % 100000
    ns, host_if, ns_if, net = f"ssp{tag}", f"ssa{tag}", f"ssb{tag}", f"10.231.{tag % 250}"
    try:
        _ip("netns", "add", ns)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"'ip netns add' is not available here: {e}")
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{net}.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/24", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield {"ns": ns, "host_if": host_if, "broker_ip": f"{net}.1"}
    finally:
        with contextlib.suppress(Exception):
            _ip("link", "del", host_if)
        with contextlib.suppress(Exception):
            _ip("netns", "del", ns)


def _consume(t: Peer, step: int, version: int, groups: int, consumed: list[str], timeout_s: float = 60) -> int:
    t.send(BatchRequest(step=step, policy_version=version, num_groups=groups))
    batch = t.recv(Batch, timeout_s=timeout_s)
    consumed.extend(tr.trajectory_id for g in batch.groups for tr in g.trajectories)
    t.send(Commit(lease_id=batch.lease_id, step=step, policy_version=version + 1))
    t.recv(CommitAck)
    t.send(Published(policy_version=version + 1))
    return version + 1


@pytest.mark.slow
def test_partitioned_producer_is_declared_dead_and_recovers(tmp_path: Path, netns: dict) -> None:
    from pipeline.tiny import ensure_tiny_model

    model = ensure_tiny_model(tmp_path.parent / "tiny-qwen3")
    run_dir = tmp_path / "run"
    sets = [f"model.path='{model}'", f"queue.host='{netns['broker_ip']}'", "queue.insecure=true", "queue.max_staleness=1000",
            "queue.groups_per_step=2", "queue.heartbeat_interval_s=0.25", "queue.peer_timeout_s=2.0", "producer.ack_timeout_s=1.0"]
    args = [a for s in sets for a in ("--set", s)]
    in_ns = ["ip", "netns", "exec", netns["ns"]]
    with process(slipstream("broker", "--config", str(TINY), "--run-dir", str(run_dir), *args), tmp_path / "broker.log") as broker:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=broker)
        engine_port_file = tmp_path / "engine.port"
        engine_cmd = [*in_ns, *slipstream("engine", "--model", str(model), "--host", "127.0.0.1", "--port", "0", "--port-file", str(engine_port_file))]
        with process(engine_cmd, tmp_path / "engine.log") as engine:
            deadline = time.monotonic() + 120
            while not engine_port_file.exists():
                assert engine.poll() is None and time.monotonic() < deadline, (tmp_path / "engine.log").read_text()[-2000:]
                time.sleep(0.1)
            engine_url = f"http://127.0.0.1:{int(json.loads(engine_port_file.read_text()))}"
            producer_cmd = [*in_ns, *slipstream("produce", "--config", str(TINY), "--run-dir", str(run_dir), "--producer-id", "producer-0",
                                                "--broker", f"tcp://{netns['broker_ip']}:{ports['producer_port']}", "--engine-url", engine_url, *args)]
            with process(producer_cmd, tmp_path / "producer.log") as producer:
                t = Peer(f"tcp://{netns['broker_ip']}:{ports['trainer_port']}")
                t.send(Hello(role="trainer", peer_id="trainer-0"))
                t.recv(Welcome)
                consumed: list[str] = []
                version = 0
                for _ in range(3):
                    version = _consume(t, version + 1, version, 2, consumed, timeout_s=120)
                _ip("link", "set", netns["host_if"], "down")  # the partition
                time.sleep(4.0)  # > peer_timeout_s
                metrics = f"http://127.0.0.1:{ports['metrics_port']}/metrics"
                assert scrape(metrics)["slipstream_broker_producer_deaths_total"] >= 1, "the partitioned producer was not declared dead"
                _ip("link", "set", netns["host_if"], "up")  # healed
                for _ in range(4):
                    version = _consume(t, version + 1, version, 2, consumed)
                assert producer.poll() is None
        broker.terminate()
        broker.wait(timeout=15)
    assert len(consumed) == len(set(consumed)), "a trajectory was consumed twice"
    acked = {tid for line in (run_dir / "acked" / "producer-0.jsonl").read_text().splitlines() for tid in json.loads(line)["trajectory_ids"]}
    queued = {tr.trajectory_id for g in replay(run_dir / "journal", truncate_torn_tail=False).groups for tr in g.trajectories}
    lost = acked - set(consumed) - queued
    assert not lost, f"{len(lost)} acked trajectories lost"
    stats = json.loads((run_dir / "stats" / "broker.json").read_text())
    assert stats["trajectories_consumed"] == len(consumed)
    assert (tmp_path / "broker.log").read_text().count("producer producer-0 (pid") >= 2, "the producer should have re-registered"
