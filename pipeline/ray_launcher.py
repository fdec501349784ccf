"""``slipstream run`` with ``run.launcher = "ray"``: place every role of a run on a Ray cluster and supervise it there.

What: the driver joins the cluster (``ray.address``; '' starts a Ray instance here), reserves one
placement group with a bundle per process (broker, P producers, E engines with
``ray.gpus_per_engine`` GPUs each, and each trainer rank with ``ray.gpus_per_trainer_rank``),
placed by ``ray.placement_strategy`` (PACK, SPREAD, STRICT_*), and starts in each bundle a
:class:`pipeline.ray_actor.RoleProcess` actor that runs the role's ordinary command (the same
``python -m pipeline.cli ...`` the local launcher writes to ``cmds/NAME.sh``) bound to its node's
address.  Order as in the local launcher: broker -> engines -> producers -> trainer.  The trainer
ranks are one torch.distributed group: rank 0's actor picks a free port on its node and every rank
gets ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE`` from the driver (the rendezvous Ray gives them).

Addresses are published by Ray, not typed: each actor reports its node's address and its
process's port file, and the driver hands the broker's endpoints and the engines' URLs to the roles
that need them.  ``processes.json`` records each process's node id, node address, pid, GPUs,
command, log and metrics URL, so ``slipstream scrape-config`` and ``slipstream status`` work as for
a local run; ``RUN_DIR/ray/NAME.json`` is each actor's state (its command and incarnation).

Supervision, with today's rules:
- broker, producers and engines: Ray actor restarts (``max_restarts = run.max_restarts``).  A
  crashed process ends its actor, Ray restarts the actor (on its node, or where Ray re-placed the
  bundle of a dead node) and the actor runs the restart form of the command (pipeline/ray_actor.py).
  The broker recovers its queue from RUN_DIR/journal on the shared run directory; producers resend
  what was not acked.  When the broker or an engine comes back on another address (another node),
  the driver restarts the producers (and the trainer) with the new addresses, since those processes
  connect to the address they were started with.
- the trainer ranks: a torch.distributed group cannot take back one rank, so the driver restarts
  the whole group (fresh rendezvous, ``trainer.resume_from = "latest"``) when any rank dies or its
  node does, up to ``run.max_restarts`` times, only with ``trainer.checkpoint_every > 0``, as the
  local launcher does.  The broker replays the batches the dead trainer committed after its
  checkpoint (pipeline/queue.py).
Restarts are counted per role in summary.json (the same account as a local run).

Requirements: slipstream (and ``pip install slipstream[ray]``) on every node, and ``run_dir``
(with the model, unless ``model.path`` is on every node) on storage every node reaches.  Off
loopback the queue needs CURVE keys (``queue.curve_*``, files on the shared storage), as today.

Run: ``slipstream run examples/tiny/config.toml --set run.launcher='"ray"' --set ray.address='"HEAD:6379"'``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import SlipstreamConfig
from pipeline.configbase import ConfigError, to_dict
from pipeline.launcher import Console, Launcher, _fatal_line, child_env, resolve_model_for_run
from pipeline.placement import Plan, plan_for
from pipeline.preflight import log_tail
from pipeline.ray_actor import RoleProcess, read_state
from pipeline.resume import Resume, prepare_run_dir
from pipeline.rundir import port_file, write_json_atomic

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 10.0
#: variables of the driver's environment passed on to every process (the rest comes from its node)
PASSED_ENV_PREFIXES = ("NCCL_", "GLOO_", "SLIPSTREAM_", "PYTORCH_", "TORCH_")


class RunFailed(RuntimeError):
    """The run cannot go on; the message names the process and its log."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("run.launcher", "'ray' needs Ray: pip install 'slipstream[ray]'") from None
    return ray


def _py_cli(*args: str) -> list[str]:
    return ["{python}", "-m", "pipeline.cli", *args]


