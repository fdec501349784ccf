"""The tiny example's synthetic verifiable task: "max digit".

Prompt: ``<s> d1 .. dk =`` with k = 3..5 random digits; the answer is the largest digit then
``</s>``.  Reward: cut the response after its first ``</s>`` and score positional matches against
the target divided by ``max(len(response), len(target))`` — 1.0 for an exact answer, partial credit
for a right first digit that runs on.  Always answering "9" scores about 0.34, so rewards well above
that show real learning (see shared notes: tiny-task.md).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pipeline.tiny import DIGIT0_ID, EOS_ID
from producers.plugins import Prompt, Sample


def prompts(seed: int) -> Iterator[Prompt]:
    """Endless, seeded stream of max-digit prompts."""
    rng = random.Random(seed)
    i = 0
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 5))]
        yield Prompt(prompt_id=f"maxdigit-{seed}-{i}", text="".join(map(str, digits)) + "=", label=str(max(digits)))
        i += 1


def score(response_tokens: list[int], answer: int) -> float:
    target = [DIGIT0_ID + answer, EOS_ID]
    out = list(response_tokens)
    if EOS_ID in out:
        out = out[: out.index(EOS_ID) + 1]
    if not out:
        return 0.0
    matches = sum(1 for a, b in zip(out, target, strict=False) if a == b)
    return matches / max(len(out), len(target))


def reward(sample: Sample) -> float:
    return score(sample.response_tokens, int(sample.prompt.label))
