"""Which engines a producer sends requests to now: round-robin over those that are up.

An engine that refuses a connection or drops one mid-request (crashed, being restarted by the
launcher on the same URL) is taken out of rotation at once: no new request goes to it, and the
requests it had in flight are resubmitted by :class:`~producers.sglang_client.EngineClient` to
another engine, or to the same one when it is back.  While any engine is down a probe task asks its
``/health`` every ``probe_interval_s``; a 200 puts it back.  A request that finds no engine up waits
for one, up to ``producer.engine_down_timeout_s``, then fails as an ordinary engine error (its group
is dropped and the prompt retried).  Every change is logged with the engine's URL and reported to
``events`` (the producer counts them: ``slipstream_producer_engine_downs_total``,
``slipstream_producer_engines_down``, ``slipstream_producer_engine_requests_retried_total``, and
per URL in its stats file).

A stalled engine (a request that times out) stays in rotation: a timeout is not proof of a crash,
and resubmitting would double its load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)


class EngineEvents(Protocol):
    """Who hears about rotation changes (``producers.stats.ProducerAccount`` implements it)."""

    def engine_down(self, url: str, down_now: int) -> None: ...

    def engine_up(self, url: str, down_now: int) -> None: ...

    def engine_retried(self, url: str) -> None: ...


class NoEngineUp(RuntimeError):
    """No engine came back within the wait; the message names the ones down."""


class Rotation:
    """The engines in rotation (see the module docstring)."""

    def __init__(self, urls: list[str], healthy: Callable[[str], Awaitable[bool]], probe_interval_s: float = 0.5,
                 events: EngineEvents | None = None) -> None:
        self.urls = list(urls)
        self.healthy = healthy  # does this engine answer its health check now?
        self.probe_interval_s = probe_interval_s
        self.events = events
        self.down: dict[str, float] = {}  # url -> when it went down (monotonic)
        self._next = itertools.count()
        self._changed = asyncio.Event()
        self._probe: asyncio.Task[None] | None = None

    def pick(self) -> str | None:
        """The next engine in rotation (round-robin), or None when all are down."""
        up = [u for u in self.urls if u not in self.down]
        return up[next(self._next) % len(up)] if up else None

    async def acquire(self, timeout_s: float, what: str) -> str:
        """An engine in rotation; waits up to ``timeout_s`` for one to come back."""
        deadline = time.monotonic() + timeout_s
        while (url := self.pick()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoEngineUp(f"no engine answered /health for {timeout_s:.0f}s ({', '.join(sorted(self.down))} down) while "
                                 f"{what} waited; raise producer.engine_down_timeout_s if engines take longer to restart")
            self._changed.clear()
            log.info("%s waits for an engine: all %d are down (%s; %.0fs left)", what, len(self.urls), ", ".join(sorted(self.down)), left)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 10.0))
        return url

    def mark_down(self, url: str, why: str) -> None:
        if url in self.down or url not in self.urls:
            return
        self.down[url] = time.monotonic()
        log.warning("engine %s is down (%s): out of rotation; its requests are resubmitted to another engine, or to it once "
                    "/health answers again (%d of %d engines down)", url, why, len(self.down), len(self.urls))
        if self.events is not None:
            self.events.engine_down(url, len(self.down))
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_loop())

    def retried(self, url: str) -> None:
        if self.events is not None:
            self.events.engine_retried(url)

    def _mark_up(self, url: str) -> None:
        since = self.down.pop(url, None)
        if since is None:
            return
        log.warning("engine %s answers /health again after %.1fs: back in rotation", url, time.monotonic() - since)
        if self.events is not None:
            self.events.engine_up(url, len(self.down))
        self._changed.set()

    async def _probe_loop(self) -> None:
        while self.down:
            await asyncio.sleep(self.probe_interval_s)
            for url in list(self.down):
                if await self.healthy(url):
                    self._mark_up(url)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
