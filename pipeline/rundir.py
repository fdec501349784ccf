"""The run directory layout, in one place.

    RUN_DIR/
      config.json        the resolved config every process reads
      config.toml        the file the run started from (copy)
      processes.json     role, pid, command line, log and metrics URL of every process
      cmds/NAME.sh       each process's command, re-runnable by hand
      logs/NAME.log      one log per process
      ports/NAME.json    ports a process bound (written by the process; read by the launcher)
      stats/NAME.json    final counters a process writes when it exits cleanly
      steps.jsonl        one line per trainer step
      consumed.jsonl     one line per consumed trajectory (ids and token-version range)
      summary.json       the end-of-run account of every trajectory
      ray/NAME.json      run.launcher = "ray": each process's actor state (command, incarnation, node)
      cmds/trainer-node.sh  torchrun.nnodes > 1: the trainer ranks of another node (pipeline/multinode.py)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)


def port_file(run_dir: Path, name: str) -> Path:
    return run_dir / "ports" / f"{name}.json"


def stats_file(run_dir: Path, name: str) -> Path:
    return run_dir / "stats" / f"{name}.json"


def wait_for_file(path: Path, timeout_s: float, what: str, alive: Any = None) -> dict[str, Any]:
    """Wait for a JSON file another process writes; ``alive()`` returning False aborts early."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited before it was ready (waited for {path})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s (waited for {path}); see its log, or raise run.startup_timeout_s")
        time.sleep(0.1)
    return json.loads(path.read_text())
