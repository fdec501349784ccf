"""The embedded engine's scheduler: one thread that owns the model and runs continuous batching.

What: :class:`Scheduler` admits requests (FIFO, up to ``max_running_requests``), prefills them as a
left-padded *cohort* with its own ``DynamicCache``, merges the cohort into the running one (KV
left-padded to a common length) and runs one decode step per iteration for every running sequence.
Each sampled token is recorded with its exact log-prob, the policy version of the weights that
sampled it and a monotonic timestamp.  Every other thread talks to the scheduler only through
closures put on its inbox (:meth:`Scheduler.submit`, :meth:`abort`, :meth:`pause`,
:meth:`swap_weights`, :meth:`call`), which run *between* decode steps; answers come back as
``concurrent.futures.Future`` objects (the HTTP server wraps them with ``asyncio.wrap_future``).

Why: a weight swap is then a plain closure that runs between two decode steps: generation stops
only for the copy, never for the network transfer (DESIGN §8), and per-token versions switch
exactly at the swap.

Log-probs: the log-prob of the sampled token under ``softmax(logits / temperature)``, i.e. after
temperature and *before* top-k/top-p/min-p truncation (what SGLang returns, and what the
trainer's recomputation with the same temperature reproduces).  With ``temperature == 0``
(greedy) it is ``log_softmax(logits)`` of the argmax token.

Run: not on its own; ``python -m producers.engine --model DIR`` starts it (see server.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from producers.engine.config import EngineConfig
from producers.engine.metrics import EngineMetrics
from producers.engine.sampling import SamplingParams, sample_rows

try:  # transformers >= 4.56 keeps per-layer tensors in ``cache.layers``
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: cohorts are never merged
    DynamicLayer = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class GenRequest:
    """One sequence to generate (a batch /generate call becomes several)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    future: cf.Future[dict[str, Any]] = field(default_factory=cf.Future)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Seq:
    req: GenRequest
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None

    def response(self, version: int) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": self.req.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.req.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": 0,
            "weight_version": str(version),
            "e2e_latency": time.monotonic() - self.req.submitted,
            # slipstream extensions: version of the weights that sampled each token, and the engine's
            # monotonic clock when each token was sampled.
            "output_token_weight_versions": list(self.versions),
            "output_token_times": list(self.times),
        }
        if self.req.return_logprob:
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(self.logprobs, self.output_ids, strict=True)]
        return {"text": "", "output_ids": list(self.output_ids), "meta_info": meta}


