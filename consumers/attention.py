"""Core attention for Megatron's GPT layers on PyTorch's fused kernels, and the layer-spec choice.

What:
- :class:`SDPAttention`: a drop-in for megatron-core's local ``DotProductAttention`` (same
  constructor, same ``[s, b, heads, head_dim]`` in / ``[s, b, hidden]`` out) whose maths is
  ``torch.nn.functional.scaled_dot_product_attention``: FlashAttention-2 / cuDNN / memory-efficient
  kernels on GPU (bf16/fp16), the fused CPU kernel on CPU.  No ``[b, heads, s, s]`` scores tensor,
  no fp32 softmax copy.  Causal by default (``attention_mask is None``).
- Packed rows (``trainer.packing = "block_diagonal"``): the trainer passes the microbatch's
  ``segment_ids`` (int64 ``[b, s]``, -1 = padding) where Megatron passes an attention mask; a token
  attends to the earlier tokens of its own segment only.  On GPU every segment becomes one sequence
  of a jagged (nested) tensor and SDPA runs FlashAttention's variable-length kernel over them
  (``cu_seqlens`` from :class:`PackedLayouts`, built on the CPU by the trainer: no device sync),
  so attention costs ``sum L_i^2``, not ``row^2``.  On CPU (the jagged causal kernel is CUDA
  only), or when the jagged call is refused, SDPA gets the equivalent boolean block-diagonal
  causal mask.  A Megatron bool mask (True = masked) is also accepted.
- :func:`build_layer_spec`: ``trainer.layer_spec`` -> the ``transformer_layer_spec`` for
  ``GPTModel``: ``"local"`` = megatron-core's local spec as it is (unfused ``DotProductAttention``,
  today's baseline); ``"sdpa"`` = the same spec with :class:`SDPAttention` as core attention;
  ``"te"`` = the same spec with Transformer Engine's ``TEDotProductAttention`` (fused attention)
  when TE imports; ``"auto"`` = te where TE imports and CUDA is present, else sdpa.  Only the core
  attention changes, so parameter names and shapes, the bridge and checkpoints are untouched.

Why not THD / ``PackedSeqParams``: megatron-core routes those through RoPE and TE's attention; the
local modules assert they are absent.  The segment-id carrier keeps Megatron's code path as it is
(the mask argument is only handed down to the core attention, also under activation recompute).

How: :func:`consumers.model.build_trainable_model` calls :func:`build_layer_spec` and logs the
choice; ``tests/test_attention.py`` checks logits against the local spec (dense, MoE, TP = 1 and 2,
PP = 2), that packed rows do not attend across documents, and the jagged path's plumbing.
"""

from __future__ import annotations

import importlib.util
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LAYER_SPECS = ("auto", "local", "te", "sdpa")


# ------------------------------------------------------------------ packed layouts


@dataclass(frozen=True)
class PackedLayout:
    """Segments of one packed microbatch in flattened ``[b * s]`` token order."""

    offsets: torch.Tensor  # int64 [n_segments + 1], on the compute device
    max_len: int
    min_len: int


def segment_offsets(segment_ids: np.ndarray | torch.Tensor) -> tuple[np.ndarray, int, int]:
    """``(offsets, max_len, min_len)`` of the runs of equal segment id in each row of ``[b, s]``
    segment ids, flattened row by row (every row starts a new run; a row's padding tail, id -1, is a
    run of its own, so the runs cover every token)."""
    seg = np.asarray(segment_ids.cpu() if isinstance(segment_ids, torch.Tensor) else segment_ids)
    b, s = seg.shape
    flat = seg.reshape(-1)
    start = np.zeros(b * s, bool)
    start[::s] = True
    start[1:] |= flat[1:] != flat[:-1]
    offsets = np.append(np.flatnonzero(start), b * s).astype(np.int64)
    lengths = np.diff(offsets)
    return offsets, int(lengths.max()), int(lengths.min())


class PackedLayouts:
    """The segment layouts of the packed microbatches in flight, keyed by their segment-id tensor
    (the object the trainer passes as the attention mask), shared by every :class:`SDPAttention` of
    one model.  Entries die with their tensor (weak references), so a recomputed forward (activation
    recompute, same tensor) finds its layout and nothing accumulates."""

    def __init__(self) -> None:
        # id(tensor) -> (weak reference, layout); tensors compare elementwise, so no WeakKeyDictionary
        self._by_id: dict[int, tuple[weakref.ref[torch.Tensor], PackedLayout]] = {}
        self.jagged_ok: dict[tuple[Any, ...], bool] = {}  # (device, dtype, heads, dim) -> the probe's verdict

    def put(self, segment_ids: torch.Tensor, host_segment_ids: np.ndarray | torch.Tensor | None = None) -> PackedLayout:
        """Record the layout of ``segment_ids`` (computed from ``host_segment_ids``, its CPU copy,
        when given: no device sync); forgets the layouts of tensors that no longer exist."""
        for key in [k for k, (ref, _) in self._by_id.items() if ref() is None]:
            del self._by_id[key]
        offsets, mx, mn = segment_offsets(segment_ids if host_segment_ids is None else host_segment_ids)
        layout = PackedLayout(torch.from_numpy(offsets).to(segment_ids.device, non_blocking=True), mx, mn)
        self._by_id[id(segment_ids)] = (weakref.ref(segment_ids), layout)
        return layout

    def get(self, segment_ids: torch.Tensor) -> PackedLayout | None:
        entry = self._by_id.get(id(segment_ids))
        return entry[1] if entry is not None and entry[0]() is segment_ids else None

    def __len__(self) -> int:
        return sum(1 for ref, _ in self._by_id.values() if ref() is not None)


