"""Peak memory of a TP = 2 trainer rank loading a HF checkpoint: whole checkpoint vs its own slices.

What it measures, side by side in one run: two ``torchrun --nproc_per_node=2`` launches (gloo,
CPU) of ``tests/test_bridge_slices.py``'s worker on the same random 197M-parameter Qwen3
checkpoint (790 MB fp32, safetensors shards of 256 MiB with an index; ``BIG`` there).  Each rank builds its Megatron
stage (TP = 2) and loads the checkpoint:
- baseline ``whole``: ``bridge.load_hf_state`` (every tensor of the checkpoint in memory, then
  sliced: what every rank did before);
- ``sliced``: ``bridge.open_hf_checkpoint`` (``safe_open(...).get_slice``: only this rank's
  slices are read).
Reported per rank: peak RSS (``VmHWM``, imports and the model included) before the build, after
the build and after the load, the load time, and a digest of the loaded weights (equal in both
modes).  The headline is the ratio of the largest rank's peak RSS, sliced / whole.

    python bench/load_rss.py --out bench/results/DATE-load-rss-cpu.json     # ~1-2 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / f"{_dt.date.today()}-load-rss-cpu.json")
    args = ap.parse_args()
    import torch

    from tests.test_bridge_slices import BIG, RSS_RATIO_BOUND, measure, write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(Path(tmp) / "big", shard_bytes=256 * 2**20, **BIG)
        ckpt_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        shards = len(list(model.glob("*.safetensors")))
        whole = measure(model, "whole", Path(tmp) / "whole.json")
        sliced = measure(model, "sliced", Path(tmp) / "sliced.json")
    peak_whole = max(r["peak_rss_bytes"] for r in whole)
    peak_sliced = max(r["peak_rss_bytes"] for r in sliced)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    result = {
        "benchmark": "TP=2 trainer rank: peak RSS while building the Megatron stage and loading a HF checkpoint",
        "command": " ".join(["python", *sys.argv]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "torch": torch.__version__},
        "checkpoint": {"config": BIG, "tied_embeddings": True, "bytes": ckpt_bytes, "dtype": "float32", "shards": shards},
        "baseline_whole": whole,
        "sliced": sliced,
        "peak_rss_whole_bytes": peak_whole,
        "peak_rss_sliced_bytes": peak_sliced,
        "ratio_sliced_over_whole": round(peak_sliced / peak_whole, 4),
        "goal": f"< {RSS_RATIO_BOUND}",
        "same_weights": all(w["weights_sha256"] == s["weights_sha256"] for w, s in zip(whole, sliced, strict=True)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    mib = 2**20
    print(f"{'mode':<8} {'rank':>4} {'peak RSS MiB':>13} {'after build MiB':>16} {'load s':>7}")
    for r in [*whole, *sliced]:
        print(f"{r['mode']:<8} {r['rank']:>4} {r['peak_rss_bytes'] / mib:>13.0f} {r['peak_rss_after_build_bytes'] / mib:>16.0f} "
              f"{r['build_and_load_seconds']:>7.2f}")
    print(f"peak RSS sliced / whole = {result['ratio_sliced_over_whole']:.3f} (goal {result['goal']}); same weights: {result['same_weights']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
