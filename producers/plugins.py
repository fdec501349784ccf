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
:class:`PluginError` naming the config key, the plug-in and the offending field.

Per-call timeouts (:func:`call_plugin_timeout`): the producer bounds every rollout, reward, group
filter and tool call (``producer.rollout_timeout_s``, ``producer.reward_timeout_s``,
``producer.tool_timeout_s``).  An async plug-in is cancelled at its timeout; a sync plug-in runs in a
daemon worker thread (one per call, so one that never returns cannot block the event loop, other
calls, or the process's exit) and the producer stops waiting for it.  A timeout raises
:class:`PluginTimeout`, which is *not* fatal: the producer abandons the group and retries the prompt
(``producer.timeout_attempts``).

    prompts = load_plugin("producers.tasks.maxdigit:prompts", "producer.prompts")
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import threading
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


class PluginTimeout(Exception):
    """A plug-in call did not return within its configured timeout (not fatal: the group is retried).

    ``key`` is the plug-in's config key, ``plugin`` its import path, ``timeout_key`` the config key
    that sets the limit and ``reason`` the bounded metric label (``rollout_timeout`` ...).
    """

    def __init__(self, key: str, plugin: str, timeout_key: str, timeout_s: float, reason: str) -> None:
        super().__init__(f"plug-in {plugin!r} ({key}) did not return within {timeout_s:g}s; raise {timeout_key} if it needs longer")
        self.key = key
        self.plugin = plugin
        self.timeout_key = timeout_key
        self.timeout_s = timeout_s
        self.reason = reason


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


def _is_async(fn: Callable[..., Any]) -> bool:
    call = type(fn).__call__ if not inspect.isroutine(fn) else None  # a plug-in object (e.g. MultiTurnRollout)
    return inspect.iscoroutinefunction(fn) or (call is not None and inspect.iscoroutinefunction(call))


async def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> Any:
    """Run ``fn(*args)`` in its own daemon thread; the result (or exception) comes back as a future."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if fut.done():
            return  # the caller stopped waiting (timeout or cancellation)
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        try:
            out = fn(*args)
        except BaseException as e:  # delivered to the awaiting coroutine
            ok, value = False, e
        else:
            ok, value = True, out
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:
            pass  # the event loop is closed: nobody waits any more

    threading.Thread(target=work, name=f"plugin-{name}", daemon=True).start()
    return await fut


async def call_plugin_timeout(
    fn: Callable[..., Any], *args: Any, timeout_s: float, key: str, plugin: str, timeout_key: str, reason: str
) -> Any:
    """Call a sync or async plug-in with a per-call timeout (see the module docstring).

    Raises :class:`PluginTimeout` when ``timeout_s`` passes; exceptions of the plug-in propagate.
    """
    async def run() -> Any:
        out = await _in_thread(fn, args, reason) if not _is_async(fn) else fn(*args)
        if inspect.isawaitable(out):
            out = await out
        return out

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        return await asyncio.wait_for(run(), timeout=timeout_s)
    except TimeoutError:
        if loop.time() - t0 < timeout_s:
            raise  # the plug-in's own TimeoutError, before ours: an ordinary plug-in exception
        raise PluginTimeout(key, plugin, timeout_key, timeout_s, reason) from None


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
        raise ConfigError(key, f"cannot import module {module_name!r}: {e} (a module outside the package needs its directory "
                               "on PYTHONPATH or in run.python_path)") from None
    except Exception as e:  # the module itself raised while importing (SyntaxError, NameError, ...)
        raise ConfigError(key, f"importing module {module_name!r} raised {type(e).__name__}: {e}") from None
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
