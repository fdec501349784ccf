"""``slipstream bench e2e CONFIG``: the whole job, the same number of steps at each max_staleness,
side by side, on the GPUs (or CPU) of this machine.

What: for each η of ``--staleness`` (default ``0,2``) it runs ``slipstream run CONFIG`` as a user
would (the real launcher in a subprocess, ``run.steps = --steps``, ``queue.max_staleness = η``,
``run.verify_weights = true``), while a sampler thread records every 0.5 s: GPU utilisation and
memory per device and per process (NVML through ``pynvml``, else ``nvidia-smi``; none on CPU), host
memory (RSS) of every process of the run, and the engines' ``/metrics`` (generated tokens, memory
gauges).  From the run directory it then reads what each step did (``steps.jsonl``), the account
(``summary.json``) and the placement (``placement.json``), and writes one JSON file with the
command, the device, the date and the runs side by side:

* wall time: the trainer loop for the N steps (its own clock, start to the last step's line; the
  primary figure), the whole process (start-up included), steady time per step (steps 2..N);
* tokens generated per second (the engines' counter, from the first token to the last step) and
  trained per second (trainer loop);
* trainer wait for data and step time (mean, and wait as a share of the loop), publish time and
  GB/s (bytes of one version / its publish time), engine pause per update;
* GPU utilisation (mean and max over the trainer loop) and peak memory per process;
* whether ``summary.json`` balances and ``run.verify_weights`` held on every step;
* ``speedup``: the η = 0 run's trainer-loop time over each other run's, at the same step count.

A run that exceeds ``--max-run-seconds`` is interrupted (SIGINT: a clean stop, summary written);
the comparison then uses the steps every run completed (``common_steps``), and the JSON says so.
Each run's small files (logs, steps, summary, processes, placement) are kept under
``OUT/<date>-e2e-<device>-runs/``.

    slipstream bench e2e examples/gpu/one_gpu.toml --steps 30 --staleness 0,2 [--out DIR] [--set k=v ...]
    slipstream bench e2e examples/tiny/config.toml --steps 10          # the CPU check of the same code
    slipstream bench e2e CONFIG --set 'run.profile_steps=[10,12]'        # also profile steps 10..12 (pipeline/profiling.py)

With ``run.profile_steps`` every run also records a torch.profiler window of those steps in the
trainer and each engine; the summaries land in the JSON (``profile``: device busy time and share per
process, top ops) and the traces in the kept run files.  The profiler slows the steps it records.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.bench import machine

log = logging.getLogger(__name__)

KEEP = ("steps.jsonl", "summary.json", "processes.json", "placement.json", "config.json", "logs", "profile")
ENGINE_METRIC = re.compile(r"^(slipstream_engine_\w+)(\{[^}]*\})? (\S+)$")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count", "_created")


# ------------------------------------------------------------------------------------ sampling
def _tree(pids: dict[int, str]) -> dict[int, str]:
    """``pids`` plus every descendant (torchrun's workers), each named after its known ancestor."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out = dict(pids)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if pid not in out and ppid in out:
                out[pid] = out[ppid]
                changed = True
    return out


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Gpus:
    """GPU utilisation and memory: NVML (pynvml, from nvidia-ml-py) if it initialises, else
    nvidia-smi, else nothing (``source`` says which)."""

    def __init__(self) -> None:
        self.source = "none"
        self._nvml: Any = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.source = "nvml"
        except Exception as e:  # no library, no driver: fall back
            log.debug("NVML unavailable (%s)", e)
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def sample(self) -> tuple[list[dict[str, Any]], dict[int, int]]:
        """Per device {index, util_pct, mem_used_bytes, mem_total_bytes}; per pid GPU memory bytes."""
        if self._nvml is not None:
            nv, devs, procs = self._nvml, [], {}
            for i, h in enumerate(self._handles):
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                devs.append({"index": i, "util_pct": float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                             "mem_used_bytes": int(mem.used), "mem_total_bytes": int(mem.total)})
                with contextlib.suppress(Exception):
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(p.usedGpuMemory or 0)
            return devs, procs
        if self.source == "nvidia-smi":
            return self._smi()
        return [], {}

    def _smi(self) -> tuple[list[dict[str, Any]], dict[int, int]]:
        devs, procs = [], {}
        with contextlib.suppress(Exception):
            r = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10)
            for line in r.stdout.splitlines():
                i, u, used, total = (x.strip() for x in line.split(","))
                devs.append({"index": int(i), "util_pct": float(u), "mem_used_bytes": int(used) << 20, "mem_total_bytes": int(total) << 20})
            r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=10)
            for line in r.stdout.splitlines():
                pid, used = (x.strip() for x in line.split(","))
                procs[int(pid)] = procs.get(int(pid), 0) + (int(used) << 20)
        return devs, procs


