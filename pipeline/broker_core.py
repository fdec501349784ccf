"""The broker's core: every protocol decision, no I/O on sockets.

:class:`BrokerCore` takes one received message at a time, ``handle(peer, frames)``, and the clock,
``tick(now)``, and returns the replies to send as ``[(peer, message), ...]``.  A peer is
``("producer", identity)`` or ``("trainer", identity)``: which ROUTER socket and which ZeroMQ
routing id.  It owns validation at the boundary (decode with the live limits, an ``Error`` reply
and a ``slipstream_broker_rejected_messages_total{reason}`` increment for anything bad), producer
sessions and credits, liveness, the staleness check when a batch is formed, and the metrics.  The
trainer's side (batches, commits, leases, retention and replay) is :class:`pipeline.broker_trainer.TrainerSide`.
The queue (:class:`pipeline.queue.StalenessQueue`) logs each change to the journal before it
applies it, so nothing here asks whether the journal is on.  :mod:`pipeline.broker` is the thin
shell that moves frames between the sockets and this core.

Why: every transition (credits, leases, lease expiry, orphan leases after a restart, replay) can be
driven and checked in-process, deterministically (``tests/test_broker_core.py``), with an injected
clock instead of sleeps.

    core = BrokerCore(QueueConfig(), group_size=8)
    replies = core.handle(("producer", b"id-1"), encode(Hello(role="producer", peer_id="p0")))
    replies += core.tick(time.monotonic())
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from pipeline.ackslog import AckLog, NullAckLog
from pipeline.broker_metrics import BrokerMetrics, counter_values
from pipeline.broker_trainer import TrainerSide
from pipeline.journal import Journal, NullJournal, Recovered
from pipeline.queue import StalenessQueue
from pipeline.runconfig import QueueConfig
from schemas.codec import decode
from schemas.messages import (
    Ack,
    Credit,
    CreditRequest,
    Error,
    Heartbeat,
    Hello,
    Requeue,
    Shutdown,
    TrajectoryGroup,
    VersionAnnouncement,
    Welcome,
)
from schemas.validate import Limits, WireError

log = logging.getLogger(__name__)

PRODUCER, TRAINER = "producer", "trainer"
PeerRef = tuple[str, bytes]  # (socket side, ZeroMQ routing id)
Reply = tuple[PeerRef, Any]


@dataclass
class Peer:
    identity: bytes
    peer_id: str
    epoch: int
    last_seen: float
    want: int = 0
    pid: int = 0


class BrokerCore:
    def __init__(
        self, cfg: QueueConfig, group_size: int, vocab_size: int | None = None, policy_version: int = 0,
        journal: Journal | NullJournal | None = None, metrics: BrokerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic, acks: AckLog | NullAckLog | None = None,
    ) -> None:
        self.cfg = cfg
        self.group_size = group_size
        self.clock = clock
        self.limits = Limits(max_message_bytes=cfg.max_message_bytes, vocab_size=vocab_size)
        self.metrics = metrics or BrokerMetrics()
        self.journal = journal if journal is not None else NullJournal()
        self.acks = acks if acks is not None else NullAckLog()
        self.queue = StalenessQueue(
            cfg.max_staleness, cfg.groups_per_step, cfg.max_queued_trajectories, cfg.max_queued_bytes,
            cfg.stale_policy, policy_version, lease_prefix=f"lease-{uuid.uuid4().hex[:8]}", log=self.journal, clock=clock,
        )
        self.producers: dict[bytes, Peer] = {}
        self.trainer = TrainerSide(self)
        self._retained_full_logged = float("-inf")  # last "queue full because of retention" warning
        self._journal_bytes = 0
        self._out: list[Reply] = []
        self.recovered = self._recover(policy_version)

    def _recover(self, policy_version: int) -> Recovered:
        """Apply the journal's events to the (fresh) queue, then start a new segment."""
        rec = self.journal.recover_into(self.queue)
        if rec.segments:
            s = self.queue.stats
            m = self.metrics
            m.replayed_groups.inc(s.groups_replayed)
            m.replayed_trajectories.inc(s.trajectories_replayed)
            m.not_retained.inc(s.groups_not_retained)
            m.accepted.inc(s.trajectories_accepted)
            m.consumed.inc(s.trajectories_consumed)
            for reason, n in s.trajectories_dropped.items():
                m.dropped.labels(reason).inc(n)
            m.journal_torn.inc(rec.torn_records)
            m.recovered.set(len(rec.groups))
            log.warning(
                "recovered from the journal (%d segments): %d unconsumed groups back in the queue, %d leases "
                "awaiting commit, %d committed batches retained for replay (steps %s), policy version %d, %d torn records skipped",
                rec.segments, len(rec.groups), len(rec.leases), len(rec.retained), sorted(rec.retained),
                max(rec.version, policy_version), rec.torn_records,
            )
        q = self.queue
        self.journal.open_segment(q.stats, q.seen, q.published_policy_version, q.committed_policy_version)
        q.publish(policy_version)
        return rec

    # ----------------------------------------------------------------- entry points
    def handle(self, peer: PeerRef, frames: list[Any]) -> list[Reply]:
        """One received message (its frames, routing id removed) -> the replies to send."""
        self._out = []
        side, identity = peer
        try:
            if side == PRODUCER:
                self._on_producer(identity, frames)
            else:
                self.trainer.on_message(identity, frames)
        except Exception:  # a bug must not take the queue down; it is logged and counted
            log.exception("unexpected error handling a message")
            self.reject("internal")
        self._journal_tick()
        return self._take_out()

    def tick(self, now: float) -> list[Reply]:
        """Housekeeping at ``now`` (monotonic seconds): liveness, heartbeats, lease expiry, credits."""
        self._out = []
        for identity, peer in list(self.producers.items()):
            if now - peer.last_seen > self.cfg.peer_timeout_s:
                reclaimed = self.queue.release_producer(peer.peer_id)
                del self.producers[identity]
                self.metrics.producer_deaths.inc()
                log.warning("producer %s silent for %.1fs: declared dead, %d credits reclaimed", peer.peer_id, now - peer.last_seen, reclaimed)
            else:
                self.send((PRODUCER, identity), Heartbeat(peer_id="broker", sent_at=time.time()))
        self.trainer.tick(now)
        for lease in self.queue.expire_leases(self.cfg.lease_timeout_s, now):
            self.metrics.lease_expiries.inc()
            log.warning("lease %s (step %d, %d groups) expired uncommitted: groups returned to the queue", lease.lease_id, lease.step, len(lease.groups))
        self.grant_credits()
        self.try_fulfil()
        self._journal_tick()
        return self._take_out()

    def shutdown(self) -> list[Reply]:
        return [((PRODUCER, p.identity), Shutdown(reason="broker stopping")) for p in self.producers.values()]

    def close(self) -> None:
        self.journal.close()
        self.acks.close()

    # ----------------------------------------------------------------- plumbing
    def send(self, peer: PeerRef, msg: Any) -> None:
        self._out.append((peer, msg))

    def _take_out(self) -> list[Reply]:
        out, self._out = self._out, []
        return out

    def reject(self, code: str) -> None:
        self.metrics.rejected.labels(code).inc()

    def decode(self, frames: list[Any]) -> Any:
        return decode(frames, dataclasses.replace(self.limits, max_version=self.queue.committed_policy_version))

    def _journal_tick(self) -> None:
        """Rotate/compact the journal. Only between events, when journal and queue agree."""
        q = self.queue
        self.journal.maybe_rotate(q.stats, q.seen, q.published_policy_version, q.committed_policy_version)
        written = self.journal.bytes_written
        self.metrics.journal_bytes.inc(written - self._journal_bytes)
        self._journal_bytes = written

    def welcome(self) -> Welcome:
        return Welcome(
            policy_version=self.queue.published_policy_version, max_staleness=self.cfg.max_staleness,
            groups_per_step=self.cfg.groups_per_step, max_message_bytes=self.cfg.max_message_bytes,
            heartbeat_interval_s=self.cfg.heartbeat_interval_s,
        )

    # ----------------------------------------------------------------- producers
    def _on_producer(self, identity: bytes, frames: list[Any]) -> None:
        peer = self.producers.get(identity)
        me = (PRODUCER, identity)
        try:
            msg = self.decode(frames)
        except WireError as e:
            self.reject(e.code)
            seq, epoch = _peek_seq(frames)
            log.warning("rejected message from producer %s: %s", peer.peer_id if peer else identity.hex(), e)
            if peer is not None and seq >= 0:
                self.queue.credit_returned(peer.peer_id)  # that group will never be accepted
            self.send(me, Error(code=e.code, message=e.message, seq=seq, epoch=epoch))
            return
        if isinstance(msg, Hello):
            self._register_producer(identity, msg)
            return
        if peer is None:
            self.reject("not_registered")
            self.send(me, Error(code="not_registered", message="send hello before anything else"))
            return
        peer.last_seen = self.clock()
        if isinstance(msg, Heartbeat):
            return
        if isinstance(msg, CreditRequest):
            peer.want = max(0, msg.want)
            self.grant_credits()
        elif isinstance(msg, TrajectoryGroup):
            self._on_group(peer, msg, frames)
        else:
            self.reject("not_allowed")
            self.send(me, Error(code="not_allowed", message=f"producers may not send '{msg.TYPE}'"))

    def _register_producer(self, identity: bytes, hello: Hello) -> None:
        if hello.role != "producer":
            self.reject("not_allowed")
            self.send((PRODUCER, identity), Error(code="not_allowed", message=f"this is the producer socket; role {hello.role!r}"))
            return
        for other_id, other in list(self.producers.items()):
            if other.peer_id == hello.peer_id and other_id != identity:
                log.info("producer %s reconnected (epoch %d -> %d); reclaiming old credits", hello.peer_id, other.epoch, hello.epoch)
                self.queue.release_producer(other.peer_id)
                del self.producers[other_id]
        self.producers[identity] = Peer(identity, hello.peer_id, hello.epoch, self.clock())
        log.info("producer %s (pid %d, epoch %d) registered", hello.peer_id, hello.pid, hello.epoch)
        self.send((PRODUCER, identity), self.welcome())

    def _on_group(self, peer: Peer, group: TrajectoryGroup, frames: list[Any]) -> None:
        me = (PRODUCER, peer.identity)
        if group.producer_id != peer.peer_id:
            self.reject("bad_field")
            self.queue.credit_returned(peer.peer_id)
            self.send(me, Error(code="bad_field", message=f"producer_id {group.producer_id!r} does not match hello {peer.peer_id!r}",
                                seq=group.seq, epoch=group.epoch))
            return
        result = self.queue.accept(group, frames)  # durable in the journal (when on) before it returns
        if result == "full":
            now = self.clock()
            if self.queue.retained_trajectories and now - self._retained_full_logged >= 10.0:  # counted every time, logged every 10 s
                self._retained_full_logged = now
                log.warning(
                    "queue full: group %s refused (producer resends it later); %d of its %d trajectories (%d bytes) are "
                    "retained batches of steps %s, held for replay until the trainer reports a checkpoint covering them",
                    group.group_id, self.queue.retained_trajectories, self.cfg.max_queued_trajectories,
                    self.queue.retained_bytes, list(self.queue.retained),
                )
            self.reject("queue_full")
            self.send(me, Error(code="queue_full", message="queue is at its trajectory/byte bound; resend later", seq=group.seq, epoch=group.epoch))
            return
        if result == "duplicate":
            self.metrics.duplicates.inc()
        else:
            self.metrics.accepted.inc(len(group.trajectories))
        self.acks.acked(group, result == "duplicate")  # the audit trail: written before the ack leaves
        self.send(me, Ack(epoch=group.epoch, seq=group.seq, group_id=group.group_id, duplicate=result == "duplicate"))
        self.try_fulfil()

    def grant_credits(self) -> None:
        for peer in sorted(self.producers.values(), key=lambda p: self.queue.in_flight.get(p.peer_id, 0)):
            if peer.want <= 0:
                continue
            granted = self.queue.grant(peer.peer_id, peer.want, self.group_size)
            if granted:
                peer.want -= granted
                self.send((PRODUCER, peer.identity), Credit(granted=granted, policy_version=self.queue.published_policy_version))
        self.update_gauges()

    def announce(self) -> None:
        v = self.queue.published_policy_version
        self.metrics.version.labels("broker").set(v)
        for peer in self.producers.values():
            self.send((PRODUCER, peer.identity), VersionAnnouncement(policy_version=v))
        self.grant_credits()
        self.try_fulfil()

    # ----------------------------------------------------------------- batches
    def try_fulfil(self) -> None:
        """Serve the trainer's pending batch request if enough fresh groups are queued (stale ones
        are removed first and handed to the stale policy)."""
        pending = self.trainer.pending
        if pending is None:
            return
        identity, req = pending
        stale = self.queue.remove_stale(req.policy_version)
        for g in stale:
            self._handle_stale(g, req.policy_version)
        if not self.queue.ready(req.num_groups):
            if stale:
                self.grant_credits()
            return
        result = self.queue.take_batch(req.step, req.policy_version, req.num_groups, req.dp_size)
        for s in result.staleness:
            self.metrics.staleness.observe(s)
        self.trainer.pending = None
        self.send((TRAINER, identity), self.trainer.batch(req.step, result.lease))
        self.update_gauges()
        self.grant_credits()

    def _handle_stale(self, group: TrajectoryGroup, version: int) -> None:
        reason = self.queue.stale_reason
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
            self.send((PRODUCER, target.identity), Requeue(
                prompt_id=group.prompt_id, prompt_tokens=[int(x) for x in t0.prompt_tokens], metadata=group.metadata,
            ))

    # ----------------------------------------------------------------- housekeeping
    def update_gauges(self) -> None:
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

    def final_stats(self) -> dict[str, Any]:
        q = self.queue
        s = q.stats
        journal = self.journal.summary(self.recovered)
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
            "rejected_messages": {k: int(v) for k, v in counter_values(self.metrics.rejected).items() if v},
            "policy_version": q.published_policy_version,
            "journal": journal,
            "acked_log": self.acks.summary(),
        }


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
