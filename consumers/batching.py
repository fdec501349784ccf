"""Microbatches for the trainer: padded or packed rows, group advantages, token-balanced splitting.

What: :func:`make_microbatches` (the trainer's entry point) turns a DP rank's trajectory groups
into :class:`Microbatch` es: padded ``[b, s]`` rows (:func:`build_microbatches`, one trajectory
per row) or packed rows (:func:`build_packed_microbatches`, several trajectories per row);
:func:`split_indices` decides which rows share a microbatch.

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

Packing (``packing="block_diagonal"``, :func:`build_packed_microbatches`): several trajectories
share one row, back to back (first-fit decreasing, longest first, into rows of at most
``row_tokens`` tokens; a longer one gets a row of its own).  Each token carries its segment id
(its trajectory's index in the row, -1 on the row's padded tail); the trainer turns these into a
block-diagonal causal attention mask (:func:`block_causal_mask`) so a token attends only to the
earlier tokens of its own trajectory, and ``position_ids`` restart at 0 per trajectory.  Rows are
then split into microbatches by :func:`split_indices` (``rows * longest_row <= max_tokens``,
``micro_batch_size`` rows at most).  ``row_tokens = 0`` (default) makes rows as long as the
batch's longest trajectory.  A microbatch whose rows hold one trajectory each gets
``segment_ids = None`` (no explicit mask: Megatron's built-in causal mask is the same there).
Per-token tensors stay in the row layout the model sees; ``seq_index`` / ``seq_valid`` map them
back to one row per trajectory (:func:`unpack`), which the loss uses so that sequence-level
quantities (``seq_mean``, GSPO's ratio) see trajectory boundaries, not packed rows.

Why and when: packing removes padding (linear layers, LM head and loss then see real tokens
only), but with an explicit mask attention costs ``row^2`` per row whoever the tokens belong to;
rows much longer than the trajectories turn ``sum(L_i^2)`` into ``(sum L_i)^2``.  It helps when
lengths vary a lot and rows stay near the longest trajectory; it does not when lengths are
similar (token-balanced padding already wastes little) or rows are long (``bench/packing_cpu.py``).
Megatron's RoPE (``position_embedding_type="rope"``) ignores ``position_ids`` and rotates by the
absolute position in the row; attention scores depend only on the offset between two tokens of
one trajectory, so a trajectory placed at an offset gets the same log-probs up to float rounding
(measured in ``tests/test_packing.py``).  Why not THD/``PackedSeqParams``: megatron-core's local
``DotProductAttention`` asserts ``packed_seq_params is None``; THD needs Transformer Engine.

How: ``tests/test_trainer_step.py``, ``tests/test_packing.py``.
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
    # packing only (None for padded rows): segment of each token within its row (-1 = padding);
    # seq_index[i, k] = flat index (into the [b*s] row layout) of trajectory i's k-th label,
    # valid where seq_valid is True
    segment_ids: torch.Tensor | None = None  # int64 [b, s]
    seq_index: torch.Tensor | None = None  # int64 [n, L]
    seq_valid: torch.Tensor | None = None  # bool [n, L]
    traj_order: list[int] | None = None  # index (in :func:`flatten` order) of each trajectory: row (padded) or seq_index row (packed)
    # flat positions (into [b*s]) with loss_mask > 0: the tokens whose log-probs the loss needs
    # (the fused log-prob path projects only these); set by :meth:`to_device`
    loss_index: torch.Tensor | None = None
    host_segment_ids: torch.Tensor | None = None  # the CPU copy of segment_ids (set by to_device)

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to_device(self, device: torch.device) -> Microbatch:
        """A copy with every tensor on ``device`` (moved once, at the start of a step, so the
        forward passes do no host-device copies), plus ``loss_index`` built on the CPU."""
        moved: dict[str, Any] = {}
        for name in ("tokens", "position_ids", "labels", "loss_mask", "behav_logprobs", "advantages", "versions",
                     "ref_logprobs", "segment_ids", "seq_index", "seq_valid"):
            t = getattr(self, name)
            moved[name] = t.to(device) if t is not None else None
        index = torch.nonzero(self.loss_mask.reshape(-1) > 0, as_tuple=True)[0]
        return Microbatch(**moved, traj_order=self.traj_order, loss_index=index.to(device),
                          host_segment_ids=self.segment_ids)


def flatten(groups: list[TrajectoryGroup], std_norm: bool) -> tuple[list[Any], np.ndarray]:
    """Trajectories with a non-empty response, and the advantage of each (the order
    ``Microbatch.traj_order`` refers to)."""
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
    trajs, advs = flatten(groups, std_norm)
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
                traj_order=list(idx),
            )
        )
    return mbs


# ------------------------------------------------------------------ packing


def pack_rows(lengths: list[int] | np.ndarray, row_tokens: int, max_per_row: int = 0) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each packed row.  Sequences are taken
    longest first (ties by index) and each goes into the first row with room for it (``sum of
    lengths <= row_tokens`` and, if ``max_per_row > 0``, at most that many sequences); a sequence
    longer than ``row_tokens`` gets a row of its own.  Rows come out longest first."""
    if row_tokens <= 0:
        raise ValueError(f"row_tokens must be > 0, got {row_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        ln = int(lengths[i])
        for r, u in enumerate(used):
            if u + ln <= row_tokens and (max_per_row <= 0 or len(rows[r]) < max_per_row):
                rows[r].append(i)
                used[r] += ln
                break
        else:
            rows.append([i])
            used.append(ln)
    by_len = sorted(range(len(rows)), key=lambda r: (-used[r], r))
    return [rows[r] for r in by_len]


def _label_layout(traj: Any) -> tuple[np.ndarray, ...]:
    """One trajectory in label space (length ``P + R - 1``): input ids, labels, loss mask,
    behaviour log-probs, versions.  Label ``k`` is token ``k + 1``; response token ``j`` is
    label ``P - 1 + j`` (dropped when ``P = 0, j = 0``: nothing predicts it)."""
    p = len(traj.prompt_tokens)
    full = np.concatenate([np.asarray(traj.prompt_tokens, np.int64), np.asarray(traj.response_tokens, np.int64)])
    n = len(full) - 1
    mask, behav, vers = (np.zeros(n + 1, np.float32) for _ in range(3))
    mask[p:] = traj.loss_mask
    behav[p:] = traj.logprobs
    vers[p:] = traj.versions
    return full[:-1], full[1:], mask[1:], behav[1:], vers[1:]


def build_packed_microbatches(
    groups: list[TrajectoryGroup], std_norm: bool, row_tokens: int, max_tokens: int = 0, rows_per_microbatch: int = 64
) -> list[Microbatch]:
    """Pack this rank's trajectories into rows of at most ``row_tokens`` tokens
    (:func:`pack_rows`), then split the rows into microbatches with :func:`split_indices`
    (``rows_per_microbatch`` rows, ``max_tokens`` padded tokens at most).  Same per-token values
    as :func:`build_microbatches`; see the module docstring for the extra fields."""
    trajs, advs = flatten(groups, std_norm)
    if not trajs:
        return build_microbatches([], 1, std_norm)
    lengths = [len(t.prompt_tokens) + len(t.response_tokens) - 1 for t in trajs]
    rows = pack_rows(lengths, row_tokens)
    row_len = [sum(lengths[i] for i in row) for row in rows]
    mbs = []
    for ridx in split_indices(row_len, rows_per_microbatch, max_tokens):
        b, s = len(ridx), max(1, max(row_len[r] for r in ridx))
        tok, lab, pos = (np.full((b, s), PAD_TOKEN, np.int64) for _ in range(3))
        pos[:] = 0
        seg = np.full((b, s), -1, np.int64)
        mask, behav, vers, adv = (np.zeros((b, s), np.float32) for _ in range(4))
        order = [i for r in ridx for i in rows[r]]
        lmax = max(1, max(lengths[i] for i in order))
        sidx = np.zeros((len(order), lmax), np.int64)
        svalid = np.zeros((len(order), lmax), bool)
        k = 0
        for row, r in enumerate(ridx):
            off = 0
            for sg, i in enumerate(rows[r]):
                n = lengths[i]
                x, y, m, lb, v = _label_layout(trajs[i])
                sl = slice(off, off + n)
                tok[row, sl], lab[row, sl], mask[row, sl], behav[row, sl], vers[row, sl] = x, y, m, lb, v
                adv[row, sl] = advs[i] * (m > 0)
                pos[row, sl] = np.arange(n)
                seg[row, sl] = sg
                sidx[k, :n] = row * s + off + np.arange(n)
                svalid[k, :n] = True
                off += n
                k += 1
        mbs.append(
            Microbatch(
                tokens=torch.from_numpy(tok),
                position_ids=torch.from_numpy(pos),
                labels=torch.from_numpy(lab),
                loss_mask=torch.from_numpy(mask),
                behav_logprobs=torch.from_numpy(behav),
                advantages=torch.from_numpy(adv),
                versions=torch.from_numpy(vers),
                # rows of one trajectory each need no mask: Megatron's causal one is the same there
                segment_ids=torch.from_numpy(seg) if int(seg.max()) > 0 else None,
                seq_index=torch.from_numpy(sidx),
                seq_valid=torch.from_numpy(svalid),
                traj_order=order,
            )
        )
    log.debug(
        "packed %d trajectories (%d tokens) into %d rows, %d microbatches",
        len(trajs), sum(lengths), len(rows), len(mbs),
    )
    return mbs


def make_microbatches(
    groups: list[TrajectoryGroup], std_norm: bool, packing: str, micro_batch_size: int, max_tokens: int, row_tokens: int = 0
) -> list[Microbatch]:
    """The trainer's entry point: :func:`build_microbatches` for ``packing="none"``, else
    :func:`build_packed_microbatches` with rows of ``row_tokens`` tokens and at most
    ``micro_batch_size`` rows per microbatch.  ``row_tokens = 0``: rows as long as this batch's
    longest trajectory, so no row costs more attention than the longest padded row would (the
    explicit mask makes attention O(row^2): long rows of many short trajectories are slower)."""
    if packing == "none":
        return build_microbatches(groups, micro_batch_size, std_norm, max_tokens)
    if packing == "block_diagonal":
        cap = row_tokens or max(
            (len(t.prompt_tokens) + len(t.response_tokens) - 1 for g in groups for t in g.trajectories if len(t.response_tokens)),
            default=1,
        )
        return build_packed_microbatches(groups, std_norm, max(cap, 1), max_tokens, micro_batch_size)
    raise ValueError(f"unknown packing {packing!r}")


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's attention mask for packed rows: bool ``[b, 1, s, s]``, True = masked (the local
    spec's ``attention_mask_func`` fills True with -10000 before the softmax).  Query ``i`` may
    attend to key ``j`` iff ``j <= i`` and both belong to the same segment."""
    s = segment_ids.shape[-1]
    future = torch.ones((s, s), dtype=torch.bool, device=segment_ids.device).triu(1)
    other = segment_ids.unsqueeze(-1) != segment_ids.unsqueeze(-2)
    return (other | future).unsqueeze(1)


def unpack(x: torch.Tensor, mb: Microbatch, fill: float = 0.0) -> torch.Tensor:
    """Per-token tensor in the row layout ``[b, s]`` -> one row per trajectory ``[n, L]`` (the
    layout of padded microbatches), ``fill`` past each trajectory's end.  Differentiable."""
    if mb.seq_index is None or mb.seq_valid is None:
        return x
    idx, valid = mb.seq_index.to(x.device), mb.seq_valid.to(x.device)
    out = x.reshape(-1)[idx]
    return torch.where(valid, out, torch.full_like(out, fill))
