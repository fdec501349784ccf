"""producer.oversample (dynamic-sampling over-generation), in process with a real broker and a
trainer that drains it (tests/test_producer_helpers.py) and a scripted engine:

- with a filter that drops every other prompt's group and credits limited by the broker,
  oversample = 2 keeps twice as many generations in flight as oversample = 1 (measured maximum);
- groups the filter drops never reach the broker, no more groups are sent than credits granted,
  and every started group is accounted for (sent, filtered, waiting or still generating);
- a passing group with no credit waits in the producer and is sent when a credit arrives;
- a waiting group that falls more than η behind the published version is regenerated, counted.

Counts are read once the producer is quiescent (every credit spent, nothing generating): reward and
filter plug-ins run in worker threads, so groups finish in no fixed order, and a count taken at the
moment the last group is sent would race with the groups still being scored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers.config import ProducerConfig
from producers.plugins import Prompt, Sample
from tests.test_producer_helpers import BrokerHarness, announce, drive, make_producer, metric, quiescent

P = "tests.test_oversample"


def prompts(seed: int) -> Iterator[Prompt]:
    i = 0
    while True:
        yield Prompt(f"p{i}", tokens=[1, 3 + i % 10], metadata={"index": i})
        i += 1


def reward(sample: Sample) -> float:
    """Even prompts: every sample 1.0 (drop_uniform drops the group); odd: 0/1 by sample."""
    if sample.prompt.metadata["index"] % 2 == 0:
        return 1.0
    return float(sample.response_tokens[0] % 2)


class SlowClient:
    """A scripted engine: each /generate takes ``delay_s``; sample i answers [3 + i, EOS]."""

    def __init__(self, delay_s: float = 0.05, version: int = 0) -> None:
        self.delay_s = delay_s
        self.version = version
        self.calls = 0

    async def generate(self, input_ids: list[list[int]], params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        out = []
        for i, _ in enumerate(input_ids):
            ids = [3 + i, 2]
            out.append({"output_ids": ids, "meta_info": {"output_token_logprobs": [[-0.5, t, None] for t in ids],
                                                         "output_token_weight_versions": [self.version] * 2, "finish_reason": {"type": "stop"}}})
        return out

    def abort_targets(self, rids: list[str]) -> list[tuple[str, str]]:
        return []

    async def wait_healthy(self, timeout_s: float) -> None:
        pass


def _cfg(oversample: float) -> dict[str, Any]:
    return {"prompts": f"{P}:prompts", "reward": f"{P}:reward", "group_filter": "producers.filters:drop_uniform",
            "group_size": 2, "max_inflight_groups": 8, "oversample": oversample}


def _run(tmp_path: Path, oversample: float, groups: int = 12) -> tuple[Any, BrokerHarness]:
    # 12 group starts in all ((η + 1) x groups_per_step at v0), at most 4 out at once (8 trajectories of room).
    broker = BrokerHarness(2, max_staleness=2, groups_per_step=groups // 3, max_queued_trajectories=8)
    p = make_producer(tmp_path, broker, **_cfg(oversample))
    asyncio.run(drive(p, broker, SlowClient(), until=lambda: len(broker.groups) >= groups and quiescent(p), timeout_s=60))
    return p, broker


@pytest.mark.parametrize("oversample", [1.0, 2.0])
def test_filtered_groups_never_reach_the_broker_and_counts_balance(tmp_path: Path, oversample: float) -> None:
    p, broker = _run(tmp_path, oversample)
    assert len(broker.groups) == 12 <= p.link.stats.credits_granted
    for g in broker.groups:
        assert int(g.prompt_id[1:]) % 2 == 1, "a group of an even prompt (all rewards equal) was sent"
        assert len({t.reward for t in g.trajectories}) > 1
    filtered = p.stats.groups_filtered.get("all_one", 0)
    assert filtered == metric(p, "slipstream_producer_groups_filtered_total", reason="all_one") >= 11
    assert set(p.stats.filtered_prompt_ids) <= {f"p{i}" for i in range(0, 200, 2)}
    # Every started group is accounted for: sent, filtered, waiting for a credit, or cut off by the stop.
    started = p.stats.groups_started
    assert started == (len(broker.groups) + filtered + len(p.waiting) + p.running
                       + p.stats.groups_cancelled_at_stop)
    assert p.stats.trajectories_generated == 2 * len(broker.groups)


def test_oversample_keeps_more_generations_in_flight(tmp_path: Path) -> None:
    p1, _ = _run(tmp_path / "a", 1.0)
    p2, _ = _run(tmp_path / "b", 2.0)
    # The broker never has more than 4 credits out; oversample 1 generates one group per credit.
    assert p1.max_running == 4
    assert p2.max_running == 8
    assert p1.link.stats.credits_granted <= 12 and p2.link.stats.credits_granted <= 12


def test_passing_group_waits_for_a_credit_then_is_sent(tmp_path: Path) -> None:
    # Every group passes (no filter); 2 credits (room for 2 groups), oversample 2: 4 generate, 2 are sent, 2 wait.
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=2, max_queued_trajectories=4, drain=False)
    p = make_producer(tmp_path, broker, **{**_cfg(2.0), "group_filter": ""})
    seen: dict[str, Any] = {}

    async def later() -> None:
        # Event order, not time: the 2 credited groups are in the broker and nothing generates any more ...
        while len(p.waiting) < 2 or p.running or broker.accepted_groups < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # ... and nothing more starts or is sent without a credit (a bug would show here)
        seen.update(sent=broker.accepted_groups, waiting=len(p.waiting), credits=p.credits, running=p.running,
                    gauge=metric(p, "slipstream_producer_waiting_groups"), waiting_ids=[r.job.prompt.prompt_id for r in p.waiting])
        await broker.consume(2)  # the trainer takes the 2 queued groups: 2 more credits, the waiting groups go out, oldest first
        while broker.queued_groups < 2:
            await asyncio.sleep(0.01)
        await broker.consume(2)

    asyncio.run(drive(p, broker, SlowClient(), until=lambda: len(broker.groups) >= 4, timeout_s=30, during=later))
    assert seen == {"sent": 2, "waiting": 2, "credits": 0, "running": 0, "gauge": 2.0, "waiting_ids": seen["waiting_ids"]}
    assert p.max_running == 4
    assert [g.prompt_id for g in broker.groups[2:]] == seen["waiting_ids"]
    assert metric(p, "slipstream_producer_credit_waits_total", result="sent") == 2
    assert len(broker.groups) == 4 == p.link.stats.credits_granted


def test_waiting_group_too_stale_is_regenerated(tmp_path: Path) -> None:
    cfg = {**_cfg(2.0), "group_filter": ""}
    # η = 0 and one group per step: one group start at v0; the trainer consumes it, so its credit never comes back.
    broker = BrokerHarness(2, max_staleness=0, groups_per_step=1, max_queued_trajectories=2)
    p = make_producer(tmp_path, broker, **cfg)

    async def go() -> None:
        while len(p.waiting) < 1:
            await asyncio.sleep(0.01)
        waiting_prompt = p.waiting[0].job.prompt.prompt_id
        await announce(p, broker, 2)  # v2 published, tokens are v0, η = 0: certain to be too stale
        assert waiting_prompt in [j.prompt.prompt_id for j in p.requeued] or p.running > 0

    asyncio.run(drive(p, broker, SlowClient(), until=lambda: metric(p, "slipstream_producer_credit_waits_total", result="stale") >= 1,
                      timeout_s=30, during=go))
    assert p.stats.credit_waits["stale"] >= 1
    assert all(int(t.versions.min()) == 0 for g in broker.groups for t in g.trajectories)  # sent before v2 (first credit)
    assert ProducerConfig(oversample=1.5).oversample == 1.5
    with pytest.raises(ValueError, match="oversample"):
        ProducerConfig(oversample=0.5)
