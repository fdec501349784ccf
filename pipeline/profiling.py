"""torch.profiler windows for the trainer and the embedded engine, and the summary of each.

What: :class:`ProfileWindow` records one window of a process with ``torch.profiler`` (CPU ops, and
CUDA kernels where there is a GPU) and, when it stops, writes two files into its output folder:

* ``<name>.trace.json.gz``: the Chrome/Perfetto trace (open it at https://ui.perfetto.dev);
* ``<name>.summary.json``: the window's wall time and step count, the time the device ran at least
  one of this process's kernels, copies or memsets (``device_busy_s``) and its share of the wall
  time (``device_busy_share``), and the kernels and host ops that took the most time.

Why: the whole-job benchmark (``slipstream bench e2e``) says how long each step waited, trained and
published; a profile says *why*.  With the trainer and an engine on one GPU, the two summaries of
the same window tell how the device's time was split between them, and the trace shows what a
weight swap or a decode step overlapped.  Both roles profile the same window of trainer steps:
``run.profile_steps = [FIRST, LAST]`` makes trainer rank 0 profile those steps and ask every
engine to profile meanwhile over SGLang's own routes (``POST /start_profile``, ``POST
/stop_profile``), which the embedded engine implements too (``producers/engine/server.py``).

How to run::

    slipstream run examples/gpu/one_gpu.toml --set run.profile_steps=[10,12]   # RUN_DIR/profile/*
    slipstream bench e2e examples/gpu/one_gpu.toml --steps 30 --set 'run.profile_steps=[10,12]'

The profiler is imported only when a window starts; the engine opens its named spans only while a
window runs (:meth:`StepProfiler.span`), so a run without ``run.profile_steps`` pays for the
trainer's few spans a step (about 7 us each on CPU) and nothing else.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.rundir import write_json_atomic

log = logging.getLogger(__name__)

START_ROUTE, STOP_ROUTE = "/start_profile", "/stop_profile"  # SGLang's routes (tests/test_sglang_contract.py)
# sglang 0.5.23's /start_profile takes an optional ``ProfileReq`` body (older releases: ProfileReqInput)
ROUTES: dict[str, tuple[str, str | None]] = {START_ROUTE: ("POST", None), STOP_ROUTE: ("POST", None)}
ACTIVITIES = ("CPU", "GPU")  # SGLang's names; it also knows "MEM" and "RPD", which are refused here
TOP_OPS = 25


class ProfileError(ValueError):
    """A profile request that cannot be honoured (the message says what to change)."""


class ProfileWindow:
    """One profiling window: :meth:`start`, :meth:`step` after each step, :meth:`stop`.

    ``num_steps``: stop by itself after that many :meth:`step` calls (None: only :meth:`stop`)."""

    def __init__(self, out_dir: str | Path, name: str, activities: list[str] | None = None, num_steps: int | None = None,
                 record_shapes: bool = False, with_stack: bool = False) -> None:
        acts = [a.upper() for a in (activities or ACTIVITIES)]
        unknown = sorted(set(acts) - set(ACTIVITIES))
        if unknown:
            raise ProfileError(f"activities {unknown} are not supported here: use a subset of {list(ACTIVITIES)}")
        if num_steps is not None and num_steps < 1:
            raise ProfileError(f"num_steps must be >= 1 (got {num_steps})")
        self.out_dir = Path(out_dir)
        self.name = name
        self.activities = acts
        self.num_steps = num_steps
        self.record_shapes = record_shapes
        self.with_stack = with_stack
        self.steps = 0
        self._prof: Any = None
        self._t0 = 0.0
        self.summary: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        kinds = [ProfilerActivity.CPU] if "CPU" in self.activities else []
        if "GPU" in self.activities and torch.cuda.is_available():
            kinds.append(ProfilerActivity.CUDA)
        if not kinds:
            raise ProfileError("nothing to record: activities ['GPU'] on a machine without a GPU; add 'CPU'")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._prof = profile(activities=kinds, record_shapes=self.record_shapes, with_stack=self.with_stack)
        self._prof.__enter__()
        self._t0 = time.perf_counter()
        log.info("profiling %s (%s) into %s", self.name, "+".join(self.activities), self.out_dir)

    def step(self) -> bool:
        """Count one step; True when that was the last of ``num_steps`` (the window is then stopped)."""
        if self._prof is None:
            return False
        self.steps += 1
        self._prof.step()
        if self.num_steps is not None and self.steps >= self.num_steps:
            self.stop()
            return True
        return False

    def stop(self) -> dict[str, Any]:
        """End the window; write the trace and the summary; return the summary."""
        if self._prof is None:
            raise ProfileError(f"{self.name}: no profile is running")
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        trace = self.out_dir / f"{self.name}.trace.json.gz"
        raw = self.out_dir / f".{self.name}.trace.json"
        prof.export_chrome_trace(str(raw))
        data = raw.read_bytes()  # read once: summarised, then compressed
        raw.unlink()
        trace.write_bytes(gzip.compress(data))
        self.summary = summarize(json.loads(data).get("traceEvents", []), wall, self.steps, self.name, trace.name)
        write_json_atomic(self.out_dir / f"{self.name}.summary.json", self.summary)
        log.info("profile %s: %.3f s wall, %d steps, device busy %.3f s (%.0f %%); trace %s", self.name, wall, self.steps,
                 self.summary["device_busy_s"], 100 * self.summary["device_busy_share"], trace)
        return self.summary


DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})  # trace events that occupy the device
Interval = tuple[float, float]


def merged(intervals: list[Interval]) -> list[Interval]:
    """Sorted, non-overlapping union of the intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def summarize(events: list[dict[str, Any]], wall_s: float, steps: int, name: str = "", trace: str = "") -> dict[str, Any]:
    """The summary of a window from its trace events (Chrome trace format, times in us):
    ``device_busy_s`` is the time at least one kernel, copy or memset of this process ran (the union
    of their intervals: overlapping streams count once); ``top_kernels`` ranks device events by
    their summed duration, ``top_ops`` host ops (``cpu_op``) by their summed duration (inclusive).
    Named spans (``record_function``) are left out of both: they repeat the time of what they hold."""
    device: list[Interval] = []
    kernels: dict[str, list[float]] = {}
    ops: dict[str, list[float]] = {}
    for e in events:
        cat, dur = e.get("cat"), e.get("dur")
        if dur is None:
            continue
        if cat in DEVICE_CATS:
            device.append((e["ts"], e["ts"] + dur))
            row = kernels.setdefault(str(e.get("name")), [0, 0.0])
        elif cat == "cpu_op":
            row = ops.setdefault(str(e.get("name")), [0, 0.0])
        else:
            continue
        row[0] += 1
        row[1] += dur
    busy = length(merged(device)) / 1e6
    top = lambda rows: [{"name": k, "calls": int(n), "total_s": round(t / 1e6, 6)}  # noqa: E731
                        for k, (n, t) in sorted(rows.items(), key=lambda kv: kv[1][1], reverse=True)[:TOP_OPS]]
    return {
        "name": name, "trace": trace, "wall_s": round(wall_s, 6), "steps": steps,
        "device_busy_s": round(busy, 6), "device_busy_share": round(busy / wall_s, 4) if wall_s > 0 else 0.0,
        "top_kernels": top(kernels), "top_ops": top(ops),
    }


