"""Cutting groups that are certain to be consumed too stale (DESIGN §3, producer.partial_rollouts),
with a real embedded engine process (HTTP, no mocks of the engine) and the in-process producer
harness (tests/test_producer_helpers.py: a real broker in process).

A group starts at the engine's version v with η = 1; mid-generation the engine moves to v + 2
(/update_weight_version: the weights stay, so the model's log-probs can be checked) and the producer
hears "v + 2 published": 2 > η, so the group is cut (its requests aborted by rid).

- partial_rollouts = true: each sample's aborted tokens become a context head (loss mask 0, log-prob
  0, version v + 2), generation continues from prompt + head (exact ids, no re-tokenising) with the
  remaining budget; the tail has mask 1, versions >= v + 2 and log-probs that match a transformers
  forward over prompt + head; the length stays max_new_tokens; counted as continued;
- partial_rollouts = false: the group is regenerated from the prompt under v + 2 (all tokens
  trained, all versions >= v + 2), counted as restarted.

Without an engine (scripted): the single-turn rollout regenerates a sample that had finished before
the cut and continues an unfinished one (exact inputs, budgets, masks, versions), or gives the group
up without partial rollouts; a multi-turn group (no continuation support) is restarted when cut.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.tiny import make_tiny_model
from producers.plugins import Prompt, Sample
from producers.rollout import GroupCut, RolloutContext, SamplingParams, single_turn
from producers.sglang_client import EngineClient
from tests.test_engine_helpers import Engine, load_reference, reference_logprobs
from tests.test_oversample import SlowClient
from tests.test_producer_helpers import BrokerHarness, announce, drive, make_producer, metric

P = "tests.test_partial_rollouts"
PROMPT = [1, 3, 5, 7]
MAX_NEW = 300


def prompts(seed: int) -> Iterator[Prompt]:
    i = 0
    while True:
        yield Prompt(f"p{i}", tokens=list(PROMPT))
        i += 1


def reward(sample: Sample) -> float:
    return float(len(sample.response_tokens) % 2)


class IgnoreEos(SamplingParams):
    """Long generations from the tiny random model (it samples EOS often)."""

    def to_sglang(self, **overrides: Any) -> dict[str, Any]:
        return super().to_sglang(ignore_eos=True, **overrides)


class RecordingClient(EngineClient):
    """The real HTTP client, remembering every /generate call and its answers."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls: list[tuple[list[list[int]], dict[str, Any], list[dict[str, Any]]]] = []

    async def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        out = await super().generate(input_ids, sampling_params, rids)
        self.calls.append(([list(x) for x in input_ids], dict(sampling_params), out))
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-partial"), max_position_embeddings=1024)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-partial"), "--seed", "7")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def _cut_mid_generation(tmp_path: Path, engine: Engine, partial: bool) -> tuple[Any, BrokerHarness, RecordingClient, int]:
    """Start a group at the engine's version v, move the engine to v + 2 mid-generation and announce it."""
    v = engine.version()
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=1, max_queued_trajectories=2, version=v)  # the trainer publishes v
    p = make_producer(tmp_path, broker, prompts=f"{P}:prompts", reward=f"{P}:reward", group_size=2, max_inflight_groups=1,
                      max_new_tokens=MAX_NEW, partial_rollouts=partial)
    new = v + 2
    p.sampling = IgnoreEos(1.0, 1.0, MAX_NEW)
    box: dict[str, Any] = {}

    async def go() -> None:
        async with RecordingClient([engine.base], 120.0) as client:
            box["client"] = client
            start = engine.metric("slipstream_engine_generated_tokens_total")

            async def cut_midway() -> None:
                while await asyncio.to_thread(engine.metric, "slipstream_engine_generated_tokens_total") < start + 40:
                    await asyncio.sleep(0.02)
                status, out = await asyncio.to_thread(engine.post, "/update_weight_version", {"new_version": str(new), "abort_all_requests": False})
                assert status == 200, out
                await announce(p, broker, new)  # v + 2 published; the group started at v and η = 1

            await drive(p, broker, client, until=lambda: len(broker.groups) >= 1, timeout_s=120, during=cut_midway)

    asyncio.run(go())
    return p, broker, box["client"], new


