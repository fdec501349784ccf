"""CPU benchmark of weight publishing: WeightPublisher -> embedded engine vs raw gloo broadcast.

What it measures, side by side in one run on this machine (gloo over loopback):
1. raw gloo: a bare broadcast rank 0 -> rank 1 (another process) of the same bytes, cut into the
   same buckets as the publisher would cut them (the floor);
2. publish: ``consumers.publisher.WeightPublisher`` streaming a Qwen3-shaped float32 model to a real
   embedded engine process (``python -m producers.engine``), HTTP per bucket, staging and swap
   included (``checksum=False``);
3. the per-bucket overhead, ``(publish - raw) / buckets``, and the time ``flatten_bucket`` alone takes;
4. A/B, interleaved rep by rep so that load from other processes hits both alike: the publisher
   flattening each bucket into its persistent buffer (``reuse_buffer``, the code as it is) against a
   fresh ``torch.cat`` per bucket (``fresh_alloc``, what it did before).

CPU numbers are a local benchmark only (2 cores: the engine and the trainer compete for them).

    /work/venv/bin/python bench/weights_cpu.py --out bench/results/DATE-weights-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import consumers.bucket_send as publisher_mod  # noqa: E402  (BucketSender flattens through its flatten_into)
from consumers.publisher import WeightPublisher, free_port, plan_buckets  # noqa: E402
from pipeline.tiny import make_tiny_model  # noqa: E402
from pipeline.weightsync import flatten_bucket, init_weight_group  # noqa: E402


def _raw_receiver(port: int, sizes: list[int], reps: int) -> None:
    torch.set_num_threads(1)
    g = init_weight_group("127.0.0.1", port, rank=1, world_size=2, backend="gloo", group_name="raw")
    bufs = [torch.empty(n, dtype=torch.uint8) for n in sizes]
    for _ in range(reps + 1):
        for b in bufs:
            g.broadcast(b, 0)


def _stats(nbytes: int, times: list[float]) -> dict:
    med = sorted(times)[len(times) // 2]
    return {"bytes": nbytes, "seconds": times, "best_s": min(times), "median_s": med,
            "GBps_best": nbytes / min(times) / 1e9, "GBps_median": nbytes / med / 1e9}


def raw_gloo(sizes: list[int], reps: int) -> dict:
    port = free_port("127.0.0.1")
    p = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, sizes, reps))
    p.start()
    g = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="gloo", group_name="raw")
    bufs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]
    for b in bufs:  # warm-up
        g.broadcast(b, 0)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in bufs:
            g.broadcast(b, 0)
        times.append(time.perf_counter() - t0)
    p.join(60)
    return _stats(sum(sizes), times)


def start_engine(model: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "engine.port"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "producers.engine", "--model", str(model), "--port", "0", "--port-file", str(port_file),
           "--log-level", "WARNING"]
    log = open(workdir / "engine.log", "wb")  # noqa: SIM115  (the engine process writes it for its whole life)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.time() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("engine failed to start: " + (workdir / "engine.log").read_text()[-3000:])
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{int(port_file.read_text().strip())}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {
        "benchmark": "weight publishing on CPU (gloo): WeightPublisher -> embedded engine vs raw gloo broadcast",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                    "loadavg_at_start": os.getloadavg()},
    }
    out = Path(args.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    work = Path(tempfile.mkdtemp())
    model_dir = make_tiny_model(work / "model", hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=args.hidden // 8)
    from transformers import AutoModelForCausalLM

    named = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    result["model"] = {"shape": f"Qwen3 {args.layers} layers, hidden {args.hidden} (random)", "tensors": len(named),
                       "parameters": sum(t.numel() for t in named.values()), "bytes": nbytes, "dtype": "float32"}
    buckets = {mb: plan_buckets(named, mb << 20) for mb in args.bucket_mb}
    result["raw_gloo_broadcast"], result["flatten_only"] = {}, {}
    for mb, plan in buckets.items():
        sizes = [sum(named[n].numel() * named[n].element_size() for n in b) for b in plan]
        result["raw_gloo_broadcast"][f"{mb}MiB"] = {**raw_gloo(sizes, args.reps), "buckets": len(plan)}
        t0 = time.perf_counter()
        for b in plan:
            flatten_bucket(named[n] for n in b)
        result["flatten_only"][f"{mb}MiB"] = time.perf_counter() - t0
        save()

    proc, url = start_engine(model_dir, work)
    try:
        pub = WeightPublisher([url], backend="gloo", bucket_bytes=args.bucket_mb[0] << 20, timeout_s=300)
        pub.connect()
        version = 0
        result["publish"], result["publish_vs_raw"], result["overhead_per_bucket_ms"] = {}, {}, {}
        result["publish_fresh_alloc"], result["reuse_vs_fresh_median"] = {}, {}
        reuse = publisher_mod.flatten_into

        def fresh(buf: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
            return flatten_bucket(t.to(buf.device) for t in tensors)

        for mb in args.bucket_mb:
            pub.bucket_bytes = mb << 20
            times: dict[str, list[float]] = {"reuse": [], "fresh": []}
            for i in range(args.reps + 1):
                for variant, fn in (("reuse", reuse), ("fresh", fresh)) if i % 2 else (("fresh", fresh), ("reuse", reuse)):
                    publisher_mod.flatten_into = fn
                    version += 1
                    t0 = time.perf_counter()
                    info = pub.publish(named, version, checksum=False)
                    if i:  # the first rep is a warm-up
                        times[variant].append(time.perf_counter() - t0)
            publisher_mod.flatten_into = reuse
            key = f"{mb}MiB"
            result["publish"][key] = {**_stats(nbytes, times["reuse"]), "buckets": info.buckets}
            result["publish_fresh_alloc"][key] = _stats(nbytes, times["fresh"])
            result["reuse_vs_fresh_median"][key] = result["publish_fresh_alloc"][key]["median_s"] / result["publish"][key]["median_s"]
            raw = result["raw_gloo_broadcast"][key]
            result["publish_vs_raw"][key] = result["publish"][key]["GBps_best"] / raw["GBps_best"]
            result["overhead_per_bucket_ms"][key] = (result["publish"][key]["best_s"] - raw["best_s"]) / info.buckets * 1e3
            save()
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        save()
        pub.close()
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps({k: result[k] for k in ("model", "publish_vs_raw", "overhead_per_bucket_ms", "reuse_vs_fresh_median",
                                             "flatten_only")}, indent=2))


if __name__ == "__main__":
    main()
