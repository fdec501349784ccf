"""Rollout plug-in interface and the built-in single-turn rollout.

A rollout turns one prompt into ``ctx.group_size`` samples by talking to the engine::

    async def rollout(ctx: RolloutContext, prompt: Prompt, params: SamplingParams) -> list[RolloutSample]

configured as ``producer.rollout = "producers.rollout:single_turn"`` (the default; with
``producer.rollout_args`` the path names a factory, see :mod:`producers.plugins`).  The producer
validates what comes back (:func:`validate_samples`), scores it with the reward plug-in, applies the
group filter and sends the group.  ``EngineError`` raised by a rollout is retried by the producer
(the prompt is requeued); any other exception, or malformed output, stops the producer with a
:class:`~producers.plugins.PluginError`.

Per-token arrays of a :class:`RolloutSample` all have the response length: ``logprobs`` are the
behaviour log-probs of sampled tokens, ``versions`` the policy version that sampled each token, and
``loss_mask`` 1 for sampled tokens, 0 for tokens the model did not sample (tool output).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producers.plugins import PluginError, Prompt
from producers.sglang_client import EngineClient, parse_generation

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """Sampling parameters of one /generate call (SGLang's ``sampling_params``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)

    def to_sglang(self, **overrides: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens}
        if self.stop_token_ids:
            d["stop_token_ids"] = list(self.stop_token_ids)
        d.update(overrides)
        return d


@dataclass
class RolloutContext:
    """What a rollout gets from the producer.

    ``version_at_submit`` is the policy version the producer knew when the group started;
    :attr:`version` is the newest it knows now (multi-turn rollouts read it before each turn).
    """

    client: EngineClient
    tokenizer: Any  # tokenizers.Tokenizer of the model
    group_size: int
    version_at_submit: int
    producer_id: str = ""
    version_fn: Callable[[], int] | None = None

    @property
    def version(self) -> int:
        return self.version_fn() if self.version_fn is not None else self.version_at_submit

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (for tool observations)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


@dataclass
class RolloutSample:
    """One response of a rollout (see the module docstring for the per-token arrays)."""

    response_tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    loss_mask: list[int]
    finish_reason: str = "stop"
    response_text: str | None = None  # None: the producer decodes response_tokens
    metadata: dict[str, Any] = field(default_factory=dict)


async def single_turn(ctx: RolloutContext, prompt: Prompt, params: SamplingParams) -> list[RolloutSample]:
    """The default rollout: one /generate call with ``group_size`` copies of the prompt."""
    tokens = list(prompt.tokens) if prompt.tokens is not None else list(ctx.tokenizer.encode(prompt.text).ids)
    version = ctx.version
    responses = await ctx.client.generate([tokens] * ctx.group_size, params.to_sglang())
    out = []
    for r in responses:
        g = parse_generation(r, version)
        out.append(RolloutSample(g.output_ids, g.logprobs, g.versions, [1] * len(g.output_ids), g.finish_reason))
    return out


def validate_samples(samples: Any, group_size: int, plugin: str, key: str = "producer.rollout") -> list[RolloutSample]:
    """Check a rollout's output at the boundary; raise PluginError naming the offending field."""
    if not isinstance(samples, list | tuple):
        raise PluginError(key, plugin, f"returned {type(samples).__name__}, expected list[RolloutSample]")
    if len(samples) != group_size:
        raise PluginError(key, plugin, f"returned {len(samples)} samples for group_size {group_size}")
    for i, s in enumerate(samples):
        where = f"samples[{i}]"
        if not isinstance(s, RolloutSample):
            raise PluginError(key, plugin, f"{where} is {type(s).__name__}, expected RolloutSample")
        n = len(s.response_tokens)
        for name in ("logprobs", "versions", "loss_mask"):
            value = getattr(s, name)
            if not isinstance(value, list | tuple) and not hasattr(value, "__len__"):
                raise PluginError(key, plugin, f"{where}.{name} is {type(value).__name__}, expected a list")
            if len(value) != n:
                raise PluginError(key, plugin, f"{where}.{name} has {len(value)} entries for {n} response_tokens")
        if any(m not in (0, 1) for m in s.loss_mask):
            raise PluginError(key, plugin, f"{where}.loss_mask must hold only 0 and 1")
        for j, (lp, m) in enumerate(zip(s.logprobs, s.loss_mask, strict=True)):
            if not isinstance(lp, int | float) or math.isnan(lp) or lp > 0 or (m and math.isinf(lp)):
                raise PluginError(key, plugin, f"{where}.logprobs[{j}] = {lp!r} is not a finite log-probability <= 0")
        if any(int(v) < 0 for v in s.versions):
            raise PluginError(key, plugin, f"{where}.versions holds a negative policy version")
        if not isinstance(s.finish_reason, str):
            raise PluginError(key, plugin, f"{where}.finish_reason is {type(s.finish_reason).__name__}, expected str")
    return list(samples)
