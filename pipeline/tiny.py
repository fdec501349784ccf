"""Make the tiny example's Hugging Face checkpoint locally: a 2-layer Qwen3 model plus tokenizer.

Nothing is downloaded: the model is random-initialised from a config with a fixed seed, and the
tokenizer is a 14-symbol word-level tokenizer built with ``tokenizers``.  The symbols are
``<pad> <s> </s> 0-9 =``; the vocabulary is padded to 16 so it splits evenly across TP ranks.

    slipstream make-tiny-model DIR            # or: python examples/tiny/make_model.py DIR
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SYMBOLS = ["<pad>", "<s>", "</s>", *"0123456789", "="]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DIGIT0_ID = 3
EQUALS_ID = 13
VOCAB_SIZE = 16


def tiny_qwen3_config(**overrides: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    cfg.update(overrides)
    return cfg


def build_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d|="), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 64,
            },
            indent=2,
        )
    )


def make_tiny_model(out_dir: str | Path, seed: int = 0, **config_overrides: object) -> Path:
    """Write a random-initialised tiny Qwen3 checkpoint (safetensors) and tokenizer to ``out_dir``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Qwen3Config(**tiny_qwen3_config(**config_overrides))
    model = Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    log.info("wrote tiny Qwen3 checkpoint (%d params) to %s", sum(p.numel() for p in model.parameters()), out)
    return out


def ensure_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Create the tiny checkpoint at ``path`` unless a checkpoint is already there."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    return make_tiny_model(p, seed=seed)
