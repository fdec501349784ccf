"""Typed wire messages of slipstream (DESIGN §4).

Every message is a small msgpack header (a dict with ``schema_version`` and ``type``) plus, for the
data-carrying messages, raw little-endian array frames.  These dataclasses are what the rest of
the code handles; :mod:`schemas.codec` turns them into ZeroMQ multipart frames and back, and
:mod:`schemas.validate` checks them at the boundary.

Per-token arrays of one trajectory all have the response length:
``response_tokens`` (int32), ``logprobs`` (float32, behaviour log-probs, ≤ 0, finite where
``loss_mask`` is 1), ``versions`` (int32, the policy version that sampled each token) and
``loss_mask`` (uint8, 0 for tool/environment tokens).

Glossary: the policy version and the names it travels under
-----------------------------------------------------------
A *policy version* is an int naming one set of trainer weights: 0 is the initial checkpoint, each
trainer step produces the next one (after an ``[sft]`` stage the RL run starts at
``queue.max_staleness + 1``).  Its one name is ``policy_version``: every message below that carries
it (``Hello``, ``Welcome``, ``Credit``, ``VersionAnnouncement``, ``BatchRequest``, ``Commit``,
``Published``, ``Checkpointed``, ``CommitAck``), ``ProducerLink.policy_version``,
``Producer.policy_version`` and the ``slipstream_policy_version{role}`` gauge.  The other names
that remain, and why:

- ``published_policy_version`` / ``committed_policy_version`` (the broker's queue): two different
  policy versions at one moment.  *Published*: live on every engine (``Published``); credits and the
  admission budget count from it.  *Committed*: produced by the newest optimizer step (``Commit``),
  one ahead of published while the weights are on their way; tokens up to it are accepted.
- ``trained_from_version`` (``consumed.jsonl``, the rollout recording's index, the trainer loop):
  the policy version the trainer's weights were at when it trained a batch, i.e. the step's
  ``policy_version`` minus one; a trajectory's staleness is ``trained_from_version - min_version``.
  A file field read by ``pipeline/sweepresults.py`` and existing run directories, so it keeps its name.
- ``versions`` (per-token array), ``min_version`` / ``max_version`` (oldest / newest token version of
  a trajectory or group): policy versions of the tokens, not of the trainer.
- ``weight_version``: SGLang's own HTTP field, a policy version written as a decimal string
  (:func:`schemas.weight_update.parse_version` reads it): the last bucket of a weight update
  (``/update_weights_from_distributed``; slipstream's ``/slipstream/update_weights_from_ipc`` mirrors it), the replies of
  ``/get_model_info``, ``/get_server_info`` and weight updates, ``/generate``'s ``meta_info``.  Kept
  wherever SGLang's wire has it (the embedded engine speaks the same API), and for the engine's
  starting label ``engine.weight_version`` (SGLang's ``--weight-version`` flag).
- ``new_version``: SGLang's ``/update_weight_version`` request field (the same value, a string).
- ``version`` alone: a local name or argument where only policy versions are in scope
  (``publish(named, version)``, ``Trainer.version``, an engine link's acknowledged version); the
  journal's on-disk records keep their ``version`` key so that journals written earlier replay;
  ``RolloutContext.version`` / ``version_at_submit`` are the rollout plug-in API and keep their names
  for existing plug-ins.
- ``schema_version`` is not a policy version: it is the wire format's version (:data:`SCHEMA_VERSION`).

Renaming the code's names changed no message: the broker's messages already said
``policy_version`` and SGLang's fields are SGLang's, so :data:`SCHEMA_VERSION` stays 2.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

SCHEMA_VERSION = 2
#: Versions this peer decodes.  Version 2 added trainer replay (``Hello.resume_step`` and
#: ``Hello.checkpoint_every``, ``Batch.replay``, the ``checkpointed`` message); a version-1 message
#: may not use them (:mod:`schemas.codec` refuses it), and a version-1 peer refuses version-2
#: messages with a ``schema_version`` error instead of misreading them.  Version 1 stays readable
#: so that a journal written before the upgrade can still be recovered.
SUPPORTED_SCHEMA_VERSIONS = (1, 2)

# The dtype of each per-trajectory array on the wire (little-endian, fixed).
ARRAY_DTYPES: dict[str, np.dtype] = {
    "prompt_tokens": np.dtype("<i4"),
    "response_tokens": np.dtype("<i4"),
    "logprobs": np.dtype("<f4"),
    "versions": np.dtype("<i4"),
    "loss_mask": np.dtype("u1"),
}
PER_TOKEN_ARRAYS = ("response_tokens", "logprobs", "versions", "loss_mask")


@dataclass
class Trajectory:
    """One sampled response to one prompt, with everything the loss needs."""

    trajectory_id: str
    prompt_tokens: np.ndarray
    response_tokens: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    loss_mask: np.ndarray
    reward: float
    finish_reason: str = "stop"
    timings: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def min_version(self) -> int:
        """The oldest policy version among its tokens: staleness is measured from here."""
        return int(self.versions.min()) if len(self.versions) else -1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_tokens) + len(self.response_tokens)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in ARRAY_DTYPES)


@dataclass
class TrajectoryGroup:
    """All samples of one prompt (a GRPO group). Groups are the unit of delivery: never split.

    ``(producer_id, epoch, seq)`` identifies a group for at-least-once delivery with dedup:
    ``epoch`` changes each time a producer process starts, ``seq`` counts groups within an epoch.
    """

    TYPE: ClassVar[str] = "group"
    group_id: str
    prompt_id: str
    producer_id: str
    epoch: int
    seq: int
    trajectories: list[Trajectory]
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the frames it was decoded from (header + arrays), when it came off the wire: a batch of such
    #: groups is encoded from them without re-encoding (:func:`schemas.codec.encode`). Not a field on the wire.
    wire: list[Any] | None = field(default=None, repr=False, compare=False)

    # Cached: a group is immutable once built, and the queue reads these on every batch.
    @functools.cached_property
    def min_version(self) -> int:
        return min(t.min_version for t in self.trajectories)

    @functools.cached_property
    def max_version(self) -> int:
        """The newest policy version among the group's tokens (-1 if it has none)."""
        return max((int(t.versions.max()) for t in self.trajectories if len(t.versions)), default=-1)

    @functools.cached_property
    def trajectory_min_versions(self) -> list[int]:
        """Each trajectory's oldest token version (staleness is per trajectory); the codec fills it at decode."""
        return [t.min_version for t in self.trajectories]

    @functools.cached_property
    def num_tokens(self) -> int:
        return sum(t.num_tokens for t in self.trajectories)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.trajectories)

    @property
    def dedup_key(self) -> tuple[str, int, int]:
        return (self.producer_id, self.epoch, self.seq)


