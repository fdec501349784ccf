"""The "reverse digits" task, for the two-stage (SFT -> RL) example (docs/notes/tiny-task.md:
pure RL stalls on it; a 50-step supervised warm-up makes it learn).

- ``prompts(seed)``: ``<s> d1 .. dk =`` with k = 3..5 random digits; the label is the digits reversed.
- ``reward(sample)``: cut after the first ``</s>``, positional matches against ``reversed + </s>``
  divided by ``max(len(response), len(target))`` (1.0 exact).
- ``python examples/sft/reverse_task.py OUT.jsonl [N]`` writes N demonstrations
  (``{"prompt": "123=", "response": "321"}``; the trainer appends ``</s>``) for ``[sft] data``.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator

from pipeline.tiny import DIGIT0_ID, EOS_ID
from producers.plugins import Prompt, Sample


def _digits(rng: random.Random) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(3, 5))]


def prompts(seed: int) -> Iterator[Prompt]:
    rng = random.Random(seed)
    i = 0
    while True:
        d = _digits(rng)
        yield Prompt(prompt_id=f"reverse-{seed}-{i}", text="".join(map(str, d)) + "=", label="".join(map(str, d[::-1])))
        i += 1


def score(response_tokens: list[int], label: str) -> float:
    target = [DIGIT0_ID + int(c) for c in label] + [EOS_ID]
    out = list(response_tokens)
    if EOS_ID in out:
        out = out[: out.index(EOS_ID) + 1]
    if not out:
        return 0.0
    return sum(1 for a, b in zip(out, target, strict=False) if a == b) / max(len(out), len(target))


def reward(sample: Sample) -> float:
    return score(sample.response_tokens, sample.prompt.label)


def write_demos(path: str, n: int = 2000, seed: int = 12345) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            d = _digits(rng)
            f.write(json.dumps({"prompt": "".join(map(str, d)) + "=", "response": "".join(map(str, d[::-1]))}) + "\n")


if __name__ == "__main__":
    write_demos(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
