"""The whole job on one GPU, colocated (``pytest -m gpu``; skipped without CUDA).

``slipstream run examples/gpu/one_gpu.toml`` at a smaller workload (4 prompts x 4 samples x 64
tokens, 6 steps) with the default placement forced to one GPU: the trainer and the engine share
GPU 0, the allocator option reaches both, the weights go by the transport chosen for a shared
device (IPC where the build has it), every engine hashes to the trainer's weights after every
step, the engine stays within its memory budget, and the account balances.

    pytest -m gpu tests/test_e2e_gpu.py -q        # ~3 minutes on an H200 (0.6B model made first)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, env, slipstream

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CONFIG = REPO / "examples" / "gpu" / "one_gpu.toml"


def _gauge(url: str, name: str) -> float | None:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_one_gpu_colocated_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = ["placement.gpus=1", "run.steps=6", "queue.groups_per_step=4", "producer.group_size=4", "producer.max_new_tokens=64",
            "producer.max_inflight_groups=8", "queue.max_staleness=1", f"model.path='{tmp_path / 'qwen3-0.6b'}'"]
    cmd = slipstream("run", str(CONFIG), "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)])
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
    peaks: list[tuple[float, float]] = []
    deadline = time.monotonic() + 900
    while proc.poll() is None:  # sample the engine's memory gauges while it runs
        assert time.monotonic() < deadline, "the run did not finish in 15 minutes"
        procs = json.loads((run_dir / "processes.json").read_text()) if (run_dir / "processes.json").exists() else []
        for p in procs:
            if p["role"] == "engine":
                used = _gauge(p["metrics_url"], "slipstream_engine_memory_peak_bytes")
                limit = _gauge(p["metrics_url"], "slipstream_engine_memory_limit_bytes")
                if used is not None and limit:
                    peaks.append((used, limit))
        time.sleep(1.0)
    log.close()
    out = (tmp_path / "launcher.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trajectories"]["balanced"] is True and summary["steps_completed"] == 6, summary
    steps = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert all(s["engine_checksums"] == [s["weights_checksum"]] for s in steps), "an engine served other weights than the trainer's"
    placement = json.loads((run_dir / "placement.json").read_text())
    assert placement["mode"] == "colocated" and placement["trainer"]["gpus"] == [0] and placement["engines"][0]["gpu"] == 0
    procs = {p["name"]: p for p in json.loads((run_dir / "processes.json").read_text())}
    assert procs["trainer"]["cuda_visible_devices"] == procs["engine-0"]["cuda_visible_devices"] != ""
    assert procs["engine-0"]["weight_transport_expected"] == "ipc"
    if "weight_transport" in procs["engine-0"]:  # reported by the trainer (weights.transport builds)
        assert procs["engine-0"]["weight_transport"] == "ipc", procs["engine-0"]
    if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):  # else the user's options win
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in (run_dir / "cmds" / "trainer.sh").read_text()
    if peaks:  # the engine branch's memory budget
        assert all(used <= limit for used, limit in peaks), peaks[-1]
