"""Trainer configuration: the ``[trainer]`` table of a slipstream run config.

What: :class:`TrainerConfig`, a validated dataclass (see :mod:`pipeline.configbase`) with the
optimiser, parallelism and loss knobs (weight publishing is ``[weights]``), plus ``megatron``: a pass-through table
whose keys are field names of megatron-core's ``TransformerConfig``, ``OptimizerConfig`` or
``DistributedDataParallelConfig`` (DESIGN §10, as in slime).

Why validate without importing Megatron: importing megatron-core takes ~7 s, and the launcher
validates the whole config (``slipstream run --dry-run``) before any trainer starts.  So the
field names and annotations of those three dataclasses are read from the installed
megatron-core *source* with :mod:`ast` (cached).  The trainer later builds the real dataclasses
with :func:`megatron_overrides`, which converts dtype names ("bfloat16") to ``torch.dtype``.

How:

    from pipeline.configbase import from_dict
    cfg = from_dict(TrainerConfig, {"lr": 1e-4, "megatron": {"recompute_granularity": "full"}})
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.configbase import ConfigError, check, doc

log = logging.getLogger(__name__)

MIB = 1 << 20

#: megatron dataclass -> (source file relative to megatron/core, base classes to include)
_MEGATRON_CLASSES: dict[str, tuple[str, ...]] = {
    "TransformerConfig": ("transformer/transformer_config.py", "model_parallel_config.py:ModelParallelConfig"),
    "OptimizerConfig": ("optimizer/optimizer_config.py",),
    "DistributedDataParallelConfig": ("distributed/distributed_data_parallel_config.py",),
}

#: Megatron fields slipstream sets itself; the value says where to set it instead.
RESERVED_MEGATRON_KEYS: dict[str, str] = {
    **{
        k: "derived from the Hugging Face checkpoint's config.json"
        for k in (
            "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
            "ffn_hidden_size", "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func",
            "add_bias_linear", "add_qkv_bias", "qk_layernorm", "rotary_base",
        )
    },
    "tensor_model_parallel_size": "use trainer.tensor_parallel",
    "pipeline_model_parallel_size": "use trainer.pipeline_parallel",
    "expert_model_parallel_size": "use trainer.expert_parallel",
    "expert_tensor_parallel_size": "slipstream sets 1 for MoE models (experts are not tensor-parallel)",
    "lr": "use trainer.lr",
    "adam_beta1": "use trainer.adam_beta1",
    "adam_beta2": "use trainer.adam_beta2",
    "weight_decay": "use trainer.weight_decay",
    "clip_grad": "use trainer.grad_clip",
    "calculate_per_token_loss": "the GRPO loss is a global token mean; slipstream sets it",
    "variable_seq_lengths": "slipstream sets it (every microbatch has its own padded length)",
    "finalize_model_grads_func": "slipstream sets it",
    "sequence_parallel": "not supported by slipstream's padded [b, s] batches yet",
}


@dataclass
class TrainerConfig:
    """The ``[trainer]`` table."""

    lr: float = doc("Adam learning rate: the peak of the schedule (lr_schedule), or the constant rate.", default=3e-4)
    lr_schedule: Literal["constant", "linear", "cosine", "inverse-square-root"] = doc(
        "Learning-rate schedule (megatron-core's OptimizerParamScheduler): linear warm-up from 0 over "
        "lr_warmup_steps, then 'constant' = lr, 'linear' / 'cosine' = decay to lr_min at lr_decay_steps, "
        "'inverse-square-root' = lr * sqrt(warmup / step). Update k uses the rate at step k; skipped "
        "(non-finite) steps do not advance it; saved and restored with checkpoints.",
        default="constant",
    )
    lr_warmup_steps: int = doc("Linear warm-up steps (0 = none): update k <= W uses lr * k / W.", default=0)
    lr_min: float = doc("Learning rate at the end of a linear/cosine decay (and the floor of inverse-square-root).", default=0.0)
    lr_decay_steps: int = doc("Step at which a linear/cosine decay reaches lr_min; 0 = run.steps.", default=0)
    adam_beta1: float = doc("Adam beta1.", default=0.9)
    adam_beta2: float = doc("Adam beta2.", default=0.99)
    weight_decay: float = doc("Decoupled (AdamW) weight decay.", default=0.0)
    grad_clip: float = doc("Clip the global gradient norm to this value; 0 disables clipping.", default=1.0)
    tensor_parallel: int = doc("Tensor-parallel size (TP).", default=1)
    pipeline_parallel: int = doc(
        "Pipeline-parallel size (PP). Data-parallel size is world_size / (TP * PP).", default=1
    )
    data_parallel: int = doc(
        "Data-parallel size (DP). `slipstream run` starts TP x PP x DP trainer ranks under torchrun.", default=1
    )
    expert_parallel: int = doc(
        "Expert-parallel size (EP), MoE models only (1 for dense): the experts of each layer are split "
        "over EP ranks taken from the TP x DP ranks of a pipeline stage, so EP must divide TP x DP and "
        "the number of experts. Experts are never tensor-parallel (expert TP = 1).",
        default=1,
    )
    temperature: float = doc(
        "Temperature of the trainer's log-probs (logits / temperature), which must be the producers' sampling "
        "temperature to be comparable with the behaviour log-probs. In a run config it follows producer.temperature "
        "(set that one); a different value here is a config error.",
        default=1.0,
    )
    loss: Literal["grpo", "ppo", "gspo"] = doc(
        "Policy loss (consumers/policy_loss.py): 'grpo' = group-normalised advantages, REINFORCE "
        "weighted by the off-policy correction; 'ppo' = clipped ratio (eps_clip_low/high); 'gspo' = "
        "sequence-level length-normalised ratio, clipped per sequence (use loss_agg = 'seq_mean').",
        default="grpo",
    )
    off_policy: Literal["none", "tis", "icepop", "decoupled"] = doc(
        "Off-policy correction against the behaviour log-probs: 'none'; 'tis' = truncated importance "
        "weight min(pi/mu, tis_cap); 'icepop' = weight pi/mu, tokens outside [icepop_low, icepop_high] "
        "masked; 'decoupled' = decoupled PPO (ratio to a proximal policy, weight min(prox/mu, tis_cap)).",
        default="tis",
    )
    proximal: Literal["recompute", "loglinear"] = doc(
        "Decoupled PPO's proximal policy: 'recompute' = the pre-step weights (free: one step per batch); "
        "'loglinear' = log mu + alpha (log pi - log mu), alpha from per-token versions and prox_lag.",
        default="recompute",
    )
    prox_lag: int = doc("'loglinear' proximal: v_prox = v_trainer - prox_lag.", default=1)
    eps_clip_low: float = doc("PPO/GSPO clip: ratio >= 1 - eps_clip_low.", default=0.2)
    eps_clip_high: float = doc("PPO/GSPO clip: ratio <= 1 + eps_clip_high (asymmetric 'clip-higher').", default=0.2)
    icepop_low: float = doc("IcePop: tokens with pi/mu below this are masked.", default=0.5)
    icepop_high: float = doc("IcePop: tokens with pi/mu above this are masked.", default=5.0)
    loss_agg: Literal["token_mean", "seq_mean"] = doc(
        "Aggregation: 'token_mean' over all trained tokens, or 'seq_mean' = mean of per-sequence token means.",
        default="token_mean",
    )
    kl_coef: float = doc(
        "KL penalty to the frozen initial weights (a second model copy is kept); 0 = off (no copy).", default=0.0
    )
    kl_estimator: Literal["k1", "k2", "k3"] = doc("KL(pi || ref) estimator (Schulman's k1, k2, k3).", default="k3")
    entropy_coef: float = doc("Entropy bonus coefficient (loss -= coef * mean entropy); 0 = off.", default=0.0)
    advantage_std_norm: bool = doc(
        "Divide group advantages by the group's reward std (GRPO); false = mean-centring only (Dr. GRPO).",
        default=True,
    )
    tis_cap: float = doc(
        "Truncated importance sampling cap C: token weight min(pi/mu, C) with mu the behaviour policy. "
        "0 turns the correction off (weight 1; the ratio is still reported).",
        default=2.0,
    )
    micro_batch_size: int = doc("Sequences per microbatch (forward/backward chunk).", default=64)
    max_tokens_per_microbatch: int = doc(
        "Token-balanced microbatching: padded tokens (rows x longest row) per microbatch at most this "
        "(a longer sequence travels alone); 0 = split by micro_batch_size only; -1 = auto: on GPU as many "
        "as fit the device's memory (consumers/tuning.py, 1,024-32,768, logged at start), on CPU 0.",
        default=-1,
    )
    packing: Literal["auto", "none", "block_diagonal"] = doc(
        "'none' = one trajectory per padded row; 'block_diagonal' = several trajectories share a row "
        "(first-fit decreasing up to pack_row_tokens), each attending only to itself; micro_batch_size "
        "then counts rows. With layer_spec 'sdpa' on GPU attention runs per trajectory (variable-length "
        "FlashAttention: no cost for sharing a row); on CPU and with 'local' it is a block-diagonal mask "
        "(O(row^2) per row). 'auto' = none (measured on one H200: packed rows trained at 0.81x of padded ones, "
        "bench/results/2026-12-02-trainer-gpu-h200.json).",
        default="auto",
    )
    pack_row_tokens: int = doc(
        "Packing: tokens per packed row at most (a longer trajectory gets a row of its own); "
        "0 = the longest trajectory of the batch (no row longer than the longest padded row).",
        default=0,
    )
    checkpoint_every: int = doc(
        "Save a Megatron distributed checkpoint to RUN_DIR/checkpoints/step-K every N steps and at exit (also when "
        "SIGINT/SIGTERM stops the run); 0 = off.",
        default=0,
    )
    resume_from: str = doc(
        "Resume model, optimizer, RNG, step and policy version from 'latest' (RUN_DIR/checkpoints) or a "
        "checkpoint directory; '' = start fresh. 'slipstream run' with a checkpoint of its own run directory keeps "
        "and replays that directory's queue journal.",
        default="",
    )
    export_hf_at_end: bool = doc(
        "Write the final weights as a Hugging Face checkpoint (safetensors + config/tokenizer) to RUN_DIR/hf-final.",
        default=True,
    )
    export_hf_shard_bytes: int = doc(
        "Largest safetensors shard of the hf-final export; a larger model is split into model-0000k-of-0000n.safetensors "
        "with model.safetensors.index.json (huggingface_hub.save_torch_state_dict; one model.safetensors when it fits).",
        default=5 * 10**9,
    )
    seed: int = doc("Random seed (the same on every rank; CPU init builds full weights then slices).", default=1234)
    compute_entropy: bool = doc(
        "Report the policy's token entropy (free with fused_logprobs; an extra no-grad pass over the logits without).",
        default=True,
    )
    layer_spec: Literal["auto", "local", "te", "sdpa"] = doc(
        "Core attention of the transformer layers (consumers/attention.py): 'sdpa' = PyTorch's "
        "scaled_dot_product_attention (FlashAttention/cuDNN on GPU, causal; packed rows per trajectory), "
        "'te' = Transformer Engine's fused attention (needs TE), 'local' = megatron-core's unfused "
        "DotProductAttention; 'auto' = te where TE imports on a GPU, else sdpa. The choice is logged.",
        default="auto",
    )
    fused_logprobs: bool = doc(
        "Compute token log-probs and entropy from the last hidden states in vocab chunks "
        "(consumers/logprobs.py): the [tokens, vocab] logits are never materialised, and only tokens the "
        "loss uses reach the LM head. false = Megatron's output layer and full fp32 logits.",
        default=True,
    )
    logprob_chunk_bytes: int = doc(
        "fused_logprobs: bytes of fp32 logits of one vocab chunk (tokens x chunk columns x 4) at most; "
        "the transient memory is about 2.5x this.",
        default=1 << 30,
    )
    max_bad_steps: int = doc(
        "A step whose loss or gradient is not finite is skipped (weights unchanged, counted in steps.jsonl "
        "'step_skipped' and slipstream_trainer_skipped_steps_total, trajectory ids logged); this many in a "
        "row fail the run; 0 = never fail.",
        default=5,
    )
    megatron: dict[str, Any] = doc(
        "Pass-through settings: keys are field names of megatron-core's TransformerConfig, OptimizerConfig "
        "or DistributedDataParallelConfig, applied to each that has the field (e.g. bf16 = true, "
        "recompute_granularity = 'full', use_distributed_optimizer = true).",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        check(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.tensor_parallel >= 1, "tensor_parallel", f"must be >= 1, got {self.tensor_parallel}")
        check(self.pipeline_parallel >= 1, "pipeline_parallel", f"must be >= 1, got {self.pipeline_parallel}")
        check(self.data_parallel >= 1, "data_parallel", f"must be >= 1, got {self.data_parallel}")
        check(self.expert_parallel >= 1, "expert_parallel", f"must be >= 1, got {self.expert_parallel}")
        check(
            (self.tensor_parallel * self.data_parallel) % self.expert_parallel == 0, "expert_parallel",
            f"must divide tensor_parallel x data_parallel = {self.tensor_parallel * self.data_parallel}, "
            f"got {self.expert_parallel}",
        )
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.loss in ("grpo", "ppo", "gspo"), "loss", f"must be 'grpo', 'ppo' or 'gspo', got {self.loss!r}")
        check(
            self.off_policy in ("none", "tis", "icepop", "decoupled"), "off_policy",
            f"must be 'none', 'tis', 'icepop' or 'decoupled', got {self.off_policy!r}",
        )
        check(self.proximal in ("recompute", "loglinear"), "proximal", f"must be 'recompute' or 'loglinear', got {self.proximal!r}")
        check(self.prox_lag >= 0, "prox_lag", f"must be >= 0, got {self.prox_lag}")
        check(0 <= self.eps_clip_low < 1, "eps_clip_low", f"must be in [0, 1), got {self.eps_clip_low}")
        check(self.eps_clip_high >= 0, "eps_clip_high", f"must be >= 0, got {self.eps_clip_high}")
        check(0 <= self.icepop_low <= 1 <= self.icepop_high, "icepop_low", "need icepop_low <= 1 <= icepop_high")
        check(self.loss_agg in ("token_mean", "seq_mean"), "loss_agg", f"must be 'token_mean' or 'seq_mean', got {self.loss_agg!r}")
        check(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        check(self.kl_estimator in ("k1", "k2", "k3"), "kl_estimator", f"must be k1, k2 or k3, got {self.kl_estimator!r}")
        check(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        check(self.max_tokens_per_microbatch >= -1, "max_tokens_per_microbatch", "must be >= 0, or -1 (auto)")
        check(
            self.packing in ("auto", "none", "block_diagonal"), "packing",
            f"must be 'auto', 'none' or 'block_diagonal', got {self.packing!r}",
        )
        check(self.pack_row_tokens >= 0, "pack_row_tokens", f"must be >= 0, got {self.pack_row_tokens}")
        check(
            self.max_tokens_per_microbatch <= 0 or self.pack_row_tokens <= self.max_tokens_per_microbatch,
            "pack_row_tokens", "must be <= max_tokens_per_microbatch (a row has to fit a microbatch)",
        )
        check(
            self.packing != "block_diagonal" or not self.megatron.get("masked_softmax_fusion", False), "packing",
            "needs megatron.masked_softmax_fusion = false (the fused causal softmax ignores the packing mask)",
        )
        check(
            self.layer_spec in ("auto", "local", "te", "sdpa"), "layer_spec",
            f"must be 'auto', 'local', 'te' or 'sdpa', got {self.layer_spec!r}",
        )
        check(self.packing != "block_diagonal" or self.layer_spec != "te", "packing",
              "block_diagonal packing needs layer_spec 'sdpa', 'local' or 'auto' (TE's causal kernel ignores the segments)")
        check(self.logprob_chunk_bytes >= 1 << 16, "logprob_chunk_bytes", f"must be >= 65536, got {self.logprob_chunk_bytes}")
        check(self.max_bad_steps >= 0, "max_bad_steps", f"must be >= 0 (0 = never fail), got {self.max_bad_steps}")
        check(
            self.lr_schedule in ("constant", "linear", "cosine", "inverse-square-root"), "lr_schedule",
            f"must be 'constant', 'linear', 'cosine' or 'inverse-square-root', got {self.lr_schedule!r}",
        )
        check(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        check(0 <= self.lr_min <= self.lr, "lr_min", f"must be in [0, lr = {self.lr}], got {self.lr_min}")
        check(self.lr_decay_steps >= 0, "lr_decay_steps", f"must be >= 0 (0 = run.steps), got {self.lr_decay_steps}")
        check(
            self.lr_decay_steps == 0 or self.lr_schedule not in ("linear", "cosine") or self.lr_decay_steps > self.lr_warmup_steps,
            "lr_decay_steps", f"must exceed lr_warmup_steps = {self.lr_warmup_steps}",
        )
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.export_hf_shard_bytes >= 1 << 20, "export_hf_shard_bytes", f"must be >= 1 MiB, got {self.export_hf_shard_bytes}")
        check(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", f"must be 0 (off) or >= 1, got {self.tis_cap}")
        check(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(isinstance(self.megatron, dict), "megatron", "must be a table")
        for key, value in self.megatron.items():
            validate_megatron_key(key, value)


@dataclass
class SFTConfig:
    """The ``[sft]`` table: a supervised warm-up run by the trainer before RL (consumers/sft.py)."""

    data: str = doc(
        "JSONL of demonstrations: {\"prompt\": text or token ids, \"response\": text or token ids} per line.",
        default="",
    )
    steps: int = doc("SFT optimizer steps before RL; 0 = no SFT stage.", default=0)
    lr: float = doc("SFT learning rate; 0 = trainer.lr.", default=0.0)
    batch_size: int = doc("Demonstrations per SFT step (over all data-parallel ranks).", default=32)
    seed: int = doc("Seed of the shuffle that draws SFT batches.", default=0)
    append_eos: bool = doc("Append the model's eos_token_id to text responses.", default=True)

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        check(self.steps == 0 or bool(self.data), "data", "needed when steps > 0")
        check(self.lr >= 0, "lr", f"must be >= 0, got {self.lr}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


# ------------------------------------------------------------------ megatron pass-through


@functools.cache
def megatron_fields() -> dict[str, dict[str, str]]:
    """``{class name: {field: annotation source}}`` for the three pass-through dataclasses, read
    from the installed megatron-core source without importing it."""
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or spec.origin is None:
        raise ConfigError("megatron", "megatron-core is not installed; cannot validate trainer.megatron")
    root = os.path.dirname(spec.origin)
    out: dict[str, dict[str, str]] = {}
    for cls, sources in _MEGATRON_CLASSES.items():
        fields: dict[str, str] = {}
        for src in reversed(sources):  # base classes first, the subclass's annotations win
            path, _, name = src.partition(":")
            fields.update(_class_fields(os.path.join(root, path), name or cls))
        out[cls] = fields
    return out


def _class_fields(path: str, cls: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                st.target.id: ast.unparse(st.annotation)
                for st in node.body
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
            }
    raise ConfigError("megatron", f"class {cls} not found in {path}: unsupported megatron-core version?")


def _matches(value: Any, ann: ast.expr) -> bool | None:
    """Does ``value`` fit the annotation?  None = cannot tell (accept)."""
    if isinstance(ann, ast.Constant) and ann.value is None:
        return value is None
    name = ast.unparse(ann)
    if name == "bool":
        return isinstance(value, bool)
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if name == "str":
        return isinstance(value, str)
    if name == "torch.dtype":
        return isinstance(value, str) and _dtype_or_none(value) is not None
    if isinstance(ann, ast.Subscript):
        head = ast.unparse(ann.value)
        args = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if head == "Optional":
            return value is None or _matches(value, args[0]) is not False
        if head == "Union":
            results = [_matches(value, a) for a in args]
            return any(r is not False for r in results)
        if head == "Literal":
            return value in [a.value for a in args if isinstance(a, ast.Constant)]
        if head in ("List", "list"):
            return isinstance(value, list) and all(_matches(v, args[0]) is not False for v in value)
    return None


def _dtype_or_none(name: str) -> Any:
    import torch

    dt = getattr(torch, name.removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def validate_megatron_key(key: str, value: Any) -> None:
    """Raise ConfigError('megatron.<key>') unless ``key`` is a field of one of the pass-through
    dataclasses, not reserved by slipstream, and ``value`` fits its annotation."""
    full = f"megatron.{key}"
    fields = megatron_fields()
    owners = {cls: f[key] for cls, f in fields.items() if key in f}
    if not owners:
        known = sorted({k for f in fields.values() for k in f})
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            full,
            f"not a field of megatron-core's TransformerConfig, OptimizerConfig or DistributedDataParallelConfig{hint}",
        )
    if key in RESERVED_MEGATRON_KEYS:
        raise ConfigError(full, f"set by slipstream: {RESERVED_MEGATRON_KEYS[key]}")
    for cls, ann_src in owners.items():
        ann = ast.parse(ann_src, mode="eval").body
        if _matches(value, ann) is False:
            raise ConfigError(full, f"{cls}.{key} is annotated {ann_src}; got {type(value).__name__} {value!r}")


def megatron_overrides(megatron: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split the pass-through table per dataclass: ``{"TransformerConfig": {...}, "OptimizerConfig":
    {...}, "DistributedDataParallelConfig": {...}}``, dtype names converted to ``torch.dtype``.
    A key goes to every dataclass that has it (e.g. ``bf16``)."""
    fields = megatron_fields()
    out: dict[str, dict[str, Any]] = {cls: {} for cls in fields}
    for key, value in megatron.items():
        validate_megatron_key(key, value)
        for cls, f in fields.items():
            if key in f:
                conv = _dtype_or_none(value) if "torch.dtype" in f[key] and isinstance(value, str) else value
                out[cls][key] = conv
    return out
