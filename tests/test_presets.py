"""Model presets (pipeline/presets.py): the Qwen3 shapes, a bf16 checkpoint made locally with the
tiny task's tokenizer, and ``model.make_if_missing`` validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.configbase import ConfigError
from pipeline.presets import PRESETS, ensure_model, make_model, preset_config
from pipeline.tiny import DIGIT0_ID, EOS_ID
from producers.tasks.maxdigit import score
from tests.helpers import REPO

#: non-embedding parameters of the Qwen3 dense models, as their model cards state them (billions)
NON_EMBEDDING = {"qwen3-0.6b": 0.44, "qwen3-1.7b": 1.4, "qwen3-4b": 3.6, "qwen3-8b": 6.95}


@pytest.mark.parametrize("name", sorted(NON_EMBEDDING))
def test_preset_shapes(name: str) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):  # no memory: the shape only
        model = Qwen3ForCausalLM(Qwen3Config(**preset_config(name)))
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel() * (1 if model.config.tie_word_embeddings else 2)
    assert abs((total - embedding) / 1e9 - NON_EMBEDDING[name]) < 0.05, (total, embedding)
    assert model.config.vocab_size == 151936 and model.config.eos_token_id == EOS_ID


def test_make_model_writes_a_bf16_checkpoint_with_the_task_tokenizer(tmp_path: Path) -> None:
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    small = {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32}
    out = make_model(tmp_path / "m", "qwen3-0.6b", seed=3, **small)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 151936 and cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.model.embed_tokens.weight.shape == (151936, 64)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("3917=").ids
    assert ids[0] == 1 and ids[1:] == [DIGIT0_ID + 3, DIGIT0_ID + 9, DIGIT0_ID + 1, DIGIT0_ID + 7, 13]
    assert score([DIGIT0_ID + 9, EOS_ID], 9) == 1.0 and score([150000] * 8, 9) == 0.0
    assert json.loads((out / "slipstream_preset.json").read_text())["preset"] == "qwen3-0.6b"
    # a second call keeps what is there
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_model(out, "qwen3-0.6b") == out and (out / "model.safetensors").stat().st_mtime_ns == before


def test_make_if_missing_is_validated() -> None:
    cfg = load_config(REPO / "examples" / "tiny" / "config.toml", ["model.make_if_missing='qwen3-0.6b'"])
    assert cfg.model.make_if_missing == "qwen3-0.6b" and "qwen3-0.6b" in PRESETS
    with pytest.raises(ConfigError, match=r"model.make_if_missing.*qwen3-0.6b"):
        load_config(REPO / "examples" / "tiny" / "config.toml", ["model.make_if_missing='qwen3-0.5b'"])
