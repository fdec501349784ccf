"""Build a trainable megatron-core GPTModel (+ DDP + Megatron optimizer) from a HF checkpoint.

What: :func:`build_trainable_model` is the one place that turns a :class:`TrainerConfig` and a
Hugging Face checkpoint directory into ``(model, optimizer, spec, transformer_config)`` on this
rank: TP/PP from the config, weights from the checkpoint through :mod:`consumers.bridge`, Megatron
DDP around it, and Megatron's optimizer (Adam, fp32 master weights) over it.
:func:`initialize_parallel` sets up ``parallel_state`` (DP = world / (TP * PP); for MoE models the
experts are split ``expert_parallel`` ways inside TP x DP, and never TP-sharded: expert TP = 1).

Why these settings (docs/notes/megatron-on-cpu.md):
- ``calculate_per_token_loss=True``: loss functions return a *sum* plus a token count; Megatron
  divides the gradients by the global (all-DP) token count, which is the GRPO token mean.
- ``variable_seq_lengths=True`` (each microbatch is padded to its own length) needs
  ``moe_token_dispatcher_type="alltoall"`` even for dense models.
- ``finalize_model_grads_func=finalize_model_grads``: DP all-reduce, TP all-reduce of the
  replicated qk-norm grads and embedding sync between PP stages.
- ``perform_initialization`` stays True although every weight is then overwritten: with False,
  megatron-core 0.16 also skips tagging TP-sharded params (``tensor_model_parallel``), and the
  grad norm silently drops the shards of TP ranks > 0 (the bridge re-tags them anyway).
- MoE (qwen3_moe): ``expert_model_parallel_size = trainer.expert_parallel``,
  ``expert_tensor_parallel_size = 1``, and :func:`consumers.bridge_moe.adapt_moe_layers` so that the
  MoE block trains at TP > 1 without sequence parallelism (the reasons are in that module).
- CPU only: the :mod:`consumers.shim`, ``use_cpu_initialization=True`` and the same seed on all
  ranks with the no-op CUDA RNG tracker.
- Layer spec (``trainer.layer_spec``, :mod:`consumers.attention`): megatron-core's local spec with
  the core attention swapped for PyTorch SDPA (default), Transformer Engine's, or left unfused.
- ``trainer.fused_logprobs``: the output layer returns hidden states inside the trainer's forward
  (:mod:`consumers.logprobs`), so the loss never holds ``[tokens, vocab]`` logits.
- GPU defaults (:mod:`consumers.tuning`, each overridden by a ``trainer.megatron`` key): fused
  SwiGLU; with DP > 1 the distributed optimizer and overlapped gradient reduce-scatter; the
  microbatch token budget from the device's memory, and full activation recompute only if the
  model does not fit without it.  bf16 (``megatron.bf16 = true``) trains with fp32 master weights
  (Megatron's mixed-precision optimizer).

How: called by :class:`consumers.trainer.TrainerRank`; tests call it directly after
``init_distributed()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from consumers import bridge, bridge_moe, tuning
from consumers.attention import PackedLayouts, build_layer_spec, resolve_layer_spec
from consumers.config import TrainerConfig, megatron_overrides
from consumers.logprobs import enable_hidden_output
from consumers.shim import apply_cpu_shim

log = logging.getLogger(__name__)


@dataclass
class TrainableModel:
    """What :func:`build_trainable_model` returns."""

    model: Any  # megatron DistributedDataParallel around the GPTModel (or Float16Module)
    optimizer: Any  # megatron MegatronOptimizer
    spec: bridge.HFModelSpec
    config: Any  # megatron TransformerConfig
    plan: BuildPlan


@dataclass
class BuildPlan:
    """The resolved choices of a build (logged at start; the trainer uses them)."""

    layer_spec: str  # "local" | "sdpa" | "te"
    packing: str  # "none" | "block_diagonal"
    max_tokens_per_microbatch: int
    recompute: str  # "none" | "full" (auto) | "user" (set by trainer.megatron)
    layouts: PackedLayouts | None = None  # sdpa: where packed microbatches register their segments
    estimate: dict[str, float] | None = None  # the auto token budget's memory estimate (GPU)

    def describe(self) -> str:
        return (f"layer_spec={self.layer_spec} packing={self.packing} max_tokens_per_microbatch={self.max_tokens_per_microbatch} "
                f"recompute={self.recompute}")


def seed_all(seed: int) -> None:
    """The same seed on every rank (CPU init builds full weights on every rank, then slices)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)
    else:
        model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)  # no-op tracker, no CUDA RNG


