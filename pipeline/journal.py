"""The broker's write-ahead journal: append-only segment files that make accepted trajectories durable.

**What.** ``RUN_DIR/journal/segment-00000001.journal``, ``...02``, ... Each record is

    u32 length (little-endian) | u32 CRC32 of the body | body = 1 kind byte + msgpack payload

Kinds: ``checkpoint`` (first record of every segment: queue counters, the dedup state, the
published version and recent commits, as of the end of the previous segment), ``accepted`` (the
group's encoded wire frames, byte for byte), ``leased`` (lease id -> group keys, written before the
batch is sent), ``consumed`` (a lease's commit: lease id, group keys and sizes, new version),
``dropped`` (reason, group keys and sizes), ``version`` (a published policy version),
``released`` (steps whose retained batches a trainer checkpoint now covers) and ``replayed`` (the
commit of a retained batch served again to a resumed trainer).

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
ignores later checkpoints. A torn or corrupt record (short header, impossible length, CRC
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

from pipeline.queue import DROP_REASONS, QueueStats, Retained, SeenSeqs
from schemas.codec import decode
from schemas.messages import TrajectoryGroup
from schemas.validate import Limits, WireError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 31
KINDS = {"checkpoint": 0, "accepted": 1, "leased": 2, "consumed": 3, "dropped": 4, "version": 5, "released": 6, "replayed": 7}
KIND_NAMES = {v: k for k, v in KINDS.items()}
RECENT_COMMITS = 64  # commit lease ids remembered for idempotent re-commits after a restart

Key = tuple[str, int, int]


def _key(k: Any) -> Key:
    return (str(k[0]), int(k[1]), int(k[2]))


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


def group_from_frames(frames: list[bytes]) -> TrajectoryGroup:
    msg = decode(frames, Limits(max_message_bytes=2**62))
    if not isinstance(msg, TrajectoryGroup):
        raise WireError("not_allowed", f"journal 'accepted' record holds a {type(msg).__name__}")
    return msg


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
    }


def _stats_from(p: dict[str, Any]) -> QueueStats:
    s = QueueStats()
    for k in ("groups_accepted", "trajectories_accepted", "groups_consumed", "trajectories_consumed", "groups_superseded",
              "groups_replayed", "trajectories_replayed", "groups_not_retained"):
        setattr(s, k, int(p.get(k, 0)))
    for k in ("groups_dropped", "trajectories_dropped"):
        getattr(s, k).update({r: int(v) for r, v in p.get(k, {}).items()})
    return s


def replay(directory: Path, truncate_torn_tail: bool = True) -> Recovered:
    """Rebuild the queue state from every segment in ``directory`` (see the module doc)."""
    rec = Recovered()
    pending: collections.OrderedDict[Key, TrajectoryGroup] = collections.OrderedDict()
    paths = segment_paths(directory)
    committed = -1  # newest version a replayed commit produced (a commit at or below it re-did a version)
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
                    rec.stats = _stats_from(p["stats"])
                    rec.seen = SeenSeqs.from_state(p["seen"])
                    rec.version = int(p["version"])
                    rec.commits = {str(k): int(v) for k, v in p.get("commits", {}).items()}
                    committed = max([committed, rec.version, *rec.commits.values()])
                continue
            if kind == "accepted":
                group = group_from_frames(p)
                key = group.dedup_key
                if key in rec.seen:
                    log.warning("journal %s: group %s accepted twice; the second record is ignored", path.name, group.group_id)
                    continue
                rec.seen.add(key)
                pending[key] = group
                rec.live[key] = seg_no
                rec.stats.groups_accepted += 1
                rec.stats.trajectories_accepted += len(group.trajectories)
            elif kind == "leased":
                if p.get("replay"):
                    rec.replay_leases[str(p["lease_id"])] = int(p["step"])
                    continue
                rec.leases[str(p["lease_id"])] = [_key(k) for k in p["keys"]]
                if "step" in p:
                    rec.lease_steps[str(p["lease_id"])] = (int(p["step"]), p.get("shards") or [])
            elif kind == "replayed":
                rec.replay_leases.pop(str(p["lease_id"]), None)
                rec.commits[str(p["lease_id"])] = int(p["version"])
                rec.stats.groups_replayed += int(p["groups"])
                rec.stats.trajectories_replayed += int(p["trajectories"])
            elif kind == "released":
                for step in p["steps"]:
                    r = rec.retained.pop(int(step), None)
                    for g in r.groups if r is not None else []:
                        rec.live.pop(g.dedup_key, None)
            elif kind in ("consumed", "dropped"):
                redo = kind == "consumed" and int(p["version"]) <= committed
                retain = kind == "consumed" and bool(p.get("retain"))
                kept: list[TrajectoryGroup | None] = []
                for k, n in p["groups"]:
                    key = _key(k)
                    kept.append(pending.pop(key, None))
                    if not retain:
                        rec.live.pop(key, None)
                    if kind == "consumed":
                        rec.stats.groups_consumed += 1
                        rec.stats.trajectories_consumed += int(n)
                        rec.stats.groups_superseded += int(redo)
                    else:
                        rec.stats.groups_dropped[p["reason"]] += 1
                        rec.stats.trajectories_dropped[p["reason"]] += int(n)
                if retain:
                    _recover_retained(rec, p, kept, path.name)
                if kind == "consumed":
                    rec.leases.pop(str(p["lease_id"]), None)
                    rec.lease_steps.pop(str(p["lease_id"]), None)
                    rec.commits[str(p["lease_id"])] = int(p["version"])  # not published yet: no version change
                    committed = max(committed, int(p["version"]))
            elif kind == "version":
                rec.version = max(rec.version, int(p["version"]))
                committed = max(committed, rec.version)
    while len(rec.commits) > RECENT_COMMITS:
        rec.commits.pop(next(iter(rec.commits)))
    rec.groups = list(pending.values())
    return rec


def _recover_retained(rec: Recovered, p: dict[str, Any], groups: list[TrajectoryGroup | None], segment: str) -> None:
    """A replayed ``consumed`` record with ``retain``: rebuild its retained batch (its groups, in
    lease order, were just taken out of the pending queue)."""
    step = int(p["step"])
    if any(g is None for g in groups):  # cannot happen unless records were lost (torn): cannot replay exactly
        log.warning("journal %s: retained batch of step %d lacks some of its groups; it will not be replayed", segment, step)
        for k, _ in p["groups"]:
            rec.live.pop(_key(k), None)
        return
    old = rec.retained.pop(step, None)
    for g in old.groups if old is not None else []:
        rec.live.pop(g.dedup_key, None)
    rec.retained[step] = Retained(step, str(p["lease_id"]), int(p["version"]), [g for g in groups if g is not None],
                                  [list(map(int, s)) for s in p.get("shards", [])])


class Journal:
    """Appends records to the current segment; rotates and compacts (see the module doc)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20, fsync: str = "always") -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"journal fsync policy must be 'always' or 'never', got {fsync!r}")
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        self.live: dict[Key, int] = {}
        self.seg_live: collections.Counter[int] = collections.Counter()
        self.commits: dict[str, int] = {}
        self.segment = 0
        self._f: Any = None
        self.records_written = 0
        self.bytes_written = 0
        self.segments_deleted = 0

    def recover(self) -> Recovered:
        rec = replay(self.directory)
        self.live = dict(rec.live)
        self.seg_live = collections.Counter(rec.live.values())
        self.commits = dict(rec.commits)
        self.segment = rec.last_segment
        return rec

    # ------------------------------------------------------------------ writing
    def open_segment(self, stats: QueueStats, seen: SeenSeqs, version: int) -> None:
        """Start a new segment whose first record is a checkpoint of the given (current) state."""
        if self._f is not None:
            self._sync()
            self._f.close()
        self.segment += 1
        path = self.directory / f"segment-{self.segment:08d}.journal"
        self._f = path.open("ab")
        self._write(encode_record("checkpoint", {
            "stats": _stats_payload(stats), "seen": seen.state(), "version": version, "commits": self.commits,
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

    def _append(self, kind: str, payload: Any) -> None:
        self._write(encode_record(kind, payload))
        self._sync()

    def accepted(self, group: TrajectoryGroup, frames: list[bytes]) -> None:
        self._append("accepted", frames)
        self.live[group.dedup_key] = self.segment
        self.seg_live[self.segment] += 1

    def leased(self, lease_id: str, groups: list[TrajectoryGroup], step: int = -1, shards: list[list[int]] | None = None,
               replay: bool = False) -> None:
        self._append("leased", {"lease_id": lease_id, "keys": [list(g.dedup_key) for g in groups], "step": step,
                                "shards": shards or [], "replay": replay})

    def consumed(self, lease_id: str, groups: list[TrajectoryGroup], version: int, step: int = -1,
                 shards: list[list[int]] | None = None, retain: bool = False) -> None:
        """A commit. With ``retain`` the groups stay live (their segments are not compacted) until
        :meth:`released` names ``step``."""
        resolved = [[list(g.dedup_key), len(g.trajectories)] for g in groups] if retain else self._resolve(groups)
        self._append("consumed", {"lease_id": lease_id, "version": version, "groups": resolved, "step": step,
                                  "shards": shards or [], "retain": retain})
        self._remember_commit(lease_id, version)

    def _remember_commit(self, lease_id: str, version: int) -> None:
        self.commits[lease_id] = version
        while len(self.commits) > RECENT_COMMITS:
            self.commits.pop(next(iter(self.commits)))

    def released(self, batches: list[Retained]) -> None:
        """Retained batches a trainer checkpoint covers: their groups stop holding segments."""
        if batches:
            self._append("released", {"steps": [r.step for r in batches]})
            for r in batches:
                self._resolve(r.groups)

    def replayed(self, lease_id: str, step: int, version: int, groups: int, trajectories: int) -> None:
        self._append("replayed", {"lease_id": lease_id, "step": step, "version": version, "groups": groups, "trajectories": trajectories})
        self._remember_commit(lease_id, version)

    def dropped(self, reason: str, groups: list[TrajectoryGroup]) -> None:
        assert reason in DROP_REASONS, reason
        self._append("dropped", {"reason": reason, "groups": self._resolve(groups)})

    def version(self, version: int) -> None:
        self._append("version", {"version": version})

    def _resolve(self, groups: list[TrajectoryGroup]) -> list[list[Any]]:
        out = []
        for g in groups:
            seg = self.live.pop(g.dedup_key, None)
            if seg is not None:
                self.seg_live[seg] -= 1
            out.append([list(g.dedup_key), len(g.trajectories)])
        return out

    # ------------------------------------------------------------------ rotation and compaction
    def maybe_rotate(self, stats: QueueStats, seen: SeenSeqs, version: int) -> None:
        """Call only between events (after a record *and* its queue change): the new segment's
        checkpoint must match the replay of everything written before it."""
        if self._f is not None and self._f.tell() >= self.segment_bytes:
            self.open_segment(stats, seen, version)
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
