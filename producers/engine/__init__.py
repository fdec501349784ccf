"""slipstream's embedded inference engine: a small SGLang-compatible HTTP server for CPUs and small GPUs.

What: loads a Hugging Face causal LM with transformers (Qwen2/2.5, Qwen3, Llama 3, Qwen3-MoE),
generates with its own forward over a preallocated KV cache (continuous batching, CUDA graphs on
GPU, a memory budget) and returns exact per-token log-probs plus the policy version of the
weights behind every token.  It
receives weight updates over torch.distributed (``/init_weights_update_group``,
``/update_weights_from_distributed``) into staging memory while it keeps decoding, and swaps them
in between two decode steps.

Why: the producer talks to it with the same HTTP client it uses for real SGLang servers, so
tests and laptop runs exercise the production code path (DESIGN §6, §8).

How to run::

    python -m producers.engine --model DIR --port 0 --port-file /tmp/engine.port
    # or, from Python:  from producers.engine import main; main(["--model", DIR, "--port", "0"])

Modules: ``config`` (EngineConfig), ``sampling`` (sampling params, request validation),
``sampler`` (the batched sampler), ``model`` (the forward), ``kvcache`` (KV slots, memory budget),
``batch`` (running sequences: prefill/decode/retire), ``graphs`` (CUDA-graph decode runner),
``decode`` (the scheduler thread), ``weights`` (weight group, staging), ``server`` (HTTP routes
and ``main``), ``bench`` (``slipstream bench engine``).
"""

from __future__ import annotations

from producers.engine.config import EngineConfig

__all__ = ["EngineConfig", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the engine (``producers.engine.server.main``); imported lazily so that reading
    :class:`EngineConfig` (e.g. by the launcher's config validation) does not import torch."""
    from producers.engine.server import main as server_main

    return server_main(argv)
