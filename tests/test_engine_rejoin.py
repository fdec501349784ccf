"""A restarted engine is back in service with the current weights before it decodes anything
(consumers/engine_rejoin.py, the engine's ``--start-paused``), against real engine processes.

The launcher restarts a crashed engine on its port with ``--start-paused``: it loads the
checkpoint (version 0) and queues requests but decodes none.  :class:`EngineRejoin` (what the
trainer runs while it waits for a batch) finds it paused and lagging, re-creates the weight group,
sends the last published version and continues it; the request that waited is then generated
with that version only (every token stamped with it), and the engine hashes to the trainer's
weights.  Without a copy of the current weights to send, it stays paused; with per-stage
publishing it is continued once a publish brought it up to date.

    /work/venv/bin/pytest tests/test_engine_rejoin.py -q
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from consumers.engine_rejoin import EngineRejoin
from consumers.publisher import WeightPublisher
from pipeline.tiny import make_tiny_model
from pipeline.weightsync import weights_checksum
from tests.test_engine_helpers import Engine, free_port, in_thread, load_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-rejoin"), max_position_embeddings=256)


def _weights(model_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = load_reference(model_dir)
    return {k: v.detach() + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in ref.named_parameters()}


def _request(max_new_tokens: int = 6) -> dict:
    return {"input_ids": [1, 5, 7, 9, 13], "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 1.0, "ignore_eos": True},
            "return_logprob": True}


@pytest.mark.slow  # starts three engine processes
def test_restarted_engine_serves_only_the_current_weights(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    eng = Engine(model_dir, tmp_path / "a", "--port", str(port))
    other = Engine(model_dir, tmp_path / "b")
    pub = WeightPublisher([eng.base, other.base], bucket_bytes=60_000, timeout_s=30, resync=True, rejoin_timeout_s=60, group_name="rejoin")
    current: dict[str, dict[str, torch.Tensor] | None] = {"w": None}
    rejoin = EngineRejoin(pub, lambda: current["w"], start_version=0, interval_s=0.0)
    try:
        pub.connect()
        assert not rejoin.poll(), "nothing to do while every engine serves the published version"
        v1 = _weights(model_dir, seed=1)
        pub.publish(v1, version=1)
        current["w"] = v1

        eng.kill()
        assert not rejoin.poll(), "an engine that does not answer is waited for, not rejoined"
        eng = Engine(model_dir, tmp_path / "a2", "--port", str(port), "--start-paused")
        assert eng.version() == 0 and eng.ok("GET", "/get_server_info")["paused"] is True
        t, box = in_thread(lambda: eng.generate(_request()))
        time.sleep(1.0)
        assert t.is_alive(), f"a restarted engine decoded before it got the current weights: {box}"
        assert eng.ok("GET", "/get_server_info")["queued_requests"] == 1

        assert rejoin.poll()
        t.join(60)
        assert "err" not in box, box
        out = box["out"]["meta_info"]
        assert out["output_token_weight_versions"] == [1] * 6, "every token comes from the current version"
        for e in (eng, other):
            st = e.ok("GET", "/slipstream/weights_checksum")
            assert (st["weight_version"], st["checksum"]) == ("1", weights_checksum(v1))
        assert eng.ok("GET", "/get_server_info")["paused"] is False
        assert rejoin.rejoined == 1 and not rejoin.poll()
        assert eng.generate(_request(3))["meta_info"]["output_token_weight_versions"] == [1] * 3

        # the next publish reaches both engines through the re-created group
        v2 = _weights(model_dir, seed=2)
        assert pub.publish(v2, version=2).rejoined == 0
        assert {e.ok("GET", "/slipstream/weights_checksum")["checksum"] for e in (eng, other)} == {weights_checksum(v2)}

        # no copy of the current weights to send: it stays paused (and says so), rather than serving v0
        current["w"] = None
        eng.kill()
        eng = Engine(model_dir, tmp_path / "a3", "--port", str(port), "--start-paused")
        assert not rejoin.poll()
        assert eng.ok("GET", "/get_server_info")["paused"] is True and eng.version() == 0

        # per-stage publishing (regroup=False): nothing until a publish brought it up to date, then continued
        staged = EngineRejoin(pub, lambda: None, start_version=0, interval_s=0.0, regroup=False)
        assert not staged.poll() and eng.ok("GET", "/get_server_info")["paused"] is True
        v3 = _weights(model_dir, seed=3)
        assert pub.publish(v3, version=3).rejoined == 1  # the publisher's own resync re-creates the group
        assert eng.ok("GET", "/get_server_info")["paused"] is True, "a publish alone does not continue it"
        assert staged.poll() and eng.ok("GET", "/get_server_info")["paused"] is False
        assert eng.generate(_request(3))["meta_info"]["output_token_weight_versions"] == [3] * 3
    finally:
        pub.close()
        for e in (eng, other):
            e.kill()
