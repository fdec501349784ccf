"""The trainer's main loop: batch from the broker -> Megatron step -> commit -> publish weights.

Runs in every trainer rank (one process, or several under torchrun).  Global rank 0 is the
publisher: it talks to the broker, broadcasts each batch to the other ranks over the trainer's
torch.distributed world, streams the new weights to the engines over the weight group, and writes
``steps.jsonl`` (one line per step) and ``consumed.jsonl`` (one line per consumed trajectory with
its token-version range, which proves the staleness bound).

Resume (``trainer.checkpoint_every > 0``): the hello carries the checkpoint's step, and after each
checkpoint the broker is told (``Checkpointed``), so it retains every batch committed since the
last checkpoint.  A trainer restarted from checkpoint step k gets the batches of steps k+1, ...
again, exactly as first served (``Batch.replay``), and so trains what the killed one trained there.
Their ``consumed.jsonl`` lines carry ``"replay": true``: the broker counted those trajectories
consumed once, at the first commit; a replay line is the same trajectory trained again only
because that training was lost with the killed process.

Stop (SIGINT/SIGTERM, :meth:`Trainer.request_stop`; ``slipstream run`` sends SIGTERM on Ctrl-C):
rank 0 gives up the batch it waits for (its lease, if one was issued, goes back to the queue) or
finishes the step it is in; every rank stops at that step boundary (rank 0 broadcasts "stop"
instead of a batch), the publish in flight ends, and with ``trainer.checkpoint_every > 0`` the last
step is checkpointed (``"at_exit": true``) and reported to the broker.  Exit code 128 + signal.  On
resume, ``steps.jsonl``'s ``wall_time_s`` goes on from the checkpointed step's, each record's
``interval_s`` is the time since this process's previous one, and engines a resumed run started
paused are continued once they hold the checkpoint's weights and the broker has our hello.

Order per step (η = 0 relies on it): train -> ``Commit`` (broker counts the groups consumed) ->
publish weights to every engine -> ``Published`` (broker opens credits for the new version).
With ``weights.async_publish`` the publish of version v runs in a background thread
(``consumers.publish_async``) while rank 0 asks for the next batch and trains it; ``Published(v)``
(and step v's line in ``steps.jsonl``) still follows the end of that publish, sent from this thread,
and version v+1 is published only after v finished.  With ``trainer.pipeline_parallel > 1`` and
``weights.per_stage_publish`` every rank exports only its PP stage and every stage leader
broadcasts its own part (``consumers.stage_publish``); rank 0 still drives the engines and the
broker, and ``run.verify_weights`` compares the engines' checksum with the one rank 0 combines
from every stage's per-tensor digests.

    slipstream train --config run/config.json --broker tcp://127.0.0.1:5556 --engine-url http://...
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
import torch.distributed as dist
from prometheus_client import Counter, Gauge, Histogram
from torch.profiler import record_function

from consumers.engine_links import WeightSyncMetrics
from consumers.publish_async import AsyncPublisher, InlinePublisher, Publisher
from consumers.publisher import PublishResult, as_result
from consumers.snapshot import WeightSnapshot
from pipeline.config import SlipstreamConfig
from pipeline.metrics import SECONDS_BUCKETS, new_registry, policy_version_gauge, serve_metrics
from pipeline.rundir import port_file, write_json_atomic
from pipeline.tracking import Tracker, TrackingMetrics
from pipeline.transport import CurveKeys, TrainerClient
from schemas.codec import decode, frames_of
from schemas.messages import Batch
from schemas.validate import Limits
from schemas.weight_update import ROUTE_CHECKSUM

log = logging.getLogger(__name__)

STAT_GAUGES = {
    "reward_mean": "Mean reward of the step's batch.",
    "loss": "Policy loss of the step.",
    "grad_norm": "Gradient norm before clipping.",
    "is_weight_mean": "Mean truncated importance weight (train vs behaviour policy).",
    "is_weight_max": "Largest importance weight before truncation.",
    "is_clip_fraction": "Fraction of tokens whose importance weight hit the cap.",
    "logprob_mismatch": "Mean |train log-prob - rollout log-prob| over trained tokens.",
    "entropy": "Mean token entropy of the policy on trained tokens.",
    "kl": "Mean KL estimate to the behaviour policy (k3).",
    "clip_fraction": "PPO clip fraction.",
    "lr": "Learning rate of the step's update (trainer.lr_schedule).",
}


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("trainer")
        self.step_seconds = Histogram("slipstream_trainer_step_seconds", "Optimizer step time (forward, backward, update).", buckets=SECONDS_BUCKETS, registry=r)
        self.wait_seconds = Counter("slipstream_trainer_wait_seconds_total", "Time spent waiting for batches (starvation).", registry=r)
        self.busy_seconds = Counter("slipstream_trainer_busy_seconds_total", "Time spent training and publishing.", registry=r)
        self.tokens = Counter("slipstream_trainer_tokens_trained_total", "Response tokens trained on.", registry=r)
        self.trajectories = Counter("slipstream_trainer_trajectories_consumed_total", "Trajectories trained on.", registry=r)
        self.steps = Counter("slipstream_trainer_steps_total", "Optimizer steps completed.", registry=r)
        self.skipped = Counter("slipstream_trainer_skipped_steps_total", "Steps not applied: non-finite loss or gradient (weights unchanged).", registry=r)
        self.publish_seconds = Histogram("slipstream_trainer_weight_publish_seconds", "Time to stream one version to every engine.", buckets=SECONDS_BUCKETS, registry=r)
        self.publish_bytes = Counter("slipstream_trainer_weight_publish_bytes_total", "Bytes of weights streamed to engines.", registry=r)
        self.engine_pause = Histogram(
            "slipstream_trainer_engine_pause_seconds",
            "Time generation stood still on the engines for one weight update (SGLang: pause to continue; embedded: the swap).",
            buckets=SECONDS_BUCKETS, registry=r,
        )
        self.version = policy_version_gauge(r)
        self.staleness_mean = Gauge("slipstream_trainer_batch_staleness_mean", "Mean staleness of the step's trajectories.", registry=r)
        self.staleness_max = Gauge("slipstream_trainer_batch_staleness_max", "Max staleness of the step's trajectories.", registry=r)
        self.stats = {k: Gauge(f"slipstream_trainer_{k}", doc, registry=r) for k, doc in STAT_GAUGES.items()}
        self.tracking = TrackingMetrics(r)
        self.weight_sync = WeightSyncMetrics(r)
        self.snapshot_bytes = Gauge("slipstream_trainer_weight_snapshot_bytes", "Bytes of the publish snapshot (one copy of the published weights).", registry=r)
        self.snapshot_limit = Gauge("slipstream_trainer_weight_snapshot_limit_bytes", "Memory budget of the publish snapshot (weights.snapshot_max_fraction).", registry=r)


@dataclass
class StepRecord:
    step: int
    policy_version: int
    reward_mean: float
    staleness_mean: float
    staleness_max: int
    tokens_trained: int
    trajectories: int
    trajectories_dropped: int
    queue_depth: int
    wall_time_s: float  # trainer-loop seconds, carried on across a resume (from the checkpointed step's)
    wait_s: float
    train_s: float
    publish_s: float
    publish_bytes: int
    weights_checksum: str
    engine_checksums: list[str] = field(default_factory=list)
    engine_pause_s: float = 0.0
    interval_s: float = 0.0  # seconds since this process's previous step record (its first: since its loop began)
    stale_engines: list[str] = field(default_factory=list)  # engines out of weight sync after this publish
    replay: bool = False  # the step re-trained a batch the broker retained (see the module doc)
    stats: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "stats"}
        d.update({k: v for k, v in self.stats.items() if k not in d})
        return json.dumps(d)


def broadcast_batch(batch: Batch | None, src: int = 0, stop: bool = False) -> Batch | None:
    """Send the batch from ``src`` to every trainer rank over the default group (our codec, no
    pickle).  ``stop`` (on ``src``: it was asked to stop instead of fetching one): every rank gets
    None, so all stop at the same step boundary."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        assert stop or batch is not None
        return None if stop else batch
    if dist.get_rank() == src:
        assert stop or batch is not None
        payload = b"" if stop or batch is None else msgpack.packb([bytes(f) for f in frames_of(batch)])  # its own frames: not encoded again
        size = torch.tensor([-1 if stop else len(payload)], dtype=torch.int64)
    else:
        payload, size = b"", torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src)
    if int(size.item()) < 0:
        return None
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buf, src)
    if dist.get_rank() == src:
        assert batch is not None
        return batch
    frames = msgpack.unpackb(buf.numpy().tobytes())
    return decode(frames, Limits(max_message_bytes=2**62))


