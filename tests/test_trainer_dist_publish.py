"""TP=2 and PP=2 trainers publish bit-exact weights to a real embedded engine (torchrun, gloo).

For each layout the worker (2 processes) builds a :class:`consumers.trainer.TrainerRank`, trains one
step, gathers the HF-named state onto rank 0 (``export_hf_state``, a collective) and publishes it
to the engine from a background thread (:class:`consumers.publish_async.AsyncPublisher`) while both
ranks train a second step (the publish is held back 1 s so the step surely runs first).  Then the
engine's ``/slipstream/weights_checksum`` must equal ``pipeline.weightsync.weights_checksum`` of the
gathered tensors of step 1, and after a synchronous publish of step 2, of step 2.  (In these layouts
``export_hf_state`` returns fresh gathered tensors, so this does not probe the snapshot copy itself;
``tests/test_weight_streaming.py`` does.)

    /work/venv/bin/pytest tests/test_trainer_dist_publish.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import torchrun
from tests.test_engine_helpers import Engine
from tests.test_trainer_dist import _groups

LAYOUTS = [("tp2", 2, 1), ("pp2", 1, 2)]

pytestmark = pytest.mark.slow


def _engine_checksum(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{url}/slipstream/weights_checksum", timeout=60) as r:
        return json.loads(r.read())


class SlowStart:
    """Delays each publish by ``delay_s`` so that the next train step surely updates the weights
    (in place) while the publish of the previous version has not read them yet."""

    def __init__(self, pub: object, delay_s: float) -> None:
        self.pub, self.delay_s = pub, delay_s
        self.engine_urls = pub.engine_urls  # type: ignore[attr-defined]

    def publish(self, named: dict, version: int, checksum: bool = True) -> dict:
        import time

        time.sleep(self.delay_s)
        return self.pub.publish(named, version, checksum)  # type: ignore[attr-defined]


def worker(model_dir: str, engine_url: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from consumers.config import TrainerConfig
    from consumers.publish_async import AsyncPublisher
    from consumers.publisher import WeightPublisher
    from consumers.trainer import TrainerRank, init_distributed
    from pipeline.weightsync import weights_checksum

    init_distributed()
    rank = dist.get_rank()
    groups = _groups()
    results: dict[str, dict] = {}
    version = 0
    for name, tp, pp in LAYOUTS:
        cfg = TrainerConfig(tensor_parallel=tp, pipeline_parallel=pp, micro_batch_size=5, seed=7, lr=1e-3)
        trainer = TrainerRank(cfg, model_dir)
        shard = groups[trainer.dp_rank :: trainer.dp_size]
        res: dict = {}
        pub = WeightPublisher([engine_url], bucket_bytes=20_000, timeout_s=60, group_name=f"dist-{name}") if rank == 0 else None
        if pub is not None:
            pub.connect()
        trainer.train_step(shard)
        named = trainer.export_hf_state()
        version += 1
        done: list[int] = []
        background = AsyncPublisher(SlowStart(pub, 1.0), lambda v, info, ctx, done=done: done.append(v), checksum=True) if pub is not None else None
        if background is not None:
            res["expected_1"] = weights_checksum(named)
            res["names"] = len(named)
            background.submit(named, version)
        del named
        trainer.train_step(shard)  # changes the weights while version 1 of this layout streams
        named = trainer.export_hf_state()
        if background is not None and pub is not None:
            background.wait(120)
            res["published_1"] = done == [version]
            res["engine_1"] = _engine_checksum(engine_url)
            res["version_1"] = version
            version += 1
            res["expected_2"] = weights_checksum(named)
            res["differs"] = res["expected_2"] != res["expected_1"]
            info = pub.publish(named, version)
            res["publisher_2"] = info.checksum
            res["engine_2"] = _engine_checksum(engine_url)
            res["version_2"] = version
            pub.close()
        trainer.shutdown()
        results[name] = res
        dist.barrier()
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from pipeline.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("dist-publish")
    model_dir = make_tiny_model(tmp / "tiny")
    engine = Engine(model_dir, tmp / "engine")
    out = tmp / "results.json"
    cmd, env = torchrun(__file__, str(model_dir), engine.base, str(out))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
        if proc.returncode != 0:
            pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}\n"
                        f"engine log:\n{engine.log_tail()}")
        yield json.loads(out.read_text())
    finally:
        engine.terminate()


@pytest.mark.parametrize("layout", [name for name, _, _ in LAYOUTS])
def test_engine_weights_equal_the_gathered_trainer_weights(results: dict, layout: str) -> None:
    r = results[layout]
    assert r["names"] > 10
    assert r["differs"], "the second step must change the weights (else the snapshot check proves nothing)"
    assert r["published_1"]
    assert r["engine_1"]["weight_version"] == str(r["version_1"])
    assert r["engine_1"]["checksum"] == r["expected_1"], "background publish did not deliver step 1 bit for bit"
    assert r["publisher_2"] == r["expected_2"]
    assert r["engine_2"] == {**r["engine_2"], "weight_version": str(r["version_2"]), "checksum": r["expected_2"]}


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
