"""GPU benchmark of the Megatron trainer: TrainerRank.train_step vs a plain Megatron-core loop.

What it measures, in one run on one GPU (the lead runs it; not run on CPU):
1. setup: a random Qwen3-shaped model (hidden 1024, 28 layers, 16 heads, 8 kv heads, head_dim 128,
   FFN 3072, vocab 151936, tied embeddings: ~0.6B parameters) saved as a HF checkpoint (bf16);
2. trainer: ``consumers.trainer.TrainerRank.train_step`` (bf16 via ``trainer.megatron.bf16``,
   GRPO + TIS, entropy reported) on synthetic trajectory groups: tokens/s and MFU;
3. plain: the same model config, the same padded microbatches, a bare Megatron-core loop (GPTModel
   with labels -> masked token-mean CE, ``get_forward_backward_func``, Megatron DDP + optimizer,
   bf16): tokens/s and MFU.  ``overhead_pct`` = how much slower the trainer is than the plain loop
   (what our loss, statistics, batching and HF loading cost per step).

FLOPs per token (Megatron/PaLM convention, fwd + bwd = 3 x fwd, causal attention not halved):
``6 * N_matmul + 12 * L * s * (heads * head_dim)`` with ``N_matmul`` the parameters of every
matmul incl. the LM head (embedding lookup excluded) and ``s`` the padded sequence length.
MFU = achieved FLOP/s / ``--peak-tflops`` (default 989: H100 SXM dense bf16).  Tokens counted are
all padded positions in the batch (prompt + response + padding), the work the GPU does.

Every part is in try/except; the JSON (device, date, command, both numbers side by side, errors)
is rewritten after each part, so a crash still leaves partial results.

    python bench/gpu_trainer.py --out bench/results/gpu_trainer.json [--steps 5 --seq-len 1024]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.gpu_trainer")


def qwen3_config() -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16",
    }


def make_model(out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**qwen3_config())).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def n_params() -> int:
    """Parameters of the (tied) model: embedding + per layer (attention, MLP, 2 norms, qk-norms) + final norm."""
    c = qwen3_config()
    h, L, nh, nkv, hd, f, v = (c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"))
    per_layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * f + 2 * h + 2 * hd
    return v * h + L * per_layer + h


def flops_per_token(seq_len: int) -> float:
    c = qwen3_config()
    h, L, nh, nkv, hd, f, v = (c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"))
    per_layer = h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * f  # qkv, proj, gate+up+down
    n_matmul = L * per_layer + h * v  # + LM head
    return 6.0 * n_matmul + 12.0 * L * seq_len * nh * hd


def synthetic_groups(n_groups: int, group_size: int, prompt_len: int, resp_len: int, seed: int = 0) -> list[Any]:
    from schemas.messages import Trajectory, TrajectoryGroup

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(100, 150000, size=prompt_len).astype(np.int32)
        trajs = [
            Trajectory(
                trajectory_id=f"g{g}-{i}", prompt_tokens=prompt,
                response_tokens=rng.integers(100, 150000, size=resp_len).astype(np.int32),
                logprobs=(-rng.random(resp_len) * 3).astype(np.float32), versions=np.zeros(resp_len, np.int32),
                loss_mask=np.ones(resp_len, np.uint8), reward=float(rng.random()),
            )
            for i in range(group_size)
        ]
        groups.append(TrajectoryGroup(f"g{g}", f"p{g}", "bench", 0, g, trajs))
    return groups


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_trainer(model_dir: Path, groups: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    cfg = TrainerConfig(lr=1e-6, micro_batch_size=args.micro_batch_size, megatron={"bf16": True}, seed=1)
    rank = TrainerRank(cfg, model_dir)
    times, last = [], {}
    for i in range(args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        last = rank.train_step(groups)
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"step_seconds": times, "last_stats": last, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    rank.shutdown()
    del rank
    return out


def bench_plain(model_dir: Path, groups: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Bare Megatron-core: GPTModel(labels) -> masked CE, DDP, optimizer; same config and batch."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from consumers import bridge
    from consumers.batching import build_microbatches
    from consumers.config import TrainerConfig
    from consumers.model import build_transformer_config, initialize_parallel, seed_all

    cfg = TrainerConfig(micro_batch_size=args.micro_batch_size, megatron={"bf16": True})
    initialize_parallel(1, 1)
    seed_all(2)
    spec = bridge.load_hf_spec(model_dir)
    tconfig = build_transformer_config(cfg, spec)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gpt = GPTModel(tconfig, **bridge.gpt_model_kwargs(spec)).to(dev)
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), Float16Module(tconfig, gpt))
    tconfig.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0), [model])
    tconfig.grad_scale_func = opt.scale_loss
    mbs = build_microbatches(groups, args.micro_batch_size, True)

    def loss_func(mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        n = mask.sum()
        return (per_token.float() * mask).sum(), n.to(torch.int), {}

    def forward_step(it: Any, m: Any) -> tuple[torch.Tensor, Any]:
        mb = next(it)
        out = m(mb.tokens.to(dev), mb.position_ids.to(dev), None, labels=mb.labels.to(dev))
        return out, partial(loss_func, mb.loss_mask.to(dev))

    times = []
    for i in range(args.warmup + args.steps):
        _sync()
        t0 = time.perf_counter()
        model.train()
        model.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs), micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=False,
        )
        opt.step()
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"step_seconds": times, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU (H100 SXM: 989)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=1024, help="prompt + response tokens per trajectory")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--model-dir", default="", help="reuse a HF checkpoint instead of making one")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "bench": "gpu_trainer", "date": _dt.datetime.now(_dt.UTC).isoformat(), "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "peak_tflops": args.peak_tflops, "errors": {},
    }

    def write() -> None:
        out_path.write_text(json.dumps(res, indent=1, default=str))

    try:
        import megatron.core

        res["megatron_core"] = megatron.core.__version__
    except Exception as e:
        res["errors"]["import"] = repr(e)
    write()
    tokens_per_step = args.groups * args.group_size * (args.seq_len - 1)  # padded positions (input = seq - 1)
    fpt = flops_per_token(args.seq_len - 1)
    res.update({"tokens_per_step": tokens_per_step, "flops_per_token": fpt, "model": qwen3_config()})
    try:
        from consumers.trainer import init_distributed

        init_distributed()
        model_dir = Path(args.model_dir) if args.model_dir else make_model(Path(tempfile.mkdtemp()) / "qwen3-0.6b-random")
        res["model_dir"] = str(model_dir)
        res["n_params"] = n_params()
    except Exception:
        res["errors"]["setup"] = traceback.format_exc()
        write()
        return 1
    groups = synthetic_groups(args.groups, args.group_size, args.prompt_len, args.seq_len - args.prompt_len)
    for name, fn in (("trainer", bench_trainer), ("plain", bench_plain)):
        try:
            torch.cuda.reset_peak_memory_stats()
            r = fn(model_dir, groups, args)
            mean_s = float(np.mean(r["step_seconds"]))
            r["tokens_per_s"] = tokens_per_step / mean_s
            r["tflops"] = r["tokens_per_s"] * fpt / 1e12
            r["mfu"] = r["tflops"] / args.peak_tflops
            res[name] = r
        except Exception:
            res["errors"][name] = traceback.format_exc()
        write()
    if "trainer" in res and "plain" in res:
        res["overhead_pct"] = 100.0 * (res["plain"]["tokens_per_s"] / res["trainer"]["tokens_per_s"] - 1.0)
        res["side_by_side"] = {k: {"trainer": res["trainer"][k], "plain": res["plain"][k]} for k in ("tokens_per_s", "tflops", "mfu", "peak_mem_gib")}
    write()
    print(json.dumps({k: res.get(k) for k in ("device", "side_by_side", "overhead_pct", "errors")}, indent=1, default=str))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
