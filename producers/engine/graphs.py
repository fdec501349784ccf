"""Running the decode step: eagerly, or as CUDA graphs captured per (batch, width) bucket.

What: :class:`DecodeRunner.run` takes the host lists of a decode batch (the token fed to each row
and its position) and returns the logits (b, vocab).  On CUDA with ``engine.cuda_graphs`` it pads
the batch to a *batch bucket* and the attention width (cache positions read) to a *width
bucket*, and replays a CUDA graph captured for that pair the first time it is needed; elsewhere
it runs :meth:`DecoderModel.decode` eagerly with the exact shapes.

Graph correctness rules kept here:
- static inputs: the graphs read tokens/positions/write-slots from persistent device buffers
  (filled by one host-to-device copy per step) and write logits into a persistent buffer, so
  every captured graph shares the same input and output memory;
- padding rows: positions 0 and K/V writes into the cache's scratch slot, so they never touch a
  real sequence's cache (their logits are ignored);
- capture after warm-up: two eager runs of the same shapes on a side stream first (cuBLAS
  workspaces, ``torch.compile`` of the element-wise kernels), then capture on that stream into
  one shared memory pool, with ``capture_error_mode="thread_local"`` so the weight receiver's
  thread may keep using CUDA meanwhile; no device-wide synchronisation (a weight receive waiting
  for its broadcast on another stream must not hold a capture up);
- no host synchronisation inside: the decode function has none by construction;
- a failed capture (or compiled-kernel failure) is logged, counted in
  ``slipstream_engine_fallbacks_total{reason=...}`` and turns graphs off for the rest of the run:
  decoding continues eagerly instead of crashing.

Why buckets: a graph has fixed shapes.  Width buckets keep attention reading about as many
positions as the longest running sequence needs (not the whole slot); batch buckets are fine
below 64 rows and coarser above.

Run: not on its own; the scheduler owns one.  CPU tests run the eager path; the GPU path runs in
``slipstream bench engine --device cuda`` and ``pytest -m gpu``.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch

from producers.engine.kvcache import KVCache
from producers.engine.metrics import EngineMetrics
from producers.engine.model import DecoderModel, Kernels

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """2, 4, 8, then every 8 up to 256, every 16 up to 512, every 32 beyond; always max_batch.  A
    batch of one runs as two rows (the compiled kernels are compiled for two or more rows, and a
    second row costs next to nothing in a step that reads every weight anyway)."""
    out = [2, 4, 8]
    b = 8
    while b < max_batch:
        b += 8 if b < 256 else 16 if b < 512 else 32
        out.append(b)
    return sorted({min(x, max_batch) for x in out})


def width_buckets(max_len: int) -> list[int]:
    """Multiples of 64 up to 512, then four steps per doubling; always max_len."""
    out: list[int] = []
    w, step = 64, 64
    while w < max_len:
        out.append(w)
        if w >= 512 and w >= 8 * step:
            step *= 2
        w += step
    out.append(max_len)
    return sorted(set(out))


def _bucket(buckets: list[int], n: int) -> int:
    return buckets[bisect.bisect_left(buckets, n)]


class DecodeRunner:
    """Eager or graph-replayed decode steps over one model and cache (see the module docstring)."""

    def __init__(self, model: DecoderModel, cache: KVCache, metrics: EngineMetrics, *, graphs: bool,
                 max_graphs: int = 1024, emulate: bool = False) -> None:
        """``emulate`` (tests, CPU): run the bucketed static-buffer path, with "replay" an eager call of
        the captured function, so the padding and buffer logic is tested without a GPU."""
        self.model = model
        self.cache = cache
        self.metrics = metrics
        self.device = model.device
        cuda = self.device.type == "cuda"
        self.graphs_enabled = (graphs and cuda) or emulate
        self.max_graphs = max_graphs
        self.batches = batch_buckets(cache.slots)
        self.widths = width_buckets(cache.max_seq_len)
        self._graphs: dict[tuple[int, int], Any] = {}
        if self.graphs_enabled:
            n = self.batches[-1]
            host = torch.zeros((3, n), dtype=torch.int64)
            self._host = host.pin_memory() if cuda else host
            self._inputs = torch.zeros((3, n), dtype=torch.int64, device=self.device)  # tokens, positions, write slots
            self._logits = torch.empty((n, model.vocab), dtype=model.dtype, device=self.device)
            if cuda:
                self._pool = torch.cuda.graph_pool_handle()
                self._stream = torch.cuda.Stream(self.device)
        self.capture_seconds = 0.0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (b, vocab) for rows 0 .. b-1 (row i = slot i)."""
        b = len(tokens)
        need = max(positions) + 1
        if self.graphs_enabled:
            try:
                return self._replay(tokens, positions, b, need)
            except Exception as e:  # never crash the engine for a graph: decode eagerly from now on
                self._disable(f"CUDA graph replay/capture failed: {e!r}", "cuda_graph")
        ids = torch.tensor(tokens, dtype=torch.int64).to(self.device)
        pos = torch.tensor(positions, dtype=torch.int64).to(self.device)
        slots = torch.arange(b, device=self.device)
        width = need if self.device.type == "cpu" else _bucket(self.widths, need)
        return self.model.decode(self.cache, ids, pos, slots, width)

    def _disable(self, why: str, reason: str) -> None:
        log.warning("%s; decoding without CUDA graphs from now on (slower, still correct)", why)
        self.metrics.fallbacks.labels(reason).inc()
        self.graphs_enabled = False
        self._graphs.clear()

    def _replay(self, tokens: list[int], positions: list[int], b: int, need: int) -> torch.Tensor:
        bp, width = _bucket(self.batches, b), _bucket(self.widths, need)
        graph = self._graphs.get((bp, width))
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(f"more than {self.max_graphs} decode graphs")
            graph = self._capture(bp, width)
        host = self._host
        host[0, :b] = torch.tensor(tokens, dtype=torch.int64)
        host[1, :b] = torch.tensor(positions, dtype=torch.int64)
        host[2, :b] = torch.arange(b)
        if bp > b:
            host[0:2, b:bp] = 0
            host[2, b:bp] = self.cache.scratch
        # the whole (3, max batch) buffer: one contiguous pinned copy (the previous step's copy
        # is done: the scheduler waited for that step's tokens)
        self._inputs.copy_(host, non_blocking=True)
        graph.replay()
        return self._logits[:b]

    def _step(self, bp: int, width: int) -> None:
        inp = self._inputs
        self.model.decode(self.cache, inp[0, :bp], inp[1, :bp], inp[2, :bp], width, out=self._logits[:bp])

    def _capture(self, bp: int, width: int) -> Any:
        if self.device.type != "cuda":  # emulation: "replay" runs the function the graph would hold
            self._graphs[(bp, width)] = graph = _Emulated(lambda: self._step(bp, width))
            return graph
        t0 = time.perf_counter()
        current = torch.cuda.current_stream(self.device)
        # safe inputs for warm-up and capture: position 0, writes into the scratch slot
        self._inputs[:2, :bp].zero_()
        self._inputs[2, :bp].fill_(self.cache.scratch)
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(self._stream):
            for _ in range(2):
                self._step(bp, width)
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                self._step(bp, width)
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        self._graphs[(bp, width)] = graph
        dt = time.perf_counter() - t0
        self.capture_seconds += dt
        self.metrics.graphs.set(len(self._graphs))
        self.metrics.graph_capture_seconds.inc(dt)
        log.info("captured decode graph batch=%d width=%d in %.0f ms (%d graphs)", bp, width, dt * 1e3, len(self._graphs))
        return graph


