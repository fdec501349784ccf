"""Where a producer's next prompt comes from: the prompt-source plug-in, plus prompts to retry first.

A :class:`PromptFeed` hands out :class:`Job` s (a prompt and its retry history).  Prompts given back
(a timed-out or failed attempt, a cut group that restarts, a waiting group that went stale, a
broker ``Requeue``) come out before new ones.  A source with ``state_dict()`` / ``load_state_dict()``
(``producers.datasets``) resumes where it stopped: its cursor is saved to ``cursor_path`` (when it
changed) and restored when the feed is made again.  With several producers, a source with
``shard(index, count)`` takes a disjoint slice per producer.

    feed = PromptFeed(source, "producers.tasks.maxdigit:prompts", cursor_path=Path("run/cursors/producer-0.json"))
    job = feed.next()          # None once the source is exhausted and nothing waits for a retry
    feed.retry(job)            # first out next time
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.plugins import Prompt

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A prompt to generate a group for, with its retry history."""

    prompt: Prompt
    timeouts: int = 0  # attempts that ended in a plug-in timeout
    cuts: int = 0  # times a group of it was cut and restarted


class PromptFeed:
    """Prompts to retry first, then the prompt source (see the module docstring)."""

    def __init__(self, source: Any, name: str, cursor_path: Path | None = None) -> None:
        self.source = source
        self.name = name
        self.cursor_path = cursor_path
        self.requeued: deque[Job] = deque()
        self.exhausted = False
        self._saved_cursor: Any = None
        self._restore_cursor()

    def shard(self, index: int, count: int) -> None:
        """Take the ``index``-th of ``count`` disjoint slices, if the source can."""
        if count > 1 and hasattr(self.source, "shard"):
            self.source.shard(index, count)

    def next(self) -> Job | None:
        """The next prompt (retries first); None once the source is exhausted."""
        if self.requeued:
            return self.requeued.popleft()
        if self.exhausted:
            return None
        try:
            return Job(next(self.source))
        except StopIteration:
            log.warning("prompt source %s is exhausted: no new groups from this producer", self.name)
            self.exhausted = True
            return None

    def retry(self, job: Job) -> None:
        """``job`` comes out first next time (a failed, timed-out or cut attempt)."""
        self.requeued.appendleft(job)

    def append(self, job: Job) -> None:
        """``job`` comes out after the other retries (a prompt the broker sent back)."""
        self.requeued.append(job)

    # ------------------------------------------------------------------ cursor
    def cursor(self) -> Any:
        return self.source.state_dict() if hasattr(self.source, "state_dict") else None

    def _restore_cursor(self) -> None:
        if self.cursor_path is None or not hasattr(self.source, "load_state_dict") or not self.cursor_path.exists():
            return
        state = json.loads(self.cursor_path.read_text())
        self.source.load_state_dict(state)
        self._saved_cursor = state
        log.info("prompt source resumed from %s: %s", self.cursor_path, state)

    def save_cursor(self) -> None:
        """Write the source's cursor (if it has one) when it changed; read back at the next start."""
        if self.cursor_path is None or not hasattr(self.source, "state_dict"):
            return
        state = self.source.state_dict()
        if state != self._saved_cursor:
            self.cursor_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cursor_path.with_name(self.cursor_path.name + ".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.cursor_path)
            self._saved_cursor = state
