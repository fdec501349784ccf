"""One Megatron-core trainer rank: GRPO + TIS steps on trajectory groups, HF export for publishing.

What: :class:`TrainerRank` runs in every trainer process (TP x PP x DP under torch.distributed).
It builds the model from a Hugging Face checkpoint (:mod:`consumers.model`), and
:meth:`TrainerRank.train_step` turns this DP rank's share of trajectory groups into padded
microbatches, computes the response tokens' log-probs under the current weights (vocab-parallel,
at the sampler's temperature), group-normalised advantages and the GRPO + truncated-IS loss
(:mod:`consumers.loss`), runs Megatron's forward/backward schedule and one optimizer step, and
returns statistics reduced over data-parallel ranks (the same dict on every rank).

Batch layout: each trajectory is ``prompt + response`` left-aligned in a ``[b, s]`` row, right
padded; input ``tokens[:-1]``, labels ``tokens[1:]``.  The label at position ``P - 1 + j`` is
response token ``j`` (``P`` = prompt length); the loss mask is the trajectory's ``loss_mask`` there
and 0 on prompt and padding.  Causal attention means padding never affects real tokens, so no
attention mask is needed (the CPU-safe choice: packed THD batches do not run on CPU).

Loss normalisation: each microbatch returns the *sum* over its tokens plus its token count;
with ``calculate_per_token_loss`` Megatron divides the gradients by the token count summed over
all microbatches and DP ranks, so the step optimises the global token mean.

How:

    init_distributed()                       # env:// (torchrun), or a 1-process default
    rank = TrainerRank(TrainerConfig(), "/path/to/hf")
    stats = rank.train_step(groups)          # groups: this DP rank's list[TrajectoryGroup]
    named = rank.export_hf_state()           # full HF state dict on global rank 0, {} elsewhere

Single process: :func:`init_distributed` uses env:// when MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
are all set, else a private one-process group on 127.0.0.1.  Multi-process: ``torchrun
--nproc_per_node=N ...``.  On a 2-core CPU machine call ``torch.set_num_threads(1)`` per process.

Statistics (:data:`STAT_KEYS`): ``loss`` (global token mean), ``reward_mean``, ``tokens_trained``
(response tokens with loss_mask 1), ``grad_norm`` (before clipping), ``is_weight_mean``,
``is_weight_max`` (raw ratio, before truncation), ``is_clip_fraction``, ``logprob_mismatch``,
``kl`` (k3, behaviour || current), ``entropy``, ``num_sequences``, ``step_seconds``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from consumers import bridge
from consumers.config import TrainerConfig
from consumers.loss import group_advantages, grpo_tis_loss, vocab_parallel_entropy
from consumers.model import build_trainable_model
from schemas.messages import TrajectoryGroup

log = logging.getLogger(__name__)

PAD_TOKEN = 0  # any valid id: padded positions are masked out of the loss and never attended to

STAT_KEYS = (
    "loss", "reward_mean", "tokens_trained", "grad_norm", "is_weight_mean", "is_weight_max",
    "is_clip_fraction", "logprob_mismatch", "kl", "entropy", "num_sequences", "step_seconds",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """``dist.init_process_group``: env:// when ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and
    ``WORLD_SIZE`` are all set (torchrun sets them); otherwise a single local process (rank 0 of
    1 on 127.0.0.1 and a free port), without touching ``os.environ`` (so subprocesses started
    later do not inherit a stale rendezvous).  Backend: nccl with CUDA, gloo without.  No-op if
    already initialised."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(seconds=timeout_s)
    if all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        where = f"env:// {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        dist.init_process_group(backend, timeout=timeout)
    else:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT/RANK are not all set; use torchrun")
        where = f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=where, rank=0, world_size=1, timeout=timeout)
    log.info("torch.distributed: rank %d/%d via %s (%s)", dist.get_rank(), dist.get_world_size(), backend, where)


