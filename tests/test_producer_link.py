"""The producer's broker session (:class:`pipeline.transport.ProducerLink`) against a real broker in
this event loop (tests/test_producer_helpers.py), real ZeroMQ sockets, no producer around it:

- hello -> welcome (version and η from the broker), credit requests -> credits, a group spends one
  and is acked (the listener hears it, the outbox empties), a send without a credit is refused;
- a group the broker refuses (producer_id not the hello's) leaves the outbox, is counted by reason
  and reported to the listener;
- a message before any hello (the old ``_last_hello`` bug: never set in ``__init__``) makes the
  broker answer ``not_registered`` and the link registers;
- a broker restart on the same port: the group sent during the outage reaches the new broker, which
  refuses it and every heartbeat as ``not_registered``; the link says hello exactly once for the
  outage (event order: refusals of messages sent before the hello all come before its welcome),
  resends the outbox, and the group is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from pipeline.transport import ProducerLink
from schemas.messages import Heartbeat, Requeue, Trajectory, TrajectoryGroup, Welcome
from schemas.validate import Limits
from tests.test_engine_helpers import free_port
from tests.test_producer_helpers import WAIT_S, BrokerHarness

EPOCH = 7


def group(seq: int, producer: str = "p-0") -> TrajectoryGroup:
    trajs = [Trajectory(f"{producer}-{seq}-{i}", np.array([1, 2], np.int32), np.array([3, 4, 5], np.int32), np.full(3, -0.5, np.float32),
                        np.zeros(3, np.int32), np.ones(3, np.uint8), float(i)) for i in range(2)]
    return TrajectoryGroup(f"{producer}-g{seq}", f"prompt{seq}", producer, EPOCH, seq, trajs)


class Recorder:
    """A LinkListener that writes down what it hears."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def credits_in_use(self) -> int:
        return 0

    def on_welcome(self, welcome: Welcome) -> None:
        self.events.append(("welcome", welcome.policy_version))

    def on_version(self, version: int) -> None:
        self.events.append(("version", version))

    def on_requeue(self, msg: Requeue) -> None:
        self.events.append(("requeue", msg.prompt_id))

    def on_acked(self, group: TrajectoryGroup, duplicate: bool) -> None:
        self.events.append(("acked", group.group_id))

    def on_rejected(self, group: TrajectoryGroup, code: str, message: str) -> None:
        self.events.append(("rejected", (group.group_id, code)))

    def on_shutdown(self, reason: str) -> None:
        self.events.append(("shutdown", reason))

    def wake(self) -> None:
        pass

    def of(self, kind: str) -> list[Any]:
        return [v for k, v in self.events if k == kind]


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT_S / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def run_link(harness: BrokerHarness, body: Callable[[ProducerLink, Recorder], Awaitable[None]], **kw: Any) -> tuple[ProducerLink, Recorder]:
    link = ProducerLink(harness.endpoint, "p-0", EPOCH, Limits(), heartbeat_interval_s=kw.pop("heartbeat_interval_s", 0.2),
                        peer_timeout_s=5.0, ack_timeout_s=30.0, **kw)
    rec = Recorder()
    link.attach(rec)

    async def go() -> None:
        serve = asyncio.create_task(link.serve())
        try:
            await body(link, rec)
        finally:
            serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serve
            link.close()

    asyncio.run(go())
    return link, rec


def test_hello_credits_send_ack_and_refusal() -> None:
    harness = BrokerHarness(2, max_staleness=3, groups_per_step=4, version=2, drain=False)

    async def body(link: ProducerLink, rec: Recorder) -> None:
        async with harness:
            await link.connect(WAIT_S)
            assert (link.policy_version, link.max_staleness) == (2, 3) and rec.of("welcome") == [2]
            await link.request_credits(3)
            await until(lambda: link.credits == 3, "3 credits")
            await link.send_group(group(0))
            await until(lambda: bool(rec.of("acked")), "the ack")
            assert rec.of("acked") == ["p-0-g0"] and not link.outbox and link.credits == 2
            await link.send_group(group(1, producer="someone-else"))  # not the hello's producer_id
            await until(lambda: bool(rec.of("rejected")), "the refusal")
            assert rec.of("rejected") == [("someone-else-g1", "bad_field")] and not link.outbox
            await link.send_group(group(2))  # the last credit
            with pytest.raises(RuntimeError, match="without a credit"):
                await link.send_group(group(3))
            await until(lambda: len(rec.of("acked")) == 2, "the second ack")

    link, _ = run_link(harness, body)
    s = link.stats
    assert (s.credits_granted, s.groups_sent, s.groups_acked, s.trajectories_acked, s.groups_rejected) == (3, 3, 2, 4, {"bad_field": 1})
    assert link.metrics.registry.get_sample_value("slipstream_producer_groups_rejected_total", {"reason": "bad_field"}) == 1


def test_a_message_before_hello_gets_the_link_registered() -> None:
    harness = BrokerHarness(2, drain=False)

    async def body(link: ProducerLink, rec: Recorder) -> None:
        async with harness:
            await link.send(Heartbeat(peer_id="p-0", sent_at=0.0))  # no hello yet: the broker answers not_registered
            await until(link.welcomed.is_set, "the welcome")

    link, rec = run_link(harness, body)
    assert link.stats.reconnects == 1 and rec.of("welcome") == [0]


def test_broker_restart_one_hello_then_the_outbox_is_resent() -> None:
    port = free_port()
    first = BrokerHarness(2, drain=False, producer_port=port)

    async def body(link: ProducerLink, rec: Recorder) -> None:
        async with first:
            await link.connect(WAIT_S)
            await link.request_credits(1)
            await until(lambda: link.credits == 1, "a credit")
        # The broker is gone (journal off: the next one knows nothing). Sent now, delivered on reconnect.
        await link.send_group(group(0))
        await asyncio.sleep(0.5)  # a few heartbeats queue up too
        async with BrokerHarness(2, drain=False, producer_port=port) as second:
            await until(lambda: bool(rec.of("acked")), "the ack from the restarted broker")
            assert second.accepted_groups == 1

    link, rec = run_link(first, body, heartbeat_interval_s=0.05)
    assert rec.of("welcome") == [0, 0] and rec.of("acked") == ["p-0-g0"]
    assert link.stats.reconnects == 1, "one hello for the outage, however many messages the new broker refused"
    assert link.stats.groups_retransmitted >= 1 and not link.outbox
