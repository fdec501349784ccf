"""consumers/policy_loss.py against from-scratch numpy computations on fixed tensors, and the
on-policy identity: behaviour = current policy, no clipping -> every correction is REINFORCE."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from consumers.policy_loss import entropy_from_logits, kl_estimate, loglinear_proximal, policy_loss
from tests.reference_losses import grpo_tis_loss, policy_gradient_loss

# fixed tensors: 3 sequences x 5 tokens (row = sequence)
LP = np.array([[-0.5, -1.2, -0.1, -2.0, -0.7], [-0.3, -3.0, -0.9, -0.05, -1.5], [-1.0, -0.2, -0.4, -0.6, -2.2]])
LB = np.array([[-0.6, -0.2, -0.1, -2.9, -0.7], [-1.9, -2.8, -0.4, -0.05, -0.2], [-1.1, -0.25, -0.3, -0.9, -2.0]])
LREF = np.array([[-0.7, -1.0, -0.3, -1.5, -0.9], [-0.4, -2.0, -1.1, -0.2, -1.0], [-0.9, -0.5, -0.4, -0.8, -2.5]])
MASK = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.float64)
ADV = np.array([1.5, -0.8, 0.6])[:, None] * MASK
VERS = np.array([[5, 5, 5, 6, 6], [3, 3, 3, 4, 4], [6, 6, 6, 6, 6]], dtype=np.float64)
V_THETA, LAG = 6, 1


def _t(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def numpy_loss(loss, corr, cap=2.0, lo=0.2, hi=0.2, ip=(0.5, 5.0), prox="recompute", agg="token_mean",
               kl_coef=0.0, est="k3", ent=None, ent_coef=0.0):
    """Independent reference: returns (loss, d loss / d lp, stats)."""
    lp, lb, m, a = LP, LB, MASK, ADV
    raw_b = np.exp(lp - lb)
    if corr == "none":
        d, w, raw, cut = lb, np.ones_like(lp), raw_b, np.zeros_like(lp, bool)
    elif corr == "tis":
        d, raw = lp, raw_b
        w = np.ones_like(lp) if cap == 0 else np.minimum(raw, cap)
        cut = raw >= cap if cap else np.zeros_like(lp, bool)
    elif corr == "icepop":
        d, raw = lp, raw_b
        keep = (raw >= ip[0]) & (raw <= ip[1])
        w, cut = raw * keep, ~keep
    else:  # decoupled
        if prox == "recompute":
            lx = lp
        else:
            alpha = np.ones_like(lp)
            for i, j in np.ndindex(lp.shape):
                vb = VERS[i, j]
                if vb < V_THETA:
                    alpha[i, j] = min(max((V_THETA - LAG - vb) / (V_THETA - vb), 0.0), 1.0)
            lx = lb + alpha * (lp - lb)
        d, raw = lx, np.exp(lx - lb)
        w = np.minimum(raw, cap) if cap else raw
        cut = raw >= cap if cap else np.zeros_like(lp, bool)
    clip_active = np.zeros_like(lp, bool)
    if loss == "grpo":
        wp = w * np.exp(lp - d) if corr == "decoupled" else w
        tok, g = -wp * a * lp, -wp * a
    elif loss == "ppo":
        r = np.exp(lp - d)
        rc = np.clip(r, 1 - lo, 1 + hi)
        use_clip = rc * a < r * a
        tok = -w * np.where(use_clip, rc * a, r * a)
        g = np.where(use_clip, 0.0, -w * a * r)
        clip_active = use_clip & (m > 0)
    else:  # gspo
        n = np.maximum(m.sum(1, keepdims=True), 1)
        s = np.exp((m * (lp - d)).sum(1, keepdims=True) / n) * np.ones_like(lp)
        sc = np.clip(s, 1 - lo, 1 + hi)
        use_clip = sc * a < s * a
        tok = -w * np.where(use_clip, sc * a, s * a)
        g = np.where(use_clip, 0.0, -w * a * s)  # token form: d/dlp_t of sg(s) exp(lp_t - sg(lp_t)) = s
        clip_active = use_clip & (m > 0)
    if kl_coef:
        x = lp - LREF
        k = {"k1": x, "k2": 0.5 * x**2, "k3": np.exp(-x) - 1 + x}[est]
        dk = {"k1": np.ones_like(x), "k2": x, "k3": 1 - np.exp(-x)}[est]
        tok, g = tok + kl_coef * k, g + kl_coef * dk
    if ent is not None and ent_coef:
        tok = tok - ent_coef * ent
    if agg == "token_mean":
        norm = m.sum()
        total, grad = (m * tok).sum() / norm, m * g / norm
    else:
        per = m.sum(1, keepdims=True)
        rows = per[:, 0] > 0
        norm = rows.sum()
        total = ((m * tok).sum(1) / np.maximum(per[:, 0], 1))[rows].sum() / norm
        grad = m * g / np.maximum(per, 1) / norm
    mb = m.astype(bool)
    shown = raw if corr == "none" or (corr == "tis" and cap == 0) else w
    stats = {
        "is_weight_mean": shown[mb].mean(), "is_weight_max": raw[mb].max(), "is_clip_fraction": cut[mb].mean(),
        "clip_fraction": clip_active[mb].mean(), "logprob_mismatch": np.abs(lp - lb)[mb].mean(),
        "kl": (raw_b - 1 - np.log(raw_b))[mb].mean(),
    }
    return total, grad, stats


CASES = [
    *[dict(loss=lo, corr=c) for lo, c in itertools.product(["grpo", "ppo", "gspo"], ["none", "tis", "icepop", "decoupled"])],
    dict(loss="ppo", corr="decoupled", prox="loglinear"),
    dict(loss="grpo", corr="decoupled", prox="loglinear"),
    dict(loss="gspo", corr="decoupled", prox="loglinear", agg="seq_mean", lo=3e-4, hi=4e-4),
    dict(loss="ppo", corr="none", lo=0.1, hi=0.3),
    dict(loss="ppo", corr="tis", cap=1.5, agg="seq_mean"),
    dict(loss="grpo", corr="tis", cap=0.0),
    dict(loss="grpo", corr="icepop", ip=(0.8, 1.2)),
    dict(loss="gspo", corr="none", agg="seq_mean"),
    dict(loss="grpo", corr="tis", kl_coef=0.1, est="k1"),
    dict(loss="ppo", corr="tis", kl_coef=0.1, est="k2"),
    dict(loss="ppo", corr="decoupled", prox="loglinear", kl_coef=0.3, est="k3"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_policy_loss_matches_numpy(case):
    ref_loss, ref_grad, ref_stats = numpy_loss(**case)
    lp = _t(LP, grad=True)
    loss, stats = policy_loss(
        lp, _t(LB), _t(ADV), _t(MASK), loss=case["loss"], correction=case["corr"], tis_cap=case.get("cap", 2.0),
        eps_clip_low=case.get("lo", 0.2), eps_clip_high=case.get("hi", 0.2),
        icepop_low=case.get("ip", (0.5, 5.0))[0], icepop_high=case.get("ip", (0.5, 5.0))[1],
        prox=case.get("prox", "recompute"), versions=_t(VERS), v_theta=V_THETA, prox_lag=LAG,
        agg=case.get("agg", "token_mean"), ref_logprobs=_t(LREF) if case.get("kl_coef") else None,
        kl_coef=case.get("kl_coef", 0.0), kl_estimator=case.get("est", "k3"),
    )
    assert float(loss.detach()) == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    loss.backward()
    np.testing.assert_allclose(lp.grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12)
    for k, v in ref_stats.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_fixture_exercises_clipping_and_masking():
    """The fixed tensors must hit each mechanism, or the numpy comparisons prove little."""
    for case in (dict(loss="ppo", corr="none"), dict(loss="gspo", corr="none")):
        assert 0 < numpy_loss(**case)[2]["clip_fraction"] < 1
    assert 0 < numpy_loss("grpo", "tis")[2]["is_clip_fraction"] < 1
    assert 0 < numpy_loss("grpo", "icepop", ip=(0.8, 1.2))[2]["is_clip_fraction"] < 1
    assert 0 < numpy_loss("ppo", "decoupled", prox="loglinear")[2]["clip_fraction"] < 1


def test_default_equals_grpo_tis_loss():
    """loss='grpo', correction='tis' is the existing grpo_tis_loss, value and stats."""
    f = torch.float32
    lp, lb, adv, m = (torch.tensor(x, dtype=f) for x in (LP, LB, ADV, MASK))
    a, sa = policy_loss(lp, lb, adv, m, tis_cap=2.0)
    b, sb = grpo_tis_loss(lp, lb, adv, m, tis_cap=2.0)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    for k in ("is_weight_mean", "is_weight_max", "is_clip_fraction", "logprob_mismatch", "kl", "num_tokens"):
        assert float(sa[k]) == pytest.approx(float(sb[k]), rel=1e-6), k


ON_POLICY = [
    dict(loss=lo, correction=c, prox=p)
    for lo, c, p in itertools.product(["grpo", "ppo"], ["none", "tis", "icepop", "decoupled"], ["recompute", "loglinear"])
    if c == "decoupled" or p == "recompute"
]


@pytest.mark.parametrize("kw", ON_POLICY, ids=lambda k: "-".join(k.values()))
def test_on_policy_every_correction_is_reinforce(kw):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 10, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 10, (3, 6))
    mask = (torch.rand(3, 6) > 0.3).double()
    adv = torch.randn(3, 1, dtype=torch.float64).expand(3, 6)
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    vers = torch.full((3, 6), 7.0)
    loss, stats = policy_loss(lp, lp.detach(), adv, mask, versions=vers, v_theta=7, **kw)
    pg = policy_gradient_loss(lp, adv, mask)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(pg, logits)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    if kw["loss"] == "grpo":
        assert float(loss) == pytest.approx(float(pg), rel=1e-12)
    assert float(stats["is_weight_mean"]) == pytest.approx(1.0) and float(stats["clip_fraction"]) == 0.0
    assert float(stats["is_clip_fraction"]) == 0.0 and float(stats["kl"]) == pytest.approx(0.0, abs=1e-12)


def test_on_policy_gspo_is_sequence_mean_reinforce():
    torch.manual_seed(1)
    lp = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    adv = torch.tensor([[0.5], [-1.0], [2.0], [0.3]], dtype=torch.float64).expand(4, 5)
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, loss="gspo", correction="none", agg="seq_mean")
    ref = (-(mask * adv * lp).sum(1) / mask.sum(1)).mean()
    (g1,) = torch.autograd.grad(loss, lp)
    (g2,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(g1, g2)


def test_loglinear_alpha_formula():
    lp, lb = torch.tensor([-1.0, -1.0, -1.0, -1.0]), torch.tensor([-3.0, -3.0, -3.0, -3.0])
    vers = torch.tensor([10.0, 8.0, 6.0, 9.0])  # v_theta = 10, prox_lag = 1 -> v_prox = 9
    lx = loglinear_proximal(lp, lb, vers, v_theta=10, prox_lag=1)
    alpha = np.array([1.0, 0.5, 0.75, 0.0])  # on-policy; (9-8)/(10-8); (9-6)/(10-6); (9-9)/(10-9)
    np.testing.assert_allclose(lx.numpy(), -3.0 + alpha * 2.0, rtol=1e-6)


def test_kl_estimators_and_entropy_gradient():
    x = np.array([0.3, -0.2, 1.1])
    lp, lref = torch.tensor(x), torch.zeros(3, dtype=torch.float64)
    np.testing.assert_allclose(kl_estimate(lp, lref, "k1").numpy(), x)
    np.testing.assert_allclose(kl_estimate(lp, lref, "k2").numpy(), 0.5 * x**2)
    np.testing.assert_allclose(kl_estimate(lp, lref, "k3").numpy(), np.exp(-x) - 1 + x)
    torch.manual_seed(2)
    z = (torch.randn(2, 3, 7, dtype=torch.float64) * 3).requires_grad_(True)
    h = entropy_from_logits(z)
    logp = torch.log_softmax(z, -1)
    ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(h, ref)
    (g1,) = torch.autograd.grad(h.sum(), z)
    (g2,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(g1, g2)


def test_entropy_bonus_and_sft():
    ent = np.array([[1.0, 2.0, 0.5, 0.2, 0.1]] * 3)
    ref_loss, _, _ = numpy_loss("grpo", "tis", ent=ent, ent_coef=0.01)
    loss, stats = policy_loss(_t(LP), _t(LB), _t(ADV), _t(MASK), entropy=_t(ent), entropy_coef=0.01)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-9)
    assert float(stats["entropy_sum"]) == pytest.approx((ent * MASK).sum())
    sft, _ = policy_loss(_t(LP), _t(LB), _t(ADV), _t(MASK), loss="sft")
    assert float(sft) == pytest.approx(-(MASK * LP).sum() / MASK.sum())
