"""The broker process: two ZeroMQ ROUTER sockets around :class:`pipeline.broker_core.BrokerCore`.

Producers connect to one socket (hello, credit requests, trajectory groups, heartbeats) and get
welcomes, credits, acks, errors, version announcements and requeues back.  Trainers connect to the
other (hello, batch requests, commits, checkpoint and "published" notices).  Every decision lives
in the core (``handle(peer, frames)`` and ``tick(now)`` return the replies); the queue semantics in
:class:`pipeline.queue.StalenessQueue`, whose changes the journal logs (:mod:`pipeline.journal`).
This module only binds the sockets, moves frames in and replies out, runs the housekeeping clock
and closes everything.  Bad input never crashes it: every rejected message gets an ``Error`` reply
(where there is a sender) and a ``slipstream_broker_rejected_messages_total{reason}`` increment.

    slipstream broker --config run/config.json --run-dir run/
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from pipeline.ackslog import AckLog
from pipeline.broker_core import PRODUCER, TRAINER, BrokerCore, Reply
from pipeline.broker_metrics import BrokerMetrics
from pipeline.journal import Journal
from pipeline.runconfig import QueueConfig
from pipeline.transport import CurveKeys, bind, configure_socket
from schemas.codec import encode

__all__ = ["Broker", "BrokerMetrics", "run_broker"]

log = logging.getLogger(__name__)


class Broker:
    def __init__(
        self, cfg: QueueConfig, group_size: int, vocab_size: int | None = None, policy_version: int = 0,
        journal_dir: Path | None = None, acked_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        journal = Journal(journal_dir, cfg.journal_segment_bytes, cfg.journal_fsync) if journal_dir is not None else None
        self.core = BrokerCore(cfg, group_size, vocab_size, policy_version, journal=journal,
                               acks=AckLog(acked_dir) if acked_dir is not None else None)
        self.metrics = self.core.metrics
        self.queue = self.core.queue
        self.ctx = zmq.asyncio.Context()
        self.psock = self.ctx.socket(zmq.ROUTER)
        self.tsock = self.ctx.socket(zmq.ROUTER)
        self.curve = CurveKeys.from_config(cfg)
        for s in (self.psock, self.tsock):
            configure_socket(s, cfg.socket_hwm, cfg.max_message_bytes)
            s.setsockopt(zmq.ROUTER_MANDATORY, 0)
            if self.curve is not None:
                self.curve.server(s)
        self.producer_port = bind(self.psock, cfg.host, cfg.producer_port)
        self.trainer_port = bind(self.tsock, cfg.host, cfg.trainer_port)
        self._stopping = asyncio.Event()

    async def _send_all(self, replies: list[Reply]) -> None:
        for (side, identity), msg in replies:
            sock = self.psock if side == PRODUCER else self.tsock
            try:
                await sock.send_multipart([identity, *encode(msg)], copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                log.warning("send buffer full (HWM %d): dropped a %s reply to a peer that is not reading", self.cfg.socket_hwm, type(msg).__name__)

    async def _recv_loop(self, sock: zmq.asyncio.Socket, side: str) -> None:
        while not self._stopping.is_set():
            frames = await sock.recv_multipart(copy=False)
            if len(frames) < 2:
                self.core.reject("frame_count")
                continue
            await self._send_all(self.core.handle((side, frames[0].bytes), frames[1:]))

    async def _housekeeping(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.cfg.heartbeat_interval_s)
            await self._send_all(self.core.tick(time.monotonic()))

    async def serve(self) -> None:
        tasks = [
            asyncio.create_task(self._recv_loop(self.psock, PRODUCER)),
            asyncio.create_task(self._recv_loop(self.tsock, TRAINER)),
            asyncio.create_task(self._housekeeping()),
        ]
        self.core.update_gauges()
        try:
            await self._stopping.wait()
        finally:
            await self._send_all(self.core.shutdown())
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        self.core.close()
        self.psock.close()
        self.tsock.close()
        if self.curve is not None:
            self.curve.close()
        self.ctx.term()

    def final_stats(self) -> dict[str, Any]:
        return self.core.final_stats()


async def run_broker(broker: Broker, ports_file: Path | None, stats_file: Path | None, stop: asyncio.Event) -> None:
    if ports_file is not None:
        tmp = ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"producer_port": broker.producer_port, "trainer_port": broker.trainer_port}))
        tmp.rename(ports_file)
    log.info("broker listening: producers tcp://%s:%d, trainers tcp://%s:%d", broker.cfg.host, broker.producer_port, broker.cfg.host, broker.trainer_port)
    serve = asyncio.create_task(broker.serve())
    await stop.wait()
    broker.stop()
    await serve
    if stats_file is not None:
        stats_file.write_text(json.dumps(broker.final_stats(), indent=2))
    log.info("broker stopped: %s", json.dumps(broker.final_stats()))
