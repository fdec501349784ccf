"""Fused, chunked token log-probs and entropy straight from the last hidden states.

What: :func:`fused_logprobs` computes, for selected tokens, ``log softmax(h W^T / T)[label]`` and
the entropy of ``softmax(h W^T / T)``, where ``W`` is this rank's vocab shard of the output layer
(Megatron's vocab-parallel ``output_layer``, or the tied embedding), without ever holding the
``[tokens, vocab]`` logits: the output projection is done one *vocab chunk* at a time
(``chunk_bytes`` of fp32 logits at most), and an online log-sum-exp carries the running max, the
sum of ``exp`` and the sum of ``exp * z`` across chunks and then across the TP ranks.  The
backward pass recomputes each chunk's logits (one more ``h W_c^T`` GEMM) and writes that chunk's
slice of ``dW`` directly (one GEMM over all tokens, no accumulation across chunks) and accumulates
``dh`` (small: ``[tokens, hidden]``).  :class:`HiddenOutputLayer` makes a ``GPTModel`` return its
final hidden states instead of logits (``emit_hidden`` around the forward), so the trainer's loss
function can call :func:`fused_logprobs` with the output weight.

Maths (``z = h W^T / T`` on this rank's vocab shard, ``y`` the label):
- forward per chunk ``c``: running max ``M``, ``S = sum exp(z - M)``, ``U = sum exp(z - M)(z - M)``;
  a new max ``M'`` rescales ``S <- a S``, ``U <- a (U + (M - M') S)`` with ``a = exp(M - M')``.
  Across TP ranks the same merge runs on the all-gathered ``(M, S, U)``.  Then
  ``lse = M + log S``, ``logp = z_y - lse`` and ``H = log S - U / S``.
- backward, with ``p = exp(z - lse)`` and upstream grads ``g`` (log-prob) and ``g_H`` (entropy):
  ``dL/dz = g (onehot_y - p) - g_H p (z - lse + H)`` (``dH/dz_k = -p_k (log p_k + H)``), divided by
  ``T``; ``dh = sum_c dz_c W_c`` and ``dW_c = dz_c^T h``.  With TP > 1 the hidden states enter
  through ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) as in
  Megatron's ``ColumnParallelLinear``.

Why: with a 151,936-word vocabulary a microbatch of 8,192 tokens has 5 GB of fp32 logits, and the
reference path (Megatron's output layer -> ``Float16Module``'s fp32 cast -> entropy pass -> vocab-
parallel cross entropy) writes and reads several such tensors and keeps one alive until the
backward pass.  Only the tokens the loss needs (loss_mask 1) are projected at all: the prompt and
padding positions never reach the LM head.  Exactness: on CPU in fp32 the result equals the
reference path to ~1e-7 relative (``tests/test_logprobs.py``, TP = 1 and 2).

How::

    with emit_hidden(model):                 # GPTModel returns [b, s, h] instead of logits
        hidden = model(tokens, position_ids, mask)
    logp, ent = fused_logprobs(hidden, output_weight(gpt), labels, select=loss_mask > 0,
                               temperature=0.7, tp_group=tp_group, chunk_bytes=1 << 30)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 30


# ------------------------------------------------------------------ the output layer


class HiddenOutputLayer:
    """Mixin for the ``output_layer`` of a ``GPTModel`` (a ``ColumnParallelLinear``): while
    ``emit_hidden`` is set, ``forward`` returns its input unchanged (``(hidden, None)``), so the
    model returns ``[b, s, h]`` hidden states instead of ``[b, s, vocab/TP]`` logits.  The module
    keeps its weight and state-dict names (the bridge and checkpoints do not see a difference)."""

    emit_hidden: bool = False

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.emit_hidden:
            return input_, None
        return super().forward(input_, *args, **kwargs)  # type: ignore[misc]


def enable_hidden_output(gpt: Any) -> None:
    """Switch ``gpt.output_layer`` to :class:`HiddenOutputLayer` (idempotent; last PP stage only)."""
    layer = getattr(gpt, "output_layer", None)
    if layer is None or isinstance(layer, HiddenOutputLayer):
        return
    cls = layer.__class__
    layer.__class__ = type(f"Hidden{cls.__name__}", (HiddenOutputLayer, cls), {})


@contextlib.contextmanager
def emit_hidden(gpt: Any, on: bool = True) -> Iterator[None]:
    """Within the block, ``gpt`` (a ``GPTModel`` prepared by :func:`enable_hidden_output`) returns
    hidden states; a no-op on stages without an output layer or with ``on=False``."""
    layer = getattr(gpt, "output_layer", None)
    if not on or not isinstance(layer, HiddenOutputLayer):
        yield
        return
    layer.emit_hidden = True
    try:
        yield
    finally:
        layer.emit_hidden = False


def output_weight(gpt: Any) -> torch.Tensor:
    """The ``[vocab/TP, hidden]`` weight the output layer multiplies by (the tied embedding when
    embeddings are shared; on later PP stages Megatron keeps its own synchronised copy)."""
    if getattr(gpt, "share_embeddings_and_output_weights", False):
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


# ------------------------------------------------------------------ the fused op


def _chunk_size(n_tokens: int, vocab_local: int, chunk_bytes: int) -> int:
    """Vocab columns per chunk so that the fp32 chunk logits stay within ``chunk_bytes``."""
    return max(1, min(vocab_local, chunk_bytes // (4 * max(n_tokens, 1))))


def _acc_dtype(weight: torch.Tensor) -> torch.dtype:
    """Softmax arithmetic in fp32 (fp64 stays fp64: exactness tests)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _chunk_logits(hidden: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``hidden @ w^T / T`` (the GEMM in the weights' dtype, like Megatron's output layer)."""
    z = torch.matmul(hidden, w.t()).to(_acc_dtype(w))
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _merge(m: torch.Tensor, s: torch.Tensor, u: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor, u2: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two online-softmax partials ``(max, sum exp(z - max), sum exp(z - max)(z - max))``."""
    mx = torch.maximum(m, m2)
    a, b = torch.exp(m - mx), torch.exp(m2 - mx)
    # where a partial is empty (max -inf) its sums are 0: (m - mx) * s would be -inf * 0 = nan
    da = torch.where(s > 0, (m - mx) * s, torch.zeros_like(s))
    db = torch.where(s2 > 0, (m2 - mx) * s2, torch.zeros_like(s2))
    return mx, a * s + b * s2, a * (u + da) + b * (u2 + db)


class _FusedLogProbs(torch.autograd.Function):
    """``(logp [n], entropy [n])`` of ``hidden [n, h]`` against the vocab shard ``weight [v, h]``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float,
        chunk_bytes: int, tp_group: Any, vocab_start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, v = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        acc = _acc_dtype(weight)
        m = torch.full((n,), float("-inf"), dtype=acc, device=dev)
        s = torch.zeros(n, dtype=acc, device=dev)
        u = torch.zeros(n, dtype=acc, device=dev)
        target = torch.zeros(n, dtype=acc, device=dev)
        local = labels - vocab_start
        c = _chunk_size(n, v, chunk_bytes)
        for v0 in range(0, v, c):
            v1 = min(v, v0 + c)
            z = _chunk_logits(hidden, weight[v0:v1], temperature)
            idx = local - v0
            inside = (idx >= 0) & (idx < v1 - v0)
            picked = z.gather(1, idx.clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            target += torch.where(inside, picked, torch.zeros_like(picked))
            mc = z.max(dim=1).values
            z.sub_(mc.unsqueeze(1))  # z - mc
            e = torch.exp(z)
            sc = e.sum(dim=1)
            uc = (e.mul_(z)).sum(dim=1)
            del e, z
            m, s, u = _merge(m, s, u, mc, sc, uc)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            world = dist.get_world_size(tp_group)
            mine = torch.stack([m, s, u])
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine, group=tp_group)
            m, s, u = parts[0][0], parts[0][1], parts[0][2]
            for p in parts[1:]:
                m, s, u = _merge(m, s, u, p[0], p[1], p[2])
            dist.all_reduce(target, group=tp_group)
        lse = m + torch.log(s)
        entropy = torch.log(s) - u / s
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature, ctx.chunk_bytes, ctx.vocab_start = temperature, chunk_bytes, vocab_start
        ctx.set_materialize_grads(False)
        return target - lse, entropy

    @staticmethod
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        t = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_ent is None) or not (need_h or need_w):
            return (None,) * 7
        acc = _acc_dtype(weight)
        g_lp = g_lp.to(acc) if g_lp is not None else torch.zeros_like(lse)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        local = labels - ctx.vocab_start
        c = _chunk_size(n, v, ctx.chunk_bytes)
        for v0 in range(0, v, c):
            v1 = min(v, v0 + c)
            w_c = weight[v0:v1]
            z = _chunk_logits(hidden, w_c, t)
            z.sub_(lse.unsqueeze(1))  # log p
            p = torch.exp(z)
            if g_ent is not None:  # dz = -p (g + g_H (log p + H)), then + g at the label
                z.add_(entropy.unsqueeze(1)).mul_(g_ent.to(acc).unsqueeze(1)).add_(g_lp.unsqueeze(1))
                dz = z.mul_(p).neg_()
            else:
                dz = p.mul_(g_lp.unsqueeze(1)).neg_()
            idx = local - v0
            inside = (idx >= 0) & (idx < v1 - v0)
            at_label = torch.where(inside, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)
            dz.scatter_add_(1, idx.clamp(0, v1 - v0 - 1).unsqueeze(1), at_label)
            if t != 1.0:
                dz.div_(t)
            dz = dz.to(weight.dtype)
            if grad_h is not None:
                grad_h += torch.matmul(dz, w_c).to(acc)
            if grad_w is not None:
                torch.matmul(dz.t(), hidden, out=grad_w[v0:v1])
            del z, p, dz
        return (grad_h.to(hidden.dtype) if grad_h is not None else None), grad_w, None, None, None, None, None


def select_index(select: torch.Tensor) -> torch.Tensor:
    """Flat positions (int64) where the bool/0-1 tensor ``select`` is set: the ``index`` argument
    of :func:`fused_logprobs`.  Build it on the CPU (``nonzero`` of a device tensor waits for the
    device)."""
    return torch.nonzero(select.reshape(-1) != 0, as_tuple=True)[0]


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    index: torch.Tensor | None = None,
    temperature: float = 1.0,
    tp_group: Any = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label log-probs and entropies ``[b, s]`` (fp32, differentiable in ``hidden`` and ``weight``)
    from hidden states ``[b, s, h]`` and this rank's vocab shard ``weight [vocab/TP, h]``.

    ``index`` (int64, flat positions into ``[b * s]``, :func:`select_index`): only those tokens
    are projected; the others get 0 in both outputs (and no gradient); None = every token.
    ``tp_group``: the tensor-parallel group the vocab is split over (None = not split).
    ``chunk_bytes``: the fp32 logits of one vocab chunk (projected tokens x chunk columns x 4
    bytes) stay below this; the transient memory is about 2.5x that."""
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    b, s = labels.shape
    flat = hidden.reshape(b * s, hidden.shape[-1])
    lab = labels.reshape(-1)
    idx = None
    if index is not None:
        idx = index.to(flat.device)
        flat, lab = flat.index_select(0, idx), lab.index_select(0, idx)
    flat = flat.to(weight.dtype)
    tp = tp_group is not None and dist.get_world_size(tp_group) > 1
    vocab_start = dist.get_rank(tp_group) * weight.shape[0] if tp else 0
    if tp:
        flat = copy_to_tensor_model_parallel_region(flat, group=tp_group)
    lp, ent = _FusedLogProbs.apply(flat, weight, lab, float(temperature), int(chunk_bytes), tp_group if tp else None, vocab_start)
    if idx is None:
        return lp.reshape(b, s), ent.reshape(b, s)
    out_lp = lp.new_zeros(b * s).index_put((idx,), lp)
    out_ent = ent.new_zeros(b * s).index_put((idx,), ent)
    return out_lp.reshape(b, s), out_ent.reshape(b, s)
