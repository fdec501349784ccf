"""Ops tools for a run directory: a one-screen status view and a Prometheus scrape config.

What: ``slipstream status RUN_DIR`` reads ``RUN_DIR/processes.json``, scrapes every process's
``metrics_url`` and prints one screen: step, policy version per process, queue depth, credits,
staleness, tokens/s, drops, rejections, producers alive and each process up or down.  A finished
run (its ``summary.json`` is newer than ``processes.json``) is shown from its files instead: final
step, version and reward (``steps.jsonl``), and the trajectory account, drops and restarts of
``summary.json``; exit 0.
``slipstream scrape-config RUN_DIR`` writes a Prometheus config that scrapes the same URLs, one job
per role (``job="slipstream-<role>"``, the names ``ops/prometheus/alerts.yml`` and the dashboard use)
and a ``process`` label per target.
Why: the first questions about a running job ("is it moving? is anything dropped? who is down?")
should not need a Prometheus server; and when one is wanted, its config should come from the run.
Run: ``slipstream status runs/tiny-... [--once]`` (refreshes every 2 s until Ctrl-C), or
``slipstream scrape-config runs/tiny-... [--out F] [--rules ops/prometheus/alerts.yml]`` then
``prometheus --config.file=F``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

ROLES = ("broker", "engine", "producer", "trainer")
SCRAPE_TIMEOUT_S = 2.0


# --------------------------------------------------------------------------- processes.json
def load_processes(run_dir: Path) -> list[dict[str, Any]]:
    """The entries of ``RUN_DIR/processes.json`` (each has name, role, metrics_url, pid, ...)."""
    path = Path(run_dir) / "processes.json"
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory of a started run?") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e and "role" in e for e in entries):
        raise ValueError(f"{path}: expected a list of objects with name, role and metrics_url")
    return entries


# --------------------------------------------------------------------------- scrape config
def scrape_config(processes: list[dict[str, Any]], interval_s: float = 1.0, rule_files: list[str] | None = None) -> dict[str, Any]:
    """A Prometheus config (as a dict) scraping every process that serves metrics."""
    interval = f"{interval_s:g}s"
    jobs: dict[str, list[dict[str, Any]]] = {}
    for p in processes:
        url = p.get("metrics_url") or ""
        if not url:
            log.warning("%s serves no metrics (metrics.enabled = false?): not scraped", p["name"])
            continue
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"{p['name']}: metrics_url {url!r} has no host:port")
        jobs.setdefault(p["role"], []).append({
            "targets": [parts.netloc],
            "labels": {"process": p["name"], "__metrics_path__": parts.path or "/metrics"},
        })
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
    }
    if rule_files:
        config["rule_files"] = list(rule_files)
    config["scrape_configs"] = [
        {"job_name": f"slipstream-{role}", "static_configs": jobs[role]}
        for role in sorted(jobs, key=lambda r: (ROLES.index(r) if r in ROLES else len(ROLES), r))
    ]
    return config


def render_scrape_config(config: dict[str, Any], header: str = "") -> str:
    import yaml

    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_scrape_config(run_dir: Path, out: Path | None = None, interval_s: float = 1.0, rules: list[Path] | None = None) -> Path:
    out = out or Path(run_dir) / "prometheus.yml"
    rule_files = [str(Path(r).resolve()) for r in rules or []]
    header = (f"# Prometheus scrape config for the slipstream run in {Path(run_dir).resolve()}\n"
              f"# written by: slipstream scrape-config {run_dir}\n")
    out.write_text(render_scrape_config(scrape_config(load_processes(run_dir), interval_s, rule_files), header))
    return out


# --------------------------------------------------------------------------- scraping
@dataclass
class Scrape:
    name: str
    role: str
    url: str
    pid: int | None
    up: bool
    error: str = ""
    # {metric sample name: [(labels, value)]}
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    at: float = 0.0

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples of ``name`` whose labels include ``labels`` (None if there are none)."""
        hits = [v for lab, v in self.samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
        return sum(hits) if hits else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {lab.get(label, ""): v for lab, v in self.samples.get(name, [])}


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _pid_alive(pid: int | None) -> bool | None:
    if not pid:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scrape_one(p: dict[str, Any], timeout_s: float = SCRAPE_TIMEOUT_S) -> Scrape:
    url = p.get("metrics_url") or ""
    s = Scrape(p["name"], p["role"], url, p.get("pid"), up=False, at=time.monotonic())
    if not url:
        s.error = "no metrics_url"
        return s
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            s.samples = parse_exposition(r.read().decode())
        s.up = True
    except (urllib.error.URLError, OSError, ValueError) as e:
        s.error = str(getattr(e, "reason", e))
    s.at = time.monotonic()
    return s


def scrape_all(processes: list[dict[str, Any]], timeout_s: float = SCRAPE_TIMEOUT_S) -> list[Scrape]:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(processes)))) as pool:
        return list(pool.map(lambda p: scrape_one(p, timeout_s), processes))


