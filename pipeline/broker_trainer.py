"""The trainer's side of the broker core: registration, batch requests, commits, leases, retention
and replay to a resumed trainer.  No I/O: replies go through :meth:`pipeline.broker_core.BrokerCore.send`.

A new trainer process (another pid) gets the old one's leased groups back at once; a reconnect of
the same process keeps its leases, so a resent batch request gets the same lease back.  A commit of
a lease an earlier broker incarnation issued (recovered from the journal: its groups are queued
again) consumes exactly those groups; a commit already counted (its ack was lost) is acked again.
Retained batches (``trainer.checkpoint_every > 0``) are served again, marked ``replay``, to a trainer
resumed from an older checkpoint, and their commits count nothing consumed twice.

    side = TrainerSide(core); side.on_message(identity, frames)   # from BrokerCore.handle
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pipeline.queue import Lease, shard_by_tokens
from schemas.messages import (
    Batch,
    BatchRequest,
    Checkpointed,
    Commit,
    CommitAck,
    Error,
    Heartbeat,
    Hello,
    Published,
)
from schemas.validate import WireError

if TYPE_CHECKING:
    from pipeline.broker_core import BrokerCore, Peer

log = logging.getLogger(__name__)


class TrainerSide:
    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self.queue = core.queue
        self.metrics = core.metrics
        self.cfg = core.cfg
        self.peer: Peer | None = None
        self.pending: tuple[bytes, BatchRequest] | None = None

    def _send(self, identity: bytes, msg: Any) -> None:
        self.core.send(("trainer", identity), msg)

    def batch(self, step: int, lease: Lease, shards: list[list[int]] | None = None) -> Batch:
        return Batch(step=step, lease_id=lease.lease_id, groups=lease.groups, shards=lease.shards if shards is None else shards,
                     dropped=sum(self.queue.stats.trajectories_dropped.values()), queue_depth=len(self.queue.groups), replay=lease.replay)

    def tick(self, now: float) -> None:
        if self.peer is not None:
            alive = now - self.peer.last_seen <= self.cfg.peer_timeout_s
            self.metrics.trainer_alive.set(1 if alive else 0)
            self._send(self.peer.identity, Heartbeat(peer_id="broker", sent_at=time.time()))

    def on_message(self, identity: bytes, frames: list[Any]) -> None:
        try:
            msg = self.core.decode(frames)
        except WireError as e:
            self.core.reject(e.code)
            log.warning("rejected message from trainer: %s", e)
            self._send(identity, Error(code=e.code, message=e.message))
            return
        if isinstance(msg, Hello):
            self._hello(identity, msg)
            return
        if self.peer is None or identity != self.peer.identity:
            self.core.reject("not_registered")
            self._send(identity, Error(code="not_registered", message="send hello before anything else"))
            return
        self.peer.last_seen = self.core.clock()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, BatchRequest):
            self._batch_request(identity, msg)
        elif isinstance(msg, Commit):
            self._on_commit(identity, msg)
        elif isinstance(msg, Checkpointed):
            self._release(msg.step, f"the trainer checkpointed step {msg.step}")
            self.core.grant_credits()  # retention held part of the queue bound
        elif isinstance(msg, Published):
            self.queue.publish(msg.policy_version)
            self.core.announce()
        else:
            self.core.reject("not_allowed")
            self._send(identity, Error(code="not_allowed", message=f"trainers may not send '{msg.TYPE}'"))

    def _hello(self, identity: bytes, msg: Hello) -> None:
        from pipeline.broker_core import Peer

        if msg.resume_step < -1 or msg.checkpoint_every < 0:
            self.core.reject("bad_field")
            self._send(identity, Error(code="bad_field", message="hello: resume_step must be >= -1 and checkpoint_every >= 0"))
            return
        if self.peer is not None and msg.pid != self.peer.pid:
            self._replaced(msg)
        self.peer = Peer(identity, msg.peer_id, msg.epoch, self.core.clock(), pid=msg.pid)
        self._resumes(msg)
        self.queue.publish(msg.policy_version)
        log.info("trainer %s registered at policy version %d", msg.peer_id, msg.policy_version)
        self._send(identity, self.core.welcome())
        self.core.announce()

    def _batch_request(self, identity: bytes, msg: BatchRequest) -> None:
        if self._serve_replay(identity, msg):
            return
        again = next((lease for lease in self.queue.leases.values() if lease.step == msg.step and lease.policy_version == msg.policy_version), None)
        if again is not None:  # a resend (the trainer reconnected): same lease, not a second one
            log.info("batch request for step %d repeated: resending lease %s", msg.step, again.lease_id)
            self._send(identity, self.batch(msg.step, again, shard_by_tokens(again.groups, msg.dp_size)))
            return
        self.pending = (identity, msg)
        self.core.try_fulfil()

    def _replaced(self, hello: Hello) -> None:
        """A new trainer process (another pid: the launcher restarted a crashed trainer, which resumed
        from its checkpoint) said hello.  The old process's outstanding leases will never be committed:
        their groups go back to the front of the queue at once (counted as lease expiries; staleness
        applies again when they are next leased), and its pending batch request is forgotten.  Groups
        the old process already committed stay consumed (counted once).  When the trainer checkpoints,
        they were retained, and the resumed trainer gets them again as replays of the same steps
        (:meth:`_resumes`); batches that were not retained (no checkpoints, no room) leave their steps
        to be re-done with new batches, and ``QueueStats.groups_superseded`` keeps admission control
        from counting those twice."""
        assert self.peer is not None
        returned = self.queue.return_all_leases()
        self.metrics.lease_expiries.inc(len(returned))
        self.pending = None
        log.warning(
            "trainer %s restarted (pid %d -> %d, policy version %d, broker at %d): %d outstanding leases "
            "(%d groups) returned to the queue", hello.peer_id, self.peer.pid, hello.pid, hello.policy_version,
            self.queue.published_policy_version, len(returned), sum(len(lease.groups) for lease in returned),
        )
        self.core.update_gauges()

    # ----------------------------------------------------------------- retention and replay (trainer resume)
    def _resumes(self, hello: Hello) -> None:
        """Apply a trainer hello's retention settings. ``checkpoint_every > 0`` turns retention on
        (0: nothing is retained, and anything still retained is released: no checkpoint will ever
        need it). ``resume_step = k >= 0`` (the first hello of a process): the checkpoint covers
        steps <= k, so they are released; steps k+1, ... still retained will be replayed, in order,
        as the trainer asks for them, before any new data."""
        q = self.queue
        q.retain = hello.checkpoint_every > 0
        if not q.retain:
            if q.retained:
                self._release(max(q.retained), "the trainer does not checkpoint (checkpoint_every = 0)")
            return
        if hello.checkpoint_every * self.cfg.groups_per_step * self.core.group_size > self.cfg.max_queued_trajectories:
            log.warning(
                "trainer.checkpoint_every = %d steps of %d trajectories exceed queue.max_queued_trajectories = %d: batches "
                "that no longer fit are not retained (slipstream_queue_not_retained_groups_total); a trainer resumed "
                "past them re-does those steps with new data", hello.checkpoint_every,
                self.cfg.groups_per_step * self.core.group_size, self.cfg.max_queued_trajectories,
            )
        if hello.resume_step < 0:
            return
        self._release(hello.resume_step, f"the trainer resumes from its checkpoint of step {hello.resume_step}")
        later = list(q.retained)
        if later:
            expected = list(range(hello.resume_step + 1, hello.resume_step + 1 + len(later)))
            log.warning("trainer resumes from step %d: the retained batches of steps %s (%d groups) will be replayed before any new data%s",
                        hello.resume_step, later, sum(len(r.groups) for r in q.retained.values()),
                        "" if later == expected else f" (steps {sorted(set(expected) - set(later))} are not retained: re-done with new data)")

    def _release(self, upto_step: int, why: str) -> None:
        released = self.queue.release(upto_step)
        if released:
            log.info("released the retained batches of steps %s (%d groups): %s", [r.step for r in released], sum(len(r.groups) for r in released), why)
            self.core.update_gauges()

    def _count_not_retained(self, step: int, before: int) -> None:
        """After a commit: count (and say why) the groups retention had no room for."""
        n = self.queue.stats.groups_not_retained - before
        if n <= 0:
            return
        self.metrics.not_retained.inc(n)
        q = self.queue
        log.warning(
            "step %d's batch is not retained for replay: %d retained trajectories (%d bytes, steps %s) plus twice this batch "
            "exceed queue.max_queued_trajectories = %d / max_queued_bytes = %d; if the trainer dies before its next "
            "checkpoint, this step is re-done with new data", step, q.retained_trajectories, q.retained_bytes,
            list(q.retained), self.cfg.max_queued_trajectories, self.cfg.max_queued_bytes,
        )

    def _serve_replay(self, identity: bytes, req: BatchRequest) -> bool:
        """Serve the retained batch of ``req.step`` again (True), exactly as first served. No
        staleness check: the step that first consumed it accepted it (see ``pipeline.queue``)."""
        fresh = not any(lease.step == req.step for lease in self.queue.replay_leases.values())
        lease = self.queue.replay_batch(req.step, req.dp_size)
        if lease is None:
            return False
        if fresh:
            log.warning("replaying step %d to the resumed trainer: %d groups first committed on lease %s (%s)",
                        req.step, len(lease.groups), self.queue.retained[req.step].lease_id or "an earlier broker", lease.lease_id)
        self._send(identity, self.batch(req.step, lease))
        self.pending = None
        return True

    def _commit_replay(self, identity: bytes, msg: Commit) -> bool:
        """The commit of a replayed batch (True): counted as replayed, never consumed again."""
        if msg.lease_id in self.queue.replay_leases:
            lease = self.queue.commit_replay(msg.lease_id, msg.policy_version)
            n_groups, n_traj = len(lease.groups), sum(len(g.trajectories) for g in lease.groups)
        elif msg.lease_id in self.queue.orphan_replays:  # issued before a broker restart
            n_groups, n_traj = self.queue.commit_orphan_replay(msg.lease_id, msg.policy_version)
        else:
            return False
        self.metrics.replayed_groups.inc(n_groups)
        self.metrics.replayed_trajectories.inc(n_traj)
        log.info("replayed step %d committed (%d groups, policy version %d): not counted consumed again", msg.step, n_groups, msg.policy_version)
        self.core.update_gauges()
        self._send(identity, CommitAck(lease_id=msg.lease_id, policy_version=msg.policy_version))
        return True

    def _on_commit(self, identity: bytes, msg: Commit) -> None:
        """Count a lease's groups consumed, durably, then ack. After a broker restart the trainer may
        commit a lease the previous incarnation issued: its groups were recovered into the queue, so
        they are removed from it and consumed (never trained twice); a commit already counted (its
        ack was lost) is acked again without counting anything twice."""
        if self._commit_replay(identity, msg):
            return
        q = self.queue
        before = q.stats.groups_not_retained
        groups = None
        if msg.lease_id in q.leases:
            lease = q.commit(msg.lease_id, msg.policy_version)
            groups = lease.groups
            self._count_not_retained(lease.step, before)
        elif msg.lease_id in q.commits:
            log.info("commit of %s was already counted (its ack was lost): acknowledging again", msg.lease_id)
            groups = []
        elif msg.lease_id in q.orphan_leases:
            step = q.orphan_leases[msg.lease_id][1]
            groups = q.consume_orphan(msg.lease_id, msg.policy_version)
            if groups is not None:
                self._count_not_retained(step, before)
                log.warning("commit of %s, leased before the broker restarted: its %d recovered groups are consumed", msg.lease_id, len(groups))
        if groups is None:
            self.core.reject("bad_field")
            self._send(identity, Error(code="bad_field", message=f"unknown or expired lease {msg.lease_id!r}"))
            return
        self.metrics.consumed.inc(sum(len(g.trajectories) for g in groups))
        self.core.update_gauges()  # before the ack: what a trainer sees acked, /metrics already shows
        self._send(identity, CommitAck(lease_id=msg.lease_id, policy_version=msg.policy_version))
