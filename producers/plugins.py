"""Plug-in interfaces of the producers and loading them by import path.

Every plug-in is named in the config by an import path ``module:attribute``.  When the matching
``*_args`` table is non-empty (``producer.reward_args`` ...), the import path names a *factory*: it
is called once with those keyword arguments and must return the plug-in itself.

- prompt source (``producer.prompts``): ``callable(seed: int) -> Iterator[Prompt]``; an iterator
  that also has ``state_dict()`` / ``load_state_dict()`` (e.g. :mod:`producers.datasets`) can be
  checkpointed.
- rollout (``producer.rollout``): ``async callable(ctx, prompt, params) -> list[RolloutSample]``,
  see :mod:`producers.rollout`.
- reward (``producer.reward``), sync or async:
  ``producer.reward_scope = "sample"``: ``callable(sample: Sample) -> float``;
  ``producer.reward_scope = "group"``: ``callable(samples: list[Sample]) -> list[float]``.
- group filter (``producer.group_filter``), sync or async:
  ``callable(samples: list[Sample]) -> str | None`` (rewards set): ``None`` keeps the group, a string
  drops it and is the reason (counted; reasons outside the filter's ``reasons`` attribute count as
  ``"other"``).

A plug-in that raises or returns something malformed stops the producer with a
:class:`PluginError` naming the config key, the plug-in and the offending field.  Sync plug-ins run
on the producer's event loop: make slow ones (a verifier service, a sandbox) async.

    prompts = load_plugin("producers.tasks.maxdigit:prompts", "producer.prompts")
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.configbase import ConfigError


@dataclass
class Prompt:
    """One prompt. ``text`` is tokenized by the model's tokenizer unless ``tokens`` is given."""

    prompt_id: str
    text: str = ""
    tokens: list[int] | None = None
    label: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """What a reward function (and a group filter) sees: the prompt and one sampled response.

    ``loss_mask`` is 1 on model-sampled tokens and 0 on tool/environment tokens (multi-turn);
    ``reward`` is set once the sample is scored (group filters see it).
    """

    prompt: Prompt
    prompt_tokens: list[int]
    response_tokens: list[int]
    response_text: str
    finish_reason: str
    loss_mask: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    reward: float | None = None


PromptSource = Callable[[int], Iterator[Prompt]]
RewardFn = Callable[[Sample], float]
GroupRewardFn = Callable[[list[Sample]], list[float]]
GroupFilter = Callable[[list[Sample]], "str | None"]


class PluginError(ConfigError):
    """A plug-in raised or returned something malformed: names the key, the plug-in and the field."""

    def __init__(self, key: str, plugin: str, message: str) -> None:
        super().__init__(key, f"plug-in {plugin!r}: {message}")
        self.plugin = plugin


def plugin_name(obj: Any, path: str = "") -> str:
    """The import path a plug-in was configured with, else its qualified name."""
    if path:
        return path
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


async def call_plugin(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async plug-in (coroutine functions and callables returning awaitables)."""
    out = fn(*args)
    if inspect.isawaitable(out):
        out = await out
    return out


def load_plugin(path: str, key: str, args: dict[str, Any] | None = None) -> Any:
    """Import ``module:attribute``; a failure is a ConfigError naming the config key.

    With non-empty ``args`` the attribute is a factory: ``attribute(**args)`` is returned.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(key, f"{path!r} is not an import path of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(key, f"cannot import module {module_name!r}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(key, f"{path!r} is not callable")
    if args:
        try:
            obj = obj(**args)
        except TypeError as e:
            raise ConfigError(f"{key}_args", f"factory {path!r} does not accept these arguments: {e}") from None
        if not callable(obj):
            raise ConfigError(key, f"factory {path!r} returned {type(obj).__name__}, not a callable plug-in")
    return obj
