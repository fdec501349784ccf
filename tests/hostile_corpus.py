"""A corpus of hostile producer frames, each with the reason code the broker must reject it with.

Built from one valid group (``tests.test_schemas.make_group``: 3 trajectories, vocab 16, versions
0) by one defect each: truncated and trailing-garbage msgpack, a wrong type at every header field
and every trajectory field, wrong frame counts, oversize messages and groups, NaN/inf/positive
log-probs, NaN/inf rewards, empty responses, out-of-range token ids and versions, unknown schema
versions and message types, and well-formed messages a producer may not send. The corpus is data:
tests/test_hostile_frames.py replays it against the codec and against a live broker process.

    for case in corpus(max_message_bytes=65536): case.name, case.frames, case.reason
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from schemas.codec import encode
from schemas.messages import SCHEMA_VERSION, BatchRequest, Commit, Hello, Published, Welcome
from tests.test_schemas import make_group

PRODUCER_ID = "producer-evil"
VOCAB = 16


@dataclass(frozen=True)
class Case:
    name: str
    frames: list[bytes]
    reason: str  # the Error code (and rejection counter label) the broker must answer with


def _group_frames(seq: int, edit: Callable[[Any], None] | None = None, **kw: Any) -> list[bytes]:
    g = make_group(seq=seq, **kw)
    g.producer_id = PRODUCER_ID
    if edit is not None:
        edit(g)
    return [bytes(f) for f in encode(g)]


def _header_edit(seq: int, edit: Callable[[dict[str, Any]], None]) -> list[bytes]:
    frames = _group_frames(seq)
    header = msgpack.unpackb(frames[0], raw=False)
    edit(header)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _set_traj(i: int, **arrays: Any) -> Callable[[Any], None]:
    def edit(g: Any) -> None:
        for k, v in arrays.items():
            setattr(g.trajectories[i], k, v)
    return edit


def _empty_response(g: Any) -> None:
    t = g.trajectories[1]
    t.response_tokens, t.logprobs, t.versions, t.loss_mask = (a[:0] for a in (t.response_tokens, t.logprobs, t.versions, t.loss_mask))


def _control(mtype: str, **fields: Any) -> list[bytes]:
    return [msgpack.packb({"schema_version": SCHEMA_VERSION, "type": mtype, **fields}, use_bin_type=True)]


# A value of the wrong type for each declared field type.
_WRONG = {"str": 7, "int": "7", "dict": [1], "list": {"a": 1}, "float": "x"}
_GROUP_FIELDS = {"group_id": "str", "prompt_id": "str", "producer_id": "str", "epoch": "int", "seq": "int", "metadata": "dict",
                 "trajectories": "list", "frames": "list"}
_TRAJ_FIELDS = {"trajectory_id": "str", "reward": "float", "finish_reason": "str", "timings": "dict", "metadata": "dict",
                "n_prompt": "int", "n_response": "int"}


def corpus(max_message_bytes: int) -> list[Case]:
    """Every case gets its own seq (from 100 up), so an Error reply can be matched to its case."""
    seqs = iter(range(100, 10_000))
    cases: list[Case] = []

    def add(name: str, reason: str, frames: list[bytes]) -> None:
        cases.append(Case(name, frames, reason))

    good = _group_frames(next(seqs))
    # --- not msgpack, or not a map
    for cut in (0, 1, 5, len(good[0]) // 2, len(good[0]) - 1):
        add(f"header truncated to {cut} bytes", "malformed", [good[0][:cut], *good[1:]])
    add("header with trailing garbage", "malformed", [good[0] + b"\x00\xc1", *good[1:]])
    add("header is a msgpack array", "malformed", [msgpack.packb([SCHEMA_VERSION, "group"]), *good[1:]])
    add("header is a msgpack int", "malformed", [msgpack.packb(7)])
    add("random bytes", "malformed", [bytes(range(200, 256)) * 3])
    add("empty frame", "malformed", [b""])
    # --- schema versions and types
    for sv in (SCHEMA_VERSION + 1, 0, -1, 99, float(SCHEMA_VERSION), True, str(SCHEMA_VERSION), None):
        add(f"schema_version {sv!r}", "schema_version", _header_edit(next(seqs), lambda h, sv=sv: h.__setitem__("schema_version", sv)))
    add("schema_version missing", "schema_version", _header_edit(next(seqs), lambda h: h.pop("schema_version")))
    for t in ("pickle", "GROUP", "", 7, None):
        add(f"type {t!r}", "unknown_type", _header_edit(next(seqs), lambda h, t=t: h.__setitem__("type", t)))
    add("type missing", "unknown_type", _header_edit(next(seqs), lambda h: h.pop("type")))
    # --- a wrong type at every field, and every field missing
    for key, kind in _GROUP_FIELDS.items():
        add(f"group.{key} wrong type", "bad_field", _header_edit(next(seqs), lambda h, k=key, v=_WRONG[kind]: h.__setitem__(k, v)))
        add(f"group.{key} missing", "bad_field", _header_edit(next(seqs), lambda h, k=key: h.pop(k)))
    add("group unknown-type field value: epoch bool", "bad_field", _header_edit(next(seqs), lambda h: h.__setitem__("epoch", True)))
    add("group.seq negative", "bad_field", _header_edit(next(seqs), lambda h: h.__setitem__("seq", -5)))
    for key, kind in _TRAJ_FIELDS.items():
        add(f"trajectories[1].{key} wrong type", "bad_field", _header_edit(next(seqs), lambda h, k=key, v=_WRONG[kind]: h["trajectories"][1].__setitem__(k, v)))
        add(f"trajectories[2].{key} missing", "bad_field", _header_edit(next(seqs), lambda h, k=key: h["trajectories"][2].pop(k)))
    add("trajectories[0].reward bool", "bad_field", _header_edit(next(seqs), lambda h: h["trajectories"][0].__setitem__("reward", True)))
    add("trajectories[0].timings value a string", "bad_field", _header_edit(next(seqs), lambda h: h["trajectories"][0].__setitem__("timings", {"generate_s": "1"})))
    for value in ([1, 2], 7, None, "t", 1.5):  # the issue-19 TypeError: an entry that is not a map
        add(f"trajectories[1] is {type(value).__name__}", "bad_field", _header_edit(next(seqs), lambda h, v=value: h["trajectories"].__setitem__(1, v)))
    add("no trajectories", "bad_field", _header_edit(next(seqs), lambda h: h.__setitem__("trajectories", [])))
    add("frame descriptor not a triple", "bad_field", _header_edit(next(seqs), lambda h: h["frames"].__setitem__(0, "prompt_tokens")))
    add("frame descriptors out of order", "bad_field", _header_edit(next(seqs), lambda h: h["frames"].reverse()))
    # --- dtypes and lengths
    for i, dtype in enumerate(("<i8", ">i4", "<f8", "|O", "<U4")):
        add(f"frames[{i}] dtype {dtype}", "bad_dtype", _header_edit(next(seqs), lambda h, i=i, d=dtype: h["frames"][i].__setitem__(1, d)))
    add("frame nbytes disagrees", "length_mismatch", _header_edit(next(seqs), lambda h: h["frames"][2].__setitem__(2, 2**40)))
    add("n_response disagrees", "length_mismatch", _header_edit(next(seqs), lambda h: h["trajectories"][0].__setitem__("n_response", 99)))
    add("n_prompt negative", "length_mismatch", _header_edit(next(seqs), lambda h: h["trajectories"][0].__setitem__("n_prompt", -1)))
    frames = _group_frames(next(seqs))
    add("array frame truncated", "length_mismatch", [*frames[:3], frames[3][:-4], *frames[4:]])
    frames = _group_frames(next(seqs))
    add("array frame of a non-multiple size", "length_mismatch", [*frames[:2], frames[2] + b"\x00", *frames[3:]])
    # --- frame counts
    frames = _group_frames(next(seqs))
    add("group without its last array frame", "frame_count", frames[:-1])
    frames = _group_frames(next(seqs))
    add("group with an extra frame", "frame_count", [*frames, b"\x00\x00\x00\x00"])
    add("group header alone", "frame_count", _group_frames(next(seqs))[:1])
    add("heartbeat with an array frame", "frame_count", [*_control("heartbeat", peer_id=PRODUCER_ID, sent_at=1.0), b"\x01"])
    # --- sizes
    # 13 bytes per response token: just over the limit, and under ZeroMQ's MAXMSGSIZE (2x), which would drop the peer
    add("message over max_message_bytes", "oversize", _group_frames(next(seqs), resp=max_message_bytes // 38))
    add("more trajectories than max_group_size", "oversize", _header_edit(next(seqs), lambda h: h.__setitem__("trajectories", [{}] * 1025)))
    # --- values
    n = 4  # make_group's trajectory 0 has 4 response tokens
    add("NaN log-prob", "nonfinite_logprob", _group_frames(next(seqs), _set_traj(0, logprobs=np.array([-1, np.nan, -1, -1], np.float32))))
    add("-inf log-prob", "nonfinite_logprob", _group_frames(next(seqs), _set_traj(0, logprobs=np.array([-1, -1, -np.inf, -1], np.float32))))
    add("positive log-prob", "positive_logprob", _group_frames(next(seqs), _set_traj(0, logprobs=np.array([-1, 0.25, -1, -1], np.float32))))
    for r in (float("nan"), float("inf"), float("-inf")):
        add(f"reward {r}", "nonfinite_reward", _group_frames(next(seqs), _set_traj(1, reward=r)))
    add("empty response", "empty_response", _group_frames(next(seqs), _empty_response))
    add("response token = vocab size", "token_out_of_range", _group_frames(next(seqs), _set_traj(0, response_tokens=np.full(n, VOCAB, np.int32))))
    add("negative prompt token", "token_out_of_range", _group_frames(next(seqs), _set_traj(2, prompt_tokens=np.array([1, -3, 2, 0, 1], np.int32))))
    add("huge token id", "token_out_of_range", _group_frames(next(seqs), _set_traj(0, response_tokens=np.array([1, 2**31 - 1, 2, 3], np.int32))))
    add("version from the future", "future_version", _group_frames(next(seqs), version=1))
    add("negative version", "bad_field", _group_frames(next(seqs), _set_traj(0, versions=np.array([0, -1, 0, 0], np.int32))))
    add("loss_mask of 2", "bad_field", _group_frames(next(seqs), _set_traj(0, loss_mask=np.array([1, 2, 1, 1], np.uint8))))
    add("producer_id not the hello's", "bad_field", _group_frames(next(seqs), lambda g: setattr(g, "producer_id", "someone-else")))
    # --- control messages with bad fields
    add("credit_request want a string", "bad_field", _control("credit_request", want="10"))
    add("credit_request want missing", "bad_field", _control("credit_request"))
    add("credit_request unknown field", "bad_field", _control("credit_request", want=1, evil=1))
    add("heartbeat sent_at NaN", "bad_field", _control("heartbeat", peer_id=PRODUCER_ID, sent_at=float("nan")))
    add("hello role an int", "bad_field", _control("hello", role=7, peer_id=PRODUCER_ID))
    add("checkpointed in schema 1", "schema_version", [msgpack.packb({"schema_version": 1, "type": "checkpointed", "step": 1, "policy_version": 1})])
    # --- well-formed, but not a producer's to send
    add("commit from a producer", "not_allowed", [bytes(f) for f in encode(Commit(lease_id="l", step=1, policy_version=1))])
    add("batch_request from a producer", "not_allowed", [bytes(f) for f in encode(BatchRequest(step=1, policy_version=0, num_groups=1))])
    add("published from a producer", "not_allowed", [bytes(f) for f in encode(Published(policy_version=9))])
    add("welcome from a producer", "not_allowed", [bytes(f) for f in encode(Welcome(0, 0, 1, 1, 1.0))])
    add("trainer hello on the producer socket", "not_allowed", [bytes(f) for f in encode(Hello(role="trainer", peer_id="trainer-x"))])
    return cases


def group_key(frames: list[bytes]) -> tuple[int, int] | None:
    """(seq, epoch) of a group-typed header with non-negative int seq and epoch, else None: the
    rejections after which the broker returns the sender's credit and echoes seq/epoch."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except Exception:
        return None
    if not isinstance(header, dict) or header.get("type") != "group":
        return None
    seq, epoch = header.get("seq", -1), header.get("epoch", -1)
    if type(seq) is int and type(epoch) is int and seq >= 0:
        return seq, epoch
    return None
