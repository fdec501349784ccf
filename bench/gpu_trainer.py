"""GPU benchmark of the Megatron trainer: slipstream's train step vs plain Megatron-core, Qwen3-0.6B and 4B.

What it measures, in one run on one GPU (the lead runs it; it does not run on CPU), for each model
(random init, bf16, the Qwen3-0.6B and Qwen3-4B architectures: vocabulary 151,936, tied embeddings):
1. ``slipstream``: ``consumers.trainer.TrainerRank.train_step`` -- the code path ``slipstream run``
   uses -- with the trainer's defaults plus ``megatron.bf16 = true``: layer spec ``auto`` (SDPA
   attention: Transformer Engine is not installable on the benchmark machine), fused chunked
   log-probs, token-balanced microbatches sized from the GPU's memory, GRPO + TIS, entropy
   reported.  The build plan (spec, tokens per microbatch, recompute, memory estimate) is recorded.
2. ``plain``: today's baseline in the same run: plain megatron-core on the *local* layer spec
   (unfused ``DotProductAttention``), GPTModel(labels) -> masked token-mean CE (full fp32 logits),
   ``get_forward_backward_func``, Megatron DDP + optimizer, bf16, the same trajectories padded into
   microbatches of ``--plain-micro-batch-size`` rows (4: the previous benchmark's setting).
3. ``packed`` (0.6B only, last): RL lengths vary, so the same slipstream step on trajectories with
   responses of 64..1,024 tokens, packed (variable-length FlashAttention per trajectory) vs padded
   (``packing = "none"``): real (unpadded) tokens per second.
4. ``checks``: the fused log-prob op against ``log_softmax`` of the full logits, and the packed
   variable-length (jagged) attention against the dense block-diagonal mask, on this GPU in bf16.

Batches are RL-shaped: prompt 256 + response 1,024 tokens per trajectory, groups of 8, the same
fixed-seed batch every step (``--groups``: 8 at 0.6B, 4 at 4B).

FLOPs, stated: ``mfu`` is the standard (PaLM / Megatron) count per processed token,
``6 * N + 12 * L * s * (heads * head_dim)``, where N = the parameters of every matmul including
the LM head (embedding lookup excluded), ``s`` = the row length (1,279 input tokens), attention
not halved for causality, over every position of every row (prompt + response), divided by
``--peak-tflops`` = 989 (H100/H200 SXM dense bf16, datasheet).  The same count gives the plain
baseline's MFU, so the two are comparable.  ``mfu_executed`` counts what slipstream actually
computes: the LM head only for the response tokens (+ the fused op's recomputed projection in the
backward, 8·h·V per token), causal attention halved.  ``matmul_tflops`` is an 8192^3 bf16 GEMM
measured in the same run (the achievable ceiling; about 790 on these machines).  Peak memory:
``torch.cuda.max_memory_allocated`` per config.

Robust: every config runs in try/except (an OOM or any error is recorded and the next config
runs; a slipstream OOM is retried once with half the tokens per microbatch); the JSON is rewritten
after every config; ``--budget-s`` skips what would not finish in time.

    python3 bench/gpu_trainer.py                        # -> $OUT/DATE-trainer-gpu.json (default bench/results/)
    python3 bench/gpu_trainer.py --models 0.6b --steps 3 # a quicker look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
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

ARCH: dict[str, dict[str, Any]] = {
    "0.6b": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128},
    "4b": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128},
}
DEFAULT_GROUPS = {"0.6b": 8, "4b": 4}


def qwen3_config(name: str) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, **ARCH[name],
        "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    }


def make_checkpoint(name: str, out: Path) -> Path:
    """A random-init HF checkpoint (config.json + model.safetensors, bf16) written straight from
    tensors made on the GPU (a transformers init of 4B on the CPU would take minutes): N(0, 0.02)
    matrices, unit norms, the names and shapes of transformers' Qwen3ForCausalLM."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = qwen3_config(name)
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in Qwen3ForCausalLM(Qwen3Config(**cfg)).named_parameters()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
        state[k] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def matmul_counts(name: str) -> dict[str, float]:
    c = qwen3_config(name)
    h, L, nh, nkv, hd, f, v = (c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"))
    body = L * (h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * f)  # qkv, proj, gate+up+down
    return {"body": float(body), "lm_head": float(h * v), "attn_width": float(L * nh * hd)}


def flops(name: str, s: int, tokens: int, response_tokens: int) -> dict[str, float]:
    """Standard and executed FLOPs of one step (see the module docstring)."""
    m = matmul_counts(name)
    standard = tokens * (6 * (m["body"] + m["lm_head"]) + 12 * s * m["attn_width"])
    executed = tokens * (6 * m["body"] + 6 * s * m["attn_width"]) + response_tokens * 8 * m["lm_head"]
    return {"standard": standard, "executed": executed}


def synthetic_groups(n_groups: int, group_size: int, prompt_len: int, resp_len: int | tuple[int, int], seed: int = 0) -> list[Any]:
    from schemas.messages import Trajectory, TrajectoryGroup

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        prompt = rng.integers(100, 150000, size=prompt_len).astype(np.int32)
        trajs = []
        for i in range(group_size):
            n = resp_len if isinstance(resp_len, int) else int(rng.integers(resp_len[0], resp_len[1] + 1))
            trajs.append(Trajectory(
                trajectory_id=f"g{g}-{i}", prompt_tokens=prompt, response_tokens=rng.integers(100, 150000, size=n).astype(np.int32),
                logprobs=(-rng.random(n) * 3).astype(np.float32), versions=np.zeros(n, np.int32),
                loss_mask=np.ones(n, np.uint8), reward=float(rng.random()),
            ))
        groups.append(TrajectoryGroup(f"g{g}", f"p{g}", "bench", 0, g, trajs))
    return groups


def _sync() -> None:
    torch.cuda.synchronize()


def _cleanup() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _timed(step: Any, warmup: int, steps: int) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_slipstream(model_dir: Path, groups: list[Any], args: argparse.Namespace, **cfg_kw: Any) -> dict[str, Any]:
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    cfg = TrainerConfig(lr=1e-6, seed=1, megatron={"bf16": True}, **cfg_kw)
    t0 = time.perf_counter()
    rank = TrainerRank(cfg, model_dir, total_steps=100)
    build_s = time.perf_counter() - t0
    plan = rank.plan
    last: dict[str, float] = {}

    def step() -> None:
        nonlocal last
        last = rank.train_step(groups)

    times = _timed(step, args.warmup, args.steps)
    n_mb = len(rank._microbatches(groups, True))
    core = rank._gpt.decoder.layers[0].self_attention.core_attention
    out = {
        "step_seconds": times, "build_seconds": build_s, "last_stats": last, "microbatches": n_mb,
        "plan": {"layer_spec": plan.layer_spec, "packing": plan.packing, "max_tokens_per_microbatch": plan.max_tokens_per_microbatch,
                 "recompute": plan.recompute, "estimate": plan.estimate},
        "bias_activation_fusion": bool(rank.mconfig.bias_activation_fusion),
        "jagged_fallbacks": int(getattr(core, "packed_fallbacks", 0)), "jagged_calls": int(getattr(core, "jagged_calls", 0)),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    rank.shutdown()
    return out


def _slipstream_with_retry(model_dir: Path, groups: list[Any], args: argparse.Namespace, errors: dict[str, str], key: str) -> dict[str, Any]:
    """``bench_slipstream``; after an out-of-memory error, once more with half the auto token
    budget (outside the ``except`` block, so the failed attempt's frames and memory are gone)."""
    oom = False
    try:
        return bench_slipstream(model_dir, groups, args)
    except torch.cuda.OutOfMemoryError:
        errors[key + "/first_try"] = traceback.format_exc(limit=3)
        oom = True
    assert oom
    _cleanup()
    half = max(2048, _auto_tokens(model_dir) // 2)
    r = bench_slipstream(model_dir, groups, args, max_tokens_per_microbatch=half)
    r["retried_with_max_tokens_per_microbatch"] = half
    return r


def _auto_tokens(model_dir: Path) -> int:
    """The token budget the trainer's auto setting picks for this model on this GPU (bf16)."""
    from consumers import bridge, tuning

    spec = bridge.load_hf_spec(model_dir)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return tuning.auto_microbatch_tokens(spec, total, bf16=True)[0]


def bench_plain(model_dir: Path, groups: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Bare megatron-core on the local spec: GPTModel(labels) -> masked CE, DDP, optimizer, bf16."""
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

    cfg = TrainerConfig(megatron={"bf16": True})
    initialize_parallel(1, 1)
    seed_all(2)
    spec = bridge.load_hf_spec(model_dir)
    tconfig = build_transformer_config(cfg, spec)  # no GPU defaults: today's settings
    gpt = GPTModel(tconfig, **bridge.gpt_model_kwargs(spec)).cuda()  # the local spec
    dev = next(gpt.parameters()).device
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), Float16Module(tconfig, gpt))
    tconfig.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0), [model])
    tconfig.grad_scale_func = opt.scale_loss
    mbs = build_microbatches(groups, args.plain_micro_batch_size, True)

    def loss_func(mask: torch.Tensor, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return (per_token.float() * mask).sum(), mask.sum().to(torch.int), {}

    def forward_step(it: Any, m: Any) -> tuple[torch.Tensor, Any]:
        mb = next(it)
        out = m(mb.tokens.to(dev), mb.position_ids.to(dev), None, labels=mb.labels.to(dev))
        return out, partial(loss_func, mb.loss_mask.to(dev))

    def step() -> None:
        model.train()
        model.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs), micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=False,
        )
        opt.step()

    times = _timed(step, args.warmup, args.steps)
    out = {"step_seconds": times, "microbatches": len(mbs), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return out


def gpu_checks(vocab: int = 151936, hidden_size: int = 1024, s: int = 1280) -> dict[str, Any]:
    """The fused log-prob op and the jagged attention path against their references, bf16."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from consumers.attention import PackedLayouts, block_causal_allowed, sdpa_attention_class
    from consumers.logprobs import fused_logprobs
    from consumers.model import initialize_parallel

    out: dict[str, Any] = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 1024, hidden_size, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (2, 1024), device="cuda", generator=g)
    lp, ent = fused_logprobs(hidden, weight, labels, None, temperature=0.9, chunk_bytes=256 << 20)
    z = (hidden @ weight.t()).float() / 0.9
    ref = torch.log_softmax(z, -1)
    rlp = ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    rent = -(ref.exp() * ref).sum(-1)
    out["fused_logprob_max_abs_diff"] = float((lp - rlp).abs().max())
    out["fused_entropy_max_abs_diff"] = float((ent - rent).abs().max())
    del z, ref
    initialize_parallel(1, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=2048, num_attention_heads=16, num_query_groups=8, kv_channels=128,
                            attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16)
    layouts = PackedLayouts()
    attn = sdpa_attention_class(layouts)(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").cuda()
    b = 2
    seg = torch.full((b, s), -1, dtype=torch.int64)
    seg[0, : s // 4], seg[0, s // 4 : (3 * s) // 4], seg[0, (3 * s) // 4 : s - 10] = 0, 1, 2
    seg[1, : s // 2], seg[1, s // 2 :] = 0, 1
    seg_d = seg.cuda()
    layouts.put(seg_d, seg)
    q = torch.randn(s, b, 16, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(s, b, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(s, b, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    jag = attn(q, k, v, seg_d)
    out["jagged_fallbacks"], out["jagged_calls"] = attn.packed_fallbacks, attn.jagged_calls
    kk, vv = (x.repeat_interleave(2, dim=2).permute(1, 2, 0, 3) for x in (k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(q.permute(1, 2, 0, 3), kk, vv, attn_mask=block_causal_allowed(seg_d))
    dense = dense.permute(2, 0, 1, 3).reshape(s, b, -1)
    valid = (seg_d >= 0).t().unsqueeze(-1)
    out["jagged_vs_dense_max_abs_diff"] = float(((jag - dense).float() * valid).abs().max())
    gj = torch.autograd.grad((jag.float() * valid).sum(), (q, k, v))
    gd = torch.autograd.grad((dense.float() * valid).sum(), (q, k, v))
    out["jagged_vs_dense_grad_max_abs_diff"] = max(float((a - c).float().abs().max()) for a, c in zip(gj, gd, strict=True))
    out["grad_scale"] = max(float(c.float().abs().max()) for c in gd)
    return out


def measured_matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="", help="output JSON (default $OUT or bench/results/, DATE-trainer-gpu.json)")
    ap.add_argument("--models", default="0.6b,4b")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200 SXM datasheet: 989)")
    ap.add_argument("--groups", type=int, default=0, help="groups of 8 per step (0 = 8 at 0.6B, 4 at 4B)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=1024)
    ap.add_argument("--plain-micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-packed", action="store_true", help="skip the packed-vs-padded variable-length comparison")
    ap.add_argument("--budget-s", type=float, default=390.0, help="skip configs that would start after this many seconds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t_start = time.monotonic()
    date = _dt.datetime.now(_dt.UTC)
    out_path = Path(args.out) if args.out else Path(os.environ.get("OUT") or REPO / "bench" / "results") / f"{date:%Y-%m-%d}-trainer-gpu.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("bench/gpu_trainer.py needs a CUDA GPU")
        return 2
    from consumers.attention import te_available

    res: dict[str, Any] = {
        "bench": "gpu_trainer", "date": date.isoformat(), "command": " ".join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "peak_tflops": args.peak_tflops,
        "transformer_engine": te_available(),
        "note": "Transformer Engine is not installed on this machine and cannot be (no network; it needs a CUDA build), "
                "so the 'te' spec and Megatron on TE's spec are not measured; layer_spec 'auto' resolves to 'sdpa'.",
        "flops_convention": "mfu: 6*N_matmul(incl. LM head) + 12*L*s*heads*head_dim per processed token (PaLM; causal not halved), "
                            "all row positions; mfu_executed: LM head only on response tokens (8*h*V incl. the fused op's "
                            "recompute), causal attention halved",
        "models": {}, "errors": {},
    }

    def write() -> None:
        out_path.write_text(json.dumps(res, indent=1, default=str))

    try:
        import megatron.core

        res["megatron_core"] = megatron.core.__version__
        from consumers.trainer import init_distributed

        init_distributed()
        res["matmul_tflops"] = measured_matmul_tflops()
    except Exception:
        res["errors"]["setup"] = traceback.format_exc()
        write()
        print(json.dumps(res["errors"], indent=1))
        return 1
    write()
    try:
        res["checks"] = gpu_checks()
    except Exception:
        res["errors"]["checks"] = traceback.format_exc()
    _cleanup()
    write()
    tmp = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    seq = args.prompt_len + args.response_len
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        entry: dict[str, Any] = {"config": qwen3_config(name), "n_matmul": matmul_counts(name)}
        res["models"][name] = entry
        n_groups = args.groups or DEFAULT_GROUPS[name]
        groups = synthetic_groups(n_groups, args.group_size, args.prompt_len, args.response_len)
        tokens = n_groups * args.group_size * (seq - 1)
        resp_tokens = n_groups * args.group_size * args.response_len
        fl = flops(name, seq - 1, tokens, resp_tokens)
        entry.update(tokens_per_step=tokens, response_tokens_per_step=resp_tokens, flops_per_step=fl, trajectories=n_groups * args.group_size)
        try:
            t0 = time.perf_counter()
            model_dir = make_checkpoint(name, tmp / name)
            entry["checkpoint_seconds"] = time.perf_counter() - t0
        except Exception:
            res["errors"][f"{name}/checkpoint"] = traceback.format_exc()
            write()
            continue
        for kind in ("slipstream", "plain"):
            key = f"{name}/{kind}"
            if time.monotonic() - t_start > args.budget_s:
                res["errors"][key] = f"skipped: past --budget-s {args.budget_s}"
                continue
            _cleanup()
            try:
                if kind == "slipstream":
                    r = _slipstream_with_retry(model_dir, groups, args, res["errors"], key)
                else:
                    r = bench_plain(model_dir, groups, args)
                mean_s = float(np.mean(r["step_seconds"]))
                r["tokens_per_s"] = tokens / mean_s
                r["tflops"] = fl["standard"] / mean_s / 1e12
                r["mfu"] = r["tflops"] / args.peak_tflops
                if kind == "slipstream":
                    r["mfu_executed"] = fl["executed"] / mean_s / 1e12 / args.peak_tflops
                r["mfu_vs_measured_matmul"] = r["tflops"] / res["matmul_tflops"]
                entry[kind] = r
            except Exception:
                res["errors"][key] = traceback.format_exc()
            write()
        if "slipstream" in entry and "plain" in entry:
            entry["speedup"] = entry["slipstream"]["tokens_per_s"] / entry["plain"]["tokens_per_s"]
        _cleanup()
        (tmp / name / "model.safetensors").unlink(missing_ok=True)
    if not args.no_packed and "0.6b" in res["models"] and time.monotonic() - t_start < args.budget_s:
        res["packed"] = bench_packed(tmp, args)
    write()
    summary(res)
    print(f"wrote {out_path}")
    return 0 if not res["errors"] else 1


def bench_packed(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """0.6B, responses of 64..1,024 tokens: slipstream packed (jagged attention) vs padded."""
    out: dict[str, Any] = {}
    try:
        model_dir = make_checkpoint("0.6b", tmp / "packed")
        groups = synthetic_groups(8, args.group_size, args.prompt_len, (64, args.response_len), seed=1)
        real = sum(len(t.prompt_tokens) + len(t.response_tokens) - 1 for g in groups for t in g.trajectories)
        out["real_tokens_per_step"] = real
        for packing in ("block_diagonal", "none"):
            _cleanup()
            try:
                r = bench_slipstream(model_dir, groups, args, packing=packing)
                r["real_tokens_per_s"] = real / float(np.mean(r["step_seconds"]))
                out[packing] = r
            except Exception:
                out[f"{packing}_error"] = traceback.format_exc()
        if "block_diagonal" in out and "none" in out:
            out["packed_speedup"] = out["block_diagonal"]["real_tokens_per_s"] / out["none"]["real_tokens_per_s"]
    except Exception:
        out["error"] = traceback.format_exc()
    _cleanup()
    return out


def summary(res: dict[str, Any]) -> None:
    print()
    print(f"{res['device']}  torch {res['torch']}  megatron-core {res.get('megatron_core')}  "
          f"peak {res['peak_tflops']:.0f} TFLOP/s (measured 8192^3 bf16 GEMM: {res.get('matmul_tflops', 0):.0f})")
    print(f"{'model':6} {'path':11} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'MFU exec':>8} {'peak GiB':>9} {'mbs':>4}  plan")
    for name, e in res["models"].items():
        for kind in ("slipstream", "plain"):
            r = e.get(kind)
            if not r:
                print(f"{name:6} {kind:11} {'error / skipped':>9}")
                continue
            plan = r.get("plan", {})
            desc = f"{plan.get('layer_spec', 'local')} tokens/mb={plan.get('max_tokens_per_microbatch', '-')} recompute={plan.get('recompute', 'none')}" if plan else "local spec, labels -> CE"
            print(f"{name:6} {kind:11} {r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% "
                  f"{100 * r.get('mfu_executed', r['mfu']):7.1f}% {r['peak_mem_gib']:9.1f} {r['microbatches']:4d}  {desc}")
        if "speedup" in e:
            print(f"{name:6} slipstream / plain: {e['speedup']:.2f}x tokens/s")
    p = res.get("packed", {})
    if "packed_speedup" in p:
        print(f"0.6b varied lengths: packed {p['block_diagonal']['real_tokens_per_s']:.0f} vs padded "
              f"{p['none']['real_tokens_per_s']:.0f} real tok/s -> {p['packed_speedup']:.2f}x")
    if "checks" in res:
        print("checks:", json.dumps(res["checks"]))
    if res["errors"]:
        print("errors in:", ", ".join(res["errors"]))


if __name__ == "__main__":
    sys.exit(main())
