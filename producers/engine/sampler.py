"""The embedded engine's batched sampler: one token per row of a (batch, vocab) logits tensor, on
the logits' device, with one device-to-host copy for the whole batch.

What: :class:`SamplerBatch` holds the sampling parameters of a batch's rows as device tensors
(rebuilt only when the batch changes); :func:`sample` draws one token per row and returns its
log-prob; :class:`UniformStream` gives each sequence its reproducible uniform numbers;
:func:`sample_rows` is the one-call form (parameters and generators per row).

The math (the engine's contract since the first sampler, kept token for token):
- log-prob = ``log_softmax(logits / temperature)`` of the sampled token, before any truncation;
  greedy rows (``temperature < 1e-6``) take the argmax with ``log_softmax(logits)``.
- Every non-greedy token consumes one float64 uniform ``u`` from its sequence's
  ``torch.Generator``; the token is where ``u x total`` falls in the CDF of the (truncated)
  distribution: ``searchsorted(cdf, u * cdf[-1], right=True)``, in vocabulary order without
  truncation, in stable descending-probability order with top-k / top-p / min-p (SGLang's rules:
  top-p keeps tokens whose preceding mass is ``<= top_p``, min-p keeps ``p >= min_p * p_max``, at
  least one token always).
- A uniform that lands at or past the end of the CDF (``u x total`` rounding up to ``total``)
  takes the last token that adds probability mass (never a zero-probability token).
Each row's result depends only on its own logits, parameters and uniform, so a seeded request
samples the same tokens whatever else is in the batch (up to the logits themselves, which the
forward computes).

Why batched: the first sampler looped over rows with several host syncs per row (31.7 ms per
step at batch 256 with vocab 151,936 on an H200, 76 ms with top-p 0.95).  Here the work is a
fixed number of batched kernels; only the sort for truncation is skipped when no row needs it
(decided on the host from the parameters, without looking at the device).

Run: not on its own; ``decode.py`` calls it.  Tests: ``tests/test_engine_sampler.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from producers.engine.sampling import SamplingParams

UNIFORM_BLOCK = 64  # uniforms drawn per refill (the same numbers as one draw per token)


class UniformStream:
    """A sequence's uniform numbers in [0, 1), drawn from its generator ``UNIFORM_BLOCK`` at a time.

    ``torch.rand(n, generator=g, dtype=float64)`` yields the same numbers as ``n`` single draws, so
    block refills change nothing about which numbers a sequence sees."""

    __slots__ = ("_buf", "_i", "generator")

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._buf: list[float] = []
        self._i = 0

    def next(self) -> float:
        if self._i == len(self._buf):
            self._buf = torch.rand(UNIFORM_BLOCK, generator=self.generator, dtype=torch.float64).tolist()
            self._i = 0
        u = self._buf[self._i]
        self._i += 1
        return u


@dataclass
class SamplerBatch:
    """Per-row sampling parameters of one batch, on the sampling device."""

    size: int
    temperature: torch.Tensor  # (b, 1) float32, 1.0 for greedy rows
    greedy: torch.Tensor  # (b,) bool
    top_k: torch.Tensor  # (b, 1) int64, vocab when disabled
    top_p: torch.Tensor  # (b, 1) float32, +inf when disabled
    min_p: torch.Tensor  # (b, 1) float32
    truncated: torch.Tensor  # (b, 1) bool: the row uses top-k / top-p / min-p
    greedy_rows: list[bool]
    any_greedy: bool
    all_greedy: bool
    truncate: bool  # some row uses top-k / top-p / min-p
    all_truncate: bool  # every row does
    unit_temperature: bool  # every row divides by 1.0 (skipped: dividing by 1 is exact)

    @classmethod
    def build(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> SamplerBatch:
        greedy = [p.greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        top_k = [vocab if p.top_k == -1 else min(vocab, p.top_k) for p in params]
        top_p = [float("inf") if p.top_p >= 1.0 else p.top_p for p in params]
        min_p = [p.min_p if p.min_p > 0.0 else 0.0 for p in params]
        # any top-k at all (even >= vocab) means "sorted order", as the engine always did
        truncated = [not g and (p.top_k != -1 or p.top_p < 1.0 or p.min_p > 0.0) for p, g in zip(params, greedy, strict=True)]

        def col(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device)[:, None]

        return cls(
            size=len(params), temperature=col(temps, torch.float32),
            greedy=torch.tensor(greedy, dtype=torch.bool).to(device), top_k=col(top_k, torch.int64),
            top_p=col(top_p, torch.float32), min_p=col(min_p, torch.float32),
            truncated=torch.tensor(truncated, dtype=torch.bool).to(device)[:, None], greedy_rows=greedy,
            any_greedy=any(greedy), all_greedy=all(greedy), truncate=any(truncated),
            all_truncate=all(t or g for t, g in zip(truncated, greedy, strict=True)),
            unit_temperature=all(t == 1.0 for t in temps),
        )

    def uniforms(self, streams: list[UniformStream]) -> list[float]:
        """One uniform per non-greedy row (greedy rows draw nothing, as always)."""
        return [0.0 if g else s.next() for g, s in zip(self.greedy_rows, streams, strict=True)]


def sample(logits: torch.Tensor, batch: SamplerBatch, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (b,) int64 and their log-probs (b,) float32, on ``logits.device``; ``u`` (b,) float64."""
    scaled = logits.float() if batch.unit_temperature else logits.float() / batch.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    if batch.all_greedy:
        tokens = logp.argmax(dim=-1)
        return tokens, logp.gather(1, tokens[:, None])[:, 0]
    probs = logp.exp()
    target_u = u.to(device=logits.device, dtype=torch.float32)[:, None]
    if batch.truncate:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        if not batch.all_truncate:  # rows without truncation keep the vocabulary order
            sorted_p = torch.where(batch.truncated, sorted_p, probs)
            order = torch.where(batch.truncated, order, torch.arange(probs.shape[-1], device=probs.device))
        cdf = torch.cumsum(sorted_p, dim=-1)
        keep = batch.top_k
        nucleus = ((cdf - sorted_p) <= batch.top_p).sum(-1, keepdim=True).clamp(min=1)
        keep = torch.minimum(keep, nucleus)
        above = (sorted_p >= batch.min_p * sorted_p[:, :1]).sum(-1, keepdim=True).clamp(min=1)
        keep = torch.minimum(keep, above)
    else:
        cdf = torch.cumsum(probs, dim=-1)
        keep = torch.full_like(target_u, cdf.shape[-1], dtype=torch.int64)
        order = None
    total = cdf.gather(1, keep - 1)
    j = torch.searchsorted(cdf, target_u * total, right=True)
    past_end = j >= keep
    # past the end (u x total rounded up to total): the last position that adds mass, which is
    # where the CDF first reaches its total (never a zero-probability token)
    last_mass = torch.searchsorted(cdf, total, right=False).clamp(max=cdf.shape[-1] - 1)
    j = torch.where(past_end, torch.minimum(last_mass, keep - 1), j)
    tokens = (j if order is None else order.gather(1, j))[:, 0]
    if batch.any_greedy:
        tokens = torch.where(batch.greedy, logp.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> tuple[list[int], list[float]]:
    """One token per row and its log-prob, drawing one uniform per non-greedy row from its
    generator (the one-call form of :func:`sample`, for tests and small tools)."""
    batch = SamplerBatch.build(params, logits.shape[-1], logits.device)
    u = [0.0 if g else float(torch.rand((), generator=gen, dtype=torch.float64))
         for g, gen in zip(batch.greedy_rows, generators, strict=True)]
    tokens, logprobs = sample(logits, batch, torch.tensor(u, dtype=torch.float64))
    return tokens.tolist(), logprobs.tolist()
