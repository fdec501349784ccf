"""Qwen3-MoE through the bridge at EP=1 (TP=1): logits parity with transformers on a tiny random
config, export == named_parameters (fused expert tensors), and a train step."""

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
