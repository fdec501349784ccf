"""Policy losses of the trainer: GRPO advantages and the TIS-corrected token-mean policy gradient.

What (pure functions on tensors, no distributed state except the optional TP group of
:func:`vocab_parallel_entropy`):

- :func:`group_advantages`: per-group reward normalisation, ``A_i = (r_i - mean) / (std + eps)``
  (GRPO) or ``r_i - mean`` (Dr. GRPO, ``std_norm=False``).  ``std`` is the unbiased sample std of
  the group, as in TRL and verl; a group of one sample gets advantage 0 (it has no baseline).
- :func:`grpo_tis_loss`: ``loss = -sum(mask * A * w * logp_new) / sum(mask)`` with the truncated
  importance weight ``w = min(exp(logp_new.detach() - logp_behav), tis_cap)`` (slime's TIS).
  The proximal / "old" policy is the current one (one gradient step per batch), so the PPO ratio
  is 1 and only the behaviour-policy correction remains.  ``tis_cap=0`` turns the correction off
  (``w = 1``; the ratio statistics are still reported).
- :func:`policy_gradient_loss`: the plain on-policy token-mean REINFORCE loss (reference for tests).
- :func:`vocab_parallel_entropy`: token entropy from (possibly vocab-sharded) logits.

Why sums: the trainer runs many microbatches on many data-parallel ranks and wants the *global*
token mean.  So :func:`grpo_tis_loss` can return the numerator (``reduction="sum"``) and every
statistic also as a sum (``*_sum``, ``num_tokens``), which the trainer adds up across microbatches
and ranks before dividing.

How: ``python -m pytest tests/test_loss.py`` checks these against an independent numpy version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def group_advantages(
    rewards: Sequence[Sequence[float] | np.ndarray | torch.Tensor], std_norm: bool = True, eps: float = 1e-6
) -> list[torch.Tensor]:
    """Advantages for each group's samples (float32 tensors, one per group, same lengths).

    ``std_norm=True``: ``(r - mean) / (std + eps)``; ``False``: ``r - mean``.  A group whose rewards
    are all equal gets zeros either way; a group of one sample gets 0."""
    out = []
    for group in rewards:  # numpy: groups are tiny, and per-op torch overhead would dominate
        r = np.asarray(group.detach().cpu() if isinstance(group, torch.Tensor) else group, dtype=np.float64)
        if r.size <= 1 or r.max() == r.min():  # exact zeros, not rounding noise
            out.append(torch.zeros(r.size, dtype=torch.float32))
            continue
        centred = r - r.mean()
        if std_norm:
            centred = centred / (r.std(ddof=1) + eps)
        out.append(torch.from_numpy(centred.astype(np.float32)))
    return out


def importance_weights(
    logp_new: torch.Tensor, logp_behav: torch.Tensor, tis_cap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, raw ratio): ``ratio = exp(logp_new.detach() - logp_behav)``, ``w = min(ratio, tis_cap)``
    (``w = 1`` when ``tis_cap == 0``).  Both carry no gradient."""
    ratio = torch.exp(logp_new.detach().float() - logp_behav.float())
    w = torch.ones_like(ratio) if tis_cap == 0 else torch.clamp(ratio, max=tis_cap)
    return w, ratio


def grpo_tis_loss(
    logp_new: torch.Tensor,
    logp_behav: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    tis_cap: float,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO policy gradient with truncated importance sampling, token-level.

    All inputs have the same shape (any; e.g. ``[tokens]`` or ``[b, s]``).  ``advantages`` is per
    token (the sequence's advantage repeated); ``loss_mask`` is 1 on trained tokens.

    Returns ``(loss, stats)``.  ``loss`` is ``-sum(mask*A*w*logp_new)`` divided by ``sum(mask)``
    (``reduction="mean"``; 0 if no token is masked in) or not divided (``"sum"``).  ``stats`` (all
    detached, scalar tensors): ``num_tokens``; ``is_weight_mean``, the mean weight the loss
    used (the truncated ``w``; the raw ratio when TIS is off); ``is_weight_max``, the largest raw
    ratio *before* truncation (how far off-policy the worst token is); ``is_clip_fraction``
    (fraction of tokens whose ratio reached the cap); ``logprob_mismatch`` (mean
    ``|logp_new - logp_behav|``); ``kl``, the k3 estimate ``r - 1 - log r`` of
    KL(behaviour || current) with ``r`` the raw ratio; and the sums behind the means:
    ``is_weight_sum``, ``is_clip_count``, ``logprob_mismatch_sum``, ``kl_sum``.  All over tokens
    with ``loss_mask`` 1.
    """
    mask = loss_mask.to(logp_new.dtype)
    w, ratio = importance_weights(logp_new, logp_behav, tis_cap)
    total = -(mask * advantages.to(logp_new.dtype) * w.to(logp_new.dtype) * logp_new).sum()
    n = mask.sum().detach()
    with torch.no_grad():
        m = mask.bool()
        shown = ratio if tis_cap == 0 else w
        clipped = (ratio >= tis_cap) & m if tis_cap > 0 else torch.zeros_like(m)
        sums = {
            "num_tokens": n.float(),
            "is_weight_sum": shown[m].sum().float(),
            "is_clip_count": clipped.sum().float(),
            "logprob_mismatch_sum": (logp_new.detach() - logp_behav)[m].abs().sum().float(),
            # k3 estimate of KL(behaviour || current) from the behaviour's samples: r - 1 - log r
            "kl_sum": (ratio - 1 - torch.log(ratio))[m].sum().float(),
        }
        denom = torch.clamp(n.float(), min=1.0)
        stats = {
            **sums,
            "is_weight_max": ratio[m].max().float() if m.any() else torch.zeros((), dtype=torch.float32),
            "is_weight_mean": sums["is_weight_sum"] / denom,
            "is_clip_fraction": sums["is_clip_count"] / denom,
            "logprob_mismatch": sums["logprob_mismatch_sum"] / denom,
            "kl": sums["kl_sum"] / denom,
        }
    if reduction == "sum":
        return total, stats
    return total / torch.clamp(n, min=1.0), stats


def policy_gradient_loss(logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """On-policy token-mean REINFORCE: ``-sum(mask * A * logp) / sum(mask)``."""
    mask = loss_mask.to(logp.dtype)
    return -(mask * advantages.to(logp.dtype) * logp).sum() / torch.clamp(mask.sum(), min=1.0)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, where that dim may be split across the
    ranks of ``group`` (Megatron's vocab-parallel logits).  ``H = m + log s - t / s`` with
    ``m = max z``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) * z``.  No gradient."""
    z = logits.float()
    m = z.max(dim=-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m.unsqueeze(-1))
    s = e.sum(dim=-1)
    t = (e * z).sum(dim=-1)
    if group is not None:
        st = torch.stack([s, t])
        dist.all_reduce(st, group=group)
        s, t = st[0], st[1]
    return m + torch.log(s) - t / s
