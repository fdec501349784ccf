"""The rollout producer: prompts -> engine (SGLang HTTP API) -> rewards -> groups -> broker.

A producer is an asyncio program.  It starts a group only with a credit from the broker
(admission control), asks the engine for ``group_size`` samples of one prompt, scores them, stamps
each token with the policy version that sampled it, and sends the group over a ZeroMQ DEALER.
Sent groups wait in a bounded outbox until acked; unacked groups are resent after
``ack_timeout_s`` with the same ``(producer_id, epoch, seq)``, so the broker can drop duplicates.

    slipstream produce --config run/config.json --producer-id p0 --broker tcp://127.0.0.1:5555 \
        --engine-url http://127.0.0.1:30000
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge, Histogram

from pipeline.metrics import SECONDS_BUCKETS, new_registry
from pipeline.transport import configure_socket
from producers.config import ProducerConfig
from producers.plugins import Prompt, Sample, load_plugin
from producers.sglang_client import EngineClient, EngineError, parse_generation
from schemas.codec import decode, encode
from schemas.messages import (
    Ack,
    Credit,
    CreditRequest,
    Error,
    Heartbeat,
    Hello,
    Requeue,
    Shutdown,
    Trajectory,
    TrajectoryGroup,
    VersionAnnouncement,
    Welcome,
)
from schemas.validate import REJECT_REASONS, Limits, WireError

log = logging.getLogger(__name__)


class ProducerMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("producer")
        self.tokens = Counter("slipstream_producer_tokens_generated_total", "Response tokens generated.", registry=r)
        self.groups = Counter("slipstream_producer_groups_generated_total", "Groups fully generated and scored.", registry=r)
        self.sent = Counter("slipstream_producer_groups_sent_total", "Group sends, first attempts only.", registry=r)
        self.acked = Counter("slipstream_producer_groups_acked_total", "Groups acknowledged by the broker.", registry=r)
        self.retransmitted = Counter("slipstream_producer_groups_retransmitted_total", "Group resends after an ack timeout or reconnect.", registry=r)
        self.rejected = Counter("slipstream_producer_groups_rejected_total", "Groups the broker rejected, by reason.", ["reason"], registry=r)
        self.errors = Counter("slipstream_producer_generate_errors_total", "Failed /generate calls (retried).", registry=r)
        self.inflight = Gauge("slipstream_producer_inflight_requests", "Groups being generated now.", registry=r)
        self.outbox = Gauge("slipstream_producer_outbox_groups", "Sent groups waiting for an ack.", registry=r)
        self.version = Gauge("slipstream_policy_version", "Policy version this process knows to be published.", ["role"], registry=r)
        self.gen_seconds = Histogram("slipstream_producer_generate_seconds", "Wall time to generate one group.", buckets=SECONDS_BUCKETS, registry=r)
        self.reward = Histogram("slipstream_producer_reward", "Reward of each generated trajectory.", buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


@dataclass
class Outgoing:
    group: TrajectoryGroup
    frames: list[Any]
    sent_at: float
    attempts: int = 1


class Producer:
    def __init__(
        self,
        cfg: ProducerConfig,
        producer_id: str,
        broker_endpoint: str,
        engine_urls: list[str],
        tokenizer_path: str,
        seed: int,
        hwm: int = 1000,
        max_message_bytes: int = 16 * 1024 * 1024,
        peer_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
    ) -> None:
        from tokenizers import Tokenizer

        self.cfg = cfg
        self.producer_id = producer_id
        self.broker_endpoint = broker_endpoint
        self.engine_urls = engine_urls
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json"))
        self.seed = seed
        self.epoch = time.time_ns() // 1000
        self.prompt_source = load_plugin(cfg.prompts, "producer.prompts")(seed)
        self.reward_fn = load_plugin(cfg.reward, "producer.reward")
        self.limits = Limits(max_message_bytes=max_message_bytes)
        self.peer_timeout_s = peer_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics = ProducerMetrics()
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm, max_message_bytes)
        self.sock.connect(broker_endpoint)
        self.version = 0
        self.credits = 0
        self.running = 0
        self.requested = -1
        self.outbox: dict[int, Outgoing] = {}
        self.requeued: deque[Prompt] = deque()
        self._seq = itertools.count()
        self._traj_ids = itertools.count()
        self._stop = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_broker_msg = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, Any] = {"groups_generated": 0, "trajectories_generated": 0, "acked_trajectory_ids": 0}

    # ------------------------------------------------------------------ broker I/O
    async def _send(self, msg: Any) -> None:
        await self.sock.send_multipart(encode(msg), copy=False)

    async def _hello(self) -> None:
        self._welcomed.clear()
        await self._send(Hello(role="producer", peer_id=self.producer_id, epoch=self.epoch, pid=os.getpid()))

    async def _recv_loop(self) -> None:
        while not self._stop.is_set():
            frames = await self.sock.recv_multipart(copy=False)
            self._last_broker_msg = time.monotonic()
            try:
                msg = decode(frames, self.limits)
            except WireError as e:
                log.error("undecodable message from the broker: %s", e)
                continue
            await self._on_message(msg)

    async def _on_message(self, msg: Any) -> None:
        if isinstance(msg, Welcome):
            self.version = msg.policy_version
            self.metrics.version.labels("producer").set(self.version)
            self.credits = 0  # the broker forgot any credits of an earlier registration
            self.requested = -1
            self._welcomed.set()
            log.info("registered with broker %s at policy version %d", self.broker_endpoint, self.version)
            for out in self.outbox.values():  # reconnect: resend everything unacked
                await self._resend(out)
        elif isinstance(msg, Credit):
            self.credits += msg.granted
            self.requested = max(0, self.requested - msg.granted)
        elif isinstance(msg, Ack):
            out = self.outbox.pop(msg.seq, None) if msg.epoch == self.epoch else None
            if out is not None:
                self.metrics.acked.inc()
                self.metrics.outbox.set(len(self.outbox))
                self.stats["acked_trajectory_ids"] += len(out.group.trajectories)
        elif isinstance(msg, Error):
            await self._on_error(msg)
        elif isinstance(msg, VersionAnnouncement):
            self.version = max(self.version, msg.policy_version)
            self.metrics.version.labels("producer").set(self.version)
        elif isinstance(msg, Requeue):
            self.requeued.append(Prompt(prompt_id=msg.prompt_id, tokens=list(msg.prompt_tokens), label=str(msg.metadata.get("label", "")), metadata=dict(msg.metadata)))
        elif isinstance(msg, Shutdown):
            log.info("broker asked us to stop: %s", msg.reason)
            self._stop.set()
        self._wake.set()

    async def _on_error(self, err: Error) -> None:
        if err.code == "not_registered":
            log.warning("broker does not know us (restarted?): registering again")
            await self._hello()
            return
        out = self.outbox.get(err.seq) if err.epoch == self.epoch else None
        if out is None:
            log.error("broker error [%s]: %s", err.code, err.message)
            return
        if err.code == "queue_full":
            log.info("broker queue full; group seq %d will be resent", err.seq)
            out.sent_at = time.monotonic()
            return
        del self.outbox[err.seq]
        self.metrics.rejected.labels(err.code).inc()
        self.metrics.outbox.set(len(self.outbox))
        log.error("broker rejected group seq %d (%s): [%s] %s", err.seq, out.group.group_id, err.code, err.message)

    async def _resend(self, out: Outgoing) -> None:
        out.attempts += 1
        out.sent_at = time.monotonic()
        self.metrics.retransmitted.inc()
        await self.sock.send_multipart(out.frames, copy=True)

    async def _timers(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.heartbeat_interval_s)
            await self._send(Heartbeat(peer_id=self.producer_id, sent_at=time.time()))
            now = time.monotonic()
            if now - self._last_broker_msg > self.peer_timeout_s:
                log.warning("no message from the broker at %s for %.0fs; still retrying", self.broker_endpoint, now - self._last_broker_msg)
                await self._hello()
                self._last_broker_msg = now
            for out in list(self.outbox.values()):
                if now - out.sent_at > self.cfg.ack_timeout_s:
                    log.info("group seq %d not acked after %.0fs: resending (attempt %d)", out.group.seq, now - out.sent_at, out.attempts + 1)
                    await self._resend(out)

    # ------------------------------------------------------------------ generation
    def _next_prompt(self) -> Prompt:
        return self.requeued.popleft() if self.requeued else next(self.prompt_source)

    def _tokens(self, prompt: Prompt) -> list[int]:
        return list(prompt.tokens) if prompt.tokens is not None else self.tokenizer.encode(prompt.text).ids

    async def _generate_group(self, client: EngineClient, prompt: Prompt) -> None:
        t0 = time.monotonic()
        tokens = self._tokens(prompt)
        params = {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "max_new_tokens": self.cfg.max_new_tokens}
        version_at_submit = self.version
        try:
            responses = await client.generate([tokens] * self.cfg.group_size, params)
            gens = [parse_generation(r, version_at_submit) for r in responses]
        except EngineError as e:
            self.metrics.errors.inc()
            log.error("generation for prompt %s failed (will retry): %s", prompt.prompt_id, e)
            self.requeued.appendleft(prompt)
            self.credits += 1  # the credit is still ours: the group was not produced
            await asyncio.sleep(1.0)
            return
        trajectories = []
        for g in gens:
            sample = Sample(prompt, tokens, g.output_ids, self.tokenizer.decode(g.output_ids, skip_special_tokens=True), g.finish_reason)
            reward = float(self.reward_fn(sample))
            self.metrics.reward.observe(reward)
            self.metrics.tokens.inc(len(g.output_ids))
            trajectories.append(Trajectory(
                trajectory_id=f"{self.producer_id}-{self.epoch}-{next(self._traj_ids)}",
                prompt_tokens=np.asarray(tokens, dtype=np.int32),
                response_tokens=np.asarray(g.output_ids, dtype=np.int32),
                logprobs=np.asarray(g.logprobs, dtype=np.float32),
                versions=np.asarray(g.versions, dtype=np.int32),
                loss_mask=np.ones(len(g.output_ids), dtype=np.uint8),
                reward=reward,
                finish_reason=g.finish_reason,
                timings={"generate_s": time.monotonic() - t0},
            ))
        seq = next(self._seq)
        group = TrajectoryGroup(
            group_id=f"{self.producer_id}-{self.epoch}-g{seq}", prompt_id=prompt.prompt_id, producer_id=self.producer_id,
            epoch=self.epoch, seq=seq, trajectories=trajectories, metadata={"label": prompt.label, **prompt.metadata},
        )
        self.metrics.gen_seconds.observe(time.monotonic() - t0)
        self.metrics.groups.inc()
        self.stats["groups_generated"] += 1
        self.stats["trajectories_generated"] += len(trajectories)
        frames = [bytes(f) for f in encode(group)]  # owned copy: the outbox may resend it
        self.outbox[seq] = Outgoing(group, frames, time.monotonic())
        self.metrics.outbox.set(len(self.outbox))
        self.metrics.sent.inc()
        await self.sock.send_multipart(frames, copy=True)

    async def _run_group(self, client: EngineClient, prompt: Prompt) -> None:
        self.running += 1
        self.metrics.inflight.set(self.running)
        try:
            await self._generate_group(client, prompt)
        except Exception:
            log.exception("group task for prompt %s failed", prompt.prompt_id)
            self.requeued.appendleft(prompt)
            self.credits += 1
        finally:
            self.running -= 1
            self.metrics.inflight.set(self.running)
            self._wake.set()

    async def _scheduler(self, client: EngineClient) -> None:
        while not self._stop.is_set():
            await self._welcomed.wait()
            while self.credits > 0 and self.running < self.cfg.max_inflight_groups and len(self.outbox) < self.cfg.outbox_limit:
                self.credits -= 1
                task = asyncio.create_task(self._run_group(client, self._next_prompt()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            want = self.cfg.max_inflight_groups - self.running - self.credits
            if len(self.outbox) >= self.cfg.outbox_limit:
                want = 0
            if want > 0 and want != self.requested:
                self.requested = want
                await self._send(CreditRequest(want=want))
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_interval_s)

    async def run(self, stop: asyncio.Event, startup_timeout_s: float = 120.0) -> None:
        async with EngineClient(self.engine_urls, self.cfg.request_timeout_s) as client:
            await client.wait_healthy(startup_timeout_s)
            recv = asyncio.create_task(self._recv_loop())
            await self._hello()
            try:
                await asyncio.wait_for(self._welcomed.wait(), timeout=startup_timeout_s)
            except TimeoutError:
                raise TimeoutError(
                    f"no welcome from the broker at {self.broker_endpoint} after {startup_timeout_s:.0f}s: "
                    "is it running, and is the address right (queue.host / queue.producer_port)?"
                ) from None
            timers = asyncio.create_task(self._timers())
            sched = asyncio.create_task(self._scheduler(client))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([stopper, asyncio.create_task(self._stop.wait()), recv, timers, sched], return_when=asyncio.FIRST_COMPLETED)
            self._stop.set()
            for t in (recv, timers, sched, stopper, *self._tasks):
                t.cancel()
            for t in (recv, timers, sched, *list(self._tasks)):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self.sock.close(linger=0)
        self.ctx.term()

    def final_stats(self) -> dict[str, Any]:
        return {**self.stats, "unacked_groups_at_exit": len(self.outbox), "epoch": self.epoch, "producer_id": self.producer_id}


def write_stats(path: Path | None, stats: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(stats, indent=2))
