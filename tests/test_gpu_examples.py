"""The GPU examples (examples/gpu/): they load, their placement plan is the one their comments
promise (one GPU: colocated, IPC; two or more: disaggregated, broadcast), and their workload is the
0.6B one the GPU benchmark needs (16 prompts x 8 samples x 256 new tokens)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.config import SlipstreamConfig, load_config, load_config_dict
from pipeline.configbase import from_dict
from pipeline.placement import Detected, Gpu, make_plan
from producers.engine.config import EngineConfig
from tests.helpers import REPO

GPU = REPO / "examples" / "gpu"
#: engine keys of the engine branch (memory budget, KV slot size); a build without them ignores them here
ENGINE_BRANCH_KEYS = {"mem_fraction", "max_seq_len"}


def load(path: Path) -> SlipstreamConfig:
    data = load_config_dict(path)
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = set(data.get("engine", {})) - known
    assert unknown <= ENGINE_BRANCH_KEYS, f"unknown engine keys {unknown - ENGINE_BRANCH_KEYS}"
    data["engine"] = {k: v for k, v in data.get("engine", {}).items() if k in known}
    cfg = from_dict(SlipstreamConfig, data)
    if not hasattr(cfg.weights, "transport"):
        cfg.weights.transport = "auto"  # type: ignore[attr-defined]  # the weights branch's default
    return cfg


def gpus(n: int) -> Detected:
    return Detected([Gpu(i, str(i), "NVIDIA H200", 141 * 2**30) for i in range(n)], "test")


@pytest.mark.parametrize("name", ["one_gpu.toml", "multi_gpu.toml"])
def test_workload(name: str) -> None:
    cfg = load(GPU / name)
    assert cfg.model.make_if_missing == "qwen3-0.6b" and cfg.run.verify_weights and cfg.run.steps >= 30
    assert (cfg.queue.groups_per_step, cfg.producer.group_size, cfg.producer.max_new_tokens) == (16, 8, 256)
    assert cfg.producer.max_inflight_groups >= (cfg.queue.max_staleness + 1) * cfg.queue.groups_per_step
    assert cfg.engine.max_running_requests >= cfg.producer.max_inflight_groups * cfg.producer.group_size
    assert cfg.engine.dtype == "bfloat16" and cfg.trainer.megatron.get("bf16") is True
    if hasattr(cfg.engine, "max_seq_len"):
        assert cfg.engine.max_seq_len >= 7 + cfg.producer.max_new_tokens  # the longest prompt plus the budget


def test_one_gpu_is_colocated() -> None:
    plan = make_plan(load(GPU / "one_gpu.toml"), gpus(1), {})
    assert plan.mode == "colocated" and plan.trainer == [0] and plan.engines[0].gpu == 0
    assert plan.engines[0].transport == "ipc"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_multi_gpu_is_disaggregated(n: int) -> None:
    cfg = load(GPU / "multi_gpu.toml")
    plan = make_plan(cfg, gpus(n), {})
    assert plan.mode == "disaggregated" and plan.trainer == [0] and plan.engines[0].gpu == 1
    assert plan.engines[0].transport.startswith("broadcast")
    cfg.trainer.tensor_parallel, cfg.producer.num_engines = 2, 2  # the 4-GPU variant in its comments
    if n >= 4:
        plan = make_plan(cfg, gpus(n), {})
        assert plan.trainer == [0, 1] and [e.gpu for e in plan.engines] == [2, 3]


def test_the_examples_load_as_they_are() -> None:
    """Once the engine's memory keys exist, the files load unchanged."""
    if not {f.name for f in dataclasses.fields(EngineConfig)} >= ENGINE_BRANCH_KEYS:
        pytest.skip("this build has no engine.mem_fraction / engine.max_seq_len (the engine branch adds them)")
    for name in ("one_gpu.toml", "multi_gpu.toml"):
        load_config(GPU / name)
