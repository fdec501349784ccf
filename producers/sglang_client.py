"""Async client for the subset of SGLang's HTTP API that producers use.

The same client talks to real SGLang servers, an SGLang router, or slipstream's embedded engine
(which serves the same routes), so the producer code path is identical in tests and production.
Field names follow sglang 0.5.23 (``docs/notes/sglang-0.5.23-api.md``).

Per-token policy versions: the embedded engine returns ``meta_info.output_token_weight_versions``
(a slipstream extension).  Real SGLang reports one ``weight_version`` per response; then every token
is stamped with the *older* of the version known when the request was sent and the one reported at
the end, which can only overstate staleness, never hide it — unless the response carries SGLang's
``meta_info.weight_versions`` spans (``[{version, start, end}]`` over output tokens, sglang >= 0.5.23),
which give each token its exact version.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    pass


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
        final_version = version_at_submit  # SGLang's default version string is "default"
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
    """Round-robins requests over one or more engine (or router) base URLs."""

    def __init__(self, urls: list[str], timeout_s: float) -> None:
        if not urls:
            raise ValueError("EngineClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in urls]
        self._next = itertools.cycle(range(len(self.urls)))
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._rid_url: dict[str, str] = {}  # rid -> the URL serving it, while in flight (aborts go there)

    async def __aenter__(self) -> EngineClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
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
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise EngineError(f"{url}{route} answered HTTP {r.status}: {str(data)[:300]}")
                return data
        except (TimeoutError, aiohttp.ClientError) as e:
            raise EngineError(f"{url}{route} failed: {type(e).__name__}: {e}") from e

    async def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any], rids: list[str] | None = None) -> list[dict[str, Any]]:
        """POST /generate with a batch of prompts; returns one response dict per prompt.

        With ``rids`` (one unique id per prompt) the requests can be aborted by :meth:`abort`.
        """
        url = self.urls[next(self._next)]
        for rid in rids or ():
            self._rid_url[rid] = url
        try:
            data = await self._post(url, ROUTE_GENERATE, generate_body(input_ids, sampling_params, rids))
        finally:
            for rid in rids or ():
                self._rid_url.pop(rid, None)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or len(data) != len(input_ids):
            raise EngineError(f"{url}/generate returned {type(data).__name__} for {len(input_ids)} prompts")
        return data

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
