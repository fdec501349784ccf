"""Scoring and filtering a group: the reward and group-filter plug-ins, validated at the boundary.

The producer calls :meth:`Scorer.score` on every generated group: the reward plug-in runs per
sample (``producer.reward_scope = "sample"``) or once per group (``"group"``), sync or async; then
the optional group filter (``producer.group_filter``) may drop the group with a reason.  Anything a
plug-in raises, or a malformed return value, becomes a :class:`~producers.plugins.PluginError`
naming the config key, the plug-in and the offending field.  Every call is bounded by
``timeout_s`` (``producer.reward_timeout_s``, for the reward and the group filter alike); a call
that passes it raises :class:`~producers.plugins.PluginTimeout` (the producer retries the group).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Literal

from producers.plugins import PluginError, PluginTimeout, Sample, call_plugin_timeout, load_plugin

log = logging.getLogger(__name__)

OTHER_REASON = "other"


class Scorer:
    """Loads the reward and group-filter plug-ins of a producer config and applies them."""

    def __init__(
        self,
        reward: str,
        scope: Literal["sample", "group"] = "sample",
        reward_args: dict[str, Any] | None = None,
        group_filter: str = "",
        group_filter_args: dict[str, Any] | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.reward_path = reward
        self.scope = scope
        self.reward_fn: Callable[..., Any] = load_plugin(reward, "producer.reward", reward_args)
        self.filter_path = group_filter
        self.filter_fn: Callable[..., Any] | None = load_plugin(group_filter, "producer.group_filter", group_filter_args) if group_filter else None
        declared = tuple(getattr(self.filter_fn, "reasons", ())) if self.filter_fn is not None else ()
        self.reasons: tuple[str, ...] = (*dict.fromkeys(str(r) for r in declared), OTHER_REASON)

    # ------------------------------------------------------------------ rewards
    async def rewards(self, samples: list[Sample]) -> list[float]:
        key, name = "producer.reward", self.reward_path

        async def call(arg: Any) -> Any:
            return await call_plugin_timeout(self.reward_fn, arg, timeout_s=self.timeout_s, key=key, plugin=name,
                                             timeout_key="producer.reward_timeout_s", reason="reward_timeout")

        try:
            if self.scope == "group":
                out = await call(samples)
            else:
                out = await asyncio.gather(*(call(s) for s in samples))
        except (PluginError, PluginTimeout):
            raise
        except Exception as e:
            raise PluginError(key, name, f"raised {type(e).__name__}: {e}") from e
        if self.scope == "group":
            if not isinstance(out, list | tuple):
                raise PluginError(key, name, f"returned {type(out).__name__}, expected list[float] (reward_scope = 'group')")
            if len(out) != len(samples):
                raise PluginError(key, name, f"returned {len(out)} rewards for {len(samples)} samples (reward_scope = 'group')")
        rewards = []
        for i, r in enumerate(out):
            field = f"rewards[{i}]" if self.scope == "group" else f"reward of sample {i}"
            if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(float(r)):
                raise PluginError(key, name, f"{field} is {r!r} ({type(r).__name__}), expected a finite float")
            rewards.append(float(r))
        return rewards

    # ------------------------------------------------------------------ filter
    async def filter_reason(self, samples: list[Sample]) -> str | None:
        """None keeps the group; else the (bounded) reason it is dropped for."""
        if self.filter_fn is None:
            return None
        key, name = "producer.group_filter", self.filter_path
        try:
            out = await call_plugin_timeout(self.filter_fn, samples, timeout_s=self.timeout_s, key=key, plugin=name,
                                            timeout_key="producer.reward_timeout_s", reason="group_filter_timeout")
        except PluginTimeout:
            raise
        except Exception as e:
            raise PluginError(key, name, f"raised {type(e).__name__}: {e}") from e
        if out is None or out is False or out == "":
            return None
        if not isinstance(out, str):
            raise PluginError(key, name, f"returned {type(out).__name__}, expected None (keep) or a reason string (drop)")
        if out not in self.reasons:
            log.warning("group filter %s returned reason %r, not among its declared reasons %s: counted as %r", name, out, self.reasons, OTHER_REASON)
            return OTHER_REASON
        return out
