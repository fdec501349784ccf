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

Credits.  ``credits`` are the group starts the broker granted and this producer has not yet spent
on a sent group.  Up to ``ceil(oversample x credits)`` groups generate at once (``producer.oversample``,
1.0 = one generation per credit); a group that passes the filter is sent while a credit is held,
else it waits in ``waiting`` (bounded, with the outbox, by ``outbox_limit``) until a credit
arrives.  A filtered, failed, timed-out or cut group spends no credit: it starts another prompt.

Timeouts.  Every plug-in call is bounded (``producer.rollout_timeout_s``, ``reward_timeout_s``,
``tool_timeout_s``; see :func:`producers.plugins.call_plugin_timeout`).  A timeout is logged naming
the plug-in and the key to raise, counted (``slipstream_producer_plugin_errors_total{reason}``), and
the prompt is retried up to ``timeout_attempts`` times, then counted as failed.

Cuts (DESIGN §3).  The producer knows each generating group's start version (a lower bound of the
min version of its trained tokens).  When the published version ``V`` exceeds it by more than η
(``Welcome.max_staleness``) the group is certain to be too stale when consumed, so it is cut at
once: its requests are aborted and the rollout either continues the unfinished samples under the
new weights (``producer.partial_rollouts``, single-turn) or the group restarts from the prompt;
``slipstream_producer_groups_cut_total{result}`` counts both.  A waiting group whose min token
version falls more than η behind is regenerated too (``slipstream_producer_credit_waits_total``).

    slipstream produce --config run/config.json --producer-id p0 --broker tcp://127.0.0.1:5555 \
        --engine-url http://127.0.0.1:30000
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from prometheus_client import Counter, Gauge, Histogram