def test_cut_group_continues_from_its_tokens(tmp_path: Path, engine: Engine, model_dir: Path) -> None:
    p, broker, client, v = _cut_mid_generation(tmp_path, engine, partial=True)
    assert metric(p, "slipstream_producer_groups_cut_total", result="continued") == 1
    assert metric(p, "slipstream_producer_groups_cut_total", result="restarted") == 0
    (group,) = broker.groups
    first_inputs, _, first_out = client.calls[0]
    assert first_inputs == [PROMPT, PROMPT]
    continuations = client.calls[1:]
    assert len(continuations) == 2
    ref = load_reference(model_dir)
    for i, t in enumerate(group.trajectories):
        aborted = first_out[i]
        assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
        head = list(aborted["output_ids"])
        h = len(head)
        assert 0 < h < MAX_NEW
        _, params, (cont,) = next(c for c in continuations if c[0][0] == PROMPT + head)
        assert params["max_new_tokens"] == MAX_NEW - h  # the remaining budget
        tail = list(cont["output_ids"])
        resp = t.response_tokens.tolist()
        assert resp == head + tail and len(resp) == MAX_NEW  # ignore_eos: exactly max_new_tokens
        assert t.loss_mask.tolist() == [0] * h + [1] * len(tail)
        assert t.logprobs[:h].tolist() == [0.0] * h
        assert t.versions[:h].tolist() == [v] * h  # the head is context stamped with the new version
        assert all(x >= v for x in t.versions[h:].tolist())
        assert t.finish_reason == "length"
        want = reference_logprobs(ref, PROMPT + head, tail, 1.0)  # the tail was sampled given exactly prompt + head
        assert max(abs(a - b) for a, b in zip(t.logprobs[h:].tolist(), want, strict=True)) < 1e-4
    assert min(int(t.versions.min()) for t in group.trajectories) == v  # staleness counts from the cut
    assert p.stats.groups_cut == {"continued": 1, "restarted": 0}


def test_cut_group_restarts_without_partial_rollouts(tmp_path: Path, engine: Engine) -> None:
    p, broker, client, v = _cut_mid_generation(tmp_path, engine, partial=False)
    assert metric(p, "slipstream_producer_groups_cut_total", result="restarted") == 1
    assert metric(p, "slipstream_producer_groups_cut_total", result="continued") == 0
    (group,) = broker.groups
    assert group.prompt_id == "p0"  # the same prompt, regenerated
    # The cut call never reached the producer as a result (cancelled); the regeneration starts from the prompt.
    regen_inputs, regen_params, regen_out = client.calls[-1]
    assert regen_inputs == [PROMPT, PROMPT] and regen_params["max_new_tokens"] == MAX_NEW
    for t, out in zip(group.trajectories, regen_out, strict=True):
        assert t.response_tokens.tolist() == out["output_ids"] and len(out["output_ids"]) == MAX_NEW
        assert t.loss_mask.tolist() == [1] * MAX_NEW
        assert int(t.versions.min()) >= v
    assert p.stats.groups_cut == {"continued": 0, "restarted": 1}
    assert engine.metric('slipstream_engine_requests_total{finish_reason="abort"}') >= 2  # the cut requests were aborted


