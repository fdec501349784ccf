"""Record and replay trajectories: ``run.mode = "rollout_only" | "train_only"`` (slime's
``--debug-rollout-only`` / ``--debug-train-only``).

A recording is ``RUN_DIR/rollouts/``: one file per trainer step, ``step-000001.batch``, holding
that step's :class:`~schemas.messages.Batch` in the wire format (the ZeroMQ frames our codec
makes, packed as one msgpack list: header + raw little-endian arrays, never pickle), and
``index.jsonl`` with one line per file: step, file, bytes, sha256, groups, trajectories, the
version the step trained from.  A file whose sha256 or decoding fails is refused by name.

* ``run.mode = "rollout_only"``: broker, engines and producers, no trainer.  The *recorder*
  (``slipstream record``, in the trainer's place) asks the broker for each step's batch, writes it,
  commits it, advances every engine's weight-version label (``/update_weight_version``; the weights
  stay the initial ones) and announces the version: admission control (η), staleness and the
  trajectory account work exactly as in a training run.
* ``run.record_rollouts = true`` in a normal run: trainer rank 0 records each batch it trains, the
  same way (one call in ``consumers/loop.py``).
* ``run.mode = "train_only"`` with ``run.replay_from = DIR`` (a run directory or its ``rollouts/``):
  broker and trainer, no producers or engines.  The *replayer* (``slipstream replay``, in the
  producers' place) sends the recorded groups to the broker in the recorded order, as a producer
  does (credits, acks, resends), each only once the broker has announced the newest version among
  its tokens.  The broker forms the same batches (same groups, order and shards), so a trainer with
  the same ``trainer.seed`` and config trains exactly what the recorded run trained: the same
  losses (``tests/test_record_replay.py``).  ``run.steps`` may not exceed the recorded steps.

    slipstream run examples/tiny/config.toml --set run.mode='"rollout_only"' --set run.steps=20
    slipstream run examples/tiny/config.toml --set run.mode='"train_only"' --set run.replay_from='"runs/tiny-..."'
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from pipeline.configbase import ConfigError
from pipeline.rundir import write_json_atomic
from schemas.codec import WireError, decode, encode, frames_of
from schemas.messages import (
    Ack,
    Batch,
    Credit,
    CreditRequest,
    Error,
    Heartbeat,
    Hello,
    Requeue,
    Shutdown,
    TrajectoryGroup,
    VersionAnnouncement,
    Welcome,
)
from schemas.validate import Limits

if TYPE_CHECKING:
    from pipeline.config import SlipstreamConfig

log = logging.getLogger(__name__)

INDEX = "index.jsonl"


def rollouts_dir(path: str | Path) -> Path:
    """A run directory or its ``rollouts/`` folder -> the folder holding ``index.jsonl``."""
    p = Path(path)
    return p if (p / INDEX).exists() else p / "rollouts"


class Recorder:
    """Writes each step's batch as ``step-NNNNNN.batch`` + an ``index.jsonl`` line (file first, then its line)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "rollouts"
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, batch: Batch, trained_from_version: int) -> dict[str, Any]:
        data = msgpack.packb([bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in frames_of(batch)])
        name = f"step-{step:06d}.batch"
        tmp = self.dir / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.dir / name)
        line = {"step": step, "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "groups": len(batch.groups),
                "trajectories": sum(len(g.trajectories) for g in batch.groups), "trained_from_version": trained_from_version,
                "lease_id": batch.lease_id, "replay": batch.replay}
        with (self.dir / INDEX).open("a") as f:
            f.write(json.dumps(line) + "\n")
        return line


