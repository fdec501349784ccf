"""GPU: the engine's CUDA-graph decode with compiled kernels gives transformers' log-probs, also after
a weight swap (the graphs read the swapped weights).  One GPU; ``pytest -m gpu``.

The CPU tests run the same code eagerly and emulate the graph path (tests/test_engine_graphs.py);
this checks the real capture: static buffers, the memory pool, compiled kernels inside graphs.

    pytest -m gpu tests/test_engine_gpu.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.metrics import new_registry
from pipeline.tiny import make_tiny_model
from producers.engine.batch import GenRequest
from producers.engine.config import EngineConfig
from producers.engine.decode import Scheduler
from producers.engine.metrics import EngineMetrics
from producers.engine.sampling import SamplingParams
from producers.engine.server import load_model
from tests.test_engine_helpers import reference_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def generate(sched: Scheduler, n: int, seed: int) -> list[tuple[list[int], dict]]:
    prompts = [[1] + [3 + (seed + 5 * i + j) % 12 for j in range(1 + i % 7)] for i in range(n)]
    futs = [sched.submit(GenRequest(f"g{seed}-{i}", p, SamplingParams(max_new_tokens=40 + 3 * i, ignore_eos=True,
                                                                       sampling_seed=seed + i), True))
            for i, p in enumerate(prompts)]
    return [(p, f.result(300)) for p, f in zip(prompts, futs, strict=True)]


def worst(ref: torch.nn.Module, outs: list[tuple[list[int], dict]]) -> float:
    w = 0.0
    for prompt, out in outs:
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        want = reference_logprobs(ref, prompt, out["output_ids"], 1.0)
        w = max(w, max(abs(a - b) for a, b in zip(got, want, strict=True)))
    return w


def test_graph_decode_matches_transformers_before_and_after_a_swap(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "m", max_position_embeddings=512)
    cfg = EngineConfig(device="cuda", dtype="float32", max_running_requests=24, max_seq_len=256)
    model, device = load_model(str(model_dir), cfg)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sched = Scheduler(model, cfg, EngineMetrics(new_registry("engine")), device)
    info = sched.decode_info()
    assert info["cuda_graphs"] and info["fused_weights"] and not info["adopts_weight_updates"], info
    sched.start()
    try:
        assert worst(ref, generate(sched, 13, seed=1)) < 1e-3
        info = sched.decode_info()
        assert info["cuda_graphs"] and info["graphs_captured"] >= 3, info  # still on: nothing fell back
        g = torch.Generator().manual_seed(4)
        new = {k: (v.detach().cpu() + 0.05 * torch.randn(v.shape, generator=g)) for k, v in ref.named_parameters()}
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.copy_(new[k])
        sched.swap_weights({k: v.to(device) for k, v in new.items()}, 1).result(60)
        assert worst(ref, generate(sched, 13, seed=2)) < 1e-3
        assert sched.decode_info()["cuda_graphs"]
        mem = sched.memory()
        assert mem["peak_bytes"] <= mem["limit_bytes"]
    finally:
        sched.stop()
