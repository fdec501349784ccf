"""The metric catalog: every Prometheus metric the code defines, in one place.

What: :func:`catalog` instantiates each process's metrics class (``BrokerMetrics``,
``ProducerMetrics``, ``TrainerMetrics``, ``EngineMetrics``) on a fresh registry and returns
``{name: MetricDef(type, help, labels)}``, keyed by the name as it appears on the ``# TYPE`` line of
the exposition (counters with their ``_total``).  :func:`series_names` expands that into every
series name a PromQL query may select (``_bucket``/``_sum``/``_count`` of histograms).
:func:`lint_registry` checks the naming rules of DESIGN §9 on any registry.
Why: the single source of truth of what code defines.  The dashboard check (``slipstream dashboard
--check``), the alert rules test and the name lint test all compare against it, so a renamed metric
breaks CI instead of silently emptying a panel.
Run: ``python -m pipeline.catalog`` prints the catalog as a table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import NamedTuple

from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# Labels whose values come from small fixed sets.  No ids (producer, trajectory, request, ...).
ALLOWED_LABELS = frozenset({"reason", "role", "finish_reason", "result", "version", "python"})
# Labels prometheus_client adds itself.
IMPLICIT_LABELS = frozenset({"le", "quantile"})
# Standard collectors (ProcessCollector, PlatformCollector, GCCollector) are not ours to rename.
FOREIGN_PREFIXES = ("process_", "python_")
PREFIX = "slipstream_"
# Name tokens (split on '_') that betray a non-base unit.  Base units: seconds, bytes, ratios 0..1.
NON_BASE_UNITS = frozenset({
    "ms", "msec", "millis", "milliseconds", "us", "usec", "micros", "microseconds", "ns", "nanoseconds",
    "minute", "minutes", "min", "mins", "hour", "hours", "hr", "day", "days",
    "percent", "percentage", "pct",
    "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib", "kilobytes", "megabytes", "gigabytes", "bits",
})
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class MetricDef(NamedTuple):
    type: str  # counter | gauge | histogram | summary | info | stateset | unknown
    help: str
    labels: tuple[str, ...]


def _family_name(name: str, mtype: str) -> str:
    # prometheus_client strips _total from counter families; the exposition's # TYPE line keeps it.
    return f"{name}_total" if mtype == "counter" else name


def registry_catalog(registry: CollectorRegistry) -> dict[str, MetricDef]:
    """{exposed family name: MetricDef} of one registry (labels sorted, ``le``/``quantile`` left out)."""
    labelnames: dict[str, tuple[str, ...]] = {}
    # Labelled metrics that have no child yet expose no sample, so read the declared label names too.
    for collector in list(getattr(registry, "_collector_to_names", {})):
        declared = getattr(collector, "_labelnames", None)
        name, mtype = getattr(collector, "_name", None), getattr(collector, "_type", None)
        if declared is not None and name and mtype:
            labelnames[_family_name(name, mtype)] = tuple(declared)
    out: dict[str, MetricDef] = {}
    for family in registry.collect():
        fname = _family_name(family.name, family.type)
        labels = set(labelnames.get(fname, ()))
        for sample in family.samples:
            labels.update(sample.labels)
        out[fname] = MetricDef(family.type, family.documentation, tuple(sorted(labels - IMPLICIT_LABELS)))
    return out


def process_registries() -> dict[str, CollectorRegistry]:
    """A fresh registry per process role, filled by that role's metrics class (nothing is served)."""
    from consumers.loop import TrainerMetrics
    from pipeline.broker import BrokerMetrics
    from pipeline.metrics import new_registry
    from producers.engine.metrics import EngineMetrics
    from producers.stats import ProducerMetrics

    engine_registry = new_registry("engine")
    EngineMetrics(engine_registry)
    return {
        "broker": BrokerMetrics().registry,
        "producer": ProducerMetrics().registry,
        "trainer": TrainerMetrics().registry,
        "engine": engine_registry,
    }


def catalog_by_role() -> dict[str, dict[str, MetricDef]]:
    """{role: {name: MetricDef}} for broker, producer, trainer and engine."""
    return {role: registry_catalog(reg) for role, reg in process_registries().items()}


def catalog() -> dict[str, MetricDef]:
    """{name: MetricDef} over every process.  A name defined by several processes must agree on
    type, help and labels (else ``ValueError``): one name, one meaning."""
    merged: dict[str, MetricDef] = {}
    owner: dict[str, str] = {}
    for role, metrics in catalog_by_role().items():
        for name, d in metrics.items():
            if name in merged and merged[name] != d and not name.startswith(FOREIGN_PREFIXES):
                raise ValueError(f"metric {name} is defined differently by {owner[name]} ({merged[name]}) and {role} ({d})")
            merged.setdefault(name, d)
            owner.setdefault(name, role)
    return dict(sorted(merged.items()))


def series_names(defs: dict[str, MetricDef]) -> set[str]:
    """Every series name a query may select: histogram/summary families expand to their parts."""
    out: set[str] = set()
    for name, d in defs.items():
        out.add(name)
        if d.type == "histogram":
            out.update(name + s for s in _HISTOGRAM_SUFFIXES)
        elif d.type == "summary":
            out.update((name + "_sum", name + "_count"))
        elif d.type == "info":
            out.add(name + "_info")
    return out


def lint_metric(name: str, d: MetricDef) -> list[str]:
    """Naming problems of one metric (empty if it follows DESIGN §9)."""
    if name.startswith(FOREIGN_PREFIXES):
        return []
    problems: list[str] = []
    if not _NAME_RE.match(name):
        problems.append(f"{name}: names are lower-case [a-z0-9_] (no ':')")
    if not name.startswith(PREFIX):
        problems.append(f"{name}: does not start with {PREFIX}")
    bad_units = [t for t in name.split("_") if t in NON_BASE_UNITS]
    if bad_units:
        problems.append(f"{name}: non-base unit {bad_units[0]!r} (use _seconds, _bytes or a 0..1 ratio)")
    if d.type == "counter" and not name.endswith("_total"):
        problems.append(f"{name}: counters end in _total")
    if d.type != "counter" and name.endswith("_total"):
        problems.append(f"{name}: only counters end in _total (this is a {d.type})")
    if d.type in ("histogram", "summary") and name.endswith((*_HISTOGRAM_SUFFIXES, "_total")):
        problems.append(f"{name}: a {d.type} name must not end in a series suffix")
    if not d.help.strip():
        problems.append(f"{name}: empty help text")
    for label in d.labels:
        if label not in ALLOWED_LABELS:
            problems.append(f"{name}: label {label!r} is not in the bounded allow-list {sorted(ALLOWED_LABELS)}")
    return problems


def lint(defs: dict[str, MetricDef]) -> list[str]:
    """Naming problems of every metric in ``defs``."""
    return [p for name, d in sorted(defs.items()) for p in lint_metric(name, d)]


def lint_registry(registry: CollectorRegistry) -> list[str]:
    return lint(registry_catalog(registry))


def format_table(defs: dict[str, MetricDef], rows: Iterable[str] | None = None) -> str:
    """A markdown table of the catalog (for the README's metrics table)."""
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name in rows if rows is not None else sorted(defs):
        d = defs[name]
        if name.startswith(FOREIGN_PREFIXES):
            continue
        lines.append(f"| `{name}` | {d.type} | {', '.join(d.labels)} | {d.help} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(catalog()))
