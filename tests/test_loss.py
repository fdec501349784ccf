"""consumers/loss.py and the reference losses (tests/reference_losses.py) against an independent numpy computation, plus the on-policy identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers.loss import group_advantages, vocab_parallel_entropy
from tests.reference_losses import grpo_tis_loss, importance_weights, policy_gradient_loss

# fixed tensors: 2 sequences x 5 tokens
LOGP_NEW = np.array([[-0.5, -1.2, -0.1, -2.0, -0.7], [-0.3, -3.0, -0.9, -0.05, -1.5]], dtype=np.float32)
LOGP_BEHAV = np.array([[-0.6, -0.2, -0.1, -2.9, -0.7], [-1.9, -2.8, -0.4, -0.05, -0.2]], dtype=np.float32)
MASK = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=np.float32)
ADV = np.array([[0.0, 1.5, 1.5, 1.5, 1.5], [0.0, 0.0, -0.8, -0.8, -0.8]], dtype=np.float32)


def _numpy_reference(cap: float):
    ratio = np.exp(LOGP_NEW.astype(np.float64) - LOGP_BEHAV)
    w = np.ones_like(ratio) if cap == 0 else np.minimum(ratio, cap)
    n = MASK.sum()
    loss = -(MASK * ADV * w * LOGP_NEW).sum() / n
    m = MASK.astype(bool)
    shown = ratio if cap == 0 else w
    return {
        "loss": loss,
        "num_tokens": n,
        "is_weight_mean": shown[m].mean(),
        "is_weight_max": ratio[m].max(),  # before truncation
        "is_clip_fraction": (ratio[m] >= cap).mean() if cap > 0 else 0.0,
        "logprob_mismatch": np.abs(LOGP_NEW - LOGP_BEHAV)[m].mean(),
        "kl": (ratio - 1 - np.log(ratio))[m].mean(),
    }


@pytest.mark.parametrize("cap", [2.0, 1.0, 0.0])
def test_grpo_tis_loss_matches_numpy(cap):
    ref = _numpy_reference(cap)
    loss, stats = grpo_tis_loss(
        torch.tensor(LOGP_NEW), torch.tensor(LOGP_BEHAV), torch.tensor(ADV), torch.tensor(MASK), tis_cap=cap
    )
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-6)
    for key in ("num_tokens", "is_weight_mean", "is_weight_max", "is_clip_fraction", "logprob_mismatch", "kl"):
        assert float(stats[key]) == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    if cap == 2.0:
        assert 0 < float(stats["is_clip_fraction"]) < 1  # the fixture has clipped and unclipped tokens


def test_sum_reduction_and_gradient():
    logp = torch.tensor(LOGP_NEW, requires_grad=True)
    total, stats = grpo_tis_loss(logp, torch.tensor(LOGP_BEHAV), torch.tensor(ADV), torch.tensor(MASK), 2.0, reduction="sum")
    mean, _ = grpo_tis_loss(logp, torch.tensor(LOGP_BEHAV), torch.tensor(ADV), torch.tensor(MASK), 2.0)
    assert float(total.detach()) == pytest.approx(float(mean.detach()) * float(stats["num_tokens"]), rel=1e-6)
    total.backward()
    # d/dlogp of -(mask*A*w*logp) with w detached is -mask*A*w
    w = np.minimum(np.exp(LOGP_NEW.astype(np.float64) - LOGP_BEHAV), 2.0)
    np.testing.assert_allclose(logp.grad.numpy(), -(MASK * ADV * w), rtol=1e-6, atol=1e-7)


def test_on_policy_tis_equals_policy_gradient():
    """Behaviour = current policy: every weight is 1, so TIS loss and gradient are plain REINFORCE."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 10, requires_grad=True)
    labels = torch.randint(0, 10, (3, 6))
    mask = (torch.rand(3, 6) > 0.3).float()
    adv = torch.randn(3, 1).expand(3, 6)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    tis, stats = grpo_tis_loss(logp, logp.detach(), adv, mask, tis_cap=2.0)
    pg = policy_gradient_loss(logp, adv, mask)
    assert float(tis) == pytest.approx(float(pg), rel=1e-6)
    (g_tis,) = torch.autograd.grad(tis, logits, retain_graph=True)
    (g_pg,) = torch.autograd.grad(pg, logits)
    torch.testing.assert_close(g_tis, g_pg)
    assert float(stats["is_weight_mean"]) == pytest.approx(1.0) and float(stats["is_clip_fraction"]) == 0.0


def test_no_trained_tokens_gives_zero_loss():
    z = torch.zeros(4)
    loss, stats = grpo_tis_loss(z - 1, z - 1, z + 1, z, 2.0)
    assert float(loss) == 0.0 and float(stats["num_tokens"]) == 0.0 and float(stats["is_weight_max"]) == 0.0


def test_importance_weights_cap_and_off():
    new, behav = torch.tensor([0.0, -1.0]), torch.tensor([-2.0, -1.0])
    w, ratio = importance_weights(new, behav, 2.0)
    torch.testing.assert_close(ratio, torch.tensor([np.exp(2.0), 1.0], dtype=torch.float32))
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0]))
    w_off, _ = importance_weights(new, behav, 0.0)
    torch.testing.assert_close(w_off, torch.ones(2))


def test_group_advantages_numpy():
    groups = [[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2], [3.0]]
    adv = group_advantages(groups, std_norm=True, eps=1e-6)
    g = np.array(groups[0])
    np.testing.assert_allclose(adv[0].numpy(), (g - g.mean()) / (g.std(ddof=1) + 1e-6), rtol=1e-6)
    assert not adv[1].any()  # all equal: exactly no signal
    assert not adv[2].any()  # one sample: no baseline
    dr = group_advantages(groups, std_norm=False)
    np.testing.assert_allclose(dr[0].numpy(), g - g.mean(), rtol=1e-6)
    assert all(a.dtype == torch.float32 for a in adv)


def test_entropy_matches_softmax():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7) * 3
    p = torch.softmax(logits, -1)
    ref = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(vocab_parallel_entropy(logits), ref, rtol=1e-5, atol=1e-6)
