"""The broker's write-ahead journal: append-only segment files that make accepted trajectories durable.

**What.** ``RUN_DIR/journal/segment-00000001.journal``, ``...02``, ... Each record is

    u32 length (little-endian) | u32 CRC32 of the body | body = 1 kind byte + msgpack payload

Kinds: ``checkpoint`` (first record of every segment: queue counters, the dedup state, the
published version and recent commits, as of the end of the previous segment), ``accepted`` (the
group's encoded wire frames, byte for byte), ``leased`` (lease id -> group keys, written before the
batch is sent), ``consumed`` (a lease's commit: lease id, group keys and sizes, new version),
``dropped`` (reason, group keys and sizes), ``version`` (a published policy version),
``released`` (steps whose retained batches a trainer checkpoint now covers), ``replayed`` (the
commit of a retained batch served again to a resumed trainer) and ``returned`` (leases given back
uncommitted: expired, or their trainer process was replaced).

**The queue's event log.** Every record after a checkpoint is one event of
:mod:`pipeline.queue_events`: the queue appends it here and then applies it
(:meth:`pipeline.queue.StalenessQueue.emit`). Recovery reads the events back and applies them to a
fresh queue with the same :meth:`pipeline.queue.QueueState.apply`; there is no second state
machine. With the journal off the queue's log is :class:`NullJournal`, which writes nothing.

Replay retention: a ``consumed`` record with ``retain`` keeps its groups (step, lease order, DP
shards) as a retained batch until a ``released`` record names its step, so a restarted broker can
still replay them.  Their segments stay live (never compacted) until then; ``leased`` records carry
the step and shards, so a commit of a lease issued before a broker restart is retained too.

**Why.** The broker acks a group only after its ``accepted`` record is written (and fsynced, per
``queue.journal_fsync``), so an acked trajectory survives a broker crash. A restarted broker
replays the journal: every accepted, unconsumed group goes back in the queue in order (groups of
uncommitted leases too), the dedup state (SeenSeqs) is rebuilt so producers' resends stay
exactly-once, and every admission counter is *derived* from the replayed records and the trainer's
version: nothing like a stored budget is persisted (AReaL #1345).

**How.** Replay starts from the oldest segment's checkpoint, applies every later record, and
ignores later checkpoints; the leases still open at the end belong to the previous incarnation:
their groups go back to the front of the queue, and a commit of one still consumes them. A torn or corrupt record (short header, impossible length, CRC
mismatch: what a crash mid-write leaves) ends that segment's replay with a warning and is counted
(``torn_records``); a torn tail of the last segment is truncated away. A restarted broker never
appends to an old segment: it opens a new one. Compaction deletes the oldest segments while every
group they accepted is consumed or dropped, which bounds the disk to the live data plus one
segment; the next segment's checkpoint carries the counters and dedup state forward.

fsync trade-off (``queue.journal_fsync``): ``always`` (default) fsyncs before each ack, commit ack
and batch, so acked data survives power loss and kernel crashes, at the cost of one fsync per group
(about 0.1-2 ms on SSDs, far more on network disks). ``never`` only writes to the OS page cache:
acked data survives a broker process crash (SIGKILL, OOM) but not a machine crash.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from pipeline.queue import DROP_REASONS, RECENT_COMMITS, QueueStats, Retained, SeenSeqs, StalenessQueue
from pipeline.queue_events import (
    Accepted,
    Consumed,
    Dropped,
    Event,
    Key,
    Leased,
    Released,
    Replayed,
    VersionPublished,
    event_from_record,
    sizes,
)
from schemas.messages import TrajectoryGroup

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 31
KINDS = {"checkpoint": 0, "accepted": 1, "leased": 2, "consumed": 3, "dropped": 4, "version": 5, "released": 6, "replayed": 7,
         "returned": 8}
KIND_NAMES = {v: k for k, v in KINDS.items()}


def encode_record(kind: str, payload: Any) -> bytes:
    body = bytes([KINDS[kind]]) + msgpack.packb(payload, use_bin_type=True)
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.journal"))


def read_segment(path: Path) -> tuple[list[tuple[str, Any]], int, str | None]:
    """All intact records of one segment, the byte offset where they end, and why reading stopped
    early (None when the segment ended cleanly)."""
    data = path.read_bytes()
    records, off = [], 0
    while off < len(data):
        if len(data) - off < HEADER.size:
            return records, off, f"short record header ({len(data) - off} bytes) at offset {off}"
        length, crc = HEADER.unpack_from(data, off)
        if length < 1 or length > MAX_RECORD_BYTES or off + HEADER.size + length > len(data):
            return records, off, f"record length {length} at offset {off} runs past the end ({len(data)} bytes)"
        body = data[off + HEADER.size : off + HEADER.size + length]
        if zlib.crc32(body) != crc:
            return records, off, f"CRC mismatch at offset {off}"
        kind = KIND_NAMES.get(body[0])
        try:
            payload = msgpack.unpackb(body[1:], raw=False, strict_map_key=False)
        except Exception as e:
            return records, off, f"undecodable payload at offset {off}: {e}"
        if kind is None:
            return records, off, f"unknown record kind {body[0]} at offset {off}"
        records.append((kind, payload))
        off += HEADER.size + length
    return records, off, None


def scan(directory: Path) -> Iterator[tuple[str, str, Any]]:
    """(segment name, kind, payload) of every intact record, oldest first (for tools and tests)."""
    for path in segment_paths(directory):
        records, _, _ = read_segment(path)
        for kind, payload in records:
            yield path.name, kind, payload


@dataclass
class Recovered:
    """The queue state a journal replay rebuilt."""

    groups: list[TrajectoryGroup] = field(default_factory=list)  # accepted, unconsumed, in accept order
    seen: SeenSeqs = field(default_factory=SeenSeqs)
    stats: QueueStats = field(default_factory=QueueStats)
    version: int = 0
    leases: dict[str, list[Key]] = field(default_factory=dict)  # issued, not committed (groups are in `groups`)
    commits: dict[str, int] = field(default_factory=dict)  # recent committed lease ids -> version
    torn_records: int = 0
    segments: int = 0
    last_segment: int = 0
    live: dict[Key, int] = field(default_factory=dict)  # key -> number of the segment that accepted it
    retained: dict[int, Retained] = field(default_factory=dict)  # step -> committed batch kept for replay
    lease_steps: dict[str, tuple[int, list[list[int]]]] = field(default_factory=dict)  # uncommitted lease -> (step, shards)
    replay_leases: dict[str, int] = field(default_factory=dict)  # replay lease issued, not committed -> step


def _stats_payload(stats: QueueStats) -> dict[str, Any]:
    return {
        "groups_accepted": stats.groups_accepted, "trajectories_accepted": stats.trajectories_accepted,
        "groups_consumed": stats.groups_consumed, "trajectories_consumed": stats.trajectories_consumed,
        "groups_dropped": dict(stats.groups_dropped), "trajectories_dropped": dict(stats.trajectories_dropped),
        "groups_superseded": stats.groups_superseded, "groups_replayed": stats.groups_replayed,
        "trajectories_replayed": stats.trajectories_replayed, "groups_not_retained": stats.groups_not_retained,
        "leases_expired": stats.leases_expired, "versions_without_commits": stats.versions_without_commits,
    }


def _stats_from(p: dict[str, Any]) -> QueueStats:
    s = QueueStats()
    for k in ("groups_accepted", "trajectories_accepted", "groups_consumed", "trajectories_consumed", "groups_superseded",
              "groups_replayed", "trajectories_replayed", "groups_not_retained", "leases_expired", "versions_without_commits"):
        setattr(s, k, int(p.get(k, 0)))
    for k in ("groups_dropped", "trajectories_dropped"):
        getattr(s, k).update({r: int(v) for r, v in p.get(k, {}).items()})
    return s


def replay(directory: Path, truncate_torn_tail: bool = True) -> Recovered:
    """Rebuild the queue state from every segment in ``directory`` (see the module doc): the
    events applied to a fresh queue."""
    queue = StalenessQueue(0, 1, 2**62, 2**62)
    return Journal(directory, fsync="never").recover_into(queue, truncate_torn_tail)


class NullJournal:
    """The queue's event log with the journal off: events are applied, nothing is written."""

    bytes_written = 0
    segments_deleted = 0

    def append(self, event: Event) -> None:
        pass

    def recover_into(self, queue: StalenessQueue, truncate_torn_tail: bool = True) -> Recovered:
        return Recovered()

    def open_segment(self, stats: QueueStats, seen: SeenSeqs, version: int, committed: int | None = None) -> None:
        pass

    def maybe_rotate(self, stats: QueueStats, seen: SeenSeqs, version: int, committed: int | None = None) -> None:
        pass

    def summary(self, recovered: Recovered) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


