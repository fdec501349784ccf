"""Overlap weight publishing with the next trainer step (``weights.async_publish``, DESIGN §8).

What: the loop hands every version to a *publish driver* with one interface (``submit``, ``poll``,
``wait``): :class:`InlinePublisher` publishes on the caller's thread, :class:`AsyncPublisher` in the
background.  Both wrap one object that fulfils :class:`Publisher` (a
:class:`consumers.publisher.WeightPublisher`, or a :class:`consumers.stage_publish.StagePublisher`).

:class:`AsyncPublisher` wraps the publisher.  After an
optimizer step the loop calls :meth:`AsyncPublisher.submit`: it first waits until the previous
version's publish finished (versions reach the engines strictly in order, one at a time), then
snapshots the HF-named tensors into a persistent flat buffer (:class:`consumers.snapshot.WeightSnapshot`:
on the export's device, or in host memory where the transport needs it; allocated once, reused every
step) and publishes the snapshot from a
background thread while the trainer fetches and trains the next batch.

Per-stage publishing (:class:`consumers.stage_publish.StagePublisher`, every trainer rank): a
publisher with a ``prepare`` method gets ``prepare(named, version, checksum)`` called on the
caller's thread (it is a collective on the trainer world) after the previous version finished and
before the snapshot, then ``send(snapshot, prepared)`` runs in the background thread.

Completion is reported on the caller's thread only (:meth:`poll` / :meth:`wait` call ``on_done``),
so the loop sends ``Published(v)`` itself (``TrainerClient`` is not thread-safe), and only after
every engine has ``v``.  The loop calls :meth:`poll` while it waits for the next batch.

    ap = AsyncPublisher(publisher, on_done=lambda v, info, ctx: client.published(v))
    ap.submit(rank.export_hf_state(), version, ctx)   # returns at once (after the previous one)
    ...; ap.poll()                                    # from the loop thread, e.g. while waiting
    ap.wait(timeout_s=600)                            # at the end of the run
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol

import torch

from consumers.engine_http import spawn
from consumers.publisher import PublishResult
from consumers.snapshot import FlatState, WeightSnapshot

__all__ = ["AsyncPublisher", "FlatState", "InlinePublisher", "Publisher", "WeightSnapshot"]

log = logging.getLogger(__name__)

#: ``on_done(version, result, ctx)``: called on the loop thread once ``version`` is on every engine
#: (``result`` is None on ranks that only take part in a collective publish)
OnDone = Callable[[int, PublishResult | None, Any], None]


class Publisher(Protocol):
    """What the publish drivers wrap: a :class:`consumers.publisher.WeightPublisher`, or a
    :class:`consumers.stage_publish.StagePublisher` (which also has ``prepare``/``send``)."""

    engine_urls: list[str]

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> PublishResult | None: ...


class InlinePublisher:
    """Publishes each version on the caller's thread, then reports it (``on_done``); the same
    interface as :class:`AsyncPublisher`, so the loop has one publish path."""

    def __init__(self, publisher: Publisher, on_done: OnDone, checksum: bool = True) -> None:
        self.publisher = publisher
        self.on_done = on_done
        self.checksum = checksum

    @property
    def in_flight(self) -> int | None:
        return None

    def submit(self, named: Mapping[str, torch.Tensor], version: int, ctx: Any = None) -> None:
        self.on_done(version, self.publisher.publish(named, version, self.checksum), ctx)

    def poll(self) -> bool:
        return True

    def wait(self, timeout_s: float | None = None) -> None:
        return None


class AsyncPublisher:
    """One publish in flight at a time, from a background thread; see the module docstring."""

    def __init__(self, publisher: Publisher, on_done: OnDone, checksum: bool = True,
                 timeout_s: float = 600.0, snapshot: WeightSnapshot | None = None) -> None:
        self.publisher = publisher
        self.on_done = on_done
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.snapshot = snapshot or WeightSnapshot()
        self._pending: tuple[int, Future, Any] | None = None

    @property
    def in_flight(self) -> int | None:
        """The version being published, or None."""
        return None if self._pending is None else self._pending[0]

    def submit(self, named: Mapping[str, torch.Tensor], version: int, ctx: Any = None) -> None:
        """Wait for the previous publish (and report it), snapshot ``named``, start publishing it."""
        self.wait(self.timeout_s)
        busy = getattr(self.publisher, "snapshot_busy", None)
        if busy is not None and busy():  # an engine that missed its deadline may still read it
            log.warning("an engine may still read the snapshot of version %d: version %d goes to a fresh buffer",
                        version - 1, version)
            self.snapshot.retire()
        prepare = getattr(self.publisher, "prepare", None)
        if prepare is not None:  # per-stage publishing: a collective, so on this thread
            prepared = prepare(named, version, self.checksum)
            snap = self.snapshot.take(named)
            fut = spawn(self.publisher.send, snap, prepared)  # type: ignore[attr-defined]
        else:
            snap = self.snapshot.take(named)
            fut = spawn(self.publisher.publish, snap, version, self.checksum)
        self._pending = (version, fut, ctx)
        log.debug("publishing version %d in the background", version)

    def poll(self) -> bool:
        """If the publish in flight finished, report it (``on_done``, re-raising its error); True
        when nothing is in flight any more."""
        if self._pending is None:
            return True
        if not self._pending[1].done():
            return False
        self._finish()
        return True

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the publish in flight finished and report it; raise TimeoutError naming the
        version after ``timeout_s`` (default: the constructor's)."""
        if self._pending is None:
            return
        version, fut, _ = self._pending
        timeout = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            try:
                fut.result(timeout=min(10.0, max(0.0, deadline - time.monotonic())))
                break
            except FutureTimeout:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"publish of version {version} to {', '.join(self.publisher.engine_urls) or 'the engines'} did not finish "
                        f"within {timeout:.0f}s"
                    ) from None
                log.info("waiting for the publish of version %d to finish (%.0fs so far)", version, time.monotonic() - t0)
            except Exception:
                break  # its error is raised by _finish
        self._finish()

    def _finish(self) -> None:
        assert self._pending is not None
        version, fut, ctx = self._pending
        self._pending = None
        info = fut.result()  # re-raises the publish error on the loop thread
        self.on_done(version, info, ctx)
