"""Prometheus assets in ops/prometheus: alert rules, their unit tests, the scrape config.

- ``promtool check rules`` accepts alerts.yml and ``promtool test rules`` passes alerts_test.yml;
- alerts_test.yml has, for every alert, a case where it fires and one where it does not, and those
  cases bite: replacing an alert's expression with one that never fires (or always fires) makes
  ``promtool test rules`` fail;
- every metric an alert uses is defined by the code (the catalog) or by Prometheus (``up``);
- ``slipstream scrape-config RUN_DIR`` writes a config ``promtool check config`` accepts, one job per
  role and one target per process; scrape.yml is exactly what it writes for the example URLs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.dashboard import known_series, metrics_in_expr
from pipeline.status import scrape_config
from tests.promtools import require

OPS = Path(__file__).resolve().parent.parent / "ops" / "prometheus"
ALERTS = ["ProducerDown", "TrainerStarved", "StalenessPinnedAtBound", "DropsOrRejectionsRising", "WeightPublishSlow", "NoProgress"]
EXAMPLE_PROCESSES = [
    {"name": "broker", "role": "broker", "pid": 1, "metrics_url": "http://127.0.0.1:9400/metrics"},
    {"name": "engine-0", "role": "engine", "pid": 2, "metrics_url": "http://127.0.0.1:9401/metrics"},
    {"name": "producer-0", "role": "producer", "pid": 3, "metrics_url": "http://127.0.0.1:9402/metrics"},
    {"name": "trainer", "role": "trainer", "pid": 4, "metrics_url": "http://127.0.0.1:9403/metrics"},
]


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load((OPS / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_alert_list() -> None:
    assert [r["alert"] for r in _rules()] == ALERTS
    for r in _rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]


def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", "alerts.yml", cwd=OPS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = _promtool("test", "rules", "alerts_test.yml", cwd=OPS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    tests = yaml.safe_load((OPS / "alerts_test.yml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == set(ALERTS), set(ALERTS) - firing
    assert quiet == set(ALERTS), set(ALERTS) - quiet


@pytest.mark.parametrize("replacement", ["vector(0) > 1", "vector(1)"], ids=["never-fires", "always-fires"])
def test_alert_tests_bite(tmp_path: Path, replacement: str) -> None:
    """Break every alert (one promtool run): each alert's firing (or quiet) case must report a failure."""
    require("promtool")
    shutil.copy(OPS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    broken = yaml.safe_load((OPS / "alerts.yml").read_text())
    for g in broken["groups"]:
        for rule in g["rules"]:
            rule["expr"] = replacement
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
    r = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert r.returncode != 0, f"alerts_test.yml still passes with every alert replaced by {replacement!r}"
    for name in ALERTS:
        assert f"alertname: {name}," in r.stdout + r.stderr, f"no case of {name} failed with {replacement!r}"


def test_alerts_use_only_defined_metrics() -> None:
    known = known_series()
    for rule in _rules():
        used = metrics_in_expr(rule["expr"])
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']} uses {sorted(used - known)}"


def test_scrape_config_cli(tmp_path: Path) -> None:
    from pipeline.cli import main

    run = tmp_path / "run"
    run.mkdir()
    procs = [*EXAMPLE_PROCESSES, {"name": "producer-1", "role": "producer", "pid": 5, "metrics_url": "http://127.0.0.1:9405/custom"},
             {"name": "quiet", "role": "producer", "pid": 6, "metrics_url": ""}]
    (run / "processes.json").write_text(json.dumps(procs))
    assert main(["scrape-config", str(run), "--rules", str(OPS / "alerts.yml")]) == 0
    cfg = yaml.safe_load((run / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "1s" and cfg["global"]["scrape_timeout"] == "1s"
    jobs = {j["job_name"]: j["static_configs"] for j in cfg["scrape_configs"]}
    assert list(jobs) == ["slipstream-broker", "slipstream-engine", "slipstream-producer", "slipstream-trainer"]
    producers = jobs["slipstream-producer"]
    assert [(s["targets"], s["labels"]["process"], s["labels"]["__metrics_path__"]) for s in producers] == [
        (["127.0.0.1:9402"], "producer-0", "/metrics"), (["127.0.0.1:9405"], "producer-1", "/custom")]
    assert main(["scrape-config", str(tmp_path / "not-a-run")]) == 1
    r = _promtool("check", "config", str(run / "prometheus.yml"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_example_scrape_config_is_current_and_valid() -> None:
    committed = yaml.safe_load((OPS / "scrape.yml").read_text())
    assert committed == scrape_config(EXAMPLE_PROCESSES, 1.0, ["alerts.yml"])
    r = _promtool("check", "config", "scrape.yml", cwd=OPS)
    assert r.returncode == 0, r.stdout + r.stderr
