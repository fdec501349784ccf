"""Colocated weight updates for the embedded engine: map the trainer's shared snapshot, copy it in.

What: :class:`IPCReceiver` serves ``/slipstream/update_weights_from_ipc``
(:class:`schemas.weight_update.IPCUpdateRequest`).  The trainer's snapshot lies in memory it shares
(CUDA IPC on a GPU, a ``/dev/shm`` file on CPU); the engine maps each distinct buffer once (the
trainer allocates it once and reuses it every version), checks the layout against its model, and
hands views of the mapped tensors to the scheduler's ``swap_weights(staged, version, adopt=False)``:
the tensors are *copied* into the engine's own parameters between two decode steps (never
adopted: the trainer overwrites its buffer with the next version, and graph-captured weights must
keep their addresses).  The reply comes once the copy is done (the swap synchronizes the device),
so the trainer may then overwrite the buffer.

Why: NCCL refuses two ranks on one GPU, and a device-to-device copy is the cheapest hand-over
there is (DESIGN §8, colocated mode).  The pause is that copy.

Failure rules: a request whose layout does not match the model, or whose buffer lives on another
device or machine, is refused before anything is copied (``success: false``); nothing changes.
A buffer that cannot be mapped is refused the same way, naming it.

Run: not on its own; the engine server owns one (``producers/engine/server.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.weightsync import cuda_uuid
from producers.engine.metrics import EngineMetrics
from producers.engine.weights import WeightUpdateError
from schemas.weight_update import IPCUpdateRequest, SharedBuffer

log = logging.getLogger(__name__)
SwapHook = Callable[[dict[str, torch.Tensor], int, bool], "cf.Future[float]"]
Check = Callable[[Any], "str | None"]

#: how many distinct shared buffers stay mapped (the trainer's snapshot, and the fresh one it
#: takes after an engine missed a deadline)
MAX_MAPPED = 2


def map_shared(desc: SharedBuffer, device: torch.device) -> torch.Tensor:
    """A ``uint8`` tensor of ``desc.nbytes`` over the trainer's shared buffer, on ``device``."""
    if desc.kind == "shm":
        if device.type != "cpu":
            raise WeightUpdateError(f"shared-memory buffer {desc.path} is host memory, but this engine's weights are on "
                                    f"{device}; use the broadcast transport (weights.transport) or a CPU engine")
        if not os.path.exists(desc.path):
            raise WeightUpdateError(f"shared-memory buffer {desc.path} does not exist (the trainer is on another "
                                    "machine or container, or it has exited)")
        whole = torch.from_file(desc.path, shared=True, size=desc.offset + desc.nbytes, dtype=torch.uint8)
        return whole[desc.offset : desc.offset + desc.nbytes]
    if device.type != "cuda":
        raise WeightUpdateError(f"CUDA IPC buffer on GPU {desc.device_uuid}, but this engine's weights are on {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if cuda_uuid(index) != desc.device_uuid:
        raise WeightUpdateError(f"CUDA IPC buffer on GPU {desc.device_uuid}, but this engine runs on GPU {cuda_uuid(index)}: "
                                "not colocated (use the broadcast transport)")
    torch.cuda._lazy_init()
    storage = torch.UntypedStorage._new_shared_cuda(
        index, desc.handle, desc.storage_size, desc.storage_offset, desc.ref_counter_handle, desc.ref_counter_offset,
        desc.event_handle, desc.event_sync_required,
    )
    out = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", index))
    return out.set_(storage, desc.offset, (desc.nbytes,))


class IPCReceiver:
    """Maps shared buffers (each once) and swaps updates from them in; see the module docstring."""

    def __init__(self, device: torch.device, metrics: EngineMetrics, timeout_s: float, check: Check, swap: SwapHook,
                 before: Callable[[int | None, str], None] | None = None) -> None:
        """``check(request)``: the first mismatch of its layout with the model, or None;
        ``swap``: the scheduler's ``swap_weights``; ``before(version, stage)``: a test-only fault
        hook (``producers.engine.weights.Fault``)."""
        self._device = device
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._check = check
        self._swap = swap
        self._before = before
        self._mapped: dict[tuple[Any, ...], torch.Tensor] = {}

    def _buffer(self, desc: SharedBuffer) -> torch.Tensor:
        key = desc.key()
        buf = self._mapped.get(key)
        if buf is None:
            while len(self._mapped) >= MAX_MAPPED:  # the oldest mapping is the trainer's previous buffer
                self._mapped.pop(next(iter(self._mapped)))
            try:
                buf = map_shared(desc, self._device)
            except WeightUpdateError:
                raise
            except Exception as e:
                raise WeightUpdateError(f"could not map the trainer's {desc.kind} buffer: {e}") from e
            self._mapped[key] = buf
            log.info("mapped the trainer's %s weight buffer: %.1f MiB", desc.kind, desc.nbytes / 2**20)
        return buf

    def update(self, req: IPCUpdateRequest) -> dict[str, float]:
        """Blocking (call from a thread): check, map, swap; returns the timings (seconds) with
        ``swap_s``, the pause."""
        t0 = time.perf_counter()
        if self._before is not None:
            self._before(req.weight_version, "receive")
        problem = self._check(req)
        if problem is not None:
            raise WeightUpdateError(f"{problem}; update to version {req.weight_version} refused, nothing was copied")
        buf = self._buffer(req.buffer)
        staged = {name: buf[off : off + size].view(dtype).view(shape)
                  for name, dtype, shape, off, size in zip(req.names, req.dtypes, req.shapes, req.offsets, req.sizes, strict=True)}
        mapped = time.perf_counter()
        if self._before is not None:
            self._before(req.weight_version, "mid")
            self._before(req.weight_version, "after_receive")
        pause = self._swap(staged, req.weight_version, False).result(timeout=self._timeout_s)
        done = time.perf_counter()
        self._metrics.update_bytes.inc(req.nbytes)
        log.info("weights from the trainer's shared buffer: %d tensors, %.1f MiB, version %d (map %.1f ms, pause %.2f ms)",
                 len(staged), req.nbytes / 2**20, req.weight_version, (mapped - t0) * 1e3, pause * 1e3)
        return {"map_s": mapped - t0, "swap_s": pause, "handler_s": done - t0}
