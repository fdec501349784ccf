"""``slipstream sweep``: run one job per max_staleness (η) and seed, then report which η is worth it.

    slipstream sweep examples/tiny/config.toml --max-staleness 0,1,2 --seeds 0,1 [--set KEY=VALUE ...]
                     [--parallel N] [--sweep-dir DIR] [--target-reward R] [--marks 10,20,30] [--smooth 10]
    slipstream sweep --resume DIR          # the same sweep again: finished runs are not run again

Every run is a plain ``slipstream run`` (the same launcher, so every guarantee of a run holds) in
its own run directory ``DIR/runs/eta<η>-seed<s>/``, with ``queue.max_staleness``, ``run.seed``,
``tracking.group`` (the sweep's name) and ``tracking.tags`` (``eta=<η>``, ``seed=<s>``) set on top
of the config and the ``--set`` overrides.  The sweep writes:

* ``DIR/sweep-plan.json``: the config, η values, seeds and overrides (a resumed sweep must match);
* ``DIR/sweep.json``: per run and per η (see ``pipeline/sweepresults.py`` for every definition);
* ``DIR/report.html`` (one self-contained page) and ``DIR/*.png``: ``pipeline/report.py``.

Resume: a run whose ``summary.json`` says exit code 0 is done and kept; any other run directory
(interrupted, failed) is moved aside to ``runs/<id>.unfinished-<time>`` and run again.  Ctrl-C (or
SIGTERM) sends SIGINT to the running launchers, which stop their processes cleanly; the sweep then
writes ``sweep.json`` and the report from the runs that finished and exits 130.  A progress line
names the active runs, their step and an ETA (the mean time of the runs finished so far, or the
active run's own pace before any finished).

The tiny model of ``model.make_tiny_if_missing`` is made once, before the first run, with the
config's ``run.seed``, so every run starts from the same weights whatever its seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.configbase import ConfigError
from pipeline.rundir import write_json_atomic

log = logging.getLogger(__name__)

PLAN = "sweep-plan.json"


@dataclass
class SweepPlan:
    config: str
    etas: list[int]
    seeds: list[int]
    sets: list[str] = field(default_factory=list)
    name: str = ""
    smooth: int = 10
    target_reward: float | None = None
    marks: list[float] = field(default_factory=list)

    def run_ids(self) -> list[tuple[str, int, int]]:
        """(id, η, seed), seed-major: every η of seed 0 first, so a partial sweep compares η early."""
        return [(f"eta{eta}-seed{seed}", eta, seed) for seed in self.seeds for eta in self.etas]


def parse_ints(text: str, key: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(key, f"expected comma-separated integers, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise ConfigError(key, f"expected distinct comma-separated integers, got {text!r}")
    return values


def load_plan(sweep_dir: Path) -> SweepPlan:
    path = sweep_dir / PLAN
    if not path.exists():
        raise ConfigError("--resume", f"{path} does not exist: not a sweep directory")
    return SweepPlan(**json.loads(path.read_text()))


def check_plan(sweep_dir: Path, plan: SweepPlan) -> None:
    """A sweep directory holds one sweep: a resumed one must use the same config and overrides."""
    path = sweep_dir / PLAN
    if path.exists():
        old = SweepPlan(**json.loads(path.read_text()))
        for key in ("config", "sets"):
            if getattr(old, key) != getattr(plan, key):
                raise ConfigError(f"--{key}", f"{sweep_dir} holds a sweep with {key} {getattr(old, key)!r}, not {getattr(plan, key)!r}: "
                                  "use another --sweep-dir, or --resume DIR to continue that one")
        plan.etas = old.etas + [e for e in plan.etas if e not in old.etas]
        plan.seeds = old.seeds + [s for s in plan.seeds if s not in old.seeds]
    write_json_atomic(path, asdict(plan))


def run_done(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("exit_code") == 0
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _steps_done(run_dir: Path) -> int:
    try:
        with (run_dir / "steps.jsonl").open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _last_wall(run_dir: Path) -> float:
    """``wall_time_s`` of the run's newest step (trainer-loop seconds), 0 before any."""
    try:
        lines = (run_dir / "steps.jsonl").read_bytes().splitlines()
        return float(json.loads(lines[-1])["wall_time_s"]) if lines else 0.0
    except (FileNotFoundError, ValueError, KeyError):
        return 0.0


