"""One driver per engine kind: what a weight update looks like to that kind of engine (DESIGN §8).

What: the publisher (:mod:`consumers.publisher`) never branches on the engine kind; it asks its
:class:`EngineDriver` instead:

* :meth:`EngineDriver.begin` / :meth:`~EngineDriver.end` / :meth:`~EngineDriver.abort` bracket an
  update on every engine.  SGLang applies an update inside its scheduler loop, so
  :class:`SGLangDriver` pauses generation (``/pause_generation {mode}``) and opens a weight-update
  session (``/begin_weight_update``: sglang 0.5.23 refuses ``/update_weights_from_*`` outside one)
  before, and closes it (``/end_weight_update``) and continues generation after (``/flush_cache``
  first when configured); :class:`EmbeddedDriver` needs nothing: the embedded engine stages the
  bytes while it decodes and swaps between two decode steps.
* :meth:`EngineDriver.ipc_request`: the request that hands a colocated engine the trainer's shared
  snapshot (embedded: :class:`~schemas.weight_update.IPCUpdateRequest`, explicit JSON; SGLang:
  ``/update_weights_from_tensor`` with its own ``flattened_bucket`` serialization).
* :meth:`EngineDriver.broadcast_plan`: the requests that announce an update sent by broadcast, and
  which of our buckets follow each request.  The embedded engine takes one request per update
  (every tensor, plus :data:`~schemas.weight_update.CHUNKS_FIELD` or, with pipeline stages,
  :data:`~schemas.weight_update.PARTS_FIELD`); SGLang one request per bucket, strictly in order,
  only the last one carrying ``weight_version``.
* :meth:`EngineDriver.pause_seconds`: how long generation stood still (SGLang: pause to continue;
  embedded: the longest swap an engine reported).

    driver = make_driver("sglang", pause_mode="retract", flush_cache=True)
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from consumers.bucket_send import RemotePart, bucket_sizes, plan_buckets
from consumers.engine_http import EngineCalls, PublishError
from consumers.snapshot import FlatState
from schemas.weight_update import (
    CHUNKS_FIELD,
    PARTS_FIELD,
    PAUSE_MODES,
    ROUTE_BEGIN_UPDATE,
    ROUTE_CONTINUE,
    ROUTE_END_UPDATE,
    ROUTE_FLUSH,
    ROUTE_PAUSE,
    ROUTE_UPDATE_IPC,
    ROUTE_UPDATE_TENSOR,
    IPCUpdateRequest,
    PartSpec,
    SharedBuffer,
    UpdateRequest,
    begin_update_payload,
    continue_payload,
    end_update_payload,
    pause_payload,
    tensor_update_payload,
)

log = logging.getLogger(__name__)

ENGINE_KINDS = ("embedded", "sglang")


@dataclass
class UpdateStep:
    """One request to every engine, and the indices of our buckets broadcast right after it
    (empty: another pipeline stage's leader broadcasts that request's bytes)."""

    body: dict[str, Any] | bytes
    indices: list[int]
    what: str
    last: bool


@dataclass
class UpdatePlan:
    """How one version goes out by broadcast: our buckets (names), the largest one's bytes (the
    size of the flatten buffers) and the requests in order."""

    buckets: list[list[str]]
    largest: int
    steps: list[UpdateStep]
    count: int  # buckets sent in all (every part's, with per-stage publishing and SGLang)


def chunked_update_payload(named: Mapping[str, torch.Tensor], buckets: list[list[str]], group_name: str,
                           version: int) -> dict[str, Any]:
    """Body of the single /update_weights_from_distributed request for a whole update to an
    embedded engine: every tensor's name/dtype/shape, plus each bucket's byte size."""
    return UpdateRequest.for_tensors(named, group_name, version, chunks=bucket_sizes(named, buckets)).to_json()


def parts_update_payload(named: Mapping[str, torch.Tensor], buckets: list[list[str]], group_name: str,
                         version: int, remote: list[RemotePart], bucket_bytes: int) -> dict[str, Any]:
    """Body of the single /update_weights_from_distributed request of a multi-part update (embedded
    engines): every part's tensors (ours first), and per part its group, tensor count and chunks."""
    every: dict[str, torch.Tensor] = dict(named)
    parts = [PartSpec(group_name, 0, len(named), bucket_sizes(named, buckets))]
    for part in remote:
        every.update(part.meta)
        parts.append(PartSpec(part.group_name, 0, len(part.meta), bucket_sizes(part.meta, part.buckets(bucket_bytes))))
    if len(every) != sum(p.num_tensors for p in parts):
        raise PublishError("a tensor name appears in several pipeline stages' parts")
    return UpdateRequest.for_tensors(every, group_name, version, parts=parts).to_json()


