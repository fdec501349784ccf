"""A CPU hog for running tests under load: one busy-loop process per core (or ``n``), started and
stopped by PID.

Why: the tests that failed only on a loaded machine (issue 19, "Deterministic tests") must pass with
every core busy, so CI runs them once under this hog (``.ci/run``), and anyone can do the same:

    pytest --hog tests/test_faults.py            # one busy process per core for the whole session
    pytest --hog --hog-procs 4 -m slow            # four of them
    python -m tests.stress 30                     # hog every core for 30 s (to load a manual run)

The pytest option lives in tests/conftest.py; this module only starts and stops the processes.
Each busy process is a child of this one, in its own session, and exits by itself if its parent
dies (it polls the parent's PID), so a crashed pytest cannot leave a hog behind.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)

# Spin; every ~50 M iterations check that the parent is still there (exit when it is gone).
_BUSY = """
import os, sys
parent = int(sys.argv[1])
while True:
    for _ in range(5_000_000):
        pass
    if os.getppid() != parent:
        raise SystemExit(0)
"""


def cores() -> int:
    """Cores this process may run on (the hog's default size)."""
    return len(os.sched_getaffinity(0))


class Hog:
    """``n`` busy-loop processes; ``stop()`` ends exactly those (SIGKILL by PID, then reaped)."""

    def __init__(self, n: int | None = None) -> None:
        self.n = cores() if n is None else n
        if self.n < 1:
            raise ValueError(f"a hog needs at least one process, got {self.n}")
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> Hog:
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", _BUSY, str(os.getpid())], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        log.info("CPU hog: %d busy processes, pids %s", self.n, self.pids)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(f"CPU hog process {p.pid} did not exit within {timeout_s}s of SIGKILL") from e
        log.info("CPU hog stopped: pids %s", self.pids)
        self.procs = []

    def __enter__(self) -> Hog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 60.0
    n = int(argv[1]) if len(argv) > 1 else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with Hog(n):
        time.sleep(seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
