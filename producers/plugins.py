"""Plug-in interfaces of the producers and loading them by import path.

- prompt source: ``callable(seed: int) -> Iterator[Prompt]``
- reward: ``callable(sample: Sample) -> float`` (per sample; 0..1 for the built-in tasks)

    prompts = load_plugin("producers.tasks.maxdigit:prompts", "producer.prompts")
"""

from __future__ import annotations

import importlib
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
    """What a reward function sees: the prompt and one sampled response."""

    prompt: Prompt
    prompt_tokens: list[int]
    response_tokens: list[int]
    response_text: str
    finish_reason: str


PromptSource = Callable[[int], Iterator[Prompt]]
RewardFn = Callable[[Sample], float]


def load_plugin(path: str, key: str) -> Any:
    """Import ``module:attribute``; a failure is a ConfigError naming the config key."""
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
    return obj
