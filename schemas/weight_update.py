"""The weight-update HTTP contract between a trainer's publisher and an inference engine (DESIGN §8).

What: every route, request body and reply marker the weight path uses, defined once.  The trainer
builds its requests with the typed classes below (``to_json``) and the embedded engine parses them
with the same classes (``parse``), so the two sides cannot drift; ``tests/test_sglang_contract.py``
checks the same builders against sglang 0.5.23's source.

* :data:`ROUTES`: route -> (HTTP method the publisher uses, SGLang request dataclass of its body).
* :class:`InitGroupRequest` (``/init_weights_update_group``), :class:`DestroyGroupRequest`,
  :class:`PauseRequest`, :class:`UpdateRequest` (``/update_weights_from_distributed``: the layout of
  one flattened bucket, or with slipstream's extensions of a whole update: :data:`CHUNKS_FIELD`,
  :data:`PARTS_FIELD`).
* :func:`reply_ok`: what a successful reply looks like (SGLang answers ``{"success": true}`` on weight
  routes and ``{"status": "ok"}`` on pause/continue; ``/flush_cache`` answers plain text).

Parsing errors are :class:`FieldError` naming the JSON field (the engine turns them into HTTP 400).
Versions travel as strings (SGLang's ``weight_version: Optional[str]``) and are parsed as
non-negative integers.

    body = UpdateRequest.for_tensors(named, "weight_update_group", version=3).to_json()
    req = UpdateRequest.parse(body)            # on the engine: names, dtypes, shapes, sizes, ...
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_GROUP_NAME = "weight_update_group"

ROUTE_INIT_GROUP = "/init_weights_update_group"
ROUTE_DESTROY_GROUP = "/destroy_weights_update_group"
ROUTE_UPDATE = "/update_weights_from_distributed"
ROUTE_UPDATE_VERSION = "/update_weight_version"
ROUTE_PAUSE = "/pause_generation"
ROUTE_CONTINUE = "/continue_generation"
ROUTE_FLUSH = "/flush_cache"
ROUTE_MODEL_INFO = "/get_model_info"
ROUTE_SERVER_INFO = "/get_server_info"
ROUTE_UPDATE_TENSOR = "/update_weights_from_tensor"
#: SGLang 0.5.23 applies /update_weights_from_distributed and /update_weights_from_tensor only
#: inside a weight-update session ("must run between begin_weight_update() and
#: end_weight_update()", sglang/srt/managers/scheduler_components/weight_updater.py)
ROUTE_BEGIN_UPDATE = "/begin_weight_update"
ROUTE_END_UPDATE = "/end_weight_update"
#: slipstream extension (embedded engine only): sha256 of the served weights, see
#: :func:`pipeline.weightsync.weights_checksum`
ROUTE_CHECKSUM = "/slipstream/weights_checksum"
#: slipstream extension (embedded engine only): an update whose bytes lie in memory shared by the
#: trainer (CUDA IPC, or a shared-memory file on CPU), see :class:`IPCUpdateRequest`
ROUTE_UPDATE_IPC = "/slipstream/update_weights_from_ipc"
#: slipstream extension of /get_server_info: where the engine's weights live
#: (:func:`pipeline.weightsync.device_identity`), so a trainer can tell a colocated engine
DEVICE_FIELD = "slipstream_device"

#: route -> (HTTP method the publisher uses, SGLang request dataclass of its body or None)
ROUTES: dict[str, tuple[str, str | None]] = {
    ROUTE_INIT_GROUP: ("POST", "InitWeightsUpdateGroupReqInput"),
    ROUTE_DESTROY_GROUP: ("POST", "DestroyWeightsUpdateGroupReqInput"),
    ROUTE_UPDATE: ("POST", "UpdateWeightsFromDistributedReqInput"),
    ROUTE_PAUSE: ("POST", "PauseGenerationReqInput"),
    ROUTE_CONTINUE: ("POST", "ContinueGenerationReqInput"),
    ROUTE_FLUSH: ("POST", None),  # SGLang reads only the query parameter 'timeout'
    ROUTE_MODEL_INFO: ("GET", None),
    ROUTE_SERVER_INFO: ("GET", None),
    ROUTE_BEGIN_UPDATE: ("POST", "BeginWeightUpdateReqInput"),
    ROUTE_END_UPDATE: ("POST", "EndWeightUpdateReqInput"),
    ROUTE_UPDATE_TENSOR: ("POST", "UpdateWeightsFromTensorReqInput"),
}
#: routes whose failure replies carry ``success: false`` (the engine adds it to its 400s)
WEIGHT_ROUTES = (ROUTE_INIT_GROUP, ROUTE_UPDATE, ROUTE_DESTROY_GROUP, ROUTE_UPDATE_VERSION, ROUTE_UPDATE_IPC,
                 ROUTE_BEGIN_UPDATE, ROUTE_END_UPDATE)
#: fields of the /get_model_info reply the publisher reads
MODEL_INFO_FIELDS = ("weight_version",)
#: a JSON reply succeeded if it has ``"success": true`` (weight routes) or ``"status": "ok"``
#: (SGLang's /pause_generation and /continue_generation)
REPLY_SUCCESS = (("success", True), ("status", "ok"))
#: routes whose reply is plain text: success is HTTP 200 (SGLang's /flush_cache)
TEXT_REPLY_ROUTES = (ROUTE_FLUSH,)
PAUSE_MODES = ("in_place", "retract", "abort")
BACKENDS = ("gloo", "nccl")

#: slipstream extension of /update_weights_from_distributed (embedded engine only, never sent to
#: SGLang): the request describes a whole update whose flattened bytes arrive in several
#: broadcasts of these byte sizes, one request per update instead of one per bucket.
CHUNKS_FIELD = "slipstream_chunks"
#: slipstream extension of /update_weights_from_distributed (embedded engine only, never sent to
#: SGLang): the update's tensors come from several publishers, one weight group each (one per
#: trainer pipeline stage, DESIGN §8).  A list of ``{"group_name", "num_tensors", "chunks"}``, one
#: per part, in the order of ``names``: part 0 is the first ``num_tensors`` names, and so on; each
#: part's flattened bytes arrive over its own group in broadcasts of ``chunks`` byte sizes.
#: Exclusive with :data:`CHUNKS_FIELD` (the single-part form).
PARTS_FIELD = "slipstream_parts"


def reply_ok(reply: Mapping[str, Any]) -> bool:
    return any(reply.get(key) == value for key, value in REPLY_SUCCESS)


class FieldError(ValueError):
    """A bad request field; ``field`` is its JSON path (``slipstream_parts[1].chunks``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float32 -> "float32" (the spelling SGLang's request carries)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def tensor_sizes(dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[int]:
    """Byte size of each tensor described by ``dtypes``/``shapes`` (a bucket's layout)."""
    return [math.prod(shape) * dt.itemsize for dt, shape in zip(dtypes, shapes, strict=True)]


def parse_version(value: Any, key: str) -> int:
    """A policy version sent as a string or int (SGLang sends strings); FieldError otherwise."""
    try:
        if isinstance(value, bool):
            raise ValueError
        version = int(value)
        if version < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise FieldError(key, f"expected a non-negative integer version, got {value!r}") from None
    return version


def _typed(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``body[key]`` checked against ``kind``; missing (or null) gives ``default``, FieldError when required."""
    value = body.get(key)
    if value is None:
        if default is ...:
            raise FieldError(key, "is required")
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = "true/false" if kinds == (bool,) else "/".join(k.__name__ for k in kinds)
        raise FieldError(key, f"expected {expected}, got {value!r}")
    return value


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise FieldError("body", "expected a JSON object")
    return body


# ----------------------------------------------------------------------------- group requests
@dataclass(frozen=True)
class InitGroupRequest:
    """``/init_weights_update_group``: join the weight group whose rank 0 (the publisher) hosts the
    rendezvous at ``master_address:master_port``; the engine is rank ``rank_offset`` (+ its TP rank)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = DEFAULT_GROUP_NAME
    backend: str = "nccl"

    def to_json(self) -> dict[str, Any]:
        return {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": self.rank_offset,
                "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}

    @classmethod
    def parse(cls, body: Any) -> InitGroupRequest:
        body = _object(body)
        req = cls(_typed(body, "master_address", str), _typed(body, "master_port", int), _typed(body, "rank_offset", int),
                  _typed(body, "world_size", int), _typed(body, "group_name", str, DEFAULT_GROUP_NAME),
                  _typed(body, "backend", str, "nccl"))
        if not 0 < req.master_port < 65536:
            raise FieldError("master_port", f"must be a TCP port, got {req.master_port}")
        if req.world_size < 2:
            raise FieldError("world_size", f"must be >= 2 (trainer rank 0 plus engines), got {req.world_size}")
        if not 1 <= req.rank_offset < req.world_size:
            raise FieldError("rank_offset", f"must be in [1, world_size={req.world_size}), got {req.rank_offset}")
        if req.backend not in BACKENDS:
            raise FieldError("backend", f"must be 'gloo' or 'nccl', got {req.backend!r}")
        return req


@dataclass(frozen=True)
class DestroyGroupRequest:
    """``/destroy_weights_update_group``."""

    group_name: str = DEFAULT_GROUP_NAME

    def to_json(self) -> dict[str, Any]:
        return {"group_name": self.group_name}

    @classmethod
    def parse(cls, body: Any) -> DestroyGroupRequest:
        return cls(_typed(_object(body), "group_name", str, DEFAULT_GROUP_NAME))


@dataclass(frozen=True)
class PauseRequest:
    """``/pause_generation``: ``in_place`` keeps running requests and their KV, ``retract`` queues
    them again (KV recomputed), ``abort`` ends them (SGLang's default)."""

    mode: str = "abort"

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode}

    @classmethod
    def parse(cls, body: Any) -> PauseRequest:
        mode = _typed(_object(body), "mode", str, "abort")
        if mode not in PAUSE_MODES:
            raise FieldError("mode", f"must be one of {list(PAUSE_MODES)}, got {mode!r}")
        return cls(mode)


def continue_payload() -> dict[str, Any]:
    """``/continue_generation``'s body (SGLang's defaults)."""
    return {}


# ---------------------------------------------------------------------------- update requests
@dataclass
class PartSpec:
    """One part of a multi-part update (:data:`PARTS_FIELD`): tensors ``first .. first +
    num_tensors - 1`` of the request, whose ``nbytes`` arrive over ``group_name`` in broadcasts
    of ``chunks`` bytes."""

    group_name: str
    first: int
    num_tensors: int
    chunks: list[int]
    nbytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"group_name": self.group_name, "num_tensors": self.num_tensors, "chunks": list(self.chunks)}


@dataclass(eq=False)
class Layout:
    """A request's tensor layout, parsed; ``problem``/``checked`` cache the receiver's check of it
    against its model (set once by the receive thread, the only reader)."""

    raw: tuple[list[Any], list[Any], list[Any]]  # names/dtypes/shapes exactly as received
    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]
    sizes: list[int]
    problem: str | None = None
    checked: bool = False


class LayoutCache:
    """The last request's layout, so an identical one is not parsed and checked again.

    Why: a trainer sends the same names/dtypes/shapes (hundreds of entries) with every version.
    Parsing and checking them costs about a millisecond of Python between the request's arrival
    and the start of the transfer; comparing the raw lists with the cached ones takes tens of
    microseconds (list equality runs in C).  Used from the server's event loop only.
    """

    def __init__(self) -> None:
        self.last: Layout | None = None

    def lookup(self, raw: tuple[list[Any], list[Any], list[Any]]) -> Layout | None:
        return self.last if self.last is not None and self.last.raw == raw else None


@dataclass(eq=False)
class UpdateRequest:
    """``/update_weights_from_distributed``: one flattened bucket (SGLang), or a whole update whose
    bytes arrive in several broadcasts (:data:`CHUNKS_FIELD`) or over several groups
    (:data:`PARTS_FIELD`; embedded engine only)."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    load_format: str | None = None
    weight_version: int | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    chunks: list[int] | None = None
    parts: list[PartSpec] | None = None
    layout: Layout | None = field(default=None, repr=False)  # where the receiver caches its check

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Byte size of each tensor (computed once: a bucket can hold hundreds of tensors)."""
        return tensor_sizes(self.dtypes, self.shapes)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(self.sizes)

    # ------------------------------------------------------------------ building (publisher)
    @classmethod
    def for_tensors(cls, tensors: Mapping[str, torch.Tensor], group_name: str, version: int | None,
                    flush_cache: bool = False, chunks: list[int] | None = None,
                    parts: list[PartSpec] | None = None) -> UpdateRequest:
        """The request for ``tensors`` (in order) as one flattened bucket; only the last bucket of
        a version carries ``version`` (and ``flush_cache``)."""
        return cls(list(tensors), [t.dtype for t in tensors.values()], [list(t.shape) for t in tensors.values()],
                   group_name, "flattened_bucket", version, bool(flush_cache and version is not None), False, chunks, parts)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "names": list(self.names),
            "dtypes": [dtype_name(d) for d in self.dtypes],
            "shapes": [list(s) for s in self.shapes],
            "group_name": self.group_name,
            "load_format": self.load_format,
            "flush_cache": self.flush_cache,
            "abort_all_requests": self.abort_all_requests,
            "weight_version": None if self.weight_version is None else str(self.weight_version),
        }
        if self.chunks is not None:
            body[CHUNKS_FIELD] = list(self.chunks)
        if self.parts is not None:
            body[PARTS_FIELD] = [p.to_json() for p in self.parts]
        return body

    # ------------------------------------------------------------------ parsing (engine)
    @classmethod
    def parse(cls, body: Any, cache: LayoutCache | None = None) -> UpdateRequest:
        """Validate the JSON body; FieldError names the bad field.  With ``cache``, a layout equal
        to the previous request's is not parsed again."""
        body = _object(body)
        lists: dict[str, list[Any]] = {}
        for key in ("names", "dtypes", "shapes"):
            if not isinstance(body.get(key), list):
                raise FieldError(key, f"required, a list (got {body.get(key)!r})")
            lists[key] = body[key]
        raw = (lists["names"], lists["dtypes"], lists["shapes"])
        layout = cache.lookup(raw) if cache is not None else None
        if layout is not None:
            req = cls._with_options(body, layout.names, layout.dtypes, layout.shapes, sizes=layout.sizes)
        else:
            req = cls._with_options(body, *_parse_layout(lists))
            if cache is not None:
                layout = cache.last = Layout((list(raw[0]), list(raw[1]), [list(x) for x in raw[2]]),
                                             req.names, req.dtypes, req.shapes, req.sizes)
        req.layout = layout
        return req

    @classmethod
    def _with_options(cls, body: Mapping[str, Any], names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]],
                      sizes: list[int] | None = None) -> UpdateRequest:
        group_name = body.get("group_name") or DEFAULT_GROUP_NAME
        if not isinstance(group_name, str):
            raise FieldError("group_name", f"expected a string, got {group_name!r}")
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise FieldError("load_format", f"must be null or 'flattened_bucket', got {load_format!r}")
        raw_version = body.get("weight_version")
        version = None if raw_version is None else parse_version(raw_version, "weight_version")
        flags = {}
        for key, default in (("flush_cache", True), ("abort_all_requests", False)):
            flags[key] = _typed(body, key, bool, default)
        req = cls(names, dtypes, shapes, group_name, load_format, version, flags["flush_cache"], flags["abort_all_requests"])
        if sizes is not None:
            req.__dict__["sizes"] = sizes  # the cached_property, computed for an identical layout before
        chunks = body.get(CHUNKS_FIELD)
        if chunks is not None:
            if load_format != "flattened_bucket":
                raise FieldError(CHUNKS_FIELD, "needs load_format 'flattened_bucket'")
            if not _byte_counts(chunks):
                raise FieldError(CHUNKS_FIELD, f"expected a non-empty list of positive byte counts, got {chunks!r}")
            if sum(chunks) != req.nbytes:
                raise FieldError(CHUNKS_FIELD, f"chunks add up to {sum(chunks)} bytes but the tensors need {req.nbytes}")
            req.chunks = list(chunks)
        parts = body.get(PARTS_FIELD)
        if parts is not None:
            req.parts = _parse_parts(parts, req, chunks is not None)
            req.group_name = req.parts[0].group_name
        return req


