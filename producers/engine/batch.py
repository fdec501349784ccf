"""The sequences being decoded, their KV slots, and the prefill / decode / sample work on them.

What: :class:`RunningBatch` (used by the scheduler thread only) holds every running sequence
(:class:`Seq`) in a :class:`producers.engine.kvcache.SlotTable` and runs:

- :meth:`RunningBatch.prefill`: new (or restored) sequences become decode rows in one batched,
  right-padded prefill per group of at most ``prefill_chunk_tokens`` padded tokens; sequences
  without output yet get their first token sampled from the prefill logits;
- :meth:`RunningBatch.start_chunked` / :meth:`continue_chunk`: one prompt longer than the chunk
  budget is prefilled one chunk per scheduler iteration in the top slot (decode steps of the
  other sequences run in between), then moved to the next decode row;
- :meth:`RunningBatch.decode`: one decode step for every row, then one batched sample and one
  device-to-host copy of (tokens, log-probs);
- :meth:`RunningBatch.retire`: finished rows leave; the last rows' K/V move into the holes;
- :meth:`RunningBatch.recompute`: re-prefill every running sequence's context in place (after a
  weight swap with ``engine.recompute_kv_on_update``).

Why a separate class: the scheduler deals with requests, commands, pauses and weights; this
deals with tensors and slots, and its accounting can be tested on its own
(``tests/test_engine_kv.py``: no slot leaks after 10,000 requests).

Run: not on its own; see ``decode.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from producers.engine.graphs import DecodeRunner
from producers.engine.kvcache import KVCache, SlotTable
from producers.engine.model import DecoderModel
from producers.engine.sampler import SamplerBatch, UniformStream, sample
from producers.engine.sampling import SamplingParams


@dataclass
class GenRequest:
    """One sequence to generate (a batch /generate call becomes several)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool
    future: cf.Future[dict[str, Any]] = field(default_factory=cf.Future)
    submitted: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Seq:
    """A request being generated: its outputs so far and how much of it is in its KV slot."""

    req: GenRequest
    uniforms: UniformStream
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: dict[str, Any] | None = None
    kv_len: int = 0  # positions whose K/V are in the cache

    def context(self) -> list[int]:
        """What the cache must hold before the next decode step: the prompt and every output
        token but the last (which is fed at that step)."""
        return self.req.input_ids + self.output_ids[:-1] if self.output_ids else self.req.input_ids

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


