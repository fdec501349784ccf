"""Config of the rollout producers (:class:`ProducerConfig`).

A producer takes prompts from a prompt source, asks an engine (the embedded engine or SGLang, over
SGLang's HTTP API) for ``group_size`` samples each, scores them with a reward function and pushes
the group to the broker.  Plug-ins are named by import path (``module:attribute``).

Robustness knobs: per-call plug-in timeouts (``rollout_timeout_s``, ``reward_timeout_s``,
``tool_timeout_s``, ``timeout_attempts``), over-generation for dynamic sampling (``oversample``) and
cutting groups certain to be consumed too stale (``partial_rollouts``); see :mod:`producers.producer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.configbase import ConfigError, check, doc


@dataclass
class ProducerConfig:
    num_producers: int = doc("Producer processes to start (each drives its share of the engines).", 1)
    engine: Literal["embedded", "attach", "sglang"] = doc(
        "'embedded': the launcher starts slipstream's own engine servers; 'attach': use running servers "
        "(SGLang or embedded) at engine_urls; 'sglang': the launcher starts num_engines SGLang servers "
        "(python -m sglang.launch_server with the producer.sglang flags; needs weights.engine_kind = 'sglang').",
        "embedded",
    )
    num_engines: int = doc("Engine servers to start: embedded engines (engine = 'embedded') or SGLang servers (engine = 'sglang').", 1)
    engine_urls: list[str] = doc("Engine base URLs for engine = 'attach' (an SGLang router URL works too).", default_factory=list)
    group_size: int = doc("Samples per prompt (the GRPO group).", 8)
    max_inflight_groups: int = doc(
        "Credits one producer holds at once = groups it generates concurrently (also bounded by the credits granted); "
        "with oversample > 1 up to ceil(oversample x this) generate.", 8)
    prompts: str = doc("Prompt source plug-in: import path of a callable(seed) -> iterator of Prompt.", "producers.tasks.maxdigit:prompts")
    prompts_args: dict[str, Any] = doc("Keyword arguments for the prompt source; non-empty: 'prompts' names a factory called with them.", default_factory=dict)
    rollout: str = doc(
        "Rollout plug-in: import path of an async callable(ctx, prompt, params) -> list[RolloutSample] "
        "(producers.rollout; multi-turn: producers.rollouts.multiturn:make_rollout with rollout_args).",
        "producers.rollout:single_turn",
    )
    rollout_args: dict[str, Any] = doc("Keyword arguments for the rollout; non-empty: 'rollout' names a factory called with them.", default_factory=dict)
    reward: str = doc("Reward plug-in: import path of a callable(Sample) -> float (sync or async; see reward_scope).", "producers.tasks.maxdigit:reward")
    reward_scope: Literal["sample", "group"] = doc(
        "'sample': reward(Sample) -> float per sample; 'group': reward(list[Sample]) -> list[float] once per group.", "sample"
    )
    reward_args: dict[str, Any] = doc("Keyword arguments for the reward; non-empty: 'reward' names a factory called with them.", default_factory=dict)
    group_filter: str = doc(
        "Group filter plug-in (empty = keep every group): callable(list[Sample]) -> None (keep) or a reason (drop); "
        "e.g. producers.filters:drop_uniform drops groups whose rewards are all equal.",
        "",
    )
    group_filter_args: dict[str, Any] = doc("Keyword arguments for the group filter (factory, as for reward_args).", default_factory=dict)
    eval_prompts: str = doc("Held-out prompt source for periodic evaluation by producer 0 (pass@k to RUN_DIR/eval.jsonl); empty = off.", "")
    eval_prompts_args: dict[str, Any] = doc("Keyword arguments for eval_prompts (factory, as for prompts_args).", default_factory=dict)
    eval_seed: int = doc("Seed of the held-out prompt source (a different stream than training's).", 12345)
    eval_num_prompts: int = doc("Held-out prompts per evaluation (the first N of eval_prompts).", 32)
    eval_samples: int = doc("Samples per held-out prompt (n of pass@k).", 8)
    eval_ks: list[int] = doc("k values of pass@k (those > eval_samples are skipped).", default_factory=lambda: [1, 4, 8])
    eval_every_versions: int = doc("Evaluate at version 0 and each time the policy version reaches a multiple of this.", 10)
    eval_pass_threshold: float = doc("A held-out sample passes when its reward is >= this.", 1.0)
    stop_token_ids: list[int] = doc("Extra token ids that end a response (besides EOS).", default_factory=list)
    temperature: float = doc(
        "Sampling temperature, declared once for the run: trainer.temperature follows it (the trainer computes its "
        "log-probs at the same temperature).", 1.0)
    top_p: float = doc("Nucleus sampling threshold (1.0 = off; off keeps behaviour log-probs exact).", 1.0)
    max_new_tokens: int = doc("Most tokens sampled per response.", 7)
    request_timeout_s: float = doc("Timeout of one /generate call.", 300.0)
    engine_down_timeout_s: float = doc(
        "How long a /generate request whose engine went down (connection refused or dropped) waits for an engine to be back "
        "in rotation (another one, or the same URL once /health answers, e.g. after the launcher restarted it) before it "
        "fails as an engine error (its group is dropped and the prompt retried).", 600.0)
    ack_timeout_s: float = doc("Resend a group the broker has not acked within this time.", 10.0)
    outbox_limit: int = doc(
        "Most unacked groups a producer holds before it stops starting new ones (groups waiting for a credit, see oversample, count too).", 64)
    rollout_timeout_s: float = doc(
        "Per-call timeout of the rollout plug-in (one whole group: every /generate and tool call of it). On timeout the group is "
        "abandoned (its requests aborted), counted in slipstream_producer_plugin_errors_total{reason='rollout_timeout'} and the "
        "prompt retried (timeout_attempts).", 1800.0)
    reward_timeout_s: float = doc(
        "Per-call timeout of the reward plug-in (each call: one sample, or one group with reward_scope = 'group') and of the group "
        "filter; sync plug-ins run in a worker thread that is abandoned at the timeout. On timeout: as for rollout_timeout_s "
        "(reason 'reward_timeout' or 'group_filter_timeout').", 300.0)
    tool_timeout_s: float = doc(
        "Per-call timeout of a multi-turn tool/environment plug-in (producer.rollout_args.tool); sync tools run in a worker thread. "
        "On timeout: as for rollout_timeout_s (reason 'tool_timeout').", 120.0)
    timeout_attempts: int = doc(
        "Attempts per prompt when a plug-in call times out; after the last one the prompt is logged and counted as failed "
        "(slipstream_producer_prompts_failed_total{reason='timeout'}) and its credit starts another prompt.", 3)
    oversample: float = doc(
        "Dynamic-sampling over-generation: keep up to ceil(oversample x credits held) groups generating, so that groups a "
        "group_filter drops are replaced without waiting for another round. A passing group is sent while a credit is held, "
        "else it waits in the producer (bounded by outbox_limit) until one arrives; a waiting group that becomes staler than "
        "queue.max_staleness is regenerated. The broker's admission bound stays the hard limit on what is sent. 1.0 = off.", 1.0)
    partial_rollouts: bool = doc(
        "When a published version makes a generating group certain to be staler than queue.max_staleness at consumption "
        "(v - version at its start > η), the producer cuts it (/abort_request). True: each unfinished sample keeps its tokens as "
        "context (loss mask 0, version = the new one, like tool tokens) and continues under the new weights with the remaining "
        "max_new_tokens; finished samples are regenerated. False: the group restarts from the prompt. Default true: restarting "
        "wastes the compute and can regenerate a prompt whose answer takes longer than η + 1 steps forever (a bias against long "
        "answers); the cost is that the cut head is not trained on. Only the built-in single-turn rollout continues; other "
        "rollouts restart.", True)
    sglang: dict[str, Any] = doc(
        "Flags of the SGLang servers slipstream launches (engine = 'sglang'): key -> --key value (true: a bare switch, false: "
        "left out, a list: several values); checked against SGLang's ServerArgs (the installed sglang's source, else the "
        "fields recorded from 0.5.23). --sglang-KEY VALUE on the command line is the same.", default_factory=dict)
    sglang_command: list[str] = doc(
        "Command that starts one SGLang server, before slipstream's flags; empty = [python, -m, sglang.launch_server] "
        "with this Python.", default_factory=list)
    sglang_gpus_per_server: int = doc("GPUs per SGLang server (CUDA_VISIBLE_DEVICES); 0 = tp_size x pp_size x dp_size of producer.sglang.", 0)
    sglang_gpu_ids: list[int] = doc("GPU ids handed out to the SGLang servers in order, each a consecutive slice; empty = 0, 1, 2, ...",
                                    default_factory=list)
    sglang_router: bool = doc(
        "Start sglang-router in front of the SGLang servers: producers generate through it, the trainer still publishes "
        "weights to each server.", False)
    sglang_router_command: list[str] = doc("Command that starts the router; empty = [python, -m, sglang_router.launch_router].",
                                           default_factory=list)

    def __post_init__(self) -> None:
        check(self.num_producers >= 1, "num_producers", "must be >= 1")
        check(self.num_engines >= 1, "num_engines", "must be >= 1")
        check(self.engine != "attach" or bool(self.engine_urls), "engine_urls", "engine = 'attach' needs at least one URL")
        check(all(u.startswith(("http://", "https://")) for u in self.engine_urls), "engine_urls", "URLs must start with http:// or https://")
        check(self.group_size >= 1, "group_size", "must be >= 1")
        check(self.max_inflight_groups >= 1, "max_inflight_groups", "must be >= 1")
        check(":" in self.prompts, "prompts", "must be an import path 'module:attribute'")
        check(":" in self.reward, "reward", "must be an import path 'module:attribute'")
        check(":" in self.rollout, "rollout", "must be an import path 'module:attribute'")
        check(not self.eval_prompts or ":" in self.eval_prompts, "eval_prompts", "must be empty or an import path 'module:attribute'")
        check(self.eval_num_prompts >= 1 and self.eval_samples >= 1, "eval_samples", "eval_num_prompts and eval_samples must be >= 1")
        check(all(k >= 1 for k in self.eval_ks), "eval_ks", "each k must be >= 1")
        check(self.eval_every_versions >= 1, "eval_every_versions", "must be >= 1")
        check(not self.group_filter or ":" in self.group_filter, "group_filter", "must be empty or an import path 'module:attribute'")
        check(self.temperature > 0, "temperature", "must be > 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.ack_timeout_s > 0, "ack_timeout_s", "must be > 0")
        check(self.engine_down_timeout_s > 0, "engine_down_timeout_s", "must be > 0")
        check(self.outbox_limit >= self.max_inflight_groups, "outbox_limit", "must be >= max_inflight_groups")
        check(self.rollout_timeout_s > 0, "rollout_timeout_s", "must be > 0")
        check(self.reward_timeout_s > 0, "reward_timeout_s", "must be > 0")
        check(self.tool_timeout_s > 0, "tool_timeout_s", "must be > 0")
        check(self.timeout_attempts >= 1, "timeout_attempts", "must be >= 1")
        check(math.isfinite(self.oversample) and self.oversample >= 1.0, "oversample", "must be a finite number >= 1.0 (1.0 = off)")
        check(not self.sglang or self.engine == "sglang", "sglang",
              f"SGLang flags ({', '.join(sorted(self.sglang))}) are used only when slipstream launches SGLang: set producer.engine = 'sglang'")
        check(self.sglang_gpus_per_server >= 0, "sglang_gpus_per_server", "must be >= 0 (0 = from the tp/pp/dp flags)")
        if self.sglang:
            from producers.sglang_launch import validate_sglang_flags

            try:
                validate_sglang_flags(self.sglang)
            except ConfigError as e:
                raise ConfigError(e.key.removeprefix("producer."), e.message) from None
