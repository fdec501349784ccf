"""CPU benchmark of sequence packing: padded vs packed (block-diagonal mask) trainer throughput.

What it measures, side by side in one run on this machine: ``TrainerRank.train_step`` (real
megatron-core, local spec, fp32, TP=1, GRPO + TIS) on the same fixed random batches with
- ``padded``: one trajectory per row, token-balanced microbatches (``max_tokens_per_microbatch``);
- ``packed-auto``: ``packing = "block_diagonal"``, ``pack_row_tokens = 0`` (rows as long as the
  batch's longest trajectory, the default);
- ``packed-R``: rows of at most R tokens (``--rows``), longer than any trajectory: more
  trajectories per row, and attention that grows as R^2.
Throughput counts *real* tokens (each trajectory's ``prompt + response - 1`` positions, no
padding) per second of ``train_step``; ``pad_fraction`` is the share of computed positions that
are padding.  Steps are interleaved config by config (rep 1 of every config, then rep 2, ...) so
that load from other processes hits all alike.  The headline is the *best* step of each config
(least disturbed by other processes on a shared machine); the median is reported beside it.

Two length distributions (fixed seed): ``varied`` (prompts 16-48, responses log-normal, median
48, clipped to 8..384: lots of padding) and ``uniform`` (responses 96-128: little padding).
Model: a random Qwen3-shaped model (hidden 384, 2 layers, 6 heads of 64, FFN 1024, vocab 16)
made locally, fp32.

    /work/venv/bin/python bench/packing_cpu.py --out bench/results/DATE-packing-cpu.json   # ~2-3 min, 2 cores
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consumers.config import TrainerConfig  # noqa: E402
from consumers.trainer import TrainerRank, init_distributed  # noqa: E402
from pipeline.tiny import make_tiny_model  # noqa: E402
from schemas.messages import Trajectory, TrajectoryGroup  # noqa: E402

log = logging.getLogger("bench.packing_cpu")


def make_groups(dist: str, seed: int, n_groups: int, group_size: int) -> list[TrajectoryGroup]:
    """Fixed random trajectory groups with the named response-length distribution."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_groups):
        prompt = rng.integers(3, 16, size=int(rng.integers(16, 49))).astype(np.int32)
        trajs = []
        for j in range(group_size):
            if dist == "varied":
                n = int(np.clip(rng.lognormal(np.log(48), 0.9), 8, 384))
            else:
                n = int(rng.integers(96, 129))
            trajs.append(
                Trajectory(
                    trajectory_id=f"{dist}{i}.{j}", prompt_tokens=prompt,
                    response_tokens=rng.integers(1, 16, size=n).astype(np.int32),
                    logprobs=(-rng.random(n) * 3).astype(np.float32), versions=np.zeros(n, np.int32),
                    loss_mask=np.ones(n, np.uint8), reward=float(rng.random()),
                )
            )
        groups.append(TrajectoryGroup(f"g{i}", f"p{i}", "bench", 0, i, trajs))
    return groups


def computed_positions(trainer: TrainerRank, groups: list[TrajectoryGroup]) -> int:
    """Positions the forward pass computes (rows x row length, summed over microbatches)."""
    return sum(int(mb.tokens.numel()) for mb in trainer._microbatches(groups, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON result path")
    ap.add_argument("--reps", type=int, default=3, help="timed steps per config and distribution (after 1 warm-up)")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=2048, help="max_tokens_per_microbatch (all configs)")
    ap.add_argument("--rows", default="1024", help="pack_row_tokens values to try besides auto (comma list)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    init_distributed()
    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="packing-bench-")
    model = make_tiny_model(
        Path(tmp) / "m", hidden_size=384, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=6, head_dim=64, max_position_embeddings=4096,
    )
    configs: dict[str, dict[str, Any]] = {"padded": {"packing": "none"}, "packed-auto": {"packing": "block_diagonal"}}
    for r in (int(x) for x in args.rows.split(",") if x):
        configs[f"packed-{r}"] = {"packing": "block_diagonal", "pack_row_tokens": r}
    base = {"lr": 1e-6, "seed": 1, "micro_batch_size": 64, "max_tokens_per_microbatch": args.max_tokens, "compute_entropy": False,
            "layer_spec": "local", "fused_logprobs": False}  # as measured on 2026-11-26
    trainers = {name: TrainerRank(TrainerConfig(**base, **kw), model) for name, kw in configs.items()}
    results: dict[str, Any] = {}
    for dist_name in ("varied", "uniform"):
        groups = make_groups(dist_name, seed=0, n_groups=args.groups, group_size=args.group_size)
        real = sum(len(t.prompt_tokens) + len(t.response_tokens) - 1 for g in groups for t in g.trajectories)
        times: dict[str, list[float]] = {n: [] for n in trainers}
        for rep in range(args.reps + 1):
            for name, tr in trainers.items():
                t0 = time.perf_counter()
                tr.train_step(groups)
                if rep:  # rep 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"real_tokens_per_step": real}
        for name, tr in trainers.items():
            comp = computed_positions(tr, groups)
            med, best = statistics.median(times[name]), min(times[name])
            row[name] = {
                "step_seconds": times[name], "median_s": med, "best_s": best,
                "real_tokens_per_s": real / best, "real_tokens_per_s_median": real / med,
                "computed_positions": comp, "pad_fraction": 1 - real / comp,
                "microbatches": len(tr._microbatches(groups, True)),
            }
        pad, pad_med = row["padded"]["real_tokens_per_s"], row["padded"]["real_tokens_per_s_median"]
        for name in trainers:
            row[name]["speedup_vs_padded"] = row[name]["real_tokens_per_s"] / pad
            row[name]["speedup_vs_padded_median"] = row[name]["real_tokens_per_s_median"] / pad_med
        results[dist_name] = row
        print(f"[{dist_name}] real tokens/step {real}")
        for name in trainers:
            r = row[name]
            print(
                f"  {name:13s} {r['real_tokens_per_s']:7.0f} real tok/s (best step {r['best_s']:.2f} s, median "
                f"{r['median_s']:.2f} s)  pad {r['pad_fraction']:.1%}  mbs {r['microbatches']}  "
                f"x{r['speedup_vs_padded']:.2f} (median x{r['speedup_vs_padded_median']:.2f})"
            )
    out = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"cpu: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
        "model": {"hidden": 384, "layers": 2, "heads": 6, "head_dim": 64, "ffn": 1024, "vocab": 16, "dtype": "float32"},
        "batch": {"groups": args.groups, "group_size": args.group_size, "max_tokens_per_microbatch": args.max_tokens},
        "reps": args.reps,
        "results": results,
        "wall_seconds": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
