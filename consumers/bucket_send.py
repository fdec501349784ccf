"""Plan buckets of HF-named tensors and broadcast them from rank 0 of a weight group (DESIGN §8).

What: :func:`plan_buckets` splits a state dict into buckets of at most ``bucket_bytes``;
:class:`RemotePart` is another pipeline stage's share of an update (its layout, its group);
:class:`BucketSender` is the sending half shared by the broadcast transport
(:mod:`consumers.transports`, trainer rank 0) and the pipeline-stage leaders of
:mod:`consumers.stage_publish` (which only broadcast their own stage's part).  Both send exactly
the same byte sequence for the same tensors and ``bucket_bytes``: one broadcast per bucket of
:func:`plan_buckets`, in order, each the bucket's tensors' bytes back to back.

How: bucket ``i + 1`` is flattened while bucket ``i`` is on the wire (two persistent flat buffers,
allocated once and grown when needed); a bucket whose tensors already lie back to back (a
:class:`consumers.publish_async.WeightSnapshot`) is sent from a view, without a copy.

    sender = BucketSender("gloo")
    sent = sender.broadcast(group, named, buckets, list(range(len(buckets))), largest, timings)
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.weightsync import WeightGroup, contiguous_span, dtype_from_name, flatten_into


def plan_buckets(named: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Group names (in ``named``'s order) into buckets of at most ``bucket_bytes`` bytes; a tensor
    larger than that gets a bucket of its own."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in named.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def bucket_sizes(named: Mapping[str, torch.Tensor], buckets: list[list[str]]) -> list[int]:
    """Byte size of each bucket."""
    return [sum(named[n].numel() * named[n].element_size() for n in b) for b in buckets]


@dataclass
class RemotePart:
    """A pipeline stage's share of every update: its leader broadcasts it, as rank 0 of the weight
    group ``group_name`` it hosts at ``address:port`` (:mod:`consumers.stage_publish`); trainer
    rank 0 only announces it, from ``layout`` ((name, dtype, shape) per tensor, in order)."""

    stage: int
    group_name: str
    address: str
    port: int
    layout: list[tuple[str, str, list[int]]]

    @functools.cached_property
    def meta(self) -> dict[str, torch.Tensor]:
        """The part's tensors as ``meta`` tensors: names, dtypes and shapes, no bytes."""
        return {n: torch.empty(shape, dtype=dtype_from_name(dt), device="meta") for n, dt, shape in self.layout}

    def buckets(self, bucket_bytes: int) -> list[list[str]]:
        """The buckets its leader sends: the same plan as rank 0's own."""
        return plan_buckets(self.meta, bucket_bytes)


class BucketSender:
    """Flat buffers plus the broadcast loop of one sending rank; not thread-safe (one publish at a time)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._flat: list[torch.Tensor] = []  # two buckets' bytes, reused by every publish (no re-allocation)

    def buffers(self, need: int, count: int, device: torch.device) -> list[torch.Tensor]:
        """``count`` (1 or 2) persistent flat buffers of ``need`` bytes, allocated once and grown
        when needed; with two, bucket ``i + 1`` is flattened into one while bucket ``i`` is still
        on the wire from the other."""
        if len(self._flat) < count or self._flat[0].numel() < need or self._flat[0].device != device:
            self._flat = []  # free the old ones before allocating
            self._flat = [torch.empty(need, dtype=torch.uint8, device=device) for _ in range(count)]
        return self._flat

    def bucket_bytes(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], i: int,
                     largest: int) -> torch.Tensor:
        """Bucket ``i``'s bytes: a view when its tensors already lie back to back (a
        :class:`consumers.publish_async.WeightSnapshot`), else flattened into buffer ``i % 2``
        (buffers of ``largest`` bytes, the biggest bucket's size)."""
        tensors = [named[n] for n in buckets[i]]
        span = contiguous_span(tensors)
        if span is not None and span.is_cuda == (self.backend == "nccl"):  # NCCL sends device memory, gloo host memory
            return span
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        bufs = self.buffers(largest, min(2, len(buckets)), device)
        return flatten_into(bufs[i % len(bufs)], tensors)

    def broadcast(self, group: WeightGroup, named: Mapping[str, torch.Tensor], buckets: list[list[str]],
                  indices: list[int], largest: int, timings: dict[str, float]) -> int:
        """Broadcast ``buckets[i]`` for ``i`` in ``indices`` from group rank 0, back to back: bucket
        ``i + 1`` is flattened while bucket ``i`` is on the wire, and a buffer is refilled only
        after the broadcast that used it completed (on GPU, ``wait`` orders the stream).  Adds the
        flattening time to ``timings["flatten_s"]``; returns the bytes sent.  Each ``wait`` is
        bounded by the group's timeout."""
        pending: collections.deque[Any] = collections.deque()
        total = 0
        for i in indices:
            if len(pending) == 2:
                pending.popleft().wait()
            t = time.perf_counter()
            flat = self.bucket_bytes(named, buckets, i, largest)
            timings["flatten_s"] = timings.get("flatten_s", 0.0) + time.perf_counter() - t
            pending.append(group.broadcast_async(flat, 0))
            total += flat.numel()
        while pending:
            pending.popleft().wait()
        return total
