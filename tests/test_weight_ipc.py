"""Colocated weight updates (issue 12): the IPC transport, its selection from placement, and the
snapshot layout on a device.

No GPU here, so CPU shared memory (a ``/dev/shm`` file) stands in for CUDA IPC: the trainer's
snapshot is allocated shareable, its description travels in the typed request
(:class:`schemas.weight_update.IPCUpdateRequest`, no pickle), and a real engine process maps it
once and copies it into its own parameters between two decode steps.  The same code path takes a
CUDA IPC handle on a GPU (``bench/gpu_weights_ipc.py`` runs that).

* the transport per engine: ``auto`` picks IPC only for an engine on the publishing rank's GPU
  (decided from ``/get_server_info``'s ``slipstream_device``), a broadcast otherwise and always on CPU;
* an IPC publish lands bit for bit; the engine maps each buffer once; a plain dict goes through the
  transport's own shared snapshot; the shared-memory files go away with the publisher;
* one publish to a colocated (IPC) and a remote (broadcast) engine at once;
* refusals: a buffer the engine cannot map, a layout that does not match (nothing changes);
* the snapshot is one buffer on the exported tensors' device ("meta" standing in for CUDA), within
  its budget.

    /work/venv/bin/pytest tests/test_weight_ipc.py -q
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import consumers.publisher as publisher_mod
from consumers.engine_http import PublishError, post_json
from consumers.snapshot import SnapshotBudgetError, WeightSnapshot
from consumers.transports import choose_transport
from pipeline.tiny import make_tiny_model
from pipeline.weightsync import device_identity, weights_checksum
from schemas.weight_update import DEVICE_FIELD, ROUTE_UPDATE_IPC, IPCUpdateRequest, SharedBuffer
from tests.test_engine_helpers import Engine, load_reference

HOST = {"host": "h", "boot_id": "b"}
GPU0 = {**HOST, "device": "cuda", "uuid": "GPU-0"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-ipc"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_reference(model_dir).named_parameters()}


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(model_dir, tmp_path_factory.mktemp("engine-ipc"), "--seed", "5")
    yield eng
    assert eng.terminate() == 0, eng.log_tail()


def _weights(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in reference.items()}


def _checksum(engine: Engine) -> tuple[str, str]:
    st = engine.ok("GET", "/slipstream/weights_checksum")
    return st["weight_version"], st["checksum"]


# ------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("mode, theirs, kind", [
    ("auto", GPU0, "ipc"),                                          # the trainer's own GPU
    ("auto", {**GPU0, "uuid": "GPU-1"}, "broadcast"),               # another GPU of this machine
    ("auto", {**GPU0, "boot_id": "other"}, "broadcast"),            # another machine (same name, other boot)
    ("auto", None, "broadcast"),                                    # reports nothing (SGLang)
    ("broadcast", GPU0, "broadcast"),                               # the override
    ("ipc", {**GPU0, "uuid": "GPU-1"}, "ipc"),                      # the override, same machine
    ("ipc", None, "ipc"),
])
def test_transport_follows_placement(mode: str, theirs: dict | None, kind: str) -> None:
    assert choose_transport(mode, GPU0, theirs, "http://e")[0] == kind


def test_auto_keeps_the_broadcast_on_cpu_and_ipc_needs_one_machine() -> None:
    cpu = {**HOST, "device": "cpu"}
    assert choose_transport("auto", cpu, cpu, "http://e")[0] == "broadcast"
    with pytest.raises(PublishError, match=r"http://e: weights.transport = 'ipc' but the engine runs on another machine"):
        choose_transport("ipc", cpu, {**cpu, "host": "elsewhere"}, "http://e")
    with pytest.raises(ValueError):
        choose_transport("shm", cpu, cpu, "http://e")


def test_engine_reports_where_its_weights_live(engine: Engine) -> None:
    info = engine.ok("GET", "/get_server_info")
    assert info[DEVICE_FIELD] == device_identity(torch.device("cpu"))  # same machine, same boot, the CPU


# ------------------------------------------------------------------------------ the snapshot
def test_snapshot_is_one_buffer_on_the_exports_device_within_its_budget() -> None:
    named = {"a": torch.empty(3, dtype=torch.bfloat16, device="meta"), "b": torch.empty(2, 2, device="meta"),
             "c": torch.empty(5, dtype=torch.bfloat16, device="meta")}
    sizes: list[int] = []
    snap = WeightSnapshot(budget_bytes=64, on_size=sizes.append)
    flat = snap.take(named)
    assert flat.buffer is not None and flat.buffer.device.type == "meta"  # stays on the (stand-in) device
    assert all(t.device.type == "meta" for t in flat.values())
    assert flat.offsets == {"a": 0, "b": 8, "c": 24}  # b padded from 6 to 8 for float32
    assert not flat.contiguous and sizes == [34] and snap.nbytes == 34
    assert snap.take(named).buffer is flat.buffer, "the same buffer every version"
    assert WeightSnapshot(host=True).device_of(named) == torch.device("cpu")  # host memory when asked (or for gloo)
    with pytest.raises(SnapshotBudgetError, match=r"weights.snapshot_max_fraction"):
        WeightSnapshot(budget_bytes=33).take(named)
    snap.retire()
    assert snap.take(named).buffer is not flat.buffer, "after retire() a fresh buffer (the old one may still be read)"


# ------------------------------------------------------------------------------ end to end
def test_ipc_publish_lands_bit_for_bit_and_maps_each_buffer_once(engine: Engine, reference: dict[str, torch.Tensor]) -> None:
    pub = publisher_mod.WeightPublisher([engine.base], transport="ipc", timeout_s=30)
    pub.connect()
    try:
        assert pub.transports == {engine.base: "ipc"} and pub.snapshot_allocator is not None
        snap = WeightSnapshot(allocate=pub.snapshot_allocator)
        shm: list[str] = []
        for version in (1, 2):
            named = _weights(reference, seed=version)
            flat = snap.take(named)
            shared = pub.snapshot_allocator.describe(flat.buffer)  # type: ignore[union-attr]
            assert shared is not None and shared.kind == "shm" and Path(shared.path).exists()
            shm.append(shared.path)
            info = pub.publish(flat, version=version)
            assert info.transports == {engine.base: "ipc"} and not info.stale
            assert info.bytes == sum(t.numel() * t.element_size() for t in named.values()) and info.pause_s > 0
            assert _checksum(engine) == (str(version), weights_checksum(named)) == (str(version), info.checksum)
        assert shm[0] == shm[1], "one shared buffer, reused"
        assert engine.log_tail(200_000).count("mapped the trainer's shm weight buffer") == 1, "mapped once"
        # a plain dict (not in shared memory) goes through the transport's own shared snapshot
        named = _weights(reference, seed=3)
        info = pub.publish(named, version=3)
        assert _checksum(engine) == ("3", weights_checksum(named)) and info.timings["snapshot_s"] > 0
    finally:
        pub.close()
    del snap, flat
    import gc

    gc.collect()
    assert not any(Path(p).exists() for p in shm), "the shared-memory files go with the publisher"


def test_one_publish_to_a_colocated_and_a_remote_engine(engine: Engine, model_dir: Path, tmp_path: Path,
                                                        reference: dict[str, torch.Tensor],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    remote = Engine(model_dir, tmp_path / "remote")
    real = publisher_mod.choose_transport
    # on CPU, auto always broadcasts: make the placement say the first engine shares our device
    monkeypatch.setattr(publisher_mod, "choose_transport",
                        lambda mode, mine, theirs, url: ("ipc", "test") if url == engine.base else real(mode, mine, theirs, url))
    pub = publisher_mod.WeightPublisher([engine.base, remote.base], transport="auto", bucket_bytes=50_000, timeout_s=30)
    try:
        pub.connect()
        assert pub.transports == {engine.base: "ipc", remote.base: "broadcast"}
        snap = WeightSnapshot(allocate=pub.snapshot_allocator)
        for version in (11, 12):
            named = _weights(reference, seed=version)
            info = pub.publish(snap.take(named), version=version)
            assert not info.stale
            for e in (engine, remote):
                assert _checksum(e) == (str(version), weights_checksum(named))
    finally:
        pub.close()
        remote.kill()


def test_unmappable_buffer_and_wrong_layout_are_refused(engine: Engine, reference: dict[str, torch.Tensor]) -> None:
    before = _checksum(engine)
    name, t = next(iter(reference.items()))
    gone = IPCUpdateRequest([name], [t.dtype], [list(t.shape)], [0],
                            SharedBuffer("shm", t.numel() * t.element_size(), path="/dev/shm/slipstream-no-such-buffer"), 99)
    status, out = engine.post(ROUTE_UPDATE_IPC, gone.to_json())
    assert status == 400 and out["success"] is False and "/dev/shm/slipstream-no-such-buffer" in out["message"]
    wrong = gone.to_json() | {"shapes": [[1, 2, 3]], "buffer": SharedBuffer("shm", 1 << 20, path="/dev/shm/x").to_json()}
    status, out = engine.post(ROUTE_UPDATE_IPC, wrong)
    assert status == 400 and "shape" in out["message"] and "nothing was copied" in out["message"]
    bad = gone.to_json() | {"offsets": [1]}
    status, out = engine.post(ROUTE_UPDATE_IPC, bad)
    assert status == 400 and out["error"]["field"] == "offsets[0]"
    assert _checksum(engine) == before, "a refused update changes nothing"
    body = json.loads(json.dumps(gone.to_json()))
    assert IPCUpdateRequest.parse(body).buffer == gone.buffer  # the typed request round-trips through JSON
    assert post_json(f"{engine.base}/get_model_info", None, 10, "model info")["weight_version"] == before[0]
