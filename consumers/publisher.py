"""Stream trainer weights to inference engines over SGLang's weight-update HTTP API (DESIGN §8).

What: :class:`WeightPublisher` runs on the publishing trainer rank (global rank 0).  It drives any
server that speaks SGLang's HTTP subset (slipstream's embedded engine, or real SGLang), through
three seams, each with one implementation per kind:

* the contract (:mod:`schemas.weight_update`): routes and typed requests, shared with the engine;
* the engine kind (:mod:`consumers.engine_driver`): what brackets an update (SGLang: pause and a
  weight-update session) and which requests announce it;
* the transport (:mod:`consumers.transports`): how the bytes get there, chosen per engine from
  placement (``weights.transport``): a broadcast over a weight group (NCCL on GPU, gloo on CPU), or
  CUDA IPC of the trainer's snapshot for an engine on the trainer's own GPU.  One publish may mix
  both.

1. :meth:`WeightPublisher.connect`: asks every engine where it runs (``/get_server_info``), picks
   its transport, and connects each engine on its own (a broadcast engine joins a weight group of
   its own: this process is rank 0, the engine ``1..ranks``).  Every engine must join at connect.
2. :meth:`WeightPublisher.publish`: every in-sync engine gets the version at once, each within
   ``update_timeout_s`` (:func:`consumers.engine_links.update_all`).  An engine that fails or misses
   the deadline is taken out for that version and marked stale (counted and logged with its URL,
   the version and what timed out); the others, and the trainer, carry on.  When ``publish``
   returns, every in-sync engine serves the version (:class:`PublishResult` lists the stale ones).
3. Rejoining: a stale engine is resynced in the background (:func:`consumers.engine_links.rejoin`)
   and gets the current weights with the next publish.  With ``resync=True`` each publish first
   asks the in-sync engines their ``weight_version``: one that lags (restarted) is re-joined then
   and there if it answers, else in the background.  An engine stale for longer than
   ``rejoin_timeout_s`` fails the publish, naming it.
4. Pipeline stages (``remote_parts``, :mod:`consumers.stage_publish`): other trainer ranks
   (pipeline-stage leaders) broadcast their stages' tensors over weight groups they host; then all
   engines share one weight group per stage (the stage leaders host them), there is no isolation
   between engines, and a failure fails the publish (the stage publisher re-creates every group).

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
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from consumers.bucket_send import RemotePart, bucket_sizes, plan_buckets
from consumers.engine_driver import ENGINE_KINDS, EngineDriver, chunked_update_payload, make_driver
from consumers.engine_http import Connections, EngineCalls, PublishError, free_port, post_json, spawn
from consumers.engine_links import EngineLink, WeightSyncMetrics, rejoin, update_all
from consumers.ipc import SharedAllocator
from consumers.snapshot import Allocate
from consumers.transports import BroadcastTransport, IPCTransport, Sent, WeightTransport, choose_transport
from pipeline.weightsync import DEFAULT_GROUP_NAME, device_identity, weights_checksum
from schemas.weight_update import BACKENDS, DEVICE_FIELD, PAUSE_MODES, ROUTE_MODEL_INFO

log = logging.getLogger(__name__)

__all__ = [
    "Connections", "PublishError", "PublishResult", "RemotePart", "WeightPublisher", "as_result", "bucket_sizes",
    "chunked_update_payload", "free_port", "plan_buckets", "post_json", "spawn",
]
TRANSPORTS = ("auto", "broadcast", "ipc")


@dataclass
class PublishResult:
    """What one publish did.  ``seconds``: wall time; ``bytes``: the version's bytes (every
    in-sync engine got them; with pipeline stages every part's); ``buckets``: buckets sent;
    ``checksum``: the published weights' (``""`` when skipped); ``pause_s``: how long generation
    stood still (the longest engine); ``rejoined``: engines brought back into sync since the last
    publish; ``stale``: engines out of sync after it (URL -> why); ``transports``: URL -> transport;
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
    stale: dict[str, str] = field(default_factory=dict)
    transports: dict[str, str] = field(default_factory=dict)
    parts: list[dict[str, Any]] | None = None
    engine_parts: list[int] | None = None
    stage: int | None = None
    group: str | None = None


