"""ZeroMQ transport: socket setup with explicit limits, and the two broker sessions: the trainer's
(synchronous) :class:`TrainerClient` and the producer's (asyncio) :class:`ProducerLink`.

Every socket gets a finite send/receive high-water mark (never 0 = unbounded), an explicit LINGER,
and ``MAXMSGSIZE`` as a hard backstop (the codec enforces the configured limit with a precise
error first; ZeroMQ drops a peer that exceeds the backstop).  Brokers bind ROUTER sockets on
loopback by default; producers and trainers connect DEALER sockets.  Every blocking wait has a
timeout, and its log line says what it waits for.

    client = TrainerClient("tcp://127.0.0.1:5556", peer_id="trainer", limits=Limits())
    welcome = client.hello(policy_version=0, timeout_s=60)
    batch = client.request_batch(step=1, policy_version=0, num_groups=8, dp_size=1)

Both sessions survive a broker restart the same way: on ``not_registered`` (a restarted broker does
not know us) or after ``peer_timeout_s`` of silence they say hello again (at most once per
heartbeat interval) and resend what is unanswered.  :class:`ProducerLink` owns everything the
producer says to the broker (hello, credit requests, groups, heartbeats) and what it hears back
(welcome, credits, acks, errors, versions, requeues, shutdown): the credits held, the bounded
outbox of sent groups waiting for an ack and their resends.  What the producer does with the news
(cut groups, regenerate requeued prompts, stop) is its :class:`LinkListener`'s business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry, Counter, Gauge

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

if TYPE_CHECKING:
    from pipeline.runconfig import QueueConfig

log = logging.getLogger(__name__)

LINGER_MS = 1000


def configure_socket(sock: zmq.Socket, hwm: int, max_message_bytes: int) -> None:
    if hwm <= 0:
        raise ValueError("high-water mark must be > 0 (0 means unbounded)")
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    # Backstop only: twice the configured limit so the codec can still answer with a clear error.
    sock.setsockopt(zmq.MAXMSGSIZE, min(2 * max_message_bytes, 2**31 - 1))


class CurveKeys:
    """CURVE (encryption + client authentication) keys from the ``queue.curve_*`` config keys.

    The broker is a CURVE server: it needs its secret certificate, and a ZAP authenticator admits
    only clients whose public certificate is in the authorized directory. Producers and the trainer
    are CURVE clients: their own secret certificate plus the server's public key. A peer without
    the right keys never completes the handshake, so it gets no reply at all."""

    def __init__(self, server_key: str, client_key: str = "", authorized_dir: str = "") -> None:
        import zmq.auth

        self.server_public, self.server_secret = zmq.auth.load_certificate(server_key)
        self.client_public, self.client_secret = zmq.auth.load_certificate(client_key) if client_key else (None, None)
        self.authorized_dir = authorized_dir or str(os.path.join(os.path.dirname(server_key), "authorized_clients"))
        self._auth: Any = None

    @classmethod
    def from_config(cls, cfg: QueueConfig) -> CurveKeys | None:
        """From the ``[queue]`` section; None when CURVE is off."""
        if not cfg.curve_server_key:
            return None
        return cls(cfg.curve_server_key, cfg.curve_client_key, cfg.curve_authorized_dir)

    def server(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server; starts the ZAP authenticator once."""
        if self.server_secret is None:
            raise ValueError("queue.curve_server_key must be the server's secret certificate (server.key_secret) on the broker")
        if self._auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            # The authenticator's thread needs a plain (non-asyncio) handle on the same context.
            self._auth = ThreadAuthenticator(zmq.Context.shadow(sock.context.underlying))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self.authorized_dir)
            log.info("CURVE on: clients must hold a certificate from %s", self.authorized_dir)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of the broker."""
        if self.client_secret is None:
            raise ValueError("queue.curve_client_key must be a client secret certificate (client.key_secret)")
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def make_keys(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``slipstream keys DIR``: a server and a client keypair, the client authorized."""
    import shutil

    import zmq.auth

    os.makedirs(directory, exist_ok=True)
    out = {}
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
        out[f"{name}_public"], out[f"{name}_secret"] = public, secret
    authorized = os.path.join(directory, "authorized_clients")
    os.makedirs(authorized, exist_ok=True)
    shutil.copy(out["client_public"], os.path.join(authorized, "client.key"))
    out["authorized_dir"] = authorized
    return out


