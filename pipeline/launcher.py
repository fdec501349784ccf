"""``slipstream run``: start every role of a one-machine run as separate processes and supervise them.

Order: broker -> engines -> producers -> trainer.  Each child runs in its own process group (so a
terminal Ctrl-C reaches only the launcher, which then stops the children in order) and gets
``PR_SET_PDEATHSIG`` so it cannot outlive a killed launcher.  Each child's command line is written
to ``cmds/NAME.sh`` so it can be re-run by hand, and ``processes.json`` lists role, pid, command,
log and metrics URL of every process.  The console shows a progress bar and one line per step,
read from ``steps.jsonl``.  The run ends when the trainer finishes its steps (exit 0), when any
child fails for good (exit 1, naming it and its log), or on Ctrl-C / SIGTERM (exit 130): the
children get SIGTERM in order, and the trainer first writes a final checkpoint when checkpoints are
on (``consumers/loop.py``).  Before anything starts, :func:`pipeline.resume.prepare_run_dir` decides
between a fresh run (an earlier run's journal is moved aside) and a resume in the same run
directory (``trainer.resume_from``: the journal is kept and replayed by the broker, the earlier
part's stats kept, the embedded engines started paused until the trainer sent them the
checkpoint's weights).

Placement (``pipeline/placement.py``): before anything starts, the GPUs are detected and every
trainer rank and engine is given its GPU(s) through ``CUDA_VISIBLE_DEVICES`` (the broker and the
producers get none), plus ``PYTORCH_CUDA_ALLOC_CONF`` (``placement.alloc_conf``) unless the
environment sets allocator options; the rest of the launcher's environment (``NCCL_*`` included)
passes through.  ``placement.json`` holds the plan and ``processes.json`` each process's GPUs (and,
for engines, the expected weight transport, the one the trainer reports choosing, and the memory budget).

A crashed broker, producer or embedded engine is restarted, up to ``run.max_restarts`` times per process, after
``run.restart_backoff_s`` (doubling per restart); so is a crashed trainer (any exit but 0 and 2)
when ``trainer.checkpoint_every > 0``, with ``trainer.resume_from = "latest"``; the broker then
replays the batches the dead trainer committed after that checkpoint (``pipeline/queue.py``).  The broker comes back on the ports (and metrics
port) it first bound and recovers its queue from RUN_DIR/journal; producers and the trainer
reconnect on their own.  An engine comes back on its port with generation paused
(``--start-paused``): the producers' retried requests queue there, and the trainer re-creates the
weight group, sends it the current weights and continues it (``consumers/engine_rejoin.py``), so
it never decodes with the stale weights it loaded from ``model.path``.  Restarts are logged, ``processes.json`` is rewritten with the new pids,
and ``summary.json`` counts restarts per role.

Before any child starts, a hub id in ``model.path`` is resolved to its local snapshot
(:mod:`pipeline.hub`); the children run offline on it.  With ``producer.engine = "sglang"`` the
engines are SGLang servers (and optionally a router) started from :mod:`producers.sglang_launch`'s
plan, ready when ``/health`` answers, and restarted on the same port like a broker.  When a child
dies while starting (or later), the error shows the last lines of its log.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import SlipstreamConfig
from pipeline.configbase import to_dict
from pipeline.placement import Plan, plan_for
from pipeline.preflight import log_tail
from pipeline.resume import Resume, prepare_run_dir
from pipeline.rundir import port_file, stats_file, wait_for_file, write_json_atomic

log = logging.getLogger(__name__)

PY = sys.executable


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    role: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    metrics_url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    env_extra: dict[str, str] = field(default_factory=dict)  # on top of the launcher's env (e.g. CUDA_VISIBLE_DEVICES)
    _log: TextIO | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")  # type: ignore[assignment]
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**env, **self.env_extra},
            start_new_session=True, preexec_fn=_set_pdeathsig,
        )
        log.info("started %s (pid %d): log %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # its own process group: torchrun workers included

    def wait(self, timeout_s: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def child_env(cfg: SlipstreamConfig) -> dict[str, str]:
    env = dict(os.environ)
    # Offline: a hub id in model.path was resolved to a local snapshot before any child started (pipeline/hub.py).
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if cfg.run.python_path:
        env["PYTHONPATH"] = os.pathsep.join([*cfg.run.python_path, *filter(None, [env.get("PYTHONPATH", "")])])
    return env


class Launcher:
    def __init__(self, cfg: SlipstreamConfig, run_dir: Path, plan: Plan | None = None, resume: Resume | None = None) -> None:
        self.cfg = cfg
        self.resume = resume  # pipeline/resume.py: the checkpoint a resumed run starts from (None: fresh)
        self.run_dir = run_dir
        self.children: list[Child] = []
        self.env = child_env(cfg)
        self.plan = plan if plan is not None else plan_for(cfg)
        self._trainer_ports_mtime = 0.0
        self.config_path = run_dir / "config.json"
        self._stop_reason: str | None = None
        self.restarts: collections.Counter[str] = collections.Counter()  # per process name
        self.restarts_by_role: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ helpers
    def _cli(self, *args: str) -> list[str]:
        return [PY, "-m", "pipeline.cli", *args]

    def _spawn(self, name: str, role: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        """Start a child.  ``env`` (SGLang servers: their own GPUs) replaces the placement's variables."""
        self._forget_ports(name)
        env_extra = self.plan.placement_env(name if role in ("trainer", "engine") else "", self.env) if env is None else dict(env)
        child = Child(name, role, cmd, self.run_dir / "logs" / f"{name}.log", env_extra=env_extra)
        child.extra = self._placement_extra(name, env_extra, placed=env is None)
        self._write_script(child)
        child.start(self.env)
        self.children.append(child)
        return child

    def _write_script(self, child: Child) -> None:
        extra = "".join(f"{k}={shlex.quote(v)} " for k, v in child.env_extra.items())
        script = self.run_dir / "cmds" / f"{child.name}.sh"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text("#!/bin/sh\n# re-run this process by hand (same environment as the launcher gave it)\n"
                          f"OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 {extra}exec " + shlex.join(child.cmd) + "\n")
        script.chmod(0o755)

    def _placement_extra(self, name: str, env: dict[str, str], placed: bool = True) -> dict[str, Any]:
        """What processes.json records about where a process runs (``gpus``: plan indices, only for
        processes the plan placed)."""
        out: dict[str, Any] = {"cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES", "")}
        if placed:
            out["gpus"] = self.plan.gpus_of(name)
        eng = next((e for e in self.plan.engines if e.name == name), None)
        if eng is not None:
            out.update(weight_transport_expected=eng.transport, memory_budget=eng.budget)
        return out

    def _forget_ports(self, name: str) -> None:
        """Remove a process's port file before it (re)starts: one left by an earlier life (a crashed
        process, or an earlier run in this run directory) must not be read as the new one's."""
        with contextlib.suppress(FileNotFoundError):
            port_file(self.run_dir, name).unlink()

    def _ready(self, child: Child, name: str) -> dict[str, Any]:
        try:
            if child.extra.get("health_url"):  # an SGLang server or router: ready when GET /health answers 200
                from producers.sglang_launch import wait_healthy

                wait_healthy(child.extra["health_url"], self.cfg.run.startup_timeout_s, child.name, child.alive)
                return {}
            return wait_for_file(port_file(self.run_dir, name), self.cfg.run.startup_timeout_s, f"{child.name}", child.alive)
        except (RuntimeError, TimeoutError) as e:  # the cause is in the child's log: show it
            raise type(e)(f"{e}{log_tail(child.log_path)}") from None

    def _write_processes(self) -> None:
        chosen = self._weight_transports()
        write_json_atomic(self.run_dir / "processes.json", [
            {"name": c.name, "role": c.role, "pid": c.proc.pid if c.proc else None, "cmd": c.cmd,
             "log": str(c.log_path), "metrics_url": c.metrics_url, **c.extra,
             **({"weight_transport": chosen[c.extra["url"]]} if c.extra.get("url") in chosen else {})}
            for c in self.children
        ])

    def _weight_transports(self) -> dict[str, str]:
        """The transport the trainer chose per engine URL, once it reported them in its port file
        (``weight_transports``); {} before."""
        info = _read_json(port_file(self.run_dir, "trainer"))
        got = info.get("weight_transports") if isinstance(info, dict) else None
        return {str(k).rstrip("/"): str(v) for k, v in got.items()} if isinstance(got, dict) else {}

    def _refresh_processes(self) -> None:
        """Rewrite processes.json when the trainer's port file changed (it adds the transports later)."""
        try:
            mtime = port_file(self.run_dir, "trainer").stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._trainer_ports_mtime:
            self._trainer_ports_mtime = mtime
            self._write_processes()

    # ------------------------------------------------------------------ start
    def start_all(self) -> None:
        cfg, rd, host = self.cfg, self.run_dir, self.cfg.metrics.host
        broker = self._spawn("broker", "broker", self._cli("broker", "--config", str(self.config_path), "--run-dir", str(rd)))
        ports = self._ready(broker, "broker")
        broker.metrics_url = f"http://{host}:{ports['metrics_port']}/metrics"
        # A restarted broker binds these same ports, so producers and the trainer reconnect by themselves.
        broker.cmd = [*broker.cmd, "--set", f"queue.producer_port={ports['producer_port']}", "--set", f"queue.trainer_port={ports['trainer_port']}",
                      "--metrics-port", str(ports["metrics_port"])]
        broker.extra |= {"producer_endpoint": f"tcp://{cfg.queue.host}:{ports['producer_port']}", "trainer_endpoint": f"tcp://{cfg.queue.host}:{ports['trainer_port']}"}

        engine_urls = list(cfg.producer.engine_urls)
        if cfg.run.mode == "train_only":  # no engines, no producers: the replayer sends the recording (pipeline/record.py)
            engine_urls = []
            replayer = self._spawn("replayer-0", "replayer", self._cli("replay", "--config", str(self.config_path), "--run-dir", str(rd),
                                                                    "--broker", broker.extra["producer_endpoint"]))
            self._ready(replayer, "replayer-0")
        elif cfg.producer.engine == "embedded":
            engines = []
            for i in range(cfg.producer.num_engines):
                cmd = self._cli("engine", "--model", cfg.model.path, "--host", host, "--port", "0",
                                "--port-file", str(port_file(rd, f"engine-{i}")), "--seed", str(cfg.run.seed + 1000 * i),
                                "--log-level", cfg.run.log_level, "--log-format", cfg.run.log_format)
                for key, value in to_dict(cfg.engine).items():
                    if key == "mem_fraction":  # as the placement resolved it (0 = auto: per device and neighbours)
                        value = self.plan.engines[i].mem_fraction if i < len(self.plan.engines) else value
                    cmd += ["--set", f"{key}={json.dumps(value)}"]
                # A resume: no sample with model.path's weights; the trainer sends the checkpoint's and continues it.
                cmd += ["--start-paused"] if self.resume is not None else []
                engines.append(self._spawn(f"engine-{i}", "engine", cmd))
            engine_urls = []
            for i, e in enumerate(engines):
                info = self._ready(e, f"engine-{i}")  # the engine writes its bare port number
                port = info["port"] if isinstance(info, dict) else int(info)
                url = f"http://{host}:{port}"
                e.metrics_url = f"{url}/metrics"
                e.extra["url"] = url
                e.cmd[e.cmd.index("--port") + 1] = str(port)  # a restarted engine comes back on it
                engine_urls.append(url)
        generate_urls = engine_urls
        if cfg.producer.engine == "sglang" and cfg.run.mode != "train_only":
            engine_urls, generate_urls = self._start_sglang(host)

        for p in range(cfg.producer.num_producers if cfg.run.mode != "train_only" else 0):
            mine = generate_urls[p::cfg.producer.num_producers] or generate_urls
            cmd = self._cli("produce", "--config", str(self.config_path), "--run-dir", str(rd), "--producer-id", f"producer-{p}",
                            "--broker", broker.extra["producer_endpoint"], *[a for u in mine for a in ("--engine-url", u)])
            child = self._spawn(f"producer-{p}", "producer", cmd)
            child.metrics_url = f"http://{host}:{self._ready(child, f'producer-{p}')['metrics_port']}/metrics"

        t = self.cfg.trainer
        nproc = t.tensor_parallel * t.pipeline_parallel * t.data_parallel
        args = ["record" if cfg.run.mode == "rollout_only" else "train", "--config", str(self.config_path), "--run-dir", str(rd), "--broker", broker.extra["trainer_endpoint"],
                *[a for u in engine_urls for a in ("--engine-url", u)]]
        if nproc > 1 or cfg.torchrun.nnodes > 1:  # torchrun: --standalone, or node rank 0 of torchrun.nnodes (pipeline/multinode.py)
            from pipeline.multinode import torchrun_command, write_node_script

            cmd = torchrun_command(cfg, nproc, args)
            write_node_script(cfg, rd, nproc, args)
        else:
            cmd = self._cli(*args)
        trainer = self._spawn("trainer", "trainer", cmd)
        port = self._ready(trainer, "trainer")["metrics_port"]
        trainer.metrics_url = f"http://{host}:{port}/metrics" if port else ""  # the rollout_only recorder serves none
        self._write_processes()

    def _start_sglang(self, host: str) -> tuple[list[str], list[str]]:
        """Start the SGLang servers (then the router, if any) and wait for /health; returns the
        servers' URLs (the trainer publishes to each) and the URLs producers generate with."""
        from producers.sglang_launch import plan

        metrics = bool(self.cfg.producer.sglang.get("enable_metrics"))
        started: dict[str, list[Child]] = {"server": [], "router": []}
        entries = plan(self.cfg, host)
        for role in ("server", "router"):  # the router starts once its workers answer /health
            for s in (s for s in entries if s["role"] == role):
                child = self._spawn(s["name"], "engine", s["argv"], env=s["env"])
                child.extra |= {"health_url": s["url"], "sglang": role}
                child.metrics_url = f"{s['url']}/metrics" if metrics and role == "server" else ""
                started[role].append(child)
            for child in started[role]:
                self._ready(child, child.name)
                log.info("%s ready at %s", child.name, child.extra["health_url"])
        servers = [c.extra["health_url"] for c in started["server"]]
        return servers, [c.extra["health_url"] for c in started["router"]] or servers

    # ------------------------------------------------------------------ supervise
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _restartable(self, child: Child) -> bool:
        """Brokers, producers and embedded engines always; the trainer only with checkpoints to resume from."""
        return (child.role in ("broker", "producer", "engine") or (child.role == "trainer" and self.cfg.trainer.checkpoint_every > 0)
                or bool(child.extra.get("sglang")))  # SGLang servers and the router (same port again)

    def restart(self, child: Child) -> bool:
        """Restart a crashed broker, producer or (with ``trainer.checkpoint_every``) trainer in place
        (bounded, with backoff). False: give up.  The trainer comes back with
        ``trainer.resume_from = "latest"``: it resumes from RUN_DIR/checkpoints (or starts fresh if
        none was written yet), rejoins the engines' weight group, publishes the checkpoint's weights
        and says hello; the broker then returns the dead trainer's leases to the queue."""
        n = self.restarts[child.name]
        if child.proc is not None and child.proc.returncode == 2:
            return False  # a config or plug-in error (cli exit 2): a restart would fail the same way
        if not self._restartable(child) or n >= self.cfg.run.max_restarts:
            if self._restartable(child):
                log.error("%s crashed again and was already restarted %d times (run.max_restarts): giving up", child.name, n)
            return False
        backoff = self.cfg.run.restart_backoff_s * 2**n
        log.warning("%s exited with code %s; restarting it in %.1fs (restart %d of at most %d); see %s",
                    child.name, child.proc.returncode if child.proc else None, backoff, n + 1, self.cfg.run.max_restarts, child.log_path)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and self._stop_reason is None:
            time.sleep(0.05)
        if self._stop_reason is not None:
            return True  # supervise() sees the stop request next
        child.close()
        self._forget_ports(child.name)
        if child.role == "producer":  # keep the dead incarnation's last counts: summary.json sums producer-*.json
            with contextlib.suppress(FileNotFoundError):
                stats_file(self.run_dir, child.name).rename(stats_file(self.run_dir, f"{child.name}.incarnation-{n}"))
        self.restarts[child.name] += 1
        self.restarts_by_role[child.role] += 1
        if child.role == "trainer" and "trainer.resume_from=\"latest\"" not in child.cmd:
            child.cmd = [*child.cmd, "--set", 'trainer.resume_from="latest"']
        if child.role == "engine" and not child.extra.get("sglang") and "--start-paused" not in child.cmd:
            # Same port, generation paused: it decodes nothing with the weights it loads from model.path
            # until the trainer re-created the weight group, sent the current version and continued it
            # (consumers/engine_rejoin.py; weights.resync_engines).
            child.cmd = [*child.cmd, "--start-paused"]
        self._write_script(child)
        child.start(self.env)
        info = self._ready(child, child.name)  # raises TimeoutError/RuntimeError if it cannot come up
        if child.role != "engine" and (info.get("metrics_port") or not child.extra.get("health_url")):  # engines keep their URL
            child.metrics_url = f"http://{self.cfg.metrics.host}:{info['metrics_port']}/metrics" if info.get("metrics_port") else ""
        self._write_processes()
        log.warning("%s restarted (pid %d)", child.name, child.proc.pid if child.proc else -1)
        return True

    def supervise(self, console: Console) -> int:
        trainer = next(c for c in self.children if c.role == "trainer")
        while True:
            console.poll()
            self._refresh_processes()
            if self._stop_reason is not None:
                log.warning("stopping: %s", self._stop_reason)
                return 130
            code = trainer.proc.poll() if trainer.proc else None
            if code is not None:
                console.poll()
                if code == 0:
                    return 0
                if self.restart(trainer):
                    continue
                why = "" if self._restartable(trainer) or code == 2 else " (not restarted: it resumes only from checkpoints, trainer.checkpoint_every = 0)"
                log.error("trainer exited with code %d; see %s%s%s%s", code, trainer.log_path, why, _fatal_line(trainer.log_path), log_tail(trainer.log_path))
                return 1
            for c in self.children:
                if c.role != "trainer" and not c.alive():
                    assert c.proc is not None
                    if self.restart(c):
                        continue
                    log.error("%s exited unexpectedly with code %s; see %s%s%s", c.name, c.proc.returncode, c.log_path, _fatal_line(c.log_path),
                              log_tail(c.log_path))
                    return 1
            time.sleep(0.2)

    def shutdown(self) -> None:
        """SIGTERM in dependency order (producers, trainer, broker, engines), then SIGKILL stragglers."""
        order = {"producer": 0, "replayer": 0, "trainer": 1, "broker": 2, "engine": 3}
        for c in sorted(self.children, key=lambda c: order[c.role]):
            if not c.alive():
                continue
            c.signal(signal.SIGTERM)
            if c.wait(self.cfg.run.shutdown_timeout_s) is None:
                log.warning("%s did not exit %.0fs after SIGTERM: killing it", c.name, self.cfg.run.shutdown_timeout_s)
                c.signal(signal.SIGKILL)
                c.wait(5)
        for c in self.children:
            c.close()

    def summary(self, exit_code: int, wall_s: float) -> dict[str, Any]:
        return write_summary(self.run_dir, exit_code, wall_s, self.restarts_by_role, self.resume)


