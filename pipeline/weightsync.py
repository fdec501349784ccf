"""The weight-update process group and bucket format shared by trainer publishers and engines.

The weight group is *not* the trainer's torch.distributed world (DESIGN §8).  It is a standalone
process group made from its own TCPStore rendezvous at an address the trainer announces, exactly
like SGLang's ``/init_weights_update_group``: the publisher is rank 0 and engine ``i`` is rank
``rank_offset + tp_rank``.  Because it never touches the default group, engines in other processes
or hosts can join, and a restarted engine can rejoin without restarting the trainer.

A bucket travels as one flat ``uint8`` tensor holding the concatenated bytes of its tensors
(SGLang's ``load_format="flattened_bucket"``); ``names``/``dtypes``/``shapes`` in the HTTP request
describe how to cut it (the request itself is :mod:`schemas.weight_update`, the one definition of
the weight-update HTTP contract).

    group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo")
    flat = flatten_bucket(tensors); group.broadcast(flat, src=0)
    tensors = unflatten_bucket(flat, dtypes, shapes)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from schemas.weight_update import (  # noqa: F401  (re-exported: the weight path's shared names)
    CHUNKS_FIELD,
    DEFAULT_GROUP_NAME,
    PARTS_FIELD,
    dtype_from_name,
    dtype_name,
    tensor_sizes,
)

log = logging.getLogger(__name__)


def part_group_name(base: str, stage: int) -> str:
    """Weight group of pipeline stage ``stage``'s publisher: ``base`` for stage 0 (trainer rank 0's
    group, the single-publisher name), ``f"{base}-pp{stage}"`` for the others."""
    return base if stage == 0 else f"{base}-pp{stage}"


def init_weight_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    group_name: str = DEFAULT_GROUP_NAME,
    timeout_s: float = 60.0,
) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) the weight-update group. Blocks until all ranks joined or
    ``timeout_s`` passes; the TimeoutError names the rendezvous address to check."""
    log.info(
        "weight group %r: rank %d/%d joining rendezvous at %s:%d (%s, timeout %.0fs)",
        group_name, rank, world_size, master_address, master_port, backend, timeout_s,
    )
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            master_address, master_port, world_size, is_master=(rank == 0), timeout=timeout,
            wait_for_workers=False,
        )
        prefix = dist.PrefixStore(f"{group_name}/", store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefix, rank, world_size, timeout)
        elif backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefix, rank, world_size, opts)
        else:
            raise ValueError(f"unknown weight-group backend {backend!r} (use 'gloo' or 'nccl')")
    except (RuntimeError, dist.DistStoreError) as e:
        raise TimeoutError(
            f"weight group {group_name!r}: rank {rank} could not rendezvous with {world_size} ranks at "
            f"{master_address}:{master_port} within {timeout_s:.0f}s ({e}). Check that every engine was told to "
            "join (init_weights_update_group) and that the address is reachable from the engines."
        ) from e
    return WeightGroup(pg=pg, store=store, rank=rank, world_size=world_size, name=group_name)