def read_index(path: str | Path) -> list[dict[str, Any]]:
    """The recording's index, one line per step in step order (a re-recorded step: the last line wins)."""
    d = rollouts_dir(path)
    if not (d / INDEX).exists():
        raise ConfigError("run.replay_from", f"{d / INDEX} does not exist: record with run.mode = 'rollout_only' or run.record_rollouts = true")
    by_step: dict[int, dict[str, Any]] = {}
    for line in (d / INDEX).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
    steps = sorted(by_step)
    if steps != list(range(1, len(steps) + 1)):
        raise ConfigError("run.replay_from", f"{d / INDEX} does not hold steps 1..{len(steps)} (has {steps[:5]}...)")
    return [by_step[s] for s in steps]


def load_batch(path: str | Path, rec: dict[str, Any], limits: Limits | None = None) -> Batch:
    """One recorded step's batch, after checking its sha256 (a mismatch names the file)."""
    f = rollouts_dir(path) / rec["file"]
    data = f.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != rec["sha256"] or len(data) != rec["bytes"]:
        raise ConfigError("run.replay_from", f"{f} is corrupt: sha256 {digest[:16]}... ({len(data)} bytes), index says {rec['sha256'][:16]}... ({rec['bytes']} bytes)")
    try:
        msg = decode(msgpack.unpackb(data), limits or Limits(max_message_bytes=2**62))
    except (WireError, ValueError, msgpack.UnpackException) as e:
        raise ConfigError("run.replay_from", f"{f} does not decode as a batch: {e}") from None
    if not isinstance(msg, Batch):
        raise ConfigError("run.replay_from", f"{f} holds a {type(msg).__name__}, not a batch")
    return msg


def check_recording(path: str | Path, steps: int) -> list[dict[str, Any]]:
    """Before a train_only run starts: every file of steps 1..``steps`` is there and intact."""
    index = read_index(path)
    if steps > len(index):
        raise ConfigError("run.steps", f"{steps} steps, but {rollouts_dir(path)} recorded only {len(index)}")
    for rec in index[:steps]:
        load_batch(path, rec)
    return index[:steps]


# ---------------------------------------------------------------------- rollout_only: the recorder process
def run_recorder(cfg: SlipstreamConfig, run_dir: Path, broker_endpoint: str, engine_urls: list[str]) -> int:
    """The trainer's place in ``rollout_only``: take each step's batch, record it, commit it, move
    every engine's version label on (same weights) and announce the version."""
    from pipeline.rundir import port_file
    from pipeline.transport import CurveKeys, TrainerClient

    write_json_atomic(port_file(run_dir, "trainer"), {"metrics_port": 0})
    client = TrainerClient(broker_endpoint, "recorder-0", Limits(max_message_bytes=cfg.queue.max_message_bytes), hwm=cfg.queue.socket_hwm,
                           heartbeat_interval_s=cfg.queue.heartbeat_interval_s, peer_timeout_s=cfg.queue.peer_timeout_s,
                           curve=CurveKeys.from_config(cfg.queue))
    recorder = Recorder(run_dir)
    version = 0
    client.hello(version, timeout_s=cfg.run.startup_timeout_s)
    t0 = time.monotonic()
    try:
        for step in range(1, cfg.run.steps + 1):
            batch = client.request_batch(step, version, cfg.queue.groups_per_step, 1, cfg.run.batch_timeout_s)
            rec = recorder.write(step, batch, version)
            client.commit(batch.lease_id, step, version + 1, timeout_s=cfg.run.startup_timeout_s)
            version += 1
            for url in engine_urls:  # the engines' weights stay; their version label follows the steps
                _post(f"{url}/update_weight_version", {"new_version": version, "abort_all_requests": False}, cfg.weights.group_timeout_s)
            client.published(version)
            with (run_dir / "steps.jsonl").open("a") as f:
                f.write(json.dumps(_step_line(step, version, batch, rec, time.monotonic() - t0)) + "\n")
    finally:
        client.close()
    log.info("recorder: %d steps recorded to %s", cfg.run.steps, recorder.dir)
    return 0


def _post(url: str, payload: dict[str, Any], timeout_s: float) -> None:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        reply = json.loads(r.read() or b"{}")
    if reply.get("success") is False:
        raise RuntimeError(f"{url}: {reply.get('message', reply)}")