def _parse_layout(lists: dict[str, list[Any]]) -> tuple[list[str], list[torch.dtype], list[list[int]]]:
    n = len(lists["names"])
    for key in ("dtypes", "shapes"):
        if len(lists[key]) != n:
            raise FieldError(key, f"has {len(lists[key])} entries but names has {n}")
    names: list[str] = []
    for i, name in enumerate(lists["names"]):
        if not isinstance(name, str) or not name:
            raise FieldError(f"names[{i}]", f"expected a parameter name, got {name!r}")
        names.append(name)
    dtypes: list[torch.dtype] = []
    for i, dt in enumerate(lists["dtypes"]):
        try:
            dtypes.append(dtype_from_name(str(dt)))
        except ValueError:
            raise FieldError(f"dtypes[{i}]", f"unknown dtype {dt!r}") from None
    shapes: list[list[int]] = []
    for i, shape in enumerate(lists["shapes"]):
        if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
            raise FieldError(f"shapes[{i}]", f"expected a list of non-negative ints, got {shape!r}")
        shapes.append(list(shape))
    return names, dtypes, shapes


def _byte_counts(value: Any) -> bool:
    """True for a non-empty list of positive ints (a broadcast plan's byte sizes)."""
    return isinstance(value, list) and bool(value) and all(
        not isinstance(c, bool) and isinstance(c, int) and c > 0 for c in value)


