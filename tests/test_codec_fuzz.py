"""Property fuzz of the wire codec alone (no sockets): whatever bytes arrive, ``decode`` either
returns a message that is valid by every boundary rule, or raises a :class:`WireError` whose code is
one of ``REJECT_REASONS`` and which no named check missed (``WireError.gap`` unset). Never another
exception type.

Three generators: valid groups with mutations (any header value replaced by any msgpack value, keys
dropped or added, NaN/inf/positive log-probs and rewards, out-of-range ids and versions, truncated,
flipped, dropped and extra frames), control headers with random fields and schema versions, and raw
garbage frames. An accepted message is checked by invariants written here, independently of
``schemas.validate``, and must round-trip through ``encode``.

Found cases are replayed every run from the example database committed in ``tests/hypothesis-db/``
(read-only: Hypothesis deletes an example it replays without failure from a writable database).
Its cases were recorded with ``SLIPSTREAM_FUZZ_RECORD=1 SLIPSTREAM_FUZZ_EXAMPLES=3000`` (5000 for
some), each run against a broken codec: the codec before the fixes of issue 19 (it raised TypeError
for a trajectory entry that is not a map and accepted ``schema_version: 2.0``), and the fixed codec
with one check removed at a time (finite rewards, non-empty responses, seq/epoch >= 0, numeric
timings, finite control floats, batch shards, the per-token value checks); the failing examples
Hypothesis found and shrank are the files. To add found cases, run the same way on a failing codec
and commit the new files. Hypothesis keys the database by the test function's source (decorators
and comments excluded) and replays choice sequences through the strategies, so the test functions
are thin (the properties live in helpers) and a change to a strategy calls for re-recording.

    pytest tests/test_codec_fuzz.py                                # replays the database, then 300 new cases per test
    SLIPSTREAM_FUZZ_RECORD=1 pytest tests/test_codec_fuzz.py       # saves new failing cases
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ExampleDatabase, ReadOnlyDatabase

from schemas.codec import decode, encode
from schemas.messages import (
    ALL_TYPES,
    CONTROL_TYPES,
    SUPPORTED_SCHEMA_VERSIONS,
    Batch,
    Trajectory,
    TrajectoryGroup,
)
from schemas.validate import REJECT_REASONS, Limits, WireError

DB_DIR = Path(__file__).parent / "hypothesis-db"
VOCAB = 16
MAX_VERSION = 3
LIMITS = Limits(max_message_bytes=1 << 16, max_group_size=8, max_tokens_per_trajectory=64, vocab_size=VOCAB, max_version=MAX_VERSION)


def _database() -> ExampleDatabase:
    db = DirectoryBasedExampleDatabase(str(DB_DIR))
    return db if os.environ.get("SLIPSTREAM_FUZZ_RECORD") == "1" else ReadOnlyDatabase(db)


FUZZ = settings(max_examples=int(os.environ.get("SLIPSTREAM_FUZZ_EXAMPLES", "300")), deadline=None, database=_database(), suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------------------- generators
huge_ints = st.sampled_from([-(2**63), -(2**31), -1, 0, 1, 2**31 - 1, 2**31, 2**32 + 5, 2**63 - 1, 2**64 - 1])
odd_floats = st.sampled_from([math.nan, math.inf, -math.inf, 2.0, 0.5, -0.0, 1e308])
scalars = st.one_of(st.none(), st.booleans(), huge_ints, st.integers(-5, 5), odd_floats, st.floats(), st.text(max_size=4), st.binary(max_size=4))
wire_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)), max_leaves=6)


@st.composite
def trajectories(draw: st.DrawFn) -> Trajectory:
    n_prompt, n_resp = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    return Trajectory(
        trajectory_id=draw(st.text(max_size=6)),
        prompt_tokens=np.array(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n_prompt, max_size=n_prompt)), dtype=np.int32),
        response_tokens=np.array(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n_resp, max_size=n_resp)), dtype=np.int32),
        logprobs=np.array(draw(st.lists(st.floats(-20, 0, width=32), min_size=n_resp, max_size=n_resp)), dtype=np.float32),
        versions=np.array(draw(st.lists(st.integers(0, MAX_VERSION), min_size=n_resp, max_size=n_resp)), dtype=np.int32),
        loss_mask=np.array(draw(st.lists(st.integers(0, 1), min_size=n_resp, max_size=n_resp)), dtype=np.uint8),
        reward=draw(st.floats(-10, 10)),
        finish_reason=draw(st.sampled_from(["stop", "length", "abort"])),
        timings={"generate_s": draw(st.floats(0, 100))},
        metadata=draw(st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2)),
    )


@st.composite
def groups(draw: st.DrawFn) -> TrajectoryGroup:
    return TrajectoryGroup(
        group_id=draw(st.text(max_size=6)), prompt_id=draw(st.text(max_size=6)), producer_id="producer-0",
        epoch=draw(st.integers(0, 2**40)), seq=draw(st.integers(0, 2**40)),
        trajectories=draw(st.lists(trajectories(), min_size=1, max_size=4)), metadata={},
    )


# Value edits made before encoding, so the header and frames stay consistent: only the value is wrong.
array_edits = st.tuples(
    st.sampled_from(["logprobs", "response_tokens", "prompt_tokens", "versions", "loss_mask", "reward", "empty"]),
    st.integers(0, 3), st.integers(0, 5),
    st.one_of(odd_floats, st.floats(0.001, 10), huge_ints, st.integers(-3, VOCAB + 3)),
)
# Edits of the encoded header: near misses (a wrong type or range the sender could plausibly produce)
# most of the time, any msgpack value otherwise; keys dropped or added; whole entries replaced.
near_miss = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from([-1, -(2**63), 2**64 - 1, True, False, 2.0, "7", "", None, [], {}, [1], b"x"]).map(copy.deepcopy),
)
any_value = st.one_of(near_miss, near_miss, near_miss, wire_values)
GROUP_KEYS = ["group_id", "prompt_id", "producer_id", "epoch", "seq", "metadata", "trajectories", "frames", "schema_version", "type"]
TRAJ_KEYS = ["trajectory_id", "reward", "finish_reason", "timings", "metadata", "n_prompt", "n_response"]
header_edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from([*GROUP_KEYS, "evil"]), any_value),
    st.tuples(st.just("del"), st.sampled_from(GROUP_KEYS)),
    st.tuples(st.just("traj_set"), st.integers(0, 3), st.sampled_from([*TRAJ_KEYS, "evil"]), any_value),
    st.tuples(st.just("traj_del"), st.integers(0, 3), st.sampled_from(TRAJ_KEYS)),
    st.tuples(st.just("traj_replace"), st.integers(0, 3), any_value),
    st.tuples(st.just("timings"), st.integers(0, 3), any_value),
    st.tuples(st.just("frame_desc"), st.integers(0, 4), st.integers(0, 3), any_value),
)
frame_edits = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 5), st.integers(0, 64)),
    st.tuples(st.just("flip"), st.integers(0, 5), st.integers(0, 1 << 12), st.integers(1, 255)),
    st.tuples(st.just("drop"), st.integers(0, 5)),
    st.tuples(st.just("extra"), st.binary(max_size=16)),
    st.tuples(st.just("replace"), st.integers(1, 5), st.binary(max_size=24)),
)


def _apply_array_edit(group: TrajectoryGroup, edit: tuple) -> None:
    what, ti, j, value = edit
    t = group.trajectories[ti % len(group.trajectories)]
    if what == "reward":
        t.reward = float(value)
    elif what == "empty":
        t.response_tokens, t.logprobs, t.versions, t.loss_mask = (a[:0] for a in (t.response_tokens, t.logprobs, t.versions, t.loss_mask))
    elif len(getattr(t, what)):
        arr = getattr(t, what).copy()
        with np.errstate(all="ignore"):
            try:
                arr[j % len(arr)] = value
            except (OverflowError, ValueError):  # the value does not fit the wire dtype: wrap it as a sender's cast would
                arr[j % len(arr)] = np.array(value).astype(np.float64).astype(arr.dtype)
        setattr(t, what, arr)


def _apply_header_edit(header: dict[str, Any], edit: tuple) -> None:
    kind, trajs = edit[0], header.get("trajectories")
    if kind == "set":
        header[edit[1]] = edit[2]
    elif kind == "del":
        header.pop(edit[1], None)
    elif kind in ("traj_set", "traj_del", "traj_replace", "timings") and isinstance(trajs, list) and trajs:
        i = edit[1] % len(trajs)
        if kind == "traj_replace":
            trajs[i] = edit[2]
        elif isinstance(trajs[i], dict) and kind == "traj_set":
            trajs[i][edit[2]] = edit[3]
        elif isinstance(trajs[i], dict) and kind == "timings":
            trajs[i]["timings"] = {"generate_s": edit[2]}
        elif isinstance(trajs[i], dict):
            trajs[i].pop(edit[2], None)
    elif kind == "frame_desc" and isinstance(header.get("frames"), list) and header["frames"]:
        d = header["frames"][edit[1] % len(header["frames"])]
        if isinstance(d, list) and d:
            d[edit[2] % len(d)] = edit[3]


def _apply_frame_edit(frames: list[bytes], edit: tuple) -> None:
    kind = edit[0]
    if kind == "extra":
        frames.append(edit[1])
        return
    i = edit[1] % len(frames)
    if kind == "truncate":
        frames[i] = frames[i][: edit[2] % (len(frames[i]) + 1)]
    elif kind == "flip" and frames[i]:
        b = bytearray(frames[i])
        b[edit[2] % len(b)] ^= edit[3]
        frames[i] = bytes(b)
    elif kind == "drop" and len(frames) > 1:
        del frames[i]
    elif kind == "replace":
        frames[i] = edit[2]


@st.composite
def mutated_groups(draw: st.DrawFn) -> list[bytes]:
    group = draw(groups())
    for edit in draw(st.lists(array_edits, max_size=2)):
        _apply_array_edit(group, edit)
    frames = [bytes(f) for f in encode(group)]
    header_ops = draw(st.lists(header_edits, max_size=3))
    if header_ops:
        header = msgpack.unpackb(frames[0], raw=False)
        for edit in header_ops:
            _apply_header_edit(header, edit)
        frames[0] = msgpack.packb(header, use_bin_type=True)
    for edit in draw(st.lists(frame_edits, max_size=2)):
        _apply_frame_edit(frames, edit)
    return frames


@st.composite
def control_headers(draw: st.DrawFn) -> list[bytes]:
    """A valid header of a random type (every field a plausible value), then 0-2 targeted edits."""
    mtype = draw(st.sampled_from(sorted(ALL_TYPES)))
    header: dict[Any, Any] = {"schema_version": draw(st.sampled_from(SUPPORTED_SCHEMA_VERSIONS)), "type": mtype}
    for f in dataclasses.fields(ALL_TYPES[mtype]):
        header[f.name] = draw(_plausible(str(f.type)))
    names = [k for k in header if k not in ("type", "schema_version")] or ["schema_version"]
    kinds = draw(st.lists(st.sampled_from(["set", "set", "set", "del", "add", "version", "type", "frames"]), max_size=2))
    for kind in kinds:
        if kind == "set":
            header[draw(st.sampled_from(names))] = draw(any_value)
        elif kind == "del":
            header.pop(draw(st.sampled_from(names)), None)
        elif kind == "add":
            header[draw(st.text(max_size=6))] = draw(any_value)
        elif kind == "version":
            header["schema_version"] = draw(st.one_of(st.sampled_from([2.0, 1.0, True, False, 3, 0, -1, "2", None]), wire_values))
        elif kind == "type":
            header["type"] = draw(st.one_of(st.sampled_from(sorted(ALL_TYPES)), wire_values))
    extra = draw(st.lists(st.binary(max_size=8), min_size=1, max_size=2)) if "frames" in kinds else []
    return [msgpack.packb(header, use_bin_type=True), *extra]


def _plausible(type_name: str) -> st.SearchStrategy:
    """Values of the declared field type that a correct peer could send."""
    return {
        "int": st.integers(0, 10), "float": st.floats(0, 1e6), "str": st.text(max_size=4), "bool": st.booleans(),
        "list[int]": st.lists(st.integers(0, 20), max_size=3), "dict[str, Any]": st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
        "list[TrajectoryGroup]": st.builds(list), "list[list[int]]": st.lists(st.lists(st.integers(0, 2), max_size=2), max_size=2),
    }.get(type_name, wire_values)


garbage = st.lists(st.binary(max_size=48), min_size=1, max_size=7)


# ------------------------------------------------------------------------------- the property
def check_decode(frames: list[bytes]) -> None:
    """decode(frames) is a valid message, or a WireError by a known reason that no check missed."""
    try:
        msg = decode(frames, LIMITS)
    except WireError as e:
        assert e.code in REJECT_REASONS, e
        assert not getattr(e, "gap", False), f"no named check caught it: {e}"
        return
    header = msgpack.unpackb(frames[0], raw=False)
    sv = header["schema_version"]
    assert type(sv) is int and sv in SUPPORTED_SCHEMA_VERSIONS, f"accepted schema_version {sv!r}"
    if isinstance(msg, TrajectoryGroup):
        _check_group(msg)
        again = decode([bytes(f) for f in encode(msg)], LIMITS)
        assert isinstance(again, TrajectoryGroup) and again.dedup_key == msg.dedup_key
    elif isinstance(msg, Batch):
        for g in msg.groups:
            _check_group(g)
        assert all(isinstance(s, list) and all(type(i) is int and 0 <= i < len(msg.groups) for i in s) for s in msg.shards), msg.shards
    else:
        _check_control(msg)


def _check_group(g: TrajectoryGroup) -> None:
    for name in ("group_id", "prompt_id", "producer_id"):
        assert isinstance(getattr(g, name), str), name
    for name in ("epoch", "seq"):
        value = getattr(g, name)
        assert type(value) is int and value >= 0, f"accepted {name} {value!r}"
    assert isinstance(g.metadata, dict) and 1 <= len(g.trajectories) <= LIMITS.max_group_size
    for t in g.trajectories:
        n = len(t.response_tokens)
        assert n >= 1, "accepted an empty response"
        assert all(len(getattr(t, a)) == n for a in ("logprobs", "versions", "loss_mask"))
        assert type(t.reward) is float and math.isfinite(t.reward), f"accepted reward {t.reward!r}"
        assert np.isfinite(t.logprobs).all() and (t.logprobs <= 0).all(), "accepted a bad log-prob"
        for arr in (t.prompt_tokens, t.response_tokens):
            assert len(arr) == 0 or (arr.min() >= 0 and arr.max() < VOCAB), "accepted an out-of-range token id"
        assert (t.versions >= 0).all() and (t.versions <= MAX_VERSION).all(), "accepted a bad version"
        assert set(np.unique(t.loss_mask).tolist()) <= {0, 1}
        assert isinstance(t.trajectory_id, str) and isinstance(t.finish_reason, str) and isinstance(t.metadata, dict)
        assert isinstance(t.timings, dict) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in t.timings.values()), t.timings


def _check_control(msg: Any) -> None:
    assert type(msg).TYPE in CONTROL_TYPES
    for f in dataclasses.fields(msg):
        value, want = getattr(msg, f.name), str(f.type)
        if want == "int":
            assert type(value) is int, (f.name, value)
        elif want == "float":
            assert isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value), (f.name, value)
        elif want in ("str", "bool"):
            assert type(value).__name__ == want, (f.name, value)
        elif want == "list[int]":
            assert isinstance(value, list) and all(type(v) is int for v in value), (f.name, value)
        else:
            assert want.startswith("dict[") and isinstance(value, dict), (f.name, want, value)
    assert decode([bytes(f) for f in encode(msg)]) == msg


# ------------------------------------------------------------------------------- the tests (thin: see the module doc)
@FUZZ
@given(frames=mutated_groups())
def test_codec_mutated_groups(frames: list[bytes]) -> None:
    check_decode(frames)


@FUZZ
@given(frames=control_headers())
def test_codec_control_headers(frames: list[bytes]) -> None:
    check_decode(frames)


@FUZZ
@given(frames=garbage)
def test_codec_garbage(frames: list[bytes]) -> None:
    check_decode(frames)