@dataclass
class WeightGroup:
    """A joined weight-update group. Holds the TCPStore so it lives as long as the group."""

    pg: dist.ProcessGroup
    store: dist.Store
    rank: int
    world_size: int
    name: str

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.broadcast_async(tensor, src).wait()

    def broadcast_async(self, tensor: torch.Tensor, src: int = 0) -> dist.Work:
        """Start a broadcast; ``wait()`` on the result blocks (gloo) or orders the current CUDA
        stream after it (NCCL).  ``tensor`` must not be reused before that."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def flatten_bucket(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors' raw bytes into one uint8 tensor (on the tensors' device)."""
    parts = [_byte_view(t) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def flatten_into(buf: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Like :func:`flatten_bucket`, but into the front of the persistent uint8 buffer ``buf``;
    returns the filled slice.  One ``torch.cat(out=...)`` call (one multi-tensor copy kernel on
    GPU) when every tensor is on ``buf``'s device, so a bucket of hundreds of tensors costs one
    launch, not hundreds."""
    parts = [_byte_view(t) for t in tensors]
    total = sum(p.numel() for p in parts)
    if total > buf.numel():
        raise ValueError(f"bucket of {total} bytes does not fit the {buf.numel()}-byte buffer")
    out = buf[:total]
    if parts and all(p.device == buf.device for p in parts):
        torch.cat(parts, out=out)
    else:  # e.g. CPU tensors into a GPU buffer: one copy each
        offset = 0
        for p in parts:
            out[offset : offset + p.numel()].copy_(p)
            offset += p.numel()
    return out


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """If ``tensors`` lie back to back in one storage (in this order, each contiguous), the
    ``uint8`` view of their bytes, exactly what :func:`flatten_bucket` would build, without a
    copy; else None."""
    if not tensors:
        return None
    first = tensors[0]
    storage = first.untyped_storage()
    expected = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != expected or t.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        expected += t.numel() * t.element_size()
    start = first.data_ptr() - storage.data_ptr()
    span = torch.empty(0, dtype=torch.uint8, device=first.device)
    span.set_(storage, start, (expected - first.data_ptr(),))
    return span


def unflatten_bucket(flat: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """Inverse of flatten_bucket: views into ``flat`` (no copy)."""
    sizes = tensor_sizes(dtypes, shapes)
    if sum(sizes) != flat.numel():
        raise ValueError(f"bucket has {flat.numel()} bytes, the tensor list describes {sum(sizes)}")
    out, offset = [], 0
    for dtype, shape, nbytes in zip(dtypes, shapes, sizes, strict=True):
        out.append(flat[offset : offset + nbytes].view(dtype).view(shape))
        offset += nbytes
    return out


# A tensor's fingerprint is computed where the tensor lives (on the GPU for a GPU model), so that
# checking 1.2 GB of weights costs milliseconds instead of a device-to-host copy plus a sha256 of
# every byte (2.3 s a step at 0.6B on an H200, measured: bench/results/2026-12-02-e2e-h200*).
# It is a keyed sum of mixed words: h = sum_i mix64(word_i + i * K) mod 2**64, where mix64 is the
# splitmix64 finaliser (a bijection of 64-bit words) and the words are the tensor's bytes read as
# int32 (as uint8 when the byte count is not a multiple of 4).  Any change of one word changes h;
# a word moved to another position changes h (the position is mixed in); accidental collisions
# have probability about 2**-64.  It checks transfers, it is not a cryptographic hash.  Integer
# arithmetic wraps modulo 2**64 on CPU and CUDA alike, and the sum's order does not matter, so the
# same bytes give the same fingerprint on any device (tests/test_engine_weights_gpu.py checks it).
_K = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB
# Words per step.  On a GPU, large steps (few kernel launches; 32 MiB per int64 temporary, which
# bounds the extra memory); on CPU, steps that stay in the core's cache (measured on this 2-core
# machine, 200 MB of float32: 0.30 s at 2**16 words, 2.1 s at 2**22, 0.47 s for hashlib's sha256).
_FINGERPRINT_CHUNK = {"cpu": 1 << 16, "other": 1 << 22}


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's ``>>`` is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    """The 64-bit fingerprint of ``t``'s bytes, as a 0-d int64 tensor on ``t``'s device."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    acc = torch.zeros((), dtype=torch.int64, device=raw.device)
    step = _FINGERPRINT_CHUNK["cpu" if raw.device.type == "cpu" else "other"]
    for start in range(0, words.numel(), step):
        part = words[start : start + step].to(torch.int64)
        pos = torch.arange(start, start + part.numel(), dtype=torch.int64, device=raw.device)
        acc += _mix64(part + pos * _K).sum()
    return acc


def _digest(name: str, t: torch.Tensor, fingerprint: int) -> str:
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(dtype_name(t.dtype).encode())
    h.update(repr(tuple(t.shape)).encode())
    h.update((fingerprint & (2**64 - 1)).to_bytes(8, "little"))
    return h.hexdigest()


def tensor_digest(name: str, t: torch.Tensor) -> str:
    """Digest of one tensor's name, dtype, shape and bytes (hex): sha256 over the first three and
    the bytes' 64-bit fingerprint, computed on the tensor's own device (see above)."""
    return _digest(name, t, int(_fingerprint(t).item()))


def tensor_digests(named: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """:func:`tensor_digest` of every tensor: what a pipeline stage's publisher sends trainer rank 0
    so that it can compute the checksum of the whole model without its tensors.  The fingerprints
    of tensors on one device come back in one device-to-host copy."""
    by_device: dict[torch.device, list[str]] = {}
    for name, t in named.items():
        by_device.setdefault(t.device, []).append(name)
    out: dict[str, str] = {}
    for names in by_device.values():
        with torch.profiler.record_function("slipstream.weights_fingerprint"):  # a named span in profiles
            values = torch.stack([_fingerprint(named[n]) for n in names]).tolist()
        out.update({n: _digest(n, named[n], int(v)) for n, v in zip(names, values, strict=True)})
    return {name: out[name] for name in named}


def combine_digests(digests: Mapping[str, str]) -> str:
    """The checksum of a state dict from its per-tensor digests: sha256 over (name, digest) in
    sorted name order.  Parts' digests merge with ``{**a, **b}`` (names are unique across parts)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(b"\0")
        h.update(digests[name].encode())
    return h.hexdigest()


def weights_checksum(named: Mapping[str, torch.Tensor]) -> str:
    """``combine_digests(tensor_digests(named))``: equal on trainer and engine exactly when every
    published tensor arrived bit for bit (per-tensor digest of name, dtype, shape and bytes,
    combined in sorted name order, so that per-stage publishers can contribute their parts'
    digests instead of their tensors)."""
    return combine_digests(tensor_digests(named))


# ------------------------------------------------------------------------------ placement
@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def cuda_uuid(index: int) -> str:
    """The UUID of CUDA device ``index`` (stable across processes, unlike the index)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def device_identity(device: torch.device) -> dict[str, Any]:
    """Where weights on ``device`` live, comparable across processes: host name and boot id (one
    machine, one shared-memory namespace), device type and, for CUDA, the GPU's UUID.  Engines
    report it in ``/get_server_info`` (``schemas.weight_update.DEVICE_FIELD``); the trainer
    compares it with its own to pick a transport."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "boot_id": _boot_id(), "device": device.type}
    if device.type == "cuda":
        ident["uuid"] = cuda_uuid(device.index if device.index is not None else torch.cuda.current_device())
    return ident


def same_machine(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Both identities name one running machine (so memory can be shared between them)."""
    return bool(a and b and a.get("host") == b.get("host") and a.get("boot_id") == b.get("boot_id"))


def same_device(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Both identities name one device of one machine (the same GPU, or both the CPU)."""
    if not same_machine(a, b) or a is None or b is None or a.get("device") != b.get("device"):
        return False
    return a.get("device") != "cuda" or (bool(a.get("uuid")) and a.get("uuid") == b.get("uuid"))
