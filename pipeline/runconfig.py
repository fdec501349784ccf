"""The sections of the run config every role shares, and the broker's own: no role's config imported.

What: :class:`RunConfig` (``[run]``), :class:`ModelConfig` (``[model]``), :class:`QueueConfig`
(``[queue]``, the broker's section, read by producers and trainers for the wire limits) and
:class:`MetricsConfig` (``[metrics]``), plus reading a config file into a plain dict
(:func:`load_config_dict`) and building single sections from it (:func:`load_sections`).

Why a module of its own: :mod:`pipeline.config` composes every role's section into
:class:`~pipeline.config.SlipstreamConfig`, so importing it loads the trainer's
(``consumers.config``), the producers' and the engine's config modules.  The broker and the
library modules of ``pipeline/`` (queue, transport, journal, metrics) import this module
instead, and the broker and producer processes read only their own sections of the resolved
config (the launcher validated the whole of it, cross-section checks included, before it started
them: ``slipstream run --dry-run`` shows the result).  tests/test_layering.py checks the rule.

How:

    data = load_config_dict("RUN/config.json", ["queue.max_staleness=2"])
    run, queue = load_sections(data, run=RunConfig, queue=QueueConfig)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.configbase import ConfigError, apply_override, check, doc, from_dict, parse_override

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
        "trainer's (a debugging aid: every tensor is fingerprinted where it lies, on the GPU on a GPU; measured "
        "0.07-0.3 s per publish for a 0.6B model on an H200 shared with a decoding engine).",
        False,
    )
    profile_steps: list[int] = doc(
        "[FIRST, LAST]: record trainer steps FIRST..LAST with torch.profiler (trainer rank 0, and every engine over "
        "SGLang's POST /start_profile and /stop_profile for the same window) into RUN_DIR/profile: a trace "
        "(.trace.json.gz, for Perfetto) and a summary (.summary.json: device busy time and share, top ops) per "
        "process. [] = off. See pipeline/profiling.py.", default_factory=list)
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
        check(not self.profile_steps or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]),
              "profile_steps", f"must be [] or [FIRST, LAST] with 1 <= FIRST <= LAST, got {self.profile_steps}")
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


def load_sections(data: dict[str, Any], **sections: type) -> list[Any]:
    """Build the named top-level sections of a config dict, in the order given (``name=cls``);
    an absent section takes its defaults.  Errors name the dotted key (``queue.host``).  The
    other sections are not read (nor checked: the whole config is checked by
    :func:`pipeline.config.load_config`, which ``slipstream run`` does before it starts a role)."""
    out: list[Any] = []
    for name, cls in sections.items():
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a table, got {type(value).__name__} {value!r}")
        out.append(from_dict(cls, value, name))
    return out