class Journal:
    """Appends events to the current segment; rotates and compacts; recovers (see the module doc)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, fsync: str = "always") -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"journal fsync policy must be 'always' or 'never', got {fsync!r}")
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        self.live: dict[Key, int] = {}  # accepted group -> the segment holding its record, while it may be needed
        self.seg_live: collections.Counter[int] = collections.Counter()
        self.retained_keys: dict[int, list[Key]] = {}  # step -> keys of its retained batch
        self.commits: dict[str, int] = {}
        self.segment = 0
        self._f: Any = None
        self.records_written = 0
        self.bytes_written = 0
        self.segments_deleted = 0

    # ------------------------------------------------------------------ recovery
    def recover(self) -> Recovered:
        """The state a replay of this directory rebuilds (a fresh queue; see :meth:`recover_into`)."""
        return self.recover_into(StalenessQueue(0, 1, 2**62, 2**62))

    def recover_into(self, queue: StalenessQueue, truncate_torn_tail: bool = True) -> Recovered:
        """Apply every event of the journal to ``queue`` (fresh), from the oldest segment's checkpoint."""
        rec = Recovered()
        paths = segment_paths(self.directory)
        for i, path in enumerate(paths):
            seg_no = int(path.stem.split("-")[1])
            records, end, problem = read_segment(path)
            rec.segments += 1
            rec.last_segment = seg_no
            if problem is not None:
                rec.torn_records += 1
                log.warning("journal %s: %s; the rest of this segment is skipped (a crash mid-write leaves this)", path.name, problem)
                if truncate_torn_tail and i == len(paths) - 1:
                    with path.open("r+b") as f:
                        f.truncate(end)
            for j, (kind, p) in enumerate(records):
                if kind == "checkpoint":
                    if i == 0 and j == 0:
                        commits = {str(k): int(v) for k, v in p.get("commits", {}).items()}
                        committed = int(p.get("committed_version", max([int(p["version"]), *commits.values()])))
                        queue.load_checkpoint(_stats_from(p["stats"]), SeenSeqs.from_state(p["seen"]), int(p["version"]), commits, committed)
                        self.commits = dict(commits)
                    continue
                ev = event_from_record(kind, p)
                self._track(ev, seg_no)
                queue.apply(ev)
        queue.orphan_all_leases()
        self.segment = rec.last_segment
        rec.groups, rec.seen, rec.stats, rec.version = list(queue.groups), queue.seen, queue.stats, queue.published_policy_version
        rec.leases = {k: list(keys) for k, (keys, _, _) in queue.orphan_leases.items()}
        rec.lease_steps = {k: (step, shards) for k, (_, step, shards) in queue.orphan_leases.items() if step >= 0}
        rec.replay_leases = dict(queue.orphan_replays)
        rec.commits, rec.retained, rec.live = dict(queue.commits), dict(queue.retained), dict(self.live)
        return rec

    def summary(self, recovered: Recovered) -> dict[str, Any]:
        return {"segments": recovered.segments, "groups": len(recovered.groups), "torn_records": recovered.torn_records,
                "segments_deleted": self.segments_deleted}

    # ------------------------------------------------------------------ writing
    def open_segment(self, stats: QueueStats, seen: SeenSeqs, version: int, committed: int | None = None) -> None:
        """Start a new segment whose first record is a checkpoint of the given (current) state."""
        if self._f is not None:
            self._sync()
            self._f.close()
        self.segment += 1
        path = self.directory / f"segment-{self.segment:08d}.journal"
        self._f = path.open("ab")
        self._write(encode_record("checkpoint", {
            "stats": _stats_payload(stats), "seen": seen.state(), "version": version, "commits": self.commits,
            "committed_version": max([version, *self.commits.values()] if committed is None else [version, committed]),
        }))
        self._sync()
        self._sync_dir()
        log.info("journal: writing %s", path)

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._f.flush()
        self.records_written += 1
        self.bytes_written += len(data)

    def _sync(self) -> None:
        if self.fsync == "always":
            os.fsync(self._f.fileno())

    def _sync_dir(self) -> None:
        if self.fsync == "always":
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, ev: Event) -> None:
        """Write one event durably (fsync per ``queue.journal_fsync``) before the queue applies it."""
        self._write(encode_record(ev.kind, ev.payload()))
        self._sync()
        self._track(ev, self.segment)

    def _track(self, ev: Event, segment: int) -> None:
        """Which segments still hold groups that may be needed (compaction), and recent commits."""
        if isinstance(ev, Accepted):
            if ev.group.dedup_key not in self.live:
                self.live[ev.group.dedup_key] = segment
                self.seg_live[segment] += 1
        elif isinstance(ev, Consumed):
            keys = [k for k, _ in ev.groups]
            if ev.retain:
                self._resolve(self.retained_keys.pop(ev.step, []))
                self.retained_keys[ev.step] = keys
            else:
                self._resolve(keys)
            self._remember_commit(ev.lease_id, ev.version)
        elif isinstance(ev, Dropped):
            self._resolve([k for k, _ in ev.groups])
        elif isinstance(ev, Released):
            for step in ev.steps:
                self._resolve(self.retained_keys.pop(step, []))
        elif isinstance(ev, Replayed):
            self._remember_commit(ev.lease_id, ev.version)

    def _resolve(self, keys: list[Key]) -> None:
        for k in keys:
            seg = self.live.pop(k, None)
            if seg is not None:
                self.seg_live[seg] -= 1

    def _remember_commit(self, lease_id: str, version: int) -> None:
        self.commits[lease_id] = version
        while len(self.commits) > RECENT_COMMITS:
            self.commits.pop(next(iter(self.commits)))

    # Record helpers (tools and tests that drive a queue and a journal side by side).
    def accepted(self, group: TrajectoryGroup, frames: list[bytes]) -> None:
        self.append(Accepted(group, frames))

    def leased(self, lease_id: str, groups: list[TrajectoryGroup], step: int = -1, shards: list[list[int]] | None = None,
               replay: bool = False) -> None:
        self.append(Leased(lease_id, [g.dedup_key for g in groups], step, shards or [], replay))

    def consumed(self, lease_id: str, groups: list[TrajectoryGroup], version: int, step: int = -1,
                 shards: list[list[int]] | None = None, retain: bool = False) -> None:
        self.append(Consumed(lease_id, sizes(groups), version, step, shards or [], retain))

    def released(self, batches: list[Retained]) -> None:
        if batches:
            self.append(Released([r.step for r in batches]))

    def replayed(self, lease_id: str, step: int, version: int, groups: int, trajectories: int) -> None:
        self.append(Replayed(lease_id, step, version, groups, trajectories))

    def dropped(self, reason: str, groups: list[TrajectoryGroup]) -> None:
        assert reason in DROP_REASONS, reason
        self.append(Dropped(reason, sizes(groups)))

    def version(self, version: int) -> None:
        self.append(VersionPublished(version))

    # ------------------------------------------------------------------ rotation and compaction
    def maybe_rotate(self, stats: QueueStats, seen: SeenSeqs, version: int, committed: int | None = None) -> None:
        """Call only between events (after a record *and* its queue change): the new segment's
        checkpoint must match the replay of everything written before it."""
        if self._f is not None and self._f.tell() >= self.segment_bytes:
            self.open_segment(stats, seen, version, committed)
        self.compact()

    def compact(self) -> int:
        """Delete the oldest segments while every group they accepted is consumed or dropped (and
        not retained for replay)."""
        deleted = 0
        for path in segment_paths(self.directory):
            seg_no = int(path.stem.split("-")[1])
            if seg_no >= self.segment or self.seg_live.get(seg_no, 0) > 0:
                break
            path.unlink()
            self.seg_live.pop(seg_no, None)
            deleted += 1
            log.info("journal: deleted fully consumed segment %s", path.name)
        if deleted:
            self.segments_deleted += deleted
            self._sync_dir()
        return deleted

    def close(self) -> None:
        if self._f is not None:
            self._sync()
            self._f.close()
            self._f = None
