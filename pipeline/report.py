"""The sweep report: PNG plots (matplotlib) and one self-contained HTML page, drawn from ``sweep.json``.

    DIR/reward_vs_wall.png     smoothed reward against trainer wall time, one line per η, band = min..max over seeds
    DIR/reward_vs_steps.png    the same against trainer steps
    DIR/reward_vs_tokens.png   the same against tokens trained
    DIR/throughput.png         tokens trained (and generated) per second per η, bars = mean, whiskers = min..max over seeds
    DIR/staleness.png          share of consumed trajectories at each staleness, per η
    DIR/report.html            the tables and the five plots (inlined as data: URIs: one file to mail or attach)

Everything drawn comes from ``sweep.json`` (the curves are stored there per run), so the page and
the file cannot disagree.  Regenerate a report by hand:

    python -m pipeline.report runs/sweep-tiny-.../sweep.json
"""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

PLOTS = ("reward_vs_wall", "reward_vs_steps", "reward_vs_tokens", "throughput", "staleness")
AXES = {"reward_vs_wall": ("wall_time_s", "trainer wall time (s)"), "reward_vs_steps": ("step", "trainer step"),
        "reward_vs_tokens": ("tokens_trained", "tokens trained")}


def band(curves: list[dict[str, list[float]]], x_key: str, points: int = 200) -> tuple[Any, Any, Any, Any]:
    """Common x grid (0 .. the shortest run's end) and the mean, min and max of the seeds' smoothed reward on it."""
    import numpy as np

    ends = [c[x_key][-1] for c in curves if c[x_key]]
    starts = [c[x_key][0] for c in curves if c[x_key]]
    grid = np.linspace(max(starts), min(ends), points)
    ys = np.array([np.interp(grid, c[x_key], c["reward_smoothed"]) for c in curves if c[x_key]])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _colors(etas: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {eta: cmap(i / max(1, len(etas) - 1) * 0.85) for i, eta in enumerate(etas)}


def plot_all(sweep: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in sweep["runs"] if r["status"] == "done"]
    etas = sorted({str(r["max_staleness"]) for r in done}, key=int)
    colors = _colors(etas)
    seeds = {eta: sorted(r["seed"] for r in done if str(r["max_staleness"]) == eta) for eta in etas}
    paths = []
    for name, (x_key, label) in AXES.items():
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for eta in etas:
            curves = [r["curve"] for r in done if str(r["max_staleness"]) == eta]
            grid, mean, lo, hi = band(curves, x_key)
            ax.plot(grid, mean, color=colors[eta], lw=2, label=f"η = {eta} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
            if len(curves) > 1:
                ax.fill_between(grid, lo, hi, color=colors[eta], alpha=0.2, lw=0)
        if sweep.get("target_reward") is not None:
            ax.axhline(sweep["target_reward"], color="grey", ls="--", lw=1, label=f"target {sweep['target_reward']:g}")
        ax.set_xlabel(label)
        ax.set_ylabel(f"reward (mean of last {sweep['smooth']} steps)")
        ax.set_title(f"{sweep['sweep']}: reward against {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        paths.append(_save(fig, out_dir / f"{name}.png"))

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    by = sweep["by_max_staleness"]
    x = np.arange(len(etas))
    kinds = [("tokens_trained_per_s", "trained")] + ([("tokens_generated_per_s", "generated")] if all(by[e]["tokens_generated_per_s"] for e in etas) else [])
    width = 0.8 / len(kinds)
    for k, (key, what) in enumerate(kinds):
        means = [by[e][key]["mean"] if by[e][key] else 0.0 for e in etas]
        lo = [m - (by[e][key]["min"] if by[e][key] else 0.0) for m, e in zip(means, etas, strict=True)]
        hi = [(by[e][key]["max"] if by[e][key] else 0.0) - m for m, e in zip(means, etas, strict=True)]
        ax.bar(x + (k - (len(kinds) - 1) / 2) * width, means, width, yerr=[lo, hi], capsize=4,
               color=[colors[e] for e in etas], alpha=1.0 if what == "trained" else 0.5, edgecolor="black", lw=0.5, label=f"tokens {what}/s")
    ax.set_xticks(x, [f"η = {e}\n({len(seeds[e])} seed{'s' if len(seeds[e]) > 1 else ''})" for e in etas])
    ax.set_ylabel("tokens per second of trainer time")
    ax.set_title(f"{sweep['sweep']}: throughput per η")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    levels = sorted({int(k) for e in etas for k in by[e]["staleness_histogram"]})
    width = 0.8 / max(1, len(etas))
    for i, eta in enumerate(etas):
        hist = by[eta]["staleness_histogram"]
        n = sum(hist.values()) or 1
        ax.bar(np.array(levels) + (i - (len(etas) - 1) / 2) * width, [hist.get(str(v), 0) / n for v in levels], width,
               color=colors[eta], edgecolor="black", lw=0.5, label=f"η = {eta} (mean {by[eta]['staleness_mean']:.2f}, max {by[eta]['staleness_max']})")
    ax.set_xticks(levels)
    ax.set_xlabel("staleness of a consumed trajectory (policy versions)")
    ax.set_ylabel("share of consumed trajectories")
    ax.set_title(f"{sweep['sweep']}: staleness per η")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "staleness.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _stat(s: dict[str, float] | None, digits: int = 3) -> str:
    if not s:
        return "—"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(sweep: dict[str, Any], images: dict[str, bytes]) -> str:
    best, by = sweep["best"], sweep["by_max_staleness"]
    soon, top = best["soonest_to_target"], best["best_final_reward"]
    answer = _table(["question", "η", "value"], [
        [f"reached the target reward ({_fmt(sweep['target_reward'])}; {html.escape(sweep['target_source'])}) soonest in wall time, every seed",
         _fmt(soon["max_staleness"]) if soon else "none did", f"{soon['time_to_target_s']:.1f} s of trainer time (mean over seeds)" if soon else "—"],
        ["best final reward", _fmt(top["max_staleness"]) if top else "—", f"{top['final_reward']:.3f} (mean over seeds)" if top else "—"],
    ])
    per_eta = _table(
        ["η", "seeds", "final reward", "time to target (s)", "reached", "trainer wall (s)", "tokens trained/s", "tokens generated/s",
         "staleness mean", "staleness max", "drops"],
        [[e, _fmt(", ".join(map(str, a["seeds"]))), _stat(a["final_reward"]), _stat(a["time_to_target_s"], 1), a["reached_target"],
          _stat(a["train_wall_time_s"], 1), _stat(a["tokens_trained_per_s"], 0), _stat(a["tokens_generated_per_s"], 0),
          _fmt(a["staleness_mean"], 2), _fmt(a["staleness_max"]), _fmt(json.dumps(a["drops"]) if a["drops"] else "0")] for e, a in by.items()])
    marks = sweep["marks_s"]
    runs = _table(
        ["run", "status", "steps", "final reward", *[f"reward @ {m:g} s" for m in marks], "time to target (s)", "trainer wall (s)", "run wall (s)",
         "tokens trained/s", "staleness mean / max"],
        [[html.escape(r["id"]), html.escape(r["status"]), _fmt(r.get("steps")), _fmt(r.get("final_reward")),
          *[_fmt((r.get("reward_at_wall_s") or {}).get(f"{m:g}")) for m in marks],
          _fmt((r.get("time_to_target") or {}).get("wall_time_s"), 1), _fmt(r.get("train_wall_time_s"), 1), _fmt(r.get("wall_time_s"), 1),
          _fmt(r.get("tokens_trained_per_s"), 0),
          f"{_fmt((r.get('staleness') or {}).get('mean'), 2)} / {_fmt((r.get('staleness') or {}).get('max'))}"] for r in sweep["runs"]])
    figs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"><figcaption>{name}.png</figcaption></figure>'
        for name, data in images.items())
    evals = [r for r in sweep["runs"] if r.get("eval")]
    eval_html = ""
    if evals:
        keys = sorted({k for r in evals for k in r["eval"]["final"] if k.startswith("pass@")}, key=lambda k: int(k[5:]))
        eval_html = "<h2>Held-out evaluation (last one of each run)</h2>" + _table(
            ["run", "policy version", *keys], [[html.escape(r["id"]), _fmt(r["eval"]["final"].get("policy_version")),
                                               *[_fmt(r["eval"]["final"].get(k)) for k in keys]] for r in evals])
    css = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:14px}"
           "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
           "figure{display:inline-block;margin:0.5em}img{max-width:560px}figcaption{font-size:12px;color:#666;text-align:center}"
           "code{background:#f3f3f3;padding:1px 4px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(sweep['sweep'])}</title><style>{css}</style></head><body>"
            f"<h1>{html.escape(sweep['sweep'])}: max_staleness sweep</h1>"
            f"<p><code>{html.escape(sweep['command'])}</code><br>{html.escape(sweep['date'])}, {html.escape(str(sweep['machine'].get('cpu', '')))}, "
            f"{sweep['steps_per_run']} steps per run, overrides {html.escape(json.dumps(sweep['overrides']))}"
            f"{'' if sweep['complete'] else ' — <b>incomplete sweep</b>: some runs did not finish'}</p>"
            f"<h2>Answer</h2>{answer}<h2>Per η (mean ± std over seeds)</h2>{per_eta}{figs}<h2>Per run</h2>{runs}{eval_html}"
            f"<h2>Definitions</h2><ul>{''.join(f'<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>' for k, v in sweep['definitions'].items())}</ul>"
            "</body></html>")


def write_report(sweep: dict[str, Any], out_dir: Path) -> Path:
    images: dict[str, bytes] = {}
    try:
        for path in plot_all(sweep, out_dir):
            images[path.stem] = path.read_bytes()
    except ImportError as e:
        print(f"slipstream sweep: no plots ({e}); pip install 'slipstream[sweep]' for matplotlib", file=sys.stderr)
    path = out_dir / "report.html"
    path.write_text(render_html(sweep, images))
    return path


if __name__ == "__main__":
    src = Path(sys.argv[1])
    print(write_report(json.loads(src.read_text()), src.parent))