def _scrape(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """The engine gauges/counters of interest from one /metrics page (labels folded into the name)."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        for line in r.read().decode().splitlines():
            m = ENGINE_METRIC.match(line)
            if m and not m.group(1).endswith(HISTOGRAM_PARTS):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


class Sampler(threading.Thread):
    """Samples a running job every ``interval_s`` until :meth:`stop`; see the module docstring."""

    def __init__(self, run_dir: Path, interval_s: float = 0.5) -> None:
        super().__init__(name="bench-e2e-sampler", daemon=True)
        self.run_dir = run_dir
        self.interval_s = interval_s
        self.gpus = _Gpus()
        self.samples: list[dict[str, Any]] = []
        self.known: dict[int, str] = {}  # pid -> process name, as processes.json has told so far
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)

    def run(self) -> None:
        while not self._stop_event.is_set():
            t0 = time.monotonic()
            with contextlib.suppress(Exception):  # the run is starting or ending: try again next tick
                self.samples.append(self._sample())
            self._stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def _sample(self) -> dict[str, Any]:
        procs = json.loads((self.run_dir / "processes.json").read_text()) if (self.run_dir / "processes.json").exists() else []
        names = _tree({int(p["pid"]): p["name"] for p in procs if p.get("pid")})
        new = {pid: n for pid, n in names.items() if self.known.get(pid) != n}
        if new:  # a process the GPU listed before processes.json named it: give its earlier samples its name
            self.known.update(new)
            for old in self.samples:
                for pid, n in new.items():
                    if f"other (pid {pid})" in old["gpu_mem"]:
                        used = old["gpu_mem"].pop(f"other (pid {pid})")
                        old["gpu_mem"][n] = old["gpu_mem"].get(n, 0) + used
        rss: dict[str, int] = {}
        for pid, name in names.items():
            rss[name] = rss.get(name, 0) + _rss_bytes(pid)
        devs, gpu_pids = self.gpus.sample()
        gpu_mem: dict[str, int] = {}
        for pid, used in gpu_pids.items():
            name = names.get(pid, f"other (pid {pid})")
            gpu_mem[name] = gpu_mem.get(name, 0) + used
        engines: dict[str, dict[str, float]] = {}
        for p in procs:
            if p.get("role") == "engine" and p.get("metrics_url"):
                with contextlib.suppress(Exception):
                    engines[p["name"]] = _scrape(p["metrics_url"])
        steps_path = self.run_dir / "steps.jsonl"
        steps = steps_path.read_text().count("\n") if steps_path.exists() else 0
        return {"t": time.monotonic(), "steps": steps, "devices": devs, "gpu_mem": gpu_mem, "rss": rss, "engines": engines}


# ------------------------------------------------------------------------------------ analysis
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def analyse(run_dir: Path, samples: list[dict[str, Any]], process_wall_s: float, exit_code: int,
            steps_wanted: int, common: int | None = None) -> dict[str, Any]:
    """The figures of one run, from its run directory and the sampler's samples."""
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines() if x.strip()] if (run_dir / "steps.jsonl").exists() else []
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    n = len(steps) if common is None else min(common, len(steps))
    use = steps[:n]
    loop_s = use[-1]["wall_time_s"] if use else None
    total_bytes = sum(s["publish_bytes"] for s in use)
    total_pub_s = sum(s["publish_s"] for s in use)
    verified = bool(use) and all(s.get("engine_checksums") and set(s["engine_checksums"]) == {s["weights_checksum"]} for s in use)
    out: dict[str, Any] = {
        "exit_code": exit_code, "steps_wanted": steps_wanted, "steps_completed": len(steps), "steps_compared": n,
        "process_wall_s": round(process_wall_s, 2), "trainer_loop_s": loop_s,
        "steady_s_per_step": (use[-1]["wall_time_s"] - use[0]["wall_time_s"]) / (n - 1) if n >= 2 else None,
        "tokens_trained": sum(s["tokens_trained"] for s in use),
        "tokens_trained_per_s": sum(s["tokens_trained"] for s in use) / loop_s if loop_s else None,
        "trainer_wait_s_mean": _mean([s["wait_s"] for s in use]), "trainer_step_s_mean": _mean([s["train_s"] for s in use]),
        "trainer_wait_fraction": sum(s["wait_s"] for s in use) / loop_s if loop_s else None,
        "publish_s_mean": _mean([s["publish_s"] for s in use]), "publish_bytes_per_version": use[-1]["publish_bytes"] if use else None,
        "publish_gb_per_s": total_bytes / total_pub_s / 1e9 if total_pub_s > 0 else None,
        # the same publish split: hashing for run.verify_weights vs the transfer itself (older runs lack them)
        "publish_checksum_s_mean": _mean([s["publish_checksum_s"] for s in use if "publish_checksum_s" in s]),
        "publish_send_gb_per_s": _send_rate(use),
        "verify_s_mean": _mean([s["verify_s"] for s in use if "verify_s" in s]),
        "engine_pause_s_mean": _mean([s.get("engine_pause_s", 0.0) for s in use]),
        "engine_pause_s_max": max((s.get("engine_pause_s", 0.0) for s in use), default=None),
        "staleness_mean": _mean([s["staleness_mean"] for s in use]),
        "reward_mean_first": use[0]["reward_mean"] if use else None, "reward_mean_last": use[-1]["reward_mean"] if use else None,
        "verify_weights_every_step": verified,
        "summary_balanced": summary.get("trajectories", {}).get("balanced"),
        "trajectories": summary.get("trajectories"), "restarts": summary.get("restarts"),
    }
    out.update(_from_samples(samples))
    out["profile"] = profiles(run_dir)
    return out