def test_multiturn_group_is_restarted_when_cut(tmp_path: Path) -> None:
    """Rollouts without continuation support (multi-turn, user plug-ins) restart a cut group from the prompt."""
    broker = BrokerHarness(2, max_staleness=1, groups_per_step=1, max_queued_trajectories=2)
    p = make_producer(tmp_path, broker, prompts=f"{P}:prompts", reward=f"{P}:reward", group_size=2, max_inflight_groups=1,
                      rollout="producers.rollouts.multiturn:make_rollout",
                      rollout_args={"tool": "producers.tasks.calculator:tool", "max_turns": 2, "max_total_tokens": 32},
                      partial_rollouts=True)
    client = SlowClient(delay_s=1.0)

    async def cut_midway() -> None:
        while client.calls < 1:
            await asyncio.sleep(0.01)
        client.version = 2  # the engine serves v2 from now on
        await announce(p, broker, 2)

    asyncio.run(drive(p, broker, client, until=lambda: len(broker.groups) >= 1, timeout_s=30, during=cut_midway))
    assert p.stats.groups_cut == {"continued": 0, "restarted": 1}
    assert metric(p, "slipstream_producer_groups_cut_total", result="restarted") == 1
    (group,) = broker.groups
    assert group.prompt_id == "p0"
    for t in group.trajectories:
        assert t.versions.tolist() == [2, 2] and t.loss_mask.tolist() == [1, 1]  # regenerated under v2, nothing stale kept
    assert client.calls >= 3  # the cut first turn(s), then the regeneration (2 episodes)


class CutDuringCall:
    """Scripted engine: the first /generate returns sample 0 finished and sample 1 aborted, after the
    producer's cut (at v3) arrived; later calls answer [9, 9] at v3."""

    def __init__(self, ctx_box: dict[str, Any]) -> None:
        self.ctx_box = ctx_box
        self.calls: list[tuple[list[list[int]], dict[str, Any]]] = []

    async def generate(self, input_ids: list[list[int]], params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        self.calls.append(([list(x) for x in input_ids], dict(params)))

        def resp(ids: list[int], version: int, finish: str) -> dict[str, Any]:
            return {"output_ids": ids, "meta_info": {"output_token_logprobs": [[-0.25, t, None] for t in ids],
                                                     "output_token_weight_versions": [version] * len(ids), "finish_reason": {"type": finish}}}

        if len(self.calls) == 1:
            assert self.ctx_box["ctx"].request_cut(3) == rids  # the producer cuts while this call runs
            return [resp([4, 2], 0, "stop"), resp([5, 6, 7], 0, "abort")]
        return [resp([9, 9][: params["max_new_tokens"]], 3, "length") for _ in input_ids]


def test_single_turn_cut_continues_unfinished_and_regenerates_finished() -> None:
    box: dict[str, Any] = {}
    cuts: list[tuple[str, int, int]] = []
    client = CutDuringCall(box)
    version = [0]
    ctx = RolloutContext(client, None, 2, 0, "p", lambda: version[0], partial_rollouts=True,  # type: ignore[arg-type]
                         on_cut=lambda *a: cuts.append(a))
    box["ctx"] = ctx
    out = asyncio.run(single_turn(ctx, Prompt("a", tokens=list(PROMPT)), SamplingParams(max_new_tokens=5)))
    assert cuts == [("continued", 1, 1)]
    assert ctx.start_version == 3
    # sample 0 had finished before the cut: regenerated from the prompt with the full budget
    assert out[0].response_tokens == [9, 9] and out[0].loss_mask == [1, 1] and out[0].versions == [3, 3]
    # sample 1: its 3 tokens are a context head (mask 0, log-prob 0, version 3), then 2 more (budget 5 - 3)
    assert out[1].response_tokens == [5, 6, 7, 9, 9]
    assert out[1].loss_mask == [0, 0, 0, 1, 1] and out[1].logprobs == [0.0, 0.0, 0.0, -0.25, -0.25] and out[1].versions == [3] * 5
    inputs = sorted((c[0][0], c[1]["max_new_tokens"]) for c in client.calls[1:])
    assert inputs == sorted([(PROMPT, 5), ([*PROMPT, 5, 6, 7], 2)])
    # without partial rollouts the rollout gives the group up (the producer restarts it)
    box2: dict[str, Any] = {}
    ctx2 = RolloutContext(CutDuringCall(box2), None, 2, 0, "p", lambda: 0, partial_rollouts=False)  # type: ignore[arg-type]
    box2["ctx"] = ctx2
    with pytest.raises(GroupCut):
        asyncio.run(single_turn(ctx2, Prompt("a", tokens=list(PROMPT)), SamplingParams(max_new_tokens=5)))
