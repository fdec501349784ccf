"""Qwen3-MoE through the bridge at EP=1 (TP=1): logits parity with transformers on a tiny random
config, export == named_parameters (fused expert tensors), and a train step; plus the expert-parallel
index arithmetic, the size checks and the ``moe_splits`` shim patch, without a multi-rank world.
TP=2 / PP=2 / EP=2: tests/test_bridge_moe_dist.py (CPU, gloo) and tests/test_bridge_moe_gpu.py."""

from __future__ import annotations

import math

import pytest
import torch

from consumers.config import TrainerConfig
from consumers.trainer import TrainerRank, init_distributed
from tests.test_trainer_step import _random_groups

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _make(tmp_path, norm_topk_prob: bool):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from pipeline.tiny import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=16, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob, tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0,
    )
    model = Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():  # random init has tiny router weights: make routing decisive
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    out = tmp_path / f"moe-{norm_topk_prob}"
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    return out, model


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_logits_parity_and_export(tmp_path, norm_topk_prob):
    torch.set_num_threads(1)
    init_distributed()
    path, hf = _make(tmp_path, norm_topk_prob)
    rank = TrainerRank(TrainerConfig(seed=1), path)
    tokens = torch.randint(1, 16, (2, 11), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(11).unsqueeze(0).expand(2, 11)
    rank.model.eval()
    with torch.no_grad():
        ours = rank.model(tokens, pos, None).float()
        theirs = hf(input_ids=tokens).logits.float()
    diff = float((ours - theirs).abs().max())
    print(f"moe logits max abs diff (norm_topk_prob={norm_topk_prob}): {diff:.3g}")
    assert diff < 1e-4
    named = rank.export_hf_state()
    ref = dict(hf.named_parameters())
    assert list(named) == list(ref)
    assert all(torch.equal(named[k], ref[k].detach()) for k in ref)
    st = rank.train_step(_random_groups(seed=2))
    assert math.isfinite(st["loss"]) and st["grad_norm"] > 0
    after = rank.export_hf_state()
    assert any(not torch.equal(after[k], named[k]) for k in named if "experts" in k)
    rank.shutdown()


# ------------------------------------------------------------------ expert parallelism: index arithmetic (no Megatron)


def test_local_expert_indices_split_contiguously():
    from consumers.bridge_moe import local_expert_indices

    assert local_expert_indices(8, 0, 2) == [0, 1, 2, 3]
    assert local_expert_indices(8, 1, 2) == [4, 5, 6, 7]
    assert local_expert_indices(8, 3, 4) == [6, 7]
    assert local_expert_indices(4, 0, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by expert_parallel=4"):
        local_expert_indices(6, 0, 4)
    with pytest.raises(ValueError, match="EP rank 2 outside"):
        local_expert_indices(8, 2, 2)


def test_export_gather_order_is_global_expert_order():
    from consumers.bridge_moe import export_gather_order

    order = export_gather_order(8, 4)
    assert [g for g, _, _ in order] == list(range(8))
    assert order[:3] == [(0, 0, 0), (1, 0, 1), (2, 1, 0)] and order[-1] == (7, 3, 1)
    # every (EP rank, local index) pair appears exactly once
    assert sorted((r, j) for _, r, j in order) == [(r, j) for r in range(4) for j in range(2)]


def test_split_and_fuse_experts_round_trip():
    """Per-EP-rank exports (as the EP gather delivers them, in any order) fuse back to exactly the
    HF fused tensors; a missing expert is an error naming it."""
    from consumers.bridge_moe import fuse_experts, local_expert_indices, split_fused_experts

    g = torch.Generator().manual_seed(0)
    fused = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 6, 5, generator=g),
             "model.layers.0.mlp.experts.down_proj": torch.randn(4, 5, 3, generator=g)}
    per_expert = split_fused_experts(fused)
    assert torch.equal(per_expert["model.layers.0.mlp.experts.2.up_proj.weight"], fused["model.layers.0.mlp.experts.gate_up_proj"][2, 3:])
    by_rank = [{k: v for k, v in per_expert.items() if int(k.split(".")[5]) in local_expert_indices(4, r, 2)} for r in range(2)]
    gathered = {**by_rank[1], **by_rank[0]}  # arrival order does not matter
    back = fuse_experts(gathered, num_layers=1, num_experts=4)
    assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)
    with pytest.raises(RuntimeError, match=r"experts \[2, 3\] missing"):
        fuse_experts(by_rank[0], num_layers=1, num_experts=4)