def as_result(info: PublishResult | dict[str, Any], version: int) -> PublishResult:
    """``info`` as a :class:`PublishResult` (duck-typed publishers, e.g. ``pipeline.record.NullPublisher``,
    return a dict of the same fields)."""
    if isinstance(info, PublishResult):
        return info
    known = {k: v for k, v in info.items() if k in PublishResult.__dataclass_fields__ and k != "version"}
    return PublishResult(version=version, **known)


def _check_options(engine_urls: list[str], engine_kind: str, pause_mode: str, backend: str, transport: str,
                   bucket_bytes: int, timeout_s: float) -> None:
    """:class:`WeightPublisher`'s argument checks: a ValueError naming the bad one."""
    if engine_kind not in ENGINE_KINDS:
        raise ValueError(f"engine_kind must be 'embedded' or 'sglang', got {engine_kind!r}")
    if pause_mode not in PAUSE_MODES:
        raise ValueError(f"pause_mode must be 'in_place', 'retract' or 'abort', got {pause_mode!r}")
    if not engine_urls:
        raise ValueError("WeightPublisher needs at least one engine URL")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {transport!r}")
    if bucket_bytes <= 0 or timeout_s <= 0:
        raise ValueError("bucket_bytes and timeout_s must be > 0")


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
        transport: str = "broadcast",
        update_timeout_s: float | None = None,
        device: torch.device | None = None,
        snapshot_budget_bytes: int | None = None,
        metrics: WeightSyncMetrics | None = None,
    ) -> None:
        """``ranks_per_engine``: how many group ranks each engine brings (its TP size for SGLang,
        which joins as ``rank_offset + tp_rank``); default 1 each.  ``transport``: 'auto' |
        'broadcast' | 'ipc' (``weights.transport``); ``device``: where this process's weights live
        (compared with each engine's); ``update_timeout_s``: the deadline of one engine's update
        (default ``timeout_s``).  The rest: see ``consumers.weights_config.WeightSyncConfig``."""
        _check_options(engine_urls, engine_kind, pause_mode, backend, transport, bucket_bytes, timeout_s)
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.ranks_per_engine = list(ranks_per_engine or [1] * len(self.engine_urls))
        if len(self.ranks_per_engine) != len(self.engine_urls) or min(self.ranks_per_engine) < 1:
            raise ValueError("ranks_per_engine needs one positive entry per engine URL")
        self.master_address = master_address
        self.backend = backend
        self._bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.resync = resync
        self.rejoin_timeout_s = rejoin_timeout_s
        self.transport_mode = transport
        self.update_timeout_s = update_timeout_s or timeout_s
        self.device = device or torch.device("cpu")
        self.snapshot_budget_bytes = snapshot_budget_bytes
        self.metrics = metrics
        self.driver: EngineDriver = make_driver(engine_kind, pause_mode, flush_cache)
        self.calls = EngineCalls(self.engine_urls, timeout_s)  # every engine (server info, versions)
        self.links: list[EngineLink] = []
        self.allocator: SharedAllocator | None = None
        self.version: int | None = None  # last version published
        self.rejoins = 0  # engines brought back into sync (re-created groups)
        self.remote_parts: list[RemotePart] = []  # other pipeline stages' groups (consumers.stage_publish)
        self._late: list[Future] = []  # updates still running past their deadline
        self._closing = threading.Event()

    @property
    def connected(self) -> bool:
        """Connected (engines may still be out of sync: see ``PublishResult.stale``)."""
        return bool(self.links)

    @property
    def engine_kind(self) -> str:
        return self.driver.kind

    @property
    def bucket_bytes(self) -> int:
        return self._bucket_bytes

    @bucket_bytes.setter
    def bucket_bytes(self, value: int) -> None:
        self._bucket_bytes = value
        for link in self.links:
            if isinstance(link.transport, BroadcastTransport):
                link.transport.bucket_bytes = value

    @property
    def transports(self) -> dict[str, str]:
        """Engine URL -> its transport ('broadcast' or 'ipc')."""
        return {url: link.transport.kind for link in self.links for url in link.urls}

    @property
    def snapshot_allocator(self) -> Allocate | None:
        """Where a publish snapshot should come from so that IPC engines can map it (None: no
        engine takes IPC)."""
        return self.allocator

    def snapshot_busy(self) -> bool:
        """An update that missed its deadline may still read the last snapshot."""
        self._late = [f for f in self._late if not f.done()]
        return bool(self._late)

    # ------------------------------------------------------------------ connect
    def _links(self) -> list[EngineLink]:
        """One link per engine with its chosen transport; one shared broadcast link with parts."""
        if self.remote_parts:
            if self.transport_mode == "ipc":
                raise PublishError("weights.transport 'ipc' does not work with per-stage publishing "
                                   "(weights.per_stage_publish): each stage would share its own buffer")
            transport = BroadcastTransport(self.calls, self.master_address, self.backend, self._bucket_bytes,
                                           self.group_name, self.ranks_per_engine)
            return [EngineLink(self.calls, transport, "per-stage publishing: one weight group per stage")]
        mine = device_identity(self.device)
        infos = self.calls.server_infos() if self.transport_mode != "broadcast" else {}
        links = []
        for url, ranks in zip(self.engine_urls, self.ranks_per_engine, strict=True):
            info = infos.get(url)
            kind, why = choose_transport(self.transport_mode, mine, None if info is None else info.get(DEVICE_FIELD), url)
            calls = EngineCalls([url], self.timeout_s, self.calls.connections)
            transport: WeightTransport
            if kind == "ipc":
                if self.allocator is None:
                    self.allocator = SharedAllocator()
                transport = IPCTransport(calls, self.allocator, ranks, self.snapshot_budget_bytes)
            else:
                transport = BroadcastTransport(calls, self.master_address, self.backend, self._bucket_bytes, self.group_name, [ranks])
            links.append(EngineLink(calls, transport, why))
        return links

    def connect(self, remote_parts: list[RemotePart] | None = None) -> None:
        """Connect every engine (each must join).  ``remote_parts`` (per-stage publishing): the
        engines also join each part's group (its leader hosts the rendezvous and is rank 0), and
        every publish announces the parts' tensors after ours."""
        if self.connected:
            return
        if remote_parts is not None:
            self.remote_parts = list(remote_parts)
        self.links = self._links()
        futures = [spawn(link.transport.connect, self.remote_parts) for link in self.links]
        errors = []
        for link, fut in zip(self.links, futures, strict=True):
            try:
                fut.result(timeout=self.timeout_s + 15.0)
            except Exception as e:
                errors.append(str(e) if isinstance(e, PublishError) else f"{link.name}: {e!r}")
        if errors:
            for link in self.links:
                link.transport.close()
            raise PublishError("; ".join(errors))
        for link in self.links:
            log.info("weight publisher: %s gets weights by %s (%s)", link.name, link.transport.kind, link.reason)

    # ------------------------------------------------------------------ joining
    def engine_versions(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Each engine's ``weight_version`` from ``GET /get_model_info`` (None: no answer)."""
        return self.calls.engine_versions(timeout_s)

    def resync_needed(self) -> bool:
        """Per-stage publishing (:mod:`consumers.stage_publish`): True if an engine lags the last
        published version or was unreachable (then waits, up to ``rejoin_timeout_s``, until every
        engine answers): every stage's group must be re-created before the next publish."""
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

    def _isolated(self) -> bool:
        return not self.remote_parts

    def _fall_out(self, link: EngineLink, version: int, reason: str, error: str) -> None:
        """Take ``link`` out of sync for ``version`` (counted, logged) and rejoin it in the background."""
        link.mark_stale(version, error)
        if self.metrics is not None:
            self.metrics.failures.labels(reason).inc()
        log.error("weight sync: %s taken out of version %d (%s; it holds v%s, marked stale): %s", link.name, version,
                  reason, link.version, error)
        link.transport.abandon()
        link.rejoin = spawn(rejoin, link, self.rejoin_timeout_s, self._closing)

    def _catch_up(self) -> int:
        """Stale engines whose background rejoin finished are back in sync; an engine stale for
        longer than ``rejoin_timeout_s`` fails the publish.  Returns how many came back."""
        back = 0
        for link in self.links:
            if link.stale and link.rejoin is not None and link.rejoin.done():
                err = link.rejoin.exception()
                if err is not None:
                    raise err if isinstance(err, PublishError) else PublishError(f"{link.name}: rejoin failed: {err!r}")
                link.stale_since, link.rejoin = None, None  # in the updates again; in sync once one succeeds
                back += 1
            if link.out_for() > self.rejoin_timeout_s:  # it rejoins, then fails again: give up, loudly
                raise PublishError(f"engine(s) {link.name} out of weight sync since version {link.stale_version} for "
                                   f"{link.out_for():.0f}s, longer than weights.rejoin_timeout_s = {self.rejoin_timeout_s:.0f}s; "
                                   f"last error: {link.last_error}")
        return back

    def _check_versions(self, version: int) -> int:
        """``resync``: in-sync engines that no longer hold the version they acknowledged (restarted)
        rejoin now if they answer, else fall out and rejoin in the background.  Returns how many
        rejoined now."""
        live = [link for link in self.links if not link.stale]
        if self.version is None or not live:
            return 0
        back = 0
        versions = EngineCalls([u for link in live for u in link.urls], self.timeout_s, self.calls.connections).engine_versions(
            timeout_s=min(self.timeout_s, 10.0))
        for link in live:
            got = [versions.get(u) for u in link.urls]
            if link.version is None or all(v == str(link.version) for v in got):  # it holds what it acknowledged
                continue
            if any(v is None for v in got):
                self._fall_out(link, version, "unreachable", f"did not answer {ROUTE_MODEL_INFO} (restarting?)")
                continue
            log.warning("weight publisher: %s at v%s, not v%d (restarted?): rejoining it", link.name, got, self.version)
            try:
                link.transport.close()
                link.transport.connect(self.remote_parts)
                back += 1
            except PublishError as e:
                self._fall_out(link, version, "error", str(e))
        return back

    # ------------------------------------------------------------------ publish
    def _update(self, link: EngineLink, named: Mapping[str, torch.Tensor], version: int, timings: dict[str, float]) -> Sent:
        """One engine's (or shared group's) update: the driver's bracket around the transport."""
        link.step = "opening the update (pause, session)"
        t_bracket = time.perf_counter()
        self.driver.begin(link.calls, version)
        try:
            link.step = f"sending version {version} ({link.transport.kind})"
            sent = link.transport.send(named, version, self.driver, timings)
        except BaseException:
            self.driver.abort(link.calls, version)
            raise
        link.step = "closing the update (session, continue)"
        self.driver.end(link.calls, version)
        timings["pause_s"] = self.driver.pause_seconds(sent.replies, time.perf_counter() - t_bracket)
        return sent

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> PublishResult:
        """Send every tensor to every in-sync engine; when it returns, each of them has swapped in
        ``version`` (see the module docstring for the failure rules).  ``checksum=False`` skips
        hashing every byte (costly for large models; the checksum is then "")."""
        if not self.connected:
            raise PublishError("publish() before connect()")
        if not named:
            raise ValueError("nothing to publish: the state dict is empty (not the publishing rank?)")
        t0 = time.perf_counter()
        rejoined = self._catch_up()
        if self.resync and self._isolated():
            rejoined += self._check_versions(version)
        elif self.resync and self.resync_needed():
            self.close()
            self.connect()
            rejoined += 1
        self.rejoins += rejoined
        if self.metrics is not None and rejoined:
            self.metrics.rejoins.inc(rejoined)
        t_sum = time.perf_counter()
        digest = weights_checksum(named) if checksum else ""
        base = {"resync_s": t_sum - t0, "checksum_s": time.perf_counter() - t_sum}
        live = [link for link in self.links if not link.stale]
        ok, failed, late = update_all(live, lambda link, timings: self._update(link, named, version, timings), self.update_timeout_s)
        self._late += late
        for link, (reason, error) in failed.items():
            if not self._isolated():  # one group for every engine: nothing to isolate; connect() starts clean
                link.transport.abandon()
                self.links = []
                raise PublishError(error)
            self._fall_out(link, version, reason, error)
        for link in ok:
            link.synced(version)
        self.version = version
        if self.metrics is not None:
            self.metrics.stale.set(sum(len(link.urls) for link in self.links if link.stale))
        result = publish_result(self, named, version, time.perf_counter() - t0, base, ok, rejoined)
        result.checksum = digest
        return result

    def close(self) -> None:
        """Ask engines to leave their groups (best effort), stop rejoining, release shared memory."""
        self._closing.set()
        for link in self.links:
            link.transport.close()
        self.links = []
        self._closing = threading.Event()
        if self.allocator is not None and not self.snapshot_busy():
            self.allocator.close()
            self.allocator = None
        self.calls.close()


def publish_result(pub: WeightPublisher, named: Mapping[str, torch.Tensor], version: int, seconds: float,
                   base: dict[str, float], ok: dict[EngineLink, Sent], rejoined: int) -> PublishResult:
    """The :class:`PublishResult` of one publish (the slowest in-sync engine's timings), logged."""
    slowest = max(ok, key=lambda link: link.timings.get("send_s", 0.0), default=None)
    sent = ok[slowest] if slowest is not None else Sent(0, 0)
    parts = _parts_info(pub, named) if pub.remote_parts else []
    total = sent.bytes + sum(p["bytes"] for p in parts[1:])  # the other stages' leaders sent these
    pause_s = max((link.timings.get("pause_s", 0.0) for link in ok), default=0.0)
    timings = {**base, "flatten_s": 0.0, "send_s": 0.0, **(slowest.timings if slowest is not None else {})}
    timings.pop("pause_s", None)
    stale = {link.name: link.last_error for link in pub.links if link.stale}
    log.info("published version %d: %.1f MiB in %d bucket(s) to %d engine(s) in %.3fs (generation paused %.2f ms)%s",
             version, total / 2**20, sent.buckets, sum(len(link.urls) for link in ok), seconds, pause_s * 1e3,
             f"; out of sync: {', '.join(stale)}" if stale else "")
    result = PublishResult(version=version, seconds=seconds, bytes=total, buckets=sent.buckets, pause_s=pause_s,
                           rejoined=rejoined, timings=timings, stale=stale, transports=pub.transports)
    if pub.remote_parts:
        result.parts = parts
        result.engine_parts = [len(r.get("parts") or []) for r in sent.replies]  # as each engine's reply reports
        for p in parts:  # the engines' receive time per part (slowest engine), when they report it
            p["engine_receive_s"] = max((float(e.get("receive_s", 0.0)) for r in sent.replies for e in r.get("parts") or []
                                         if e.get("group_name") == p["group"]), default=None)
            log.info("version %d, stage %d: %.1f MiB over group %r (engines received it in %s)", version, p["stage"],
                     p["bytes"] / 2**20, p["group"], "n/a" if p["engine_receive_s"] is None else f"{p['engine_receive_s']:.3f}s")
    return result


def _parts_info(pub: WeightPublisher, named: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per part (ours first): stage, group, tensor count and bytes."""
    return [{"stage": stage, "group": group, "tensors": len(tensors), "bytes": bucket_sizes(tensors, [list(tensors)])[0]}
            for stage, group, tensors in [(0, pub.group_name, named),
                                          *((p.stage, p.group_name, p.meta) for p in pub.remote_parts)]]
