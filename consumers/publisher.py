"""Stream trainer weights to inference engines over SGLang's weight-update HTTP API (DESIGN §8).

What: :class:`WeightPublisher` runs on the publishing trainer rank (global rank 0).  It drives any
server that speaks SGLang's HTTP subset (slipstream's embedded engine, or real SGLang):

1. :meth:`WeightPublisher.connect`: picks a free TCP port on ``master_address``, asks every engine
   ``i`` to join a weight-update group (``POST /init_weights_update_group`` with
   ``rank_offset = 1 + i``, ``world_size = 1 + len(engines)``; engines with several ranks, e.g.
   SGLang with TP > 1, via ``ranks_per_engine``), and joins it itself as rank 0
   (:func:`pipeline.weightsync.init_weight_group`; its own TCPStore, not the trainer's world).
2. :meth:`WeightPublisher.publish`: splits the HF-named tensors (in the dict's order) into buckets
   of at most ``bucket_bytes`` (a larger tensor travels alone).  For each bucket it posts
   ``/update_weights_from_distributed`` (``load_format="flattened_bucket"``) to every engine at once,
   broadcasts the flattened bucket from rank 0, then waits for every engine's reply.  Only the last
   bucket carries ``weight_version``; engines reply to it after swapping the new weights in, so when
   ``publish`` returns every engine serves that version.
3. SGLang engines (``engine_kind="sglang"``) apply an update inside their scheduler loop, so the
   publisher brackets the buckets with ``POST /pause_generation {mode}`` and
   ``/continue_generation`` (plus ``/flush_cache`` when configured) and reports the pause
   (``pause_s``; for the embedded engine: the longest swap pause an engine reported).
4. Pipeline stages (``remote_parts``, :mod:`consumers.stage_publish`): other trainer ranks
   (pipeline-stage leaders) broadcast their stages' tensors over weight groups they host; the
   publisher asks every engine to join those groups too and announces their tensors (it knows
   only their layout): embedded engines get one request per version listing every part
   (:data:`pipeline.weightsync.PARTS_FIELD`), SGLang one request per bucket, part by part, each
   with its part's ``group_name``.
5. Joining: with ``resync=True`` each publish first asks every engine its ``weight_version``
   (``GET /get_model_info``).  If one lags (restarted, or joined late) or does not answer yet, the
   publisher waits (up to ``rejoin_timeout_s``) until every engine answers, re-creates the weight
   group with all of them, and the publish then brings every engine to the current version.

The routes and request bodies are built by the ``ROUTE_*`` constants and ``*_payload`` functions
below; ``tests/test_sglang_contract.py`` checks them against sglang 0.5.23's source.

Every HTTP call has a timeout, and every failure names the engine URL, the route and what was
awaited.  HTTP uses the standard library (``http.client``, kept-alive connections) from daemon threads,
so the trainer needs no event loop.

How:

    pub = WeightPublisher(["http://127.0.0.1:30000"], backend="gloo", bucket_bytes=64 << 20)
    pub.connect()
    info = pub.publish(trainer.export_hf_state(), version=1)   # {seconds, bytes, buckets, checksum}
    pub.close()
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Mapping
from concurrent.futures import Future, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from consumers.bucket_send import BucketSender
from pipeline.weightsync import (
    CHUNKS_FIELD,
    DEFAULT_GROUP_NAME,
    PARTS_FIELD,
    WeightGroup,
    dtype_from_name,
    dtype_name,
    init_weight_group,
    weights_checksum,
)

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """An engine refused, failed or timed out during connect/publish (the message names it)."""


ROUTE_INIT_GROUP = "/init_weights_update_group"
ROUTE_DESTROY_GROUP = "/destroy_weights_update_group"
ROUTE_UPDATE = "/update_weights_from_distributed"
ROUTE_PAUSE = "/pause_generation"
ROUTE_CONTINUE = "/continue_generation"
ROUTE_FLUSH = "/flush_cache"
ROUTE_MODEL_INFO = "/get_model_info"
#: route -> (HTTP method the publisher uses, SGLang request dataclass of its body or None)
ROUTES: dict[str, tuple[str, str | None]] = {
    ROUTE_INIT_GROUP: ("POST", "InitWeightsUpdateGroupReqInput"),
    ROUTE_DESTROY_GROUP: ("POST", "DestroyWeightsUpdateGroupReqInput"),
    ROUTE_UPDATE: ("POST", "UpdateWeightsFromDistributedReqInput"),
    ROUTE_PAUSE: ("POST", "PauseGenerationReqInput"),
    ROUTE_CONTINUE: ("POST", "ContinueGenerationReqInput"),
    ROUTE_FLUSH: ("POST", None),  # SGLang reads only the query parameter 'timeout'
    ROUTE_MODEL_INFO: ("GET", None),
}
#: fields of the /get_model_info reply the publisher reads
MODEL_INFO_FIELDS = ("weight_version",)
#: a JSON reply succeeded if it has ``"success": true`` (weight routes) or ``"status": "ok"``
#: (SGLang's /pause_generation and /continue_generation)
REPLY_SUCCESS = (("success", True), ("status", "ok"))
#: routes whose reply is plain text: success is HTTP 200 (SGLang's /flush_cache)
TEXT_REPLY_ROUTES = (ROUTE_FLUSH,)


def reply_ok(reply: Mapping[str, Any]) -> bool:
    return any(reply.get(key) == value for key, value in REPLY_SUCCESS)


def init_group_payload(master_address: str, master_port: int, rank_offset: int, world_size: int,
                       group_name: str, backend: str) -> dict[str, Any]:
    return {"master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend}


def bucket_payload(tensors: Mapping[str, torch.Tensor], group_name: str, version: int | None,
                   flush_cache: bool = False) -> dict[str, Any]:
    """Body of /update_weights_from_distributed for one flattened bucket; only the last bucket of
    a version carries ``weight_version`` (and ``flush_cache``)."""
    return {
        "names": list(tensors),
        "dtypes": [dtype_name(t.dtype) for t in tensors.values()],
        "shapes": [list(t.shape) for t in tensors.values()],
        "group_name": group_name,
        "load_format": "flattened_bucket",
        "flush_cache": bool(flush_cache and version is not None),
        "abort_all_requests": False,
        "weight_version": None if version is None else str(version),
    }


def chunked_update_payload(named: Mapping[str, torch.Tensor], buckets: list[list[str]], group_name: str,
                           version: int) -> dict[str, Any]:
    """Body of the single /update_weights_from_distributed request for a whole update to an
    embedded engine: every tensor's name/dtype/shape, plus each bucket's byte size."""
    payload = bucket_payload(named, group_name, version)
    payload[CHUNKS_FIELD] = bucket_sizes(named, buckets)
    return payload


@dataclass
class RemotePart:
    """A pipeline stage's share of every update: its leader broadcasts it, as rank 0 of the weight
    group ``group_name`` it hosts at ``address:port`` (:mod:`consumers.stage_publish`); this
    publisher only announces it, from ``layout`` ((name, dtype, shape) per tensor, in order)."""

    stage: int
    group_name: str
    address: str
    port: int
    layout: list[tuple[str, str, list[int]]]

    @functools.cached_property
    def meta(self) -> dict[str, torch.Tensor]:
        """The part's tensors as ``meta`` tensors: names, dtypes and shapes, no bytes."""
        return {n: torch.empty(shape, dtype=dtype_from_name(dt), device="meta") for n, dt, shape in self.layout}

    def buckets(self, bucket_bytes: int) -> list[list[str]]:
        """The buckets its leader sends: the same plan as the publisher's own."""
        return plan_buckets(self.meta, bucket_bytes)