def bind(sock: zmq.Socket, host: str, port: int) -> int:
    """Bind to ``tcp://host:port``; port 0 picks a free port. Returns the bound port."""
    if port == 0:
        return sock.bind_to_random_port(f"tcp://{host}")
    sock.bind(f"tcp://{host}:{port}")
    return port


class BrokerError(RuntimeError):
    """The broker answered with an Error message."""

    def __init__(self, err: Error) -> None:
        super().__init__(f"broker error [{err.code}]: {err.message}")
        self.code = err.code


class ShutdownRequested(RuntimeError):
    pass


class TrainerClient:
    """The trainer's side of the broker protocol (used by the publisher rank only).

    It survives a broker restart: when the broker answers ``not_registered`` (a restarted broker
    does not know us) or is silent for ``peer_timeout_s``, the client says hello again (with the
    last version it *published*, never one still being published) and resends the request it is
    waiting on. Resends are safe: the broker answers a repeated batch request with the same lease
    and a repeated commit idempotently (see ``Broker._on_commit``)."""

    def __init__(
        self, endpoint: str, peer_id: str, limits: Limits, hwm: int = 100, heartbeat_interval_s: float = 1.0,
        peer_timeout_s: float = 10.0, curve: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.peer_id = peer_id
        self.limits = limits
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        self._ctx = zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm, limits.max_message_bytes)
        if curve is not None:
            curve.client(self.sock)
        self.sock.connect(endpoint)
        self._last_heartbeat = 0.0
        self._last_broker_msg = time.monotonic()
        self._last_rehello = 0.0
        self._published_policy_version = 0
        self._checkpoint_every = 0
        self._checkpointed: Checkpointed | None = None
        self.reconnects = 0

    def close(self) -> None:
        self.sock.close(linger=LINGER_MS)

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_interval_s:
            self.send(Heartbeat(peer_id=self.peer_id, sent_at=time.time()))
            self._last_heartbeat = now

    def _rehello(self, why: str, resend: Callable[[], None] | None, what: str) -> None:
        now = time.monotonic()
        if now - self._last_rehello < self.heartbeat_interval_s:
            return  # several not_registered replies to one outage: one hello is enough
        self._last_rehello = now
        self.reconnects += 1
        log.warning("%s: saying hello again at policy version %d, then resending the request for %s", why, self._published_policy_version, what)
        # resume_step -1: this process keeps its training, nothing to release or replay.
        self.send(Hello(role="trainer", peer_id=self.peer_id, epoch=int(time.time()), pid=os.getpid(), policy_version=self._published_policy_version,
                        resume_step=-1, checkpoint_every=self._checkpoint_every))
        if self._checkpointed is not None:  # the notice may have been lost with the old broker
            self.send(self._checkpointed)
        if resend is not None:
            resend()
        self._last_broker_msg = now

    def _wait_for(self, want: type, what: str, timeout_s: float, log_every_s: float = 10.0, resend: Callable[[], None] | None = None,
                  on_idle: Callable[[], Any] | None = None, match: Callable[[Any], bool] | None = None) -> Any:
        """Receive until a message of type ``want`` arrives; heartbeats keep flowing meanwhile.
        ``resend`` re-sends the request after a broker restart (None: fail instead).  ``on_idle`` is
        called (on this thread) about every 20 ms while nothing arrives, e.g. to send ``Published``
        when a background weight publish finishes."""
        poll_s = min(self.heartbeat_interval_s, 0.02) if on_idle is not None else self.heartbeat_interval_s
        deadline = time.monotonic() + timeout_s
        next_log = time.monotonic() + log_every_s
        while True:
            self._heartbeat()
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"trainer waited {timeout_s:.0f}s for {what} from the broker at {self.endpoint}. "
                    "Is the broker running and are producers generating? (see the broker and producer logs; "
                    "raise trainer.batch_timeout_s for slow generation)"
                )
            if now >= next_log:
                log.info("still waiting for %s from the broker at %s (%.0fs left)", what, self.endpoint, deadline - now)
                next_log = now + log_every_s
            if resend is not None and now - self._last_broker_msg > self.peer_timeout_s:
                self._rehello(f"no message from the broker for {now - self._last_broker_msg:.0f}s", resend, what)
            if on_idle is not None:
                on_idle()
            if not self.sock.poll(timeout=int(min(poll_s, deadline - now) * 1000) + 1):
                continue
            msg = decode(self.sock.recv_multipart(copy=False), self.limits)
            self._last_broker_msg = time.monotonic()
            if isinstance(msg, want) and (match is None or match(msg)):
                return msg
            if isinstance(msg, want):  # a late duplicate answer to a resent request (broker restart)
                log.info("ignoring a duplicate %s while waiting for %s", type(msg).__name__, what)
                continue
            if isinstance(msg, Error) and msg.code == "not_registered" and resend is not None:
                self._rehello("the broker does not know us (restarted?)", resend, what)
                continue
            if isinstance(msg, Error):
                raise BrokerError(msg)
            if isinstance(msg, Shutdown):
                raise ShutdownRequested(msg.reason)
            if not isinstance(msg, Heartbeat):
                log.debug("ignoring %s while waiting for %s", type(msg).__name__, what)

    def hello(self, policy_version: int, timeout_s: float, resume_step: int = 0, checkpoint_every: int = 0) -> Welcome:
        """Register. ``resume_step``: the step of the checkpoint this process starts from (0: a fresh
        start); the broker replays the batches it retained for later steps. ``checkpoint_every``
        (``trainer.checkpoint_every``) > 0 makes the broker retain committed batches until
        :meth:`checkpointed` covers them."""
        self._published_policy_version = policy_version
        self._checkpoint_every = checkpoint_every
        self.send(Hello(role="trainer", peer_id=self.peer_id, epoch=int(time.time()), pid=os.getpid(), policy_version=policy_version,
                        resume_step=resume_step, checkpoint_every=checkpoint_every))
        return self._wait_for(Welcome, "the welcome reply to hello", timeout_s)

    def _request(self, msg: Any, want: type, what: str, timeout_s: float, on_idle: Callable[[], Any] | None = None,
                 match: Callable[[Any], bool] | None = None) -> Any:
        self.send(msg)
        return self._wait_for(want, what, timeout_s, resend=lambda: self.send(msg), on_idle=on_idle, match=match)

    def request_batch(self, step: int, policy_version: int, num_groups: int, dp_size: int, timeout_s: float,
                      on_idle: Callable[[], Any] | None = None) -> Batch:
        req = BatchRequest(step=step, policy_version=policy_version, num_groups=num_groups, dp_size=dp_size)
        return self._request(req, Batch, f"the batch of step {step} ({num_groups} groups, policy v{policy_version})", timeout_s, on_idle,
                             match=lambda b: b.step == step)

    def commit(self, lease_id: str, step: int, policy_version: int, timeout_s: float) -> CommitAck:
        return self._request(Commit(lease_id=lease_id, step=step, policy_version=policy_version), CommitAck, f"the commit ack of {lease_id}", timeout_s,
                             match=lambda a: a.lease_id == lease_id)

    def published(self, policy_version: int) -> None:
        self._published_policy_version = policy_version
        self.send(Published(policy_version=policy_version))

    def checkpointed(self, step: int, policy_version: int) -> None:
        """A checkpoint of ``step`` is complete: the broker may release the batches of steps <= it
        (no reply; resent after a reconnect, and a later notice or resume covers a lost one)."""
        self._checkpointed = Checkpointed(step=step, policy_version=policy_version)
        self.send(self._checkpointed)


