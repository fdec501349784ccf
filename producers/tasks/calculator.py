"""Calculator tool use for the tiny model (multi-turn example, ``examples/multiturn``).

The tiny vocabulary (``<pad> <s> </s> 0-9 =``) is enough to express a tool call:

- prompt: ``<s> d1 .. dk`` (k = 2..3 digits); the task is their sum, e.g. ``<s> 7 5 9`` -> 21;
- the model "calls" the calculator with ``=`` (a stop token, so the model turn ends there): the
  operands are the digits it wrote in that turn, or, for a bare ``=``, the question's digits;
- :func:`tool` answers with the digits of the sum (tool tokens: ``loss_mask`` 0), and the model gets
  another turn;
- the answer is the run of digits right before the response's first ``</s>``, whoever wrote them:
  ``= [2 1] </s>`` and ``7 5 9 = [2 1] </s>`` (bracketed: tool output) are correct for ``7 5 9``.

Reward (:func:`reward`): 1.0 for a correct answer; 0.5 when a calculator call returned the right
sum but the answer is wrong or missing; else 0.  The best policy is "``=`` then ``</s>``", which the
tiny model can find (a policy that never calls the tool has to add digits itself).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from pipeline.tiny import DIGIT0_ID, EOS_ID, EQUALS_ID
from producers.plugins import Prompt, Sample
from producers.rollouts.multiturn import Episode, Observation

CALL_ID = EQUALS_ID  # the token that ends a model turn with a tool call


def prompts(seed: int) -> Iterator[Prompt]:
    """Endless, seeded stream of digit-sum prompts."""
    rng = random.Random(seed)
    i = 0
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(2, 3))]
        yield Prompt(prompt_id=f"calc-{seed}-{i}", text="".join(map(str, digits)), label=str(sum(digits)))
        i += 1


def digit_tokens(n: int) -> list[int]:
    return [DIGIT0_ID + int(c) for c in str(n)]


def _digits(tokens: list[int]) -> list[int]:
    return [t - DIGIT0_ID for t in tokens if DIGIT0_ID <= t < DIGIT0_ID + 10]


def tool(episode: Episode) -> Observation | None:
    """The calculator: a turn ending in ``=`` gets the sum of the digits written in that turn."""
    turn = episode.last_turn_tokens
    if not turn or turn[-1] != CALL_ID:
        return None  # the model answered (or ran out of tokens): the episode ends
    operands = _digits(turn[:-1]) or _digits(episode.prompt_tokens)
    result = sum(operands)
    episode.metadata.setdefault("calls", []).append(str(result))
    return Observation(tokens=digit_tokens(result))


def answer(response_tokens: list[int]) -> str | None:
    """The digits right before the first ``</s>`` (None without ``</s>`` or digits there)."""
    if EOS_ID not in response_tokens:
        return None
    head = response_tokens[: response_tokens.index(EOS_ID)]
    out: list[int] = []
    for t in reversed(head):
        if not DIGIT0_ID <= t < DIGIT0_ID + 10:
            break
        out.append(t - DIGIT0_ID)
    return "".join(map(str, reversed(out))) or None


def reward(sample: Sample) -> float:
    if answer(sample.response_tokens) == sample.prompt.label:
        return 1.0
    return 0.5 if sample.prompt.label in sample.metadata.get("calls", []) else 0.0
