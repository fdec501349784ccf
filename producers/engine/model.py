"""The embedded engine's own forward pass: prefill and decode over a preallocated KV cache.

What: :class:`DecoderModel` runs a loaded transformers causal LM of a supported family (Qwen2/2.5,
Qwen3, Llama 3, Qwen3-MoE) without transformers' generation machinery.  It reads the weights from
the transformers modules (they stay the source of weights and architecture) and writes keys and
values into :class:`producers.engine.kvcache.KVCache`, one fixed slot per running sequence:

- :meth:`DecoderModel.prefill` runs ``n`` right-padded prompts (or one chunk of one long prompt)
  through every layer, writes their K/V into ``n`` consecutive slots and returns the logits of
  each row's last real token;
- :meth:`DecoderModel.decode` runs one token for each of rows ``0 .. b-1`` (row ``i`` lives in
  slot ``i``), attending to the first ``T`` cache positions of its slot.  It has static shapes for
  a given ``(b, T)`` and no host synchronisation, so ``producers.engine.graphs`` can capture it
  as a CUDA graph.

Why a re-written forward: transformers' ``generate``-style forward allocates a growing cache and
builds masks each step; here the cache is allocated once, the per-step work is fixed-shape GPU
work, and element-wise steps (RMSNorm, residual add, q/k norm + RoPE, SiLU*up) are small
functions that ``torch.compile`` can fuse (``engine.compile``, CUDA only).  Attention uses torch's
SDPA: the fresh-prompt prefill is causal with ``enable_gqa`` (flash kernels), a prefill chunk after
a cached prefix and the decode step use a boolean mask of valid positions.  Decode groups the
query heads that share a KV head (``q.view(b, kv_heads, group, head_dim)``), so grouped-query
attention needs no repeated keys.  ``attn_implementation = "eager"`` computes the same with
matmul + softmax (a reference, and a fallback if SDPA misbehaves on some device).

Fused weights (``fuse=True``, used with CUDA graphs): each layer's q/k/v and gate/up weights are
concatenated into one tensor, and the transformers parameters are re-pointed to views of it, so
the parameters the weight receiver copies into and the checksum hashes are still exactly what
the forward reads.  Such parameters can only be updated in place (a weight swap copies; it
cannot "adopt" new storage), see :attr:`DecoderModel.adopts`.

Positions are cache indices (no left padding), so RoPE tables are precomputed once for
``0 .. max_seq_len-1`` with the model's own rotary module (rope scaling included).

Run: not on its own; the scheduler (``decode.py``) owns one.  Parity with transformers:
``pytest tests/test_engine_model.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from producers.engine.kvcache import KVCache

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe")
# Rotary embeddings whose frequencies depend on the sequence length (recomputed per forward by
# transformers) cannot be precomputed into one table.
_DYNAMIC_ROPE = ("dynamic", "longrope")


class UnsupportedModel(ValueError):
    """The checkpoint's architecture is outside the families this forward implements."""