@dataclass
class _Cohort:
    """Sequences decoded by one forward: left-padded rows sharing one KV cache and attention mask."""

    seqs: list[_Seq]
    cache: Any
    mask: torch.Tensor  # (B, T) 1 for real tokens in the cache, 0 for left padding
    next_pos: torch.Tensor  # (B,) position of the token fed next
    next_tokens: torch.Tensor  # (B,) the last sampled token, fed at the next step


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
        self.pad_id: int = int(getattr(mcfg, "pad_token_id", None) or 0)
        self.context_len: int = int(getattr(mcfg, "max_position_embeddings", 0) or 1 << 30)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._params = dict(model.named_parameters())
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._waiting: deque[GenRequest] = deque()
        self._cohorts: list[_Cohort] = []
        self._retracted: list[_Seq] = []
        self._paused = False
        self._stop = False
        self._counter = itertools.count()
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        metrics.version.set(self.version)

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
        stay untouched afterwards) instead of copying them in."""
        return self.call(lambda: self._swap(staged, version, adopt))

    def call(self, fn: Callable[[], T]) -> cf.Future[T]:
        """Run ``fn`` on the scheduler thread between decode steps (also while paused)."""
        fut: cf.Future[T] = cf.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # delivered to the caller
                fut.set_exception(e)

        if self._stop or not self._thread.is_alive():
            fut.set_exception(RuntimeError("engine scheduler is not running"))
        else:
            self._inbox.put(run)
        return fut

    def stop(self, timeout: float = 5.0) -> None:
        """Abort everything, end the loop and wait for the thread."""
        self._inbox.put(self._request_stop)
        self._thread.join(timeout)

    def state(self) -> dict[str, Any]:
        """A racy-but-harmless snapshot for /get_server_info."""
        return {
            "weight_version": str(self.version),
            "running_requests": sum(len(c.seqs) for c in self._cohorts) + len(self._retracted),
            "queued_requests": len(self._waiting),
            "paused": self._paused,
        }

    # ---------------------------------------------------------------- scheduler thread
    def _run(self) -> None:
        log.info("scheduler started (max_running_requests=%d)", self.cfg.max_running_requests)
        with torch.inference_mode():
            while not self._stop:
                try:
                    self._iteration()
                except Exception:
                    log.exception("scheduler iteration failed; aborting the running batch")
                    for seq in self._all_running():
                        self._finish(seq, {"type": "abort", "message": "engine error (see engine log)"})
                    self._cohorts, self._retracted = [], []
            self._shutdown()
        log.info("scheduler stopped")

    def _iteration(self) -> None:
        idle = self._paused or not (self._cohorts or self._waiting or self._retracted)
        self._drain(block=idle)
        if self._stop:
            return
        self._expire_deadlines()
        if not self._paused:
            if self._retracted:
                self._restore(self._retracted)
                self._retracted = []
            self._admit()
            for cohort in list(self._cohorts):
                self._decode_step(cohort)
            self._sweep()
        self.metrics.running.set(sum(len(c.seqs) for c in self._cohorts) + len(self._retracted))
        self.metrics.queued.set(len(self._waiting))

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

    def _all_running(self) -> list[_Seq]:
        return [s for c in self._cohorts for s in c.seqs] + list(self._retracted)

    def _finish(self, seq: _Seq, reason: dict[str, Any]) -> None:
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
            self._finish(_Seq(req=req, generator=torch.Generator()), reason)
        for seq in self._all_running():
            if rid is None or seq.req.rid == rid:
                self._finish(seq, reason)
        self._retracted = [s for s in self._retracted if s.finish_reason is None]
        self._sweep()

    def _pause(self, mode: str) -> None:
        if mode == "abort":
            self._abort(None, "generation paused with mode=abort")
        elif mode == "retract":
            # Drop the KV caches; the sequences are re-prefilled (with the then-current weights) on continue.
            self._retracted.extend(s for c in self._cohorts for s in c.seqs)
            self._cohorts = []
        self._paused = True
        self.metrics.paused.set(1)
        log.info("generation paused (mode=%s)", mode)

    def _resume(self) -> None:
        self._paused = False
        self.metrics.paused.set(0)
        log.info("generation continued")

    def _swap(self, staged: dict[str, torch.Tensor], version: int, adopt: bool = False) -> float:
        t0 = time.perf_counter()
        if adopt:
            if set(staged) != set(self._params):
                raise ValueError("adopting a weight update needs every parameter")
            for name, tensor in staged.items():
                self._params[name].data = tensor
        elif staged:
            with torch.no_grad():  # one multi-tensor copy, not one kernel launch per tensor
                torch._foreach_copy_([self._params[name] for name in staged], list(staged.values()))
        first = next(iter(self._params.values()), None)
        if first is not None and first.is_cuda:
            # The pause is the copy, not its launch; and decode kernels still reading the old
            # weights finish before the caller lets the next update overwrite them.
            torch.cuda.current_stream(first.device).synchronize()
        old, self.version = self.version, version
        if self.cfg.recompute_kv_on_update and self._cohorts:
            running = [s for c in self._cohorts for s in c.seqs]
            self._cohorts = []
            self._restore(running)
        pause = time.perf_counter() - t0
        self.metrics.pause_seconds.observe(pause)
        self.metrics.version.set(version)
        log.info("weights swapped: version %d -> %d (%d tensors %s, pause %.2f ms)", old, version, len(staged),
                 "adopted" if adopt else "copied", pause * 1e3)
        return pause

    def _expire_deadlines(self) -> None:
        limit = self.cfg.request_timeout_s
        if limit <= 0:
            return
        now = time.monotonic()
        reqs = list(self._waiting) + [s.req for s in self._all_running()]
        for req in reqs:
            if now - req.submitted > limit:
                self._abort(req.rid, f"request timeout ({limit:.0f}s)")

    def _new_seq(self, req: GenRequest) -> _Seq:
        seed = req.params.sampling_seed
        if seed is None:
            seed = (self.cfg.seed * 1_000_003 + next(self._counter)) % (1 << 63)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return _Seq(req=req, generator=gen)

    # ---------------------------------------------------------------- batching
    def _admit(self) -> None:
        running = sum(len(c.seqs) for c in self._cohorts)
        new: list[_Seq] = []
        while self._waiting and running + len(new) < self.cfg.max_running_requests:
            req = self._waiting.popleft()
            if req.future.done():  # cancelled while queued
                continue
            seq = self._new_seq(req)
            if seq.req.params.max_new_tokens == 0:
                self._finish(seq, {"type": "length", "length": 0})
                continue
            new.append(seq)
        if not new:
            return
        contexts = [s.req.input_ids for s in new]
        cohort, logits = self._prefill(contexts)
        cohort.seqs = new
        self.metrics.prompt_tokens.inc(sum(len(c) for c in contexts))
        cohort.next_tokens = self._sample_and_record(new, logits)
        self._finish_checks(new)
        self._remove_finished(cohort)
        if cohort.seqs:
            self._add_cohort(cohort)

    def _restore(self, seqs: list[_Seq]) -> None:
        """Rebuild KV for running sequences (prompt + output but the last token, which is fed next)."""
        seqs = [s for s in seqs if s.finish_reason is None]
        if not seqs:
            return
        cohort, _ = self._prefill([s.req.input_ids + s.output_ids[:-1] for s in seqs])
        cohort.seqs = seqs
        cohort.next_tokens = torch.tensor([s.output_ids[-1] for s in seqs], dtype=torch.long, device=self.device)
        self._add_cohort(cohort)

    def _prefill(self, contexts: list[list[int]]) -> tuple[_Cohort, torch.Tensor]:
        width = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, ctx in enumerate(contexts):
            ids[i, width - len(ctx) :] = torch.tensor(ctx, dtype=torch.long)
            mask[i, width - len(ctx) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(ids, mask, pos, cache)
        next_pos = torch.tensor([len(c) for c in contexts], dtype=torch.long, device=self.device)
        cohort = _Cohort(seqs=[], cache=cache, mask=mask, next_pos=next_pos, next_tokens=next_pos)
        return cohort, logits

    def _decode_step(self, cohort: _Cohort) -> None:
        t0 = time.perf_counter()
        ones = torch.ones((len(cohort.seqs), 1), dtype=cohort.mask.dtype, device=self.device)
        cohort.mask = torch.cat([cohort.mask, ones], dim=1)
        logits = self._forward(cohort.next_tokens[:, None], cohort.mask, cohort.next_pos[:, None], cohort.cache)
        cohort.next_pos = cohort.next_pos + 1
        cohort.next_tokens = self._sample_and_record(cohort.seqs, logits)
        self._finish_checks(cohort.seqs)
        self.metrics.decode_steps.inc()
        self.metrics.step_seconds.observe(time.perf_counter() - t0)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
        return out.logits[:, -1, :]

    def _new_cache(self) -> Any:
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # pragma: no cover - older transformers
            return DynamicCache()

    def _sample_and_record(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        tokens, logprobs = sample_rows(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        for seq, tok, lp in zip(seqs, tokens, logprobs, strict=True):
            seq.output_ids.append(tok)
            seq.logprobs.append(lp)
            seq.versions.append(self.version)
            seq.times.append(now)
        self.metrics.generated_tokens.inc(len(seqs))
        return torch.tensor(tokens, dtype=torch.long, device=self.device)

    def _finish_checks(self, seqs: list[_Seq]) -> None:
        """SGLang's order: length first, then EOS / stop_token_ids (both skipped with ignore_eos)."""
        for seq in seqs:
            p = seq.req.params
            if len(seq.output_ids) >= p.max_new_tokens:
                self._finish(seq, {"type": "length", "length": p.max_new_tokens})
                continue
            last = seq.output_ids[-1]
            if not p.ignore_eos and (last in self.eos_ids or last in p.stop_token_ids):
                self._finish(seq, {"type": "stop", "matched": last})

    def _sweep(self) -> None:
        for cohort in self._cohorts:
            self._remove_finished(cohort)
        self._cohorts = [c for c in self._cohorts if c.seqs]

    def _remove_finished(self, cohort: _Cohort) -> None:
        keep = [i for i, s in enumerate(cohort.seqs) if s.finish_reason is None]
        if len(keep) == len(cohort.seqs):
            return
        cohort.seqs = [cohort.seqs[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        cohort.cache.batch_select_indices(idx)
        cohort.mask = cohort.mask[idx]
        cohort.next_pos = cohort.next_pos[idx]
        cohort.next_tokens = cohort.next_tokens[idx]
        layers = _plain_layers(cohort.cache)
        if layers is not None:  # drop left-padding columns no remaining row needs
            first = int(torch.nonzero(cohort.mask.sum(0))[0])
            if first > 0:
                for layer in layers:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]
                cohort.mask = cohort.mask[:, first:]

    def _add_cohort(self, cohort: _Cohort) -> None:
        for running in self._cohorts:
            if _merge_into(running, cohort):
                return
        self._cohorts.append(cohort)


def _eos_ids(model: torch.nn.Module) -> frozenset[int]:
    """EOS ids of the model config and of generation_config.json (instruct models often add one there)."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return frozenset(ids)


def _plain_layers(cache: Any) -> list[Any] | None:
    """The cache's layers when every one is a plain, initialized DynamicLayer (safe to pad/trim)."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or not layers:
        return None
    if any(type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4 for layer in layers):
        return None
    return list(layers)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge_into(dst: _Cohort, src: _Cohort) -> bool:
    """Append src's rows to dst (left-padding the shorter KV). False when the caches can't be merged."""
    dl, sl = _plain_layers(dst.cache), _plain_layers(src.cache)
    if dl is None or sl is None or len(dl) != len(sl):
        return False
    td, ts = dst.mask.shape[1], src.mask.shape[1]
    width = max(td, ts)
    for a, b in zip(dl, sl, strict=True):
        a.keys = torch.cat([_pad_left(a.keys, width - td, 2), _pad_left(b.keys, width - ts, 2)], dim=0)
        a.values = torch.cat([_pad_left(a.values, width - td, 2), _pad_left(b.values, width - ts, 2)], dim=0)
    dst.mask = torch.cat([_pad_left(dst.mask, width - td, 1), _pad_left(src.mask, width - ts, 1)], dim=0)
    dst.next_pos = torch.cat([dst.next_pos, src.next_pos])
    dst.next_tokens = torch.cat([dst.next_tokens, src.next_tokens])
    dst.seqs = dst.seqs + src.seqs
    return True
