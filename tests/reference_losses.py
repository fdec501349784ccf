"""Reference policy losses for the tests: the first GRPO + truncated-IS loss and the plain
on-policy REINFORCE loss, written independently of :mod:`consumers.policy_loss` (which the trainer
uses).  ``tests/test_loss.py`` checks them against numpy; ``tests/test_policy_loss.py`` checks the
trainer's losses against them.

- :func:`grpo_tis_loss`: ``loss = -sum(mask * A * w * logp_new) / sum(mask)`` with the truncated
  importance weight ``w = min(exp(logp_new.detach() - logp_behav), tis_cap)`` (slime's TIS); the
  proximal policy is the current one, so the PPO ratio is 1.  ``tis_cap=0`` turns the correction
  off (``w = 1``; the ratio statistics are still reported).  ``reduction="sum"`` returns the
  numerator, and every statistic is also given as a sum, as the trainer adds them across
  microbatches and ranks.
- :func:`policy_gradient_loss`: on-policy token-mean REINFORCE.
"""

from __future__ import annotations

from typing import Literal

import torch


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
