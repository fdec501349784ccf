"""Encode/decode slipstream messages as ZeroMQ multipart frames.

Frame 0 is a msgpack header: a dict with ``schema_version`` and ``type``.  Data messages
(``group``, ``batch``) add five raw little-endian array frames per group: the concatenation, over
the group's trajectories, of prompt tokens, response tokens, log-probs, versions and loss masks.
The header lists each frame's name, dtype and byte length, and each trajectory's lengths, so the
decoder can check everything before it slices.  Arrays are decoded with ``np.frombuffer`` over the
received frame: zero copies.

Unknown types are refused, never pickled.  Every failure is a :class:`WireError` whose ``code`` is a
short, bounded reason (``schemas.validate.REJECT_REASONS``, used as a metric label) and whose message
says exactly what was wrong; no other exception escapes :func:`decode`.  ``schema_version`` must be
an int (``2.0`` and ``true`` are refused, though Python compares them equal to 2 and 1), header
fields have their declared types (bools are not ints, control-message floats are finite), rewards
are finite, ``seq``/``epoch`` are ≥ 0, and every trajectory has at least one response token: an
empty response is invalid (reason ``empty_response``; why: ``schemas.validate``).

    frames = encode(msg)           # list of bytes / buffers for socket.send_multipart
    msg = decode(frames, limits)   # raises WireError
    frames = frames_of(msg)        # a decoded message's own frames (forwarding), else encode(msg)

One encoding per batch: a decoded group keeps the frames it came in (``TrajectoryGroup.wire``), and
a ``Batch`` of such groups is encoded from them: the batch header embeds each group's msgpack header
byte for byte (its own ``schema_version``/``type`` keys ride along; the batch decoder reads only the
group fields) and the array frames are the received ones, so nothing is decoded or copied again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from schemas.messages import (
    ARRAY_DTYPES,
    CONTROL_TYPES,
    SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS,
    Batch,
    Message,
    Trajectory,
    TrajectoryGroup,
)
from schemas.validate import Limits, WireError, arrays_look_valid, validate_group

log = logging.getLogger(__name__)

FRAMES_PER_GROUP = len(ARRAY_DTYPES)
_ARRAY_NAMES = tuple(ARRAY_DTYPES)


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _group_header_and_frames(group: TrajectoryGroup) -> tuple[dict[str, Any], list[Any]]:
    trajs = []
    for t in group.trajectories:
        trajs.append(
            {
                "trajectory_id": t.trajectory_id,
                "reward": float(t.reward),
                "finish_reason": t.finish_reason,
                "timings": t.timings,
                "metadata": t.metadata,
                "n_prompt": len(t.prompt_tokens),
                "n_response": len(t.response_tokens),
            }
        )
    frames: list[Any] = []
    frame_desc = []
    for name in _ARRAY_NAMES:
        dtype = ARRAY_DTYPES[name]
        parts = [np.ascontiguousarray(getattr(t, name), dtype=dtype) for t in group.trajectories]
        buf = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype)
        frames.append(memoryview(buf).cast("B") if buf.nbytes else b"")
        frame_desc.append([name, dtype.str, int(buf.nbytes)])
    header = {
        "group_id": group.group_id,
        "prompt_id": group.prompt_id,
        "producer_id": group.producer_id,
        "epoch": group.epoch,
        "seq": group.seq,
        "metadata": group.metadata,
        "trajectories": trajs,
        "frames": frame_desc,
    }
    return header, frames


def encode(msg: Message) -> list[Any]:
    """Message dataclass -> list of frames (bytes or buffers) for ``send_multipart``."""
    mtype = getattr(type(msg), "TYPE", None)
    if isinstance(msg, TrajectoryGroup):
        header, frames = _group_header_and_frames(msg)
        return [_pack({"schema_version": SCHEMA_VERSION, "type": "group", **header}), *frames]
    if isinstance(msg, Batch) and msg.groups and all(g.wire is not None for g in msg.groups):
        return _batch_from_wire(msg)
    if isinstance(msg, Batch):
        groups, frames = [], []
        for g in msg.groups:
            h, f = _group_header_and_frames(g)
            groups.append(h)
            frames.extend(f)
        header = {
            "schema_version": SCHEMA_VERSION,
            "type": "batch",
            "step": msg.step,
            "lease_id": msg.lease_id,
            "shards": msg.shards,
            "dropped": msg.dropped,
            "queue_depth": msg.queue_depth,
            "replay": msg.replay,
            "groups": groups,
        }
        return [_pack(header), *frames]
    if mtype in CONTROL_TYPES:
        return [_pack({"schema_version": SCHEMA_VERSION, "type": mtype, **{name: getattr(msg, name) for name in _field_names(type(msg))}})]
    raise TypeError(f"refusing to encode {type(msg).__name__}: not a slipstream message type")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _batch_fields(msg: Batch) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "type": "batch", "step": msg.step, "lease_id": msg.lease_id, "shards": msg.shards,
            "dropped": msg.dropped, "queue_depth": msg.queue_depth, "replay": msg.replay}


def _batch_from_wire(msg: Batch) -> list[Any]:
    """A batch of groups that came off the wire: their header bytes spliced into the batch header,
    their array frames passed through (see the module doc)."""
    packer = msgpack.Packer(use_bin_type=True)
    fields = _batch_fields(msg)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for k, v in fields.items():
        parts += [packer.pack(k), packer.pack(v)]
    parts += [packer.pack("groups"), packer.pack_array_header(len(msg.groups))]
    frames: list[Any] = []
    for g in msg.groups:
        assert g.wire is not None
        parts.append(_buffer(g.wire[0]))
        frames.extend(_buffer(f) for f in g.wire[1:])
    return [b"".join(parts), *frames]


def frames_of(msg: Message) -> list[Any]:
    """The frames a decoded message arrived in (to forward it unchanged), else :func:`encode`."""
    wire = getattr(msg, "wire", None)
    return list(wire) if wire is not None else encode(msg)


def _buffer(frame: Any) -> memoryview:
    # zmq.Frame (copy=False) exposes .buffer; bytes/memoryview pass through.
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def _need(header: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(header, dict):
        raise WireError("bad_field", f"{where} must be a map, got {type(header).__name__}")
    if key not in header:
        raise WireError("bad_field", f"{where}: missing field '{key}'")
    value = header[key]
    if isinstance(value, bool) and types in (int, float, (int, float)):
        raise WireError("bad_field", f"{where}: field '{key}' must be {types}, got bool")
    if not isinstance(value, types):
        raise WireError("bad_field", f"{where}: field '{key}' must be {types}, got {type(value).__name__}")
    return value


def _non_negative(header: dict[str, Any], key: str, where: str) -> int:
    value = _need(header, key, int, where)
    if value < 0:
        raise WireError("bad_field", f"{where}: field '{key}' must be >= 0, got {value}")
    return value


def _timings(th: dict[str, Any], where: str) -> dict[str, float]:
    timings = _need(th, "timings", dict, where)
    for k, v in timings.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise WireError("bad_field", f"{where}: timings[{k!r}] must be a number of seconds, got {type(v).__name__}")
    return timings


def _decode_group(header: dict[str, Any], frames: Sequence[Any], limits: Limits, where: str) -> TrajectoryGroup:
    trajs_h = _need(header, "trajectories", list, where)
    desc = _need(header, "frames", list, where)
    if len(frames) != FRAMES_PER_GROUP:
        raise WireError("frame_count", f"{where}: expected {FRAMES_PER_GROUP} array frames, got {len(frames)}")
    if len(desc) != FRAMES_PER_GROUP:
        raise WireError("frame_count", f"{where}: header describes {len(desc)} frames, expected {FRAMES_PER_GROUP}")
    if not trajs_h:
        raise WireError("bad_field", f"{where}: a group needs at least one trajectory")
    if len(trajs_h) > limits.max_group_size:
        raise WireError("oversize", f"{where}: {len(trajs_h)} trajectories > limit {limits.max_group_size}")
    for i, t in enumerate(trajs_h):
        if not isinstance(t, dict):
            raise WireError("bad_field", f"{where}.trajectories[{i}] must be a map, got {type(t).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for (name, dtype), d, frame in zip(ARRAY_DTYPES.items(), desc, frames, strict=True):
        if not (isinstance(d, list) and len(d) == 3 and d[0] == name):
            raise WireError("bad_field", f"{where}: frame descriptor {d!r} should be ['{name}', dtype, nbytes]")
        if d[1] != dtype.str:
            raise WireError("bad_dtype", f"{where}: frame '{name}' has dtype {d[1]!r}, expected {dtype.str!r}")
        buf = _buffer(frame)
        if buf.nbytes != d[2] or buf.nbytes % dtype.itemsize:
            raise WireError("length_mismatch", f"{where}: frame '{name}' has {buf.nbytes} bytes, header says {d[2]}")
        arrays[name] = np.frombuffer(buf, dtype=dtype)
    n_prompt = [_need(t, "n_prompt", int, f"{where}.trajectories[{i}]") for i, t in enumerate(trajs_h)]
    n_resp = [_need(t, "n_response", int, f"{where}.trajectories[{i}]") for i, t in enumerate(trajs_h)]
    if any(n < 0 for n in n_prompt + n_resp):
        raise WireError("length_mismatch", f"{where}: negative length")
    if 0 in n_resp:
        i = n_resp.index(0)
        raise WireError("empty_response", f"{where}.trajectories[{i}]: the response is empty (a trajectory needs at least one response token)")
    rewards = [float(_need(t, "reward", (int, float), f"{where}.trajectories[{i}]")) for i, t in enumerate(trajs_h)]
    for i, r in enumerate(rewards):
        if not math.isfinite(r):
            raise WireError("nonfinite_reward", f"{where}.trajectories[{i}]: reward {r} is not finite")
    if sum(n_prompt) != len(arrays["prompt_tokens"]):
        raise WireError("length_mismatch", f"{where}: prompt lengths sum to {sum(n_prompt)}, frame has {len(arrays['prompt_tokens'])}")
    for name in ("response_tokens", "logprobs", "versions", "loss_mask"):
        if sum(n_resp) != len(arrays[name]):
            raise WireError("length_mismatch", f"{where}: response lengths sum to {sum(n_resp)}, frame '{name}' has {len(arrays[name])}")
    trajectories = []
    po = ro = 0
    for i, (th, np_, nr, reward) in enumerate(zip(trajs_h, n_prompt, n_resp, rewards, strict=True)):
        tw = f"{where}.trajectories[{i}]"
        trajectories.append(
            Trajectory(
                trajectory_id=_need(th, "trajectory_id", str, tw),
                prompt_tokens=arrays["prompt_tokens"][po : po + np_],
                response_tokens=arrays["response_tokens"][ro : ro + nr],
                logprobs=arrays["logprobs"][ro : ro + nr],
                versions=arrays["versions"][ro : ro + nr],
                loss_mask=arrays["loss_mask"][ro : ro + nr],
                reward=reward,
                finish_reason=_need(th, "finish_reason", str, tw),
                timings=_timings(th, tw),
                metadata=_need(th, "metadata", dict, tw),
            )
        )
        po += np_
        ro += nr
    group = TrajectoryGroup(
        group_id=_need(header, "group_id", str, where),
        prompt_id=_need(header, "prompt_id", str, where),
        producer_id=_need(header, "producer_id", str, where),
        epoch=_non_negative(header, "epoch", where),
        seq=_non_negative(header, "seq", where),
        trajectories=trajectories,
        metadata=_need(header, "metadata", dict, where),
    )
    too_long = any(a + b > limits.max_tokens_per_trajectory for a, b in zip(n_prompt, n_resp, strict=True))
    if too_long or not arrays_look_valid(arrays, limits):
        validate_group(group, limits)  # slow path: find and name the offending trajectory and field
    _fill_group_cache(group, arrays, n_prompt, n_resp)
    return group


def _fill_group_cache(group: TrajectoryGroup, arrays: dict[str, np.ndarray], n_prompt: list[int], n_resp: list[int]) -> None:
    """The group's cached sizes and versions, from the concatenated frames (one reduction each,
    not one per trajectory): the broker reads them for every group it queues and batches."""
    versions = arrays["versions"]
    mins = [-1] * len(n_resp)
    nonempty = [i for i, n in enumerate(n_resp) if n]
    if nonempty:
        starts = np.cumsum([0, *n_resp[:-1]])[nonempty]
        for i, m in zip(nonempty, np.minimum.reduceat(versions, starts).tolist(), strict=True):
            mins[i] = int(m)
    group.__dict__.update(
        trajectory_min_versions=mins, min_version=min(mins), max_version=int(versions.max()) if len(versions) else -1,
        num_tokens=sum(n_prompt) + sum(n_resp), nbytes=sum(a.nbytes for a in arrays.values()),
    )


def decode(frames: Sequence[Any], limits: Limits | None = None) -> Message:
    """Frames -> message dataclass. Raises WireError with a precise reason on any defect.

    Every check above names its reason. Should some input still slip past them and make the decoder
    fail another way (a gap in the checks, i.e. a bug), the message is rejected all the same, as
    ``malformed`` with ``WireError.gap`` set, and logged with its traceback: a hostile frame can
    never surface as a ``TypeError``. The codec fuzz (tests/test_codec_fuzz.py) fails on any gap.
    """
    try:
        return _decode(frames, limits or Limits())
    except WireError:
        raise
    except Exception as e:
        log.exception("codec gap: a message failed decoding outside the named checks (rejected as malformed)")
        err = WireError("malformed", f"undecodable message ({type(e).__name__}: {e})")
        err.gap = True
        raise err from None


def _decode(frames: Sequence[Any], limits: Limits) -> Message:
    if not frames:
        raise WireError("frame_count", "empty message")
    total = sum(_buffer(f).nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise WireError(
            "oversize",
            f"message is {total} bytes > limit {limits.max_message_bytes} (queue.max_message_bytes)",
        )
    try:
        header = msgpack.unpackb(_buffer(frames[0]), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several exception types for garbage
        raise WireError("malformed", f"header is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError("malformed", f"header must be a map, got {type(header).__name__}")
    sv = header.get("schema_version")
    if type(sv) is not int or sv not in SUPPORTED_SCHEMA_VERSIONS:  # 2.0 == 2 and True == 1 in Python: refuse both
        raise WireError("schema_version", f"schema_version {sv!r} is not supported (this peer speaks {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
    mtype = header.get("type")
    if mtype == "group":
        group = _decode_group(header, frames[1:], limits, "group")
        group.wire = list(frames)
        return group
    if mtype == "batch":
        ghs = _need(header, "groups", list, "batch")
        if len(frames) - 1 != FRAMES_PER_GROUP * len(ghs):
            raise WireError("frame_count", f"batch: {len(ghs)} groups need {FRAMES_PER_GROUP * len(ghs)} array frames, got {len(frames) - 1}")
        groups = []
        for i, gh in enumerate(ghs):
            if not isinstance(gh, dict):
                raise WireError("bad_field", f"batch.groups[{i}] must be a map")
            lo = 1 + i * FRAMES_PER_GROUP
            groups.append(_decode_group(gh, frames[lo : lo + FRAMES_PER_GROUP], limits, f"batch.groups[{i}]"))
        shards = _need(header, "shards", list, "batch")
        for r, shard in enumerate(shards):
            if not (isinstance(shard, list) and all(type(i) is int and 0 <= i < len(groups) for i in shard)):
                raise WireError("bad_field", f"batch.shards[{r}] must list indexes of the batch's {len(groups)} groups")
        return Batch(
            step=_need(header, "step", int, "batch"),
            lease_id=_need(header, "lease_id", str, "batch"),
            groups=groups,
            shards=shards,
            dropped=_need(header, "dropped", int, "batch"),
            queue_depth=_need(header, "queue_depth", int, "batch"),
            replay=_need(header, "replay", bool, "batch") if sv >= 2 else _refuse_newer(header, "replay", sv, "batch", False),
            wire=list(frames),
        )
    cls = CONTROL_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {mtype!r}")
    if len(frames) != 1:
        raise WireError("frame_count", f"'{mtype}' carries no array frames, got {len(frames) - 1}")
    if sv < getattr(cls, "SINCE", 1):
        raise WireError("schema_version", f"'{mtype}' exists since schema_version {cls.SINCE}; this message says {sv}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    since = getattr(cls, "FIELD_SINCE", {})
    kwargs = {}
    for key, value in header.items():
        if key in ("schema_version", "type"):
            continue
        if key not in names:
            raise WireError("bad_field", f"{mtype}: unknown field '{key}'")
        if since.get(key, 1) > sv:
            raise WireError("bad_field", f"{mtype}: field '{key}' exists since schema_version {since[key]}; this message says {sv}")
        kwargs[key] = value
    try:
        msg = cls(**kwargs)
    except TypeError as e:
        raise WireError("bad_field", f"{mtype}: {e}") from None
    _check_control_types(msg)
    return msg


def _refuse_newer(header: dict[str, Any], key: str, sv: int, where: str, default: Any) -> Any:
    """A field a message of schema version ``sv`` may not carry (added later): refuse it if present."""
    if key in header:
        raise WireError("bad_field", f"{where}: field '{key}' does not exist in schema_version {sv}")
    return default


def _type_ok(type_name: str, value: Any) -> bool:
    """Does ``value`` have the declared field type (bools are not numbers, floats are finite)?"""
    if type_name == "int":
        return type(value) is int
    if type_name == "float":
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if type_name in ("str", "bool"):
        return type(value) is (str if type_name == "str" else bool)
    if type_name == "list[int]":
        return isinstance(value, list) and all(type(v) is int for v in value)
    if type_name.startswith("dict["):
        return isinstance(value, dict)
    return True


def _check_control_types(msg: Any) -> None:
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if not _type_ok(str(f.type), value):
            shown = f"{type(value).__name__} {value!r}" if isinstance(value, float) else type(value).__name__
            raise WireError("bad_field", f"{msg.TYPE}: field '{f.name}' must be {f.type}, got {shown}")
