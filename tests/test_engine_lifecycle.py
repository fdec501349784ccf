"""Engine process lifecycle: --port 0 + --port-file discovery, SIGTERM while busy, in a weight
group and with a bucket in transit (the generation gets an abort response, the pending update a
503, exit code 0 within seconds), and a bad
``--set`` override (exit code 2, error names the key).

    /work/venv/bin/pytest tests/test_engine_lifecycle.py -q
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tiny import make_tiny_model
from pipeline.weightsync import init_weight_group
from tests.test_engine_helpers import REPO, Engine, free_port, in_thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-life"), max_position_embeddings=1024)


def test_sigterm_aborts_in_flight_requests_and_exits_zero(model_dir: Path, tmp_path: Path) -> None:
    eng = Engine(model_dir, tmp_path / "engine")
    try:
        assert f"engine listening on http://127.0.0.1:{eng.port}" in eng.log_tail()
        port = free_port()
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                "group_name": "life", "backend": "gloo"}
        t, box = in_thread(lambda: eng.post("/init_weights_update_group", body))
        group = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo", group_name="life")
        t.join(30)
        assert box["out"][1]["success"] is True
        gen_body = {"input_ids": [1, 3], "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
        gen_t, gen = in_thread(lambda: eng.generate(gen_body))
        # a bucket whose broadcast never comes: the engine's receive thread is stuck in the collective
        upd_body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[128]], "group_name": "life",
                    "load_format": "flattened_bucket", "weight_version": "1"}
        upd_t, upd = in_thread(lambda: eng.post("/update_weights_from_distributed", upd_body))
        time.sleep(0.5)
        assert gen_t.is_alive() and upd_t.is_alive()
        t0 = time.monotonic()
        rc = eng.terminate(timeout=15)
        elapsed = time.monotonic() - t0
        gen_t.join(10)
        upd_t.join(10)
    finally:
        eng.kill()
    assert rc == 0, eng.log_tail()
    assert elapsed < 5, f"shutdown took {elapsed:.1f}s"
    meta = gen["out"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and 0 < meta["completion_tokens"] < 1000
    assert upd["out"][0] == 503 and upd["out"][1]["success"] is False
    assert "engine stopped" in eng.log_tail()
    del group


def test_bad_override_exits_2_naming_the_key(model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "producers.engine", "--model", str(model_dir), "--port", "0",
         "--set", "max_running_requests=0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "max_running_requests" in proc.stderr and "at least 1" in proc.stderr
