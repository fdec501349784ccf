"""The publish snapshot: one persistent flat buffer holding a copy of every published tensor.

What: :class:`WeightSnapshot` copies the trainer's HF export into one ``uint8`` buffer, every tensor
a view at its own offset in the dict's order (back to back, the layout of a flattened bucket,
padded only where a tensor's dtype needs alignment).  The first :meth:`WeightSnapshot.take`
allocates it, later ones copy in place; a new layout re-allocates.

Why: the trainer's next step changes its weights while the previous version is still being
published (``weights.async_publish``), so the publish reads a copy.  One flat buffer means:

* the broadcast transport sends it whole, from a view, with no flatten buffers (the bucket size
  bounds those; :attr:`FlatState.contiguous`);
* the IPC transport shares it once (one CUDA IPC handle, or one shared-memory file on CPU) and the
  engines map it once (:attr:`FlatState.buffer`, :attr:`FlatState.offsets`);
* its size is one explicit number, checked against a budget (``weights.snapshot_max_fraction``
  of the device's memory) and reported (``slipstream_trainer_weight_snapshot_bytes``).

Where: on the exported tensors' device (weights stay on the device, DESIGN §8), or in host memory
(pinned when CUDA is there) when ``host`` is set: the transport needs it (gloo) or the user asks
(``weights.snapshot_device = "host"``).  One buffer, not two: versions are published one at a
time, and a snapshot is written only after the previous version's publish returned, i.e. after
every engine that took it has copied it out (an engine that missed its deadline keeps its buffer:
:meth:`WeightSnapshot.retire` hands it over and the next take allocates a fresh one).

    snap = WeightSnapshot(budget_bytes=8 << 30)
    flat = snap.take(trainer.export_hf_state())     # FlatState: name -> view into flat.buffer
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

log = logging.getLogger(__name__)

#: ``allocate(nbytes, device) -> uint8 tensor``: where a snapshot buffer comes from (the IPC
#: transport's allocator makes it shareable with other processes)
Allocate = Callable[[int, torch.device], torch.Tensor]


class SnapshotBudgetError(RuntimeError):
    """The snapshot would exceed its memory budget (the message names the config key)."""


class FlatState(dict[str, torch.Tensor]):
    """HF-named tensors as :meth:`WeightSnapshot.take` returns them: views into ``buffer`` at
    ``offsets`` (bytes).  ``contiguous`` when they lie back to back, in order, with no padding:
    the whole state is then one flattened bucket, sendable in one broadcast from a view."""

    contiguous: bool = False
    buffer: torch.Tensor | None = None
    offsets: dict[str, int] | None = None


def _default_allocate(host: bool) -> Allocate:
    def allocate(nbytes: int, device: torch.device) -> torch.Tensor:
        pin = host and torch.cuda.is_available()
        return torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    return allocate


class WeightSnapshot:
    """Persistent copy of the published tensors; see the module docstring."""

    def __init__(self, budget_bytes: int | None = None, host: bool = False, allocate: Allocate | None = None,
                 on_size: Callable[[int], None] | None = None, budget_key: str = "weights.snapshot_max_fraction") -> None:
        """``budget_bytes``: the most the buffer may take (None: no limit); ``host``: keep it in
        host memory; ``allocate``: where buffers come from; ``on_size(nbytes)``: told the buffer's
        size whenever it changes (the metric)."""
        self.budget_bytes = budget_bytes
        self.host = host
        self.allocate = allocate or _default_allocate(host)
        self.on_size = on_size
        self.budget_key = budget_key
        self._layout: list[tuple[str, torch.Size, torch.dtype, torch.device]] = []
        self._views: dict[str, torch.Tensor] = {}
        self._offsets: dict[str, int] = {}
        self._buffer: torch.Tensor | None = None
        self._contiguous = False

    @property
    def nbytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def buffer(self) -> torch.Tensor | None:
        return self._buffer

    @staticmethod
    def plan(named: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], int, bool]:
        """Byte offset of every tensor, the buffer's size and whether no padding was needed."""
        offsets: dict[str, int] = {}
        off = 0
        padded = False
        for name, t in named.items():
            align = t.element_size()
            if off % align:
                off += align - off % align
                padded = True
            offsets[name] = off
            off += t.numel() * t.element_size()
        return offsets, off, not padded

    def device_of(self, named: Mapping[str, torch.Tensor]) -> torch.device:
        """Where the buffer goes: host memory if asked, else the first tensor's device."""
        first = next(iter(named.values()), None)
        return torch.device("cpu") if self.host or first is None else first.device

    def _allocate(self, named: Mapping[str, torch.Tensor]) -> None:
        self._views, self._buffer = {}, None  # free the old buffer first
        offsets, nbytes, contiguous = self.plan(named)
        if self.budget_bytes is not None and nbytes > self.budget_bytes:
            raise SnapshotBudgetError(
                f"the weight snapshot needs {nbytes / 2**20:.1f} MiB, over its budget of {self.budget_bytes / 2**20:.1f} MiB "
                f"({self.budget_key}); raise {self.budget_key}, or set weights.async_publish = false to publish without one"
            )
        device = self.device_of(named)
        buf = self.allocate(max(nbytes, 1), device)
        self._buffer = buf
        self._offsets = offsets
        for name, t in named.items():
            off = offsets[name]
            self._views[name] = buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        self._contiguous = contiguous
        self._layout = [(n, t.shape, t.dtype, t.device) for n, t in named.items()]
        log.info("weight snapshot: %d tensors, %.1f MiB on %s%s", len(named), nbytes / 2**20, device,
                 "" if contiguous else " (padded for alignment)")
        if self.on_size is not None:
            self.on_size(nbytes)

    def retire(self) -> None:
        """Stop reusing the current buffer (someone may still read it: an engine that missed its
        deadline); the next :meth:`take` allocates a fresh one.  Whoever holds a view keeps the
        old buffer alive until it lets go."""
        self._layout, self._views, self._buffer = [], {}, None

    def take(self, named: Mapping[str, torch.Tensor]) -> FlatState:
        layout = [(n, t.shape, t.dtype, t.device) for n, t in named.items()]
        if layout != self._layout or self._buffer is None:
            self._allocate(named)
        out = FlatState()
        out.contiguous = self._contiguous
        out.buffer = self._buffer
        out.offsets = self._offsets
        cuda = False
        for name, t in named.items():
            view = self._views[name]
            view.copy_(t.detach(), non_blocking=t.is_cuda or view.is_cuda)
            cuda = cuda or t.is_cuda or view.is_cuda
            out[name] = view
        if cuda:
            torch.cuda.current_stream().synchronize()  # the publish thread (and other processes) read it next
        return out

    def last(self) -> FlatState | None:
        """The tensors of the last :meth:`take` (None before the first, or after :meth:`retire`):
        the version last submitted, which an engine the launcher restarted can be sent again
        (``consumers.engine_rejoin``)."""
        if not self._layout or self._buffer is None:
            return None
        out = FlatState((name, self._views[name]) for name, *_ in self._layout)
        out.contiguous = self._contiguous
        out.buffer = self._buffer
        out.offsets = self._offsets
        return out
