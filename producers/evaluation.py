"""Periodic evaluation on held-out prompts (pass@k), run by producer 0 alongside training.

    [producer]
    eval_prompts = "producers.tasks.maxdigit:prompts"   # any prompt source plug-in ("" = off)
    eval_prompts_args = {}
    eval_num_prompts = 32        # the held-out set: the first N prompts of the source, seed eval_seed
    eval_samples = 8             # n samples per prompt; pass@k is reported for k in eval_ks (k <= n)
    eval_ks = [1, 4, 8]
    eval_every_versions = 10     # evaluate at version 0 and whenever the version reaches a multiple
    eval_pass_threshold = 1.0    # a sample passes when its reward >= this

The evaluation task shares the producer's engine client, rollout and reward plug-ins but takes no
credits and sends nothing to the broker, so it never blocks training (it only adds engine load).
One line per evaluation goes to ``RUN_DIR/eval.jsonl``::

    {"policy_version": 10, "min_token_version": 10, "max_token_version": 11, "prompts": 32,
     "samples_per_prompt": 8, "pass@1": 0.41, "pass@4": 0.77, "pass@8": 0.88, "reward_mean": 0.52, "seconds": 1.9}

pass@k uses the unbiased estimator of Chen et al. (2021): ``1 - C(n - c, k) / C(n, k)`` per prompt
with ``c`` passing samples out of ``n``, averaged over prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from itertools import islice
from math import comb
from pathlib import Path
from typing import Any

from producers.plugins import PluginTimeout, Prompt, Sample
from producers.rollout import RolloutContext, RolloutSample, SamplingParams, validate_samples
from producers.scoring import Scorer
from producers.sglang_client import EngineClient, EngineError

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``c`` of ``n`` samples passing."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


class Evaluator:
    def __init__(
        self,
        prompts: list[Prompt],
        rollout_fn: Callable[..., Any],
        rollout_name: str,
        scorer: Scorer,
        sampling: SamplingParams,
        samples: int,
        ks: list[int],
        every_versions: int,
        threshold: float,
        out_path: Path,
    ) -> None:
        self.prompts = prompts
        self.rollout_fn = rollout_fn
        self.rollout_name = rollout_name
        self.scorer = scorer
        self.sampling = sampling
        self.samples = samples
        self.ks = sorted({k for k in ks if 1 <= k <= samples}) or [1]
        self.every_versions = max(1, every_versions)
        self.threshold = threshold
        self.out_path = out_path
        self.last_evaluated: int | None = None

    @classmethod
    def from_config(cls, cfg: Any, rollout_fn: Callable[..., Any], scorer: Scorer, sampling: SamplingParams, out_path: Path) -> Evaluator:
        from producers.plugins import load_plugin

        source = load_plugin(cfg.eval_prompts, "producer.eval_prompts", cfg.eval_prompts_args)(cfg.eval_seed)
        prompts = list(islice(source, cfg.eval_num_prompts))
        log.info("evaluation: %d held-out prompts from %s every %d versions", len(prompts), cfg.eval_prompts, cfg.eval_every_versions)
        return cls(prompts, rollout_fn, cfg.rollout, scorer, sampling, cfg.eval_samples, list(cfg.eval_ks), cfg.eval_every_versions, cfg.eval_pass_threshold, out_path)

    def due(self, version: int) -> bool:
        v = version - version % self.every_versions
        return self.last_evaluated is None or v > self.last_evaluated

    async def evaluate(self, client: EngineClient, tokenizer: Any, version_fn: Callable[[], int]) -> dict[str, Any]:
        version = version_fn()
        t0 = time.monotonic()

        async def one(p: Prompt) -> tuple[list[RolloutSample], list[float]]:
            tokens = list(p.tokens) if p.tokens is not None else list(tokenizer.encode(p.text).ids)
            prompt = Prompt(p.prompt_id, p.text, tokens, p.label, dict(p.metadata))
            ctx = RolloutContext(client, tokenizer, self.samples, version, "eval", version_fn)
            out = validate_samples(await self.rollout_fn(ctx, prompt, self.sampling), self.samples, self.rollout_name)
            samples = [Sample(prompt, tokens, list(r.response_tokens), r.response_text if r.response_text is not None else tokenizer.decode(list(r.response_tokens), skip_special_tokens=True),
                              r.finish_reason, list(r.loss_mask), dict(r.metadata)) for r in out]
            return out, await self.scorer.rewards(samples)

        results = await asyncio.gather(*(one(p) for p in self.prompts))
        rec: dict[str, Any] = {
            "policy_version": version,
            "min_token_version": min((min(r.versions) for rs, _ in results for r in rs if r.versions), default=version),
            "max_token_version": max((max(r.versions) for rs, _ in results for r in rs if r.versions), default=version),
            "prompts": len(results), "samples_per_prompt": self.samples,
        }
        for k in self.ks:
            rec[f"pass@{k}"] = sum(pass_at_k(self.samples, sum(r >= self.threshold for r in rw), k) for _, rw in results) / len(results)
        rewards = [r for _, rw in results for r in rw]
        rec["reward_mean"] = sum(rewards) / len(rewards)
        rec["seconds"] = round(time.monotonic() - t0, 3)
        self.last_evaluated = version - version % self.every_versions
        with self.out_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        log.info("evaluation at v%d: %s", version, {k: round(v, 3) for k, v in rec.items() if k.startswith("pass@")})
        return rec

    async def loop(self, client: EngineClient, tokenizer: Any, version_fn: Callable[[], int], stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Evaluate whenever due until ``stop``; engine errors and plug-in timeouts are logged and
        retried at the next poll (evaluation never stops training)."""
        while not stop.is_set():
            if self.due(version_fn()):
                try:
                    await self.evaluate(client, tokenizer, version_fn)
                except EngineError as e:
                    log.warning("evaluation failed (engine; retried at the next poll): %s", e)
                except PluginTimeout as e:
                    log.warning("evaluation failed (plug-in timeout; retried at the next poll): %s", e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=poll_s)
            except TimeoutError:
                pass