def write_summary(rd: Path, exit_code: int, wall_s: float, restarts: collections.Counter[str], resume: Resume | None = None) -> dict[str, Any]:
    """Write RUN_DIR/summary.json: the account of every trajectory (the broker's counts, which a
    resumed broker recovered from the journal, so they cover every part of the run; ``generated``
    sums every producer stats file, the earlier parts' and the dead incarnations' included), steps,
    restarts per role and, for a resumed run, where it resumed from (``resume``)."""
    broker = _read_json(stats_file(rd, "broker"))
    producers = [_read_json(p) for p in sorted([*(rd / "stats").glob("producer-*.json"), *(rd / "stats").glob("replayer-*.json")])]
    steps = [json.loads(line) for line in (rd / "steps.jsonl").read_text().splitlines()] if (rd / "steps.jsonl").exists() else []
    dropped = broker.get("trajectories_dropped", {})
    accepted = broker.get("trajectories_accepted")
    out: dict[str, Any] = {
        "exit_code": exit_code,
        "wall_time_s": round(wall_s, 2),
        "steps_completed": len(steps),
        "final_policy_version": steps[-1]["policy_version"] if steps else 0,
        "trajectories": {
            "generated": sum(p.get("trajectories_generated", 0) for p in producers),
            "accepted": accepted,
            "consumed": broker.get("trajectories_consumed"),
            "dropped": dropped,
            "duplicates_rejected_groups": broker.get("groups_duplicate"),
            "still_queued": broker.get("trajectories_still_queued"),
            # Part of "consumed" (committed), kept for replay until a checkpoint covers their step:
            "retained": broker.get("trajectories_retained", 0),
            # Retained trajectories served again to a resumed trainer: not counted consumed again.
            "replayed": broker.get("trajectories_replayed", 0),
        },
        "rejected_messages": broker.get("rejected_messages", {}),
        "restarts": {role: restarts[role] for role in ("broker", "engine", "producer", "trainer")},
    }
    if resume is not None:
        out["resume"] = resume.to_json()
    tracking = _read_json(stats_file(rd, "tracking"))  # tracking.backend's counts (pipeline/tracking.py)
    if tracking:
        out["tracking"] = tracking
    if accepted is not None:
        out["trajectories"]["balanced"] = accepted == broker["trajectories_consumed"] + sum(dropped.values()) + broker["trajectories_still_queued"]
    if len(steps) >= 20:
        first = [s["reward_mean"] for s in steps[:10]]
        last = [s["reward_mean"] for s in steps[-10:]]
        out["reward_first10_mean"] = sum(first) / 10
        out["reward_last10_mean"] = sum(last) / 10
    write_json_atomic(rd / "summary.json", out)
    return out


