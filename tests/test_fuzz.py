"""Fuzzing a live broker process: random and mutated frames (flipped bytes, truncated frames,
extra/missing frames, wrong dtypes, huge and negative lengths, garbage) from a registered hostile
producer, while a valid producer keeps sending.

Each hostile message is classified by a local oracle (the same codec and limits). The broker must
stay up, answer every bad message with exactly one ``Error``, count each in
``slipstream_broker_rejected_messages_total`` (the sum rises by exactly the number of bad messages),
ack the mutations that are still valid groups, and keep acking the valid producer's groups.

Liveness is not under test: a rejected message does not count as hearing from its peer, so on a
loaded machine a run of rejected frames longer than ``peer_timeout_s`` got the hostile producer
declared dead and its next valid group refused (``not_registered``); the fixture's timeout is an hour.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import decode, encode
from schemas.messages import Ack, Error, Hello, TrajectoryGroup, Welcome
from schemas.validate import Limits, WireError
from tests.helpers import broker_config, process, scrape, slipstream, wait_json
from tests.test_broker import Peer
from tests.test_schemas import make_group

MAX_MESSAGE_BYTES = 65536
LIMITS = Limits(max_message_bytes=MAX_MESSAGE_BYTES, vocab_size=16, max_version=0)
PRODUCER_MESSAGES = ("hello", "heartbeat", "credit_request", "group")
_seqs = itertools.count(1000)


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[dict]:
    cfg = broker_config(tmp_path, f"""
