"""Packed == padded on one CUDA GPU (megatron-core local spec, no Transformer Engine, no network).

Run on a GPU machine: ``pytest tests/test_packing_gpu.py -m gpu``.  Without CUDA every test is
skipped (reported as skipped, never passed); with CUDA each test asserts that the model's weights
and the log-probs really are on the GPU, so it cannot pass on the CPU path by accident.

Checks, with the tiny Qwen3 model (128 hidden, 2 layers) and trajectories of up to ~200 tokens:
- fp32 (TF32 off): per-token log-probs, loss and gradients of packed and padded training agree
  (log-probs <= 1e-4 abs, loss rel 1e-5, gradients <= 1e-4 x the largest gradient entry);
- bf16 (``trainer.megatron.bf16``): packed vs padded differ no more than bf16 rounding does, i.e.
  at most 2x the difference between bf16 and fp32 padded log-probs (plus 1e-3), and the loss
  within rel 2e-2;
- the mask is used on the GPU code path too (local spec: the trainer's mask; sdpa spec: its
  per-segment attention): dropping it moves later trajectories' log-probs by far more than the
  tolerance;
- the sdpa spec's variable-length (jagged) FlashAttention path equals its dense block mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_packing import groups_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from consumers.trainer import init_distributed
    from pipeline.tiny import make_tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    init_distributed()
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=2048)


def _run(model_dir, groups, packing: str, bf16: bool, **kw):
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    cfg = TrainerConfig(
        seed=3, grad_clip=0.0, packing=packing, micro_batch_size=8, max_tokens_per_microbatch=1024,
        megatron={"bf16": True} if bf16 else {}, **kw,
    )
    tr = TrainerRank(cfg, model_dir)
    assert all(p.is_cuda for p in tr.model.parameters()), "weights must live on the GPU"
    assert tr._device.type == "cuda"
    lps = tr.token_logprobs(groups)
    stats = tr.train_step(groups)
    grads = {n: p.main_grad.detach().float().clone() for n, p in tr.model.named_parameters()}
    assert all(g.is_cuda for g in grads.values())
    return tr, lps, stats, grads


def _lp_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True) if x.size)


@pytest.mark.parametrize("loss,agg", [("grpo", "token_mean"), ("gspo", "seq_mean")])
def test_packed_equals_padded_fp32_cuda(model_dir, loss, agg):
    groups = groups_for(seed=7, max_resp=200, version_span=2)
    _, lp0, s0, g0 = _run(model_dir, groups, "none", False, loss=loss, loss_agg=agg)
    tr, lp1, s1, g1 = _run(model_dir, groups, "block_diagonal", False, loss=loss, loss_agg=agg)
    mbs = tr._microbatches(groups, True)
    assert any(mb.segment_ids is not None and int(mb.segment_ids.max()) >= 1 for mb in mbs), "nothing was packed"
    lp_d = _lp_diff(lp0, lp1)
    scale = max(float(g.abs().max()) for g in g0.values())
    g_d = max(float((g0[k] - g1[k]).abs().max()) for k in g0)
    print(f"fp32 cuda {loss}/{agg}: logprob {lp_d:.3g}, grad {g_d:.3g} (scale {scale:.3g}), loss {s0['loss']:.6g} vs {s1['loss']:.6g}")
    assert lp_d <= 1e-4
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5, abs=1e-7)
    assert s1["grad_norm"] == pytest.approx(s0["grad_norm"], rel=1e-4)
    assert scale > 0 and g_d <= 1e-4 * scale


def test_packed_equals_padded_bf16_cuda(model_dir):
    groups = groups_for(seed=8, max_resp=200)
    _, lp32, _, _ = _run(model_dir, groups, "none", False)
    _, lp0, s0, _ = _run(model_dir, groups, "none", True)
    _, lp1, s1, _ = _run(model_dir, groups, "block_diagonal", True)
    noise = _lp_diff(lp0, lp32)  # what bf16 itself costs
    d = _lp_diff(lp0, lp1)
    print(f"bf16 cuda: packed vs padded logprob {d:.3g}; bf16 vs fp32 {noise:.3g}; loss {s0['loss']:.6g} vs {s1['loss']:.6g}")
    assert d <= 2 * noise + 1e-3
    assert s1["loss"] == pytest.approx(s0["loss"], rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("layer_spec", ["local", "sdpa"])
def test_mask_is_used_cuda(model_dir, monkeypatch, layer_spec):
    import consumers.attention as attention_mod
    import consumers.trainer as trainer_mod

    groups = groups_for(seed=3, max_resp=60)
    tr, lp1, _, _ = _run(model_dir, groups, "block_diagonal", False, layer_spec=layer_spec)
    _, lp0, _, _ = _run(model_dir, groups, "none", False, layer_spec=layer_spec)
    assert _lp_diff(lp0, lp1) <= 1e-4
    if layer_spec == "local":
        monkeypatch.setattr(trainer_mod, "block_causal_mask", lambda seg: None)
    else:  # no per-segment attention at all: plain causal over the packed row
        monkeypatch.setattr(attention_mod.SDPAttention, "_packed", lambda self, *a, **k: None)
        monkeypatch.setattr(attention_mod, "block_causal_allowed", lambda seg: None)
    no_mask = tr.token_logprobs(groups)
    d = _lp_diff(lp0, no_mask)
    print(f"cuda without the mask: max logprob diff {d:.3g}")
    assert d > 1e-2


@pytest.mark.parametrize("bf16", [False, True])
def test_jagged_attention_equals_dense_mask_cuda(model_dir, monkeypatch, bf16):
    """The sdpa spec's variable-length (jagged) path on CUDA gives the log-probs, loss and
    gradients of the dense block-diagonal mask (fp32: 1e-4; bf16: within bf16 rounding)."""
    import consumers.attention as attention_mod

    groups = groups_for(seed=9, max_resp=200)
    tr, lp_j, s_j, g_j = _run(model_dir, groups, "block_diagonal", bf16, layer_spec="sdpa")
    core = tr._gpt.decoder.layers[0].self_attention.core_attention
    assert core.jagged_calls > 0 and core.packed_fallbacks == 0, "the jagged kernel must have run"
    monkeypatch.setattr(attention_mod.SDPAttention, "_packed", lambda self, *a, **k: None)
    _, lp_d, s_d, g_d = _run(model_dir, groups, "block_diagonal", bf16, layer_spec="sdpa")
    d = _lp_diff(lp_j, lp_d)
    scale = max(float(g.abs().max()) for g in g_d.values())
    gd = max(float((g_j[k] - g_d[k]).abs().max()) for k in g_d)
    print(f"jagged vs dense mask (bf16={bf16}): logprob {d:.3g}, grad {gd:.3g} (scale {scale:.3g})")
    tol = 2e-2 if bf16 else 1e-4
    assert d <= tol and gd <= tol * scale
    assert s_j["loss"] == pytest.approx(s_d["loss"], rel=2e-2 if bf16 else 1e-5, abs=1e-6)