class _Emulated:
    def __init__(self, fn: Any) -> None:
        self.replay = fn


def use_compiled_kernels(model: DecoderModel, cache: KVCache, metrics: EngineMetrics, compiled: Kernels) -> bool:
    """Switch ``model`` to ``compiled`` kernels if a probe decode (batch 3) and prefill with
    them runs and agrees with the eager kernels; otherwise keep eager ones (logged, counted).
    Compiling happens here, once, before any graph is captured.  Probes write only into the
    cache's scratch slot.  Returns whether the compiled kernels are now in use."""
    eager = model.kernels

    def probe(kernels: Kernels) -> list[torch.Tensor]:
        model.kernels = kernels
        dev = model.device
        outs = []
        for b in (3,):
            ids = torch.arange(1, b + 1, device=dev) % model.vocab
            pos = torch.arange(b, device=dev)
            slots = torch.full((b,), cache.scratch, device=dev)
            outs.append(model.decode(cache, ids, pos, slots, min(64, cache.max_seq_len)).float())
        ids = (torch.arange(1, 6, device=dev) % model.vocab)[None, :]
        logits = model.prefill(cache, ids, [5], cache.scratch)
        assert logits is not None
        outs.append(logits.float())
        return outs

    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # as on the scheduler thread (dynamo guards on it)
            want = probe(eager)
            got = probe(compiled)
        for a, e in zip(got, want, strict=True):
            if not torch.isfinite(a).all() or (a - e).abs().max() > 0.05 * e.abs().max() + 0.05:
                raise RuntimeError(f"compiled kernels disagree with the eager ones (max diff {(a - e).abs().max():.3g})")
    except Exception as e:
        model.kernels = eager
        log.warning("torch.compile of the element-wise kernels failed (%r); using eager kernels (slower, correct)", e)
        metrics.fallbacks.labels("compile").inc()
        return False
    log.info("element-wise kernels compiled in %.1f s", time.perf_counter() - t0)
    return True
