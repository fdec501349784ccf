"""TrainerConfig validation, including the megatron pass-through table (no Megatron import)."""

from __future__ import annotations

import sys

import pytest

from consumers.config import RESERVED_MEGATRON_KEYS, TrainerConfig, megatron_fields, megatron_overrides
from pipeline.configbase import ConfigError, field_docs, from_dict


def test_defaults_are_valid_and_documented():
    cfg = TrainerConfig()
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.grad_clip, cfg.tis_cap) == (3e-4, 0.9, 0.99, 1.0, 2.0)
    assert cfg.micro_batch_size == 64
    assert all(doc for _, _, _, doc in field_docs(TrainerConfig))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"lr": 0}, "trainer.lr"),
        ({"adam_beta2": 1.0}, "trainer.adam_beta2"),
        ({"grad_clip": -1}, "trainer.grad_clip"),
        ({"tensor_parallel": 0}, "trainer.tensor_parallel"),
        ({"temperature": 0}, "trainer.temperature"),
        ({"loss": "reinforce"}, "trainer.loss"),
        ({"tis_cap": 0.5}, "trainer.tis_cap"),
        ({"micro_batch_size": 0}, "trainer.micro_batch_size"),
        ({"lrr": 1e-4}, "trainer.lrr"),
        ({"off_policy": "vtrace"}, "trainer.off_policy"),
        ({"proximal": "ema"}, "trainer.proximal"),
        ({"loss_agg": "sum"}, "trainer.loss_agg"),
        ({"eps_clip_low": 1.0}, "trainer.eps_clip_low"),
        ({"icepop_low": 2.0}, "trainer.icepop_low"),
        ({"kl_estimator": "k4"}, "trainer.kl_estimator"),
        ({"checkpoint_every": -1}, "trainer.checkpoint_every"),
        ({"max_tokens_per_microbatch": -2}, "trainer.max_tokens_per_microbatch"),
        ({"layer_spec": "flash"}, "trainer.layer_spec"),
        ({"layer_spec": "te", "packing": "block_diagonal"}, "trainer.packing"),
        ({"logprob_chunk_bytes": 1024}, "trainer.logprob_chunk_bytes"),
        ({"max_bad_steps": -1}, "trainer.max_bad_steps"),
        ({"lr_schedule": "step"}, "trainer.lr_schedule"),
        ({"lr_warmup_steps": -2}, "trainer.lr_warmup_steps"),
        ({"lr": 1e-3, "lr_min": 1e-2}, "trainer.lr_min"),
        ({"lr_schedule": "cosine", "lr_warmup_steps": 5, "lr_decay_steps": 5}, "trainer.lr_decay_steps"),
        ({"packing": "thd"}, "trainer.packing"),
    ],
)
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(TrainerConfig, data, "trainer")
    assert e.value.key == key


def test_megatron_keys_validated_with_did_you_mean():
    with pytest.raises(ConfigError) as e:
        from_dict(TrainerConfig, {"megatron": {"recompute_granularty": "full"}}, "trainer")
    assert e.value.key == "trainer.megatron.recompute_granularty"
    assert "did you mean 'recompute_granularity'" in e.value.message


@pytest.mark.parametrize(
    "key, value",
    [("bf16", 1), ("recompute_granularity", "partial"), ("params_dtype", "float33"), ("bucket_size", "big")],
)
def test_megatron_values_checked_against_annotations(key, value):
    with pytest.raises(ConfigError) as e:
        TrainerConfig(megatron={key: value})
    assert e.value.key == f"megatron.{key}"


@pytest.mark.parametrize("key", ["num_layers", "tensor_model_parallel_size", "lr", "clip_grad"])
def test_reserved_megatron_keys_point_elsewhere(key):
    with pytest.raises(ConfigError, match="set by slipstream"):
        TrainerConfig(megatron={key: 1})
    assert key in RESERVED_MEGATRON_KEYS


def test_megatron_overrides_split_per_dataclass():
    import torch

    cfg = TrainerConfig(megatron={"bf16": True, "params_dtype": "bfloat16", "use_distributed_optimizer": True,
                                  "recompute_granularity": "full", "adam_eps": 1e-6})
    over = megatron_overrides(cfg.megatron)
    assert over["TransformerConfig"] == {"bf16": True, "params_dtype": torch.bfloat16, "recompute_granularity": "full"}
    assert over["OptimizerConfig"]["adam_eps"] == 1e-6 and over["OptimizerConfig"]["bf16"] is True
    assert over["DistributedDataParallelConfig"] == {"use_distributed_optimizer": True}


def test_fields_read_without_importing_megatron():
    fields = megatron_fields()
    assert "num_query_groups" in fields["TransformerConfig"]
    assert "tensor_model_parallel_size" in fields["TransformerConfig"]  # from ModelParallelConfig
    assert "adam_beta2" in fields["OptimizerConfig"]
    assert "overlap_grad_reduce" in fields["DistributedDataParallelConfig"]
    if "megatron.core.transformer.transformer_config" in sys.modules:
        import dataclasses

        from megatron.core.transformer.transformer_config import TransformerConfig

        assert set(fields["TransformerConfig"]) == {f.name for f in dataclasses.fields(TransformerConfig)}
