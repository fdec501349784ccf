"""Weight transports: how the bytes of a version reach a set of engines (DESIGN §8).

What: one interface, :class:`WeightTransport`, one implementation per way of moving bytes; the
requests that announce each update come from the engine kind's
:class:`~consumers.engine_driver.EngineDriver`, so each transport serves the embedded engine and
SGLang alike.

* :class:`BroadcastTransport`: a weight-update group (:func:`pipeline.weightsync.init_weight_group`,
  NCCL on GPU, gloo on CPU) whose rank 0 is this process and whose other ranks are the engines'.
* :class:`IPCTransport`: for an engine on the trainer's own device (NCCL refuses two ranks on one
  GPU): the engine maps the trainer's snapshot, shared once (CUDA IPC; a ``/dev/shm`` file on CPU,
  :mod:`consumers.ipc`), and copies it into its parameters.  One HTTP request per version.

:func:`choose_transport` picks one per engine from placement (``weights.transport = "auto"``): IPC
when the engine reports the trainer's GPU (``/get_server_info``'s ``slipstream_device``), else a
broadcast; on CPU ``auto`` keeps the broadcast.

A transport knows nothing of versions' order, checksums, resyncs or pauses: the publisher
(:mod:`consumers.publisher`) does that around :meth:`WeightTransport.send`.

    t = BroadcastTransport(EngineCalls(urls, 60.0), "127.0.0.1", "gloo", 64 << 20)
    t.connect([]); sent = t.send(named, 3, EmbeddedDriver(), timings); t.close()
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from consumers.bucket_send import BucketSender, RemotePart
from consumers.engine_driver import EngineDriver
from consumers.engine_http import EngineCalls, PublishError, free_port, spawn
from consumers.ipc import SharedAllocator
from consumers.snapshot import FlatState, WeightSnapshot
from pipeline.weightsync import DEFAULT_GROUP_NAME, WeightGroup, init_weight_group, same_device, same_machine
from schemas.weight_update import (
    ROUTE_DESTROY_GROUP,
    ROUTE_INIT_GROUP,
    ROUTE_UPDATE,
    destroy_payload,
    init_group_payload,
)

log = logging.getLogger(__name__)


@dataclass
class Sent:
    """What :meth:`WeightTransport.send` moved: bytes (this process's), requests, and every
    engine's reply to the last request (in ``engine_urls`` order)."""

    bytes: int
    buckets: int
    replies: list[dict[str, Any]] = field(default_factory=list)


class WeightTransport(ABC):
    """Moves one version's bytes to the engines of ``calls``; see the module docstring."""

    kind: ClassVar[str]

    def __init__(self, calls: EngineCalls) -> None:
        self.calls = calls

    @property
    def engine_urls(self) -> list[str]:
        return self.calls.urls

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @abstractmethod
    def connect(self, remote_parts: list[RemotePart]) -> None:
        """Make the engines ready to receive (idempotent while connected)."""

    @abstractmethod
    def send(self, named: Mapping[str, torch.Tensor], version: int, driver: EngineDriver,
             timings: dict[str, float]) -> Sent:
        """Move ``named`` to every engine; when it returns, every engine has swapped ``version``
        in.  Adds to ``timings`` where the time went; raises PublishError naming the engine."""

    @abstractmethod
    def close(self) -> None:
        """Release the engines (best effort)."""

    def abandon(self) -> None:
        """An update missed its deadline and may still run: never reuse what it uses (its group,
        its buffer); the next :meth:`connect` starts clean."""
        self.close()


class BroadcastTransport(WeightTransport):
    """A weight-update group: this process is rank 0, engine ``i`` brings ``ranks_per_engine[i]``
    ranks from ``1 + sum(ranks_per_engine[:i])`` on.  With ``remote_parts`` (per-stage publishing)
    the engines also join each part's group, hosted by that stage's leader."""

    kind = "broadcast"

    def __init__(self, calls: EngineCalls, master_address: str, backend: str, bucket_bytes: int,
                 group_name: str = DEFAULT_GROUP_NAME, ranks_per_engine: list[int] | None = None) -> None:
        super().__init__(calls)
        self.master_address = master_address
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.ranks_per_engine = list(ranks_per_engine or [1] * len(calls.urls))
        if len(self.ranks_per_engine) != len(calls.urls) or min(self.ranks_per_engine) < 1:
            raise ValueError("ranks_per_engine needs one positive entry per engine URL")
        self.master_port: int | None = None
        self.remote_parts: list[RemotePart] = []
        self._group: WeightGroup | None = None
        self._sender = BucketSender(backend)

    @property
    def connected(self) -> bool:
        return self._group is not None

    @property
    def world_size(self) -> int:
        return 1 + sum(self.ranks_per_engine)

    def reset(self) -> None:
        """After a failure the group is unusable (a collective may still block until its timeout
        in a daemon thread): drop it, so that connect() starts clean."""
        self._group = None

    def abandon(self) -> None:
        group, self._group = self._group, None
        if group is not None and self.backend == "nccl":  # gloo has no abort: its wait ends at its timeout
            try:
                group.pg.abort()
            except Exception as e:  # not every torch version has it
                log.debug("weight group abort: %s", e)

    def connect(self, remote_parts: list[RemotePart]) -> None:
        if self._group is not None:
            return
        self.remote_parts = list(remote_parts)
        port = free_port(self.master_address)
        world = self.world_size
        offsets = [1 + sum(self.ranks_per_engine[:i]) for i in range(len(self.engine_urls))]
        payloads: list[dict[str, Any] | bytes | None] = [
            init_group_payload(self.master_address, port, offset, world, self.group_name, self.backend) for offset in offsets
        ]
        route = ROUTE_INIT_GROUP
        what = f"joining weight group {self.group_name!r} at {self.master_address}:{port}"
        log.info("weight publisher: %d engine(s) joining %s:%d (%s)", len(self.engine_urls), self.master_address, port, self.backend)
        futures = self.calls.post_all(route, payloads, what)
        remote = [(f"joining stage {part.stage}'s weight group {part.group_name!r} at {part.address}:{part.port}",
                   self.calls.post_all(route, [init_group_payload(part.address, part.port, offset, world, part.group_name, self.backend)
                                               for offset in offsets], f"joining weight group {part.group_name!r}"))
                  for part in self.remote_parts]
        own = spawn(init_weight_group, self.master_address, port, rank=0, world_size=world, backend=self.backend,
                    group_name=self.group_name, timeout_s=self.calls.timeout_s)
        try:
            group = self.calls.wait(futures, own, route, what, f"rank 0 rendezvous at {self.master_address}:{port}")
            for part_what, part_futures in remote:  # the stage leader hosts it: engines' replies tell
                self.calls.collect(part_futures, route, part_what)
        except PublishError:
            self.reset()
            raise
        self._group, self.master_port = group, port
        log.info("weight publisher: group %r ready (world %d)%s", self.group_name, world,
                 f", plus {len(remote)} pipeline stage group(s)" if remote else "")

    def send(self, named: Mapping[str, torch.Tensor], version: int, driver: EngineDriver,
             timings: dict[str, float]) -> Sent:
        """Each step of the driver's plan: post its request to every engine, broadcast its buckets
        (flattened while the engines parse the request; another stage's leader sends its own),
        wait for every reply.  The engines reply to the last request once they swapped it in."""
        if self._group is None:
            raise PublishError("publish() before connect()")
        plan = driver.broadcast_plan(named, version, self.group_name, self.remote_parts, self.bucket_bytes)
        total = 0
        replies: list[dict[str, Any]] = []
        done: Future = Future()
        done.set_result(0)
        for step in plan.steps:
            t = time.perf_counter()
            futures = self.calls.post_all(ROUTE_UPDATE, [step.body] * len(self.engine_urls), step.what)
            own = spawn(self._broadcast, named, plan.buckets, step.indices, plan.largest, timings) if step.indices else done
            if "posted_at" not in timings:
                timings["posted_at"] = time.monotonic() - (time.perf_counter() - t)  # on the engines' clock (same host)
            try:
                total += self.calls.wait(futures, own, ROUTE_UPDATE, step.what, f"broadcast of {step.what}")
            except PublishError:
                self.reset()
                raise
            timings["send_s"] = timings.get("send_s", 0.0) + time.perf_counter() - t
            if step.last:
                replies = [f.result() for f in futures]
        # the slowest engine's own account of the request (the embedded engine's update reply)
        engine = max((r.get("timings") or {} for r in replies), key=lambda d: d.get("handler_s", 0.0), default={})
        timings.update({f"engine_{k}": float(v) for k, v in engine.items()})
        return Sent(total, plan.count, replies)

    def _broadcast(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], indices: list[int],
                   largest: int, timings: dict[str, float]) -> int:
        assert self._group is not None
        return self._sender.broadcast(self._group, named, buckets, indices, largest, timings)

    def close(self) -> None:
        """Ask engines to leave the group(s) (best effort) and drop ours."""
        if self._group is None:
            return
        futures = [
            fut for name in [self.group_name, *(p.group_name for p in self.remote_parts)]
            for fut in self.calls.post_all(ROUTE_DESTROY_GROUP, [destroy_payload(name)] * len(self.engine_urls),
                                           f"leaving the weight group {name!r}")
        ]
        for fut in futures:
            try:
                fut.result(timeout=self.calls.timeout_s)
            except Exception as e:  # best effort: engines may already be gone
                log.warning("weight publisher close: %s", e)
        self._group = None