# --------------------------------------------------------------------------- view
def _sum(scrapes: list[Scrape], role: str, name: str, **labels: str) -> float | None:
    vals = [v for s in scrapes if s.role == role and s.up and (v := s.value(name, **labels)) is not None]
    return sum(vals) if vals else None


def _fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _rate(now: list[Scrape], before: list[Scrape] | None, role: str, name: str) -> float | None:
    if before is None:
        return None
    prev = {s.name: s for s in before}
    total, seconds = 0.0, 0.0
    for s in now:
        p = prev.get(s.name)
        if s.role != role or not s.up or p is None or not p.up:
            continue
        a, b = p.value(name), s.value(name)
        if a is None or b is None:
            continue
        total += max(b - a, 0.0) if b >= a else b  # a counter reset restarts from 0
        seconds = max(seconds, s.at - p.at)
    return total / seconds if seconds > 0 else None


def render_status(run_dir: Path, now: list[Scrape], before: list[Scrape] | None = None) -> str:
    """The one-screen view.  Lines start with a fixed key (``step``, ``versions``, ``queue``, ...)."""
    lines = [f"slipstream status: {run_dir}  ({time.strftime('%Y-%m-%d %H:%M:%S')})"]
    lines.append(f"step       {_fmt(_sum(now, 'trainer', 'slipstream_trainer_steps_total'))}")
    versions = []
    for s in now:
        v = s.value("slipstream_policy_version") if s.up else None
        if v is None and s.up:
            v = s.value("slipstream_engine_policy_version")
        versions.append(f"{s.name}={_fmt(v)}")
    lines.append("versions   " + " ".join(versions))
    lines.append(
        f"queue      depth={_fmt(_sum(now, 'broker', 'slipstream_queue_depth_trajectories'))} trajectories"
        f" groups={_fmt(_sum(now, 'broker', 'slipstream_queue_depth_groups'))}"
        f" leased={_fmt(_sum(now, 'broker', 'slipstream_queue_leased_groups'))}"
        f" bytes={_fmt(_sum(now, 'broker', 'slipstream_queue_bytes'))}"
    )
    lines.append(
        f"credits    in_flight={_fmt(_sum(now, 'broker', 'slipstream_queue_credits_in_flight'))}"
        f" available={_fmt(_sum(now, 'broker', 'slipstream_queue_credits_available'))}"
    )
    st_sum = _sum(now, "broker", "slipstream_broker_consumed_staleness_sum")
    st_count = _sum(now, "broker", "slipstream_broker_consumed_staleness_count")
    overall = st_sum / st_count if st_sum is not None and st_count else None
    lines.append(
        f"staleness  batch_mean={_fmt(_sum(now, 'trainer', 'slipstream_trainer_batch_staleness_mean'), '.2f')}"
        f" batch_max={_fmt(_sum(now, 'trainer', 'slipstream_trainer_batch_staleness_max'))}"
        f" consumed_mean={_fmt(overall, '.2f')}"
    )
    gen = _rate(now, before, "producer", "slipstream_producer_tokens_generated_total")
    trained = _rate(now, before, "trainer", "slipstream_trainer_tokens_trained_total")
    lines.append(f"tokens/s   generated={_fmt(gen)} trained={_fmt(trained)}"
                 + ("" if before is not None else " (needs two scrapes)"))
    broker = next((s for s in now if s.role == "broker" and s.up), None)
    dropped = broker.by_label("slipstream_broker_trajectories_dropped_total", "reason") if broker else {}
    rejected = broker.by_label("slipstream_broker_rejected_messages_total", "reason") if broker else {}
    drop_detail = " ".join(f"{k}={v:.0f}" for k, v in sorted(dropped.items()) if v)
    rej_detail = " ".join(f"{k}={v:.0f}" for k, v in sorted(rejected.items()) if v)
    lines.append(f"dropped    total={_fmt(sum(dropped.values()) if broker else None)} {drop_detail}".rstrip())
    lines.append(f"rejected   total={_fmt(sum(rejected.values()) if broker else None)} {rej_detail}".rstrip())
    n_producers = sum(1 for s in now if s.role == "producer")
    lines.append(
        f"peers      producers_alive={_fmt(_sum(now, 'broker', 'slipstream_broker_producers_alive'))}/{n_producers}"
        f" trainer_alive={_fmt(_sum(now, 'broker', 'slipstream_broker_trainer_alive'))}"
    )
    lines.append("processes")
    for s in now:
        alive = _pid_alive(s.pid)
        pid = f"pid {s.pid}" + ("" if alive is not False else " (exited)") if s.pid else "pid -"
        state = "up" if s.up else f"DOWN ({s.error})"
        lines.append(f"  {s.name:<12} {s.role:<9} {state:<6} {pid:<18} {s.url}")
    return "\n".join(lines)


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """``RUN_DIR/summary.json`` if the run in ``run_dir`` has finished (the summary is newer than
    ``processes.json``: a restarted run in the same directory is live again), else None."""
    summary, procs = Path(run_dir) / "summary.json", Path(run_dir) / "processes.json"
    try:
        if procs.exists() and procs.stat().st_mtime > summary.stat().st_mtime:
            return None
        out = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return out if isinstance(out, dict) else None


