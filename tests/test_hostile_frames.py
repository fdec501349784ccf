"""Hostile frames against a live broker process (tests/hostile_corpus.py), and the NaN-reward
acceptance test of issue 19.

Each corpus case is sent by a registered producer over a real ZeroMQ socket to a real
``slipstream broker`` process. The broker must answer each with exactly one ``Error`` whose code is
the case's reason (and, for a group, its seq/epoch), count each in
``slipstream_broker_rejected_messages_total{reason}`` read from its real /metrics over HTTP (no
``internal`` count), return the credit of every rejected group, and keep acking a valid producer's
groups throughout. The NaN-reward test then shows the run goes on: a trainer peer is batched only
the valid groups, over two steps.

    pytest tests/test_hostile_frames.py
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from schemas.codec import decode
from schemas.messages import (
    Ack,
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Credit,
    CreditRequest,
    Error,
    Hello,
    Published,
    TrajectoryGroup,
    Welcome,
)
from schemas.validate import REJECT_REASONS, Limits, WireError
from tests.helpers import broker_config, process, scrape, slipstream, wait_json
from tests.hostile_corpus import PRODUCER_ID, VOCAB, corpus, group_key
from tests.test_broker import Peer
from tests.test_schemas import make_group

MAX_MESSAGE_BYTES = 65536
REJECTED = "slipstream_broker_rejected_messages_total"
BROKER_LEVEL = {"not_allowed"}  # reasons the broker decides after a successful decode


@pytest.fixture
def live_broker(tmp_path: Path) -> Iterator[dict]:
    cfg = broker_config(tmp_path, f"""