# ---------------------------------------------------------------- control messages (header only)


@dataclass
class Hello:
    """First message of every peer. The broker answers :class:`Welcome` or :class:`Error`."""

    TYPE: ClassVar[str] = "hello"
    FIELD_SINCE: ClassVar[dict[str, int]] = {"resume_step": 2, "checkpoint_every": 2}
    role: str  # "producer" | "trainer"
    peer_id: str
    epoch: int = 0
    pid: int = 0
    policy_version: int = 0  # trainers: the version their weights are at (resume-aware)
    #: trainers, first hello of a process: the step of the checkpoint it started from (0 = a fresh
    #: start). The broker releases the retained batches of steps <= it and replays the later ones.
    #: -1: a reconnect of a running process (after a broker restart): nothing to release or replay.
    resume_step: int = -1
    #: trainers: ``trainer.checkpoint_every``; > 0 makes the broker retain each committed batch
    #: until a :class:`Checkpointed` step covers it (0: nothing is retained, nothing replayed).
    checkpoint_every: int = 0


@dataclass
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    policy_version: int
    max_staleness: int
    groups_per_step: int
    max_message_bytes: int
    heartbeat_interval_s: float


@dataclass
class Heartbeat:
    TYPE: ClassVar[str] = "heartbeat"
    peer_id: str = ""
    sent_at: float = 0.0


