"""Experiment tracking (pipeline/tracking.py): what is logged is what steps.jsonl and eval.jsonl hold.

- tensorboard: a real event file, read back with tensorboard's own EventAccumulator, holds every
  numeric steps.jsonl field at its step, every eval.jsonl field against its policy version, and the
  resolved config (hparams + text);
- wandb (offline, no network): the run's .wandb log, read back with wandb's own
  ``wandb leet inspect --json``, holds the same history, the config, the group and the tags;
- a tracker never blocks the step and never fails the run: a sink that raises, one that cannot
  start, one that stalls (full queue, close timeout) are logged and counted, with exact counts;
- end to end (slow, in tests/test_e2e.py::test_synchronous_mode_is_on_policy, whose run it shares): a
  run whose tracker raises on every record finishes, and summary.json counts it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from consumers.loop import StepRecord
from pipeline.configbase import ConfigError
from pipeline.tracking import Tracker, TrackingConfig, TrackingMetrics, flat_hparams, scalars

HPARAMS = {"run": {"seed": 3, "steps": 5}, "queue": {"max_staleness": 2}, "producer": {"eval_ks": [1, 4]}}


def _records(n: int) -> list[dict[str, Any]]:
    """steps.jsonl lines as the trainer writes them (StepRecord.to_json)."""
    out = []
    for i in range(1, n + 1):
        rec = StepRecord(step=i, policy_version=i, reward_mean=0.1 * i, staleness_mean=0.5, staleness_max=1, tokens_trained=100 + i,
                         trajectories=64, trajectories_dropped=i % 2, queue_depth=3, wall_time_s=0.7 * i, wait_s=0.01, train_s=0.2,
                         publish_s=0.05, publish_bytes=4096, weights_checksum="abc", replay=i == 2, stats={"loss": -0.01 * i, "grad_norm": 0.3})
        out.append(json.loads(rec.to_json()))
    return out


def _evals() -> list[dict[str, Any]]:
    return [{"policy_version": v, "min_token_version": v, "max_token_version": v, "prompts": 4, "samples_per_prompt": 4,
             "pass@1": 0.1 + v / 10, "pass@4": 0.3 + v / 20, "reward_mean": 0.2 + v / 30, "seconds": 0.5} for v in (0, 2, 4)]


def _feed(tracker: Tracker, run_dir: Path, records: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    with (run_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps(evals[0]) + "\n")
    for rec in records:
        tracker.log_step(rec)
        if rec["step"] == 3:
            with (run_dir / "eval.jsonl").open("a") as f:
                f.write(json.dumps(evals[1]) + "\n")
    with (run_dir / "eval.jsonl").open("a") as f:  # written before close: close picks it up
        f.write(json.dumps(evals[2]) + "\n")


def test_scalars_and_hparams_flattening() -> None:
    assert scalars({"a": 1, "b": True, "c": "x", "d": [1], "e": None, "f": 0.5}, "p/") == {"p/a": 1.0, "p/b": 1.0, "p/f": 0.5}
    assert flat_hparams(HPARAMS) == {"run.seed": 3, "run.steps": 5, "queue.max_staleness": 2, "producer.eval_ks": "[1, 4]"}


def test_config_names_a_bad_backend() -> None:
    with pytest.raises(ConfigError, match="backend"):
        TrackingConfig(backend="tensorbord")
    with pytest.raises(ConfigError, match="queue_size"):
        TrackingConfig(queue_size=0)


def test_tensorboard_event_file_holds_every_step_and_eval_field(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records, evals = _records(6), _evals()
    tracker = Tracker(TrackingConfig(backend="tensorboard"), tmp_path, HPARAMS)
    _feed(tracker, tmp_path, records, evals)
    counts = tracker.close()
    assert counts["logged"] == len(records) + len(evals)
    assert counts["failed"] == counts["queue_full"] == counts["errors_log"] == 0

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in scalars(records[0]):
        assert key in tags, f"{key} not logged"
        got = {e.step: e.value for e in acc.Scalars(key)}
        assert got == pytest.approx({r["step"]: float(r[key]) for r in records}, rel=1e-6), key
    for key in ("pass@1", "pass@4", "reward_mean", "prompts"):
        got = {e.step: e.value for e in acc.Scalars(f"eval/{key}")}
        assert got == pytest.approx({e["policy_version"]: e[key] for e in evals}, rel=1e-6), key
    assert "weights_checksum" not in tags  # strings are not scalars
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\njson")) == HPARAMS
    stats = json.loads((tmp_path / "stats" / "tracking.json").read_text())
    assert stats["backend"] == "tensorboard" and stats["logged"] == counts["logged"]


def _wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    wandb_bin = shutil.which("wandb", path=str(Path(sys.executable).parent))
    assert wandb_bin, "wandb's command line is not installed next to this python"
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = subprocess.run([wandb_bin, "leet", "inspect", "--json", str(log_file)], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_wandb_offline_run_holds_every_step_and_eval_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records, evals = _records(5), _evals()
    cfg = TrackingConfig(backend="wandb", wandb_mode="offline", project="p", run_name="r1", group="sweep-x", tags=["eta=2", "seed=3"])
    tracker = Tracker(cfg, tmp_path, HPARAMS)
    _feed(tracker, tmp_path, records, evals)
    counts = tracker.close()
    assert counts["logged"] == len(records) + len(evals) and counts["errors_start"] == counts["errors_log"] == 0

    recs = _wandb_records(tmp_path)
    (run,) = [r["run"] for r in recs if r["type"] == "run"]
    assert run["run_group"] == "sweep-x" and run["tags"] == ["eta=2", "seed=3"] and run["display_name"] == "r1"
    config = run["config"]["update"]
    assert {k: config[k] for k in HPARAMS} == HPARAMS
    rows = [r["history"]["item"] for r in recs if r["type"] == "history"]
    # wandb copies the newest "step" into an evaluation row (its metrics are bound to a step metric
    # too), so a step row is one with no eval/ key.
    by_step = {int(row["step"]): row for row in rows if not any(k.startswith("eval/") for k in row)}
    assert len(rows) == len(records) + len(evals)  # one row per record: nothing merged or overwritten
    for rec in records:
        row = by_step[rec["step"]]
        for key, value in scalars(rec).items():
            assert row[key] == pytest.approx(value, rel=1e-9), (rec["step"], key)
    seen = [(row["eval/policy_version"], row["eval/pass@1"], row["eval/reward_mean"]) for row in rows if "eval/policy_version" in row]
    assert seen == [(e["policy_version"], e["pass@1"], e["reward_mean"]) for e in evals]  # JSON round trip: exact


class RaisingSink:
    def __init__(self, *_: Any) -> None:
        self.calls = 0

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        raise RuntimeError("tracker service is down")

    def close(self) -> None:
        raise OSError("cannot flush")


def make_raising_sink(*args: Any) -> RaisingSink:
    return RaisingSink(*args)


def make_broken_sink(*_: Any) -> RaisingSink:
    raise ConnectionError("no route to the tracking server")


GATE = threading.Event()


class StalledSink:
    """Starts only once GATE is set, and then logs normally (a slow tracker)."""

    def __init__(self) -> None:
        GATE.wait(30)
        self.seen: list[int] = []

    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        self.seen.append(step)

    def close(self) -> None:
        pass


def make_stalled_sink(*_: Any) -> StalledSink:
    return StalledSink()


class HangingSink:
    def log(self, kind: str, values: dict[str, float], step: int) -> None:
        threading.Event().wait(60)

    def close(self) -> None:
        pass


def make_hanging_sink(*_: Any) -> HangingSink:
    return HangingSink()


def _value(metrics: TrackingMetrics, counter: str, label: str) -> float:
    return getattr(metrics, counter).labels(label)._value.get()  # type: ignore[no-any-return]


def test_a_sink_that_raises_is_counted_and_the_caller_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry

    metrics = TrackingMetrics(CollectorRegistry())
    tracker = Tracker(TrackingConfig(backend="tests.test_tracking:make_raising_sink"), tmp_path, HPARAMS, metrics)
    for rec in _records(7):
        tracker.log_step(rec)
    counts = tracker.close()
    assert counts["failed"] == 7 and counts["errors_log"] == 7 and counts["errors_close"] == 1 and counts["logged"] == 0
    assert _value(metrics, "records", "failed") == 7 and _value(metrics, "errors", "log") == 7 and _value(metrics, "errors", "close") == 1
    errors = [r for r in caplog.records if "tracker service is down" in r.getMessage()]
    assert len(errors) == 1, "the first failure is logged, not every one"


def test_a_sink_that_cannot_start_drops_every_record_counted(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(backend="tests.test_tracking:make_broken_sink"), tmp_path, HPARAMS)
    for rec in _records(4):
        tracker.log_step(rec)
    counts = tracker.close()
    assert counts["errors_start"] == 1 and counts["sink_down"] == 4 and counts["logged"] == 0
    assert json.loads((tmp_path / "stats" / "tracking.json").read_text())["sink_down"] == 4


def test_a_stalled_tracker_never_blocks_log_step(tmp_path: Path) -> None:
    """The sink is stuck in its start: the queue (size 2) fills, the rest is dropped and counted,
    and log_step returns every time; once the sink starts, what was queued is logged."""
    GATE.clear()
    tracker = Tracker(TrackingConfig(backend="tests.test_tracking:make_stalled_sink", queue_size=2), tmp_path, HPARAMS)
    for rec in _records(6):
        tracker.log_step(rec)  # would hang here if it blocked: the sink has not started
    assert tracker.counts["queue_full"] == 4
    GATE.set()
    counts = tracker.close()
    assert counts["logged"] == 2 and counts["queue_full"] == 4
    assert tracker._sink is not None and tracker._sink.seen == [1, 2]  # type: ignore[attr-defined]


def test_close_gives_up_after_its_timeout_and_counts_what_is_left(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(backend="tests.test_tracking:make_hanging_sink", close_timeout_s=0.5), tmp_path, HPARAMS)
    for rec in _records(3):
        tracker.log_step(rec)
    counts = tracker.close()
    assert counts["logged"] == 0
    assert counts["unflushed_at_close"] >= 2  # the first record may be inside the hanging log() call


def test_backend_none_starts_nothing(tmp_path: Path) -> None:
    tracker = Tracker(TrackingConfig(), tmp_path, HPARAMS)
    tracker.log_step(_records(1)[0])
    assert tracker.close()["logged"] == 0 and not tracker._thread.is_alive()
    assert not (tmp_path / "stats").exists()
