"""Remote reward over HTTP: POST JSON to a reward server, read the reward(s) back.

    [producer]
    reward = "producers.rewards.remote:make_reward"
    reward_scope = "sample"          # or "group": one request per group
    reward_args = { url = "http://127.0.0.1:8000/score", timeout_s = 10.0, retries = 2 }

Request body for one sample (``reward_scope = "sample"``)::

    {"prompt_id": ..., "prompt": <prompt text>, "label": ..., "metadata": {...},
     "prompt_tokens": [...], "response": <response text>, "response_tokens": [...],
     "loss_mask": [...], "finish_reason": "stop"}

answered by ``{"reward": 0.7}``.  With ``reward_scope = "group"`` the body is
``{"samples": [<one object as above>, ...]}`` and the answer ``{"rewards": [...]}``.

Timeouts, connection errors and HTTP 5xx are retried ``retries`` times with a short backoff; then
(or on HTTP 4xx or a malformed answer) the call raises, which stops the producer with a message
naming the plug-in and the URL (training on made-up rewards would be worse).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from producers.plugins import Sample

log = logging.getLogger(__name__)


class RemoteRewardError(RuntimeError):
    pass


def sample_json(s: Sample) -> dict[str, Any]:
    return {
        "prompt_id": s.prompt.prompt_id, "prompt": s.prompt.text, "label": s.prompt.label, "metadata": s.prompt.metadata,
        "prompt_tokens": list(s.prompt_tokens), "response": s.response_text, "response_tokens": list(s.response_tokens),
        "loss_mask": list(s.loss_mask), "finish_reason": s.finish_reason,
    }


class RemoteReward:
    """Async reward plug-in; called with a Sample (per-sample scope) or a list of them (group scope)."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.2, headers: dict[str, str] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = dict(headers or {})

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                async with aiohttp.ClientSession(timeout=self.timeout, headers=self.headers) as session, session.post(self.url, json=body) as r:
                    text = await r.text()
                    if r.status >= 500:
                        last = f"HTTP {r.status}: {text[:200]}"
                        log.warning("remote reward %s: %s (attempt %d)", self.url, last, attempt + 1)
                        continue
                    if r.status != 200:
                        raise RemoteRewardError(f"{self.url} answered HTTP {r.status}: {text[:200]}")
                    try:
                        data = await r.json(content_type=None)
                    except ValueError:
                        raise RemoteRewardError(f"{self.url} answered non-JSON: {text[:200]}") from None
                    if not isinstance(data, dict):
                        raise RemoteRewardError(f"{self.url} answered {type(data).__name__}, expected a JSON object")
                    return data
            except (TimeoutError, aiohttp.ClientError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (timeout {self.timeout.total}s)"
                log.warning("remote reward %s failed: %s (attempt %d)", self.url, last, attempt + 1)
        raise RemoteRewardError(f"{self.url} failed after {self.retries + 1} attempts: {last}")

    async def __call__(self, sample: Sample | list[Sample]) -> float | list[float]:
        if isinstance(sample, list):
            data = await self._post({"samples": [sample_json(s) for s in sample]})
            if "rewards" not in data:
                raise RemoteRewardError(f"{self.url} answer has no 'rewards': {str(data)[:200]}")
            return data["rewards"]
        data = await self._post(sample_json(sample))
        if "reward" not in data:
            raise RemoteRewardError(f"{self.url} answer has no 'reward': {str(data)[:200]}")
        return data["reward"]


def make_reward(url: str, timeout_s: float = 10.0, retries: int = 2, backoff_s: float = 0.2, headers: dict[str, str] | None = None) -> RemoteReward:
    """Factory named by ``producer.reward`` with ``producer.reward_args``."""
    return RemoteReward(url, timeout_s, retries, backoff_s, headers)