@dataclass
class CreditRequest:
    """Producer asks to start ``want`` more groups (admission control, DESIGN §3)."""

    TYPE: ClassVar[str] = "credit_request"
    want: int


@dataclass
class Credit:
    """Broker grants ``granted`` group starts, valid against policy ``policy_version``."""

    TYPE: ClassVar[str] = "credit"
    granted: int
    policy_version: int


@dataclass
class Ack:
    """Broker has accepted (or already had: ``duplicate``) the group with this seq."""

    TYPE: ClassVar[str] = "ack"
    epoch: int
    seq: int
    group_id: str
    duplicate: bool = False


@dataclass
class Error:
    """A rejection or failure, sent back to the peer that caused it. ``code`` is a bounded enum
    (also the ``reason`` label of the rejection counter); ``message`` is for humans."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    seq: int = -1
    epoch: int = -1


@dataclass
class VersionAnnouncement:
    """The policy version the trainers have published (broker -> producers)."""

    TYPE: ClassVar[str] = "version"
    policy_version: int


@dataclass
class Requeue:
    """Broker -> producer: regenerate this prompt (its group went stale past ``max_staleness``)."""

    TYPE: ClassVar[str] = "requeue"
    prompt_id: str
    prompt_tokens: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchRequest:
    """Trainer asks for the groups of one step. ``policy_version`` is the version it trains from."""

    TYPE: ClassVar[str] = "batch_request"
    step: int
    policy_version: int
    num_groups: int
    dp_size: int = 1


@dataclass
class Batch:
    """Broker -> trainer: ``groups`` for one step, on lease ``lease_id`` until :class:`Commit`.
    ``shards[r]`` lists the indexes of the groups for data-parallel rank ``r`` (token-balanced)."""

    TYPE: ClassVar[str] = "batch"
    step: int
    lease_id: str
    groups: list[TrajectoryGroup]
    shards: list[list[int]]
    dropped: int = 0  # groups dropped or requeued for staleness while forming this batch
    queue_depth: int = 0  # groups still queued after this batch was taken
    #: True: the batch this step consumed before the trainer was restarted from an older checkpoint,
    #: served again (same groups, same order, same shards); its commit counts nothing consumed.
    replay: bool = False
    #: the frames it was decoded from: :func:`schemas.codec.frames_of` forwards them unchanged. Not on the wire.
    wire: list[Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class Commit:
    """Trainer -> broker: the optimizer step on ``lease_id`` is done and produced
    ``policy_version``, which is about to be published. The broker counts the groups consumed and
    accepts tokens of that version from now on (they may arrive before :class:`Published`)."""

    TYPE: ClassVar[str] = "commit"
    lease_id: str
    step: int
    policy_version: int


@dataclass
class Published:
    """Trainer -> broker: weights ``policy_version`` are live on every engine. Only now does the
    broker open credits for it and announce it to producers (η = 0 relies on this order)."""

    TYPE: ClassVar[str] = "published"
    policy_version: int


@dataclass
class Checkpointed:
    """Trainer -> broker: a checkpoint of ``step`` is complete (``checkpoints/latest`` names it).
    The broker stops retaining the batches of steps <= ``step`` for replay."""

    TYPE: ClassVar[str] = "checkpointed"
    SINCE: ClassVar[int] = 2
    step: int
    policy_version: int


@dataclass
class CommitAck:
    TYPE: ClassVar[str] = "commit_ack"
    lease_id: str
    policy_version: int


@dataclass
class Shutdown:
    """Broker -> peers: the run is over (all steps done); exit cleanly."""

    TYPE: ClassVar[str] = "shutdown"
    reason: str = ""


CONTROL_TYPES: dict[str, type] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Heartbeat, CreditRequest, Credit, Ack, Error, VersionAnnouncement, Requeue,
        BatchRequest, Commit, Published, CommitAck, Shutdown, Checkpointed,
    )
}
DATA_TYPES: dict[str, type] = {TrajectoryGroup.TYPE: TrajectoryGroup, Batch.TYPE: Batch}
ALL_TYPES = {**CONTROL_TYPES, **DATA_TYPES}

Message = Any  # any of the dataclasses above


def control_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
