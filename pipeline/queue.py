"""The staleness-aware trajectory queue: pure state, no sockets (the broker wraps it).

Semantics (DESIGN §3, §5):

- **Admission control.** A producer may start a group only with a credit. Credits are granted while
  ``consumed + queued + leased + in_flight < (η + v + 1) × groups_per_step`` (AReaL's bound), where
  ``v`` is the *published* policy version, and while the queue's trajectory/byte bounds leave room.
  All of these counters are derived from the queue's contents and the trainer's version, so a
  restart can rebuild them (AReaL #1345 inflated a stored budget after recovery).
- **Exactly-once enqueue.** Groups are keyed by ``(producer_id, epoch, seq)``; a resend of an
  accepted group is acknowledged as a duplicate and not enqueued again.
- **Group-atomic, staleness-checked batches.** A batch for a trainer at version ``v`` takes whole
  groups in FIFO order, skipping (and handing to the stale policy) any group with
  ``v - min(token versions) > η``.  Nothing staler than η is ever handed out.
- **Leases.** A batch is leased until committed; an expired or abandoned lease returns its groups
  to the front of the queue, where the staleness check applies again.
- **Token-balanced sharding** across data-parallel ranks (greedy: largest group to the lightest rank).
- **Retention for replay** (trainer resume, GitHub issue 5). While the trainer checkpoints
  (``retain``: its hello says ``checkpoint_every > 0``), each committed batch is kept, with its
  groups in order, its DP shards and its step, until the trainer reports a checkpoint at a step >=
  it (:meth:`release`).  A trainer restarted from checkpoint step ``k`` asks for steps ``k+1, ...``
  again; :meth:`replay_batch` serves each retained one exactly as first served, before any new
  data.  Staleness is *not* re-checked for a replay: the step that first consumed the batch
  accepted it, and the resumed trainer re-does that step from the same checkpointed weights.  A
  replay's commit counts nothing consumed again (``groups_replayed`` instead).  With
  ``checkpoint_every = 0`` nothing is retained: today's behaviour, a killed trainer is not resumed.
  Retained groups count against ``max_trajectories``/``max_bytes`` (fewer credits, and new groups
  are refused as ``full`` at the bound), but a batch is retained only while one more batch of the
  same size still fits beside it: otherwise the trainer could never reach its next checkpoint
  (deadlock).  A batch that does not fit is not retained, counted (``groups_not_retained``) and
  logged by the broker; its step, if lost, is re-done with new data as before.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, field

from schemas.messages import TrajectoryGroup

DROP_REASONS = ("stale_dropped", "stale_requeued")


class SeenSeqs:
    """Which ``seq`` numbers of each ``(producer_id, epoch)`` were accepted, in O(gaps) memory:
    a watermark below which every seq was seen, plus the seen seqs above it."""

    def __init__(self) -> None:
        self._low: dict[tuple[str, int], int] = {}
        self._above: dict[tuple[str, int], set[int]] = collections.defaultdict(set)

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        producer, epoch, seq = key
        return seq < self._low.get((producer, epoch), 0) or seq in self._above.get((producer, epoch), ())

    def add(self, key: tuple[str, int, int]) -> None:
        producer, epoch, seq = key
        pe = (producer, epoch)
        above = self._above[pe]
        above.add(seq)
        low = self._low.get(pe, 0)
        while low in above:
            above.discard(low)
            low += 1
        self._low[pe] = low

    def __len__(self) -> int:
        return sum(self._low.values()) + sum(len(s) for s in self._above.values())

    def state(self) -> list[list]:
        """A compact, msgpack-able snapshot (the journal's checkpoints store it)."""
        keys = set(self._low) | {k for k, v in self._above.items() if v}
        return [[p, e, self._low.get((p, e), 0), sorted(self._above.get((p, e), ()))] for p, e in sorted(keys)]

    @classmethod
    def from_state(cls, state: list[list]) -> SeenSeqs:
        seen = cls()
        for producer, epoch, low, above in state:
            seen._low[(producer, epoch)] = int(low)
            seen._above[(producer, epoch)] = {int(s) for s in above}
        return seen


@dataclass
class Lease:
    lease_id: str
    step: int
    policy_version: int
    groups: list[TrajectoryGroup]
    issued_at: float
    shards: list[list[int]] = field(default_factory=list)
    replay: bool = False  # serves a retained batch again (see Retained)


@dataclass
class Retained:
    """A committed batch kept for replay until a checkpoint at a step >= ``step`` covers it."""

    step: int
    lease_id: str  # the lease that first consumed it
    policy_version: int  # the version its commit produced
    groups: list[TrajectoryGroup]
    shards: list[list[int]]

    @property
    def trajectories(self) -> int:
        return sum(len(g.trajectories) for g in self.groups)

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)


