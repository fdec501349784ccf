"""HF <-> Megatron bridge (consumers/bridge.py): config mapping, logits parity, export round trip.

In-process, TP=1/PP=1 (gloo world of one).  The TP=2 / PP=2 versions of the parity and export
checks are in tests/test_trainer_dist.py (torchrun); Qwen3-MoE's are in tests/test_bridge_moe.py
(TP=1, EP=1) and tests/test_bridge_moe_dist.py (TP=2, PP=2, EP=2, TP2xEP2; torchrun).
"""

from __future__ import annotations

import pytest
import torch

from consumers import bridge
from consumers.bridge import UnsupportedModelError, hf_model_spec

# megatron-core's own deprecation/fallback chatter ("Apex is not installed", tp_group=None, ...)
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]


@pytest.fixture(scope="module")
def dist_world():
    torch.set_num_threads(1)
    from consumers.trainer import init_distributed

    init_distributed()


def _make_checkpoint(path, kind: str):
    """A tiny random HF checkpoint of family ``kind`` (qwen3 = the example model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from pipeline.tiny import make_tiny_model

    if kind == "qwen3":
        return make_tiny_model(path)
    torch.manual_seed(3)
    common = dict(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0, tie_word_embeddings=False,
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, max_position_embeddings=128, rope_theta=1e6))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=16384, rope_parameters=rope))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _build(path, **cfg):
    from consumers.config import TrainerConfig
    from consumers.model import build_trainable_model

    return build_trainable_model(TrainerConfig(**cfg), path)


# ------------------------------------------------------------------ config mapping (no Megatron)


def test_spec_from_tiny_qwen3():
    from pipeline.tiny import tiny_qwen3_config

    spec = hf_model_spec(tiny_qwen3_config())
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 128, 4, 2, 32)
    assert spec.qk_norm and not spec.qkv_bias and spec.tie_word_embeddings
    assert spec.rope_theta == 10000.0 and spec.rope_scaling_factor is None
    kw = bridge.transformer_config_kwargs(spec)
    assert kw["qk_layernorm"] and kw["kv_channels"] == 32 and kw["num_query_groups"] == 2
    assert kw["normalization"] == "RMSNorm" and kw["gated_linear_unit"] and not kw["add_bias_linear"]


def test_spec_rope_theta_in_rope_parameters_and_top_level():
    base = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
            "intermediate_size": 16, "vocab_size": 8}
    assert hf_model_spec({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5
    assert hf_model_spec({**base, "rope_theta": 1e6}).rope_theta == 1e6
    llama3 = hf_model_spec({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0}})
    assert llama3.rope_scaling_factor == 32.0
    assert hf_model_spec({**base, "model_type": "qwen2"}).qkv_bias


@pytest.mark.parametrize(
    "override, match",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "sliding"),
    ],
)
def test_spec_rejects_unsupported(override, match):
    from pipeline.tiny import tiny_qwen3_config

    with pytest.raises(UnsupportedModelError, match=match):
        hf_model_spec({**tiny_qwen3_config(), **override})


def test_parallel_size_check():
    from pipeline.tiny import tiny_qwen3_config

    spec = hf_model_spec(tiny_qwen3_config())
    bridge.check_parallel_sizes(spec, 2, 2)
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads=2 is not divisible by tensor_parallel=4"):
        bridge.check_parallel_sizes(spec, 4, 1)
    with pytest.raises(UnsupportedModelError, match="pipeline_parallel=3"):
        bridge.check_parallel_sizes(spec, 1, 3)


def test_qkv_fuse_split_roundtrip():
    from pipeline.tiny import tiny_qwen3_config

    spec = hf_model_spec(tiny_qwen3_config())
    q, k, v = torch.randn(128, 128), torch.randn(64, 128), torch.randn(64, 128)
    fused = bridge._fuse_qkv(q, k, v, spec)
    # group 0: q heads 0-1 (64 rows), k head 0 (32), v head 0 (32); then group 1
    assert torch.equal(fused[:64], q[:64]) and torch.equal(fused[64:96], k[:32]) and torch.equal(fused[96:128], v[:32])
    assert all(torch.equal(a, b) for a, b in zip(bridge._split_qkv(fused, spec), (q, k, v), strict=True))


# ------------------------------------------------------------------ with Megatron (TP=1)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama3"])
def test_logits_parity_and_export_roundtrip(dist_world, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    path = _make_checkpoint(tmp_path / kind, kind)
    built = _build(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = built.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 11), generator=g)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ours = built.model(ids, pos, None)
        ref = hf(input_ids=ids).logits
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) <= 1e-4

    exported = bridge.export_hf_state(built.model, built.spec)
    hf_params = dict(hf.named_parameters())
    assert list(exported) == list(hf_params), "names and order of the HF model's named_parameters()"
    original = bridge.load_hf_state(path)
    for name, t in exported.items():
        assert t.shape == hf_params[name].shape and t.dtype == hf_params[name].dtype
        assert torch.equal(t, original[name]), f"{name} differs after the round trip"
    fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(exported, strict=False)
    assert not unexpected and all(n == "lm_head.weight" for n in missing)


def test_pad_token_gets_no_lookup_gradient(dist_world, tmp_path):
    """HF's padding_idx semantics: the embedding row of pad_token_id (all zero in a random-init
    checkpoint) gets no gradient from the lookup, only from the tied output layer."""
    from transformers import AutoModelForCausalLM

    from pipeline.tiny import PAD_ID

    path = _make_checkpoint(tmp_path / "q", "qwen3")
    built = _build(path)
    gpt = bridge.unwrap_gpt(built.model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, PAD_ID, 7, 9, PAD_ID, 3]])
    w = torch.linspace(-1, 1, ids.shape[1] * 16).view(1, ids.shape[1], 16)
    (gw,) = torch.autograd.grad((gpt(ids, torch.arange(7)[None], None) * w).sum(), [gpt.embedding.word_embeddings.weight])
    (hf(input_ids=ids).logits * w).sum().backward()
    ref = hf.model.embed_tokens.weight.grad
    assert float((gw - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
