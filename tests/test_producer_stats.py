"""The producer's account (producers/stats.py): metrics and typed stats move together, and the stats
file is exact for ``generated`` across a crash because it is written before each first send.

- each account event moves its Prometheus counter and its stats field by the same amount, and the
  stats file holds the same numbers (plus the link's);
- in a running producer (real broker in process, scripted engine) the stats file on disk already
  counts every group the broker has accepted, at every moment a group is consumed: what the broker
  can accept was counted first (``summary.json``'s ``generated`` >= ``accepted`` even after a
  SIGKILL; the end-to-end SIGKILL check is ``tests/test_faults.py::test_producer_sigkill_is_restarted``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from producers.stats import ProducerAccount
from tests.test_oversample import SlowClient
from tests.test_producer_helpers import BrokerHarness, drive, make_producer


def _m(acc: ProducerAccount, name: str, **labels: str) -> float:
    return float(acc.metrics.registry.get_sample_value(name, labels or None) or 0.0)


def test_each_event_moves_metric_and_stat_together(tmp_path: Path) -> None:
    acc = ProducerAccount(tmp_path / "s.json")
    acc.filtered("all_one", "p1")
    acc.filtered("all_one", "p3")
    acc.timed_out("reward_timeout", "p2")
    acc.prompt_given_up("p2")
    acc.cut("continued")
    acc.credit_wait("stale", 0)
    acc.engine_dropped("invalid_output", "http://e0")
    acc.engine_down("http://e1", 1)
    acc.engine_retried("http://e1")
    acc.engine_up("http://e1", 0)
    acc.sending(4)
    s = acc.stats
    assert _m(acc, "slipstream_producer_groups_filtered_total", reason="all_one") == s.groups_filtered["all_one"] == 2
    assert s.filtered_prompt_ids == ["p1", "p3"]
    assert _m(acc, "slipstream_producer_plugin_errors_total", reason="reward_timeout") == s.plugin_timeouts["reward_timeout"] == 1
    assert s.timed_out_prompt_ids == ["p2"] and s.failed_prompt_ids == ["p2"]
    assert _m(acc, "slipstream_producer_prompts_failed_total", reason="timeout") == 1
    assert _m(acc, "slipstream_producer_groups_cut_total", result="continued") == s.groups_cut["continued"] == 1
    assert _m(acc, "slipstream_producer_credit_waits_total", result="stale") == s.credit_waits["stale"] == 1
    assert _m(acc, "slipstream_producer_groups_engine_dropped_total", reason="invalid_output") == s.groups_engine_dropped["invalid_output"] == 1
    assert s.engine_faults == {"http://e0": {"invalid_output": 1}, "http://e1": {"down": 1, "retried": 1}}
    assert _m(acc, "slipstream_producer_engine_downs_total") == 1 and _m(acc, "slipstream_producer_engines_down") == 0
    assert _m(acc, "slipstream_producer_engine_requests_retried_total") == 1
    on_disk = json.loads((tmp_path / "s.json").read_text())  # sending() persisted it
    assert on_disk["trajectories_generated"] == 4 and on_disk["groups_generated"] == 1
    assert on_disk["engine_faults"] == s.engine_faults and on_disk["groups_filtered"] == {"all_one": 2}


def test_stats_file_counts_every_group_before_the_broker_can_accept_it(tmp_path: Path) -> None:
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=20, max_queued_trajectories=8)
    p = make_producer(tmp_path, broker, prompts="tests.test_oversample:prompts", reward="tests.test_oversample:reward",
                      group_size=2, max_inflight_groups=4)
    stats_path = tmp_path / "stats" / "producer-0.json"
    seen: list[tuple[int, int]] = []  # (trajectories the broker accepted, trajectories_generated in the file), at each consumption

    async def watch() -> None:
        consumed = 0
        while True:
            if len(broker.groups) != consumed:
                consumed = len(broker.groups)
                accepted = int(broker.metric("slipstream_broker_trajectories_accepted_total"))
                seen.append((accepted, json.loads(stats_path.read_text())["trajectories_generated"]))
            await asyncio.sleep(0)

    asyncio.run(drive(p, broker, SlowClient(delay_s=0.01), until=lambda: len(broker.groups) >= 30, timeout_s=60, during=watch))
    assert len(seen) >= 10
    lagging: list[Any] = [(a, g) for a, g in seen if g < a]
    assert not lagging, f"the stats file lagged behind what the broker accepted: {lagging[:5]}"
