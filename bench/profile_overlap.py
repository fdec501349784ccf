"""Where the GPU's time went in a profiled window of a run: the trainer's and the engines' kernels,
from their torch.profiler traces, on one clock.

What: reads every ``*.trace.json.gz`` that ``run.profile_steps`` left in ``RUN_DIR/profile``
(pipeline/profiling.py; one per trainer rank and engine, all on the host's monotonic clock) and,
over the window where all of them recorded (the intersection of their kernel time ranges), reports:

* per process: the time at least one of its kernels, copies or memsets ran (the union of their
  intervals, so overlapping streams count once) and its share of the window;
* for the device: the union over processes (busy share), and how long two processes' kernels ran
  at the same time;
* the named spans the code marks (``slipstream.decode_step``, ``slipstream.swap_weights``,
  ``slipstream.train_step``, ``slipstream.export_and_publish``, ``slipstream.weights_fingerprint``):
  count and duration quantiles, host side;
* the engine's decode steps split by what the trainer did meanwhile: steps during which the
  trainer's kernels ran less than 5 % of the time against more than 50 %: their count and median
  duration, which measures how much the colocated trainer slows decoding;
* how much of the engine's decode-step time its own kernels ran (the rest is host work or waiting);
* each weight swap's duration and the trainer's busy share during it.

Why: ``slipstream bench e2e`` says how long the trainer waited for data or an engine paused; this
says why, from what ran on the device.

    python bench/profile_overlap.py RUN_DIR/profile [--out FILE.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from pipeline.profiling import DEVICE_CATS, Interval, length, merged


def load(path: Path) -> list[dict[str, Any]]:
    return json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]


def clip(intervals: list[Interval], lo: float, hi: float) -> list[Interval]:
    return [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]


class Busy:
    """Merged busy intervals with prefix sums: busy time inside any [lo, hi] in O(log n)."""

    def __init__(self, intervals: list[Interval]) -> None:
        self.iv = merged(intervals)
        self.starts = [a for a, _ in self.iv]
        self.cum = [0.0]
        for a, b in self.iv:
            self.cum.append(self.cum[-1] + b - a)

    def within(self, lo: float, hi: float) -> float:
        if hi <= lo or not self.iv:
            return 0.0
        i = max(bisect.bisect_right(self.starts, lo) - 1, 0)
        j = bisect.bisect_left(self.starts, hi)
        total = self.cum[j] - self.cum[i]
        a, b = self.iv[i]
        total -= max(0.0, min(b, lo) - a)  # the part of the first interval before lo
        if j - 1 >= i:
            a, b = self.iv[j - 1]
            total -= max(0.0, b - max(a, hi))  # the part of the last interval after hi
        return max(total, 0.0)


def quantiles(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)
    q = lambda p: s[min(len(s) - 1, int(p * len(s)))]  # noqa: E731
    return {"n": len(s), "median_ms": round(q(0.5) / 1e3, 3), "p90_ms": round(q(0.9) / 1e3, 3), "max_ms": round(s[-1] / 1e3, 3),
            "total_s": round(sum(s) / 1e6, 4)}


def analyse(profile_dir: Path) -> dict[str, Any]:
    traces = {p.name.split(".")[0]: load(p) for p in sorted(profile_dir.glob("*.trace.json.gz"))}
    if not traces:
        raise SystemExit(f"no *.trace.json.gz in {profile_dir} (run with run.profile_steps = [FIRST, LAST])")
    device = {n: [(e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") in DEVICE_CATS and "dur" in e] for n, ev in traces.items()}
    spans = {n: [e for e in ev if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("slipstream.")]
             for n, ev in traces.items()}
    ranges = [(min(a for a, _ in iv), max(b for _, b in iv)) for iv in device.values() if iv]
    if not ranges:
        raise SystemExit(f"no kernel, copy or memset events in the traces of {profile_dir}: a CPU run records none "
                         "(this splits a GPU's time; on CPU read the summaries' top_ops)")
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    window = hi - lo
    busy = {n: Busy(clip(iv, lo, hi)) for n, iv in device.items()}
    per = {n: {"busy_s": round(length(b.iv) / 1e6, 6), "busy_share": round(length(b.iv) / window, 4)} for n, b in busy.items()}
    union = merged([x for b in busy.values() for x in b.iv])
    out: dict[str, Any] = {
        "profile_dir": str(profile_dir), "window_s": round(window / 1e6, 6), "processes": per,
        "device_busy_share": round(length(union) / window, 4),
        "overlap_s": round((sum(length(b.iv) for b in busy.values()) - length(union)) / 1e6, 6),
        "spans": {n: {k: quantiles([e["dur"] for e in s if e["name"] == k and lo <= e["ts"] <= hi])
                      for k in sorted({e["name"] for e in s})} for n, s in spans.items()},
    }
    trainers = [n for n in traces if n.startswith("trainer")]
    if trainers:
        tb = busy[trainers[0]]
        for n in traces:
            if not n.startswith("engine"):
                continue
            steps = [e for e in spans[n] if e["name"] == "slipstream.decode_step" and lo <= e["ts"] and e["ts"] + e["dur"] <= hi]
            share = [(e["dur"], tb.within(e["ts"], e["ts"] + e["dur"]) / e["dur"]) for e in steps if e["dur"] > 0]
            idle = [d for d, f in share if f < 0.05]
            loaded = [d for d, f in share if f > 0.5]
            swaps = [e for e in spans[n] if e["name"] == "slipstream.swap_weights" and lo <= e["ts"] <= hi]
            eb = busy[n]
            span_s = sum(e["dur"] for e in steps)
            out.setdefault("engines", {})[n] = {
                "decode_steps": len(steps),
                # how much of its decode steps' time the engine's own kernels ran: the rest is host work
                # (scheduling, sampling bookkeeping, Python) or waiting for the device
                "decode_step_own_device_share": round(sum(eb.within(e["ts"], e["ts"] + e["dur"]) for e in steps) / span_s, 4) if span_s else None,
                "decode_step_trainer_idle": quantiles(idle), "decode_step_trainer_busy": quantiles(loaded),
                "slowdown_when_trainer_busy": round(statistics.median(loaded) / statistics.median(idle), 3) if idle and loaded else None,
                "swaps": [{"ms": round(e["dur"] / 1e3, 3), "trainer_busy_share": round(tb.within(e["ts"], e["ts"] + e["dur"]) / e["dur"], 3)}
                          for e in swaps if e["dur"] > 0],
            }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    result = analyse(args.profile_dir)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
