"""Qwen3-MoE at TP=2, PP=2, EP=2 and TP2xEP2 on 2 GPUs (NCCL): the CPU test's worker and checks.

Runs ``tests/test_bridge_moe_dist.py``'s worker under ``torchrun --nproc_per_node=2`` on a machine
with at least 2 CUDA devices, and with 4 (TP2xPP2, PP2xEP2, TP2xPP2xEP2, EP4) where there are 4 (Megatron's MoE token dispatcher then runs its real all-to-all over
NCCL).  Needs torch, megatron-core (0.16 or 0.19) and transformers only: no network, no
Transformer Engine (local layer spec).  Skips cleanly without CUDA:

    pytest tests/test_bridge_moe_gpu.py -m gpu

Checks per layout (same as on CPU): logits vs transformers <= 1e-4 (fp32, TF32 off); export after
load bit-exact with HF names/shapes; one train step's loss/grad norm vs the HF reference (rel 1e-5 /
1e-4) and weights after it < 3e-5 from one AdamW step on the HF model; export -> safetensors ->
re-import -> export bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_bridge_moe_dist import LAYOUTS, LAYOUTS_4, check_layout, run_layouts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory):
    return run_layouts(tmp_path_factory.mktemp("moe-gpu"))


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_moe_layout_on_gpus(gpu_results, layout):
    check_layout(gpu_results[layout])


@pytest.fixture(scope="module")
def gpu4_results(tmp_path_factory):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 CUDA devices")
    return run_layouts(tmp_path_factory.mktemp("moe-gpu4"), nproc=4)


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS_4])
def test_moe_layout_on_4_gpus(gpu4_results, layout):
    check_layout(gpu4_results[layout])
