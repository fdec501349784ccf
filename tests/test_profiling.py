"""Profiling windows (pipeline/profiling.py), the engine's SGLang profiling routes
(producers/engine/profile_routes.py) and the trainer's window (consumers/profiling.py), on CPU.

    pytest tests/test_profiling.py -q
"""

from __future__ import annotations

import contextlib
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from consumers.profiling import TrainerProfile
from pipeline.config import load_config
from pipeline.configbase import ConfigError
from pipeline.profiling import ProfileError, ProfileWindow, StepProfiler, parse_request, summarize
from pipeline.tiny import make_tiny_model
from tests.test_engine_helpers import Engine


def _work(n: int = 3) -> None:
    a = torch.randn(64, 64)
    for _ in range(n):
        a = torch.tanh(a @ a)


def test_window_writes_a_trace_and_a_summary_of_what_ran(tmp_path: Path) -> None:
    w = ProfileWindow(tmp_path / "p", "unit", ["CPU"], num_steps=2)
    w.start()
    _work()
    assert w.step() is False and w.active
    _work()
    assert w.step() is True and not w.active  # num_steps reached: stopped by itself
    summary = json.loads((tmp_path / "p" / "unit.summary.json").read_text())
    assert summary == w.summary and summary["steps"] == 2 and summary["wall_s"] > 0
    names = {op["name"] for op in summary["top_ops"]}
    assert "aten::mm" in names and "aten::tanh" in names  # the ops that ran, and no others made up
    mm = next(op for op in summary["top_ops"] if op["name"] == "aten::mm")
    assert mm["calls"] == 6 and summary["device_busy_s"] == 0.0  # CPU only: no device events
    trace = json.loads(gzip.decompress((tmp_path / "p" / "unit.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])
    assert not list((tmp_path / "p").glob(".*"))  # the uncompressed trace was removed
    with pytest.raises(ProfileError, match="no profile is running"):
        w.stop()


def test_summarize_counts_device_time_once_and_ranks_kernels_and_ops() -> None:
    ev = [{"cat": "kernel", "name": "gemm", "ts": 0, "dur": 3_000_000}, {"cat": "kernel", "name": "gemm", "ts": 1_000_000, "dur": 1_000_000},
          {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 5_000_000, "dur": 1_000_000},  # on another stream, later
          {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 20}, {"cat": "cpu_op", "name": "aten::copy_", "ts": 5, "dur": 50},
          {"cat": "user_annotation", "name": "slipstream.decode_step", "ts": 0, "dur": 6_000_000},  # a span: not counted
          {"cat": "gpu_user_annotation", "name": "slipstream.decode_step", "ts": 0, "dur": 6_000_000}, {"ph": "M", "name": "meta"}]
    s = summarize(ev, wall_s=8.0, steps=2)
    assert s["device_busy_s"] == 4.0 and s["device_busy_share"] == 0.5  # 0-3 s (the second gemm inside it) and 5-6 s
    assert s["top_kernels"] == [{"name": "gemm", "calls": 2, "total_s": 4.0}, {"name": "Memcpy DtoD", "calls": 1, "total_s": 1.0}]
    assert [op["name"] for op in s["top_ops"]] == ["aten::copy_", "aten::mm"]


def test_step_profiler_starts_at_the_step_asked_and_refuses_a_second_window(tmp_path: Path) -> None:
    sp = StepProfiler()
    assert isinstance(sp.span("slipstream.x"), contextlib.nullcontext)  # no window: the decode loop pays nothing
    sp.after_step()
    sp.after_step()
    w = ProfileWindow(tmp_path, "armed", ["CPU"], num_steps=2)
    sp.arm(w, start_step=4)  # steps counted so far: 2
    assert not w.active
    with pytest.raises(ProfileError, match="already running"):
        sp.arm(ProfileWindow(tmp_path, "second", ["CPU"]))
    sp.after_step()
    assert not w.active
    sp.after_step()  # the 4th step: the window begins
    assert w.active and not isinstance(sp.span("slipstream.x"), contextlib.nullcontext)
    _work()
    sp.after_step()
    sp.after_step()  # two steps recorded: done
    assert not w.active and sp.window is None and sp.last_summary is not None and sp.last_summary["steps"] == 2
    with pytest.raises(ProfileError, match="no profile is running"):
        sp.stop()
    # armed for a step that never comes, then stopped: nothing recorded, nothing written
    sp.arm(ProfileWindow(tmp_path, "never", ["CPU"]), start_step=100)
    assert sp.stop()["steps"] == 0 and not (tmp_path / "never.summary.json").exists()


def test_parse_request_takes_sglangs_fields_and_refuses_what_it_cannot_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGLANG_TORCH_PROFILER_DIR", raising=False)
    r = parse_request({"num_steps": 5, "activities": ["CPU"], "profile_prefix": "engine-3", "start_step": 7}, "/d")
    assert (r["output_dir"], r["num_steps"], r["activities"], r["prefix"], r["start_step"]) == ("/d", 5, ["CPU"], "engine-3", 7)
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", "/env")
    assert parse_request({}, "/d")["output_dir"] == "/env"  # SGLang's default folder
    for body, msg in [({"num_steps": 0}, "num_steps must be >= 1"), ({"num_steps": "3"}, "num_steps must be int"),
                      ({"num_steps": True}, "num_steps must be int"), ({"merge_profiles": True}, "merge_profiles"),
                      ({"profile_by_stage": True}, "profile_by_stage"), ({"activities": [1]}, "list of strings")]:
        with pytest.raises(ProfileError, match=msg):
            parse_request(body, "/d")
    with pytest.raises(ProfileError, match="not supported here"):
        ProfileWindow("/tmp", "x", ["MEM"])


def test_profile_steps_config_is_checked() -> None:
    assert load_config(Path("examples/tiny/config.toml"), ["run.profile_steps=[3,5]"]).run.profile_steps == [3, 5]
    for bad in ("[5,3]", "[0,2]", "[4]"):
        with pytest.raises(ConfigError, match="profile_steps"):
            load_config(Path("examples/tiny/config.toml"), [f"run.profile_steps={bad}"])


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-prof"))
    eng = Engine(model, tmp_path_factory.mktemp("engine-prof"), "--max-running-requests", "4")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def test_engine_profiles_decode_steps_over_sglangs_routes(engine: Engine, tmp_path: Path) -> None:
    status, text = engine.post("/stop_profile")
    assert status == 400 and "no profile is running" in text["message"]
    status, text = engine.post("/start_profile", {"output_dir": str(tmp_path), "profile_prefix": "engine-0", "activities": ["CPU"]})
    assert (status, text) == (200, "Start profiling.\n")  # SGLang's reply
    status, again = engine.post("/start_profile", {"output_dir": str(tmp_path)})
    assert status == 400 and "already running" in again["message"]
    out = engine.generate({"input_ids": [1, 3, 4], "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
    assert len(out["output_ids"]) == 12
    status, text = engine.post("/stop_profile")
    assert (status, text) == (200, "Stop profiling. This will take some time.\n")
    s = json.loads((tmp_path / "engine-0.summary.json").read_text())
    assert s["steps"] == 11  # 12 tokens: one from the prefill, 11 decode steps
    trace = json.loads(gzip.decompress((tmp_path / "engine-0.trace.json.gz").read_bytes()))["traceEvents"]
    assert sum(e.get("name") == "slipstream.decode_step" for e in trace) == 11 and s["top_ops"]  # the named spans, inside the window
    # num_steps: the window ends by itself after that many decode steps
    status, _ = engine.post("/start_profile", {"output_dir": str(tmp_path), "profile_prefix": "short", "num_steps": 3, "activities": ["CPU"]})
    assert status == 200
    engine.generate({"input_ids": [1, 3, 4], "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
    assert json.loads((tmp_path / "short.summary.json").read_text())["steps"] == 3
    assert engine.post("/stop_profile")[0] == 400  # already over
    status, bad = engine.post("/start_profile", {"merge_profiles": True})
    assert status == 400 and "merge_profiles" in bad["message"]
    status, bad = engine.post("/start_profile", b"{not json")  # the server's own body check
    assert status == 400 and "invalid JSON" in bad["error"]["message"]


def test_trainer_profile_covers_its_steps_and_the_engines(engine: Engine, tmp_path: Path) -> None:
    prof = TrainerProfile([2, 3], tmp_path, 0, [engine.base, "http://127.0.0.1:9"])  # the second engine cannot be reached
    for step in range(1, 5):
        prof.before_step(step)
        _work()
        engine.generate({"input_ids": [1, 3], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
        prof.after_step(step)
    trainer = json.loads((tmp_path / "profile" / "trainer-rank0.summary.json").read_text())
    assert trainer["steps"] == 2
    eng = json.loads((tmp_path / "profile" / "engine-0.summary.json").read_text())
    assert eng["steps"] == 6  # steps 2 and 3: 3 decode steps each
    assert not (tmp_path / "profile" / "engine-1.summary.json").exists()  # left out, logged; the run went on
    off = TrainerProfile([], tmp_path / "off", 0, [engine.base])
    off.before_step(1)
    off.after_step(1)
    off.close()
    assert not (tmp_path / "off").exists()


def _trace(path: Path, events: list[dict[str, object]]) -> None:
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))


def test_profile_overlap_splits_the_device_time_between_processes(tmp_path: Path) -> None:
    from bench.profile_overlap import Busy, analyse, merged

    assert merged([(5, 7), (0, 2), (1, 3)]) == [(0, 3), (5, 7)]
    b = Busy([(0, 10), (20, 30), (5, 12)])
    assert (b.within(0, 100), b.within(8, 25), b.within(12, 20), b.within(25, 26)) == (22, 9, 0, 1)
    k = lambda ts, dur: {"cat": "kernel", "name": "k", "ts": ts, "dur": dur}  # noqa: E731
    # trainer: busy 0-400 and 600-1000 (two overlapping streams count once); engine: 100 us decode steps
    _trace(tmp_path / "trainer-rank0.trace.json.gz", [k(0, 400), k(100, 200), k(600, 400)])
    steps = [{"cat": "user_annotation", "name": "slipstream.decode_step", "ts": t, "dur": 100} for t in (0, 450, 500, 700)]
    swap = {"cat": "user_annotation", "name": "slipstream.swap_weights", "ts": 400, "dur": 200}
    _trace(tmp_path / "engine-0.trace.json.gz", [k(0, 50), k(450, 100), k(700, 300), *steps, swap])
    r = analyse(tmp_path)
    assert r["window_s"] == 0.001 and r["processes"]["trainer-rank0"]["busy_share"] == 0.8
    assert r["processes"]["engine-0"]["busy_share"] == 0.45
    assert r["device_busy_share"] == 0.9 and r["overlap_s"] == 0.00035  # 0-50 and 700-1000 ran together
    e = r["engines"]["engine-0"]
    assert e["decode_steps"] == 4 and e["decode_step_trainer_busy"]["n"] == 2 and e["decode_step_trainer_idle"]["n"] == 2
    assert e["swaps"] == [{"ms": 0.2, "trainer_busy_share": 0.0}]
    assert e["decode_step_own_device_share"] == 0.75  # of 4 x 100 us of steps, its kernels ran 50 + 100 + 50 + 100
    assert r["spans"]["engine-0"]["slipstream.decode_step"]["n"] == 4
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    _trace(cpu / "trainer-rank0.trace.json.gz", [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}])
    with pytest.raises(SystemExit, match="a CPU run records none"):
        analyse(cpu)
