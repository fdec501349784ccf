"""The trainer across several machines with plain ``torchrun`` (no Ray): its command and the per-node script.

What: :func:`torchrun_command` is the local launcher's trainer command: ``torchrun --standalone``
on one machine, or, with ``torchrun.nnodes > 1``, ``torchrun --nnodes N --node-rank R
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID``.  The launcher runs node rank 0
and writes ``RUN_DIR/cmds/trainer-node.sh``; on each other node run ``sh trainer-node.sh R``.
``slipstream train`` itself also takes ``--nnodes/--node-rank/--rdzv-endpoint`` (and
``--nproc-per-node``, ``--rdzv-id``): given outside torchrun, it re-runs itself under torchrun with
them (:func:`reexec_argv`), so a Slurm ``srun`` line or a Kubernetes pod can start one node's ranks
with one command (ops/deploy/).
Why: users without Ray still need the trainer on several machines; the rendezvous is torchrun's
own c10d store, nothing of ours.
Run: ``slipstream train --config RUN/config.json --run-dir RUN --broker tcp://H:P --engine-url ...
--nnodes 2 --node-rank 1 --rdzv-endpoint node0:29500 --nproc-per-node 8``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pipeline.config import SlipstreamConfig

#: ``slipstream train`` flags that pick the torchrun topology (removed from the argv torchrun runs)
TOPOLOGY_FLAGS = ("--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id", "--nproc-per-node")


def torchrun_prefix(nproc: int, nnodes: int = 1, node_rank: int | str = 0, rdzv_endpoint: str = "", rdzv_id: str = "slipstream") -> list[str]:
    """``python -m torch.distributed.run ...`` up to (not including) the module it runs."""
    head = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes <= 1:
        return [*head, "--standalone", f"--nproc_per_node={nproc}"]
    return [*head, f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}", f"--nproc_per_node={nproc}"]


def torchrun_command(cfg: SlipstreamConfig, nproc: int, args: list[str], node_rank: int | str = 0) -> list[str]:
    """The trainer's command on node ``node_rank`` (``args``: ``train --config ... --broker ...``);
    ``nproc`` is every rank of the trainer (TP x PP x DP), split evenly over ``torchrun.nnodes``."""
    t = cfg.torchrun
    return [*torchrun_prefix(nproc // t.nnodes, t.nnodes, node_rank, t.rdzv_endpoint, t.rdzv_id), "-m", "pipeline.cli", *args]


def write_node_script(cfg: SlipstreamConfig, run_dir: Path, nproc: int, args: list[str]) -> Path | None:
    """``cmds/trainer-node.sh R``: node rank R's trainer ranks (torchrun.nnodes > 1; None otherwise)."""
    if cfg.torchrun.nnodes <= 1:
        return None
    cmd = shlex.join(torchrun_command(cfg, nproc, args, node_rank="NODE_RANK_PLACEHOLDER"))
    path = run_dir / "cmds" / "trainer-node.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f"# the trainer ranks of one node of {cfg.torchrun.nnodes} (node rank 0 is the launcher's); usage: sh {path.name} NODE_RANK\n"
        ': "${1:?usage: trainer-node.sh NODE_RANK}"\n'
        "OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 exec " + cmd.replace("NODE_RANK_PLACEHOLDER", '"$1"') + "\n")
    path.chmod(0o755)
    return path


def reexec_argv(argv: list[str], nnodes: int, node_rank: int, rdzv_endpoint: str, rdzv_id: str, nproc: int) -> list[str]:
    """The torchrun command that runs ``slipstream train`` (``argv``: its arguments) with the
    topology flags taken out, on this node of ``nnodes``."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in TOPOLOGY_FLAGS:
            skip = True
            continue
        if a.split("=", 1)[0] in TOPOLOGY_FLAGS:
            continue
        rest.append(a)
    return [*torchrun_prefix(nproc, nnodes, node_rank, rdzv_endpoint, rdzv_id), "-m", "pipeline.cli", *rest]
