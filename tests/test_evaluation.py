"""Held-out evaluation: the unbiased pass@k estimator, and the evaluator against a scripted engine
(pass@k per prompt, version bookkeeping, when it is due, one line per evaluation in eval.jsonl)."""

from __future__ import annotations

import asyncio
import json
from math import comb
from pathlib import Path

import pytest

from pipeline.tiny import DIGIT0_ID, EOS_ID
from producers.evaluation import Evaluator, pass_at_k
from producers.plugins import Prompt
from producers.rollout import SamplingParams, single_turn
from producers.scoring import Scorer
from tests.test_plugins import ScriptedClient, _Tok


def test_pass_at_k() -> None:
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - comb(6, 4) / comb(8, 4))
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_evaluator_writes_pass_at_k(tmp_path: Path) -> None:
    # Two prompts x 4 samples; prompt a (label 3): 1 of 4 right, prompt b (label 5): 4 of 4 right.
    right_a, right_b, wrong = [DIGIT0_ID + 3, EOS_ID], [DIGIT0_ID + 5, EOS_ID], [DIGIT0_ID, EOS_ID]
    client = ScriptedClient([right_a, wrong, wrong, wrong, right_b, right_b, right_b, right_b], version=7)
    prompts = [Prompt("a", tokens=[1, DIGIT0_ID + 3], label="3"), Prompt("b", tokens=[1, DIGIT0_ID + 5], label="5")]
    out = tmp_path / "eval.jsonl"
    ev = Evaluator(prompts, single_turn, "producers.rollout:single_turn", Scorer("producers.tasks.maxdigit:reward"),
                   SamplingParams(max_new_tokens=4), samples=4, ks=[1, 2, 4, 9], every_versions=5, threshold=1.0, out_path=out)
    assert ev.ks == [1, 2, 4]  # k > n skipped
    assert ev.due(0)
    rec = asyncio.run(ev.evaluate(client, _Tok(), lambda: 7))  # type: ignore[arg-type]
    assert rec["pass@1"] == pytest.approx((1 / 4 + 1) / 2)
    assert rec["pass@2"] == pytest.approx((pass_at_k(4, 1, 2) + 1) / 2)
    assert rec["pass@4"] == 1.0
    assert rec["policy_version"] == 7 and rec["min_token_version"] == rec["max_token_version"] == 7
    assert json.loads(out.read_text()) == rec
    assert not ev.due(9) and ev.due(10)  # evaluated in bucket 5; next at 10


_calls = {"n": 0}


def _slow_first_reward(sample) -> float:  # hangs past the timeout on its first call only
    import time

    _calls["n"] += 1
    if _calls["n"] == 1:
        time.sleep(1.0)
    return 1.0


def test_evaluation_survives_a_reward_timeout_and_retries(tmp_path: Path) -> None:
    """A plug-in timeout during evaluation is logged and retried at the next poll; the loop (and so
    the producer) keeps running."""
    _calls["n"] = 0
    right = [DIGIT0_ID + 3, EOS_ID]
    client = ScriptedClient([right] * 8, version=3)
    out = tmp_path / "eval.jsonl"
    scorer = Scorer("tests.test_evaluation:_slow_first_reward", timeout_s=0.2)
    ev = Evaluator([Prompt("a", tokens=[1, DIGIT0_ID + 3], label="3")], single_turn, "producers.rollout:single_turn",
                   scorer, SamplingParams(max_new_tokens=4), samples=1, ks=[1], every_versions=1, threshold=1.0,
                   out_path=out)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(ev.loop(client, _Tok(), lambda: 3, stop, poll_s=0.05))  # type: ignore[arg-type]
        for _ in range(200):
            await asyncio.sleep(0.05)
            if out.exists():
                break
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["pass@1"] == 1.0
    assert _calls["n"] >= 2  # the timed-out call, then the retry
