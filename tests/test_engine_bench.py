"""``slipstream bench engine`` end to end on CPU at toy scale: it finishes and writes a consistent JSON.

The GPU run is the real measurement; this guards the code path the lead gets one try at (the
engine over HTTP, the in-process update test, the transformers workers, the summary), and checks
what does not depend on speed: token counts, the engine's log-probs against a transformers
forward (float32: equal to 1e-3), and the summary's ratios computed from the runs.

    /work/venv/bin/pytest tests/test_engine_bench.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producers.engine.bench import main

pytestmark = pytest.mark.slow


def test_bench_engine_cpu_toy_run(tmp_path: Path) -> None:
    assert main(["--device", "cpu", "--shape", "tiny", "--batches", "1,4", "--prompt-len", "6", "--new-tokens", "12",
                 "--repeats", "1", "--update-window-s", "1.5", "--update-pairs", "1", "--hf-modes", "static,dynamic",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-engine-cpu.json")
    r = json.loads(path.read_text())
    assert r["command"].startswith("python -m producers.engine.bench") and r["date"] and r["device"]["cpu"]
    assert [(x["batch"], x["tokens"]) for x in r["engine"]["runs"]] == [(1, 12), (4, 48)]
    for mode in ("static", "dynamic"):
        assert r["transformers"][mode]["status"] == "exit 0"
        assert sorted((x["batch"], x["tokens"]) for x in r["transformers"][mode]["runs"]) == [(1, 12), (4, 48)]
    assert r["updates"]["updates"] >= 1 and r["updates"]["logprob_parity"]["tokens"] == 2 * 12
    assert r["updates"]["logprob_parity"]["max_abs_diff"] < 1e-3
    eng = {x["batch"]: x["tokens_per_s"] for x in r["engine"]["runs"]}
    hf = {x["batch"]: x["tokens_per_s"] for x in r["transformers"]["static"]["runs"]}
    assert r["summary"]["engine_vs_transformers"]["4"]["static"] == pytest.approx(eng[4] / hf[4])
    assert r["weight_read_limit_s"] == pytest.approx(r["model"]["bytes"] / r["bandwidth"]["bytes_per_s"])