class IPCTransport(WeightTransport):
    """An engine on this process's device: it maps the shared snapshot and copies it in.  A state
    that is not in a shared buffer yet (a plain dict) is first copied into one of our own
    (:class:`~consumers.snapshot.WeightSnapshot` with the shared allocator)."""

    kind = "ipc"

    def __init__(self, calls: EngineCalls, allocator: SharedAllocator, ranks: int = 1, budget_bytes: int | None = None) -> None:
        super().__init__(calls)
        self.allocator = allocator
        self.ranks = ranks
        self.budget_bytes = budget_bytes
        self._snapshot: WeightSnapshot | None = None
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, remote_parts: list[RemotePart]) -> None:
        if remote_parts:
            raise PublishError("weights.transport 'ipc' cannot carry other pipeline stages' parts "
                               "(weights.per_stage_publish); use the broadcast transport")
        self._connected = True

    def _shared(self, named: Mapping[str, torch.Tensor], timings: dict[str, float]) -> FlatState:
        if isinstance(named, FlatState) and self.allocator.describe(named.buffer) is not None:
            return named
        t = time.perf_counter()
        if self._snapshot is None:
            self._snapshot = WeightSnapshot(self.budget_bytes, allocate=self.allocator)
        flat = self._snapshot.take(named)
        timings["snapshot_s"] = timings.get("snapshot_s", 0.0) + time.perf_counter() - t
        return flat

    def send(self, named: Mapping[str, torch.Tensor], version: int, driver: EngineDriver,
             timings: dict[str, float]) -> Sent:
        if not self._connected:
            raise PublishError("publish() before connect()")
        flat = self._shared(named, timings)
        shared = self.allocator.describe(flat.buffer)
        assert shared is not None
        route, body = driver.ipc_request(flat, shared, version, self.ranks)
        what = f"version {version} (shared buffer, copy)"
        t = time.perf_counter()
        timings.setdefault("posted_at", time.monotonic())
        replies = self.calls.collect(self.calls.post_all(route, [body] * len(self.engine_urls), what), route, what)
        timings["send_s"] = timings.get("send_s", 0.0) + time.perf_counter() - t
        engine = max((r.get("timings") or {} for r in replies), key=lambda d: d.get("handler_s", 0.0), default={})
        timings.update({f"engine_{k}": float(v) for k, v in engine.items()})
        return Sent(sum(t.numel() * t.element_size() for t in flat.values()), 1, replies)

    def close(self) -> None:
        self._connected = False

    def abandon(self) -> None:
        self.close()
        if self._snapshot is not None:  # the late engine may still copy from it
            self._snapshot.retire()


