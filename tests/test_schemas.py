"""Wire codec: round trips are exact and zero-copy; every defect is refused with its own reason."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from schemas.codec import FRAMES_PER_GROUP, decode, encode
from schemas.messages import (
    SCHEMA_VERSION,
    Batch,
    Commit,
    Credit,
    Hello,
    Trajectory,
    TrajectoryGroup,
)
from schemas.validate import REJECT_REASONS, Limits, WireError, validate_group


def make_group(n: int = 3, resp: int = 4, seq: int = 0, version: int = 0) -> TrajectoryGroup:
    rng = np.random.default_rng(seq)
    trajs = [
        Trajectory(
            trajectory_id=f"t{i}",
            prompt_tokens=rng.integers(0, 16, size=3 + i).astype(np.int32),
            response_tokens=rng.integers(0, 16, size=resp + i).astype(np.int32),
            logprobs=-rng.random(resp + i).astype(np.float32),
            versions=np.full(resp + i, version, dtype=np.int32),
            loss_mask=np.ones(resp + i, dtype=np.uint8),
            reward=float(i) / n,
            finish_reason="stop",
            timings={"generate_s": 0.5},
            metadata={"k": i},
        )
        for i in range(n)
    ]
    return TrajectoryGroup(f"g{seq}", f"p{seq}", "producer-0", 7, seq, trajs, {"label": "9"})


def assert_groups_equal(a: TrajectoryGroup, b: TrajectoryGroup) -> None:
    assert (a.group_id, a.prompt_id, a.producer_id, a.epoch, a.seq, a.metadata) == (b.group_id, b.prompt_id, b.producer_id, b.epoch, b.seq, b.metadata)
    assert len(a.trajectories) == len(b.trajectories)
    for x, y in zip(a.trajectories, b.trajectories, strict=True):
        for name in ("prompt_tokens", "response_tokens", "logprobs", "versions", "loss_mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert (x.trajectory_id, x.reward, x.finish_reason, x.timings, x.metadata) == (y.trajectory_id, y.reward, y.finish_reason, y.timings, y.metadata)


def test_group_round_trip_is_exact_and_uses_five_array_frames() -> None:
    g = make_group()
    frames = encode(g)
    assert len(frames) == 1 + FRAMES_PER_GROUP
    out = decode([bytes(f) for f in frames])
    assert_groups_equal(g, out)


def test_decode_is_zero_copy() -> None:
    frames = [bytes(f) for f in encode(make_group())]
    out = decode(frames)
    # The decoded arrays are views into the received frame, not copies.
    assert out.trajectories[0].response_tokens.base is not None
    assert not out.trajectories[0].response_tokens.flags.owndata


def test_batch_and_control_round_trip() -> None:
    groups = [make_group(seq=i) for i in range(3)]
    b = Batch(step=4, lease_id="lease-9", groups=groups, shards=[[0, 2], [1]], dropped=5, queue_depth=2)
    out = decode([bytes(f) for f in encode(b)])
    assert (out.step, out.lease_id, out.shards, out.dropped, out.queue_depth) == (4, "lease-9", [[0, 2], [1]], 5, 2)
    for x, y in zip(groups, out.groups, strict=True):
        assert_groups_equal(x, y)
    for msg in (Credit(granted=3, policy_version=2), Commit("l", 1, 2), Hello("producer", "p", 1, 2, 0)):
        assert decode(encode(msg)) == msg


def _mutated(mutate) -> list[bytes]:
    frames = [bytes(f) for f in encode(make_group())]
    header = msgpack.unpackb(frames[0])
    mutate(header, frames)
    frames[0] = msgpack.packb(header)
    return frames


def _set_array(frames: list[bytes], index: int, arr: np.ndarray) -> None:
    frames[1 + index] = arr.tobytes()


@pytest.mark.parametrize(
    ("code", "frames_fn"),
    [
        ("malformed", lambda: [b"\xc1\xff\x00garbage"]),
        ("malformed", lambda: [msgpack.packb([1, 2, 3])]),
        ("schema_version", lambda: _mutated(lambda h, f: h.update(schema_version=SCHEMA_VERSION + 1))),
        ("unknown_type", lambda: _mutated(lambda h, f: h.update(type="pickle"))),
        ("frame_count", lambda: _mutated(lambda h, f: f.pop())),
        ("bad_dtype", lambda: _mutated(lambda h, f: h["frames"][2].__setitem__(1, "<f8"))),
        ("length_mismatch", lambda: _mutated(lambda h, f: h["trajectories"][0].update(n_response=99))),
        ("bad_field", lambda: _mutated(lambda h, f: h.pop("seq"))),
        ("bad_field", lambda: _mutated(lambda h, f: h.update(seq="seven"))),
        # A trajectories entry that is not a map (this raised TypeError before).
        ("bad_field", lambda: _mutated(lambda h, f: h["trajectories"].__setitem__(1, [1, 2, 3]))),
        ("bad_field", lambda: _mutated(lambda h, f: h["trajectories"].__setitem__(0, 7))),
        ("bad_field", lambda: _mutated(lambda h, f: h["trajectories"].__setitem__(2, None))),
        ("bad_field", lambda: _mutated(lambda h, f: h.update(seq=-1))),
        ("bad_field", lambda: _mutated(lambda h, f: h.update(epoch=True))),
        ("bad_field", lambda: _mutated(lambda h, f: h["trajectories"][0].update(timings={"generate_s": "slow"}))),
        ("bad_field", lambda: _mutated(lambda h, f: h["trajectories"][0].update(reward="1.0"))),
        ("nonfinite_reward", lambda: _mutated(lambda h, f: h["trajectories"][1].update(reward=float("nan")))),
        ("nonfinite_reward", lambda: _mutated(lambda h, f: h["trajectories"][0].update(reward=float("inf")))),
        ("nonfinite_reward", lambda: _mutated(lambda h, f: h["trajectories"][2].update(reward=float("-inf")))),
        # schema_version must be an int: 2.0 == 2 and True == 1 in Python, both refused.
        ("schema_version", lambda: _mutated(lambda h, f: h.update(schema_version=float(SCHEMA_VERSION)))),
        ("schema_version", lambda: _mutated(lambda h, f: h.update(schema_version=True))),
        ("schema_version", lambda: _mutated(lambda h, f: h.update(schema_version=str(SCHEMA_VERSION)))),
        ("schema_version", lambda: _mutated(lambda h, f: h.pop("schema_version"))),
    ],
)
def test_structural_defects_are_refused_with_their_reason(code: str, frames_fn) -> None:
    with pytest.raises(WireError) as e:
        decode(frames_fn())
    assert e.value.code == code


def _group_with(**arrays: np.ndarray) -> list[bytes]:
    g = make_group(n=1, resp=4)
    for k, v in arrays.items():
        setattr(g.trajectories[0], k, v)
    return [bytes(f) for f in encode(g)]


def test_empty_response_is_refused() -> None:
    """Decision (DESIGN §4, README "Wire protocol", schemas.validate): every trajectory has at least
    one response token. An empty one is refused by reason, wherever it sits in the group."""
    g = make_group(n=3, resp=2)
    t = g.trajectories[1]
    t.response_tokens, t.logprobs = t.response_tokens[:0], t.logprobs[:0]
    t.versions, t.loss_mask = t.versions[:0], t.loss_mask[:0]
    with pytest.raises(WireError, match=r"trajectories\[1\]: the response is empty") as e:
        decode([bytes(f) for f in encode(g)])
    assert e.value.code == "empty_response"
    with pytest.raises(WireError) as e:
        validate_group(g, Limits())
    assert e.value.code == "empty_response"


def test_validate_group_refuses_nonfinite_rewards_built_in_process() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        g = make_group()
        g.trajectories[2].reward = bad
        with pytest.raises(WireError, match=r"trajectory\[2\]") as e:
            validate_group(g, Limits())
        assert e.value.code == "nonfinite_reward"
    validate_group(make_group(), Limits())


def test_every_reason_is_documented_and_unknown_codes_are_refused() -> None:
    assert all(isinstance(v, str) and v for v in REJECT_REASONS.values())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for code, meaning in REJECT_REASONS.items():
        assert f"| `{code}` | {meaning} |" in readme, code
    assert "unexpected" not in REJECT_REASONS  # every rejection names what was wrong
    with pytest.raises(ValueError, match="not one of REJECT_REASONS"):
        WireError("whatever", "x")


def test_nan_logprob_refused() -> None:
    with pytest.raises(WireError, match=r"logprobs\[2\] = nan") as e:
        decode(_group_with(logprobs=np.array([-1, -1, np.nan, -1], dtype=np.float32)))
    assert e.value.code == "nonfinite_logprob"


def test_positive_logprob_refused() -> None:
    with pytest.raises(WireError) as e:
        decode(_group_with(logprobs=np.array([-1, 0.5, -1, -1], dtype=np.float32)))
    assert e.value.code == "positive_logprob"


def test_token_ids_checked_against_vocab() -> None:
    frames = _group_with(response_tokens=np.array([1, 2, 16, 3], dtype=np.int32))
    decode(frames, Limits(vocab_size=17))
    with pytest.raises(WireError) as e:
        decode(frames, Limits(vocab_size=16))
    assert e.value.code == "token_out_of_range"


def test_versions_from_the_future_refused() -> None:
    frames = _group_with(versions=np.array([3, 3, 4, 4], dtype=np.int32))
    decode(frames, Limits(max_version=4))
    with pytest.raises(WireError) as e:
        decode(frames, Limits(max_version=3))
    assert e.value.code == "future_version"


def test_oversize_message_refused_before_parsing() -> None:
    frames = [bytes(f) for f in encode(make_group(n=4, resp=2000))]
    with pytest.raises(WireError, match="max_message_bytes") as e:
        decode(frames, Limits(max_message_bytes=4096))
    assert e.value.code == "oversize"


def test_control_message_with_unknown_field_or_wrong_type_refused() -> None:
    with pytest.raises(WireError) as e:
        decode([msgpack.packb({"schema_version": SCHEMA_VERSION, "type": "credit", "granted": 1, "policy_version": 0, "evil": 1})])
    assert e.value.code == "bad_field"
    with pytest.raises(WireError) as e:
        decode([msgpack.packb({"schema_version": SCHEMA_VERSION, "type": "credit", "granted": "1", "policy_version": 0})])
    assert e.value.code == "bad_field"


def test_encode_refuses_unknown_types() -> None:
    with pytest.raises(TypeError, match="refusing"):
        encode({"type": "group"})


def test_schema_v2_replay_fields_round_trip_and_v1_stays_readable() -> None:
    """Version 2 added trainer replay: Hello.resume_step/checkpoint_every, Batch.replay and the
    'checkpointed' message. Version-1 messages (e.g. a journal written before the upgrade) still
    decode, with the defaults; a version-1 message may not carry the version-2 additions."""
    from schemas.messages import SUPPORTED_SCHEMA_VERSIONS, Checkpointed

    assert SCHEMA_VERSION == 2 and SUPPORTED_SCHEMA_VERSIONS == (1, 2)
    hello = Hello("trainer", "trainer-0", 1, 2, 3, resume_step=4, checkpoint_every=2)
    assert decode(encode(hello)) == hello
    assert decode(encode(Checkpointed(step=4, policy_version=4))) == Checkpointed(4, 4)
    b = Batch(step=4, lease_id="l-replay-1", groups=[make_group()], shards=[[0]], replay=True)
    assert decode([bytes(f) for f in encode(b)]).replay is True

    def as_v1(frames: list, **drop: bool) -> list:
        header = msgpack.unpackb(bytes(frames[0]))
        header["schema_version"] = 1
        for key in drop:
            header.pop(key, None)
        return [msgpack.packb(header), *map(bytes, frames[1:])]

    old_hello = decode(as_v1(encode(Hello("trainer", "t")), resume_step=True, checkpoint_every=True))
    assert (old_hello.resume_step, old_hello.checkpoint_every) == (-1, 0)
    assert decode(as_v1(encode(b), replay=True)).replay is False
    assert decode(as_v1(encode(make_group()))).seq == 0  # journaled v1 groups stay readable
    for frames, code in (
        (as_v1(encode(hello)), "bad_field"),  # v2 fields in a v1 hello
        (as_v1(encode(b)), "bad_field"),  # Batch.replay in a v1 batch
        (as_v1(encode(Checkpointed(step=1, policy_version=1))), "schema_version"),  # a v2 type
        ([msgpack.packb({"schema_version": True, "type": "heartbeat"})], "schema_version"),
    ):
        with pytest.raises(WireError) as e:
            decode(frames)
        assert e.value.code == code
    with pytest.raises(WireError) as e:
        decode([msgpack.packb({"schema_version": 2, "type": "checkpointed", "step": "4", "policy_version": 4})])
    assert e.value.code == "bad_field"
