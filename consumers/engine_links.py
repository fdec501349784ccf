"""The publisher's view of each engine: its transport, the version it holds, whether it is in sync.

What: :class:`EngineLink` is one engine (or, with per-stage publishing, the set of engines that
share one weight group): its own :class:`~consumers.engine_http.EngineCalls`, its
:class:`~consumers.transports.WeightTransport`, the last version it acknowledged and, when an
update to it failed or missed its deadline, since when it is *stale* and why.
:func:`update_all` runs one update on every link at once, each bounded by its own deadline;
:func:`rejoin` brings a stale engine back (it waits for the engine to answer again, then
re-creates its transport) from a background thread.

Why per engine: one weight group for every engine lets a single engine that stalls or dies hold
every other engine and the trainer until the group's timeout (AReaL #1439, #1160).  With a group
per engine, an engine that fails or is late is taken out for that version and marked stale (its
tokens carry the version it really holds: engines stamp tokens with their own version, and
producers take the lower of that and their own), while the trainer and the other engines carry
on; it rejoins in the background and gets the current weights with the next publish.

    links = [EngineLink(url, calls, transport) for ...]
    ok, failed = update_all(links, lambda link, timings: ..., deadline_s=60)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from consumers.engine_http import EngineCalls, PublishError, spawn
from consumers.transports import Sent, WeightTransport
from schemas.weight_update import ROUTE_MODEL_INFO

log = logging.getLogger(__name__)

FAILURE_REASONS = ("error", "timeout", "unreachable")


class WeightSyncMetrics:
    """Weight-sync failures and resyncs of one publisher (registered on the trainer's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.failures = Counter("slipstream_trainer_weight_sync_failures_total",
                                "Engines taken out of a version's update, by reason (error, timeout, unreachable).",
                                ["reason"], registry=r)
        self.rejoins = Counter("slipstream_trainer_weight_sync_rejoins_total",
                               "Stale engines brought back into weight sync.", registry=r)
        self.stale = Gauge("slipstream_trainer_stale_engines", "Engines out of weight sync right now.", registry=r)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)


@dataclass(eq=False)
class EngineLink:
    """One engine (or one shared group of engines) as the publisher sees it."""

    calls: EngineCalls
    transport: WeightTransport
    reason: str = ""  # why this transport (the log line and ports/trainer.json say it)
    version: int | None = None  # the last version it acknowledged
    stale_since: float | None = None  # time.monotonic() it was taken out of the updates (until it rejoins)
    out_since: float | None = None  # time.monotonic() of its first failure since its last good update
    stale_version: int | None = None  # the version it missed first
    last_error: str = ""
    rejoin: Future | None = None  # the background rejoin in flight
    timings: dict[str, float] = field(default_factory=dict)
    step: str = ""  # what it is doing right now (named when it misses its deadline)

    @property
    def urls(self) -> list[str]:
        return self.calls.urls

    @property
    def name(self) -> str:
        return ", ".join(self.urls)

    @property
    def stale(self) -> bool:
        return self.stale_since is not None

    def mark_stale(self, version: int, error: str) -> None:
        now = time.monotonic()
        if self.out_since is None:
            self.out_since, self.stale_version = now, version
        self.stale_since = now
        self.last_error = error

    def synced(self, version: int) -> None:
        """It took ``version``."""
        self.version, self.stale_since, self.out_since, self.stale_version = version, None, None, None

    def out_for(self) -> float:
        """Seconds since its first failure not followed by a good update (0: in sync)."""
        return 0.0 if self.out_since is None else time.monotonic() - self.out_since


Update = Callable[[EngineLink, dict[str, float]], Sent]


def update_all(links: list[EngineLink], update: Update, deadline_s: float) -> tuple[dict[EngineLink, Sent], dict[EngineLink, tuple[str, str]], list[Future]]:
    """Run ``update(link, link.timings)`` for every link at once (daemon threads), each within
    ``deadline_s``.  Returns (sent per link that made it, (reason, message) per link that failed,
    the futures of updates still running past their deadline)."""
    started = time.monotonic()
    futures = {}
    for link in links:
        link.timings, link.step = {}, "starting the update"
        futures[link] = spawn(update, link, link.timings)
    ok: dict[EngineLink, Sent] = {}
    failed: dict[EngineLink, tuple[str, str]] = {}
    late: list[Future] = []
    for link, fut in futures.items():
        try:
            ok[link] = fut.result(timeout=max(0.0, started + deadline_s - time.monotonic()))
        except TimeoutError:
            failed[link] = ("timeout", f"{link.name}: no answer within the update deadline of {deadline_s:.0f}s "
                                       f"(weights.update_timeout_s) while {link.step or 'updating'}")
            late.append(fut)
        except Exception as e:
            message = str(e) if isinstance(e, PublishError) else repr(e)
            if link.name not in message:
                message = f"{link.name}: {message}"
            failed[link] = ("unreachable" if _silent(link) else "error", message)
    return ok, failed, late


def _silent(link: EngineLink) -> bool:
    """After a failed update: the engine does not even answer ``/get_model_info`` (it died)."""
    return any(v is None for v in link.calls.engine_versions(timeout_s=2.0).values())


def rejoin(link: EngineLink, rejoin_timeout_s: float, closing: threading.Event) -> None:
    """Bring a stale engine back: wait until it answers ``/get_model_info`` again, then re-create
    its transport (a fresh weight group, or a fresh IPC link).  Retries until ``rejoin_timeout_s``
    after it fell out; raises PublishError naming the engine if it never came back."""
    assert link.out_since is not None
    deadline = link.out_since + rejoin_timeout_s
    answered = False
    while not closing.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            what = f"answer {ROUTE_MODEL_INFO}" if not answered else "rejoin its weight group"
            raise PublishError(f"engine(s) {link.name} did not {what} within {rejoin_timeout_s:.0f}s of falling out of sync "
                               f"at version {link.stale_version} (weights.rejoin_timeout_s); last error: {link.last_error}")
        versions = link.calls.engine_versions(timeout_s=min(5.0, max(left, 0.1)))
        if any(v is None for v in versions.values()):
            closing.wait(0.5)
            continue
        answered = True
        try:
            link.transport.close()
            link.transport.connect([])
        except PublishError as e:
            link.last_error = str(e)
            log.warning("weight sync: %s answers again but did not rejoin yet: %s", link.name, e)
            closing.wait(1.0)
            continue
        held = next(iter(versions.values()))
        link.version = int(held) if held is not None and held.isdigit() else None  # what it serves now (0 after a restart)
        log.info("weight sync: %s rejoined (%s; it holds v%s and gets the current weights with the next publish)",
                 link.name, link.transport.kind, held)
        return