# ---------------------------------------------------------------------- the producer's session
class LinkMetrics:
    """The producer-session metrics, registered in the producer's registry (see ``producers.stats``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = self.registry = registry
        self.sent = Counter("slipstream_producer_groups_sent_total", "Group sends, first attempts only.", registry=r)
        self.acked = Counter("slipstream_producer_groups_acked_total", "Groups acknowledged by the broker.", registry=r)
        self.retransmitted = Counter("slipstream_producer_groups_retransmitted_total", "Group resends after an ack timeout or reconnect.", registry=r)
        self.rejected = Counter("slipstream_producer_groups_rejected_total", "Groups the broker rejected, by reason.", ["reason"], registry=r)
        self.outbox = Gauge("slipstream_producer_outbox_groups", "Sent groups waiting for an ack.", registry=r)
        self.credits = Gauge("slipstream_producer_credits_held", "Credits granted and not yet spent on a sent group.", registry=r)
        self.reconnects = Counter("slipstream_producer_broker_reconnects_total",
                                  "Hellos said again because the broker did not know this producer (restarted) or was silent past peer_timeout_s.",
                                  registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


@dataclass
class LinkStats:
    """What the link counted (the producer's stats file reports it; the metrics mirror it)."""

    groups_sent: int = 0
    trajectories_sent: int = 0
    groups_acked: int = 0
    trajectories_acked: int = 0
    groups_retransmitted: int = 0
    groups_rejected: dict[str, int] = field(default_factory=dict)
    credits_granted: int = 0
    reconnects: int = 0


@dataclass
class Outgoing:
    """A sent group waiting for its ack: resent, frames unchanged, until the broker answers."""

    group: TrajectoryGroup
    frames: list[bytes]
    sent_at: float
    attempts: int = 1


class LinkListener(Protocol):
    """What a :class:`ProducerLink` tells its producer. Called on the event loop, never blocking."""

    def credits_in_use(self) -> int:
        """Groups generating now: they keep their credits when the broker forgets ours (re-registration)."""

    def on_welcome(self, welcome: Welcome) -> None:
        """(Re-)registered: ``link.policy_version`` and ``link.max_staleness`` are the broker's now."""

    def on_version(self, version: int) -> None:
        """A newer policy version was published (``link.policy_version`` holds it)."""

    def on_requeue(self, msg: Requeue) -> None:
        """The broker hands back a prompt whose group was too stale: regenerate it."""

    def on_acked(self, group: TrajectoryGroup, duplicate: bool) -> None:
        """The broker acknowledged ``group`` (``duplicate``: a resend of one it already held)."""

    def on_rejected(self, group: TrajectoryGroup, code: str, message: str) -> None:
        """The broker refused ``group`` for good (it is out of the outbox)."""

    def on_shutdown(self, reason: str) -> None:
        """The broker asks producers to stop."""

    def wake(self) -> None:
        """Something arrived (credits above all): the scheduler may act."""


class ProducerLink:
    """The producer's side of the broker protocol (asyncio; the twin of :class:`TrainerClient`).

    It owns the DEALER socket, the registration (hello / welcome, again after a broker restart),
    the credits the broker granted and the producer has not spent, the credit requests, and the
    bounded outbox: a group spends a credit when it is sent and stays in the outbox, resent with
    the same ``(producer_id, epoch, seq)`` after ``ack_timeout_s`` or a re-registration, until the
    broker acks it (exactly-once enqueue is the broker's dedup) or refuses it.  Run :meth:`serve`
    as a task, then :meth:`connect`; attach a :class:`LinkListener` first."""

    def __init__(
        self, endpoint: str, producer_id: str, epoch: int, limits: Limits, *, hwm: int = 1000, heartbeat_interval_s: float = 1.0,
        peer_timeout_s: float = 10.0, ack_timeout_s: float = 10.0, curve: CurveKeys | None = None, metrics: LinkMetrics | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.producer_id = producer_id
        self.epoch = epoch
        self.limits = limits
        self.heartbeat_interval_s = heartbeat_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.metrics = metrics if metrics is not None else LinkMetrics(CollectorRegistry())
        self.stats = LinkStats()
        self.listener: LinkListener | None = None
        self.policy_version = 0  # the newest published policy version the broker told us
        self.max_staleness: int | None = None  # η, from the Welcome
        self.credits = 0  # granted, not yet spent on a sent group
        self.requested = -1  # the outstanding credit request (-1: none since the last welcome)
        self.outbox: dict[int, Outgoing] = {}
        self.welcomed = asyncio.Event()
        self._last_hello = float("-inf")
        self._last_broker_msg = time.monotonic()
        self._ctx = zmq.asyncio.Context()
        self.sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm, limits.max_message_bytes)
        if curve is not None:
            curve.client(self.sock)  # CURVE encryption + authentication (queue.curve_*)
        self.sock.connect(endpoint)

    def attach(self, listener: LinkListener) -> None:
        self.listener = listener

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()

    # ------------------------------------------------------------------ sending
    async def send(self, msg: Any) -> None:
        await self.sock.send_multipart(encode(msg), copy=False)

    async def hello(self) -> None:
        self._last_hello = time.monotonic()
        self.welcomed.clear()
        await self.send(Hello(role="producer", peer_id=self.producer_id, epoch=self.epoch, pid=os.getpid()))

    async def connect(self, timeout_s: float) -> None:
        """Say hello and wait for the welcome (:meth:`serve` must be running)."""
        await self.hello()
        try:
            await asyncio.wait_for(self.welcomed.wait(), timeout=timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"no welcome from the broker at {self.endpoint} after {timeout_s:.0f}s: "
                "is it running, and is the address right (queue.host / queue.producer_port)?"
            ) from None

    async def request_credits(self, want: int) -> None:
        """Ask for ``want`` more group starts (the broker replaces its record of our want)."""
        if want > 0 and want != self.requested:
            self.requested = want
            await self.send(CreditRequest(want=want))

    async def send_group(self, group: TrajectoryGroup) -> None:
        """Spend a credit on ``group``: it goes into the outbox and out, first attempt."""
        if self.credits <= 0:
            raise RuntimeError(f"send_group({group.group_id}) without a credit")
        self.credits -= 1
        self.metrics.credits.set(self.credits)
        frames = [bytes(f) for f in encode(group)]  # owned copy: the outbox may resend it
        self.outbox[group.seq] = Outgoing(group, frames, time.monotonic())
        self.stats.groups_sent += 1
        self.stats.trajectories_sent += len(group.trajectories)
        self.metrics.outbox.set(len(self.outbox))
        self.metrics.sent.inc()
        await self.sock.send_multipart(frames, copy=True)

    async def _resend(self, out: Outgoing) -> None:
        out.attempts += 1
        out.sent_at = time.monotonic()
        self.stats.groups_retransmitted += 1
        self.metrics.retransmitted.inc()
        await self.sock.send_multipart(out.frames, copy=True)

    async def _rehello(self, why: str) -> None:
        self.stats.reconnects += 1
        self.metrics.reconnects.inc()
        log.warning("%s: saying hello again to the broker at %s (%d unacked groups will be resent)", why, self.endpoint, len(self.outbox))
        await self.hello()

    # ------------------------------------------------------------------ receiving
    async def serve(self) -> None:
        """Receive and dispatch broker messages; heartbeats, resends and re-hellos (runs until cancelled)."""
        await asyncio.gather(self._recv_loop(), self._timers())

    async def _recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            self._last_broker_msg = time.monotonic()
            try:
                msg = decode(frames, self.limits)
            except WireError as e:
                log.error("undecodable message from the broker at %s: %s", self.endpoint, e)
                continue
            await self._on_message(msg)
            if self.listener is not None:
                self.listener.wake()

    async def _timers(self) -> None:
        await self.welcomed.wait()  # heartbeats and resends start with the first registration
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            await self.send(Heartbeat(peer_id=self.producer_id, sent_at=time.time()))
            now = time.monotonic()
            if now - self._last_broker_msg > self.peer_timeout_s:
                await self._rehello(f"no message from the broker for {now - self._last_broker_msg:.0f}s (queue.peer_timeout_s)")
                self._last_broker_msg = now
            for out in list(self.outbox.values()):
                if now - out.sent_at > self.ack_timeout_s:
                    log.info("group seq %d not acked after %.0fs: resending (attempt %d)", out.group.seq, now - out.sent_at, out.attempts + 1)
                    await self._resend(out)

    async def _on_message(self, msg: Any) -> None:
        listener = self.listener
        if isinstance(msg, Welcome):
            self.policy_version = msg.policy_version
            self.max_staleness = msg.max_staleness
            # The broker forgot the credits of an earlier registration; groups already generating keep theirs.
            self.credits = min(self.credits, listener.credits_in_use() if listener is not None else 0)
            self.metrics.credits.set(self.credits)
            self.requested = -1
            self.welcomed.set()
            log.info("registered with broker %s at policy version %d", self.endpoint, self.policy_version)
            if listener is not None:
                listener.on_welcome(msg)
            for out in list(self.outbox.values()):  # reconnect: resend everything unacked
                await self._resend(out)
        elif isinstance(msg, Credit):
            self.credits += msg.granted
            self.stats.credits_granted += msg.granted
            self.metrics.credits.set(self.credits)
            self.requested = max(0, self.requested - msg.granted)
        elif isinstance(msg, Ack):
            out = self.outbox.pop(msg.seq, None) if msg.epoch == self.epoch else None
            if out is not None:
                self.stats.groups_acked += 1
                self.stats.trajectories_acked += len(out.group.trajectories)
                self.metrics.acked.inc()
                self.metrics.outbox.set(len(self.outbox))
                if listener is not None:
                    listener.on_acked(out.group, msg.duplicate)
        elif isinstance(msg, Error):
            await self._on_error(msg)
        elif isinstance(msg, VersionAnnouncement):
            if msg.policy_version > self.policy_version:
                self.policy_version = msg.policy_version
                if listener is not None:
                    listener.on_version(self.policy_version)
        elif isinstance(msg, Requeue):
            if listener is not None:
                listener.on_requeue(msg)
        elif isinstance(msg, Shutdown):
            log.info("broker asked us to stop: %s", msg.reason)
            if listener is not None:
                listener.on_shutdown(msg.reason)

    async def _on_error(self, err: Error) -> None:
        if err.code == "not_registered":
            if not self.welcomed.is_set() and time.monotonic() - self._last_hello < self.peer_timeout_s:
                # Our hello is on its way: this refuses a message sent before it (the broker answers in
                # order, so every such refusal arrives before the welcome). One hello per outage.
                return
            await self._rehello("the broker does not know us (restarted?)")
            return
        out = self.outbox.get(err.seq) if err.epoch == self.epoch else None
        if out is None:
            log.error("broker error [%s]: %s", err.code, err.message)
            return
        if err.code == "queue_full":
            log.info("broker queue full; group seq %d will be resent", err.seq)
            out.sent_at = time.monotonic()
            return
        del self.outbox[err.seq]
        self.stats.groups_rejected[err.code] = self.stats.groups_rejected.get(err.code, 0) + 1
        self.metrics.rejected.labels(err.code).inc()
        self.metrics.outbox.set(len(self.outbox))
        log.error("broker rejected group seq %d (%s): [%s] %s", err.seq, out.group.group_id, err.code, err.message)
        if self.listener is not None:
            self.listener.on_rejected(out.group, err.code, err.message)
