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

    lr: float = doc("Adam learning rate (constant; no schedule).", default=3e-4)
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
        "Sampling temperature of the producers: the trainer computes log-probs from logits / temperature "
        "so they are comparable with the behaviour log-probs.",
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
        "(a longer sequence travels alone); 0 = split by micro_batch_size only.",
        default=0,
    )
    packing: Literal["none", "block_diagonal"] = doc(
        "'none' = one trajectory per padded row; 'block_diagonal' = several trajectories share a row "
        "(first-fit decreasing up to pack_row_tokens) under a block-diagonal causal attention mask, "
        "micro_batch_size then counts rows. Attention costs O(row^2) per row (explicit mask, "
        "no TransformerEngine needed; CPU and GPU).",
        default="none",
    )
    pack_row_tokens: int = doc(
        "Packing: tokens per packed row at most (a longer trajectory gets a row of its own); "
        "0 = the longest trajectory of the batch (no row longer than the longest padded row).",
        default=0,
    )
    checkpoint_every: int = doc(
        "Save a Megatron distributed checkpoint to RUN_DIR/checkpoints/step-K every N steps (and at exit); 0 = off.",
        default=0,
    )
    resume_from: str = doc(
        "Resume model, optimizer, RNG, step and policy version from 'latest' (RUN_DIR/checkpoints) or a "
        "checkpoint directory; '' = start fresh.",
        default="",
    )
    export_hf_at_end: bool = doc(
        "Write the final weights as a Hugging Face checkpoint (safetensors + config/tokenizer) to RUN_DIR/hf-final.",
        default=True,
    )
    seed: int = doc("Random seed (the same on every rank; CPU init builds full weights then slices).", default=1234)
    compute_entropy: bool = doc(
        "Report the policy's token entropy (one extra no-grad pass over the logits).", default=True
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
        check(self.max_tokens_per_microbatch >= 0, "max_tokens_per_microbatch", "must be >= 0")
        check(
            self.packing in ("none", "block_diagonal"), "packing",
            f"must be 'none' or 'block_diagonal', got {self.packing!r}",
        )
        check(self.pack_row_tokens >= 0, "pack_row_tokens", f"must be >= 0, got {self.pack_row_tokens}")
        check(
            self.max_tokens_per_microbatch == 0 or self.pack_row_tokens <= self.max_tokens_per_microbatch,
            "pack_row_tokens", "must be <= max_tokens_per_microbatch (a row has to fit a microbatch)",
        )
        check(
            self.packing == "none" or not self.megatron.get("masked_softmax_fusion", False), "packing",
            "needs megatron.masked_softmax_fusion = false (the fused causal softmax ignores the packing mask)",
        )
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
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
