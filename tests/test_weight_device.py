"""Weights stay on the device (issue 12): the trainer's HF export keeps the model's device, and the
publish snapshot is laid out on the exported tensors' device within its memory budget.

No GPU here, so the ``meta`` device stands in for CUDA: a tensor that silently went through host
memory would land on ``cpu`` (and a ``.to("cpu")`` of a meta tensor raises), so these tests break
exactly when the export or the snapshot leaves the device.

    /work/venv/bin/pytest tests/test_weight_device.py -q
"""

from __future__ import annotations

import pytest
import torch

from consumers import bridge

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    from consumers.config import TrainerConfig
    from consumers.model import build_trainable_model
    from consumers.trainer import init_distributed
    from pipeline.tiny import make_tiny_model

    init_distributed()
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-device"))
    return build_trainable_model(TrainerConfig(), path)


def test_export_keeps_the_models_device(built) -> None:
    on_cpu = bridge.export_hf_state(built.model, built.spec)
    assert on_cpu and all(t.device.type == "cpu" for t in on_cpu.values())
    meta_model = built.model.to("meta")
    try:
        for export in (bridge.export_hf_state, bridge.export_hf_stage):
            named = export(meta_model, built.spec)
            assert list(named) == list(on_cpu), "same names and order on any device"
            wrong = {n: str(t.device) for n, t in named.items() if t.device.type != "meta"}
            assert not wrong, f"the export left the model's device: {wrong}"
            assert all(t.shape == on_cpu[n].shape and t.dtype == on_cpu[n].dtype for n, t in named.items())
        half = bridge.export_hf_state(meta_model, built.spec, dtype=torch.bfloat16)
        assert all(t.device.type == "meta" and t.dtype == torch.bfloat16 for t in half.values())
    finally:
        built.model.to_empty(device="cpu")  # the module fixture is not reused after this test
