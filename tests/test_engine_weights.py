"""Weight updates into a running embedded engine, with this test process acting as the trainer.

The test joins the weight group as rank 0 over gloo (``pipeline.weightsync.init_weight_group``)
while POSTing ``/init_weights_update_group`` to a real engine subprocess, then broadcasts buckets
while POSTing ``/update_weights_from_distributed``.  Covers: staging (a bucket without
weight_version changes nothing live), swap + version on the last bucket, checksum equality with
the published tensors, rejected updates that change nothing (wrong shape/dtype/name, poisoned
multi-bucket update), and an update in the middle of a long generation: decoding continues while
the bucket is in transit (tokens are sampled inside the receive window the reply reports, on the
engine's clock), per-token versions switch exactly once and never before the bytes arrived, and
the KV trade-off (kept KV vs. ``recompute_kv_on_update``) is visible in the log-probs.

    /work/venv/bin/pytest tests/test_engine_weights.py -q
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.tiny import make_tiny_model
from pipeline.weightsync import WeightGroup, flatten_bucket, init_weight_group, weights_checksum
from tests.test_engine_helpers import Engine, free_port, in_thread, load_reference, reference_logprobs

GROUP = "slipstream-test-weights"
PROMPT = [1, 3, 5, 7]


class Trainer:
    """Rank 0 of the weight group plus the tensors it has published so far."""

    def __init__(self, engine: Engine, model_dir: Path) -> None:
        self.engine = engine
        port = free_port()
        body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
                "group_name": GROUP, "backend": "gloo"}
        t, box = in_thread(lambda: engine.post("/init_weights_update_group", body))
        self.group: WeightGroup = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo",
                                                    group_name=GROUP, timeout_s=60)
        t.join(60)
        status, out = box["out"]
        assert status == 200 and out["success"] is True, out
        self.reference = load_reference(model_dir)
        self.published = {k: v.detach().clone() for k, v in self.reference.named_parameters()}

    def send(self, tensors: dict[str, torch.Tensor], version: int | None, flattened: bool = True,
             shapes: list[list[int]] | None = None, dtypes: list[str] | None = None,
             group_name: str = GROUP, before_broadcast: Callable[[], None] | None = None) -> tuple[int, Any]:
        body = {
            "names": list(tensors),
            "dtypes": dtypes or [str(t.dtype).removeprefix("torch.") for t in tensors.values()],
            "shapes": shapes or [list(t.shape) for t in tensors.values()],
            "group_name": group_name,
            "load_format": "flattened_bucket" if flattened else None,
            "weight_version": None if version is None else str(version),
            "flush_cache": False,
            "abort_all_requests": False,
        }
        t, box = in_thread(lambda: self.engine.post("/update_weights_from_distributed", body))
        if before_broadcast is not None:  # the bucket is "in transit": the engine waits in its broadcast
            before_broadcast()
        if group_name == GROUP:
            if flattened:
                self.group.broadcast(flatten_bucket(tensors.values()), src=0)
            else:
                for tensor in tensors.values():
                    self.group.broadcast(tensor.contiguous(), src=0)
        t.join(60)
        return box["out"]

    def modified(self, names: list[str], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: self.published[n] + scale * torch.randn(self.published[n].shape, generator=g) for n in names}

    def commit(self, tensors: dict[str, torch.Tensor]) -> None:
        """Record tensors the engine accepted; keep the reference model equal to the engine's weights."""
        params = dict(self.reference.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                self.published[name] = t.clone()
                params[name].copy_(t)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-w"), max_position_embeddings=LONG + 96)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-w"), "--seed", "5", "--set", "max_running_requests=4")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


@pytest.fixture(scope="module")
def trainer(engine: Engine, model_dir: Path) -> Trainer:
    return Trainer(engine, model_dir)


def checksum(engine: Engine) -> str:
    return str(engine.ok("GET", "/slipstream/weights_checksum")["checksum"])