def resolve_model_for_run(cfg: SlipstreamConfig) -> SlipstreamConfig:
    """``model.path`` as a local directory (a hub id is downloaded once here, see pipeline/hub.py);
    the children then read that snapshot offline.  Raises ConfigError naming model.path."""
    import dataclasses

    from pipeline.hub import resolve_model

    local = resolve_model(cfg.model.path, cfg.model.revision)
    if local == cfg.model.path:
        return cfg
    log.info("model.path %r resolved to %s; every process reads that snapshot offline", cfg.model.path, local)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=local, revision=""))


def _fatal_line(log_path: Path) -> str:
    """The child's last 'slipstream: ...' line (a config or plug-in error), to repeat in our message."""
    try:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines()[-200:] if ln.startswith("slipstream: ")]
    except OSError:
        return ""
    return f": {lines[-1]}" if lines else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class Console:
    """Progress bar + one line per step, from ``steps.jsonl`` as the trainer appends to it.

    Only steps of this launch are shown: lines already in the file when it starts (an earlier part
    of a resumed run) are skipped, also when the resumed trainer rewrites the file (it moves the
    lines after its checkpoint to ``steps.superseded.jsonl``).  The bar stands at the step of the
    newest line.  tokens/s is the step's tokens over its ``interval_s`` (the trainer's seconds since
    its previous step, start-up excluded), never a difference of two processes' clocks."""

    def __init__(self, path: Path, total: int, max_staleness: int, enabled: bool = True) -> None:
        from tqdm import tqdm

        self.path = path
        self.max_staleness = max_staleness
        self.offset = 0
        self._inode: int | None = None  # of the file last read (a rewrite replaces it)
        self.last_wall = 0.0
        self._earlier = set(path.read_text().splitlines()) if path.exists() else set()  # an earlier part's lines
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=not enabled, file=sys.stderr)
        # While the bar is drawn, the launcher's log lines go through tqdm.write: each on a line of
        # its own above the bar, not glued onto it.
        self._swapped: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []
        if enabled:
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr:
                    self._swapped.append((h, h.setStream(_BarStream(self.bar))))  # type: ignore[arg-type, func-returns-value]

    def poll(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        # A resumed trainer rewrites the file (superseded step lines moved aside, atomically: a new
        # inode) and then appends to it, so the size alone cannot tell: read it again from the start;
        # lines already shown are skipped.
        if st.st_ino != self._inode or st.st_size < self.offset:
            self._inode, self.offset = st.st_ino, 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # whole lines only: the trainer may be mid-write
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if line.strip() and line not in self._earlier:
                self._earlier.add(line)  # shown once, also if the file is rewritten again
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the file was swapped between stat and open: next poll rereads it
                    log.debug("console: skipped an unreadable line of %s: %.80s", self.path, line)
                    self._earlier.discard(line)
                    continue
                self._show(record)

    def line(self, s: dict[str, Any]) -> str:
        """The console line of step record ``s`` (and the clock it leaves for the next one)."""
        tps = tokens_per_second(s, self.last_wall)
        self.last_wall = float(s["wall_time_s"])
        return (f"step {s['step']:>4} | v{s['policy_version']:<4} | reward {s['reward_mean']:.3f} | "
                f"tokens/s {'-' if tps is None else f'{tps:.0f}':>7} | queue {s['queue_depth']:>3} | "
                f"staleness {s['staleness_mean']:.2f}/{s['staleness_max']} (max {self.max_staleness}) | "
                f"dropped {s['trajectories_dropped']}")

    def _show(self, s: dict[str, Any]) -> None:
        self.bar.write(self.line(s))
        self.bar.n = int(s["step"])
        self.bar.refresh()

    def close(self) -> None:
        for h, stream in self._swapped:
            h.setStream(stream)
        self._swapped.clear()
        self.bar.close()


def tokens_per_second(s: dict[str, Any], previous_wall: float) -> float | None:
    """Trained tokens per second of step record ``s``: over its ``interval_s`` (the trainer's own
    measure); for records without it (the rollout_only recorder's), over the growth of
    ``wall_time_s`` since the previous line shown, when it grew.  None when neither is known."""
    dt = s.get("interval_s")
    if dt is None:
        dt = float(s["wall_time_s"]) - previous_wall
    return s["tokens_trained"] / dt if dt > 0 else None


class _BarStream:
    """A text stream that writes whole lines with ``tqdm.write`` (above the progress bar)."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self.bar.write(line, file=sys.stderr)
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.bar.write(self._partial, file=sys.stderr)
            self._partial = ""


def run(cfg: SlipstreamConfig, run_dir: Path, source: Path | None, plan: Plan | None = None) -> int:
    plan = plan if plan is not None else plan_for(cfg)  # a bad placement fails before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    if source is not None and source.exists():
        (run_dir / "config.toml").write_text(source.read_text())
    write_json_atomic(run_dir / "placement.json", plan.to_json())
    log.info("%s", plan.format())
    preset = cfg.model.make_if_missing or ("tiny" if cfg.model.make_tiny_if_missing else "")
    if preset and not (Path(cfg.model.path) / "config.json").exists():
        from pipeline.presets import ensure_model

        log.info("making a random-initialised %s model at %s (model.make_if_missing; once)", preset, cfg.model.path)
        ensure_model(cfg.model.path, preset, seed=cfg.run.seed)
    cfg = resolve_model_for_run(cfg)  # a hub id -> its local snapshot, before any child starts
    write_json_atomic(run_dir / "config.json", to_dict(cfg))
    launcher = Launcher(cfg, run_dir, plan, prepare_run_dir(cfg, run_dir))  # keeps the journal of a resumed run
    previous = {s: signal.signal(s, lambda sig, _f: launcher.request_stop(f"received {signal.Signals(sig).name}")) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console(run_dir / "steps.jsonl", cfg.run.steps, cfg.queue.max_staleness, enabled=sys.stderr.isatty())
    t0 = time.monotonic()
    code = 1
    try:
        launcher.start_all()
        log.info("run directory: %s (processes.json lists every process and its metrics URL)", run_dir)
        code = launcher.supervise(console)
    except (TimeoutError, RuntimeError) as e:
        log.error("%s", e)
        code = 1
    finally:
        console.close()
        launcher.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    summary = launcher.summary(code, time.monotonic() - t0)
    log.info("summary: %s", json.dumps(summary))
    return code
