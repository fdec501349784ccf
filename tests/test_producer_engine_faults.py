"""Engine faults seen from the producer, with real embedded engine processes (HTTP, no engine mocks)
and the in-process producer harness (tests/test_producer_helpers.py: a real broker in process).

- invalid output: an engine whose weights hold NaN answers NaN log-probs (really: the tiny model
  with a NaN norm weight).  :func:`check_response` names the field; the client raises
  :class:`EngineOutputError` naming the engine URL; in a producer with that engine and a healthy
  one the group is dropped, counted by reason (``invalid_output``) and per URL, its prompt retried
  (on the other engine, round-robin), the producer does not stop, and every consumed group is
  finite.  The old behaviour blamed the rollout plug-in and killed the producer.
- a crashed engine: with two engines, SIGKILL one while it has requests in flight: it is taken out
  of rotation (counted), its requests are resubmitted to the other engine, and no request goes to
  it while it is down (its resubmission count stays put while groups keep flowing); SIGKILL the
  second too: requests wait; restart the first on the same port: it answers /health, is back in
  rotation and the waiting requests complete there.  No group is dropped or lost: every group
  generated is accepted, consumed once.  (slow: three engine start-ups.)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from pipeline.tiny import make_tiny_model
from producers.plugins import Prompt, Sample
from producers.rollout import SamplingParams
from producers.sglang_client import EngineClient, EngineOutputError, check_response
from tests.test_engine_helpers import Engine, free_port
from tests.test_producer_helpers import BrokerHarness, drive, make_producer, metric

P = "tests.test_producer_engine_faults"


def prompts(seed: int) -> Iterator[Prompt]:
    i = 0
    while True:
        yield Prompt(f"p{i}", tokens=[1, 3 + i % 10, 5])
        i += 1


def reward(sample: Sample) -> float:
    return float(len(sample.response_tokens) % 2)


class IgnoreEos(SamplingParams):
    """Long generations from the tiny random model (it samples EOS often)."""

    def to_sglang(self, **overrides: Any) -> dict[str, Any]:
        return super().to_sglang(ignore_eos=True, **overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-faults"))


@pytest.fixture(scope="module")
def nan_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An engine serving the tiny model with a NaN final-norm weight: every log-prob it returns is NaN."""
    d = make_tiny_model(tmp_path_factory.mktemp("tiny-nan"))
    f = d / "model.safetensors"
    weights = load_file(str(f))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, str(f), metadata={"format": "pt"})
    eng = Engine(d, tmp_path_factory.mktemp("engine-nan"))
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def test_check_response_names_the_bad_field() -> None:
    good = {"output_ids": [4, 5], "meta_info": {"output_token_logprobs": [[-0.5, 4, None], [0.0, 5, None]]}}
    assert check_response(good) is None
    assert check_response({"meta_info": {}}) is None  # no logprobs asked for: parse_generation reports it
    bad = {
        "nan": ([[float("nan"), 4, None]], r"output_token_logprobs\[0\] log-probability nan"),
        "inf": ([[-0.1, 4, None], [float("-inf"), 5, None]], r"\[1\] log-probability -inf"),
        "positive": ([[0.25, 4, None]], r"0.25 is not a finite number <= 0"),
        "none": ([[None, 4, None]], r"None is not a finite number"),
        "bool": ([[True, 4, None]], r"True is not a finite number"),
        "no id": ([[-0.5]], r"is not \[logprob, token_id"),
        "str id": ([[-0.5, "4", None]], r"is not \[logprob, token_id"),
    }
    import re

    for name, (lp, pattern) in bad.items():
        problem = check_response({"meta_info": {"output_token_logprobs": lp}})
        assert problem is not None and re.search(pattern, problem), (name, problem)
    assert "no meta_info" in (check_response({"text": "x"}) or "")
    assert "expected a JSON object" in (check_response([1]) or "")
    assert "expected a list" in (check_response({"meta_info": {"output_token_logprobs": 3}}) or "")


def test_client_blames_the_engine_for_nan_logprobs(nan_engine: Engine) -> None:
    async def go() -> None:
        async with EngineClient([nan_engine.base], 60.0) as client:
            with pytest.raises(EngineOutputError) as e:
                await client.generate([[1, 3, 5]], {"max_new_tokens": 3, "temperature": 1.0})
            assert e.value.url == nan_engine.base
            assert f"engine {nan_engine.base} returned invalid output: response 0 of 1: meta_info.output_token_logprobs[0] log-probability nan" in str(e.value)

    asyncio.run(go())


