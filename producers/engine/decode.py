"""The embedded engine's scheduler: one thread that owns the model and runs continuous batching.

What: :class:`Scheduler` admits requests in FIFO order into free KV slots (a fixed number, sized
from the memory budget at start-up: ``kvcache.py``), prefills them in batches of at most
``engine.prefill_chunk_tokens`` padded tokens per iteration (a longer prompt is prefilled one
chunk per iteration), and runs one decode step per iteration for every running sequence
(``batch.py``; CUDA graphs on GPU: ``graphs.py``; the forward: ``model.py``).  Each sampled token
is recorded with its exact log-prob, the policy version of the weights that sampled it and a
monotonic timestamp.  Every other thread talks to the scheduler only through closures put on its
inbox (:meth:`Scheduler.submit`, :meth:`abort`, :meth:`pause`, :meth:`swap_weights`,
:meth:`call`), which run *between* decode steps; answers come back as
``concurrent.futures.Future`` objects (the HTTP server wraps them with ``asyncio.wrap_future``).

Why: a weight swap is then a plain closure that runs between two decode steps: generation stops
only for the copy, never for the network transfer (DESIGN §8), and per-token versions switch
exactly at the swap.  Memory is bounded by construction: the KV cache is allocated once, and a
request waits in the FIFO until a slot is free.

Log-probs: the log-prob of the sampled token under ``softmax(logits / temperature)``, i.e. after
temperature and *before* top-k/top-p/min-p truncation (what SGLang returns, and what the
trainer's recomputation with the same temperature reproduces).  With ``temperature == 0``
(greedy) it is ``log_softmax(logits)`` of the argmax token (``sampler.py``).

Run: not on its own; ``python -m producers.engine --model DIR`` starts it (see server.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from pipeline.configbase import ConfigError
from pipeline.profiling import StepProfiler
from producers.engine.batch import GenRequest, RunningBatch, Seq
from producers.engine.config import EngineConfig
from producers.engine.graphs import DecodeRunner, use_compiled_kernels
from producers.engine.kvcache import (
    KVCache,
    KVShape,
    MemoryPlan,
    cuda_index,
    device_total_memory,
    memory_in_use,
    plan_memory,
    working_memory,
)
from producers.engine.metrics import EngineMetrics
from producers.engine.model import DecoderModel, compile_kernels, weight_bytes
from producers.engine.sampler import UniformStream

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_MAX_SEQ_LEN = 4096

__all__ = ["GenRequest", "Scheduler"]


def build_batch(model: torch.nn.Module, cfg: EngineConfig, metrics: EngineMetrics,
                device: torch.device) -> tuple[RunningBatch, MemoryPlan]:
    """The decode path for ``model`` under ``cfg``'s memory budget (ConfigError naming the key
    when the budget cannot hold one sequence)."""
    mcfg = model.config
    context = int(getattr(mcfg, "max_position_embeddings", 0) or DEFAULT_MAX_SEQ_LEN)
    if cfg.max_seq_len > context:
        raise ConfigError("engine.max_seq_len", f"{cfg.max_seq_len} exceeds the model's context length {context}")
    max_seq_len = cfg.max_seq_len or min(context, DEFAULT_MAX_SEQ_LEN)
    cuda = device.type == "cuda"
    decoder = DecoderModel(model, max_seq_len, fuse=cuda, attention=cfg.attn_implementation)
    graphs = cfg.cuda_graphs and cuda
    if graphs and decoder.moe:
        log.warning("CUDA graphs off: the MoE layers run transformers' expert block, which synchronises with the host")
        metrics.fallbacks.labels("cuda_graph").inc()
        graphs = False
    shape = KVShape(len(decoder.layers), decoder.kv_heads, decoder.head_dim, decoder.dtype)
    weights = weight_bytes(model)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    staging = params * (2 if decoder.adopts else 1)  # the weight receiver's arena (weights.py)
    inter = int(getattr(mcfg, "intermediate_size", 0) or 4 * decoder.hidden)
    working = working_memory(min(cfg.max_running_requests, 4096), decoder.vocab, decoder.hidden, inter,
                             (decoder.num_heads + 2 * decoder.kv_heads) * decoder.head_dim, cfg.prefill_chunk_tokens,
                             torch.empty((), dtype=decoder.dtype).element_size())
    plan = plan_memory(device_total=device_total_memory(device), mem_fraction=cfg.effective_mem_fraction,
                       max_total_tokens=cfg.max_total_tokens, max_seq_len=max_seq_len,
                       max_running_requests=cfg.max_running_requests, weights=weights, staging=staging,
                       working=working, bytes_per_token=shape.bytes_per_token)
    if cuda:  # a hard cap for this process's allocator: fail an allocation rather than take a co-resident trainer's memory
        torch.cuda.set_per_process_memory_fraction(cfg.effective_mem_fraction, cuda_index(device))
    cache = KVCache(shape, plan.slots, max_seq_len, device)
    log.info("%s", plan.describe())
    if plan.slots < cfg.max_running_requests:
        log.warning("the memory budget holds %d sequences, fewer than max_running_requests=%d: the rest wait in "
                    "the queue", plan.slots, cfg.max_running_requests)
    runner = DecodeRunner(decoder, cache, metrics, graphs=graphs)
    if cfg.compile and cuda:
        use_compiled_kernels(decoder, cache, metrics, compile_kernels())
    metrics.memory_limit.set(plan.limit)
    metrics.kv_cache_bytes.set(cache.nbytes)
    metrics.slots.set(plan.slots)
    return RunningBatch(decoder, cache, runner, cfg.prefill_chunk_tokens), plan


class Scheduler:
    """Owns the model; every method except the constructor is safe to call from any thread."""

    def __init__(self, model: torch.nn.Module, cfg: EngineConfig, metrics: EngineMetrics, device: torch.device) -> None:
        self.model = model
        self.cfg = cfg
        self.metrics = metrics
        self.device = device
        self.version = cfg.weight_version
        mcfg = model.config
        self.vocab_size: int = int(mcfg.vocab_size)
        self.eos_ids: frozenset[int] = _eos_ids(model)
        self.batch, self.plan = build_batch(model, cfg, metrics, device)
        self.context_len: int = self.plan.max_seq_len  # prompt + max_new_tokens must fit one KV slot
        self.model_context_len: int = int(getattr(mcfg, "max_position_embeddings", 0) or self.context_len)
        self._params = dict(model.named_parameters())
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._waiting: deque[GenRequest] = deque()
        self._retracted: list[Seq] = []
        self._paused = False
        self._stop = False
        self._counter = itertools.count()
        self._memory_checked = 0.0
        self._deadlines_checked = 0.0
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        self.profiler = StepProfiler()  # POST /start_profile windows over decode steps (scheduler thread only)
        metrics.version.set(self.version)

    @property
    def adopts(self) -> bool:
        """Whether a full weight update may be adopted by pointer (not with fused weights or CUDA graphs)."""
        return self.batch.decoder.adopts and not self.batch.runner.graphs_enabled

    # ---------------------------------------------------------------- public, thread-safe API
    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest) -> cf.Future[dict[str, Any]]:
        self._inbox.put(lambda: self._waiting.append(req))
        return req.future

    def abort(self, rid: str | None, message: str = "aborted by request") -> None:
        """Abort one request by rid, or every queued and running request when rid is None."""
        self._inbox.put(lambda: self._abort(rid, message))

    def pause(self, mode: str) -> cf.Future[None]:
        return self.call(lambda: self._pause(mode))

    def resume(self) -> cf.Future[None]:
        return self.call(self._resume)

    def swap_weights(self, staged: dict[str, torch.Tensor], version: int, adopt: bool = False) -> cf.Future[float]:
        """Put ``staged`` into the live parameters between two decode steps; resolves to the pause in s.
        ``adopt``: point the parameters at the staged tensors (they must cover every parameter and
        stay untouched afterwards) instead of copying them in; ignored (a copy) when the decode
        path holds the parameters' storage (:attr:`adopts` false)."""
        return self.call(lambda: self._swap(staged, version, adopt))

    def call(self, fn: Callable[[], T]) -> cf.Future[T]:
        """Run ``fn`` on the scheduler thread between decode steps (also while paused)."""
        fut: cf.Future[T] = cf.Future()
        if self._stop or not self._thread.is_alive():
            fut.set_exception(RuntimeError("engine scheduler is not running"))
        else:
            self._inbox.put(functools.partial(_resolve, fut, fn))
        return fut

    def stop(self, timeout: float = 5.0) -> None:
        """Abort everything, end the loop and wait for the thread."""
        self._inbox.put(self._request_stop)
        self._thread.join(timeout)

    def state(self) -> dict[str, Any]:
        """A racy-but-harmless snapshot for /get_server_info."""
        return {
            "weight_version": str(self.version),
            "running_requests": len(self.batch) + len(self._retracted),
            "queued_requests": len(self._waiting),
            "paused": self._paused,
        }

    # ---------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        log.info("scheduler started (%d KV slots of %d tokens)", self.plan.slots, self.plan.max_seq_len)
        with torch.inference_mode():
            while not self._stop:
                try:
                    self._iteration()
                except Exception:
                    log.exception("scheduler iteration failed; aborting the running batch")
                    for seq in self.batch.clear() + self._retracted:
                        self._finish(seq, {"type": "abort", "message": "engine error (see engine log)"})
                    self._retracted = []
            self._shutdown()
        log.info("scheduler stopped")

    def _iteration(self) -> None:
        busy = len(self.batch) or self._waiting or self._retracted
        self._drain(block=self._paused or not busy)
        if self._stop:
            return
        self._expire_deadlines()
        if not self._paused:
            if self._retracted:
                self._sampled(self.batch.prefill(self._retracted, self.version))
                self._retracted = []
                self._sweep()
            if self.batch.chunking is None:
                self._admit()
            if self.batch.chunking is not None:
                self._sampled(self.batch.continue_chunk(self.version))
                self._sweep()
            if self.batch.rows:
                t0 = time.perf_counter()
                with self.profiler.span("slipstream.decode_step"):  # a named span in run.profile_steps' traces
                    self._sampled(self.batch.decode(self.version))
                self.metrics.decode_steps.inc()
                self.metrics.step_seconds.observe(time.perf_counter() - t0)
                self.profiler.after_step()
                self._sweep()
        self._report()

    def _report(self) -> None:
        m = self.metrics
        m.running.set(len(self.batch) + len(self._retracted))
        m.queued.set(len(self._waiting))
        m.kv_used_bytes.set(self.batch.used_tokens() * self.batch.cache.shape.bytes_per_token)
        now = time.monotonic()
        if now - self._memory_checked > 0.5:
            self._memory_checked = now
            self.memory()

    def decode_info(self) -> dict[str, Any]:
        return decode_info(self)

    def memory(self) -> dict[str, int]:
        """The engine's memory figures now (bytes), also set as metrics."""
        used, peak = memory_in_use(self.device)
        self.metrics.memory_used.set(used)
        self.metrics.memory_peak.set(peak)
        return {"limit_bytes": self.plan.limit, "used_bytes": used, "peak_bytes": peak,
                "kv_cache_bytes": self.batch.cache.nbytes, "weights_bytes": self.plan.weights,
                "kv_slots": self.plan.slots, "max_seq_len": self.plan.max_seq_len}

    def _drain(self, block: bool) -> None:
        try:
            fn = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                fn()
            except Exception:
                log.exception("scheduler command failed")
            if self._stop:
                return
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._sweep()

    def _request_stop(self) -> None:
        self._stop = True

    def _shutdown(self) -> None:
        self._abort(None, "engine shutting down")
        while True:  # fail whatever arrived after the stop
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                break
            fn()
            self._abort(None, "engine shutting down")

    def _finish(self, seq: Seq, reason: dict[str, Any]) -> None:
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        self.metrics.requests.labels(reason["type"]).inc()
        try:
            seq.req.future.set_result(seq.response(self.version))
        except cf.InvalidStateError:  # the HTTP side gave up (client went away)
            pass

    def _abort(self, rid: str | None, message: str) -> None:
        reason = {"type": "abort", "message": message}
        for req in [r for r in self._waiting if rid is None or r.rid == rid]:
            self._waiting.remove(req)
            self._finish(Seq(req=req, uniforms=UniformStream(torch.Generator())), reason)
        for seq in self.batch.all() + self._retracted:
            if rid is None or seq.req.rid == rid:
                self._finish(seq, reason)
        self._sweep()

    def _pause(self, mode: str) -> None:
        if mode == "abort":
            self._abort(None, "generation paused with mode=abort")
        elif mode == "retract":
            # Drop the KV caches; the sequences are re-prefilled (with the then-current weights) on continue.
            self._retracted.extend(self.batch.clear())
        self._paused = True
        self.metrics.paused.set(1)
        log.info("generation paused (mode=%s)", mode)

    def _resume(self) -> None:
        self._paused = False
        self.metrics.paused.set(0)
        log.info("generation continued")

    def _swap(self, staged: dict[str, torch.Tensor], version: int, adopt: bool = False) -> float:
        t0 = time.perf_counter()
        adopted = adopt and self.adopts
        with self.profiler.span("slipstream.swap_weights"):
            _put_weights(self._params, staged, adopted, self.device)
        old, self.version = self.version, version
        if self.cfg.recompute_kv_on_update and len(self.batch):
            self.batch.recompute()
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        pause = time.perf_counter() - t0
        self.metrics.pause_seconds.observe(pause)
        self.metrics.version.set(version)
        log.info("weights swapped: version %d -> %d (%d tensors %s, pause %.2f ms)", old, version, len(staged),
                 "adopted" if adopted else "copied", pause * 1e3)
        return pause

    def _expire_deadlines(self) -> None:
        """Abort requests older than ``request_timeout_s`` (checked at most every 50 ms; the FIFO is in
        arrival order, so only its head is looked at)."""
        limit = self.cfg.request_timeout_s
        now = time.monotonic()
        if limit <= 0 or now - self._deadlines_checked < 0.05:
            return
        self._deadlines_checked = now
        expired = [s.req for s in self.batch.all() + self._retracted if now - s.req.submitted > limit]
        expired += itertools.takewhile(lambda req: now - req.submitted > limit, self._waiting)
        for req in expired:
            self._abort(req.rid, f"request timeout ({limit:.0f}s)")

    def _new_seq(self, req: GenRequest) -> Seq:
        seed = req.params.sampling_seed
        if seed is None:
            seed = (self.cfg.seed * 1_000_003 + next(self._counter)) % (1 << 63)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return Seq(req=req, uniforms=UniformStream(gen))

    # ---------------------------------------------------------------- batching
    def _admit(self) -> None:
        """FIFO into free slots, at most ``prefill_chunk_tokens`` padded prompt tokens per iteration;
        a longer prompt starts a chunked prefill (alone)."""
        budget = self.cfg.prefill_chunk_tokens
        new: list[Seq] = []
        width = 0
        while self._waiting and len(new) < self.batch.free_slots:
            req = self._waiting[0]
            if req.future.done():  # cancelled while queued
                self._waiting.popleft()
                continue
            n = len(req.input_ids)
            if new and (n > budget or (len(new) + 1) * max(width, n) > budget):
                break
            self._waiting.popleft()
            seq = self._new_seq(req)
            if req.params.max_new_tokens == 0:
                self._finish(seq, {"type": "length", "length": 0})
                continue
            if n > budget:
                self.metrics.prompt_tokens.inc(n)
                self.batch.start_chunked(seq)
                return
            new.append(seq)
            width = max(width, n)
        if not new:
            return
        self.metrics.prompt_tokens.inc(sum(len(s.req.input_ids) for s in new))
        self._sampled(self.batch.prefill(new, self.version))
        self._sweep()

    def _sampled(self, seqs: list[Seq]) -> None:
        """Count the tokens just sampled for ``seqs`` and finish those that are done."""
        self.metrics.generated_tokens.inc(len(seqs))
        self._finish_checks(seqs)

    def _finish_checks(self, seqs: list[Seq]) -> None:
        """Finish the sequences that are done (:func:`_finish_reason`)."""
        for seq in seqs:
            reason = _finish_reason(seq, self.eos_ids)
            if reason is not None:
                self._finish(seq, reason)

    def _sweep(self) -> None:
        self.batch.retire()
        self._retracted = [s for s in self._retracted if s.finish_reason is None]


