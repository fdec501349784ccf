"""The run configuration: one small dataclass per component, composed into :class:`SlipstreamConfig`.

A run is configured by a TOML file plus ``--set a.b=c`` overrides (and ``--megatron-*`` /
``--sglang-*`` flags, which are the same as ``--set trainer.megatron.*`` / ``producer.sglang.*``).
Every field has a doc string and every value is validated; a bad config raises one
:class:`~pipeline.configbase.ConfigError` naming the dotted key.

    cfg = load_config("examples/tiny/config.toml", overrides=["queue.max_staleness=2"])
    slipstream config --help      # prints every key with its default and doc
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from consumers.config import SFTConfig, TrainerConfig
from consumers.weights_config import DEPRECATED_KEYS, WeightSyncConfig
from pipeline.configbase import ConfigError, apply_override, check, doc, from_dict, parse_override
from pipeline.launch_config import RayConfig, TorchrunConfig
from pipeline.placement import PlacementConfig
from pipeline.tracking import TrackingConfig
from producers.config import ProducerConfig
from producers.engine.config import EngineConfig

MiB = 1024 * 1024


@dataclass
class RunConfig:
    name: str = doc("Run name; the default run directory is runs/<name>-<timestamp>.", "run")
    seed: int = doc("Seed for every process (model init, sampling, prompt order).", 0)
    steps: int = doc("Trainer steps (= published policy versions) before the run ends.", 200)
    run_dir: str = doc("Run directory; empty = runs/<name>-<timestamp>.", "")
    log_level: str = doc("Log level of every process (DEBUG, INFO, WARNING).", "INFO")
    log_format: Literal["text", "json"] = doc("Process log format: 'text' or 'json' (one JSON object a line).", "text")
    startup_timeout_s: float = doc("How long the launcher waits for each process to come up.", 120.0)
    shutdown_timeout_s: float = doc("Grace period after SIGTERM before a child is killed.", 15.0)
    verify_weights: bool = doc(
        "After each publish, fetch every engine's weight checksum and fail the run if it differs from the "
        "trainer's (a debugging aid: hashing costs about a second per GB of weights).",
        False,
    )
    batch_timeout_s: float = doc("How long the trainer waits for one batch before it gives up (it logs while it waits).", 600.0)
    max_restarts: int = doc(
        "How many times the launcher restarts a crashed broker, producer or embedded engine (each process separately) "
        "before it fails the run. The broker comes back on the same ports and recovers its queue from the journal; an "
        "engine on its port, paused until the trainer sent it the current weights.",
        3,
    )
    restart_backoff_s: float = doc("Wait before the first restart of a process; doubles with each further restart of it.", 1.0)
    python_path: list[str] = doc(
        "Directories put first on PYTHONPATH of every process, for plug-in modules outside the package (e.g. ['.'] in "
        "examples/plugins/config.toml); relative paths are relative to the config file's directory.", default_factory=list)
    mode: Literal["train", "rollout_only", "train_only"] = doc(
        "'train': the whole pipeline. 'rollout_only': broker, engines and producers, no trainer; each step's batch is recorded to "
        "RUN_DIR/rollouts (wire format, sha256) and the engines' version label moves on per step (slime's --debug-rollout-only). "
        "'train_only': broker and trainer, no producers or engines; the batches recorded at replay_from are replayed through the "
        "broker (slime's --debug-train-only). See pipeline/record.py.",
        "train",
    )
    record_rollouts: bool = doc("mode 'train': also record every batch the trainer trains to RUN_DIR/rollouts (for a later 'train_only' replay).", False)
    replay_from: str = doc("mode 'train_only': the recording to replay, a run directory or its rollouts/ folder.", "")
    launcher: Literal["local", "ray"] = doc(
        "'local': every process on this machine, supervised by slipstream (pipeline/launcher.py). 'ray': the processes "
        "placed on a Ray cluster (ray.*) and supervised through Ray actor restarts (pipeline/ray_launcher.py; needs "
        "`pip install slipstream[ray]` and run_dir on storage every node reaches).", "local")

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", "must be DEBUG, INFO, WARNING or ERROR")
        check(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
        check(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0")
        check(self.batch_timeout_s > 0, "batch_timeout_s", "must be > 0")
        check(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        check(self.restart_backoff_s >= 0, "restart_backoff_s", "must be >= 0")
        check(self.mode != "train_only" or bool(self.replay_from), "replay_from", "mode 'train_only' needs the recording to replay (a run directory)")


@dataclass
class ModelConfig:
    path: str = doc(
        "Hugging Face checkpoint directory (config.json, safetensors, tokenizer), or a hub id ('Qwen/Qwen3-0.6B') that "
        "the launcher downloads once (huggingface_hub, cache HF_HUB_CACHE) before any process starts. Required: no default.", "")
    revision: str = doc("Hub revision (branch, tag or commit) of a hub id in 'path'; empty = the default branch.", "")
    make_tiny_if_missing: bool = doc("Create the tiny example checkpoint at 'path' if it does not exist.", False)
    make_if_missing: str = doc(
        "Create a random-initialised checkpoint of this architecture preset at 'path' if none is there (nothing is "
        "downloaded; pipeline/presets.py): 'tiny', or the Qwen3 dense shapes 'qwen3-0.6b', 'qwen3-1.7b', "
        "'qwen3-4b', 'qwen3-8b' (bf16, with the tiny task's tokenizer). '' = off.",
        "",
    )

    def __post_init__(self) -> None:
        from pipeline.presets import PRESETS

        check(not self.revision or not self.path or not Path(self.path).exists(), "revision",
              "applies only to a hub id; model.path is a local directory")
        check(self.make_if_missing in ("", *PRESETS), "make_if_missing", f"must be '' or one of {list(PRESETS)}, got {self.make_if_missing!r}")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname or interface name: assume it is reachable from outside


@dataclass
class QueueConfig:
    max_staleness: int = doc(
        "η: the most policy versions a consumed trajectory may lag the trainer (0 = synchronous on-policy).", 1
    )
    groups_per_step: int = doc("GRPO groups (prompts) consumed per trainer step.", 8)
    stale_policy: Literal["requeue", "drop"] = doc(
        "What happens to a group found staler than max_staleness when a batch is formed: 'requeue' sends "
        "its prompt back to a producer to regenerate (keeps the prompt distribution), 'drop' discards it. "
        "Both are counted by reason.",
        "requeue",
    )
    max_queued_trajectories: int = doc("Queue bound in trajectories (enforced by credits and at admission).", 4096)
    max_queued_bytes: int = doc("Queue bound in bytes of trajectory arrays.", 256 * MiB)
    max_message_bytes: int = doc("Largest accepted ZeroMQ message; larger ones are rejected with 'oversize'.", 16 * MiB)
    host: str = doc(
        "Address the broker binds (loopback by default). A non-loopback address needs CURVE keys "
        "(curve_server_key, curve_client_key; see 'slipstream keys') unless insecure = true.",
        "127.0.0.1",
    )
    insecure: bool = doc("Allow binding a non-loopback queue.host without CURVE encryption and authentication.", False)
    curve_server_key: str = doc(
        "CURVE server certificate: the broker needs the secret file (server.key_secret); producers and trainers "
        "need only its public part (server.key works). Empty = no CURVE.",
        "",
    )
    curve_client_key: str = doc("CURVE client certificate (secret file, client.key_secret) producers and trainers use.", "")
    curve_authorized_dir: str = doc(
        "Directory of client public certificates the broker accepts; empty = 'authorized_clients' next to curve_server_key.", ""
    )
    producer_port: int = doc("Broker port for producers (0 = pick a free port).", 0)
    trainer_port: int = doc("Broker port for trainers (0 = pick a free port).", 0)
    socket_hwm: int = doc("ZeroMQ send/receive high-water mark in messages (finite, never 0).", 1000)
    heartbeat_interval_s: float = doc("Heartbeat period, both directions.", 1.0)
    peer_timeout_s: float = doc("A producer silent this long is declared dead and its credits reclaimed.", 10.0)
    lease_timeout_s: float = doc("A batch not committed within this time returns to the queue.", 300.0)
    journal: bool = doc(
        "Journal accepted groups, commits and drops to RUN_DIR/journal (append-only, CRC-checked segments). "
        "The broker acks a group only once it is journaled, and a restarted broker recovers every accepted, "
        "unconsumed group from it.",
        True,
    )
    journal_segment_bytes: int = doc("Journal segment size; fully consumed segments are deleted.", 64 * MiB)
    journal_fsync: Literal["always", "never"] = doc(
        "'always': fsync each journal record before its ack (acked data survives power loss; one fsync per "
        "group). 'never': write to the OS page cache only (survives a broker crash, not a machine crash; faster).",
        "always",
    )

    def __post_init__(self) -> None:
        check(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        check(self.groups_per_step >= 1, "groups_per_step", "must be >= 1")
        check(self.max_queued_trajectories >= 1, "max_queued_trajectories", "must be >= 1")
        check(self.max_queued_bytes >= 1024, "max_queued_bytes", "must be >= 1024")
        check(1024 <= self.max_message_bytes <= 2**31 - 1, "max_message_bytes", "must be in [1024, 2**31-1]")
        check(0 <= self.producer_port < 65536, "producer_port", "must be a TCP port or 0")
        check(0 <= self.trainer_port < 65536, "trainer_port", "must be a TCP port or 0")
        check(self.socket_hwm >= 1, "socket_hwm", "must be >= 1 (0 would mean an unbounded queue)")
        check(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        check(self.peer_timeout_s > 2 * self.heartbeat_interval_s, "peer_timeout_s", "must exceed 2 x heartbeat_interval_s")
        check(self.lease_timeout_s > 0, "lease_timeout_s", "must be > 0")
        check(self.journal_segment_bytes >= 4096, "journal_segment_bytes", "must be >= 4096")
        check(bool(self.curve_server_key) == bool(self.curve_client_key), "curve_client_key",
              "curve_server_key and curve_client_key are set together (see 'slipstream keys DIR')")
        check(_is_loopback(self.host) or self.insecure or bool(self.curve_server_key), "host",
              f"{self.host!r} is not a loopback address: set queue.curve_server_key and queue.curve_client_key "
              "(make them with 'slipstream keys DIR'), or queue.insecure = true to send trajectories unencrypted")


@dataclass
class MetricsConfig:
    enabled: bool = doc("Serve Prometheus /metrics from every process.", True)
    host: str = doc("Address the metrics endpoints bind.", "127.0.0.1")

    def __post_init__(self) -> None:
        check(bool(self.host), "host", "must not be empty")


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

    def __post_init__(self) -> None:
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


def load_config_dict(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError("<file>", f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text()) if p.suffix == ".toml" else _load_json(p)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("<file>", f"{p} is not valid TOML: {e}") from None
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return data


def _load_json(p: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("<file>", f"{p} is not valid JSON: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SlipstreamConfig:
    return from_dict(SlipstreamConfig, load_config_dict(path, overrides))


def replace(cfg: SlipstreamConfig, **sections: Any) -> SlipstreamConfig:
    return dataclasses.replace(cfg, **sections)