def profiles(run_dir: Path, top: int = 8) -> dict[str, Any] | None:
    """``run.profile_steps``' summaries (RUN_DIR/profile/*.summary.json), per process: the window's
    wall time, the device time of its kernels (and share of the wall), and its top ops."""
    found = sorted((run_dir / "profile").glob("*.summary.json")) if (run_dir / "profile").is_dir() else []
    out = {}
    for f in found:
        s = json.loads(f.read_text())
        out[s.get("name") or f.name.split(".")[0]] = {"wall_s": s["wall_s"], "steps": s["steps"], "device_busy_s": s["device_busy_s"],
                                                       "device_busy_share": s["device_busy_share"], "top_ops": s["top_ops"][:top]}
    return out or None


def _send_rate(steps: list[dict[str, Any]]) -> float | None:
    """Bytes of each version over its transfer time alone (``publish_send_s``), in GB/s."""
    rows = [(s["publish_bytes"], s.get("publish_send_s", 0.0)) for s in steps]
    send_s = sum(t for _, t in rows)
    return sum(b for b, _ in rows) / send_s / 1e9 if send_s > 0 else None


def _from_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    loop = [s for s in samples if s["steps"] >= 1]  # the trainer loop: from the first step's line on
    util: dict[int, list[float]] = {}
    for s in loop:
        for d in s["devices"]:
            util.setdefault(d["index"], []).append(d["util_pct"])
    peak = lambda key: {k: max(s[key].get(k, 0) for s in samples) for k in sorted({k for s in samples for k in s[key]})}  # noqa: E731
    # generated tokens: from the first sampled token to the sample that saw the last step's line
    last_step = max((s["steps"] for s in samples), default=0)
    end = next((i for i, s in enumerate(samples) if s["steps"] == last_step), len(samples) - 1)
    gen = [(s["t"], sum(e.get("slipstream_engine_generated_tokens_total", 0.0) for e in s["engines"].values()))
           for s in samples[: end + 1] if s["engines"]]
    gen = [g for g in gen if g[1] > 0]
    # the engines' gauges: their peak over the run, and their mean over the trainer loop (how full
    # the engines ran while the trainer waited or trained; the wait is explained from these)
    gauges: dict[str, float] = {}
    means: dict[str, list[float]] = {}
    for s in samples:
        for eng, vals in s["engines"].items():
            for k, v in vals.items():
                if not k.split("{", 1)[0].endswith("_total"):
                    gauges[f"{eng}:{k}"] = max(gauges.get(f"{eng}:{k}", v), v)
                    if s["steps"] >= 1:  # in the loop (as ``loop`` above)
                        means.setdefault(f"{eng}:{k}", []).append(v)
    idle = {eng: sum(1 for s in loop if s["engines"].get(eng, {}).get("slipstream_engine_running_requests", 1.0) == 0) / len(loop)
            for eng in {k.split(":", 1)[0] for k in means}} if loop else {}
    within = {}
    for eng in {k.split(":", 1)[0] for k in gauges}:
        limit, peak_used = gauges.get(f"{eng}:slipstream_engine_memory_limit_bytes"), gauges.get(f"{eng}:slipstream_engine_memory_peak_bytes")
        if limit and peak_used is not None:
            within[eng] = peak_used <= limit
    return {
        "engine_memory_within_budget": within or None,
        "gpu_util_pct_mean": {str(i): round(sum(u) / len(u), 1) for i, u in util.items()},
        "gpu_util_pct_max": {str(i): max(u) for i, u in util.items()},
        "gpu_mem_peak_bytes_by_process": peak("gpu_mem"),
        "gpu_mem_peak_bytes_by_device": {str(d["index"]): max(x["mem_used_bytes"] for s in samples for x in s["devices"] if x["index"] == d["index"])
                                         for d in (samples[-1]["devices"] if samples else [])},
        "host_rss_peak_bytes_by_process": peak("rss"),
        "tokens_generated": gen[-1][1] if gen else None,
        "tokens_generated_per_s": (gen[-1][1] - gen[0][1]) / (gen[-1][0] - gen[0][0]) if len(gen) >= 2 and gen[-1][0] > gen[0][0] else None,
        "engine_gauges_peak": gauges,
        "engine_gauges_mean_in_loop": {k: round(sum(v) / len(v), 3) for k, v in sorted(means.items())},
        "engine_idle_share_in_loop": idle or None,  # share of loop samples with no request running
        "samples": len(samples), "samples_in_loop": len(loop),
    }