class RunningBatch:
    """Running sequences in KV slots, and the work on them (scheduler thread only)."""

    def __init__(self, decoder: DecoderModel, cache: KVCache, runner: DecodeRunner, prefill_tokens: int) -> None:
        self.decoder = decoder
        self.cache = cache
        self.runner = runner
        self.prefill_tokens = prefill_tokens
        self.table: SlotTable[Seq] = SlotTable(cache.slots)
        self._sampler: SamplerBatch | None = None  # the rows' sampling parameters, rebuilt when rows change
        self.prefill_seconds = 0.0

    @property
    def rows(self) -> list[Seq]:
        return self.table.rows

    @property
    def chunking(self) -> Seq | None:
        return self.table.top

    @property
    def free_slots(self) -> int:
        return self.table.free

    def __len__(self) -> int:
        return self.table.used

    def all(self) -> list[Seq]:
        return list(self.table)

    def used_tokens(self) -> int:
        return sum(s.kv_len for s in self.table)

    # ------------------------------------------------------------------ prefill
    def prefill(self, seqs: list[Seq], version: int) -> list[Seq]:
        """Make ``seqs`` decode rows with their contexts in the cache; returns those that got a
        (first) token sampled."""
        if len(seqs) > self.table.free:
            raise RuntimeError(f"{len(seqs)} sequences for {self.table.free} free KV slots")
        sampled: list[Seq] = []
        group: list[Seq] = []
        width = 0
        for seq in seqs:
            n = len(seq.context())
            if n > self.prefill_tokens:  # a restored long context: chunk by chunk, in line
                sampled += self._flush(group, version)
                group, width = [], 0
                slot = self.table.add_row(seq)
                logits = self._prefill_long(slot, seq.context(), want_logits=not seq.output_ids)
                sampled += self._first_tokens([seq], logits, version)
                continue
            if group and (len(group) + 1) * max(width, n) > self.prefill_tokens:
                sampled += self._flush(group, version)
                group, width = [], 0
            group.append(seq)
            width = max(width, n)
        sampled += self._flush(group, version)
        self._sampler = None
        return sampled

    def _flush(self, group: list[Seq], version: int) -> list[Seq]:
        if not group:
            return []
        lo = len(self.table.rows)
        for seq in group:
            self.table.add_row(seq)
        contexts = [s.context() for s in group]
        ids, lens = self._pad(contexts)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(self.cache, ids, lens, lo, logits=any(not s.output_ids for s in group))
        self.prefill_seconds += time.perf_counter() - t0
        for seq, n in zip(group, lens, strict=True):
            seq.kv_len = n
        return self._first_tokens(group, logits, version)

    def _prefill_long(self, slot: int, context: list[int], want_logits: bool, upto: int | None = None) -> torch.Tensor | None:
        """Prefill ``context[:upto]`` into ``slot`` in chunks of at most ``prefill_tokens``."""
        end = len(context) if upto is None else upto
        logits = None
        t0 = time.perf_counter()
        for start in range(0, end, self.prefill_tokens):
            stop = min(end, start + self.prefill_tokens)
            ids = torch.tensor([context[start:stop]], dtype=torch.int64).to(self.decoder.device)
            logits = self.decoder.prefill(self.cache, ids, [stop - start], slot, start=start,
                                          logits=want_logits and stop == end)
        self.prefill_seconds += time.perf_counter() - t0
        seq = self._owner(slot)
        if seq is not None:
            seq.kv_len = end
        return logits

    def _owner(self, slot: int) -> Seq | None:
        if slot < len(self.table.rows):
            return self.table.rows[slot]
        return self.table.top if slot == self.table.top_slot else None

    def start_chunked(self, seq: Seq) -> None:
        """Park a new sequence whose prompt exceeds the chunk budget; :meth:`continue_chunk` prefills it."""
        self.table.add_top(seq)
        seq.kv_len = 0

    def continue_chunk(self, version: int) -> list[Seq]:
        """Prefill the next chunk of the parked prompt; when it is complete, move it to a decode row
        and sample its first token (returned)."""
        seq = self.table.top
        if seq is None:
            return []
        prompt = seq.req.input_ids
        start = seq.kv_len
        stop = min(len(prompt), start + self.prefill_tokens)
        ids = torch.tensor([prompt[start:stop]], dtype=torch.int64).to(self.decoder.device)
        t0 = time.perf_counter()
        logits = self.decoder.prefill(self.cache, ids, [stop - start], self.table.top_slot, start=start,
                                      logits=stop == len(prompt))
        self.prefill_seconds += time.perf_counter() - t0
        seq.kv_len = stop
        if stop < len(prompt):
            return []
        src, dst = self.table.promote_top()
        self.cache.move(src, dst, seq.kv_len)
        self._sampler = None
        return self._first_tokens([seq], logits, version)

    def _first_tokens(self, seqs: list[Seq], logits: torch.Tensor | None, version: int) -> list[Seq]:
        fresh = [i for i, s in enumerate(seqs) if not s.output_ids]
        if not fresh or logits is None:
            return []
        rows = [seqs[i] for i in fresh]
        if len(fresh) < len(seqs):
            logits = logits[torch.tensor(fresh, device=logits.device)]
        batch = SamplerBatch.build([s.req.params for s in rows], self.decoder.vocab, logits.device)
        self._sample_and_record(rows, logits, batch, version)
        return rows

    def _pad(self, contexts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        lens = [len(c) for c in contexts]
        width = max(lens)
        ids = torch.zeros((len(contexts), width), dtype=torch.int64)
        for i, ctx in enumerate(contexts):
            ids[i, : len(ctx)] = torch.tensor(ctx, dtype=torch.int64)
        return ids.to(self.decoder.device), lens

    # ------------------------------------------------------------------ decode
    def decode(self, version: int) -> list[Seq]:
        """One decode step for every row; returns the rows (each got one token)."""
        rows = self.table.rows
        logits = self.runner.run([s.output_ids[-1] for s in rows], [s.kv_len for s in rows])
        if self._sampler is None or self._sampler.size != len(rows):
            self._sampler = SamplerBatch.build([s.req.params for s in rows], self.decoder.vocab, logits.device)
        self._sample_and_record(rows, logits, self._sampler, version)
        for seq in rows:
            seq.kv_len += 1
        return rows

    def _sample_and_record(self, seqs: list[Seq], logits: torch.Tensor, batch: SamplerBatch, version: int) -> None:
        u = torch.tensor(batch.uniforms([s.uniforms for s in seqs]), dtype=torch.float64)
        tokens, logprobs = sample(logits, batch, u)
        host = torch.stack([tokens.double(), logprobs.double()]).cpu().tolist()  # the one device->host copy
        now = time.monotonic()
        for seq, tok, lp in zip(seqs, host[0], host[1], strict=True):
            seq.output_ids.append(int(tok))
            seq.logprobs.append(lp)
            seq.versions.append(version)
            seq.times.append(now)

    # ------------------------------------------------------------------ retire, recompute
    def retire(self) -> list[Seq]:
        """Remove finished sequences (moving K/V of the last rows into their slots); returns them."""
        done = {i for i, s in enumerate(self.table.rows) if s.finish_reason is not None}
        out = [self.table.rows[i] for i in sorted(done)]
        if done:
            for src, dst in self.table.retire(done):
                self.cache.move(src, dst, self.table.rows[dst].kv_len)
            self._sampler = None
        top = self.table.top
        if top is not None and top.finish_reason is not None:
            out.append(top)
            self.table.drop_top()
        return out

    def clear(self) -> list[Seq]:
        """Drop every sequence from the batch (their slots are free; K/V are not kept)."""
        self._sampler = None
        out = self.table.clear()
        for seq in out:
            seq.kv_len = 0
        return out

    def recompute(self) -> None:
        """Re-prefill every running sequence's context in its slot with the live weights."""
        rows = self.table.rows
        i = 0
        while i < len(rows):
            n = len(rows[i].context())
            if n > self.prefill_tokens:
                self._prefill_long(i, rows[i].context(), want_logits=False)
                i += 1
                continue
            j, width = i, 0
            while j < len(rows) and (j - i + 1) * max(width, len(rows[j].context())) <= self.prefill_tokens:
                width = max(width, len(rows[j].context()))
                j += 1
            ids, lens = self._pad([s.context() for s in rows[i:j]])
            t0 = time.perf_counter()
            self.decoder.prefill(self.cache, ids, lens, i, logits=False)
            self.prefill_seconds += time.perf_counter() - t0
            i = j
        top = self.table.top
        if top is not None and top.kv_len > 0:
            self._prefill_long(self.table.top_slot, top.req.input_ids, want_logits=False, upto=top.kv_len)
