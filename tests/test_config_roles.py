"""Per-role config (issue 17.4): each role loads its own sections, shared settings have one home.

- ``import pipeline.broker`` and the broker/producer processes' config loading
  (:func:`pipeline.cli.role_sections`) leave the trainer's config module (``consumers.config``)
  and every other ``consumers`` module unloaded: checked in a fresh interpreter.
- ``producer.temperature`` is the temperature's one home: ``trainer.temperature`` follows it, and
  a different ``trainer.temperature`` is a ConfigError naming both, caught by
  ``slipstream run CONFIG --dry-run``.

Run: ``pytest -q tests/test_config_roles.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import SlipstreamConfig, load_config
from pipeline.configbase import ConfigError
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"

_PROBE = """
import json, sys
import pipeline.broker
after_broker = sorted(m for m in sys.modules if m.split(".")[0] in ("consumers", "producers"))
from pipeline.cli import role_sections
run, model, queue, metrics, producer = role_sections(sys.argv[1], ["queue.max_staleness=3", "producer.group_size=4"])
after_sections = sorted(m for m in sys.modules if m.split(".")[0] == "consumers")
print(json.dumps({"broker": after_broker, "sections": after_sections, "eta": queue.max_staleness,
                  "group_size": producer.group_size, "model": model.path}))
"""


def test_broker_and_producer_processes_do_not_load_the_trainers_config() -> None:
    r = subprocess.run([sys.executable, "-c", _PROBE, str(TINY)], capture_output=True, text=True, env=env(), cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["broker"] == [], f"import pipeline.broker loaded role modules: {out['broker']}"
    assert out["sections"] == [], f"the broker's config loading loaded consumers modules: {out['sections']}"
    assert (out["eta"], out["group_size"]) == (3, 4)  # the overrides reach the sections
    assert out["model"] == load_config(TINY).model.path


def test_role_sections_name_the_bad_key() -> None:
    from pipeline.cli import role_sections

    with pytest.raises(ConfigError) as e:
        role_sections(TINY, ["queue.socket_hwm=0"])
    assert e.value.key == "queue.socket_hwm"
    with pytest.raises(ConfigError) as e:
        role_sections(TINY, ["producer.group_sise=4"])
    assert e.value.key == "producer.group_sise" and "did you mean 'group_size'" in e.value.message


def test_trainer_temperature_follows_the_producers() -> None:
    cfg = load_config(TINY, ["producer.temperature=0.7"])
    assert cfg.trainer.temperature == cfg.producer.temperature == 0.7
    same = load_config(TINY, ["producer.temperature=0.7", "trainer.temperature=0.7"])  # both set, to the same value: fine
    assert same.trainer.temperature == 0.7
    assert SlipstreamConfig.SHARED_KEYS["trainer.temperature"] == "producer.temperature"


@pytest.mark.parametrize("overrides", [["trainer.temperature=0.7"], ["producer.temperature=0.5", "trainer.temperature=0.7"]])
def test_temperature_mismatch_is_a_config_error(overrides: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert e.value.key == "trainer.temperature"
    assert "producer.temperature" in e.value.message


def test_temperature_mismatch_is_caught_by_dry_run(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(TINY), "--set", "trainer.temperature=0.7", "--dry-run"), capture_output=True,
                       text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'trainer.temperature'" in lines[0] and "producer.temperature = 1.0" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