def parts_update_payload(named: Mapping[str, torch.Tensor], buckets: list[list[str]], group_name: str,
                         version: int, remote: list[RemotePart], bucket_bytes: int) -> dict[str, Any]:
    """Body of the single /update_weights_from_distributed request of a multi-part update (embedded
    engines): every part's tensors (ours first), and per part its group, tensor count and chunks."""
    every: dict[str, torch.Tensor] = dict(named)
    parts = [{"group_name": group_name, "num_tensors": len(named), "chunks": bucket_sizes(named, buckets)}]
    for part in remote:
        every.update(part.meta)
        parts.append({"group_name": part.group_name, "num_tensors": len(part.meta),
                      "chunks": bucket_sizes(part.meta, part.buckets(bucket_bytes))})
    if len(every) != sum(p["num_tensors"] for p in parts):
        raise PublishError("a tensor name appears in several pipeline stages' parts")
    payload = bucket_payload(every, group_name, version)
    payload[PARTS_FIELD] = parts
    return payload


def bucket_sizes(named: Mapping[str, torch.Tensor], buckets: list[list[str]]) -> list[int]:
    """Byte size of each bucket."""
    return [sum(named[n].numel() * named[n].element_size() for n in b) for b in buckets]


def pause_payload(mode: str) -> dict[str, Any]:
    return {"mode": mode}


