"""Async client for the subset of SGLang's HTTP API that producers use.

The same client talks to real SGLang servers, an SGLang router, or slipstream's embedded engine
(which serves the same routes), so the producer code path is identical in tests and production.
Field names follow sglang 0.5.23 (``docs/notes/sglang-0.5.23-api.md``).

Per-token policy versions: the embedded engine returns ``meta_info.output_token_weight_versions``
(a slipstream extension).  Real SGLang reports one ``weight_version`` per response; then every token
is stamped with the *older* of the version known when the request was sent and the one reported at
the end, which can only overstate staleness, never hide it — unless the response carries SGLang's
``meta_info.weight_versions`` spans (``[{version, start, end}]`` over output tokens, sglang >= 0.5.23),
which give each token its exact version.  A ``weight_version`` that is not an integer (SGLang's
``"default"``: never updated) means model.path's weights, version 0.

Engine faults are the engine's, never a plug-in's.  Every response is checked before a rollout
sees it (:func:`check_response`): a non-JSON body, a missing ``meta_info``, or a sampled token's
log-probability that is NaN, infinite or positive raises :class:`EngineOutputError` naming the
engine URL (the producer drops the group, counts it and retries the prompt).  An engine that refuses
or drops the connection is taken out of rotation (:mod:`producers.rotation`) and the request is
resubmitted to another engine, or to the same one when it is back (:class:`EngineDown` only
escapes when none comes back within ``producer.engine_down_timeout_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from producers.rotation import EngineEvents, NoEngineUp, Rotation

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """An engine request failed (retried by the producer); ``url`` names the engine when known."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class EngineOutputError(EngineError):
    """An engine answered with output no sampler produces (NaN/inf/positive log-probs, malformed JSON)."""

    def __init__(self, url: str, problem: str) -> None:
        super().__init__(f"engine {url} returned invalid output: {problem}", url)
        self.problem = problem


class EngineDown(EngineError):
    """An engine refused the connection or dropped it mid-request (crashed or restarting)."""


# The routes and fields this client uses; tests/test_sglang_contract.py checks them against the
# sglang 0.5.23 source.  route -> (HTTP method, SGLang request dataclass of its body or None)
ROUTE_GENERATE = "/generate"
ROUTE_HEALTH = "/health"
ROUTE_ABORT = "/abort_request"  # body AbortReq {rid}; SGLang answers an empty 200, the embedded engine JSON
ROUTES: dict[str, tuple[str, str | None]] = {ROUTE_GENERATE: ("POST", "GenerateReqInput"), ROUTE_HEALTH: ("GET", None), ROUTE_ABORT: ("POST", None)}
#: how long an /abort_request may take (it only enqueues the abort on the server)
ABORT_TIMEOUT_S = 5.0
#: ``meta_info`` fields of a /generate response that parse_generation reads
META_FIELDS = ("output_token_logprobs", "weight_version", "finish_reason")
#: SGLang's per-span token versions (read when present)
SPANS_META_FIELD = "weight_versions"
#: slipstream extensions only the embedded engine returns (read when present)
EXTENSION_META_FIELDS = ("output_token_weight_versions",)


def span_versions(spans: Any, num_tokens: int) -> list[int] | None:
    """Per-token versions from SGLang's ``weight_versions`` spans, or None when they are missing,
    malformed, not integers (e.g. "default") or do not cover every output token exactly once."""
    if not isinstance(spans, list) or not spans:
        return None
    out: list[int] = []
    try:
        for span in spans:
            start, end, version = int(span["start"]), int(span["end"]), int(span["version"])
            if start != len(out) or end < start:
                return None
            out.extend([version] * (end - start))
    except (KeyError, TypeError, ValueError):
        return None
    return out if len(out) == num_tokens else None


