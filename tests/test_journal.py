"""The queue journal: replay rebuilds queue, dedup state and counters (through rotation and
compaction); torn and corrupt records are detected, skipped and counted; and a SIGKILLed broker
process restarted on the same ports recovers every acked group, dedups resends, and accepts the
commit of a lease its previous incarnation issued, exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from pipeline.journal import Journal, replay, segment_paths
from pipeline.queue import StalenessQueue
from schemas.codec import encode
from schemas.messages import (
    Ack,
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Credit,
    CreditRequest,
    Error,
    Hello,
    Welcome,
)
from tests.helpers import broker_config, env, scrape, slipstream, wait_json
from tests.test_broker import Peer
from tests.test_schemas import make_group


def _frames(g) -> list[bytes]:
    return [bytes(f) for f in encode(g)]


def _journaled_queue(d: Path, segment_bytes: int) -> tuple[StalenessQueue, Journal]:
    q = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=1 << 30)
    j = Journal(d, segment_bytes=segment_bytes, fsync="never")
    j.recover()
    j.open_segment(q.stats, q.seen, q.published_policy_version)
    return q, j


def _accept(q: StalenessQueue, j: Journal, g) -> None:
    j.accepted(g, _frames(g))
    assert q.accept(g) == "accepted"
    j.maybe_rotate(q.stats, q.seen, q.published_policy_version)


def test_replay_rebuilds_queue_dedup_and_counters_through_compaction(tmp_path: Path) -> None:
    q, j = _journaled_queue(tmp_path, segment_bytes=1500)  # a few groups per segment: rotates and compacts
    for seq in range(6):
        _accept(q, j, make_group(seq=seq))
    res = q.take_batch(step=1, version=0, num_groups=2, dp_size=1)
    j.leased(res.lease.lease_id, res.lease.groups)
    j.consumed(res.lease.lease_id, res.lease.groups, 1)
    q.commit(res.lease.lease_id, 1)
    j.version(1)
    q.publish(1)
    stale = q.remove_stale(3)  # the 4 remaining v0 groups are 3 > η stale
    j.dropped("stale_requeued", stale)
    for seq in range(6, 10):
        _accept(q, j, make_group(seq=seq, version=1))
    res = q.take_batch(step=2, version=1, num_groups=2, dp_size=1)  # leased, never committed
    j.leased(res.lease.lease_id, res.lease.groups)
    j.maybe_rotate(q.stats, q.seen, q.published_policy_version)
    j.close()
    assert j.segments_deleted >= 1, "fully consumed segments should have been compacted away"

    rec = replay(tmp_path)
    assert [g.seq for g in rec.groups] == [6, 7, 8, 9]  # the uncommitted lease's groups are back, in order
    assert rec.leases == {res.lease.lease_id: [("producer-0", 7, 6), ("producer-0", 7, 7)]}
    assert all(("producer-0", 7, s) in rec.seen for s in range(10)) and ("producer-0", 7, 10) not in rec.seen
    s = rec.stats
    assert (s.groups_accepted, s.trajectories_accepted, s.groups_consumed, s.trajectories_consumed) == (10, 30, 2, 6)
    assert s.trajectories_dropped["stale_requeued"] == 12
    assert rec.version == 1 and rec.torn_records == 0
    # Balance: accepted = consumed + dropped + still queued (leased included).
    assert s.trajectories_accepted == s.trajectories_consumed + 12 + sum(len(g.trajectories) for g in rec.groups)


def test_replay_counts_commits_that_redo_a_version_as_superseded(tmp_path: Path) -> None:
    """A resumed trainer re-does version 2: both commits stay consumed, the second is superseded
    (admission control derives the same budget after a broker restart), also across a rotation."""
    q, j = _journaled_queue(tmp_path, segment_bytes=1 << 20)
    for seq in range(3):
        _accept(q, j, make_group(seq=seq, version=1))
    for step, version in ((1, 1), (2, 2), (2, 2)):  # step 2 twice: committed, then re-done after a resume
        res = q.take_batch(step=step, version=version - 1 if step == 1 else 1, num_groups=1, dp_size=1)
        j.leased(res.lease.lease_id, res.lease.groups)
        j.consumed(res.lease.lease_id, res.lease.groups, version)
        q.commit(res.lease.lease_id, version)
        if step == 1:
            j.version(1)
            q.publish(1)
            j.maybe_rotate(q.stats, q.seen, q.published_policy_version)
    j.close()
    assert (q.stats.groups_consumed, q.stats.groups_superseded) == (3, 1)
    rec = replay(tmp_path)
    assert (rec.stats.groups_consumed, rec.stats.groups_superseded) == (3, 1)
    j2 = Journal(tmp_path / "rotated", segment_bytes=1 << 20, fsync="never")
    j2.recover()
    j2.open_segment(q.stats, q.seen, q.published_policy_version)  # a new segment's checkpoint carries the count
    j2.close()
    assert replay(tmp_path / "rotated").stats.groups_superseded == 1


def test_torn_and_corrupt_records_are_skipped_counted_and_truncated(tmp_path: Path) -> None:
    q, j = _journaled_queue(tmp_path, segment_bytes=1 << 20)
    for seq in range(3):
        _accept(q, j, make_group(seq=seq))
    j.close()
    (seg,) = segment_paths(tmp_path)
    good_size = seg.stat().st_size
    with seg.open("ab") as f:  # a crash in the middle of writing a 4th record
        f.write(_frames(make_group(seq=3))[0][:7])
    rec = replay(tmp_path)
    assert [g.seq for g in rec.groups] == [0, 1, 2] and rec.torn_records == 1
    assert seg.stat().st_size == good_size, "the torn tail is truncated away"
    assert replay(tmp_path).torn_records == 0

    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the last record: CRC mismatch
    seg.write_bytes(bytes(data))
    rec = replay(tmp_path)
    assert [g.seq for g in rec.groups] == [0, 1] and rec.torn_records == 1
    assert ("producer-0", 7, 2) not in rec.seen  # never acked durably: a resend must be accepted


def test_sigkilled_broker_recovers_on_same_ports(tmp_path: Path) -> None:
    cfg = broker_config(tmp_path, """
