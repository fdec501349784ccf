"""What a producer counts: its Prometheus metrics and the typed stats of its stats file, kept together.

Every event the producer counts goes through one :class:`ProducerAccount` method, which moves both
the Prometheus counter (``/metrics``, live) and the typed :class:`ProducerStats` field
(``RUN_DIR/stats/producer-N.json``, read by ``summary.json``), so the two can never tell different
stories.  The broker session's own counts (sent, acked, resent, rejected, credits) live in
:class:`pipeline.transport.LinkStats` / :class:`~pipeline.transport.LinkMetrics`; the account merges
them into the stats file.

The stats file is exact across a crash for what ``summary.json`` balances: the producer rewrites it
*before* the first send of every group (:meth:`ProducerAccount.persist`, called by the scheduler), so
``generated`` >= ``accepted`` even after a SIGKILL (the broker can only accept what was counted).

    account = ProducerAccount(Path("run/stats/producer-0.json"))
    account.filtered("all_one", "prompt-7")
    account.persist(extra={"epoch": 1})
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from pipeline.metrics import SECONDS_BUCKETS, new_registry, policy_version_gauge
from pipeline.transport import LinkMetrics, LinkStats

log = logging.getLogger(__name__)

PLUGIN_ERROR_REASONS = ("rollout_timeout", "reward_timeout", "group_filter_timeout", "tool_timeout", "error")
#: why a generated group was dropped before sending and its prompt retried (engine faults)
ENGINE_DROP_REASONS = ("invalid_output", "engine_error")
#: most prompt ids kept in each id list of the stats file
MAX_LISTED_IDS = 10_000


class ProducerMetrics:
    """The producer's Prometheus metrics (one registry per process); ``link`` holds the session's."""

    def __init__(self) -> None:
        r = self.registry = new_registry("producer")
        self.link = LinkMetrics(r)
        self.tokens = Counter("slipstream_producer_tokens_generated_total", "Response tokens generated.", registry=r)
        self.groups = Counter("slipstream_producer_groups_generated_total", "Groups fully generated and scored.", registry=r)
        self.errors = Counter("slipstream_producer_generate_errors_total", "Failed /generate calls (retried).", registry=r)
        self.inflight = Gauge("slipstream_producer_inflight_requests", "Groups being generated now.", registry=r)
        self.version = policy_version_gauge(r)
        self.gen_seconds = Histogram("slipstream_producer_generate_seconds", "Wall time to generate one group.", buckets=SECONDS_BUCKETS, registry=r)
        self.filtered = Counter("slipstream_producer_groups_filtered_total", "Groups the group filter dropped before sending, by reason.", ["reason"], registry=r)
        self.reward = Histogram("slipstream_producer_reward", "Reward of each generated trajectory.", buckets=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.plugin_errors = Counter("slipstream_producer_plugin_errors_total", "Plug-in calls that timed out (group retried) or failed (producer stops), by reason.", ["reason"], registry=r)
        self.prompts_failed = Counter("slipstream_producer_prompts_failed_total", "Prompts given up after producer.timeout_attempts timed-out attempts.", ["reason"], registry=r)
        self.cuts = Counter("slipstream_producer_groups_cut_total", "Generating groups cut because they would be consumed staler than max_staleness, by result (continued or restarted).", ["result"], registry=r)
        self.credit_waits = Counter("slipstream_producer_credit_waits_total", "Passing groups that waited for a credit (oversample), by result (sent, or stale: regenerated).", ["result"], registry=r)
        self.waiting = Gauge("slipstream_producer_waiting_groups", "Generated groups waiting for a credit (oversample).", registry=r)
        self.engine_dropped = Counter(
            "slipstream_producer_groups_engine_dropped_total",
            "Groups dropped before sending because of an engine fault, by reason (invalid_output: NaN/inf/positive log-probs or "
            "a malformed answer from the engine; engine_error: failed /generate); the prompt is retried.", ["reason"], registry=r)
        self.engine_retries = Counter(
            "slipstream_producer_engine_requests_retried_total",
            "/generate requests resubmitted because their engine went down (refused or dropped the connection).", registry=r)
        self.engine_downs = Counter("slipstream_producer_engine_downs_total", "Times an engine was taken out of rotation (unreachable).", registry=r)
        self.engines_down = Gauge("slipstream_producer_engines_down", "Engines out of rotation now (unreachable; probed until /health answers).", registry=r)
        for reason in PLUGIN_ERROR_REASONS:
            self.plugin_errors.labels(reason)
        self.prompts_failed.labels("timeout")
        for result in ("continued", "restarted"):
            self.cuts.labels(result)
        for result in ("sent", "stale"):
            self.credit_waits.labels(result)
        for reason in ENGINE_DROP_REASONS:
            self.engine_dropped.labels(reason)


@dataclass
class ProducerStats:
    """The producer's counts, as written to its stats file (see :meth:`ProducerAccount.as_dict`)."""

    groups_started: int = 0  # generations started (a cut-and-restarted or retried prompt starts again)
    groups_generated: int = 0  # groups sent (first sends): counted, and persisted, before they leave
    trajectories_generated: int = 0
    tokens_generated: int = 0  # response tokens sampled (filtered groups included); read by `slipstream sweep`
    groups_filtered: dict[str, int] = field(default_factory=dict)
    filtered_prompt_ids: list[str] = field(default_factory=list)
    plugin_timeouts: dict[str, int] = field(default_factory=dict)
    timed_out_prompt_ids: list[str] = field(default_factory=list)  # one entry per timed-out attempt
    failed_prompt_ids: list[str] = field(default_factory=list)
    groups_cut: dict[str, int] = field(default_factory=lambda: {"continued": 0, "restarted": 0})
    credit_waits: dict[str, int] = field(default_factory=lambda: {"sent": 0, "stale": 0})
    max_concurrent_generations: int = 0
    groups_cancelled_at_stop: int = 0
    groups_engine_dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENGINE_DROP_REASONS, 0))
    #: engine URL -> {"down": times taken out of rotation, "retried": requests resubmitted, "invalid_output": bad responses}
    engine_faults: dict[str, dict[str, int]] = field(default_factory=dict)