def continue_payload() -> dict[str, Any]:
    return {}


def destroy_payload(group_name: str) -> dict[str, Any]:
    return {"group_name": group_name}


def plan_buckets(named: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[str]]:
    """Group names (in ``named``'s order) into buckets of at most ``bucket_bytes`` bytes; a tensor
    larger than that gets a bucket of its own."""
    buckets: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, t in named.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def spawn(fn: Any, *args: Any, **kwargs: Any) -> Future:
    """Run ``fn`` in a new daemon thread; its outcome lands in the returned Future.  Daemon threads
    (not a ThreadPoolExecutor, whose workers are joined at interpreter exit) so that a call stuck
    until its timeout after a failure never holds up shutdown."""
    fut: Future = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, name=f"publish-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return fut


def free_port(address: str) -> int:
    """A TCP port that is free on ``address`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class Connections:
    """Keep-alive HTTP connections to the engines (``http.client``), reused across requests.

    Why: a weight update is one request per version (embedded engine) or several back to back
    (SGLang: pause, one per bucket, continue); a new TCP connection and ``urllib``'s machinery per
    request added about a millisecond to each.  A connection idle for more than ``idle_s`` or
    closed by the engine (checked before reuse, as urllib3 does) is dropped, never retried on:
    uvicorn (SGLang) closes idle connections after 5 s, aiohttp (the embedded engine) after 75 s.
    Thread-safe: each request takes a connection out of the pool for its duration.
    """

    def __init__(self, idle_s: float = 4.0) -> None:
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def take(self, host: str, port: int, timeout_s: float) -> http.client.HTTPConnection:
        now = time.monotonic()
        with self._lock:
            pool = self._idle.get((host, port), [])
            while pool:
                conn, since = pool.pop()
                if now - since <= self.idle_s and not _dropped(conn):
                    conn.timeout = timeout_s
                    if conn.sock is not None:
                        conn.sock.settimeout(timeout_s)
                    return conn
                conn.close()
        return http.client.HTTPConnection(host, port, timeout=timeout_s)

    def give_back(self, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault((host, port), []).append((conn, time.monotonic()))

    def close(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for pool in pools:
            for conn, _ in pool:
                conn.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True if the peer closed (or broke) an idle connection: its socket is readable (EOF)."""
    if conn.sock is None:
        return True
    try:
        return bool(select.select([conn.sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def post_json(url: str, payload: dict[str, Any] | bytes | None, timeout_s: float, what: str,
              connections: Connections | None = None) -> dict[str, Any]:
    """POST JSON (GET when ``payload`` is None; ``bytes`` are sent as already-encoded JSON), return
    the decoded JSON reply, or raise PublishError naming url and ``what``.  A plain-text reply from
    a route in ``TEXT_REPLY_ROUTES`` becomes ``{"success": True, "message": text}`` (HTTP errors
    still raise).  With ``connections``, the request goes over a kept-alive connection."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise PublishError(f"{url}: only http:// engine URLs are supported (while waiting for {what})")
    host, port = parts.hostname, parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = payload if isinstance(payload, bytes) else None if payload is None else json.dumps(payload).encode()
    conn = connections.take(host, port, timeout_s) if connections else http.client.HTTPConnection(host, port, timeout=timeout_s)
    reusable = False
    try:
        conn.request("GET" if body is None else "POST", target or "/", body=body,
                     headers={} if body is None else {"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        reusable = connections is not None and not resp.will_close
    except TimeoutError as e:
        raise PublishError(f"{url}: no reply within {timeout_s:.0f}s while waiting for {what}") from e
    except (http.client.HTTPException, OSError) as e:
        raise PublishError(f"{url}: request failed while waiting for {what}: {e!r}") from e
    finally:
        if reusable and connections is not None:
            connections.give_back(host, port, conn)
        else:
            conn.close()
    if not 200 <= resp.status < 300:
        detail = raw[:500].decode(errors="replace")
        raise PublishError(f"{url}: HTTP {resp.status} while waiting for {what}: {detail}")
    try:
        reply = json.loads(raw) if raw else {}
    except ValueError as e:
        if parts.path.endswith(TEXT_REPLY_ROUTES):
            return {"success": True, "message": raw[:500].decode(errors="replace")}
        raise PublishError(f"{url}: reply to {what} is not JSON: {raw[:200]!r}") from e
    if not isinstance(reply, dict):
        raise PublishError(f"{url}: reply to {what} is not a JSON object: {reply!r}")
    return reply


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
        if engine_kind not in ("embedded", "sglang"):
            raise ValueError(f"engine_kind must be 'embedded' or 'sglang', got {engine_kind!r}")
        if pause_mode not in ("in_place", "retract", "abort"):
            raise ValueError(f"pause_mode must be 'in_place', 'retract' or 'abort', got {pause_mode!r}")
        if not engine_urls:
            raise ValueError("WeightPublisher needs at least one engine URL")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        if bucket_bytes <= 0 or timeout_s <= 0:
            raise ValueError("bucket_bytes and timeout_s must be > 0")
        self.engine_urls = [u.rstrip("/") for u in engine_urls]
        self.ranks_per_engine = list(ranks_per_engine or [1] * len(engine_urls))
        if len(self.ranks_per_engine) != len(engine_urls) or min(self.ranks_per_engine) < 1:
            raise ValueError("ranks_per_engine needs one positive entry per engine URL")
        self.master_address = master_address
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.timeout_s = timeout_s
        self.engine_kind = engine_kind
        self.pause_mode = pause_mode
        self.flush_cache = flush_cache
        self.resync = resync
        self.rejoin_timeout_s = rejoin_timeout_s
        self.master_port: int | None = None
        self.version: int | None = None  # last version every engine acknowledged
        self.rejoins = 0  # how many times the group was re-created for a lagging engine
        self._group: WeightGroup | None = None
        # Where the last publish spent its time (wall seconds): resync, checksum, send (first request
        # to last reply) and flatten (inside send, overlapping the transfer).
        self._timings: dict[str, float] = {}
        self._sender = BucketSender(backend)
        self.remote_parts: list[RemotePart] = []  # other pipeline stages' groups (consumers.stage_publish)
        self._conns = Connections()
        self._layout_json: tuple[Any, bytes, int] | None = None  # (layout key, request minus its version, largest bucket)

    @property
    def connected(self) -> bool:
        return self._group is not None

    # ------------------------------------------------------------------ helpers
    def _post_all(self, route: str, payloads: list[dict[str, Any] | bytes | None], what: str) -> list[Future]:
        return [
            spawn(post_json, f"{url}{route}", payload, self.timeout_s, what, self._conns)
            for url, payload in zip(self.engine_urls, payloads, strict=True)
        ]

    def _check_reply(self, url: str, fut: Future, route: str, what: str) -> str | None:
        """None if the engine's reply is a success, else the error text (naming the engine)."""
        exc = fut.exception()
        if exc is not None:
            return str(exc) if isinstance(exc, PublishError) else f"{url}{route}: {what} failed: {exc!r}"
        reply = fut.result()
        if not reply_ok(reply):
            return f"{url}{route}: {what} failed: {reply.get('message', reply)!r}"
        return None

    def _wait(self, engine_futs: list[Future], own: Future, route: str, what: str, own_what: str) -> Any:
        """Wait for our side (``own``: rendezvous or broadcast, run in a thread) and every engine
        reply.  An engine failure raises at once (our side would only block until its timeout);
        every error names the engine URL, the route and what was awaited."""
        by_future = dict(zip(engine_futs, self.engine_urls, strict=True))
        try:
            for fut in as_completed([*engine_futs, own], timeout=self.timeout_s + 5.0):
                if fut is own:
                    if fut.exception() is not None:
                        early = [e for f, u in by_future.items() if f.done() and (e := self._check_reply(u, f, route, what))]
                        raise PublishError(
                            f"{own_what} failed: {fut.exception()}"
                            + (f" Engine replies: {'; '.join(early)}" if early else "")
                        ) from fut.exception()
                    continue
                error = self._check_reply(by_future[fut], fut, route, what)
                if error:
                    raise PublishError(error)
        except TimeoutError as e:
            silent = [u for f, u in by_future.items() if not f.done()]
            raise PublishError(
                f"no reply within {self.timeout_s:.0f}s while waiting for {what} from {', '.join(silent) or 'this process'} ({route})"
            ) from e
        return own.result()

    def _call_all(self, route: str, payload: dict[str, Any] | None, what: str) -> list[dict[str, Any]]:
        """Send one request to every engine at once and wait (``timeout_s``) for every reply;
        raise PublishError naming the engines that failed."""
        return self._collect(self._post_all(route, [payload] * len(self.engine_urls), what), route, what)

    def _collect(self, futures: list[Future], route: str, what: str) -> list[dict[str, Any]]:
        """Wait (``timeout_s``) for every engine's reply to one request each; raise PublishError
        naming the engines that failed."""
        errors = []
        for url, fut in zip(self.engine_urls, futures, strict=True):
            try:
                fut.result(timeout=self.timeout_s + 5.0)
            except TimeoutError:
                errors.append(f"{url}{route}: no reply within {self.timeout_s:.0f}s while waiting for {what}")
                continue
            except Exception:
                pass
            if error := self._check_reply(url, fut, route, what):
                errors.append(error)
        if errors:
            raise PublishError("; ".join(errors))
        return [f.result() for f in futures]

    def engine_versions(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Each engine's ``weight_version`` from ``GET /get_model_info`` (None: no answer)."""
        t = timeout_s or self.timeout_s
        futures = [spawn(post_json, f"{u}{ROUTE_MODEL_INFO}", None, t, "its model info", self._conns) for u in self.engine_urls]
        out: dict[str, str | None] = {}
        for url, fut in zip(self.engine_urls, futures, strict=True):
            try:
                out[url] = str(fut.result(timeout=t + 5.0).get("weight_version"))
            except Exception as e:
                log.info("weight publisher: %s%s did not answer: %s", url, ROUTE_MODEL_INFO, e)
                out[url] = None
        return out

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
        if self.version is None or self._group is None:
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

    def _reset(self) -> None:
        """After a failure the group is unusable (a collective may still block until its timeout
        in a daemon thread): drop it, so that connect() starts clean."""
        self._group = None

    # ------------------------------------------------------------------ API
    def connect(self, remote_parts: list[RemotePart] | None = None) -> None:
        """Create the weight-update group: engines join as ranks 1..N, this process as rank 0.
        ``remote_parts`` (per-stage publishing): the engines also join each part's group (the same
        engine ranks; its leader hosts the rendezvous and is rank 0), and every publish announces
        the parts' tensors after ours."""
        if self._group is not None:
            return
        if remote_parts is not None:
            self.remote_parts = list(remote_parts)
        port = free_port(self.master_address)
        world = 1 + sum(self.ranks_per_engine)
        offsets = [1 + sum(self.ranks_per_engine[:i]) for i in range(len(self.engine_urls))]
        payloads: list[dict[str, Any] | None] = [
            init_group_payload(self.master_address, port, offset, world, self.group_name, self.backend) for offset in offsets
        ]
        route = ROUTE_INIT_GROUP
        what = f"joining weight group {self.group_name!r} at {self.master_address}:{port}"
        log.info("weight publisher: %d engine(s) joining %s:%d (%s)", len(self.engine_urls), self.master_address, port, self.backend)
        futures = self._post_all(route, payloads, what)
        remote = [(f"joining stage {part.stage}'s weight group {part.group_name!r} at {part.address}:{part.port}",
                   self._post_all(route, [init_group_payload(part.address, part.port, offset, world, part.group_name, self.backend)
                                          for offset in offsets], f"joining weight group {part.group_name!r}"))
                  for part in self.remote_parts]
        own = spawn(
            init_weight_group, self.master_address, port, rank=0, world_size=world, backend=self.backend,
            group_name=self.group_name, timeout_s=self.timeout_s,
        )
        try:
            group = self._wait(futures, own, route, what, f"rank 0 rendezvous at {self.master_address}:{port}")
            for part_what, part_futures in remote:  # the stage leader hosts it: engines' replies tell
                self._collect(part_futures, route, part_what)
        except PublishError:
            self._reset()
            raise
        self._group, self.master_port = group, port
        log.info("weight publisher: group %r ready (world %d)%s", self.group_name, world,
                 f", plus {len(remote)} pipeline stage group(s)" if remote else "")

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> dict[str, Any]:
        """Send every tensor to every engine; returns ``{seconds, bytes, buckets, checksum, version,
        pause_s, rejoined}``.  When it returns, every engine has swapped in ``version``.
        ``checksum=False`` skips hashing every byte (costly for large models; the checksum is then "")."""
        if self._group is None:
            raise PublishError("publish() before connect()")
        if not named:
            raise ValueError("nothing to publish: the state dict is empty (not the publishing rank?)")
        t0 = time.perf_counter()
        rejoins = self.rejoins
        if self.resync:
            self._resync()
        t_sum = time.perf_counter()
        digest = weights_checksum(named) if checksum else ""
        self._timings = {"resync_s": t_sum - t0, "checksum_s": time.perf_counter() - t_sum, "flatten_s": 0.0, "send_s": 0.0}
        sglang = self.engine_kind == "sglang"
        pause_s = 0.0
        if sglang:
            t_pause = time.perf_counter()
            self._call_all(ROUTE_PAUSE, pause_payload(self.pause_mode), f"pausing generation ({self.pause_mode}) for version {version}")
        try:
            total, nbuckets, replies = self._send_buckets(named, version)
        except BaseException:
            if sglang:
                self._continue_best_effort(version)
            raise
        if sglang:
            if self.flush_cache:
                try:
                    self._call_all(ROUTE_FLUSH, {}, f"flushing the prefix cache after version {version}")
                except PublishError as e:
                    log.warning("weight publisher: prefix cache not flushed (%s)", e)
            self._call_all(ROUTE_CONTINUE, continue_payload(), f"continuing generation after version {version}")
            pause_s = time.perf_counter() - t_pause
        else:
            pause_s = max((float(r.get("pause_seconds", 0.0)) for r in replies), default=0.0)
        self.version = version
        seconds = time.perf_counter() - t0
        parts = self._parts_info(named) if self.remote_parts else []
        total += sum(p["bytes"] for p in parts[1:])  # the other stages' leaders sent these
        log.info(
            "published version %d: %.1f MiB in %d bucket(s) to %d engine(s) in %.3fs (generation paused %.2f ms)",
            version, total / 2**20, nbuckets, len(self.engine_urls), seconds, pause_s * 1e3,
        )
        out = {"seconds": seconds, "bytes": total, "buckets": nbuckets, "checksum": digest, "version": version,
               "timings": dict(self._timings),
               "pause_s": pause_s, "rejoined": self.rejoins - rejoins}
        if self.remote_parts:
            out["parts"] = parts
            out["engine_parts"] = [len(r.get("parts") or []) for r in replies]  # as each engine's reply reports
            for p in parts:  # the engines' receive time per part (slowest engine), when they report it
                p["engine_receive_s"] = max((float(e.get("receive_s", 0.0)) for r in replies for e in r.get("parts") or []
                                             if e.get("group_name") == p["group"]), default=None)
                log.info("version %d, stage %d: %.1f MiB over group %r (engines received it in %s)", version, p["stage"],
                         p["bytes"] / 2**20, p["group"],
                         "n/a" if p["engine_receive_s"] is None else f"{p['engine_receive_s']:.3f}s")
        return out

    def _parts_info(self, named: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Per part (ours first): stage, group, tensor count and bytes."""
        return [{"stage": stage, "group": group, "tensors": len(tensors), "bytes": bucket_sizes(tensors, [list(tensors)])[0]}
                for stage, group, tensors in [(0, self.group_name, named),
                                              *((p.stage, p.group_name, p.meta) for p in self.remote_parts)]]

    def _continue_best_effort(self, version: int) -> None:
        try:
            self._call_all(ROUTE_CONTINUE, continue_payload(), f"continuing generation after the failed version {version}")
        except PublishError as e:
            log.error("weight publisher: could not resume generation after a failed publish: %s", e)

    def _send_buckets(self, named: Mapping[str, torch.Tensor], version: int) -> tuple[int, int, list[dict[str, Any]]]:
        """Send every bucket; returns (bytes, buckets, the engines' replies to the last request)."""
        assert self._group is not None
        if self.engine_kind == "sglang":
            return self._send_per_bucket(named, plan_buckets(named, self.bucket_bytes), version)
        if getattr(named, "contiguous", False) and not self.remote_parts:
            # a flat snapshot (consumers.publish_async.FlatState) needs no flatten buffer, which is
            # what the bucket size bounds: one broadcast, from a view
            return self._send_chunked(named, [list(named)], version)
        return self._send_chunked(named, plan_buckets(named, self.bucket_bytes), version)

    def _broadcast_buckets(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]],
                           indices: list[int], largest: int) -> int:
        """Broadcast ``buckets[i]`` for ``i`` in ``indices`` (:class:`consumers.bucket_send.BucketSender`)."""
        assert self._group is not None
        return self._sender.broadcast(self._group, named, buckets, indices, largest, self._timings)

    def _chunked_request(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], version: int) -> tuple[bytes, int]:
        """The JSON body of :meth:`_send_chunked`'s request, and the largest bucket's size.  Its
        layout part (hundreds of names, dtypes and shapes) is encoded once and reused while the
        layout stays the same; only the version changes from one update to the next."""
        key = (tuple((n, t.dtype, t.shape) for n, t in named.items()), tuple(map(len, buckets)),
               tuple((p.group_name, len(p.layout)) for p in self.remote_parts))  # parts' layouts never change
        if self._layout_json is None or self._layout_json[0] != key:
            if self.remote_parts:  # per-stage publishing: every part, ours first (PARTS_FIELD)
                payload = parts_update_payload(named, buckets, self.group_name, 0, self.remote_parts, self.bucket_bytes)
                largest = max(payload[PARTS_FIELD][0]["chunks"])
            else:
                payload = chunked_update_payload(named, buckets, self.group_name, 0)
                largest = max(payload[CHUNKS_FIELD])
            del payload["weight_version"]
            self._layout_json = (key, json.dumps(payload).encode(), largest)
        _, layout, largest = self._layout_json
        return b'{"weight_version": "%d", ' % version + layout[1:], largest

    def _send_chunked(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], version: int) -> tuple[int, int, list[dict[str, Any]]]:
        """Embedded engines: one request announces the whole update (:data:`CHUNKS_FIELD`), then
        every bucket is broadcast back to back; the engine replies once it has swapped the update in.
        One HTTP round trip per update, however many buckets."""
        what = f"version {version} ({len(buckets)} bucket(s), swap)"
        t = time.perf_counter()
        body, largest = self._chunked_request(named, buckets, version)
        futures = self._post_all(ROUTE_UPDATE, [body] * len(self.engine_urls), what)
        own = spawn(self._broadcast_buckets, named, buckets, list(range(len(buckets))), largest)
        try:
            total = self._wait(futures, own, ROUTE_UPDATE, what, f"broadcast of {what}")
        except PublishError:
            self._reset()
            raise
        replies = [f.result() for f in futures]
        self._timings["send_s"] += time.perf_counter() - t
        self._timings["posted_at"] = time.monotonic() - (time.perf_counter() - t)  # on the engines' clock (same host)
        # the slowest engine's own account of the request (see the engine's update reply)
        engine = max((r.get("timings") or {} for r in replies), key=lambda d: d.get("handler_s", 0.0))
        self._timings.update({f"engine_{k}": float(v) for k, v in engine.items()})
        return total, len(buckets), replies

    def _send_per_bucket(self, named: Mapping[str, torch.Tensor], buckets: list[list[str]], version: int) -> tuple[int, int, list[dict[str, Any]]]:
        """SGLang: one request per bucket, strictly in order (SGLang receives a request's tensors
        when the request arrives); only the last carries ``weight_version``.  With remote parts
        (per-stage publishing) our buckets go first, then each part's, each request naming its
        part's group; the part's leader broadcasts those buckets (we only wait for the replies)."""
        total = 0
        replies: list[dict[str, Any]] = []
        flush = self.flush_cache
        largest = max(bucket_sizes(named, buckets))
        plans = [(0, self.group_name, named, buckets), *((p.stage, p.group_name, p.meta, p.buckets(self.bucket_bytes))
                                                         for p in self.remote_parts)]
        count = sum(len(b) for *_, b in plans)
        done: Future = Future()
        done.set_result(0)
        sent = 0
        for stage, group_name, tensors, part_buckets in plans:
            for i, names in enumerate(part_buckets):
                sent += 1
                last = sent == count
                payload = bucket_payload({n: tensors[n] for n in names}, group_name, version if last else None,
                                         flush_cache=flush)
                what = (f"bucket {i + 1}/{len(part_buckets)}" + (f" of stage {stage} (group {group_name!r})" if self.remote_parts else "")
                        + f" of version {version}" + (" (swap)" if last else ""))
                t = time.perf_counter()
                futures = self._post_all(ROUTE_UPDATE, [payload] * len(self.engine_urls), what)
                # flattened while the engines parse the request; another stage's leader sends its own
                own = spawn(self._broadcast_buckets, named, buckets, [i], largest) if stage == 0 else done
                try:
                    total += self._wait(futures, own, ROUTE_UPDATE, what, f"broadcast of {what}")
                except PublishError:
                    self._reset()
                    raise
                self._timings["send_s"] += time.perf_counter() - t
                if last:
                    replies = [f.result() for f in futures]
        return total, count, replies

    def close(self) -> None:
        """Ask engines to leave the group(s) (best effort) and drop ours."""
        if self._group is not None:
            futures = [
                fut for name in [self.group_name, *(p.group_name for p in self.remote_parts)]
                for fut in self._post_all(ROUTE_DESTROY_GROUP, [destroy_payload(name)] * len(self.engine_urls),
                                          f"leaving the weight group {name!r}")
            ]
            for fut in futures:
                try:
                    fut.result(timeout=self.timeout_s)
                except Exception as e:  # best effort: engines may already be gone
                    log.warning("weight publisher close: %s", e)
            self._group = None
        self._conns.close()
