"""In-process harness for producer tests: a real :class:`~producers.producer.Producer` (its scheduler,
credits, plug-ins, cuts) with the broker socket replaced by a fake broker that grants credits the
way the real one does (at most ``capacity`` granted and not yet used at once) and records what the
producer sends.  The engine is whatever client the test passes (a scripted fake or a real
:class:`~producers.sglang_client.EngineClient` to an embedded engine process).

No tests here; ``tests/test_oversample.py``, ``tests/test_plugin_timeouts.py`` and
``tests/test_partial_rollouts.py`` import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.tiny import build_tokenizer
from producers.config import ProducerConfig
from producers.producer import Producer
from schemas.codec import decode
from schemas.messages import Credit, CreditRequest, TrajectoryGroup, VersionAnnouncement, Welcome


class FakeBrokerSocket:
    """Stands in for the producer's DEALER socket: decodes what the producer sends."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    async def send_multipart(self, frames: list[Any], copy: bool = True) -> None:
        msg = decode([bytes(f) if not isinstance(f, bytes) else f for f in frames])
        await self.broker.on_message(msg)

    def close(self, linger: int = 0) -> None:
        pass


class FakeBroker:
    """Grants credits like the queue: granted-but-unused credits never exceed ``capacity``; records
    every group sent.  ``total`` bounds the credits granted over the whole run (None: no bound)."""

    def __init__(self, producer: Producer, capacity: int, total: int | None = None) -> None:
        self.p = producer
        self.capacity = capacity
        self.total = total
        self.granted = 0
        self.want = 0
        self.groups: list[TrajectoryGroup] = []
        self.credit_requests: list[int] = []

    @property
    def outstanding(self) -> int:
        return self.granted - len(self.groups)

    async def on_message(self, msg: Any) -> None:
        if isinstance(msg, CreditRequest):
            self.credit_requests.append(msg.want)
            self.want = msg.want
            await self.grant()
        elif isinstance(msg, TrajectoryGroup):
            self.groups.append(msg)
            await self.grant()

    async def grant(self) -> None:
        n = min(self.want, self.capacity - self.outstanding)
        if self.total is not None:
            n = min(n, self.total - self.granted)
        if n > 0:
            self.granted += n
            self.want -= n
            await self.p._on_message(Credit(granted=n, policy_version=self.p.version))


def make_producer(tmp_path: Path, **cfg: Any) -> Producer:
    tok = tmp_path / "tok"
    if not (tok / "tokenizer.json").exists():
        tok.mkdir(parents=True, exist_ok=True)
        build_tokenizer(tok)
    p = Producer(ProducerConfig(**cfg), "producer-0", "tcp://127.0.0.1:9", ["http://127.0.0.1:9"], str(tok), seed=0)
    p.sock.close(linger=0)
    return p


async def drive(p: Producer, broker: FakeBroker, client: Any, until: Callable[[], bool], timeout_s: float,
                max_staleness: int = 1, during: Callable[[], Any] | None = None) -> None:
    """Welcome the producer, run its scheduler until ``until()`` (or fail after ``timeout_s``), stop it."""
    p.sock = FakeBrokerSocket(broker)  # type: ignore[assignment]
    p._client = client
    await p._on_message(Welcome(policy_version=p.version, max_staleness=max_staleness, groups_per_step=4,
                                max_message_bytes=16 << 20, heartbeat_interval_s=0.2))
    sched = asyncio.create_task(p._scheduler(client))
    extra = asyncio.create_task(during()) if during is not None else None
    deadline = time.monotonic() + timeout_s
    try:
        while not until():
            if p.fatal is not None:
                raise p.fatal
            assert time.monotonic() < deadline, f"harness: condition not met within {timeout_s}s (stats {p.stats})"
            await asyncio.sleep(0.01)
    finally:
        p._stop.set()
        for t in (sched, extra, *list(p._tasks)):
            if t is not None:
                t.cancel()
        for t in (sched, extra, *list(p._tasks)):
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        p.ctx.term()


async def announce(p: Producer, version: int) -> None:
    await p._on_message(VersionAnnouncement(policy_version=version))


def metric(p: Producer, name: str, **labels: str) -> float:
    value = p.metrics.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)
