"""Selectable policy losses and off-policy corrections (DESIGN §3, §7): pure functions on tensors.

What: :func:`policy_loss` computes one microbatch's loss from per-token log-probs laid out
``[b, s]`` (one sequence per row; any leading shape works for the token-level parts, the
sequence-level parts reduce over the last dim).  Notation, per token with ``loss_mask`` 1:

- ``lp`` = log π_θ(y_t) (carries the gradient), ``lb`` = log μ(y_t) (behaviour, from the
  producer), ``A`` = the sequence's advantage, ``sg`` = stop-gradient.
- Off-policy correction (``correction``) picks the "old" log-prob ``d`` in the ratio
  ``r = exp(lp - d)`` and a behaviour weight ``w`` (no gradient):

  ============  =========================  =====================================================
  correction    d (old policy in ratio)    w (behaviour weight)
  ============  =========================  =====================================================
  none          lb                         1
  tis           sg(lp)                     min(exp(sg(lp) - lb), C)    (C = tis_cap; 0 = no cap)
  icepop        sg(lp)                     k · 1[low <= k <= high],    k = exp(sg(lp) - lb)
  decoupled     lx (proximal, see below)   min(exp(lx - lb), C)        (C = tis_cap; 0 = no cap)
  ============  =========================  =====================================================

- Proximal policy of decoupled PPO (AReaL), ``prox``:
  ``recompute``: ``lx = sg(lp)`` — the pre-step weights; with one optimizer step per batch the
  trainer's forward *is* the pre-step policy, so this costs nothing (and equals TIS).
  ``loglinear``: ``lx = lb + α (sg(lp) - lb)`` with, per token,
  ``α = clip((v_prox - v_b) / (v_θ - v_b), 0, 1)`` where ``v_b`` is the token's behaviour version,
  ``v_θ`` the trainer's current version and ``v_prox = v_θ - prox_lag``; ``α = 1`` when
  ``v_b >= v_θ`` (on-policy token).  I.e. log π_prox is interpolated linearly in version between
  the behaviour and the current policy.
- Policy objective (``loss``), per token ℓ_t:
  ``grpo``: REINFORCE ``-w' A lp`` with ``w' = w`` (``w · sg(exp(lp - lx))`` for decoupled, so
  that the total weight is π_θ/μ as in the decoupled objective without a clip).
  ``ppo``: ``-w · min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``.
  ``gspo``: as ppo but with the sequence-level, length-normalised ratio
  ``r_i = exp(mean_t(lp - d))`` (token form ``sg(r_i) · exp(lp - sg(lp))``: value ``r_i``,
  gradient ``r_i ∇lp``); the clip acts per sequence.  GSPO is meant for ``agg="seq_mean"``
  and small eps (the paper: 3e-4 / 4e-4).
- Optional terms: ``+ kl_coef · k(lp, lref)`` to a frozen reference (:func:`kl_estimate`: k1, k2,
  k3) and ``- entropy_coef · H`` (:func:`entropy_from_logits`, differentiable).
- Aggregation ``agg``: ``token_mean`` = Σ_t ℓ / #tokens; ``seq_mean`` = mean over sequences of
  each sequence's token mean.  With ``reduction="sum"`` the function returns the numerator and the
  normaliser (tokens or sequences) separately, so the trainer can use Megatron's
  ``calculate_per_token_loss`` to divide by the *global* count.

On-policy identity: with ``lb = sg(lp)`` (and ``v_b = v_θ``), every correction has ``w = 1`` and
``r = 1``, so grpo/ppo give the on-policy REINFORCE loss gradient; tests check this.

How: ``tests/test_policy_loss.py`` compares each piece with a from-scratch numpy computation.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LossKind = Literal["grpo", "ppo", "gspo", "sft"]
Correction = Literal["none", "tis", "icepop", "decoupled"]
Proximal = Literal["recompute", "loglinear"]
Aggregation = Literal["token_mean", "seq_mean"]
KLEstimator = Literal["k1", "k2", "k3"]


def _ftype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def loglinear_proximal(
    lp: torch.Tensor, lb: torch.Tensor, versions: torch.Tensor, v_theta: int, prox_lag: int
) -> torch.Tensor:
    """``lb + α (sg(lp) - lb)``, ``α = clip((v_prox - v_b) / (v_θ - v_b), 0, 1)``, ``α = 1`` where
    ``v_b >= v_θ``; ``v_prox = v_θ - prox_lag``.  No gradient."""
    vb = versions.to(torch.float64)
    gap = float(v_theta) - vb
    alpha = torch.where(gap > 0, ((float(v_theta - prox_lag) - vb) / gap.clamp(min=1e-12)).clamp(0.0, 1.0), torch.ones_like(vb))
    ft = _ftype(lp)
    lp_d, lb_f = lp.detach().to(ft), lb.to(ft)
    return lb_f + alpha.to(lp_d.dtype) * (lp_d - lb_f)


def behaviour_weights(
    lp: torch.Tensor,
    lb: torch.Tensor,
    correction: Correction,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 5.0,
    lx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, w, raw_ratio, cut)`` for a correction (see the module table); all without gradient.
    ``raw_ratio`` is the un-truncated weight (``exp(sg(lp) - lb)``, or ``exp(lx - lb)`` for
    decoupled); ``cut`` is a bool tensor: the token's weight was truncated (tis, decoupled) or
    masked (icepop)."""
    ft = _ftype(lp)
    lpd, lbf = lp.detach().to(ft), lb.to(ft)
    if correction == "decoupled":
        if lx is None:
            raise ValueError("decoupled correction needs the proximal log-probs lx")
        d = lx.detach().to(ft)
        raw = torch.exp(d - lbf)
    else:
        d = lbf if correction == "none" else lpd
        raw = torch.exp(lpd - lbf)
    if correction == "none":
        return d, torch.ones_like(raw), raw, torch.zeros_like(raw, dtype=torch.bool)
    if correction == "icepop":
        keep = (raw >= icepop_low) & (raw <= icepop_high)
        return d, raw * keep, raw, ~keep
    if correction in ("tis", "decoupled"):
        if tis_cap == 0:
            return d, torch.ones_like(raw) if correction == "tis" else raw, raw, torch.zeros_like(raw, dtype=torch.bool)
        return d, raw.clamp(max=tis_cap), raw, raw >= tis_cap
    raise ValueError(f"unknown correction {correction!r}")


