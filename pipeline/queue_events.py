"""The queue's events: every change to a :class:`pipeline.queue.StalenessQueue` is one of these.

The queue changes state only by *applying* an event (``StalenessQueue.apply``).  Each decision it
makes (accept a group, lease a batch, drop stale groups, count a commit, ...) builds the event,
appends it to the queue's event log, then applies it.  With the journal on, the log is
:class:`pipeline.journal.Journal` and each event is one journal record (its ``kind`` and msgpack
``payload`` below); with the journal off it is :class:`pipeline.journal.NullJournal`.  Recovery
after a broker restart is the same code path: read the records back as events and apply them to a
fresh queue.  There is no second state machine.

Credits (groups granted to a producer, not yet arrived) are session state, not events: they are
rebuilt from zero after a restart (a reconnecting producer asks again), as DESIGN §3 requires.

    ev = Leased(lease_id, keys, step, shards)   # what happened
    kind, payload = ev.kind, ev.payload()       # one journal record
    ev = event_from_record(kind, payload)       # and back (group frames are decoded again)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from schemas.codec import decode, encode
from schemas.messages import TrajectoryGroup
from schemas.validate import Limits, WireError

Key = tuple[str, int, int]


def key_of(k: Any) -> Key:
    return (str(k[0]), int(k[1]), int(k[2]))


def frame_bytes(frames: list[Any]) -> list[bytes]:
    """Owned bytes of received frames (zmq.Frame, memoryview or bytes)."""
    return [bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in frames]


def sizes(groups: list[TrajectoryGroup]) -> list[tuple[Key, int]]:
    """(dedup key, trajectories) per group: what consumed/dropped records carry."""
    return [(g.dedup_key, len(g.trajectories)) for g in groups]


@dataclass
class Accepted:
    """A validated group entered the queue. ``frames`` are its wire frames, byte for byte."""

    kind: ClassVar[str] = "accepted"
    group: TrajectoryGroup
    frames: list[Any] | None = None  # None: encoded from ``group`` when a journal needs them

    def payload(self) -> Any:
        return frame_bytes(self.frames if self.frames is not None else encode(self.group))


@dataclass
class Leased:
    """Groups (by key, in batch order) handed to a trainer on a lease; ``replay``: the retained
    batch of ``step`` served again (``keys`` are then informative)."""

    kind: ClassVar[str] = "leased"
    lease_id: str
    keys: list[Key]
    step: int = -1
    shards: list[list[int]] = field(default_factory=list)
    replay: bool = False
    policy_version: int = 0

    def payload(self) -> Any:
        return {"lease_id": self.lease_id, "keys": [list(k) for k in self.keys], "step": self.step,
                "shards": self.shards, "replay": self.replay, "policy_version": self.policy_version}


@dataclass
class Returned:
    """Leases given back uncommitted (expired, or their trainer process was replaced): their
    groups go back to the front of the queue; replay leases are just forgotten."""

    kind: ClassVar[str] = "returned"
    lease_ids: list[str]
    reason: str = "expired"

    def payload(self) -> Any:
        return {"lease_ids": self.lease_ids, "reason": self.reason}


@dataclass
class Consumed:
    """A lease's commit (or the commit of a lease an earlier broker incarnation issued, whose
    groups are queued again). ``retain``: keep the groups for replay; ``not_retained``: groups not
    kept although retention is on (no room)."""

    kind: ClassVar[str] = "consumed"
    lease_id: str
    groups: list[tuple[Key, int]]
    version: int
    step: int = -1
    shards: list[list[int]] = field(default_factory=list)
    retain: bool = False
    not_retained: int = 0

    def payload(self) -> Any:
        return {"lease_id": self.lease_id, "version": self.version, "groups": [[list(k), n] for k, n in self.groups],
                "step": self.step, "shards": self.shards, "retain": self.retain, "not_retained": self.not_retained}


@dataclass
class Dropped:
    """Queued groups removed without training (stale)."""

    kind: ClassVar[str] = "dropped"
    reason: str
    groups: list[tuple[Key, int]]

    def payload(self) -> Any:
        return {"reason": self.reason, "groups": [[list(k), n] for k, n in self.groups]}


@dataclass
class VersionPublished:
    kind: ClassVar[str] = "version"
    version: int

    def payload(self) -> Any:
        return {"version": self.version}


@dataclass
class Released:
    """Retained batches of these steps are covered by a trainer checkpoint: no longer kept."""

    kind: ClassVar[str] = "released"
    steps: list[int]

    def payload(self) -> Any:
        return {"steps": self.steps}


@dataclass
class Replayed:
    """The commit of a retained batch served again: counted replayed, never consumed twice."""

    kind: ClassVar[str] = "replayed"
    lease_id: str
    step: int
    version: int
    groups: int
    trajectories: int

    def payload(self) -> Any:
        return {"lease_id": self.lease_id, "step": self.step, "version": self.version, "groups": self.groups,
                "trajectories": self.trajectories}


Event = Accepted | Leased | Returned | Consumed | Dropped | VersionPublished | Released | Replayed


def _group_from_frames(frames: list[bytes]) -> TrajectoryGroup:
    msg = decode(frames, Limits(max_message_bytes=2**62))
    if not isinstance(msg, TrajectoryGroup):
        raise WireError("not_allowed", f"journal 'accepted' record holds a {type(msg).__name__}")
    return msg


def _sized(p: Any) -> list[tuple[Key, int]]:
    return [(key_of(k), int(n)) for k, n in p]


def event_from_record(kind: str, p: Any) -> Event:
    """The event a journal record holds (records written before events existed read the same)."""
    if kind == "accepted":
        return Accepted(_group_from_frames(p), p)
    if kind == "leased":
        return Leased(str(p["lease_id"]), [key_of(k) for k in p["keys"]], int(p.get("step", -1)),
                      [list(map(int, s)) for s in p.get("shards") or []], bool(p.get("replay")), int(p.get("policy_version", 0)))
    if kind == "returned":
        return Returned([str(x) for x in p["lease_ids"]], str(p.get("reason", "expired")))
    if kind == "consumed":
        return Consumed(str(p["lease_id"]), _sized(p["groups"]), int(p["version"]), int(p.get("step", -1)),
                        [list(map(int, s)) for s in p.get("shards") or []], bool(p.get("retain")), int(p.get("not_retained", 0)))
    if kind == "dropped":
        return Dropped(str(p["reason"]), _sized(p["groups"]))
    if kind == "version":
        return VersionPublished(int(p["version"]))
    if kind == "released":
        return Released([int(s) for s in p["steps"]])
    if kind == "replayed":
        return Replayed(str(p["lease_id"]), int(p["step"]), int(p["version"]), int(p["groups"]), int(p["trajectories"]))
    raise ValueError(f"not an event record kind: {kind!r}")