def start_body(output_dir: str, prefix: str) -> dict[str, Any]:
    """The ``POST /start_profile`` body the trainer sends to each engine (SGLang's field names)."""
    return {"output_dir": output_dir, "profile_prefix": prefix}


def parse_request(body: dict[str, Any], default_dir: str) -> dict[str, Any]:
    """The fields of SGLang's ``ProfileReq`` (sglang 0.5.23's io_struct) that a ``POST /start_profile`` may carry, checked:
    ``output_dir``, ``num_steps``, ``activities``, ``record_shapes``, ``with_stack``, ``profile_prefix``
    and ``start_step`` (the engine's decode-step count at which to begin; None: at once).  SGLang's
    ``profile_by_stage`` and ``merge_profiles`` are refused when true (one engine process, no stages)."""
    def typed(key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        v = body.get(key)
        if v is None:
            return default
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            raise ProfileError(f"{key} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
        return v

    for flag in ("profile_by_stage", "merge_profiles"):
        if body.get(flag):
            raise ProfileError(f"{flag} is not supported by the embedded engine (one process, no stages): leave it false")
    acts = typed("activities", list, None)
    if acts is not None and not all(isinstance(a, str) for a in acts):
        raise ProfileError("activities must be a list of strings")
    out = {
        "output_dir": typed("output_dir", str, None) or os.environ.get("SGLANG_TORCH_PROFILER_DIR") or default_dir,
        "num_steps": typed("num_steps", int, None), "start_step": typed("start_step", int, None),
        "activities": acts, "record_shapes": bool(typed("record_shapes", bool, False)),
        "with_stack": bool(typed("with_stack", bool, False)), "prefix": typed("profile_prefix", str, ""),
    }
    if out["num_steps"] is not None and out["num_steps"] < 1:
        raise ProfileError(f"num_steps must be >= 1 (got {out['num_steps']})")
    return out


class StepProfiler:
    """At most one :class:`ProfileWindow` at a time in a loop of steps (the engine's decode loop):
    :meth:`arm` it to begin now or at a step count, call :meth:`after_step` after every step.  Not
    thread-safe: the engine calls all three methods on its scheduler thread."""

    def __init__(self) -> None:
        self.window: ProfileWindow | None = None
        self.steps = 0  # steps counted since this process started
        self._begin_at: int | None = None
        self.last_summary: dict[str, Any] | None = None

    def span(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A named span (``record_function``) while a window records, else a no-op: the decode
        loop opens one every step, which costs microseconds the engine need not pay unprofiled."""
        if self.window is None or not self.window.active:
            return contextlib.nullcontext()
        from torch.profiler import record_function

        return record_function(name)

    def arm(self, window: ProfileWindow, start_step: int | None = None) -> None:
        if self.window is not None:
            raise ProfileError(f"profile {self.window.name!r} is already running: POST /stop_profile first")
        self.window, self._begin_at = window, start_step
        if start_step is None or self.steps >= start_step:
            window.start()
            self._begin_at = None

    def after_step(self) -> None:
        self.steps += 1
        w = self.window
        if w is None:
            return
        if not w.active:
            if self._begin_at is not None and self.steps >= self._begin_at:
                w.start()
                self._begin_at = None
            return
        if w.step():  # num_steps reached: the window wrote its files
            self.last_summary, self.window = w.summary, None

    def stop(self) -> dict[str, Any]:
        w, self.window = self.window, None
        if w is None:
            raise ProfileError("no profile is running: POST /start_profile first")
        if not w.active:  # armed for a later step that never came: nothing was recorded
            begin, self._begin_at = self._begin_at, None
            return {"name": w.name, "steps": 0, "note": f"stopped before step {begin} began the window"}
        self.last_summary = w.stop()
        return self.last_summary
