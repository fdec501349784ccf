"""Config: TOML + overrides into typed dataclasses; every bad value is one clear error naming its key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.config import flag_overrides, load_config
from pipeline.configbase import ConfigError
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


def test_example_config_loads_with_overrides() -> None:
    cfg = load_config(TINY, ["queue.max_staleness=3", "run.name=x", "trainer.lr=1e-4"])
    assert cfg.queue.max_staleness == 3 and cfg.run.name == "x" and cfg.trainer.lr == 1e-4
    assert cfg.producer.group_size == 8


@pytest.mark.parametrize(
    ("override", "key", "needle"),
    [
        ("queue.max_stalenes=1", "queue.max_stalenes", "did you mean 'max_staleness'"),
        ("queue.max_staleness='two'", "queue.max_staleness", "expected an integer"),
        ("queue.max_staleness=-1", "queue.max_staleness", "must be >= 0"),
        ("queue.socket_hwm=0", "queue.socket_hwm", "unbounded"),
        ("queue.stale_policy='ignore'", "queue.stale_policy", "must be one of"),
        ("producer.temperature=0", "producer.temperature", "must be > 0"),
        ("producer.engine='attach'", "producer.engine_urls", "needs at least one URL"),
        ("queue.max_queued_trajectories=4", "queue.max_queued_trajectories", "at least one step"),
        ("trainer.megatron.not_a_field=1", "trainer.megatron.not_a_field", ""),
        ("bogus.key=1", "bogus", "unknown key"),
    ],
)
def test_bad_values_name_their_key(override: str, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert e.value.key == key
    assert needle in str(e.value)


def test_megatron_and_sglang_flags_are_overrides() -> None:
    assert flag_overrides(["--megatron-lr", "1e-5", "--sglang-mem-fraction-static=0.8"]) == [
        "trainer.megatron.lr=1e-5", "producer.sglang.mem_fraction_static=0.8",
    ]
    with pytest.raises(ConfigError):
        flag_overrides(["--nonsense"])


@pytest.mark.parametrize("override", ["queue.max_staleness=-3", "queue.max_stalenes=1", "queue.max_staleness='x'"])
def test_cli_prints_one_line_without_traceback(override: str, tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(TINY), "--set", override, "--dry-run"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "queue.max_stalenes" in lines[0], r.stderr


def test_dry_run_validates_and_starts_nothing(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(TINY), "--dry-run", "--run-dir", str(tmp_path / "rd"), "--set", "producer.temperature=0.7"),
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"max_staleness": 1' in r.stdout
    resolved = json.loads(r.stdout)
    assert resolved["trainer"]["temperature"] == resolved["producer"]["temperature"] == 0.7  # declared once, followed
    assert not (tmp_path / "rd").exists()


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(tmp_path / "nope.toml")), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
