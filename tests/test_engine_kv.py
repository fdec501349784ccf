"""KV-cache slots, the memory budget and admission, on a real scheduler (in process) and a real
engine subprocess.

Covers: slot-table moves on retirement; the cache's slot copy; the memory plan (slots from the
budget, a budget too small for one sequence refused naming the key); 10,000 requests admitted and
retired with no slot or KV byte left over; admission never running more sequences than the budget
holds (requests wait in the FIFO); a long prompt prefilled in chunks while other sequences keep
decoding, with exact log-probs; over HTTP: a request that can never fit gets 400 naming
``engine.max_seq_len``, memory metrics (used and limit), ``run.log_format = "json"`` logs, and a
start-up that cannot fit one sequence exits 2 naming ``engine.mem_fraction``.

    /work/venv/bin/pytest tests/test_engine_kv.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.configbase import ConfigError
from pipeline.metrics import new_registry
from pipeline.tiny import make_tiny_model
from producers.engine.batch import GenRequest
from producers.engine.config import EngineConfig
from producers.engine.decode import Scheduler
from producers.engine.kvcache import KVCache, KVShape, SlotTable, plan_memory
from producers.engine.metrics import EngineMetrics
from producers.engine.sampling import SamplingParams
from producers.engine.server import load_model
from tests.test_engine_helpers import REPO, Engine, load_reference, reference_logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-kv"), max_position_embeddings=256)


def scheduler(model_dir: Path, **overrides: Any) -> Scheduler:
    cfg = EngineConfig(**{"device": "cpu", **overrides})
    model, device = load_model(str(model_dir), cfg)
    return Scheduler(model, cfg, EngineMetrics(new_registry("engine")), device)


def request(rid: str, prompt: list[int], n: int, **params: Any) -> GenRequest:
    return GenRequest(rid=rid, input_ids=prompt, params=SamplingParams(max_new_tokens=n, ignore_eos=True, **params),
                      return_logprob=True)


# ---------------------------------------------------------------------- units
def test_slot_table_moves_the_last_rows_into_holes() -> None:
    t: SlotTable[str] = SlotTable(6)
    for name in "abcde":
        t.add_row(name)
    assert t.add_top("long") == 5 and t.free == 0
    with pytest.raises(RuntimeError, match="no free KV slot"):
        t.add_row("f")
    moves = t.retire({0, 3})  # a and d leave: e moves to 0; c stays
    assert moves == [(4, 0)] and t.rows == ["e", "b", "c"] and t.free == 2
    assert t.promote_top() == (5, 3) and t.rows == ["e", "b", "c", "long"] and t.top is None
    assert t.retire({1, 2, 3}) == [] and t.rows == ["e"]
    assert t.retire({0}) == [] and t.free == 6 and t.used == 0


def test_cache_move_copies_a_slot_prefix_in_every_layer() -> None:
    cache = KVCache(KVShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32), slots=3, max_seq_len=8,
                    device=torch.device("cpu"))
    assert cache.nbytes == 2 * 2 * 4 * 2 * 8 * 4 * 4  # K and V, 4 slots (3 + scratch)
    cache.k[:, 2, :, :5] = 7.0
    cache.v[:, 2, :, :5] = 8.0
    cache.move(2, 0, 5)
    assert (cache.k[:, 0, :, :5] == 7).all() and (cache.v[:, 0, :, :5] == 8).all() and (cache.k[:, 0, :, 5:] == 0).all()


def test_memory_plan_sizes_slots_from_the_budget_and_refuses_a_budget_too_small() -> None:
    kw = dict(device_total=10_000_000, weights=1_000_000, staging=1_000_000, working=1_000_000, bytes_per_token=100,
              max_running_requests=1000)
    plan = plan_memory(mem_fraction=0.5, max_total_tokens=0, max_seq_len=1000, **kw)  # 2 MB of KV: 20 slots - 1 scratch
    assert (plan.limit, plan.kv_budget, plan.slots) == (5_000_000, 2_000_000, 19)
    assert plan.weights + plan.staging + plan.working + plan.kv_bytes <= plan.limit
    assert plan_memory(mem_fraction=0.5, max_total_tokens=5000, max_seq_len=1000, **kw).slots == 4
    assert plan_memory(mem_fraction=0.5, max_total_tokens=0, max_seq_len=1000, **{**kw, "max_running_requests": 3}).slots == 3
    with pytest.raises(ConfigError) as err:
        plan_memory(mem_fraction=0.31, max_total_tokens=0, max_seq_len=1000, **kw)
    assert err.value.key == "engine.mem_fraction" and "engine.max_seq_len = 1000" in err.value.message


# ---------------------------------------------------------------------- scheduler in process
def test_ten_thousand_requests_leave_no_slot_or_kv_byte_behind(model_dir: Path) -> None:
    sched = scheduler(model_dir, max_running_requests=48, max_seq_len=32)
    sched.start()
    try:
        futs = []
        for i in range(10_000):
            prompt = [1] + [3 + (i * 7 + j) % 10 for j in range(i % 9)]
            futs.append(sched.submit(request(f"r{i}", prompt, 1 + i % 3, temperature=1.0)))
        outs = [f.result(timeout=600) for f in futs]
        assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)
        assert [o["meta_info"]["completion_tokens"] for o in outs[:6]] == [1, 2, 3, 1, 2, 3]
        state = sched.call(lambda: (sched.batch.free_slots, len(sched.batch), sched.batch.used_tokens())).result(30)
        assert state == (sched.plan.slots, 0, 0)
        sched.call(sched._report).result(30)
        assert sched.metrics.kv_used_bytes._value.get() == 0
        assert sched.metrics.requests.labels("length")._value.get() == 10_000
    finally:
        sched.stop()


def test_admission_never_runs_more_sequences_than_the_budget_holds(model_dir: Path) -> None:
    # 3 x 64 tokens of KV: two slots of 64 plus the scratch slot, although 8 requests may run
    sched = scheduler(model_dir, max_running_requests=8, max_seq_len=64, max_total_tokens=3 * 64)
    assert sched.plan.slots == 2
    bpt = sched.batch.cache.shape.bytes_per_token
    assert sched.batch.cache.nbytes == 3 * 64 * bpt <= sched.plan.limit
    seen: list[int] = []
    decode = sched.batch.decode

    def counting(version: int) -> Any:
        seen.append(len(sched.batch.rows))
        return decode(version)

    sched.batch.decode = counting  # type: ignore[method-assign]
    sched.start()
    try:
        futs = [sched.submit(request(f"q{i}", [1, 4, 5], 20)) for i in range(6)]
        queued = sched.call(lambda: sched.state()["queued_requests"]).result(30)
        outs = [f.result(timeout=120) for f in futs]
    finally:
        sched.stop()
    assert all(len(o["output_ids"]) == 20 for o in outs)
    assert max(seen) == 2 and queued >= 4  # the others waited in the FIFO, in order
    starts = [o["meta_info"]["output_token_times"][0] for o in outs]
    assert starts == sorted(starts)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(model_dir: Path) -> None:
    sched = scheduler(model_dir, max_running_requests=4, max_seq_len=200, prefill_chunk_tokens=16)
    chunks: list[int] = []
    steps: list[int] = []
    cont, decode = sched.batch.continue_chunk, sched.batch.decode

    def chunk(version: int) -> Any:
        chunks.append(len(steps))
        return cont(version)

    def step(version: int) -> Any:
        steps.append(len(sched.batch.rows))
        return decode(version)

    sched.batch.continue_chunk = chunk  # type: ignore[method-assign]
    sched.batch.decode = step  # type: ignore[method-assign]
    sched.start()
    long_prompt = [1] + [3 + (5 * j) % 10 for j in range(69)]  # 70 tokens: chunks of 16, 16, 16, 16, 6
    try:
        first = sched.submit(request("short", [1, 3, 3], 60, temperature=1.0))
        sched.call(lambda: None).result(30)
        second = sched.submit(request("long", long_prompt, 8, temperature=0.8))
        out_short, out_long = first.result(120), second.result(120)
    finally:
        sched.stop()
    assert len(chunks) == 5 and chunks == sorted(chunks)
    assert chunks[-1] - chunks[0] >= 4  # a decode step between consecutive chunks
    ref = load_reference(model_dir)
    for prompt, out, temp in ((long_prompt, out_long, 0.8), ([1, 3, 3], out_short, 1.0)):
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        want = reference_logprobs(ref, prompt, out["output_ids"], temp)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


# ---------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def small_engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-kv"), "--log-format", "json",
                 "--set", "max_seq_len=48", "--set", "max_running_requests=3")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def test_a_request_that_can_never_fit_gets_400_naming_the_limit(small_engine: Engine) -> None:
    status, out = small_engine.post("/generate", {"input_ids": [1] * 40, "sampling_params": {"max_new_tokens": 9}})
    assert status == 400 and out["error"]["field"] == "sampling_params.max_new_tokens"
    assert "engine.max_seq_len = 48" in out["error"]["message"]
    ok = small_engine.generate({"input_ids": [1] * 40, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
    assert len(ok["output_ids"]) == 8


def test_memory_metrics_and_server_info(small_engine: Engine) -> None:
    info = small_engine.ok("GET", "/get_server_info")
    mem = info["memory"]
    assert mem["kv_slots"] == 3 and mem["max_seq_len"] == 48 and info["context_length"] == 48
    assert 0 < mem["kv_cache_bytes"] < mem["limit_bytes"] and mem["used_bytes"] > 0
    assert small_engine.metric("slipstream_engine_memory_limit_bytes") == mem["limit_bytes"]
    assert small_engine.metric("slipstream_engine_kv_cache_bytes") == mem["kv_cache_bytes"]
    assert small_engine.metric("slipstream_engine_kv_slots") == 3
    assert small_engine.metric("slipstream_engine_kv_cache_used_bytes") == 0  # nothing running
    assert small_engine.metric("slipstream_engine_memory_used_bytes") > 0
    assert info["decode"]["cuda_graphs"] is False and info["decode"]["adopts_weight_updates"] is True


def test_engine_log_is_json_with_run_log_format_json(small_engine: Engine) -> None:
    small_engine.generate({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    lines = [ln for ln in small_engine.log_tail(100_000).splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]  # every line is one JSON object
    assert {r["role"] for r in records} == {"engine"}
    msgs = [r["msg"] for r in records]
    assert any(m.startswith("engine listening on http://") for m in msgs)
    assert any("KV cache" in m and "3 slots" in m for m in msgs)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_a_budget_too_small_for_one_sequence_exits_2_naming_the_key(model_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "producers.engine", "--model", str(model_dir), "--port", "0",
                           "--set", "mem_fraction=0.000001"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "engine.mem_fraction" in proc.stderr and "engine.max_seq_len" in proc.stderr


def test_retract_and_kv_recompute_with_contexts_longer_than_a_chunk(model_dir: Path) -> None:
    """Restoring retracted sequences and recomputing KV after a swap prefill contexts longer than
    ``prefill_chunk_tokens`` chunk by chunk; the log-probs stay exact (old weights before the swap,
    new weights after it: recompute_kv_on_update)."""
    sched = scheduler(model_dir, max_running_requests=3, max_seq_len=200, prefill_chunk_tokens=16,
                      recompute_kv_on_update=True)
    tokens = sched.metrics.generated_tokens
    sched.start()
    long_prompt = [1] + [3 + (3 * j) % 10 for j in range(39)]
    try:
        futs = [sched.submit(request("a", long_prompt, 90, temperature=1.0)),
                sched.submit(request("b", [1, 5, 7], 90, temperature=0.9))]
        while tokens._value.get() < 30:
            sched.call(lambda: None).result(30)
        sched.pause("retract").result(30)
        assert sched.call(lambda: len(sched.batch)).result(30) == 0  # KV dropped, slots free
        sched.resume().result(30)
        while tokens._value.get() < 90:
            sched.call(lambda: None).result(30)
        ref = load_reference(model_dir)
        new_ref = load_reference(model_dir)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in new_ref.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        staged = {k: v.detach().clone() for k, v in new_ref.named_parameters()}
        sched.swap_weights(staged, 1).result(60)
        outs = [f.result(120) for f in futs]
    finally:
        sched.stop()
    for prompt, out, temp in ((long_prompt, outs[0], 1.0), ([1, 5, 7], outs[1], 0.9)):
        versions = out["meta_info"]["output_token_weight_versions"]
        switch = versions.index(1)
        assert 10 < switch < 90 and versions == sorted(versions)
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        old = reference_logprobs(ref, prompt, out["output_ids"], temp)
        new = reference_logprobs(new_ref, prompt, out["output_ids"], temp)
        assert max(abs(a - b) for a, b in zip(got[:switch], old[:switch], strict=True)) < 1e-4
        assert max(abs(a - b) for a, b in zip(got[switch:], new[switch:], strict=True)) < 1e-4


def test_cuda_index_gives_torch_cuda_an_indexed_device() -> None:
    """torch.cuda.set_per_process_memory_fraction (and mem_get_info) refuse a bare ``cuda`` device
    ("Expected a torch.device with a specified index"): the first GPU run of the engine failed so.
    cuda_index keeps an explicit index as is (a bare one resolves to the current device on GPU)."""
    from producers.engine.kvcache import cuda_index

    assert cuda_index(torch.device("cuda", 3)) == 3
    assert cuda_index(torch.device("cuda:0")) == 0
