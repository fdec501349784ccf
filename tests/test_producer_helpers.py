"""In-process harness for producer tests: a real :class:`~producers.producer.Producer` talking over
real ZeroMQ sockets (its own :class:`~pipeline.transport.ProducerLink`) to a real
:class:`~pipeline.broker.Broker` served in the same event loop, whose trainer socket is driven by a
minimal trainer that consumes groups without training.  Credits are therefore granted by the real
admission control of :mod:`pipeline.queue` (nothing here re-implements it):

* the *total* number of group starts the broker grants while the policy version stays at ``v`` is
  ``(max_staleness + v + 1) x groups_per_step`` (consumed groups stay counted);
* the credits out at once are bounded by ``max_queued_trajectories`` (queued groups and granted
  starts must fit), so a trainer that drains the queue keeps that many credits flowing.

The engine is whatever client the test passes (a scripted stand-in for SGLang, or a real
:class:`~producers.sglang_client.EngineClient` to an embedded engine process).

No tests here; ``tests/test_oversample.py``, ``tests/test_plugin_timeouts.py``,
``tests/test_partial_rollouts.py`` and ``tests/test_producer_link.py`` import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from pipeline.broker import Broker
from pipeline.config import QueueConfig
from pipeline.tiny import build_tokenizer
from pipeline.transport import configure_socket
from producers.config import ProducerConfig
from producers.producer import Producer
from schemas.codec import decode, encode
from schemas.messages import (
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Error,
    Hello,
    Published,
    TrajectoryGroup,
    Welcome,
)

#: every wait of the harness trainer is bounded by this (its error says what it waited for)
WAIT_S = 60.0


class BrokerHarness:
    """A real broker in this event loop plus a trainer that consumes without training.

    The trainer asks for batches at the published version and commits each with a new version
    number (so admission counts every consumed group once), but publishes only on :meth:`publish`.
    ``drain=True`` consumes every group as soon as it is queued (one group per batch)."""

    def __init__(self, group_size: int, *, max_staleness: int = 1, groups_per_step: int = 4, max_queued_trajectories: int = 4096,
                 version: int = 0, drain: bool = True, heartbeat_interval_s: float = 1.0, peer_timeout_s: float = 10.0,
                 producer_port: int = 0) -> None:
        self.cfg = QueueConfig(max_staleness=max_staleness, groups_per_step=groups_per_step, max_queued_trajectories=max_queued_trajectories,
                               heartbeat_interval_s=heartbeat_interval_s, peer_timeout_s=peer_timeout_s, producer_port=producer_port)
        self.group_size = group_size
        self.version = version  # published
        self.drain = drain
        self.broker = Broker(self.cfg, group_size)  # binds its ports now, so a producer can be made before the loop runs
        self.endpoint = f"tcp://127.0.0.1:{self.broker.producer_port}"
        self.groups: list[TrajectoryGroup] = []  # consumed, in order
        self._committed = version
        self._step = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._serve: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._pending: BatchRequest | None = None

    async def __aenter__(self) -> BrokerHarness:
        self._serve = asyncio.create_task(self.broker.serve())
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self._sock, 100, self.cfg.max_message_bytes)
        self._sock.connect(f"tcp://127.0.0.1:{self.broker.trainer_port}")
        self._lock = asyncio.Lock()
        await self._send(Hello(role="trainer", peer_id="harness-trainer", epoch=int(time.time()), pid=os.getpid(), policy_version=self.version,
                               resume_step=0, checkpoint_every=0))
        await self._recv(Welcome, "the broker's welcome")
        if self.drain:
            self._drain = asyncio.create_task(self._drain_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
        self.broker.stop()
        if self._serve is not None:
            await self._serve
        assert self._sock is not None and self._ctx is not None
        self._sock.close(linger=0)
        self._ctx.term()
        self.broker.close()

    # ------------------------------------------------------------------ the trainer's side
    async def _send(self, msg: Any) -> None:
        assert self._sock is not None
        await self._sock.send_multipart(encode(msg), copy=False)

    async def _recv(self, want: type, what: str) -> Any:
        assert self._sock is not None
        while True:
            if not await self._sock.poll(timeout=int(WAIT_S * 1000)):
                raise TimeoutError(f"harness trainer: no {what} from the broker within {WAIT_S:.0f}s")
            msg = decode(await self._sock.recv_multipart(copy=False))
            if isinstance(msg, Error):
                raise RuntimeError(f"harness trainer: broker error while waiting for {what}: [{msg.code}] {msg.message}")
            if isinstance(msg, want):
                return msg

    async def consume(self, num_groups: int) -> list[TrajectoryGroup]:
        """Lease ``num_groups`` queued groups at the published version and commit them."""
        assert self._lock is not None
        async with self._lock:
            self._step += 1
            self._committed += 1
            self._pending = BatchRequest(step=self._step, policy_version=self.version, num_groups=num_groups)
            await self._send(self._pending)
            batch: Batch = await self._recv(Batch, f"the batch of step {self._step} ({num_groups} groups)")
            self._pending = None
            await self._send(Commit(lease_id=batch.lease_id, step=self._step, policy_version=self._committed))
            await self._recv(CommitAck, f"the commit ack of {batch.lease_id}")
            self.groups.extend(batch.groups)
            return batch.groups

    async def _drain_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # nothing queued for WAIT_S: ask again
                await self.consume(1)

    async def publish(self, version: int) -> None:
        """Publish ``version``: the broker announces it to the producers (and opens credits for it)."""
        self.version = version
        self._committed = max(self._committed, version)
        await self._send(Published(policy_version=version))
        if self._pending is not None:  # a trainer at the new version asks again at it (the broker replaces its pending request)
            self._pending = dataclasses.replace(self._pending, policy_version=version)
            await self._send(self._pending)

    # ------------------------------------------------------------------ what the broker counted
    def metric(self, name: str, **labels: str) -> float:
        return float(self.broker.metrics.registry.get_sample_value(name, labels or None) or 0.0)

    @property
    def accepted_groups(self) -> int:
        return int(self.metric("slipstream_broker_trajectories_accepted_total")) // self.group_size

    @property
    def queued_groups(self) -> int:
        return int(self.metric("slipstream_queue_depth_groups"))


def make_producer(tmp_path: Path, harness: BrokerHarness, **cfg: Any) -> Producer:
    tok = tmp_path / "tok"
    if not (tok / "tokenizer.json").exists():
        tok.mkdir(parents=True, exist_ok=True)
        build_tokenizer(tok)
    return Producer(ProducerConfig(**cfg), "producer-0", harness.endpoint, ["http://127.0.0.1:9"], str(tok), seed=0,
                    stats_path=tmp_path / "stats" / "producer-0.json")


async def drive(p: Producer, harness: BrokerHarness, client: Any, until: Callable[[], bool], timeout_s: float,
                during: Callable[[], Awaitable[Any]] | None = None) -> None:
    """Run the harness and the producer until ``until()`` (or fail after ``timeout_s``), then stop the producer."""
    async with harness:
        stop = asyncio.Event()
        run = asyncio.create_task(p.run(stop, startup_timeout_s=timeout_s, client=client))
        extra = asyncio.create_task(during()) if during is not None else None
        deadline = time.monotonic() + timeout_s
        try:
            while not until():
                if run.done():
                    await run  # raises the producer's error (a fatal plug-in error, ...)
                    raise AssertionError("harness: the producer stopped before the condition was met")
                if extra is not None and extra.done():
                    extra.result()  # raises what went wrong in ``during``
                assert time.monotonic() < deadline, f"harness: condition not met within {timeout_s}s (stats {p.stats})"
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            if extra is not None:
                extra.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await extra
            with contextlib.suppress(asyncio.CancelledError):
                await run


async def announce(p: Producer, harness: BrokerHarness, version: int) -> None:
    """Publish ``version`` through the broker and wait until the producer has heard it."""
    await harness.publish(version)
    deadline = time.monotonic() + WAIT_S
    while p.policy_version < version:
        assert time.monotonic() < deadline, f"the producer did not hear of v{version} within {WAIT_S:.0f}s"
        await asyncio.sleep(0.005)


def quiescent(p: Producer) -> bool:
    """Nothing generating and nothing the producer could start (no credits held, or nothing to start)."""
    return p.running == 0 and p.credits == 0


def metric(p: Producer, name: str, **labels: str) -> float:
    value = p.metrics.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)
