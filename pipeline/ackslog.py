"""The delivery audit trail, written by the broker: ``RUN_DIR/acked/PRODUCER.jsonl``.

One JSON line per ack the broker sends (group id, epoch, seq, duplicate, trajectory ids), written
and flushed to the OS *before* the ack leaves, so a producer killed with acks in flight loses no
line (issue 19: the producer used to write this file itself when an ack arrived).  A broker
SIGKILL cannot lose a line either: what it acked was written first.  The journal stays the durable
record of the queue; this file is the per-producer view of what was acknowledged.  Producers keep
a client-side copy under ``RUN_DIR/acked/client/`` (what they saw acked).

Producer ids come from the network, so a file is named after the id only when the id is a plain
name (``[A-Za-z0-9_.-]``, not starting with a dot, at most 100 characters); any other id is
written to ``_other.jsonl`` with the id in each line.  At most ``MAX_OPEN`` files are kept open.

    acks = AckLog(run_dir / "acked"); acks.acked(group, duplicate=False); acks.close()
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import IO, Any

from schemas.messages import TrajectoryGroup

MAX_OPEN = 32
_PLAIN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


class NullAckLog:
    """No run directory: no audit trail."""

    def acked(self, group: TrajectoryGroup, duplicate: bool) -> None:
        pass

    def summary(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        pass


class AckLog:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files: collections.OrderedDict[str, IO[str]] = collections.OrderedDict()
        self.lines = 0

    def _file(self, producer_id: str) -> IO[str]:
        name = producer_id if _PLAIN.match(producer_id) else "_other"
        f = self._files.pop(name, None)
        if f is None:
            f = (self.directory / f"{name}.jsonl").open("a", buffering=1)
            if len(self._files) >= MAX_OPEN:
                self._files.popitem(last=False)[1].close()
        self._files[name] = f  # most recently used last
        return f

    def acked(self, group: TrajectoryGroup, duplicate: bool) -> None:
        line: dict[str, Any] = {
            "group_id": group.group_id, "epoch": group.epoch, "seq": group.seq, "duplicate": duplicate,
            "trajectory_ids": [t.trajectory_id for t in group.trajectories],
        }
        if not _PLAIN.match(group.producer_id):
            line["producer_id"] = group.producer_id
        self._file(group.producer_id).write(json.dumps(line) + "\n")  # line-buffered: flushed before the ack is sent
        self.lines += 1

    def summary(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "lines": self.lines}

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()