# ------------------------------------------------------------------------------------ running
def _device() -> dict[str, Any]:
    info = machine()
    with contextlib.suppress(Exception):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            info["gpus"] = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    return info


def _slug(info: dict[str, Any]) -> str:
    gpus = info.get("gpus") or []
    if not gpus:
        return "cpu"
    name = gpus[0].split(",")[0].replace("NVIDIA", "").strip().lower().replace(" ", "-")
    return f"{len(gpus)}x{re.sub(r'[^a-z0-9-]', '', name)}"


def run_one(config: Path, eta: int, steps: int, run_dir: Path, sets: list[str], max_run_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--run-dir", str(run_dir), "--set", f"run.steps={steps}",
           "--set", f"queue.max_staleness={eta}", "--set", "run.verify_weights=true", *[a for s in sets for a in ("--set", s)]]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(run_dir)
    log_path = run_dir.parent / f"{run_dir.name}.launcher.log"
    t0 = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler.start()
        try:
            code = proc.wait(timeout=max_run_s)
        except subprocess.TimeoutExpired:
            log.warning("bench e2e: the run at max_staleness=%d passed --max-run-seconds %.0f: interrupting it", eta, max_run_s)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        finally:
            sampler.stop()
    wall = time.monotonic() - t0
    return {"cmd": cmd, "wall": wall, "code": code, "samples": sampler.samples, "launcher_log": str(log_path), "sampler": sampler.gpus.source}


def run_e2e(config: Path, steps: int, etas: list[int], out_dir: Path, command: str, sets: list[str] | None = None,
            max_run_s: float = 3600.0, work_dir: Path | None = None) -> dict[str, Any]:
    """Run the job at each η, write ``OUT/<date>-e2e-<device>.json``; returns the result."""
    from pipeline.config import load_config
    from pipeline.placement import plan_for
    from pipeline.presets import ensure_model

    sets = list(sets or [])
    cfg = load_config(config, sets)
    plan = plan_for(cfg)
    made_s = None
    preset = cfg.model.make_if_missing or ("tiny" if cfg.model.make_tiny_if_missing else "")
    if preset:  # made once, before the runs: neither pays for it
        t = time.monotonic()
        ensure_model(cfg.model.path, preset, seed=cfg.run.seed)
        made_s = time.monotonic() - t
    info = _device()
    stamp = time.strftime("%Y-%m-%d")
    name = f"{stamp}-e2e-{_slug(info)}"
    keep = out_dir / f"{name}-runs"
    raw: dict[int, dict[str, Any]] = {}
    head = {
        "benchmark": "whole job (slipstream run): the same steps at each max_staleness, side by side, same machine, same run",
        "command": command, "config": str(config), "overrides": sets, "device": info, "placement": plan.to_json(),
        "model_make_s": made_s, "steps": steps, "staleness": etas, "baseline": f"max_staleness_{etas[0]}", "kept_run_files": str(keep),
    }
    path = out_dir / f"{name}.json"
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for eta in etas:
            rd = Path(tmp) / f"eta{eta}"
            log.info("bench e2e: max_staleness=%d, %d steps (%s)", eta, steps, config)
            raw[eta] = run_one(config, eta, steps, rd, sets, max_run_s)
            raw[eta]["run_dir"] = rd
            _keep(rd, keep / f"eta{eta}", Path(raw[eta]["launcher_log"]))
            result = {**head, **_compare(raw, steps)}  # written after every run: a cut-off bench keeps what ran
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    print(table(result))
    return result


