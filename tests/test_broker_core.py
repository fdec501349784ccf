"""The broker core in-process: every transition the subprocess tests need a real broker and sleeps
for (credits, acks, dedup, rejections, lease expiry, dead producers, a replaced trainer, recovery
after a restart with leases of the earlier incarnation, retained-batch replay, idempotent commits,
the broker's audit trail), driven by ``handle``/``tick`` with an injected clock.  The same
transitions over real sockets stay in tests/test_broker.py and tests/test_journal.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.ackslog import AckLog
from pipeline.broker_core import PRODUCER, TRAINER, BrokerCore
from pipeline.config import QueueConfig
from pipeline.journal import Journal, scan
from schemas.codec import decode, encode
from schemas.messages import (
    Ack,
    Batch,
    BatchRequest,
    Checkpointed,
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
from tests.test_schemas import make_group

P, T = (PRODUCER, b"p-1"), (TRAINER, b"t-1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cfg(**kw: Any) -> QueueConfig:
    base: dict[str, Any] = {"max_staleness": 1, "groups_per_step": 2, "heartbeat_interval_s": 0.2, "peer_timeout_s": 1.0, "lease_timeout_s": 2.0,
                            "max_message_bytes": 65536, "journal_fsync": "never"}
    return QueueConfig(**{**base, **kw})


def _core(tmp: Path | None = None, clock: Clock | None = None, **kw: Any) -> BrokerCore:
    journal = Journal(tmp / "journal", fsync="never") if tmp is not None else None
    acks = AckLog(tmp / "acked") if tmp is not None else None
    return BrokerCore(_cfg(**kw), group_size=3, vocab_size=16, journal=journal, clock=clock or Clock(), acks=acks)


def send(core: BrokerCore, peer: tuple[str, bytes], msg: Any) -> list[Any]:
    """Handle one message; the replies as the peer would decode them (through the codec)."""
    replies = core.handle(peer, [bytes(f) for f in encode(msg)])
    return [decode([bytes(f) for f in encode(m)]) for to, m in replies if to == peer]


def only(replies: list[Any], kind: type) -> Any:
    found = [m for m in replies if isinstance(m, kind)]
    assert len(found) == 1, replies
    return found[0]


def producer(core: BrokerCore, want: int = 0, epoch: int = 7) -> None:
    only(send(core, P, Hello(role="producer", peer_id="producer-0", epoch=epoch)), Welcome)
    if want:
        send(core, P, CreditRequest(want=want))


def trainer(core: BrokerCore, pid: int = 1, peer: tuple[str, bytes] = T, **kw: Any) -> None:
    only(send(core, peer, Hello(role="trainer", peer_id="trainer-0", pid=pid, **kw)), Welcome)


def test_credits_acks_dedup_and_rejections() -> None:
    core = _core()
    assert only(send(core, P, make_group(seq=0)), Error).code == "not_registered"
    producer(core)
    assert only(send(core, P, CreditRequest(want=10)), Credit).granted == (1 + 0 + 1) * 2
    for seq in range(4):
        assert only(send(core, P, make_group(seq=seq)), Ack).seq == seq
    assert only(send(core, P, make_group(seq=0)), Ack).duplicate is True
    bad = make_group(seq=9)
    bad.trajectories[0].logprobs = np.full(len(bad.trajectories[0].response_tokens), np.nan, np.float32)
    err = only(send(core, P, bad), Error)
    assert (err.code, err.seq) == ("nonfinite_logprob", 9)
    assert only([m for _, m in core.handle(P, [b"\xc1"])], Error).code == "malformed"
    assert only(send(core, P, BatchRequest(step=1, policy_version=0, num_groups=1)), Error).code == "not_allowed"
    m = core.metrics.registry.get_sample_value
    assert m("slipstream_broker_trajectories_accepted_total") == 12
    assert m("slipstream_broker_duplicate_groups_total") == 1
    assert m("slipstream_broker_rejected_messages_total", {"reason": "malformed"}) == 1
    assert m("slipstream_broker_rejected_messages_total", {"reason": "not_registered"}) == 1


def test_batches_staleness_requeue_and_version_announcements() -> None:
    core = _core()
    producer(core, want=4)
    for seq in range(4):
        send(core, P, make_group(seq=seq))
    assert only(send(core, T, Commit(lease_id="x", step=1, policy_version=1)), Error).code == "not_registered"
    trainer(core)
    batch = only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2, dp_size=2)), Batch)
    assert [g.seq for g in batch.groups] == [0, 1] and sorted(i for s in batch.shards for i in s) == [0, 1]
    assert only(send(core, T, Commit(lease_id=batch.lease_id, step=1, policy_version=1)), CommitAck).policy_version == 1
    replies = core.handle(T, encode(Published(policy_version=1)))
    assert [m.policy_version for to, m in replies if isinstance(m, VersionAnnouncement) and to == P] == [1]
    # A trainer at version 3: the queued v0 groups are 3 > η stale and requeued to their producer.
    replies = core.handle(T, encode(BatchRequest(step=2, policy_version=3, num_groups=2)))
    assert sorted(m.prompt_id for to, m in replies if isinstance(m, Requeue) and to == P) == ["p2", "p3"]
    assert not [m for _, m in replies if isinstance(m, Batch)]
    assert core.queue.stats.trajectories_dropped["stale_requeued"] == 6


def test_lease_expiry_dead_producer_and_heartbeats_follow_the_clock() -> None:
    clock = Clock()
    core = _core(clock=clock)
    producer(core, want=2)
    for seq in range(2):
        send(core, P, make_group(seq=seq))
    trainer(core)
    first = only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch)
    clock.now += 0.5
    replies = core.tick(clock.now)
    assert {to for to, m in replies if isinstance(m, Heartbeat)} == {P, T}  # both alive: heartbeats, no expiry
    assert core.queue.leases and core.metrics.registry.get_sample_value("slipstream_broker_lease_expiries_total") == 0
    clock.now += 2.0  # past lease_timeout_s (2 s) and the producer's peer_timeout_s (1 s)
    core.tick(clock.now)
    m = core.metrics.registry.get_sample_value
    assert m("slipstream_broker_lease_expiries_total") == 1 and m("slipstream_broker_producer_deaths_total") == 1
    assert m("slipstream_broker_producers_alive") == 0
    second = only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch)
    assert [g.group_id for g in second.groups] == [g.group_id for g in first.groups] and second.lease_id != first.lease_id


def test_a_new_trainer_process_gets_the_old_ones_leases_back_and_a_reconnect_keeps_them() -> None:
    core = _core()
    producer(core, want=2)
    for seq in range(2):
        send(core, P, make_group(seq=seq))
    trainer(core, pid=1000)
    first = only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch)
    trainer(core, pid=1000)  # the same process again: same lease for a resent request
    assert only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch).lease_id == first.lease_id
    t2 = (TRAINER, b"t-2")
    trainer(core, pid=1001, peer=t2)
    second = only(send(core, t2, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch)
    assert second.lease_id != first.lease_id and [g.seq for g in second.groups] == [0, 1]
    only(send(core, t2, Commit(lease_id=second.lease_id, step=1, policy_version=1)), CommitAck)
    only(send(core, t2, Commit(lease_id=second.lease_id, step=1, policy_version=1)), CommitAck)  # repeated: acked, not counted again
    assert only(send(core, t2, Commit(lease_id=first.lease_id, step=1, policy_version=1)), Error).code == "bad_field"
    assert core.queue.stats.trajectories_consumed == 6 and core.queue.stats.leases_expired == 1


def test_restart_recovers_queue_dedup_and_commits_a_lease_of_the_earlier_incarnation(tmp_path: Path) -> None:
    core = _core(tmp_path)
    producer(core, want=4)
    for seq in range(4):
        send(core, P, make_group(seq=seq))
    trainer(core)
    lease = only(send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2)), Batch).lease_id
    core.close()  # as good as a SIGKILL: every event was written before it was applied

    core = _core(tmp_path)  # the restarted broker: the journal's events applied to a fresh queue
    assert [g.seq for g in core.queue.groups] == [0, 1, 2, 3] and lease in core.queue.orphan_leases
    assert core.metrics.registry.get_sample_value("slipstream_broker_recovered_groups") == 4
    producer(core)
    assert only(send(core, P, make_group(seq=3)), Ack).duplicate is True
    trainer(core)
    assert only(send(core, T, Commit(lease_id=lease, step=1, policy_version=1)), CommitAck).lease_id == lease
    assert only(send(core, T, Commit(lease_id=lease, step=1, policy_version=1)), CommitAck).lease_id == lease  # idempotent
    assert [g.seq for g in only(send(core, T, BatchRequest(step=2, policy_version=0, num_groups=2)), Batch).groups] == [2, 3]
    s = core.final_stats()
    assert (s["trajectories_accepted"], s["trajectories_consumed"], s["trajectories_still_queued"]) == (12, 6, 6)


def test_retained_batch_is_replayed_after_a_restart_and_its_commit_counts_once(tmp_path: Path) -> None:
    core = _core(tmp_path, max_staleness=10)
    producer(core, want=8)
    for seq in range(8):
        send(core, P, make_group(seq=seq, resp=1 + seq))
    trainer(core, pid=1000, resume_step=0, checkpoint_every=2)
    served = {}
    for step in (1, 2, 3):
        b = only(send(core, T, BatchRequest(step=step, policy_version=step - 1, num_groups=2, dp_size=2)), Batch)
        served[step] = ([g.group_id for g in b.groups], b.shards)
        only(send(core, T, Commit(lease_id=b.lease_id, step=step, policy_version=step)), CommitAck)
        send(core, T, Published(policy_version=step))
    send(core, T, Checkpointed(step=2, policy_version=2))
    assert sorted(core.queue.retained) == [3]
    core.close()

    core = _core(tmp_path, max_staleness=10)
    assert sorted(core.queue.retained) == [3]
    trainer(core, pid=1001, policy_version=2, resume_step=2, checkpoint_every=2)
    replay = only(send(core, T, BatchRequest(step=3, policy_version=2, num_groups=2, dp_size=2)), Batch)
    assert replay.replay and ([g.group_id for g in replay.groups], replay.shards) == served[3]
    core.close()

    core = _core(tmp_path, max_staleness=10)  # dies again before the replay's commit
    assert replay.lease_id in core.queue.orphan_replays
    trainer(core, pid=1001, policy_version=2, checkpoint_every=2)
    only(send(core, T, Commit(lease_id=replay.lease_id, step=3, policy_version=3)), CommitAck)
    only(send(core, T, Commit(lease_id=replay.lease_id, step=3, policy_version=3)), CommitAck)
    fresh = only(send(core, T, BatchRequest(step=4, policy_version=3, num_groups=2, dp_size=2)), Batch)
    assert not fresh.replay and [g.seq for g in fresh.groups] == [6, 7]
    s = core.queue.stats
    assert (s.groups_replayed, s.trajectories_consumed) == (2, 18)


def test_the_journal_is_the_queues_event_log_and_replay_applies_it(tmp_path: Path) -> None:
    """Each change is one record, in order; a lease expiry is an event too (the restarted queue has
    the same order as the live one)."""
    clock = Clock()
    core = _core(tmp_path, clock=clock)
    producer(core, want=3)
    for seq in range(3):
        send(core, P, make_group(seq=seq))
    trainer(core)
    send(core, T, BatchRequest(step=1, policy_version=0, num_groups=2))
    clock.now += 10
    core.tick(clock.now)  # the lease expires: its groups go back to the front
    live = [g.seq for g in core.queue.groups]
    core.close()
    kinds = [kind for _, kind, _ in scan(tmp_path / "journal")]
    assert kinds == ["checkpoint", "accepted", "accepted", "accepted", "leased", "returned"]
    assert [g.seq for g in _core(tmp_path).queue.groups] == live == [0, 1, 2]


def test_the_broker_writes_the_audit_line_before_the_ack(tmp_path: Path) -> None:
    core = _core(tmp_path)
    producer(core, want=2)
    replies = core.handle(P, encode(make_group(seq=0)))
    assert isinstance(replies[0][1], Ack)
    lines = [json.loads(x) for x in (tmp_path / "acked" / "producer-0.jsonl").read_text().splitlines()]  # already on disk
    assert lines == [{"group_id": "g0", "epoch": 7, "seq": 0, "duplicate": False, "trajectory_ids": ["t0", "t1", "t2"]}]
    hostile = make_group(seq=1)
    hostile.producer_id = "../evil"
    core.handle((PRODUCER, b"p-2"), encode(Hello(role="producer", peer_id="../evil", epoch=1)))
    core.handle((PRODUCER, b"p-2"), encode(hostile))
    assert json.loads((tmp_path / "acked" / "_other.jsonl").read_text())["producer_id"] == "../evil"
    assert sorted(p.name for p in (tmp_path / "acked").iterdir()) == ["_other.jsonl", "producer-0.jsonl"]