def _parse_parts(raw: Any, req: UpdateRequest, with_chunks: bool) -> list[PartSpec]:
    """Validate :data:`PARTS_FIELD` against the request's tensors; FieldError names the field."""
    if with_chunks:
        raise FieldError(PARTS_FIELD, f"cannot be combined with {CHUNKS_FIELD} (each part gives its own chunks)")
    if req.load_format != "flattened_bucket":
        raise FieldError(PARTS_FIELD, "needs load_format 'flattened_bucket'")
    if not isinstance(raw, list) or not raw:
        raise FieldError(PARTS_FIELD, f"expected a non-empty list of {{group_name, num_tensors, chunks}} objects, got {raw!r:.200}")
    parts: list[PartSpec] = []
    seen: dict[str, int] = {}
    first = 0
    for i, part in enumerate(raw):
        where = f"{PARTS_FIELD}[{i}]"
        if not isinstance(part, dict):
            raise FieldError(where, f"expected an object {{group_name, num_tensors, chunks}}, got {part!r:.200}")
        unknown = sorted(set(part) - {"group_name", "num_tensors", "chunks"})
        if unknown:
            raise FieldError(where, f"unknown key(s) {unknown}")
        group = part.get("group_name")
        if not isinstance(group, str) or not group:
            raise FieldError(f"{where}.group_name", f"expected a weight group name, got {group!r}")
        if group in seen:
            raise FieldError(f"{where}.group_name", f"group {group!r} is already part {seen[group]}'s")
        seen[group] = i
        n = part.get("num_tensors")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise FieldError(f"{where}.num_tensors", f"expected a positive tensor count, got {n!r}")
        chunks = part.get("chunks")
        if not _byte_counts(chunks):
            raise FieldError(f"{where}.chunks", f"expected a non-empty list of positive byte counts, got {chunks!r:.200}")
        parts.append(PartSpec(group, first, n, list(chunks)))
        first += n
    if first != len(req.names):
        raise FieldError(PARTS_FIELD, f"the parts' num_tensors add up to {first} but names has {len(req.names)}")
    for i, part in enumerate(parts):
        part.nbytes = sum(req.sizes[part.first : part.first + part.num_tensors])
        if sum(part.chunks) != part.nbytes:
            raise FieldError(f"{PARTS_FIELD}[{i}].chunks", f"chunks add up to {sum(part.chunks)} bytes but the part's "
                             f"{part.num_tensors} tensors need {part.nbytes}")
    return parts


