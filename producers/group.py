"""One prompt in, one scored group out: the rollout plug-in, the boundary checks, rewards and the filter.

:class:`GroupMaker` runs the steps of one group attempt for the scheduler
(:mod:`producers.scheduler`): the rollout plug-in (bounded by ``producer.rollout_timeout_s``), the
check of what it returned (:func:`producers.rollout.validate_samples`, which blames the plug-in),
the reward plug-in, the group filter, and the conversion to wire :class:`~schemas.messages.Trajectory`
records.  It raises what the scheduler decides on: :class:`~producers.sglang_client.EngineError`
(the engine failed or answered garbage, e.g. NaN log-probs, or aborted a request before its first
token: retried, the engine blamed),
:class:`~producers.rollout.GroupCut` (cut after the rollout returned: restart),
:class:`~producers.plugins.PluginTimeout` (retried up to ``timeout_attempts``) and
:class:`~producers.plugins.PluginError` (a broken plug-in: the producer stops).

The group states the scheduler tracks are here too: :class:`Active` (generating) and
:class:`Ready` (passed the filter, waiting for a credit when oversampling).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from producers.feed import Job
from producers.plugins import PluginError, PluginTimeout, Sample, call_plugin_timeout
from producers.rollout import GroupCut, RolloutContext, SamplingParams, validate_samples
from producers.scoring import Scorer
from producers.sglang_client import EngineError
from producers.stats import ProducerAccount
from schemas.messages import Trajectory

log = logging.getLogger(__name__)


@dataclass
class Active:
    """A group being generated: its rollout context (start version, rids) and task."""

    job: Job
    ctx: RolloutContext
    task: asyncio.Task[None] | None = None
    phase: str = "rollout"  # rollout -> scoring (or failed: engine error, retried); only a rollout is cut
    restart: bool = False  # cut: cancelled to restart from the prompt


@dataclass
class Ready:
    """A group that passed the filter, waiting for a credit (oversample)."""

    job: Job
    trajectories: list[Trajectory]
    min_version: int
    generated_at: float = field(default_factory=time.monotonic)


class GroupMaker:
    """Makes one group attempt for a :class:`Job` (see the module docstring)."""

    def __init__(self, rollout_fn: Any, rollout_name: str, group_size: int, rollout_timeout_s: float, scorer: Scorer,
                 sampling: SamplingParams, tokenizer: Any, trajectory_prefix: str, account: ProducerAccount) -> None:
        self.rollout_fn = rollout_fn
        self.rollout_name = rollout_name
        self.group_size = group_size
        self.rollout_timeout_s = rollout_timeout_s
        self.scorer = scorer
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.trajectory_prefix = trajectory_prefix  # "<producer_id>-<epoch>": ids unique across restarts
        self.account = account
        self._traj_ids = itertools.count()

    def tokens(self, job: Job) -> list[int]:
        prompt = job.prompt
        if prompt.tokens is None:
            prompt.tokens = list(self.tokenizer.encode(prompt.text).ids)  # rollouts and requeues see the same ids
        return list(prompt.tokens)

    async def make(self, job: Job, act: Active) -> Ready | None:
        """Roll out, check, score and filter one group; None when the filter dropped it."""
        prompt = job.prompt
        t0 = time.monotonic()
        tokens = self.tokens(job)
        try:
            out = await call_plugin_timeout(self.rollout_fn, act.ctx, prompt, self.sampling, timeout_s=self.rollout_timeout_s,
                                            key="producer.rollout", plugin=self.rollout_name, timeout_key="producer.rollout_timeout_s",
                                            reason="rollout_timeout")
        except (EngineError, GroupCut, PluginError, PluginTimeout):
            raise
        except Exception as e:
            raise PluginError("producer.rollout", self.rollout_name, f"raised {type(e).__name__}: {e}") from e
        act.phase = "scoring"
        if act.ctx.take_cut() is not None:  # cut after the rollout returned: its tokens are certain to be too stale
            raise GroupCut("cut after the rollout returned")
        rollouts = validate_samples(out, self.group_size, self.rollout_name)
        empty = [i for i, r in enumerate(rollouts) if not len(r.response_tokens)]
        if empty:  # the wire refuses empty responses (schemas.validate): retry the group, as for any engine failure
            raise EngineError(f"samples[{empty[0]}] has no response tokens: the engine aborted its request before the first token "
                              f"(engine request timeout or shutdown); {len(empty)} of {len(rollouts)} samples empty")
        samples = [
            Sample(prompt, tokens, list(r.response_tokens),
                   r.response_text if r.response_text is not None else self.tokenizer.decode(list(r.response_tokens), skip_special_tokens=True),
                   r.finish_reason, list(r.loss_mask), dict(r.metadata))
            for r in rollouts
        ]
        rewards = await self.scorer.rewards(samples)
        for s, reward in zip(samples, rewards, strict=True):
            s.reward = reward
        self.account.scored(sum(int(sum(r.loss_mask)) for r in rollouts), rewards)
        reason = await self.scorer.filter_reason(samples)
        if reason is not None:
            self.account.filtered(reason, prompt.prompt_id)
            log.debug("group for prompt %s filtered (%s)", prompt.prompt_id, reason)
            return None  # nothing is sent and no credit spent: the scheduler starts another prompt
        trajectories = [
            Trajectory(
                trajectory_id=f"{self.trajectory_prefix}-{next(self._traj_ids)}",
                prompt_tokens=np.asarray(tokens, dtype=np.int32),
                response_tokens=np.asarray(r.response_tokens, dtype=np.int32),
                logprobs=np.asarray(r.logprobs, dtype=np.float32),
                versions=np.asarray(r.versions, dtype=np.int32),
                loss_mask=np.asarray(r.loss_mask, dtype=np.uint8),
                reward=reward,
                finish_reason=r.finish_reason,
                timings={"generate_s": time.monotonic() - t0},
            )
            for r, reward in zip(rollouts, rewards, strict=True)
        ]
        self.account.generated(time.monotonic() - t0)
        min_version = min((int(t.versions.min()) for t in trajectories if len(t.versions)), default=act.ctx.start_version)
        return Ready(job, trajectories, min_version)
