"""Stream trainer weights to inference engines over SGLang's weight-update HTTP API (DESIGN §8).

What: :class:`WeightPublisher` runs on the publishing trainer rank (global rank 0).  It drives any
server that speaks SGLang's HTTP subset (slipstream's embedded engine, or real SGLang), through
three seams, each with one implementation per kind:

* the contract (:mod:`schemas.weight_update`): routes and typed requests, shared with the engine;
* the engine kind (:mod:`consumers.engine_driver`): what brackets an update (SGLang: pause and
  continue) and which requests announce it;
* the transport (:mod:`consumers.transports`): how the bytes get there (a broadcast over a weight
  group: NCCL on GPU, gloo on CPU).

1. :meth:`WeightPublisher.connect`: the transport asks every engine ``i`` to join a weight-update
   group (``POST /init_weights_update_group`` with ``rank_offset = 1 + i``, ``world_size = 1 +
   len(engines)``; engines with several ranks, e.g. SGLang with TP > 1, via ``ranks_per_engine``),
   and joins it itself as rank 0 (its own TCPStore, not the trainer's world).
2. :meth:`WeightPublisher.publish`: the driver brackets the update, the transport moves it (the
   tensors in the dict's order, in buckets of at most ``bucket_bytes``; a flat snapshot in one
   broadcast) and returns once every engine swapped it in, so when ``publish`` returns every engine
   serves that version.  The result is a :class:`PublishResult`.
3. Pipeline stages (``remote_parts``, :mod:`consumers.stage_publish`): other trainer ranks
   (pipeline-stage leaders) broadcast their stages' tensors over weight groups they host; the
   publisher asks every engine to join those groups too and announces their tensors (it knows
   only their layout).
4. Joining: with ``resync=True`` each publish first asks every engine its ``weight_version``
   (``GET /get_model_info``).  If one lags (restarted, or joined late) or does not answer yet, the
   publisher waits (up to ``rejoin_timeout_s``) until every engine answers, re-creates the weight
   group with all of them, and the publish then brings every engine to the current version.

Every HTTP call has a timeout, and every failure names the engine URL, the route and what was
awaited (:mod:`consumers.engine_http`).

How:

    pub = WeightPublisher(["http://127.0.0.1:30000"], backend="gloo", bucket_bytes=64 << 20)
    pub.connect()
    result = pub.publish(trainer.export_hf_state(), version=1)   # PublishResult(seconds, bytes, ...)
    pub.close()
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from consumers.bucket_send import RemotePart, bucket_sizes, plan_buckets
from consumers.engine_driver import ENGINE_KINDS, EngineDriver, chunked_update_payload, make_driver
from consumers.engine_http import Connections, EngineCalls, PublishError, free_port, post_json, spawn
from consumers.transports import BroadcastTransport
from pipeline.weightsync import DEFAULT_GROUP_NAME, weights_checksum
from schemas.weight_update import BACKENDS, PAUSE_MODES, ROUTE_MODEL_INFO

log = logging.getLogger(__name__)

__all__ = [
    "Connections", "PublishError", "PublishResult", "RemotePart", "WeightPublisher", "bucket_sizes",
    "chunked_update_payload", "free_port", "plan_buckets", "post_json", "spawn",
]


@dataclass
class PublishResult:
    """What one publish did.  ``seconds``: wall time; ``bytes``: every part's bytes; ``buckets``:
    requests' worth of buckets sent; ``checksum``: the published weights' (``""`` when skipped);
    ``pause_s``: how long generation stood still; ``rejoined``: weight groups re-created first;
    ``timings``: where the time went (resync, checksum, flatten, send, the slowest engine's
    ``engine_*`` account of its request).  Per-stage publishing adds ``parts`` (per part: stage,
    group, tensors, bytes, engine_receive_s) and ``engine_parts``; a stage leader's own result has
    ``stage`` and ``group``."""

    version: int
    seconds: float = 0.0
    bytes: int = 0
    buckets: int = 0
    checksum: str = ""
    pause_s: float = 0.0
    rejoined: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    parts: list[dict[str, Any]] | None = None
    engine_parts: list[int] | None = None
    stage: int | None = None
    group: str | None = None


class WeightPublisher:
    """Publishes versioned weights from trainer rank 0 to engines; see the module docstring."""

    def __init__(
        self,
        engine_urls: list[str],
        master_address: str = "127.0.0.1",
        backend: str = "gloo",
        bucket_bytes: int = 64 << 20,
        group_name: str = DEFAULT_GROUP_NAME,
        timeout_s: float = 60.0,
        ranks_per_engine: list[int] | None = None,
        engine_kind: str = "embedded",
        pause_mode: str = "in_place",
        flush_cache: bool = True,
        resync: bool = False,
        rejoin_timeout_s: float = 120.0,
    ) -> None:
        """``ranks_per_engine``: how many group ranks each engine brings (its TP size for SGLang,
        which joins as ``rank_offset + tp_rank``); default 1 each.  ``engine_kind``/``pause_mode``/
        ``flush_cache``/``resync``: see ``consumers.weights_config.WeightSyncConfig``."""
        if engine_kind not in ENGINE_KINDS:
            raise ValueError(f"engine_kind must be 'embedded' or 'sglang', got {engine_kind!r}")
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"pause_mode must be 'in_place', 'retract' or 'abort', got {pause_mode!r}")
        if not engine_urls:
            raise ValueError("WeightPublisher needs at least one engine URL")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if bucket_bytes <= 0 or timeout_s <= 0:
            raise ValueError("bucket_bytes and timeout_s must be > 0")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.master_address = master_address
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.resync = resync
        self.rejoin_timeout_s = rejoin_timeout_s
        self.driver: EngineDriver = make_driver(engine_kind, pause_mode, flush_cache)
        self.calls = EngineCalls(self.engine_urls, timeout_s)
        self.transport = BroadcastTransport(self.calls, master_address, backend, bucket_bytes, group_name, ranks_per_engine)
        self.version: int | None = None  # last version every engine acknowledged
        self.rejoins = 0  # how many times the group was re-created for a lagging engine
        self.remote_parts: list[RemotePart] = []  # other pipeline stages' groups (consumers.stage_publish)

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def engine_kind(self) -> str:
        return self.driver.kind

    @property
    def ranks_per_engine(self) -> list[int]:
        return self.transport.ranks_per_engine

    @property
    def backend(self) -> str:
        return self.transport.backend

    @property
    def bucket_bytes(self) -> int:
        return self.transport.bucket_bytes

    @bucket_bytes.setter
    def bucket_bytes(self, value: int) -> None:
        self.transport.bucket_bytes = value

    @property
    def master_port(self) -> int | None:
        return self.transport.master_port

    # ------------------------------------------------------------------ joining
    def engine_versions(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Each engine's ``weight_version`` from ``GET /get_model_info`` (None: no answer)."""
        return self.calls.engine_versions(timeout_s)

    def _resync(self) -> None:
        """Re-create the group when an engine lags the last published version or is unreachable
        (restarted, or joined late); waits up to ``rejoin_timeout_s`` for every engine to answer."""
        if self.resync_needed():
            self.close()  # best effort: engines still in the old group leave it
            self.connect()
            self.rejoins += 1

    def resync_needed(self) -> bool:
        """True if an engine lags the last published version or was unreachable (then waits, up to
        ``rejoin_timeout_s``, until every engine answers): the weight group(s) must be re-created
        before the next publish.  Per-stage publishing (:mod:`consumers.stage_publish`) calls this
        and re-creates every stage's group itself."""
        if self.version is None or not self.connected:
            return False
        versions = self.engine_versions(timeout_s=min(self.timeout_s, 10.0))
        lagging = {u: v for u, v in versions.items() if v != str(self.version)}
        if not lagging:
            return False
        log.warning("weight publisher: engine(s) not at v%d: %s; re-creating the weight group", self.version, lagging)
        deadline = time.monotonic() + self.rejoin_timeout_s
        while any(v is None for v in versions.values()):
            silent = [u for u, v in versions.items() if v is None]
            if time.monotonic() > deadline:
                raise PublishError(
                    f"engine(s) {', '.join(silent)} did not answer {ROUTE_MODEL_INFO} within {self.rejoin_timeout_s:.0f}s "
                    "while the publisher waited for them to come back (weights.rejoin_timeout_s)"
                )
            log.info("weight publisher: waiting for %s to answer %s (%.0fs left)", silent, ROUTE_MODEL_INFO, deadline - time.monotonic())
            time.sleep(0.5)
            versions = self.engine_versions(timeout_s=min(self.timeout_s, 10.0))
        return True

    # ------------------------------------------------------------------ API
    def connect(self, remote_parts: list[RemotePart] | None = None) -> None:
        """Create the weight-update group: engines join as ranks 1..N, this process as rank 0.
        ``remote_parts`` (per-stage publishing): the engines also join each part's group (the same
        engine ranks; its leader hosts the rendezvous and is rank 0), and every publish announces
        the parts' tensors after ours."""
        if self.connected:
            return
        if remote_parts is not None:
            self.remote_parts = list(remote_parts)
        self.transport.connect(self.remote_parts)

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> PublishResult:
        """Send every tensor to every engine; when it returns, every engine has swapped in
        ``version``.  ``checksum=False`` skips hashing every byte (costly for large models; the
        checksum is then "")."""
        if not self.connected:
            raise PublishError("publish() before connect()")
        if not named:
            raise ValueError("nothing to publish: the state dict is empty (not the publishing rank?)")
        t0 = time.perf_counter()
        rejoins = self.rejoins
        if self.resync:
            self._resync()
        t_sum = time.perf_counter()
        digest = weights_checksum(named) if checksum else ""
        timings = {"resync_s": t_sum - t0, "checksum_s": time.perf_counter() - t_sum, "flatten_s": 0.0, "send_s": 0.0}
        t_bracket = time.perf_counter()
        self.driver.begin(self.calls, version)
        try:
            sent = self.transport.send(named, version, self.driver, timings)
        except BaseException:
            self.driver.abort(self.calls, version)
            raise
        self.driver.end(self.calls, version)
        pause_s = self.driver.pause_seconds(sent.replies, time.perf_counter() - t_bracket)
        self.version = version
        seconds = time.perf_counter() - t0
        parts = self._parts_info(named) if self.remote_parts else []
        total = sent.bytes + sum(p["bytes"] for p in parts[1:])  # the other stages' leaders sent these
        log.info(
            "published version %d: %.1f MiB in %d bucket(s) to %d engine(s) in %.3fs (generation paused %.2f ms)",
            version, total / 2**20, sent.buckets, len(self.engine_urls), seconds, pause_s * 1e3,
        )
        result = PublishResult(version=version, seconds=seconds, bytes=total, buckets=sent.buckets, checksum=digest,
                               pause_s=pause_s, rejoined=self.rejoins - rejoins, timings=dict(timings))
        if self.remote_parts:
            result.parts = parts
            result.engine_parts = [len(r.get("parts") or []) for r in sent.replies]  # as each engine's reply reports
            for p in parts:  # the engines' receive time per part (slowest engine), when they report it
                p["engine_receive_s"] = max((float(e.get("receive_s", 0.0)) for r in sent.replies for e in r.get("parts") or []
                                             if e.get("group_name") == p["group"]), default=None)
                log.info("version %d, stage %d: %.1f MiB over group %r (engines received it in %s)", version, p["stage"],
                         p["bytes"] / 2**20, p["group"],
                         "n/a" if p["engine_receive_s"] is None else f"{p['engine_receive_s']:.3f}s")
        return result

    def _parts_info(self, named: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Per part (ours first): stage, group, tensor count and bytes."""
        return [{"stage": stage, "group": group, "tensors": len(tensors), "bytes": bucket_sizes(tensors, [list(tensors)])[0]}
                for stage, group, tensors in [(0, self.group_name, named),
                                              *((p.stage, p.group_name, p.meta) for p in self.remote_parts)]]

    def close(self) -> None:
        """Ask engines to leave the group(s) (best effort) and drop ours."""
        self.transport.close()
        self.calls.close()
