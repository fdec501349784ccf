"""Monitoring against real processes and a real Prometheus server (slow: starts servers).

- every process of a running ``slipstream run`` serves /metrics that ``promtool check metrics``
  accepts;
- ``slipstream scrape-config RUN_DIR`` gives a config under which a real ``prometheus`` finds every
  target up and loads alerts.yml with every rule healthy;
- EVERY dashboard expression (``$__rate_interval`` -> 30s) and every alert expression parses on the
  server, and returns data: the dashboard's each time, the alerts' through each operand of their
  comparisons (an alert expression itself is empty while nothing is wrong);
- ``slipstream status RUN_DIR --once`` prints the step, versions and queue depth the metrics show.

The first test runs the same server checks on the metrics classes served directly, so the
Prometheus side is covered even where the pipeline cannot run.  Binaries: see tests/promtools.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.dashboard import build_dashboard, metrics_in_expr, panel_exprs
from pipeline.status import load_processes, write_scrape_config
from tests.helpers import REPO, env, process, scrape, slipstream
from tests.promtools import require

TINY = REPO / "examples" / "tiny" / "config.toml"
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
RATE_WINDOW = "30s"
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}


# --------------------------------------------------------------------------- Prometheus helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def query(base: str, expr: str) -> dict[str, Any]:
    """/api/v1/query; returns the JSON answer (errors come back as status 'error', not raised)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return _get(url)
    except urllib.error.HTTPError as e:  # 400 on a parse error, with a JSON body
        return json.loads(e.read())


