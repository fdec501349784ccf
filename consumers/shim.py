"""CPU compatibility shim for megatron-core (0.16.x) on torch CPU builds with gloo.

What: megatron-core assumes CUDA in a few dozen places (``torch.cuda.current_device()`` passed as
``device=``, hard-coded ``device="cuda"`` tensors, ``Tensor.cuda()``, ``torch.cuda.synchronize()``
in the pipeline p2p path, ``torch.cuda.FloatTensor`` type asserts in the optimizer and gradient
clipping).  This module patches exactly those, and nothing else, so the trainer (``consumers/``)
runs unchanged on a CPU-only machine: TP, PP, DP, the Megatron optimizer and DDP work over gloo.

The patches (names in :data:`PATCHES`):

- ``current_device``: ``torch.cuda.current_device()`` returns ``torch.device("cpu")``;
- ``synchronize``: ``torch.cuda.synchronize()`` is a no-op (pipeline shape exchange);
- ``streams``: ``torch.cuda.Stream()`` / ``current_stream()`` return one do-nothing stream object,
  ``torch.cuda.stream(s)`` is a null context (the MoE alltoall token dispatcher stages its
  device-to-host copies on a side stream; needed for MoE models only);
- ``moe_splits``: the MoE alltoall token dispatcher turns its all-to-all split sizes into numpy
  arrays only when they are CUDA tensors (``maybe_move_tensor_to_cpu``); on CPU they stay tensors
  and ``all_to_all_single`` rejects them (``TypeError: all_to_all_single(): incompatible function
  arguments``).  Needed for expert parallelism (EP > 1) only;
- ``device_mode``: a ``TorchFunctionMode`` that rewrites ``device="cuda*"`` to cpu, makes
  ``Tensor.cuda()`` a no-op and makes ``Tensor.type()`` say ``torch.cuda.*Tensor``.  Because of
  the last part, megatron's own ``clip_grad_by_total_norm_fp32`` works unchanged (its local
  multi-tensor fallback runs on CPU), so the clipping replacement in the notes is not needed.

Not patches but required on CPU (done in :mod:`consumers.model`): the same seed on every rank
with ``model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)``, and
``use_cpu_initialization=True``.

Why here: it is the one place in slipstream with global mutable state.  It is applied once,
idempotently, and only when CUDA is absent (:func:`apply_cpu_shim` is a no-op on GPU machines).
Every patch is named; ``tests/test_shim.py`` checks that each one is still needed with the
installed megatron-core, so the shim shrinks when Megatron gets better.

How:

    from consumers.shim import apply_cpu_shim, cpu_device_mode
    apply_cpu_shim()                 # before building any Megatron module; main thread
    with cpu_device_mode():          # in any *other* thread that runs Megatron code
        ...

The ``device="cuda"`` rewrite is a ``TorchFunctionMode``, and torch keeps those modes per
thread: :func:`apply_cpu_shim` enters it for the calling thread only.  Other threads must use
:func:`cpu_device_mode`.

See ``docs/notes/megatron-on-cpu.md`` for how each patch was found.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

#: The patch names, in the order they are applied.
PATCHES = ("current_device", "synchronize", "device_mode", "streams", "moe_splits")

_lock = threading.Lock()
_applied: set[str] = set()
_originals: dict[str, Any] = {}
_thread_state = threading.local()


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda*"`` to cpu, makes ``Tensor.cuda()`` return the tensor itself, and
    makes ``Tensor.type()`` report ``torch.cuda.*Tensor`` (Megatron's optimizer and clipping assert
    on it)."""

    def __torch_function__(self, func: Callable, types: Iterable[type], args: tuple = (), kwargs: dict | None = None):
        # every torch call in the thread passes through here: keep the common path short
        if func is torch.Tensor.cuda:
            return args[0]
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = dict(kwargs, device="cpu")
            return func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args)


class _CPUEvent:
    def synchronize(self) -> None:
        return None


class _CPUStream:
    """Stands in for a CUDA stream on CPU: work is synchronous, so waiting is a no-op.  One
    object serves as every stream, so "am I on a side stream?" checks say no.  A class (not a
    function) so that annotations like ``torch.cuda.Stream | None`` still evaluate."""

    _instance: _CPUStream | None = None

    def __new__(cls, *_a: Any, **_k: Any) -> _CPUStream:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, _other: Any) -> None:
        return None

    def record_event(self, *_a: Any) -> _CPUEvent:
        return _CPUEvent()

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CPUStream()


