"""Padded microbatches for the trainer: layout, group advantages and token-balanced splitting.

What: :func:`build_microbatches` turns a DP rank's trajectory groups into padded ``[b, s]``
:class:`Microbatch` es; :func:`split_indices` decides which sequences share a microbatch.

Layout: each trajectory is ``prompt + response`` left-aligned in a row, right padded; input
``tokens[:-1]``, labels ``tokens[1:]``.  The label at position ``P - 1 + j`` is response token
``j`` (``P`` = prompt length); the loss mask is the trajectory's ``loss_mask`` there and 0 on
prompt and padding.  Causal attention means padding never affects real tokens, so no attention
mask is needed (the CPU-safe choice: packed THD batches do not run on CPU).

Splitting: with ``max_tokens == 0`` sequences are taken in order, ``micro_batch_size`` at a time
(the original behaviour).  With ``max_tokens > 0`` (token-balanced) they are sorted by length,
longest first, and packed greedily: a microbatch takes the next sequence while
``rows * longest_row <= max_tokens`` (padded tokens, what the forward pass costs) and
``rows <= micro_batch_size``; a sequence longer than ``max_tokens`` travels alone.  Sorting puts
similar lengths together, so little compute goes to padding.

How: ``tests/test_trainer_step.py`` and ``tests/test_batching.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consumers.loss import group_advantages
from schemas.messages import TrajectoryGroup

log = logging.getLogger(__name__)

PAD_TOKEN = 0  # any valid id: padded positions are masked out of the loss and never attended to


@dataclass
class Microbatch:
    """One padded ``[b, s]`` chunk; every tensor has that shape."""

    tokens: torch.Tensor  # int64 input ids
    position_ids: torch.Tensor  # int64
    labels: torch.Tensor  # int64 next tokens
    loss_mask: torch.Tensor  # float32, 1 where the label is a trained response token
    behav_logprobs: torch.Tensor  # float32, producer log-prob of the label token (0 elsewhere)
    advantages: torch.Tensor  # float32, the sequence's advantage where loss_mask is 1, else 0
    versions: torch.Tensor | None = None  # float32, policy version that sampled the label token
    ref_logprobs: torch.Tensor | None = None  # float32, frozen reference log-probs (KL), filled by the trainer

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def _flatten(groups: list[TrajectoryGroup], std_norm: bool) -> tuple[list[Any], np.ndarray]:
    """Trajectories with a non-empty response, and the advantage of each."""
    trajs, advs = [], []
    for group in groups:
        a = group_advantages([[t.reward for t in group.trajectories]], std_norm=std_norm)[0].tolist()
        for traj, adv in zip(group.trajectories, a, strict=True):
            if len(traj.response_tokens):
                trajs.append(traj)
                advs.append(adv)
    return trajs, np.asarray(advs, dtype=np.float32)


def split_indices(lengths: list[int] | np.ndarray, micro_batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of the sequences in each microbatch (see the module docstring).  ``lengths`` are
    the padded row lengths each sequence needs."""
    n = len(lengths)
    if max_tokens <= 0:
        return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        ln = int(lengths[i])
        new_longest = max(longest, ln)
        if cur and ((len(cur) + 1) * new_longest > max_tokens or len(cur) + 1 > micro_batch_size):
            out.append(cur)
            cur, new_longest = [], ln
        cur.append(i)
        longest = new_longest
    if cur:
        out.append(cur)
    return out


def build_microbatches(
    groups: list[TrajectoryGroup], micro_batch_size: int, std_norm: bool, max_tokens: int = 0
) -> list[Microbatch]:
    """Pad this rank's trajectories into microbatches (:func:`split_indices`).  Always at least one
    microbatch (an all-masked dummy when there is nothing to train) so that every rank takes part
    in the collective schedule."""
    trajs, advs = _flatten(groups, std_norm)
    if not trajs:
        z = torch.zeros((1, 1), dtype=torch.int64)
        f = torch.zeros((1, 1), dtype=torch.float32)
        return [Microbatch(z, z.clone(), z.clone(), f, f.clone(), f.clone(), f.clone())]
    lengths = [len(t.prompt_tokens) + len(t.response_tokens) - 1 for t in trajs]
    mbs = []
    for idx in split_indices(lengths, micro_batch_size, max_tokens):
        chunk, chunk_adv = [trajs[i] for i in idx], advs[idx]
        plen = np.fromiter((len(t.prompt_tokens) for t in chunk), dtype=np.int64, count=len(chunk))
        rlen = np.fromiter((len(t.response_tokens) for t in chunk), dtype=np.int64, count=len(chunk))
        b, s = len(chunk), int((plen + rlen).max()) - 1
        full = np.full((b, s + 1), PAD_TOKEN, dtype=np.int64)
        mask = np.zeros((b, s + 1), dtype=np.float32)
        behav = np.zeros((b, s + 1), dtype=np.float32)
        vers = np.zeros((b, s + 1), dtype=np.float32)
        for row, t in enumerate(chunk):
            p, r = plen[row], rlen[row]
            full[row, :p] = t.prompt_tokens
            full[row, p : p + r] = t.response_tokens
            # label index of response token j is p - 1 + j; store at p + j, then shift by one
            mask[row, p : p + r] = t.loss_mask
            behav[row, p : p + r] = t.logprobs
            vers[row, p : p + r] = t.versions
        mask[:, 0] = 0.0  # no prompt: response token 0 has nothing to predict it
        mask_t = torch.from_numpy(mask[:, 1:].copy())
        adv = torch.from_numpy(chunk_adv).unsqueeze(1) * (mask_t > 0)
        pos = torch.arange(s, dtype=torch.int64).unsqueeze(0).expand(b, s).contiguous()
        mbs.append(
            Microbatch(
                tokens=torch.from_numpy(full[:, :-1].copy()),
                position_ids=pos,
                labels=torch.from_numpy(full[:, 1:].copy()),
                loss_mask=mask_t,
                behav_logprobs=torch.from_numpy(behav[:, 1:].copy()),
                advantages=adv,
                versions=torch.from_numpy(vers[:, 1:].copy()),
            )
        )
    return mbs
