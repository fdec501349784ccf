"""The embedded engine's KV cache, its slot accounting and its memory budget.

What:
- :class:`KVCache`: keys and values of every layer, allocated once at start-up as
  ``(layers, slots + 1, kv_heads, max_seq_len, head_dim)`` tensors.  Slot ``i`` holds one running
  sequence's positions ``0 .. max_seq_len-1``; the extra last slot is scratch that padding rows of
  a CUDA-graph batch write into.
- :class:`SlotTable`: which sequence is in which slot.  Decoding sequences occupy slots
  ``0 .. b-1`` (row ``i`` of a decode batch is slot ``i``), so a decode step reads a plain view
  of the cache, never a gather; a retired row's slot is refilled by moving the last row's K/V
  into it.  One long prompt that is being prefilled chunk by chunk waits in the top slot.
- :func:`plan_memory`: the engine's memory budget and what it buys (slots x tokens).

Why static per-sequence slots rather than paged blocks: with torch's SDPA (no paged-attention
kernel without a new dependency), a paged cache needs a gather of every sequence's blocks each
step, which costs more memory traffic than the attention itself.  A static slot is a contiguous
view; the price is that every slot reserves ``max_seq_len`` tokens, so ``engine.max_seq_len``
should be what requests actually need (prompt + max_new_tokens), not the model's full context.
Admission is then by free slots: requests wait in the FIFO when none is free, and the cache never
grows.

Memory budget (``engine.mem_fraction``, ``engine.max_total_tokens``): the engine may hold
``mem_fraction`` x the device's *total* memory (host RAM on CPU) - never "whatever is free", so a
trainer sharing the GPU keeps a fixed share.  From it come the weights, one weight-staging buffer
per possible adoption (see ``weights.py``), an estimate of the decode/prefill working memory, and
the KV cache, which gets at most the rest.  ``max_total_tokens`` caps the cache further.  The
number of slots is then ``min(max_running_requests, kv tokens // max_seq_len)``.

Run: not on its own (``decode.py`` uses it); unit tests in ``tests/test_engine_kv.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from pipeline.configbase import ConfigError

S = TypeVar("S")


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class KVCache:
    """Preallocated K/V for ``slots`` sequences of up to ``max_seq_len`` tokens (+ a scratch slot)."""

    def __init__(self, shape: KVShape, slots: int, max_seq_len: int, device: torch.device) -> None:
        self.shape = shape
        self.slots = slots
        self.max_seq_len = max_seq_len
        self.scratch = slots  # padding rows of a captured decode batch write here
        dims = (shape.layers, slots + 1, shape.kv_heads, max_seq_len, shape.head_dim)
        # zeros, not empty: padding rows read slots that may never have been written, and garbage
        # could hold NaN/inf bit patterns (harmless to other rows, but noisy in a debugger)
        self.k = torch.zeros(dims, dtype=shape.dtype, device=device)
        self.v = torch.zeros(dims, dtype=shape.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (all layers)."""
        if src == dst or length == 0:
            return
        self.k[:, dst, :, :length].copy_(self.k[:, src, :, :length])
        self.v[:, dst, :, :length].copy_(self.v[:, src, :, :length])


