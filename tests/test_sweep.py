"""`slipstream sweep` (pipeline/sweep.py, sweepresults.py, report.py).

- the numbers: every field of a run's sweep record is recomputed here, independently, from the run
  directory (steps.jsonl, consumed.jsonl, summary.json, stats, eval.jsonl) and compared;
- the aggregate names the η that reached the target soonest (every seed) and the best final reward;
- the report: PNGs are real images with something drawn, the HTML inlines exactly those PNGs and
  shows sweep.json's numbers;
- the plan: a sweep directory refuses another config or other overrides; bad η lists are one error;
- end to end (slow): a real sweep of the tiny example; Ctrl-C stops it with exit 130 and keeps the
  finished run, no process left behind; resuming it runs only what did not finish; sweep.json
  matches the run directories and each run's tensorboard file matches its steps.jsonl.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.configbase import ConfigError
from pipeline.sweep import SweepPlan, check_plan, parse_ints
from pipeline.sweepresults import aggregate, collect_run, default_marks, default_target
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


def _fake_run(d: Path, eta: int, seed: int, steps: int, rate: float, dt: float, rng: random.Random) -> None:
    """A run directory shaped like the launcher's (what the sweep reads), with known contents."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"queue": {"max_staleness": eta}, "run": {"seed": seed, "steps": steps}}))
    lines, consumed = [], []
    for i in range(1, steps + 1):
        reward = min(1.0, rate * i + rng.uniform(-0.02, 0.02))
        lines.append({"step": i, "policy_version": i, "reward_mean": reward, "tokens_trained": 100 + rng.randrange(20), "wall_time_s": dt * i})
        for t in range(4):
            lag = rng.randrange(eta + 1)
            consumed.append({"trajectory_id": f"{i}-{t}", "step": i, "trained_from_version": i - 1, "min_version": i - 1 - lag, "replay": False})
    consumed.append({"trajectory_id": "r", "step": 2, "trained_from_version": 1, "min_version": -50, "replay": True})  # a resume replay: not counted
    (d / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "consumed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in consumed))
    (d / "summary.json").write_text(json.dumps({"exit_code": 0, "wall_time_s": dt * steps + 20,
                                                "trajectories": {"generated": 80, "accepted": 80, "consumed": 4 * steps, "dropped": {"stale": eta}}}))
    (d / "stats").mkdir()
    (d / "stats" / "producer-0.json").write_text(json.dumps({"tokens_generated": 5000 + eta}))
    (d / "eval.jsonl").write_text(json.dumps({"policy_version": steps, "pass@1": 0.5 + eta / 10}) + "\n")


def _expected(d: Path, smooth: int, marks: list[float], target: float) -> dict[str, Any]:
    """The sweep record of ``d``, computed here with plain loops (not the module's helpers)."""
    steps = [json.loads(x) for x in (d / "steps.jsonl").read_text().splitlines()]
    consumed = [json.loads(x) for x in (d / "consumed.jsonl").read_text().splitlines()]
    rewards = [s["reward_mean"] for s in steps]
    sm = [sum(rewards[max(0, i - smooth + 1):i + 1]) / len(rewards[max(0, i - smooth + 1):i + 1]) for i in range(len(rewards))]
    lags = [c["trained_from_version"] - c["min_version"] for c in consumed if not c.get("replay")]
    wall = steps[-1]["wall_time_s"]
    tokens = sum(s["tokens_trained"] for s in steps)
    hit = next((i for i, r in enumerate(sm) if r >= target), None)
    at = {}
    for m in marks:
        before = [i for i, s in enumerate(steps) if s["wall_time_s"] <= m]
        at[f"{m:g}"] = sm[before[-1]] if before else None
    summary = json.loads((d / "summary.json").read_text())
    generated = sum(json.loads(p.read_text())["tokens_generated"] for p in (d / "stats").glob("producer-*.json"))
    return {
        "steps": len(steps), "final_reward": sm[-1], "train_wall_time_s": wall, "tokens_trained": tokens, "tokens_generated": generated,
        "tokens_trained_per_s": tokens / wall, "tokens_generated_per_s": generated / wall,
        "staleness_mean": sum(lags) / len(lags), "staleness_max": max(lags),
        "histogram": {str(k): lags.count(k) for k in sorted(set(lags))},
        "drops": summary["trajectories"]["dropped"], "wall_time_s": summary["wall_time_s"],
        "target_wall": steps[hit]["wall_time_s"] if hit is not None else None, "target_step": steps[hit]["step"] if hit is not None else None,
        "target_tokens": sum(s["tokens_trained"] for s in steps[:hit + 1]) if hit is not None else None,
        "at": at,
    }


def _check_record(rec: dict[str, Any], exp: dict[str, Any]) -> None:
    assert rec["steps"] == exp["steps"]
    assert rec["final_reward"] == pytest.approx(exp["final_reward"])
    assert rec["train_wall_time_s"] == pytest.approx(exp["train_wall_time_s"])
    assert rec["wall_time_s"] == pytest.approx(exp["wall_time_s"])
    assert rec["tokens_trained"] == exp["tokens_trained"]
    assert rec["tokens_trained_per_s"] == pytest.approx(exp["tokens_trained_per_s"])
    assert rec["tokens_generated"] == exp["tokens_generated"]
    assert rec["tokens_generated_per_s"] == pytest.approx(exp["tokens_generated_per_s"])
    assert rec["staleness"]["mean"] == pytest.approx(exp["staleness_mean"])
    assert rec["staleness"]["max"] == exp["staleness_max"]
    assert rec["staleness"]["histogram"] == exp["histogram"]
    assert rec["drops"] == exp["drops"]
    if exp["target_wall"] is None:
        assert rec["time_to_target"]["wall_time_s"] is None
    else:
        assert rec["time_to_target"]["wall_time_s"] == pytest.approx(exp["target_wall"])
    assert rec["time_to_target"]["step"] == exp["target_step"]
    assert rec["time_to_target"]["tokens_trained"] == exp["target_tokens"]
    assert rec["reward_at_wall_s"] == pytest.approx(exp["at"])


def test_parse_ints_and_plan_checks(tmp_path: Path) -> None:
    assert parse_ints("0,1, 4", "--max-staleness") == [0, 1, 4]
    for bad in ("0,x", "", "1,1"):
        with pytest.raises(ConfigError, match="--max-staleness"):
            parse_ints(bad, "--max-staleness")
    plan = SweepPlan(config="/a/config.toml", etas=[0, 1], seeds=[0], sets=["run.steps=5"], name="s")
    check_plan(tmp_path, plan)
    more = SweepPlan(config="/a/config.toml", etas=[2], seeds=[1], sets=["run.steps=5"], name="s")
    check_plan(tmp_path, more)  # same sweep, more values: the plan grows, nothing is forgotten
    assert more.etas == [0, 1, 2] and more.seeds == [0, 1]
    assert json.loads((tmp_path / "sweep-plan.json").read_text())["etas"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="sets"):
        check_plan(tmp_path, SweepPlan(config="/a/config.toml", etas=[0], seeds=[0], sets=["run.steps=6"], name="s"))
    with pytest.raises(ConfigError, match="config"):
        check_plan(tmp_path, SweepPlan(config="/b/config.toml", etas=[0], seeds=[0], sets=["run.steps=5"], name="s"))


def test_run_records_match_their_run_directories(tmp_path: Path) -> None:
    rng = random.Random(7)
    runs = []
    for eta, rate, dt in ((0, 0.010, 0.30), (2, 0.012, 0.20)):
        d = tmp_path / f"eta{eta}"
        _fake_run(d, eta, 0, 60, rate, dt, rng)
        for smooth, marks, target in ((10, [3.0, 7.5, 100.0], 0.4), (1, [0.1], 2.0)):  # 2.0: never reached
            rec = collect_run(d, smooth, marks, target)
            _check_record(rec, _expected(d, smooth, marks, target))
            assert rec["max_staleness"] == eta and rec["seed"] == 0
            assert rec["eval"]["final"]["pass@1"] == pytest.approx(0.5 + eta / 10)
        runs.append(collect_run(d, 10, [], None))
    assert default_marks(runs) == [3.0, 6.0, 9.0, 12.0]  # quarters of the shorter run's 12 s
    assert default_target([0.5, 0.7]) == pytest.approx(0.56)


def test_aggregate_names_the_soonest_and_the_best_eta(tmp_path: Path) -> None:
    rng = random.Random(3)
    # η = 2 learns per step as fast as η = 0 but its steps take 1/3 the time: it reaches the target
    # soonest; η = 1 learns fastest per step and ends highest, but one of its seeds never starts learning.
    specs = {(0, 0): (0.010, 0.30), (0, 1): (0.010, 0.31), (1, 0): (0.016, 0.30), (1, 1): (0.0, 0.30), (2, 0): (0.010, 0.10), (2, 1): (0.010, 0.11)}
    runs = []
    for (eta, seed), (rate, dt) in specs.items():
        d = tmp_path / f"eta{eta}-seed{seed}"
        _fake_run(d, eta, seed, 80, rate, dt, rng)
        runs.append(collect_run(d, 10, [5.0], 0.5))
    by_eta, best = aggregate(runs, 0.5)
    assert best["soonest_to_target"]["max_staleness"] == 2
    assert best["soonest_to_target"]["time_to_target_s"] == pytest.approx(
        sum(r["time_to_target"]["wall_time_s"] for r in runs if r["max_staleness"] == 2) / 2)
    assert by_eta["1"]["reached_target"] == "1/2"  # so η = 1 cannot be 'soonest' (not every seed got there)
    finals = {eta: sum(r["final_reward"] for r in runs if r["max_staleness"] == eta) / 2 for eta in (0, 1, 2)}
    assert best["best_final_reward"]["max_staleness"] == max(finals, key=finals.__getitem__)
    assert best["best_final_reward"]["final_reward"] == pytest.approx(max(finals.values()))
    for eta in ("0", "1", "2"):
        mine = [r for r in runs if str(r["max_staleness"]) == eta]
        assert by_eta[eta]["seeds"] == [0, 1]
        assert sum(by_eta[eta]["staleness_histogram"].values()) == sum(r["staleness"]["trajectories"] for r in mine)
        assert by_eta[eta]["staleness_max"] == max(r["staleness"]["max"] for r in mine)
        assert by_eta[eta]["final_reward"]["min"] == pytest.approx(min(r["final_reward"] for r in mine))
        assert by_eta[eta]["drops"] == {"stale": 2 * int(eta)}


def _check_report(sweep_dir: Path, sweep: dict[str, Any]) -> None:
    import matplotlib.image as mpimg

    page = (sweep_dir / "report.html").read_text()
    inlined = dict(re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([^"]+)"', page))
    assert set(inlined) == {"reward_vs_wall", "reward_vs_steps", "reward_vs_tokens", "throughput", "staleness"}
    for name, b64 in inlined.items():
        png = sweep_dir / f"{name}.png"
        assert base64.b64decode(b64) == png.read_bytes(), f"the page's {name} is not {png}"
        img = mpimg.imread(png)
        assert img.shape[0] >= 300 and img.shape[1] >= 500
        assert img[..., :3].std() > 0.05, f"{png} looks blank"
    for r in sweep["runs"]:
        if r["status"] == "done":
            row = re.search(rf"<tr><td>{r['id']}</td><td>done</td><td>{r['steps']}</td><td>([0-9.]+)</td>", page)
            assert row and float(row.group(1)) == pytest.approx(r["final_reward"], abs=5e-4), r["id"]
    soon = sweep["best"]["soonest_to_target"]
    if soon:
        assert f"<td>{soon['max_staleness']}</td><td>{soon['time_to_target_s']:.1f} s" in page


def test_report_shows_what_sweep_json_holds(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pipeline.report import write_report
    from pipeline.sweepresults import DEFINITIONS

    rng = random.Random(5)
    runs = []
    for eta in (0, 1):
        for seed in (0, 1):
            d = tmp_path / "runs" / f"eta{eta}-seed{seed}"
            _fake_run(d, eta, seed, 40, 0.015 + 0.002 * eta, 0.3 - 0.1 * eta, rng)
            runs.append({"id": d.name, "status": "done", **collect_run(d, 10, [4.0], 0.3)})
    by_eta, best = aggregate(runs, 0.3)
    sweep = {"sweep": "t", "date": "2026-12-02", "command": "slipstream sweep x", "machine": {"cpu": "c"}, "steps_per_run": 40, "overrides": [],
             "smooth": 10, "marks_s": [4.0], "target_reward": 0.3, "target_source": "--target-reward", "complete": True,
             "best": best, "by_max_staleness": by_eta, "runs": runs, "definitions": DEFINITIONS}
    write_report(sweep, tmp_path)
    _check_report(tmp_path, sweep)


# ---------------------------------------------------------------------------------------------- end to end
def _sweep_cmd(sweep_dir: Path, model: Path, *extra: str) -> list[str]:
    return slipstream("sweep", str(TINY), "--max-staleness", "0,1", "--seeds", "0", "--sweep-dir", str(sweep_dir),
                      "--set", "run.steps=12", "--set", "run.verify_weights=false", "--set", f"model.path='{model}'",
                      "--set", 'tracking.backend="tensorboard"', *extra)


def _tensorboard_matches_steps(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("reward_mean", "loss", "staleness_mean", "tokens_trained", "wall_time_s", "policy_version"):
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx({s["step"]: float(s[key]) for s in steps}, rel=1e-6), (run_dir.name, key)


def _assert_dead(run_dir: Path) -> None:
    for p in json.loads((run_dir / "processes.json").read_text()):
        try:
            os.kill(p["pid"], 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{p['name']} (pid {p['pid']}) of {run_dir.name} still runs after the sweep stopped")


@pytest.mark.slow
def test_sweep_end_to_end_interrupt_resume_and_numbers(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    sweep_dir, model = tmp_path / "sweep", tmp_path.parent / "tiny-qwen3"
    # 1. Ctrl-C while the second run trains: exit 130, the first run kept, nothing left running.
    proc = subprocess.Popen(_sweep_cmd(sweep_dir, model), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    second = sweep_dir / "runs" / "eta1-seed0" / "steps.jsonl"
    deadline = time.monotonic() + 400
    while not (second.exists() and second.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the second run never got to step 2"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    assert "ETA" in err and "eta0-seed0: done" in err
    partial = json.loads((sweep_dir / "sweep.json").read_text())
    status = {r["id"]: r["status"] for r in partial["runs"]}
    assert status == {"eta0-seed0": "done", "eta1-seed0": "interrupted"} and partial["complete"] is False
    _assert_dead(sweep_dir / "runs" / "eta1-seed0")
    first_summary = (sweep_dir / "runs" / "eta0-seed0" / "summary.json").stat().st_mtime_ns

    # 2. Resume: only the interrupted run runs again (its directory moved aside first).
    r = subprocess.run(slipstream("sweep", "--resume", str(sweep_dir)), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 already done, 1 to run" in r.stderr
    assert (sweep_dir / "runs" / "eta0-seed0" / "summary.json").stat().st_mtime_ns == first_summary
    assert len(list((sweep_dir / "runs").glob("eta1-seed0.unfinished-*"))) == 1

    # 3. sweep.json against the run directories; tracking against steps.jsonl; the report.
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    assert sweep["complete"] and [r["id"] for r in sweep["runs"]] == ["eta0-seed0", "eta1-seed0"]
    for rec in sweep["runs"]:
        d = sweep_dir / rec["run_dir"]
        cfg = json.loads((d / "config.json").read_text())
        assert (cfg["queue"]["max_staleness"], cfg["run"]["seed"]) == (rec["max_staleness"], rec["seed"])
        assert cfg["tracking"]["group"] == sweep["sweep"] and cfg["tracking"]["tags"] == [f"eta={rec['max_staleness']}", "seed=0"]
        _check_record(rec, _expected(d, sweep["smooth"], sweep["marks_s"], sweep["target_reward"]))
        assert rec["steps"] == 12 and rec["staleness"]["max"] <= rec["max_staleness"]
        summary = json.loads((d / "summary.json").read_text())
        assert summary["trajectories"]["balanced"] and rec["trajectories"] == summary["trajectories"]
        _tensorboard_matches_steps(d)
    assert sweep["by_max_staleness"]["0"]["staleness_max"] == 0
    _check_report(sweep_dir, sweep)


def test_bad_input_is_one_error_and_starts_nothing(tmp_path: Path) -> None:
    for args, what in ((["--max-staleness", "0,x"], "--max-staleness"), (["--max-staleness", "0", "--set", "queue.max_stalenes=3"], "queue.max_stalenes")):
        r = subprocess.run(slipstream("sweep", str(TINY), *args, "--sweep-dir", str(tmp_path / "s")), capture_output=True, text=True, env=env(), timeout=120)
        assert r.returncode == 2 and f"config error at '{what}'" in r.stderr, r.stderr
        assert not (tmp_path / "s").exists()
    r = subprocess.run(slipstream("sweep", "--resume", str(tmp_path / "nowhere")), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and "not a sweep directory" in r.stderr
