"""CPU benchmark of the fused, chunked log-prob op (consumers/logprobs.py) against the full-logits path.

What it measures, side by side in one run on this machine: forward + backward of the token
log-probs and entropy (the trainer's loss inputs) for ``--tokens`` tokens against a vocabulary of
151,936 (Qwen3's) at hidden size ``--hidden``, fp32:
- ``fused``: :func:`consumers.logprobs.fused_logprobs` (vocab chunks of ``--chunk-mib`` MiB of
  fp32 logits, online log-sum-exp, the projection recomputed in the backward);
- ``reference``: the trainer's previous path: full logits ``h @ W^T``, Megatron's
  ``vocab_parallel_cross_entropy`` and the entropy on the full ``[tokens, vocab]`` tensor.
Each variant runs in its own process (peak RSS is per process, from ``getrusage``); the peak is
reported above the process's RSS before the first call, beside the size of one fp32 logits
tensor.  Times are the median of ``--reps`` calls (a shared 2-core machine: noisy).

    /work/venv/bin/python bench/logprobs_cpu.py --out bench/results/DATE-logprobs-cpu.json   # ~1 min
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 151936


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(name: str, tokens: int, hidden: int, chunk_mib: int, reps: int) -> dict[str, Any]:
    from megatron.core import tensor_parallel

    from consumers.logprobs import fused_logprobs
    from consumers.model import initialize_parallel
    from consumers.policy_loss import entropy_from_logits
    from consumers.trainer import init_distributed

    torch.set_num_threads(2)
    init_distributed()
    initialize_parallel(1, 1)
    g = torch.Generator().manual_seed(0)
    hidden_t = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, hidden, generator=g) * 0.05).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, tokens), generator=g)
    coef = torch.randn(1, tokens, generator=g)
    base = _rss_mib()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        if name == "fused":
            lp, ent = fused_logprobs(hidden_t, weight, labels, None, temperature=0.9, chunk_bytes=chunk_mib << 20)
        else:
            z = (hidden_t @ weight.t()).float() / 0.9
            ent = entropy_from_logits(z)
            lp = -tensor_parallel.vocab_parallel_cross_entropy(z.clone(), labels)
        ((coef * lp).sum() + 0.01 * ent.sum()).backward()
        times.append(time.perf_counter() - t0)
        hidden_t.grad = None
        weight.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": name, "median_s": statistics.median(times), "times_s": times,
            "peak_rss_above_start_mib": peak - base, "logprob_sum": float(lp.detach().sum())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.chunk_mib, args.reps)))
        return 0
    res: dict[str, Any] = {
        "bench": "logprobs_cpu", "date": _dt.datetime.now(_dt.UTC).isoformat(), "command": " ".join([sys.executable, *sys.argv]),
        "device": f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
        "tokens": args.tokens, "hidden": args.hidden, "vocab": VOCAB, "chunk_mib": args.chunk_mib,
        "fp32_logits_mib": args.tokens * VOCAB * 4 / 2**20,
    }
    for variant in ("fused", "reference"):
        cmd = [sys.executable, __file__, "--out", args.out, "--tokens", str(args.tokens), "--hidden", str(args.hidden),
               "--chunk-mib", str(args.chunk_mib), "--reps", str(args.reps), "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
        if proc.returncode:
            res[variant] = {"error": proc.stderr[-3000:]}
            continue
        res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "median_s" in res.get("fused", {}) and "median_s" in res.get("reference", {}):
        f, r = res["fused"], res["reference"]
        res["memory_ratio"] = f["peak_rss_above_start_mib"] / r["peak_rss_above_start_mib"]
        res["time_ratio"] = f["median_s"] / r["median_s"]
        res["logprob_sum_rel_diff"] = abs(f["logprob_sum"] - r["logprob_sum"]) / abs(r["logprob_sum"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for v in ("fused", "reference"):
        r = res.get(v, {})
        if "median_s" in r:
            print(f"{v:10} {r['median_s']:.2f} s  peak RSS +{r['peak_rss_above_start_mib']:.0f} MiB")
    print(f"one fp32 logits tensor: {res['fp32_logits_mib']:.0f} MiB; memory ratio {res.get('memory_ratio', float('nan')):.2f}, "
          f"time ratio {res.get('time_ratio', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
