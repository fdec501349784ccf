"""GPU defaults of the trainer (consumers/tuning.py) and the build plan that applies them.

- parameter counts of the Qwen3-0.6B and Qwen3-4B architectures (596,049,920 and 4,022,468,096,
  the published sizes) and the closed-form state/activation bytes;
- the auto token budget: the H200 figures (32,768 tokens at 0.6B, 8,192 at 4B, no recompute), the
  clamp, and full recompute switched on only when 2,048 tokens would not fit;
- DDP defaults: nothing changes on CPU or at DP = 1; with CUDA and DP > 1 the distributed
  optimizer and overlapped grad reduce, never a deferred param all-gather;
- the build plan on a GPU host (CUDA faked: this machine has none): auto packing, the token
  budget from the device's memory, recompute in the TransformerConfig defaults, user keys win;
- the probe of the jagged attention kernel says no on CPU (the kernel is CUDA only);
- DP = 2 under torchrun (slow): the GPU DDP defaults (distributed optimizer + overlapped grad
  reduce), forced on CPU/gloo, train the same step as the plain defaults.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from consumers import tuning
from consumers.bridge import hf_model_spec
from tests.helpers import torchrun

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

H200 = 143771 * 2**20  # bytes, as nvidia-smi reports the card


def _spec(name: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.gpu_trainer import qwen3_config

    return hf_model_spec(qwen3_config(name))


def test_parameter_counts_and_bytes():
    assert tuning.parameter_count(_spec("0.6b")) == 596_049_920
    assert tuning.parameter_count(_spec("4b")) == 4_022_468_096
    assert tuning.state_bytes(1000, bf16=True) == 18_000 and tuning.state_bytes(1000, bf16=False) == 16_000
    assert tuning.state_bytes(1000, bf16=True, dp=4, distributed_optimizer=True) == 1000 * (2 + 4 + 3)
    s = _spec("0.6b")  # per layer: 4h + (np+ng)hd + 5 np hd + 4f elements of 2 bytes, 28 layers
    want = 2 * 28 * (4 * 1024 + 24 * 128 + 5 * 16 * 128 + 4 * 3072)
    assert tuning.activation_bytes_per_token(s) == want
    assert tuning.activation_bytes_per_token(s, recompute=True) == 2 * (28 * 1024 + want / 56)


def test_auto_tokens_on_h200_and_recompute_only_when_needed():
    t06, rc06, est = tuning.auto_microbatch_tokens(_spec("0.6b"), H200)
    t4, rc4, est4 = tuning.auto_microbatch_tokens(_spec("4b"), H200)
    assert (t06, rc06) == (32768, False) and (t4, rc4) == (8192, False)
    assert est4["estimated_peak_bytes"] < 0.95 * H200 and t4 % 256 == 0
    # a 4B model on a 96 GB card: 2,048 tokens do not fit without recompute
    t, rc, est = tuning.auto_microbatch_tokens(_spec("4b"), 96 * 2**30)
    assert rc and t >= 1024 and est["activation_bytes_per_token"] < 0.1 * tuning.activation_bytes_per_token(_spec("4b"))
    # the distributed optimizer over 8 ranks frees the room: no recompute needed
    t8, rc8, _ = tuning.auto_microbatch_tokens(_spec("4b"), 96 * 2**30, dp=8, distributed_optimizer=True)
    assert not rc8 and t8 >= 4096


def test_ddp_defaults():
    assert tuning.ddp_defaults(cuda=False, dp=4) == {"grad_reduce_in_fp32": True, "overlap_grad_reduce": False}
    assert tuning.ddp_defaults(cuda=True, dp=1) == {"grad_reduce_in_fp32": True, "overlap_grad_reduce": False}
    gpu = tuning.ddp_defaults(cuda=True, dp=2)
    assert gpu["use_distributed_optimizer"] and gpu["overlap_grad_reduce"] and gpu["overlap_param_gather"] is False
    assert tuning.transformer_defaults(cuda=False) == {}


def test_build_plan_on_a_gpu_host(monkeypatch):
    from consumers import model as model_mod
    from consumers.config import TrainerConfig

    monkeypatch.setattr(model_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_mod.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(model_mod.torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=H200))
    monkeypatch.setattr(tuning, "fused_swiglu_works", lambda _dev: True)
    plan, defaults = model_mod.plan_build(TrainerConfig(megatron={"bf16": True}), _spec("4b"), dp=1)
    # packing 'auto' = none: packed rows measured 0.81x of padded on an H200 (2026-12-02)
    assert (plan.layer_spec, plan.packing, plan.recompute) == ("sdpa", "none", "none")
    fused_tokens = tuning.auto_microbatch_tokens(_spec("4b"), H200, fused_swiglu=True)[0]
    assert plan.max_tokens_per_microbatch == fused_tokens and defaults == {"bias_activation_fusion": True}
    monkeypatch.setattr(model_mod.torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=90 * 2**30))
    plan, defaults = model_mod.plan_build(TrainerConfig(megatron={"bf16": True}), _spec("4b"), dp=1)
    assert plan.recompute == "full" and defaults["recompute_granularity"] == "full"
    user = TrainerConfig(max_tokens_per_microbatch=4096, packing="none", megatron={"bf16": True, "recompute_granularity": "selective"})
    plan, defaults = model_mod.plan_build(user, _spec("4b"), dp=1)
    assert (plan.max_tokens_per_microbatch, plan.packing, plan.recompute) == (4096, "none", "user")
    assert "recompute_granularity" not in defaults


def test_jagged_probe_says_no_on_cpu():
    from tests.test_attention import _attention_module, _qkv

    attn, _ = _attention_module()
    q, _, _ = _qkv(8, 1)
    assert attn._probe_jagged(q.float()) is False  # PyTorch's jagged causal kernel is CUDA only


# ------------------------------------------------------------------ DP = 2


def worker(model_dir: str, out_path: str) -> None:
    import torch.distributed as dist

    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank, init_distributed
    from tests.test_trainer_dist import _groups

    torch.set_num_threads(1)
    init_distributed()
    res = {}
    groups = _groups()
    for name, megatron in (("plain", {}), ("gpu_defaults", {k: v for k, v in tuning.ddp_defaults(True, 2).items()})):
        rank = TrainerRank(TrainerConfig(seed=7, micro_batch_size=3, megatron=megatron), model_dir)
        st = rank.train_step(groups[rank.dp_rank :: rank.dp_size])
        st2 = rank.train_step(groups[::-1][rank.dp_rank :: rank.dp_size])
        w = rank.export_hf_state()
        res[name] = {"loss": st["loss"], "grad_norm": st["grad_norm"], "loss2": st2["loss"], "grad_norm2": st2["grad_norm"],
                     "dist_opt": bool(rank.model.ddp_config.use_distributed_optimizer),
                     "overlap": bool(rank.model.ddp_config.overlap_grad_reduce)}
        if dist.get_rank() == 0:
            res[name]["weights"] = {k: v.double().sum().item() for k, v in w.items()}
        rank.shutdown()
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_gpu_ddp_defaults_train_the_same_on_dp2(tmp_path):
    from pipeline.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m")
    out = tmp_path / "dp2.json"
    cmd, env = torchrun(__file__, str(model_dir), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(out.read_text())
    assert r["gpu_defaults"]["dist_opt"] and r["gpu_defaults"]["overlap"] and not r["plain"]["dist_opt"]
    for k in ("loss", "grad_norm", "loss2", "grad_norm2"):
        assert r["gpu_defaults"][k] == pytest.approx(r["plain"][k], rel=1e-5), k
    for k, v in r["plain"]["weights"].items():
        assert r["gpu_defaults"]["weights"][k] == pytest.approx(v, rel=1e-6, abs=1e-6), k


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