def test_staged_buckets_swap_on_the_last_one(engine: Engine, trainer: Trainer) -> None:
    v = engine.version()
    before = checksum(engine)
    assert before == weights_checksum(trainer.published)
    first = trainer.modified(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                              "model.norm.weight"], seed=1)
    status, out = trainer.send(first, version=None, flattened=False)  # one broadcast per tensor
    assert status == 200 and out["success"] is True, out
    assert checksum(engine) == before and engine.version() == v  # staged, not live
    second = trainer.modified(["model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight"], seed=2)
    status, out = trainer.send(second, version=v + 1)
    assert status == 200 and out["success"] is True and out["weight_version"] == str(v + 1), out
    trainer.commit(first | second)
    got = engine.ok("GET", "/slipstream/weights_checksum")
    assert got["checksum"] == weights_checksum(trainer.published) != before
    assert got["weight_version"] == str(v + 1) and got["num_tensors"] == len(trainer.published)
    assert engine.ok("GET", "/get_model_info")["weight_version"] == str(v + 1)
    assert engine.metric("slipstream_engine_policy_version") == v + 1
    assert engine.metric("slipstream_engine_weight_update_bytes_total") >= sum(
        t.numel() * 4 for t in (first | second).values())
    assert engine.metric("slipstream_engine_weight_update_pause_seconds_count") >= 1
    # the live model is the new one, tied lm_head included (the embedding changed)
    out = engine.generate({"input_ids": PROMPT, "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 20, "ignore_eos": True, "temperature": 0.9}})
    got_lp = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    want = reference_logprobs(trainer.reference, PROMPT, out["output_ids"], 0.9)
    assert max(abs(a - b) for a, b in zip(got_lp, want, strict=True)) < 1e-4
    assert out["meta_info"]["output_token_weight_versions"] == [v + 1] * 20


def test_rejected_updates_change_nothing(engine: Engine, trainer: Trainer) -> None:
    v, before = engine.version(), checksum(engine)
    norm = "model.norm.weight"
    bad = trainer.send({norm: torch.ones(64)}, version=v + 1)  # the model's norm has 128 entries
    assert bad[0] == 400 and bad[1]["success"] is False and norm in bad[1]["message"] and "[64]" in bad[1]["message"]
    status, out = trainer.send({"model.nonexistent.weight": torch.ones(3)}, version=v + 1)
    assert status == 400 and "unknown parameter name" in out["message"]
    status, out = trainer.send({"lm_head.weight": trainer.published["model.embed_tokens.weight"]}, version=v + 1)
    assert status == 400 and "tied" in out["message"]
    status, out = trainer.send({norm: torch.ones(128, dtype=torch.bfloat16)}, version=v + 1)
    assert status == 400 and "dtype bfloat16" in out["message"]
    # a bad bucket poisons the rest of its update: the good last bucket is received but not swapped
    status, out = trainer.send({norm: torch.ones(7)}, version=None)
    assert status == 400 and out["success"] is False
    status, out = trainer.send(trainer.modified([norm], seed=3), version=v + 1)
    assert status == 400 and "earlier bucket" in out["message"] and "nothing was swapped" in out["message"]
    status, out = trainer.send({norm: torch.ones(128)}, version=v + 1, group_name="no-such-group")
    assert status == 400 and "no weight group" in out["message"]
    assert checksum(engine) == before and engine.version() == v
    assert engine.metric('slipstream_engine_weight_updates_total{result="failed"}') >= 7
    # the next update starts clean
    good = trainer.modified([norm], seed=4)
    status, out = trainer.send(good, version=v + 1)
    assert status == 200 and out["success"] is True, out
    trainer.commit(good)
    assert checksum(engine) == weights_checksum(trainer.published) and engine.version() == v + 1


KV_NAMES = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
            "model.layers.1.self_attn.v_proj.weight"]
LONG = 4000  # max_new_tokens of the generation that an update lands in (it is aborted once the update is in)


def wait_for_tokens(engine: Engine, at_least: float, timeout: float = 120.0) -> float:
    """Poll the engine's token counter until it reaches ``at_least`` (a progress condition, not a time)."""
    deadline = time.monotonic() + timeout
    while (now := engine.metric("slipstream_engine_generated_tokens_total")) < at_least:
        assert time.monotonic() < deadline, f"engine did not reach {at_least} generated tokens in {timeout:.0f}s"
        time.sleep(0.01)
    return now


def update_mid_generation(engine: Engine, trainer: Trainer, seed: int) -> tuple[dict[str, Any], dict[str, Any], list[float], int]:
    """Start a long generation, send an update whose broadcast starts a moment after the POST (the
    bucket is "in transit" meanwhile), let 20 more tokens come after the update, then abort the
    generation.  Returns (generation, update reply, old-weights log-probs, old version).

    Nothing here depends on how fast this machine is: the transit delay is a tenth of the time
    the rest of the generation would take at the rate measured just before, and what is checked
    afterwards is the order of events on the engine's own clock (token times vs. the receive
    window the update reply reports), not durations.
    """
    v = engine.version()
    rid = f"mid-update-{seed}"
    body = {"input_ids": PROMPT, "return_logprob": True, "rid": rid,
            "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True, "temperature": 1.0, "sampling_seed": seed}}
    start = engine.metric("slipstream_engine_generated_tokens_total")
    gen_t, gen = in_thread(lambda: engine.generate(body))
    t0 = time.monotonic()
    now = wait_for_tokens(engine, start + 30)
    rate = (now - start) / max(time.monotonic() - t0, 1e-3)  # tokens/s on this machine, right now
    delay = min(0.6, 0.1 * (LONG - (now - start)) / rate)
    tensors = trainer.modified(KV_NAMES, seed=seed, scale=0.5)
    status, reply = trainer.send(tensors, version=v + 1, before_broadcast=lambda: time.sleep(delay))
    assert status == 200 and reply["success"] is True, reply
    wait_for_tokens(engine, engine.metric("slipstream_engine_generated_tokens_total") + 20)
    engine.ok("POST", "/abort_request", {"rid": rid})
    gen_t.join(60)
    out = gen["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    old_ref = reference_logprobs(trainer.reference, PROMPT, out["output_ids"], 1.0)
    trainer.commit(tensors)
    # Event order on the engine's clock: the receive was posted, its bytes arrived, then the swap.
    t = reply["timings"]
    posted = t["started_at"] + t["parse_s"] + t["queue_s"]
    received = posted + t["receive_s"]
    meta = out["meta_info"]
    times, versions = meta["output_token_times"], meta["output_token_weight_versions"]
    # decoding went on while the engine waited for the bytes (a decoder that waited for them
    # would have sampled nothing in that window)
    assert sum(posted < x < received for x in times) >= 3, (posted, received, times[:5], len(times))
    # nothing was sampled by the new weights before their bytes were in
    assert all(ver == v for x, ver in zip(times, versions, strict=True) if x <= received)
    return out, reply, old_ref, v


def test_update_during_generation_switches_version_exactly_once(engine: Engine, trainer: Trainer) -> None:
    out, reply, old_ref, v = update_mid_generation(engine, trainer, seed=11)
    meta = out["meta_info"]
    versions = meta["output_token_weight_versions"]
    assert versions == sorted(versions) and set(versions) == {v, v + 1}
    switch = versions.index(v + 1)
    assert switch > 30 and len(versions) - switch >= 20, "the update should land mid-generation"
    assert meta["weight_version"] == str(v + 1)
    assert reply["pause_seconds"] > 0
    got = [lp for lp, _, _ in meta["output_token_logprobs"]]
    # tokens before the swap were sampled by the old weights, exactly
    assert max(abs(a - b) for a, b in zip(got[:switch], old_ref[:switch], strict=True)) < 1e-4
    # after the swap the prefix KV is the old weights' (recompute_kv_on_update=false): the log-probs
    # differ from a full recompute with the new weights — the documented off-policy trade-off
    new_ref = reference_logprobs(trainer.reference, PROMPT, out["output_ids"], 1.0)
    assert max(abs(a - b) for a, b in zip(got[switch:], new_ref[switch:], strict=True)) > 1e-3


def test_recompute_kv_on_update_gives_exact_new_policy_logprobs(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-recompute"), "--set", "recompute_kv_on_update=true",
                 "--set", "max_running_requests=4")
    try:
        trainer = Trainer(eng, model_dir)
        out, reply, old_ref, v = update_mid_generation(eng, trainer, seed=12)
        meta = out["meta_info"]
        switch = meta["output_token_weight_versions"].index(v + 1)
        got = [lp for lp, _, _ in meta["output_token_logprobs"]]
        new_ref = reference_logprobs(trainer.reference, PROMPT, out["output_ids"], 1.0)
        assert max(abs(a - b) for a, b in zip(got[:switch], old_ref[:switch], strict=True)) < 1e-4
        assert max(abs(a - b) for a, b in zip(got[switch:], new_ref[switch:], strict=True)) < 1e-4
        assert reply["pause_seconds"] > 0
    finally:
        assert eng.terminate() == 0, eng.log_tail()


def test_full_updates_are_adopted_into_alternating_buffers(engine: Engine, trainer: Trainer) -> None:
    """An update of every parameter is adopted (the parameters point at the received tensors, no
    copy), and the next update goes to the *other* staging buffer: a rejected update after an
    adoption must leave the live weights untouched, and partial updates are still copied in."""
    names = list(trainer.published)
    for seed in (21, 22):  # two adoptions in a row: buffer 0, then buffer 1
        v = engine.version()
        full = trainer.modified(names, seed=seed)
        status, out = trainer.send(full, version=v + 1)
        assert status == 200 and out["adopted"] is True, out
        trainer.commit(full)
        assert checksum(engine) == weights_checksum(trainer.published)
    before = checksum(engine)
    v = engine.version()
    # A rejected update: its first bucket is received (into the staging buffer, never the live one).
    head = trainer.modified(names[:-1], seed=23, scale=1.0)
    status, out = trainer.send(head, version=None)
    assert status == 200, out
    bad_last = {names[-1]: torch.zeros(3)}
    status, out = trainer.send(bad_last, version=v + 1)
    assert status == 400 and "nothing was swapped" in out["message"], out
    assert checksum(engine) == before and engine.version() == v
    # A partial update is copied into the adopted parameters.
    part = trainer.modified(names[:2], seed=24)
    status, out = trainer.send(part, version=v + 1)
    assert status == 200 and out["adopted"] is False, out
    trainer.commit(part)
    assert checksum(engine) == weights_checksum(trainer.published)
    out = engine.generate({"input_ids": PROMPT, "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 20, "ignore_eos": True, "temperature": 0.9}})
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    want = reference_logprobs(trainer.reference, PROMPT, out["output_ids"], 0.9)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
