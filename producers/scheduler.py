"""The producer's group scheduler: which groups generate now, and what happens to each when it ends.

:class:`GroupScheduler` is the :class:`~pipeline.transport.LinkListener` of the producer's broker
link.  It starts a group only with a credit (up to ``ceil(oversample x credits held)`` at once, at
most ``ceil(oversample x max_inflight_groups)``), asks the link for credits, runs each group attempt
(:class:`~producers.group.GroupMaker`) as a task and decides on its outcome:

* passed the filter: sent while a credit is held (counted and persisted first, see
  :mod:`producers.stats`), else it waits (bounded, with the outbox, by ``outbox_limit``) and goes out
  oldest first when a credit arrives;
* filtered, timed out (retried up to ``timeout_attempts``, then given up), cut, or failed on the
  engine (an unreachable engine, or one that answered NaN log-probs: the group is dropped, counted by
  reason with the engine's URL, and its prompt retried): no credit is spent, another prompt starts;
* a broken plug-in (:class:`~producers.plugins.PluginError`): the producer stops (``fatal``).

Cuts (DESIGN §3).  When the published version exceeds a generating group's start version by more
than η (``Welcome.max_staleness``) the group is certain to be too stale when consumed: its requests
are aborted, and the rollout continues the unfinished samples under the new weights
(``producer.partial_rollouts``, single-turn) or the group restarts from the prompt.  A waiting group
whose min token version falls more than η behind is regenerated.

Evaluation hand-off: with an :class:`~producers.evaluation.Evaluator` the scheduler runs its loop on
the same engine client; an evaluation plug-in error stops the producer like a training one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from pipeline.transport import ProducerLink
from producers.config import ProducerConfig
from producers.evaluation import Evaluator
from producers.feed import Job, PromptFeed
from producers.group import Active, GroupMaker, Ready
from producers.plugins import PluginError, PluginTimeout, Prompt
from producers.rollout import GroupCut, RolloutContext
from producers.sglang_client import EngineClient, EngineError, EngineOutputError
from producers.stats import ProducerAccount
from schemas.messages import Requeue, TrajectoryGroup, Welcome

log = logging.getLogger(__name__)

#: pause of a group slot after an engine error, before its prompt is retried
ENGINE_RETRY_PAUSE_S = 1.0


class GroupScheduler:
    """Starts, cuts and sends groups; the producer's :class:`~pipeline.transport.LinkListener`."""

    def __init__(self, cfg: ProducerConfig, link: ProducerLink, feed: PromptFeed, maker: GroupMaker, account: ProducerAccount,
                 producer_id: str, epoch: int, heartbeat_interval_s: float = 1.0, evaluator: Evaluator | None = None,
                 acked_log: Path | None = None) -> None:
        self.cfg = cfg
        self.link = link
        self.feed = feed
        self.maker = maker
        self.account = account
        self.producer_id = producer_id
        self.epoch = epoch
        self.heartbeat_interval_s = heartbeat_interval_s
        self.evaluator = evaluator
        self.active: dict[int, Active] = {}
        self.waiting: deque[Ready] = deque()
        self.running = 0  # groups generating (rollout + scoring)
        self.max_running = 0  # the most at once (oversample: can exceed the credits held)
        self.fatal: PluginError | None = None
        self.stopping = asyncio.Event()  # set to stop: a fatal plug-in error, the broker's Shutdown, or the owner
        self.client: EngineClient | None = None
        self._wake = asyncio.Event()
        self._ids = itertools.count()
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        # One line per acked group (appended, flushed per line, across restarts): the producer's view of delivery.
        self._acked_log = None
        if acked_log is not None:
            acked_log.parent.mkdir(parents=True, exist_ok=True)
            self._acked_log = acked_log.open("a", buffering=1)
        link.attach(self)

    @property
    def policy_version(self) -> int:
        return self.link.policy_version

    # ------------------------------------------------------------------ LinkListener
    def credits_in_use(self) -> int:
        return self.running

    def on_welcome(self, welcome: Welcome) -> None:
        self.account.metrics.version.labels("producer").set(self.link.policy_version)
        self.check_staleness()

    def on_version(self, version: int) -> None:
        self.account.metrics.version.labels("producer").set(version)
        self.check_staleness()

    def on_requeue(self, msg: Requeue) -> None:
        tokens = [int(t) for t in msg.prompt_tokens]  # text decoded for rewards that read it (remote, math)
        text = self.maker.tokenizer.decode(tokens, skip_special_tokens=True)
        self.feed.append(Job(Prompt(prompt_id=msg.prompt_id, text=text, tokens=tokens, label=str(msg.metadata.get("label", "")),
                                    metadata=dict(msg.metadata))))

    def on_acked(self, group: TrajectoryGroup, duplicate: bool) -> None:
        if self._acked_log is not None:
            self._acked_log.write(json.dumps({
                "group_id": group.group_id, "epoch": group.epoch, "seq": group.seq, "duplicate": duplicate,
                "trajectory_ids": [t.trajectory_id for t in group.trajectories],
            }) + "\n")

    def on_rejected(self, group: TrajectoryGroup, code: str, message: str) -> None:
        pass  # counted and logged by the link; the group is gone, its credit returned by the broker

    def on_shutdown(self, reason: str) -> None:
        self.stopping.set()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the loop
    def generation_limit(self) -> int:
        """How many groups may generate at once now: ceil(oversample x credits held), at most
        ceil(oversample x max_inflight_groups)."""
        cap = math.ceil(self.cfg.oversample * self.cfg.max_inflight_groups)
        return min(cap, math.ceil(self.cfg.oversample * self.link.credits - 1e-9))

    async def run(self, client: EngineClient) -> None:
        """Schedule until :attr:`stopping` (the owner cancels it then)."""
        self.client = client
        if self.evaluator is not None:
            self._spawn(self._evaluate(client))
        link = self.link
        while not self.stopping.is_set():
            await link.welcomed.wait()
            self._wake.clear()  # before looking: whatever arrives during the awaits below wakes the next round
            await self._flush_waiting()
            while (self.running < self.generation_limit() and not self.waiting
                   and len(link.outbox) + len(self.waiting) < self.cfg.outbox_limit):
                job = self.feed.next()
                if job is None:
                    break
                self._start(client, job)
            want = self.cfg.max_inflight_groups - link.credits
            if self.feed.exhausted and not self.feed.requeued:
                want = min(want, self.running + len(self.waiting) - link.credits)  # only what generated groups still need
            if len(link.outbox) >= self.cfg.outbox_limit:
                want = 0
            await link.request_credits(want)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.heartbeat_interval_s)

    async def stop(self) -> None:
        """Cancel every group task and the evaluation (their groups count as cancelled at stop)."""
        self.stopping.set()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._acked_log is not None:
            self._acked_log.close()
            self._acked_log = None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self, client: EngineClient, job: Job) -> None:
        key = next(self._ids)
        ctx = RolloutContext(client, self.maker.tokenizer, self.cfg.group_size, self.policy_version, self.producer_id, lambda: self.policy_version,
                             tool_timeout_s=self.cfg.tool_timeout_s, partial_rollouts=self.cfg.partial_rollouts, on_cut=self._on_cut)
        act = Active(job, ctx)
        self.active[key] = act
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.account.started(self.running)
        act.task = self._spawn(self._run_group(job, act, key))

    async def _run_group(self, job: Job, act: Active, key: int) -> None:
        try:
            ready = await self.maker.make(job, act)
            if ready is not None:
                await self._on_ready(ready)
        except asyncio.CancelledError:
            if self.stopping.is_set():
                self.account.cancelled_at_stop()  # generating when the producer stopped
                raise
            if not act.restart:
                raise
            self._restart_cut(job)  # cut: the group restarts from the prompt
        except GroupCut:
            self._restart_cut(job)
        except EngineError as e:
            await self._on_engine_error(job, act, e)
        except PluginTimeout as e:
            self._on_timeout(job, e)
        except PluginError as e:
            log.error("stopping: %s", e)
            self.account.plugin_failed()
            self.fatal = e
            self.stopping.set()
        except Exception:
            log.exception("group task for prompt %s failed", job.prompt.prompt_id)
            self.feed.retry(job)
        finally:
            del self.active[key]
            self.running -= 1
            self.account.metrics.inflight.set(self.running)
            self._wake.set()

    # ------------------------------------------------------------------ outcomes
    async def _on_ready(self, ready: Ready) -> None:
        if self.link.credits > 0 and not self.waiting:
            await self._send(ready)
        else:
            self.waiting.append(ready)  # oversample: passed, but no credit left; sent when one arrives
            self.account.metrics.waiting.set(len(self.waiting))
            log.debug("group for prompt %s waits for a credit (%d waiting)", ready.job.prompt.prompt_id, len(self.waiting))

    async def _send(self, ready: Ready) -> None:
        """Number ``ready``, count it (persisted before it leaves: ``generated`` is exact across a crash), send it."""
        seq = next(self._seq)
        prompt = ready.job.prompt
        group = TrajectoryGroup(
            group_id=f"{self.producer_id}-{self.epoch}-g{seq}", prompt_id=prompt.prompt_id, producer_id=self.producer_id,
            epoch=self.epoch, seq=seq, trajectories=ready.trajectories, metadata={"label": prompt.label, **prompt.metadata},
        )
        self.account.sending(len(group.trajectories))
        await self.link.send_group(group)

    async def _flush_waiting(self) -> None:
        """Send waiting groups (oldest first) while credits are held."""
        while self.waiting and self.link.credits > 0:
            ready = self.waiting.popleft()
            self.account.credit_wait("sent", len(self.waiting))
            await self._send(ready)

    async def _on_engine_error(self, job: Job, act: Active, e: EngineError) -> None:
        act.phase = "failed"
        reason = "invalid_output" if isinstance(e, EngineOutputError) else "engine_error"
        self.account.generate_failed()
        self.account.engine_dropped(reason, e.url)
        log.error("generation for prompt %s failed on engine %s (%s): the group is dropped and the prompt retried: %s",
                  job.prompt.prompt_id, e.url or "?", reason, e)
        self.feed.retry(job)  # the credit is still ours: the group was not produced
        await asyncio.sleep(ENGINE_RETRY_PAUSE_S)

    def _on_timeout(self, job: Job, e: PluginTimeout) -> None:
        pid = job.prompt.prompt_id
        self.account.timed_out(e.reason, pid)
        job.timeouts += 1
        if job.timeouts < self.cfg.timeout_attempts:
            log.warning("%s: %s; prompt %s retried (attempt %d of %d, producer.timeout_attempts)", e.reason, e, pid, job.timeouts + 1, self.cfg.timeout_attempts)
            self.feed.retry(job)
            return
        log.error("%s: %s; prompt %s failed after %d attempts (producer.timeout_attempts): given up", e.reason, e, pid, job.timeouts)
        self.account.prompt_given_up(pid)

    def _on_cut(self, result: str, continued: int, regenerated: int) -> None:
        self.account.cut(result)
        log.info("group cut at v%d (%s): %d samples continue from their tokens, %d regenerated", self.policy_version, result, continued, regenerated)

    def _restart_cut(self, job: Job) -> None:
        job.cuts += 1
        self._on_cut("restarted", 0, self.cfg.group_size)
        self.feed.retry(job)

    def check_staleness(self) -> None:
        """Cut generating groups, and regenerate waiting ones, that are certain to be consumed staler than η."""
        eta = self.link.max_staleness
        if eta is None:
            return
        version = self.policy_version
        for act in list(self.active.values()):
            if act.phase != "rollout" or act.restart or version - act.ctx.start_version <= eta:
                continue
            continuing = self.cfg.partial_rollouts and bool(getattr(self.maker.rollout_fn, "supports_continuation", False))
            start = act.ctx.start_version
            rids = act.ctx.request_cut(version)
            targets = self.client.abort_targets(rids) if self.client is not None else []
            log.info("cutting the group of prompt %s: started at v%d, v%d is published and max_staleness is %d (%s, %d requests aborted)",
                     act.job.prompt.prompt_id, start, version, eta, "continuing" if continuing else "restarting", len(targets))
            if targets:
                self._spawn(self._abort(targets))
            if not continuing and act.task is not None:
                act.restart = True
                act.task.cancel()  # the rollout ends now; its HTTP requests are aborted (explicitly and by the disconnect)
        for ready in list(self.waiting):
            if version - ready.min_version > eta:
                self.waiting.remove(ready)
                self.account.credit_wait("stale", len(self.waiting))
                log.info("group of prompt %s waited for a credit until it was too stale (min version %d, v%d published, max_staleness %d): regenerating",
                         ready.job.prompt.prompt_id, ready.min_version, version, eta)
                self.feed.retry(ready.job)
        self._wake.set()

    async def _abort(self, targets: list[tuple[str, str]]) -> None:
        assert self.client is not None
        await asyncio.gather(*(self.client.abort(rid, url) for rid, url in targets))

    async def _evaluate(self, client: EngineClient) -> None:
        assert self.evaluator is not None
        try:
            await self.evaluator.loop(client, self.maker.tokenizer, lambda: self.policy_version, self.stopping)
        except PluginError as e:
            log.error("stopping (evaluation): %s", e)
            self.fatal = e
            self.stopping.set()
        except Exception:
            log.exception("evaluation task failed; training continues without it")
