"""HTTP calls from the trainer to inference engines: a keep-alive pool and fan-out helpers.

What: :func:`post_json` (one JSON request, every failure a :class:`PublishError` naming the URL and
what was awaited), :class:`Connections` (kept-alive ``http.client`` connections, reused across
requests) and :class:`EngineCalls` (one request to many engines at once from daemon threads, waiting
for every reply with a timeout).  The weight publisher, its transports and its engine drivers talk
to engines only through these.

Why the standard library: the trainer needs no event loop, and a weight update is a handful of
requests per version; daemon threads (:func:`spawn`) make sure a call stuck until its timeout after a
failure never holds up interpreter exit.

    calls = EngineCalls(["http://127.0.0.1:30000"], timeout_s=60)
    replies = calls.call_all("/pause_generation", {"mode": "in_place"}, "pausing generation")
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import select
import socket
import threading
import time
import urllib.parse
from concurrent.futures import Future, as_completed
from typing import Any

from schemas.weight_update import ROUTE_MODEL_INFO, ROUTE_SERVER_INFO, TEXT_REPLY_ROUTES, reply_ok

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """An engine refused, failed or timed out during connect/publish (the message names it)."""


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


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (where bind(0) and outgoing connections draw)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(address: str, tries: int = 64) -> int:
    """A TCP port that is free on ``address`` right now, for a rendezvous bound a moment later.

    Drawn at random below the kernel's ephemeral range when it can be: a port from bind(0) is an
    ephemeral one, which any outgoing connection on the host may take before the store binds it
    (EADDRINUSE; seen on a Ray test cluster with hundreds of connections). Falls back to bind(0)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    low = _ephemeral_low()
    for port in random.SystemRandom().sample(range(10000, low), min(tries, max(low - 10000, 0))):  # not the seeded global RNG
        with socket.socket(family) as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as s:
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
              connections: Connections | None = None, text_reply: bool = False) -> dict[str, Any]:
    """POST JSON (GET when ``payload`` is None; ``bytes`` are sent as already-encoded JSON), return
    the decoded JSON reply, or raise PublishError naming url and ``what``.  A plain-text reply from
    a route in ``TEXT_REPLY_ROUTES`` (or any route with ``text_reply``) becomes ``{"success": True,
    "message": text}`` (HTTP errors still raise).  With ``connections``, the request goes over a
    kept-alive connection."""
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
        if text_reply or parts.path.endswith(TEXT_REPLY_ROUTES):
            return {"success": True, "message": raw[:500].decode(errors="replace")}
        raise PublishError(f"{url}: reply to {what} is not JSON: {raw[:200]!r}") from e
    if not isinstance(reply, dict):
        raise PublishError(f"{url}: reply to {what} is not a JSON object: {reply!r}")
    return reply


class EngineCalls:
    """Requests to a fixed list of engines (``urls``), each call bounded by ``timeout_s``, over one
    :class:`Connections` pool.  Every error names the engine URL, the route and what was awaited."""

    def __init__(self, urls: list[str], timeout_s: float, connections: Connections | None = None) -> None:
        self.urls = list(urls)
        self.timeout_s = timeout_s
        self.connections = connections or Connections()

    def post_all(self, route: str, payloads: list[dict[str, Any] | bytes | None], what: str) -> list[Future]:
        """Start one request per engine (``payloads[i]`` to ``urls[i]``; None = GET)."""
        return [
            spawn(post_json, f"{url}{route}", payload, self.timeout_s, what, self.connections)
            for url, payload in zip(self.urls, payloads, strict=True)
        ]

    def check_reply(self, url: str, fut: Future, route: str, what: str) -> str | None:
        """None if the engine's reply is a success, else the error text (naming the engine)."""
        exc = fut.exception()
        if exc is not None:
            return str(exc) if isinstance(exc, PublishError) else f"{url}{route}: {what} failed: {exc!r}"
        reply = fut.result()
        if not reply_ok(reply):
            return f"{url}{route}: {what} failed: {reply.get('message', reply)!r}"
        return None

    def wait(self, engine_futs: list[Future], own: Future, route: str, what: str, own_what: str) -> Any:
        """Wait for our side (``own``: rendezvous or broadcast, run in a thread) and every engine
        reply.  An engine failure raises at once (our side would only block until its timeout);
        every error names the engine URL, the route and what was awaited."""
        by_future = dict(zip(engine_futs, self.urls, strict=True))
        try:
            for fut in as_completed([*engine_futs, own], timeout=self.timeout_s + 5.0):
                if fut is own:
                    if fut.exception() is not None:
                        early = [e for f, u in by_future.items() if f.done() and (e := self.check_reply(u, f, route, what))]
                        raise PublishError(
                            f"{own_what} failed: {fut.exception()}"
                            + (f" Engine replies: {'; '.join(early)}" if early else "")
                        ) from fut.exception()
                    continue
                error = self.check_reply(by_future[fut], fut, route, what)
                if error:
                    raise PublishError(error)
        except TimeoutError as e:
            silent = [u for f, u in by_future.items() if not f.done()]
            raise PublishError(
                f"no reply within {self.timeout_s:.0f}s while waiting for {what} from {', '.join(silent) or 'this process'} ({route})"
            ) from e
        return own.result()

    def call_all(self, route: str, payload: dict[str, Any] | None, what: str) -> list[dict[str, Any]]:
        """Send one request to every engine at once and wait (``timeout_s``) for every reply;
        raise PublishError naming the engines that failed."""
        return self.collect(self.post_all(route, [payload] * len(self.urls), what), route, what)

    def collect(self, futures: list[Future], route: str, what: str) -> list[dict[str, Any]]:
        """Wait (``timeout_s``) for every engine's reply to one request each; raise PublishError
        naming the engines that failed."""
        errors = []
        for url, fut in zip(self.urls, futures, strict=True):
            try:
                fut.result(timeout=self.timeout_s + 5.0)
            except TimeoutError:
                errors.append(f"{url}{route}: no reply within {self.timeout_s:.0f}s while waiting for {what}")
                continue
            except Exception:
                pass
            if error := self.check_reply(url, fut, route, what):
                errors.append(error)
        if errors:
            raise PublishError("; ".join(errors))
        return [f.result() for f in futures]

    def infos(self, route: str, timeout_s: float | None = None) -> dict[str, dict[str, Any] | None]:
        """Each engine's reply to ``GET route`` (None: no answer within ``timeout_s``)."""
        t = timeout_s or self.timeout_s
        futures = [spawn(post_json, f"{u}{route}", None, t, f"its {route.strip('/')} reply", self.connections) for u in self.urls]
        out: dict[str, dict[str, Any] | None] = {}
        for url, fut in zip(self.urls, futures, strict=True):
            try:
                out[url] = fut.result(timeout=t + 5.0)
            except Exception as e:
                log.info("weight publisher: %s%s did not answer: %s", url, route, e)
                out[url] = None
        return out

    def engine_versions(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Each engine's ``weight_version`` from ``GET /get_model_info`` (None: no answer)."""
        return {u: None if info is None else str(info.get("weight_version"))
                for u, info in self.infos(ROUTE_MODEL_INFO, timeout_s).items()}

    def server_infos(self, timeout_s: float | None = None) -> dict[str, dict[str, Any] | None]:
        """Each engine's ``GET /get_server_info`` reply (None: no answer)."""
        return self.infos(ROUTE_SERVER_INFO, timeout_s)

    def close(self) -> None:
        self.connections.close()
