"""The staleness-aware trajectory queue: pure state, no sockets (the broker wraps it).

Semantics (DESIGN §3, §5):

- **Admission control.** A producer may start a group only with a credit. Credits are granted while
  ``consumed + queued + leased + in_flight < (η + v + 1) × groups_per_step`` (AReaL's bound), where
  ``v`` is the *published* policy version, and while the queue's trajectory/byte bounds leave room.
  All of these counters are derived from the queue's contents and the trainer's version, so a
  restart can rebuild them (AReaL #1345 inflated a stored budget after recovery); ``consumed``
  counts at least ``v × groups_per_step`` for the committed version ``v``, so a queue that meets a
  trainer resumed at version ``v`` without the run's history grants ``η + 1`` steps of credits, not
  ``η + v + 1``.
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
- **Event-sourced.** :class:`QueueState` holds the state and changes it only in :meth:`QueueState.apply`;
  :class:`StalenessQueue` adds the decisions. Each decision builds an event
  (:mod:`pipeline.queue_events`), appends it to the queue's event log (the journal, or nothing) and
  then applies it. A restarted broker applies the journal's events to a fresh queue: the same code.
  Credits (``in_flight``) are session state, never logged (rebuilt from zero after a restart).

    q = StalenessQueue(max_staleness=1, groups_per_step=2, max_trajectories=1000, max_bytes=1 << 30)
    q.accept(group); res = q.take_batch(step=1, version=0, num_groups=2, dp_size=1); q.commit(res.lease.lease_id, 1)
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.queue_events import (
    Accepted,
    Consumed,
    Dropped,
    Event,
    Key,
    Leased,
    Released,
    Replayed,
    Returned,
    VersionPublished,
    sizes,
)
from schemas.messages import TrajectoryGroup

log = logging.getLogger(__name__)

DROP_REASONS = ("stale_dropped", "stale_requeued")
RECENT_COMMITS = 64  # committed lease ids remembered, so a repeated commit (its ack was lost) is acked again


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
    #: versions the committed version moved on by without a commit here: announced by a trainer this
    #: queue had no history of (a broker without a journal meeting a trainer resumed at v, or a
    #: trainer after its [sft] stage). Admission counts ``groups_per_step`` consumed for each.
    versions_without_commits: int = 0


@dataclass
class BatchResult:
    lease: Lease
    shards: list[list[int]]
    stale: list[TrajectoryGroup]  # removed for staleness while forming this batch
    staleness: list[int]  # per consumed trajectory: v - min(token versions)


class EventLog(Protocol):
    """Where a queue appends each event before applying it (the journal, or nothing)."""

    def append(self, event: Event) -> None: ...


class _NoLog:
    def append(self, event: Event) -> None:
        pass


class QueueState:
    """The queue's contents and counters. They change only in :meth:`apply`, live and on recovery."""

    def __init__(self, policy_version: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.published_policy_version = policy_version  # live on every engine: credits use this
        self.committed_policy_version = policy_version  # produced by the last optimizer step
        self.groups: collections.deque[TrajectoryGroup] = collections.deque()
        self.leases: dict[str, Lease] = {}
        self.replay_leases: dict[str, Lease] = {}
        self.in_flight: dict[str, int] = collections.defaultdict(int)  # credits granted, group not yet arrived
        self._seen = SeenSeqs()
        self.stats = QueueStats()
        self.queued_trajectories = 0
        self.queued_bytes = 0
        self.retained: dict[int, Retained] = {}  # step -> batch, in step order
        self.retained_trajectories = 0
        self.retained_bytes = 0
        self.commits: dict[str, int] = {}  # recent committed lease ids -> the version they produced
        # Leases an earlier broker incarnation issued (recovered): their groups are queued again.
        self.orphan_leases: dict[str, tuple[list[Key], int, list[list[int]]]] = {}  # -> (keys, step, shards)
        self.orphan_replays: dict[str, int] = {}  # replay lease -> step

    @property
    def seen(self) -> SeenSeqs:
        return self._seen

    def apply(self, ev: Event) -> None:
        """Apply one event (see :mod:`pipeline.queue_events`). Tolerant of groups it cannot find:
        after compaction a recovered journal may name groups whose segments are gone."""
        if isinstance(ev, Accepted):
            self._apply_accepted(ev.group)
        elif isinstance(ev, Leased):
            self._apply_leased(ev)
        elif isinstance(ev, Returned):
            for lease_id in ev.lease_ids:
                self._return(lease_id)
        elif isinstance(ev, Consumed):
            self._apply_consumed(ev)
        elif isinstance(ev, Dropped):
            self._take([k for k, _ in ev.groups])
            self.stats.groups_dropped[ev.reason] += len(ev.groups)
            self.stats.trajectories_dropped[ev.reason] += sum(n for _, n in ev.groups)
        elif isinstance(ev, VersionPublished):
            self.published_policy_version = max(self.published_policy_version, ev.version)
            self.stats.versions_without_commits += max(0, ev.version - self.committed_policy_version)
            self.committed_policy_version = max(self.committed_policy_version, ev.version)
        elif isinstance(ev, Released):
            for r in [self.retained.pop(s) for s in ev.steps if s in self.retained]:
                self.retained_trajectories -= r.trajectories
                self.retained_bytes -= r.nbytes
        elif isinstance(ev, Replayed):
            self.replay_leases.pop(ev.lease_id, None)
            self.orphan_replays.pop(ev.lease_id, None)
            self.stats.groups_replayed += ev.groups
            self.stats.trajectories_replayed += ev.trajectories
            self.committed_policy_version = max(self.committed_policy_version, ev.version)
            self._remember_commit(ev.lease_id, ev.version)
        else:  # pragma: no cover - the Event union is closed
            raise TypeError(f"not a queue event: {ev!r}")

    def _apply_accepted(self, group: TrajectoryGroup) -> None:
        if group.dedup_key in self._seen:  # only a damaged journal holds an accept twice
            log.warning("group %s accepted twice; the second record is ignored", group.group_id)
            return
        self._seen.add(group.dedup_key)
        if self.in_flight.get(group.producer_id, 0) > 0:
            self.in_flight[group.producer_id] -= 1
        self.groups.append(group)
        self.queued_trajectories += len(group.trajectories)
        self.queued_bytes += group.nbytes
        self.stats.groups_accepted += 1
        self.stats.trajectories_accepted += len(group.trajectories)

    def _apply_leased(self, ev: Leased) -> None:
        if ev.replay:
            r = self.retained.get(ev.step)
            if r is not None:
                self.replay_leases[ev.lease_id] = Lease(ev.lease_id, ev.step, r.policy_version - 1, list(r.groups), self.clock(),
                                                        ev.shards or r.shards, replay=True)
            return
        missing = set(ev.keys) - {g.dedup_key for g in self.groups}
        for lease in [lease for lease in self.leases.values() if missing & {g.dedup_key for g in lease.groups}]:
            self._return(lease.lease_id)  # a journal from before 'returned' records: the lease had expired
        self.leases[ev.lease_id] = Lease(ev.lease_id, ev.step, ev.policy_version, self._take(ev.keys), self.clock(), ev.shards)

    def _apply_consumed(self, ev: Consumed) -> None:
        lease = self.leases.pop(ev.lease_id, None)
        groups = lease.groups if lease is not None else self._take([k for k, _ in ev.groups])
        self.orphan_leases.pop(ev.lease_id, None)
        self.stats.groups_consumed += len(ev.groups)
        self.stats.trajectories_consumed += sum(n for _, n in ev.groups)
        if ev.version <= self.committed_policy_version:  # a resumed trainer re-does a version (see QueueStats)
            self.stats.groups_superseded += len(ev.groups)
        self.committed_policy_version = max(self.committed_policy_version, ev.version)
        self.stats.groups_not_retained += ev.not_retained
        if ev.retain and len(groups) == len(ev.groups):
            if ev.step in self.retained:  # a step committed twice without a replay (should not happen): keep the newest
                self.apply(Released([ev.step]))
            r = Retained(ev.step, ev.lease_id, ev.version, list(groups), [list(s) for s in ev.shards] or [list(range(len(groups)))])
            self.retained = dict(sorted({**self.retained, ev.step: r}.items()))
            self.retained_trajectories += r.trajectories
            self.retained_bytes += r.nbytes
        elif ev.retain:  # cannot happen unless records were lost (torn): cannot replay exactly
            log.warning("retained batch of step %d lacks %d of its groups; it will not be replayed", ev.step, len(ev.groups) - len(groups))
        self._remember_commit(ev.lease_id, ev.version)

    def _remember_commit(self, lease_id: str, version: int) -> None:
        self.commits[lease_id] = version
        while len(self.commits) > RECENT_COMMITS:
            self.commits.pop(next(iter(self.commits)))

    def _pop_left(self) -> TrajectoryGroup:
        g = self.groups.popleft()
        self.queued_trajectories -= len(g.trajectories)
        self.queued_bytes -= g.nbytes
        return g

    def _take(self, keys: list[Key]) -> list[TrajectoryGroup]:
        """Remove the queued groups with these keys; returns those found, in ``keys`` order."""
        if len(keys) <= len(self.groups) and all(g.dedup_key == k for g, k in zip(itertools.islice(self.groups, len(keys)), keys, strict=False)):
            return [self._pop_left() for _ in keys]  # the common case: a batch from the front
        wanted, found, keep = set(keys), {}, collections.deque()
        for g in self.groups:
            if g.dedup_key in wanted and g.dedup_key not in found:
                found[g.dedup_key] = g
                self.queued_trajectories -= len(g.trajectories)
                self.queued_bytes -= g.nbytes
            else:
                keep.append(g)
        self.groups = keep
        return [found[k] for k in keys if k in found]

    def _return(self, lease_id: str) -> None:
        self.replay_leases.pop(lease_id, None)  # still retained: served again on request
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        for g in reversed(lease.groups):
            self.groups.appendleft(g)
            self.queued_trajectories += len(g.trajectories)
            self.queued_bytes += g.nbytes
        self.stats.leases_expired += 1

    # ------------------------------------------------------------------ snapshots and recovery
    def load_checkpoint(self, stats: QueueStats, seen: SeenSeqs, version: int, commits: dict[str, int], committed: int) -> None:
        """The base a recovery applies events to: a journal segment's checkpoint record."""
        self.stats, self._seen, self.commits = stats, seen, dict(commits)
        self.published_policy_version = max(self.published_policy_version, version)
        self.committed_policy_version = max(self.committed_policy_version, committed, version)

    def orphan_all_leases(self) -> None:
        """End of a recovery: the recovered leases belong to an earlier incarnation. Their groups go
        back to the front of the queue (in order); a commit of one still consumes them."""
        for lease in reversed(list(self.leases.values())):
            for g in reversed(lease.groups):
                self.groups.appendleft(g)
                self.queued_trajectories += len(g.trajectories)
                self.queued_bytes += g.nbytes
        self.orphan_leases.update({i: ([g.dedup_key for g in lease.groups], lease.step, lease.shards) for i, lease in self.leases.items()})
        self.orphan_replays.update({i: lease.step for i, lease in self.replay_leases.items()})
        self.leases.clear()
        self.replay_leases.clear()

    def restore(self, groups: list[TrajectoryGroup], seen: SeenSeqs, stats: QueueStats, version: int,
                retained: list[Retained] | None = None) -> None:
        """Load a rebuilt state directly (a journal replay's :class:`pipeline.journal.Recovered`).
        Every admission counter stays derived: from these groups, the stats and the trainer's version."""
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


class StalenessQueue(QueueState):
    """The decisions (admission, batches, staleness, retention); each change is an event appended
    to ``log`` and then applied (see the module doc)."""

    def __init__(
        self,
        max_staleness: int,
        groups_per_step: int,
        max_trajectories: int,
        max_bytes: int,
        stale_policy: str = "requeue",
        policy_version: int = 0,
        lease_prefix: str = "lease",
        log: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(policy_version, clock)
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self.max_trajectories = max_trajectories
        self.max_bytes = max_bytes
        self.stale_policy = stale_policy
        self.log: EventLog = log if log is not None else _NoLog()
        self._lease_ids = itertools.count(1)
        self.lease_prefix = lease_prefix  # unique per broker incarnation: a lease id is never reused
        self.retain = False  # set from the trainer's hello: checkpoint_every > 0

    def emit(self, ev: Event) -> None:
        """Append the event to the log (durable first, when the journal is on), then apply it."""
        self.log.append(ev)
        self.apply(ev)

    # ------------------------------------------------------------------ derived counters
    @property
    def leased_groups(self) -> int:
        return sum(len(lease.groups) for lease in self.leases.values())

    @property
    def in_flight_groups(self) -> int:
        return sum(self.in_flight.values())

    @property
    def stale_reason(self) -> str:
        return "stale_requeued" if self.stale_policy == "requeue" else "stale_dropped"

    @property
    def consumed_for_admission(self) -> int:
        """Groups the admission bound counts as consumed: those committed by distinct versions, plus
        ``groups_per_step`` for each version the committed version moved on by without a commit here
        (``QueueStats.versions_without_commits``).  A queue that learns version v without the run's
        history (a broker without a journal meeting a trainer resumed at v, or a trainer after its
        ``[sft]`` stage) would otherwise grant ``η + v + 1`` steps of credits at once, the budget
        inflation of AReaL #1345, and flood the queue with data that goes stale before it is
        consumed.  Only versions announced ahead of any commit count: a trainer that commits a new
        version per batch, however small, is counted by its groups.  Derived from the stats, which
        the journal restores: nothing else to rebuild."""
        return (self.stats.groups_consumed - self.stats.groups_superseded
                + self.stats.versions_without_commits * self.groups_per_step)

    def capacity(self, group_size: int) -> int:
        """How many more group starts may be granted now (admission control)."""
        budget = (self.max_staleness + self.published_policy_version + 1) * self.groups_per_step
        used = self.consumed_for_admission + len(self.groups) + self.leased_groups + self.in_flight_groups
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

    def credit_returned(self, producer_id: str) -> None:
        """A started group will never arrive (rejected by validation, or generation failed)."""
        if self.in_flight.get(producer_id, 0) > 0:
            self.in_flight[producer_id] -= 1

    # ------------------------------------------------------------------ producer side
    def admission(self, group: TrajectoryGroup) -> str:
        """What :meth:`accept` would answer, without changing anything."""
        if group.dedup_key in self._seen:
            return "duplicate"
        n, nbytes = len(group.trajectories), group.nbytes
        if (self.queued_trajectories + self.retained_trajectories + n > self.max_trajectories
                or self.queued_bytes + self.retained_bytes + nbytes > self.max_bytes):
            return "full"
        return "accepted"

    def accept(self, group: TrajectoryGroup, frames: list[Any] | None = None) -> str:
        """Enqueue a validated group (``frames``: its wire frames, for the journal and for batches):
        returns 'accepted' (durable in the log before this returns), 'duplicate' or 'full'."""
        verdict = self.admission(group)
        if verdict == "duplicate":
            self.stats.groups_duplicate += 1
        elif verdict == "full":
            self.stats.groups_rejected_full += 1
        else:
            self.emit(Accepted(group, frames))
        return verdict

    # ------------------------------------------------------------------ trainer side
    def staleness_of(self, group: TrajectoryGroup, version: int) -> int:
        return version - group.min_version

    def _too_stale(self, group: TrajectoryGroup, version: int) -> bool:
        """Staler than η, or sampled (in part) by a version newer than the trainer's: that happens
        only after a trainer resumed from a checkpoint older than the weights the engines served,
        and such tokens come from a policy the resumed trainer will never have."""
        return version - group.min_version > self.max_staleness or group.max_version > version

    def remove_stale(self, version: int) -> list[TrajectoryGroup]:
        """Remove every queued group staler than η (or from a newer, abandoned policy) for a trainer at ``version``."""
        stale = [g for g in self.groups if self._too_stale(g, version)]
        if stale:
            self.emit(Dropped(self.stale_reason, sizes(stale)))
        return stale

    def ready(self, num_groups: int) -> bool:
        return len(self.groups) >= num_groups

    def take_batch(self, step: int, version: int, num_groups: int, dp_size: int) -> BatchResult:
        """Lease ``num_groups`` fresh-enough groups (call ``remove_stale`` and ``ready`` first)."""
        if len(self.groups) < num_groups:
            raise RuntimeError(f"take_batch: only {len(self.groups)} groups queued, {num_groups} needed")
        groups = list(itertools.islice(self.groups, num_groups))
        staleness = [version - m for g in groups for m in g.trajectory_min_versions]
        if max(staleness) > self.max_staleness:  # remove_stale must have run: this is an invariant
            raise AssertionError(f"staleness {max(staleness)} > bound {self.max_staleness}")
        shards = shard_by_tokens(groups, dp_size)
        lease_id = f"{self.lease_prefix}-{next(self._lease_ids)}"
        self.emit(Leased(lease_id, [g.dedup_key for g in groups], step, shards, False, version))
        return BatchResult(lease=self.leases[lease_id], shards=shards, stale=[], staleness=staleness)

    def commit(self, lease_id: str, policy_version: int) -> Lease:
        """Count a (non-replay) lease's groups consumed; keep them for replay when retaining and
        they fit (:meth:`will_retain`; otherwise counted in ``groups_not_retained``)."""
        lease = self.leases[lease_id]
        retain = self.will_retain(lease.groups)
        self.emit(Consumed(lease_id, sizes(lease.groups), policy_version, lease.step, lease.shards, retain,
                           len(lease.groups) if self.retain and not retain else 0))
        return lease

    def consume_orphan(self, lease_id: str, policy_version: int) -> list[TrajectoryGroup] | None:
        """Commit of a lease an earlier broker incarnation issued (its groups are queued again):
        consume exactly those groups (retained for replay like any commit). None (nothing changes)
        unless every one of them is still queued."""
        keys, step, shards = self.orphan_leases[lease_id]
        by_key = {g.dedup_key: g for g in self.groups if g.dedup_key in set(keys)}
        if len(by_key) != len(set(keys)):
            return None
        found = [by_key[k] for k in keys]  # lease order, so a replay serves them as first served
        retain = step >= 0 and self.will_retain(found)
        self.emit(Consumed(lease_id, sizes(found), policy_version, step, shards or [list(range(len(found)))], retain,
                           len(found) if step >= 0 and self.retain and not retain else 0))
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

    def release_steps(self, steps: list[int]) -> list[Retained]:
        out = [self.retained[s] for s in steps if s in self.retained]
        if out:
            self.emit(Released([r.step for r in out]))
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
        lease_id = f"{self.lease_prefix}-replay-{next(self._lease_ids)}"
        self.emit(Leased(lease_id, [g.dedup_key for g in r.groups], step, shards, True, r.policy_version - 1))
        return self.replay_leases[lease_id]

    def commit_replay(self, lease_id: str, version: int | None = None) -> Lease:
        """A replayed step committed: counted as replayed, never consumed again. The batch stays
        retained until a checkpoint covers its step (the resumed trainer may die again)."""
        lease = self.replay_leases[lease_id]
        self.emit(Replayed(lease_id, lease.step, lease.policy_version + 1 if version is None else version,
                           len(lease.groups), sum(len(g.trajectories) for g in lease.groups)))
        return lease

    def commit_orphan_replay(self, lease_id: str, version: int) -> tuple[int, int]:
        """A replay lease an earlier incarnation issued committed: (groups, trajectories) replayed."""
        r = self.retained.get(self.orphan_replays[lease_id])
        n_groups, n_traj = (len(r.groups), r.trajectories) if r is not None else (0, 0)
        self.emit(Replayed(lease_id, self.orphan_replays[lease_id], version, n_groups, n_traj))
        return n_groups, n_traj

    def publish(self, version: int) -> None:
        if version > self.published_policy_version or version > self.committed_policy_version:
            self.emit(VersionPublished(version))

    def return_all_leases(self) -> list[Lease]:
        """A new trainer process said hello: the old one's outstanding leases will never be committed.
        Their groups go back to the front of the queue at once (staleness applies again).  Replay
        leases are just forgotten: their groups stay retained and are served again on request."""
        returned = list(self.leases.values())
        if returned or self.replay_leases:
            self.emit(Returned([*self.leases, *self.replay_leases], "trainer_replaced"))
        return returned

    def expire_leases(self, timeout_s: float, now: float | None = None) -> list[Lease]:
        now = self.clock() if now is None else now
        expired = [lease for lease in self.leases.values() if now - lease.issued_at > timeout_s]
        replays = [k for k, lease in self.replay_leases.items() if now - lease.issued_at > timeout_s]
        if expired or replays:
            self.emit(Returned([lease.lease_id for lease in expired] + replays))
        return expired

    def return_lease(self, lease_id: str) -> Lease:
        """Give a lease's groups back to the front of the queue (its step did not commit)."""
        lease = self.leases[lease_id]
        self.emit(Returned([lease_id]))
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