def initialize_parallel(tp: int, pp: int, ep: int = 1, moe: bool = False) -> None:
    """``parallel_state.initialize_model_parallel`` (idempotent for the same sizes).  ``ep`` is the
    expert-parallel size; ``moe`` sets expert TP to 1 (see :mod:`consumers.bridge_moe`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_parallel*pipeline_parallel = {tp}*{pp}")
    if (world // pp) % ep:
        raise ValueError(f"expert_parallel={ep} does not divide world size / pipeline_parallel = {world // pp}")
    etp = 1 if moe else tp
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if have != (tp, pp, ep, etp):
            raise RuntimeError(f"parallel_state already initialised with TP,PP,EP,ETP={have}, asked for {(tp, pp, ep, etp)}")
        return
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    log.info(
        "parallel state: world %d = TP %d x PP %d x DP %d, EP %d (rank %d: tp %d, pp %d, dp %d, ep %d)",
        world, tp, pp, ps.get_data_parallel_world_size(), ep, dist.get_rank(), ps.get_tensor_model_parallel_rank(),
        ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_expert_model_parallel_rank(),
    )


def megatron_moe_without_te() -> None:
    """megatron-core 0.16's MoE router calls ``te_general_gemm`` in ``moe_utils`` whenever it is
    not None, but only defines it when Transformer Engine imports (NameError otherwise, on CPU
    and on GPU hosts without TE).  Define it as None so the plain torch matmul path runs."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_transformer_config(cfg: TrainerConfig, spec: bridge.HFModelSpec, defaults: dict[str, Any] | None = None) -> Any:
    """Megatron's TransformerConfig: the architecture from the checkpoint, slipstream's settings,
    then ``defaults`` (GPU defaults of :mod:`consumers.tuning`), then the user's ``trainer.megatron``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    over = megatron_overrides(cfg.megatron)["TransformerConfig"]
    cuda = torch.cuda.is_available()
    bf16, fp16 = bool(over.get("bf16")), bool(over.get("fp16"))
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    kwargs: dict[str, Any] = {
        **bridge.transformer_config_kwargs(spec),
        "tensor_model_parallel_size": cfg.tensor_parallel,
        "pipeline_model_parallel_size": cfg.pipeline_parallel,
        "sequence_parallel": False,
        **({"expert_model_parallel_size": cfg.expert_parallel, "expert_tensor_parallel_size": 1} if spec.num_experts else {}),
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "use_cpu_initialization": not cuda,
        "variable_seq_lengths": True,
        "moe_token_dispatcher_type": "alltoall",
        "calculate_per_token_loss": True,
        "batch_p2p_sync": cuda,
        "cross_entropy_loss_fusion": False,
        **(defaults or {}),
    }
    kwargs.update(over)
    return TransformerConfig(**kwargs)


def plan_build(cfg: TrainerConfig, spec: bridge.HFModelSpec, dp: int) -> tuple[BuildPlan, dict[str, Any]]:
    """Resolve the auto settings (layer spec, packing, token budget, recompute) for this machine;
    returns the plan and the TransformerConfig defaults it implies."""
    cuda = torch.cuda.is_available()
    over = megatron_overrides(cfg.megatron)
    want_pack = cfg.packing == "block_diagonal"
    name = resolve_layer_spec(cfg.layer_spec, want_pack)
    # 'auto' = padded rows: on one H200 (0.6B, sdpa, varied lengths) packed rows trained 0.81x as
    # fast as padded ones (bench/results/2026-12-02-trainer-gpu-h200.json, "packed"); on CPU the
    # mask is O(row^2) (bench/packing_cpu.py). block_diagonal stays a choice.
    packing = cfg.packing if cfg.packing != "auto" else "none"
    defaults = tuning.transformer_defaults(cuda)
    bf16 = bool(over["TransformerConfig"].get("bf16"))
    tokens, recompute, estimate = cfg.max_tokens_per_microbatch, "none", None
    user_recompute = "recompute_granularity" in over["TransformerConfig"]
    if tokens < 0:
        tokens = 0
        if cuda:
            dist_opt = bool(over["DistributedDataParallelConfig"].get(
                "use_distributed_optimizer", tuning.ddp_defaults(cuda, dp).get("use_distributed_optimizer", False)))
            fused = bool(over["TransformerConfig"].get("bias_activation_fusion", defaults.get("bias_activation_fusion", False)))
            tokens, full, estimate = tuning.auto_microbatch_tokens(
                spec, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
                tp=cfg.tensor_parallel, pp=cfg.pipeline_parallel, ep=cfg.expert_parallel, dp=dp, bf16=bf16,
                distributed_optimizer=dist_opt, reference_model=cfg.kl_coef > 0,
                logprob_chunk_bytes=cfg.logprob_chunk_bytes, fused_swiglu=fused,
            )
            if full and not user_recompute:
                recompute = "full"
                defaults.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if user_recompute:
        recompute = "user"
    return BuildPlan(name, packing, tokens, recompute, estimate=estimate), defaults


def _use_foreach(optimizer: Any) -> None:
    """torch's Adam picks the slow per-tensor loop for CPU params unless told otherwise; the
    multi-tensor (foreach) path is the same maths and ~3x faster for many small tensors."""
    inner = [getattr(o, "optimizer", None) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    for opt in inner:
        for group in getattr(opt, "param_groups", []):
            if "foreach" in group:
                group["foreach"] = True


def build_trainable_model(cfg: TrainerConfig, hf_path: str | Path) -> TrainableModel:
    """Build this rank's model stage, load the checkpoint, wrap in DDP, make the optimizer.
    ``torch.distributed`` must be initialised; parallel_state is initialised here if needed."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    apply_cpu_shim()
    spec = bridge.load_hf_spec(hf_path)
    bridge.check_parallel_sizes(spec, cfg.tensor_parallel, cfg.pipeline_parallel, cfg.expert_parallel)
    initialize_parallel(cfg.tensor_parallel, cfg.pipeline_parallel, cfg.expert_parallel, moe=bool(spec.num_experts))
    seed_all(cfg.seed)
    if spec.num_experts:
        megatron_moe_without_te()
    dp = ps.get_data_parallel_world_size()
    plan, defaults = plan_build(cfg, spec, dp)
    tconfig = build_transformer_config(cfg, spec, defaults)
    gpt, n = _gpt_stage_from_hf(cfg, spec, tconfig, hf_path, plan)
    bridge.apply_padding_idx(gpt, spec)
    log.info("loaded %s (%d parameters on this rank) from %s", spec.model_type, n, hf_path)
    log.info("trainer build: %s (fused_logprobs=%s, bias_activation_fusion=%s, bf16=%s)", plan.describe(),
             cfg.fused_logprobs, tconfig.bias_activation_fusion, tconfig.bf16)
    module: Any = Float16Module(tconfig, gpt) if (tconfig.bf16 or tconfig.fp16) else gpt

    over = megatron_overrides(cfg.megatron)
    ddp_kwargs: dict[str, Any] = tuning.ddp_defaults(torch.cuda.is_available(), dp)
    ddp_kwargs.update(over["DistributedDataParallelConfig"])
    model = DistributedDataParallel(tconfig, DistributedDataParallelConfig(**ddp_kwargs), module)
    tconfig.finalize_model_grads_func = finalize_model_grads

    opt_kwargs: dict[str, Any] = {
        "optimizer": "adam",
        "lr": cfg.lr,
        "min_lr": cfg.lr_min if cfg.lr_schedule != "constant" else cfg.lr,
        "adam_beta1": cfg.adam_beta1,
        "adam_beta2": cfg.adam_beta2,
        "weight_decay": cfg.weight_decay,
        "clip_grad": cfg.grad_clip,
        "bf16": tconfig.bf16,
        "fp16": tconfig.fp16,
        "params_dtype": tconfig.params_dtype,
        "use_distributed_optimizer": model.ddp_config.use_distributed_optimizer,
    }
    opt_kwargs.update(over["OptimizerConfig"])
    optimizer = get_megatron_optimizer(OptimizerConfig(**opt_kwargs), [model])
    tconfig.grad_scale_func = optimizer.scale_loss
    if not torch.cuda.is_available():
        _use_foreach(optimizer)
    return TrainableModel(model=model, optimizer=optimizer, spec=spec, config=tconfig, plan=plan)


