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

Every HTTP call has a timeout, and every failure names the engine URL, the route and what was
awaited.  HTTP uses the standard library (``urllib``) from daemon threads, so the trainer needs no
event loop.

How:

    pub = WeightPublisher(["http://127.0.0.1:30000"], backend="gloo", bucket_bytes=64 << 20)
    pub.connect()
    info = pub.publish(trainer.export_hf_state(), version=1)   # {seconds, bytes, buckets, checksum}
    pub.close()
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import Future, as_completed
from typing import Any

import torch

from pipeline.weightsync import (
    DEFAULT_GROUP_NAME,
    WeightGroup,
    dtype_name,
    flatten_bucket,
    init_weight_group,
    weights_checksum,
)

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """An engine refused, failed or timed out during connect/publish (the message names it)."""


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


def post_json(url: str, payload: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
    """POST JSON, return the decoded JSON reply, or raise PublishError naming url and ``what``."""
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:500].decode(errors="replace")
        raise PublishError(f"{url}: HTTP {e.code} while waiting for {what}: {detail}") from e
    except TimeoutError as e:
        raise PublishError(f"{url}: no reply within {timeout_s:.0f}s while waiting for {what}") from e
    except (urllib.error.URLError, OSError) as e:
        raise PublishError(f"{url}: request failed while waiting for {what}: {getattr(e, 'reason', e)}") from e
    try:
        reply = json.loads(body) if body else {}
    except ValueError as e:
        raise PublishError(f"{url}: reply to {what} is not JSON: {body[:200]!r}") from e
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
    ) -> None:
        """``ranks_per_engine``: how many group ranks each engine brings (its TP size for SGLang,
        which joins as ``rank_offset + tp_rank``); default 1 each."""
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
        self.master_port: int | None = None
        self._group: WeightGroup | None = None

    @property
    def connected(self) -> bool:
        return self._group is not None

    # ------------------------------------------------------------------ helpers
    def _post_all(self, route: str, payloads: list[dict[str, Any]], what: str) -> list[Future]:
        return [
            spawn(post_json, f"{url}{route}", payload, self.timeout_s, what)
            for url, payload in zip(self.engine_urls, payloads, strict=True)
        ]

    def _check_reply(self, url: str, fut: Future, route: str, what: str) -> str | None:
        """None if the engine's reply is a success, else the error text (naming the engine)."""
        exc = fut.exception()
        if exc is not None:
            return str(exc) if isinstance(exc, PublishError) else f"{url}{route}: {what} failed: {exc!r}"
        reply = fut.result()
        if reply.get("success") is not True:
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

    def _reset(self) -> None:
        """After a failure the group is unusable (a collective may still block until its timeout
        in a daemon thread): drop it, so that connect() starts clean."""
        self._group = None

    # ------------------------------------------------------------------ API
    def connect(self) -> None:
        """Create the weight-update group: engines join as ranks 1..N, this process as rank 0."""
        if self._group is not None:
            return
        port = free_port(self.master_address)
        world = 1 + sum(self.ranks_per_engine)
        offsets = [1 + sum(self.ranks_per_engine[:i]) for i in range(len(self.engine_urls))]
        payloads = [
            {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": offset,
                "world_size": world,
                "group_name": self.group_name,
                "backend": self.backend,
            }
            for offset in offsets
        ]
        route = "/init_weights_update_group"
        what = f"joining weight group {self.group_name!r} at {self.master_address}:{port}"
        log.info("weight publisher: %d engine(s) joining %s:%d (%s)", len(self.engine_urls), self.master_address, port, self.backend)
        futures = self._post_all(route, payloads, what)
        own = spawn(
            init_weight_group, self.master_address, port, rank=0, world_size=world, backend=self.backend,
            group_name=self.group_name, timeout_s=self.timeout_s,
        )
        try:
            group = self._wait(futures, own, route, what, f"rank 0 rendezvous at {self.master_address}:{port}")
        except PublishError:
            self._reset()
            raise
        self._group, self.master_port = group, port
        log.info("weight publisher: group %r ready (world %d)", self.group_name, world)

    def publish(self, named: Mapping[str, torch.Tensor], version: int, checksum: bool = True) -> dict[str, Any]:
        """Send every tensor to every engine; returns ``{seconds, bytes, buckets, checksum, version}``.
        When it returns, every engine has swapped in ``version``. ``checksum=False`` skips hashing
        every byte (costly for large models; the checksum is then "")."""
        if self._group is None:
            raise PublishError("publish() before connect()")
        if not named:
            raise ValueError("nothing to publish: the state dict is empty (not the publishing rank?)")
        t0 = time.perf_counter()
        digest = weights_checksum(named) if checksum else ""
        buckets = plan_buckets(named, self.bucket_bytes)
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        total = 0
        for i, names in enumerate(buckets):
            last = i == len(buckets) - 1
            tensors = [named[n] for n in names]
            payload = {
                "names": names,
                "dtypes": [dtype_name(t.dtype) for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": self.group_name,
                "load_format": "flattened_bucket",
                "flush_cache": False,
                "abort_all_requests": False,
                "weight_version": str(version) if last else None,
            }
            route = "/update_weights_from_distributed"
            what = f"bucket {i + 1}/{len(buckets)} of version {version}" + (" (swap)" if last else "")
            futures = self._post_all(route, [payload] * len(self.engine_urls), what)
            flat = flatten_bucket(t.to(device) for t in tensors)
            own = spawn(self._group.broadcast, flat, 0)
            try:
                self._wait(futures, own, route, what, f"broadcast of {what}")
            except PublishError:
                self._reset()
                raise
            total += flat.numel()
        seconds = time.perf_counter() - t0
        log.info(
            "published version %d: %.1f MiB in %d bucket(s) to %d engine(s) in %.3fs",
            version, total / 2**20, len(buckets), len(self.engine_urls), seconds,
        )
        return {"seconds": seconds, "bytes": total, "buckets": len(buckets), "checksum": digest, "version": version}

    def close(self) -> None:
        """Ask engines to leave the group (best effort) and drop ours."""
        if self._group is not None:
            futures = self._post_all(
                "/destroy_weights_update_group", [{"group_name": self.group_name}] * len(self.engine_urls),
                "leaving the weight group",
            )
            for fut in futures:
                try:
                    fut.result(timeout=self.timeout_s)
                except Exception as e:  # best effort: engines may already be gone
                    log.warning("weight publisher close: %s", e)
            self._group = None