# ------------------------------------------------------------------------------ shared memory
SHARED_KINDS = ("cuda", "shm")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(body: Mapping[str, Any], key: str) -> bytes:
    value = _typed(body, key, str, "")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(key, "expected base64") from None


@dataclass(frozen=True)
class SharedBuffer:
    """Where a trainer's snapshot buffer lives, so that another process on the same machine can map
    it: ``nbytes`` bytes from ``offset`` of a shared storage.

    * ``kind="cuda"``: a CUDA IPC handle, field by field as torch's
      ``UntypedStorage._share_cuda_()`` returns them (the device by its UUID, since device indices
      differ between processes with different ``CUDA_VISIBLE_DEVICES``); the engine maps it with
      ``UntypedStorage._new_shared_cuda(...)``.  No pickle: every field is plain JSON (bytes as base64).
    * ``kind="shm"``: a shared-memory file (``/dev/shm``), the CPU stand-in for CUDA IPC.
    """

    kind: str
    nbytes: int
    offset: int = 0
    path: str = ""
    device_uuid: str = ""
    handle: bytes = b""
    storage_size: int = 0
    storage_offset: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False

    def key(self) -> tuple[Any, ...]:
        """Identity of the mapping: an engine maps each distinct buffer once."""
        return (self.kind, self.path, self.device_uuid, self.handle, self.storage_offset, self.offset, self.nbytes)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "nbytes": self.nbytes, "offset": self.offset}
        if self.kind == "shm":
            body["path"] = self.path
        else:
            body.update(device_uuid=self.device_uuid, handle=_b64(self.handle), storage_size=self.storage_size,
                        storage_offset=self.storage_offset, ref_counter_handle=_b64(self.ref_counter_handle),
                        ref_counter_offset=self.ref_counter_offset, event_handle=_b64(self.event_handle),
                        event_sync_required=self.event_sync_required)
        return body

    @classmethod
    def parse(cls, body: Any, where: str = "buffer") -> SharedBuffer:
        body = _object(body)
        try:
            kind = _typed(body, "kind", str)
            if kind not in SHARED_KINDS:
                raise FieldError("kind", f"must be one of {list(SHARED_KINDS)}, got {kind!r}")
            nbytes, offset = _typed(body, "nbytes", int), _typed(body, "offset", int, 0)
            if nbytes < 0 or offset < 0:
                raise FieldError("nbytes", f"nbytes and offset must be >= 0, got {nbytes} and {offset}")
            if kind == "shm":
                path = _typed(body, "path", str)
                if not path.startswith("/"):
                    raise FieldError("path", f"expected an absolute path, got {path!r}")
                return cls(kind, nbytes, offset, path=path)
            return cls(kind, nbytes, offset, device_uuid=_typed(body, "device_uuid", str), handle=_unb64(body, "handle"),
                       storage_size=_typed(body, "storage_size", int), storage_offset=_typed(body, "storage_offset", int),
                       ref_counter_handle=_unb64(body, "ref_counter_handle"),
                       ref_counter_offset=_typed(body, "ref_counter_offset", int),
                       event_handle=_unb64(body, "event_handle"),
                       event_sync_required=_typed(body, "event_sync_required", bool, False))
        except FieldError as e:
            raise FieldError(f"{where}.{e.field}", e.message) from None