def choose_transport(mode: str, mine: Mapping[str, Any], theirs: Mapping[str, Any] | None, url: str) -> tuple[str, str]:
    """(transport kind, why) for one engine: ``mode`` is ``weights.transport``; ``mine`` and
    ``theirs`` are :func:`pipeline.weightsync.device_identity` of the publishing rank's device and
    the engine's (None: the engine reports none, e.g. SGLang)."""
    if mode == "broadcast":
        return "broadcast", "weights.transport = 'broadcast'"
    if mode == "ipc":
        if theirs is not None and not same_machine(mine, theirs):
            raise PublishError(f"{url}: weights.transport = 'ipc' but the engine runs on another machine "
                               f"({theirs.get('host')!r}, this trainer on {mine.get('host')!r}); use 'broadcast' or 'auto'")
        return "ipc", "weights.transport = 'ipc'"
    if mode != "auto":
        raise ValueError(f"weights.transport must be 'auto', 'broadcast' or 'ipc', got {mode!r}")
    if theirs is None:
        return "broadcast", "the engine reports no device (e.g. SGLang): assumed remote"
    if mine.get("device") != "cuda":
        return "broadcast", "on CPU, auto keeps the broadcast"
    if same_device(mine, theirs):
        return "ipc", f"colocated on GPU {mine.get('uuid')}"
    return "broadcast", "another GPU" if same_machine(mine, theirs) else f"another machine ({theirs.get('host')})"