def actor_state(ray: Any, actor: Any) -> dict[str, Any]:
    """Ray's record of an actor (State, NumRestarts, DeathCause); {} where Ray cannot say."""
    try:
        from ray._private import state  # Ray's own actor table (the state API needs the dashboard)

        info = state.actors(actor_id=actor._actor_id.hex())
        return info if isinstance(info, dict) else {}
    except Exception:  # a private API: its absence must not fail the run
        return {}


class RayLauncher:
    def __init__(self, cfg: SlipstreamConfig, run_dir: Path, plan: Plan) -> None:
        self.ray = _import_ray()
        self.cfg, self.run_dir, self.plan = cfg, run_dir, plan
        self.resume: Resume | None = None  # set by run(): pipeline/resume.py
        self.config_path = run_dir / "config.json"
        self.names: list[str] = []  # every process, in start order
        self.roles: dict[str, str] = {}
        self.bundle: dict[str, int] = {}
        self.actors: dict[str, Any] = {}
        self.last: dict[str, dict[str, Any]] = {}  # last status of each process
        self.unreachable_since: dict[str, float] = {}
        self.metrics_url: dict[str, str] = {}
        self.extra: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        self.broker_endpoints: tuple[str, str] = ("", "")
        self.engine_urls: list[str] = []
        self.trainer_ranks: list[str] = []
        self.trainer_restarts = 0
        self.pg: Any = None
        self._stop_reason: str | None = None
        env = child_env(cfg)
        self.env = {k: v for k, v in env.items() if k not in os.environ or os.environ[k] != v or k.startswith(PASSED_ENV_PREFIXES)}

    # ------------------------------------------------------------------ cluster and placement
    def connect(self) -> None:
        connect_cluster(self.ray, self.cfg)

    def place(self) -> None:
        self.names, self.roles, self.trainer_ranks = roster(self.cfg)
        bundles = [role_bundle(self.cfg, self.roles[name]) for name in self.names]
        self.bundle = {name: i for i, name in enumerate(self.names)}
        self.pg = place_group(self.ray, self.cfg, f"{self.run_dir.name}/slipstream", self.names, bundles)

    def _actor(self, name: str, incarnation: int = 0) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        role, r, cfg = self.roles[name], self.cfg.ray, self.cfg
        gpus = r.gpus_per_engine if role == "engine" else r.gpus_per_trainer_rank if role == "trainer" else 0
        spec = {"name": name, "role": role, "run_dir": str(self.run_dir), "cwd": os.getcwd(),
                "restart_backoff_s": cfg.run.restart_backoff_s, "port_name": "trainer" if role == "trainer" else name,
                "restart_on_exit": role != "trainer"}
        cls = self.ray.remote(RoleProcess)
        actor = cls.options(
            name=f"{self.run_dir.name}/{name}" + (f"#{incarnation}" if incarnation else ""), num_cpus=r.num_cpus, num_gpus=gpus,
            max_restarts=0 if role == "trainer" else cfg.run.max_restarts, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.bundle[name]),
        ).remote(spec)
        self.actors[name] = actor
        return actor

    def _call(self, name: str, method: str, *args: Any, timeout_s: float) -> Any:
        try:
            return self.ray.get(getattr(self.actors[name], method).remote(*args), timeout=timeout_s)
        except self.ray.exceptions.RayTaskError as e:  # the method raised: show its cause and the process's log
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise RunFailed(f"{name}: {cause}{log_tail(self._log(name))}") from None

    def _log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ start
    def start_all(self) -> None:
        cfg, rd = self.cfg, self.run_dir  # run() kept (a resume in this run dir) or moved aside the journal: pipeline/resume.py
        here = ["--set", "queue.host='{node_ip}'", "--set", "metrics.host='{node_ip}'"]  # bind this node's address
        common = ["--config", str(self.config_path), "--run-dir", str(rd), *here]
        timeout = cfg.run.startup_timeout_s
        for name in self.names:
            self._actor(name)

        st = self._start("broker", _py_cli("broker", *common), {})
        self._broker_ready(st)
        ports = st["ports"]
        self._call("broker", "set_cmd", [*_py_cli("broker", *common), "--set", f"queue.producer_port={ports['producer_port']}",
                                        "--set", f"queue.trainer_port={ports['trainer_port']}", "--metrics-port", str(ports["metrics_port"])],
                   timeout_s=STATUS_TIMEOUT_S)

        engines = [n for n in self.names if self.roles[n] == "engine"]
        for i, name in enumerate(engines):
            cmd = _py_cli("engine", "--model", cfg.model.path, "--host", "{node_ip}", "--port", "0", "--port-file", str(port_file(rd, name)),
                          "--seed", str(cfg.run.seed + 1000 * i), "--log-level", cfg.run.log_level, "--log-format", cfg.run.log_format)
            for key, value in to_dict(cfg.engine).items():
                cmd += ["--set", f"{key}={json.dumps(value)}"]
            cmd += ["--start-paused"] if self.resume is not None else []  # a resume: the trainer sends the checkpoint's weights first
            self._call(name, "start", cmd, {}, 0, timeout_s=timeout)
        for name in engines:
            st = self._call(name, "wait_ready", timeout, timeout_s=timeout + STATUS_TIMEOUT_S)
            self._engine_ready(name, st)
            fixed = list(st["cmd"])
            fixed[fixed.index("--port") + 1] = str(self.extra[name]["port"])
            fixed[0], fixed[fixed.index("--host") + 1] = "{python}", "{node_ip}"
            self._call(name, "set_cmd", fixed, timeout_s=STATUS_TIMEOUT_S)
        self.engine_urls = [self.extra[n]["url"] for n in engines] or list(cfg.producer.engine_urls)

        for name in (n for n in self.names if self.roles[n] == "producer"):
            st = self._start(name, self._producer_cmd(name), {})
            self._metrics_from(name, st)
        self._start_trainer(0)
        self.write_processes()

    def _start(self, name: str, cmd: list[str], env: dict[str, str], incarnation: int = 0) -> dict[str, Any]:
        timeout = self.cfg.run.startup_timeout_s
        self._call(name, "start", cmd, {**self.env, **env}, incarnation, timeout_s=timeout)
        st = self._call(name, "wait_ready", timeout, timeout_s=timeout + STATUS_TIMEOUT_S)
        self.last[name] = st
        log.info("%s started on node %s (%s), pid %s", name, st["node_id"][:12], st["node_ip"], st["pid"])
        return st

    def _broker_ready(self, st: dict[str, Any]) -> None:
        ip, ports = st["node_ip"], st["ports"]
        self.broker_endpoints = (f"tcp://{ip}:{ports['producer_port']}", f"tcp://{ip}:{ports['trainer_port']}")
        self.metrics_url["broker"] = f"http://{ip}:{ports['metrics_port']}/metrics"
        self.extra["broker"] |= {"producer_endpoint": self.broker_endpoints[0], "trainer_endpoint": self.broker_endpoints[1]}
        self.last["broker"] = st

    def _engine_ready(self, name: str, st: dict[str, Any]) -> None:
        port = st["ports"]["port"] if isinstance(st["ports"], dict) else int(st["ports"])
        url = f"http://{st['node_ip']}:{port}"
        self.extra[name] |= {"url": url, "port": port}
        self.metrics_url[name] = f"{url}/metrics"
        self.last[name] = st

    def _metrics_from(self, name: str, st: dict[str, Any]) -> None:
        port = st["ports"].get("metrics_port") if isinstance(st["ports"], dict) else None
        self.metrics_url[name] = f"http://{st['node_ip']}:{port}/metrics" if port else ""

    def _producer_cmd(self, name: str) -> list[str]:
        n = self.cfg.producer.num_producers
        p = int(name.rsplit("-", 1)[1])
        mine = self.engine_urls[p::n] or self.engine_urls
        return _py_cli("produce", "--config", str(self.config_path), "--run-dir", str(self.run_dir), "--producer-id", name,
                       "--broker", self.broker_endpoints[0], *[a for u in mine for a in ("--engine-url", u)],
                       "--set", "queue.host='{node_ip}'", "--set", "metrics.host='{node_ip}'")

    def _start_trainer(self, incarnation: int) -> None:
        """Start every trainer rank as one torch.distributed group (rendezvous at rank 0's node)."""
        cfg = self.cfg
        verb = "record" if cfg.run.mode == "rollout_only" else "train"
        cmd = _py_cli(verb, "--config", str(self.config_path), "--run-dir", str(self.run_dir), "--broker", self.broker_endpoints[1],
                      *[a for u in self.engine_urls for a in ("--engine-url", u)],
                      "--set", "queue.host='{node_ip}'", "--set", "metrics.host='{node_ip}'")
        if incarnation:
            cmd += ["--set", 'trainer.resume_from="latest"']
        if incarnation:
            for name in self.trainer_ranks:
                self._actor(name, incarnation)
        world = len(self.trainer_ranks)
        env: dict[str, str] = {}
        if world > 1:
            master = self._call("trainer", "node", timeout_s=self.cfg.run.startup_timeout_s)["node_ip"]
            env = {"MASTER_ADDR": master, "MASTER_PORT": str(self._call("trainer", "free_port", timeout_s=STATUS_TIMEOUT_S)),
                   "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        for rank, name in reversed(list(enumerate(self.trainer_ranks))):  # rank 0 last: it writes the port file
            rank_env = {**self.env, **env, **({"RANK": str(rank), "GROUP_RANK": str(rank)} if world > 1 else {})}
            self._call(name, "start", cmd, rank_env, incarnation, timeout_s=cfg.run.startup_timeout_s)
        st = self._call("trainer", "wait_ready", cfg.run.startup_timeout_s, timeout_s=cfg.run.startup_timeout_s + STATUS_TIMEOUT_S)
        self._metrics_from("trainer", st)
        for name in self.trainer_ranks:
            self.last[name] = self._call(name, "status", timeout_s=STATUS_TIMEOUT_S)
        log.info("trainer (%d rank%s) started: rank 0 on node %s (%s)", world, "s" if world > 1 else "", st["node_id"][:12], st["node_ip"])

    def write_processes(self) -> None:
        write_json_atomic(self.run_dir / "processes.json", [self._row(name) for name in self.names])

    def _row(self, name: str) -> dict[str, Any]:
        st = self.last.get(name, {})
        return {"name": name, "role": self.roles[name], "launcher": "ray", "pid": st.get("pid"), "node_id": st.get("node_id", ""),
                "node_ip": st.get("node_ip", ""), "gpus": st.get("gpus", []), "cuda_visible_devices": st.get("cuda_visible_devices", ""),
                "cmd": st.get("cmd", []), "log": str(self._log(name)), "metrics_url": self.metrics_url.get(name, ""),
                "incarnation": st.get("incarnation", 0), "ray_actor": f"{self.cfg.ray.namespace}/{self.run_dir.name}/{name}",
                "placement_bundle": self.bundle[name], **{k: v for k, v in self.extra[name].items() if k != "port"}}

    # ------------------------------------------------------------------ supervise
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _poll(self, name: str) -> dict[str, Any] | None:
        """The process's status; None while its actor is unreachable (Ray restarting it); raises
        RunFailed when Ray gave up on it or it stayed unreachable too long."""
        try:
            st = self._call(name, "status", timeout_s=STATUS_TIMEOUT_S)
            self.unreachable_since.pop(name, None)
            return st
        except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError) as e:
            info = actor_state(self.ray, self.actors[name])
            if info.get("State") == "DEAD" and self.roles[name] != "trainer":
                raise RunFailed(f"{name} died and Ray gave up on it after {info.get('NumRestarts', '?')} restarts (run.max_restarts = "
                                f"{self.cfg.run.max_restarts}): {str(info.get('DeathCause', e))[:400]}{_fatal_line(self._log(name))}"
                                f"{log_tail(self._log(name))}") from None
            if self.roles[name] == "trainer" and isinstance(e, self.ray.exceptions.RayActorError):
                return {"code": None, "dead": True}
            since = self.unreachable_since.setdefault(name, time.monotonic())
            if time.monotonic() - since > self.cfg.ray.unreachable_timeout_s:
                raise RunFailed(f"{name}'s actor was unreachable for {self.cfg.ray.unreachable_timeout_s:.0f}s "
                                f"(ray.unreachable_timeout_s; Ray state {info.get('State', '?')}): {e}{log_tail(self._log(name))}") from None
            return None

    def _check_role(self, name: str) -> None:
        st = self._poll(name)
        if st is None:
            return
        if st["code"] == 2:
            raise RunFailed(f"{name} exited with code 2 (a config or plug-in error){_fatal_line(self._log(name))}{log_tail(self._log(name))}")
        old = self.last.get(name, {})
        if st["incarnation"] == old.get("incarnation") and st["pid"] == old.get("pid"):
            return
        if st["ports"] is None:
            return  # restarted, not ready yet: look again next round
        self.last[name] = st
        log.warning("%s restarted by Ray: incarnation %d on node %s (%s), pid %s", name, st["incarnation"], st["node_id"][:12], st["node_ip"], st["pid"])
        if self.roles[name] == "broker":
            before = self.broker_endpoints
            self._broker_ready(st)
            if before != self.broker_endpoints:
                log.warning("the broker moved from %s to %s: restarting the producers and the trainer with its new address", before[0], self.broker_endpoints[0])
                self._follow_moved_service("the broker")
        elif self.roles[name] == "engine":
            before = self.extra[name].get("url")
            self._engine_ready(name, st)
            if before != self.extra[name]["url"]:
                self.engine_urls = [self.extra[n]["url"] for n in self.names if self.roles[n] == "engine"]
                self._follow_moved_service(f"{name} (now {self.extra[name]['url']})")
        else:
            self._metrics_from(name, st)
        self.write_processes()

    def _follow_moved_service(self, what: str) -> None:
        for name in (n for n in self.names if self.roles[n] == "producer"):
            st = self._call(name, "respawn", self._producer_cmd(name), self.cfg.run.shutdown_timeout_s, timeout_s=self.cfg.run.startup_timeout_s)
            self.last[name] = self._call(name, "wait_ready", self.cfg.run.startup_timeout_s,
                                         timeout_s=self.cfg.run.startup_timeout_s + STATUS_TIMEOUT_S) or st
            self._metrics_from(name, self.last[name])
        self._restart_trainer(f"{what} moved to another node")

    def _restart_trainer(self, why: str) -> None:
        cfg = self.cfg
        if cfg.trainer.checkpoint_every <= 0:
            raise RunFailed(f"the trainer must restart ({why}) but resumes only from checkpoints: set trainer.checkpoint_every > 0"
                            f"{log_tail(self._log('trainer'))}")
        if self.trainer_restarts >= cfg.run.max_restarts:
            raise RunFailed(f"the trainer must restart ({why}) and was already restarted {self.trainer_restarts} times (run.max_restarts)"
                            f"{_fatal_line(self._log('trainer'))}{log_tail(self._log('trainer'))}")
        backoff = cfg.run.restart_backoff_s * 2**self.trainer_restarts
        log.warning("%s; restarting the trainer group (%d rank(s)) in %.1fs with trainer.resume_from = 'latest' (restart %d of at most %d)",
                    why, len(self.trainer_ranks), backoff, self.trainer_restarts + 1, cfg.run.max_restarts)
        self._stop_trainer()
        time.sleep(backoff)
        self.trainer_restarts += 1
        self._start_trainer(self.trainer_restarts)
        self.write_processes()

    def _stop_trainer(self) -> None:
        for name in self.trainer_ranks:
            with contextlib.suppress(Exception):
                self._call(name, "stop", self.cfg.run.shutdown_timeout_s, timeout_s=self.cfg.run.shutdown_timeout_s + STATUS_TIMEOUT_S)
            with contextlib.suppress(Exception):
                self.ray.kill(self.actors[name], no_restart=True)

    def _trainer_done(self) -> int | None:
        """0 when the trainer finished, None while it runs; restarts the group when a rank died."""
        finished, fatal, failed = trainer_verdict(self.trainer_ranks, [self._poll(name) for name in self.trainer_ranks])
        if fatal:
            raise RunFailed(f"{fatal} exited with code 2 (a config or plug-in error){_fatal_line(self._log(fatal))}{log_tail(self._log(fatal))}")
        if failed:
            self._restart_trainer(f"trainer rank {failed}")
        return 0 if finished else None

    def supervise(self, console: Console) -> int:
        while True:
            console.poll()
            if self._stop_reason is not None:
                log.warning("stopping: %s", self._stop_reason)
                return 130
            if self._trainer_done() == 0:
                console.poll()
                return 0
            for name in self.names:
                if self.roles[name] != "trainer":
                    self._check_role(name)
            time.sleep(0.5)

    def shutdown(self) -> None:
        """Stop the processes in dependency order (producers, trainer, broker, engines), then the actors and the placement group."""
        order = {"producer": 0, "trainer": 1, "broker": 2, "engine": 3}
        grace = self.cfg.run.shutdown_timeout_s
        for name in sorted(self.actors, key=lambda n: order[self.roles[n]]):
            with contextlib.suppress(Exception):
                self._call(name, "stop", grace, timeout_s=grace + STATUS_TIMEOUT_S)
        for actor in self.actors.values():
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(self.pg)
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def restarts_by_role(launcher: RayLauncher) -> collections.Counter[str]:
    """Restarts per role for summary.json: each actor's incarnation, and the trainer group's restarts."""
    out: collections.Counter[str] = collections.Counter()
    for name in launcher.names:
        if launcher.roles[name] != "trainer":
            out[launcher.roles[name]] += int(read_state(launcher.run_dir, name).get("incarnation", 0))
    out["trainer"] = launcher.trainer_restarts
    return out