class EngineDriver(ABC):
    """What an update looks like to one kind of engine; see the module docstring."""

    kind: ClassVar[str]

    def begin(self, calls: EngineCalls, version: int) -> None:
        """Before the first byte of ``version`` goes out (every engine of ``calls``)."""
        return None

    def end(self, calls: EngineCalls, version: int) -> None:
        """After every engine took ``version``."""
        return None

    def abort(self, calls: EngineCalls, version: int) -> None:
        """After a failed update (best effort: never raises)."""
        return None

    def pause_seconds(self, replies: list[dict[str, Any]], bracket_s: float) -> float:
        """How long generation stood still for this update."""
        return bracket_s

    @abstractmethod
    def broadcast_plan(self, named: Mapping[str, torch.Tensor], version: int, group_name: str,
                       remote_parts: list[RemotePart], bucket_bytes: int) -> UpdatePlan:
        """The requests announcing ``named`` (plus the remote parts' tensors) sent by broadcast."""

    @abstractmethod
    def ipc_request(self, flat: FlatState, shared: SharedBuffer, version: int, ranks: int) -> tuple[str, dict[str, Any]]:
        """(route, body) of the one request that hands ``flat`` (views into the shared buffer
        ``shared``) to a colocated engine with ``ranks`` TP ranks."""


class EmbeddedDriver(EngineDriver):
    """slipstream's embedded engine: one request per update, no pause around it."""

    kind = "embedded"

    def __init__(self) -> None:
        self._layout_json: tuple[Any, bytes, int] | None = None  # (layout key, request minus its version, largest bucket)

    def pause_seconds(self, replies: list[dict[str, Any]], bracket_s: float) -> float:
        return max((float(r.get("pause_seconds", 0.0)) for r in replies), default=0.0)

    def broadcast_plan(self, named: Mapping[str, torch.Tensor], version: int, group_name: str,
                       remote_parts: list[RemotePart], bucket_bytes: int) -> UpdatePlan:
        if getattr(named, "contiguous", False) and not remote_parts:
            # a flat snapshot (consumers.publish_async.FlatState) needs no flatten buffer, which is
            # what the bucket size bounds: one broadcast, from a view
            buckets = [list(named)]
        else:
            buckets = plan_buckets(named, bucket_bytes)
        body, largest = self._request(named, buckets, version, group_name, remote_parts, bucket_bytes)
        step = UpdateStep(body, list(range(len(buckets))), f"version {version} ({len(buckets)} bucket(s), swap)", last=True)
        return UpdatePlan(buckets, largest, [step], len(buckets))

    def _request(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], version: int, group_name: str,
                 remote_parts: list[RemotePart], bucket_bytes: int) -> tuple[bytes, int]:
        """The JSON body of the update's one request, and the largest bucket's size.  Its layout
        part (hundreds of names, dtypes and shapes) is encoded once and reused while the layout
        stays the same; only the version changes from one update to the next."""
        key = (tuple((n, t.dtype, t.shape) for n, t in named.items()), tuple(map(len, buckets)), group_name,
               tuple((p.group_name, len(p.layout)) for p in remote_parts))  # parts' layouts never change
        if self._layout_json is None or self._layout_json[0] != key:
            if remote_parts:  # per-stage publishing: every part, ours first (PARTS_FIELD)
                payload = parts_update_payload(named, buckets, group_name, 0, remote_parts, bucket_bytes)
                largest = max(payload[PARTS_FIELD][0]["chunks"])
            else:
                payload = chunked_update_payload(named, buckets, group_name, 0)
                largest = max(payload[CHUNKS_FIELD])
            del payload["weight_version"]
            self._layout_json = (key, json.dumps(payload).encode(), largest)
        _, layout, largest = self._layout_json
        return b'{"weight_version": "%d", ' % version + layout[1:], largest

    def ipc_request(self, flat: FlatState, shared: SharedBuffer, version: int, ranks: int) -> tuple[str, dict[str, Any]]:
        assert flat.offsets is not None
        req = IPCUpdateRequest(list(flat), [t.dtype for t in flat.values()], [list(t.shape) for t in flat.values()],
                               [flat.offsets[n] for n in flat], shared, version)
        return ROUTE_UPDATE_IPC, req.to_json()


