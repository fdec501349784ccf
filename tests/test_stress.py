"""The CPU hog (tests/stress.py) and the ``--hog`` pytest option (tests/conftest.py):

- a Hog's processes run (they accrue CPU time) and ``stop()`` ends and reaps exactly those PIDs;
- a hog whose parent is SIGKILLed exits by itself (no busy process outlives a crashed pytest);
- ``pytest --hog --hog-procs N`` has N busy children of pytest while the tests run, and none after it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, env
from tests.stress import Hog, cores


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _until(cond, what: str, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)


def test_hog_processes_burn_cpu_and_stop_by_pid() -> None:
    with Hog(2) as hog:
        pids = hog.pids
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        start = {p: _cpu_ticks(p) for p in pids}
        _until(lambda: all(_cpu_ticks(p) > start[p] for p in pids), "both hog processes to accrue CPU time")
    assert hog.procs == [] and not any(_alive(p) for p in pids)
    assert Hog().n == cores()
    with pytest.raises(ValueError, match="at least one"):
        Hog(0)


def test_hog_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "pids.json"
    script = ("import json, sys, time; from tests.stress import Hog; h = Hog(1).start(); "
              f"open({str(out)!r}, 'w').write(json.dumps(h.pids)); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", script], env=env(), cwd=REPO)
    try:
        _until(lambda: out.exists() and out.read_text(), "the parent to start its hog")
        (pid,) = json.loads(out.read_text())
        assert _alive(pid)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
    _until(lambda: not _alive(pid), f"hog process {pid} to exit after its parent died")


def test_pytest_hog_option_runs_tests_among_busy_children(tmp_path: Path) -> None:
    record = tmp_path / "children.json"
    (tmp_path / "test_inner.py").write_text(f"""
import json, os, pathlib
def test_children():
    me = str(os.getpid())
    kids = [int(d) for d in os.listdir("/proc") if d.isdigit() and
            pathlib.Path(f"/proc/{{d}}/stat").read_text().rsplit(")", 1)[1].split()[1] == me]
    pathlib.Path({str(record)!r}).write_text(json.dumps(kids))
""")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest", "--hog", "--hog-procs", "2",
                        "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_inner.py")],
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CPU hog: 2 busy processes" in r.stdout
    kids = json.loads(record.read_text())
    assert len(kids) == 2, kids
    assert not any(_alive(k) for k in kids), "a hog process outlived pytest"
