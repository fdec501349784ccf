"""The decode runner's CUDA-graph path, on CPU: buckets, static buffers, padding rows, fallbacks.

CUDA graphs need a GPU; the logic around them does not.  ``DecodeRunner(emulate=True)`` runs the
same bucketed static-buffer path with "replay" an eager call of the captured function, so these
tests check what a graph would compute: batches padded to a bucket (padding rows write only the
scratch slot), widths rounded up to a bucket, the same logits and the same cache as the exact
eager path, the same tokens from a whole scheduler; and that a failing graph or a failing
compiled kernel turns the fast path off (logged, counted) instead of breaking decoding.

    /work/venv/bin/pytest tests/test_engine_graphs.py -q
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.metrics import new_registry
from pipeline.tiny import make_tiny_model
from producers.engine.batch import GenRequest
from producers.engine.config import EngineConfig
from producers.engine.decode import Scheduler
from producers.engine.graphs import DecodeRunner, batch_buckets, use_compiled_kernels, width_buckets
from producers.engine.kvcache import KVCache, KVShape
from producers.engine.metrics import EngineMetrics
from producers.engine.model import DecoderModel, Kernels
from producers.engine.sampling import SamplingParams
from producers.engine.server import load_model
from tests.test_engine_model import build, pad


def test_buckets() -> None:
    b = batch_buckets(256)
    assert b[:6] == [2, 4, 8, 16, 24, 32] and b[-1] == 256 and all(y - x <= 8 for x, y in itertools.pairwise(b))
    assert batch_buckets(5) == [2, 4, 5] and batch_buckets(1) == [1]
    assert batch_buckets(600)[-3:] == [544, 576, 600]
    w = width_buckets(384)
    assert w == [64, 128, 192, 256, 320, 384]
    w = width_buckets(4096)
    assert w[-1] == 4096 and 512 in w and 1024 in w and len(w) < 30
    assert width_buckets(40) == [40]


def setup(slots: int = 12) -> tuple[DecoderModel, KVCache, EngineMetrics]:
    model = build("qwen3")
    decoder = DecoderModel(model, 96)
    shape = KVShape(len(decoder.layers), decoder.kv_heads, decoder.head_dim, decoder.dtype)
    return decoder, KVCache(shape, slots, 96, decoder.device), EngineMetrics(new_registry("engine"))


def test_emulated_graphs_match_eager_decode_with_padding() -> None:
    decoder, cache, metrics = setup()
    prompts = [[(3 * i + j) % 40 + 1 for j in range(2 + i)] for i in range(9)]
    with torch.inference_mode():
        decoder.prefill(cache, pad(prompts), [len(p) for p in prompts], 0)
        twin = KVCache(cache.shape, cache.slots, cache.max_seq_len, cache.k.device)
        twin.k.copy_(cache.k)
        twin.v.copy_(cache.v)
        eager = DecodeRunner(decoder, cache, metrics, graphs=False)
        graphs = DecodeRunner(decoder, twin, metrics, graphs=True, emulate=True)
        lens = [len(p) for p in prompts]
        for step, b in enumerate([9, 5, 3, 9, 1]):  # padded to 12 (all slots), 8, 4, 12, 2
            toks = [(7 * step + i) % 40 for i in range(b)]
            pos = [lens[i] + step for i in range(b)]
            a = eager.run(toks, pos).float()
            g = graphs.run(toks, pos).float()
            assert g.shape == a.shape == (b, decoder.vocab)
            assert torch.allclose(a, g, atol=1e-5), step
    assert set(graphs._graphs) == {(12, 64), (8, 64), (4, 64), (2, 64)}
    # the real slots hold the same K/V; the padding rows' slots (9-11) were not written (scratch was)
    assert torch.allclose(cache.k[:, :9], twin.k[:, :9], atol=1e-6) and torch.allclose(cache.v[:, :9], twin.v[:, :9], atol=1e-6)
    assert torch.equal(twin.k[:, 9:12], cache.k[:, 9:12]) and torch.equal(twin.v[:, 9:12], cache.v[:, 9:12])


def test_a_failing_graph_falls_back_to_eager_and_is_counted() -> None:
    decoder, cache, metrics = setup()
    with torch.inference_mode():
        decoder.prefill(cache, pad([[1, 2, 3]]), [3], 0)
        want = DecodeRunner(decoder, cache, metrics, graphs=False).run([4], [3]).clone()
        runner = DecodeRunner(decoder, cache, metrics, graphs=True, emulate=True)

        def broken(*_: Any) -> Any:
            raise RuntimeError("operation not permitted when stream is capturing")

        runner._capture = broken  # type: ignore[method-assign]
        got = runner.run([4], [3])
    assert torch.allclose(got, want, atol=1e-6)
    assert runner.graphs_enabled is False
    assert metrics.fallbacks.labels("cuda_graph")._value.get() == 1


@pytest.mark.parametrize("how", ["raises", "wrong"])
def test_compiled_kernels_that_fail_or_disagree_are_not_used(how: str) -> None:
    decoder, cache, metrics = setup()
    eager = decoder.kernels

    def bad_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if how == "raises":
            raise RuntimeError("inductor: no C compiler")
        return x * 3

    assert not use_compiled_kernels(decoder, cache, metrics, Kernels(rms_norm=bad_norm, compiled=True))
    assert decoder.kernels is eager and metrics.fallbacks.labels("compile")._value.get() == 1
    assert use_compiled_kernels(decoder, cache, metrics, Kernels(compiled=True))  # same functions: agree
    assert decoder.kernels.compiled


def test_scheduler_tokens_are_the_same_through_the_graph_path(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", max_position_embeddings=128)

    def run(emulate: bool) -> list[list[int]]:
        cfg = EngineConfig(device="cpu", max_running_requests=6, max_seq_len=128)
        model, device = load_model(str(model_dir), cfg)
        sched = Scheduler(model, cfg, EngineMetrics(new_registry("engine")), device)
        if emulate:
            b = sched.batch
            b.runner = DecodeRunner(b.decoder, b.cache, sched.metrics, graphs=True, emulate=True)
        sched.start()
        try:
            futs = [sched.submit(GenRequest(f"r{i}", [1, 3 + i, 4], SamplingParams(max_new_tokens=10 + 9 * i, ignore_eos=True,
                                                                                  sampling_seed=i), False))
                    for i in range(9)]
            return [f.result(120)["output_ids"] for f in futs]
        finally:
            sched.stop()

    assert run(emulate=True) == run(emulate=False)