from pipeline.metrics import SECONDS_BUCKETS, new_registry, policy_version_gauge
from pipeline.transport import CurveKeys, configure_socket
from producers.config import ProducerConfig
from producers.evaluation import Evaluator
from producers.plugins import PluginError, PluginTimeout, Prompt, Sample, call_plugin_timeout, load_plugin
from producers.rollout import GroupCut, RolloutContext, SamplingParams, validate_samples
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
        self.version = policy_version_gauge(r)
        self.gen_seconds = Histogram("slipstream_producer_generate_seconds", "Wall time to generate one group.", buckets=SECONDS_BUCKETS, registry=r)
        self.filtered = Counter("slipstream_producer_groups_filtered_total", "Groups the group filter dropped before sending, by reason.", ["reason"], registry=r)
        self.reward = Histogram("slipstream_producer_reward", "Reward of each generated trajectory.", buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.plugin_errors = Counter("slipstream_producer_plugin_errors_total", "Plug-in calls that timed out (group retried) or failed (producer stops), by reason.", ["reason"], registry=r)
        self.prompts_failed = Counter("slipstream_producer_prompts_failed_total", "Prompts given up after producer.timeout_attempts timed-out attempts.", ["reason"], registry=r)
        self.cuts = Counter("slipstream_producer_groups_cut_total", "Generating groups cut because they would be consumed staler than max_staleness, by result (continued or restarted).", ["result"], registry=r)
        self.credit_waits = Counter("slipstream_producer_credit_waits_total", "Passing groups that waited for a credit (oversample), by result (sent, or stale: regenerated).", ["result"], registry=r)
        self.waiting = Gauge("slipstream_producer_waiting_groups", "Generated groups waiting for a credit (oversample).", registry=r)
        self.credits = Gauge("slipstream_producer_credits_held", "Credits granted and not yet spent on a sent group.", registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in PLUGIN_ERROR_REASONS:
            self.plugin_errors.labels(reason)
        self.prompts_failed.labels("timeout")
        for result in ("continued", "restarted"):
            self.cuts.labels(result)
        for result in ("sent", "stale"):
            self.credit_waits.labels(result)


PLUGIN_ERROR_REASONS = ("rollout_timeout", "reward_timeout", "group_filter_timeout", "tool_timeout", "error")


@dataclass
class Job:
    """A prompt to generate a group for, with its retry history."""

    prompt: Prompt
    timeouts: int = 0  # attempts that ended in a plug-in timeout
    cuts: int = 0  # times a group of it was cut and restarted


@dataclass
class Active:
    """A group being generated: its rollout context (start version, rids) and task."""

    job: Job
    ctx: RolloutContext
    task: asyncio.Task[None] | None = None
    phase: str = "rollout"  # rollout -> scoring (or failed: engine error, retried); only a rollout is cut
    restart: bool = False  # cut: cancelled to restart from the prompt


@dataclass
class Ready:
    """A group that passed the filter, waiting for a credit (oversample)."""

    job: Job
    trajectories: list[Trajectory]
    min_version: int
    generated_at: float = field(default_factory=time.monotonic)


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
        from producers.tokenizer import load_tokenizer

        self.cfg = cfg
        self.producer_id = producer_id
        self.broker_endpoint = broker_endpoint
        self.engine_urls = engine_urls
        self.tokenizer = load_tokenizer(tokenizer_path)  # AutoTokenizer: special tokens, chat template, sentencepiece
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
        self.scorer = Scorer(cfg.reward, cfg.reward_scope, cfg.reward_args, cfg.group_filter, cfg.group_filter_args, timeout_s=cfg.reward_timeout_s)
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
        self.max_staleness: int | None = None  # η, from the broker's Welcome (no cuts before it)
        self.credits = 0  # granted, not yet spent on a sent group
        self.running = 0  # groups generating (rollout + scoring)
        self.max_running = 0  # the most groups generating at once (oversample: can exceed the credits held)
        self.requested = -1
        self.outbox: dict[int, Outgoing] = {}
        self.requeued: deque[Job] = deque()
        self.waiting: deque[Ready] = deque()
        self.active: dict[int, Active] = {}
        self._active_ids = itertools.count()
        self._seq = itertools.count()
        self._traj_ids = itertools.count()
        self._stop = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._wake = asyncio.Event()
        self._last_broker_msg = time.monotonic()
        self._tasks: set[asyncio.Future[Any]] = set()
        self._client: EngineClient | None = None
        self.stats: dict[str, Any] = {"groups_generated": 0, "trajectories_generated": 0, "acked_trajectory_ids": 0, "groups_filtered": {}, "filtered_prompt_ids": [],
                                      "plugin_timeouts": {}, "failed_prompt_ids": [], "groups_cut": {"continued": 0, "restarted": 0},
                                      "credit_waits": {"sent": 0, "stale": 0}, "max_concurrent_generations": 0,
                                      "groups_cancelled_at_stop": 0}
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
            self.max_staleness = msg.max_staleness
            self.metrics.version.labels("producer").set(self.version)
            # The broker forgot the credits of an earlier registration; groups already generating keep theirs.
            self.credits = min(self.credits, self.running)
            self.metrics.credits.set(self.credits)
            self.requested = -1
            self._welcomed.set()
            self._check_staleness()
            log.info("registered with broker %s at policy version %d", self.broker_endpoint, self.version)
            for out in self.outbox.values():  # reconnect: resend everything unacked
                await self._resend(out)
        elif isinstance(msg, Credit):
            self.credits += msg.granted
            self.metrics.credits.set(self.credits)
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
            self._check_staleness()
        elif isinstance(msg, Requeue):
            tokens = [int(t) for t in msg.prompt_tokens]  # text decoded for rewards that read it (remote, math)
            self.requeued.append(Job(Prompt(prompt_id=msg.prompt_id, text=self.tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens,
                                            label=str(msg.metadata.get("label", "")), metadata=dict(msg.metadata))))
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
    def _next_job(self) -> Job | None:
        """The next prompt (requeued ones first); None once the prompt source is exhausted."""
        if self.requeued:
            return self.requeued.popleft()
        if self.exhausted:
            return None
        try:
            return Job(next(self.prompt_source))
        except StopIteration:
            log.warning("prompt source %s is exhausted: no new groups from this producer", self.cfg.prompts)
            self.exhausted = True
            return None

    def _next_prompt(self) -> Prompt | None:
        """The next prompt's Prompt (see :meth:`_next_job`)."""
        job = self._next_job()
        return job.prompt if job is not None else None

    def _tokens(self, prompt: Prompt) -> list[int]:
        return list(prompt.tokens) if prompt.tokens is not None else self.tokenizer.encode(prompt.text).ids

    def _on_cut(self, result: str, continued: int, regenerated: int) -> None:
        self.metrics.cuts.labels(result).inc()
        self.stats["groups_cut"][result] += 1
        log.info("group cut at v%d (%s): %d samples continue from their tokens, %d regenerated", self.version, result, continued, regenerated)

    async def _generate_group(self, client: EngineClient, job: Job, act: Active) -> None:
        prompt = job.prompt
        t0 = time.monotonic()
        tokens = self._tokens(prompt)
        if prompt.tokens is None:
            prompt.tokens = list(tokens)  # rollouts and requeues see the same ids
        try:
            out = await call_plugin_timeout(self.rollout_fn, act.ctx, prompt, self.sampling, timeout_s=self.cfg.rollout_timeout_s,
                                            key="producer.rollout", plugin=self.cfg.rollout, timeout_key="producer.rollout_timeout_s", reason="rollout_timeout")
        except EngineError as e:
            act.phase = "failed"
            self.metrics.errors.inc()
            log.error("generation for prompt %s failed (will retry): %s", prompt.prompt_id, e)
            self.requeued.appendleft(job)  # the credit is still ours: the group was not produced
            await asyncio.sleep(1.0)
            return
        except GroupCut:
            self._restart_cut(job)
            return
        except (PluginError, PluginTimeout):
            raise
        except Exception as e:
            raise PluginError("producer.rollout", self.cfg.rollout, f"raised {type(e).__name__}: {e}") from e
        act.phase = "scoring"
        if act.ctx.take_cut() is not None:  # cut after the rollout returned: its tokens are certain to be too stale
            self._restart_cut(job)
            return
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
        generated = sum(int(sum(r.loss_mask)) for r in rollouts)
        self.metrics.tokens.inc(generated)
        self.stats["tokens_generated"] = self.stats.get("tokens_generated", 0) + generated  # read by `slipstream sweep`
        reason = await self.scorer.filter_reason(samples)
        if reason is not None:
            self.metrics.filtered.labels(reason).inc()
            counts = self.stats["groups_filtered"]
            counts[reason] = counts.get(reason, 0) + 1
            if len(self.stats["filtered_prompt_ids"]) < 10_000:
                self.stats["filtered_prompt_ids"].append(prompt.prompt_id)
            log.debug("group for prompt %s filtered (%s)", prompt.prompt_id, reason)
            return  # nothing was sent and no credit spent: it starts another prompt
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
        self.metrics.gen_seconds.observe(time.monotonic() - t0)
        self.metrics.groups.inc()
        min_version = min((int(t.versions.min()) for t in trajectories if len(t.versions)), default=act.ctx.start_version)
        ready = Ready(job, trajectories, min_version)
        if self.credits > 0 and not self.waiting:
            await self._send_group(ready)
        else:
            self.waiting.append(ready)  # oversample: passed, but no credit left; sent when one arrives
            self.metrics.waiting.set(len(self.waiting))
            log.debug("group for prompt %s waits for a credit (%d waiting)", prompt.prompt_id, len(self.waiting))

    async def _send_group(self, ready: Ready) -> None:
        """Spend a credit on ``ready``: number it, put it in the outbox and send it."""
        self.credits -= 1
        self.metrics.credits.set(self.credits)
        seq = next(self._seq)
        prompt = ready.job.prompt
        group = TrajectoryGroup(
            group_id=f"{self.producer_id}-{self.epoch}-g{seq}", prompt_id=prompt.prompt_id, producer_id=self.producer_id,
            epoch=self.epoch, seq=seq, trajectories=ready.trajectories, metadata={"label": prompt.label, **prompt.metadata},
        )
        self.stats["groups_generated"] += 1
        self.stats["trajectories_generated"] += len(ready.trajectories)
        frames = [bytes(f) for f in encode(group)]  # owned copy: the outbox may resend it
        self.outbox[seq] = Outgoing(group, frames, time.monotonic())
        self.metrics.outbox.set(len(self.outbox))
        self.metrics.sent.inc()
        await self.sock.send_multipart(frames, copy=True)

    async def _flush_waiting(self) -> None:
        """Send waiting groups (oldest first) while credits are held."""
        while self.waiting and self.credits > 0:
            ready = self.waiting.popleft()
            self.metrics.waiting.set(len(self.waiting))
            self.metrics.credit_waits.labels("sent").inc()
            self.stats["credit_waits"]["sent"] += 1
            await self._send_group(ready)

    def _restart_cut(self, job: Job) -> None:
        job.cuts += 1
        self._on_cut("restarted", 0, self.cfg.group_size)
        self.requeued.appendleft(job)

    def _check_staleness(self) -> None:
        """Cut generating groups, and regenerate waiting ones, that are certain to be consumed staler than η."""
        eta = self.max_staleness
        if eta is None:
            return
        for act in list(self.active.values()):
            if act.phase != "rollout" or act.restart or self.version - act.ctx.start_version <= eta:
                continue
            continuing = self.cfg.partial_rollouts and bool(getattr(self.rollout_fn, "supports_continuation", False))
            start = act.ctx.start_version
            rids = act.ctx.request_cut(self.version)
            targets = self._client.abort_targets(rids) if self._client is not None else []
            log.info("cutting the group of prompt %s: started at v%d, v%d is published and max_staleness is %d (%s, %d requests aborted)",
                     act.job.prompt.prompt_id, start, self.version, eta, "continuing" if continuing else "restarting", len(targets))
            if targets:
                self._spawn(self._abort(targets))
            if not continuing and act.task is not None:
                act.restart = True
                act.task.cancel()  # the rollout ends now; its HTTP requests are aborted (explicitly and by the disconnect)
        for ready in list(self.waiting):
            if self.version - ready.min_version > eta:
                self.waiting.remove(ready)
                self.metrics.waiting.set(len(self.waiting))
                self.metrics.credit_waits.labels("stale").inc()
                self.stats["credit_waits"]["stale"] += 1
                log.info("group of prompt %s waited for a credit until it was too stale (min version %d, v%d published, max_staleness %d): regenerating",
                         ready.job.prompt.prompt_id, ready.min_version, self.version, eta)
                self.requeued.appendleft(ready.job)
        self._wake.set()

    async def _abort(self, targets: list[tuple[str, str]]) -> None:
        assert self._client is not None
        await asyncio.gather(*(self._client.abort(rid, url) for rid, url in targets))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def _on_timeout(self, job: Job, e: PluginTimeout) -> None:
        self.metrics.plugin_errors.labels(e.reason).inc()
        counts = self.stats["plugin_timeouts"]
        counts[e.reason] = counts.get(e.reason, 0) + 1
        job.timeouts += 1
        pid = job.prompt.prompt_id
        if job.timeouts < self.cfg.timeout_attempts:
            log.warning("%s: %s; prompt %s retried (attempt %d of %d, producer.timeout_attempts)", e.reason, e, pid, job.timeouts + 1, self.cfg.timeout_attempts)
            self.requeued.appendleft(job)
            return
        log.error("%s: %s; prompt %s failed after %d attempts (producer.timeout_attempts): given up", e.reason, e, pid, job.timeouts)
        self.metrics.prompts_failed.labels("timeout").inc()
        if len(self.stats["failed_prompt_ids"]) < 10_000:
            self.stats["failed_prompt_ids"].append(pid)

    def _start_group(self, client: EngineClient, job: Job) -> None:
        key = next(self._active_ids)
        ctx = RolloutContext(client, self.tokenizer, self.cfg.group_size, self.version, self.producer_id, lambda: self.version,
                             tool_timeout_s=self.cfg.tool_timeout_s, partial_rollouts=self.cfg.partial_rollouts, on_cut=self._on_cut)
        act = Active(job, ctx)
        self.active[key] = act
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.stats["max_concurrent_generations"] = self.max_running
        self.metrics.inflight.set(self.running)
        act.task = asyncio.create_task(self._run_group(client, job, act, key))
        self._tasks.add(act.task)
        act.task.add_done_callback(self._tasks.discard)

    async def _run_group(self, client: EngineClient, job: Job, act: Active, key: int) -> None:
        try:
            await self._generate_group(client, job, act)
        except asyncio.CancelledError:
            if self._stop.is_set():
                self.stats["groups_cancelled_at_stop"] += 1  # generating when the producer stopped
                raise
            if not act.restart:
                raise
            self._restart_cut(job)  # cut: the group restarts from the prompt
        except PluginTimeout as e:
            self._on_timeout(job, e)
        except PluginError as e:
            log.error("stopping: %s", e)
            self.metrics.plugin_errors.labels("error").inc()
            self.fatal = e
            self._stop.set()
        except Exception:
            log.exception("group task for prompt %s failed", job.prompt.prompt_id)
            self.requeued.appendleft(job)
        finally:
            del self.active[key]
            self.running -= 1
            self.metrics.inflight.set(self.running)
            self._wake.set()

    def generation_limit(self) -> int:
        """How many groups may generate at once now: ceil(oversample x credits held), at most
        ceil(oversample x max_inflight_groups)."""
        cap = math.ceil(self.cfg.oversample * self.cfg.max_inflight_groups)
        return min(cap, math.ceil(self.cfg.oversample * self.credits - 1e-9))

    async def _scheduler(self, client: EngineClient) -> None:
        while not self._stop.is_set():
            await self._welcomed.wait()
            await self._flush_waiting()
            while (self.running < self.generation_limit() and not self.waiting
                   and len(self.outbox) + len(self.waiting) < self.cfg.outbox_limit):
                job = self._next_job()
                if job is None:
                    break
                self._start_group(client, job)
            want = self.cfg.max_inflight_groups - self.credits
            if self.exhausted and not self.requeued:
                want = min(want, self.running + len(self.waiting) - self.credits)  # only what generated groups still need
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
            self._client = client
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
        if self.waiting:
            log.warning("%d generated groups were still waiting for a credit at exit (not sent; waiting_groups_at_exit in the stats)", len(self.waiting))
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
        out = {**self.stats, "unacked_groups_at_exit": len(self.outbox), "waiting_groups_at_exit": len(self.waiting),
               "epoch": self.epoch, "producer_id": self.producer_id}
        if hasattr(self.prompt_source, "state_dict"):
            out["prompt_cursor"] = self.prompt_source.state_dict()
        if self.fatal is not None:
            out["fatal_error"] = str(self.fatal)
        return out


def write_stats(path: Path | None, stats: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(stats, indent=2))
