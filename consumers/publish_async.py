"""Overlap weight publishing with the next trainer step (``weights.async_publish``, DESIGN §8).

What: the loop hands every version to a *publish driver* with one interface (``submit``, ``poll``,
``wait``): :class:`InlinePublisher` publishes on the caller's thread, :class:`AsyncPublisher` in the
background.  Both wrap one object that fulfils :class:`Publisher` (a
:class:`consumers.publisher.WeightPublisher`, or a :class:`consumers.stage_publish.StagePublisher`).

:class:`AsyncPublisher` wraps the publisher.  After an
optimizer step the loop calls :meth:`AsyncPublisher.submit`: it first waits until the previous
version's publish finished (versions reach the engines strictly in order, one at a time), then
snapshots the HF-named tensors into persistent buffers (:class:`WeightSnapshot`: a device copy on
GPU, a CPU copy on CPU; allocated once, reused every step) and publishes the snapshot from a
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


class FlatState(dict[str, torch.Tensor]):
    """HF-named tensors as :meth:`WeightSnapshot.take` returns them; ``contiguous`` when they all
    lie back to back, in order, in one buffer.  The bucket size bounds the publisher's flatten
    buffers, and such a state needs none, so the publisher may send it in one broadcast, from a
    view (fewer broadcasts to post on both sides)."""

    contiguous: bool = False


class WeightSnapshot:
    """Persistent copies of the published tensors.  The first :meth:`take` allocates one flat
    ``uint8`` buffer per device holding every tensor back to back in the dict's order (the same
    layout as a flattened bucket), later calls copy into it in place.  Because consecutive
    tensors are adjacent in memory, the publisher broadcasts straight from the snapshot without
    flattening (:func:`pipeline.weightsync.contiguous_span`)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}
        self._flat: dict[torch.device, torch.Tensor] = {}
        self._layout: list[tuple[str, torch.Size, torch.dtype, torch.device]] = []
        self._contiguous = False  # every tensor is a view into the one flat buffer, in order

    def _allocate(self, named: Mapping[str, torch.Tensor]) -> None:
        self._layout = [(n, t.shape, t.dtype, t.device) for n, t in named.items()]
        self._bufs, self._flat = {}, {}  # free the old buffers first
        sizes: dict[torch.device, int] = {}
        for _, shape, dtype, device in self._layout:
            sizes[device] = sizes.get(device, 0) + shape.numel() * dtype.itemsize
        self._flat = {d: torch.empty(n, dtype=torch.uint8, device=d) for d, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        own: list[str] = []  # tensors outside the flat buffer
        for name, shape, dtype, device in self._layout:
            n = shape.numel() * dtype.itemsize
            off = offsets[device]
            if off % dtype.itemsize:  # not aligned for a view of this dtype: a buffer of its own
                self._bufs[name] = torch.empty(shape, dtype=dtype, device=device)
                own.append(name)
            else:
                self._bufs[name] = self._flat[device][off : off + n].view(dtype).view(shape)
            offsets[device] = off + n
        self._contiguous = len(self._flat) == 1 and not own

    def take(self, named: Mapping[str, torch.Tensor]) -> FlatState:
        layout = [(n, t.shape, t.dtype, t.device) for n, t in named.items()]
        if layout != self._layout:
            self._allocate(named)
        out = FlatState()
        out.contiguous = self._contiguous
        cuda = False
        for name, t in named.items():
            buf = self._bufs[name]
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
            cuda = cuda or t.is_cuda
            out[name] = buf
        if cuda:
            torch.cuda.current_stream().synchronize()  # the publish thread reads them on another stream
        return out


class AsyncPublisher:
    """One publish in flight at a time, from a background thread; see the module docstring."""

    def __init__(self, publisher: Publisher, on_done: OnDone, checksum: bool = True,
                 timeout_s: float = 600.0) -> None:
        self.publisher = publisher
        self.on_done = on_done
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.snapshot = WeightSnapshot()
        self._pending: tuple[int, Future, Any] | None = None

    @property
    def in_flight(self) -> int | None:
        """The version being published, or None."""
        return None if self._pending is None else self._pending[0]

    def submit(self, named: Mapping[str, torch.Tensor], version: int, ctx: Any = None) -> None:
        """Wait for the previous publish (and report it), snapshot ``named``, start publishing it."""
        self.wait(self.timeout_s)
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
