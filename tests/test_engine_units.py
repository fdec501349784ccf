"""In-process unit tests of the engine's pure parts: config validation, sampling params, sampler,
weight-update request parsing.  The HTTP/subprocess behaviour is in the other test_engine_* files.

    /work/venv/bin/pytest tests/test_engine_units.py -q
"""

from __future__ import annotations

import pytest
import torch

from pipeline.configbase import ConfigError, from_dict
from producers.engine.config import EngineConfig
from producers.engine.sampler import sample_rows
from producers.engine.sampling import RequestError, SamplingParams, parse_sampling_params
from producers.engine.weights import parse_update_request


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_running_requests", 0),
        ("max_new_tokens_cap", 0),
        ("seed", -1),
        ("dtype", "float64"),
        ("device", "tpu"),
        ("threads", 0),
        ("weight_version", -3),
        ("weight_group_timeout_s", 0),
        ("request_timeout_s", -1),
        ("recompute_kv_on_update", "yes"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(EngineConfig, {key: value}, "producer.engine")
    assert err.value.key == f"producer.engine.{key}"


def test_config_unknown_key_and_defaults() -> None:
    with pytest.raises(ConfigError, match="did you mean 'max_running_requests'"):
        from_dict(EngineConfig, {"max_running_request": 3})
    cfg = from_dict(EngineConfig, {"recompute_kv_on_update": True, "threads": 2})
    assert cfg.recompute_kv_on_update and cfg.threads == 2 and cfg.weight_version == 0


def _parse(raw: object) -> SamplingParams:
    return parse_sampling_params(raw, "sampling_params", vocab_size=16, max_new_tokens_cap=100, default_max_new_tokens=7)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"temperature": -0.1}, "sampling_params.temperature"),
        ({"temperature": "hot"}, "sampling_params.temperature"),
        ({"top_p": 0}, "sampling_params.top_p"),
        ({"top_p": 1.5}, "sampling_params.top_p"),
        ({"top_k": 0}, "sampling_params.top_k"),
        ({"max_new_tokens": 101}, "sampling_params.max_new_tokens"),
        ({"max_new_tokens": -1}, "sampling_params.max_new_tokens"),
        ({"max_new_tokens": 2.5}, "sampling_params.max_new_tokens"),
        ({"stop_token_ids": [3, 16]}, "sampling_params.stop_token_ids[1]"),
        ({"ignore_eos": 1}, "sampling_params.ignore_eos"),
        ({"sampling_seed": -5}, "sampling_params.sampling_seed"),
        ({"frequency_penalty": 0.5}, "sampling_params.frequency_penalty"),
        ({"stop": ["\n"]}, "sampling_params.stop"),
        ({"n": 2}, "sampling_params.n"),
        ({"bogus": 1}, "sampling_params.bogus"),
        ([1, 2], "sampling_params"),
    ],
)
def test_sampling_params_errors_name_the_field(raw: object, field: str) -> None:
    with pytest.raises(RequestError) as err:
        _parse(raw)
    assert err.value.field == field


def test_sampling_params_defaults_and_neutral_values() -> None:
    p = _parse({"skip_special_tokens": False, "n": 1, "stop": [], "repetition_penalty": 1.0, "top_k": -1})
    assert p == SamplingParams(max_new_tokens=7)
    assert _parse({"temperature": 0}).greedy


def test_sampler_is_reproducible_and_respects_top_k() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.9, top_k=3), SamplingParams(temperature=0.7, top_p=0.5),
              SamplingParams(temperature=0)]

    def run(seed: int) -> tuple[list[int], list[float]]:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
        toks, lps = [], []
        for _ in range(200):
            t, lp = sample_rows(logits, params, gens)
            toks.append(t)
            lps.append(lp)
        return toks, lps

    a, lps = run(1)
    assert a == run(1)[0]
    assert a != run(2)[0]
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    assert {t[0] for t in a} <= top3 and len({t[0] for t in a}) > 1
    assert {t[2] for t in a} == {int(logits[2].argmax())}
    # log-prob = softmax(logits / T) before truncation, for every row
    for (t0, t1, t2), (l0, l1, l2) in zip(a[:20], lps[:20], strict=True):
        assert l0 == pytest.approx(float(torch.log_softmax(logits[0] / 0.9, -1)[t0]), abs=1e-6)
        assert l1 == pytest.approx(float(torch.log_softmax(logits[1] / 0.7, -1)[t1]), abs=1e-6)
        assert l2 == pytest.approx(float(torch.log_softmax(logits[2], -1)[t2]), abs=1e-6)


def test_sampler_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {sample_rows(logits, [SamplingParams(top_p=0.6)], [gen])[0][0] for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.6 so token 1 is needed; tokens 2, 3 are outside the nucleus


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"dtypes": [], "shapes": []}, "names"),
        ({"names": ["a"], "dtypes": ["float32", "float32"], "shapes": [[1]]}, "dtypes"),
        ({"names": ["a"], "dtypes": ["floaty"], "shapes": [[1]]}, "dtypes[0]"),
        ({"names": ["a"], "dtypes": ["float32"], "shapes": [[-1]]}, "shapes[0]"),
        ({"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "load_format": "direct"}, "load_format"),
        ({"names": ["a"], "dtypes": ["float32"], "shapes": [[1]], "weight_version": "v2"}, "weight_version"),
    ],
)
def test_update_request_errors_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_update_request(body)
    assert err.value.field == field


def test_update_request_parses_sglang_fields() -> None:
    spec = parse_update_request({
        "names": ["a", "b"], "dtypes": ["torch.bfloat16", "float32"], "shapes": [[2, 3], []],
        "group_name": "g", "load_format": "flattened_bucket", "weight_version": "7", "flush_cache": True,
        "abort_all_requests": False,
    })
    assert spec.dtypes == [torch.bfloat16, torch.float32]
    assert spec.weight_version == 7 and spec.nbytes == 2 * 3 * 2 + 4


def test_free_port_is_outside_the_ephemeral_range_and_bindable() -> None:
    """Rendezvous ports are drawn below the kernel's ephemeral range, which outgoing connections
    take ports from (a Ray test cluster's trainer once lost its picked port to one: EADDRINUSE);
    each is free to bind, and two draws are not tied to the (seeded) global RNG."""
    import random
    import socket

    from consumers.engine_http import _ephemeral_low, free_port

    low = _ephemeral_low()
    random.seed(0)
    a = free_port("127.0.0.1")
    random.seed(0)
    b = free_port("127.0.0.1")
    ports = {a, b, *(free_port("127.0.0.1") for _ in range(8))}
    assert all(10000 <= p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", a))