@dataclass
class Microbatch:
    """One padded ``[b, s]`` chunk; every tensor has that shape."""

    tokens: torch.Tensor  # int64 input ids
    position_ids: torch.Tensor  # int64
    labels: torch.Tensor  # int64 next tokens
    loss_mask: torch.Tensor  # float32, 1 where the label is a trained response token
    behav_logprobs: torch.Tensor  # float32, producer log-prob of the label token (0 elsewhere)
    advantages: torch.Tensor  # float32, the sequence's advantage where loss_mask is 1, else 0

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


def build_microbatches(groups: list[TrajectoryGroup], micro_batch_size: int, std_norm: bool) -> list[Microbatch]:
    """Pad this rank's trajectories into microbatches of ``micro_batch_size`` sequences.  Always at
    least one microbatch (an all-masked dummy when there is nothing to train) so that every rank
    takes part in the collective schedule."""
    trajs, advs = _flatten(groups, std_norm)
    if not trajs:
        z = torch.zeros((1, 1), dtype=torch.int64)
        f = torch.zeros((1, 1), dtype=torch.float32)
        return [Microbatch(z, z.clone(), z.clone(), f, f.clone(), f.clone())]
    mbs = []
    for i in range(0, len(trajs), micro_batch_size):
        chunk, chunk_adv = trajs[i : i + micro_batch_size], advs[i : i + micro_batch_size]
        plen = np.fromiter((len(t.prompt_tokens) for t in chunk), dtype=np.int64, count=len(chunk))
        rlen = np.fromiter((len(t.response_tokens) for t in chunk), dtype=np.int64, count=len(chunk))
        b, s = len(chunk), int((plen + rlen).max()) - 1
        full = np.full((b, s + 1), PAD_TOKEN, dtype=np.int64)
        mask = np.zeros((b, s + 1), dtype=np.float32)
        behav = np.zeros((b, s + 1), dtype=np.float32)
        for row, t in enumerate(chunk):
            p, r = plen[row], rlen[row]
            full[row, :p] = t.prompt_tokens
            full[row, p : p + r] = t.response_tokens
            # label index of response token j is p - 1 + j; store at p + j, then shift by one
            mask[row, p : p + r] = t.loss_mask
            behav[row, p : p + r] = t.logprobs
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
            )
        )
    return mbs


