"""The ``[weights]`` section: defaults, validation naming the key, and the keys that moved there
from ``[trainer]`` (still read, with a deprecation warning naming the new key).

    /work/venv/bin/pytest tests/test_weights_config.py -q
"""

from __future__ import annotations

import logging

import pytest

from consumers.weights_config import DEPRECATED_KEYS, WeightSyncConfig
from pipeline.config import load_config
from pipeline.configbase import ConfigError, field_docs, from_dict


def test_defaults_are_valid_and_documented() -> None:
    cfg = WeightSyncConfig()
    assert cfg.bucket_bytes == 512 << 20 and cfg.group_timeout_s == 60.0
    assert cfg.resolved_backend(cuda=False) == "gloo" and cfg.resolved_backend(cuda=True) == "nccl"
    assert WeightSyncConfig(backend="gloo").resolved_backend(cuda=True) == "gloo"
    assert all(doc for _, _, _, doc in field_docs(WeightSyncConfig))


@pytest.mark.parametrize(
    "data, key",
    [
        ({"backend": "mpi"}, "weights.backend"),
        ({"group_timeout_s": 0}, "weights.group_timeout_s"),
        ({"bucket_bytes": 0}, "weights.bucket_bytes"),
        ({"engine_kind": "vllm"}, "weights.engine_kind"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(WeightSyncConfig, data, "weights")
    assert e.value.key == key


@pytest.mark.parametrize("old, new, value", [
    ("trainer.publish_bucket_bytes", "bucket_bytes", 4096),
    ("trainer.weight_backend", "backend", "gloo"),
    ("trainer.weight_group_timeout_s", "group_timeout_s", 7.5),
])
def test_old_trainer_keys_are_read_with_a_warning_naming_the_new_one(
        old: str, new: str, value: object, caplog: pytest.LogCaptureFixture) -> None:
    assert DEPRECATED_KEYS[old] == f"weights.{new}"
    literal = f'"{value}"' if isinstance(value, str) else str(value)
    with caplog.at_level(logging.WARNING, logger="pipeline.configbase"):
        cfg = load_config(None, ["model.path=m", f"{old}={literal}"])
    assert getattr(cfg.weights, new) == value
    assert any(f"'{old}' is deprecated: use 'weights.{new}'" in r.getMessage() for r in caplog.records), caplog.text
    # a bad value under the old key is reported, naming the new key it was read as
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path=m", f"{old}=-1" if new != "backend" else f'{old}="mpi"'])
    assert e.value.key == f"weights.{new}"


def test_old_and_new_key_set_differently_is_an_error_naming_both() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path=m", "trainer.publish_bucket_bytes=4096", "weights.bucket_bytes=8192"])
    assert e.value.key == "trainer.publish_bucket_bytes" and "weights.bucket_bytes" in e.value.message
    # the same value under both is accepted (e.g. a config written before and after the move)
    cfg = load_config(None, ["model.path=m", "trainer.publish_bucket_bytes=4096", "weights.bucket_bytes=4096"])
    assert cfg.weights.bucket_bytes == 4096


def test_no_warning_without_old_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.configbase"):
        load_config(None, ["model.path=m", "weights.bucket_bytes=4096"])
    assert "deprecated" not in caplog.text


def test_verify_weights_is_refused_with_sglang_engines() -> None:
    """run.verify_weights reads slipstream's /slipstream/weights_checksum, which SGLang lacks: a
    clear config error at --dry-run instead of a failed run at the first publish (issue 19)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path=m", "run.verify_weights=true", 'weights.engine_kind="sglang"'])
    assert e.value.key == "run.verify_weights" and "sglang" in e.value.message.lower()
    assert load_config(None, ["model.path=m", "run.verify_weights=true"]).run.verify_weights  # embedded: fine
    assert load_config(None, ["model.path=m", 'weights.engine_kind="sglang"']).weights.engine_kind == "sglang"


def test_ipc_with_per_stage_publishing_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.path=m", 'weights.transport="ipc"', "trainer.pipeline_parallel=2"])
    assert e.value.key == "weights.transport" and "per_stage_publish" in e.value.message
    cfg = load_config(None, ["model.path=m", 'weights.transport="ipc"', "trainer.pipeline_parallel=2", "weights.per_stage_publish=false"])
    assert cfg.weights.transport == "ipc"
    for key, value in (("transport", '"shm"'), ("update_timeout_s", "0"), ("snapshot_max_fraction", "0"),
                       ("snapshot_max_fraction", "1.5"), ("snapshot_device", '"gpu"')):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["model.path=m", f"weights.{key}={value}"])
        assert e.value.key == f"weights.{key}"