def wait_until(what: str, check: Any, timeout_s: float, interval_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            last = check()
            if last:
                return last
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not true within {timeout_s}s (last: {last!r})")


@contextlib.contextmanager
def prometheus_server(config: Path, tmp: Path) -> Iterator[str]:
    port = _free_port()
    cmd = [require("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with process(cmd, tmp / "prometheus.log") as proc:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            return urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200

        wait_until("prometheus ready", ready, 30)
        yield base


def wait_targets_up(base: str, n: int, timeout_s: float = 30) -> None:
    def all_up() -> bool:
        targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
        return len(targets) == n and all(t["health"] == "up" for t in targets)

    wait_until(f"{n} targets up", all_up, timeout_s)
    # Enough samples for a 30 s rate window: a few scrapes after every target is up.
    wait_until("5 samples per target", lambda: all(
        float(r["value"][1]) >= 5 for r in query(base, "count_over_time(up[30s])")["data"]["result"]), 30)


def comparison_operands(expr: str) -> list[str]:
    """The non-literal operands of every filtering comparison in ``expr`` (what an alert looks at)."""
    import promql_parser

    out: list[str] = []

    def visit(node: Any) -> bool:
        returns_bool = getattr(getattr(node, "modifier", None), "return_bool", False)
        if isinstance(node, promql_parser.BinaryExpr) and str(node.op) in COMPARISONS and not returns_bool:
            out.extend(str(side) for side in (node.lhs, node.rhs) if not isinstance(side, promql_parser.NumberLiteral))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return out


def expression_problems(base: str) -> list[str]:
    """Every dashboard and alert expression evaluated on the server; what did not parse or was empty."""
    problems: list[str] = []
    checks: list[tuple[str, str, bool]] = []  # (where, expr, must return data)
    for title, expr in panel_exprs(build_dashboard()):
        checks.append((f"panel {title!r}", expr.replace("$__rate_interval", RATE_WINDOW), True))
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    for rule in rules:
        checks.append((f"alert {rule['alert']}", rule["expr"], False))
        operands = comparison_operands(rule["expr"])
        assert operands, rule["alert"]
        checks += [(f"alert {rule['alert']} operand", op, True) for op in operands]
        # ... and every metric it selects exists (an `or vector(0)` must not hide a missing one).
        checks += [(f"alert {rule['alert']} metric", name, True) for name in sorted(metrics_in_expr(rule["expr"]))]
    for where, expr, needs_data in checks:
        answer = query(base, expr)
        if answer.get("status") != "success":
            problems.append(f"{where}: {expr!r}: {answer.get('error')}")
        elif needs_data and not answer["data"]["result"]:
            problems.append(f"{where}: {expr!r} returned no data")
    rule_health = _get(f"{base}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"]: r for g in rule_health for r in g["rules"]}
    if set(loaded) != {r["alert"] for r in rules}:
        problems.append(f"server loaded rules {sorted(loaded)}")
    problems += [f"rule {n}: health {r['health']} {r.get('lastError', '')}" for n, r in loaded.items() if r["health"] != "ok"]
    return problems


def check_metrics(url: str) -> subprocess.CompletedProcess[bytes]:
    body = urllib.request.urlopen(url, timeout=5).read()
    return subprocess.run([require("promtool"), "check", "metrics"], input=body, capture_output=True, timeout=30)


# --------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_prometheus_with_every_metrics_class(tmp_path: Path) -> None:
    """Server-side checks on the metrics classes served directly (no pipeline needed)."""
    require("prometheus")
    from pipeline.catalog import process_registries
    from pipeline.metrics import serve_metrics

    registries = process_registries()
    servers, procs = [], []
    for role, reg in registries.items():
        for collector in list(reg._collector_to_names):  # a process sets its role's version at start
            if getattr(collector, "_name", "") == "slipstream_policy_version":
                collector.labels(role).set(0)
        server, port = serve_metrics(reg, "127.0.0.1", 0)
        servers.append(server)
        procs.append({"name": f"{role}-0", "role": role, "pid": None, "metrics_url": f"http://127.0.0.1:{port}/metrics"})
    (tmp_path / "processes.json").write_text(json.dumps(procs))
    try:
        for p in procs:
            r = check_metrics(p["metrics_url"])
            assert r.returncode == 0, (p["name"], (r.stdout + r.stderr).decode())
        config = write_scrape_config(tmp_path, tmp_path / "prometheus.yml", 1.0, [ALERTS])
        with prometheus_server(config, tmp_path) as base:
            wait_targets_up(base, len(procs))
            assert expression_problems(base) == []
            # The check can fail: a misspelt metric returns no data, a broken expression an error.
            assert query(base, "sum(slipstream_queue_depth_trajectoriez)")["data"]["result"] == []
            assert query(base, "sum(rate(slipstream_trainer_steps_total[30s])")["status"] == "error"
    finally:
        for s in servers:
            s.shutdown()


@pytest.mark.slow
def test_monitoring_live_run(tmp_path: Path) -> None:
    """A real tiny run, a real Prometheus, and ``slipstream status`` (< 3 minutes)."""
    require("prometheus")
    require("promtool")
    t0 = time.monotonic()
    run_dir = tmp_path / "run"
    # Many steps so the run is still going when the checks end; the block's exit stops it (SIGTERM).
    cmd = slipstream("run", str(TINY), "--run-dir", str(run_dir), "--set", "run.steps=2000",
                     "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'")
    with process(cmd, tmp_path / "run.log", timeout_s=60) as proc:
        def started() -> bool:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            return (run_dir / "processes.json").exists()

        wait_until("processes.json", started, 120)
        procs = load_processes(run_dir)
        assert {p["role"] for p in procs} == {"broker", "engine", "producer", "trainer"}
        trainer = next(p for p in procs if p["role"] == "trainer")

        def steps() -> float:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            return scrape(trainer["metrics_url"]).get("slipstream_trainer_steps_total", 0) >= 3

        wait_until("3 trainer steps", steps, 120)
        for p in procs:
            r = check_metrics(p["metrics_url"])
            assert r.returncode == 0, (p["name"], (r.stdout + r.stderr).decode())

        config = tmp_path / "prometheus.yml"
        gen = subprocess.run(slipstream("scrape-config", str(run_dir), "--out", str(config), "--rules", str(ALERTS)),
                             capture_output=True, text=True, env=env(), timeout=60)
        assert gen.returncode == 0, gen.stderr
        with prometheus_server(config, tmp_path) as base:
            wait_targets_up(base, len(procs))
            assert expression_problems(base) == []

        # Status scrapes between these two snapshots: each number it prints lies between them.
        before = {p["name"]: scrape(p["metrics_url"]) for p in procs}
        status = subprocess.run(slipstream("status", str(run_dir), "--once"), capture_output=True, text=True, env=env(), timeout=60)
        after = {p["name"]: scrape(p["metrics_url"]) for p in procs}
        assert status.returncode == 0, status.stdout + status.stderr
        out = status.stdout

        def between(name: str, key: str, value: float, slack: float = 0) -> bool:
            lo, hi = sorted((before[name][key], after[name][key]))
            return lo - slack <= value <= hi + slack

        step = int(re.search(r"^step\s+(\d+)$", out, re.MULTILINE).group(1))
        assert between("trainer", "slipstream_trainer_steps_total", step), out
        versions = dict(re.findall(r"(\S+)=(\d+)", re.search(r"^versions\s+(.*)$", out, re.MULTILINE).group(1)))
        assert set(versions) == {p["name"] for p in procs}, out
        for p in procs:
            key = "slipstream_engine_policy_version" if p["role"] == "engine" else f'slipstream_policy_version{{role="{p["role"]}"}}'
            assert between(p["name"], key, int(versions[p["name"]])), (p["name"], out)
        depth = int(re.search(r"^queue\s+depth=(\d+)", out, re.MULTILINE).group(1))
        # The queue moves by whole batches (groups_per_step x group_size = 64 in the tiny example).
        assert between("broker", "slipstream_queue_depth_trajectories", depth, slack=64), out
        assert re.search(r"^peers\s+producers_alive=1/1 trainer_alive=1$", out, re.MULTILINE), out
        assert len(re.findall(r"^  \S+\s+\S+\s+up\s", out, re.MULTILINE)) == len(procs), out
        assert proc.poll() is None, "the run ended during the checks: raise run.steps"
    assert time.monotonic() - t0 < 180, f"took {time.monotonic() - t0:.0f}s"
