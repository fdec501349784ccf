"""The broker as a real process on real ZeroMQ sockets: credits, acks, dedup, rejections, staleness,
leases and liveness, checked through its replies and its /metrics endpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from schemas.codec import decode, encode
from schemas.messages import (
    Ack,
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Credit,
    CreditRequest,
    Error,
    Heartbeat,
    Hello,
    Published,
    Requeue,
    VersionAnnouncement,
    Welcome,
)
from tests.helpers import broker_config, process, scrape, slipstream, wait_json
from tests.test_schemas import make_group


class Peer:
    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, want: type | None = None, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = decode(self.sock.recv_multipart())
                if isinstance(msg, Heartbeat):
                    continue
                if want is None or isinstance(msg, want):
                    return msg
                if not isinstance(msg, (VersionAnnouncement, Credit, Requeue)):
                    raise AssertionError(f"expected {want}, got {msg}")
        raise TimeoutError(f"no {want} within {timeout_s}s")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[dict]:
    cfg = broker_config(tmp_path, """
max_staleness = 1
groups_per_step = 2
heartbeat_interval_s = 0.2
peer_timeout_s = 1.0
lease_timeout_s = 2.0
max_message_bytes = 65536
""")
    run_dir = tmp_path / "run"
    with process(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir)), tmp_path / "broker.log") as proc:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=proc)
        yield {
            "producer": f"tcp://127.0.0.1:{ports['producer_port']}",
            "trainer": f"tcp://127.0.0.1:{ports['trainer_port']}",
            "metrics": f"http://127.0.0.1:{ports['metrics_port']}/metrics",
            "run_dir": run_dir,
            "proc": proc,
        }


def test_credits_acks_dedup_rejections_and_batches(broker: dict) -> None:
    p = Peer(broker["producer"])
    p.send(Hello(role="producer", peer_id="producer-0", epoch=7, pid=1))
    assert p.recv(Welcome).policy_version == 0
    p.send(CreditRequest(want=10))
    assert p.recv(Credit).granted == (1 + 0 + 1) * 2  # (η + v + 1) × groups_per_step

    for seq in range(4):
        p.send(make_group(seq=seq))
        ack = p.recv(Ack)
        assert (ack.seq, ack.duplicate) == (seq, False)
    p.send(make_group(seq=0))  # a resend: acknowledged, not enqueued again
    assert p.recv(Ack).duplicate is True

    # Hostile input: each gets a precise error back and a counter; the broker keeps serving.
    p.send_raw([b"\xc1\x00\x01"])
    assert p.recv(Error).code == "malformed"
    g = make_group(seq=10)
    g.trajectories[0].logprobs = np.array([np.nan] * len(g.trajectories[0].response_tokens), np.float32)
    p.send(g)
    err = p.recv(Error)
    assert (err.code, err.seq) == ("nonfinite_logprob", 10)
    p.send(make_group(seq=11, version=5))
    assert p.recv(Error).code == "future_version"
    g = make_group(seq=12)
    g.trajectories[0].response_tokens = np.full_like(g.trajectories[0].response_tokens, 16)
    p.send(g)
    assert p.recv(Error).code == "token_out_of_range"
    p.send(make_group(seq=13, n=3, resp=3000))
    assert p.recv(Error).code == "oversize"
    frames = [bytes(f) for f in encode(make_group(seq=14))]
    header = msgpack.unpackb(frames[0])
    header["schema_version"] = 99
    p.send_raw([msgpack.packb(header), *frames[1:]])
    assert p.recv(Error).code == "schema_version"

    t = Peer(broker["trainer"])
    t.send(Hello(role="trainer", peer_id="trainer-0", policy_version=0))
    t.recv(Welcome)
    t.send(BatchRequest(step=1, policy_version=0, num_groups=2, dp_size=2))
    batch = t.recv(Batch)
    assert [g.seq for g in batch.groups] == [0, 1]
    assert sorted(i for s in batch.shards for i in s) == [0, 1] and len(batch.shards) == 2
    t.send(Commit(lease_id=batch.lease_id, step=1, policy_version=1))
    assert t.recv(CommitAck).policy_version == 1
    t.send(Published(policy_version=1))
    announced = [p.recv(VersionAnnouncement).policy_version for _ in range(2)]
    assert announced == [0, 1]  # once when the trainer said hello, once on publish
    # Budget at v=1: (1+1+1)*2 = 6 starts; 2 consumed + 2 queued -> 2 more of the 6 still wanted.
    assert p.recv(Credit).granted == 2

    # The trainer jumps to version 3: the queued v0 groups are now 3 > η stale -> requeued, never batched.
    t.send(BatchRequest(step=2, policy_version=3, num_groups=2, dp_size=1))
    requeues = [p.recv(Requeue), p.recv(Requeue)]
    assert {r.prompt_id for r in requeues} == {"p2", "p3"}

    m = scrape(broker["metrics"])
    assert m["slipstream_broker_trajectories_accepted_total"] == 4 * 3
    assert m["slipstream_broker_trajectories_consumed_total"] == 2 * 3
    assert m['slipstream_broker_trajectories_dropped_total{reason="stale_requeued"}'] == 2 * 3
    assert m["slipstream_broker_duplicate_groups_total"] == 1
    for reason in ("malformed", "nonfinite_logprob", "future_version", "token_out_of_range", "oversize", "schema_version"):
        assert m[f'slipstream_broker_rejected_messages_total{{reason="{reason}"}}'] == 1, reason
    assert m["slipstream_queue_depth_trajectories"] == 0


def test_lease_expiry_returns_groups_and_dead_producer_is_detected(broker: dict) -> None:
    p = Peer(broker["producer"])
    p.send(Hello(role="producer", peer_id="producer-0", epoch=1))
    p.recv(Welcome)
    p.send(CreditRequest(want=2))
    p.recv(Credit)
    for seq in range(2):
        p.send(make_group(seq=seq))
        p.recv(Ack)
    t = Peer(broker["trainer"])
    t.send(Hello(role="trainer", peer_id="trainer-0"))
    t.recv(Welcome)
    t.send(BatchRequest(step=1, policy_version=0, num_groups=2))
    first = t.recv(Batch)
    # Do not commit: after lease_timeout_s (2 s) the groups return and can be leased again.
    time.sleep(2.6)
    t.send(BatchRequest(step=1, policy_version=0, num_groups=2))
    second = t.recv(Batch, timeout_s=5)
    assert [g.group_id for g in second.groups] == [g.group_id for g in first.groups]
    assert second.lease_id != first.lease_id
    m = scrape(broker["metrics"])
    assert m["slipstream_broker_lease_expiries_total"] == 1
    # The producer has sent nothing since; it was silent past peer_timeout_s (1 s).
    assert m["slipstream_broker_producer_deaths_total"] == 1
    assert m["slipstream_broker_producers_alive"] == 0


def test_sigterm_writes_balanced_stats(broker: dict) -> None:
    p = Peer(broker["producer"])
    p.send(Hello(role="producer", peer_id="producer-0", epoch=1))
    p.recv(Welcome)
    p.send(CreditRequest(want=3))
    p.recv(Credit)
    for seq in range(3):
        p.send(make_group(seq=seq))
        p.recv(Ack)
    broker["proc"].terminate()
    broker["proc"].wait(timeout=10)
    stats = json.loads((broker["run_dir"] / "stats" / "broker.json").read_text())
    assert stats["trajectories_accepted"] == 9
    assert stats["trajectories_still_queued"] == 9
    assert stats["trajectories_consumed"] == 0


def test_a_new_trainer_process_gets_the_dead_ones_leased_groups_back_at_once(broker: dict) -> None:
    """A restarted trainer (another pid) says hello: the old one's lease is returned at once (no
    waiting for lease_timeout_s), counted as a lease expiry; a reconnect of the same pid keeps it."""
    p = Peer(broker["producer"])
    p.send(Hello(role="producer", peer_id="producer-0", epoch=1))
    p.recv(Welcome)
    p.send(CreditRequest(want=2))
    p.recv(Credit)
    for seq in range(2):
        p.send(make_group(seq=seq))
        p.recv(Ack)
    old = Peer(broker["trainer"])
    old.send(Hello(role="trainer", peer_id="trainer-0", pid=1000))
    old.recv(Welcome)
    old.send(BatchRequest(step=1, policy_version=0, num_groups=2))
    first = old.recv(Batch)
    old.send(Hello(role="trainer", peer_id="trainer-0", pid=1000))  # same process saying hello again
    old.recv(Welcome)
    old.send(BatchRequest(step=1, policy_version=0, num_groups=2))
    assert old.recv(Batch).lease_id == first.lease_id
    new = Peer(broker["trainer"])
    new.send(Hello(role="trainer", peer_id="trainer-0", pid=1001))
    new.recv(Welcome)
    new.send(BatchRequest(step=1, policy_version=0, num_groups=2))
    second = new.recv(Batch, timeout_s=1.5)  # well under lease_timeout_s (2 s)
    assert [g.group_id for g in second.groups] == [g.group_id for g in first.groups]
    assert second.lease_id != first.lease_id
    new.send(Commit(lease_id=second.lease_id, step=1, policy_version=1))
    new.recv(CommitAck)
    m = scrape(broker["metrics"])
    assert m["slipstream_broker_lease_expiries_total"] == 1
    assert m["slipstream_broker_trajectories_consumed_total"] == 6


def test_retained_batches_are_replayed_to_a_resumed_trainer_across_a_broker_restart(tmp_path: Path) -> None:
    """A trainer checkpointing every 2 steps commits steps 1-3 and reports its checkpoint of step 2;
    the broker is SIGKILLed and restarted (recovering the retained batch of step 3 from its journal);
    a new trainer process resumed from step 2 gets step 3 again, same groups and shards, marked as a
    replay; the broker dies again before that replay's commit, which the next incarnation still
    matches (once); step 3 is not consumed twice, and step 4 gets new data."""
    import os
    import signal
    import subprocess

    from schemas.messages import Checkpointed
    from tests.helpers import env

    cfg = broker_config(tmp_path, """
