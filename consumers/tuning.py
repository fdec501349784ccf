"""GPU defaults of the trainer: the microbatch token budget, activation recompute, DDP and fusions.

What (pure functions, so the policy is tested on CPU; the trainer applies them only with CUDA
and only where the user did not set the key):
- :func:`auto_microbatch_tokens`: ``trainer.max_tokens_per_microbatch = -1`` (auto) on GPU = as
  many padded tokens per microbatch as fit the device after the parameters, gradients and Adam
  states (:func:`state_bytes`), the fused log-prob chunks and a reserve, at
  :func:`activation_bytes_per_token` (an estimate of what one token's forward keeps for the
  backward pass), clamped to [1,024, 32,768] and rounded down to a multiple of 256.  If not even
  2,048 tokens fit, full activation recomputation is turned on (only layer inputs are kept) and
  the budget recomputed: recompute costs ~1/3 more compute, so it is used only where it is needed
  to fit.  On CPU the auto value is 0 (split by ``micro_batch_size``, as before).
- :func:`ddp_defaults`: with CUDA and DP > 1, the distributed optimizer (Adam states sharded over
  DP) and gradient reduce-scatter overlapped with the backward pass (``overlap_grad_reduce``).
  ``overlap_param_gather`` stays off: it defers the parameter all-gather to the next forward, but
  the trainer exports (publishes) the new weights right after every step.
- :func:`transformer_defaults`: with CUDA, Megatron's fused SwiGLU (``bias_activation_fusion``,
  ``torch.compile``d by megatron-core) when :func:`fused_swiglu_works` on this device.

Why estimates: peak memory depends on the allocator, the kernels chosen and the shapes; the GPU
benchmark (``bench/gpu_trainer.py``) prints the estimate next to the measured peak.

How: ``consumers.model.build_trainable_model`` and ``consumers.trainer.TrainerRank`` call these;
``tests/test_tuning.py`` checks the numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

GIB = 1 << 30
MIN_TOKENS, MAX_TOKENS, RECOMPUTE_BELOW = 1024, 32768, 2048


def parameter_count(spec: Any) -> int:
    """Parameters of the whole model (a :class:`consumers.bridge.HFModelSpec`)."""
    h, hd, nh, ng = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    attn = h * (nh + 2 * ng) * hd + nh * hd * h + 2 * h + (2 * hd if spec.qk_norm else 0)
    if spec.num_experts:
        mlp = spec.num_experts * 3 * h * spec.moe_ffn_hidden_size + spec.num_experts * h
    else:
        mlp = 3 * h * spec.ffn_hidden_size
    embed = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return spec.num_layers * (attn + mlp) + embed + h


def state_bytes(n_params: int, bf16: bool, dp: int = 1, distributed_optimizer: bool = False, reference_model: bool = False) -> int:
    """Bytes of parameters, fp32 gradient buffer and Adam states on one rank holding ``n_params``:
    bf16 = 2 (param) + 4 (grad, reduced in fp32) + 4 (fp32 master) + 8 (Adam m, v); fp32 = 4 + 4 + 8.
    The distributed optimizer shards the master copy and Adam states over DP.  A KL reference model
    adds its parameters."""
    param = 2 if bf16 else 4
    opt = (12 if bf16 else 8) / (dp if distributed_optimizer else 1)
    return int(n_params * (param + 4 + opt + (param if reference_model else 0)))


def activation_bytes_per_token(spec: Any, tp: int = 1, bf16: bool = True, fused_swiglu: bool = False, recompute: bool = False) -> float:
    """Bytes one token's forward keeps for the backward pass, summed over layers (PP stages keep
    up to PP microbatches of their L/PP layers in flight, which is the same total): layer norm
    inputs/outputs (4h), q/k-norm inputs, FlashAttention's q, k, v (k and v expanded to all heads),
    output and the projection's input (5 heads x head_dim), the MLP's fc1 output and fc2 input
    (3f + f with the unfused SwiGLU, 2f + f fused); TP splits the head and FFN parts.  With full
    recompute only each layer's input (h) is kept, plus one layer's full set."""
    h, hd, nh, ng = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads
    f = spec.moe_ffn_hidden_size * max(spec.moe_topk, 1) if spec.num_experts else spec.ffn_hidden_size
    elem = 2 if bf16 else 4
    per_layer = 4 * h + ((nh + ng) * hd + 5 * nh * hd + (3 if fused_swiglu else 4) * f) / tp
    if recompute:
        return float(elem * (spec.num_layers * h + per_layer))
    return float(elem * spec.num_layers * per_layer)


def auto_microbatch_tokens(
    spec: Any, total_bytes: int, tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 1, bf16: bool = True,
    distributed_optimizer: bool = False, reference_model: bool = False, logprob_chunk_bytes: int = GIB,
    fused_swiglu: bool = False, reserve_bytes: int = 4 * GIB,
) -> tuple[int, bool, dict[str, float]]:
    """``(tokens per microbatch, full recompute?, the estimate's parts in bytes)`` for a device of
    ``total_bytes`` (see the module docstring)."""
    n = parameter_count(spec)
    if spec.num_experts:  # experts are split over EP, the rest over TP
        experts = spec.num_layers * spec.num_experts * 3 * spec.hidden_size * spec.moe_ffn_hidden_size
        n_rank = (n - experts) // (tp * pp) + experts // (ep * pp)
    else:
        n_rank = n // (tp * pp)
    states = state_bytes(n_rank, bf16, dp, distributed_optimizer, reference_model)
    usable = 0.9 * total_bytes - states - 2.5 * logprob_chunk_bytes - reserve_bytes
    recompute = False
    per_token = 1.25 * activation_bytes_per_token(spec, tp, bf16, fused_swiglu)
    tokens = usable / per_token
    if tokens < RECOMPUTE_BELOW:
        recompute = True
        per_token = 1.25 * activation_bytes_per_token(spec, tp, bf16, fused_swiglu, recompute=True)
        tokens = usable / per_token
    tokens_i = int(min(MAX_TOKENS, max(MIN_TOKENS, tokens))) // 256 * 256
    parts = {"params_on_rank": float(n_rank), "state_bytes": float(states), "usable_bytes": float(usable),
             "activation_bytes_per_token": per_token, "estimated_peak_bytes": float(states + 2.5 * logprob_chunk_bytes + tokens_i * per_token)}
    return tokens_i, recompute, parts


def ddp_defaults(cuda: bool, dp: int) -> dict[str, Any]:
    """Megatron DDP settings slipstream picks (the user's ``trainer.megatron`` keys override them)."""
    out: dict[str, Any] = {"grad_reduce_in_fp32": True, "overlap_grad_reduce": False}
    if cuda and dp > 1:
        out.update(overlap_grad_reduce=True, use_distributed_optimizer=True, overlap_param_gather=False)
    return out


def fused_swiglu_works(device: torch.device) -> bool:
    """Run megatron-core's fused (``torch.compile``d) SwiGLU forward and backward once on a tiny
    tensor: False (and a warning) if it cannot compile here, so the model falls back to the
    unfused form instead of failing at the first step."""
    try:
        from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

        x = torch.randn(4, 1, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        y = bias_swiglu_impl(x, None)
        y.float().sum().backward()
        ref = torch.nn.functional.silu(x.detach().float()[..., :32]) * x.detach().float()[..., 32:]
        return bool(torch.allclose(y.detach().float(), ref, atol=2e-2, rtol=2e-2))
    except Exception as e:  # no compiler / triton on this host: the unfused form is exact too
        log.warning("megatron's fused SwiGLU does not run here (%s: %s); using the unfused form", type(e).__name__, e)
        return False


def transformer_defaults(cuda: bool, device: torch.device | None = None) -> dict[str, Any]:
    """TransformerConfig settings slipstream picks on GPU (the user's keys override them)."""
    if not cuda:
        return {}
    return {"bias_activation_fusion": fused_swiglu_works(device or torch.device("cuda"))}
