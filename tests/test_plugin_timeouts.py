"""Per-call plug-in timeouts (producer.rollout_timeout_s, reward_timeout_s, tool_timeout_s,
timeout_attempts):

- call_plugin_timeout cuts a sync plug-in (run in a worker thread) and an async one at the timeout,
  names the plug-in and the key to raise, and lets a plug-in's own exceptions through;
- the reward (sync and async, per sample and per group), the group filter and a multi-turn tool
  raise PluginTimeout with the right reason;
- in a producer (real broker in process, scripted engine): a prompt whose reward or rollout never
  returns is cut at the timeout every attempt, counted per attempt, given up after timeout_attempts
  (counted and listed), and the other prompts keep flowing to the broker; nothing hangs.

No wall-clock bounds: a "hanging" plug-in blocks until the test releases it (``HANG``), so "the
call did not wait for it" is checked by event order (the plug-in had not returned when the call
did), not by elapsed time.  In the producer test every timeout is accounted for per attempt and per
prompt (``timed_out_prompt_ids``): on a loaded machine an ordinary call can exceed the short timeout
too, and is then retried like any other; the counts must still balance exactly.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers.config import ProducerConfig
from producers.plugins import PluginTimeout, Prompt, Sample, call_plugin_timeout
from producers.rollout import RolloutContext, RolloutSample, SamplingParams, single_turn
from producers.rollouts.multiturn import Observation, make_rollout
from producers.scoring import Scorer
from tests.test_oversample import SlowClient
from tests.test_plugins import ScriptedClient, _ctx, _sample
from tests.test_producer_helpers import BrokerHarness, drive, make_producer, metric

P = "tests.test_plugin_timeouts"
HANG_BOUND_S = 60.0  # safety bound only: a hanging plug-in returns when the test releases HANG
HANG = threading.Event()  # set after each test: releases every hanging plug-in (a fresh one per test)
RETURNED: list[str] = []  # names of this test's hanging plug-ins that returned


@pytest.fixture(autouse=True)
def _release_hangs() -> Iterator[None]:
    global HANG, RETURNED
    HANG, RETURNED = threading.Event(), []
    yield
    HANG.set()


def sleepy_sync(x: Any) -> float:
    hang, returned = HANG, RETURNED  # this test's: a thread released after its test must not report into the next one
    hang.wait(HANG_BOUND_S)
    returned.append("sleepy_sync")
    return 1.0


async def sleepy_async(x: Any) -> float:
    hang, returned = HANG, RETURNED
    while not hang.is_set():
        await asyncio.sleep(0.01)
    returned.append("sleepy_async")
    return 1.0


def raises_timeout(x: Any) -> float:
    raise TimeoutError("the plug-in's own timeout")


def _call(fn: Any, timeout_s: float = 0.2) -> Any:
    return asyncio.run(call_plugin_timeout(fn, 1, timeout_s=timeout_s, key="producer.reward", plugin="m:f",
                                           timeout_key="producer.reward_timeout_s", reason="reward_timeout"))


@pytest.mark.parametrize("fn", [sleepy_sync, sleepy_async])
def test_call_is_cut_at_the_timeout(fn: Any) -> None:
    t0 = time.monotonic()
    with pytest.raises(PluginTimeout, match=r"plug-in 'm:f' \(producer.reward\) did not return within 0.2s; raise producer.reward_timeout_s") as e:
        _call(fn)
    assert time.monotonic() - t0 >= 0.2
    assert RETURNED == [], "the call waited for the plug-in to return"
    assert e.value.reason == "reward_timeout" and e.value.timeout_key == "producer.reward_timeout_s"


def test_fast_calls_and_own_exceptions_pass_through() -> None:
    # A generous timeout: these calls must not be cut, however loaded the machine (0.2 s was, once).
    t = HANG_BOUND_S
    assert _call(lambda x: x + 1, t) == 2
    assert _call(lambda x: asyncio.sleep(0, result=7), t) == 7  # sync callable returning an awaitable

    async def a(x: int) -> int:
        return x * 3

    assert _call(a, t) == 3
    with pytest.raises(TimeoutError, match="own timeout"):
        _call(raises_timeout, t)
    with pytest.raises(ZeroDivisionError):
        _call(lambda x: x / 0, t)


@pytest.mark.parametrize(("path", "scope"), [("sleepy_sync", "sample"), ("sleepy_async", "sample"), ("sleepy_async", "group")])
def test_reward_timeout(path: str, scope: str) -> None:
    s = Scorer(f"{P}:{path}", scope, timeout_s=0.2)  # type: ignore[arg-type]
    with pytest.raises(PluginTimeout, match=rf"'{P}:{path}' \(producer.reward\).*producer.reward_timeout_s") as e:
        asyncio.run(s.rewards([_sample(), _sample()]))
    assert e.value.reason == "reward_timeout"


def slow_filter(samples: list[Sample]) -> str | None:
    sleepy_sync(samples)
    return None


def test_group_filter_timeout() -> None:
    s = Scorer("tests.test_plugins:r_const", group_filter=f"{P}:slow_filter", timeout_s=0.2)
    with pytest.raises(PluginTimeout, match=r"producer.group_filter.*producer.reward_timeout_s") as e:
        asyncio.run(s.filter_reason([_sample(1.0)]))
    assert e.value.reason == "group_filter_timeout"


def slow_tool(episode: Any) -> Observation | None:
    sleepy_sync(episode)
    return None


def test_tool_timeout() -> None:
    client = ScriptedClient([[5, 6]])
    rollout = make_rollout(f"{P}:slow_tool", max_turns=2, max_total_tokens=64)
    ctx = _ctx(client, 1, [0])
    ctx.tool_timeout_s = 0.2
    with pytest.raises(PluginTimeout, match=rf"'{P}:slow_tool' \(producer.rollout_args.tool\).*producer.tool_timeout_s") as e:
        asyncio.run(rollout(ctx, Prompt("a", tokens=[1]), SamplingParams()))
    assert e.value.reason == "tool_timeout" and RETURNED == []


# ---------------------------------------------------------------- in a producer
def prompts(seed: int) -> Iterator[Prompt]:
    i = 0
    while True:
        yield Prompt(f"p{i}", tokens=[1, 3 + i % 10])
        i += 1


def reward_hangs_on_p1(sample: Sample) -> float:
    if sample.prompt.prompt_id == "p1":
        sleepy_sync(sample)
    return float(sample.response_tokens[0] % 2)


async def areward_hangs_on_p1(sample: Sample) -> float:
    if sample.prompt.prompt_id == "p1":
        await sleepy_async(sample)
    return float(sample.response_tokens[0] % 2)


async def rollout_hangs_on_p1(ctx: RolloutContext, prompt: Prompt, params: SamplingParams) -> list[RolloutSample]:
    if prompt.prompt_id == "p1":
        await sleepy_async(prompt)
    return await single_turn(ctx, prompt, params)


@pytest.mark.parametrize(("override", "reason"), [
    ({"reward": f"{P}:reward_hangs_on_p1"}, "reward_timeout"),
    ({"reward": f"{P}:areward_hangs_on_p1"}, "reward_timeout"),
    ({"rollout": f"{P}:rollout_hangs_on_p1"}, "rollout_timeout"),
])
def test_producer_retries_then_gives_up_and_keeps_going(tmp_path: Path, override: dict[str, str], reason: str) -> None:
    # Only the plug-in under test gets the short timeout: the other one must never be cut (a loaded machine once did).
    short = {"reward_timeout": "reward_timeout_s", "rollout_timeout": "rollout_timeout_s"}[reason]
    cfg = {"prompts": f"{P}:prompts", "reward": f"{P}:reward_hangs_on_p1", "group_size": 2, "max_inflight_groups": 2,
           "reward_timeout_s": HANG_BOUND_S, "rollout_timeout_s": HANG_BOUND_S, short: 0.3, "timeout_attempts": 2, **override}
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=4, max_queued_trajectories=4)  # 8 group starts, 2 out at once
    p = make_producer(tmp_path, broker, **cfg)
    asyncio.run(drive(p, broker, SlowClient(delay_s=0.01),
                      until=lambda: len(broker.groups) >= 8 and metric(p, "slipstream_producer_prompts_failed_total", reason="timeout") >= 1,
                      timeout_s=30))
    assert RETURNED == [], "the producer waited for the hanging plug-in"
    # Every timed-out attempt is counted once, under this reason (the only plug-in that can time out here).
    timed_out = collections.Counter(p.stats.timed_out_prompt_ids)
    attempts = sum(timed_out.values())
    assert metric(p, "slipstream_producer_plugin_errors_total", reason=reason) == attempts == p.stats.plugin_timeouts[reason]
    assert p.stats.plugin_timeouts == {reason: attempts}
    assert timed_out["p1"] == 2  # p1 hangs: cut at the timeout on each of its timeout_attempts attempts
    # Given up: exactly the prompts whose every attempt timed out (p1; an ordinary prompt only if the machine stalled twice).
    failed = p.stats.failed_prompt_ids
    assert failed[0] == "p1" or "p1" in failed
    assert sorted(failed) == sorted(pid for pid, n in timed_out.items() if n == 2)
    assert metric(p, "slipstream_producer_prompts_failed_total", reason="timeout") == len(failed)
    sent = [g.prompt_id for g in broker.groups]
    expected = [f"p{i}" for i in range(8 + len(failed)) if f"p{i}" not in failed]
    assert sorted(sent) == sorted(expected), "given-up prompts never sent; every other prompt sent once"
    assert p.link.stats.credits_granted == 8  # credits of timed-out attempts started other prompts, none leaked


def test_timeout_config_is_validated() -> None:
    for key in ("rollout_timeout_s", "reward_timeout_s", "tool_timeout_s"):
        with pytest.raises(ValueError, match=key):
            ProducerConfig(**{key: 0})
    with pytest.raises(ValueError, match="timeout_attempts"):
        ProducerConfig(timeout_attempts=0)
