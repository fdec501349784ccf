"""The ``[weights]`` config section: how the trainer streams versioned weights to engines (DESIGN §8).

What: :class:`WeightSyncConfig`, composed into :class:`pipeline.config.SlipstreamConfig` as
``weights``: every knob of the trainer's side of weight sync.  (The engine's own side of the weight
group, ``engine.weight_group_timeout_s``, stays with the engine process's config, since an engine
can run on its own.)  The keys that used to live in ``[trainer]`` (``publish_bucket_bytes``,
``weight_backend``, ``weight_group_timeout_s``) are still accepted there, with a deprecation
warning naming the new key (:data:`DEPRECATED_KEYS`).

* ``bucket_bytes`` / ``backend`` / ``group_timeout_s``: the weight group's bucket size, backend
  (``auto``: NCCL with CUDA, gloo without) and timeout (rendezvous, each collective, each HTTP call).

* ``engine_kind``: ``"embedded"`` (slipstream's engine stages buckets while it decodes and swaps
  between decode steps: no pause needed) or ``"sglang"`` (SGLang applies an update inside its
  scheduler loop, so the publisher pauses generation around the buckets).
* ``pause_mode`` / ``flush_cache``: the ``/pause_generation`` mode and whether to flush SGLang's
  prefix cache (KV computed with older weights) before ``/continue_generation``.
* ``async_publish``: publish version v from a background thread while the trainer fetches and trains
  the next batch (``consumers.publish_async``).
* ``per_stage_publish``: with ``trainer.pipeline_parallel > 1``, each pipeline stage's leader
  broadcasts its own layers over a weight group of its own (``consumers.stage_publish``) instead
  of gathering every stage onto trainer rank 0 first.
* ``resync_engines``: before each publish, ask every engine its ``weight_version``
  (``/get_model_info``); an engine that restarted or joined late is brought into a new weight group
  and receives the current weights with that publish.
* ``transport``: broadcast, CUDA IPC (colocated engines) or chosen per engine from placement.
* ``update_timeout_s`` / ``rejoin_timeout_s``: the deadline of one engine's update (a late or failed
  engine is marked stale and resynced in the background) and how long it may stay out of sync.
* ``snapshot_device`` / ``snapshot_max_fraction``: where the publish snapshot lives and its budget.

    [weights]
    engine_kind = "sglang"
    pause_mode = "retract"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import check, doc

ENGINE_KINDS = ("embedded", "sglang")
PAUSE_MODES = ("in_place", "retract", "abort")
MIB = 1024 * 1024

#: old dotted key -> new dotted key (relative to the run config); the old ones are still read
DEPRECATED_KEYS: dict[str, str] = {
    "trainer.publish_bucket_bytes": "weights.bucket_bytes",
    "trainer.weight_backend": "weights.backend",
    "trainer.weight_group_timeout_s": "weights.group_timeout_s",
}


@dataclass
class WeightSyncConfig:
    bucket_bytes: int = doc(
        "Weight publishing bucket size in bytes (a tensor larger than this travels alone). The publishing "
        "rank holds two buffers of this size (one fills while the other is on the wire); SGLang receives "
        "one bucket per request, so larger buckets mean fewer round trips (bench/gpu_weights.py). "
        "Formerly trainer.publish_bucket_bytes.",
        512 * MIB,
    )
    backend: Literal["auto", "nccl", "gloo"] = doc(
        "Backend of the weight-update group: 'auto' = nccl with CUDA, gloo without. Formerly trainer.weight_backend.",
        "auto",
    )
    group_timeout_s: float = doc(
        "Timeout for the weight-update group rendezvous and each HTTP call to an engine. Formerly "
        "trainer.weight_group_timeout_s.",
        60.0,
    )
    engine_kind: Literal["embedded", "sglang"] = doc(
        "Engines the trainer publishes to: 'embedded' (stages buckets while decoding, swaps between decode "
        "steps, no pause) or 'sglang' (paused with /pause_generation around the buckets, then "
        "/continue_generation).",
        "embedded",
    )
    pause_mode: Literal["in_place", "retract", "abort"] = doc(
        "SGLang only: /pause_generation mode. 'in_place' keeps running requests and their KV cache, "
        "'retract' moves them back to the queue (KV recomputed after the update), 'abort' ends them.",
        "in_place",
    )
    flush_cache: bool = doc(
        "SGLang only: flush the prefix cache (KV computed with the old weights) after the update, before "
        "generation continues. Off by default because the default pause_mode 'in_place' keeps running "
        "requests' KV, and SGLang refuses to flush while they hold it (the publisher would log a warning "
        "every step). Turn it on with pause_mode 'retract' or 'abort' for prefix caches that match the new weights.",
        False,
    )
    async_publish: bool = doc(
        "Publish each version from a background thread while the trainer fetches and trains the next batch "
        "(helps only with queue.max_staleness >= 1). 'Published' still reaches the broker only after every "
        "engine serves the version, and version v+1 is sent only after v finished.",
        True,
    )
    per_stage_publish: bool = doc(
        "Only with trainer.pipeline_parallel > 1: each pipeline stage's leader (TP rank 0 of data-parallel "
        "replica 0) broadcasts its own stage's weights over a weight group of its own, so no stage's weights "
        "travel through trainer rank 0, which still drives the engines over HTTP. False gathers every stage "
        "onto rank 0 and publishes from there (one weight group).",
        True,
    )
    resync_engines: bool = doc(
        "Before each publish, ask every engine its weight_version (/get_model_info). An engine that restarted "
        "or joined late (its version is not the last published one) is brought into a fresh weight group and "
        "gets the current weights with that publish.",
        True,
    )
    rejoin_timeout_s: float = doc(
        "How long an engine may stay out of weight sync (it failed or missed an update, or restarted) while it is "
        "resynced in the background; past it the next publish fails the run, naming the engine. With per-stage "
        "publishing: how long a publish waits for an unreachable engine to answer again.",
        120.0,
    )
    transport: Literal["auto", "broadcast", "ipc"] = doc(
        "How weights reach each engine: 'broadcast' over a weight group (NCCL/gloo), 'ipc' (the engine maps the "
        "trainer's snapshot: CUDA IPC, or shared memory on CPU; the engine must be on the trainer's machine), or "
        "'auto': IPC for an engine that reports the publishing rank's GPU (NCCL refuses two ranks on one GPU), a "
        "broadcast otherwise (always on CPU). ports/trainer.json's weight_transports shows the choice per engine.",
        "auto",
    )
    update_timeout_s: float = doc(
        "Deadline of one engine's update: an engine that fails or misses it is taken out of that version (marked "
        "stale: its tokens keep the version it holds), resynced in the background, and the others carry on.",
        60.0,
    )
    snapshot_device: Literal["auto", "host"] = doc(
        "Where the publish snapshot (weights.async_publish) lives: 'auto' = on the trainer's device, except in host "
        "memory when every engine gets a gloo broadcast from a GPU trainer; 'host' = always in host memory.",
        "auto",
    )
    snapshot_max_fraction: float = doc(
        "Memory budget of the publish snapshot (one copy of the published weights), as a fraction of its device's "
        "memory (host RAM for a host snapshot); a larger model fails with an error naming this key. Reported as "
        "slipstream_trainer_weight_snapshot_bytes and _limit_bytes.",
        0.25,
    )

    def __post_init__(self) -> None:
        check(self.bucket_bytes >= 1, "bucket_bytes", f"must be >= 1, got {self.bucket_bytes}")
        check(self.backend in ("auto", "nccl", "gloo"), "backend", f"must be 'auto', 'nccl' or 'gloo', got {self.backend!r}")
        check(self.group_timeout_s > 0, "group_timeout_s", f"must be > 0, got {self.group_timeout_s}")
        check(self.engine_kind in ENGINE_KINDS, "engine_kind", f"must be one of {list(ENGINE_KINDS)}, got {self.engine_kind!r}")
        check(self.pause_mode in PAUSE_MODES, "pause_mode", f"must be one of {list(PAUSE_MODES)}, got {self.pause_mode!r}")
        check(self.rejoin_timeout_s > 0, "rejoin_timeout_s", "must be > 0")
        check(self.transport in ("auto", "broadcast", "ipc"), "transport", f"must be 'auto', 'broadcast' or 'ipc', got {self.transport!r}")
        check(self.update_timeout_s > 0, "update_timeout_s", "must be > 0")
        check(self.snapshot_device in ("auto", "host"), "snapshot_device", f"must be 'auto' or 'host', got {self.snapshot_device!r}")
        check(0 < self.snapshot_max_fraction <= 1, "snapshot_max_fraction", f"must be in (0, 1], got {self.snapshot_max_fraction}")

    def resolved_backend(self, cuda: bool) -> str:
        """``backend`` with 'auto' resolved (nccl with CUDA, gloo without)."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if cuda else "gloo"
