"""Share the trainer's weight snapshot with engines on the same machine (colocated mode, DESIGN §8).

What: :class:`SharedAllocator` allocates snapshot buffers that another process can map and
describes each one as a :class:`schemas.weight_update.SharedBuffer`:

* on CUDA, device memory shared by CUDA IPC (``UntypedStorage._share_cuda_()``: a handle, the
  buffer's offset in its allocation, a reference counter and an event), the GPU named by its UUID;
  allocated with the caching allocator's expandable segments off (their memory cannot be
  exported this way);
* on CPU, a file in ``/dev/shm`` mapped shared (``torch.from_file``), the stand-in that lets the
  whole hand-over run, and be tested, without a GPU.

:func:`sglang_serialized_bucket` builds what SGLang's ``/update_weights_from_tensor`` takes in its
``flattened_bucket`` form.  That payload is SGLang's own format (sglang 0.5.23,
``MultiprocessingSerializer``: a base64 ``ForkingPickler`` dump, read by its ``SafeUnpickler``): a
dict ``{"flattened_tensor": uint8 tensor, "metadata": [...]}`` whose metadata entries carry
``name, shape, dtype, start_idx, end_idx, numel`` (as ``types.SimpleNamespace``, which the
unpickler allows, since sglang itself cannot be imported here), the CUDA tensor reduced by torch's
``reduce_tensor`` with the device index replaced by the GPU's UUID (what SGLang's patched
``rebuild_cuda_tensor`` expects).  Pickle is SGLang's wire, not slipstream's: the embedded engine
gets the explicit JSON of :class:`~schemas.weight_update.IPCUpdateRequest`.

    alloc = SharedAllocator()
    buf = alloc(nbytes, torch.device("cuda", 0)); desc = alloc.describe(buf)
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import os
import types
import weakref
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing import reductions

from consumers.engine_http import PublishError
from pipeline.weightsync import cuda_uuid
from schemas.weight_update import SharedBuffer

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_counter = itertools.count()


def _expandable_segments() -> bool:
    conf = (os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")).replace(" ", "")
    return "expandable_segments:True" in conf


def cuda_empty_shareable(nbytes: int, device: torch.device) -> torch.Tensor:
    """``torch.empty`` of ``nbytes`` on ``device`` from a plain (non-expandable) segment, which CUDA
    IPC can export; the allocator's setting is restored afterwards."""
    expandable = _expandable_segments()
    if expandable:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    finally:
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def share_cuda(t: torch.Tensor) -> SharedBuffer:
    """The CUDA IPC description of uint8 tensor ``t`` (the fields of ``_share_cuda_()``)."""
    storage = t.untyped_storage()
    (device, handle, storage_size, storage_offset, rc_handle, rc_offset, event_handle,
     event_sync) = storage._share_cuda_()
    return SharedBuffer("cuda", t.numel(), offset=t.storage_offset(), device_uuid=cuda_uuid(int(device)),
                        handle=bytes(handle), storage_size=int(storage_size), storage_offset=int(storage_offset),
                        ref_counter_handle=bytes(rc_handle), ref_counter_offset=int(rc_offset),
                        event_handle=bytes(event_handle or b""), event_sync_required=bool(event_sync))


class SharedAllocator:
    """Allocates shareable snapshot buffers (a :data:`consumers.snapshot.Allocate`) and remembers
    how to map each; :meth:`close` removes the shared-memory files."""

    def __init__(self, prefix: str = "slipstream-weights") -> None:
        self.prefix = prefix
        self._shared: dict[int, tuple[weakref.ref[torch.Tensor], SharedBuffer]] = {}  # data_ptr -> (buffer, description)
        self._files: list[Path] = []

    def __call__(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            t = cuda_empty_shareable(nbytes, device)
            desc = share_cuda(t)
        elif device.type == "cpu":
            path = SHM_DIR / f"{self.prefix}-{os.getpid()}-{next(_counter)}"
            t = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
            self._files.append(path)
            desc = SharedBuffer("shm", nbytes, path=str(path))
        else:
            raise PublishError(f"weights.transport 'ipc' shares CUDA or CPU memory, not {device}")
        ptr = t.data_ptr()
        self._shared[ptr] = (weakref.ref(t), desc)
        weakref.finalize(t, self._forget, ptr, desc)  # the snapshot let go of it: a new buffer comes next
        log.info("shared weight buffer: %.1f MiB on %s (%s)", nbytes / 2**20, device, desc.kind)
        return t

    def describe(self, buffer: torch.Tensor | None) -> SharedBuffer | None:
        """How to map ``buffer``, if this allocator made it (None otherwise)."""
        if buffer is None:
            return None
        entry = self._shared.get(buffer.data_ptr())
        if entry is None or entry[0]() is not buffer:
            return None
        return entry[1]

    def _forget(self, ptr: int, desc: SharedBuffer) -> None:
        entry = self._shared.get(ptr)
        if entry is not None and entry[1] is desc:
            del self._shared[ptr]
        if desc.kind == "shm":  # mappings made before stay valid; nobody maps it again
            _unlink(Path(desc.path))

    def close(self) -> None:
        self._shared.clear()
        for path in self._files:
            _unlink(path)
        self._files = []


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class _SGLangPickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors carry their GPU's UUID instead of the device index (what
    SGLang's ``monkey_patch_torch_reductions`` does on its own senders)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            fn, args = reductions.reduce_tensor(obj)
            args = list(args)
            args[6] = cuda_uuid(int(args[6]))  # storage_device (SGLang's _REDUCE_TENSOR_ARG_DEVICE_INDEX)
            return fn, tuple(args)
        return NotImplemented


def sglang_serialized_bucket(flat: torch.Tensor, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
                             offsets: list[int], tp_size: int) -> list[str]:
    """``serialized_named_tensors`` for SGLang's ``/update_weights_from_tensor`` with
    ``load_format="flattened_bucket"``: one payload per engine TP rank (each rank deserializes
    only its own, which keeps the CUDA IPC reference counts right), see the module docstring."""
    metadata = []
    for name, dtype, shape, off in zip(names, dtypes, shapes, offsets, strict=True):
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(shape), dtype=dtype, start_idx=off,
                                              end_idx=off + nbytes, numel=nbytes))
    payload = {"flattened_tensor": flat, "metadata": metadata}
    out = []
    for _ in range(tp_size):
        buf = io.BytesIO()
        _SGLangPickler(buf).dump(payload)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out