class TrainerRank:
    """One trainer process: model stage + optimizer; see the module docstring."""

    def __init__(self, cfg: TrainerConfig, hf_path: str | Path) -> None:
        from megatron.core import parallel_state as ps

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call consumers.trainer.init_distributed() first")
        self.cfg = cfg
        self.hf_path = str(hf_path)
        built = build_trainable_model(cfg, hf_path)
        self.model, self.optimizer, self.spec, self.mconfig = built.model, built.optimizer, built.spec, built.config
        self._ps = ps
        self.steps_done = 0
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        log.info(
            "trainer rank %d ready: TP %d/%d PP %d/%d DP %d/%d", dist.get_rank(),
            self.tp_rank, cfg.tensor_parallel, self.pp_rank, cfg.pipeline_parallel, self.dp_rank, self.dp_size,
        )

    # ------------------------------------------------------------------ topology
    @property
    def dp_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    @property
    def tp_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    @property
    def is_publisher(self) -> bool:
        """Global rank 0: holds the exported HF state and drives the weight publisher."""
        return dist.get_rank() == 0

    # ------------------------------------------------------------------ training
    def _loss_func(self, mb: Microbatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from megatron.core import tensor_parallel

        cfg = self.cfg
        z = logits.float()
        if cfg.temperature != 1.0:
            z = z / cfg.temperature
        mask = mb.loss_mask.to(z.device)
        if cfg.compute_entropy:
            tp_group = self._ps.get_tensor_model_parallel_group() if cfg.tensor_parallel > 1 else None
            entropy_sum = (vocab_parallel_entropy(z, tp_group) * mask).sum()
        else:
            entropy_sum = torch.zeros((), device=z.device)
        # vocab-parallel CE (the op GPTModel uses when given labels); it reuses z's storage
        logp = -tensor_parallel.vocab_parallel_cross_entropy(z, mb.labels.to(z.device))
        loss_sum, st = grpo_tis_loss(
            logp, mb.behav_logprobs.to(z.device), mb.advantages.to(z.device), mask, cfg.tis_cap, reduction="sum"
        )
        report = {
            "loss_sum": loss_sum.detach(),
            "num_tokens": st["num_tokens"],
            "is_weight_sum": st["is_weight_sum"],
            "is_weight_max": st["is_weight_max"],
            "is_clip_count": st["is_clip_count"],
            "logprob_mismatch_sum": st["logprob_mismatch_sum"],
            "kl_sum": st["kl_sum"],
            "entropy_sum": entropy_sum.float(),
        }
        return loss_sum, st["num_tokens"].to(torch.int), report

    def _forward_step(self, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        mb: Microbatch = next(data_iterator)
        out = model(mb.tokens.to(self._device), mb.position_ids.to(self._device), None)
        return out, partial(self._loss_func, mb)

    def train_step(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """One optimizer step on this DP rank's ``groups`` (TP/PP peers pass the same list).
        Collective over all trainer ranks.  Returns :data:`STAT_KEYS`, reduced over DP."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t0 = time.perf_counter()
        cfg = self.cfg
        mbs = build_microbatches(groups, cfg.micro_batch_size, cfg.advantage_std_norm)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(mbs),
            model=[self.model],
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs),
            micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=False,
        )
        success, grad_norm, _ = self.optimizer.step()
        if not success:
            log.warning("optimizer step skipped (inf/nan gradients)")
        if cfg.grad_clip == 0 and success:
            grad_norm = self.optimizer.get_grad_norm()
        self.steps_done += 1
        stats = self._reduce_stats(results, groups, grad_norm)
        stats["step_seconds"] = time.perf_counter() - t0
        return stats

    def _reduce_stats(self, results: list[dict[str, torch.Tensor]], groups: list[TrajectoryGroup], grad_norm: Any) -> dict[str, float]:
        ps = self._ps
        keys = ("loss_sum", "num_tokens", "is_weight_sum", "is_clip_count", "logprob_mismatch_sum", "kl_sum", "entropy_sum")
        rewards = [t.reward for g in groups for t in g.trajectories]
        sums = torch.zeros(len(keys) + 2, dtype=torch.float64)
        wmax = torch.zeros(1, dtype=torch.float64)
        for r in results or []:  # only the last PP stage has results
            for i, k in enumerate(keys):
                sums[i] += float(r[k])
            wmax[0] = max(float(wmax[0]), float(r["is_weight_max"]))
        sums[len(keys)] = float(sum(rewards))
        sums[len(keys) + 1] = float(len(rewards))
        if self.dp_size > 1:
            dp_group = ps.get_data_parallel_group()
            dist.all_reduce(sums, group=dp_group)
            dist.all_reduce(wmax, op=dist.ReduceOp.MAX, group=dp_group)
        if self.cfg.pipeline_parallel > 1:  # results live on the last stage
            both = torch.cat([sums, wmax])
            dist.broadcast(both, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
            sums, wmax = both[:-1], both[-1:]
        s = dict(zip(keys, sums.tolist(), strict=False))
        n = max(s["num_tokens"], 1.0)
        n_traj = float(sums[len(keys) + 1])
        return {
            "loss": s["loss_sum"] / n,
            "reward_mean": float(sums[len(keys)]) / n_traj if n_traj else math.nan,
            "tokens_trained": s["num_tokens"],
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "is_weight_mean": s["is_weight_sum"] / n,
            "is_weight_max": float(wmax[0]),
            "is_clip_fraction": s["is_clip_count"] / n,
            "logprob_mismatch": s["logprob_mismatch_sum"] / n,
            "kl": s["kl_sum"] / n,
            "entropy": s["entropy_sum"] / n if self.cfg.compute_entropy else math.nan,
            "num_sequences": n_traj,
        }

    # ------------------------------------------------------------------ weights
    def export_hf_state(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on global rank 0 (``{}`` elsewhere); collective over DP replica 0."""
        return bridge.export_hf_state(self.model, self.spec)

    def shutdown(self) -> None:
        """Tear down Megatron's parallel state (the process group is the caller's)."""
        self._ps.destroy_model_parallel()