def _staleness(batch: Batch, version: int) -> list[int]:
    return [version - t.min_version for g in batch.groups for t in g.trajectories]


def engine_checksums(engine_urls: list[str], expected: str, version: int, timeout_s: float) -> list[str]:
    """Each engine's checksum of the weights it serves; raise if any differs from ``expected``."""
    out = []
    for url in engine_urls:
        with urllib.request.urlopen(f"{url}{ROUTE_CHECKSUM}", timeout=timeout_s) as r:
            info = json.loads(r.read())
        if info["checksum"] != expected or str(info["weight_version"]) != str(version):
            raise RuntimeError(
                f"engine {url} serves weights v{info['weight_version']} with checksum {info['checksum'][:16]}..., "
                f"but the trainer published v{version} with checksum {expected[:16]}... (run.verify_weights)"
            )
        out.append(info["checksum"])
    return out


class Trainer:
    """One trainer rank's whole run: :meth:`setup` (distributed init, model, resume, weight
    publishing, broker session), :meth:`step` (batch -> train -> commit -> :meth:`publish`) and
    :meth:`run` (setup, every step, final checkpoint and export).  Global rank 0 is the publisher
    (see the module docstring); every rank runs the same code, the roles differ in what they hold:
    ``client``/``metrics`` only on rank 0, ``sender`` wherever a rank takes part in publishing."""

    def __init__(self, cfg: SlipstreamConfig, run_dir: Path, broker_endpoint: str, engine_urls: list[str]) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.broker_endpoint = broker_endpoint
        self.engine_urls = list(engine_urls)
        self.client: TrainerClient | None = None
        self.metrics: TrainerMetrics | None = None
        self.sender: InlinePublisher | AsyncPublisher | None = None  # hands each version to the publisher
        self.tracker: Tracker | None = None  # tracking.backend (pipeline/tracking.py), rank 0
        self.recorder: Any = None  # run.record_rollouts (pipeline/record.py), rank 0
        self.weights_pub: Any = None  # rank 0's WeightPublisher (also inside a StagePublisher), for EngineRejoin
        self.on_idle: Any = None  # what rank 0 runs while it waits for a batch (see _idle_callback)
        self.start_step = 0
        self.version = 0
        self.stop_signal: int | None = None  # SIGINT/SIGTERM received: stop at the next step boundary (request_stop)
        self._t_start = self._t_last = time.monotonic()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from consumers.checkpoint import prepare_start
        from consumers.trainer import TrainerRank, init_distributed

        init_distributed()
        cfg = self.cfg
        self.rank = rank = TrainerRank(cfg.trainer, cfg.model.path, total_steps=cfg.run.steps)
        # weights.per_stage_publish: every PP stage's leader broadcasts its own layers over a weight
        # group of its own (consumers/stage_publish.py); rank 0 still drives the engines over HTTP.
        self.per_stage = cfg.trainer.pipeline_parallel > 1 and cfg.weights.per_stage_publish and bool(self.engine_urls)
        self.export = rank.export_hf_stage if self.per_stage else rank.export_hf_state
        # resume, or the [sft] stage (consumers/checkpoint.py)
        self.start_step, self.version = prepare_start(rank, cfg.trainer, cfg.sft, cfg.model.path, cfg.queue.max_staleness, self.run_dir)
        wall_offset = 0.0
        if rank.is_publisher:
            self.metrics = TrainerMetrics()
            from pipeline.configbase import to_dict

            self.tracker = Tracker(cfg.tracking, self.run_dir, to_dict(cfg), self.metrics.tracking)
            if cfg.run.record_rollouts:  # each trained batch to RUN_DIR/rollouts, for run.mode = "train_only"
                from pipeline.record import Recorder

                self.recorder = Recorder(self.run_dir)
            if cfg.metrics.enabled:
                _, port = serve_metrics(self.metrics.registry, cfg.metrics.host, 0)
                write_json_atomic(port_file(self.run_dir, "trainer"), {"metrics_port": port})
            if cfg.trainer.resume_from:  # steps.jsonl's wall_time_s goes on from the checkpointed step's
                wall_offset = _supersede_steps(self.run_dir / "steps.jsonl", self.start_step)
        publisher = self._connect_publisher()
        if publisher is not None:
            on_done = self._finish_step if rank.is_publisher else _stage_done
            if cfg.weights.async_publish:
                self.sender = AsyncPublisher(publisher, on_done, checksum=cfg.run.verify_weights,
                                             timeout_s=cfg.weights.group_timeout_s * 4 + 60.0, snapshot=_snapshot(cfg.weights, self.device, publisher, self.metrics))
            else:
                self.sender = InlinePublisher(publisher, on_done, checksum=cfg.run.verify_weights)
        self.on_idle = self._idle_callback()
        if rank.is_publisher:
            assert self.metrics is not None
            q = cfg.queue
            self.client = TrainerClient(self.broker_endpoint, "trainer-0", Limits(max_message_bytes=q.max_message_bytes), hwm=q.socket_hwm,
                                        heartbeat_interval_s=q.heartbeat_interval_s, peer_timeout_s=q.peer_timeout_s,
                                        curve=CurveKeys.from_config(q))
            self.client.hello(self.version, timeout_s=cfg.run.startup_timeout_s, resume_step=self.start_step,
                              checkpoint_every=cfg.trainer.checkpoint_every)
            self.metrics.version.labels("trainer").set(self.version)
            if cfg.trainer.resume_from and self.weights_pub is not None and cfg.weights.engine_kind == "embedded":
                from consumers.engine_rejoin import EngineRejoin

                # Engines a resumed run started paused hold the checkpoint's weights now, and the broker our version.
                EngineRejoin(self.weights_pub, lambda: None, self.version).continue_paused()
        self._t_last = time.monotonic()
        self._t_start = self._t_last - wall_offset

    @property
    def device(self) -> torch.device:
        """Where this rank's weights (and its HF export) live."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _connect_publisher(self) -> Publisher | None:
        """Build and connect this rank's weight publisher (collective with per-stage publishing);
        the engines get the starting weights first when they are not the initial ones.  None on
        ranks that take no part in publishing."""
        from consumers.publisher import WeightPublisher
        from consumers.stage_publish import StagePublisher
        from pipeline.weightsync import DEFAULT_GROUP_NAME

        cfg, w = self.cfg, self.cfg.weights
        # With resume_from set (the launcher restarts a crashed trainer so), the engines may serve a
        # newer, abandoned policy: always publish then, so that the checkpoint's weights and version
        # are live before the hello (η = 0 stays exact).  Per-stage publishing needs a stage's part
        # at connect too (its layout is announced then).
        resumed = self.version > 0 or bool(cfg.trainer.resume_from)
        initial = self.export() if resumed or self.per_stage else None
        backend = w.resolved_backend(torch.cuda.is_available())
        weights_pub: WeightPublisher | None = None
        if self.rank.is_publisher and not self.engine_urls:  # run.mode = "train_only": nothing to stream
            from pipeline.record import NullPublisher

            null = NullPublisher()
            null.connect()
            return null  # type: ignore[return-value]
        if self.rank.is_publisher:
            weights_pub = WeightPublisher(
                self.engine_urls, master_address=cfg.queue.host, backend=backend, bucket_bytes=w.bucket_bytes,
                timeout_s=w.group_timeout_s, engine_kind=w.engine_kind, pause_mode=w.pause_mode, flush_cache=w.flush_cache,
                resync=w.resync_engines and not self.per_stage, rejoin_timeout_s=w.rejoin_timeout_s,
                transport="broadcast" if self.per_stage else w.transport, update_timeout_s=w.update_timeout_s,
                device=self.device, snapshot_budget_bytes=int(w.snapshot_max_fraction * _memory_of(self.device)),
                metrics=self.metrics.weight_sync if self.metrics is not None else None,
            )
        publisher: Publisher | None = weights_pub
        if self.per_stage:  # collective: every rank, every stage's group
            stage_pub = StagePublisher(weights_pub, self.rank.pp_rank, self.rank.is_stage_leader, self.engine_urls,
                                       DEFAULT_GROUP_NAME, master_address=cfg.queue.host, backend=backend,
                                       bucket_bytes=w.bucket_bytes, timeout_s=w.group_timeout_s, resync=w.resync_engines)
            assert initial is not None
            stage_pub.connect(initial)
            publisher = stage_pub
        elif weights_pub is not None:
            weights_pub.connect()  # a restarted trainer rejoins with a new rendezvous; engines drop the dead group
        self.weights_pub = weights_pub
        if weights_pub is not None and cfg.metrics.enabled:  # processes.json readers find each engine's transport here
            ports = port_file(self.run_dir, "trainer")
            info = json.loads(ports.read_text()) if ports.exists() else {}
            write_json_atomic(ports, {**info, "weight_transports": weights_pub.transports})
        if publisher is not None and resumed:  # resumed or post-SFT weights reach the engines before any rollout
            assert initial is not None
            publisher.publish(initial, self.version, checksum=False)
        return publisher

    # ------------------------------------------------------------------ steps
    def request_stop(self, signum: int) -> None:
        """SIGINT/SIGTERM (a signal handler may call this): rank 0 stops waiting for a batch and every
        rank stops at the next step boundary; :meth:`run` then writes the final checkpoint."""
        self.stop_signal = signum

    def _idle(self) -> None:
        """Rank 0's callback while it waits for a batch: give up the wait on a stop request."""
        if self.stop_signal is not None:
            raise StopRequested(self.stop_signal)
        if self.on_idle is not None:
            self.on_idle()

    def step(self, step: int) -> bool:
        """One optimizer step: fetch (rank 0) and share the batch, train, commit it, publish the
        new version.  False (nothing trained) when rank 0 was asked to stop before it had the batch."""
        cfg, rank = self.cfg, self.rank
        t0 = time.monotonic()
        batch = None
        stop = False
        if self.client is not None:
            try:
                self._idle()
                batch = self.client.request_batch(step, self.version, cfg.queue.groups_per_step, rank.dp_size, cfg.run.batch_timeout_s,
                                                  on_idle=self._idle)
            except StopRequested:  # its lease, if the broker issued one, returns to the queue (never committed)
                stop = True
            if self.recorder is not None and batch is not None:
                self.recorder.write(step, batch, self.version)
        got = broadcast_batch(batch, stop=stop)
        if got is None:
            return False
        batch = got
        if batch.replay and self.client is not None:
            log.warning("step %d replays the batch the previous trainer process trained here before it died (lease %s)", step, batch.lease_id)
        t1 = time.monotonic()
        from consumers.trainer import NonFiniteStepError

        try:
            with record_function("slipstream.train_step"):  # named spans in run.profile_steps' traces
                stats = rank.train_step([batch.groups[i] for i in batch.shards[rank.dp_rank]])
        except NonFiniteStepError as e:  # a restart would replay these batches and fail the same way
            log.error("%s", e)
            raise SystemExit(2) from e
        t2 = time.monotonic()
        trained_from_version = self.version
        self.version += 1
        ctx: dict[str, Any] = {}
        if self.client is not None:
            self.client.commit(batch.lease_id, step, self.version, timeout_s=cfg.run.startup_timeout_s)
            # Recorded at once: the broker counts these consumed from the commit on, so a trainer
            # killed while the publish runs must not leave them out of consumed.jsonl.
            _record_consumed(self.run_dir / "consumed.jsonl", batch, step, trained_from_version)
            ctx = {"step": step, "batch": batch, "stats": stats, "trained_from_version": trained_from_version, "wait_s": t1 - t0, "train_s": t2 - t1}
        with record_function("slipstream.export_and_publish"):
            self.publish(self.export(), self.version, ctx)
        if self.sender is not None and cfg.trainer.checkpoint_every and step % cfg.trainer.checkpoint_every == 0:
            self.sender.wait()  # a checkpoint is taken only once its version is published and its step recorded
        self._checkpoint(step, batch.lease_id)
        return True

    def publish(self, named: dict[str, torch.Tensor], version: int, ctx: dict[str, Any]) -> None:
        """Hand ``version`` to the publisher (in the background with ``weights.async_publish``: the
        call first waits for, and announces, ``version - 1``)."""
        if self.sender is not None:
            self.sender.submit(named, version, ctx)

    def _idle_callback(self) -> Any:
        """What rank 0 runs while it waits for a batch: report a finished background publish, and
        bring back embedded engines the launcher restarted (``consumers.engine_rejoin``; with
        per-stage publishing only those the last publish brought up to date are continued)."""
        cfg, sender, pub = self.cfg, self.sender, self.weights_pub
        poll = sender.poll if sender is not None else None
        if pub is None or not cfg.weights.resync_engines or cfg.weights.engine_kind != "embedded":
            return poll
        from consumers.engine_rejoin import EngineRejoin

        regroup = not self.per_stage
        current: Any = lambda: None  # noqa: E731  (no copy of the last version to send again)
        if regroup and isinstance(sender, AsyncPublisher):
            current = sender.snapshot.last
        elif regroup and (not dist.is_initialized() or dist.get_world_size() == 1):
            current = self.export  # one rank: its model still holds the version it last published
        rejoin = EngineRejoin(pub, current, self.version, regroup=regroup)

        def on_idle() -> None:
            if sender is None or sender.poll():
                rejoin.poll()

        return on_idle

    def _checkpoint(self, step: int, lease_id: Any) -> None:
        from consumers.checkpoint import maybe_checkpoint

        if maybe_checkpoint(self.rank, self.cfg.trainer, self.run_dir, step, {"lease_id": lease_id}) is not None and self.client is not None:
            self.client.checkpointed(step, self.version)  # the broker stops retaining batches of steps <= step

    def _finish_step(self, version: int, pub: PublishResult | None, ctx: dict[str, Any]) -> None:
        """Version ``version`` is on every engine: verify, announce it, write the step's records."""
        assert self.client is not None and self.metrics is not None and pub is not None
        pub = as_result(pub, version)
        cfg = self.cfg
        t_verify = time.monotonic()
        checks = engine_checksums(self.engine_urls, pub.checksum, version, 60.0) if cfg.run.verify_weights else []
        verify_s = time.monotonic() - t_verify
        self.client.published(version)
        t3 = time.monotonic()
        step, batch, stats, trained_from_version = ctx["step"], ctx["batch"], ctx["stats"], ctx["trained_from_version"]
        stale = _staleness(batch, trained_from_version)
        rewards = [t.reward for g in batch.groups for t in g.trajectories]
        rec = StepRecord(
            step=step, policy_version=version, reward_mean=sum(rewards) / len(rewards),
            staleness_mean=sum(stale) / len(stale), staleness_max=max(stale),
            tokens_trained=int(stats.get("tokens_trained", 0)), trajectories=len(stale), trajectories_dropped=batch.dropped,
            queue_depth=batch.queue_depth, wall_time_s=t3 - self._t_start, interval_s=t3 - self._t_last, wait_s=ctx["wait_s"], train_s=ctx["train_s"],
            publish_s=pub.seconds, publish_bytes=pub.bytes, weights_checksum=pub.checksum, engine_checksums=checks,
            engine_pause_s=pub.pause_s, stale_engines=sorted(pub.stale), replay=batch.replay,
            stats={**{k: float(v) for k, v in stats.items()}, **publish_breakdown(pub, verify_s)},
        )
        self._t_last = t3
        line = rec.to_json()
        with (self.run_dir / "steps.jsonl").open("a") as f:
            f.write(line + "\n")
        _observe(self.metrics, rec, ctx["train_s"])
        if self.tracker is not None:
            self.tracker.log_step(json.loads(line))  # queued: never blocks the step

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        from consumers.checkpoint import finish_run
        from consumers.profiling import TrainerProfile

        self.setup()
        cfg = self.cfg
        last = self.start_step
        profile = TrainerProfile(cfg.run.profile_steps, self.run_dir, dist.get_rank(), self.engine_urls)
        for step in range(self.start_step + 1, cfg.run.steps + 1):
            profile.before_step(step)
            if not self.step(step):
                break
            profile.after_step(step)
            last = step
        profile.close()
        stopped = last < max(cfg.run.steps, self.start_step)
        if stopped:
            log.warning("stopping after step %d of %d (%s)%s", last, cfg.run.steps, _signal_name(self.stop_signal),
                        ": writing the final checkpoint" if cfg.trainer.checkpoint_every else " (no checkpoint: trainer.checkpoint_every = 0)")
        if self.sender is not None:
            self.sender.wait()
        finish_run(self.rank, cfg.trainer, cfg.model.path, self.run_dir, last, interrupted=stopped)
        if self.client is not None and cfg.trainer.checkpoint_every:
            self.client.checkpointed(last, self.version)  # finish_run saved the last step
        if self.tracker is not None:
            self.tracker.close()
        if self.client is not None:
            self.client.close()
        log.info("trainer %s %d steps at policy version %d", "stopped after" if stopped else "finished", last, self.version)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return 128 + (self.stop_signal or signal.SIGTERM) if stopped else 0


