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

Cuts and partial rollouts (DESIGN §3).  A rollout sends its requests through
:meth:`RolloutContext.generate`, which gives each one a unique ``rid``.  When the producer learns a
published version ``V`` with ``V - ctx.start_version > η`` the group is certain to be consumed too
stale, and the producer *cuts* it (:meth:`RolloutContext.request_cut`): its in-flight requests are
aborted with ``/abort_request`` (the engine then answers them with the tokens sampled so far and
``finish_reason`` ``abort``).  A rollout that declares ``supports_continuation = True`` (the built-in
:func:`single_turn`) handles the cut itself when ``ctx.partial_rollouts`` is on: each unfinished
sample keeps what it generated as *context* (loss mask 0, log-prob 0, version ``V``: exactly the
representation of multi-turn tool tokens) and continues from prompt + those tokens, with the
remaining ``max_new_tokens``, under the new weights; a sample that had already finished holds only
stale tokens and is regenerated from the prompt.  Otherwise (partial_rollouts off, or another
rollout) the producer cancels the rollout and regenerates the group from the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
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
    tokenizer: Any  # producers.tokenizer.ModelTokenizer of the model (tokenizers.Tokenizer-like: encode(text).ids, decode)
    group_size: int
    version_at_submit: int
    producer_id: str = ""
    version_fn: Callable[[], int] | None = None
    tool_timeout_s: float = 120.0  # producer.tool_timeout_s: bound of one tool/environment call (multi-turn)
    partial_rollouts: bool = False  # producer.partial_rollouts: continue cut samples (supports_continuation rollouts)
    on_cut: Callable[[str, int, int], None] | None = None  # (result, samples continued, samples regenerated)
    start_version: int = field(init=False)  # lower bound of the min version of the tokens the group will train on
    cuts: int = field(default=0, init=False)
    _cut_pending: int | None = field(default=None, init=False, repr=False)
    _rids: dict[str, None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.start_version = self.version_at_submit

    async def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any]) -> list[dict[str, Any]]:
        """``client.generate`` with a unique rid per input, registered so that a cut can abort it."""
        rids = [uuid.uuid4().hex for _ in input_ids]  # equal length: no rid is a prefix of another (SGLang aborts by prefix)
        self._rids.update(dict.fromkeys(rids))
        try:
            return await self.client.generate(input_ids, sampling_params, rids=rids)
        finally:
            for r in rids:
                self._rids.pop(r, None)

    def request_cut(self, version: int) -> list[str]:
        """The producer cuts the group at published ``version``: returns the rids in flight (to abort)."""
        self._cut_pending = version if self._cut_pending is None else max(self._cut_pending, version)
        self.start_version = version  # nothing sampled before the cut is trained on any more
        self.cuts += 1
        return list(self._rids)

    @property
    def cut_pending(self) -> bool:
        return self._cut_pending is not None

    def take_cut(self) -> int | None:
        """The version of a cut requested since the last call (None: none)."""
        cut, self._cut_pending = self._cut_pending, None
        return cut

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


class GroupCut(Exception):
    """A rollout gives up a group the producer cut (restart it from the prompt)."""


@dataclass
class _Partial:
    """One sample of :func:`single_turn` being built across cuts."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    finish: str | None = None  # None: still to generate


def _apply_cut(samples: list[_Partial], version: int) -> tuple[int, int]:
    """Turn every unfinished sample's tokens into context stamped ``version``; reset finished ones."""
    continued = regenerated = 0
    for s in samples:
        if s.finish is not None or not s.tokens:
            regenerated += 1  # finished before the cut (or nothing sampled yet): only stale tokens
            s.tokens, s.logprobs, s.versions, s.mask, s.finish = [], [], [], [], None
        else:
            continued += 1
            s.logprobs = [0.0] * len(s.tokens)
            s.versions = [version] * len(s.tokens)
            s.mask = [0] * len(s.tokens)
    return continued, regenerated


async def single_turn(ctx: RolloutContext, prompt: Prompt, params: SamplingParams) -> list[RolloutSample]:
    """The default rollout: one /generate call with ``group_size`` copies of the prompt.

    After a cut (see the module docstring) it continues unfinished samples from their tokens when
    ``ctx.partial_rollouts`` is on, else raises :class:`GroupCut` so the producer restarts the group.
    """
    tokens = list(prompt.tokens) if prompt.tokens is not None else list(ctx.tokenizer.encode(prompt.text).ids)
    samples = [_Partial() for _ in range(ctx.group_size)]
    first = True
    while True:
        cut = ctx.take_cut()
        if cut is not None:
            if not ctx.partial_rollouts:
                raise GroupCut(f"cut at version {cut}")
            continued, regenerated = _apply_cut(samples, cut)
            if ctx.on_cut is not None:
                ctx.on_cut("continued" if continued else "restarted", continued, regenerated)
        pending = [s for s in samples if s.finish is None]
        if not pending:
            break
        version = ctx.version
        if first:  # one batched call with group_size copies of the prompt
            responses = await ctx.generate([tokens] * ctx.group_size, params.to_sglang())
            first = False
        else:  # continuations: one call each, with its remaining token budget
            budgets = [params.max_new_tokens - len(s.tokens) for s in pending]
            responses = list(await asyncio.gather(*(
                ctx.generate([tokens + s.tokens], params.to_sglang(max_new_tokens=b)) for s, b in zip(pending, budgets, strict=True) if b > 0)))
            for s in [s for s, b in zip(pending, budgets, strict=True) if b <= 0]:
                s.finish = "length"
            pending = [s for s, b in zip(pending, budgets, strict=True) if b > 0]
            responses = [r[0] for r in responses]
        for s, r in zip(pending, responses, strict=True):
            g = parse_generation(r, version)
            s.tokens += g.output_ids
            s.logprobs += g.logprobs
            s.versions += g.versions
            s.mask += [1] * len(g.output_ids)
            # An abort we did not ask for (engine timeout, shutdown) ends the sample as before.
            s.finish = None if g.finish_reason == "abort" and ctx.cut_pending else g.finish_reason
        if all(s.finish is not None for s in samples) and not ctx.cut_pending:
            break
    return [RolloutSample(s.tokens, s.logprobs, s.versions, s.mask, s.finish or "abort") for s in samples]


single_turn.supports_continuation = True  # type: ignore[attr-defined]


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
        if n == 0 and s.finish_reason != "abort":  # an engine abort before the first token is the engine's: producers.group retries it
            raise PluginError(key, plugin, f"{where} has no response tokens (finish_reason {s.finish_reason!r}): every sample needs at least one")
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