def _gpt_stage_from_hf(
    cfg: TrainerConfig, spec: bridge.HFModelSpec, tconfig: Any, hf_path: str | Path, plan: BuildPlan
) -> tuple[Any, int]:
    """This rank's ``GPTModel`` stage (TP shard, PP stage, on the GPU when there is one) with the
    checkpoint's weights loaded; returns it and the number of parameters loaded.  The layer spec is
    ``plan.layer_spec`` (its packed-layout registry goes to ``plan.layouts``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    kwargs = bridge.gpt_model_kwargs(spec)
    # the KL reference model is built second and shares the trained model's layout registry
    kwargs["transformer_layer_spec"], _, plan.layouts = build_layer_spec(
        kwargs["transformer_layer_spec"], plan.layer_spec, plan.packing == "block_diagonal", plan.layouts
    )
    gpt = GPTModel(
        tconfig,
        **kwargs,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    if cfg.fused_logprobs:
        enable_hidden_output(gpt)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    if spec.num_experts:
        bridge_moe.adapt_moe_layers(gpt)  # TP > 1 without sequence parallelism
    hf_state = bridge.open_hf_checkpoint(hf_path)  # lazy: this rank reads only its own TP slices
    n = bridge.load_hf_into_megatron(gpt, hf_state, ps.get_tensor_model_parallel_rank(), cfg.tensor_parallel, spec)
    return gpt, n


def build_reference_model(cfg: TrainerConfig, hf_path: str | Path, tconfig: Any, plan: BuildPlan) -> Any:
    """A frozen copy of the initial weights (the KL reference): this rank's GPTModel stage loaded
    from the same checkpoint, in eval mode, no gradients, no optimizer.  Same TP/PP layout, layer
    spec and TransformerConfig as the trained model (parallel_state must be initialised)."""
    from megatron.core.transformer.module import Float16Module

    gpt, _ = _gpt_stage_from_hf(cfg, bridge.load_hf_spec(hf_path), tconfig, hf_path, plan)
    module: Any = Float16Module(tconfig, gpt) if (tconfig.bf16 or tconfig.fp16) else gpt
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    log.info("built the frozen KL reference model from %s", hf_path)
    return module