def generate_body(input_ids: list[list[int]], sampling_params: dict[str, Any], rids: list[str] | None = None) -> dict[str, Any]:
    """The JSON body of one batched ``POST /generate`` (``rids``: one request id per input, for aborts)."""
    body: dict[str, Any] = {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": True}
    if rids is not None:
        body["rid"] = list(rids)
    return body


def check_response(resp: Any) -> str | None:
    """What is wrong with one ``/generate`` response as an engine's output (None: nothing): the
    shape the client relies on, and every sampled token's log-probability finite and <= 0."""
    if not isinstance(resp, dict):
        return f"a response is {type(resp).__name__}, expected a JSON object"
    meta = resp.get("meta_info")
    if not isinstance(meta, dict):
        return "a response has no meta_info object"
    lp = meta.get("output_token_logprobs")
    if lp is None:
        return None  # return_logprob not asked for (parse_generation says so)
    if not isinstance(lp, list):
        return f"meta_info.output_token_logprobs is {type(lp).__name__}, expected a list"
    for j, entry in enumerate(lp):
        if not isinstance(entry, list | tuple) or len(entry) < 2 or not isinstance(entry[1], int) or isinstance(entry[1], bool):
            return f"meta_info.output_token_logprobs[{j}] = {str(entry)[:60]} is not [logprob, token_id, ...]"
        x = entry[0]
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x > 0:
            return f"meta_info.output_token_logprobs[{j}] log-probability {x!r} is not a finite number <= 0"
    return None


@dataclass
class Generation:
    """One sampled response, normalised from SGLang's response JSON."""

    output_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str
    weight_version: int


def parse_generation(resp: dict[str, Any], version_at_submit: int) -> Generation:
    meta = resp.get("meta_info")
    if not isinstance(meta, dict):
        raise EngineError(f"engine response has no meta_info: {str(resp)[:200]}")
    lp = meta.get("output_token_logprobs")
    if not isinstance(lp, list):
        raise EngineError("engine response has no meta_info.output_token_logprobs (was return_logprob sent?)")
    output_ids = [int(x[1]) for x in lp]
    logprobs = [float(x[0]) for x in lp]
    if "output_ids" in resp and list(resp["output_ids"]) != output_ids:
        raise EngineError("output_ids and output_token_logprobs disagree")
    try:
        final_version = int(meta.get("weight_version", version_at_submit))
    except (TypeError, ValueError):
        # SGLang's "default": the server never got an update from slipstream (every update sets an
        # integer), so it serves model.path's weights, version 0 -- also after a resume, when the
        # producer already knows a later version.  Never newer than the truth: at worst stale.
        final_version = 0
    versions = meta.get("output_token_weight_versions")
    if versions is None:
        versions = span_versions(meta.get(SPANS_META_FIELD), len(output_ids))
    if versions is None:
        versions = [min(version_at_submit, final_version)] * len(output_ids)
    if len(versions) != len(output_ids):
        raise EngineError(f"{len(versions)} token versions for {len(output_ids)} tokens")
    fr = meta.get("finish_reason")
    finish = fr.get("type", "unknown") if isinstance(fr, dict) else str(fr or "unknown")
    return Generation(output_ids, logprobs, [int(v) for v in versions], finish, final_version)


class EngineClient:
    """Round-robins requests over the engine (or router) base URLs in rotation (:mod:`producers.rotation`)."""

    def __init__(self, urls: list[str], timeout_s: float, down_timeout_s: float = 600.0, probe_interval_s: float = 0.5,
                 events: EngineEvents | None = None) -> None:
        if not urls:
            raise ValueError("EngineClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.down_timeout_s = down_timeout_s
        self.rotation = Rotation(self.urls, self._healthy, probe_interval_s, events)
        self._session: aiohttp.ClientSession | None = None
        self._rid_url: dict[str, str] = {}  # rid -> the URL serving it, while in flight (aborts go there)

    async def __aenter__(self) -> EngineClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.rotation.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with EngineClient(...)'")
        return self._session

    async def _post(self, url: str, route: str, body: dict[str, Any]) -> Any:
        try:
            async with self.session.post(f"{url}{route}", json=body) as r:
                text = await r.text()
                if r.status != 200:
                    raise EngineError(f"{url}{route} answered HTTP {r.status}: {text[:300]}", url)
        except TimeoutError as e:  # a stalled engine: not proof of a crash, it stays in rotation
            raise EngineError(f"{url}{route} failed: no answer within {self.timeout.total:.0f}s (producer.request_timeout_s)", url) from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise EngineDown(f"{url}{route} failed: {type(e).__name__}: {e}", url) from e
        except aiohttp.ClientError as e:
            raise EngineError(f"{url}{route} failed: {type(e).__name__}: {e}", url) from e
        try:
            return json.loads(text)
        except ValueError:
            raise EngineOutputError(url, f"{route} answered non-JSON: {text[:200]!r}") from None

    async def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        """POST /generate with a batch of prompts; returns one checked response dict per prompt.

        With ``rids`` (one unique id per prompt) the requests can be aborted by :meth:`abort`.  A
        request whose engine is down is resubmitted (same rids) to the next engine in rotation.
        """
        what = f"a /generate of {len(input_ids)} prompts"
        first_loss: float | None = None
        while True:
            try:
                url = await self.rotation.acquire(self.down_timeout_s, what)
            except NoEngineUp as e:
                raise EngineDown(str(e), ",".join(sorted(self.rotation.down))) from None
            for rid in rids or ():
                self._rid_url[rid] = url
            try:
                data = await self._post(url, ROUTE_GENERATE, generate_body(input_ids, sampling_params, rids))
            except EngineDown as e:
                now = asyncio.get_running_loop().time()
                first_loss = now if first_loss is None else first_loss
                if now - first_loss > self.down_timeout_s:
                    raise  # lost again and again for longer than an engine may take to come back
                self.rotation.retried(url)
                if await self._healthy(url):  # e.g. a keep-alive connection the server had closed: not a crash
                    log.warning("%s to %s lost its connection (%s) but the engine answers /health: resubmitting it", what, url, e)
                    await asyncio.sleep(self.rotation.probe_interval_s)
                else:
                    self.rotation.mark_down(url, str(e))
                    log.warning("%s to %s was lost with the engine: resubmitting it (rids %s)", what, url, ",".join(rids or [])[:80] or "-")
                continue
            finally:
                for rid in rids or ():
                    self._rid_url.pop(rid, None)
            break
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or len(data) != len(input_ids):
            raise EngineOutputError(url, f"/generate returned {type(data).__name__} for {len(input_ids)} prompts")
        for i, resp in enumerate(data):
            problem = check_response(resp)
            if problem is not None:
                raise EngineOutputError(url, f"response {i} of {len(data)}: {problem}")
        return data

    def in_flight_by_url(self) -> dict[str, int]:
        """Requests (rids) in flight now, per engine URL."""
        out = dict.fromkeys(self.urls, 0)
        for url in self._rid_url.values():
            out[url] = out.get(url, 0) + 1
        return out

    def abort_targets(self, rids: list[str]) -> list[tuple[str, str]]:
        """``(rid, url)`` of those ``rids`` in flight now (resolve before cancelling their call)."""
        return [(r, self._rid_url[r]) for r in rids if r in self._rid_url]

    async def abort(self, rid: str, url: str | None = None) -> bool:
        """POST /abort_request for a request this client sent (to ``url``, by default the one serving
        it now); the aborted /generate then returns the tokens sampled so far with finish_reason
        ``abort``.  False when the request is not in flight or the engine did not answer 200 (logged)."""
        url = url or self._rid_url.get(rid)
        if url is None:
            return False
        try:
            async with self.session.post(f"{url}{ROUTE_ABORT}", json={"rid": rid}, timeout=aiohttp.ClientTimeout(total=ABORT_TIMEOUT_S)) as r:
                await r.read()
                if r.status != 200:
                    log.warning("%s%s for rid %s answered HTTP %d", url, ROUTE_ABORT, rid, r.status)
                    return False
                return True
        except (TimeoutError, aiohttp.ClientError) as e:
            log.warning("%s%s for rid %s failed (waited up to %.0fs): %s", url, ROUTE_ABORT, rid, ABORT_TIMEOUT_S, e)
            return False

    async def _healthy(self, url: str) -> bool:
        try:
            async with self.session.get(f"{url}{ROUTE_HEALTH}", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def wait_healthy(self, timeout_s: float) -> None:
        """Wait until every URL answers /health, or raise naming the ones that do not."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        pending = list(self.urls)
        while pending:
            still = []
            for url in pending:
                try:
                    async with self.session.get(f"{url}{ROUTE_HEALTH}", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status != 200:
                            still.append(url)
                except (TimeoutError, aiohttp.ClientError):
                    still.append(url)
            pending = still
            if pending:
                if asyncio.get_running_loop().time() > deadline:
                    raise EngineError(f"engines not healthy after {timeout_s:.0f}s: {pending}")
                log.info("waiting for engine health at %s", pending)
                await asyncio.sleep(0.5)