def run_trainer(cfg: SlipstreamConfig, run_dir: Path, broker_endpoint: str, engine_urls: list[str]) -> int:
    """``slipstream train``: one rank's whole run (:class:`Trainer`).  It takes the whole config, not
    one section: the trainer reads eight of them (trainer, sft, weights, queue, run, model, metrics,
    tracking) and the tracker logs all of them as the run's hyper-parameters.  What it calls gets
    its section (``prepare_start``, ``maybe_checkpoint``, ``finish_run``, ``TrainerRank``)."""
    return Trainer(cfg, run_dir, broker_endpoint, engine_urls).run()


def _snapshot(w: Any, device: torch.device, publisher: Publisher, metrics: TrainerMetrics | None) -> WeightSnapshot:
    """The publish snapshot: on the device unless every engine gets a gloo broadcast from a GPU
    (or the user asks for host memory), shareable when an engine takes IPC, within its budget."""
    transports = getattr(publisher, "transports", {})
    gloo_only = w.resolved_backend(torch.cuda.is_available()) == "gloo" and "ipc" not in transports.values()
    host = w.snapshot_device == "host" or (device.type == "cuda" and gloo_only)
    budget = int(w.snapshot_max_fraction * _memory_of(torch.device("cpu") if host else device))
    if metrics is not None:
        metrics.snapshot_limit.set(budget)
    on_size = metrics.snapshot_bytes.set if metrics is not None else None
    log.info("publish snapshot: %s memory, budget %.1f GiB (weights.snapshot_max_fraction = %g)",
             "host" if host else str(device), budget / 2**30, w.snapshot_max_fraction)
    return WeightSnapshot(budget, host=host, allocate=getattr(publisher, "snapshot_allocator", None), on_size=on_size)