max_staleness = 4
groups_per_step = 500
max_queued_trajectories = 100000
max_queued_bytes = 1073741824
max_message_bytes = {MAX_MESSAGE_BYTES}
journal_fsync = "never"
""")
    run_dir = tmp_path / "run"
    with process(slipstream("broker", "--config", str(cfg), "--run-dir", str(run_dir)), tmp_path / "broker.log") as proc:
        ports = wait_json(run_dir / "ports" / "broker.json", proc=proc)
        yield {
            "producer": f"tcp://127.0.0.1:{ports['producer_port']}",
            "trainer": f"tcp://127.0.0.1:{ports['trainer_port']}",
            "metrics": f"http://127.0.0.1:{ports['metrics_port']}/metrics",
            "proc": proc,
        }


def _rejections(url: str) -> dict[str, float]:
    m = scrape(url)
    return {r: m[f'{REJECTED}{{reason="{r}"}}'] for r in REJECT_REASONS}


def test_corpus_reasons_match_the_codec() -> None:
    """The codec alone gives each case its reason (cases the broker refuses after decoding excepted)."""
    limits = Limits(max_message_bytes=MAX_MESSAGE_BYTES, vocab_size=VOCAB, max_version=0)
    cases = corpus(MAX_MESSAGE_BYTES)
    assert len({c.name for c in cases}) == len(cases)
    for case in cases:
        if case.reason in BROKER_LEVEL or case.name == "producer_id not the hello's":
            decode(case.frames, limits)
            continue
        with pytest.raises(WireError) as e:
            decode(case.frames, limits)
        assert (e.value.code, e.value.gap) == (case.reason, False), (case.name, str(e.value))


def test_live_broker_rejects_every_hostile_frame_by_reason(live_broker: dict) -> None:
    cases = corpus(MAX_MESSAGE_BYTES)
    good, evil, stranger = (Peer(live_broker["producer"]) for _ in range(3))
    good.send(Hello(role="producer", peer_id="producer-0", epoch=1))
    good.recv(Welcome)
    evil.send(Hello(role="producer", peer_id=PRODUCER_ID, epoch=7))
    evil.recv(Welcome)
    evil.send(CreditRequest(want=len(cases)))
    assert evil.recv(Credit).granted == len(cases)
    before = _rejections(live_broker["metrics"])
    good_seqs = itertools.count()

    for i, case in enumerate(cases):
        evil.send_raw(case.frames)
        err = evil.recv(Error)
        assert err.code == case.reason and err.message, (case.name, err)
        key = group_key(case.frames)
        if key is not None:  # the producer can match the rejection to its outbox entry
            assert (err.seq, err.epoch) == key, (case.name, err)
        if i % 8 == 0:  # the valid producer is served all along
            seq = next(good_seqs)
            good.send(make_group(seq=seq))
            assert good.recv(Ack).seq == seq

    # A peer that never said hello: refused as such, or by the decode reason if the message is bad.
    stranger.send(make_group(seq=1))
    assert stranger.recv(Error).code == "not_registered"
    stranger.send_raw(cases[0].frames)
    assert stranger.recv(Error).code == cases[0].reason

    # Credits: each rejected group's start is returned. CreditRequest(want=0) refreshes the gauges;
    # the Error for the commit after it says the broker has handled both.
    evil.send(CreditRequest(want=0))
    evil.send(Commit(lease_id="sync", step=1, policy_version=1))
    assert evil.recv(Error).code == "not_allowed"
    m = scrape(live_broker["metrics"])
    returned = sum(group_key(c.frames) is not None for c in cases)
    assert returned > 60, returned
    assert m["slipstream_queue_credits_in_flight"] == len(cases) - returned

    delta = {r: v - before[r] for r, v in _rejections(live_broker["metrics"]).items()}
    want = collections.Counter(c.reason for c in cases)
    want.update(["not_registered", cases[0].reason, "not_allowed"])
    assert delta == {r: float(want.get(r, 0)) for r in REJECT_REASONS}, delta
    assert delta["internal"] == 0
    assert set(want) >= {"malformed", "frame_count", "schema_version", "unknown_type", "bad_field", "bad_dtype", "length_mismatch",
                         "empty_response", "nonfinite_reward", "nonfinite_logprob", "positive_logprob", "token_out_of_range",
                         "future_version", "oversize", "not_allowed", "not_registered"}

    seq = next(good_seqs)
    good.send(make_group(seq=seq))
    assert good.recv(Ack).seq == seq
    assert live_broker["proc"].poll() is None, "the broker died"
    assert m["slipstream_broker_trajectories_accepted_total"] == seq * 3  # the good groups before the last, no hostile one


def test_nan_and_inf_rewards_are_rejected_and_counted_and_the_run_trains_on(live_broker: dict) -> None:
    """Issue 19 acceptance: NaN/inf rewards never reach a batch; the trainer keeps getting the valid groups."""
    p = Peer(live_broker["producer"])
    p.send(Hello(role="producer", peer_id="producer-0", epoch=7))
    p.recv(Welcome)
    p.send(CreditRequest(want=7))
    assert p.recv(Credit).granted == 7
    bad = {1: float("nan"), 2: float("inf"), 4: float("-inf")}
    for seq in range(7):
        g = make_group(seq=seq)
        if seq in bad:
            g.trajectories[seq % 3].reward = bad[seq]
        p.send(g)
        if seq in bad:
            err = p.recv(Error)
            assert (err.code, err.seq, err.epoch) == ("nonfinite_reward", seq, 7), err
            assert "is not finite" in err.message
        else:
            assert p.recv(Ack).seq == seq

    t = Peer(live_broker["trainer"])
    t.send(Hello(role="trainer", peer_id="trainer-0", policy_version=0))
    t.recv(Welcome)
    trained: list[TrajectoryGroup] = []
    for step in (1, 2):
        t.send(BatchRequest(step=step, policy_version=step - 1, num_groups=2))
        batch = t.recv(Batch)
        trained.extend(batch.groups)
        t.send(Commit(lease_id=batch.lease_id, step=step, policy_version=step))
        assert t.recv(CommitAck).policy_version == step
        t.send(Published(policy_version=step))
    assert [g.seq for g in trained] == [0, 3, 5, 6]
    assert all(np.isfinite([tr.reward for g in trained for tr in g.trajectories]))
    m = scrape(live_broker["metrics"])
    assert m[f'{REJECTED}{{reason="nonfinite_reward"}}'] == 3
    assert m["slipstream_broker_trajectories_accepted_total"] == 4 * 3
    assert m["slipstream_broker_trajectories_consumed_total"] == 4 * 3
    assert m[f'{REJECTED}{{reason="internal"}}'] == 0