def _last_step(run_dir: Path) -> dict[str, Any] | None:
    try:
        lines = [ln for ln in (Path(run_dir) / "steps.jsonl").read_text().splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def render_finished(run_dir: Path, summary: dict[str, Any]) -> str:
    """The view of a finished run, from ``summary.json`` and the last line of ``steps.jsonl``."""
    code = summary.get("exit_code")
    known: dict[Any, str] = {0: "finished", 130: "stopped (interrupted)"}
    state = known.get(code, f"failed (exit code {code})")
    lines = [f"slipstream status: {run_dir}  ({state}; wall time {summary.get('wall_time_s', 0):.1f} s)"]
    last = _last_step(run_dir)
    if last is not None:
        lines.append(f"step       {last.get('step')} (policy version {last.get('policy_version')}), "
                     f"reward {last.get('reward_mean', float('nan')):.3f}, staleness {last.get('staleness_mean', float('nan')):.2f}"
                     f"/{last.get('staleness_max')}")
    else:
        lines.append("step       - (no step completed)")
    lines.append(f"steps      {summary.get('steps_completed', 0)} completed, final policy version {summary.get('final_policy_version', 0)}")
    if "reward_first10_mean" in summary:
        lines.append(f"reward     first 10 steps {summary['reward_first10_mean']:.3f} -> last 10 steps {summary['reward_last10_mean']:.3f}")
    t = summary.get("trajectories", {})
    dropped = t.get("dropped") or {}
    lines.append(f"trajectories generated={t.get('generated')} accepted={t.get('accepted')} consumed={t.get('consumed')} "
                 f"dropped={sum(dropped.values()) if dropped else 0} still_queued={t.get('still_queued')} "
                 f"duplicates={t.get('duplicates_rejected_groups')} balanced={t.get('balanced')}")
    if dropped:
        lines.append("dropped    " + " ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    rejected = summary.get("rejected_messages") or {}
    lines.append(f"rejected   total={sum(rejected.values())}" + "".join(f" {k}={v}" for k, v in sorted(rejected.items())))
    restarts = summary.get("restarts") or {}
    lines.append("restarts   " + (" ".join(f"{k}={v}" for k, v in restarts.items()) or "-"))
    return "\n".join(lines)


def main(run_dir: Path, once: bool, interval_s: float = 2.0, rate_window_s: float = 1.0) -> int:
    """``slipstream status``: a finished run (summary.json) is shown from its files, exit 0; a live
    one from its metrics endpoints.  Exit 1 when RUN_DIR is not a run directory, or no process of a
    live run answers."""
    summary = finished_summary(run_dir)
    if summary is not None:
        print(render_finished(run_dir, summary))
        return 0
    try:
        processes = load_processes(run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"slipstream status: {e}")
        return 1
    before = scrape_all(processes)
    if once:
        time.sleep(rate_window_s)  # a second scrape for tokens/s
        now = scrape_all(processes)
        print(render_status(run_dir, now, before))
        return 0 if any(s.up for s in now) else 1
    try:
        while True:
            time.sleep(interval_s)
            now = scrape_all(load_processes(run_dir))
            print("\033[2J\033[H" + render_status(run_dir, now, before), flush=True)
            before = now
    except KeyboardInterrupt:
        return 0
