"""A user plug-in that lives outside the slipstream package: the "min digit" task.

Make this directory importable and name the functions by import path in a config::

    PYTHONPATH=examples/plugins slipstream run examples/plugins/config.toml

- ``prompts(seed)``: ``<s> d1 .. dk =`` (k = 3..5 random digits); the label is the smallest digit;
- ``reward(samples)``: a *group* reward (``producer.reward_scope = "group"``), async to show that
  coroutine plug-ins work: 1.0 for ``<min digit> </s>``, 0.5 for the right digit without ``</s>``
  right after it, else 0;
- ``tool``-free, single-turn: the default rollout is used.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

from pipeline.tiny import DIGIT0_ID, EOS_ID
from producers.plugins import Prompt, Sample


def prompts(seed: int) -> Iterator[Prompt]:
    rng = random.Random(seed)
    i = 0
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
        yield Prompt(prompt_id=f"mindigit-{seed}-{i}", text="".join(map(str, digits)) + "=", label=str(min(digits)))
        i += 1


def _score(sample: Sample) -> float:
    target = DIGIT0_ID + int(sample.prompt.label)
    out = sample.response_tokens
    if out[:2] == [target, EOS_ID]:
        return 1.0
    return 0.5 if out[:1] == [target] else 0.0


async def reward(samples: list[Sample]) -> list[float]:
    await asyncio.sleep(0)  # e.g. a call to a verifier service
    return [_score(s) for s in samples]
