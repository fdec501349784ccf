"""Weight receiver of the embedded engine: joins the weight group, receives buckets into staging.

What: :class:`WeightReceiver` serves ``/init_weights_update_group`` (join the trainer's weight group
via :func:`pipeline.weightsync.init_weight_group`, on a thread of its own because the rendezvous
blocks until the trainer joins) and ``/update_weights_from_distributed`` (receive one bucket by
broadcast from rank 0 on a background receive thread, into *staging* tensors, never into the live
model).  Buckets accumulate in staging until the request that carries ``weight_version``: that
last bucket's result hands the whole staged update to the scheduler, which copies it into the
live parameters between two decode steps (``Scheduler.swap_weights``).

Why: the network transfer of a large model takes far longer than a device copy; receiving into
staging lets decoding continue during the transfer, so generation pauses only for the swap
(DESIGN §8).  The price is one extra copy of the updated tensors while an update is in flight.

Failure semantics (explicit, because a half-applied update would silently mislabel versions):
- A bucket whose names/shapes/dtypes do not match the model is still *received* (the trainer's
  broadcast must be matched or the collective hangs), then rejected: ``success: false`` with a
  message naming the tensor.  The whole pending update is then *poisoned*: staged tensors are
  dropped and every further bucket up to and including the one with ``weight_version`` is received
  and discarded with ``success: false``.  Nothing is swapped; the engine keeps its old version and
  weights.  The update after that starts clean.
- A request whose bucket size cannot even be computed (names/dtypes/shapes of different lengths,
  unknown dtype, missing group) is refused before receiving; the trainer's broadcast then fails
  by its weight-group timeout.

Multi-part updates (:data:`pipeline.weightsync.PARTS_FIELD`, per-stage publishing): one request
lists every tensor, part by part; each part's bytes arrive over its own group (one per trainer
pipeline stage).  Every part's broadcasts are posted before any is waited for, so the parts
arrive in parallel, into consecutive slices of one staging buffer (adoption still works: one
buffer covers every parameter).  One swap, one reply (``parts``: bytes and receive time per part).
If any part's transfer fails (its publisher died or went silent past the group timeout), the
receive thread still waits for every other part's broadcasts to end (each bounded by its group's
timeout, so no receive writes into staging later), then the whole update is dropped: nothing is
swapped, the reply names the part's group.  Re-joining a group (``/init_weights_update_group``,
what the trainer's resync does for every group) aborts that group's old instance and abandons the
update in flight, all parts of it, including those that already arrived: an update is swapped
whole or not at all, and a rejoin never waits for a part from a group that is gone.

The request format (and its parsing) is :class:`schemas.weight_update.UpdateRequest`, shared with
the trainer's publisher.

Run: not on its own; the engine server owns one receiver.  The trainer side is
``pipeline.weightsync``: ``group.broadcast(flatten_bucket(tensors), src=0)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from pipeline.weightsync import WeightGroup, init_weight_group, unflatten_bucket
from producers.engine.metrics import EngineMetrics
from producers.engine.sampling import RequestError
from schemas.weight_update import PARTS_FIELD, FieldError, LayoutCache, UpdateRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
SwapHook = Callable[[dict[str, torch.Tensor], int, bool], "cf.Future[float]"]


class WeightUpdateError(RuntimeError):
    """An update that was (or must be) refused; the message goes back as ``success: false``."""


#: test-only fault hook: ``KIND[:SECONDS][@VERSION]`` with KIND ``stall`` (sleep before receiving),
#: ``exit`` (die mid-transfer: after the receive is posted) or ``error`` (receive, then refuse);
#: only for the update to VERSION (every update without it).  Never set outside tests.
FAULT_ENV = "SLIPSTREAM_TEST_WEIGHT_FAULT"


@dataclass
class Fault:
    """A weight-sync failure injected on purpose (:data:`FAULT_ENV`), so the trainer's failure path
    is tested against real engine processes."""

    kind: str
    seconds: float = 0.0
    version: int | None = None

    STAGES = {"stall": "receive", "exit": "mid", "error": "after_receive"}

    @classmethod
    def from_env(cls) -> Fault | None:
        raw = os.environ.get(FAULT_ENV, "").strip()
        if not raw:
            return None
        spec, _, version = raw.partition("@")
        kind, _, seconds = spec.partition(":")
        if kind not in cls.STAGES:
            raise ValueError(f"{FAULT_ENV}={raw!r}: kind must be one of {sorted(cls.STAGES)}")
        fault = cls(kind, float(seconds or 0), int(version) if version else None)
        log.warning("TEST FAULT armed: %s", fault)
        return fault

    def __call__(self, version: int | None, stage: str) -> None:
        """Called at each ``stage`` ("receive", "mid", "after_receive") of an update to ``version``."""
        if stage != self.STAGES[self.kind] or (self.version is not None and version != self.version):
            return
        log.warning("TEST FAULT %s at %s of the update to version %s", self.kind, stage, version)
        if self.kind == "stall":
            time.sleep(self.seconds)
        elif self.kind == "exit":
            os._exit(17)
        else:
            raise WeightUpdateError(f"test fault: update to version {version} refused on purpose ({FAULT_ENV})")


@dataclass
class BucketResult:
    nbytes: int
    receive_s: float
    num_tensors: int
    staged_update: dict[str, torch.Tensor] | None = None  # set on the last bucket: the whole update
    # The update replaces every parameter from one arena buffer: the scheduler may *adopt* it
    # (point the parameters at the staged tensors) instead of copying it in.
    adoptable: bool = False
    notes: list[str] = field(default_factory=list)
    # perf_counter() when the receive was posted and when its bytes were on the device
    posted_at: float = 0.0
    received_at: float = 0.0
    swap: cf.Future[float] | None = None  # the swap the receiver started (last bucket, with a swap hook)
    parts: list[dict[str, Any]] | None = None  # multi-part update: group, tensors, bytes, receive time per part


def parse_update_request(body: Any, cache: LayoutCache | None = None) -> UpdateRequest:
    """:meth:`schemas.weight_update.UpdateRequest.parse`, its FieldError as the engine's
    RequestError (HTTP 400 naming the field)."""
    try:
        return UpdateRequest.parse(body, cache)
    except FieldError as e:
        raise RequestError(e.field, e.message) from None


class _SerialWorker:
    """One daemon thread running submitted callables in order (buckets must be received in order)."""

    def __init__(self, name: str) -> None:
        self._q: queue.Queue[tuple[Callable[[], Any], cf.Future[Any]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> cf.Future[T]:
        fut: cf.Future[T] = cf.Future()
        self._q.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            fn, fut = self._q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)


class StagingArena:
    """Persistent device buffers, each the size of the model, that updates are received into.

    Why: allocating (and freeing) a model-sized staging buffer per update costs time on the
    receive path and fragments the allocator; fixed buffers are also an explicit, reported memory
    cost (``slipstream_engine_weight_staging_bytes``).  Bucket ``i`` of an update is a slice right
    after bucket ``i - 1``; the staged tensors are views into the buffer.

    Adoption: when an update replaces every parameter, the scheduler points the parameters at the
    staged tensors instead of copying (no device copy, a shorter pause).  That buffer then *is*
    the live weights, so the next update goes to the other buffer, and they alternate.  The
    engine then holds two model-sized buffers and nothing else (the weights it loaded at start
    are freed at the first adoption), the same memory as live weights plus one staging buffer.

    A buffer is busy from an update's first bucket until the scheduler has swapped it in
    (:meth:`release`); the next update's first bucket waits for that (normally it cannot come
    earlier: the publisher waits for the swap reply).  Used from the receive thread only,
    except :meth:`release`.
    """

    def __init__(self, capacity: int, metrics: EngineMetrics, wait_s: float) -> None:
        self.capacity = capacity
        self._metrics = metrics
        self._wait_s = wait_s
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._buf_device: list[torch.device | None] = [None, None]  # as asked ("cuda" is not "cuda:0")
        self._live: int | None = None  # the buffer the live weights point into, after an adoption
        self._cur = 0  # the buffer the current (or last) update is received into
        self._offset = 0
        self._in_update = False
        self._free = threading.Event()
        self._free.set()

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A ``uint8`` slice for the next bucket of the current update (a fresh buffer, with a
        warning, if the update outgrows the arena or the previous one is still being swapped)."""
        if not self._in_update:
            if not self._free.wait(self._wait_s):
                log.warning("staging arena still held by the previous update's swap after %.0fs (waited for the "
                            "scheduler to swap it in); receiving into a fresh buffer", self._wait_s)
                return torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._free.clear()
            self._in_update, self._offset = True, 0
            self._cur = 0 if self._live != 0 else 1
        buf = self._bufs[self._cur]
        if buf is None or self._buf_device[self._cur] != device:
            self._bufs[self._cur] = None
            buf = self._bufs[self._cur] = torch.empty(max(self.capacity, nbytes), dtype=torch.uint8, device=device)
            self._buf_device[self._cur] = device
            self._metrics.staging_bytes.set(sum(b.numel() for b in self._bufs if b is not None))
            log.info("weight staging buffer %d: %.1f MiB on %s", self._cur, buf.numel() / 2**20, device)
        if self._offset + nbytes > buf.numel():
            log.warning("weight update larger than the model (%d + %d bytes > %d): bucket received into a fresh buffer",
                        self._offset, nbytes, buf.numel())
            return torch.empty(nbytes, dtype=torch.uint8, device=device)
        out = buf[self._offset : self._offset + nbytes]
        self._offset += nbytes
        return out

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        """True if every tensor is a view into the current update's buffer (nothing fell back to a
        fresh buffer) and starts 16-byte aligned (what fast GPU kernels want from weights)."""
        buf = self._bufs[self._cur]
        if buf is None:
            return False
        lo = buf.data_ptr()
        hi = lo + buf.numel()
        for t in tensors:  # data_ptr() only: the cheapest query, and this runs over every parameter
            ptr = t.data_ptr()
            if not lo <= ptr < hi or ptr % 16:
                return False
        return True

    def end_update(self, handed_over: bool) -> None:
        """The update's last bucket arrived, or the update was abandoned.  If its tensors were
        handed to the scheduler, the arena stays busy until :meth:`release`."""
        self._in_update = False
        if not handed_over:
            self._free.set()

    def release(self, adopted: bool = False) -> None:
        """The scheduler has swapped the update in (``adopted``: by pointing the parameters at the
        staged tensors) or failed to: the next update may use the arena."""
        if adopted:
            self._live = self._cur
        self._free.set()


