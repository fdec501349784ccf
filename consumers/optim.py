"""The trainer's optimizer step: learning-rate schedule and the guard against non-finite steps.

What:
- :func:`build_scheduler`: megatron-core's ``OptimizerParamScheduler`` from ``trainer.lr_schedule``
  (``constant``, ``linear``, ``cosine``, ``inverse-square-root``), ``lr_warmup_steps``, ``lr_min``
  and ``lr_decay_steps`` (0 = the run's steps).  Convention: the k-th *applied* RL update uses the
  scheduler's learning rate at ``num_steps = k`` (the scheduler is stepped just before the
  optimizer), so with warm-up W the first update uses ``lr / W`` and update W the full ``lr``
  (Megatron-LM's own loop steps after the update, so its first update runs at ``lr = 0``).  A
  skipped step does not advance it.  The weight-decay multipliers of megatron's parameter groups
  (no decay for norms and biases) apply through the scheduler, as in Megatron-LM.
- :func:`nonfinite_flags`: before the optimizer step, every trainer rank checks its share of the
  loss (last PP stage) and of the gradients (its Megatron DDP grad buffers) for NaN/inf; one MAX
  all-reduce over the whole trainer world gives every rank the same verdict, so all skip together.
  With fp16 and a dynamic loss scaler the gradient check is left to Megatron (an overflow there
  is routine: it lowers the scale and skips the step).
- :class:`BadStepTracker`: counts skipped steps and fails the run with
  :class:`NonFiniteStepError` after ``trainer.max_bad_steps`` non-finite steps in a row.

Why: a NaN reward or a diverging step must not reach the weights the engines sample from (issue
19: a NaN batch was applied at step 18 and the engines then produced NaN log-probs).

How: :class:`consumers.trainer.TrainerRank` uses all three; ``tests/test_trainer_guard.py`` forces
a NaN loss (weights unchanged, step counted) and checks the schedule against closed forms and
across a checkpoint resume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine", "inverse-square-root")


class NonFiniteStepError(RuntimeError):
    """``trainer.max_bad_steps`` steps in a row had a non-finite loss or gradient."""


def build_scheduler(optimizer: Any, cfg: Any, total_steps: int | None) -> Any:
    """megatron-core's ``OptimizerParamScheduler`` for ``cfg`` (a :class:`TrainerConfig`).  The
    config is the source of truth on resume: a checkpoint restores only the position."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = cfg.lr_decay_steps or (total_steps or 0)
    if cfg.lr_schedule in ("linear", "cosine") and decay <= cfg.lr_warmup_steps:
        raise ValueError(
            f"trainer.lr_decay_steps: the {cfg.lr_schedule} schedule needs more decay steps ({decay}; 0 = run.steps) "
            f"than warm-up steps ({cfg.lr_warmup_steps})"
        )
    decay = max(decay, cfg.lr_warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.lr_min if cfg.lr_schedule != "constant" else cfg.lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def closed_form_lr(k: int, lr: float, lr_min: float, warmup: int, decay: int, schedule: str) -> float:
    """The learning rate of update ``k`` (1-based) under the convention above, written out (the
    tests compare the scheduler against it)."""
    if warmup > 0 and k <= warmup:
        return lr * k / warmup
    if schedule == "constant":
        return lr
    if k > decay:
        return lr_min
    if schedule == "inverse-square-root":
        return max(lr_min, lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(k, 1)))
    ratio = (k - warmup) / (decay - warmup)
    coeff = 1.0 - ratio if schedule == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return lr_min + coeff * (lr - lr_min)


def current_lr(optimizer: Any) -> float:
    """The learning rate of the first parameter group (all groups share the schedule)."""
    groups = getattr(optimizer, "param_groups", [])
    return float(groups[0]["lr"]) if groups else math.nan


def _uses_loss_scaler(optimizer: Any) -> bool:
    """fp16 with a dynamic grad scaler: Megatron detects and skips overflowing steps itself."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(getattr(o, "grad_scaler", None), DynamicGradScaler) for o in inner)


def _grad_tensors(model: Any) -> list[torch.Tensor]:
    """This rank's gradients: the Megatron DDP grad buffers (a few large tensors), else main_grads."""
    bufs = getattr(model, "buffers", None)
    if isinstance(bufs, list):
        return [b.grad_data for b in bufs + list(getattr(model, "expert_parallel_buffers", []))]
    return [g for p in model.parameters() if (g := getattr(p, "main_grad", None)) is not None]


def nonfinite_flags(loss_sums: list[torch.Tensor], model: Any, optimizer: Any, device: torch.device) -> tuple[bool, bool]:
    """``(loss non-finite, gradients non-finite)`` over every trainer rank (collective: one MAX
    all-reduce of two flags over the default group).  ``loss_sums`` are this rank's microbatch
    loss sums (empty off the last PP stage)."""
    flags = torch.zeros(2, dtype=torch.float32, device=device)
    if loss_sums:
        flags[0] = (~torch.isfinite(torch.stack([x.detach().float().reshape(()) for x in loss_sums]))).any().float()
    if not _uses_loss_scaler(optimizer):
        grads = _grad_tensors(model)
        if grads:
            flags[1] = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad = flags.tolist()
    return bool(loss_bad), bool(grad_bad)


@dataclass
class BadStepTracker:
    """Skipped steps: the total, and the non-finite ones in a row (``max_bad_steps`` of those fail
    the run; 0 = never)."""

    max_bad_steps: int
    skipped_total: int = 0
    in_a_row: int = 0
    last_reason: str = ""

    def ok(self) -> None:
        self.in_a_row = 0

    def skipped(self, reason: str, step: int, trajectory_ids: list[str], nonfinite: bool = True) -> None:
        """Record a skipped step; raise :class:`NonFiniteStepError` when the limit is reached."""
        self.skipped_total += 1
        self.last_reason = reason
        shown = ", ".join(trajectory_ids[:64]) + (f", ... ({len(trajectory_ids)} in all)" if len(trajectory_ids) > 64 else "")
        log.warning("step %d skipped, weights unchanged (%s); trajectories of this rank's batch: %s", step, reason, shown or "none")
        if not nonfinite:
            return
        self.in_a_row += 1
        if self.max_bad_steps and self.in_a_row >= self.max_bad_steps:
            raise NonFiniteStepError(
                f"trainer.max_bad_steps = {self.max_bad_steps}: {self.in_a_row} steps in a row had a {reason} "
                f"(last at step {step}); trajectories of the last batch on this rank: {shown or 'none'}"
            )
