"""GPU: a weight update over NCCL never stalls decoding (2 GPUs; ``pytest -m gpu``).

The CPU tests cover the receive path with gloo, where there are no CUDA streams.  On a GPU the
engine receives on a side stream; if the receive thread let a NCCL work's ``wait()`` run on the
default stream, every decode kernel queued after it would wait for the transfer, a stall the
CPU tests cannot see.  Here the publisher (this process, GPU 0) posts the update request and
holds its broadcast back for ``DELAY_S``; a long generation on the engine (GPU 1) must keep
decoding all that time, switch version exactly once, and the engine must then hold the
published tensors bit for bit.

    pytest -m gpu tests/test_engine_weights_gpu.py -q
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from consumers.publisher import WeightPublisher
from consumers.transports import BroadcastTransport
from pipeline.tiny import make_tiny_model
from pipeline.weightsync import weights_checksum
from tests.test_engine_helpers import Engine, in_thread, load_reference

pytestmark = pytest.mark.gpu
DELAY_S = 1.0
GENERATION = {"input_ids": [1, 3, 5, 7], "return_logprob": True,
              "sampling_params": {"max_new_tokens": 3000, "temperature": 1.0, "ignore_eos": True}}


class DelayedTransport(BroadcastTransport):
    """Posts the update request at once, starts broadcasting only ``delay_s`` later."""

    delay_s = 0.0

    def _broadcast(self, *args: Any, **kwargs: Any) -> int:
        time.sleep(self.delay_s)
        return super()._broadcast(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (publisher on GPU 0, engine on GPU 1)")
def test_nccl_update_keeps_decoding_while_the_bytes_are_awaited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = make_tiny_model(tmp_path / "model", max_position_embeddings=4096)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    engine = Engine(model_dir, tmp_path / "engine", "--set", 'device="cuda"', startup_timeout=300)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(3)
    reference = dict(load_reference(model_dir).named_parameters())
    first = {k: v.detach().to("cuda:0") for k, v in reference.items()}
    named = {k: (v.detach() + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)).to("cuda:0") for k, v in reference.items()}
    pub = WeightPublisher([engine.base], backend="nccl", bucket_bytes=1 << 20, timeout_s=120)
    try:
        pub.connect()
        (link,) = pub.links
        link.transport.__class__ = DelayedTransport  # the same connected transport, its broadcast held back
        # NCCL sets a communicator up at its first collective, which blocks until both sides
        # arrive: a first update, undelayed, gets that out of the way.
        pub.publish(first, version=1)
        DelayedTransport.delay_s = DELAY_S
        # The same generation once before: the first forward on the GPU loads kernels for a second
        # or more, and a decode step that has to grow the CUDA allocator's pool (cudaMalloc, an
        # implicit device synchronisation) would wait for the pending receive on the side stream.
        # Warmed up, the allocator serves the second run from its cache, as in a steady-state engine.
        engine.generate(GENERATION)
        t, box = in_thread(lambda: engine.generate(GENERATION))
        time.sleep(0.5)
        info = pub.publish(named, version=2)
        t.join(300)
        assert "err" not in box, box
        meta = box["out"]["meta_info"]
        versions, times = meta["output_token_weight_versions"], meta["output_token_times"]
        assert versions == sorted(versions) and set(versions) == {1, 2}, "the update must land mid-generation"
        # decoding went on while the engine waited DELAY_S for the bytes: no gap beyond the swap
        gaps = [b - a for a, b in itertools.pairwise(times)]
        receive_start = info.timings["engine_started_at"]
        during = [x for x in times if receive_start < x < receive_start + DELAY_S]
        story = (f"{len(times)} tokens from {times[0] - receive_start:+.3f} s to {times[-1] - receive_start:+.3f} s "
                 f"around the update request, largest gap {max(gaps):.3f} s at {times[gaps.index(max(gaps))] - receive_start:+.3f} s, "
                 f"{len(during)} tokens in the {DELAY_S} s the bytes were awaited, switch at "
                 f"{times[versions.index(2)] - receive_start:+.3f} s; publish {info.seconds:.3f} s, "
                 f"pause {info.pause_s:.4f} s, engine timings {info.timings}")
        print(story)
        assert max(gaps) < info.pause_s + 0.3, story
        assert len(during) > 20, story
        assert info.timings["engine_receive_s"] >= DELAY_S * 0.8
        assert engine.ok("GET", "/slipstream/weights_checksum")["checksum"] == weights_checksum(named)
        assert engine.version() == 2
    finally:
        pub.close()
        assert engine.terminate() == 0, engine.log_tail()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_weights_checksum_is_the_same_on_cpu_and_cuda() -> None:
    """Trainer and engine may hold the same bytes on different devices (gloo publishes from host
    memory to a GPU engine): the checksum must not depend on where it is computed."""
    g = torch.Generator().manual_seed(5)
    named = {"a": torch.randn(3000, 1000, generator=g).to(torch.bfloat16), "b": torch.randn(17, generator=g),
             "c": torch.randint(0, 255, (11,), generator=g).to(torch.uint8), "big": torch.randn(9_000_000, generator=g)}
    assert weights_checksum(named) == weights_checksum({k: v.to("cuda") for k, v in named.items()})