@dataclass(eq=False)
class IPCUpdateRequest:
    """``/slipstream/update_weights_from_ipc`` (embedded engine): every tensor of an update lies in
    ``buffer`` at ``offsets[i]`` bytes; the engine maps the buffer (once per distinct buffer),
    copies the tensors into its own parameters between two decode steps, and replies when done,
    so the trainer may then overwrite the buffer."""

    names: list[str]
    dtypes: list[torch.dtype]
    shapes: list[list[int]]
    offsets: list[int]
    buffer: SharedBuffer
    weight_version: int
    flush_cache: bool = False
    layout: Layout | None = field(default=None, repr=False)

    @functools.cached_property
    def sizes(self) -> list[int]:
        return tensor_sizes(self.dtypes, self.shapes)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "dtypes": [dtype_name(d) for d in self.dtypes],
                "shapes": [list(x) for x in self.shapes], "offsets": list(self.offsets), "buffer": self.buffer.to_json(),
                "weight_version": str(self.weight_version), "flush_cache": self.flush_cache}

    @classmethod
    def parse(cls, body: Any, cache: LayoutCache | None = None) -> IPCUpdateRequest:
        body = _object(body)
        update = UpdateRequest.parse({k: body.get(k) for k in ("names", "dtypes", "shapes")}, cache)
        offsets = body.get("offsets")
        if not isinstance(offsets, list) or len(offsets) != len(update.names) or any(
                isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets):
            raise FieldError("offsets", f"expected {len(update.names)} non-negative byte offsets, got {offsets!r:.200}")
        buffer = SharedBuffer.parse(body.get("buffer"))
        raw_version = body.get("weight_version")
        if raw_version is None:
            raise FieldError("weight_version", "is required")
        req = cls(update.names, update.dtypes, update.shapes, list(offsets), buffer, parse_version(raw_version, "weight_version"),
                  _typed(body, "flush_cache", bool, False), update.layout)
        for i, (off, size, dt) in enumerate(zip(req.offsets, req.sizes, req.dtypes, strict=True)):
            if off % dt.itemsize:
                raise FieldError(f"offsets[{i}]", f"{off} is not aligned for {dtype_name(dt)}")
            if off + size > buffer.nbytes:
                raise FieldError(f"offsets[{i}]", f"tensor {req.names[i]!r} ends at byte {off + size}, past the "
                                 f"buffer's {buffer.nbytes}")
        return req