class SGLangDriver(EngineDriver):
    """An SGLang server: paused around the update, one request per bucket."""

    kind = "sglang"

    def __init__(self, pause_mode: str = "in_place", flush_cache: bool = True) -> None:
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be 'in_place', 'retract' or 'abort', got {pause_mode!r}")
        self.pause_mode = pause_mode
        self.flush_cache = flush_cache

    def begin(self, calls: EngineCalls, version: int) -> None:
        calls.call_all(ROUTE_PAUSE, pause_payload(self.pause_mode), f"pausing generation ({self.pause_mode}) for version {version}")
        try:  # SGLang 0.5.23 loads weights only inside a weight-update session
            calls.call_all(ROUTE_BEGIN_UPDATE, begin_update_payload(), f"opening the weight-update session for version {version}")
        except PublishError:
            self.abort(calls, version)
            raise

    def end(self, calls: EngineCalls, version: int) -> None:
        calls.call_all(ROUTE_END_UPDATE, end_update_payload(), f"closing the weight-update session of version {version}")
        if self.flush_cache:
            try:
                calls.call_all(ROUTE_FLUSH, {}, f"flushing the prefix cache after version {version}")
            except PublishError as e:
                log.warning("weight publisher: prefix cache not flushed (%s)", e)
        calls.call_all(ROUTE_CONTINUE, continue_payload(), f"continuing generation after version {version}")

    def abort(self, calls: EngineCalls, version: int) -> None:
        try:  # a session left open would refuse the next begin_weight_update
            calls.call_all(ROUTE_END_UPDATE, end_update_payload(), f"closing the weight-update session of the failed version {version}")
        except PublishError as e:
            log.warning("weight publisher: could not close the weight-update session after a failed publish: %s", e)
        try:
            calls.call_all(ROUTE_CONTINUE, continue_payload(), f"continuing generation after the failed version {version}")
        except PublishError as e:
            log.error("weight publisher: could not resume generation after a failed publish: %s", e)

    def broadcast_plan(self, named: Mapping[str, torch.Tensor], version: int, group_name: str,
                       remote_parts: list[RemotePart], bucket_bytes: int) -> UpdatePlan:
        """One request per bucket, strictly in order (SGLang receives a request's tensors when the
        request arrives); only the last carries ``weight_version``.  With remote parts (per-stage
        publishing) our buckets go first, then each part's, each request naming its part's group;
        the part's leader broadcasts those buckets."""
        buckets = plan_buckets(named, bucket_bytes)
        plans = [(0, group_name, named, buckets), *((p.stage, p.group_name, p.meta, p.buckets(bucket_bytes))
                                                    for p in remote_parts)]
        count = sum(len(b) for *_, b in plans)
        steps: list[UpdateStep] = []
        for stage, part_group, tensors, part_buckets in plans:
            for i, names in enumerate(part_buckets):
                last = len(steps) + 1 == count
                body = UpdateRequest.for_tensors({n: tensors[n] for n in names}, part_group, version if last else None,
                                                 flush_cache=self.flush_cache).to_json()
                what = (f"bucket {i + 1}/{len(part_buckets)}" + (f" of stage {stage} (group {part_group!r})" if remote_parts else "")
                        + f" of version {version}" + (" (swap)" if last else ""))
                steps.append(UpdateStep(body, [i] if stage == 0 else [], what, last))
        return UpdatePlan(buckets, max(bucket_sizes(named, buckets)), steps, len(steps))


    def ipc_request(self, flat: FlatState, shared: SharedBuffer, version: int, ranks: int) -> tuple[str, dict[str, Any]]:
        """SGLang's ``/update_weights_from_tensor`` in ``flattened_bucket`` form, whole model in one
        request (a view of the shared buffer: nothing is copied on our side)."""
        from consumers.ipc import sglang_serialized_bucket

        assert flat.buffer is not None and flat.offsets is not None
        serialized = sglang_serialized_bucket(flat.buffer, list(flat), [t.dtype for t in flat.values()],
                                              [list(t.shape) for t in flat.values()], [flat.offsets[n] for n in flat], ranks)
        return ROUTE_UPDATE_TENSOR, tensor_update_payload(serialized, version, self.flush_cache)


def make_driver(kind: str, pause_mode: str = "in_place", flush_cache: bool = True) -> EngineDriver:
    """The driver of ``kind`` (``weights.engine_kind``)."""
    if kind == "embedded":
        return EmbeddedDriver()
    if kind == "sglang":
        return SGLangDriver(pause_mode, flush_cache)
    raise ValueError(f"engine_kind must be 'embedded' or 'sglang', got {kind!r}")