def trainer_verdict(ranks: list[str], statuses: list[dict[str, Any] | None]) -> tuple[bool, str | None, str]:
    """From each trainer rank's status (None: unreachable for now): whether the trainer finished,
    the rank that exited with 2 (a config or plug-in error: fatal), and the ranks that failed (to
    restart the group), in words ('' if none)."""
    codes = [None if st is None else st["code"] for st in statuses]
    dead = [n for n, st in zip(ranks, statuses, strict=True) if st is not None and st.get("dead")]
    if codes[0] == 0 and not dead:
        return True, None, ""
    if 2 in codes:
        return False, ranks[codes.index(2)], ""
    failed = dead + [n for n, c in zip(ranks, codes, strict=True) if c not in (None, 0) and n not in dead]
    return False, None, ", ".join(f"{n} ({'its actor or node died' if n in dead else f'exit code {codes[ranks.index(n)]}'})" for n in failed)


def connect_cluster(ray: Any, cfg: SlipstreamConfig) -> None:
    """Join ``ray.address`` (or start a local Ray without its dashboard)."""
    r = cfg.ray
    kwargs: dict[str, Any] = {"namespace": r.namespace, "log_to_driver": False, "logging_level": logging.WARNING}
    if r.address:
        kwargs["address"] = r.address
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    log.info("joined Ray cluster %s: %d node(s), resources %s", r.address or "(local)", len(nodes), ray.cluster_resources())


