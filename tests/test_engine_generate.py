"""The embedded engine's /generate path, run as a real subprocess over HTTP (no mocks).

Covers response shape (single and batch), exact log-probs against an independent transformers
forward, sampling_seed reproducibility, max_new_tokens / EOS / stop_token_ids / ignore_eos,
400 errors naming the field, pause (in_place, retract, abort) / continue, abort_request, metrics.

    /work/venv/bin/pytest tests/test_engine_generate.py -q
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.tiny import EOS_ID, VOCAB_SIZE, make_tiny_model
from tests.test_engine_helpers import Engine, in_thread, load_reference, reference_logprobs

CONTEXT = 1024  # the tiny model with a longer context, so generations can outlast a pause


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gen"), max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-gen"), "--max-running-requests", "4", "--seed", "123")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    return load_reference(model_dir)


def wait_until(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_logprobs_exact(ref: torch.nn.Module, prompt: list[int], out: dict[str, Any], temperature: float) -> None:
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    want = reference_logprobs(ref, prompt, out["output_ids"], temperature)
    assert len(got) == len(want) == len(out["output_ids"])
    worst = max((abs(a - b) for a, b in zip(got, want, strict=True)), default=0.0)
    assert worst < 1e-4, f"log-prob mismatch {worst:g}"


def test_single_response_shape(engine: Engine) -> None:
    body = {"input_ids": [1, 3, 4, 5], "return_logprob": True, "rid": "shape-1",
            "sampling_params": {"max_new_tokens": 6, "temperature": 0.8, "ignore_eos": True}}
    out = engine.generate(body)
    assert out["text"] == ""
    ids = out["output_ids"]
    assert len(ids) == 6 and all(isinstance(t, int) and 0 <= t < VOCAB_SIZE for t in ids)
    meta = out["meta_info"]
    assert meta["id"] == "shape-1"
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (4, 6, 0)
    assert meta["weight_version"] == "0"
    assert meta["output_token_weight_versions"] == [0] * 6
    assert [t for _, t, _ in meta["output_token_logprobs"]] == ids
    assert all(isinstance(lp, float) and lp <= 0 and txt is None for lp, _, txt in meta["output_token_logprobs"])
    times = meta["output_token_times"]
    assert len(times) == 6 and times == sorted(times)
    plain = engine.generate({"input_ids": [1, 3], "sampling_params": {"max_new_tokens": 2}})
    assert "output_token_logprobs" not in plain["meta_info"] and plain["meta_info"]["id"]


def test_batch_returns_one_response_per_input_in_order(engine: Engine) -> None:
    prompts = [[1, 3, 4], [1], [1, 5, 6, 7, 8, 9]]
    body = {"input_ids": prompts, "rid": ["b0", "b1", "b2"], "return_logprob": [True, False, True],
            "sampling_params": [{"max_new_tokens": n, "ignore_eos": True} for n in (3, 5, 7)]}
    outs = engine.generate(body)
    assert isinstance(outs, list) and len(outs) == 3
    for i, out in enumerate(outs):
        meta = out["meta_info"]
        assert meta["id"] == f"b{i}" and meta["prompt_tokens"] == len(prompts[i])
        assert len(out["output_ids"]) == meta["completion_tokens"] == (3, 5, 7)[i]
        assert ("output_token_logprobs" in meta) == (i != 1)


def test_logprobs_equal_an_independent_forward(engine: Engine, reference: torch.nn.Module) -> None:
    """Staggered concurrent requests (more than the batch cap of 4): exercises queueing, prefill
    cohorts merged into the running batch with left padding, and rows leaving the batch."""
    rng = random.Random(0)
    cases = []
    for i in range(10):
        prompt = [1] + [rng.randrange(3, 14) for _ in range(rng.randrange(0, 12))]
        temperature = [1.0, 0.7, 0.0, 1.3][i % 4]
        params: dict[str, Any] = {"max_new_tokens": rng.randrange(10, 40), "temperature": temperature}
        if i % 3 == 1:
            params.update(top_k=5, top_p=0.9)
        cases.append((prompt, temperature, params))
    threads = []
    for prompt, _, params in cases:
        body = {"input_ids": prompt, "sampling_params": params, "return_logprob": True}
        threads.append(in_thread(lambda body=body: engine.generate(body)))
        time.sleep(rng.uniform(0, 0.03))
    for (prompt, temperature, _), (t, box) in zip(cases, threads, strict=True):
        t.join(60)
        out = box["out"]
        assert_logprobs_exact(reference, prompt, out, temperature)
        if temperature == 0.0:  # greedy: each token is the reference argmax
            with torch.inference_mode():
                logits = reference(input_ids=torch.tensor([prompt + out["output_ids"]])).logits[0]
            argmax = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
            assert out["output_ids"] == argmax[: len(out["output_ids"])]


def test_sampling_seed_reproducible(engine: Engine) -> None:
    def body(seed: int | None) -> dict[str, Any]:
        sp = {"max_new_tokens": 30, "ignore_eos": True, "temperature": 1.0, "sampling_seed": seed}
        return {"input_ids": [1, 4, 4], "sampling_params": sp, "return_logprob": True}

    a, b, c = (engine.generate(body(s)) for s in (42, 42, 43))
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
    assert a["output_ids"] != c["output_ids"]
    batch = engine.generate({"input_ids": [[1, 9, 9, 9], [1, 4, 4]], "sampling_params": [body(7)["sampling_params"],
                             body(42)["sampling_params"]]})
    assert batch[1]["output_ids"] == a["output_ids"]  # same seed, different batch company
    u1, u2 = engine.generate(body(None)), engine.generate(body(None))
    assert u1["output_ids"] != u2["output_ids"]  # unseeded: engine seed + request counter


def test_max_new_tokens_stop_tokens_and_eos(engine: Engine) -> None:
    zero = engine.generate({"input_ids": [1, 3], "sampling_params": {"max_new_tokens": 0}})
    assert zero["output_ids"] == [] and zero["meta_info"]["finish_reason"] == {"type": "length", "length": 0}

    # stop_token_ids: stop at the first occurrence, the stop token included (as SGLang)
    for seed in range(100):
        sp = {"temperature": 1.0, "max_new_tokens": 40, "sampling_seed": seed, "ignore_eos": True}
        ref = engine.generate({"input_ids": [1, 7, 8], "sampling_params": sp})["output_ids"]
        ks = [i for i in range(2, len(ref) - 1) if ref[i] not in [*ref[:i], EOS_ID]]
        if ks and EOS_ID not in ref[: ks[0]]:
            k = ks[0]
            break
    else:
        pytest.fail("no usable stop token in 100 seeds")
    stop_sp = {**sp, "ignore_eos": False, "stop_token_ids": [ref[k]]}
    stopped = engine.generate({"input_ids": [1, 7, 8], "sampling_params": stop_sp})
    assert stopped["output_ids"] == ref[: k + 1]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[k]}
    ignored = engine.generate({"input_ids": [1, 7, 8], "sampling_params": {**stop_sp, "ignore_eos": True}})
    assert ignored["output_ids"] == ref  # ignore_eos also ignores stop_token_ids (SGLang semantics)

    # EOS from the model config ends a sequence unless ignore_eos
    for seed in range(200):
        sp = {"temperature": 1.5, "max_new_tokens": 60, "sampling_seed": seed, "ignore_eos": True}
        long = engine.generate({"input_ids": [1, 3], "sampling_params": sp})["output_ids"]
        if EOS_ID in long[:-1]:
            break
    else:
        pytest.fail("no sampled EOS in 200 seeds")
    short = engine.generate({"input_ids": [1, 3], "sampling_params": {**sp, "ignore_eos": False}})
    cut = long.index(EOS_ID) + 1
    assert short["output_ids"] == long[:cut]
    assert short["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS_ID}
    assert len(long) == 60


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "input_ids"),
        ({"text": "1+1="}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, VOCAB_SIZE]}, "input_ids[1]"),
        ({"input_ids": [1, -1]}, "input_ids[1]"),
        ({"input_ids": [1, "a"]}, "input_ids[1]"),
        ({"input_ids": [[1, 2], []]}, "input_ids[1]"),
        ({"input_ids": [[1, 2], [1, 99]]}, "input_ids[1][1]"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10**6}}, "sampling_params.max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": CONTEXT}}, "sampling_params.max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ({"input_ids": [1], "sampling_params": "greedy"}, "sampling_params"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}, {"top_p": 2}]}, "sampling_params[1].top_p"),
        ({"input_ids": [[1], [2]], "sampling_params": [{}]}, "sampling_params"),
        ({"input_ids": [1], "return_logprob": "yes"}, "return_logprob"),
        ({"input_ids": [1], "stream": True}, "stream"),
        ({"input_ids": [1], "top_logprobs_num": 5}, "top_logprobs_num"),
        ({"input_ids": [[1], [2]], "rid": "one"}, "rid"),
        ({"input_ids": [[1], [2]], "rid": ["same", "same"]}, "rid[1]"),
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
    ],
)
def test_bad_generate_requests_get_400_naming_the_field(engine: Engine, body: Any, field: str) -> None:
    status, out = engine.post("/generate", body)
    assert status == 400, out
    assert out["error"]["message"].startswith(f"{field}:"), out


def test_bad_control_requests_and_engine_survives(engine: Engine) -> None:
    status, out = engine.post("/pause_generation", {"mode": "sideways"})
    assert status == 400 and out["error"]["message"].startswith("mode:")
    status, out = engine.post("/abort_request", {})
    assert status == 400 and out["error"]["message"].startswith("rid:")
    status, out = engine.post("/update_weights_from_distributed", {"names": ["x"], "dtypes": ["float32"]})
    assert status == 400 and out["success"] is False and "shapes" in out["message"]
    status, out = engine.post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                             "rank_offset": 2, "world_size": 2})
    assert status == 400 and out["success"] is False and "rank_offset" in out["message"]
    assert engine.get("/health")[0] == 200
    assert engine.generate({"input_ids": [1], "sampling_params": {"max_new_tokens": 2}})["output_ids"]


def _long_request(engine: Engine, rid: str, n: int = 700) -> tuple[Any, dict[str, Any]]:
    body = {"input_ids": [1, 3, 5], "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": n, "ignore_eos": True, "temperature": 1.0}}
    start = engine.metric("slipstream_engine_generated_tokens_total")
    t, box = in_thread(lambda: engine.generate(body))
    wait_until(lambda: engine.metric("slipstream_engine_generated_tokens_total") > start + 20, what="decoding")
    return t, box


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_keeps_requests_and_continue_resumes(engine: Engine, reference: torch.nn.Module, mode: str) -> None:
    t, box = _long_request(engine, f"pause-{mode}")
    try:
        engine.ok("POST", "/pause_generation", {"mode": mode})
        before = engine.metric("slipstream_engine_generated_tokens_total")
        time.sleep(0.5)
        assert engine.metric("slipstream_engine_generated_tokens_total") == before
        info = engine.ok("GET", "/get_server_info")
        assert info["paused"] is True and info["running_requests"] == 1
        assert t.is_alive()
    finally:
        engine.ok("POST", "/continue_generation", {})
    t.join(60)
    out = box["out"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 700}
    times = out["meta_info"]["output_token_times"]
    assert max(b - a for a, b in itertools.pairwise(times)) >= 0.45  # it was paused mid-generation
    # in_place kept the KV cache, retract recomputed it: either way the log-probs stay exact
    assert_logprobs_exact(reference, [1, 3, 5], out, 1.0)


def test_pause_abort_and_queue_while_paused(engine: Engine) -> None:
    t, box = _long_request(engine, "pause-abort")
    try:
        engine.ok("POST", "/pause_generation", {"mode": "abort"})
        t.join(30)
        meta = box["out"]["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and 0 < meta["completion_tokens"] < 700
        t2, box2 = in_thread(lambda: engine.generate({"input_ids": [1], "sampling_params": {"max_new_tokens": 3}}))
        time.sleep(0.4)
        assert t2.is_alive() and engine.ok("GET", "/get_server_info")["queued_requests"] == 1
    finally:
        engine.ok("POST", "/continue_generation", {})
    t2.join(30)
    assert box2["out"]["meta_info"]["completion_tokens"] == 3


def test_abort_request_by_rid(engine: Engine) -> None:
    t, box = _long_request(engine, "to-abort")
    engine.ok("POST", "/abort_request", {"rid": "to-abort"})
    t.join(30)
    meta = box["out"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 700


def test_info_and_metrics(engine: Engine) -> None:
    info = engine.ok("GET", "/get_model_info")
    assert info["is_generation"] is True and info["weight_version"] == "0"
    assert info["vocab_size"] == VOCAB_SIZE and info["eos_token_id"] == EOS_ID
    assert engine.ok("POST", "/flush_cache", {})["success"] is True
    assert engine.get("/get_server_info")[0] == 200
    assert engine.metric("slipstream_engine_generated_tokens_total") > 0
    assert engine.metric("slipstream_engine_decode_steps_total") > 0
    assert engine.metric("slipstream_engine_policy_version") == 0
    assert engine.metric('slipstream_engine_requests_total{finish_reason="abort"}') >= 1
    assert engine.metric('slipstream_engine_requests_total{finish_reason="length"}') >= 1
    assert engine.metric("slipstream_engine_bad_requests_total") >= 10
    assert engine.metric("slipstream_engine_running_requests") == 0
    _, text = engine.get("/metrics")
    assert "slipstream_engine_weight_update_pause_seconds_bucket" in text
    assert 'slipstream_build_info{' in text and 'role="engine"' in text
