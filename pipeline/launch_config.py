"""Config of the multi-node launch modes: ``[ray]`` (``run.launcher = "ray"``) and ``[torchrun]``.

What: :class:`RayConfig` says which Ray cluster ``slipstream run`` joins and how the roles are
placed on it (pipeline/ray_launcher.py); :class:`TorchrunConfig` makes the local launcher's trainer
command a multi-node ``torchrun`` (``--nnodes/--node-rank/--rdzv-endpoint``) for users without Ray
(pipeline/multinode.py).
Why a module of its own: pipeline/config.py composes it; keeping these keys here keeps that file
small and the launch-mode code in one place.
Run: ``slipstream config`` prints every key with its default and doc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import check, doc

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayConfig:
    address: str = doc(
        "Ray cluster to join with run.launcher = 'ray': 'HOST:PORT' of its head (GCS), 'auto' (the cluster this "
        "machine belongs to, as `ray start` left it), or '' = start a Ray instance on this machine for the run.", "")
    namespace: str = doc("Ray namespace of the run's actors (each is named '<run dir name>/<process name>').", "slipstream")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = doc(
        "Placement-group strategy for the run's processes (one bundle per broker, producer, engine and trainer rank): "
        "PACK = as few nodes as possible, SPREAD = across nodes (best effort), STRICT_* = must.", "PACK")
    num_cpus: float = doc("Ray CPUs each process's bundle reserves (a bookkeeping number; processes use what they use).", 1.0)
    gpus_per_engine: int = doc("GPUs each embedded engine's bundle reserves (Ray sets CUDA_VISIBLE_DEVICES for it).", 0)
    gpus_per_trainer_rank: int = doc("GPUs each trainer rank's bundle reserves: 0 (CPU) or 1.", 0)
    placement_timeout_s: float = doc(
        "How long to wait for the placement group to be placed (the cluster must have the resources) before failing.", 120.0)
    unreachable_timeout_s: float = doc(
        "How long a process's actor may stay unreachable (its node died and Ray is restarting it elsewhere) before the "
        "run fails naming it.", 180.0)

    def __post_init__(self) -> None:
        check(self.placement_strategy in STRATEGIES, "placement_strategy", f"must be one of {list(STRATEGIES)}")
        check(self.num_cpus >= 0, "num_cpus", "must be >= 0")
        check(self.gpus_per_engine >= 0, "gpus_per_engine", "must be >= 0")
        check(self.gpus_per_trainer_rank in (0, 1), "gpus_per_trainer_rank", "must be 0 or 1 (one GPU per rank)")
        check(self.placement_timeout_s > 0, "placement_timeout_s", "must be > 0")
        check(self.unreachable_timeout_s > 0, "unreachable_timeout_s", "must be > 0")
        check(bool(self.namespace), "namespace", "must not be empty")


@dataclass
class TorchrunConfig:
    nnodes: int = doc(
        "Nodes the trainer's torchrun spans with run.launcher = 'local'. 1 = `torchrun --standalone` on this machine. "
        "N > 1: the launcher runs node rank 0 here and writes RUN_DIR/cmds/trainer-node.sh, to run on each other node "
        "with its node rank (`sh trainer-node.sh 1`); queue.host must then be reachable (CURVE keys off loopback).", 1)
    rdzv_endpoint: str = doc("HOST:PORT of the c10d rendezvous (node rank 0's address) when nnodes > 1.", "")
    rdzv_id: str = doc("Rendezvous id: the same on every node of one trainer.", "slipstream")

    def __post_init__(self) -> None:
        check(self.nnodes >= 1, "nnodes", "must be >= 1")
        check(self.nnodes == 1 or ":" in self.rdzv_endpoint, "rdzv_endpoint",
              "must be HOST:PORT (node rank 0's address) when torchrun.nnodes > 1")
        check(bool(self.rdzv_id), "rdzv_id", "must not be empty")