def roster(cfg: SlipstreamConfig) -> tuple[list[str], dict[str, str], list[str]]:
    """Every process of the run in start order, its role, and the trainer ranks' names."""
    t = cfg.trainer
    roles = {"broker": "broker"}
    if cfg.producer.engine == "embedded" and cfg.run.mode != "train_only":
        roles.update({f"engine-{i}": "engine" for i in range(cfg.producer.num_engines)})
    roles.update({f"producer-{p}": "producer" for p in range(cfg.producer.num_producers)})
    ranks = ["trainer", *[f"trainer-rank-{k}" for k in range(1, t.tensor_parallel * t.pipeline_parallel * t.data_parallel)]]
    roles.update({name: "trainer" for name in ranks})
    return list(roles), roles, ranks


def role_bundle(cfg: SlipstreamConfig, role: str) -> dict[str, float]:
    """One placement-group bundle: ray.num_cpus, plus the GPUs of an engine or a trainer rank."""
    r = cfg.ray
    gpus = r.gpus_per_engine if role == "engine" else r.gpus_per_trainer_rank if role == "trainer" else 0
    return {"CPU": r.num_cpus, **({"GPU": float(gpus)} if gpus else {})}


def place_group(ray: Any, cfg: SlipstreamConfig, name: str, names: list[str], bundles: list[dict[str, float]]) -> Any:
    """Create the placement group and wait for it (ray.placement_timeout_s), naming what is missing."""
    from ray.util.placement_group import placement_group

    r = cfg.ray
    pg = placement_group(bundles, strategy=r.placement_strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=r.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RunFailed(
            f"the placement group of {len(bundles)} bundles ({', '.join(f'{n}: {b}' for n, b in zip(names, bundles, strict=True))}; "
            f"strategy {r.placement_strategy}) was not placed within {r.placement_timeout_s:.0f}s (ray.placement_timeout_s): "
            f"the cluster has {ray.cluster_resources()} in all, {ray.available_resources()} free; lower ray.num_cpus "
            "or ray.gpus_per_*, or add nodes") from None
    return pg


def _absolute_paths(cfg: SlipstreamConfig) -> SlipstreamConfig:
    """Paths in the config made absolute: the processes run in other working directories, on other nodes."""
    import dataclasses

    path = Path(cfg.model.path)
    if path.exists() and not path.is_absolute():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path.resolve())))
    return cfg


