"""The Grafana dashboard is generated from code, committed, and checked.

- the committed ``ops/grafana/slipstream.json`` equals the generated one (``slipstream dashboard
  --check`` exits 0), has the six rows, a ``${datasource}`` variable, no hard-coded datasource uid
  and a unit on every panel, and every expression parses and uses only metrics the code defines;
- ``--check`` fails (exit 1, naming the problem) on: a stale file, merge-conflict markers, an
  unknown metric, an expression that does not parse, a hard-coded datasource uid, a missing unit;
- the regex fallback (no promql-parser) finds the same metrics as the parser.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import dashboard as dash
from tests.helpers import env, slipstream


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    return dash.build_dashboard()


@pytest.fixture(scope="module")
def known() -> set[str]:
    return dash.known_series()


def _write(tmp_path: Path, d: dict[str, Any]) -> Path:
    path = tmp_path / "slipstream.json"
    path.write_text(dash.render(d))
    return path


def _panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in d["panels"] if p["type"] != "row"]


def test_committed_dashboard_is_current() -> None:
    assert dash.check_dashboard(dash.DASHBOARD_PATH) == []


def test_cli_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    assert main(["dashboard", "--check"]) == 0
    stale = tmp_path / "stale.json"
    stale.write_text(dash.DASHBOARD_PATH.read_text().replace('"refresh": "10s"', '"refresh": "5s"'))
    capsys.readouterr()
    assert main(["dashboard", "--check", "--path", str(stale)]) == 1
    assert "differs from the generated dashboard" in capsys.readouterr().out
    out = tmp_path / "written.json"
    assert main(["dashboard", "--path", str(out)]) == 0
    assert out.read_text() == dash.DASHBOARD_PATH.read_text()
    # The real command line (a new process) exits non-zero on the stale file too.
    bad = subprocess.run(slipstream("dashboard", "--check", "--path", str(stale)), capture_output=True, text=True, env=env(), timeout=120)
    assert bad.returncode == 1 and "differs from the generated dashboard" in bad.stdout, bad.stdout + bad.stderr


def test_generated_dashboard_shape(generated: dict[str, Any], known: set[str]) -> None:
    rows = [p["title"] for p in generated["panels"] if p["type"] == "row"]
    assert rows == ["Throughput", "Staleness", "Queue", "Drops and errors", "Weight sync", "Learning"]
    var = generated["templating"]["list"]
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= var[0].items()
    text = dash.render(generated)
    assert '"uid": "${datasource}"' in text
    for p in _panels(generated):
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"], p["title"]
    assert dash.lint_dashboard(generated, known) == []
    # Deterministic: two builds render the same text.
    assert dash.render(dash.build_dashboard()) == text
    # DESIGN §9's minimum set is on it.
    used = set().union(*(dash.metrics_in_expr(dash.substitute_grafana_vars(e)) for _, e in dash.panel_exprs(generated)))
    for needed in ("slipstream_producer_tokens_generated_total", "slipstream_trainer_tokens_trained_total",
                   "slipstream_queue_depth_trajectories", "slipstream_queue_bytes", "slipstream_queue_credits_in_flight",
                   "slipstream_broker_consumed_staleness_bucket", "slipstream_broker_trajectories_dropped_total",
                   "slipstream_broker_duplicate_groups_total", "slipstream_broker_lease_expiries_total",
                   "slipstream_broker_rejected_messages_total", "slipstream_trainer_step_seconds_bucket",
                   "slipstream_trainer_wait_seconds_total", "slipstream_trainer_weight_publish_seconds_bucket",
                   "slipstream_trainer_weight_publish_bytes_total", "slipstream_engine_weight_update_pause_seconds_bucket",
                   "slipstream_policy_version", "slipstream_trainer_reward_mean", "slipstream_trainer_loss",
                   "slipstream_trainer_kl", "slipstream_trainer_clip_fraction", "slipstream_trainer_is_weight_mean"):
        assert needed in used, needed


def test_check_fails_on_stale_file(tmp_path: Path, generated: dict[str, Any]) -> None:
    d = copy.deepcopy(generated)
    d["panels"][1]["title"] = "Renamed by hand"
    problems = dash.check_dashboard(_write(tmp_path, d))
    assert problems and "differs from the generated dashboard" in problems[-1]


def test_check_fails_on_merge_conflict_markers(tmp_path: Path) -> None:
    lines = dash.DASHBOARD_PATH.read_text().splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if '"refresh"' in line)
    lines[i:i + 1] = ["<<<<<<< HEAD\n", lines[i], "=======\n", '  "refresh": "30s",\n', ">>>>>>> feature\n"]
    path = tmp_path / "conflicted.json"
    path.write_text("".join(lines))
    problems = dash.check_dashboard(path)
    assert len(problems) == 1 and "merge-conflict markers" in problems[0], problems
    assert str(i + 1) in problems[0]


def test_check_fails_on_unknown_metric(tmp_path: Path, generated: dict[str, Any]) -> None:
    d = copy.deepcopy(generated)
    _panels(d)[0]["targets"][0]["expr"] = "sum(rate(slipstream_producer_tokens_generated_totl[$__rate_interval]))"
    problems = dash.check_dashboard(_write(tmp_path, d))
    assert any("uses slipstream_producer_tokens_generated_totl, which no slipstream process defines" in p for p in problems), problems


def test_check_fails_on_unparsable_expression(tmp_path: Path, generated: dict[str, Any]) -> None:
    d = copy.deepcopy(generated)
    _panels(d)[2]["targets"][0]["expr"] = "sum(rate(slipstream_trainer_steps_total[$__rate_interval])"
    problems = dash.check_dashboard(_write(tmp_path, d))
    assert any("does not parse" in p for p in problems), problems


def test_check_fails_on_hard_coded_datasource(tmp_path: Path, generated: dict[str, Any]) -> None:
    d = copy.deepcopy(generated)
    _panels(d)[3]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}
    _panels(d)[4]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "a1b2c3"}
    d["templating"]["list"] = []
    problems = dash.check_dashboard(_write(tmp_path, d))
    assert any("hard-coded datasource 'P1809F7CD0C75ACF3'" in p for p in problems), problems
    assert any("hard-coded datasource 'a1b2c3'" in p for p in problems), problems
    assert any("no 'datasource' variable" in p for p in problems), problems


def test_check_fails_on_missing_unit(tmp_path: Path, generated: dict[str, Any]) -> None:
    d = copy.deepcopy(generated)
    del _panels(d)[5]["fieldConfig"]["defaults"]["unit"]
    problems = dash.check_dashboard(_write(tmp_path, d))
    assert any(f"panel {_panels(d)[5]['title']!r}: no unit" in p for p in problems), problems


def test_check_fails_on_missing_or_invalid_file(tmp_path: Path) -> None:
    assert "missing" in dash.check_dashboard(tmp_path / "nope.json")[0]
    (tmp_path / "broken.json").write_text("{")
    assert "not valid JSON" in dash.check_dashboard(tmp_path / "broken.json")[0]


def test_regex_fallback_agrees_with_parser(generated: dict[str, Any]) -> None:
    for _, expr in dash.panel_exprs(generated):
        e = dash.substitute_grafana_vars(expr)
        assert dash._metrics_regex(e) == dash.metrics_in_expr(e), expr
    tricky = 'sum by (job) (up{job=~"a.*"}) + on(instance) group_left(version) foo offset 5m > bool 2 and {__name__="bar"}'
    assert dash._metrics_regex(tricky) == dash.metrics_in_expr(tricky) == {"up", "foo", "bar"}


def test_committed_file_is_plain_json() -> None:
    json.loads(dash.DASHBOARD_PATH.read_text())


def test_check_without_promql_parser_warns_once() -> None:
    """Without promql-parser, --check says once that it falls back to the regex (it used to repeat
    the line for every expression)."""
    code = ("import sys; sys.modules['promql_parser'] = None\n"
            "from pipeline.cli import main\n"
            "sys.exit(main(['dashboard', '--check']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("promql-parser not installed") == 1, r.stderr