groups_per_step = 2
max_queued_trajectories = 100000
max_queued_bytes = 1073741824
max_message_bytes = {MAX_MESSAGE_BYTES}
journal_fsync = "never"
peer_timeout_s = 3600
""")
    run_dir = tmp_path / "run"
    with process(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir)), tmp_path / "broker.log") as proc:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=proc)
        yield {"producer": f"tcp://127.0.0.1:{ports['producer_port']}", "metrics": f"http://127.0.0.1:{ports['metrics_port']}/metrics", "proc": proc}


def _header_tweaks() -> st.SearchStrategy:
    huge = st.sampled_from([2**31, 2**32 + 5, 2**63 - 1, -1, -(2**31)])
    return st.one_of(
        st.tuples(st.just("dtype"), st.integers(0, 4), st.sampled_from(["<f8", "<i8", ">i4", "|b1", "O", "<U4", ""])),
        st.tuples(st.just("nbytes"), st.integers(0, 4), huge),
        st.tuples(st.just("n_prompt"), st.integers(0, 2), huge),
        st.tuples(st.just("n_response"), st.integers(0, 2), huge),
        st.tuples(st.just("field"), st.sampled_from(["seq", "epoch", "group_id", "trajectories", "frames", "metadata"]),
                  st.one_of(st.none(), st.text(max_size=3), huge, st.lists(st.integers(), max_size=2))),
        st.tuples(st.just("type"), st.sampled_from(["batch", "commit", "ack", "nope", "hello", 7])),
    )


def _apply_tweak(header: dict, tweak: tuple) -> None:
    kind = tweak[0]
    if kind == "dtype":
        header["frames"][tweak[1]][1] = tweak[2]
    elif kind == "nbytes":
        header["frames"][tweak[1]][2] = tweak[2]
    elif kind in ("n_prompt", "n_response"):
        header["trajectories"][tweak[1]][kind] = tweak[2]
    elif kind == "field":
        header[tweak[1]] = tweak[2]
    elif kind == "type":
        header["type"] = tweak[1]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 5), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 5), st.integers(0, 64)),
    st.tuples(st.just("drop"), st.integers(0, 5)),
    st.tuples(st.just("extra"), st.binary(max_size=32)),
    st.tuples(st.just("header"), _header_tweaks()),
)


def _mutate(frames: list[bytes], ops: list[tuple]) -> list[bytes]:
    frames = list(frames)
    for op in ops:
        kind = op[0]
        if kind == "extra":
            frames.append(op[1])
            continue
        if not frames:
            continue
        i = op[1] % len(frames) if isinstance(op[1], int) else 0
        if kind == "flip" and frames[i]:
            b = bytearray(frames[i])
            b[op[2] % len(b)] ^= op[3]
            frames[i] = bytes(b)
        elif kind == "truncate":
            frames[i] = frames[i][: op[2] % (len(frames[i]) + 1)]
        elif kind == "drop" and len(frames) > 1:
            del frames[i]
        elif kind == "header":
            try:
                header = msgpack.unpackb(frames[0], raw=False)
                _apply_tweak(header, op[1])
                frames[0] = msgpack.packb(header, use_bin_type=True)
            except Exception:
                pass  # an earlier mutation broke the header: keep it broken
    return frames


def _oracle_rejects(frames: list[bytes]) -> bool:
    """Would the broker reject this message from a registered producer 'producer-evil'?"""
    try:
        msg = decode(frames, LIMITS)
    except WireError:
        return True
    if isinstance(msg, TrajectoryGroup):
        return msg.producer_id != "producer-evil"
    return getattr(type(msg), "TYPE", None) not in PRODUCER_MESSAGES


def _rejected_total(url: str) -> float:
    return sum(v for k, v in scrape(url).items() if k.startswith("slipstream_broker_rejected_messages_total{"))


def test_broker_survives_mutated_and_random_frames(live_broker: dict) -> None:
    good, evil = Peer(live_broker["producer"]), Peer(live_broker["producer"])
    good.send(Hello(role="producer", peer_id="producer-0", epoch=1))
    good.recv(Welcome)
    evil.send(Hello(role="producer", peer_id="producer-evil", epoch=1))
    evil.recv(Welcome)
    before = _rejected_total(live_broker["metrics"])
    counts = {"bad": 0, "errors": 0, "acked_mutants": 0, "good_acks": 0}
    good_seq = itertools.count()

    def base_frames() -> list[bytes]:
        g = make_group(seq=next(_seqs))
        g.producer_id = "producer-evil"
        return [bytes(f) for f in encode(g)]

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(ops=st.lists(mutation, min_size=1, max_size=3), garbage=st.one_of(st.none(), st.lists(st.binary(max_size=64), min_size=1, max_size=7)))
    def fuzz(ops: list[tuple], garbage: list[bytes] | None) -> None:
        frames = garbage if garbage is not None else _mutate(base_frames(), ops)
        bad = _oracle_rejects(frames)
        evil.send_raw(frames)
        reply = _reply(evil, expect_reply=bad or _is_group(frames))
        if bad:
            counts["bad"] += 1
            assert isinstance(reply, Error), f"no Error for a bad message: {frames[:1]!r} -> {reply}"
            counts["errors"] += 1
        elif _is_group(frames):
            assert isinstance(reply, Ack), reply
            counts["acked_mutants"] += 1
        # The valid producer is served all along.
        seq = next(good_seq)
        good.send(make_group(seq=seq))
        ack = good.recv(Ack)
        assert (ack.seq, ack.duplicate) == (seq, False)
        counts["good_acks"] += 1

    fuzz()
    assert live_broker["proc"].poll() is None, "the broker died"
    assert counts["bad"] > 300 and counts["good_acks"] >= 500, counts
    assert _rejected_total(live_broker["metrics"]) - before == counts["bad"], counts


def _is_group(frames: list[bytes]) -> bool:
    try:
        return isinstance(decode(frames, LIMITS), TrajectoryGroup)
    except WireError:
        return False


def _reply(peer: Peer, expect_reply: bool):
    """The broker's answer to one message: an Error/Ack, or None if none was due (checked briefly)."""
    try:
        return peer.recv(None, timeout_s=5.0 if expect_reply else 0.2)
    except TimeoutError:
        if expect_reply:
            raise
        return None
