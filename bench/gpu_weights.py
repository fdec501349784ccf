"""GPU benchmark of weight streaming (issue 4): publish throughput vs raw NCCL, generation kept
while weights stream, and the pause per update. Needs 2 GPUs; results go to one JSON file.

What it measures, all in one run on the same two GPUs:
1. raw NCCL: a bare broadcast GPU0 -> GPU1 of the same bytes, in the same bucket sizes (baseline);
2. publish: ``consumers.publisher.WeightPublisher`` on GPU0 streaming a >= 0.5B Qwen3-shaped model
   (bf16) to the embedded engine on GPU1 over HTTP + NCCL, including its staging and swap;
3. generation: the engine's tokens/s under a fixed concurrent /generate load, first with no
   updates, then with a new version streamed back to back (every "step");
4. pause: the engine's swap time per update (``slipstream_engine_weight_update_pause_seconds``).

    python bench/gpu_weights.py --out results.json          # on a machine with >= 2 GPUs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.weightsync import init_weight_group  # noqa: E402

# Qwen3 shapes (random weights): name -> (hidden, intermediate, layers, heads, tied embeddings).
SHAPES = {"0.6b": (1024, 3072, 28, 16, True), "4b": (2560, 9728, 36, 32, True)}


def model_config(shape: str = "0.6b", vocab: int = 151936) -> dict:
    hidden, inter, layers, heads, tied = SHAPES[shape]
    return dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=tied, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
    )


def make_model(path: Path, shape: str = "0.6b") -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**model_config(shape))
    with torch.device("cuda:0"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    return model


def _raw_receiver(port: int, sizes: list[int], reps: int) -> None:
    torch.cuda.set_device(1)
    g = init_weight_group("127.0.0.1", port, rank=1, world_size=2, backend="nccl")
    bufs = [torch.empty(n, dtype=torch.uint8, device="cuda:1") for n in sizes]
    for _ in range(reps + 1):
        for b in bufs:
            g.broadcast(b, 0)
    torch.cuda.synchronize()


def raw_nccl(sizes: list[int], reps: int) -> dict:
    port = random.randint(20000, 40000)
    p = mp.get_context("spawn").Process(target=_raw_receiver, args=(port, sizes, reps))
    p.start()
    g = init_weight_group("127.0.0.1", port, rank=0, world_size=2, backend="nccl")
    bufs = [torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda:0") for n in sizes]
    for b in bufs:  # warm-up
        g.broadcast(b, 0)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for b in bufs:
            g.broadcast(b, 0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    p.join(60)
    total = sum(sizes)
    best = min(times)
    return {"bytes": total, "seconds": times, "GBps_best": total / best / 1e9, "GBps_median": total / sorted(times)[len(times) // 2] / 1e9}


def start_engine(model: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "engine.port"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "producers.engine", "--model", str(model), "--port", "0", "--port-file", str(port_file),
           "--set", 'device="cuda"', "--set", 'dtype="bfloat16"', "--set", "max_running_requests=512",
           "--set", "weight_group_timeout_s=300"]
    log = open(workdir / "engine.log", "wb")  # noqa: SIM115  (the engine process writes it for its whole life)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("engine failed to start: " + (workdir / "engine.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{int(port_file.read_text().strip())}"


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    out = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


async def load(url: str, seconds: float, concurrency: int, new_tokens: int, prompt_len: int) -> dict:
    import aiohttp

    stop = time.monotonic() + seconds
    tokens = 0
    requests = 0

    async def worker(i: int) -> None:
        nonlocal tokens, requests
        rng = random.Random(i)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            while time.monotonic() < stop:
                body = {"input_ids": [rng.randrange(3, 1000) for _ in range(prompt_len)],
                        "sampling_params": {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True},
                        "return_logprob": True}
                async with s.post(url + "/generate", json=body) as r:
                    data = await r.json()
                if time.monotonic() <= stop:
                    tokens += int(data["meta_info"]["completion_tokens"])
                    requests += 1

    t0 = time.monotonic()
    await asyncio.gather(*[worker(i) for i in range(concurrency)])
    return {"tokens": tokens, "requests": requests, "seconds": time.monotonic() - t0, "tokens_per_s": tokens / seconds}


def breakdown(timings: list[dict]) -> dict[str, float]:
    """Mean split of one update (same host: the engine's started_at is on this clock): request
    latency (post -> engine handler), the engine's parse / queue / receive / swap wait / swap, and
    reply latency (engine done -> publisher has the reply)."""
    rows = []
    for t in timings:
        request = t["engine_started_at"] - t["posted_at"]
        row = {"request_latency_s": request}
        row.update({k.removeprefix("engine_"): t[k] for k in
                    ("engine_parse_s", "engine_queue_s", "engine_receive_s", "engine_swap_wait_s", "engine_swap_s")})
        row["reply_latency_s"] = t["send_s"] - request - t["engine_handler_s"]
        row["total_s"] = t["send_s"]
        rows.append(row)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bucket-mb", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--update-interval-s", type=float, default=1.0, help="time between updates (a trainer step)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b", help="Qwen3 model shape (random weights)")
    ap.add_argument("--load-seconds", type=float, default=40)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-load", action="store_true", help="only the publish figures (skip the generation load test)")
    args = ap.parse_args()
    torch.cuda.set_device(0)
    from consumers.publisher import WeightPublisher, bucket_sizes, plan_buckets

    result: dict = {
        "benchmark": "weight streaming (issue 4)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "device": {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   "torch": torch.__version__, "nccl": str(torch.cuda.nccl.version()), "python": platform.python_version()},
    }
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    work = Path(tempfile.mkdtemp())
    model = make_model(work / "model", args.shape)
    named = {n: p.detach() for n, p in model.named_parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    result["model"] = {"shape": f"Qwen3-{args.shape} (random)", "parameters": sum(t.numel() for t in named.values()), "bytes": nbytes, "dtype": "bfloat16"}
    result["raw_nccl_broadcast"] = {}
    for mb in args.bucket_mb:
        sizes = bucket_sizes(named, plan_buckets(named, mb << 20))
        result["raw_nccl_broadcast"][f"{mb}MiB"] = raw_nccl(sizes, args.reps)
        save()

    proc, url = start_engine(work / "model", work)
    try:
        pub = WeightPublisher([url], backend="nccl", bucket_bytes=args.bucket_mb[0] << 20, timeout_s=300)
        pub.connect()
        version = 0
        result["publish"], result["publish_vs_raw"] = {}, {}
        for mb in args.bucket_mb:
            pub.bucket_bytes = mb << 20
            times, timings = [], []
            for rep in range(args.reps + 1):
                version += 1
                if rep == 1:
                    m0 = scrape(url)
                t0 = time.perf_counter()
                info = pub.publish(named, version, checksum=False)
                times.append(time.perf_counter() - t0)
                timings.append(info.timings)
            m1 = scrape(url)
            times, timings = times[1:], timings[1:]
            key = f"{mb}MiB"
            rs, rc = "slipstream_engine_weight_receive_seconds_sum", "slipstream_engine_weight_receive_seconds_count"
            ps, pc = "slipstream_engine_weight_update_pause_seconds_sum", "slipstream_engine_weight_update_pause_seconds_count"
            result["publish"][key] = {
                "bytes": nbytes, "buckets": info.buckets, "seconds": times, "GBps_best": nbytes / min(times) / 1e9,
                "GBps_median": nbytes / sorted(times)[len(times) // 2] / 1e9,
                # where the time went (means over the timed reps): publisher CPU wall time per phase,
                # and the engine's own view (receive: from starting a bucket's receive until its bytes
                # are on the GPU; swap: the pause).
                "publisher_timings_mean_s": {k: sum(t[k] for t in timings) / len(timings) for k in timings[0] if not k.endswith("_at")},
                "breakdown_mean_s": breakdown(timings),
                "engine_receive_s_per_update": (m1[rs] - m0[rs]) / args.reps,
                "engine_buckets_per_update": (m1[rc] - m0[rc]) / args.reps,
                "engine_swap_s_per_update": (m1[ps] - m0[ps]) / max(1.0, m1[pc] - m0[pc]),
            }
            result["publish_vs_raw"][key] = result["publish"][key]["GBps_best"] / result["raw_nccl_broadcast"][key]["GBps_best"]
            save()
        # The trainer's default path (weights.async_publish): the step's weights are copied into a
        # persistent WeightSnapshot (one flat buffer, so buckets go out without a flatten copy) and
        # published from it.  The snapshot copy runs on the trainer's step, so it is timed apart.
        from consumers.publish_async import WeightSnapshot

        snapshot = WeightSnapshot()
        pub.bucket_bytes = args.bucket_mb[0] << 20
        snap_times, times, timings = [], [], []
        for _ in range(args.reps + 1):
            version += 1
            t0 = time.perf_counter()
            snap = snapshot.take(named)  # ends with a device synchronize
            t1 = time.perf_counter()
            info = pub.publish(snap, version, checksum=False)
            snap_times.append(t1 - t0)
            times.append(time.perf_counter() - t1)
            timings.append(info.timings)
        times, snap_times, timings = times[1:], snap_times[1:], timings[1:]
        raw = result["raw_nccl_broadcast"][f"{args.bucket_mb[0]}MiB"]["GBps_best"]
        result["publish_from_snapshot"] = {
            "bucket": f"{args.bucket_mb[0]}MiB", "seconds": times, "GBps_best": nbytes / min(times) / 1e9,
            "vs_raw": nbytes / min(times) / 1e9 / raw, "snapshot_seconds": snap_times, "breakdown_mean_s": breakdown(timings),
        }
        save()
        pub.bucket_bytes = max(args.bucket_mb) << 20
        if args.no_load:
            pub.close()
            return

        gen = "slipstream_engine_generated_tokens_total"
        asyncio.run(load(url, 10, args.concurrency, args.new_tokens, 32))  # warm-up
        b0 = scrape(url)
        base = asyncio.run(load(url, args.load_seconds, args.concurrency, args.new_tokens, 32))
        base["engine_tokens_per_s"] = (scrape(url)[gen] - b0[gen]) / base["seconds"]
        result["generation_no_updates"] = base
        save()
        m0 = scrape(url)
        stop = threading.Event()
        published = []

        def streamer() -> None:
            nonlocal version
            while not stop.is_set():
                version += 1
                t0 = time.perf_counter()
                pub.publish(named, version, checksum=False)
                published.append(time.perf_counter() - t0)
                stop.wait(max(0.0, args.update_interval_s - (time.perf_counter() - t0)))

        th = threading.Thread(target=streamer, daemon=True)
        th.start()
        with_updates = asyncio.run(load(url, args.load_seconds, args.concurrency, args.new_tokens, 32))
        stop.set()
        th.join(120)
        m1 = scrape(url)
        with_updates["engine_tokens_per_s"] = (m1[gen] - m0[gen]) / with_updates["seconds"]
        psum = "slipstream_engine_weight_update_pause_seconds_sum"
        pcnt = "slipstream_engine_weight_update_pause_seconds_count"
        n = m1.get(pcnt, 0) - m0.get(pcnt, 0)
        result["generation_with_updates"] = {**with_updates, "updates": len(published), "update_seconds": published}
        result["update_interval_s"] = args.update_interval_s
        result["generation_retained"] = with_updates["engine_tokens_per_s"] / base["engine_tokens_per_s"]
        result["pause_per_update_s"] = {"mean": (m1.get(psum, 0) - m0.get(psum, 0)) / n if n else None, "updates": n,
                                        "histogram": {k: v for k, v in m1.items() if k.startswith("slipstream_engine_weight_update_pause_seconds_bucket")}}
        save()
        pub.close()
    finally:
        proc.terminate()
        proc.wait(30)
        result["engine_log_tail"] = (work / "engine.log").read_text()[-4000:]
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "engine_log_tail"}, indent=1)[:4000])


if __name__ == "__main__":
    main()