def _compare(raw: dict[int, dict[str, Any]], steps: int) -> dict[str, Any]:
    """The runs so far, compared on the steps all of them completed."""
    counts = {}
    for eta, r in raw.items():
        p = r["run_dir"] / "steps.jsonl"
        counts[eta] = len(p.read_text().splitlines()) if p.exists() else 0
    common = min(counts.values())
    runs = {}
    for eta, r in raw.items():
        runs[f"max_staleness_{eta}"] = {**analyse(r["run_dir"], r["samples"], r["wall"], r["code"], steps, common), "command": " ".join(r["cmd"])}
    first = next(iter(raw))
    base = runs[f"max_staleness_{first}"].get("trainer_loop_s")
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "common_steps": common,
        "complete": all(c == steps for c in counts.values()), "gpu_sampler": raw[first]["sampler"], "runs": runs,
        "speedup_trainer_loop": {k: (base / r["trainer_loop_s"] if base and r.get("trainer_loop_s") else None) for k, r in runs.items()},
    }


def _keep(run_dir: Path, dest: Path, launcher_log: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    if launcher_log.exists():
        shutil.copy2(launcher_log, dest / "launcher.log")


def table(result: dict[str, Any]) -> str:
    """The runs side by side, one row per figure."""
    runs = result["runs"]
    keys = list(runs)

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) or "-"
        return str(v)

    gib = lambda d: {k: round(v / 2**30, 2) for k, v in (d or {}).items()}  # noqa: E731
    rows = [
        ("steps compared", "steps_compared"), ("exit code", "exit_code"), ("trainer loop (s)", "trainer_loop_s"),
        ("process wall (s)", "process_wall_s"), ("steady s/step", "steady_s_per_step"), ("tokens generated/s", "tokens_generated_per_s"),
        ("tokens trained/s", "tokens_trained_per_s"), ("trainer wait (s, mean)", "trainer_wait_s_mean"),
        ("trainer wait share", "trainer_wait_fraction"), ("train step (s, mean)", "trainer_step_s_mean"),
        ("publish (s, mean)", "publish_s_mean"), ("publish GB/s", "publish_gb_per_s"),
        ("  of it hashing (s, mean)", "publish_checksum_s_mean"), ("  transfer GB/s", "publish_send_gb_per_s"), ("engine pause (s, max)", "engine_pause_s_max"),
        ("staleness (mean)", "staleness_mean"), ("GPU util % (mean)", "gpu_util_pct_mean"),
        ("summary balances", "summary_balanced"), ("verify_weights every step", "verify_weights_every_step"),
        ("engine memory within budget", "engine_memory_within_budget"),
    ]
    lines = [f"{'':28}" + "".join(f"{k:>26}" for k in keys)]
    for label, key in rows:
        lines.append(f"{label:28}" + "".join(f"{fmt(runs[k].get(key)):>26}" for k in keys))
    running = lambda r: {k.split(":", 1)[0]: v for k, v in (r.get("engine_gauges_mean_in_loop") or {}).items()  # noqa: E731
                         if k.endswith(":slipstream_engine_running_requests")}
    lines.append(f"{'engine running reqs (mean)':28}" + "".join(f"{fmt(running(runs[k])):>26}" for k in keys))
    lines.append(f"{'engine idle share':28}" + "".join(f"{fmt(runs[k].get('engine_idle_share_in_loop')):>26}" for k in keys))
    busy = lambda r: {k: v["device_busy_share"] for k, v in (r.get("profile") or {}).items()}  # noqa: E731
    if any(runs[k].get("profile") for k in keys):
        lines.append(f"{'profiled: device busy share':28}" + "".join(f"{fmt(busy(runs[k])):>26}" for k in keys))
    lines.append(f"{'GPU mem peak (GiB)':28}" + "".join(f"{fmt(gib(runs[k].get('gpu_mem_peak_bytes_by_process'))):>26}" for k in keys))
    lines.append(f"{'speedup vs ' + result['baseline']:28}" + "".join(f"{fmt(result['speedup_trainer_loop'][k]):>26}" for k in keys))
    return "\n".join(lines)