def _memory_of(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (host RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _stage_done(version: int, info: PublishResult | None, ctx: Any) -> None:
    """Stage leaders k >= 1 (per-stage publishing): their part of ``version`` is sent."""
    if info is not None:
        log.debug("stage %s sent its part of version %d", info.stage, version)


def _record_consumed(path: Path, batch: Batch, step: int, trained_from_version: int) -> None:
    """Append one ``consumed.jsonl`` line per trajectory of a committed batch; ``replay`` marks a
    batch served again after a resume (counted consumed once, at its first commit)."""
    with path.open("a") as f:
        for g in batch.groups:
            for t in g.trajectories:
                f.write(json.dumps({
                    "trajectory_id": t.trajectory_id, "group_id": g.group_id, "step": step,
                    "trained_from_version": trained_from_version, "min_version": int(t.versions.min()),
                    "max_version": int(t.versions.max()), "num_tokens": len(t.response_tokens),
                    "prompt_id": g.prompt_id, "reward": t.reward, "masked_tokens": int((t.loss_mask == 0).sum()), "mask_spans": _mask_spans(t.loss_mask),
                    "replay": batch.replay,
                }) + "\n")


def _supersede_steps(steps_path: Path, start_step: int) -> float:
    """On resume: lines of ``steps.jsonl`` after the checkpoint's step were written by a trainer that
    died before checkpointing them; the resumed trainer re-does those steps (on the broker's replays
    of the same batches when it retained them, else on new batches), so they move to
    ``steps.superseded.jsonl`` and ``steps.jsonl`` stays one line per step.  Their trajectories stay
    in ``consumed.jsonl``: the broker counted them consumed (exactly once); replays add lines marked
    ``"replay": true``.  Returns the ``wall_time_s`` of the last line kept (0.0 if none), from which
    the resumed trainer's clock goes on."""
    if not steps_path.exists():
        return 0.0
    keep, gone = [], []
    for line in steps_path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line)["step"] <= start_step else gone).append(line)
    offset = float(json.loads(keep[-1]).get("wall_time_s", 0.0)) if keep else 0.0
    if not gone:
        return offset
    with (steps_path.parent / "steps.superseded.jsonl").open("a") as f:
        f.writelines(line + "\n" for line in gone)
    tmp = steps_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(steps_path)
    log.warning("resuming after step %d: %d later step line(s) of the previous trainer moved to steps.superseded.jsonl", start_step, len(gone))
    return offset


