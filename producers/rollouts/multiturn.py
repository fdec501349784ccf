"""Multi-turn rollout: model turns interleaved with tool / environment turns.

    [producer]
    rollout = "producers.rollouts.multiturn:make_rollout"
    rollout_args = { tool = "producers.tasks.calculator:tool", max_turns = 3, max_total_tokens = 32, stop_token_ids = [13] }

Each sample of a group is one episode, run concurrently with the others:

1. model turn: ``/generate`` on ``prompt + response so far`` (the token ids are appended to, never
   re-tokenised, so what the trainer sees is exactly what the engine saw);
2. the tool plug-in ``tool(episode: Episode) -> Observation | None`` (sync or async) looks at the
   episode and returns observation tokens (or text, encoded without special tokens) or ``None`` to
   end the episode;
3. the observation is appended with ``loss_mask`` 0, ``logprob`` 0 and ``version`` = the newest
   policy version known at that moment (the larger of the producer's known version and the newest
   version among the episode's sampled tokens).  Observation tokens are not trained on; stamping
   them with the current version means they never make a trajectory look staler than its sampled
   tokens (staleness is ``v - min(versions)``).

The episode ends when the tool returns ``None`` or ``done``, after ``max_turns`` model turns, or when
``max_total_tokens`` (prompt + response) is reached — an observation that does not fit is cut and
the finish reason is ``length``.  ``stop_token_ids`` end a model turn (e.g. a tool-call token) in
addition to EOS.

Each tool call is bounded by ``producer.tool_timeout_s`` (a sync tool runs in a worker thread); a
tool that passes it raises :class:`~producers.plugins.PluginTimeout` and the producer retries the
group.  When the producer cuts a group that became too stale (``producer.partial_rollouts``), a
multi-turn group is restarted from the prompt: its requests go through ``ctx.generate`` so they
can be aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from producers.plugins import PluginError, PluginTimeout, Prompt, call_plugin_timeout, load_plugin
from producers.rollout import RolloutContext, RolloutSample, SamplingParams
from producers.sglang_client import parse_generation

log = logging.getLogger(__name__)

TOOL_KEY = "producer.rollout_args.tool"


@dataclass
class Observation:
    """What a tool returns: ``tokens`` (or ``text``, encoded without special tokens); ``done`` ends the episode after it."""

    tokens: list[int] | None = None
    text: str | None = None
    done: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Episode:
    """The state a tool sees after each model turn (read-only by convention)."""

    prompt: Prompt
    prompt_tokens: list[int]
    response_tokens: list[int]
    loss_mask: list[int]
    turn: int  # model turns completed (1 after the first)
    last_turn_tokens: list[int]  # the tokens the model sampled in the turn that just ended
    finish_reason: str  # of that turn: "stop" (EOS or a stop token) or "length"
    ctx: RolloutContext
    metadata: dict[str, Any] = field(default_factory=dict)


class MultiTurnRollout:
    """The rollout plug-in; build it with :func:`make_rollout`."""

    def __init__(self, tool: Callable[..., Any], tool_name: str, max_turns: int, max_total_tokens: int, stop_token_ids: list[int]) -> None:
        self.tool = tool
        self.tool_name = tool_name
        self.max_turns = max_turns
        self.max_total_tokens = max_total_tokens
        self.stop_token_ids = list(stop_token_ids)

    async def __call__(self, ctx: RolloutContext, prompt: Prompt, params: SamplingParams) -> list[RolloutSample]:
        tokens = list(prompt.tokens) if prompt.tokens is not None else list(ctx.tokenizer.encode(prompt.text).ids)
        return list(await asyncio.gather(*(self.episode(ctx, prompt, tokens, params) for _ in range(ctx.group_size))))

    async def _observe(self, ep: Episode) -> tuple[list[int], bool] | None:
        try:
            obs = await call_plugin_timeout(self.tool, ep, timeout_s=ep.ctx.tool_timeout_s, key=TOOL_KEY, plugin=self.tool_name,
                                            timeout_key="producer.tool_timeout_s", reason="tool_timeout")
        except PluginTimeout:
            raise
        except Exception as e:
            raise PluginError(TOOL_KEY, self.tool_name, f"raised {type(e).__name__}: {e}") from e
        if obs is None:
            return None
        if not isinstance(obs, Observation):
            raise PluginError(TOOL_KEY, self.tool_name, f"returned {type(obs).__name__}, expected Observation or None")
        if obs.tokens is None:
            if obs.text is None:
                raise PluginError(TOOL_KEY, self.tool_name, "returned an Observation with neither tokens nor text")
            toks = ep.ctx.encode(obs.text)
        else:
            toks = obs.tokens
        if not isinstance(toks, list | tuple) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in toks):
            raise PluginError(TOOL_KEY, self.tool_name, f"Observation.tokens must be a list of non-negative ints, got {str(toks)[:80]}")
        ep.metadata.update(obs.metadata)
        return list(toks), obs.done

    async def episode(self, ctx: RolloutContext, prompt: Prompt, prompt_tokens: list[int], params: SamplingParams) -> RolloutSample:
        resp: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        mask: list[int] = []
        finish = "stop"
        metadata: dict[str, Any] = {"turns": 0, "tool_calls": 0}
        stop_ids = sorted({*params.stop_token_ids, *self.stop_token_ids})
        for turn in range(1, self.max_turns + 1):
            budget = self.max_total_tokens - len(prompt_tokens) - len(resp)
            if budget <= 0:
                finish = "length"
                break
            version = ctx.version
            sp = params.to_sglang(max_new_tokens=min(params.max_new_tokens, budget), stop_token_ids=stop_ids)
            (raw,) = await ctx.generate([prompt_tokens + resp], sp)
            g = parse_generation(raw, version)
            resp += g.output_ids
            logprobs += g.logprobs
            versions += g.versions
            mask += [1] * len(g.output_ids)
            finish = g.finish_reason
            metadata["turns"] = turn
            if turn == self.max_turns:
                break
            ep = Episode(prompt, prompt_tokens, list(resp), list(mask), turn, list(g.output_ids), g.finish_reason, ctx, metadata)
            got = await self._observe(ep)
            if got is None:
                break
            obs, done = got
            metadata["tool_calls"] += 1
            room = self.max_total_tokens - len(prompt_tokens) - len(resp)
            if len(obs) > room:
                obs = obs[: max(room, 0)]
                finish = "length"
            current = max([ctx.version, *versions])
            resp += obs
            logprobs += [0.0] * len(obs)
            versions += [current] * len(obs)
            mask += [0] * len(obs)
            if finish == "length" or done:
                break
        return RolloutSample(resp, logprobs, versions, mask, finish, metadata=metadata)


def make_rollout(
    tool: str,
    max_turns: int = 4,
    max_total_tokens: int = 512,
    stop_token_ids: list[int] | None = None,
    tool_args: dict[str, Any] | None = None,
) -> MultiTurnRollout:
    """Factory named by ``producer.rollout`` with ``producer.rollout_args`` as keyword arguments."""
    if max_turns < 1:
        raise PluginError("producer.rollout_args.max_turns", "producers.rollouts.multiturn:make_rollout", "must be >= 1")
    if max_total_tokens < 2:
        raise PluginError("producer.rollout_args.max_total_tokens", "producers.rollouts.multiturn:make_rollout", "must be >= 2")
    fn = load_plugin(tool, TOOL_KEY, tool_args)
    log.info("multi-turn rollout: tool %s, max_turns %d, max_total_tokens %d", tool, max_turns, max_total_tokens)
    return MultiTurnRollout(fn, tool, max_turns, max_total_tokens, list(stop_token_ids or []))