max_staleness = 10
groups_per_step = 2
heartbeat_interval_s = 0.2
peer_timeout_s = 5.0
max_message_bytes = 65536
""")
    run_dir = tmp_path / "run"
    log = (tmp_path / "broker.log").open("ab")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> dict:
        (run_dir / "ports" / "broker.json").unlink(missing_ok=True)
        procs.append(subprocess.Popen(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir), *extra),
                                      stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True))
        return wait_json(run_dir / "ports" / "broker.json", proc=procs[-1])

    try:
        ports = start()
        p = Peer(f"tcp://127.0.0.1:{ports['producer_port']}")
        p.send(Hello(role="producer", peer_id="producer-0", epoch=7))
        p.recv(Welcome)
        for seq in range(10):
            p.send(make_group(seq=seq, resp=1 + seq))
            assert p.recv(Ack).seq == seq
        old = Peer(f"tcp://127.0.0.1:{ports['trainer_port']}")
        old.send(Hello(role="trainer", peer_id="trainer-0", pid=1000, resume_step=0, checkpoint_every=2))
        old.recv(Welcome)
        served = {}
        for step in (1, 2, 3):
            old.send(BatchRequest(step=step, policy_version=step - 1, num_groups=2, dp_size=2))
            b = old.recv(Batch)
            assert not b.replay
            served[step] = ([g.group_id for g in b.groups], b.shards)
            old.send(Commit(lease_id=b.lease_id, step=step, policy_version=step))
            old.recv(CommitAck)
            old.send(Published(policy_version=step))
            if step == 2:
                old.send(Checkpointed(step=2, policy_version=2))
        time.sleep(0.3)
        m = scrape(f"http://127.0.0.1:{ports['metrics_port']}/metrics")
        assert m["slipstream_queue_retained_groups"] == 2, "steps 1 and 2 released by the checkpoint, step 3 retained"

        os.kill(procs[-1].pid, signal.SIGKILL)  # the broker dies; so does the trainer, before checkpointing step 3
        procs[-1].wait(timeout=10)
        ports = start("--set", f"queue.producer_port={ports['producer_port']}", "--set", f"queue.trainer_port={ports['trainer_port']}")
        new = Peer(f"tcp://127.0.0.1:{ports['trainer_port']}")
        new.send(Hello(role="trainer", peer_id="trainer-0", pid=1001, policy_version=2, resume_step=2, checkpoint_every=2))
        new.recv(Welcome)
        new.send(BatchRequest(step=3, policy_version=2, num_groups=2, dp_size=2))
        replay = new.recv(Batch)
        assert replay.replay and ([g.group_id for g in replay.groups], replay.shards) == served[3]
        os.kill(procs[-1].pid, signal.SIGKILL)  # the broker dies again, before the replay's commit
        procs[-1].wait(timeout=10)
        ports = start("--set", f"queue.producer_port={ports['producer_port']}", "--set", f"queue.trainer_port={ports['trainer_port']}")
        new.send(Commit(lease_id=replay.lease_id, step=3, policy_version=3))
        assert new.recv(Error).code == "not_registered"
        new.send(Hello(role="trainer", peer_id="trainer-0", pid=1001, policy_version=2, resume_step=-1, checkpoint_every=2))  # a reconnect
        new.recv(Welcome)
        new.send(Commit(lease_id=replay.lease_id, step=3, policy_version=3))  # a replay lease of the previous incarnation
        new.recv(CommitAck)
        new.send(Commit(lease_id=replay.lease_id, step=3, policy_version=3))  # repeated (ack lost): idempotent
        new.recv(CommitAck)
        new.send(BatchRequest(step=4, policy_version=3, num_groups=2, dp_size=2))
        fresh = new.recv(Batch)
        assert not fresh.replay and [g.seq for g in fresh.groups] == [6, 7]
        new.send(Commit(lease_id=fresh.lease_id, step=4, policy_version=4))
        new.recv(CommitAck)

        m = scrape(f"http://127.0.0.1:{ports['metrics_port']}/metrics")
        assert m["slipstream_queue_replayed_groups_total"] == 2
        assert m["slipstream_queue_replayed_trajectories_total"] == 6
        assert m["slipstream_broker_trajectories_consumed_total"] == 8 * 3, "the replay is not consumed twice"
        assert m["slipstream_queue_retained_groups"] == 4  # steps 3 and 4, until a checkpoint covers them
        assert m["slipstream_queue_retained_trajectories"] == 12
        assert (tmp_path / "broker.log").read_text().count("1 committed batches retained for replay (steps [3])") == 2
        # A trainer that does not checkpoint: nothing can be replayed any more, everything is released.
        new.send(Hello(role="trainer", peer_id="trainer-0", pid=1001, policy_version=4, checkpoint_every=0))
        new.recv(Welcome)
        time.sleep(0.3)
        assert scrape(f"http://127.0.0.1:{ports['metrics_port']}/metrics")["slipstream_queue_retained_groups"] == 0
        procs[-1].terminate()
        procs[-1].wait(timeout=10)
        stats = json.loads((run_dir / "stats" / "broker.json").read_text())
        assert (stats["trajectories_accepted"], stats["trajectories_consumed"], stats["trajectories_still_queued"]) == (30, 24, 6)
        assert (stats["trajectories_replayed"], stats["trajectories_retained"]) == (6, 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