max_staleness = 1
groups_per_step = 2
heartbeat_interval_s = 0.2
peer_timeout_s = 5.0
max_message_bytes = 65536
""")
    run_dir = tmp_path / "run"
    log = (tmp_path / "broker.log").open("ab")

    def start(*extra: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir), *extra),
                                stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True)

    proc = start()
    try:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=proc)
        p = Peer(f"tcp://127.0.0.1:{ports['producer_port']}")
        t = Peer(f"tcp://127.0.0.1:{ports['trainer_port']}")
        p.send(Hello(role="producer", peer_id="producer-0", epoch=7))
        p.recv(Welcome)
        p.send(CreditRequest(want=4))
        p.recv(Credit)
        for seq in range(4):
            p.send(make_group(seq=seq))
            assert p.recv(Ack).seq == seq
        t.send(Hello(role="trainer", peer_id="trainer-0"))
        t.recv(Welcome)
        t.send(BatchRequest(step=1, policy_version=0, num_groups=2))
        lease = t.recv(Batch).lease_id

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        (run_dir / "ports" / "broker.json").unlink()
        proc = start("--set", f"queue.producer_port={ports['producer_port']}", "--set", f"queue.trainer_port={ports['trainer_port']}")
        wait_json(run_dir / "ports" / "broker.json", proc=proc)

        p.send(make_group(seq=3))  # the restarted broker does not know this producer yet
        assert p.recv(Error).code == "not_registered"
        p.send(Hello(role="producer", peer_id="producer-0", epoch=7))
        p.recv(Welcome)
        p.send(make_group(seq=3))  # an outbox resend of an acked group: recognised, not enqueued twice
        assert p.recv(Ack).duplicate is True

        t.send(Commit(lease_id=lease, step=1, policy_version=1))
        assert t.recv(Error).code == "not_registered"
        t.send(Hello(role="trainer", peer_id="trainer-0"))
        t.recv(Welcome)
        t.send(Commit(lease_id=lease, step=1, policy_version=1))  # a lease of the previous incarnation
        assert t.recv(CommitAck).lease_id == lease
        t.send(Commit(lease_id=lease, step=1, policy_version=1))  # repeated (ack lost): idempotent
        assert t.recv(CommitAck).lease_id == lease
        t.send(BatchRequest(step=2, policy_version=0, num_groups=2))
        assert [g.seq for g in t.recv(Batch).groups] == [2, 3]  # 0 and 1 were consumed, exactly once

        m = scrape(f"http://127.0.0.1:{wait_json(run_dir / 'ports' / 'broker.json')['metrics_port']}/metrics")
        assert m["slipstream_broker_trajectories_accepted_total"] == 12
        assert m["slipstream_broker_trajectories_consumed_total"] == 6
        assert m["slipstream_broker_recovered_groups"] == 4
        proc.terminate()
        proc.wait(timeout=10)
        stats = json.loads((run_dir / "stats" / "broker.json").read_text())
        assert (stats["trajectories_accepted"], stats["trajectories_consumed"], stats["trajectories_still_queued"]) == (12, 6, 6)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_trainer_client_survives_broker_restarts(tmp_path: Path) -> None:
    """The real TrainerClient: a broker restart while it waits for a batch, and another between a
    batch and its commit; it re-registers, resends, and nothing is consumed twice or lost."""
    from pipeline.transport import TrainerClient
    from schemas.validate import Limits

    cfg = broker_config(tmp_path, "groups_per_step = 2\nheartbeat_interval_s = 0.2\npeer_timeout_s = 2.0")
    run_dir = tmp_path / "run"
    log = (tmp_path / "broker.log").open("ab")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> dict:
        ports_file = run_dir / "ports" / "broker.json"
        ports_file.unlink(missing_ok=True)
        procs.append(subprocess.Popen(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir), *extra),
                                      stdout=log, stderr=subprocess.STDOUT, env=env(), start_new_session=True))
        return wait_json(ports_file, proc=procs[-1])

    def kill_and_restart(ports: dict) -> None:
        os.kill(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait(timeout=10)
        start("--set", f"queue.producer_port={ports['producer_port']}", "--set", f"queue.trainer_port={ports['trainer_port']}")

    try:
        ports = start()
        p = Peer(f"tcp://127.0.0.1:{ports['producer_port']}")
        p.send(Hello(role="producer", peer_id="producer-0", epoch=7))
        p.recv(Welcome)
        for seq in range(4):
            p.send(make_group(seq=seq))
            p.recv(Ack)
        client = TrainerClient(f"tcp://127.0.0.1:{ports['trainer_port']}", "trainer-0", Limits(), heartbeat_interval_s=0.2, peer_timeout_s=2.0)
        client.hello(0, timeout_s=10)
        kill_and_restart(ports)  # while idle: the next request goes to a broker that does not know it
        b1 = client.request_batch(1, 0, 2, 1, timeout_s=20)
        kill_and_restart(ports)  # between batch and commit: the lease is from the previous incarnation
        assert client.commit(b1.lease_id, 1, 1, timeout_s=20).lease_id == b1.lease_id
        client.published(1)
        b2 = client.request_batch(2, 1, 2, 1, timeout_s=20)
        assert client.commit(b2.lease_id, 2, 2, timeout_s=20).lease_id == b2.lease_id
        assert [g.seq for g in b1.groups + b2.groups] == [0, 1, 2, 3]
        assert client.reconnects >= 2
        client.close()
        procs[-1].terminate()
        procs[-1].wait(timeout=10)
        stats = json.loads((run_dir / "stats" / "broker.json").read_text())
        assert (stats["trajectories_accepted"], stats["trajectories_consumed"], stats["trajectories_still_queued"]) == (12, 12, 0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def _commit(q: StalenessQueue, j: Journal, step: int, version: int, n: int = 2, dp: int = 2) -> list:
    res = q.take_batch(step=step, version=version, num_groups=n, dp_size=dp)
    lease = res.lease
    j.leased(lease.lease_id, lease.groups, step, lease.shards)
    retain = q.will_retain(lease.groups)
    j.consumed(lease.lease_id, lease.groups, version + 1, step, lease.shards, retain)
    q.commit(lease.lease_id, version + 1)
    j.maybe_rotate(q.stats, q.seen, q.published_policy_version)
    return lease.groups


def test_retained_batches_survive_replay_and_hold_their_segments_until_released(tmp_path: Path) -> None:
    """Committed batches kept for replay come back from the journal (groups in lease order, shards,
    step); the segments holding them are not compacted until a checkpoint releases them."""
    q, j = _journaled_queue(tmp_path, segment_bytes=1500)
    q.retain, q.max_staleness = True, 100
    for seq in range(12):
        _accept(q, j, make_group(seq=seq, n=1 + seq % 3))
    for step in (1, 2, 3):
        _commit(q, j, step, step - 1)
    released = q.release(1)  # a checkpoint of step 1
    j.released(released)
    for step in (4, 5, 6):  # more traffic: rotation and compaction run
        _commit(q, j, step, step - 1)
    released = q.release(4)
    j.released(released)
    j.maybe_rotate(q.stats, q.seen, q.published_policy_version)
    j.close()
    assert j.segments_deleted >= 1

    rec = replay(tmp_path)
    assert sorted(rec.retained) == [5, 6]
    assert [[g.dedup_key for g in rec.retained[s].groups] for s in (5, 6)] == [[g.dedup_key for g in q.retained[s].groups] for s in (5, 6)]
    assert [rec.retained[s].shards for s in (5, 6)] == [q.retained[s].shards for s in (5, 6)]
    assert rec.groups == [] and rec.stats.groups_consumed == 12
    # The oldest live segment holds step 5's groups: everything before it may go, nothing after it.
    oldest = min(int(p.stem.split("-")[1]) for p in segment_paths(tmp_path))
    assert oldest <= min(rec.live.values()), "a segment with retained groups was compacted away"
    assert {k for r in rec.retained.values() for k in (g.dedup_key for g in r.groups)} == set(rec.live)

    # Released by a later checkpoint: the journal lets the segments go.
    j2 = Journal(tmp_path, segment_bytes=1500, fsync="never")
    rec2 = j2.recover()
    q2 = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=1 << 30)
    q2.restore(rec2.groups, rec2.seen, rec2.stats, rec2.version, list(rec2.retained.values()))
    j2.open_segment(q2.stats, q2.seen, q2.published_policy_version)
    j2.released(q2.release(6))
    j2.maybe_rotate(q2.stats, q2.seen, q2.published_policy_version)
    j2.close()
    assert len(segment_paths(tmp_path)) == 1 and replay(tmp_path).retained == {}


def test_replay_commits_and_replay_leases_are_journaled(tmp_path: Path) -> None:
    q, j = _journaled_queue(tmp_path, segment_bytes=1 << 20)
    q.retain = True
    for seq in range(4):
        _accept(q, j, make_group(seq=seq))
    _commit(q, j, 1, 0)
    lease = q.replay_batch(1, 2)
    assert lease is not None
    j.leased(lease.lease_id, lease.groups, 1, lease.shards, replay=True)
    pending = replay(tmp_path)
    assert pending.replay_leases == {lease.lease_id: 1} and lease.lease_id not in pending.leases
    q.commit_replay(lease.lease_id)
    j.replayed(lease.lease_id, 1, 1, len(lease.groups), 6)
    j.close()
    rec = replay(tmp_path)
    assert rec.replay_leases == {} and rec.commits[lease.lease_id] == 1
    assert (rec.stats.groups_replayed, rec.stats.trajectories_replayed, rec.stats.groups_consumed) == (2, 6, 2)