# ---------------------------------------------------------------------- element-wise kernels
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, op for op (float32 statistics, scaled in the input dtype)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` and ``rms_norm(s)`` (the residual add fused into the next norm)."""
    s = residual + x
    return s, rms_norm(s, w, eps)


def qk_rope(qk: torch.Tensor, norm: torch.Tensor | None, cos: torch.Tensor, sin_signed: torch.Tensor,
            eps: float) -> torch.Tensor:
    """Per-head RMSNorm (Qwen3's q/k norm; ``norm`` (H, D) holds q_norm's weight for the query heads
    and k_norm's for the key heads) then RoPE, on the query and key heads at once: ``qk`` (N, H, D),
    cos/sin (N, 1, D).  transformers' ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) =
    cat(-x2, x1)``, written as the halves swapped (one flip) times ``sin`` with its first half
    negated (``sin_signed``): the same products, the same result."""
    if norm is not None:
        qk = rms_norm(qk, norm, eps)
    n, h, d = qk.shape
    swapped = qk.view(n, h, 2, d // 2).flip(-2).reshape(n, h, d)
    return qk * cos + swapped * sin_signed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a fused (N, 2I) gate/up projection."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def silu_mul2(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass
class Kernels:
    """The element-wise functions the forward calls: eager, or compiled by :func:`compile_kernels`."""

    rms_norm: Callable[..., torch.Tensor] = rms_norm
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
    qk_rope: Callable[..., torch.Tensor] = qk_rope
    silu_mul: Callable[..., torch.Tensor] = silu_mul
    silu_mul2: Callable[..., torch.Tensor] = silu_mul2
    compiled: bool = False


def compile_kernels() -> Kernels:
    """The same functions through ``torch.compile(dynamic=True)``: one compile each for any token
    count >= 2.  A single token (N = 1) runs the eager function instead, because dynamo
    specialises size-1 dimensions and would compile again; the decode graphs never see N = 1
    (``graphs.py`` pads a batch of one to two rows).  The first call compiles, so call them once
    before capturing graphs."""
    def c(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        def run(x: torch.Tensor, *args: Any) -> Any:
            return fn(x, *args) if x.shape[0] == 1 else compiled(x, *args)

        return run

    return Kernels(rms_norm=c(rms_norm), add_rms_norm=c(add_rms_norm), qk_rope=c(qk_rope), silu_mul=c(silu_mul),
                   silu_mul2=c(silu_mul2), compiled=True)


# ---------------------------------------------------------------------- weights
@dataclass
class _Layer:
    in_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: list[torch.Tensor]  # one fused (Hq+2Hk)*D x H weight, or [q, k, v]
    qkv_bias: list[torch.Tensor | None]
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    gate_up: list[torch.Tensor] | None  # one fused 2I x H weight, or [gate, up]; None for an MoE layer
    gate_up_bias: list[torch.Tensor | None]
    down: torch.Tensor | None
    down_bias: torch.Tensor | None
    moe: torch.nn.Module | None  # transformers' sparse MoE block (called as is)


def _fuse(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Concatenate along dim 0 and re-point each parameter to its view of the result."""
    fused = torch.cat([p.data for p in params], dim=0)
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[offset : offset + n]
        offset += n
    return fused


def _maybe_fuse(params: list[torch.nn.Parameter | None], fuse: bool) -> list[Any]:
    if any(p is None for p in params):
        return list(params)
    return [_fuse(params)] if fuse else list(params)  # type: ignore[arg-type]


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise UnsupportedModel(f"{type(model).__name__} has no .model.layers (not a decoder-only causal LM)")
    return inner


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModel` naming what is not supported."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model_type {mtype!r} is not supported by the embedded engine "
                               f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise UnsupportedModel("sliding-window attention (use_sliding_window=true) is not supported by the embedded engine")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModel(f"hidden_act {act!r} is not supported (only silu)")


