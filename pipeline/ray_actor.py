"""The Ray actor that runs one slipstream process (broker, producer, engine or trainer rank) on its node.

What: :class:`RoleProcess` is made a Ray actor by pipeline/ray_launcher.py (``ray.remote(RoleProcess)``)
and placed in one bundle of the run's placement group.  It runs the role's ordinary command, the
same ``python -m pipeline.cli broker|produce|engine|train ...`` the local launcher writes to
``cmds/NAME.sh``, as a supervised subprocess, with ``{python}`` and ``{node_ip}`` filled in on its
node (the interpreter there; the address the role binds, so that other nodes reach it).

Why a subprocess inside an actor rather than the role's code inside the actor: the roles already
are processes with their own signal handling, event loops, port files and ``--set`` overrides;
the local launcher, the tests and a user re-running ``cmds/NAME.sh`` start them so.  Running the
very same command keeps one code path for every launch mode (local, Ray, Slurm, Kubernetes), keeps
Ray's worker runtime (threads, signal handlers, its own asyncio loop) out of the roles, and lets a
crash of the role be a crash of the actor, which is what Ray's supervision acts on.

Supervision: when the subprocess exits (any code but 2, a config error, and not while stopping)
the actor ends its own process (``os._exit``), so Ray restarts the actor (``max_restarts``), on the
same node or, when the node died, wherever Ray re-placed its bundle.  The subprocess gets
``PR_SET_PDEATHSIG = SIGKILL``: when the actor dies (its node removed, its worker killed) the role
dies with it, at once, as on a dead machine.  A restarted actor reads its last command from its
state file ``RUN_DIR/ray/NAME.json`` on the shared run directory, turns it into the restart form the
local launcher uses (trainer: ``trainer.resume_from = "latest"``; engine: ``--start-paused`` on its
port; producer: the dead incarnation's stats kept as ``NAME.incarnation-N.json``), waits
``run.restart_backoff_s * 2**n`` and starts it; the state file counts incarnations, which the driver
reports as restarts in summary.json.

Run: not by hand; ``slipstream run CONFIG --set run.launcher='"ray"'`` creates these actors.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.rundir import port_file, stats_file, wait_for_file, write_json_atomic

log = logging.getLogger(__name__)

#: exit code of a config or plug-in error (pipeline/cli.py): a restart would fail the same way
CONFIG_ERROR = 2


def _pdeathsig_kill() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def state_path(run_dir: Path, name: str) -> Path:
    return run_dir / "ray" / f"{name}.json"


def read_state(run_dir: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads(state_path(run_dir, name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def restart_form(role: str, cmd: list[str]) -> list[str]:
    """The command a restarted process runs (the local launcher's rules, pipeline/launcher.py)."""
    if role == "trainer" and 'trainer.resume_from="latest"' not in cmd:
        return [*cmd, "--set", 'trainer.resume_from="latest"']
    if role == "engine" and "--start-paused" not in cmd:
        return [*cmd, "--start-paused"]
    return list(cmd)


def fill(cmd: list[str], node_ip: str) -> list[str]:
    """``{python}`` -> this node's interpreter, ``{node_ip}`` -> this node's address."""
    return [sys.executable if a == "{python}" else a.replace("{node_ip}", node_ip) for a in cmd]


class RoleProcess:
    """One role's process on one node (see the module docstring).  Methods are called by the driver."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import ray

        self.spec = spec
        self.name: str = spec["name"]
        self.role: str = spec["role"]
        self.run_dir = Path(spec["run_dir"])
        self.log_path = self.run_dir / "logs" / f"{self.name}.log"
        self.node_ip: str = ray.util.get_node_ip_address()
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.gpus = [str(g) for g in ray.get_gpu_ids()]
        self.proc: subprocess.Popen[bytes] | None = None
        self.code: int | None = None
        self.stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.cmd: list[str] = []
        self.env: dict[str, str] = {}
        self.incarnation = 0
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._restart_after_actor_death()

    # ------------------------------------------------------------------ lifecycle
    def start(self, cmd: list[str], env: dict[str, str], incarnation: int = 0) -> dict[str, Any]:
        """First start (or, for the trainer, a new gang's start): run ``cmd`` with ``env`` on top of
        this worker's environment.  Returns :meth:`status`."""
        self.cmd, self.env, self.incarnation = list(cmd), dict(env), incarnation
        self._spawn()
        return self.status()

    def _restart_after_actor_death(self) -> None:
        """Ray restarted this actor (its process or its node died): run the last command, in its restart form."""
        prev = read_state(self.run_dir, self.name)
        if not prev.get("cmd"):
            self._note("restarted by Ray before its first start: nothing to run yet")
            return
        self.incarnation = int(prev.get("incarnation", 0)) + 1
        self.cmd, self.env = restart_form(self.role, prev["cmd"]), dict(prev.get("env", {}))
        if self.role == "producer":  # keep the dead incarnation's last counts: summary.json sums producer-*.json
            with contextlib.suppress(FileNotFoundError):
                stats_file(self.run_dir, self.name).rename(stats_file(self.run_dir, f"{self.name}.incarnation-{self.incarnation - 1}"))
        backoff = float(self.spec.get("restart_backoff_s", 1.0)) * 2 ** (self.incarnation - 1)
        self._note(f"Ray restarted the actor on node {self.node_id[:12]} ({self.node_ip}); restart {self.incarnation}, "
                   f"starting the process again in {backoff:.1f}s")
        time.sleep(backoff)
        self._spawn()

    def _spawn(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            port_file(self.run_dir, self.spec.get("port_name", self.name)).unlink()  # an earlier life's ports are not ours
        self.code, self.stopping = None, False
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_child, args=(started,), name=f"slipstream-{self.name}", daemon=True)
        self._thread.start()
        started.wait(timeout=30)
        self._save()

    def _run_child(self, started: threading.Event) -> None:
        """Start the subprocess from this thread and wait for it here: PR_SET_PDEATHSIG fires when
        the thread that forked the child ends, so that thread must live as long as the child."""
        cmd = fill(self.cmd, self.node_ip)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        cwd = self.spec.get("cwd") if Path(self.spec.get("cwd") or "/nonexistent").is_dir() else str(self.run_dir)
        with self.log_path.open("ab") as out:
            try:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                        start_new_session=True, preexec_fn=_pdeathsig_kill)
            except OSError as e:
                self.code = 127
                self._note(f"could not start {cmd[0]}: {e}")
                started.set()
                return
            self.proc = proc
            started.set()
            code = proc.wait()
        self.code = code
        if self.stopping:
            return
        if code == CONFIG_ERROR or not self.spec.get("restart_on_exit", True):
            self._note(f"process exited with code {code}; the driver decides (not restarted by Ray)")
            return
        self._note(f"process exited with code {code}: ending the actor so that Ray restarts it (ray max_restarts)")
        logging.shutdown()
        os._exit(1)

    def _save(self) -> None:
        write_json_atomic(state_path(self.run_dir, self.name), {
            "name": self.name, "role": self.role, "incarnation": self.incarnation, "cmd": self.cmd, "env": self.env,
            "node_id": self.node_id, "node_ip": self.node_ip, "pid": self.proc.pid if self.proc else None,
            "gpus": self.gpus, "at": time.time(),
        })

    def _note(self, text: str) -> None:
        """A launcher line in the process's own log (where a user looks first)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(f"[slipstream ray actor {self.name}] {text}\n")

    # ------------------------------------------------------------------ queries
    def status(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "name": self.name, "role": self.role, "pid": proc.pid if proc else None, "code": self.code,
            "incarnation": self.incarnation, "node_id": self.node_id, "node_ip": self.node_ip, "gpus": self.gpus,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "cmd": fill(self.cmd, self.node_ip),
            "ports": self.ports(),
        }

    def ports(self) -> Any:
        """The process's port file (None until it wrote one)."""
        try:
            return json.loads(port_file(self.run_dir, self.spec.get("port_name", self.name)).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the process's port file; raises if it exits first or the wait runs out."""
        alive = lambda: self.proc is not None and self.proc.poll() is None  # noqa: E731
        wait_for_file(port_file(self.run_dir, self.spec.get("port_name", self.name)), timeout_s, self.name, alive)
        return self.status()

    def node(self) -> dict[str, str]:
        return {"node_id": self.node_id, "node_ip": self.node_ip}

    def free_port(self) -> int:
        """A free TCP port on this node's address (the trainer's rendezvous, given to every rank)."""
        with socket.socket() as s:
            s.bind((self.node_ip, 0))
            return int(s.getsockname()[1])

    # ------------------------------------------------------------------ changes from the driver
    def set_cmd(self, cmd: list[str]) -> None:
        """The command a restart runs from now on (a broker's first ports, an engine's first port)."""
        self.cmd = list(cmd)
        self._save()

    def respawn(self, cmd: list[str], grace_s: float) -> dict[str, Any]:
        """Stop the process and start ``cmd`` in its place (a producer whose broker or engines moved)."""
        self.stop(grace_s)
        self.incarnation += 1
        if self.role == "producer":
            with contextlib.suppress(FileNotFoundError):
                stats_file(self.run_dir, self.name).rename(stats_file(self.run_dir, f"{self.name}.incarnation-{self.incarnation - 1}"))
        self.cmd = list(cmd)
        self._note(f"restarted by the driver (restart {self.incarnation}): its broker or engines moved")
        self._spawn()
        return self.status()

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the process group, SIGKILL after ``grace_s``; returns the exit code."""
        with self._lock:
            self.stopping = True
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return proc.returncode if proc else None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._note(f"did not exit {grace_s:.0f}s after SIGTERM: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            if self._thread is not None:
                self._thread.join(timeout=10)
            return proc.returncode
