"""The staleness-aware queue's semantics, as pure state (the broker's sockets are tested elsewhere)."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.queue import SeenSeqs, StalenessQueue, shard_by_tokens
from schemas.messages import Trajectory, TrajectoryGroup


def group(seq: int, version: int, producer: str = "p0", n: int = 2, length: int = 3, epoch: int = 1) -> TrajectoryGroup:
    trajs = [
        Trajectory(f"{producer}-{seq}-{i}", np.zeros(2, np.int32), np.zeros(length, np.int32), np.zeros(length, np.float32),
                   np.full(length, version, np.int32), np.ones(length, np.uint8), 0.0)
        for i in range(n)
    ]
    return TrajectoryGroup(f"g{producer}{seq}", f"prompt{seq}", producer, epoch, seq, trajs)


def test_admission_bound_is_eta_plus_v_plus_one_steps() -> None:
    q = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=10**9)
    assert q.capacity(group_size=2) == (1 + 0 + 1) * 2
    assert q.grant("p0", 10, 2) == 4
    assert q.grant("p0", 10, 2) == 0
    for s in range(4):
        assert q.accept(group(s, 0)) == "accepted"
    assert q.capacity(2) == 0  # accepted groups still count until consumed
    b = q.take_batch(1, 0, 2, 1)
    q.commit(b.lease.lease_id, 1)
    assert q.capacity(2) == 0  # committed but not yet published: credits stay closed
    q.publish(1)
    assert q.capacity(2) == 2


def test_synchronous_mode_grants_exactly_one_step() -> None:
    q = StalenessQueue(max_staleness=0, groups_per_step=3, max_trajectories=1000, max_bytes=10**9)
    assert q.grant("p0", 100, 2) == 3


def test_capacity_respects_trajectory_bound() -> None:
    q = StalenessQueue(max_staleness=8, groups_per_step=4, max_trajectories=10, max_bytes=10**9)
    assert q.grant("p0", 100, 4) == 2  # 2 groups x 4 trajectories fit in 10


def test_duplicates_are_enqueued_once() -> None:
    q = StalenessQueue(1, 2, 100, 10**9)
    assert q.accept(group(0, 0)) == "accepted"
    assert q.accept(group(0, 0)) == "duplicate"
    assert q.accept(group(0, 0, epoch=2)) == "accepted"  # a new epoch is a new producer life
    assert len(q.groups) == 2 and q.stats.groups_duplicate == 1


def test_seen_seqs_compacts_to_a_watermark() -> None:
    s = SeenSeqs()
    order = list(range(1000))
    random.Random(0).shuffle(order)
    for i in order:
        s.add(("p", 1, i))
    assert all(("p", 1, i) in s for i in range(1000))
    assert ("p", 1, 1000) not in s and ("p", 2, 0) not in s
    assert s._above[("p", 1)] == set()  # only the watermark is kept


def test_stale_groups_are_removed_and_never_batched() -> None:
    q = StalenessQueue(max_staleness=1, groups_per_step=1, max_trajectories=100, max_bytes=10**9)
    q.accept(group(0, 0))
    q.accept(group(1, 2))
    stale = q.remove_stale(version=2)  # group 0 is 2 versions behind
    assert [g.seq for g in stale] == [0]
    assert q.stats.trajectories_dropped["stale_requeued"] == 2
    b = q.take_batch(1, 2, 1, 1)
    assert [g.seq for g in b.lease.groups] == [1] and b.staleness == [0, 0]


def test_expired_lease_returns_groups_to_the_front() -> None:
    q = StalenessQueue(1, 2, 100, 10**9)
    for s in range(3):
        q.accept(group(s, 0))
    b = q.take_batch(1, 0, 2, 1)
    assert q.expire_leases(timeout_s=10.0, now=b.lease.issued_at + 5) == []
    assert [lease.lease_id for lease in q.expire_leases(timeout_s=10.0, now=b.lease.issued_at + 11)] == [b.lease.lease_id]
    assert [g.seq for g in q.groups] == [0, 1, 2]
    assert q.stats.leases_expired == 1


def test_token_balanced_sharding_keeps_groups_whole() -> None:
    groups = [group(i, 0, length=length) for i, length in enumerate([10, 1, 1, 1, 9, 2])]
    shards = shard_by_tokens(groups, 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    loads = [sum(groups[i].num_tokens for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(g.num_tokens for g in groups) // 2


@settings(max_examples=60, deadline=None)
@given(
    eta=st.integers(0, 3),
    b=st.integers(1, 4),
    ops=st.lists(st.tuples(st.sampled_from(["produce", "train", "lag"]), st.integers(0, 3)), min_size=5, max_size=120),
)
def test_random_schedules_never_exceed_the_bound_and_always_balance(eta: int, b: int, ops: list[tuple[str, int]]) -> None:
    """Whatever the interleaving of producers and trainer, consumed staleness <= η and
    accepted = consumed + dropped + queued."""
    q = StalenessQueue(eta, b, 10_000, 10**12)
    version, step, seq = 0, 0, 0
    started: list[int] = []  # versions at which granted groups started
    for op, k in ops:
        if op == "produce":
            for _ in range(q.grant("p0", k + 1, 2)):
                started.append(version)
        elif op == "lag" and started:
            # Finish the oldest started group: its tokens carry the version it started at.
            v0 = started.pop(0)
            assert q.accept(group(seq, v0)) == "accepted"
            seq += 1
        elif op == "train":
            q.remove_stale(version)
            if q.ready(b):
                step += 1
                res = q.take_batch(step, version, b, 1)
                assert max(res.staleness) <= eta
                version += 1
                q.commit(res.lease.lease_id, version)
                q.publish(version)
        s = q.stats
        assert s.trajectories_accepted == s.trajectories_consumed + sum(s.trajectories_dropped.values()) + q.queued_trajectories + sum(
            len(g.trajectories) for lease in q.leases.values() for g in lease.groups)


def test_resumed_trainer_redoing_versions_is_not_counted_twice_in_admission() -> None:
    """A trainer resumed from a checkpoint older than its last commit re-does versions: those
    commits count as consumed in the account, but not again in admission (no slow deadlock)."""
    q = StalenessQueue(max_staleness=0, groups_per_step=1, max_trajectories=1000, max_bytes=10**9)
    for v in range(2):  # the first trainer: steps 1 and 2
        assert q.grant("p0", 10, 2) == 1
        q.accept(group(v, v))
        q.commit(q.take_batch(v + 1, v, 1, 1).lease.lease_id, v + 1)
        q.publish(v + 1)
    assert q.capacity(2) == 1
    # It died before checkpointing step 2; the resumed trainer (version 1) re-does step 2.
    q.publish(1)  # its hello: the published version does not go back
    assert q.grant("p0", 10, 2) == 1
    q.accept(group(2, 1))
    q.commit(q.take_batch(2, 1, 1, 1).lease.lease_id, 2)
    q.publish(2)
    assert q.stats.groups_consumed == 3 and q.stats.groups_superseded == 1
    assert q.capacity(2) == 1, "a re-done version must leave the η = 0 budget at one step"


def test_queue_without_history_meeting_a_resumed_trainer_grants_eta_plus_one_steps() -> None:
    """A broker that starts empty (no journal) and learns version 40 from a resumed trainer's hello
    grants η + 1 steps of credits, as at any point of a fresh run, not η + 40 + 1 (AReaL #1345)."""
    fresh = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=10**9)
    resumed = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=10**9)
    resumed.publish(40)
    assert resumed.capacity(2) == fresh.capacity(2) == (1 + 1) * 2
    assert resumed.grant("p0", 100, 2) == 4
    for s in range(4):
        assert resumed.accept(group(s, 40)) == "accepted"
    resumed.commit(resumed.take_batch(41, 40, 2, 1).lease.lease_id, 41)
    assert resumed.capacity(2) == 0, "committed, not yet published: closed, as in a fresh run"
    resumed.publish(41)
    assert resumed.capacity(2) == 2, "one more step's credits per published version"


