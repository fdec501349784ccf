"""Per-stage weight publishing with PP=2: each stage's leader sends its own layers (torchrun, gloo).

Two trainer ranks (pipeline stages 0 and 1) publish to a real embedded engine process through
:class:`consumers.stage_publish.StagePublisher`: rank 0 drives the engine over HTTP and broadcasts
stage 0's tensors, rank 1 broadcasts stage 1's over a weight group of its own.  For every version:

- the engine's ``/slipstream/weights_checksum`` equals ``weights_checksum`` of the *full* HF state
  gathered the old way (``export_hf_state``, computed here only as the reference), and so does the
  checksum rank 0 combined from both stages' digests;
- rank 0's export never held a stage-1 tensor (its names are disjoint from rank 1's, and together
  they are the full state);
- the engine reports two parts in its reply to the update.

Versions: 1 in the background (:class:`consumers.publish_async.AsyncPublisher`, held back 1 s so
the next train step surely runs meanwhile), 2 synchronously, then 3 with ``engine_kind="sglang"``
(one request per bucket with each part's ``group_name``; the embedded engine serves those routes
too), and 4 (the first, embedded publisher again) after the engine was restarted on the same port
(``resync``: every group re-created, the restarted engine gets the whole model).

    /work/venv/bin/pytest tests/test_stage_publish.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import torchrun
from tests.test_engine_helpers import Engine, free_port
from tests.test_trainer_dist import _groups

pytestmark = pytest.mark.slow

BUCKET = 20_000


def _engine_checksum(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/slipstream/weights_checksum", timeout=60) as r:
        return json.loads(r.read())


class SlowSend:
    """Delays each background send by ``delay_s`` so that the next train step surely changes the
    weights while the previous version is still to be sent (``prepare`` stays a collective)."""

    def __init__(self, pub: Any, delay_s: float) -> None:
        self.pub, self.delay_s = pub, delay_s
        self.engine_urls = pub.engine_urls

    def prepare(self, part: dict, version: int, checksum: bool = True) -> Any:
        return self.pub.prepare(part, version, checksum)

    def send(self, part: dict, prepared: Any) -> dict:
        import time

        time.sleep(self.delay_s)
        return self.pub.send(part, prepared)

    def publish(self, part: dict, version: int, checksum: bool = True) -> dict:
        raise AssertionError("AsyncPublisher must call prepare/send")


def worker(model_dir: str, engine_url: str, engine_port: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from consumers.config import TrainerConfig
    from consumers.publish_async import AsyncPublisher
    from consumers.publisher import WeightPublisher
    from consumers.stage_publish import StagePublisher
    from consumers.trainer import TrainerRank, init_distributed
    from pipeline.weightsync import weights_checksum

    init_distributed()
    rank = dist.get_rank()
    trainer = TrainerRank(TrainerConfig(pipeline_parallel=2, micro_batch_size=5, seed=7, lr=1e-3), model_dir)
    shard = _groups()[trainer.dp_rank :: trainer.dp_size]
    res: dict[str, Any] = {"leader": trainer.is_stage_leader, "stage": trainer.pp_rank}
    engine: Engine | None = None

    def make(kind: str) -> StagePublisher:
        pub = WeightPublisher([engine_url], bucket_bytes=BUCKET, timeout_s=60, group_name=f"stage-{kind}",
                              engine_kind=kind) if rank == 0 else None
        return StagePublisher(pub, trainer.pp_rank, trainer.is_stage_leader, [engine_url], f"stage-{kind}",
                              bucket_bytes=BUCKET, timeout_s=60, resync=True)

    def record(tag: str, part: dict, full: dict, info: dict | None) -> None:
        names: list[Any] = [None] * 2
        dist.all_gather_object(names, sorted(part))
        if rank == 0:
            assert info is not None
            res[tag] = {
                "names": names, "full": list(full), "expected": weights_checksum(full), "info_checksum": info.checksum,
                "engine": _engine_checksum(engine_url), "version": info.version,
                "engine_parts": info.engine_parts, "parts": info.parts,
            }

    sp = make("embedded")
    sp.connect(trainer.export_hf_stage())
    done: list[int] = []
    bg: dict[str, Any] = {}  # the background publish's result (not JSON: kept out of res)
    background = AsyncPublisher(SlowSend(sp, 1.0), lambda v, info, ctx: done.append(v) or bg.setdefault("v1", info))
    # version 1 in the background while step 2 trains
    trainer.train_step(shard)
    part = trainer.export_hf_stage()
    full = trainer.export_hf_state()
    background.submit(part, 1)
    trainer.train_step(shard)  # changes the weights while version 1 is sent
    part2 = trainer.export_hf_stage()
    full2 = trainer.export_hf_state()
    background.wait(120)
    res["done"] = done
    record("v1", part, full, bg.get("v1") if rank == 0 else None)
    # version 2 synchronously
    info = sp.publish(part2, 2)
    record("v2", part2, full2, info if rank == 0 else None)
    # version 3: SGLang-style requests, one per bucket, each with its part's group
    sglang = make("sglang")
    sglang.connect(part2)
    trainer.train_step(shard)
    part3, full3 = trainer.export_hf_stage(), trainer.export_hf_state()
    info = sglang.publish(part3, 3)
    record("v3", part3, full3, info if rank == 0 else None)
    sglang.close()
    # version 4: the engine restarts (same port, initial weights, version 0); the publish resyncs
    if rank == 0:
        engine_dir = Path(out_path).parent / "engine-2"
        res["restart"] = "pending"
        Path(out_path).with_suffix(".restart").write_text("restart")  # the test stops the first engine
        import time

        deadline = time.monotonic() + 60
        while Path(out_path).with_suffix(".restart").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        engine = Engine(Path(model_dir), engine_dir, "--port", engine_port)
        res["restart_version"] = engine.version()
    dist.barrier()
    trainer.train_step(shard)
    part4, full4 = trainer.export_hf_stage(), trainer.export_hf_state()
    info = sp.publish(part4, 4)
    record("v4", part4, full4, info if rank == 0 else None)
    if rank == 0:
        res["rejoins"] = sp.rejoins
    sp.close()
    if engine is not None:
        engine.terminate()
    trainer.shutdown()
    if rank == 0:
        Path(out_path).write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import time

    from pipeline.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("stage-publish")
    model_dir = make_tiny_model(tmp / "tiny")
    port = free_port()
    engine = Engine(model_dir, tmp / "engine", "--port", str(port))
    out = tmp / "results.json"
    cmd, env = torchrun(__file__, str(model_dir), engine.base, str(port), str(out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).parents[1])
    try:
        restart = out.with_suffix(".restart")
        deadline = time.monotonic() + 300
        while proc.poll() is None and not restart.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        engine.terminate()  # the worker then starts a new one on the same port
        restart.unlink(missing_ok=True)
        try:
            stdout, _ = proc.communicate(timeout=max(10.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        if proc.returncode != 0:
            pytest.fail(f"torchrun failed ({proc.returncode}):\n{stdout[-12000:]}\nengine log:\n{engine.log_tail()}")
        yield json.loads(out.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
        engine.kill()


@pytest.mark.parametrize("tag", ["v1", "v2", "v3", "v4"])
def test_engine_has_the_full_model_from_two_stages(results: dict, tag: str) -> None:
    r = results[tag]
    stage0, stage1 = (set(n) for n in r["names"])
    assert stage0 and stage1 and not stage0 & stage1, "rank 0 must not hold stage 1's tensors"
    assert stage0 | stage1 == set(r["full"])
    assert any(".layers.0." in n for n in stage0) and not any(".layers.0." in n for n in stage1)
    assert r["info_checksum"] == r["expected"], "rank 0's combined checksum differs from the full state's"
    assert r["engine"]["weight_version"] == str(r["version"])
    assert r["engine"]["checksum"] == r["expected"], "the engine does not hold the full model bit for bit"
    assert [p["stage"] for p in r["parts"]] == [0, 1]
    if tag != "v3":  # the embedded engine's one-request update reports its parts
        assert r["engine_parts"] == [2]


def test_background_publish_and_versions(results: dict) -> None:
    assert results["done"] == [1]
    assert results["v1"]["expected"] != results["v2"]["expected"], "step 2 must change the weights"


def test_restarted_engine_rejoins_every_stage_group(results: dict) -> None:
    assert results["restart_version"] == 0
    assert results["rejoins"] == 1


if __name__ == "__main__":
    worker(*sys.argv[1:5])
