"""The rollout producer: prompts -> engine (SGLang HTTP API) -> rewards -> groups -> broker.

A producer is an asyncio program.  It starts a group only with a credit from the broker
(admission control), runs the rollout plug-in (``producer.rollout``, default single-turn: the engine
samples ``group_size`` responses of one prompt; see :mod:`producers.rollout`), scores the samples with
the reward plug-in, lets the optional group filter drop the group (the credit is then reused for
another prompt), and sends the group, every token stamped with the policy version that sampled it,
over a ZeroMQ DEALER.  A plug-in that raises or returns malformed output stops the producer with a
:class:`~producers.plugins.PluginError` (exit 2, message naming the plug-in and the field).
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
from pipeline.transport import CurveKeys, configure_socket
from producers.config import ProducerConfig
from producers.evaluation import Evaluator
from producers.plugins import PluginError, Prompt, Sample, load_plugin
from producers.rollout import RolloutContext, SamplingParams, validate_samples
from producers.scoring import Scorer
from producers.sglang_client import EngineClient, EngineError
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
        self.filtered = Counter("slipstream_producer_groups_filtered_total", "Groups the group filter dropped before sending, by reason.", ["reason"], registry=r)
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
        acked_log: Path | None = None,
        curve: CurveKeys | None = None,
        eval_path: Path | None = None,
        cursor_path: Path | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.cfg = cfg
        self.producer_id = producer_id
        self.broker_endpoint = broker_endpoint
        self.engine_urls = engine_urls
        self.tokenizer = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json"))
        self.seed = seed
        self.epoch = time.time_ns() // 1000
        self.prompt_source = load_plugin(cfg.prompts, "producer.prompts", cfg.prompts_args)(seed)
        index = producer_id.rsplit("-", 1)[-1]
        if cfg.num_producers > 1 and hasattr(self.prompt_source, "shard") and index.isdigit():
            self.prompt_source.shard(int(index), cfg.num_producers)  # disjoint slices of a prompt file
        # A source with state_dict()/load_state_dict() (producers.datasets) resumes where it stopped.
        self.cursor_path = cursor_path
        self._saved_cursor: Any = None
        self._restore_cursor()
        self.rollout_fn = load_plugin(cfg.rollout, "producer.rollout", cfg.rollout_args)
        self.scorer = Scorer(cfg.reward, cfg.reward_scope, cfg.reward_args, cfg.group_filter, cfg.group_filter_args)
        self.sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, list(cfg.stop_token_ids))
        self.fatal: PluginError | None = None
        self.evaluator = Evaluator.from_config(cfg, self.rollout_fn, self.scorer, self.sampling, eval_path) if cfg.eval_prompts and eval_path else None
        self.exhausted = False
        self.limits = Limits(max_message_bytes=max_message_bytes)
        self.peer_timeout_s = peer_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.metrics = ProducerMetrics()
        for reason in self.scorer.reasons:
            self.metrics.filtered.labels(reason)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        configure_socket(self.sock, hwm, max_message_bytes)
        if curve is not None:
            curve.client(self.sock)  # CURVE encryption + authentication (queue.curve_*)
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
        self.stats: dict[str, Any] = {"groups_generated": 0, "trajectories_generated": 0, "acked_trajectory_ids": 0, "groups_filtered": {}, "filtered_prompt_ids": []}
        # One line per acked group (appended, flushed per line, across restarts): the delivery audit trail.
        self._acked_log = None
        if acked_log is not None:
            acked_log.parent.mkdir(parents=True, exist_ok=True)
            self._acked_log = acked_log.open("a", buffering=1)

    # ------------------------------------------------------------------ broker I/O
    async def _send(self, msg: Any) -> None:
        await self.sock.send_multipart(encode(msg), copy=False)

    async def _hello(self) -> None:
        self._last_hello = time.monotonic()
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
                if self._acked_log is not None:
                    self._acked_log.write(json.dumps({
                        "group_id": out.group.group_id, "epoch": out.group.epoch, "seq": out.group.seq, "duplicate": msg.duplicate,
                        "trajectory_ids": [t.trajectory_id for t in out.group.trajectories],
                    }) + "\n")
        elif isinstance(msg, Error):
            await self._on_error(msg)
        elif isinstance(msg, VersionAnnouncement):
            self.version = max(self.version, msg.policy_version)
            self.metrics.version.labels("producer").set(self.version)
        elif isinstance(msg, Requeue):
            tokens = [int(t) for t in msg.prompt_tokens]  # text decoded for rewards that read it (remote, math)
            self.requeued.append(Prompt(prompt_id=msg.prompt_id, text=self.tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens,
                                        label=str(msg.metadata.get("label", "")), metadata=dict(msg.metadata)))
        elif isinstance(msg, Shutdown):
            log.info("broker asked us to stop: %s", msg.reason)
            self._stop.set()
        self._wake.set()

    async def _on_error(self, err: Error) -> None:
        if err.code == "not_registered":
            if time.monotonic() - getattr(self, "_last_hello", 0.0) < self.heartbeat_interval_s:
                return  # one hello per outage, not one per message the restarted broker refused
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
            self.save_cursor()
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
    def _next_prompt(self) -> Prompt | None:
        """The next prompt (requeued ones first); None once the prompt source is exhausted."""
        if self.requeued:
            return self.requeued.popleft()
        if self.exhausted:
            return None
        try:
            return next(self.prompt_source)
        except StopIteration:
            log.warning("prompt source %s is exhausted: no new groups from this producer", self.cfg.prompts)
            self.exhausted = True
            return None

    def _tokens(self, prompt: Prompt) -> list[int]:
        return list(prompt.tokens) if prompt.tokens is not None else self.tokenizer.encode(prompt.text).ids

    async def _generate_group(self, client: EngineClient, prompt: Prompt) -> None:
        t0 = time.monotonic()
        tokens = self._tokens(prompt)
        if prompt.tokens is None:
            prompt.tokens = list(tokens)  # rollouts and requeues see the same ids
        ctx = RolloutContext(client, self.tokenizer, self.cfg.group_size, self.version, self.producer_id, lambda: self.version)
        try:
            out = await self.rollout_fn(ctx, prompt, self.sampling)
        except EngineError as e:
            self.metrics.errors.inc()
            log.error("generation for prompt %s failed (will retry): %s", prompt.prompt_id, e)
            self.requeued.appendleft(prompt)
            self.credits += 1  # the credit is still ours: the group was not produced
            await asyncio.sleep(1.0)
            return
        except PluginError:
            raise
        except Exception as e:
            raise PluginError("producer.rollout", self.cfg.rollout, f"raised {type(e).__name__}: {e}") from e
        rollouts = validate_samples(out, self.cfg.group_size, self.cfg.rollout)
        samples = [
            Sample(prompt, tokens, list(r.response_tokens), r.response_text if r.response_text is not None else self.tokenizer.decode(list(r.response_tokens), skip_special_tokens=True),
                   r.finish_reason, list(r.loss_mask), dict(r.metadata))
            for r in rollouts
        ]
        rewards = await self.scorer.rewards(samples)
        for s, reward in zip(samples, rewards, strict=True):
            s.reward = reward
            self.metrics.reward.observe(reward)
        self.metrics.tokens.inc(sum(int(sum(r.loss_mask)) for r in rollouts))
        reason = await self.scorer.filter_reason(samples)
        if reason is not None:
            self.metrics.filtered.labels(reason).inc()
            counts = self.stats["groups_filtered"]
            counts[reason] = counts.get(reason, 0) + 1
            if len(self.stats["filtered_prompt_ids"]) < 10_000:
                self.stats["filtered_prompt_ids"].append(prompt.prompt_id)
            log.debug("group for prompt %s filtered (%s)", prompt.prompt_id, reason)
            self.credits += 1  # nothing was sent: the credit starts another prompt
            return
        trajectories = []
        for r, reward in zip(rollouts, rewards, strict=True):
            trajectories.append(Trajectory(
                trajectory_id=f"{self.producer_id}-{self.epoch}-{next(self._traj_ids)}",
                prompt_tokens=np.asarray(tokens, dtype=np.int32),
                response_tokens=np.asarray(r.response_tokens, dtype=np.int32),
                logprobs=np.asarray(r.logprobs, dtype=np.float32),
                versions=np.asarray(r.versions, dtype=np.int32),
                loss_mask=np.asarray(r.loss_mask, dtype=np.uint8),
                reward=reward,
                finish_reason=r.finish_reason,
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

    async def _evaluate(self, client: EngineClient) -> None:
        assert self.evaluator is not None
        try:
            await self.evaluator.loop(client, self.tokenizer, lambda: self.version, self._stop)
        except PluginError as e:
            log.error("stopping (evaluation): %s", e)
            self.fatal = e
            self._stop.set()
        except Exception:
            log.exception("evaluation task failed; training continues without it")

    async def _run_group(self, client: EngineClient, prompt: Prompt) -> None:
        self.running += 1
        self.metrics.inflight.set(self.running)
        try:
            await self._generate_group(client, prompt)
        except PluginError as e:
            log.error("stopping: %s", e)
            self.fatal = e
            self._stop.set()
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
                prompt = self._next_prompt()
                if prompt is None:
                    break
                self.credits -= 1
                task = asyncio.create_task(self._run_group(client, prompt))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            want = self.cfg.max_inflight_groups - self.running - self.credits
            if len(self.outbox) >= self.cfg.outbox_limit or (self.exhausted and not self.requeued):
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
            if self.evaluator is not None:
                ev = asyncio.create_task(self._evaluate(client))
                self._tasks.add(ev)
                ev.add_done_callback(self._tasks.discard)
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
        if self._acked_log is not None:
            self._acked_log.close()
        self.save_cursor()
        if self.fatal is not None:
            raise self.fatal

    # ------------------------------------------------------------------ prompt cursor
    def _restore_cursor(self) -> None:
        if self.cursor_path is None or not hasattr(self.prompt_source, "load_state_dict") or not self.cursor_path.exists():
            return
        state = json.loads(self.cursor_path.read_text())
        self.prompt_source.load_state_dict(state)
        self._saved_cursor = state
        log.info("prompt source resumed from %s: %s", self.cursor_path, state)

    def save_cursor(self) -> None:
        """Write the prompt source's cursor (if it has one) when it changed; read back at the next start."""
        if self.cursor_path is None or not hasattr(self.prompt_source, "state_dict"):
            return
        state = self.prompt_source.state_dict()
        if state != self._saved_cursor:
            self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.cursor_path)
            self._saved_cursor = state

    def final_stats(self) -> dict[str, Any]:
        out = {**self.stats, "unacked_groups_at_exit": len(self.outbox), "epoch": self.epoch, "producer_id": self.producer_id}
        if hasattr(self.prompt_source, "state_dict"):
            out["prompt_cursor"] = self.prompt_source.state_dict()
        if self.fatal is not None:
            out["fatal_error"] = str(self.fatal)
        return out


def write_stats(path: Path | None, stats: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(stats, indent=2))