def test_groups_from_a_newer_abandoned_policy_are_stale() -> None:
    """After a resume to version 1, tokens sampled at version 2 (the dead trainer's) are not on the
    resumed policy: never batched, handled by the stale policy."""
    q = StalenessQueue(max_staleness=1, groups_per_step=1, max_trajectories=100, max_bytes=10**9)
    q.accept(group(0, 2))
    q.accept(group(1, 1))
    assert [g.seq for g in q.remove_stale(version=1)] == [0]
    assert q.stats.trajectories_dropped["stale_requeued"] == 2
    assert [g.seq for g in q.take_batch(2, 1, 1, 1).lease.groups] == [1]


def test_return_all_leases_puts_groups_back_in_order() -> None:
    q = StalenessQueue(1, 1, 100, 10**9)
    for s in range(3):
        q.accept(group(s, 0))
    a = q.take_batch(1, 0, 1, 1)
    b = q.take_batch(2, 0, 1, 1)
    assert [lease.lease_id for lease in q.return_all_leases()] == [a.lease.lease_id, b.lease.lease_id]
    assert sorted(g.seq for g in q.groups) == [0, 1, 2] and not q.leases
    assert q.stats.leases_expired == 2 and q.queued_trajectories == 6


# ---------------------------------------------------------------- retention and replay (trainer resume)


