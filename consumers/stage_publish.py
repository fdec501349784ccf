"""Per-stage weight publishing: each pipeline stage sends its own layers (DESIGN §8, ``weights.per_stage_publish``).

What: with ``trainer.pipeline_parallel > 1`` every trainer rank holds a :class:`StagePublisher`.
Each PP stage's *leader* (TP rank 0 of data-parallel replica 0: the rank that holds the stage's
HF export, :func:`consumers.bridge.export_hf_stage`) broadcasts its own stage's tensors over a
weight group of its own, ``pipeline.weightsync.part_group_name(base, k)``; so no stage's weights
travel through trainer rank 0.  Global rank 0 (stage 0's leader) stays the single controller: it
alone talks HTTP to the engines (:class:`consumers.publisher.WeightPublisher`, which learns the
other stages' groups as :class:`consumers.bucket_send.RemotePart`).  Stage leaders k >= 1 only
broadcast.

How it fits together (every step is a collective on the trainer world, called by every rank on
its main thread; nothing but the weight groups is used from background threads):

* :meth:`StagePublisher.connect` (``part``: this rank's export): each leader picks a free port on
  its address; an ``all_gather_object`` brings every part's group address and tensor layout
  (names, dtypes, shapes, in order) to every rank.  Leader k >= 1 then hosts its group's TCPStore
  as group rank 0, while rank 0 asks every engine to join every group (same engine ranks in each
  group) and joins its own.  A second ``all_gather_object`` shares the outcome: every rank raises
  the same :class:`~consumers.publisher.PublishError`, naming the stage and group that failed.
* :meth:`StagePublisher.prepare` (before each version): rank 0 decides whether the groups must be
  re-created (``weights.resync_engines``: an engine restarted or joined late; this may wait for it
  to answer), each leader checks its part's layout against the one announced at connect (layouts
  never change between steps; a change is an error naming the first difference) and, with
  checksums on, hashes its part's tensors (:func:`pipeline.weightsync.tensor_digests`).  One
  ``all_gather_object`` shares decision, errors and digests; rank 0 combines the digests into the
  checksum of the whole model, equal to the engines' ``/slipstream/weights_checksum`` exactly when
  every tensor arrived bit for bit.  On a resync every rank re-creates its groups (a fresh
  :meth:`connect`).
* :meth:`StagePublisher.send` (may run in a background thread: :class:`consumers.publish_async.
  AsyncPublisher` calls ``prepare`` on the loop thread and ``send`` on its own): rank 0 publishes
  its part and announces every part to the engines (embedded engine: one request per version with
  :data:`pipeline.weightsync.PARTS_FIELD`; SGLang: one request per bucket, part 0's buckets first,
  each with its part's ``group_name``); leader k broadcasts its part's buckets (the same
  :func:`~consumers.bucket_send.plan_buckets` plan with the same ``bucket_bytes``, so the byte sizes
  match what rank 0 announced).  Rank 0's ``send`` returns only once every engine swapped the
  whole version in, so ``Published(v)`` keeps its meaning; a leader's returns when its broadcast
  is done.  Version v+1's ``prepare`` is a collective that rank 0 enters only after v finished, so
  a leader never broadcasts v+1 before the engines asked for v.

Timeouts: with ``engine_kind="sglang"`` the engines take the parts one after the other, so leader
k's first broadcast waits while stages 0..k-1 are transferred: ``timeout_s`` (the trainer's
``weight_group_timeout_s``) must exceed one whole update's transfer.  With the embedded engine
the parts arrive in parallel.

Failures: a leader whose broadcast fails raises at its next ``prepare``/``wait``; the engines then
fail the whole update (nothing swapped, see ``producers.engine.weights``) and rank 0's publish
raises naming the engine and the group.  Every wait has a timeout (``timeout_s``, the weight
group's).

Run: not on its own; ``consumers.loop.run_trainer`` builds one per rank when
``trainer.pipeline_parallel > 1`` and ``weights.per_stage_publish``.  Tested by
``tests/test_stage_publish.py`` (torchrun, PP=2, a real embedded engine):

    /work/venv/bin/pytest tests/test_stage_publish.py -q
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from consumers.bucket_send import BucketSender, RemotePart, bucket_sizes, plan_buckets
from consumers.engine_http import PublishError, free_port, spawn
from consumers.publisher import PublishResult, WeightPublisher
from pipeline.weightsync import (
    WeightGroup,
    combine_digests,
    dtype_name,
    init_weight_group,
    part_group_name,
    tensor_digests,
)

log = logging.getLogger(__name__)

#: environment variable naming the address a stage leader's weight group listens on (default: the
#: trainer's weight address if it is a loopback one, else this host's address towards it)
ADDRESS_ENV = "SLIPSTREAM_WEIGHT_ADDRESS"

Layout = list[tuple[str, str, list[int]]]


def layout_of(named: Mapping[str, torch.Tensor]) -> Layout:
    """(name, dtype, shape) of every tensor, in order: what rank 0 announces for a part."""
    return [(n, dtype_name(t.dtype), list(t.shape)) for n, t in named.items()]


def layout_difference(announced: Layout, now: Layout) -> str | None:
    """The first difference between two layouts, in words, or None if equal."""
    if announced == now:
        return None
    for i, (a, b) in enumerate(zip(announced, now, strict=False)):
        if a != b:
            return f"tensor #{i} was {a[0]} {a[1]} {a[2]} at connect, is now {b[0]} {b[1]} {b[2]}"
    return f"{len(announced)} tensors at connect, {len(now)} now"


def stage_address(master_address: str) -> str:
    """The address a stage leader's TCPStore listens on: ``$SLIPSTREAM_WEIGHT_ADDRESS`` if set;
    else ``master_address`` (trainer rank 0's weight address) when it is a loopback address or
    this host's name; else this host's address on the route towards ``master_address``."""
    if os.environ.get(ADDRESS_ENV):
        return os.environ[ADDRESS_ENV]
    try:
        if master_address == "localhost" or ipaddress.ip_address(master_address).is_loopback:
            return master_address
    except ValueError:
        if master_address in (socket.gethostname(), socket.getfqdn()):
            return master_address
    family = socket.AF_INET6 if ":" in master_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((master_address, 1))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


@dataclass
class Prepared:
    """What :meth:`StagePublisher.prepare` decided for one version."""

    version: int
    checksum: str


class StagePublisher:
    """One per trainer rank; see the module docstring.  ``publisher``: rank 0's WeightPublisher
    (None elsewhere; build it with ``resync=False``: the resync decision is taken here)."""

    def __init__(
        self,
        publisher: WeightPublisher | None,
        stage: int,
        leader: bool,
        engine_urls: list[str],
        group_name: str,
        master_address: str = "127.0.0.1",
        backend: str = "gloo",
        bucket_bytes: int = 64 << 20,
        timeout_s: float = 60.0,
        resync: bool = False,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("StagePublisher needs torch.distributed (the trainer world) initialised")
        self.rank = dist.get_rank()
        if (self.rank == 0) != (publisher is not None):
            raise ValueError("exactly global rank 0 holds the WeightPublisher")
        if publisher is not None and publisher.resync:
            raise ValueError("build rank 0's WeightPublisher with resync=False: StagePublisher decides resyncs")
        self.publisher = publisher
        self.stage = stage
        self.leader = leader or self.rank == 0
        self.engine_urls = list(engine_urls)
        self.group_name = part_group_name(group_name, stage)
        self.master_address = master_address
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.resync = resync
        self.rejoins = 0
        self.layout: Layout | None = None  # this leader's part as announced at connect
        self._group: WeightGroup | None = None  # leaders k >= 1: the group they host
        self._sender = BucketSender(backend)

    @property
    def connected(self) -> bool:
        return self.layout is not None

    # ------------------------------------------------------------------ connect
    def connect(self, part: Mapping[str, torch.Tensor]) -> None:
        """Collective: create every stage's weight group; ``part`` is this rank's
        :func:`~consumers.bridge.export_hf_stage` (``{}`` on non-leaders)."""
        mine: dict[str, Any] | None = None
        if self.leader:
            address = self.master_address if self.rank == 0 else stage_address(self.master_address)
            mine = {"stage": self.stage, "rank": self.rank, "group_name": self.group_name, "address": address,
                    "port": 0 if self.rank == 0 else free_port(address), "layout": layout_of(part),
                    "error": None if part else "its stage leader has nothing to publish (empty export)"}
            if self.publisher is not None:
                mine["world"] = 1 + sum(self.publisher.ranks_per_engine)
        infos: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(infos, mine)
        parts = sorted((i for i in infos if i is not None), key=lambda i: i["stage"])
        empty = [f"stage {p['stage']} (rank {p['rank']}): {p['error']}" for p in parts if p["error"]]
        if empty:
            raise PublishError("per-stage weight groups not created: " + "; ".join(empty))
        stages = [p["stage"] for p in parts]
        if stages != list(range(len(parts))):
            raise PublishError(f"stage leaders announced stages {stages}, expected 0..{len(parts) - 1} once each")
        world = int(parts[0]["world"])
        error: str | None = None
        if self.publisher is not None:
            remote = [RemotePart(p["stage"], p["group_name"], p["address"], p["port"], [tuple(x) for x in p["layout"]])
                      for p in parts[1:]]
            try:
                self.publisher.connect(remote_parts=remote)
            except Exception as e:
                error = str(e)
        elif self.leader:
            error = self._host_group(mine, world)
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else (self.stage, self.rank, error))
        failed = [e for e in errors if e is not None]
        if failed:
            self._drop_group()
            raise PublishError("per-stage weight groups not created: " + "; ".join(
                f"stage {s} (rank {r}): {msg}" for s, r, msg in failed))
        self.layout = mine["layout"] if mine is not None else []
        log.info("per-stage publishing: %d stage group(s) ready (this rank: %s)", len(parts),
                 f"stage {self.stage} leader, group {self.group_name!r}" if self.leader else "no part")

    def _host_group(self, mine: dict[str, Any], world: int) -> str | None:
        """Leader k >= 1: host the group's rendezvous as group rank 0; None or the error text."""
        self._drop_group()
        fut = spawn(init_weight_group, mine["address"], mine["port"], rank=0, world_size=world,
                    backend=self.backend, group_name=self.group_name, timeout_s=self.timeout_s)
        try:
            self._group = fut.result(timeout=self.timeout_s + 10.0)
        except TimeoutError:
            return (f"weight group {self.group_name!r} at {mine['address']}:{mine['port']}: the engines did not join "
                    f"within {self.timeout_s:.0f}s")
        except Exception as e:
            return f"weight group {self.group_name!r} at {mine['address']}:{mine['port']}: {e}"
        log.info("stage %d: weight group %r hosted at %s:%d (world %d)", self.stage, self.group_name,
                 mine["address"], mine["port"], world)
        return None

    def _drop_group(self) -> None:
        if self._group is not None:
            for method in ("abort", "shutdown"):
                try:
                    getattr(self._group.pg, method)()
                    break
                except Exception:
                    continue
            self._group = None

    # ------------------------------------------------------------------ per version
    def prepare(self, part: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> Prepared:
        """Collective, on the loop thread, before each version (after the previous one finished):
        resync decision, layout check, digests.  Raises the same PublishError on every rank."""
        if not self.connected:
            raise PublishError("prepare() before connect()")
        resync = False
        error: str | None = None
        if self.publisher is not None and self.resync:
            try:
                resync = self.publisher.resync_needed()
            except Exception as e:
                error = str(e)
        digests: dict[str, str] | None = None
        if self.leader and error is None:
            assert self.layout is not None
            diff = layout_difference(self.layout, layout_of(part))
            if diff is not None:
                error = (f"the layout of its part changed since connect ({diff}); layouts must not change "
                         "between steps (restart the trainer)")
            elif checksum:
                digests = tensor_digests(part)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"stage": self.stage, "rank": self.rank, "error": error,
                                          "digests": digests, "resync": resync})
        failed = [g for g in gathered if g["error"] is not None]
        if failed:
            raise PublishError(f"version {version} not published: " + "; ".join(
                f"stage {g['stage']} (rank {g['rank']}): {g['error']}" for g in failed))
        if gathered[0]["resync"]:
            self._rejoin(part)
        total = ""
        if checksum:
            merged: dict[str, str] = {}
            for g in gathered:
                merged.update(g["digests"] or {})
            total = combine_digests(merged)
        return Prepared(version=version, checksum=total)

    def _rejoin(self, part: Mapping[str, torch.Tensor]) -> None:
        """Collective: re-create every stage's group (an engine restarted or joined late)."""
        log.warning("per-stage publishing: re-creating every stage's weight group (an engine lags or restarted)")
        if self.publisher is not None:
            self.publisher.close()
        self._drop_group()
        self.layout = None
        self.connect(part)
        self.rejoins += 1
        if self.publisher is not None:
            self.publisher.rejoins += 1

    def send(self, part: Mapping[str, torch.Tensor], prepared: Prepared) -> PublishResult | None:
        """Publish ``part`` as decided by :meth:`prepare` (thread-safe w.r.t. the trainer world: it
        only uses the weight groups and HTTP).  Rank 0: the publisher's result (``checksum``: the
        whole model's); leader k: its own part's (``stage``, ``group``, bytes, buckets, seconds);
        others: None."""
        version = prepared.version
        if self.publisher is not None:
            info = self.publisher.publish(part, version, checksum=False)
            info.checksum = prepared.checksum
            return info
        if not self.leader:
            return None
        if self._group is None:
            raise PublishError(f"stage {self.stage}: weight group {self.group_name!r} is gone (a failed publish); "
                               "restart the trainer")
        t0 = time.perf_counter()
        buckets = plan_buckets(part, self.bucket_bytes)
        largest = max(bucket_sizes(part, buckets))
        timings = {"flatten_s": 0.0}
        try:
            total = self._sender.broadcast(self._group, part, buckets, list(range(len(buckets))), largest, timings)
        except Exception as e:
            self._drop_group()
            raise PublishError(f"stage {self.stage}: broadcast of version {version} over weight group "
                               f"{self.group_name!r} failed: {e}") from e
        seconds = time.perf_counter() - t0
        log.info("stage %d: version %d: %.1f MiB in %d bucket(s) over group %r in %.3fs", self.stage, version,
                 total / 2**20, len(buckets), self.group_name, seconds)
        return PublishResult(version=version, seconds=seconds, bytes=total, buckets=len(buckets), timings=timings,
                             stage=self.stage, group=self.group_name)

    def publish(self, part: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> PublishResult | None:
        """Collective and synchronous: :meth:`prepare` then :meth:`send`."""
        return self.send(part, self.prepare(part, version, checksum))

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self._drop_group()
        self.layout = None
