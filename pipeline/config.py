"""The run configuration: one small dataclass per component, composed into :class:`SlipstreamConfig`.

A run is configured by a TOML file plus ``--set a.b=c`` overrides (and ``--megatron-*`` /
``--sglang-*`` flags, which are the same as ``--set trainer.megatron.*`` / ``producer.sglang.*``).
Every field has a doc string and every value is validated; a bad config raises one
:class:`~pipeline.configbase.ConfigError` naming the dotted key.

Which module holds what: each role owns its section (``consumers/config.py`` the trainer's,
``producers/config.py`` the producers', ``producers/engine/config.py`` the engine's,
``consumers/weights_config.py`` ``[weights]``); the shared sections and the broker's ``[queue]``
are in :mod:`pipeline.runconfig`, which imports no role, so the broker does not load the
trainer's config.  This module composes them and checks what spans roles: a setting two roles
must agree on has one home (:attr:`SlipstreamConfig.SHARED_KEYS`), and keys that moved are read
with a warning naming the new one (:attr:`SlipstreamConfig.DEPRECATED_KEYS`).

    cfg = load_config("examples/tiny/config.toml", overrides=["queue.max_staleness=2"])
    slipstream config --help      # prints every key with its default and doc
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from consumers.config import SFTConfig, TrainerConfig
from consumers.weights_config import DEPRECATED_KEYS, WeightSyncConfig
from pipeline.configbase import ConfigError, check, doc, from_dict
from pipeline.launch_config import RayConfig, TorchrunConfig
from pipeline.placement import PlacementConfig
from pipeline.runconfig import (
    MetricsConfig,
    ModelConfig,
    QueueConfig,
    RunConfig,
    load_config_dict,
    load_sections,
)
from pipeline.tracking import TrackingConfig
from producers.config import ProducerConfig
from producers.engine.config import EngineConfig

__all__ = [
    "ConfigError", "MetricsConfig", "ModelConfig", "QueueConfig", "RunConfig", "SlipstreamConfig", "flag_overrides",
    "load_config", "load_config_dict", "load_sections", "replace",
]


@dataclass
class SlipstreamConfig:
    run: RunConfig = doc("Run-wide settings.", default_factory=RunConfig)
    model: ModelConfig = doc("The policy checkpoint.", default_factory=ModelConfig)
    queue: QueueConfig = doc("The broker's queue.", default_factory=QueueConfig)
    producer: ProducerConfig = doc("Rollout producers.", default_factory=ProducerConfig)
    engine: EngineConfig = doc("The embedded inference engine.", default_factory=EngineConfig)
    trainer: TrainerConfig = doc("Megatron-core trainer ranks.", default_factory=TrainerConfig)
    sft: SFTConfig = doc("Optional supervised warm-up the trainer runs before RL.", default_factory=SFTConfig)
    weights: WeightSyncConfig = doc("Streaming versioned weights to the engines.", default_factory=WeightSyncConfig)
    metrics: MetricsConfig = doc("Prometheus endpoints.", default_factory=MetricsConfig)
    tracking: TrackingConfig = doc("Experiment tracking (wandb, tensorboard).", default_factory=TrackingConfig)
    placement: PlacementConfig = doc("Which GPUs the trainer ranks and the engines run on (pipeline/placement.py).", default_factory=PlacementConfig)
    ray: RayConfig = doc("The Ray cluster and placement of run.launcher = 'ray' (pipeline/ray_launcher.py).", default_factory=RayConfig)
    torchrun: TorchrunConfig = doc("Multi-node torchrun for the local launcher's trainer (pipeline/multinode.py).", default_factory=TorchrunConfig)

    #: keys that moved (old -> new dotted key); the old ones are read with a warning naming the new one
    DEPRECATED_KEYS: ClassVar[dict[str, str]] = DEPRECATED_KEYS
    #: settings two roles must agree on (follower -> home dotted key): set the home only; the follower
    #: takes its value, and a follower set to another value is a ConfigError naming both
    SHARED_KEYS: ClassVar[dict[str, str]] = {
        # the trainer's log-probs are computed from logits / temperature; they are compared with the behaviour
        # log-probs the engines sampled at producer.temperature, so a different value skews every ratio
        "trainer.temperature": "producer.temperature",
    }

    def __post_init__(self) -> None:
        check(self.trainer.temperature == self.producer.temperature, "trainer.temperature",
              f"= {self.trainer.temperature} differs from producer.temperature = {self.producer.temperature}: the trainer "
              "computes its log-probs at the producers' sampling temperature (else they are skewed against the behaviour "
              "log-probs). Set only producer.temperature; trainer.temperature follows it")
        check(bool(self.model.path), "model.path",
              "is required (no default): a Hugging Face checkpoint directory or hub id, e.g. model.path = 'Qwen/Qwen3-0.6B'")
        check(self.producer.engine != "sglang" or self.weights.engine_kind == "sglang", "weights.engine_kind",
              "must be 'sglang' when producer.engine = 'sglang' (slipstream launches SGLang servers and must publish to them "
              "the way SGLang expects: paused, one request per bucket)")
        check(not (self.run.verify_weights and self.weights.engine_kind == "sglang"), "run.verify_weights",
              "= true checks the engines' weights with slipstream's /slipstream/weights_checksum route, which SGLang does "
              "not serve (weights.engine_kind = 'sglang'): set run.verify_weights = false")
        check(not (self.weights.transport == "ipc" and self.trainer.pipeline_parallel > 1 and self.weights.per_stage_publish),
              "weights.transport", "'ipc' does not work with per-stage publishing (trainer.pipeline_parallel > 1 and "
              "weights.per_stage_publish): use 'auto' or 'broadcast', or weights.per_stage_publish = false")
        max_traj = self.queue.groups_per_step * self.producer.group_size
        check(
            self.queue.max_queued_trajectories >= max_traj,
            "queue.max_queued_trajectories",
            f"must hold at least one step of data (groups_per_step x group_size = {max_traj})",
        )
        t = self.trainer
        check(
            t.lr_schedule not in ("linear", "cosine") or t.lr_decay_steps > 0 or self.run.steps > t.lr_warmup_steps,
            "trainer.lr_warmup_steps",
            f"must be < run.steps = {self.run.steps} (the decay length while trainer.lr_decay_steps = 0)",
        )
        check(self.run.launcher != "ray" or (self.producer.engine != "sglang" and self.run.mode != "train_only"), "run.launcher",
              "'ray' places embedded engines (or attaches to producer.engine_urls) in run.mode 'train' or 'rollout_only'; "
              "SGLang servers and 'train_only' replays run with run.launcher = 'local'")
        nranks = self.trainer.tensor_parallel * self.trainer.pipeline_parallel * self.trainer.data_parallel
        check(nranks % self.torchrun.nnodes == 0, "torchrun.nnodes",
              f"must divide the trainer's ranks (TP x PP x DP = {nranks}): each node runs the same number of them")
        check(self.run.launcher != "ray" or self.torchrun.nnodes == 1, "torchrun.nnodes",
              "applies to run.launcher = 'local'; with 'ray' the trainer ranks are placed by Ray (keep torchrun.nnodes = 1)")
        check(self.run.mode != "rollout_only" or self.trainer.checkpoint_every == 0, "trainer.checkpoint_every",
              "run.mode 'rollout_only' has no trainer to checkpoint (its recorder starts over at step 1): set it to 0")


def flag_overrides(argv: list[str]) -> list[str]:
    """Turn ``--megatron-lr 1e-4`` / ``--sglang-mem-fraction-static 0.8`` into ``--set`` overrides."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for prefix, section in (("--megatron-", "trainer.megatron"), ("--sglang-", "producer.sglang")):
            if arg.startswith(prefix):
                key, _, value = arg[len(prefix):].partition("=")
                if not _:
                    if i + 1 >= len(argv):
                        raise ConfigError(f"{section}.{key.replace('-', '_')}", f"flag {arg} needs a value")
                    i += 1
                    value = argv[i]
                out.append(f"{section}.{key.replace('-', '_')}={value}")
                break
        else:
            raise ConfigError(arg, "unrecognised argument")
        i += 1
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SlipstreamConfig:
    return from_dict(SlipstreamConfig, load_config_dict(path, overrides))


def replace(cfg: SlipstreamConfig, **sections: Any) -> SlipstreamConfig:
    return dataclasses.replace(cfg, **sections)