def test_parallel_size_checks_for_experts():
    from consumers import bridge
    from pipeline.tiny import tiny_qwen3_config

    moe = bridge.hf_model_spec({
        "model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 16, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    })
    bridge.check_parallel_sizes(moe, 2, 2, 4)
    with pytest.raises(bridge.UnsupportedModelError, match="num_experts=4 is not divisible by expert_parallel=3"):
        bridge.check_parallel_sizes(moe, 1, 1, 3)
    dense = bridge.hf_model_spec(tiny_qwen3_config())
    with pytest.raises(bridge.UnsupportedModelError, match="expert_parallel=2 needs a MoE model; qwen3 is dense"):
        bridge.check_parallel_sizes(dense, 1, 1, 2)


def test_trainer_config_expert_parallel():
    from pipeline.configbase import ConfigError

    assert TrainerConfig(tensor_parallel=2, expert_parallel=2).expert_parallel == 2
    assert TrainerConfig(data_parallel=4, expert_parallel=4).expert_parallel == 4
    with pytest.raises(ConfigError, match=r"expert_parallel.*must divide tensor_parallel x data_parallel = 2, got 4"):
        TrainerConfig(tensor_parallel=2, expert_parallel=4)
    with pytest.raises(ConfigError, match=r"expert_parallel.*must be >= 1"):
        TrainerConfig(expert_parallel=0)
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size.*use trainer.expert_parallel"):
        TrainerConfig(megatron={"expert_model_parallel_size": 2})


def test_moe_splits_shim_patch_needed():
    """megatron-core's token dispatcher keeps CPU split sizes as tensors, which all_to_all_single
    rejects; the shim's ``moe_splits`` patch hands them over as numpy arrays, like the CUDA path."""
    import torch.distributed as dist

    from consumers import shim

    init_distributed()
    shim.apply_cpu_shim()
    import megatron.core.transformer.moe.token_dispatcher as td

    splits, x = torch.tensor([3]), torch.arange(3.0)
    shim.revert_cpu_shim(["moe_splits"])
    try:
        unpatched = td.maybe_move_tensor_to_cpu(splits, as_numpy=True)
        assert torch.is_tensor(unpatched)
        with pytest.raises(TypeError, match="all_to_all_single"):
            dist.all_to_all_single(torch.empty(3), x, output_split_sizes=unpatched, input_split_sizes=unpatched)
    finally:
        shim.apply_cpu_shim(["moe_splits"])
    patched = td.maybe_move_tensor_to_cpu(splits, as_numpy=True)
    assert not torch.is_tensor(patched)
    out = torch.empty(3)
    dist.all_to_all_single(out, x, output_split_sizes=patched, input_split_sizes=patched)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    "over, match",
    [({"expert_tensor_parallel_size": 2}, "needs expert_tensor_parallel_size=1"),
     ({"moe_aux_loss_coeff": 0.01}, "moe_aux_loss_coeff / moe_z_loss_coeff must be 0"),
     ({"moe_aux_loss_coeff": [0.0, 0.01]}, "must be 0"),
     ({"moe_z_loss_coeff": 1e-3}, "must be 0")],
)
def test_adapt_moe_layers_refuses_what_tp_slicing_breaks(monkeypatch, over, match):
    """At TP > 1 the MoE block sees 1/TP of the sequence: expert TP must be 1 and router load
    statistics (aux / z loss) would be per slice, so both are refused with one clear line."""
    from types import SimpleNamespace

    from consumers import bridge_moe

    monkeypatch.setattr(bridge_moe, "_tp_group", lambda: object())  # pretend TP = 2
    cfg = {"sequence_parallel": False, "expert_tensor_parallel_size": 1, "moe_aux_loss_coeff": 0.0,
           "moe_z_loss_coeff": None, **over}
    gpt = SimpleNamespace(config=SimpleNamespace(**cfg), decoder=SimpleNamespace(layers=[]))
    with pytest.raises(ValueError, match=match):
        bridge_moe.adapt_moe_layers(gpt)
    monkeypatch.setattr(bridge_moe, "_tp_group", lambda: None)  # TP = 1: nothing to adapt
    assert bridge_moe.adapt_moe_layers(gpt) == 0
