"""Trainer helpers for the policy losses: GRPO group advantages and vocab-parallel entropy.

What (pure functions on tensors, no distributed state except the optional TP group of
:func:`vocab_parallel_entropy`):

- :func:`group_advantages`: per-group reward normalisation, ``A_i = (r_i - mean) / (std + eps)``
  (GRPO) or ``r_i - mean`` (Dr. GRPO, ``std_norm=False``).  ``std`` is the unbiased sample std of
  the group, as in TRL and verl; a group of one sample gets advantage 0 (it has no baseline).
- :func:`vocab_parallel_entropy`: token entropy from (possibly vocab-sharded) logits.

The policy losses themselves are in :mod:`consumers.policy_loss`.

How: ``python -m pytest tests/test_loss.py`` checks these against an independent numpy version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

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