class DecoderModel:
    """Prefill and decode for one loaded transformers model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_seq_len: int, *, fuse: bool = False, attention: str = "sdpa",
                 kernels: Kernels | None = None) -> None:
        cfg = model.config
        check_supported(cfg)
        self.config = cfg
        self.hf = model
        inner = _inner(model)
        self.num_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads)
        self.group = self.num_heads // self.kv_heads
        self.hidden = int(cfg.hidden_size)
        self.vocab = int(cfg.vocab_size)
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.max_seq_len = max_seq_len
        self.attention = attention
        self.fused = fuse
        self.kernels = kernels or Kernels()
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.lm_head = model.get_output_embeddings().weight
        self.layers = [self._layer(layer, fuse) for layer in inner.layers]
        self.moe = any(layer.moe is not None for layer in self.layers)
        self.cos, sin = self._rope_tables(inner, max_seq_len)
        half = self.head_dim // 2
        self.sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)  # rotate_half's sign folded in
        self._positions = torch.arange(max_seq_len, device=self.device)

    @property
    def adopts(self) -> bool:
        """Whether a full weight update may be adopted by re-pointing the parameters (no copy):
        not with fused weights, whose parameters are views of the fused tensors."""
        return not self.fused

    def _layer(self, layer: torch.nn.Module, fuse: bool) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        projs = [attn.q_proj, attn.k_proj, attn.v_proj]
        qkv = _maybe_fuse([p.weight for p in projs], fuse)
        biases = [p.bias for p in projs]
        qkv_bias = (_maybe_fuse(biases, fuse) if all(b is not None for b in biases) else [None] * len(qkv))
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        moe = None if hasattr(mlp, "gate_proj") else mlp
        gate_up: list[Any] | None = None
        gate_up_bias: list[Any] = []
        down = down_bias = None
        if moe is None:
            gate_up = _maybe_fuse([mlp.gate_proj.weight, mlp.up_proj.weight], fuse)
            gb = [mlp.gate_proj.bias, mlp.up_proj.bias]
            gate_up_bias = _maybe_fuse(gb, fuse) if all(b is not None for b in gb) else [None] * len(gate_up)
            down, down_bias = mlp.down_proj.weight, mlp.down_proj.bias
        return _Layer(
            in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight, qkv=qkv,
            qkv_bias=qkv_bias, o=attn.o_proj.weight, o_bias=attn.o_proj.bias,
            q_norm=None if q_norm is None else q_norm.weight, k_norm=None if k_norm is None else k_norm.weight,
            gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias, moe=moe,
        )

    def _rope_tables(self, inner: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = getattr(inner, "rotary_emb", None)
        if rotary is None:
            raise UnsupportedModel("the model has no rotary embedding module (model.rotary_emb)")
        rope_type = getattr(rotary, "rope_type", "default")
        if rope_type in _DYNAMIC_ROPE:
            raise UnsupportedModel(f"rope type {rope_type!r} depends on the sequence length; not supported")
        pos = torch.arange(n, device=self.device)[None, :]
        dummy = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            cos, sin = rotary(dummy, pos)
        return cos[0].contiguous(), sin[0].contiguous()  # (n, head_dim) in the model dtype

    # ------------------------------------------------------------------ shared pieces
    def _qkv(self, h: torch.Tensor, lw: _Layer, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, H) -> q (N, Hq, D), k (N, Hk, D), v (N, Hk, D), normed (Qwen3) and rotated."""
        n = h.shape[0]
        hq, hk, d = self.num_heads, self.kv_heads, self.head_dim
        if len(lw.qkv) == 1:
            qkv = F.linear(h, lw.qkv[0], lw.qkv_bias[0])
            qk, v = qkv[:, : (hq + hk) * d], qkv[:, (hq + hk) * d :]
        else:
            q, k, v = (F.linear(h, w, b) for w, b in zip(lw.qkv, lw.qkv_bias, strict=True))
            qk = torch.cat([q, k], dim=-1)
        norm = None
        if lw.q_norm is not None and lw.k_norm is not None:  # built per call: a weight swap may change them
            norm = torch.cat([lw.q_norm.expand(hq, d), lw.k_norm.expand(hk, d)])
        qk = self.kernels.qk_rope(qk.view(n, hq + hk, d), norm, cos, sin, self.eps)
        return qk[:, :hq], qk[:, hq:], v.reshape(n, hk, d)

    def _mlp(self, h: torch.Tensor, lw: _Layer) -> torch.Tensor:
        if lw.moe is not None:
            n = h.shape[0]
            out = lw.moe(h.view(1, n, self.hidden))
            out = out[0] if isinstance(out, tuple) else out
            return out.reshape(n, self.hidden)
        assert lw.gate_up is not None and lw.down is not None
        if len(lw.gate_up) == 1:
            act = self.kernels.silu_mul(F.linear(h, lw.gate_up[0], lw.gate_up_bias[0]))
        else:
            act = self.kernels.silu_mul2(F.linear(h, lw.gate_up[0], lw.gate_up_bias[0]),
                                         F.linear(h, lw.gate_up[1], lw.gate_up_bias[1]))
        return F.linear(act, lw.down, lw.down_bias)

    def _logits(self, h: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return F.linear(h, self.lm_head)
        return torch.mm(h, self.lm_head.t(), out=out)

    # ------------------------------------------------------------------ prefill
    def prefill(self, cache: KVCache, ids: torch.Tensor, lens: list[int], slot: int, start: int = 0,
                logits: bool = True) -> torch.Tensor | None:
        """Run ``ids`` (n, L), right-padded, row ``i`` holding ``lens[i]`` real tokens at positions
        ``start ..``, into slots ``slot .. slot+n-1``; return the logits (n, V) of each row's last
        real token (None with ``logits=False``).  ``start > 0`` (a chunk after ``start`` cached
        tokens) needs ``n == 1``."""
        n, length = ids.shape
        if start > 0 and n != 1:
            raise ValueError("a prefill chunk after a cached prefix is one sequence at a time")
        if start + length > cache.max_seq_len:
            raise ValueError(f"prefill of {start}+{length} tokens exceeds the KV slot size {cache.max_seq_len}")
        flat = ids.reshape(-1)
        positions = self._positions[start : start + length].repeat(n)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        hq, hk, d = self.num_heads, self.kv_heads, self.head_dim
        mask = None
        if start > 0:  # query t (absolute start + t) sees cached positions 0 .. start + t
            mask = self._positions[: start + length][None, :] <= self._positions[start : start + length][:, None]
        x = F.embedding(flat, self.embed)
        residual: torch.Tensor | None = None
        k_rows = slice(slot, slot + n)
        cols = slice(start, start + length)
        for i, lw in enumerate(self.layers):
            if residual is None:
                residual, h = x, self.kernels.rms_norm(x, lw.in_norm, self.eps)
            else:
                residual, h = self.kernels.add_rms_norm(x, residual, lw.in_norm, self.eps)
            q, k, v = self._qkv(h, lw, cos, sin)
            q = q.view(n, length, hq, d).transpose(1, 2)
            k = k.view(n, length, hk, d).transpose(1, 2)
            v = v.view(n, length, hk, d).transpose(1, 2)
            kc, vc = cache.k[i], cache.v[i]
            kc[k_rows, :, cols] = k
            vc[k_rows, :, cols] = v
            if mask is None:
                attn = self._attend(q, k, v, None, causal=True)
            else:
                keys = slice(0, start + length)
                attn = self._attend(q, kc[k_rows, :, keys], vc[k_rows, :, keys], mask, causal=False)
            x = F.linear(attn.transpose(1, 2).reshape(n * length, hq * d), lw.o, lw.o_bias)
            residual, h = self.kernels.add_rms_norm(x, residual, lw.post_norm, self.eps)
            x = self._mlp(h, lw)
        if not logits:
            return None
        assert residual is not None
        last = torch.tensor([i * length + ln - 1 for i, ln in enumerate(lens)], device=self.device)
        _, h = self.kernels.add_rms_norm(x[last], residual[last], self.final_norm, self.eps)
        return self._logits(h, None)

    def _decode_sdpa(self) -> Any:
        """On CUDA the decode step uses the memory-efficient SDPA kernel (masks, arbitrary strides, known
        to be capturable in CUDA graphs), else math; elsewhere SDPA picks."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        """Prefill attention; q (n, Hq, L, D), k/v (n, Hk, S, D) -> (n, Hq, L, D)."""
        if self.attention == "eager" or (self.group > 1 and mask is not None):
            k, v = _repeat_kv(k, self.group), _repeat_kv(v, self.group)
        if self.attention == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if causal:
                length = q.shape[-2]
                mask = self._positions[:length][None, :] <= self._positions[:length][:, None]
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        if causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.group > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    # ------------------------------------------------------------------ decode
    def decode(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
               width: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """One token for rows ``0 .. b-1`` (row i = slot i): ``tokens`` (b,) at ``positions`` (b,);
        row i's K/V go to slot ``write_slots[i]`` (the cache's scratch slot for padding rows), and
        attention reads the first ``width`` cache positions of slots ``0 .. b-1``.  Returns the
        logits (b, V) in the model dtype (into ``out`` when given).  Static shapes for a given
        (b, width), no host synchronisation: capturable as a CUDA graph."""
        b = tokens.shape[0]
        hq, hk, d, g = self.num_heads, self.kv_heads, self.head_dim, self.group
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        valid = (self._positions[:width][None, :] <= positions[:, None]).view(b, 1, 1, width)
        # one additive mask for every layer (SDPA would otherwise convert a boolean mask per call)
        bias = torch.zeros(valid.shape, dtype=self.dtype, device=self.device).masked_fill_(~valid, float("-inf"))
        x = F.embedding(tokens, self.embed)
        residual: torch.Tensor | None = None
        for i, lw in enumerate(self.layers):
            if residual is None:
                residual, h = x, self.kernels.rms_norm(x, lw.in_norm, self.eps)
            else:
                residual, h = self.kernels.add_rms_norm(x, residual, lw.in_norm, self.eps)
            q, k, v = self._qkv(h, lw, cos, sin)
            kc, vc = cache.k[i], cache.v[i]
            kc[write_slots, :, positions] = k
            vc[write_slots, :, positions] = v
            qg = q.view(b, hk, g, d)  # query heads sharing a KV head become that head's "rows"
            keys, values = kc[:b, :, :width], vc[:b, :, :width]
            if self.attention == "eager":
                scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale
                scores = scores.masked_fill(~valid, float("-inf"))
                attn = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(qg.dtype), values)
            else:
                with self._decode_sdpa():
                    attn = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias, scale=self.scale)
            x = F.linear(attn.reshape(b, hq * d), lw.o, lw.o_bias)
            residual, h = self.kernels.add_rms_norm(x, residual, lw.post_norm, self.eps)
            x = self._mlp(h, lw)
        assert residual is not None
        _, h = self.kernels.add_rms_norm(x, residual, self.final_norm, self.eps)
        return self._logits(h, out)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total
