"""Broadcast planned buckets of HF-named tensors from rank 0 of a weight group (DESIGN §8).

What: :class:`BucketSender` is the sending half shared by :class:`consumers.publisher.WeightPublisher`
(trainer rank 0, which also drives the engines over HTTP) and the pipeline-stage leaders of
:mod:`consumers.stage_publish` (which only broadcast their own stage's part).  Both send exactly
the same byte sequence for the same tensors and ``bucket_bytes``: one broadcast per bucket of
:func:`consumers.publisher.plan_buckets`, in order, each the bucket's tensors' bytes back to back.

How: bucket ``i + 1`` is flattened while bucket ``i`` is on the wire (two persistent flat buffers,
allocated once and grown when needed); a bucket whose tensors already lie back to back (a
:class:`consumers.publish_async.WeightSnapshot`) is sent from a view, without a copy.

    sender = BucketSender("gloo")
    sent = sender.broadcast(group, named, buckets, list(range(len(buckets))), largest, timings)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import Any

import torch

from pipeline.weightsync import WeightGroup, contiguous_span, flatten_into


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
        if span is not None:
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
