"""Configuration of the embedded inference engine (``producers/engine``).

What: :class:`EngineConfig`, the behaviour knobs of one engine process (batch cap, memory budget,
KV slot size, prefill chunking, CUDA graphs / compile, sampling seed, dtype/device, threads,
weight-update behaviour, timeouts).  Where the model lives and which
address the HTTP server binds are command-line arguments, not config, because the launcher picks
them per process.

Why: the launcher builds this from ``[producer.engine]`` in the run's TOML (plus ``--set``
overrides) with :func:`pipeline.configbase.from_dict`, and the engine CLI accepts the same keys as
``--set key=value``.  A bad value raises one :class:`~pipeline.configbase.ConfigError` naming the key.

How to run::

    python -m producers.engine --model DIR --port 0 --set max_running_requests=16 --set dtype=bfloat16
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import check, doc

DType = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda", "auto"]



STANDALONE_MEM_FRACTION = 0.85  # engine.mem_fraction = 0 in an engine the launcher did not place

@dataclass
class EngineConfig:
    """Behaviour of one embedded engine process."""

    max_running_requests: int = doc(
        "Most sequences decoded together (continuous-batching cap). Further requests wait in a FIFO queue.",
        default=32,
    )
    max_new_tokens_cap: int = doc(
        "Largest sampling_params.max_new_tokens a request may ask for; larger values get HTTP 400.",
        default=4096,
    )
    default_max_new_tokens: int = doc(
        "max_new_tokens used when a request does not give one (SGLang's default is 128).",
        default=128,
    )
    seed: int = doc(
        "Engine seed. A request without sampling_params.sampling_seed samples with a generator seeded from "
        "(seed, running request counter), so a fresh engine replays the same stream of requests identically.",
        default=0,
    )
    dtype: DType = doc("Dtype the model is loaded and run in. float32 gives exact log-probs on CPU.", default="float32")
    device: Device = doc("Where the model runs: cpu, cuda, or auto (cuda when available).", default="auto")
    threads: int = doc("torch intra-op threads (torch.set_num_threads). 1 suits many small engines per host.", default=1)
    attn_implementation: Literal["sdpa", "eager"] = doc(
        "Attention of the engine's forward: 'sdpa' (torch scaled_dot_product_attention kernels) or 'eager' "
        "(matmul + softmax, a reference).", default="sdpa"
    )
    mem_fraction: float = doc(
        "Fraction of the device's total memory (host RAM on CPU) this engine may hold: weights, weight staging, "
        "working memory and the KV cache, which gets at most the rest. On CUDA also the allocator's hard cap "
        "(torch.cuda.set_per_process_memory_fraction). It never depends on what happens to be free. 0 = auto: the "
        "launcher's placement picks 0.85 of a GPU the engine has alone, 0.3 of one it shares with a trainer rank, 0.5 "
        "of host RAM on CPU, each split evenly between the engines on that device (--dry-run prints it); an engine "
        "started by hand takes 0.85.", default=0.0,
    )
    max_total_tokens: int = doc(
        "Cap of the KV cache in tokens (0: what mem_fraction leaves). Running sequences = min(max_running_requests, "
        "this // max_seq_len - 1); further requests wait in the FIFO queue.", default=0,
    )
    max_seq_len: int = doc(
        "Tokens one sequence may hold (prompt + max_new_tokens): the size of its KV slot. 0: the model's context "
        "length, at most 4096. A request that cannot fit gets HTTP 400 naming this key.", default=0,
    )
    prefill_chunk_tokens: int = doc(
        "Most prompt tokens (padded) prefilled between two decode steps; a longer prompt is prefilled in chunks "
        "of this size over several steps, so a burst of requests does not stall decoding.", default=8192,
    )
    cuda_graphs: bool = doc(
        "Replay decode steps as CUDA graphs, captured per (batch, attention width) bucket on first use (CUDA "
        "only; off for MoE models). A failed capture is logged and counted "
        "(slipstream_engine_fallbacks_total) and decoding continues without graphs.", default=True,
    )
    compile: bool = doc(
        "Fuse the forward's element-wise steps (RMSNorm, residual add, q/k norm + RoPE, SiLU) with torch.compile "
        "(CUDA only, at start-up; a failure falls back to eager kernels, logged and counted).", default=True,
    )
    weight_version: int = doc(
        "Policy version of the weights loaded from --model (0 for the initial checkpoint; a restarted engine "
        "that loads a published checkpoint passes that checkpoint's version).",
        default=0,
    )
    recompute_kv_on_update: bool = doc(
        "After a weight swap, recompute the KV cache of in-flight sequences with the new weights (one prefill "
        "over prompt+output per running sequence). False (default) keeps the old KV: tokens sampled after the "
        "swap are scored by the new weights but attend to keys/values of the prefix computed by the old ones, "
        "so they are slightly off-policy; the per-token versions still tell the trainer which weights sampled "
        "each token. True removes that mismatch at the cost of a prefill per update, which lengthens the "
        "generation pause roughly by the time of one prefill over all running contexts.",
        default=False,
    )
    weight_group_timeout_s: float = doc(
        "Timeout of the weight-group rendezvous (init_weights_update_group) and of each broadcast.",
        default=120.0,
    )
    request_timeout_s: float = doc(
        "Longest a /generate request may take (queued + decoding). When it passes, the request is aborted and "
        "returns what it has with finish_reason {type: abort}. 0 disables the limit.",
        default=1800.0,
    )
    shutdown_timeout_s: float = doc(
        "On SIGTERM/SIGINT: how long in-flight HTTP responses get to drain before the server closes.",
        default=3.0,
    )
    max_request_bytes: int = doc("Largest accepted HTTP request body in bytes.", default=64 * 1024 * 1024)

    @property
    def effective_mem_fraction(self) -> float:
        """mem_fraction, or for 0 (auto, not resolved by a launcher) the fraction of a device of its own."""
        return self.mem_fraction or STANDALONE_MEM_FRACTION

    def __post_init__(self) -> None:
        check(self.max_running_requests >= 1, "max_running_requests", "must be at least 1")
        check(self.max_new_tokens_cap >= 1, "max_new_tokens_cap", "must be at least 1")
        check(
            0 <= self.default_max_new_tokens <= self.max_new_tokens_cap,
            "default_max_new_tokens",
            f"must be between 0 and max_new_tokens_cap ({self.max_new_tokens_cap})",
        )
        check(0 <= self.seed < 2**63, "seed", "must be a non-negative 63-bit integer")
        check(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
        check(self.device in ("cpu", "cuda", "auto"), "device", "must be cpu, cuda or auto")
        check(1 <= self.threads <= 1024, "threads", "must be between 1 and 1024")
        check(self.attn_implementation in ("sdpa", "eager"), "attn_implementation", "must be sdpa or eager")
        check(self.weight_version >= 0, "weight_version", "must be >= 0")
        check(self.weight_group_timeout_s > 0, "weight_group_timeout_s", "must be > 0 seconds")
        check(self.request_timeout_s >= 0, "request_timeout_s", "must be >= 0 seconds (0 disables)")
        check(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0 seconds")
        check(self.max_request_bytes >= 1024, "max_request_bytes", "must be at least 1024")
        check(0.0 <= self.mem_fraction <= 1.0, "mem_fraction", "must be in [0, 1] (0 = auto)")
        check(self.max_total_tokens >= 0, "max_total_tokens", "must be >= 0 (0: from mem_fraction)")
        check(self.max_seq_len == 0 or self.max_seq_len >= 2, "max_seq_len", "must be 0 (auto) or at least 2")
        check(self.prefill_chunk_tokens >= 16, "prefill_chunk_tokens", "must be at least 16")