def test_producer_drops_and_retries_a_group_the_engine_spoiled(tmp_path: Path, nan_engine: Engine, model_dir: Path) -> None:
    good = Engine(model_dir, tmp_path / "engine-good", "--seed", "3")
    try:
        broker = BrokerHarness(2, max_staleness=1, groups_per_step=8, max_queued_trajectories=8)
        p = make_producer(tmp_path, broker, prompts=f"{P}:prompts", reward=f"{P}:reward", group_size=2, max_inflight_groups=2,
                          max_new_tokens=4)

        async def go() -> None:
            async with EngineClient([nan_engine.base, good.base], 60.0, events=p.account) as client:
                await drive(p, broker, client, timeout_s=120,
                            until=lambda: len(broker.groups) >= 6 and p.stats.groups_engine_dropped["invalid_output"] >= 2)

        asyncio.run(go())
    finally:
        assert good.terminate() == 0, good.log_tail()
    assert p.fatal is None, "the producer stopped on the engine's NaN"
    dropped = p.stats.groups_engine_dropped["invalid_output"]
    assert metric(p, "slipstream_producer_groups_engine_dropped_total", reason="invalid_output") == dropped >= 2
    assert p.stats.engine_faults[nan_engine.base]["invalid_output"] == dropped
    assert good.base not in p.stats.engine_faults
    assert metric(p, "slipstream_producer_plugin_errors_total", reason="error") == 0  # not the plug-in's fault
    for g in broker.groups:
        for t in g.trajectories:
            assert all(math.isfinite(x) and x <= 0 for x in t.logprobs.tolist())
    # Dropped groups spent no credit: only groups the producer counted reached the broker (the outbox at stop may be unacked).
    assert p.stats.groups_generated - len(p.link.outbox) <= broker.accepted_groups <= p.stats.groups_generated


@pytest.mark.slow
def test_crashed_engine_leaves_rotation_and_its_requests_are_resubmitted(tmp_path: Path, model_dir: Path) -> None:
    port_a = free_port()
    a = Engine(model_dir, tmp_path / "engine-a", "--seed", "1", "--port", str(port_a))
    b = Engine(model_dir, tmp_path / "engine-b", "--seed", "2")
    engines = [a, b]
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=1000, max_queued_trajectories=8)
    p = make_producer(tmp_path, broker, prompts=f"{P}:prompts", reward=f"{P}:reward", group_size=2, max_inflight_groups=4,
                      max_new_tokens=60)
    p.sampling = IgnoreEos(1.0, 1.0, 60)
    seen: dict[str, Any] = {}

    async def go() -> None:
        async with EngineClient([a.base, b.base], 60.0, down_timeout_s=120.0, probe_interval_s=0.2, events=p.account) as client:

            async def until_in_flight(url: str) -> None:
                while client.in_flight_by_url()[url] == 0:
                    await asyncio.sleep(0.005)

            async def wait_for(cond: Any, what: str) -> None:
                for _ in range(12_000):
                    if cond():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"timed out waiting for {what}")

            async def faults() -> None:
                await wait_for(lambda: len(broker.groups) >= 2, "the first groups")
                await until_in_flight(a.base)
                await asyncio.to_thread(a.kill)  # SIGKILL with requests in flight
                await wait_for(lambda: metric(p, "slipstream_producer_engines_down") == 1, "engine a out of rotation")
                retried_a = p.stats.engine_faults[a.base]["retried"]
                consumed = len(broker.groups)
                await wait_for(lambda: len(broker.groups) >= consumed + 3, "groups from engine b while a is down")
                seen["retried_a_then"], seen["retried_a_later"] = retried_a, p.stats.engine_faults[a.base]["retried"]
                await until_in_flight(b.base)
                await asyncio.to_thread(b.kill)  # now no engine is up: requests wait for one
                await wait_for(lambda: metric(p, "slipstream_producer_engines_down") == 2, "both engines out of rotation")
                consumed = len(broker.groups)
                restarted = await asyncio.to_thread(Engine, model_dir, tmp_path / "engine-a-restarted", "--seed", "1", "--port", str(port_a))
                engines.append(restarted)
                await wait_for(lambda: metric(p, "slipstream_producer_engines_down") == 1, "engine a back in rotation")
                await wait_for(lambda: len(broker.groups) >= consumed + 3, "groups from the restarted engine a")
                seen["restarted_tokens"] = await asyncio.to_thread(restarted.metric, "slipstream_engine_generated_tokens_total")
                seen["done"] = True

            await drive(p, broker, client, until=lambda: bool(seen.get("done")), timeout_s=300, during=faults)

    try:
        asyncio.run(go())
    finally:
        for e in engines:
            e.kill()
    assert p.fatal is None
    assert engines[-1].base == a.base, "the restarted engine serves the same URL"
    faults_a, faults_b = p.stats.engine_faults[a.base], p.stats.engine_faults[b.base]
    assert faults_a["down"] == 1 and faults_b["down"] == 1
    assert faults_a["retried"] >= 1 and faults_b["retried"] >= 1, "the requests in flight on the killed engines were resubmitted"
    assert seen["retried_a_later"] == seen["retried_a_then"], "a request went to engine a while it was out of rotation"
    assert metric(p, "slipstream_producer_engine_downs_total") == 2
    assert metric(p, "slipstream_producer_engine_requests_retried_total") == faults_a["retried"] + faults_b["retried"]
    assert seen["restarted_tokens"] > 0, "the restarted engine took requests again"
    # Nothing dropped, nothing lost: every group sent was accepted and consumed exactly once.
    assert p.stats.groups_engine_dropped == {"invalid_output": 0, "engine_error": 0}
    ids = [g.group_id for g in broker.groups]
    assert len(ids) == len(set(ids))
    assert p.stats.groups_generated - len(p.link.outbox) <= broker.accepted_groups <= p.stats.groups_generated