def kl_estimate(lp: torch.Tensor, lref: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from samples of π_θ (Schulman's k1/k2/k3), with
    ``log_ratio = lp - lref``: k1 = log_ratio; k2 = log_ratio² / 2; k3 = exp(-log_ratio) - 1 +
    log_ratio.  Differentiable in ``lp``."""
    x = lp - lref.to(lp.dtype)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return torch.exp(-x) - 1 + x
    raise ValueError(f"unknown KL estimator {estimator!r}")


def entropy_from_logits(logits: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Differentiable token entropy of ``softmax(logits)`` over the last dim, which may be split
    across the ranks of ``group`` (vocab-parallel).  ``H = log S - T / S`` with ``S = Σ exp(z - m)``,
    ``T = Σ exp(z - m)(z - m)``, ``m`` the (detached) max.  Across TP the partial sums go through
    Megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity
    backward), as in its vocab-parallel cross entropy."""
    z = logits.to(_ftype(logits))
    m = z.detach().max(dim=-1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    zc = z - m.unsqueeze(-1)
    e = torch.exp(zc)
    st = torch.stack([e.sum(dim=-1), (e * zc).sum(dim=-1)])
    if group is not None:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        st = reduce_from_tensor_model_parallel_region(st)
    s, t = st[0], st[1]
    return torch.log(s) - t / s


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, agg: Aggregation) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, normaliser) of the aggregation: token_mean -> (Σ m x, Σ m);
    seq_mean -> (Σ_rows Σ_t m x / Σ_t m, #rows with a token)."""
    if agg == "token_mean":
        return (mask * x).sum(), mask.sum().detach()
    if agg == "seq_mean":
        per = mask.sum(dim=-1)
        has = per > 0
        num = ((mask * x).sum(dim=-1) / per.clamp(min=1.0))[has].sum()
        return num, has.sum().to(mask.dtype).detach()
    raise ValueError(f"unknown aggregation {agg!r}")


def policy_loss(
    lp: torch.Tensor,
    lb: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    loss: LossKind = "grpo",
    correction: Correction = "tis",
    tis_cap: float = 2.0,
    eps_clip_low: float = 0.2,
    eps_clip_high: float = 0.2,
    icepop_low: float = 0.5,
    icepop_high: float = 5.0,
    prox: Proximal = "recompute",
    versions: torch.Tensor | None = None,
    v_theta: int = 0,
    prox_lag: int = 1,
    agg: Aggregation = "token_mean",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of the module docstring; returns ``(loss, stats)``.

    ``reduction="mean"``: the aggregated loss; ``"sum"``: its numerator (divide by
    ``stats["loss_norm"]``).  ``stats`` (detached scalars; ``*_sum``/``*_count`` are over masked
    tokens): ``num_tokens``, ``loss_norm``, ``is_weight_sum``/``is_weight_mean`` (the behaviour
    weight used; the raw ratio for ``none`` and uncapped tis), ``is_weight_max`` (raw, before
    truncation), ``is_clip_count``/``is_clip_fraction`` (truncated or IcePop-masked tokens),
    ``ppo_clip_count``/``clip_fraction`` (tokens where the clipped ppo/gspo term was the active
    one), ``logprob_mismatch_sum``/``logprob_mismatch`` (``|lp - lb|``), ``kl_sum``/``kl`` (k3 of
    KL(μ || π_θ), behaviour vs current), ``kl_ref_sum``/``kl_ref`` (the reference KL estimate, 0
    without a reference), ``entropy_sum`` (0 when ``entropy`` is None).  ``loss="sft"``: ``-lp``
    (cross-entropy on masked tokens; corrections ignored)."""
    mask = loss_mask.to(lp.dtype)
    adv = advantages.to(lp.dtype)
    lx = None
    if correction == "decoupled":
        if prox == "recompute":
            lx = lp.detach().to(_ftype(lp))
        else:
            if versions is None:
                raise ValueError("prox='loglinear' needs the per-token behaviour versions")
            lx = loglinear_proximal(lp, lb, versions, v_theta, prox_lag)
    d, w, raw, cut = behaviour_weights(lp, lb, correction, tis_cap, icepop_low, icepop_high, lx)
    w = w.to(lp.dtype)
    clipped_active = torch.zeros_like(mask, dtype=torch.bool)
    if loss == "sft":
        tok = -lp
    elif loss == "grpo":
        wp = w * torch.exp(lp.detach() - lx.to(lp.dtype)) if lx is not None else w
        tok = -wp * adv * lp
    elif loss in ("ppo", "gspo"):
        if loss == "ppo":
            r = torch.exp(lp - d.to(lp.dtype))
        else:
            n = mask.sum(dim=-1, keepdim=True).clamp(min=1.0)
            seq_log_r = (mask * (lp.detach() - d.to(lp.dtype))).sum(dim=-1, keepdim=True) / n
            r = torch.exp(seq_log_r) * torch.exp(lp - lp.detach())
        r_clip = r.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high)
        unclipped, clipped = r * adv, r_clip * adv
        tok = -w * torch.minimum(unclipped, clipped)
        clipped_active = (clipped.detach() < unclipped.detach()) & (mask > 0)
    else:
        raise ValueError(f"unknown loss {loss!r}")
    kl_ref_tok = None
    if ref_logprobs is not None:
        kl_ref_tok = kl_estimate(lp, ref_logprobs, kl_estimator)
        if kl_coef:
            tok = tok + kl_coef * kl_ref_tok
    if entropy is not None and entropy_coef:
        tok = tok - entropy_coef * entropy.to(lp.dtype)
    total, norm = _masked_sum(tok, mask, agg)
    with torch.no_grad():
        # masked sums via where(): no boolean indexing, so no host-device sync on GPU
        m = mask.bool()
        n = mask.sum().float()
        shown = raw if (correction == "none" or (correction == "tis" and tis_cap == 0)) else w.float()
        ft = _ftype(lp)
        lr = lp.detach().to(ft) - lb.to(ft)
        ratio_b = torch.exp(lr)

        def msum(x: torch.Tensor) -> torch.Tensor:
            return torch.where(m, x, torch.zeros_like(x)).sum()

        sums = {
            "num_tokens": n,
            "loss_norm": norm.float(),
            "is_weight_sum": msum(shown).float(),
            "is_clip_count": (cut & m).sum().float(),
            "ppo_clip_count": clipped_active.sum().float(),
            "logprob_mismatch_sum": msum(lr.abs()),
            "kl_sum": msum(ratio_b - 1 - lr),  # k3 of KL(μ || π_θ), as tests/reference_losses.py
            "kl_ref_sum": msum(kl_ref_tok.detach().float()) if kl_ref_tok is not None else torch.zeros((), device=lp.device),
            "entropy_sum": msum(entropy.detach().float()) if entropy is not None else torch.zeros((), device=lp.device),
        }
        denom = n.clamp(min=1.0)
        wmax = torch.where(m, raw, torch.full_like(raw, float("-inf"))).max() if raw.numel() else torch.zeros((), device=lp.device)
        stats = {
            **sums,
            "is_weight_max": torch.where(m.any(), wmax, torch.zeros_like(wmax)).float(),
            "is_weight_mean": sums["is_weight_sum"] / denom,
            "is_clip_fraction": sums["is_clip_count"] / denom,
            "clip_fraction": sums["ppo_clip_count"] / denom,
            "logprob_mismatch": sums["logprob_mismatch_sum"] / denom,
            "kl": sums["kl_sum"] / denom,
            "kl_ref": sums["kl_ref_sum"] / denom,
        }
    if reduction == "sum":
        return total, stats
    return total / norm.clamp(min=1.0), stats
