"""Async client for the subset of SGLang's HTTP API that producers use.

The same client talks to real SGLang servers, an SGLang router, or slipstream's embedded engine
(which serves the same routes), so the producer code path is identical in tests and production.
Field names follow sglang 0.5.23 (``shared/notes/sglang-0.5.23-api.md``).

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
ROUTES: dict[str, tuple[str, str | None]] = {ROUTE_GENERATE: ("POST", "GenerateReqInput"), ROUTE_HEALTH: ("GET", None)}
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


def generate_body(input_ids: list[list[int]], sampling_params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of one batched ``POST /generate``."""
    return {"input_ids": input_ids, "sampling_params": sampling_params, "return_logprob": True}


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

    async def generate(self, input_ids: list[list[int]], sampling_params: dict[str, Any]) -> list[dict[str, Any]]:
        """POST /generate with a batch of prompts; returns one response dict per prompt."""
        url = self.urls[next(self._next)]
        data = await self._post(url, ROUTE_GENERATE, generate_body(input_ids, sampling_params))
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or len(data) != len(input_ids):
            raise EngineError(f"{url}/generate returned {type(data).__name__} for {len(input_ids)} prompts")
        return data

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