def _step(q: StalenessQueue, step: int, version: int, n: int = 1, dp: int = 1) -> list[str]:
    res = q.take_batch(step, version, n, dp)
    q.commit(res.lease.lease_id, version + 1)
    return [g.group_id for g in res.lease.groups]


def test_committed_batches_are_retained_until_a_checkpoint_covers_them_and_replayed_as_first_served() -> None:
    q = StalenessQueue(max_staleness=4, groups_per_step=2, max_trajectories=1000, max_bytes=10**9)
    q.retain = True
    for s in range(8):
        q.accept(group(s, 0, length=1 + s))  # different sizes: the shards are not trivial
    first = {}
    for step in (1, 2, 3):
        res = q.take_batch(step, step - 1, 2, 2)
        first[step] = ([g.group_id for g in res.lease.groups], res.shards)
        q.commit(res.lease.lease_id, step)
    assert list(q.retained) == [1, 2, 3] and q.retained_trajectories == 12
    assert [r.step for r in q.release(2)] == [1, 2]  # the trainer checkpointed step 2
    assert list(q.retained) == [3] and q.retained_trajectories == 4
    consumed = q.stats.trajectories_consumed
    # The trainer dies and resumes from step 2: step 3 is served again exactly as first served.
    q.return_all_leases()
    lease = q.replay_batch(3, dp_size=2)
    assert lease is not None and lease.replay
    assert ([g.group_id for g in lease.groups], lease.shards) == first[3]
    assert q.replay_batch(3, dp_size=2) is lease  # a resent request gets the same replay lease
    assert q.replay_batch(4, dp_size=2) is None  # step 4 was never committed: new data
    q.commit_replay(lease.lease_id)
    assert q.stats.trajectories_consumed == consumed, "a replay is not consumed twice"
    assert (q.stats.groups_replayed, q.stats.trajectories_replayed) == (2, 4)
    assert list(q.retained) == [3], "still retained until a checkpoint covers step 3 (the trainer may die again)"
    assert [g.seq for g in q.groups] == [6, 7], "replays never touch the queue"


def test_nothing_is_retained_without_checkpoints() -> None:
    q = StalenessQueue(max_staleness=4, groups_per_step=1, max_trajectories=1000, max_bytes=10**9)
    for s in range(2):
        q.accept(group(s, 0))
    _step(q, 1, 0)
    assert q.retained == {} and q.retained_trajectories == 0 and q.replay_batch(1, 1) is None


def test_retained_groups_count_against_the_bound_and_never_starve_the_next_step() -> None:
    """Retention shrinks credits and makes admission answer 'full'; a batch is retained only while
    one more batch of its size fits beside the retained ones (else the trainer could never reach its
    next checkpoint), and one that does not fit is counted."""
    q = StalenessQueue(max_staleness=10, groups_per_step=1, max_trajectories=8, max_bytes=10**9)  # 4 groups of 2
    q.retain = True
    for step in (1, 2, 3, 4):
        assert q.accept(group(step, 0)) == "accepted"
        _step(q, step, 0)
    # Retained: steps 1..3 (6 trajectories: 6 + 2 x 2 > 8 stops step 4 from being retained).
    assert list(q.retained) == [1, 2, 3] and q.stats.groups_not_retained == 1
    assert q.capacity(group_size=2) == 1, "only one group (the next step) fits beside the retained ones"
    assert q.accept(group(100, 0)) == "accepted"
    assert q.accept(group(101, 0)) == "full", "retained + queued at the bound: new data is refused"
    assert q.stats.groups_rejected_full == 1
    q.release(3)
    assert q.capacity(group_size=2) == 3 and q.accept(group(101, 0)) == "accepted"