def run_ray(cfg: SlipstreamConfig, run_dir: Path, source: Path | None, plan: Plan | None = None) -> int:
    """``slipstream run`` with ``run.launcher = "ray"`` (the local launcher's prelude, then Ray)."""
    plan = plan if plan is not None else plan_for(cfg)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if source is not None and source.exists():
        (run_dir / "config.toml").write_text(source.read_text())
    write_json_atomic(run_dir / "placement.json", {**plan.to_json(), "launcher": "ray", "note": "Ray assigns GPUs per bundle (ray.gpus_per_*)"})
    preset = cfg.model.make_if_missing or ("tiny" if cfg.model.make_tiny_if_missing else "")
    if preset and not (Path(cfg.model.path) / "config.json").exists():
        from pipeline.presets import ensure_model

        log.info("making a random-initialised %s model at %s (model.make_if_missing; once)", preset, cfg.model.path)
        ensure_model(cfg.model.path, preset, seed=cfg.run.seed)
    cfg = _absolute_paths(resolve_model_for_run(cfg))
    write_json_atomic(run_dir / "config.json", to_dict(cfg))
    launcher = RayLauncher(cfg, run_dir, plan)
    launcher.resume = prepare_run_dir(cfg, run_dir)  # keeps the journal of a run resumed in this directory
    accounts = Launcher(cfg, run_dir, plan, launcher.resume)  # the local launcher's summary (same account, same file)
    previous = {s: signal.signal(s, lambda sig, _f: launcher.request_stop(f"received {signal.Signals(sig).name}")) for s in (signal.SIGINT, signal.SIGTERM)}
    console = Console(run_dir / "steps.jsonl", cfg.run.steps, cfg.queue.max_staleness, enabled=sys.stderr.isatty())
    t0 = time.monotonic()
    code = 1
    try:
        launcher.connect()
        launcher.place()
        launcher.start_all()
        log.info("run directory: %s (processes.json lists every process, its node and its metrics URL)", run_dir)
        code = launcher.supervise(console)
    except (RunFailed, TimeoutError, RuntimeError) as e:
        log.error("%s", e)
        code = 1
    finally:
        console.close()
        with contextlib.suppress(Exception):
            launcher.write_processes()
        restarts = restarts_by_role(launcher) if launcher.names else collections.Counter()
        launcher.shutdown()
        for s, h in previous.items():
            signal.signal(s, h)
    accounts.restarts_by_role = restarts
    summary = accounts.summary(code, time.monotonic() - t0)
    log.info("summary: %s", json.dumps(summary))
    return code
