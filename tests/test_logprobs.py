"""Fused, chunked log-probs and entropy (consumers/logprobs.py) against the reference path.

In-process (TP = 1, CPU):
- fp64: log-probs, entropies and both gradients (hidden, weight) equal log_softmax on the full
  logits to ~1e-12 for several chunk sizes (one chunk, uneven chunks, one column per chunk), with
  a temperature and a token subset; the log-prob-only backward (no entropy gradient) too;
- fp32: equal to the trainer's previous path (Megatron's ``vocab_parallel_cross_entropy`` and
  ``vocab_parallel_entropy`` / ``entropy_from_logits`` on full logits) within 1e-5 relative, also
  for logits of magnitude ~1e3 (no overflow in the online log-sum-exp);
- tokens outside ``index`` get 0 and no gradient;
- ``emit_hidden``: a built GPTModel returns hidden states inside the block and logits outside, and
  the fused log-probs of those hidden states equal the log-probs of those logits.

TP = 2 (torchrun, 2 processes, marked slow): each rank holds half the vocabulary; log-probs,
entropies, the (TP-all-reduced) hidden gradient and each rank's weight-shard gradient equal the
full-vocabulary reference within 1e-5 relative.  Run the worker by hand:
``OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/test_logprobs.py OUT.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from consumers.logprobs import fused_logprobs, select_index
from tests.helpers import torchrun

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _case(dtype: torch.dtype, b: int = 3, s: int = 7, h: int = 16, v: int = 50, scale: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, h, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(v, h, dtype=dtype, generator=g) * scale).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    select = torch.rand(b, s, generator=g) > 0.3
    coef = torch.randn(b, s, dtype=dtype, generator=g), torch.randn(b, s, dtype=dtype, generator=g)
    return hidden, weight, labels, select, coef


def _reference(hidden, weight, labels, select, temperature):
    z = (hidden @ weight.t()) / temperature
    logp_all = torch.log_softmax(z, -1)
    lp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return lp * select, ent * select


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("chunk_cols", [50, 11, 1])
def test_fused_equals_log_softmax_fp64(chunk_cols):
    hidden, weight, labels, select, (a, c) = _case(torch.float64)
    n = int(select.sum())
    lp, ent = fused_logprobs(hidden, weight, labels, select_index(select), temperature=0.7, chunk_bytes=8 * n * chunk_cols)
    rlp, rent = _reference(hidden, weight, labels, select, 0.7)
    assert _rel(lp, rlp) < 1e-12 and _rel(ent, rent) < 1e-12
    g = torch.autograd.grad((a * lp).sum() + (c * ent).sum(), (hidden, weight), retain_graph=True)
    rg = torch.autograd.grad((a * rlp).sum() + (c * rent).sum(), (hidden, weight), retain_graph=True)
    assert max(_rel(x, y) for x, y in zip(g, rg, strict=True)) < 1e-12
    g = torch.autograd.grad((a * lp).sum(), (hidden, weight))  # no entropy gradient: the cheaper path
    rg = torch.autograd.grad((a * rlp).sum(), (hidden, weight))
    assert max(_rel(x, y) for x, y in zip(g, rg, strict=True)) < 1e-12


@pytest.mark.parametrize("scale", [2.0, 300.0])
def test_fused_equals_megatron_path_fp32(scale):
    """The trainer's previous path: full logits -> Megatron's vocab-parallel CE and entropy."""
    from megatron.core import tensor_parallel

    from consumers.loss import vocab_parallel_entropy
    from consumers.model import initialize_parallel
    from consumers.policy_loss import entropy_from_logits
    from consumers.trainer import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    initialize_parallel(1, 1)
    hidden, weight, labels, select, (a, c) = _case(torch.float32, scale=scale)
    lp, ent = fused_logprobs(hidden, weight, labels, select_index(select), temperature=0.7, chunk_bytes=4 * 20 * 13)
    z = (hidden @ weight.t()).float() / 0.7
    ref_ent_stat = vocab_parallel_entropy(z) * select
    ref_ent = entropy_from_logits(z) * select
    ref_lp = -tensor_parallel.vocab_parallel_cross_entropy(z.clone(), labels) * select
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert _rel(lp, ref_lp) < 1e-5
    if scale > 10:  # peaked softmax: entropy ~0 from a cancellation of ~1e3-sized terms; vs fp64 truth
        _, true_ent = _reference(hidden.double(), weight.double(), labels, select, 0.7)
        ours, theirs = float((ent - true_ent).abs().max()), float((ref_ent_stat - true_ent).abs().max())
        print(f"entropy abs error vs fp64: fused {ours:.3g}, reference path {theirs:.3g}")
        assert ours <= theirs + 1e-6
        return
    assert _rel(ent, ref_ent_stat) < 1e-5
    g = torch.autograd.grad((a * lp).sum() + (c * ent).sum(), (hidden, weight))
    rg = torch.autograd.grad((a * ref_lp).sum() + (c * ref_ent).sum(), (hidden, weight))
    assert max(_rel(x, y) for x, y in zip(g, rg, strict=True)) < 1e-5


def test_unselected_tokens_are_zero_without_gradient():
    hidden, weight, labels, select, _ = _case(torch.float64)
    lp, ent = fused_logprobs(hidden, weight, labels, select_index(select), chunk_bytes=8 * 64 * 7)
    assert (lp[~select] == 0).all() and (ent[~select] == 0).all() and (lp[select] < 0).all()
    (gh,) = torch.autograd.grad(lp.sum() + ent.sum(), (hidden,))
    assert (gh[~select] == 0).all() and (gh[select].abs().sum(-1) > 0).all()
    full, _ = fused_logprobs(hidden, weight, labels, None)  # index None: every token
    assert torch.allclose(full[select], lp[select], rtol=1e-12, atol=0)


def test_emit_hidden_on_a_built_model(tmp_path):
    from consumers.bridge import unwrap_gpt
    from consumers.config import TrainerConfig
    from consumers.logprobs import emit_hidden, output_weight
    from consumers.trainer import TrainerRank, init_distributed
    from pipeline.tiny import make_tiny_model

    torch.set_num_threads(1)
    init_distributed()
    rank = TrainerRank(TrainerConfig(seed=2), make_tiny_model(tmp_path / "m"))
    gpt = unwrap_gpt(rank.model)
    tokens = torch.randint(1, 16, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9).expand(2, 9)
    with torch.no_grad():
        logits = rank.model(tokens, pos, None)
        with emit_hidden(gpt):
            hidden = rank.model(tokens, pos, None)
        again = rank.model(tokens, pos, None)
    assert hidden.shape == (2, 9, rank.spec.hidden_size) and logits.shape[-1] == rank.spec.vocab_size
    assert torch.equal(logits, again), "emit_hidden must not outlive its block"
    labels = torch.roll(tokens, -1, dims=1)
    lp, _ = fused_logprobs(hidden, output_weight(gpt), labels)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert _rel(lp, ref) < 1e-5


# ------------------------------------------------------------------ TP = 2


def worker(out_path: str) -> None:
    import torch.distributed as dist

    from consumers.model import initialize_parallel
    from consumers.trainer import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    initialize_parallel(2, 1)
    from megatron.core import parallel_state as ps

    rank, group = dist.get_rank(), ps.get_tensor_model_parallel_group()
    res = {}
    for chunk_cols in (25, 7):
        hidden, weight, labels, select, (a, c) = _case(torch.float32, v=50)
        shard = weight.detach()[rank * 25 : (rank + 1) * 25].clone().requires_grad_()
        lp, ent = fused_logprobs(hidden, shard, labels, select_index(select), 0.7, group, chunk_bytes=4 * 20 * chunk_cols)
        rlp, rent = _reference(hidden, weight, labels, select, 0.7)
        gh, gw = torch.autograd.grad((a * lp).sum() + (c * ent).sum(), (hidden, shard))
        rgh, rgw = torch.autograd.grad((a * rlp).sum() + (c * rent).sum(), (hidden, weight))
        res[f"cols{chunk_cols}"] = {
            "lp": _rel(lp, rlp), "ent": _rel(ent, rent), "grad_hidden": _rel(gh, rgh),
            "grad_weight": _rel(gw, rgw[rank * 25 : (rank + 1) * 25]),
        }
    out = [None, None]
    dist.all_gather_object(out, res)
    if rank == 0:
        Path(out_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fused_tp2_equals_full_vocab(tmp_path):
    out = tmp_path / "tp2.json"
    cmd, env = torchrun(__file__, str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for per_rank in json.loads(out.read_text()):
        for case, diffs in per_rank.items():
            assert all(d < 1e-5 for d in diffs.values()), (case, diffs)


if __name__ == "__main__":
    worker(sys.argv[1])
