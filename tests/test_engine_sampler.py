"""The engine's batched sampler against the row-by-row sampler it replaced (kept here as the oracle).

Covers: identical tokens and log-probs for the same seeds over random logits, vocabularies,
temperatures, top-k / top-p / min-p mixes, ties and underflowing probabilities; one row's result
does not depend on its batch company; block-drawn uniforms equal one-at-a-time draws; a seeded
stream is reproducible; greedy rows consume no uniforms.

    /work/venv/bin/pytest tests/test_engine_sampler.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from producers.engine.sampler import UNIFORM_BLOCK, SamplerBatch, UniformStream, sample, sample_rows
from producers.engine.sampling import SamplingParams


# ---------------------------------------------------------------------- the previous sampler (oracle)
def row_sampler(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> tuple[list[int], list[float]]:
    """The engine's sampler before it was batched (producers/engine/sampling.py, 2026-11-26), verbatim."""
    logits = logits.float()
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
    logp = torch.log_softmax(logits / temps[:, None], dim=-1)
    tokens: list[int] = []
    logprobs: list[float] = []
    for i, p in enumerate(params):
        row = logp[i]
        if p.greedy:
            tok = int(torch.argmax(row))
        else:
            u = float(torch.rand((), generator=generators[i], dtype=torch.float64))
            tok = _draw(row.exp(), p, u)
        tokens.append(tok)
        logprobs.append(float(row[tok]))
    return tokens, logprobs


def _draw(probs: torch.Tensor, p: SamplingParams, u: float) -> int:
    vocab = probs.numel()
    if p.top_k == -1 and p.top_p >= 1.0 and p.min_p <= 0.0:
        order = None
        kept = probs
    else:
        kept, order = torch.sort(probs, descending=True, stable=True)
        keep = vocab if p.top_k == -1 else min(vocab, p.top_k)
        if p.top_p < 1.0:
            cum = torch.cumsum(kept, 0)
            keep = min(keep, max(1, int(((cum - kept) <= p.top_p).sum())))
        if p.min_p > 0.0:
            keep = min(keep, max(1, int((kept >= p.min_p * kept[0]).sum())))
        kept = kept[:keep]
    cdf = torch.cumsum(kept, 0)
    target = torch.tensor([u], dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    j = min(int(torch.searchsorted(cdf, target, right=True)), kept.numel() - 1)
    while j > 0 and float(kept[j]) == 0.0:
        j -= 1
    return j if order is None else int(order[j])


def random_case(rng: random.Random, trial: int) -> tuple[torch.Tensor, list[SamplingParams], list[int]]:
    b = rng.randint(1, 12)
    vocab = rng.choice([5, 16, 100, 1000, 5000])
    scale = rng.choice([0.5, 3.0, 30.0, 300.0])  # 300: most probabilities underflow to exactly 0
    logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(trial)) * scale
    if trial % 7 == 0:
        logits[:, : vocab // 2] = logits[:, :1]  # ties
    params = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 1.3]), top_k=rng.choice([-1, -1, 1, 3, 50]),
                             top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.01]), min_p=rng.choice([0.0, 0.0, 0.05, 0.5]))
              for _ in range(b)]
    return logits, params, [rng.randrange(1 << 30) for _ in range(b)]


def test_batched_sampler_gives_the_row_samplers_tokens_and_logprobs() -> None:
    rng = random.Random(0)
    rows = 0
    for trial in range(120):
        logits, params, seeds = random_case(rng, trial)
        for step in range(3):
            old = row_sampler(logits, params, [torch.Generator().manual_seed(s + step) for s in seeds])
            new = sample_rows(logits, params, [torch.Generator().manual_seed(s + step) for s in seeds])
            assert new == old, (trial, step, params)
            rows += len(params)
    assert rows > 2000


def test_a_rows_token_does_not_depend_on_its_batch_company() -> None:
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(9)) * 3
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=0),
              SamplingParams(top_k=4), SamplingParams(min_p=0.1), SamplingParams(temperature=1.2)]
    together = sample_rows(logits, params, [torch.Generator().manual_seed(i) for i in range(6)])
    for i in range(6):
        alone = sample_rows(logits[i : i + 1], params[i : i + 1], [torch.Generator().manual_seed(i)])
        assert alone == ([together[0][i]], [together[1][i]])


def test_uniform_blocks_equal_single_draws_and_greedy_rows_draw_nothing() -> None:
    stream = UniformStream(torch.Generator().manual_seed(42))
    single = torch.Generator().manual_seed(42)
    for _ in range(3 * UNIFORM_BLOCK + 5):
        assert stream.next() == float(torch.rand((), generator=single, dtype=torch.float64))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    batch = SamplerBatch.build(params, 10, torch.device("cpu"))
    streams = [UniformStream(torch.Generator().manual_seed(1)), UniformStream(torch.Generator().manual_seed(2))]
    untouched = UniformStream(torch.Generator().manual_seed(1))
    for _ in range(UNIFORM_BLOCK + 3):
        u = batch.uniforms(streams)
        assert u[0] == 0.0 and 0.0 <= u[1] < 1.0
    assert streams[0].next() == untouched.next()  # the greedy row's generator was never advanced


def test_seeded_stream_is_reproducible_and_respects_truncation() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)) * 2
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(min_p=0.3)]
    batch = SamplerBatch.build(params, 64, torch.device("cpu"))

    def run(seed: int) -> list[list[int]]:
        streams = [UniformStream(torch.Generator().manual_seed(seed + i)) for i in range(3)]
        out = []
        for _ in range(300):
            toks, _ = sample(logits, batch, torch.tensor(batch.uniforms(streams), dtype=torch.float64))
            out.append(toks.tolist())
        return out

    a = run(7)
    assert a == run(7) and a != run(8)
    probs = torch.softmax(logits, -1)
    assert {t[0] for t in a} <= set(torch.topk(logits[0], 3).indices.tolist()) and len({t[0] for t in a}) == 3
    order = torch.sort(probs[1], descending=True, stable=True)
    nucleus = int(((order.values.cumsum(0) - order.values) <= 0.5).sum())
    assert {t[1] for t in a} <= set(order.indices[:nucleus].tolist())
    assert {t[2] for t in a} <= set(torch.nonzero(probs[2] >= 0.3 * probs[2].max()).flatten().tolist())


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
def test_logprob_is_before_truncation(temperature: float) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=temperature, top_k=5, top_p=0.9)] * 4
    toks, lps = sample_rows(logits, params, [torch.Generator().manual_seed(i) for i in range(4)])
    scale = temperature if temperature > 0 else 1.0
    want = torch.log_softmax(logits / scale, -1)
    for i, (t, lp) in enumerate(zip(toks, lps, strict=True)):
        assert lp == float(want[i, t])
        if temperature == 0.0:
            assert t == int(logits[i].argmax())