def decode_info(s: Scheduler) -> dict[str, Any]:
    """How decode runs (for /get_server_info): CUDA graphs, compiled kernels, fused weights, attention."""
    runner, decoder = s.batch.runner, s.batch.decoder
    return {"cuda_graphs": runner.graphs_enabled, "graphs_captured": runner.num_graphs, "graph_capture_s": runner.capture_seconds,
            "compiled_kernels": decoder.kernels.compiled, "fused_weights": decoder.fused, "attention": decoder.attention,
            "adopts_weight_updates": s.adopts}


def _resolve(fut: cf.Future[T], fn: Callable[[], T]) -> None:
    """Run ``fn`` into ``fut`` (on the scheduler thread; :meth:`Scheduler.call`)."""
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:  # delivered to the caller
        fut.set_exception(e)


def _put_weights(params: dict[str, torch.nn.Parameter], staged: dict[str, torch.Tensor], adopt: bool,
                 device: torch.device) -> None:
    """Put ``staged`` into ``params``: point them at the staged tensors (``adopt``: every
    parameter must be there) or copy them in; on CUDA, wait until the copy is done."""
    if adopt:
        if set(staged) != set(params):
            raise ValueError("adopting a weight update needs every parameter")
        for name, tensor in staged.items():
            params[name].data = tensor
    elif staged:
        with torch.no_grad():  # one multi-tensor copy, not one kernel launch per tensor
            torch._foreach_copy_([params[name] for name in staged], list(staged.values()))
    if device.type == "cuda":
        # The pause is the copy, not its launch; and decode kernels still reading the old
        # weights finish before the caller lets the next update overwrite them.
        torch.cuda.current_stream(device).synchronize()


def _finish_reason(seq: Seq, eos_ids: frozenset[int]) -> dict[str, Any] | None:
    """SGLang's order: length first, then EOS / stop_token_ids (both skipped with ignore_eos); None: not done."""
    p = seq.req.params
    if len(seq.output_ids) >= p.max_new_tokens:
        return {"type": "length", "length": p.max_new_tokens}
    last = seq.output_ids[-1]
    if not p.ignore_eos and (last in eos_ids or last in p.stop_token_ids):
        return {"type": "stop", "matched": last}
    return None


def _eos_ids(model: torch.nn.Module) -> frozenset[int]:
    """EOS ids of the model config and of generation_config.json (instruct models often add one there)."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)
