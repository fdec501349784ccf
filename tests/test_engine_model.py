"""The engine's own forward (producers/engine/model.py) against the transformers forward, per family.

For tiny random Qwen2, Qwen3, Llama 3 (llama3 rope scaling) and Qwen3-MoE models in float32:
a right-padded batched prefill into KV slots, then decode steps, give the logits and log-probs of
a plain transformers forward over each whole sequence; so do a prefill in chunks after a cached
prefix, fused q/k/v + gate/up weights, eager (matmul) attention, and padding rows that write
into the scratch slot.  Fused parameters stay the transformers parameters (a copy into them
changes what the forward computes).  Unsupported architectures are refused by name.

    /work/venv/bin/pytest tests/test_engine_model.py -q
"""

from __future__ import annotations

import pytest
import torch

from producers.engine.kvcache import KVCache, KVShape
from producers.engine.model import DecoderModel, UnsupportedModel, compile_kernels

FAMILIES = ["qwen2", "qwen3", "llama3", "qwen3_moe"]
TOL = 2e-5


def build(kind: str) -> torch.nn.Module:
    """A tiny random model of ``kind`` with non-trivial norms and biases (so a mix-up shows)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(3)
    common = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, pad_token_id=0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=False))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True))
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=128, rope_parameters=rope,
                                             tie_word_embeddings=False))
    elif kind == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=True)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):  # decisive MoE routing
                p.normal_(0, 1.0)
    model.requires_grad_(False)
    return model


def reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def make_cache(decoder: DecoderModel, slots: int = 4, max_len: int = 64) -> KVCache:
    shape = KVShape(len(decoder.layers), decoder.kv_heads, decoder.head_dim, decoder.dtype)
    return KVCache(shape, slots, max_len, decoder.device)


def pad(prompts: list[list[int]]) -> torch.Tensor:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    return ids


def run_and_compare(model: torch.nn.Module, decoder: DecoderModel, steps: int = 6) -> float:
    """Batched prefill of three prompts into slots 0-2, then ``steps`` decode steps (greedy tokens);
    returns the worst |logit difference| against transformers over all positions checked."""
    cache = make_cache(decoder)
    prompts = [[1, 5, 9, 13, 2, 7, 7], [3, 4], [11, 12, 13, 14, 15]]
    worst = 0.0
    with torch.inference_mode():
        logits = decoder.prefill(cache, pad(prompts), [len(p) for p in prompts], 0)
        assert logits is not None
        seqs = [list(p) for p in prompts]
        for i, p in enumerate(prompts):
            worst = max(worst, float((logits[i] - reference_logits(model, p)[-1]).abs().max()))
        for _ in range(steps):
            toks = logits.argmax(-1).tolist()
            positions = [len(s) for s in seqs]
            for s, t in zip(seqs, toks, strict=True):
                s.append(t)
            logits = decoder.decode(cache, torch.tensor(toks), torch.tensor(positions), torch.arange(3),
                                    max(positions) + 1).float()
            for i, s in enumerate(seqs):
                ref = reference_logits(model, s)[-1]
                worst = max(worst, float((logits[i] - ref).abs().max()))
                lp, ref_lp = torch.log_softmax(logits[i], -1), torch.log_softmax(ref, -1)
                assert float((lp - ref_lp).abs().max()) < TOL
    return worst


@pytest.mark.parametrize("kind", FAMILIES)
def test_prefill_and_decode_match_transformers(kind: str) -> None:
    model = build(kind)
    assert run_and_compare(model, DecoderModel(model, 64)) < TOL


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "qwen3_moe"])
def test_fused_weights_and_eager_attention_match(kind: str) -> None:
    model = build(kind)
    before = {k: v.clone() for k, v in model.named_parameters()}
    fused = DecoderModel(model, 64, fuse=True)
    assert not fused.adopts
    for name, p in model.named_parameters():  # the parameters are views of the fused tensors, same values
        assert torch.equal(p, before[name]), name
    assert run_and_compare(model, fused) < TOL
    assert run_and_compare(model, DecoderModel(build(kind), 64, attention="eager")) < TOL
    # an in-place update of a parameter is what the fused forward then computes
    q = dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
    with torch.no_grad():
        q.copy_(torch.randn_like(q))
    assert run_and_compare(model, fused) < TOL


@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_chunked_prefill_after_a_cached_prefix(kind: str) -> None:
    model = build(kind)
    decoder = DecoderModel(model, 64)
    cache = make_cache(decoder)
    prompt = [(7 * i + 3) % 48 for i in range(41)]
    with torch.inference_mode():
        for start in range(0, 41, 16):  # chunks 0-15, 16-31, 32-40 into slot 2
            chunk = prompt[start : start + 16]
            logits = decoder.prefill(cache, torch.tensor([chunk]), [len(chunk)], 2, start=start)
        assert logits is not None
        ref = reference_logits(model, prompt)
        assert float((logits[0] - ref[-1]).abs().max()) < TOL
        tok = int(logits[0].argmax())
        step = decoder.decode(cache, torch.tensor([0, 0, tok]), torch.tensor([0, 0, 41]), torch.tensor([4, 4, 2]), 42)
        assert float((step[2] - reference_logits(model, [*prompt, tok])[-1]).abs().max()) < TOL
        with pytest.raises(ValueError, match="one sequence at a time"):
            decoder.prefill(cache, torch.tensor([[1, 2], [3, 4]]), [2, 2], 0, start=3)


def test_padding_rows_write_only_the_scratch_slot() -> None:
    model = build("qwen3")
    decoder = DecoderModel(model, 64)
    cache = make_cache(decoder, slots=4)
    with torch.inference_mode():
        decoder.prefill(cache, pad([[1, 2, 3], [4, 5, 6, 7]]), [3, 4], 0)
        kept = cache.k[:, :4].clone(), cache.v[:, :4].clone()
        tokens = torch.tensor([9, 10, 0, 0])
        logits = decoder.decode(cache, tokens, torch.tensor([3, 4, 0, 0]), torch.tensor([0, 1, 4, 4]), 8)
        alone = decoder.decode(cache, tokens[:2], torch.tensor([3, 4]), torch.tensor([0, 1]), 8)
    assert torch.allclose(logits[:2], alone, atol=1e-6)
    changed = (cache.k[:, :4] != kept[0]).any(dim=(0, 2, 4))  # (slot, position) touched by the writes
    assert changed[0, 3] and changed[1, 4]
    assert int(changed.sum()) == 2 and not changed[2:].any()
    assert torch.equal(cache.v[:, 2:4], kept[1][:, 2:4])


def test_unsupported_architectures_are_refused_by_name() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    with pytest.raises(UnsupportedModel, match="model_type 'gpt2' is not supported"):
        DecoderModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=16)), 16)
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                           sliding_window=8))
    with pytest.raises(UnsupportedModel, match="sliding-window"):
        DecoderModel(sliding, 16)


@pytest.mark.slow
def test_compiled_kernels_match_eager_on_cpu() -> None:
    """torch.compile of the element-wise kernels (the CUDA default) traces and agrees on CPU too."""
    model = build("qwen3")
    decoder = DecoderModel(model, 64, kernels=compile_kernels())
    assert run_and_compare(model, decoder, steps=2) < 1e-4
