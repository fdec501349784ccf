"""Producer plug-ins, in process (no slipstream processes):

- loading by import path, factories with ``*_args``;
- the reward plug-in per sample / per group, sync / async, and every malformed output (raising,
  wrong type, wrong length, NaN, bool) reported as a PluginError naming key, plug-in and field;
- the group filter (built-in drop_uniform; undeclared reasons count as "other");
- rollout output validation, the single-turn and multi-turn rollouts against a scripted engine
  (exact per-token masks, log-probs and versions; max_turns; max_total_tokens);
- the calculator task's tool and reward;
- the remote reward against a real aiohttp server (per sample, per group, timeout, HTTP errors), and
  cut by the producer's reward timeout (producer.reward_timeout_s).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from pipeline.configbase import ConfigError
from pipeline.tiny import DIGIT0_ID, EOS_ID, EQUALS_ID
from producers.filters import drop_uniform
from producers.plugins import PluginError, PluginTimeout, Prompt, Sample, load_plugin
from producers.rollout import RolloutContext, RolloutSample, SamplingParams, single_turn, validate_samples
from producers.rollouts.multiturn import Observation, make_rollout
from producers.scoring import Scorer
from producers.tasks import calculator

D = [DIGIT0_ID + i for i in range(10)]


def _sample(reward: float | None = None, resp: list[int] | None = None, label: str = "3") -> Sample:
    resp = resp if resp is not None else [D[3], EOS_ID]
    return Sample(Prompt("p0", "12=", label=label), [1, D[1], D[2], EQUALS_ID], resp, "", "stop", [1] * len(resp), reward=reward)


# ---------------------------------------------------------------- plug-ins used by the tests below
def r_const(sample: Sample) -> float:
    return 0.5


async def r_async(sample: Sample) -> float:
    await asyncio.sleep(0)
    return float(len(sample.response_tokens))


def r_group(samples: list[Sample]) -> list[float]:
    return [float(i) for i in range(len(samples))]


def r_group_short(samples: list[Sample]) -> list[float]:
    return [1.0]


def r_str(sample: Sample) -> Any:
    return "1.0"


def r_nan(sample: Sample) -> float:
    return math.nan


def r_bool(sample: Sample) -> Any:
    return True


def r_raises(sample: Sample) -> float:
    raise KeyError("label")


def r_factory(scale: float) -> Any:
    return lambda s: scale


def f_declared(samples: list[Sample]) -> str | None:
    return "too_easy" if samples[0].reward == 1.0 else "weird"


f_declared.reasons = ("too_easy",)  # type: ignore[attr-defined]


def f_bad(samples: list[Sample]) -> Any:
    return 3


P = "tests.test_plugins"


def _rewards(path: str, n: int = 3, scope: str = "sample", **kw: Any) -> list[float]:
    return asyncio.run(Scorer(f"{P}:{path}", scope, **kw).rewards([_sample() for _ in range(n)]))  # type: ignore[arg-type]


def test_load_plugin_and_factories() -> None:
    assert load_plugin(f"{P}:r_const", "producer.reward")(_sample()) == 0.5
    assert load_plugin(f"{P}:r_factory", "producer.reward", {"scale": 2.0})(_sample()) == 2.0
    with pytest.raises(ConfigError, match=r"producer.reward_args.*does not accept"):
        load_plugin(f"{P}:r_factory", "producer.reward", {"nope": 1})
    with pytest.raises(ConfigError, match="has no attribute"):
        load_plugin(f"{P}:missing", "producer.reward")
    with pytest.raises(ConfigError, match="cannot import module"):
        load_plugin("no_such_module_xyz:f", "producer.reward")


def test_rewards_sync_async_sample_and_group() -> None:
    assert _rewards("r_const") == [0.5, 0.5, 0.5]
    assert _rewards("r_async") == [2.0, 2.0, 2.0]
    assert _rewards("r_group", scope="group") == [0.0, 1.0, 2.0]
    assert _rewards("r_factory", reward_args={"scale": 0.25}) == [0.25] * 3


@pytest.mark.parametrize(
    ("path", "scope", "match"),
    [
        ("r_str", "sample", r"'producer.reward'.*r_str.*reward of sample 0 is '1.0' \(str\)"),
        ("r_nan", "sample", r"r_nan.*reward of sample 0 is nan"),
        ("r_bool", "sample", r"r_bool.*reward of sample 0 is True"),
        ("r_raises", "sample", r"r_raises.*raised KeyError"),
        ("r_group_short", "group", r"r_group_short.*returned 1 rewards for 3 samples"),
        ("r_const", "group", r"r_const.*returned float, expected list\[float\]"),
    ],
)
def test_malformed_rewards_name_plugin_and_field(path: str, scope: str, match: str) -> None:
    with pytest.raises(PluginError, match=match):
        _rewards(path, scope=scope)


def test_group_filters() -> None:
    assert drop_uniform([_sample(0.0), _sample(0.0)]) == "all_zero"
    assert drop_uniform([_sample(1.0), _sample(1.0)]) == "all_one"
    assert drop_uniform([_sample(0.5), _sample(0.5)]) == "all_equal"
    assert drop_uniform([_sample(0.5), _sample(1.0)]) is None
    s = Scorer(f"{P}:r_const", group_filter="producers.filters:drop_uniform")
    assert s.reasons == ("all_zero", "all_one", "all_equal", "other")
    assert asyncio.run(s.filter_reason([_sample(1.0), _sample(1.0)])) == "all_one"
    s = Scorer(f"{P}:r_const", group_filter=f"{P}:f_declared")
    assert asyncio.run(s.filter_reason([_sample(1.0)])) == "too_easy"
    assert asyncio.run(s.filter_reason([_sample(0.0)])) == "other"  # undeclared: bounded label set
    with pytest.raises(PluginError, match=r"producer.group_filter.*f_bad.*returned int"):
        asyncio.run(Scorer(f"{P}:r_const", group_filter=f"{P}:f_bad").filter_reason([_sample(1.0)]))
    assert asyncio.run(Scorer(f"{P}:r_const").filter_reason([_sample(1.0)])) is None


def test_validate_samples_names_the_field() -> None:
    good = RolloutSample([5, 6], [-0.1, -0.2], [0, 0], [1, 1])
    assert validate_samples([good], 1, "x:y") == [good]
    cases = [
        ("nope", r"'x:y': returned str"),
        ([good, good], "returned 2 samples for group_size 1"),
        ([{"a": 1}], r"samples\[0\] is dict"),
        ([RolloutSample([5, 6], [-0.1], [0, 0], [1, 1])], r"samples\[0\].logprobs has 1 entries for 2 response_tokens"),
        ([RolloutSample([5, 6], [-0.1, -0.2], [0, 0], [1])], r"samples\[0\].loss_mask has 1 entries"),
        ([RolloutSample([5, 6], [-0.1, -0.2], [0], [1, 1])], r"samples\[0\].versions has 1 entries"),
        ([RolloutSample([5, 6], [-0.1, 0.5], [0, 0], [1, 1])], r"samples\[0\].logprobs\[1\] = 0.5"),
        ([RolloutSample([5, 6], [-0.1, -0.2], [0, 0], [1, 2])], r"loss_mask must hold only 0 and 1"),
        ([RolloutSample([5, 6], [-0.1, -0.2], [0, -1], [1, 1])], "negative policy version"),
        ([RolloutSample([], [], [], [], "stop")], r"samples\[0\] has no response tokens \(finish_reason 'stop'\)"),
    ]
    for out, match in cases:
        with pytest.raises(PluginError, match=match):
            validate_samples(out, 1, "x:y")
    aborted = RolloutSample([], [], [], [], "abort")  # the engine's doing, not the plug-in's: GroupMaker retries it
    assert validate_samples([aborted], 1, "x:y") == [aborted]


def test_a_group_with_an_empty_aborted_sample_is_retried_as_an_engine_error_not_sent() -> None:
    """Empty responses are invalid on the wire (schemas.validate): the producer never builds a group of one."""
    from producers.feed import Job
    from producers.group import Active, GroupMaker
    from producers.sglang_client import EngineError
    from producers.stats import ProducerAccount

    def rollout(ctx: RolloutContext, prompt: Prompt, sampling: SamplingParams) -> list[RolloutSample]:
        return [RolloutSample([D[3], EOS_ID], [-0.1, -0.2], [0, 0], [1, 1]), RolloutSample([], [], [], [], "abort")]

    account = ProducerAccount(None)
    maker = GroupMaker(rollout, "tests:rollout", 2, 10.0, Scorer("producers.tasks.maxdigit:reward"), SamplingParams(), None, "p-1", account)
    job = Job(Prompt("p0", tokens=[1, D[1], EQUALS_ID], label="3"))
    act = Active(job, RolloutContext(client=None, tokenizer=None, group_size=2, version_at_submit=0))  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=r"samples\[1\] has no response tokens: the engine aborted its request") as e:
        asyncio.run(maker.make(job, act))
    assert type(e.value) is EngineError  # scheduler: counted engine_error, prompt retried
    assert account.metrics.registry.get_sample_value("slipstream_producer_groups_generated_total") == 0  # not counted as generated


# ---------------------------------------------------------------- scripted engine
class ScriptedClient:
    """Stands in for EngineClient: answers /generate from a script of output-token lists."""

    def __init__(self, script: list[list[int]], version: int = 0) -> None:
        self.script = list(script)
        self.calls: list[tuple[list[list[int]], dict[str, Any]]] = []
        self.version = version

    async def generate(self, input_ids: list[list[int]], params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        self.calls.append(([list(x) for x in input_ids], dict(params)))
        out = []
        for _ in input_ids:
            ids = self.script.pop(0)[: params["max_new_tokens"]]
            last = ids[-1] if ids else None
            stop = last == EOS_ID or last in params.get("stop_token_ids", [])
            out.append({"output_ids": ids, "meta_info": {
                "output_token_logprobs": [[-0.5, t, None] for t in ids],
                "output_token_weight_versions": [self.version] * len(ids),
                "finish_reason": {"type": "stop" if stop else "length"},
            }})
        return out


class _Tok:
    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        ids = ([1] if add_special_tokens else []) + [DIGIT0_ID + int(c) if c.isdigit() else EQUALS_ID for c in text]
        return type("E", (), {"ids": ids})()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(str(i - DIGIT0_ID) if DIGIT0_ID <= i < DIGIT0_ID + 10 else "=" if i == EQUALS_ID else "" for i in ids)


def _ctx(client: ScriptedClient, group_size: int, version: list[int]) -> RolloutContext:
    return RolloutContext(client, _Tok(), group_size, version[0], "p", lambda: version[0])  # type: ignore[arg-type]


def test_single_turn_rollout() -> None:
    client = ScriptedClient([[D[4], EOS_ID], [D[9]]])
    out = asyncio.run(single_turn(_ctx(client, 2, [3]), Prompt("a", "12="), SamplingParams(max_new_tokens=5)))
    assert client.calls[0][0] == [[1, D[1], D[2], EQUALS_ID]] * 2
    assert [o.response_tokens for o in out] == [[D[4], EOS_ID], [D[9]]]
    assert out[0].loss_mask == [1, 1] and out[0].logprobs == [-0.5, -0.5]
    assert [o.finish_reason for o in out] == ["stop", "length"]


def test_multiturn_masks_logprobs_versions_and_incremental_history() -> None:
    # Turn 1: "7 5 =" (tool call) -> tool appends "1 2"; the producer learns of v5 meanwhile;
    # turn 2: "</s>" -> episode over.
    version = [4]
    client = ScriptedClient([[D[7], D[5], EQUALS_ID], [EOS_ID]], version=4)
    rollout = make_rollout("producers.tasks.calculator:tool", max_turns=3, max_total_tokens=30, stop_token_ids=[EQUALS_ID])

    async def go() -> list[RolloutSample]:
        orig = client.generate

        async def gen(ids: list[list[int]], params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
            r = await orig(ids, params)
            version[0] = 5  # a new version is published while the first turn runs
            client.version = 5
            return r

        client.generate = gen  # type: ignore[method-assign]
        return await rollout(_ctx(client, 1, version), Prompt("a", tokens=[1, D[7], D[5]], label="12"), SamplingParams(max_new_tokens=6))

    (s,) = asyncio.run(go())
    assert s.response_tokens == [D[7], D[5], EQUALS_ID, D[1], D[2], EOS_ID]
    assert s.loss_mask == [1, 1, 1, 0, 0, 1]
    assert s.logprobs == [-0.5, -0.5, -0.5, 0.0, 0.0, -0.5]
    assert s.versions == [4, 4, 4, 5, 5, 5]  # tool tokens: the newest version known when appended
    assert s.metadata == {"turns": 2, "tool_calls": 1, "calls": ["12"]}
    # The second turn's input is the first turn's input + exactly the appended ids (no re-tokenising).
    assert client.calls[1][0] == [[1, D[7], D[5], D[7], D[5], EQUALS_ID, D[1], D[2]]]
    assert client.calls[0][1]["stop_token_ids"] == [EQUALS_ID]
    sample = Sample(Prompt("a", tokens=[1, D[7], D[5]], label="12"), [1, D[7], D[5]], s.response_tokens, "", "stop", s.loss_mask, s.metadata)
    assert calculator.reward(sample) == 1.0
    validate_samples([s], 1, "multiturn")


def test_multiturn_limits() -> None:
    # max_turns = 2: the second model turn is the last, even if it calls the tool again.
    client = ScriptedClient([[D[1], EQUALS_ID], [D[1], EQUALS_ID], [EOS_ID]])
    rollout = make_rollout("producers.tasks.calculator:tool", max_turns=2, max_total_tokens=64, stop_token_ids=[EQUALS_ID])
    (s,) = asyncio.run(rollout(_ctx(client, 1, [0]), Prompt("a", tokens=[1, D[1]]), SamplingParams(max_new_tokens=6)))
    assert len(client.calls) == 2 and s.loss_mask == [1, 1, 0, 1, 1] and s.metadata["turns"] == 2
    # max_total_tokens = 7 (prompt 2): turn 1 gets at most 5 new tokens, the observation is cut to fit.
    client = ScriptedClient([[D[9], D[9], D[9], D[9], EQUALS_ID], [EOS_ID]])
    rollout = make_rollout("producers.tasks.calculator:tool", max_turns=3, max_total_tokens=7, stop_token_ids=[EQUALS_ID])
    (s,) = asyncio.run(rollout(_ctx(client, 1, [0]), Prompt("a", tokens=[1, D[9]]), SamplingParams(max_new_tokens=10)))
    assert client.calls[0][1]["max_new_tokens"] == 5
    assert len(client.calls) == 1 and s.finish_reason == "length"
    assert s.response_tokens == [D[9], D[9], D[9], D[9], EQUALS_ID] and s.loss_mask == [1] * 5


def bad_tool(episode: Any) -> Any:
    return [1, 2]


def test_multiturn_bad_tool_is_named() -> None:
    client = ScriptedClient([[D[1], EQUALS_ID]])
    rollout = make_rollout(f"{P}:bad_tool", max_turns=2, max_total_tokens=64)
    with pytest.raises(PluginError, match=r"producer.rollout_args.tool.*bad_tool.*returned list, expected Observation"):
        asyncio.run(rollout(_ctx(client, 1, [0]), Prompt("a", tokens=[1]), SamplingParams()))


async def text_tool(episode: Any) -> Observation | None:
    return Observation(text="12", done=True) if episode.turn == 1 else None


def test_multiturn_async_tool_with_text_observation_and_done() -> None:
    client = ScriptedClient([[D[1], EQUALS_ID], [EOS_ID]])
    rollout = make_rollout(f"{P}:text_tool", max_turns=3, max_total_tokens=64)
    (s,) = asyncio.run(rollout(_ctx(client, 1, [2]), Prompt("a", tokens=[1]), SamplingParams()))
    assert len(client.calls) == 1  # done: no further model turn
    assert s.response_tokens == [D[1], EQUALS_ID, D[1], D[2]] and s.loss_mask == [1, 1, 0, 0] and s.versions == [0, 0, 2, 2]


def test_calculator_task() -> None:
    assert calculator.answer([D[7], EQUALS_ID, D[1], D[2], EOS_ID, D[3]]) == "12"
    assert calculator.answer([D[1], D[2]]) is None
    ok = Sample(Prompt("a", label="12"), [1, D[7], D[5]], [D[1], D[2], EOS_ID], "", "stop")
    assert calculator.reward(ok) == 1.0
    called = Sample(Prompt("a", label="12"), [1, D[7], D[5]], [D[7], D[5], EQUALS_ID, D[1], D[2], D[3], EOS_ID], "", "stop", metadata={"calls": ["12"]})
    assert calculator.reward(called) == 0.5
    assert calculator.reward(Sample(Prompt("a", label="12"), [1, D[7], D[5]], [D[3], EOS_ID], "", "stop", metadata={"calls": ["3"]})) == 0.0
    # A bare "=" applies the calculator to the question's digits.
    from producers.rollouts.multiturn import Episode

    ep = Episode(Prompt("a", label="12"), [1, D[7], D[5]], [EQUALS_ID], [1], 1, [EQUALS_ID], "stop", None, {})  # type: ignore[arg-type]
    assert calculator.tool(ep) == Observation(tokens=[D[1], D[2]]) and ep.metadata["calls"] == ["12"]
    ep = Episode(Prompt("a", label="12"), [1, D[7], D[5]], [D[2], EOS_ID], [1, 1], 1, [D[2], EOS_ID], "stop", None, {})  # type: ignore[arg-type]
    assert calculator.tool(ep) is None
    prompts = calculator.prompts(0)
    p = next(prompts)
    assert int(p.label) == sum(int(c) for c in p.text)


# ---------------------------------------------------------------- remote reward
@pytest.fixture(scope="module")
def reward_server() -> Iterator[str]:
    async def score(request: web.Request) -> web.Response:
        body = await request.json()
        if "samples" in body:
            return web.json_response({"rewards": [float(len(s["response_tokens"])) for s in body["samples"]]})
        if body["label"] == "slow":
            await asyncio.sleep(2)
        if body["label"] == "500":
            return web.json_response({"error": "boom"}, status=500)
        if body["label"] == "400":
            return web.json_response({"error": "bad"}, status=400)
        return web.json_response({"reward": 1.0 if body["response"] == body["label"] else 0.0})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/score", score)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{port}/score"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


def _remote(url: str, samples: list[Sample], scope: str = "sample", **kw: Any) -> list[float]:
    s = Scorer("producers.rewards.remote:make_reward", scope, {"url": url, "backoff_s": 0.01, **kw})  # type: ignore[arg-type]
    return asyncio.run(s.rewards(samples))


def test_remote_reward_per_sample_and_group(reward_server: str) -> None:
    right = Sample(Prompt("a", label="42"), [1], [D[4], D[2]], "42", "stop", [1, 1])
    wrong = Sample(Prompt("b", label="42"), [1], [D[4]], "4", "stop", [1])
    assert _remote(reward_server, [right, wrong]) == [1.0, 0.0]
    assert _remote(reward_server, [right, wrong], scope="group") == [2.0, 1.0]


def test_remote_reward_failures_are_named(reward_server: str) -> None:
    slow = Sample(Prompt("a", label="slow"), [1], [D[4]], "4", "stop", [1])
    with pytest.raises(PluginError, match=r"remote:make_reward.*failed after 2 attempts.*timeout"):
        _remote(reward_server, [slow], timeout_s=0.3, retries=1)
    with pytest.raises(PluginError, match="failed after 3 attempts: HTTP 500"):
        _remote(reward_server, [Sample(Prompt("a", label="500"), [1], [D[4]], "4", "stop", [1])])
    with pytest.raises(PluginError, match="answered HTTP 400"):
        _remote(reward_server, [Sample(Prompt("a", label="400"), [1], [D[4]], "4", "stop", [1])])
    with pytest.raises(PluginError, match="ClientConnectorError"):
        _remote("http://127.0.0.1:9/score", [slow], retries=0)


def test_remote_reward_is_cut_at_the_producer_timeout(reward_server: str) -> None:
    # The server takes 2 s; the remote plug-in would wait 5 s, producer.reward_timeout_s is 0.3 s.
    slow = Sample(Prompt("a", label="slow"), [1], [D[4]], "4", "stop", [1])
    s = Scorer("producers.rewards.remote:make_reward", "sample", {"url": reward_server, "timeout_s": 5.0, "retries": 0}, timeout_s=0.3)
    with pytest.raises(PluginTimeout, match=r"'producers.rewards.remote:make_reward' \(producer.reward\).*raise producer.reward_timeout_s") as e:
        asyncio.run(s.rewards([slow]))
    assert e.value.reason == "reward_timeout"


def test_example_configs_load_and_their_plugins_import(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import load_config
    from tests.helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "examples" / "plugins"))
    for name in ("multiturn", "plugins"):
        cfg = load_config(REPO / "examples" / name / "config.toml", []).producer
        load_plugin(cfg.prompts, "producer.prompts", cfg.prompts_args)
        load_plugin(cfg.rollout, "producer.rollout", cfg.rollout_args)
        Scorer(cfg.reward, cfg.reward_scope, cfg.reward_args, cfg.group_filter, cfg.group_filter_args)
