"""``run.launcher = "ray"`` on a real multi-node Ray cluster made on this machine, and node deaths.

The cluster (one per module, shared): ``ray.cluster_utils.Cluster`` with a head node that holds no
CPUs (the driver's) and six worker nodes of one Ray CPU each, each on its own loopback address
(127.0.0.2 ...), so that a process's address says which node it is on and a process restarted on
another node comes back on another address.  With ``ray.num_cpus = 1`` and SPREAD every process
(broker, engine, producer, one or two trainer ranks) gets a node of its own and one node or more is spare.  A test that kills
a node (``remove_node(allow_graceful=False)``: its raylet and workers die, and with them the role's
process) adds a replacement, so the next test finds a spare again.

Every run is audited as tests/test_faults.py does: each acked trajectory id consumed exactly once,
dropped, or still queued; none reaches the trainer twice; the summary balances and counts restarts.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from pipeline.configbase import ConfigError
from pipeline.journal import replay, scan
from pipeline.multinode import reexec_argv, torchrun_command, write_node_script
from pipeline.ray_actor import fill, restart_form
from tests.helpers import REPO, env, slipstream
from tests.test_faults import _logs, _wait_steps

TINY = REPO / "examples" / "tiny" / "config.toml"
NO_PUBLIC_IP = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray then keeps 127.0.0.1 as it is (no host address)


class LocalCluster:
    """A Ray cluster of several nodes on this machine, each node on its own loopback address."""

    def __init__(self, workers: int) -> None:
        from ray.cluster_utils import Cluster

        self.next_ip = 2
        # Quick node-death detection: a dead raylet is declared dead after ~2 s instead of ~30 s.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
        for _ in range(workers):
            self.add()
        self.cluster.wait_for_nodes()

    def add(self) -> None:
        self.cluster.add_node(num_cpus=1, node_ip_address=f"127.0.0.{self.next_ip}")
        self.next_ip += 1

    def kill_node(self, ip: str) -> None:
        """The node at ``ip`` dies at once; a replacement node joins (the next spare)."""
        node = next(n for n in self.cluster.worker_nodes if n.node_ip_address == ip)
        self.cluster.remove_node(node, allow_graceful=False)
        self.add()


def _audit(run_dir: Path) -> dict[str, Any]:
    """tests/test_faults.py's audit, with one interleaving a dying broker adds: the broker journaled a
    step's commit, then died before its ack reached the trainer.  That trainer never wrote the step's
    consumed.jsonl lines (it writes them on the ack) and was restarted from an older checkpoint; the
    recovered broker replayed the retained batch to the resumed trainer, which trained it at that step.
    Such a batch is consumed once, and its only lines are the replay's ("replay": true)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    t = summary["trajectories"]
    assert t["balanced"] is True, t
    acked: dict[tuple[str, int, int], list[str]] = {}
    for path in (run_dir / "acked").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            a = json.loads(line)
            acked[(path.stem, a["epoch"], a["seq"])] = a["trajectory_ids"]
    lines = [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    first = [c["trajectory_id"] for c in lines if not c.get("replay")]
    assert len(first) == len(set(first)), "a trajectory reached the trainer twice (outside a replay)"
    first_step = {c["trajectory_id"]: c["step"] for c in lines if not c.get("replay")}
    replayed = [c for c in lines if c.get("replay")]
    assert len(replayed) == t["replayed"], (len(replayed), t)
    assert all(first_step.get(c["trajectory_id"], c["step"]) == c["step"] for c in replayed), "a replay trained a trajectory at another step"
    replay_only = {c["trajectory_id"] for c in replayed} - set(first)
    consumed = set(first) | replay_only
    assert len(consumed) == t["consumed"], (len(first), len(replay_only), t)
    state = replay(run_dir / "journal", truncate_torn_tail=False)
    queued = {tid.trajectory_id for g in state.groups for tid in g.trajectories}
    assert len(queued) == t["still_queued"], (len(queued), t)
    assert not queued & consumed, "a trajectory is both consumed and still queued"
    dropped_keys = {tuple(k) for _, kind, p in scan(run_dir / "journal") if kind == "dropped" for k, _ in p["groups"]}
    dropped = {tid for key, ids in acked.items() if key in dropped_keys for tid in ids}
    lost = {tid for ids in acked.values() for tid in ids} - consumed - queued - dropped
    assert not lost, f"{len(lost)} acked trajectories were lost, e.g. {sorted(lost)[:5]}"
    assert acked, "no acked trajectories were recorded"
    return summary


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in NO_PUBLIC_IP.items():
            mp.setenv(k, v)
        c = LocalCluster(workers=6)
        try:
            yield c
        finally:
            c.cluster.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-model") / "tiny-qwen3"


@contextlib.contextmanager
def _run(cluster: LocalCluster, model: Path, tmp_path: Path, steps: int, *sets: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    run_dir = tmp_path / "run"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{model}'", "--set", f"run.steps={steps}",
            "--set", "run.restart_backoff_s=0.2", "--set", "run.verify_weights=false", "--set", 'run.launcher="ray"',
            "--set", f"ray.address='{cluster.cluster.address}'", "--set", 'ray.placement_strategy="SPREAD"',
            *[a for kv in sets for a in ("--set", kv)]]
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen(slipstream(*args), stdout=log, stderr=subprocess.STDOUT, env={**env(), **NO_PUBLIC_IP}, cwd=tmp_path)
    try:
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            proc.wait(timeout=90)


def _procs(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in json.loads((run_dir / "processes.json").read_text())}


def _wait_moved(proc: subprocess.Popen[bytes], run_dir: Path, name: str, old_ip: str, tmp_path: Path, timeout_s: float = 150) -> dict[str, Any]:
    """Wait until processes.json shows ``name`` running on another node than ``old_ip``."""
    deadline = time.monotonic() + timeout_s
    while (p := _procs(run_dir)[name])["node_ip"] == old_ip:
        assert proc.poll() is None, _logs(tmp_path)
        assert time.monotonic() < deadline, f"{name} was not restarted on another node within {timeout_s}s\n{_logs(tmp_path)}"
        time.sleep(0.2)
    return p


@pytest.mark.slow
def test_ray_run_spreads_learns_and_survives_the_producer_node(cluster: LocalCluster, model_dir: Path, tmp_path: Path) -> None:
    """Roles on four nodes; the producer's node dies mid-run: Ray restarts the producer on the spare
    node, it resends what was not acked, and the run finishes with 0 lost, 0 duplicated, and learns."""
    with _run(cluster, model_dir, tmp_path, 30) as (proc, run_dir):
        _wait_steps(proc, run_dir, 5, tmp_path, timeout_s=180)
        before = _procs(run_dir)
        assert len({p["node_id"] for p in before.values()}) == 4, before  # one node per role
        assert all(p["metrics_url"].startswith(f"http://{p['node_ip']}:") for p in before.values())
        ip = before["producer-0"]["node_ip"]
        cluster.kill_node(ip)
        moved = _wait_moved(proc, run_dir, "producer-0", ip, tmp_path)
        assert proc.wait(timeout=300) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"] == {"broker": 0, "engine": 0, "producer": 1, "trainer": 0}, summary["restarts"]
    assert summary["steps_completed"] == 30
    assert summary["reward_last10_mean"] > summary["reward_first10_mean"], summary
    after = _procs(run_dir)
    assert after["producer-0"]["incarnation"] == 1 and moved["pid"] != before["producer-0"]["pid"]
    # The broker's address reached the producer through Ray (the broker's node address, not typed in config):
    assert after["broker"]["producer_endpoint"].startswith(f"tcp://{after['broker']['node_ip']}:")
    assert after["broker"]["producer_endpoint"] in after["producer-0"]["cmd"]
    assert (run_dir / "stats" / "producer-0.incarnation-0.json").exists(), "the dead producer's last counts are kept"
    # slipstream scrape-config: one target per process, at its node's address
    out = subprocess.run(slipstream("scrape-config", str(run_dir)), env=env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    prom = yaml.safe_load((run_dir / "prometheus.yml").read_text())
    targets = {t["labels"]["process"]: t["targets"][0] for job in prom["scrape_configs"] for t in job["static_configs"]}
    assert targets == {n: p["metrics_url"].split("/")[2] for n, p in after.items()}


@pytest.mark.slow
def test_ray_trainer_node_dies_and_the_trainer_resumes_from_its_checkpoint(cluster: LocalCluster, model_dir: Path, tmp_path: Path) -> None:
    """Two trainer ranks (DP 2, one torch.distributed group over two nodes); rank 0's node dies: the
    driver restarts both ranks as a new group (fresh rendezvous) from the last checkpoint."""
    steps = 10
    with _run(cluster, model_dir, tmp_path, steps, "trainer.checkpoint_every=3", "trainer.data_parallel=2") as (proc, run_dir):
        _wait_steps(proc, run_dir, 4, tmp_path, timeout_s=180, poll_s=0.05)
        before = _procs(run_dir)
        assert before["trainer"]["node_id"] != before["trainer-rank-1"]["node_id"], "the two ranks on two nodes"
        ip = before["trainer"]["node_ip"]
        cluster.kill_node(ip)
        _wait_moved(proc, run_dir, "trainer", ip, tmp_path)
        assert proc.wait(timeout=300) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"] == {"broker": 0, "engine": 0, "producer": 0, "trainer": 1}, summary["restarts"]
    after = _procs(run_dir)
    assert after["trainer"]["incarnation"] == after["trainer-rank-1"]["incarnation"] == 1, "the whole group restarted"
    assert "rank 1/2" in (run_dir / "logs" / "trainer-rank-1.log").read_text()
    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "one line per step, the resumed steps continuing"
    assert "resum" in (run_dir / "logs" / "trainer.log").read_text().lower()


@pytest.mark.slow
def test_ray_broker_node_dies_and_the_broker_recovers_from_the_journal(cluster: LocalCluster, model_dir: Path, tmp_path: Path) -> None:
    """The broker comes back on another node (another address) and recovers its queue from the
    journal on the shared run directory; the producers and the trainer follow it to its new address."""
    steps = 12
    with _run(cluster, model_dir, tmp_path, steps, "trainer.checkpoint_every=3") as (proc, run_dir):
        _wait_steps(proc, run_dir, 4, tmp_path, timeout_s=180)
        before = _procs(run_dir)["broker"]
        cluster.kill_node(before["node_ip"])
        after = _wait_moved(proc, run_dir, "broker", before["node_ip"], tmp_path)
        assert proc.wait(timeout=300) == 0, _logs(tmp_path)
    summary = _audit(run_dir)
    assert summary["restarts"]["broker"] == 1 and summary["steps_completed"] == steps, summary
    assert summary["restarts"]["producer"] == 1 and summary["restarts"]["trainer"] == 1, summary["restarts"]
    assert after["producer_endpoint"] != before["producer_endpoint"]
    procs = _procs(run_dir)
    assert procs["broker"]["producer_endpoint"] in procs["producer-0"]["cmd"]
    assert procs["broker"]["trainer_endpoint"] in procs["trainer"]["cmd"]
    assert (run_dir / "logs" / "broker.log").read_text().count("recovered from the journal") == 1


@pytest.mark.slow
def test_ray_placement_that_cannot_fit_fails_naming_the_key(cluster: LocalCluster, model_dir: Path, tmp_path: Path) -> None:
    with _run(cluster, model_dir, tmp_path, 5, "ray.num_cpus=2", "ray.placement_timeout_s=2") as (proc, _run_dir):
        assert proc.wait(timeout=120) == 1
    text = (tmp_path / "launcher.log").read_text()
    assert "was not placed within 2s (ray.placement_timeout_s)" in text and "lower ray.num_cpus" in text, text[-2000:]


# --------------------------------------------------------------------------- fast: no cluster
def test_restart_forms_are_the_local_launchers() -> None:
    assert restart_form("trainer", ["x"])[-2:] == ["--set", 'trainer.resume_from="latest"']
    assert restart_form("trainer", restart_form("trainer", ["x"])) == restart_form("trainer", ["x"]), "added once"
    assert restart_form("engine", ["x"]) == ["x", "--start-paused"]
    assert restart_form("broker", ["x"]) == ["x"]
    assert fill(["{python}", "--set", "queue.host='{node_ip}'"], "10.1.2.3")[1:] == ["--set", "queue.host='10.1.2.3'"]


def test_ray_launcher_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"run\.launcher"):
        load_config(TINY, ['run.launcher="ray"', 'producer.engine="sglang"', 'weights.engine_kind="sglang"', "run.verify_weights=false"])
    with pytest.raises(ConfigError, match=r"ray\.placement_strategy"):
        load_config(TINY, ['ray.placement_strategy="CLOSE"'])
    with pytest.raises(ConfigError, match=r"torchrun\.rdzv_endpoint"):
        load_config(TINY, ["torchrun.nnodes=2", "trainer.data_parallel=2"])
    with pytest.raises(ConfigError, match=r"torchrun\.nnodes"):
        load_config(TINY, ['run.launcher="ray"', "torchrun.nnodes=2", 'torchrun.rdzv_endpoint="h:1"', "trainer.data_parallel=2"])


def test_torchrun_across_nodes(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["torchrun.nnodes=3", 'torchrun.rdzv_endpoint="node0:29500"', "trainer.data_parallel=6"])
    cmd = torchrun_command(cfg, 6, ["train", "--broker", "tcp://b:1"], node_rank=0)
    assert "--standalone" not in cmd
    assert {"--nnodes=3", "--node-rank=0", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--nproc_per_node=2"} <= set(cmd)
    assert cmd[-5:] == ["-m", "pipeline.cli", "train", "--broker", "tcp://b:1"]
    with pytest.raises(ConfigError, match=r"torchrun\.nnodes"):
        load_config(TINY, ["torchrun.nnodes=3", 'torchrun.rdzv_endpoint="node0:29500"', "trainer.data_parallel=2"])
    script = write_node_script(cfg, tmp_path, 6, ["train"])
    assert script is not None and '--node-rank="$1"' in script.read_text()
    assert write_node_script(load_config(TINY), tmp_path, 2, ["train"]) is None
    one = torchrun_command(load_config(TINY), 2, ["train"])  # one machine: the local launcher's command as before
    assert one[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.cli", "train"]
    argv = ["train", "--config", "c", "--nnodes", "2", "--node-rank=1", "--rdzv-endpoint", "h:5", "--nproc-per-node", "4", "--broker", "tcp://b:1"]
    again = reexec_argv(argv, 2, 1, "h:5", "slipstream", 4)
    assert again[again.index("pipeline.cli") + 1:] == ["train", "--config", "c", "--broker", "tcp://b:1"]
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-endpoint=h:5", "--nproc_per_node=4"} <= set(again)


def test_train_refuses_a_bad_node_rank() -> None:
    out = subprocess.run(slipstream("train", "--config", str(TINY), "--run-dir", "x", "--broker", "tcp://b:1", "--nnodes", "2", "--node-rank", "2"),
                         env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--node-rank" in out.stderr, out.stderr


def test_roster_bundles_and_trainer_verdict() -> None:
    """The Ray launcher's pure parts: every process in start order with its bundle, and how the
    trainer ranks' statuses decide finished / fatal (exit 2) / restart the group."""
    from pipeline.ray_launcher import role_bundle, roster, trainer_verdict

    cfg = load_config(REPO / "examples" / "tiny" / "config.toml",
                      ["producer.num_engines=2", "producer.num_producers=2", "trainer.data_parallel=2", "ray.gpus_per_engine=1"])
    names, roles, ranks = roster(cfg)
    assert names == ["broker", "engine-0", "engine-1", "producer-0", "producer-1", "trainer", "trainer-rank-1"]
    assert ranks == ["trainer", "trainer-rank-1"] and roles["engine-1"] == "engine" and roles["trainer-rank-1"] == "trainer"
    assert role_bundle(cfg, "engine") == {"CPU": cfg.ray.num_cpus, "GPU": 1.0} and role_bundle(cfg, "broker") == {"CPU": cfg.ray.num_cpus}
    ok, running = {"code": 0}, {"code": None}
    assert trainer_verdict(ranks, [ok, ok]) == (True, None, "")
    assert trainer_verdict(ranks, [running, None]) == (False, None, "")  # running / unreachable for now
    assert trainer_verdict(ranks, [running, {"code": 2}]) == (False, "trainer-rank-1", "")
    assert trainer_verdict(ranks, [running, {"code": None, "dead": True}]) == (False, None, "trainer-rank-1 (its actor or node died)")
    assert trainer_verdict(ranks, [{"code": 1}, running]) == (False, None, "trainer (exit code 1)")
