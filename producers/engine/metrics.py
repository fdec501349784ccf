"""Prometheus metrics of the embedded engine (one registry per engine process).

What: :class:`EngineMetrics` creates every ``slipstream_engine_*`` series in the registry made by
``pipeline.metrics.new_registry("engine")``; the server exposes it at ``GET /metrics``.
Why: DESIGN §9 asks every process for tokens generated, current policy version and the pause per
weight update; names use base units, counters end in ``_total``, label values come from fixed sets.
Run: not on its own; ``python -m producers.engine ...`` then ``curl http://HOST:PORT/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.metrics import SECONDS_BUCKETS

FINISH_REASONS = ("stop", "length", "abort")


class EngineMetrics:
    """The engine's Prometheus metrics, all in one per-process registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.generated_tokens = Counter("slipstream_engine_generated_tokens_total", "Tokens sampled.", registry=r)
        self.prompt_tokens = Counter("slipstream_engine_prompt_tokens_total", "Prompt tokens prefilled.", registry=r)
        self.running = Gauge("slipstream_engine_running_requests", "Sequences being decoded.", registry=r)
        self.queued = Gauge("slipstream_engine_queued_requests", "Requests waiting for a batch slot.", registry=r)
        self.paused = Gauge("slipstream_engine_paused", "1 while generation is paused.", registry=r)
        self.version = Gauge("slipstream_engine_policy_version", "Policy version of the live weights.", registry=r)
        self.decode_steps = Counter("slipstream_engine_decode_steps_total", "Batched decode steps.", registry=r)
        self.step_seconds = Histogram(
            "slipstream_engine_decode_step_seconds", "Time of one batched decode step.", buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.pause_seconds = Histogram(
            "slipstream_engine_weight_update_pause_seconds",
            "Generation pause per weight update (swap of the staged tensors, plus KV recompute when enabled).",
            buckets=SECONDS_BUCKETS, registry=r,
        )
        self.receive_seconds = Histogram(
            "slipstream_engine_weight_receive_seconds",
            "Time to receive one weight bucket into staging (generation continues meanwhile).",
            buckets=SECONDS_BUCKETS, registry=r,
        )
        self.update_bytes = Counter(
            "slipstream_engine_weight_update_bytes_total", "Weight bytes received over the weight group.", registry=r
        )
        self.staging_bytes = Gauge(
            "slipstream_engine_weight_staging_bytes",
            "Memory of the weight-update staging buffers: one model size from the first update, two once an "
            "update is adopted (the live weights then live in one of them and the loaded ones are freed).",
            registry=r,
        )
        self.updates = Counter(
            "slipstream_engine_weight_updates_total", "Weight updates by result.", ["result"], registry=r
        )
        self.requests = Counter(
            "slipstream_engine_requests_total", "Finished generation requests by finish reason.", ["finish_reason"],
            registry=r,
        )
        self.bad_requests = Counter(
            "slipstream_engine_bad_requests_total", "HTTP requests rejected with status 400.", registry=r
        )
        self.memory_limit = Gauge(
            "slipstream_engine_memory_limit_bytes",
            "The engine's memory budget: engine.mem_fraction x the device's total memory (host RAM on CPU).", registry=r,
        )
        self.memory_used = Gauge(
            "slipstream_engine_memory_used_bytes",
            "Memory the engine holds now: the CUDA caching allocator's reserved bytes, or the process RSS on CPU.",
            registry=r,
        )
        self.memory_peak = Gauge(
            "slipstream_engine_memory_peak_bytes",
            "Peak of slipstream_engine_memory_used_bytes (CUDA: max reserved; CPU: peak RSS).", registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "slipstream_engine_kv_cache_bytes", "Size of the preallocated KV cache (every slot, plus the scratch slot).",
            registry=r,
        )
        self.kv_used_bytes = Gauge(
            "slipstream_engine_kv_cache_used_bytes", "KV-cache bytes holding tokens of running sequences.", registry=r,
        )
        self.slots = Gauge(
            "slipstream_engine_kv_slots", "Sequences the KV cache holds at once (running requests cap after the budget).",
            registry=r,
        )
        self.graphs = Gauge("slipstream_engine_cuda_graphs", "Decode CUDA graphs captured.", registry=r)
        self.graph_capture_seconds = Counter(
            "slipstream_engine_cuda_graph_capture_seconds_total", "Time spent capturing decode CUDA graphs.", registry=r,
        )
        self.fallbacks = Counter(
            "slipstream_engine_fallbacks_total",
            "Fast paths turned off at run time (reason: cuda_graph = graph capture/replay failed or not possible, "
            "compile = torch.compile failed); the engine continues on the slower path.", ["reason"], registry=r,
        )
        for kind in ("cuda_graph", "compile"):
            self.fallbacks.labels(kind)
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        for result in ("success", "failed"):
            self.updates.labels(result)