def _step_line(step: int, version: int, batch: Batch, rec: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """A ``steps.jsonl`` line of a recorded (not trained) step: what the console and the sweep read."""
    trajs = [t for g in batch.groups for t in g.trajectories]
    stale = [version - 1 - t.min_version for t in trajs]
    return {"step": step, "policy_version": version, "reward_mean": sum(t.reward for t in trajs) / len(trajs),
            "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
            "tokens_trained": int(sum(int(t.loss_mask.sum()) for t in trajs)), "trajectories": len(trajs),
            "trajectories_dropped": batch.dropped, "queue_depth": batch.queue_depth, "wall_time_s": wall_s, "recorded": rec["file"]}


class NullPublisher:
    """The trainer's publisher when no engine is there (``train_only``): a version is "published"
    as soon as it exists; the broker still gets ``Published`` for it, so admission control and
    staleness run on as usual."""

    engine_urls: list[str] = []

    def connect(self, remote_parts: Any = None) -> None:
        log.info("no engines (run.mode = 'train_only'): weights are not streamed anywhere")

    def publish(self, named: Any, version: int, checksum: bool = True) -> dict[str, Any]:
        return {"seconds": 0.0, "bytes": 0, "buckets": 0, "checksum": "", "version": version, "pause_s": 0.0, "rejoined": 0}


# ---------------------------------------------------------------------- train_only: the replayer process
@dataclass
class Pending:
    group: TrajectoryGroup
    frames: list[bytes]
    sent_at: float


class Replayer:
    """The producers' place in ``train_only``: the recorded groups to the broker, in order, as a
    producer sends them (hello, credits, acks and resends, heartbeats)."""

    def __init__(self, cfg: SlipstreamConfig, source: str | Path, broker_endpoint: str, producer_id: str = "replayer-0") -> None:
        from pipeline.transport import CurveKeys, configure_socket

        self.cfg = cfg
        self.source = source
        self.producer_id = producer_id
        self.epoch = time.time_ns() // 1000
        self.limits = Limits(max_message_bytes=cfg.queue.max_message_bytes)
        self.index = check_recording(source, cfg.run.steps)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        configure_socket(self.sock, cfg.queue.socket_hwm, cfg.queue.max_message_bytes)
        curve = CurveKeys.from_config(cfg.queue)
        if curve is not None:
            curve.client(self.sock)
        self.sock.connect(broker_endpoint)
        self.version = -1  # unknown until the welcome
        self.credits = 0
        self.outbox: dict[int, Pending] = {}
        self.seq = itertools.count()
        self.stats: dict[str, Any] = {"producer_id": producer_id, "replayed_from": str(rollouts_dir(source)), "groups_generated": 0,
                                      "trajectories_generated": 0, "tokens_generated": 0, "groups_acked": 0, "groups_resent": 0,
                                      "requeues_not_replayable": 0, "rejected": {}}
        self._last_heartbeat = 0.0
        self._last_broker = time.monotonic()

    def groups(self) -> Iterator[TrajectoryGroup]:
        for rec in self.index:
            yield from load_batch(self.source, rec, self.limits).groups

    def _send(self, msg: Any) -> None:
        self.sock.send_multipart(encode(msg), copy=False)

    def _hello(self) -> None:
        self._send(Hello(role="producer", peer_id=self.producer_id, epoch=self.epoch, pid=os.getpid()))

    def run(self, stop: Any) -> None:
        """Until ``stop()`` is true: send every recorded group, then keep the link alive."""
        self._hello()
        todo = self.groups()
        nxt: TrajectoryGroup | None = next(todo, None)
        while not stop():
            self._pump(0.05)
            now = time.monotonic()
            if now - self._last_heartbeat >= self.cfg.queue.heartbeat_interval_s:
                self._send(Heartbeat(peer_id=self.producer_id, sent_at=time.time()))
                self._last_heartbeat = now
                for p in self.outbox.values():
                    if now - p.sent_at > self.cfg.producer.ack_timeout_s:
                        p.sent_at = now
                        self.stats["groups_resent"] += 1
                        self.sock.send_multipart(p.frames, copy=True)
            if now - self._last_broker > self.cfg.queue.peer_timeout_s:
                log.warning("replayer: no message from the broker for %.0fs; saying hello again", now - self._last_broker)
                self._hello()
                self._last_broker = now
            if nxt is None or self.version < 0:
                continue
            if self.credits <= 0:
                self._send(CreditRequest(want=self.cfg.producer.max_inflight_groups))
                self._pump(0.2)
                continue
            if nxt.max_version > self.version:  # the broker refuses tokens newer than its published version
                continue
            self._send_group(nxt)
            nxt = next(todo, None)
            if nxt is None:
                log.info("replayer: all %d recorded groups sent", self.stats["groups_generated"])

    def _send_group(self, g: TrajectoryGroup) -> None:
        seq = next(self.seq)
        group = TrajectoryGroup(group_id=g.group_id, prompt_id=g.prompt_id, producer_id=self.producer_id, epoch=self.epoch, seq=seq,
                                trajectories=g.trajectories, metadata=dict(g.metadata))
        frames = [bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in encode(group)]
        self.outbox[seq] = Pending(group, frames, time.monotonic())
        self.credits -= 1
        self.stats["groups_generated"] += 1
        self.stats["trajectories_generated"] += len(group.trajectories)
        self.stats["tokens_generated"] += int(sum(int(t.loss_mask.sum()) for t in group.trajectories))
        self.sock.send_multipart(frames, copy=True)

    def _pump(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if not self.sock.poll(timeout=max(0, int(left * 1000))):
                return
            try:
                msg = decode(self.sock.recv_multipart(copy=False), self.limits)
            except WireError as e:
                log.error("replayer: undecodable message from the broker: %s", e)
                continue
            self._last_broker = time.monotonic()
            self._on(msg)

    def _on(self, msg: Any) -> None:
        if isinstance(msg, Welcome):
            self.version = max(self.version, msg.policy_version)
            self.credits = 0
            for p in self.outbox.values():  # a restarted broker: resend what it has not acked
                self.sock.send_multipart(p.frames, copy=True)
        elif isinstance(msg, Credit):
            self.credits += msg.granted
        elif isinstance(msg, VersionAnnouncement):
            self.version = max(self.version, msg.policy_version)
        elif isinstance(msg, Ack):
            if msg.epoch == self.epoch and self.outbox.pop(msg.seq, None) is not None:
                self.stats["groups_acked"] += 1
        elif isinstance(msg, Error):
            self._on_error(msg)
        elif isinstance(msg, Requeue):
            # A recorded group cannot be regenerated: the batches would differ from the recording from here on.
            self.stats["requeues_not_replayable"] += 1
            log.error("replayer: the broker requeued prompt %s as too stale; a replay cannot regenerate it, so later batches differ "
                      "from the recording (replay with the recording's queue.max_staleness)", msg.prompt_id)
        elif isinstance(msg, Shutdown):
            log.info("replayer: the broker asked us to stop: %s", msg.reason)

    def _on_error(self, err: Error) -> None:
        if err.code == "not_registered":
            self._hello()
            return
        p = self.outbox.get(err.seq) if err.epoch == self.epoch else None
        if p is None:
            log.error("replayer: broker error [%s]: %s", err.code, err.message)
            return
        if err.code == "queue_full":
            p.sent_at = time.monotonic()  # resent after producer.ack_timeout_s
            return
        del self.outbox[err.seq]
        self.stats["rejected"][err.code] = self.stats["rejected"].get(err.code, 0) + 1
        log.error("replayer: the broker rejected recorded group %s: [%s] %s", p.group.group_id, err.code, err.message)

    def close(self) -> None:
        self.sock.close(linger=1000)
