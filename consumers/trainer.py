"""One Megatron-core trainer rank: GRPO + TIS steps on trajectory groups, HF export for publishing.

What: :class:`TrainerRank` runs in every trainer process (TP x PP x DP under torch.distributed).
It builds the model from a Hugging Face checkpoint (:mod:`consumers.model`), and
:meth:`TrainerRank.train_step` turns this DP rank's share of trajectory groups into padded
microbatches (padded or packed, :mod:`consumers.batching`), computes the response tokens' log-probs
under the current weights (vocab-parallel, at the sampler's temperature), group-normalised
advantages and the configured policy loss (:mod:`consumers.policy_loss`), runs Megatron's forward/backward schedule and one optimizer step, and
returns statistics reduced over data-parallel ranks (the same dict on every rank).

Batch layout: each trajectory is ``prompt + response`` left-aligned in a ``[b, s]`` row, right
padded; input ``tokens[:-1]``, labels ``tokens[1:]``.  The label at position ``P - 1 + j`` is
response token ``j`` (``P`` = prompt length); the loss mask is the trajectory's ``loss_mask`` there
and 0 on prompt and padding.  Causal attention means padding never affects real tokens, so no
attention mask is needed (the CPU-safe choice: packed THD batches do not run on CPU).  With
``packing = "block_diagonal"`` several trajectories share a row (:mod:`consumers.batching`); the
forward step passes Megatron a block-diagonal causal ``attention_mask`` (bool ``[b, 1, s, s]``,
True = masked: the local spec's ``FusedScaleMaskSoftmax`` uses an explicit mask instead of its
built-in causal one on the torch softmax path, megatron-core 0.16.1 and 0.19.2 alike), and the
loss unpacks every per-token tensor to one row per trajectory before :func:`policy_loss`, so
sequence-level aggregation and GSPO's ratio use trajectory boundaries.  The fused softmax kernel
(``masked_softmax_fusion``, fp16/bf16) ignores the mask under ``attn_mask_type=causal``, and a
sliding window replaces it: both are refused with packing.

Loss normalisation: each microbatch returns the *sum* over its tokens plus its token count;
with ``calculate_per_token_loss`` Megatron divides the gradients by the token count summed over
all microbatches and DP ranks, so the step optimises the global token mean.

How:

    init_distributed()                       # env:// (torchrun), or a 1-process default
    rank = TrainerRank(TrainerConfig(), "/path/to/hf")
    stats = rank.train_step(groups)          # groups: this DP rank's list[TrajectoryGroup]
    named = rank.export_hf_state()           # full HF state dict on global rank 0, {} elsewhere
    part = rank.export_hf_stage()            # this PP stage's part on its leader (per-stage publishing)

Single process: :func:`init_distributed` uses env:// when MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE
are all set, else a private one-process group on 127.0.0.1.  Multi-process: ``torchrun
--nproc_per_node=N ...``.  On a 2-core CPU machine call ``torch.set_num_threads(1)`` per process.

Statistics (:data:`STAT_KEYS`): ``loss`` (global token mean), ``reward_mean``, ``tokens_trained``
(response tokens with loss_mask 1), ``grad_norm`` (before clipping), ``is_weight_mean``,
``is_weight_max`` (raw ratio, before truncation), ``is_clip_fraction``, ``logprob_mismatch``,
``kl`` (k3, behaviour || current), ``entropy``, ``num_sequences``, ``step_seconds``, plus
``clip_fraction`` (PPO/GSPO clip active), ``kl_ref`` (to the frozen initial weights; NaN without
``kl_coef``), ``policy_version``, ``lr`` (of this step's update), ``step_skipped`` (1: the loss or a
gradient was not finite on some rank, nothing was applied; :mod:`consumers.optim`),
``skipped_steps`` (so far) and ``bad_steps_in_a_row`` (``trainer.max_bad_steps`` of those raise
:class:`NonFiniteStepError`).

Speed (:mod:`consumers.model` builds it): the core attention is PyTorch SDPA by default
(:mod:`consumers.attention`; packed rows pass their segment ids instead of a mask), and with
``trainer.fused_logprobs`` the model returns hidden states and the log-probs of the loss tokens
come from :func:`consumers.logprobs.fused_logprobs` (no ``[tokens, vocab]`` logits).  Microbatches
are moved to the device once per step; the statistics need one host sync.

``is_clip_fraction`` counts TIS/decoupled truncation or IcePop masking.  The loss itself is selected by the config (``loss``, ``off_policy``,
``proximal``, ``loss_agg``, ``kl_coef``, ``entropy_coef``; :mod:`consumers.policy_loss`);
:meth:`TrainerRank.sft_step` is the supervised step of the ``[sft]`` stage
(:mod:`consumers.sft`), and :mod:`consumers.checkpoint` saves/resumes a rank.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from consumers import bridge
from consumers.batching import (
    PAD_TOKEN,
    Microbatch,
    block_causal_mask,
    build_microbatches,
    flatten,
    make_microbatches,
    unpack,
)
from consumers.config import TrainerConfig
from consumers.logprobs import emit_hidden, fused_logprobs, output_weight
from consumers.loss import vocab_parallel_entropy
from consumers.model import build_reference_model, build_trainable_model
from consumers.optim import BadStepTracker, NonFiniteStepError, build_scheduler, current_lr, nonfinite_flags
from consumers.policy_loss import entropy_from_logits, policy_loss
from schemas.messages import Trajectory, TrajectoryGroup

log = logging.getLogger(__name__)

#: per-microbatch sums the loss reports and the trainer adds up over microbatches and DP ranks
_SUM_KEYS = (
    "loss_sum", "loss_norm", "num_tokens", "is_weight_sum", "is_clip_count", "ppo_clip_count",
    "logprob_mismatch_sum", "kl_sum", "kl_ref_sum", "entropy_sum",
)

STAT_KEYS = (
    "loss", "reward_mean", "tokens_trained", "grad_norm", "is_weight_mean", "is_weight_max",
    "is_clip_fraction", "logprob_mismatch", "kl", "entropy", "num_sequences", "step_seconds",
    "clip_fraction", "kl_ref", "policy_version", "lr", "step_skipped", "skipped_steps", "bad_steps_in_a_row",
)

__all__ = [
    "PAD_TOKEN", "STAT_KEYS", "Microbatch", "NonFiniteStepError", "TrainerRank", "build_microbatches", "init_distributed",
]


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


def check_packing_support(tconfig: Any) -> None:
    """Raise ValueError for Megatron settings under which the explicit block-diagonal mask would be
    ignored: the fused softmax kernel (``masked_softmax_fusion``) applies its own upper-triangular
    mask for ``attn_mask_type=causal`` and drops ours; a sliding window replaces it."""
    if getattr(tconfig, "masked_softmax_fusion", False):
        raise ValueError("trainer.packing needs megatron.masked_softmax_fusion = false (the fused causal kernel ignores the mask)")
    if getattr(tconfig, "window_size", None) is not None:
        raise ValueError("trainer.packing does not support sliding-window attention (megatron.window_size)")
    if getattr(tconfig, "context_parallel_size", 1) != 1:
        raise ValueError("trainer.packing does not support context parallelism")


class TrainerRank:
    """One trainer process: model stage + optimizer; see the module docstring."""

    def __init__(self, cfg: TrainerConfig, hf_path: str | Path, total_steps: int | None = None) -> None:
        """``total_steps``: the run's RL steps (``run.steps``), the decay length of a linear/cosine
        ``trainer.lr_schedule`` when ``trainer.lr_decay_steps`` is 0."""
        from megatron.core import parallel_state as ps

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call consumers.trainer.init_distributed() first")
        self.cfg = cfg
        self.hf_path = str(hf_path)
        built = build_trainable_model(cfg, hf_path)
        self.model, self.optimizer, self.spec, self.mconfig = built.model, built.optimizer, built.spec, built.config
        self.plan = built.plan
        self._ps = ps
        self.steps_done = 0  # optimizer steps taken (RL and SFT)
        self.policy_version = 0  # version of the current weights (RL steps; restored on resume)
        self.scheduler = build_scheduler(self.optimizer, cfg, total_steps)
        self.bad_steps = BadStepTracker(cfg.max_bad_steps)
        self.ref_model = build_reference_model(cfg, hf_path, self.mconfig, self.plan) if cfg.kl_coef > 0 else None
        self._gpt = bridge.unwrap_gpt(self.model)
        self._ref_gpt = bridge.unwrap_gpt(self.ref_model) if self.ref_model is not None else None
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        if self.plan.packing != "none" and self.plan.layer_spec == "local":
            check_packing_support(self.mconfig)
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
    def _tp_group(self) -> Any:
        return self._ps.get_tensor_model_parallel_group() if self.cfg.tensor_parallel > 1 else None

    def _logprobs(
        self, out: torch.Tensor, mb: Microbatch, gpt: Any, temperature: float, entropy: str, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Label log-probs ``[b, s]`` from the model's output and the entropy (``entropy``: "grad" =
        differentiable, "stat" = detached, "none").  Fused (``out`` is hidden states, only the
        ``index`` positions are projected; 0 elsewhere) or the reference path on full logits."""
        from megatron.core import tensor_parallel

        tp_group = self._tp_group()
        if self.cfg.fused_logprobs:
            lp, ent = fused_logprobs(out, output_weight(gpt), mb.labels, index, temperature, tp_group, self.cfg.logprob_chunk_bytes)
            return lp, (ent if entropy == "grad" else ent.detach() if entropy == "stat" else None)
        z = out.float()
        if temperature != 1.0:
            z = z / temperature
        ent = None
        if entropy == "grad":
            ent = entropy_from_logits(z, tp_group)  # differentiable: CE below must not reuse z
            z = z.clone()
        elif entropy == "stat":
            ent = vocab_parallel_entropy(z, tp_group)
        # vocab-parallel CE (the op GPTModel uses when given labels); it reuses z's storage
        return -tensor_parallel.vocab_parallel_cross_entropy(z, mb.labels), ent

    def _loss_func(
        self, mb: Microbatch, kind: str, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        dev = out.device
        want = "grad" if (kind != "sft" and cfg.entropy_coef > 0) else "stat" if cfg.compute_entropy else "none"
        temperature = cfg.temperature if kind != "sft" else 1.0
        logp, entropy = self._logprobs(out, mb, self._gpt, temperature, want, mb.loss_index)
        # packed rows -> one row per trajectory (identity for padded microbatches)
        logp = unpack(logp, mb)
        mask = unpack(mb.loss_mask.to(dev), mb)
        if entropy is not None:
            entropy = unpack(entropy, mb)
        loss_sum, st = policy_loss(
            logp, unpack(mb.behav_logprobs.to(dev), mb), unpack(mb.advantages.to(dev), mb), mask,
            loss=kind, correction=cfg.off_policy, tis_cap=cfg.tis_cap,  # type: ignore[arg-type]
            eps_clip_low=cfg.eps_clip_low, eps_clip_high=cfg.eps_clip_high,
            icepop_low=cfg.icepop_low, icepop_high=cfg.icepop_high, prox=cfg.proximal,
            versions=unpack(mb.versions.to(dev), mb) if mb.versions is not None else None,
            v_theta=self.policy_version, prox_lag=cfg.prox_lag, agg=cfg.loss_agg,
            ref_logprobs=unpack(mb.ref_logprobs.to(dev), mb) if (mb.ref_logprobs is not None and kind != "sft") else None,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
            entropy=entropy, entropy_coef=cfg.entropy_coef if kind != "sft" else 0.0, reduction="sum",
        )
        report = {k: st[k] for k in _SUM_KEYS if k != "loss_sum"}
        report["loss_sum"] = loss_sum.detach()
        report["is_weight_max"] = st["is_weight_max"]
        return loss_sum, st["loss_norm"].to(torch.int), report

    def _model_forward(self, model: Any, gpt: Any, mb: Microbatch) -> torch.Tensor:
        """``model(tokens, position_ids, attention_mask)`` on device-resident ``mb``.  Packed rows:
        the sdpa spec takes the segment ids themselves (per-trajectory attention,
        :mod:`consumers.attention`), the local spec a block-diagonal causal mask built here; padded
        rows: None (causal).  With ``fused_logprobs`` the model returns hidden states."""
        mask = None
        if mb.segment_ids is not None:
            mask = mb.segment_ids if self.plan.layer_spec == "sdpa" else block_causal_mask(mb.segment_ids)
        with emit_hidden(gpt, self.cfg.fused_logprobs):
            return model(mb.tokens, mb.position_ids, mask)

    def _forward_step(self, kind: str, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        mb: Microbatch = next(data_iterator)
        out = self._model_forward(model, self._gpt, mb)
        return out, partial(self._loss_func, mb, kind)

    def _ref_forward_step(self, gpt: Any, all_positions: bool, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        mb: Microbatch = next(data_iterator)
        out = self._model_forward(model, gpt, mb)

        def loss(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
            lp, _ = self._logprobs(out, mb, gpt, self.cfg.temperature, "none", None if all_positions else mb.loss_index)
            return torch.zeros((), device=out.device), torch.ones((), dtype=torch.int, device=out.device), {"logp": lp.detach()}

        return out, loss

    def _forward_logprobs(self, model: Any, gpt: Any, mbs: list[Microbatch], all_positions: bool) -> list[torch.Tensor]:
        """Forward-only pass of ``model``: each microbatch's label log-probs (row layout, at the
        sampling temperature; at the loss positions only unless ``all_positions``), on the last PP
        stage (``[]`` elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=partial(self._ref_forward_step, gpt, all_positions), data_iterator=iter(mbs), model=[model],
                num_microbatches=len(mbs), seq_length=max(mb.tokens.shape[1] for mb in mbs),
                micro_batch_size=max(mb.tokens.shape[0] for mb in mbs), forward_only=True,
            )
        return [r["logp"] for r in out or []]

    def _fill_reference_logprobs(self, mbs: list[Microbatch]) -> None:
        """Forward-only pass of the frozen reference model; sets ``mb.ref_logprobs`` on the last PP stage."""
        assert self.ref_model is not None
        for mb, lp in zip(mbs, self._forward_logprobs(self.ref_model, self._ref_gpt, mbs, False), strict=False):
            mb.ref_logprobs = lp

    def _microbatches(self, groups: list[TrajectoryGroup], std_norm: bool) -> list[Microbatch]:
        """This rank's microbatches (padded or packed per the build plan), moved to the compute
        device; packed ones are registered with the sdpa spec's layout registry."""
        cfg, plan = self.cfg, self.plan
        mbs = [
            mb.to_device(self._device)
            for mb in make_microbatches(groups, std_norm, plan.packing, cfg.micro_batch_size, plan.max_tokens_per_microbatch,
                                        cfg.pack_row_tokens)
        ]
        if plan.layouts is not None:
            for mb in mbs:
                if mb.segment_ids is not None:
                    plan.layouts.put(mb.segment_ids, mb.host_segment_ids)
        return mbs

    def token_logprobs(self, groups: list[TrajectoryGroup]) -> list[np.ndarray]:
        """Log-probs of every label token (``P + R - 1`` per trajectory: prompt tokens after the
        first, then the response) under the current weights, at the sampling temperature, one
        float32 array per trajectory in :func:`consumers.batching.flatten` order, batched as
        :meth:`train_step` batches them (padded or packed).  Collective over the TP/PP group;
        the arrays exist on the last PP stage (``[]`` elsewhere).  No gradient, no step."""
        mbs = self._microbatches(groups, self.cfg.advantage_std_norm)
        trajs, _ = flatten(groups, self.cfg.advantage_std_norm)
        self.model.eval()
        lps = self._forward_logprobs(self.model, self._gpt, mbs, True)
        self.model.train()
        if not lps:
            return []
        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(trajs)
        for mb, lp in zip(mbs, lps, strict=True):
            rows = unpack(lp.float(), mb, fill=float("nan")).cpu()
            for r, i in enumerate(mb.traj_order or []):
                t = trajs[i]
                out[i] = rows[r, : len(t.prompt_tokens) + len(t.response_tokens) - 1].numpy().copy()
        return out

    def _run(self, mbs: list[Microbatch], kind: str) -> tuple[Any, Any, str]:
        """Forward/backward over ``mbs`` and one optimizer step unless the loss or the gradients are
        not finite on any rank (then the weights stay as they are).  Returns (results, grad_norm,
        skip reason: "" when the step was applied).  RL steps (not SFT) advance the LR schedule
        just before the update they apply."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.cfg
        if self.ref_model is not None and kind != "sft":
            self._fill_reference_logprobs(mbs)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, kind),
            data_iterator=iter(mbs),
            model=[self.model],
            num_microbatches=len(mbs),
            seq_length=max(mb.tokens.shape[1] for mb in mbs),
            micro_batch_size=max(mb.tokens.shape[0] for mb in mbs),
            forward_only=False,
        )
        loss_bad, grad_bad = nonfinite_flags([r["loss_sum"] for r in results or []], self.model, self.optimizer, self._device)
        if loss_bad or grad_bad:
            return results, math.nan, "non-finite loss" if loss_bad else "non-finite gradient"
        if kind != "sft":
            self.scheduler.step(1)
        success, grad_norm, _ = self.optimizer.step()
        if not success:  # fp16: Megatron's loss scaler found an overflow and lowered the scale
            if kind != "sft":
                self.scheduler.step(-1)
            return results, math.nan, "fp16 gradient overflow"
        if cfg.grad_clip == 0:
            grad_norm = self.optimizer.get_grad_norm()
        return results, grad_norm, ""

    def train_step(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """One optimizer step on this DP rank's ``groups`` (TP/PP peers pass the same list).
        Collective over all trainer ranks.  Returns :data:`STAT_KEYS`, reduced over DP.  The loss
        sees ``self.policy_version`` as the current version (log-linear proximal policy); the step
        increments it and ``steps_done``."""
        t0 = time.perf_counter()
        cfg = self.cfg
        mbs = self._microbatches(groups, cfg.advantage_std_norm)
        results, grad_norm, skipped = self._run(mbs, cfg.loss)
        self.steps_done += 1
        self.policy_version += 1
        stats = reduce_stats(results, groups, grad_norm, cfg, self._device, self.ref_model is not None)
        self._account(stats, skipped, groups)
        stats["step_seconds"] = time.perf_counter() - t0
        stats["policy_version"] = float(self.policy_version)
        return stats

    def _account(self, stats: dict[str, float], skipped: str, groups: list[TrajectoryGroup]) -> None:
        """Skip bookkeeping and the LR of the step (raises NonFiniteStepError at max_bad_steps)."""
        stats["lr"] = current_lr(self.optimizer)
        if skipped:
            ids = [t.trajectory_id for g in groups for t in g.trajectories]
            try:
                self.bad_steps.skipped(skipped, self.steps_done, ids, nonfinite=skipped.startswith("non-finite"))
            finally:
                stats.update(step_skipped=1.0, skipped_steps=float(self.bad_steps.skipped_total),
                             bad_steps_in_a_row=float(self.bad_steps.in_a_row))
        else:
            self.bad_steps.ok()
        stats.setdefault("step_skipped", 0.0)
        stats.setdefault("skipped_steps", float(self.bad_steps.skipped_total))
        stats.setdefault("bad_steps_in_a_row", float(self.bad_steps.in_a_row))

    def sft_step(self, examples: list[tuple[Any, Any]]) -> dict[str, float]:
        """One supervised step: cross-entropy (token mean) on the response tokens of this DP rank's
        ``(prompt_tokens, response_tokens)`` pairs.  Does not change ``policy_version``."""
        t0 = time.perf_counter()
        trajs = [
            Trajectory(
                trajectory_id=f"sft-{i}", prompt_tokens=np.asarray(p, np.int32), response_tokens=np.asarray(r, np.int32),
                logprobs=np.zeros(len(r), np.float32), versions=np.zeros(len(r), np.int32),
                loss_mask=np.ones(len(r), np.uint8), reward=0.0,
            )
            for i, (p, r) in enumerate(examples)
        ]
        groups = [TrajectoryGroup("sft", "sft", "sft", 0, 0, trajs)] if trajs else []
        mbs = self._microbatches(groups, False)
        results, grad_norm, skipped = self._run(mbs, "sft")
        self.steps_done += 1
        stats = reduce_stats(results, [], grad_norm, self.cfg, self._device, self.ref_model is not None)
        self._account(stats, skipped, groups)
        stats["step_seconds"] = time.perf_counter() - t0
        return stats

    # ------------------------------------------------------------------ weights
    def export_hf_state(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on global rank 0 (``{}`` elsewhere); collective over DP replica 0."""
        return bridge.export_hf_state(self.model, self.spec)

    def export_hf_stage(self) -> dict[str, torch.Tensor]:
        """This PP stage's HF-named weights on the stage's leader (``{}`` elsewhere; see
        :attr:`is_stage_leader`); collective over DP replica 0, nothing crosses the PP group."""
        return bridge.export_hf_stage(self.model, self.spec)

    @property
    def is_stage_leader(self) -> bool:
        """Holds its PP stage's export and publishes it with ``weights.per_stage_publish``."""
        return bridge.is_stage_leader()

    def shutdown(self) -> None:
        """Tear down Megatron's parallel state (the process group is the caller's)."""
        self._ps.destroy_model_parallel()


def reduce_stats(
    results: list[dict[str, torch.Tensor]], groups: list[TrajectoryGroup], grad_norm: Any, cfg: TrainerConfig,
    device: torch.device, has_ref: bool,
) -> dict[str, float]:
    """:data:`STAT_KEYS` (most of them) from the microbatches' loss reports, summed over DP and sent
    from the last PP stage to the others: one host sync in all (collective over the trainer)."""
    from megatron.core import parallel_state as ps

    keys = _SUM_KEYS
    rewards = [t.reward for g in groups for t in g.trajectories]
    # on the compute device (NCCL needs CUDA tensors), without a host sync per microbatch;
    # only the last PP stage has results
    extra = torch.tensor([float(sum(rewards)), float(len(rewards))], dtype=torch.float64).to(device)
    if results:
        per_mb = torch.stack([torch.stack([r[k].detach().reshape(()).double() for k in keys]) for r in results])
        sums = torch.cat([per_mb.sum(dim=0), extra])
        wmax = torch.stack([r["is_weight_max"].detach().reshape(()).double() for r in results]).max().reshape(1)
    else:
        sums = torch.cat([torch.zeros(len(keys), dtype=torch.float64, device=device), extra])
        wmax = torch.zeros(1, dtype=torch.float64, device=device)
    if ps.get_data_parallel_world_size() > 1:
        dp_group = ps.get_data_parallel_group()
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(wmax, op=dist.ReduceOp.MAX, group=dp_group)
    if cfg.pipeline_parallel > 1:  # results live on the last stage
        both = torch.cat([sums, wmax])
        dist.broadcast(both, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        sums, wmax = both[:-1], both[-1:]
    vals = sums.tolist()
    s = dict(zip(keys, vals, strict=False))
    n = max(s["num_tokens"], 1.0)
    reward_sum, n_traj = vals[len(keys)], vals[len(keys) + 1]
    return {
        "loss": s["loss_sum"] / max(s["loss_norm"], 1.0),
        "reward_mean": reward_sum / n_traj if n_traj else math.nan,
        "tokens_trained": s["num_tokens"],
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "is_weight_mean": s["is_weight_sum"] / n,
        "is_weight_max": float(wmax.item()),
        "is_clip_fraction": s["is_clip_count"] / n,
        "clip_fraction": s["ppo_clip_count"] / n,
        "logprob_mismatch": s["logprob_mismatch_sum"] / n,
        "kl": s["kl_sum"] / n,
        "kl_ref": s["kl_ref_sum"] / n if has_ref else math.nan,
        "entropy": s["entropy_sum"] / n if (cfg.compute_entropy or cfg.entropy_coef > 0) else math.nan,
        "num_sequences": n_traj,
    }