class StopRequested(Exception):
    """SIGINT/SIGTERM reached rank 0 while it waited for a batch (raised from its idle callback)."""

    def __init__(self, signum: int) -> None:
        super().__init__(_signal_name(signum))
        self.signum = signum


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "no signal"


def _mask_spans(mask: Any, limit: int = 16) -> list[list[int]]:
    """``[start, end)`` of the first ``limit`` runs of loss_mask 0 (tool/environment tokens)."""
    spans: list[list[int]] = []
    start = None
    for i, m in enumerate([*mask.tolist(), 1]):
        if m == 0 and start is None:
            start = i
        elif m != 0 and start is not None:
            spans.append([start, i])
            start = None
            if len(spans) >= limit:
                break
    return spans


def publish_breakdown(pub: PublishResult, verify_s: float) -> dict[str, float]:
    """Where a publish's time went, for steps.jsonl: ``publish_checksum_s`` (hashing the export
    for run.verify_weights), ``publish_send_s`` (the transfer to the slowest engine, until it
    swapped the version in) and ``verify_s`` (asking the engines for their checksums)."""
    return {"publish_checksum_s": float(pub.timings.get("checksum_s", 0.0)),
            "publish_send_s": float(pub.timings.get("send_s", 0.0)), "verify_s": float(verify_s)}


def _observe(m: TrainerMetrics, rec: StepRecord, train_s: float) -> None:
    m.step_seconds.observe(train_s)
    m.wait_seconds.inc(rec.wait_s)
    m.busy_seconds.inc(rec.train_s + rec.publish_s)
    m.tokens.inc(rec.tokens_trained)
    m.trajectories.inc(rec.trajectories)
    m.steps.inc()
    if rec.stats.get("step_skipped"):
        m.skipped.inc()
    m.publish_seconds.observe(rec.publish_s)
    m.publish_bytes.inc(rec.publish_bytes)
    m.engine_pause.observe(rec.engine_pause_s)
    m.version.labels("trainer").set(rec.policy_version)
    m.staleness_mean.set(rec.staleness_mean)
    m.staleness_max.set(rec.staleness_max)
    m.stats["reward_mean"].set(rec.reward_mean)
    for k, g in m.stats.items():
        if k in rec.stats:
            g.set(rec.stats[k])