def _bump(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def _listed(ids: list[str], pid: str) -> None:
    if len(ids) < MAX_LISTED_IDS:
        ids.append(pid)


class ProducerAccount:
    """Counts each producer event once, in both the metrics and the stats; writes the stats file."""

    def __init__(self, stats_path: Path | None = None) -> None:
        self.metrics = ProducerMetrics()
        self.stats = ProducerStats()
        self.link_stats: LinkStats | None = None  # the session's counts, merged into the file
        self.stats_path = stats_path
        self.extra: dict[str, Any] = {}  # producer-level fields (epoch, id, cursor, ...) set by the owner

    # ------------------------------------------------------------------ events
    def started(self, running: int) -> None:
        self.stats.groups_started += 1
        self.stats.max_concurrent_generations = max(self.stats.max_concurrent_generations, running)
        self.metrics.inflight.set(running)

    def scored(self, tokens: int, rewards: list[float]) -> None:
        """A group was rolled out and scored (the filter decides next)."""
        self.metrics.tokens.inc(tokens)
        self.stats.tokens_generated += tokens
        for r in rewards:
            self.metrics.reward.observe(r)

    def generated(self, seconds: float) -> None:
        """A scored group passed the filter (it is sent, or waits for a credit)."""
        self.metrics.gen_seconds.observe(seconds)
        self.metrics.groups.inc()

    def sending(self, trajectories: int) -> None:
        """A group is about to be sent for the first time: counted and persisted first."""
        self.stats.groups_generated += 1
        self.stats.trajectories_generated += trajectories
        self.persist()

    def filtered(self, reason: str, prompt_id: str) -> None:
        self.metrics.filtered.labels(reason).inc()
        _bump(self.stats.groups_filtered, reason)
        _listed(self.stats.filtered_prompt_ids, prompt_id)

    def timed_out(self, reason: str, prompt_id: str) -> None:
        self.metrics.plugin_errors.labels(reason).inc()
        _bump(self.stats.plugin_timeouts, reason)
        _listed(self.stats.timed_out_prompt_ids, prompt_id)

    def plugin_failed(self) -> None:
        self.metrics.plugin_errors.labels("error").inc()

    def prompt_given_up(self, prompt_id: str) -> None:
        self.metrics.prompts_failed.labels("timeout").inc()
        _listed(self.stats.failed_prompt_ids, prompt_id)

    def cut(self, result: str) -> None:
        self.metrics.cuts.labels(result).inc()
        self.stats.groups_cut[result] += 1

    def credit_wait(self, result: str, waiting: int) -> None:
        self.metrics.credit_waits.labels(result).inc()
        self.stats.credit_waits[result] += 1
        self.metrics.waiting.set(waiting)

    def cancelled_at_stop(self) -> None:
        self.stats.groups_cancelled_at_stop += 1

    def generate_failed(self) -> None:
        self.metrics.errors.inc()

    def engine_dropped(self, reason: str, url: str) -> None:
        """A group was dropped because its engine failed or returned invalid output (prompt retried)."""
        self.metrics.engine_dropped.labels(reason).inc()
        self.stats.groups_engine_dropped[reason] += 1
        if reason == "invalid_output" and url:
            _bump(self.stats.engine_faults.setdefault(url, {}), "invalid_output")

    def engine_down(self, url: str, down_now: int) -> None:
        self.metrics.engine_downs.inc()
        self.metrics.engines_down.set(down_now)
        _bump(self.stats.engine_faults.setdefault(url, {}), "down")

    def engine_up(self, url: str, down_now: int) -> None:
        self.metrics.engines_down.set(down_now)

    def engine_retried(self, url: str) -> None:
        self.metrics.engine_retries.inc()
        _bump(self.stats.engine_faults.setdefault(url, {}), "retried")

    # ------------------------------------------------------------------ the stats file
    def as_dict(self) -> dict[str, Any]:
        out = asdict(self.stats)
        if self.link_stats is not None:
            ls = self.link_stats
            out.update(groups_sent=ls.groups_sent, acked_trajectory_ids=ls.trajectories_acked, groups_acked=ls.groups_acked,
                       groups_retransmitted=ls.groups_retransmitted, groups_rejected=dict(ls.groups_rejected),
                       credits_granted=ls.credits_granted, broker_reconnects=ls.reconnects)
        out.update(self.extra)
        return out

    def persist(self) -> None:
        """Rewrite the stats file (atomic rename; survives a SIGKILL of this process)."""
        if self.stats_path is None:
            return
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(self.as_dict()))
        tmp.replace(self.stats_path)