def _current_stream(*_a: Any, **_k: Any) -> _CPUStream:
    return _CPU_STREAM


def _stream_context(*_a: Any, **_k: Any) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _dispatcher_module() -> Any:
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    return token_dispatcher


def _splits_to_numpy(original: Callable[..., Any]) -> Callable[..., Any]:
    def move(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()  # what the CUDA path returns for the split sizes
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move


def _apply_one(name: str) -> None:
    if name == "current_device":
        _originals[name] = torch.cuda.current_device
        torch.cuda.current_device = lambda: torch.device("cpu")  # ~40 `device=current_device()` sites
    elif name == "synchronize":
        _originals[name] = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *a, **k: None  # pipeline p2p with variable_seq_lengths
    elif name == "device_mode":
        _enter_mode_in_this_thread()
    elif name == "streams":
        _originals[name] = (torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream)
        torch.cuda.Stream = _CPUStream  # type: ignore[assignment,misc]
        torch.cuda.current_stream = _current_stream  # type: ignore[assignment]
        torch.cuda.stream = _stream_context  # type: ignore[assignment]
    elif name == "moe_splits":
        mod = _dispatcher_module()
        _originals[name] = mod.maybe_move_tensor_to_cpu
        mod.maybe_move_tensor_to_cpu = _splits_to_numpy(mod.maybe_move_tensor_to_cpu)
    else:
        raise ValueError(f"unknown shim patch {name!r}; known: {PATCHES}")


def _revert_one(name: str) -> None:
    if name == "current_device":
        torch.cuda.current_device = _originals.pop(name)
    elif name == "synchronize":
        torch.cuda.synchronize = _originals.pop(name)
    elif name == "device_mode":
        _exit_mode_in_this_thread()
    elif name == "streams":
        torch.cuda.Stream, torch.cuda.current_stream, torch.cuda.stream = _originals.pop(name)
    elif name == "moe_splits":
        _dispatcher_module().maybe_move_tensor_to_cpu = _originals.pop(name)


def _enter_mode_in_this_thread() -> None:
    if getattr(_thread_state, "mode", None) is None:
        mode = CudaToCpuMode()
        mode.__enter__()
        _thread_state.mode = mode


def _exit_mode_in_this_thread() -> None:
    mode = getattr(_thread_state, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _thread_state.mode = None


def _mode_active() -> bool:
    return getattr(_thread_state, "mode", None) is not None or getattr(_thread_state, "scoped", False)


def shim_needed() -> bool:
    """True when this process has no CUDA (the only case where the shim applies)."""
    return not torch.cuda.is_available()


def apply_cpu_shim(only: Iterable[str] | None = None) -> bool:
    """Apply the CPU patches (all of :data:`PATCHES`, or the subset ``only``, which tests use).

    Idempotent; a no-op returning False when CUDA is available.  The ``device_mode`` patch is
    entered for the calling thread only: use :func:`cpu_device_mode` in other threads.
    """
    if not shim_needed():
        return False
    names = tuple(PATCHES if only is None else only)
    with _lock:
        for name in names:
            if name == "device_mode":
                _enter_mode_in_this_thread()  # per thread, so re-checked every call
            elif name not in _applied:
                _apply_one(name)
                _applied.add(name)
                log.debug("cpu shim: applied %s", name)
    return True


def revert_cpu_shim(only: Iterable[str] | None = None) -> None:
    """Undo patches (tests only: shows that each patch is still needed)."""
    names = tuple(PATCHES if only is None else only)
    with _lock:
        for name in reversed(names):
            if name == "device_mode":
                _exit_mode_in_this_thread()
            elif name in _applied:
                _revert_one(name)
                _applied.discard(name)


def applied_patches() -> frozenset[str]:
    """Process-wide patches currently applied (plus ``device_mode`` if active in this thread)."""
    active = set(_applied)
    if _mode_active():
        active.add("device_mode")
    return frozenset(active)


@contextlib.contextmanager
def cpu_device_mode() -> Iterator[None]:
    """Run Megatron code in a thread other than the one that called :func:`apply_cpu_shim`.
    A no-op with CUDA, or where the mode is already active in this thread."""
    if not shim_needed() or _mode_active():
        yield
        return
    _thread_state.scoped = True
    try:
        with CudaToCpuMode():
            yield
    finally:
        _thread_state.scoped = False