class WeightReceiver:
    """Weight groups + staging for one engine (single TP rank: engine rank = rank_offset)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, metrics: EngineMetrics, timeout_s: float,
                 swap: SwapHook | None = None, adopt: bool = True) -> None:
        """``swap(staged, version, adopt)``: start swapping a complete update in (the scheduler's
        ``swap_weights``); the receive thread calls it the moment the last bucket is on the device,
        and releases the staging buffer when it finishes.  Without it the caller swaps
        (``BucketResult.staged_update``) and calls :meth:`release_staging`.  ``adopt=False``: the
        scheduler always copies (its decode path holds the parameters' storage: fused weights,
        CUDA graphs), so no update is adoptable and one staging buffer is reused."""
        params = dict(model.named_parameters())
        self._specs = {name: (list(p.shape), p.dtype) for name, p in params.items()}
        self._aliases = {k for k in model.state_dict() if k not in params}  # tied weights, buffers
        self._device = device
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[WeightGroup, str]] = {}  # name -> (group, backend)
        self._staged: dict[str, torch.Tensor] = {}
        self._poisoned: str | None = None
        self._worker = _SerialWorker("engine-weight-recv")
        self._arena = StagingArena(sum(p.numel() * p.element_size() for p in params.values()), metrics, timeout_s)
        # On CUDA, buckets arrive on a side stream so decode kernels on the default stream keep
        # running; the receive thread waits for that stream alone before it reports a bucket.
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._swap = swap
        self._adopt = adopt
        self.layouts = LayoutCache()  # for parse_update_request on the server's event loop
        self.fault = Fault.from_env()  # tests only

    # ------------------------------------------------------------------ groups
    def init_group(self, master_address: str, master_port: int, rank: int, world_size: int, backend: str,
                   group_name: str) -> str:
        """Blocking: join the group (call from a thread). Raises on failure with a precise message."""
        if backend == "nccl" and self._device.type != "cuda":
            raise WeightUpdateError("backend 'nccl' needs the engine on a CUDA device; use backend 'gloo' on CPU")
        self.destroy_group(group_name)
        group = init_weight_group(master_address, master_port, rank=rank, world_size=world_size, backend=backend,
                                  group_name=group_name, timeout_s=self._timeout_s)
        with self._lock:
            self._groups[group_name] = (group, backend)
        # A publisher that died mid-update never sent its last bucket: start the next update clean.
        self._worker.submit(self._abandon_pending).result(timeout=self._timeout_s)
        msg = f"joined weight group {group_name!r} as rank {rank}/{world_size} ({backend}) at {master_address}:{master_port}"
        log.info(msg)
        return msg

    def destroy_group(self, group_name: str) -> bool:
        with self._lock:
            entry = self._groups.pop(group_name, None)
        if entry is None:
            return False
        _close_group(entry[0])
        log.info("left weight group %r", group_name)
        return True

    def close(self) -> None:
        with self._lock:
            groups, self._groups = list(self._groups.values()), {}
        for group, _ in groups:
            _close_group(group)

    # ------------------------------------------------------------------ buckets
    def _abandon_pending(self) -> None:
        with self._lock:
            if self._staged:
                log.warning("dropping %d staged tensors of an unfinished weight update", len(self._staged))
            self._staged, self._poisoned = {}, None
        self._arena.end_update(handed_over=False)

    def release_staging(self, adopted: bool = False) -> None:
        """Call after the scheduler swapped a handed-over update in (or failed to); ``adopted``:
        the parameters now point into the staging buffer."""
        self._arena.release(adopted)

    def submit_bucket(self, spec: UpdateRequest) -> cf.Future[BucketResult]:
        """Receive one bucket on the receive thread; see the module docstring for the failure rules."""
        with self._lock:
            known = ", ".join(repr(g) for g in self._groups) or "none"
            for i, part in enumerate(spec.parts or []):
                if part.group_name not in self._groups:
                    raise RequestError(f"{PARTS_FIELD}[{i}].group_name", f"no weight group named {part.group_name!r} "
                                       f"(joined: {known}); call /init_weights_update_group first")
            backends = {self._groups[p.group_name][1] for p in spec.parts or []}
            if len(backends) > 1:
                raise RequestError(PARTS_FIELD, f"the parts' groups mix backends {sorted(backends)}; one staging buffer needs one")
            if spec.group_name not in self._groups:
                raise WeightUpdateError(
                    f"no weight group named {spec.group_name!r} (joined: {known}); call /init_weights_update_group first"
                )
        return self._worker.submit(lambda: self._receive(spec))

    def _receive(self, spec: UpdateRequest) -> BucketResult:
        with self._lock:
            group, backend = self._groups[spec.group_name]
            groups = [self._groups[p.group_name][0] for p in spec.parts] if spec.parts else [group]
        recv_device = torch.device("cpu") if backend == "gloo" else self._device
        part_done: list[float] = []
        t0 = time.perf_counter()
        # On CUDA, on the side stream, posting and waiting both: a NCCL work's wait() orders the
        # *current* stream after the transfer, which must not be the decode stream.
        side = self._side if recv_device.type == "cuda" else None
        fault = self.fault if self.fault is not None else (lambda version, stage: None)
        try:
            fault(spec.weight_version, "receive")
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                # Post the receive first: the request is checked against the model while the bytes arrive.
                pending = _post_recv(groups, spec, recv_device, self._arena, part_done)
                posted_at = time.perf_counter()
                fault(spec.weight_version, "mid")
                problem = self.checked(spec)
                tensors = pending()
            if side is not None:
                side.synchronize()  # the bytes are really here before we say so (and time it)
            fault(spec.weight_version, "after_receive")
        except Exception as e:
            with self._lock:  # a broken transfer poisons the pending update like a bad bucket does
                self._poisoned, self._staged = self._poisoned or f"receive failed: {e}", {}
                if spec.weight_version is not None:
                    self._poisoned = None
            if spec.weight_version is not None:
                self._arena.end_update(handed_over=False)
            what = "the update's parts" if spec.parts else f"the bucket over group {spec.group_name!r}"
            abandoned = "" if spec.weight_version is None else f"; update to version {spec.weight_version} abandoned, nothing was swapped"
            raise WeightUpdateError(f"receiving {what} failed: {e}{abandoned}") from e
        received_at = time.perf_counter()
        receive_s = received_at - t0
        self._metrics.receive_seconds.observe(receive_s)
        self._metrics.update_bytes.inc(spec.nbytes)
        log.info("received bucket: %d tensors, %d bytes in %.1f ms (version=%s)", len(tensors), spec.nbytes,
                 receive_s * 1e3, spec.weight_version)
        result = BucketResult(nbytes=spec.nbytes, receive_s=receive_s, num_tensors=len(tensors),
                              posted_at=posted_at, received_at=received_at)
        if spec.parts:
            result.parts = [{"group_name": p.group_name, "num_tensors": p.num_tensors, "bytes": p.nbytes,
                             "receive_s": done - t0} for p, done in zip(spec.parts, part_done, strict=True)]
            for p in result.parts:
                log.info("  part over group %r: %d tensors, %d bytes, received after %.1f ms", p["group_name"],
                         p["num_tensors"], p["bytes"], p["receive_s"] * 1e3)
        with self._lock:
            if problem is not None and self._poisoned is None:
                self._poisoned = problem
                self._staged = {}
            poisoned = self._poisoned
            if poisoned is None:
                if recv_device == self._device:
                    self._staged.update(zip(spec.names, tensors, strict=True))
                else:
                    self._staged.update((name, t.to(self._device)) for name, t in zip(spec.names, tensors, strict=True))
            if spec.weight_version is not None:  # last bucket: hand over (or drop) the whole update
                result.staged_update, self._staged, self._poisoned = self._staged, {}, None
                result.adoptable = (self._adopt and poisoned is None and result.staged_update.keys() == self._specs.keys()
                                    and self._arena.holds(list(result.staged_update.values())))
                self._arena.end_update(handed_over=poisoned is None)
        if poisoned is not None:
            if problem is None:
                problem = f"an earlier bucket of this weight update was rejected ({poisoned}); bucket discarded"
            if spec.weight_version is not None:
                problem += f"; update to version {spec.weight_version} abandoned, nothing was swapped"
            raise WeightUpdateError(problem)
        if result.staged_update is not None and spec.weight_version is not None and self._swap is not None:
            result.swap = self._start_swap(result.staged_update, spec.weight_version, result.adoptable)
        return result

    def _start_swap(self, staged: dict[str, torch.Tensor], version: int, adopt: bool) -> cf.Future[float]:
        """Hand a complete update to the scheduler straight from the receive thread (no hop through
        the server's event loop); the staging buffer is released when the swap is done."""
        assert self._swap is not None
        try:
            fut = self._swap(staged, version, adopt)
        except BaseException:
            self.release_staging(False)
            raise
        fut.add_done_callback(lambda f: self.release_staging(adopt and not f.cancelled() and f.exception() is None))
        return fut

    def checked(self, spec: Any) -> str | None:
        """:meth:`_check`, done once per distinct layout (see :class:`LayoutCache`); ``spec`` is an
        ``UpdateRequest`` or ``IPCUpdateRequest`` (names, dtypes, shapes, layout)."""
        layout = spec.layout
        if layout is None:
            return self._check(spec)
        if not layout.checked:
            layout.problem, layout.checked = self._check(spec), True
        return layout.problem

    def _check(self, spec: Any) -> str | None:
        """A precise description of the first mismatch with the model, or None."""
        for name, dt, shape in zip(spec.names, spec.dtypes, spec.shapes, strict=True):
            if name not in self._specs:
                hint = " (a tied/aliased weight: send the parameter it is tied to)" if name in self._aliases else ""
                return f"unknown parameter name {name!r}{hint}; the model has {len(self._specs)} parameters"
            want_shape, want_dtype = self._specs[name]
            if list(shape) != want_shape:
                return f"parameter {name!r}: shape {list(shape)} sent, the model has {want_shape}"
            if dt != want_dtype:
                return f"parameter {name!r}: dtype {_dn(dt)} sent, the model has {_dn(want_dtype)}"
        return None


def _post_recv(groups: list[WeightGroup], spec: UpdateRequest, device: torch.device,
               arena: StagingArena | None = None, part_done: list[float] | None = None) -> Callable[[], list[torch.Tensor]]:
    """Join rank 0's broadcast(s) of one bucket (``groups``: one per part of a multi-part update,
    else the request's group); returns a function that waits for the bytes and returns the
    received tensors (views into ``arena`` for a flattened bucket when one is given), appending
    to ``part_done`` when each part's bytes were in.  A flattened bucket's broadcasts are only
    posted here (the caller works meanwhile), every part's before any wait; the per-tensor format
    (no ``load_format``) is received here, one blocking broadcast per tensor."""
    if spec.load_format == "flattened_bucket":
        if arena is not None:
            flat = arena.take(spec.nbytes, device)
        else:
            flat = torch.empty(spec.nbytes, dtype=torch.uint8, device=device)
        segments = ([(p.group_name, p.chunks) for p in spec.parts] if spec.parts
                    else [(spec.group_name, spec.chunks or [spec.nbytes])])
        offset = 0
        works: list[list[Any]] = []
        for group, (_, chunks) in zip(groups, segments, strict=True):
            part_works = []
            for n in chunks:  # one broadcast per chunk the publisher sends
                part_works.append(group.broadcast_async(flat[offset : offset + n], src=0))
                offset += n
            works.append(part_works)

        def finish() -> list[torch.Tensor]:
            failed: list[str] = []
            for (name, _), part_works in zip(segments, works, strict=True):
                try:
                    for work in part_works:
                        work.wait()
                except Exception as e:  # keep waiting for the other parts: nothing may write into staging later
                    failed.append(f"part over group {name!r}: {e}")
                if part_done is not None:
                    if spec.parts and flat.is_cuda:  # NCCL's wait() only orders the stream: time the bytes
                        torch.cuda.current_stream(flat.device).synchronize()
                    part_done.append(time.perf_counter())
            if failed:
                raise WeightUpdateError("; ".join(failed))
            return unflatten_bucket(flat, spec.dtypes, spec.shapes)

        return finish
    group = groups[0]
    tensors = [torch.empty(shape, dtype=dt, device=device) for dt, shape in zip(spec.dtypes, spec.shapes, strict=True)]
    for t in tensors:
        group.broadcast(t, src=0)
    return lambda: tensors


def _dn(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _close_group(group: WeightGroup) -> None:
    for method in ("abort", "shutdown"):
        try:
            getattr(group.pg, method)()
            return
        except Exception:  # not implemented by every backend / torch version
            continue
