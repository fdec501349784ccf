"""What ``slipstream run`` does with a run directory before anything starts: a fresh run, or a resume.

What: :func:`prepare_run_dir` looks at ``trainer.resume_from`` and the run directory.

- **A fresh run** (``resume_from`` empty, or ``"latest"`` with no checkpoint yet): a queue journal
  left in ``RUN_DIR/journal`` is an earlier run's and is moved aside (``journal.previous-DATE``),
  so the broker starts with an empty queue.
- **A resume in the same run directory** (``resume_from = "latest"``, or a checkpoint directory
  under ``RUN_DIR/checkpoints``): the journal is this run's queue, so it stays and the broker
  recovers from it: the groups accepted and not consumed, the account (accepted, consumed, dropped,
  duplicates) and the policy version, so admission control and staleness continue where the
  interrupted part stopped.  The interrupted part's producer and replayer stats files
  (``stats/producer-0.json``, their ``.incarnation-N`` files) are renamed ``NAME.partK.json``:
  the new processes write their own, and ``summary.json`` sums every file, so ``generated``
  covers both parts.  The interrupted part's ``summary.json`` becomes ``summary.partK.json``.
- **A resume from another run's checkpoint**: the journal here (if any) is not that run's queue
  and is moved aside, as for a fresh run.

Either resume returns a :class:`Resume`; the launcher then starts embedded engines paused
(``--start-paused``), so that none samples with the weights of ``model.path`` (version 0): the
trainer publishes the checkpoint's weights, says hello to the broker, and continues them
(``consumers/loop.py``).

    resume = prepare_run_dir(cfg, Path("runs/tiny"))   # None: a fresh run
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # consumers/checkpoint.py's CHECKPOINT_DIR (not imported: that module imports torch)
LATEST = "latest"
_PART = re.compile(r"\.part(\d+)\.json$")


@dataclass(frozen=True)
class Resume:
    checkpoint: Path  # the checkpoint directory the trainer resumes from
    step: int  # its step (the last step the interrupted part completed and saved)
    policy_version: int
    same_run: bool  # the checkpoint belongs to this run directory: its journal is kept
    part: int  # 2 for the first resume of a run directory, 3 for the next, ...

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "step": self.step, "policy_version": self.policy_version,
                "journal_kept": self.same_run, "part": self.part}


def resume_checkpoint(run_dir: Path, resume_from: str) -> Path | None:
    """The checkpoint directory ``trainer.resume_from`` names (as ``consumers.checkpoint.resolve_checkpoint``
    resolves it), or None when the trainer will start fresh."""
    if not resume_from:
        return None
    if resume_from == LATEST:
        marker = run_dir / CHECKPOINTS / LATEST
        if not marker.exists():
            return None
        path = marker.parent / marker.read_text().strip()
    else:
        path = Path(resume_from)
    return path if (path / "meta.json").exists() else None


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _move_journal_aside(run_dir: Path, why: str) -> None:
    journal = run_dir / "journal"
    if journal.is_dir() and any(journal.iterdir()):
        aside = run_dir / f"journal.previous-{time.strftime('%Y%m%d-%H%M%S')}"
        log.warning("%s holds %s; this run starts with an empty queue: moved it to %s", journal, why, aside)
        journal.rename(aside)


def _rename_stats(run_dir: Path, part: int) -> list[str]:
    """Rename the earlier part's producer/replayer stats files to ``NAME.part<part-1>.json``."""
    stats = run_dir / "stats"
    moved = []
    for path in sorted([*stats.glob("producer-*.json"), *stats.glob("replayer-*.json")]):
        if _PART.search(path.name) is None:
            path.rename(path.with_name(f"{path.stem}.part{part - 1}.json"))
            moved.append(path.name)
    return moved


def _next_part(run_dir: Path) -> int:
    parts = [int(m.group(1)) for p in (run_dir / "stats").glob("*.json") if (m := _PART.search(p.name))]
    return max(parts, default=0) + 2  # files of part k are renamed .part<k>: the next part is one more


def prepare_run_dir(cfg: Any, run_dir: Path) -> Resume | None:
    """Keep or move aside RUN_DIR's journal, and keep the earlier part's stats (see the module doc)."""
    path = resume_checkpoint(run_dir, cfg.trainer.resume_from)
    if path is None:
        if cfg.trainer.resume_from:
            log.warning("trainer.resume_from = %r names no checkpoint yet: a fresh run", cfg.trainer.resume_from)
        _move_journal_aside(run_dir, "an earlier run's queue journal")
        return None
    meta = json.loads((path / "meta.json").read_text())
    same = _within(path, run_dir / CHECKPOINTS)
    if not same:
        _move_journal_aside(run_dir, f"a queue journal that is not the one of {path}'s run")
    part = _next_part(run_dir)
    moved = _rename_stats(run_dir, part)
    if (run_dir / "summary.json").exists():  # the interrupted part's own account, kept beside the new one
        (run_dir / "summary.json").rename(run_dir / f"summary.part{part - 1}.json")
    resume = Resume(path, int(meta["step"]), int(meta["policy_version"]), same, part)
    log.warning("resuming from %s (step %d, policy version %d): part %d of this run directory; %s%s", path, resume.step,
                resume.policy_version, part, "its queue journal is kept and replayed" if same else "a new queue",
                f"; the earlier part's stats ({', '.join(moved)}) renamed .part{part - 1}" if moved else "")
    return resume
