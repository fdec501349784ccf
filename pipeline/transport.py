"""ZeroMQ transport: socket setup with explicit limits, and the trainer's (synchronous) broker client.

Every socket gets a finite send/receive high-water mark (never 0 = unbounded), an explicit LINGER,
and ``MAXMSGSIZE`` as a hard backstop (the codec enforces the configured limit with a precise
error first; ZeroMQ drops a peer that exceeds the backstop).  Brokers bind ROUTER sockets on
loopback by default; producers and trainers connect DEALER sockets.  Every blocking wait has a
timeout, and its log line says what it waits for.

    client = TrainerClient("tcp://127.0.0.1:5556", peer_id="trainer", limits=Limits())
    welcome = client.hello(policy_version=0, timeout_s=60)
    batch = client.request_batch(step=1, policy_version=0, num_groups=8, dp_size=1)
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq

from schemas.codec import decode, encode
from schemas.messages import (
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Error,
    Heartbeat,
    Hello,
    Published,
    Shutdown,
    Welcome,
)
from schemas.validate import Limits

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
    """The trainer's side of the broker protocol (used by the publisher rank only)."""

    def __init__(self, endpoint: str, peer_id: str, limits: Limits, hwm: int = 100, heartbeat_interval_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self.peer_id = peer_id
        self.limits = limits
        self.heartbeat_interval_s = heartbeat_interval_s
        self._ctx = zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm, limits.max_message_bytes)
        self.sock.connect(endpoint)
        self._last_heartbeat = 0.0

    def close(self) -> None:
        self.sock.close(linger=LINGER_MS)

    def send(self, msg: Any) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat >= self.heartbeat_interval_s:
            self.send(Heartbeat(peer_id=self.peer_id, sent_at=time.time()))
            self._last_heartbeat = now

    def _wait_for(self, want: type, what: str, timeout_s: float, log_every_s: float = 10.0) -> Any:
        """Receive until a message of type ``want`` arrives; heartbeats keep flowing meanwhile."""
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
            if not self.sock.poll(timeout=int(min(self.heartbeat_interval_s, deadline - now) * 1000) + 1):
                continue
            msg = decode(self.sock.recv_multipart(copy=False), self.limits)
            if isinstance(msg, want):
                return msg
            if isinstance(msg, Error):
                raise BrokerError(msg)
            if isinstance(msg, Shutdown):
                raise ShutdownRequested(msg.reason)
            if not isinstance(msg, Heartbeat):
                log.debug("ignoring %s while waiting for %s", type(msg).__name__, what)

    def hello(self, policy_version: int, timeout_s: float) -> Welcome:
        self.send(Hello(role="trainer", peer_id=self.peer_id, epoch=int(time.time()), pid=os.getpid(), policy_version=policy_version))
        return self._wait_for(Welcome, "the welcome reply to hello", timeout_s)

    def request_batch(self, step: int, policy_version: int, num_groups: int, dp_size: int, timeout_s: float) -> Batch:
        self.send(BatchRequest(step=step, policy_version=policy_version, num_groups=num_groups, dp_size=dp_size))
        return self._wait_for(Batch, f"the batch of step {step} ({num_groups} groups, policy v{policy_version})", timeout_s)

    def commit(self, lease_id: str, step: int, policy_version: int, timeout_s: float) -> CommitAck:
        self.send(Commit(lease_id=lease_id, step=step, policy_version=policy_version))
        return self._wait_for(CommitAck, f"the commit ack of {lease_id}", timeout_s)

    def published(self, policy_version: int) -> None:
        self.send(Published(policy_version=policy_version))