def tensor_update_payload(serialized: list[str], version: int | None, flush_cache: bool = False) -> dict[str, Any]:
    """Body of SGLang's ``/update_weights_from_tensor`` in its ``flattened_bucket`` form: one
    serialized payload per engine TP rank (SGLang's own format, built by
    :func:`consumers.ipc.sglang_serialized_bucket`)."""
    return {"serialized_named_tensors": list(serialized), "load_format": "flattened_bucket", "flush_cache": flush_cache,
            "abort_all_requests": False, "weight_version": None if version is None else str(version)}


def begin_update_payload() -> dict[str, Any]:
    """``/begin_weight_update``'s body (every runner: SGLang's default selector)."""
    return {"selector": "all"}


def end_update_payload() -> dict[str, Any]:
    return {}


# ------------------------------------------------------------------ builders the contract test checks
def init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    return InitGroupRequest(master_address, master_port, rank_offset, world_size, group_name, backend).to_json()


def bucket_payload(tensors: Mapping[str, torch.Tensor], group_name: str, version: int | None,
                   flush_cache: bool = False) -> dict[str, Any]:
    """Body of /update_weights_from_distributed for one flattened bucket; only the last bucket of
    a version carries ``weight_version`` (and ``flush_cache``)."""
    return UpdateRequest.for_tensors(tensors, group_name, version, flush_cache).to_json()


def pause_payload(mode: str) -> dict[str, Any]:
    return PauseRequest(mode).to_json()


def destroy_payload(group_name: str) -> dict[str, Any]:
    return DestroyGroupRequest(group_name).to_json()