def test_a_dead_trainers_replay_lease_is_forgotten_not_requeued() -> None:
    q = StalenessQueue(max_staleness=4, groups_per_step=1, max_trajectories=100, max_bytes=10**9)
    q.retain = True
    q.accept(group(0, 0))
    _step(q, 1, 0)
    lease = q.replay_batch(1, 1)
    assert lease is not None
    q.return_all_leases()  # that trainer died too
    assert not q.replay_leases and not q.groups and list(q.retained) == [1]
    assert q.stats.leases_expired == 0
    assert q.replay_batch(1, 1) is not None


@settings(max_examples=60, deadline=None)
@given(
    every=st.integers(1, 3),
    ops=st.lists(st.sampled_from(["produce", "train", "train", "kill"]), min_size=5, max_size=80),
)
def test_random_kills_replay_the_same_batches_and_always_balance(every: int, ops: list[str]) -> None:
    """A trainer checkpointing every ``every`` steps and killed at random resumes from its last
    checkpoint: every re-done step gets exactly the groups and shards it first trained, each group
    is consumed once, and accepted = consumed + dropped + queued (+ leased) at every point."""
    q = StalenessQueue(max_staleness=100, groups_per_step=2, max_trajectories=100_000, max_bytes=10**12)
    q.retain = True
    seq, step, ckpt = 0, 0, 0
    trained: dict[int, tuple[list[tuple], list[list[int]]]] = {}
    consumed: list[tuple] = []
    for op in ops:
        if op == "produce":
            for _ in range(3):
                q.accept(group(seq, 0, length=1 + seq % 5))
                seq += 1
        elif op == "kill":
            q.return_all_leases()
            step = ckpt
            q.release(ckpt)  # the resumed trainer's hello
        else:
            lease = q.replay_batch(step + 1, 2)
            if lease is not None:
                assert ([g.dedup_key for g in lease.groups], lease.shards) == trained[step + 1]
                q.commit_replay(lease.lease_id)
            elif q.ready(2):
                res = q.take_batch(step + 1, step, 2, 2)
                trained[step + 1] = ([g.dedup_key for g in res.lease.groups], res.shards)
                consumed += trained[step + 1][0]
                q.commit(res.lease.lease_id, step + 1)
            else:
                continue
            step += 1
            if step % every == 0:
                ckpt = step
                q.release(ckpt)
        s = q.stats
        assert len(consumed) == len(set(consumed)) == s.groups_consumed
        assert s.trajectories_accepted == s.trajectories_consumed + sum(s.trajectories_dropped.values()) + q.queued_trajectories + sum(
            len(g.trajectories) for lease in q.leases.values() for g in lease.groups)
        assert all(st_ > ckpt for st_ in q.retained)


def test_commits_of_single_groups_are_counted_by_their_groups() -> None:
    """A trainer that commits a new version per one-group batch (the producer tests' harness) is
    counted by the groups it consumed, not groups_per_step per version: only versions announced
    ahead of any commit here count a step's groups (the resumed-trainer floor above)."""
    q = StalenessQueue(max_staleness=1, groups_per_step=4, max_trajectories=1000, max_bytes=10**9)
    assert q.grant("p0", 100, 2) == (1 + 0 + 1) * 4
    for s in range(3):
        q.accept(group(s, 0))
    for v in (1, 2, 3):
        q.commit(q.take_batch(v, 0, 1, 1).lease.lease_id, v)
    assert q.consumed_for_admission == 3 and q.stats.versions_without_commits == 0
    q.publish(3)  # announced after its commits: no versions without commits
    assert q.stats.versions_without_commits == 0
    q.publish(10)  # a version this queue saw no commits for: 7 steps' worth
    assert q.stats.versions_without_commits == 7 and q.consumed_for_admission == 3 + 7 * 4