@dataclass
class Active:
    run_id: str
    run_dir: Path
    proc: subprocess.Popen[bytes]
    log_file: TextIO
    started: float


class Sweep:
    """Runs the plan's pending runs, ``parallel`` at a time, and keeps the bookkeeping."""

    def __init__(self, plan: SweepPlan, sweep_dir: Path, parallel: int = 1, progress: TextIO | None = None) -> None:
        from pipeline.config import load_config

        self.plan = plan
        self.dir = sweep_dir
        self.parallel = max(1, parallel)
        self.cfg = load_config(plan.config, plan.sets)  # one clear error before anything starts
        self.steps = self.cfg.run.steps
        self.progress = progress if progress is not None else sys.stderr
        self.stop_reason: str | None = None
        self.status: dict[str, dict[str, Any]] = {}
        self.durations: list[float] = []
        self.t0 = time.monotonic()
        self._last_line = 0.0

    def command(self, run_dir: Path, eta: int, seed: int) -> list[str]:
        tags = [*self.cfg.tracking.tags, f"eta={eta}", f"seed={seed}"]
        cmd = [sys.executable, "-m", "pipeline.cli", "run", str(self.plan.config), "--run-dir", str(run_dir)]
        for s in [*self.plan.sets, f"queue.max_staleness={eta}", f"run.seed={seed}", f"tracking.group={json.dumps(self.plan.name)}",
                  f"tracking.tags={json.dumps(tags)}"]:
            cmd += ["--set", s]
        return cmd

    def _start(self, run_id: str, eta: int, seed: int) -> Active:
        run_dir = self.dir / "runs" / run_id
        if run_dir.exists():
            aside = run_dir.with_name(f"{run_id}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s did not finish before: moved it to %s and running it again", run_dir, aside)
            run_dir.rename(aside)
        run_dir.mkdir(parents=True)
        cmd = self.command(run_dir, eta, seed)
        (run_dir / "sweep-command.json").write_text(json.dumps(cmd))
        log_file = (run_dir / "launcher.log").open("w")
        from pipeline.launcher import _set_pdeathsig

        # Its own session (a terminal's Ctrl-C reaches only the sweep, which forwards it), and
        # PR_SET_PDEATHSIG, so a killed sweep cannot leave a launcher behind.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_set_pdeathsig)
        log.info("sweep: started %s (pid %d): %s", run_id, proc.pid, run_dir / "launcher.log")
        return Active(run_id, run_dir, proc, log_file, time.monotonic())

    def _finish(self, a: Active) -> None:
        code = a.proc.returncode
        a.log_file.close()
        took = time.monotonic() - a.started
        state = "done" if code == 0 and run_done(a.run_dir) else ("interrupted" if self.stop_reason else "failed")
        self.status[a.run_id] = {"status": state, "exit_code": code, "seconds": round(took, 1)}
        if state == "done":
            self.durations.append(took)
        elif state == "failed":
            log.error("sweep: %s failed with exit code %s; see %s", a.run_id, code, a.run_dir / "launcher.log")
        self._say(f"{a.run_id}: {state} in {took:.0f}s", force=True)

    def _request_stop(self, sig: int, _frame: Any) -> None:
        self.stop_reason = f"received {signal.Signals(sig).name}"

    def run(self) -> int:
        """Run every pending run; 0 when all are done, 130 when stopped, 1 when any failed."""
        pending = []
        for run_id, eta, seed in self.plan.run_ids():
            if run_done(self.dir / "runs" / run_id):
                self.status[run_id] = {"status": "done", "exit_code": 0, "resumed": True}
            else:
                pending.append((run_id, eta, seed))
        total = len(self.plan.run_ids())
        self._say(f"sweep {self.plan.name}: {total} runs, {total - len(pending)} already done, {len(pending)} to run", force=True)
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        active: list[Active] = []
        try:
            while (pending or active) and self.stop_reason is None:
                while pending and len(active) < self.parallel:
                    active.append(self._start(*pending.pop(0)))
                for a in [a for a in active if a.proc.poll() is not None]:
                    active.remove(a)
                    self._finish(a)
                self._show(active, len(pending))
                time.sleep(0.5)
            if active:
                self._say(f"stopping ({self.stop_reason}): asking {len(active)} run(s) to stop; finished runs are kept", force=True)
                self._stop(active)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        for run_id, *_ in pending:
            self.status.setdefault(run_id, {"status": "not_started"})
        if self.stop_reason is not None:
            return 130
        return 0 if all(s["status"] == "done" for s in self.status.values()) else 1

    def _stop(self, active: list[Active]) -> None:
        for a in active:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.proc.pid, signal.SIGINT)  # the launcher stops its children in order
        grace = self.cfg.run.shutdown_timeout_s * 4 + 30.0
        for a in active:
            try:
                a.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.error("sweep: %s did not stop %.0fs after SIGINT: killing its launcher", a.run_id, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(a.proc.pid, signal.SIGKILL)
                a.proc.wait(timeout=30)
            self._finish(a)

    # ------------------------------------------------------------------ progress
    def eta_seconds(self, active: list[Active], queued: int) -> float | None:
        """Seconds until the sweep is done: an active run past its third step by its own trainer-loop
        pace (plus a few seconds to shut down), one before that by the mean time of the finished runs;
        queued runs by that mean (or, before any finished, by the slowest active run's projection)."""
        now = time.monotonic()
        own: dict[str, float] = {}  # an active run's projected remaining seconds
        whole: list[float] = []  # projected total seconds of an active run: start-up so far + loop pace x steps
        for a in active:
            n, wall = _steps_done(a.run_dir), _last_wall(a.run_dir)
            if n >= 3 and wall > 0:
                own[a.run_id] = wall / n * (self.steps - n) + 5.0
                whole.append(now - a.started - wall + wall / n * self.steps + 5.0)
        per_run = sum(self.durations) / len(self.durations) if self.durations else (max(whole) if whole else None)
        if per_run is None:
            return None
        left = sum(own.get(a.run_id, max(0.0, per_run - (now - a.started))) for a in active) + queued * per_run
        return left / self.parallel

    def _show(self, active: list[Active], queued: int) -> None:
        done = sum(1 for s in self.status.values() if s["status"] == "done")
        eta = self.eta_seconds(active, queued)
        runs = ", ".join(f"{a.run_id} step {_steps_done(a.run_dir)}/{self.steps}" for a in active)
        self._say(f"[{done}/{len(self.plan.run_ids())} done] {runs} | elapsed {_hms(time.monotonic() - self.t0)}"
                  f" | ETA {_hms(eta) if eta is not None else '?'}")

    def _say(self, text: str, force: bool = False) -> None:
        tty = self.progress.isatty()
        now = time.monotonic()
        if tty:
            self.progress.write("\r\033[K" + text + ("\n" if force else ""))
        elif force or now - self._last_line >= 15.0:
            self.progress.write(text + "\n")
        else:
            return
        if not force:  # event lines (a run done, stopping) do not hold back the next progress line
            self._last_line = now
        self.progress.flush()


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_results(sweep: Sweep, command: str) -> dict[str, Any]:
    """sweep.json from the finished run directories, then the report next to it."""
    from pipeline.bench import machine
    from pipeline.sweepresults import DEFINITIONS, aggregate, collect_run, default_marks, default_target

    plan = sweep.plan
    done = [(rid, eta, seed) for rid, eta, seed in plan.run_ids() if sweep.status.get(rid, {}).get("status") == "done"]
    first = [collect_run(sweep.dir / "runs" / rid, plan.smooth, [], None) for rid, *_ in done]
    marks = plan.marks or default_marks(first)
    target = plan.target_reward if plan.target_reward is not None else default_target([r["final_reward"] for r in first if r["final_reward"] is not None])
    runs = []
    for rid, eta, seed in plan.run_ids():
        st = sweep.status.get(rid, {"status": "not_started"})
        rec: dict[str, Any] = {"id": rid, "run_dir": f"runs/{rid}", **st, "max_staleness": eta, "seed": seed}
        if st.get("status") == "done":
            rec.update(collect_run(sweep.dir / "runs" / rid, plan.smooth, marks, target))
        runs.append(rec)
    by_eta, best = aggregate([r for r in runs if r["status"] == "done"], target)
    out = {
        "sweep": plan.name, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": command,
        "machine": machine(), "config": plan.config, "overrides": plan.sets, "max_staleness": plan.etas, "seeds": plan.seeds,
        "steps_per_run": sweep.steps, "smooth": plan.smooth, "marks_s": marks, "target_reward": target,
        "target_source": "--target-reward" if plan.target_reward is not None else "0.8 x the best final reward of the sweep",
        "complete": all(r["status"] == "done" for r in runs), "sweep_wall_time_s": round(time.monotonic() - sweep.t0, 1),
        "best": best, "by_max_staleness": by_eta, "runs": runs, "definitions": DEFINITIONS,
    }
    write_json_atomic(sweep.dir / "sweep.json", out)
    if any(r["status"] == "done" for r in runs):
        from pipeline.report import write_report

        write_report(out, sweep.dir)
    return out


def main(args: Any, argv: list[str], command: str) -> int:
    """The ``slipstream sweep`` command (arguments parsed in pipeline/cli.py)."""
    from pipeline.config import flag_overrides
    from pipeline.logs import setup_logging

    setup_logging("sweep", "INFO", "text")
    if args.resume is not None:
        plan = load_plan(args.resume)
        sweep_dir = args.resume
    else:
        if args.config is None or args.max_staleness is None:
            raise ConfigError("--max-staleness", "slipstream sweep needs CONFIG and --max-staleness (or --resume DIR)")
        name = args.name or f"sweep-{Path(args.config).stem if Path(args.config).stem != 'config' else Path(args.config).parent.name}"
        sweep_dir = args.sweep_dir or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        marks = [float(x) for x in args.marks.split(",")] if args.marks else []
        plan = SweepPlan(config=str(Path(args.config).resolve()), etas=parse_ints(args.max_staleness, "--max-staleness"),
                         seeds=parse_ints(args.seeds, "--seeds"), sets=[*args.set, *flag_overrides(argv)], name=name,
                         smooth=args.smooth, target_reward=args.target_reward, marks=marks)
        from pipeline.config import load_config

        load_config(plan.config, plan.sets)  # a bad config or override: one error, and no sweep directory made
        sweep_dir.mkdir(parents=True, exist_ok=True)
        check_plan(sweep_dir, plan)
    sweep = Sweep(plan, sweep_dir, args.parallel)
    preset = sweep.cfg.model.make_if_missing or ("tiny" if sweep.cfg.model.make_tiny_if_missing else "")
    if preset:  # made once, before the first run (model.make_if_missing / make_tiny_if_missing)
        from pipeline.presets import ensure_model

        ensure_model(sweep.cfg.model.path, preset, seed=sweep.cfg.run.seed)
    code = sweep.run()
    out = write_results(sweep, command)
    best = out["best"]
    lines = [f"sweep.json: {sweep_dir / 'sweep.json'}", f"report: {sweep_dir / 'report.html'}"]
    if best["soonest_to_target"]:
        lines.append(f"reached reward {best['target_reward']} soonest: max_staleness = {best['soonest_to_target']['max_staleness']} "
                     f"({best['soonest_to_target']['time_to_target_s']:.1f}s of trainer time)")
    if best["best_final_reward"]:
        lines.append(f"best final reward: max_staleness = {best['best_final_reward']['max_staleness']} ({best['best_final_reward']['final_reward']:.3f})")
    print("\n".join(lines))
    return code
