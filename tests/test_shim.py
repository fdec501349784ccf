"""The CPU shim (consumers/shim.py): idempotent, a no-op with CUDA, and every patch still needed.

Each "still needed" test runs one small megatron-core call without that patch and expects the
CUDA error, then runs it with the patch.  When a megatron-core upgrade makes a patch unnecessary,
its test fails and the patch can go.
"""

from __future__ import annotations

import threading

import pytest
import torch

from consumers import shim

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")

CUDA_ERRORS = (AssertionError, RuntimeError)  # "Torch not compiled with CUDA enabled"


@pytest.fixture
def shimmed():
    shim.apply_cpu_shim()
    yield
    shim.apply_cpu_shim()  # restore whatever a test reverted


def _in_thread(fn):
    """Run fn in a fresh thread (where the TorchFunctionMode is not active); return its exception."""
    box: list[BaseException | None] = [None]

    def run():
        try:
            fn()
        except BaseException as e:
            box[0] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return box[0]


def test_apply_is_idempotent(shimmed):
    before = torch.cuda.current_device
    assert shim.apply_cpu_shim() is True
    assert torch.cuda.current_device is before
    assert shim.applied_patches() == frozenset(shim.PATCHES)
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_noop_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert shim.apply_cpu_shim() is False
    with shim.cpu_device_mode():
        pass


def test_current_device_patch_needed(shimmed):
    from megatron.core.utils import GlobalMemoryBuffer

    shim.revert_cpu_shim(["current_device"])
    with pytest.raises(CUDA_ERRORS):
        GlobalMemoryBuffer().get_tensor((4,), torch.float32, "test")
    shim.apply_cpu_shim(["current_device"])
    assert GlobalMemoryBuffer().get_tensor((4,), torch.float32, "test").device.type == "cpu"


def test_synchronize_patch_needed(shimmed):
    """Pipeline shape exchange (variable_seq_lengths) calls torch.cuda.synchronize()."""
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from consumers.trainer import init_distributed

    init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    comm = P2PCommunicator(ps.get_pipeline_model_parallel_group(), ModelParallelConfig(variable_seq_lengths=True))
    shim.revert_cpu_shim(["synchronize"])
    with pytest.raises(CUDA_ERRORS):
        comm._communicate_shapes(None, None, False, False)
    shim.apply_cpu_shim(["synchronize"])
    comm._communicate_shapes(None, None, False, False)


def test_streams_patch_needed(shimmed):
    """The MoE alltoall token dispatcher makes a side CUDA stream for its D2H copies."""
    shim.revert_cpu_shim(["streams"])
    with pytest.raises(CUDA_ERRORS):
        torch.cuda.Stream()
    shim.apply_cpu_shim(["streams"])
    s = torch.cuda.Stream()
    assert s is torch.cuda.current_stream()
    with torch.cuda.stream(s):
        s.wait_stream(torch.cuda.current_stream())
        s.record_event().synchronize()


def test_device_mode_needed_for_cuda_tensors(shimmed):
    """Megatron's local multi-tensor l2 norm (grad-norm fallback) makes a device="cuda" tensor."""
    from megatron.core.utils import local_multi_tensor_l2_norm

    call = lambda: local_multi_tensor_l2_norm(0, None, [[torch.ones(3)]], False)  # noqa: E731
    assert isinstance(_in_thread(call), CUDA_ERRORS)

    def with_mode():
        with shim.cpu_device_mode():
            norm, _ = call()
            assert norm.device.type == "cpu" and float(norm) == pytest.approx(3**0.5)

    assert _in_thread(with_mode) is None


def test_device_mode_needed_for_type_assert(shimmed):
    """Gradient clipping asserts grads are 'torch.cuda.FloatTensor'."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    assert isinstance(_in_thread(lambda: clip_grad_by_total_norm_fp32([p], 1.0, 4.0)), AssertionError)

    def with_mode():
        with shim.cpu_device_mode():
            clip_grad_by_total_norm_fp32([p], 1.0, 4.0)

    assert _in_thread(with_mode) is None
    assert float(p.grad[0]) == pytest.approx(2.0 / 4.0, rel=1e-5)


def test_tensor_cuda_is_identity_in_mode(shimmed):
    t = torch.ones(2)
    assert t.cuda() is t
    assert t.cuda(non_blocking=True) is t
