"""Experiment tracking: every trainer step record, and every evaluation, to wandb or tensorboard.

    [tracking]
    backend = "tensorboard"   # "wandb" | "tensorboard" | "none" (default) | "module:factory" (your own sink)
    project = "slipstream"    # wandb project
    run_name = ""             # "" = the run directory's name
    group = ""                # `slipstream sweep` sets group = the sweep's name and tags = ["eta=1", "seed=0"]
    tags = []

    pip install "slipstream[wandb]"          # or "slipstream[tensorboard]"

Where it is fed.  Trainer rank 0 calls :meth:`Tracker.log_step` once per step, right where the
step's line is appended to ``steps.jsonl`` (``finish()`` in ``consumers/loop.py``): every numeric
field of that line is logged under its ``steps.jsonl`` name at ``step``.  Producer 0's evaluator
writes ``eval.jsonl``; the tracker's thread tails that file and logs each new evaluation as
``eval/<field>`` (x axis: ``eval/policy_version``).  So one process writes the tracking run: a
wandb offline run takes one writer, and tensorboard gets one event file.  The resolved config is
logged once as hyper-parameters (wandb ``config``; tensorboard hparams plus a ``config`` text).

Never blocks, never fails the run.  ``log_step`` only puts the record on a bounded queue
(``tracking.queue_size``); a daemon thread starts the sink (``wandb.init`` can take seconds) and
does every call into it.  A full queue drops the record, counted.  A sink that raises is logged
(its first failure and every 100th after) and counted; a sink that cannot start drops every record,
counted.  At exit the thread gets ``tracking.close_timeout_s`` to drain.  Counters:
``slipstream_tracking_records_total{result}`` (logged, failed, queue_full, sink_down,
unflushed_at_close) and ``slipstream_tracking_errors_total{reason}`` (start, log, close); the same
counts go to ``RUN_DIR/stats/tracking.json`` and from there into ``summary.json``.

A sink plug-in (``backend = "my_module:make_sink"``) is called as ``factory(cfg, run_dir, hparams)``
in the tracker's thread and returns an object with ``log(kind, values, step)`` (kind "step" or
"eval") and ``close()``.

    python -m pytest tests/test_tracking.py -q
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter

from pipeline.configbase import check, doc

log = logging.getLogger(__name__)

BUILTIN_BACKENDS = ("none", "wandb", "tensorboard")
RESULTS = ("logged", "failed", "queue_full", "sink_down", "unflushed_at_close")
ERROR_REASONS = ("start", "log", "close")


@dataclass
class TrackingConfig:
    backend: str = doc(
        "Experiment tracker fed from the trainer's step records and producer 0's evaluations: 'none', 'wandb' "
        "(pip install slipstream[wandb]), 'tensorboard' (slipstream[tensorboard]; event files in RUN_DIR/tensorboard), "
        "or 'module:factory' for your own sink. A failing tracker is logged and counted; it never blocks or fails a step.",
        "none",
    )
    project: str = doc("wandb project.", "slipstream")
    run_name: str = doc("Run name in the tracker; empty = the run directory's name.", "")
    group: str = doc("Run group (wandb group; `slipstream sweep` sets the sweep's name).", "")
    tags: list[str] = doc("Run tags (`slipstream sweep` adds eta=N and seed=N).", default_factory=list)
    wandb_mode: Literal["online", "offline"] = doc(
        "wandb mode: 'online' syncs to the server (needs a login), 'offline' writes RUN_DIR/wandb for `wandb sync` later.", "online"
    )
    queue_size: int = doc("Records waiting for the tracker's thread at most; beyond it a record is dropped and counted.", 1024)
    close_timeout_s: float = doc("How long the trainer waits at exit for the tracker to log what is queued and close.", 30.0)

    def __post_init__(self) -> None:
        check(self.backend in BUILTIN_BACKENDS or ":" in self.backend, "backend",
              f"must be one of {list(BUILTIN_BACKENDS)} or an import path 'module:factory', got {self.backend!r}")
        check(self.queue_size >= 1, "queue_size", "must be >= 1")
        check(self.close_timeout_s > 0, "close_timeout_s", "must be > 0")


class TrackingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter("slipstream_tracking_records_total", "Step and evaluation records handed to the experiment tracker, by result.",
                               ["result"], registry=registry)
        self.errors = Counter("slipstream_tracking_errors_total", "Exceptions raised by the experiment tracker, by reason (start, log, close).",
                              ["reason"], registry=registry)
        for r in RESULTS:
            self.records.labels(r)
        for r in ERROR_REASONS:
            self.errors.labels(r)


class Sink(Protocol):
    def log(self, kind: str, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric fields of a record (bools as 0/1); strings, lists and None are left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, int | float):  # bool is an int: True -> 1.0
            out[prefix + k] = float(v)
    return out


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"queue.max_staleness": 1, ...}; lists and tables as JSON text."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, list | dict):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


class TensorboardSink:
    """Event files in ``RUN_DIR/tensorboard`` (torch's SummaryWriter over tensorboard's protobufs)."""

    def __init__(self, logdir: Path, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=5)
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat_hparams(hparams).items()}
        for s in hparams_summary(flat, {}):
            self.writer.file_writer.add_summary(s)
        self.writer.add_text("config", "```json\n" + json.dumps(hparams, indent=2) + "\n```", 0)

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A wandb run (online or offline).  Every record is a row of its own (wandb's ``_step`` counts
    rows), charted against ``step`` (step records) or ``eval/policy_version`` (evaluations), so an
    evaluation never overwrites a step's values nor waits for the next step."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, hparams: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=cfg.project, name=cfg.run_name or run_dir.name, group=cfg.group or None, tags=list(cfg.tags) or None,
                              config=hparams, dir=str(run_dir), mode=cfg.wandb_mode, reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("eval/policy_version")
        self.run.define_metric("eval/*", step_metric="eval/policy_version")
        self.run.define_metric("*", step_metric="step")

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        self.run.log(values)

    def close(self) -> None:
        self.run.finish()


def make_sink(cfg: TrackingConfig, run_dir: Path, hparams: dict[str, Any]) -> Sink:
    if cfg.backend == "tensorboard":
        return TensorboardSink(run_dir / "tensorboard", hparams)
    if cfg.backend == "wandb":
        return WandbSink(cfg, run_dir, hparams)
    from producers.plugins import load_plugin

    sink: Sink = load_plugin(cfg.backend, "tracking.backend", {})(cfg, run_dir, hparams)
    return sink


class Tracker:
    """The trainer's handle: ``log_step`` (non-blocking) and ``close`` (bounded wait)."""

    def __init__(self, cfg: TrackingConfig, run_dir: Path, hparams: dict[str, Any], metrics: TrackingMetrics | None = None,
                 eval_path: Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.metrics = metrics or TrackingMetrics(CollectorRegistry())
        self.eval_path = eval_path if eval_path is not None else run_dir / "eval.jsonl"
        self.counts: dict[str, int] = {**{r: 0 for r in RESULTS}, **{f"errors_{r}": 0 for r in ERROR_REASONS}}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, dict[str, float], int] | None] = queue.Queue(maxsize=cfg.queue_size)
        self._eval_offset = 0
        self._sink: Sink | None = None
        self._sink_down = False
        self.enabled = cfg.backend != "none"
        self._thread = threading.Thread(target=self._work, args=(hparams,), name="tracker", daemon=True)
        if self.enabled:
            self._thread.start()

    # ------------------------------------------------------------------ trainer side
    def log_step(self, record: dict[str, Any]) -> None:
        """Queue a ``steps.jsonl`` record; never blocks (a full queue drops it, counted)."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(("step", scalars(record), int(record["step"])))
        except queue.Full:
            self._count("queue_full")
            if self.counts["queue_full"] == 1 or self.counts["queue_full"] % 100 == 0:
                log.warning("tracking: the tracker is behind by %d records (tracking.queue_size); dropped a step record (%d so far)",
                            self.cfg.queue_size, self.counts["queue_full"])

    def close(self) -> dict[str, int]:
        """Let the thread log what is queued (and any new evaluations), close the sink, write the counts."""
        if self.enabled:
            deadline = time.monotonic() + self.cfg.close_timeout_s
            while True:
                try:
                    self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                    break
                except queue.Full:
                    if time.monotonic() >= deadline:
                        break
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                left = self._queue.qsize()
                self._count("unflushed_at_close", left)
                log.error("tracking: %s did not finish within tracking.close_timeout_s = %.0fs; %d queued record(s) not logged",
                          self.cfg.backend, self.cfg.close_timeout_s, left)
        from pipeline.rundir import stats_file, write_json_atomic

        with self._lock:
            counts = dict(self.counts)
        if self.enabled:
            write_json_atomic(stats_file(self.run_dir, "tracking"), {"backend": self.cfg.backend, **counts})
            log.info("tracking (%s): %s", self.cfg.backend, counts)
        return counts

    # ------------------------------------------------------------------ tracker thread
    def _count(self, result: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self.counts[result] += n
        (self.metrics.errors.labels(result[7:]) if result.startswith("errors_") else self.metrics.records.labels(result)).inc(n)

    def _error(self, reason: str, e: BaseException) -> None:
        self._count(f"errors_{reason}")
        n = self.counts[f"errors_{reason}"]
        if n == 1 or n % 100 == 0:
            log.error("tracking: %s raised at %s (%d so far; the run goes on): %s: %s", self.cfg.backend, reason, n, type(e).__name__, e)

    def _work(self, hparams: dict[str, Any]) -> None:
        try:
            self._sink = make_sink(self.cfg, self.run_dir, hparams)
        except BaseException as e:  # an ImportError, a login error, a plug-in bug: all the same to the run
            self._sink_down = True
            self._error("start", e)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._tail_eval()
                continue
            if item is None:
                break
            self._emit(*item)
            self._tail_eval()
        self._tail_eval()
        if self._sink is not None:
            try:
                self._sink.close()
            except BaseException as e:
                self._error("close", e)

    def _emit(self, kind: str, values: dict[str, float], step: int) -> None:
        if self._sink is None:
            self._count("sink_down")
            return
        try:
            self._sink.log(kind, values, step)
            self._count("logged")
        except BaseException as e:
            self._count("failed")
            self._error("log", e)

    def _tail_eval(self) -> None:
        """Log the evaluations producer 0 appended to eval.jsonl since the last look (whole lines only)."""
        try:
            with self.eval_path.open("rb") as f:
                f.seek(self._eval_offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        lines = chunk.split(b"\n")
        self._eval_offset += len(chunk) - len(lines[-1])
        for raw in lines[:-1]:
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("tracking: skipped an unreadable eval.jsonl line: %.80s", line)
                continue
            values = {k: v for k, v in scalars(rec, "eval/").items() if math.isfinite(v)}
            self._emit("eval", values, int(rec.get("policy_version", 0)))
