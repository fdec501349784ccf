"""Weight-sync failures (issue 19) against real engine processes: an engine that stalls its receive,
one that dies mid-broadcast, and one that returns an error.

Each case: two engines, one healthy and one with a test-only fault armed for the update to version
2 (``SLIPSTREAM_TEST_WEIGHT_FAULT``, read by the engine's weight receiver).  The faulty engine is
taken out of version 2 and marked stale, the failure is counted by reason and names the engine,
the version and what failed or timed out; the healthy engine gets version 2 at once and the
publish returns within the update deadline (the trainer carries on); the stale engine keeps
generating with the version it holds, and its tokens say so (never a newer version than it holds);
it is resynced in the background and ends at the current version with the trainer's checksum.

    /work/venv/bin/pytest tests/test_weight_faults.py -q -m slow
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from consumers.engine_links import WeightSyncMetrics
from consumers.publisher import WeightPublisher
from pipeline.tiny import make_tiny_model
from pipeline.weightsync import weights_checksum
from producers.engine.weights import FAULT_ENV
from tests.test_engine_helpers import Engine, free_port, load_reference

pytestmark = pytest.mark.slow  # starts several engine processes per test

DEADLINE_S = 3.0
ENGINE_TIMEOUT = ("--set", "weight_group_timeout_s=15")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-faults"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_reference(model_dir).named_parameters()}


@pytest.fixture(scope="module")
def healthy(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("healthy"), *ENGINE_TIMEOUT)
    yield eng
    eng.kill()


def _weights(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in reference.items()}


def _faulty(model_dir: Path, workdir: Path, fault: str, port: int, monkeypatch: pytest.MonkeyPatch) -> Engine:
    with monkeypatch.context() as m:
        m.setenv(FAULT_ENV, fault)
        return Engine(model_dir, workdir, "--port", str(port), *ENGINE_TIMEOUT)


def _state(engine: Engine) -> tuple[str, str]:
    st = engine.ok("GET", "/slipstream/weights_checksum")
    return st["weight_version"], st["checksum"]


def _run_case(fault: str, reason: str, needle: str, model_dir: Path, tmp_path: Path, healthy: Engine,
              reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch, restart: bool = False) -> None:
    port = free_port()
    bad = _faulty(model_dir, tmp_path / "bad", fault, port, monkeypatch)
    metrics = WeightSyncMetrics(CollectorRegistry())
    pub = WeightPublisher([healthy.base, bad.base], timeout_s=15, update_timeout_s=DEADLINE_S, resync=True,
                          rejoin_timeout_s=120, metrics=metrics, group_name="faults")
    try:
        pub.connect()
        v1 = _weights(reference, 1)
        assert not pub.publish(v1, version=1).stale
        t0 = time.monotonic()
        v2 = _weights(reference, 2)
        info = pub.publish(v2, version=2)
        assert time.monotonic() - t0 < DEADLINE_S + 5, "the trainer must not wait past the update deadline"
        assert list(info.stale) == [bad.base], info.stale
        assert needle in info.stale[bad.base] and bad.base in info.stale[bad.base], info.stale
        assert metrics.failures.labels(reason)._value.get() == 1, {r: metrics.failures.labels(r)._value.get() for r in ("error", "timeout", "unreachable")}
        assert metrics.stale._value.get() == 1
        assert _state(healthy) == ("2", weights_checksum(v2)), "the healthy engine carries on"
        if restart:
            bad.kill()
            bad = Engine(model_dir, tmp_path / "bad-2", "--port", str(port), *ENGINE_TIMEOUT)  # no fault this time
        else:
            held = bad.version()
            assert held < 2, f"the stale engine claims version {held}, which it never took"
            out = bad.generate({"input_ids": [1, 2, 3], "return_logprob": True,
                                "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
            versions = out["meta_info"]["output_token_weight_versions"]
            assert versions and max(versions) <= held, f"tokens stamped {versions} by an engine holding v{held}"
        # resynced in the background; a later publish brings it to the current version
        deadline, version, named = time.monotonic() + 120, 3, v2
        while True:
            named = _weights(reference, version)
            info = pub.publish(named, version=version)
            if not info.stale:
                break
            assert time.monotonic() < deadline, f"{bad.base} never rejoined: {info.stale}\n{bad.log_tail()}"
            time.sleep(0.5)
            version += 1
        for e in (healthy, bad):
            assert _state(e) == (str(version), weights_checksum(named))
        assert metrics.rejoins._value.get() >= 1 and metrics.stale._value.get() == 0
    finally:
        pub.close()
        bad.kill()


def test_engine_that_stalls_its_receive_misses_the_deadline_and_is_resynced(
        model_dir: Path, tmp_path: Path, healthy: Engine, reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    _run_case("stall:8@2", "timeout", "update deadline", model_dir, tmp_path, healthy, reference, monkeypatch)


def test_engine_that_dies_mid_broadcast_is_resynced_after_its_restart(
        model_dir: Path, tmp_path: Path, healthy: Engine, reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    _run_case("exit@2", "unreachable", "version 2", model_dir, tmp_path, healthy, reference, monkeypatch, restart=True)


def test_engine_that_returns_an_error_is_taken_out_and_resynced(
        model_dir: Path, tmp_path: Path, healthy: Engine, reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    _run_case("error@2", "error", "test fault", model_dir, tmp_path, healthy, reference, monkeypatch)