def block_causal_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """SDPA's boolean mask for packed rows: ``[b, 1, s, s]``, True = may attend (same segment and
    not in the future).  The complement of :func:`consumers.batching.block_causal_mask`."""
    s = segment_ids.shape[-1]
    causal = torch.ones((s, s), dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


# ------------------------------------------------------------------ the module


def _dot_product_attention_cls() -> type:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


class SDPAttention:
    """The core attention of the module docstring, as a mixin over megatron-core's
    ``DotProductAttention`` (so its constructor, checks and attributes stay Megatron's); build the
    concrete class with :func:`sdpa_attention_class`."""

    layouts: PackedLayouts | None = None  # set per model by build_layer_spec (a bound subclass)

    def _init_sdpa(self) -> None:
        cfg = self.config  # type: ignore[attr-defined]
        if getattr(cfg, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"trainer.layer_spec='sdpa' does not support megatron.softmax_type={cfg.softmax_type!r}")
        if getattr(cfg, "window_size", None) is not None:
            raise ValueError("trainer.layer_spec='sdpa' does not support sliding-window attention (megatron.window_size)")
        # the unfused path divides by layer_number in the GEMM and multiplies it back in the softmax
        coeff = self.layer_number if cfg.apply_query_key_layer_scaling else 1  # type: ignore[attr-defined]
        self.sdpa_scale = float(self.softmax_scale) * coeff  # type: ignore[attr-defined]
        self.packed_fallbacks = 0  # jagged calls refused by SDPA (then the dense mask ran)
        self.jagged_calls = 0  # packed microbatches that ran the variable-length kernel

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Any = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention takes packed rows as segment ids, not PackedSeqParams")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        sq, b, heads, dim = query.shape
        drop = float(self.attention_dropout.p) if self.training else 0.0  # type: ignore[attr-defined]
        with self._dropout_rng(drop):
            if attention_mask is not None and not attention_mask.is_floating_point() and attention_mask.dtype != torch.bool:
                out = self._packed(query, key, value, attention_mask, drop)
                if out is not None:
                    return out
                allowed: torch.Tensor | None = block_causal_allowed(attention_mask)
            else:
                allowed = None if attention_mask is None else ~attention_mask
            q, k, v = (x.permute(1, 2, 0, 3) for x in self._expand_kv(query, key, value))  # [b, heads, s, dim]
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=drop, is_causal=allowed is None, scale=self.sdpa_scale
            )
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _expand_kv(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """GQA: repeat each key/value head for its query heads (dim 2 of ``[s, b, groups, dim]``)."""
        rep = query.shape[2] // key.shape[2]
        if rep > 1:
            key, value = key.repeat_interleave(rep, dim=2), value.repeat_interleave(rep, dim=2)
        return query, key, value

    def _dropout_rng(self, drop: float) -> Any:
        import contextlib

        if drop == 0.0 or self.config.sequence_parallel:  # type: ignore[attr-defined]
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()

    def _packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_ids: torch.Tensor,
                drop: float) -> torch.Tensor | None:
        """Variable-length FlashAttention over the segments (CUDA), or None: use the dense mask."""
        if not query.is_cuda or self.layouts is None:
            return None
        key_ = (query.device, query.dtype, query.shape[2], query.shape[3])
        if key_ not in self.layouts.jagged_ok:
            self.layouts.jagged_ok[key_] = self._probe_jagged(query)
        if not self.layouts.jagged_ok[key_]:
            return None
        layout = self.layouts.get(segment_ids) or self.layouts.put(segment_ids)
        try:
            out = self.jagged_attention(query, key, value, layout, drop, causal=True)
            self.jagged_calls += 1
            return out
        except RuntimeError as e:  # no kernel for this dtype / head size: the dense mask is exact too
            self.packed_fallbacks += 1
            if self.packed_fallbacks == 1:
                log.warning("SDPA refused the variable-length (jagged) call (%s); packed rows use the dense block mask", e)
            return None

    def _probe_jagged(self, like: torch.Tensor) -> bool:
        """Run the jagged path forward and backward once on a tiny problem of ``like``'s device,
        dtype and head shape and compare it with the dense mask: False (and one warning) if
        anything fails, so a missing kernel shows up here and not in the middle of a backward."""
        heads, dim = like.shape[2], like.shape[3]
        seg = torch.tensor([[0] * 5 + [1] * 11], device=like.device)
        try:
            with torch.enable_grad():
                g = torch.Generator(device=like.device).manual_seed(0)
                q, k, v = (torch.randn(16, 1, heads, dim, device=like.device, generator=g).to(like.dtype).requires_grad_()
                           for _ in range(3))
                layout = PackedLayout(torch.tensor([0, 5, 16], device=like.device), 11, 5)
                out = self.jagged_attention(q, k, v, layout)
                (grad,) = torch.autograd.grad(out.float().sum(), (q,))
                allowed = block_causal_allowed(seg)
                ref = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), attn_mask=allowed,
                                                     scale=self.sdpa_scale).permute(2, 0, 1, 3).reshape(16, 1, heads * dim)
                (ref_grad,) = torch.autograd.grad(ref.float().sum(), (q,))
            tol = 0.05 if like.dtype in (torch.bfloat16, torch.float16) else 1e-4
            ok = bool(torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)
                      and torch.allclose(grad.float(), ref_grad.float(), atol=tol * 10, rtol=tol * 10))
            if not ok:
                log.warning("the jagged attention probe disagrees with the dense mask; packed rows use the dense mask")
            return ok
        except Exception as e:  # no variable-length kernel here: the dense mask is exact too
            log.warning("variable-length (jagged) SDPA does not run here (%s: %s); packed rows use the dense block mask",
                        type(e).__name__, e)
            return False

    def jagged_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                         drop: float = 0.0, causal: bool = True) -> torch.Tensor:
        """Attention within each segment of ``layout`` (``[s, b, heads, dim]`` in, ``[s, b, hidden]``
        out) through a jagged nested tensor: one sequence per segment.  ``causal=False`` exists for
        the CPU test of this plumbing (the jagged causal kernel is CUDA only)."""
        sq, b, heads, dim = query.shape

        def jag(x: torch.Tensor) -> torch.Tensor:
            values = x.transpose(0, 1).reshape(b * sq, heads, dim)  # token-major, rows back to back
            nt = torch.nested.nested_tensor_from_jagged(
                values, layout.offsets, min_seqlen=layout.min_len, max_seqlen=layout.max_len
            )
            return nt.transpose(1, 2)  # [segments, heads, (len), dim]

        q, k, v = (jag(x) for x in self._expand_kv(query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal, scale=self.sdpa_scale)
        flat = out.transpose(1, 2).values()  # [b * s, heads, dim]
        return flat.reshape(b, sq, heads * dim).transpose(0, 1).contiguous()


def sdpa_attention_class(layouts: PackedLayouts | None = None) -> type:
    """A ``DotProductAttention`` subclass running :class:`SDPAttention`'s forward, bound to
    ``layouts`` (one class per model: no module-level state)."""
    base = _dot_product_attention_cls()

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self._init_sdpa()

    return type("SDPAttention", (SDPAttention, base), {"__init__": __init__, "layouts": layouts})


# ------------------------------------------------------------------ spec choice


def te_available() -> bool:
    """Transformer Engine and megatron-core's TE extension import (needs CUDA)."""
    if importlib.util.find_spec("transformer_engine") is None or not torch.cuda.is_available():
        return False
    try:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention  # noqa: F401
    except Exception as e:  # a broken TE install is "not available", said once
        log.warning("transformer_engine is installed but megatron-core's TE extension does not import: %s", e)
        return False
    return True


def resolve_layer_spec(choice: str, packing: bool = False) -> str:
    """``trainer.layer_spec`` with "auto" resolved; raises ValueError for "te" without TE and for
    TE with packing (its causal kernel ignores the per-segment mask)."""
    if choice not in LAYER_SPECS:
        raise ValueError(f"unknown layer spec {choice!r}; known: {LAYER_SPECS}")
    if choice == "auto":
        return "te" if te_available() and not packing else "sdpa"
    if choice == "te":
        if not te_available():
            raise ValueError("trainer.layer_spec='te' needs Transformer Engine (and CUDA); use 'sdpa' or 'auto'")
        if packing:
            raise ValueError("trainer.layer_spec='te' does not support trainer.packing (use 'sdpa')")
    return choice


def build_layer_spec(
    base_spec: Any, choice: str, packing: bool = False, layouts: PackedLayouts | None = None
) -> tuple[Any, str, PackedLayouts | None]:
    """``(spec, resolved name, layouts)``: ``base_spec`` (megatron-core's local GPT layer spec, as
    :func:`consumers.bridge.gpt_model_kwargs` builds it) with its core attention replaced per
    ``choice``.  ``layouts`` is the :class:`PackedLayouts` the trainer registers packed
    microbatches with (sdpa only; a new one unless given, e.g. shared with the KL reference)."""
    name = resolve_layer_spec(choice, packing)
    if name == "local":
        return base_spec, name, None
    attn = base_spec.submodules.self_attention.submodules
    if name == "sdpa":
        layouts = layouts if layouts is not None else PackedLayouts()
        attn.core_attention = sdpa_attention_class(layouts)
    else:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        attn.core_attention = TEDotProductAttention
        layouts = None
    return base_spec, name, layouts
