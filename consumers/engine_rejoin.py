"""Bring an engine the launcher restarted back into service while the trainer waits for data.

What: :class:`EngineRejoin`, run by the publishing trainer rank (global rank 0) from the loop's idle
callback (while it waits for the next batch, with no publish in flight).  About once a second it
asks every embedded engine ``GET /get_server_info`` (its ``weight_version`` and whether it is
``paused``).  When one lags the last published version or is paused, it re-creates the weight
group with every engine, sends the current weights again when one lags, and continues the paused
engines (``POST /continue_generation``).

Why: the launcher restarts a crashed embedded engine on the same port with ``--start-paused``
(``pipeline/launcher.py``): it loads ``model.path`` (version 0) and queues the requests the
producers retry, but decodes nothing until it holds the current policy.  The publisher's own
resync (``weights.resync_engines``) brings a lagging engine up to date only at the next publish,
and the next publish needs a batch: with one engine, or with η = 0, that batch can only come from
the engine being restarted, so the trainer would wait until ``run.batch_timeout_s``.  Nobody else
pauses an embedded engine (the publisher pauses only SGLang engines), so "paused" means "restarted
by the launcher and not yet given the current weights".

The current weights are the last published version's: the async snapshot
(``consumers.snapshot.WeightSnapshot.last``) or, with synchronous publishing and a single
trainer rank, a fresh export (the model has not changed since its publish).  Otherwise (several
ranks publishing synchronously) the engine rejoins at the next publish and is continued after it;
so with per-stage publishing (``regroup=False``), whose stage groups rank 0 cannot re-create alone.

    rejoin = EngineRejoin(publisher, current=lambda: snapshot.last(), start_version=version)
    rejoin.poll()     # from the loop's idle callback; cheap when every engine is up to date
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from consumers.engine_http import PublishError, post_json, spawn
from schemas.weight_update import ROUTE_CONTINUE, ROUTE_SERVER_INFO, continue_payload

log = logging.getLogger(__name__)


class RejoinPublisher(Protocol):
    """What EngineRejoin drives: a :class:`consumers.publisher.WeightPublisher`."""

    engine_urls: list[str]
    version: int | None
    resync: bool
    rejoins: int

    @property
    def connected(self) -> bool: ...

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> Any: ...


class EngineRejoin:
    """See the module docstring.  ``current()`` returns the last published version's tensors (or
    None when they cannot be had); ``start_version`` is the version the engines start at before any
    publish (0, or a resumed checkpoint's)."""

    def __init__(self, publisher: RejoinPublisher, current: Callable[[], Mapping[str, torch.Tensor] | None],
                 start_version: int, interval_s: float = 1.0, timeout_s: float = 2.0, regroup: bool = True) -> None:
        self.publisher = publisher
        self.current = current
        self.regroup = regroup  # False (per-stage publishing): only continue engines the last publish brought up to date
        self.start_version = start_version
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.rejoined = 0  # engines brought back
        self._next = 0.0
        self._warned = False

    def _continue(self, url: str) -> None:
        reply = post_json(f"{url}{ROUTE_CONTINUE}", continue_payload(), self.timeout_s * 5, "continuing generation")
        if not reply.get("success", reply.get("status") == "ok"):
            raise PublishError(f"{url}{ROUTE_CONTINUE}: {reply}")

    def states(self) -> dict[str, tuple[str | None, bool]]:
        """Each engine's (weight_version, paused); (None, False) when it does not answer."""
        futures = [spawn(post_json, f"{u}{ROUTE_SERVER_INFO}", None, self.timeout_s, "its server info")
                   for u in self.publisher.engine_urls]
        out: dict[str, tuple[str | None, bool]] = {}
        for url, fut in zip(self.publisher.engine_urls, futures, strict=True):
            try:
                info = fut.result(timeout=self.timeout_s + 2.0)
                out[url] = (str(info.get("weight_version")), bool(info.get("paused")))
            except Exception as e:  # down, or being restarted: ask again later
                log.debug("engine rejoin: %s%s did not answer: %s", url, ROUTE_SERVER_INFO, e)
                out[url] = (None, False)
        return out

    def continue_paused(self) -> list[str]:
        """Continue every engine that is paused but already holds the published version (a resumed
        run's engines, started paused, after the trainer sent them the checkpoint's weights); the
        rest are left to :meth:`poll`.  Returns their URLs."""
        version = self.publisher.version if self.publisher.version is not None else self.start_version
        ready = [u for u, (v, paused) in self.states().items() if paused and v == str(version)]
        for url in ready:
            self._continue(url)
        if ready:
            log.info("continued %s: paused at start, now serving v%d", ", ".join(ready), version)
        return ready

    def poll(self, now: float | None = None) -> bool:
        """Check (at most every ``interval_s``) and bring back restarted engines; True if it did.
        Call only while no publish is in flight.  Failures are logged and retried at the next check."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval_s
        states = self.states()
        if any(v is None for v, _ in states.values()):
            return False  # an engine is down (the launcher is restarting it): wait until every one answers
        version = self.publisher.version if self.publisher.version is not None else self.start_version
        lagging = [u for u, (v, _) in states.items() if v != str(version)]
        paused = [u for u, (_, p) in states.items() if p]
        if not lagging and not paused and self.publisher.connected:
            return False
        try:
            return self._bring_back(version, lagging, paused)
        except (PublishError, TimeoutError, OSError) as e:
            log.warning("engine rejoin: could not bring %s back to v%d yet (%s); trying again in %.0fs",
                        ", ".join(lagging or paused) or "the weight group", version, e, self.interval_s)
            return False

    def _bring_back(self, version: int, lagging: list[str], paused: list[str]) -> bool:
        pub = self.publisher
        if not self.regroup:  # the stage groups are re-created by the next publish (consumers.stage_publish)
            current = [u for u in paused if u not in lagging and pub.version is not None]
            for url in current:
                self._continue(url)
            if current:
                self.rejoined += len(current)
                log.warning("engine rejoin: %s got v%d with the last publish: continued", ", ".join(current), version)
            return bool(current)
        weights = self.current() if lagging else None
        if lagging and weights is None:
            if not self._warned:
                log.warning("engine rejoin: %s lag(s) v%d, and the trainer keeps no copy of v%d to send again "
                            "(synchronous publishing from several ranks, or per-stage publishing): they get the "
                            "next version with the next publish", ", ".join(lagging), version, version)
                self._warned = True
            return False
        t0 = time.monotonic()
        log.warning("engine rejoin: %s; re-creating the weight group%s",
                    "; ".join([*(f"{u} lags v{version}" for u in lagging), *(f"{u} is paused (restarted)" for u in paused if u not in lagging)]),
                    f" and sending v{version} again" if lagging else "")
        if not (lagging and pub.resync and pub.version is not None and pub.connected):
            pub.close()
            pub.connect()
        if lagging:
            assert weights is not None
            pub.publish(weights, version, checksum=False)  # with resync on, it re-creates the group itself
        for url in paused:
            self._continue(url)
        self.rejoined += len(set(lagging) | set(paused))
        log.warning("engine rejoin: %s serve%s v%d again (%.2fs)", ", ".join(sorted(set(lagging) | set(paused))) or "every engine",
                    "s" if len(set(lagging) | set(paused)) == 1 else "", version, time.monotonic() - t0)
        return True
