"""Metric names follow DESIGN §9, checked on the catalog of everything the code defines.

- every metric starts with ``slipstream_`` (standard ``process_``/``python_`` collectors aside), uses
  base units, counters end in ``_total``, and labels come from a bounded allow-list;
- the lint itself catches ``slipstream_foo_ms``, ``_gib``, ``_percent``, a counter without ``_total``,
  an id label and a missing prefix (synthetic registries), so the first check can fail;
- the catalog sees every process's metrics (labels included, even before a child exists), refuses
  one name with two meanings, and ``promtool check metrics`` accepts each process's exposition.
"""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.catalog import (
    ALLOWED_LABELS,
    MetricDef,
    catalog,
    catalog_by_role,
    lint,
    lint_registry,
    process_registries,
    series_names,
)
from tests.promtools import require


@pytest.fixture(scope="module")
def defs() -> dict[str, MetricDef]:
    return catalog()


def test_every_defined_metric_passes_the_lint(defs: dict[str, MetricDef]) -> None:
    assert lint(defs) == []


def test_catalog_covers_every_process(defs: dict[str, MetricDef]) -> None:
    by_role = catalog_by_role()
    assert set(by_role) == {"broker", "producer", "trainer", "engine"}
    for role, metrics in by_role.items():
        ours = [n for n in metrics if n.startswith("slipstream_") and n != "slipstream_build_info"]
        assert len(ours) >= 10, f"{role} defines only {ours}"
    # A sample of DESIGN §9's minimum set, with types and labels as the exposition shows them.
    assert defs["slipstream_broker_trajectories_dropped_total"] == MetricDef("counter", defs["slipstream_broker_trajectories_dropped_total"].help, ("reason",))
    assert defs["slipstream_broker_consumed_staleness"].type == "histogram"
    assert defs["slipstream_trainer_wait_seconds_total"].type == "counter"
    assert defs["slipstream_engine_weight_update_pause_seconds"].type == "histogram"
    # Declared labels are seen even though no child exists yet (policy_version is set later).
    assert defs["slipstream_policy_version"].labels == ("role",)
    assert defs["slipstream_build_info"].labels == ("python", "role", "version")
    series = series_names(defs)
    assert {"slipstream_broker_consumed_staleness_bucket", "slipstream_broker_consumed_staleness_count"} <= series


def _synthetic(**kind: str) -> CollectorRegistry:
    r = CollectorRegistry()
    for name, how in kind.items():
        if how == "counter":
            Counter(name, "doc", registry=r)
        elif how == "gauge":
            Gauge(name, "doc", registry=r)
        elif how == "histogram":
            Histogram(name, "doc", registry=r)
    return r


@pytest.mark.parametrize(("name", "how", "why"), [
    ("slipstream_foo_ms", "gauge", "non-base unit 'ms'"),
    ("slipstream_step_milliseconds", "histogram", "non-base unit 'milliseconds'"),
    ("slipstream_uptime_minutes", "gauge", "non-base unit 'minutes'"),
    ("slipstream_run_hours", "gauge", "non-base unit 'hours'"),
    ("slipstream_queue_fill_percent", "gauge", "non-base unit 'percent'"),
    ("slipstream_weights_kb", "gauge", "non-base unit 'kb'"),
    ("slipstream_weights_mb", "gauge", "non-base unit 'mb'"),
    ("slipstream_weights_gb", "gauge", "non-base unit 'gb'"),
    ("slipstream_gpu_memory_gib", "gauge", "non-base unit 'gib'"),
    ("slipstream_queue_mib", "gauge", "non-base unit 'mib'"),
    ("slipstream_weights_sent_mb", "counter", "non-base unit 'mb'"),
    ("queue_depth", "gauge", "does not start with slipstream_"),
    ("slipstream_tokens_total", "gauge", "only counters end in _total"),
])
def test_lint_rejects_bad_names(name: str, how: str, why: str) -> None:
    problems = lint_registry(_synthetic(**{name: how}))
    assert any(why in p for p in problems), problems


def test_lint_rejects_counter_without_total() -> None:
    # prometheus_client appends _total itself, so build the family the way a custom collector would.
    assert any("counters end in _total" in p for p in lint({"slipstream_steps": MetricDef("counter", "doc", ())}))


def test_lint_rejects_unbounded_labels() -> None:
    r = CollectorRegistry()
    Counter("slipstream_groups_total", "doc", ["producer_id"], registry=r)
    Gauge("slipstream_queue_depth_trajectories", "doc", ["trajectory_id"], registry=r)
    problems = lint_registry(r)
    assert len([p for p in problems if "allow-list" in p]) == 2, problems
    assert "producer_id" not in ALLOWED_LABELS


def test_lint_accepts_good_names_and_standard_collectors() -> None:
    r = CollectorRegistry()
    Counter("slipstream_weight_publish_bytes_total", "doc", registry=r)
    Histogram("slipstream_step_seconds", "doc", ["role"], registry=r)
    Gauge("slipstream_queue_depth_trajectories", "doc", registry=r)
    assert lint_registry(r) == []
    assert lint({"process_cpu_seconds_total": MetricDef("counter", "doc", ()),
                 "python_info": MetricDef("gauge", "doc", ("implementation", "major"))}) == []


def test_catalog_refuses_one_name_with_two_meanings(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.catalog as cat

    a, b = CollectorRegistry(), CollectorRegistry()
    Gauge("slipstream_policy_version", "Policy version.", ["role"], registry=a)
    Gauge("slipstream_policy_version", "Policy version.", registry=b)
    monkeypatch.setattr(cat, "process_registries", lambda: {"broker": a, "trainer": b})
    with pytest.raises(ValueError, match="slipstream_policy_version is defined differently"):
        cat.catalog()


@pytest.mark.parametrize("role", ["broker", "producer", "trainer", "engine"])
def test_promtool_check_metrics_accepts_each_process(role: str) -> None:
    promtool = require("promtool")
    body = generate_latest(process_registries()[role])
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_promtool_check_metrics_flags_a_non_base_unit() -> None:
    # The same tool on a bad exposition fails, so the test above can fail too.
    promtool = require("promtool")
    r = CollectorRegistry()
    Counter("slipstream_step_milliseconds", "doc", registry=r)
    res = subprocess.run([promtool, "check", "metrics"], input=generate_latest(r), capture_output=True, timeout=30)
    assert res.returncode != 0