class SlotTable(Generic[S]):
    """Slot accounting: ``rows[i]`` decodes in slot ``i``; ``top`` (one sequence being prefilled in
    chunks) waits in slot ``capacity - 1``.  Moves are returned as ``(src, dst)`` for the caller to
    apply to the cache; the table itself never touches tensors."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a slot table needs at least one slot")
        self.capacity = capacity
        self.rows: list[S] = []
        self.top: S | None = None

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows) - (self.top is not None)

    @property
    def used(self) -> int:
        return self.capacity - self.free

    def __iter__(self) -> Iterator[S]:
        yield from self.rows
        if self.top is not None:
            yield self.top

    def add_row(self, seq: S) -> int:
        """Append a decoding sequence; returns its slot."""
        if self.free < 1:
            raise RuntimeError("no free KV slot")
        self.rows.append(seq)
        return len(self.rows) - 1

    def add_top(self, seq: S) -> int:
        """Park a sequence whose prompt is prefilled in chunks; returns its slot."""
        if self.top is not None or self.free < 1:
            raise RuntimeError("the chunked-prefill slot is taken or no slot is free")
        self.top = seq
        return self.capacity - 1

    @property
    def top_slot(self) -> int:
        return self.capacity - 1

    def promote_top(self) -> tuple[int, int]:
        """Move the chunk-prefilled sequence to the next decode row; returns ``(src, dst)``."""
        if self.top is None:
            raise RuntimeError("no chunk-prefilled sequence")
        seq, self.top = self.top, None
        self.rows.append(seq)
        return self.capacity - 1, len(self.rows) - 1

    def drop_top(self) -> S | None:
        seq, self.top = self.top, None
        return seq

    def retire(self, indices: set[int]) -> list[tuple[int, int]]:
        """Remove rows ``indices``; the last rows move into the holes.  Returns the moves ``(src, dst)``
        in the order they must be applied."""
        if not indices:
            return []
        n = len(self.rows)
        keep = n - len(indices)
        holes = sorted(i for i in indices if i < keep)
        movers = [i for i in range(keep, n) if i not in indices]
        moves = list(zip(movers, holes, strict=True))
        for src, dst in moves:
            self.rows[dst] = self.rows[src]
        del self.rows[keep:]
        return moves

    def clear(self) -> list[S]:
        out = list(self)
        self.rows, self.top = [], None
        return out


@dataclass(frozen=True)
class MemoryPlan:
    """What the engine's memory budget buys; every figure in bytes unless named otherwise."""

    device_total: int
    limit: int
    weights: int
    staging: int
    working: int
    kv_budget: int
    bytes_per_token: int
    max_seq_len: int
    slots: int

    @property
    def kv_bytes(self) -> int:
        return (self.slots + 1) * self.max_seq_len * self.bytes_per_token

    def describe(self) -> str:
        gib = 2**30
        return (f"memory limit {self.limit / gib:.2f} GiB of {self.device_total / gib:.2f} GiB: weights "
                f"{self.weights / gib:.2f}, weight staging {self.staging / gib:.2f}, working memory "
                f"{self.working / gib:.2f}, KV cache {self.kv_bytes / gib:.2f} GiB = {self.slots} slots x "
                f"{self.max_seq_len} tokens (+1 scratch slot) x {self.bytes_per_token} B/token")


def cuda_index(device: torch.device) -> int:
    """The CUDA ordinal of ``device``: its own index, or the current device for a bare ``cuda``
    (several torch.cuda calls, e.g. ``set_per_process_memory_fraction``, refuse an index-less device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_total_memory(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the host's physical RAM for CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_in_use(device: torch.device) -> tuple[int, int]:
    """(used, peak) bytes of this process on ``device``: the CUDA caching allocator's reserved
    memory, or the process's resident set (VmRSS, VmHWM) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device)), int(torch.cuda.max_memory_reserved(device))
    used = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    used = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    return used, peak


def working_memory(max_batch: int, vocab: int, hidden: int, intermediate: int, qkv_width: int,
                   prefill_tokens: int, dtype_bytes: int) -> int:
    """Estimate of the transient memory of decoding and prefilling (not the KV cache): the sampler's
    float32 (batch, vocab) temporaries, one layer's prefill activations and 64 MiB of slack."""
    sampler = 6 * max_batch * vocab * 4 + max_batch * vocab * dtype_bytes
    per_token = (4 * hidden + qkv_width + 3 * intermediate) * dtype_bytes
    return sampler + 2 * prefill_tokens * per_token + 64 * 2**20


def plan_memory(*, device_total: int, mem_fraction: float, max_total_tokens: int, max_seq_len: int,
                max_running_requests: int, weights: int, staging: int, working: int, bytes_per_token: int,
                key_prefix: str = "engine") -> MemoryPlan:
    """Size the KV cache from the budget; ConfigError (naming the keys) when not one slot fits."""
    limit = int(mem_fraction * device_total)
    kv_budget = limit - weights - staging - working
    if max_total_tokens > 0:
        kv_budget = min(kv_budget, max_total_tokens * bytes_per_token)
    slot_bytes = max_seq_len * bytes_per_token
    slots = min(max_running_requests, kv_budget // slot_bytes - 1) if kv_budget > 0 else 0
    plan = MemoryPlan(device_total=device_total, limit=limit, weights=weights, staging=staging, working=working,
                      kv_budget=max(kv_budget, 0), bytes_per_token=bytes_per_token, max_seq_len=max_seq_len,
                      slots=max(int(slots), 0))
    if plan.slots < 1:
        gib = 2**30
        raise ConfigError(
            f"{key_prefix}.mem_fraction",
            f"the budget leaves {plan.kv_budget / gib:.3f} GiB for the KV cache, less than two slots of "
            f"{key_prefix}.max_seq_len = {max_seq_len} tokens ({2 * slot_bytes / gib:.3f} GiB: one slot plus the "
            f"scratch slot); raise {key_prefix}.mem_fraction or {key_prefix}.max_total_tokens, or lower "
            f"{key_prefix}.max_seq_len ({plan.describe()})",
        )
    return plan