@dataclass
class QueueStats:
    """Monotonic counters in groups and trajectories (the summary and metrics read these)."""

    groups_accepted: int = 0
    trajectories_accepted: int = 0
    groups_consumed: int = 0
    trajectories_consumed: int = 0
    groups_duplicate: int = 0
    groups_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    trajectories_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    leases_expired: int = 0
    groups_rejected_full: int = 0
    #: groups consumed by commits that re-did a policy version an earlier trainer process had already
    #: committed (a trainer resumed from a checkpoint older than its last commit). They count as
    #: consumed in the account, but not again in admission control: the version did not advance.
    groups_superseded: int = 0
    #: commits of replayed batches (retained batches served again to a resumed trainer): not consumed again
    groups_replayed: int = 0
    trajectories_replayed: int = 0
    #: committed groups that were not retained for replay because retention would leave no room for a step
    groups_not_retained: int = 0


@dataclass
class BatchResult:
    lease: Lease
    shards: list[list[int]]
    stale: list[TrajectoryGroup]  # removed for staleness while forming this batch
    staleness: list[int]  # per consumed trajectory: v - min(token versions)


class StalenessQueue:
    def __init__(
        self,
        max_staleness: int,
        groups_per_step: int,
        max_trajectories: int,
        max_bytes: int,
        stale_policy: str = "requeue",
        policy_version: int = 0,
        lease_prefix: str = "lease",
    ) -> None:
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.max_trajectories = max_trajectories
        self.max_bytes = max_bytes
        self.stale_policy = stale_policy
        self.published_policy_version = policy_version  # live on every engine: credits use this
        self.committed_policy_version = policy_version  # produced by the last optimizer step
        self.groups: collections.deque[TrajectoryGroup] = collections.deque()
        self.leases: dict[str, Lease] = {}
        self.in_flight: dict[str, int] = collections.defaultdict(int)  # credits granted, group not yet arrived
        self._seen = SeenSeqs()
        self._lease_ids = itertools.count(1)
        self.lease_prefix = lease_prefix  # unique per broker incarnation: a lease id is never reused
        self.stats = QueueStats()
        self.queued_trajectories = 0
        self.queued_bytes = 0
        self.retain = False  # set from the trainer's hello: checkpoint_every > 0
        self.retained: dict[int, Retained] = {}  # step -> batch, in step order
        self.replay_leases: dict[str, Lease] = {}
        self.retained_trajectories = 0
        self.retained_bytes = 0

    @property
    def seen(self) -> SeenSeqs:
        return self._seen

    # ------------------------------------------------------------------ derived counters
    @property
    def leased_groups(self) -> int:
        return sum(len(lease.groups) for lease in self.leases.values())

    @property
    def in_flight_groups(self) -> int:
        return sum(self.in_flight.values())

    def capacity(self, group_size: int) -> int:
        """How many more group starts may be granted now (admission control)."""
        budget = (self.max_staleness + self.published_policy_version + 1) * self.groups_per_step
        used = self.stats.groups_consumed - self.stats.groups_superseded + len(self.groups) + self.leased_groups + self.in_flight_groups
        # The trajectory bound: groups queued or in flight must fit.
        traj_room = self.max_trajectories - self.queued_trajectories - self.retained_trajectories - self.in_flight_groups * group_size
        return max(0, min(budget - used, traj_room // max(group_size, 1)))

    def grant(self, producer_id: str, want: int, group_size: int) -> int:
        granted = max(0, min(want, self.capacity(group_size)))
        self.in_flight[producer_id] += granted
        return granted

    def release_producer(self, producer_id: str) -> int:
        """A producer died: reclaim its in-flight credits. Returns how many."""
        return self.in_flight.pop(producer_id, 0)

    # ------------------------------------------------------------------ producer side
    def admission(self, group: TrajectoryGroup) -> str:
        """What :meth:`accept` would answer, without changing anything (the broker journals a group
        between this check and ``accept``, so it acks only durable groups)."""
        if group.dedup_key in self._seen:
            return "duplicate"
        n, nbytes = len(group.trajectories), group.nbytes
        if (self.queued_trajectories + self.retained_trajectories + n > self.max_trajectories
                or self.queued_bytes + self.retained_bytes + nbytes > self.max_bytes):
            return "full"
        return "accepted"

    def accept(self, group: TrajectoryGroup) -> str:
        """Enqueue a validated group: returns 'accepted', 'duplicate' or 'full'."""
        verdict = self.admission(group)
        if verdict == "duplicate":
            self.stats.groups_duplicate += 1
            return "duplicate"
        if verdict == "full":
            self.stats.groups_rejected_full += 1
            return "full"
        n, nbytes = len(group.trajectories), group.nbytes
        self._seen.add(group.dedup_key)
        if self.in_flight.get(group.producer_id, 0) > 0:
            self.in_flight[group.producer_id] -= 1
        self.groups.append(group)
        self.queued_trajectories += n
        self.queued_bytes += nbytes
        self.stats.groups_accepted += 1
        self.stats.trajectories_accepted += n
        return "accepted"

    def credit_returned(self, producer_id: str) -> None:
        """A started group will never arrive (rejected by validation, or generation failed)."""
        if self.in_flight.get(producer_id, 0) > 0:
            self.in_flight[producer_id] -= 1

    # ------------------------------------------------------------------ trainer side
    def _pop_left(self) -> TrajectoryGroup:
        g = self.groups.popleft()
        self.queued_trajectories -= len(g.trajectories)
        self.queued_bytes -= g.nbytes
        return g

    def staleness_of(self, group: TrajectoryGroup, version: int) -> int:
        return version - group.min_version

    def _too_stale(self, group: TrajectoryGroup, version: int) -> bool:
        """Staler than η, or sampled (in part) by a version newer than the trainer's: that happens
        only after a trainer resumed from a checkpoint older than the weights the engines served,
        and such tokens come from a policy the resumed trainer will never have."""
        return version - group.min_version > self.max_staleness or group.max_version > version

    def remove_stale(self, version: int) -> list[TrajectoryGroup]:
        """Remove every queued group staler than η (or from a newer, abandoned policy) for a trainer at ``version``."""
        if not any(self._too_stale(g, version) for g in self.groups):
            return []  # the common case: no rebuild
        stale, keep = [], collections.deque()
        while self.groups:
            g = self._pop_left()
            if self._too_stale(g, version):
                stale.append(g)
            else:
                keep.append(g)
        for g in keep:
            self.groups.append(g)
            self.queued_trajectories += len(g.trajectories)
            self.queued_bytes += g.nbytes
        reason = "stale_requeued" if self.stale_policy == "requeue" else "stale_dropped"
        for g in stale:
            self.stats.groups_dropped[reason] += 1
            self.stats.trajectories_dropped[reason] += len(g.trajectories)
        return stale

    def ready(self, num_groups: int) -> bool:
        return len(self.groups) >= num_groups

    def take_batch(self, step: int, version: int, num_groups: int, dp_size: int) -> BatchResult:
        """Lease ``num_groups`` fresh-enough groups (call ``remove_stale`` and ``ready`` first)."""
        if len(self.groups) < num_groups:
            raise RuntimeError(f"take_batch: only {len(self.groups)} groups queued, {num_groups} needed")
        groups = [self._pop_left() for _ in range(num_groups)]
        staleness = [version - t.min_version for g in groups for t in g.trajectories]
        if max(staleness) > self.max_staleness:  # remove_stale must have run: this is an invariant
            raise AssertionError(f"staleness {max(staleness)} > bound {self.max_staleness}")
        shards = shard_by_tokens(groups, dp_size)
        lease = Lease(f"{self.lease_prefix}-{next(self._lease_ids)}", step, version, groups, time.monotonic(), shards)
        self.leases[lease.lease_id] = lease
        return BatchResult(lease=lease, shards=shards, stale=[], staleness=staleness)

    def _count_consumed(self, groups: list[TrajectoryGroup], policy_version: int) -> None:
        self.stats.groups_consumed += len(groups)
        self.stats.trajectories_consumed += sum(len(g.trajectories) for g in groups)
        if policy_version <= self.committed_policy_version:  # a resumed trainer re-does a version (see QueueStats)
            self.stats.groups_superseded += len(groups)
        self.committed_policy_version = max(self.committed_policy_version, policy_version)

    def commit(self, lease_id: str, policy_version: int) -> Lease:
        """Count a (non-replay) lease's groups consumed; keep them for replay when retaining
        (:meth:`will_retain` says beforehand whether they fit)."""
        lease = self.leases.pop(lease_id)
        self._count_consumed(lease.groups, policy_version)
        self._retain(lease.step, lease.lease_id, policy_version, lease.groups, lease.shards)
        return lease

    def consume_queued(self, keys: list[tuple[str, int, int]], policy_version: int, step: int = -1,
                       shards: list[list[int]] | None = None) -> list[TrajectoryGroup] | None:
        """Commit of a lease an earlier broker incarnation issued (recovered from the journal, so its
        groups are back in the queue): remove exactly those groups and count them consumed (and
        retain them for replay like any commit). Returns None (and changes nothing) unless every one
        of them is queued."""
        wanted = set(keys)
        by_key = {g.dedup_key: g for g in self.groups if g.dedup_key in wanted}
        if len(by_key) != len(wanted):
            return None
        found = [by_key[k] for k in keys]  # lease order, so a replay serves them as first served
        self.groups = collections.deque(g for g in self.groups if g.dedup_key not in wanted)
        for g in found:
            self.queued_trajectories -= len(g.trajectories)
            self.queued_bytes -= g.nbytes
        self._count_consumed(found, policy_version)
        if step >= 0:
            self._retain(step, "", policy_version, found, shards or [list(range(len(found)))])
        return found

    # ------------------------------------------------------------------ retention and replay
    def will_retain(self, groups: list[TrajectoryGroup]) -> bool:
        """Whether a commit of ``groups`` now keeps them for replay: retaining, and one more batch
        of the same size still fits beside everything retained (see the module doc)."""
        if not self.retain:
            return False
        n, nbytes = sum(len(g.trajectories) for g in groups), sum(g.nbytes for g in groups)
        return (self.retained_trajectories + 2 * n <= self.max_trajectories
                and self.retained_bytes + 2 * nbytes <= self.max_bytes)

    def _retain(self, step: int, lease_id: str, version: int, groups: list[TrajectoryGroup], shards: list[list[int]]) -> Retained | None:
        if not self.retain:
            return None
        if not self.will_retain(groups):
            self.stats.groups_not_retained += len(groups)
            return None
        if step in self.retained:  # a step committed twice without a replay (should not happen): keep the newest
            self.release_steps([step])
        r = Retained(step, lease_id, version, list(groups), [list(s) for s in shards])
        self.retained[step] = r
        self.retained = dict(sorted(self.retained.items()))
        self.retained_trajectories += r.trajectories
        self.retained_bytes += r.nbytes
        return r

    def release_steps(self, steps: list[int]) -> list[Retained]:
        out = [self.retained.pop(s) for s in steps if s in self.retained]
        for r in out:
            self.retained_trajectories -= r.trajectories
            self.retained_bytes -= r.nbytes
        return out

    def release(self, upto_step: int) -> list[Retained]:
        """A checkpoint of ``upto_step`` exists: stop retaining every batch of a step <= it."""
        return self.release_steps([s for s in self.retained if s <= upto_step])

    def replay_batch(self, step: int, dp_size: int) -> Lease | None:
        """The retained batch of ``step`` on a new replay lease (None if none is retained). Same
        groups in the same order and the same shards as first served; if the trainer's DP size
        changed, the groups are sharded again for it. No staleness check (see the module doc)."""
        r = self.retained.get(step)
        if r is None:
            return None
        for lease in self.replay_leases.values():
            if lease.step == step:  # a resent request: the same replay lease
                return lease
        shards = r.shards if len(r.shards) == dp_size else shard_by_tokens(r.groups, dp_size)
        lease = Lease(f"{self.lease_prefix}-replay-{next(self._lease_ids)}", step, r.policy_version - 1, list(r.groups),
                      time.monotonic(), shards, replay=True)
        self.replay_leases[lease.lease_id] = lease
        return lease

    def commit_replay(self, lease_id: str) -> Lease:
        """A replayed step committed: counted as replayed, never consumed again. The batch stays
        retained until a checkpoint covers its step (the resumed trainer may die again)."""
        lease = self.replay_leases.pop(lease_id)
        self.count_replayed(len(lease.groups), sum(len(g.trajectories) for g in lease.groups))
        return lease

    def count_replayed(self, groups: int, trajectories: int) -> None:
        self.stats.groups_replayed += groups
        self.stats.trajectories_replayed += trajectories

    def restore(self, groups: list[TrajectoryGroup], seen: SeenSeqs, stats: QueueStats, version: int,
                retained: list[Retained] | None = None) -> None:
        """Load the state a journal replay rebuilt (broker restart). Every admission counter stays
        derived: from these groups, the stats and the trainer's version (never a stored budget)."""
        self.groups = collections.deque(groups)
        self.queued_trajectories = sum(len(g.trajectories) for g in groups)
        self.queued_bytes = sum(g.nbytes for g in groups)
        self._seen = seen
        self.stats = stats
        self.leases.clear()
        self.replay_leases.clear()
        self.in_flight.clear()
        self.published_policy_version = self.committed_policy_version = version
        self.retained = {r.step: r for r in sorted(retained or [], key=lambda r: r.step)}
        self.retained_trajectories = sum(r.trajectories for r in self.retained.values())
        self.retained_bytes = sum(r.nbytes for r in self.retained.values())

    def publish(self, version: int) -> None:
        self.published_policy_version = max(self.published_policy_version, version)
        self.committed_policy_version = max(self.committed_policy_version, version)

    def return_all_leases(self) -> list[Lease]:
        """A new trainer process said hello: the old one's outstanding leases will never be committed.
        Their groups go back to the front of the queue at once (staleness applies again).  Replay
        leases are just forgotten: their groups stay retained and are served again on request."""
        self.replay_leases.clear()
        return [self.return_lease(lease_id) for lease_id in list(self.leases)]

    def expire_leases(self, timeout_s: float, now: float | None = None) -> list[Lease]:
        now = time.monotonic() if now is None else now
        expired = [lease for lease in self.leases.values() if now - lease.issued_at > timeout_s]
        for lease in expired:
            self.return_lease(lease.lease_id)
        for lease_id in [k for k, lease in self.replay_leases.items() if now - lease.issued_at > timeout_s]:
            del self.replay_leases[lease_id]  # still retained: served again on request
        return expired

    def return_lease(self, lease_id: str) -> Lease:
        """Give a lease's groups back to the front of the queue (its step did not commit)."""
        lease = self.leases.pop(lease_id)
        for g in reversed(lease.groups):
            self.groups.appendleft(g)
            self.queued_trajectories += len(g.trajectories)
            self.queued_bytes += g.nbytes
        self.stats.leases_expired += 1
        return lease


def shard_by_tokens(groups: list[TrajectoryGroup], dp_size: int) -> list[list[int]]:
    """Assign whole groups to ``dp_size`` ranks, balancing tokens greedily (largest first).
    Every rank gets at least one group when there are enough groups."""
    loads = [0] * dp_size
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for i in sorted(range(len(groups)), key=lambda i: -groups[i].num_tokens):
        r = min(range(dp_size), key=lambda r: (loads[r], len(shards[r])))
        shards[r].append(i)
        loads[r] += groups[i].num_tokens
    return [sorted(s) for s in shards]
