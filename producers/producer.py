"""The rollout producer: prompts -> engine (SGLang HTTP API) -> rewards -> groups -> broker.

A producer is an asyncio program made of four parts, each in its own module:

* the broker session, :class:`pipeline.transport.ProducerLink`: hello (again after a broker
  restart), credits, the bounded outbox of sent groups resent until acked with the same
  ``(producer_id, epoch, seq)`` (the broker drops duplicates), heartbeats;
* the group scheduler, :class:`producers.scheduler.GroupScheduler`: starts a group only with a
  credit (``producer.oversample`` keeps up to ``ceil(oversample x credits)`` generating), cuts
  groups certain to be consumed staler than η, sends passing groups and decides what a filtered,
  timed-out, cut or engine-failed group does next, hands the engine to the evaluator;
* one group attempt, :class:`producers.group.GroupMaker`: the rollout plug-in (``producer.rollout``,
  default single-turn; see :mod:`producers.rollout`), the boundary checks, the reward plug-in and the
  group filter; every plug-in call is bounded (``producer.*_timeout_s``);
* the account, :class:`producers.stats.ProducerAccount`: Prometheus metrics and the typed stats of
  ``RUN_DIR/stats/producer-N.json`` move together; the file is rewritten before each group's first
  send, so ``summary.json``'s ``generated`` is exact even after a SIGKILL.

The engines are reached through :class:`producers.sglang_client.EngineClient`: an engine that goes
down is taken out of rotation and its in-flight requests are resubmitted (:mod:`producers.rotation`);
a NaN or otherwise impossible answer is reported as that engine's fault, not a plug-in's.  A plug-in
that raises or returns malformed output stops the producer with a :class:`~producers.plugins.PluginError`
(exit 2, message naming the plug-in and the field).

    slipstream produce --config run/config.json --producer-id p0 --broker tcp://127.0.0.1:5555 \\
        --engine-url http://127.0.0.1:30000
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.transport import CurveKeys, ProducerLink
from producers.config import ProducerConfig
from producers.evaluation import Evaluator
from producers.feed import PromptFeed
from producers.group import GroupMaker
from producers.plugins import PluginError, load_plugin
from producers.rollout import SamplingParams
from producers.scheduler import GroupScheduler
from producers.scoring import Scorer
from producers.sglang_client import EngineClient
from producers.stats import ProducerAccount
from schemas.validate import Limits

log = logging.getLogger(__name__)

__all__ = ["Producer", "write_stats"]

#: how often the stats file and the prompt cursor are written besides before each send
PERSIST_EVERY_S = 2.0


class Producer:
    """Wires a producer's parts together (see the module docstring) and runs them."""

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
        stats_path: Path | None = None,
        link: ProducerLink | None = None,
    ) -> None:
        from producers.tokenizer import load_tokenizer

        self.cfg = cfg
        self.producer_id = producer_id
        self.broker_endpoint = broker_endpoint
        self.engine_urls = engine_urls
        self.tokenizer = load_tokenizer(tokenizer_path)  # AutoTokenizer: special tokens, chat template, sentencepiece
        self.seed = seed
        self.epoch = time.time_ns() // 1000
        self.feed = PromptFeed(load_plugin(cfg.prompts, "producer.prompts", cfg.prompts_args)(seed), cfg.prompts, cursor_path)
        index = producer_id.rsplit("-", 1)[-1]
        if index.isdigit():
            self.feed.shard(int(index), cfg.num_producers)  # disjoint slices of a prompt file
        self.rollout_fn = load_plugin(cfg.rollout, "producer.rollout", cfg.rollout_args)
        self.scorer = Scorer(cfg.reward, cfg.reward_scope, cfg.reward_args, cfg.group_filter, cfg.group_filter_args, timeout_s=cfg.reward_timeout_s)
        self.account = ProducerAccount(stats_path)
        self.metrics = self.account.metrics
        for reason in self.scorer.reasons:
            self.metrics.filtered.labels(reason)
        sampling = SamplingParams(cfg.temperature, cfg.top_p, cfg.max_new_tokens, list(cfg.stop_token_ids))
        self.maker = GroupMaker(self.rollout_fn, cfg.rollout, cfg.group_size, cfg.rollout_timeout_s, self.scorer, sampling,
                                self.tokenizer, f"{producer_id}-{self.epoch}", self.account)
        self.link = link if link is not None else ProducerLink(
            broker_endpoint, producer_id, self.epoch, Limits(max_message_bytes=max_message_bytes), hwm=hwm,
            heartbeat_interval_s=heartbeat_interval_s, peer_timeout_s=peer_timeout_s, ack_timeout_s=cfg.ack_timeout_s, curve=curve,
            metrics=self.metrics.link,
        )
        self.account.link_stats = self.link.stats
        evaluator = Evaluator.from_config(cfg, self.rollout_fn, self.scorer, sampling, eval_path) if cfg.eval_prompts and eval_path else None
        self.scheduler = GroupScheduler(cfg, self.link, self.feed, self.maker, self.account, producer_id, self.epoch,
                                        heartbeat_interval_s, evaluator, acked_log)
        self._update_extra()

    # ------------------------------------------------------------------ views
    @property
    def stats(self) -> Any:
        """The typed stats (:class:`producers.stats.ProducerStats`)."""
        return self.account.stats

    @property
    def sampling(self) -> SamplingParams:
        return self.maker.sampling

    @sampling.setter
    def sampling(self, value: SamplingParams) -> None:
        self.maker.sampling = value

    @property
    def fatal(self) -> PluginError | None:
        return self.scheduler.fatal

    @property
    def policy_version(self) -> int:
        return self.link.policy_version

    @property
    def credits(self) -> int:
        return self.link.credits

    @property
    def running(self) -> int:
        return self.scheduler.running

    @property
    def max_running(self) -> int:
        return self.scheduler.max_running

    @property
    def waiting(self) -> Any:
        return self.scheduler.waiting

    @property
    def requeued(self) -> Any:
        return self.feed.requeued

    # ------------------------------------------------------------------ run
    def engine_client(self) -> EngineClient:
        return EngineClient(self.engine_urls, self.cfg.request_timeout_s, down_timeout_s=self.cfg.engine_down_timeout_s, events=self.account)

    async def run(self, stop: asyncio.Event, startup_timeout_s: float = 120.0, client: Any = None) -> None:
        """Generate until ``stop`` (or a fatal plug-in error, or the broker's Shutdown).  ``client``:
        an engine client to use instead of one to ``engine_urls`` (entered and closed by the caller)."""
        async with contextlib.AsyncExitStack() as stack:
            if client is None:
                client = await stack.enter_async_context(self.engine_client())
            await client.wait_healthy(startup_timeout_s)
            tasks: list[asyncio.Task[Any]] = [asyncio.create_task(self.link.serve())]
            try:
                await self.link.connect(startup_timeout_s)
                tasks += [asyncio.create_task(self.scheduler.run(client)), asyncio.create_task(self._persist_loop()),
                          asyncio.create_task(stop.wait()), asyncio.create_task(self.scheduler.stopping.wait())]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    exc = None if t.cancelled() else t.exception()
                    if exc is not None:
                        raise exc
            finally:
                self.scheduler.stopping.set()  # groups cancelled from here on count as cancelled at stop
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                await self.scheduler.stop()
                self.close()
        if self.waiting:
            log.warning("%d generated groups were still waiting for a credit at exit (not sent; waiting_groups_at_exit in the stats)", len(self.waiting))
        self.feed.save_cursor()
        self._update_extra()
        if self.fatal is not None:
            raise self.fatal

    def close(self) -> None:
        """Close the broker link (idempotent)."""
        if not self.link.sock.closed:
            self.link.close()

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_EVERY_S)
            self.feed.save_cursor()
            self._update_extra()
            self.account.persist()

    def _update_extra(self) -> None:
        extra = {"unacked_groups_at_exit": len(self.link.outbox), "waiting_groups_at_exit": len(self.waiting),
                 "epoch": self.epoch, "producer_id": self.producer_id}
        cursor = self.feed.cursor()
        if cursor is not None:
            extra["prompt_cursor"] = cursor
        if self.fatal is not None:
            extra["fatal_error"] = str(self.fatal)
        self.account.extra = extra

    def final_stats(self) -> dict[str, Any]:
        self._update_extra()
        return self.account.as_dict()


def write_stats(path: Path | None, stats: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(stats, indent=2))
