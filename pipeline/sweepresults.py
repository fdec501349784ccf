"""What a sweep measured: one record per run directory, and their aggregate per η (``sweep.json``).

Everything here is read from the run directories the launcher wrote (``steps.jsonl``,
``consumed.jsonl``, ``summary.json``, ``stats/producer-*.json``, ``eval.jsonl``, ``config.json``);
nothing is measured twice, so ``sweep.json`` can always be checked against them
(``tests/test_sweep.py`` does).

Definitions (also written into ``sweep.json`` under ``definitions``):

* wall time: ``train_wall_time_s`` is the trainer loop's clock (``wall_time_s`` of the last step,
  from the trainer's hello, as in ``steps.jsonl``); ``wall_time_s`` is the whole ``slipstream run``
  including start-up (``summary.json``).  Reward curves use the trainer loop's clock.
* smoothed reward: trailing mean of ``reward_mean`` over the last ``smooth`` steps (fewer at the
  start); final reward: the smoothed reward at the last step.
* reward at a wall-clock mark t: the smoothed reward of the last step with ``wall_time_s <= t``
  (null before the first step).
* time to target: the first step whose smoothed reward is >= the target (wall time, step, tokens
  trained by then); null if never.
* staleness: per consumed trajectory (first commits only, not resume replays),
  ``trained_from_version - min_version``.

    python -c "from pipeline.sweepresults import collect_run; print(collect_run(Path('runs/x'), 10, [10.0], 0.7))"
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

DEFINITIONS = {
    "train_wall_time_s": "trainer loop seconds (wall_time_s of the last steps.jsonl line, from the trainer's hello)",
    "wall_time_s": "seconds of the whole `slipstream run`, start-up included (summary.json)",
    "reward_smoothed": "trailing mean of steps.jsonl reward_mean over the last `smooth` steps",
    "final_reward": "reward_smoothed at the last step",
    "reward_at_wall_s": "reward_smoothed of the last step with wall_time_s <= mark (null before the first step)",
    "time_to_target": "first step with reward_smoothed >= target: its wall_time_s, step and cumulative tokens_trained",
    "staleness": "trained_from_version - min_version per consumed trajectory (consumed.jsonl, replays excluded)",
    "tokens_generated": "response tokens the producers generated (stats/producer-*.json, filtered groups included)",
    "tokens_trained": "sum of steps.jsonl tokens_trained",
}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def smoothed(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curve(run_dir: Path, smooth: int) -> dict[str, list[float]]:
    steps = read_jsonl(run_dir / "steps.jsonl")
    rewards = [float(s["reward_mean"]) for s in steps]
    tokens, cum = [], 0
    for s in steps:
        cum += int(s["tokens_trained"])
        tokens.append(cum)
    return {"step": [int(s["step"]) for s in steps], "wall_time_s": [float(s["wall_time_s"]) for s in steps],
            "tokens_trained": tokens, "reward_mean": rewards, "reward_smoothed": smoothed(rewards, smooth)}


def staleness_histogram(run_dir: Path) -> dict[int, int]:
    hist: Counter[int] = Counter()
    for c in read_jsonl(run_dir / "consumed.jsonl"):
        if not c.get("replay"):
            hist[int(c["trained_from_version"]) - int(c["min_version"])] += 1
    return dict(sorted(hist.items()))


def time_to_target(c: dict[str, list[float]], target: float) -> dict[str, Any]:
    for i, r in enumerate(c["reward_smoothed"]):
        if r >= target:
            return {"wall_time_s": c["wall_time_s"][i], "step": int(c["step"][i]), "tokens_trained": int(c["tokens_trained"][i])}
    return {"wall_time_s": None, "step": None, "tokens_trained": None}


def reward_at(c: dict[str, list[float]], mark: float) -> float | None:
    best = None
    for t, r in zip(c["wall_time_s"], c["reward_smoothed"], strict=True):
        if t > mark:
            break
        best = r
    return best


def collect_run(run_dir: Path, smooth: int, marks: list[float], target: float | None) -> dict[str, Any]:
    """The sweep record of one finished run directory."""
    cfg = read_json(run_dir / "config.json")
    summary = read_json(run_dir / "summary.json")
    c = curve(run_dir, smooth)
    producers = [read_json(p) for p in sorted((run_dir / "stats").glob("producer-*.json"))]
    generated = sum(int(p.get("tokens_generated", 0)) for p in producers) if producers and all("tokens_generated" in p for p in producers) else None
    train_s = c["wall_time_s"][-1] if c["wall_time_s"] else 0.0
    trained = c["tokens_trained"][-1] if c["tokens_trained"] else 0
    hist = staleness_histogram(run_dir)
    n = sum(hist.values())
    evals = read_jsonl(run_dir / "eval.jsonl")
    out: dict[str, Any] = {
        "max_staleness": int(cfg["queue"]["max_staleness"]),
        "seed": int(cfg["run"]["seed"]),
        "exit_code": summary.get("exit_code"),
        "wall_time_s": summary.get("wall_time_s"),
        "train_wall_time_s": train_s,
        "steps": len(c["step"]),
        "tokens_generated": generated,
        "tokens_trained": trained,
        "tokens_generated_per_s": generated / train_s if generated is not None and train_s > 0 else None,
        "tokens_trained_per_s": trained / train_s if train_s > 0 else None,
        "steps_per_s": len(c["step"]) / train_s if train_s > 0 else None,
        "staleness": {"mean": sum(k * v for k, v in hist.items()) / n if n else None, "max": max(hist) if hist else None,
                      "histogram": {str(k): v for k, v in hist.items()}, "trajectories": n},
        "trajectories": summary.get("trajectories", {}),
        "drops": dict(summary.get("trajectories", {}).get("dropped", {})),
        "final_reward": c["reward_smoothed"][-1] if c["reward_smoothed"] else None,
        "reward_at_wall_s": {f"{m:g}": reward_at(c, m) for m in marks},
        "time_to_target": time_to_target(c, target) if target is not None else None,
        "eval": {"final": evals[-1], "evaluations": len(evals)} if evals else None,
        "curve": c,
    }
    return out


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(runs: list[dict[str, Any]], target: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-η statistics over seeds, and the two answers the report leads with."""
    by_eta: dict[str, Any] = {}
    for eta in sorted({r["max_staleness"] for r in runs}):
        mine = [r for r in runs if r["max_staleness"] == eta]
        hist: Counter[int] = Counter()
        for r in mine:
            hist.update({int(k): v for k, v in r["staleness"]["histogram"].items()})
        n = sum(hist.values())
        reached = [r["time_to_target"]["wall_time_s"] for r in mine if r["time_to_target"] and r["time_to_target"]["wall_time_s"] is not None]
        by_eta[str(eta)] = {
            "seeds": sorted(r["seed"] for r in mine),
            "final_reward": _stats([r["final_reward"] for r in mine if r["final_reward"] is not None]),
            "train_wall_time_s": _stats([r["train_wall_time_s"] for r in mine]),
            "tokens_trained_per_s": _stats([r["tokens_trained_per_s"] for r in mine if r["tokens_trained_per_s"] is not None]),
            "tokens_generated_per_s": _stats([r["tokens_generated_per_s"] for r in mine if r["tokens_generated_per_s"] is not None]),
            "staleness_mean": sum(k * v for k, v in hist.items()) / n if n else None,
            "staleness_max": max(hist) if hist else None,
            "staleness_histogram": {str(k): v for k, v in sorted(hist.items())},
            "time_to_target_s": _stats(reached),
            "reached_target": f"{len(reached)}/{len(mine)}",
            "drops": _sum_counts([r["drops"] for r in mine]),
        }
    best: dict[str, Any] = {"target_reward": target, "soonest_to_target": None, "best_final_reward": None}
    full = {eta: a for eta, a in by_eta.items() if a["time_to_target_s"] and a["time_to_target_s"]["n"] == len(a["seeds"])}
    if full:
        eta = min(full, key=lambda e: full[e]["time_to_target_s"]["mean"])
        best["soonest_to_target"] = {"max_staleness": int(eta), "time_to_target_s": full[eta]["time_to_target_s"]["mean"]}
    scored = {eta: a for eta, a in by_eta.items() if a["final_reward"]}
    if scored:
        eta = max(scored, key=lambda e: scored[e]["final_reward"]["mean"])
        best["best_final_reward"] = {"max_staleness": int(eta), "final_reward": scored[eta]["final_reward"]["mean"]}
    return by_eta, best


def default_marks(runs: list[dict[str, Any]], n: int = 4) -> list[float]:
    """``n`` evenly spaced whole-second marks up to the shortest run's trainer loop time."""
    shortest = min((r["curve"]["wall_time_s"][-1] for r in runs if r["curve"]["wall_time_s"]), default=0.0)
    if shortest <= 0:
        return []
    return sorted({float(max(1, math.floor(shortest * (i + 1) / n))) for i in range(n)})


def default_target(final_rewards: list[float], fraction: float = 0.8) -> float | None:
    """Without ``--target-reward``: ``fraction`` of the best final (smoothed) reward of the sweep."""
    return round(fraction * max(final_rewards), 4) if final_rewards else None
