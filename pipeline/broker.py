"""The broker: slipstream's bounded, staleness-aware queue behind two ZeroMQ ROUTER sockets.

Producers connect to one socket (hello, credit requests, trajectory groups, heartbeats) and get
welcomes, credits, acks, errors, version announcements and requeues back.  Trainers connect to the
other (hello, batch requests, commits, "published" notices).  The queue semantics live in
:class:`pipeline.queue.StalenessQueue`; this module does the I/O, validation at the boundary,
liveness, metrics, and replay of retained batches to a resumed trainer (``pipeline.queue``'s module
doc: retention and replay).  Bad input never crashes it: every rejected message gets an ``Error`` reply
(where there is a sender) and a ``slipstream_broker_rejected_messages_total{reason}`` increment.

    slipstream broker --config run/config.json --ports-file run/broker.ports.json
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge, Histogram

from pipeline.config import QueueConfig
from pipeline.journal import Journal
from pipeline.metrics import STALENESS_BUCKETS, new_registry, policy_version_gauge
from pipeline.queue import DROP_REASONS, StalenessQueue, shard_by_tokens
from pipeline.transport import CurveKeys, bind, configure_socket
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
    Shutdown,
    TrajectoryGroup,
    VersionAnnouncement,
    Welcome,
)
from schemas.validate import REJECT_REASONS, Limits, WireError

log = logging.getLogger(__name__)


@dataclass
class Peer:
    identity: bytes
    peer_id: str
    epoch: int
    last_seen: float
    want: int = 0
    pid: int = 0


class BrokerMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("broker")
        self.depth_groups = Gauge("slipstream_queue_depth_groups", "Groups waiting in the queue.", registry=r)
        self.depth = Gauge("slipstream_queue_depth_trajectories", "Trajectories waiting in the queue.", registry=r)
        self.bytes = Gauge("slipstream_queue_bytes", "Bytes of trajectory arrays in the queue.", registry=r)
        self.in_flight = Gauge("slipstream_queue_credits_in_flight", "Group starts granted whose group has not arrived.", registry=r)
        self.capacity = Gauge("slipstream_queue_credits_available", "Group starts admission control would grant now.", registry=r)
        self.leased = Gauge("slipstream_queue_leased_groups", "Groups handed to a trainer and not yet committed.", registry=r)
        self.accepted = Counter("slipstream_broker_trajectories_accepted_total", "Trajectories accepted into the queue.", registry=r)
        self.consumed = Counter("slipstream_broker_trajectories_consumed_total", "Trajectories consumed by committed trainer steps.", registry=r)
        self.dropped = Counter("slipstream_broker_trajectories_dropped_total", "Trajectories removed without training, by reason.", ["reason"], registry=r)
        self.duplicates = Counter("slipstream_broker_duplicate_groups_total", "Resent groups recognised as already accepted.", registry=r)
        self.lease_expiries = Counter("slipstream_broker_lease_expiries_total", "Leases returned to the queue uncommitted.", registry=r)
        self.rejected = Counter("slipstream_broker_rejected_messages_total", "Messages rejected at the boundary, by reason.", ["reason"], registry=r)
        self.staleness = Histogram(
            "slipstream_broker_consumed_staleness", "Staleness (policy versions) of each consumed trajectory.",
            buckets=STALENESS_BUCKETS, registry=r,
        )
        self.producers_alive = Gauge("slipstream_broker_producers_alive", "Producers heard from within peer_timeout_s.", registry=r)
        self.producer_deaths = Counter("slipstream_broker_producer_deaths_total", "Producers declared dead (silent past peer_timeout_s).", registry=r)
        self.trainer_alive = Gauge("slipstream_broker_trainer_alive", "1 if a trainer was heard from within peer_timeout_s.", registry=r)
        self.version = policy_version_gauge(r)
        self.journal_bytes = Counter("slipstream_broker_journal_written_bytes_total", "Bytes appended to the queue journal.", registry=r)
        self.journal_torn = Counter("slipstream_broker_journal_torn_records_total", "Torn or corrupt journal records skipped on recovery.", registry=r)
        self.recovered = Gauge("slipstream_broker_recovered_groups", "Groups this broker recovered from the journal at start.", registry=r)
        self.retained_groups = Gauge("slipstream_queue_retained_groups", "Committed groups kept for replay until a trainer checkpoint covers their step.", registry=r)
        self.retained_trajectories = Gauge("slipstream_queue_retained_trajectories", "Trajectories of the retained groups (they count against the queue bound).", registry=r)
        self.retained_bytes = Gauge("slipstream_queue_retained_bytes", "Bytes of trajectory arrays of the retained groups (they count against the queue bound).", registry=r)
        self.replayed_groups = Counter("slipstream_queue_replayed_groups_total", "Retained groups served again to a resumed trainer and committed (not consumed twice).", registry=r)
        self.replayed_trajectories = Counter("slipstream_queue_replayed_trajectories_total", "Trajectories of the replayed groups.", registry=r)
        self.not_retained = Counter(
            "slipstream_queue_not_retained_groups_total",
            "Committed groups not retained for replay because one more batch would no longer fit beside the retained ones.", registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


class Broker:
    def __init__(
        self, cfg: QueueConfig, group_size: int, vocab_size: int | None = None, policy_version: int = 0,
        journal_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.group_size = group_size
        self.limits = Limits(max_message_bytes=cfg.max_message_bytes, vocab_size=vocab_size)
        self.queue = StalenessQueue(
            cfg.max_staleness, cfg.groups_per_step, cfg.max_queued_trajectories, cfg.max_queued_bytes,
            cfg.stale_policy, policy_version, lease_prefix=f"lease-{uuid.uuid4().hex[:8]}",
        )
        self.metrics = BrokerMetrics()
        self._retained_full_logged = float("-inf")  # last "queue full because of retention" warning
        self.journal: Journal | None = None
        self.orphan_leases: dict[str, list[tuple[str, int, int]]] = {}  # issued by an earlier incarnation
        self.orphan_lease_steps: dict[str, tuple[int, list[list[int]]]] = {}  # their steps and shards
        self.orphan_replays: dict[str, int] = {}  # replay leases issued by an earlier incarnation -> step
        self.recovery: dict[str, int] = {}
        if journal_dir is not None:
            self._recover(journal_dir)
        self.producers: dict[bytes, Peer] = {}
        self.trainer: Peer | None = None
        self.pending: tuple[bytes, BatchRequest] | None = None
        self.ctx = zmq.asyncio.Context()
        self.psock = self.ctx.socket(zmq.ROUTER)
        self.tsock = self.ctx.socket(zmq.ROUTER)
        self.curve = CurveKeys.from_config(cfg)
        for s in (self.psock, self.tsock):
            configure_socket(s, cfg.socket_hwm, cfg.max_message_bytes)
            s.setsockopt(zmq.ROUTER_MANDATORY, 0)
            if self.curve is not None:
                self.curve.server(s)
        self.producer_port = bind(self.psock, cfg.host, cfg.producer_port)
        self.trainer_port = bind(self.tsock, cfg.host, cfg.trainer_port)
        self._stopping = asyncio.Event()

    def _recover(self, journal_dir: Path) -> None:
        self.journal = Journal(journal_dir, self.cfg.journal_segment_bytes, self.cfg.journal_fsync)
        rec = self.journal.recover()
        if rec.segments:
            version = max(rec.version, self.queue.published_version)
            self.queue.restore(rec.groups, rec.seen, rec.stats, version, list(rec.retained.values()))
            self.orphan_leases = rec.leases
            self.orphan_lease_steps = rec.lease_steps
            self.orphan_replays = rec.replay_leases
            self.metrics.replayed_groups.inc(rec.stats.groups_replayed)
            self.metrics.replayed_trajectories.inc(rec.stats.trajectories_replayed)
            self.metrics.not_retained.inc(rec.stats.groups_not_retained)
            self.metrics.accepted.inc(rec.stats.trajectories_accepted)
            self.metrics.consumed.inc(rec.stats.trajectories_consumed)
            for reason, n in rec.stats.trajectories_dropped.items():
                self.metrics.dropped.labels(reason).inc(n)
            self.metrics.journal_torn.inc(rec.torn_records)
            self.metrics.recovered.set(len(rec.groups))
            log.warning(
                "recovered from the journal (%d segments): %d unconsumed groups back in the queue, %d leases "
                "awaiting commit, %d committed batches retained for replay (steps %s), policy version %d, %d torn records skipped",
                rec.segments, len(rec.groups), len(rec.leases), len(rec.retained), sorted(rec.retained), version, rec.torn_records,
            )
        self.recovery = {"segments": rec.segments, "groups": len(rec.groups), "torn_records": rec.torn_records}
        self.journal.open_segment(self.queue.stats, self.queue.seen, self.queue.published_version)

    def _journal_tick(self) -> None:
        """Rotate/compact the journal. Only between events, when journal and queue agree."""
        if self.journal is not None:
            before = self.journal.bytes_written
            self.journal.maybe_rotate(self.queue.stats, self.queue.seen, self.queue.published_version)
            self.metrics.journal_bytes.inc(self.journal.bytes_written - before)

    # ----------------------------------------------------------------- plumbing
    async def _send(self, sock: zmq.asyncio.Socket, identity: bytes, msg: Any) -> None:
        try:
            await sock.send_multipart([identity, *encode(msg)], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("send buffer full (HWM %d): dropped a %s reply to a peer that is not reading", self.cfg.socket_hwm, type(msg).__name__)

    def _reject(self, code: str) -> None:
        self.metrics.rejected.labels(code).inc()

    def _decode(self, frames: list[Any], sender: str) -> Any:
        limits = dataclasses.replace(self.limits, max_version=self.queue.committed_version)
        return decode(frames, limits)

    # ----------------------------------------------------------------- producers
    async def _on_producer(self, identity: bytes, frames: list[Any]) -> None:
        peer = self.producers.get(identity)
        try:
            msg = self._decode(frames, "producer")
        except WireError as e:
            self._reject(e.code)
            seq, epoch = _peek_seq(frames)
            log.warning("rejected message from producer %s: %s", peer.peer_id if peer else identity.hex(), e)
            if peer is not None and seq >= 0:
                self.queue.credit_returned(peer.peer_id)  # that group will never be accepted
            await self._send(self.psock, identity, Error(code=e.code, message=e.message, seq=seq, epoch=epoch))
            return
        if isinstance(msg, Hello):
            await self._register_producer(identity, msg)
            return
        if peer is None:
            self._reject("not_registered")
            await self._send(self.psock, identity, Error(code="not_registered", message="send hello before anything else"))
            return
        peer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, CreditRequest):
            peer.want = max(0, msg.want)
            await self._grant_credits()
        elif isinstance(msg, TrajectoryGroup):
            await self._on_group(identity, peer, msg, frames)
        else:
            self._reject("not_allowed")
            await self._send(self.psock, identity, Error(code="not_allowed", message=f"producers may not send '{msg.TYPE}'"))

    async def _register_producer(self, identity: bytes, hello: Hello) -> None:
        if hello.role != "producer":
            self._reject("not_allowed")
            await self._send(self.psock, identity, Error(code="not_allowed", message=f"this is the producer socket; role {hello.role!r}"))
            return
        for other_id, other in list(self.producers.items()):
            if other.peer_id == hello.peer_id and other_id != identity:
                log.info("producer %s reconnected (epoch %d -> %d); reclaiming old credits", hello.peer_id, other.epoch, hello.epoch)
                self.queue.release_producer(other.peer_id)
                del self.producers[other_id]
        self.producers[identity] = Peer(identity, hello.peer_id, hello.epoch, time.monotonic())
        log.info("producer %s (pid %d, epoch %d) registered", hello.peer_id, hello.pid, hello.epoch)
        await self._send(self.psock, identity, self._welcome())

    def _welcome(self) -> Welcome:
        return Welcome(
            policy_version=self.queue.published_version, max_staleness=self.cfg.max_staleness,
            groups_per_step=self.cfg.groups_per_step, max_message_bytes=self.cfg.max_message_bytes,
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
        )

    async def _on_group(self, identity: bytes, peer: Peer, group: TrajectoryGroup, frames: list[Any]) -> None:
        if group.producer_id != peer.peer_id:
            self._reject("bad_field")
            self.queue.credit_returned(peer.peer_id)
            await self._send(self.psock, identity, Error(code="bad_field", message=f"producer_id {group.producer_id!r} does not match hello {peer.peer_id!r}", seq=group.seq, epoch=group.epoch))
            return
        if self.journal is not None and self.queue.admission(group) == "accepted":
            # Durable before it is acked (and before anything can lease it).
            before = self.journal.bytes_written
            self.journal.accepted(group, [bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in frames])
            self.metrics.journal_bytes.inc(self.journal.bytes_written - before)
        result = self.queue.accept(group)
        if result == "full":
            now = time.monotonic()
            if self.queue.retained_trajectories and now - self._retained_full_logged >= 10.0:  # counted every time, logged every 10 s
                self._retained_full_logged = now
                log.warning(
                    "queue full: group %s refused (producer resends it later); %d of its %d trajectories (%d bytes) are "
                    "retained batches of steps %s, held for replay until the trainer reports a checkpoint covering them",
                    group.group_id, self.queue.retained_trajectories, self.cfg.max_queued_trajectories,
                    self.queue.retained_bytes, list(self.queue.retained),
                )
            self._reject("queue_full")
            await self._send(self.psock, identity, Error(code="queue_full", message="queue is at its trajectory/byte bound; resend later", seq=group.seq, epoch=group.epoch))
            return
        if result == "duplicate":
            self.metrics.duplicates.inc()
        else:
            self.metrics.accepted.inc(len(group.trajectories))
        await self._send(self.psock, identity, Ack(epoch=group.epoch, seq=group.seq, group_id=group.group_id, duplicate=result == "duplicate"))
        await self._try_fulfil()

    async def _grant_credits(self) -> None:
        for peer in sorted(self.producers.values(), key=lambda p: self.queue.in_flight.get(p.peer_id, 0)):
            if peer.want <= 0:
                continue
            granted = self.queue.grant(peer.peer_id, peer.want, self.group_size)
            if granted:
                peer.want -= granted
                await self._send(self.psock, peer.identity, Credit(granted=granted, policy_version=self.queue.published_version))
        self._update_gauges()

    # ----------------------------------------------------------------- trainers
    async def _on_trainer(self, identity: bytes, frames: list[Any]) -> None:
        try:
            msg = self._decode(frames, "trainer")
        except WireError as e:
            self._reject(e.code)
            log.warning("rejected message from trainer: %s", e)
            await self._send(self.tsock, identity, Error(code=e.code, message=e.message))
            return
        if isinstance(msg, Hello):
            if msg.resume_step < -1 or msg.checkpoint_every < 0:
                self._reject("bad_field")
                await self._send(self.tsock, identity, Error(code="bad_field", message="hello: resume_step must be >= -1 and checkpoint_every >= 0"))
                return
            if self.trainer is not None and msg.pid != self.trainer.pid:
                self._trainer_replaced(msg)
            self.trainer = Peer(identity, msg.peer_id, msg.epoch, time.monotonic(), pid=msg.pid)
            self._trainer_resumes(msg)
            if self.journal is not None and msg.policy_version > self.queue.published_version:
                self.journal.version(msg.policy_version)
            self.queue.publish(msg.policy_version)
            log.info("trainer %s registered at policy version %d", msg.peer_id, msg.policy_version)
            await self._send(self.tsock, identity, self._welcome())
            await self._announce()
            return
        if self.trainer is None or identity != self.trainer.identity:
            self._reject("not_registered")
            await self._send(self.tsock, identity, Error(code="not_registered", message="send hello before anything else"))
            return
        self.trainer.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, BatchRequest):
            if await self._serve_replay(identity, msg):
                return
            again = next((lease for lease in self.queue.leases.values() if lease.step == msg.step and lease.policy_version == msg.policy_version), None)
            if again is not None:  # a resend (the trainer reconnected): same lease, not a second one
                log.info("batch request for step %d repeated: resending lease %s", msg.step, again.lease_id)
                await self._send(self.tsock, identity, Batch(
                    step=msg.step, lease_id=again.lease_id, groups=again.groups, shards=shard_by_tokens(again.groups, msg.dp_size),
                    dropped=sum(self.queue.stats.trajectories_dropped.values()), queue_depth=len(self.queue.groups),
                ))
                return
            self.pending = (identity, msg)
            await self._try_fulfil()
        elif isinstance(msg, Commit):
            await self._on_commit(identity, msg)
        elif isinstance(msg, Checkpointed):
            self._release(msg.step, f"the trainer checkpointed step {msg.step}")
            await self._grant_credits()  # retention held part of the queue bound
        elif isinstance(msg, Published):
            if self.journal is not None:
                self.journal.version(msg.policy_version)
            self.queue.publish(msg.policy_version)
            await self._announce()
        else:
            self._reject("not_allowed")
            await self._send(self.tsock, identity, Error(code="not_allowed", message=f"trainers may not send '{msg.TYPE}'"))

    def _trainer_replaced(self, hello: Hello) -> None:
        """A new trainer process (another pid: the launcher restarted a crashed trainer, which resumed
        from its checkpoint) said hello.  The old process's outstanding leases will never be committed:
        their groups go back to the front of the queue at once (counted as lease expiries; staleness
        applies again when they are next leased), and its pending batch request is forgotten.  Groups
        the old process already committed stay consumed (counted once).  When the trainer checkpoints,
        they were retained, and the resumed trainer gets them again as replays of the same steps
        (:meth:`_trainer_resumes`); batches that were not retained (no checkpoints, no room) leave
        their steps to be re-done with new batches, and ``QueueStats.groups_superseded`` keeps
        admission control from counting those twice.  A hello
        from the same process (a reconnect) keeps its leases, so a resent batch request gets the
        same lease back."""
        assert self.trainer is not None
        returned = self.queue.return_all_leases()
        self.metrics.lease_expiries.inc(len(returned))
        self.pending = None
        log.warning(
            "trainer %s restarted (pid %d -> %d, policy version %d, broker at %d): %d outstanding leases "
            "(%d groups) returned to the queue", hello.peer_id, self.trainer.pid, hello.pid, hello.policy_version,
            self.queue.published_version, len(returned), sum(len(lease.groups) for lease in returned),
        )
        self._update_gauges()

    # ----------------------------------------------------------------- replay (trainer resume)
    def _trainer_resumes(self, hello: Hello) -> None:
        """Apply a trainer hello's retention settings. ``checkpoint_every > 0`` turns retention on
        (0: nothing is retained, and anything still retained is released: no checkpoint will ever
        need it). ``resume_step = k >= 0`` (the first hello of a process): the checkpoint covers
        steps <= k, so they are released; steps k+1, ... still retained will be replayed, in order,
        as the trainer asks for them, before any new data."""
        self.queue.retain = hello.checkpoint_every > 0
        if not self.queue.retain:
            if self.queue.retained:
                self._release(max(self.queue.retained), "the trainer does not checkpoint (checkpoint_every = 0)")
            return
        if hello.checkpoint_every * self.cfg.groups_per_step * self.group_size > self.cfg.max_queued_trajectories:
            log.warning(
                "trainer.checkpoint_every = %d steps of %d trajectories exceed queue.max_queued_trajectories = %d: batches "
                "that no longer fit are not retained (slipstream_queue_not_retained_groups_total); a trainer resumed "
                "past them re-does those steps with new data", hello.checkpoint_every,
                self.cfg.groups_per_step * self.group_size, self.cfg.max_queued_trajectories,
            )
        if hello.resume_step < 0:
            return
        self._release(hello.resume_step, f"the trainer resumes from its checkpoint of step {hello.resume_step}")
        later = list(self.queue.retained)
        if later:
            expected = list(range(hello.resume_step + 1, hello.resume_step + 1 + len(later)))
            log.warning("trainer resumes from step %d: the retained batches of steps %s (%d groups) will be replayed before any new data%s",
                        hello.resume_step, later, sum(len(r.groups) for r in self.queue.retained.values()),
                        "" if later == expected else f" (steps {sorted(set(expected) - set(later))} are not retained: re-done with new data)")

    def _release(self, upto_step: int, why: str) -> None:
        released = self.queue.release(upto_step)
        if not released:
            return
        if self.journal is not None:
            self.journal.released(released)
        log.info("released the retained batches of steps %s (%d groups): %s", [r.step for r in released], sum(len(r.groups) for r in released), why)
        self._update_gauges()

    def _will_retain(self, step: int, groups: list[TrajectoryGroup]) -> bool:
        """Whether committing ``groups`` (step ``step``) keeps them for replay; counts and says why not."""
        if not self.queue.retain:
            return False
        if self.queue.will_retain(groups):
            return True
        self.metrics.not_retained.inc(len(groups))
        log.warning(
            "step %d's batch is not retained for replay: %d retained trajectories (%d bytes, steps %s) plus twice this batch "
            "exceed queue.max_queued_trajectories = %d / max_queued_bytes = %d; if the trainer dies before its next "
            "checkpoint, this step is re-done with new data", step, self.queue.retained_trajectories, self.queue.retained_bytes,
            list(self.queue.retained), self.cfg.max_queued_trajectories, self.cfg.max_queued_bytes,
        )
        return False

    async def _serve_replay(self, identity: bytes, req: BatchRequest) -> bool:
        """Serve the retained batch of ``req.step`` again (True), exactly as first served. No
        staleness check: the step that first consumed it accepted it (see ``pipeline.queue``)."""
        fresh = not any(lease.step == req.step for lease in self.queue.replay_leases.values())
        lease = self.queue.replay_batch(req.step, req.dp_size)
        if lease is None:
            return False
        if fresh:
            if self.journal is not None:  # so its commit can still be matched after a broker restart
                self.journal.leased(lease.lease_id, lease.groups, lease.step, lease.shards, replay=True)
            log.warning("replaying step %d to the resumed trainer: %d groups first committed on lease %s (%s)",
                        req.step, len(lease.groups), self.queue.retained[req.step].lease_id or "an earlier broker", lease.lease_id)
        await self._send(self.tsock, identity, Batch(
            step=req.step, lease_id=lease.lease_id, groups=lease.groups, shards=lease.shards,
            dropped=sum(self.queue.stats.trajectories_dropped.values()), queue_depth=len(self.queue.groups), replay=True,
        ))
        self.pending = None
        return True

    async def _commit_replay(self, identity: bytes, msg: Commit) -> bool:
        """The commit of a replayed batch (True): counted as replayed, never consumed again."""
        if msg.lease_id in self.queue.replay_leases:
            lease = self.queue.commit_replay(msg.lease_id)
            n_groups, n_traj = len(lease.groups), sum(len(g.trajectories) for g in lease.groups)
        elif msg.lease_id in self.orphan_replays:  # issued before a broker restart
            step = self.orphan_replays.pop(msg.lease_id)
            r = self.queue.retained.get(step)
            n_groups, n_traj = (len(r.groups), r.trajectories) if r is not None else (0, 0)
            self.queue.count_replayed(n_groups, n_traj)
        else:
            return False
        if self.journal is not None:
            self.journal.replayed(msg.lease_id, msg.step, msg.policy_version, n_groups, n_traj)
        self.metrics.replayed_groups.inc(n_groups)
        self.metrics.replayed_trajectories.inc(n_traj)
        self.queue.committed_version = max(self.queue.committed_version, msg.policy_version)
        log.info("replayed step %d committed (%d groups, policy version %d): not counted consumed again", msg.step, n_groups, msg.policy_version)
        self._update_gauges()
        await self._send(self.tsock, identity, CommitAck(lease_id=msg.lease_id, policy_version=msg.policy_version))
        return True

    async def _on_commit(self, identity: bytes, msg: Commit) -> None:
        """Count a lease's groups consumed, durably, then ack. After a broker restart the trainer may
        commit a lease the previous incarnation issued: its groups were recovered into the queue, so
        they are removed from it and consumed (never trained twice); a commit the journal already
        holds (its ack was lost in the crash) is acked again without counting anything twice."""
        groups = None
        if await self._commit_replay(identity, msg):
            return
        if msg.lease_id in self.queue.leases:
            lease = self.queue.leases[msg.lease_id]
            groups = lease.groups
            retain = self._will_retain(lease.step, groups)
            if self.journal is not None:
                self.journal.consumed(msg.lease_id, groups, msg.policy_version, lease.step, lease.shards, retain)
            self.queue.commit(msg.lease_id, msg.policy_version)
        elif self.journal is not None and msg.lease_id in self.journal.commits:
            log.info("commit of %s was already journaled (its ack was lost): acknowledging again", msg.lease_id)
            groups = []
        elif msg.lease_id in self.orphan_leases:
            step, shards = self.orphan_lease_steps.get(msg.lease_id, (-1, []))
            keys = self.orphan_leases[msg.lease_id]
            found = [g for g in self.queue.groups if g.dedup_key in set(keys)]
            retain = step >= 0 and len(found) == len(keys) and self._will_retain(step, found)
            groups = self.queue.consume_queued(keys, msg.policy_version, step, shards)
            if groups is not None:
                del self.orphan_leases[msg.lease_id]
                self.orphan_lease_steps.pop(msg.lease_id, None)
                if self.journal is not None:
                    self.journal.consumed(msg.lease_id, groups, msg.policy_version, step, shards, retain)
                log.warning("commit of %s, leased before the broker restarted: its %d recovered groups are consumed", msg.lease_id, len(groups))
        if groups is None:
            self._reject("bad_field")
            await self._send(self.tsock, identity, Error(code="bad_field", message=f"unknown or expired lease {msg.lease_id!r}"))
            return
        self.metrics.consumed.inc(sum(len(g.trajectories) for g in groups))
        self._update_gauges()  # before the ack: what a trainer sees acked, /metrics already shows
        await self._send(self.tsock, identity, CommitAck(lease_id=msg.lease_id, policy_version=msg.policy_version))

    async def _announce(self) -> None:
        v = self.queue.published_version
        self.metrics.version.labels("broker").set(v)
        for peer in self.producers.values():
            await self._send(self.psock, peer.identity, VersionAnnouncement(policy_version=v))
        await self._grant_credits()
        await self._try_fulfil()

    async def _try_fulfil(self) -> None:
        if self.pending is None:
            return
        identity, req = self.pending
        stale = self.queue.remove_stale(req.policy_version)
        if stale and self.journal is not None:
            self.journal.dropped("stale_requeued" if self.cfg.stale_policy == "requeue" else "stale_dropped", stale)
        for g in stale:
            await self._handle_stale(g, req.policy_version)
        if not self.queue.ready(req.num_groups):
            if stale:
                await self._grant_credits()
            return
        result = self.queue.take_batch(req.step, req.policy_version, req.num_groups, req.dp_size)
        if self.journal is not None:  # so a commit after a broker restart can still be matched
            self.journal.leased(result.lease.lease_id, result.lease.groups)
        for s in result.staleness:
            self.metrics.staleness.observe(s)
        batch = Batch(
            step=req.step, lease_id=result.lease.lease_id, groups=result.lease.groups, shards=result.shards,
            dropped=sum(self.queue.stats.trajectories_dropped.values()), queue_depth=len(self.queue.groups),
        )
        self.pending = None
        await self._send(self.tsock, identity, batch)
        self._update_gauges()
        await self._grant_credits()

    async def _handle_stale(self, group: TrajectoryGroup, version: int) -> None:
        reason = "stale_requeued" if self.cfg.stale_policy == "requeue" else "stale_dropped"
        self.metrics.dropped.labels(reason).inc(len(group.trajectories))
        newest = group.max_version
        if newest > version:  # sampled by a newer policy a resumed trainer abandoned (queue._too_stale)
            log.info("group %s holds tokens of version %d, newer than the trainer's %d (a resumed trainer's abandoned policy): %s",
                     group.group_id, newest, version, reason)
        else:
            log.info("group %s is %d versions stale (> %d): %s", group.group_id, version - group.min_version, self.cfg.max_staleness, reason)
        if reason == "stale_requeued":
            target = next((p for p in self.producers.values() if p.peer_id == group.producer_id), None)
            target = target or next(iter(self.producers.values()), None)
            if target is None:
                log.warning("no live producer to requeue prompt %s to; it is lost from this run", group.prompt_id)
                return
            t0 = group.trajectories[0]
            await self._send(self.psock, target.identity, Requeue(
                prompt_id=group.prompt_id, prompt_tokens=[int(x) for x in t0.prompt_tokens], metadata=group.metadata,
            ))

    # ----------------------------------------------------------------- housekeeping
    def _update_gauges(self) -> None:
        q, m = self.queue, self.metrics
        m.depth_groups.set(len(q.groups))
        m.depth.set(q.queued_trajectories)
        m.bytes.set(q.queued_bytes)
        m.in_flight.set(q.in_flight_groups)
        m.capacity.set(q.capacity(self.group_size))
        m.leased.set(q.leased_groups)
        m.retained_groups.set(sum(len(r.groups) for r in q.retained.values()))
        m.retained_trajectories.set(q.retained_trajectories)
        m.retained_bytes.set(q.retained_bytes)
        m.producers_alive.set(len(self.producers))

    async def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            now = time.monotonic()
            for identity, peer in list(self.producers.items()):
                if now - peer.last_seen > self.cfg.peer_timeout_s:
                    reclaimed = self.queue.release_producer(peer.peer_id)
                    del self.producers[identity]
                    self.metrics.producer_deaths.inc()
                    log.warning("producer %s silent for %.1fs: declared dead, %d credits reclaimed", peer.peer_id, now - peer.last_seen, reclaimed)
                else:
                    await self._send(self.psock, identity, Heartbeat(peer_id="broker", sent_at=time.time()))
            if self.trainer is not None:
                alive = now - self.trainer.last_seen <= self.cfg.peer_timeout_s
                self.metrics.trainer_alive.set(1 if alive else 0)
                await self._send(self.tsock, self.trainer.identity, Heartbeat(peer_id="broker", sent_at=time.time()))
            for lease in self.queue.expire_leases(self.cfg.lease_timeout_s):
                self.metrics.lease_expiries.inc()
                log.warning("lease %s (step %d, %d groups) expired uncommitted: groups returned to the queue", lease.lease_id, lease.step, len(lease.groups))
            await self._grant_credits()
            await self._try_fulfil()
            self._journal_tick()

    async def _recv_loop(self, sock: zmq.asyncio.Socket, handler: Any) -> None:
        while not self._stopping.is_set():
            frames = await sock.recv_multipart(copy=False)
            if len(frames) < 2:
                self._reject("frame_count")
                continue
            try:
                await handler(frames[0].bytes, frames[1:])
            except Exception:  # a bug must not take the queue down; it is logged and counted
                log.exception("unexpected error handling a message")
                self._reject("internal")
            self._journal_tick()

    async def serve(self) -> None:
        tasks = [
            asyncio.create_task(self._recv_loop(self.psock, self._on_producer)),
            asyncio.create_task(self._recv_loop(self.tsock, self._on_trainer)),
            asyncio.create_task(self._housekeeping()),
        ]
        self._update_gauges()
        try:
            await self._stopping.wait()
        finally:
            for peer in self.producers.values():
                await self._send(self.psock, peer.identity, Shutdown(reason="broker stopping"))
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.psock.close()
        self.tsock.close()
        if self.curve is not None:
            self.curve.close()
        self.ctx.term()

    def final_stats(self) -> dict[str, Any]:
        q = self.queue
        s = q.stats
        return {
            "trajectories_accepted": s.trajectories_accepted,
            "groups_accepted": s.groups_accepted,
            "trajectories_consumed": s.trajectories_consumed,
            "groups_consumed": s.groups_consumed,
            "trajectories_dropped": dict(s.trajectories_dropped),
            "groups_duplicate": s.groups_duplicate,
            "trajectories_still_queued": q.queued_trajectories + sum(len(g.trajectories) for lease in q.leases.values() for g in lease.groups),
            "leases_expired": s.leases_expired,
            "groups_superseded": s.groups_superseded,
            # Retained batches are consumed (committed) and counted there; replays are not consumed again.
            "trajectories_retained": q.retained_trajectories,
            "retained_steps": list(q.retained),
            "trajectories_replayed": s.trajectories_replayed,
            "groups_replayed": s.groups_replayed,
            "groups_not_retained": s.groups_not_retained,
            "rejected_messages": {k: int(v) for k, v in _counter_values(self.metrics.rejected).items() if v},
            "policy_version": q.published_version,
            "journal": {**self.recovery, "segments_deleted": self.journal.segments_deleted} if self.journal else None,
        }


def _counter_values(counter: Counter) -> dict[str, float]:
    out = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels.get("reason", "")] = sample.value
    return out


def _peek_seq(frames: list[Any]) -> tuple[int, int]:
    """Best effort: the (seq, epoch) of a rejected group, so the producer can match the error."""
    try:
        header = msgpack.unpackb(memoryview(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0]), raw=False)
        if isinstance(header, dict) and header.get("type") == "group":
            seq, epoch = header.get("seq", -1), header.get("epoch", -1)
            if type(seq) is int and type(epoch) is int:  # not bools: the Error reply must decode
                return seq, epoch
    except Exception:
        pass
    return -1, -1


async def run_broker(broker: Broker, ports_file: Path | None, stats_file: Path | None, stop: asyncio.Event) -> None:
    if ports_file is not None:
        tmp = ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"producer_port": broker.producer_port, "trainer_port": broker.trainer_port}))
        tmp.rename(ports_file)
    log.info("broker listening: producers tcp://%s:%d, trainers tcp://%s:%d", broker.cfg.host, broker.producer_port, broker.cfg.host, broker.trainer_port)
    serve = asyncio.create_task(broker.serve())
    await stop.wait()
    broker.stop()
    await serve
    if stats_file is not None:
        stats_file.write_text(json.dumps(broker.final_stats(), indent=2))
    log.info("broker stopped: %s", json.dumps(broker.final_stats()))
