"""Make a model checkpoint locally from an architecture preset: nothing is downloaded.

What: :data:`PRESETS` names model shapes (``tiny``: the tiny example's 2-layer Qwen3;
``qwen3-0.6b``, ``qwen3-1.7b``, ``qwen3-4b``, ``qwen3-8b``: the shapes of the published Qwen3 dense
models), and :func:`make_model` writes a random-initialised Hugging Face checkpoint of one
(safetensors, bf16 for the Qwen3 shapes, float32 for ``tiny``) plus the tiny task's tokenizer.

Why: a GPU run needs a model of a realistic size to measure anything (weight bytes, decode and
training speed, memory), and no machine here may download one.  Random weights are as good as
trained ones for throughput; for learning they are not (a random 0.6B model almost never samples
EOS, so its responses run to ``max_new_tokens``, and it learns the tiny task slowly).  The tokenizer
is the tiny example's word-level one (``<pad> <s> </s> 0-9 =``, ids 0-13, pipeline/tiny.py), which
covers the built-in ``maxdigit`` task; the model's vocabulary stays the preset's (151,936), so
sampled ids >= 14 decode to nothing and score 0.

    slipstream make-model runs/qwen3-0.6b --preset qwen3-0.6b       # or, in a config:
    [model]
    path = "runs/qwen3-0.6b"
    make_if_missing = "qwen3-0.6b"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_QWEN3_COMMON: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    "torch_dtype": "bfloat16",
}


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, tied: bool) -> dict[str, Any]:
    return {**_QWEN3_COMMON, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "tie_word_embeddings": tied}


#: preset name -> HF config (the tiny preset is built by pipeline.tiny)
PRESETS: dict[str, dict[str, Any] | None] = {
    "tiny": None,
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, 8, tied=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, 8, tied=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, tied=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, tied=False),
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The HF config of preset ``name`` with the tiny tokenizer's special ids, plus ``overrides``."""
    from pipeline.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_qwen3_config

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    base = PRESETS[name]
    cfg = tiny_qwen3_config() if base is None else {**base, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    cfg.update(overrides)
    return cfg


def make_model(out_dir: str | Path, preset: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-initialised checkpoint of ``preset`` (and the tiny tokenizer) to ``out_dir``."""
    if preset == "tiny":
        from pipeline.tiny import make_tiny_model

        return make_tiny_model(out_dir, seed=seed, **overrides)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipeline.tiny import build_tokenizer

    cfg = preset_config(preset, **overrides)
    dtype = getattr(torch, str(cfg["torch_dtype"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: half the memory and time of float32
    try:
        model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    (out / "slipstream_preset.json").write_text(json.dumps({"preset": preset, "seed": seed, "overrides": overrides}, indent=2))
    n = sum(p.numel() for p in model.parameters())
    log.info("wrote a random-initialised %s checkpoint (%d parameters, %s) to %s", preset, n, cfg["torch_dtype"], out)
    return out


def ensure_model(path: str | Path, preset: str, seed: int = 0) -> Path:
    """Create the ``preset`` checkpoint at ``path`` unless a checkpoint is already there (a
    different preset there is kept, with a warning)."""
    p = Path(path)
    if (p / "config.json").exists():
        made = p / "slipstream_preset.json"
        if made.exists() and (old := json.loads(made.read_text()).get("preset")) != preset:
            log.warning("%s holds a %s checkpoint, not %s (model.make_if_missing): using it as it is", p, old, preset)
        return p
    return make_model(p, preset, seed=seed)
