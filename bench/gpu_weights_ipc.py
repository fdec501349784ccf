"""GPU benchmark of colocated weight publishing (issue 12): a real Megatron trainer rank's export ->
snapshot -> CUDA IPC -> embedded engine swap, on ONE GPU, against a raw device-to-device copy of
the same bytes measured in the same run.

What it measures (the lead runs it on one H200; ~2-3 minutes):
1. setup: a random Qwen3-0.6B-shaped HF checkpoint (bf16, made locally, nothing downloaded), an
   embedded engine process on the same GPU, a ``consumers.trainer.TrainerRank`` (bf16) in this one;
2. export: ``TrainerRank.export_hf_state()`` (Megatron -> HF names), checked to stay on the GPU;
3. snapshot: ``consumers.snapshot.WeightSnapshot.take`` into the shareable buffer (one D2D copy);
4. publish: ``consumers.publisher.WeightPublisher`` with ``transport="auto"`` (it must pick IPC: the
   engine reports this GPU), returning once the engine has copied the version into its own
   parameters; GB/s = bytes / publish seconds; pause = the engine's copy (``pause_s``), and where the
   rest of the time goes (HTTP round trip, mapping, the engine's handler);
5. baseline: a raw ``dst.copy_(src)`` of the same number of bytes on the same GPU (D2D, both ways
   of counting GB/s: bytes / time), so ``publish_vs_raw_copy`` says what the path costs;
6. correctness: the engine's checksum of its weights equals the trainer's (once, at the end).

Output: one JSON (command, device, date, torch version, every figure, errors) under ``$OUT``
(default ``bench/results/``), rewritten after each part; a summary table on stdout.

    python bench/gpu_weights_ipc.py [--reps 10] [--out DIR]              # one GPU
    python bench/gpu_weights_ipc.py --device cpu --shape tiny --reps 3    # the same path on CPU (shm), a dry run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.gpu_weights_ipc")

QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}


def make_model(out: Path, shape: str) -> Path:
    if shape == "tiny":
        from pipeline.tiny import make_tiny_model

        return make_tiny_model(out)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    return out


def start_engine(model: Path, workdir: Path, device: str, dtype: str) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "engine.port"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "producers.engine", "--model", str(model), "--port", "0", "--port-file", str(port_file),
           "--set", f'device="{device}"', "--set", f'dtype="{dtype}"', "--set", "weight_group_timeout_s=300"]
    log_file = open(workdir / "engine.log", "wb")  # noqa: SIM115  (the engine process writes it for its whole life)
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("engine failed to start: " + (workdir / "engine.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{int(port_file.read_text().strip())}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_copy(nbytes: int, device: torch.device, reps: int) -> dict[str, Any]:
    """A bare device-to-device copy of ``nbytes`` (the baseline)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return {"bytes": nbytes, "seconds": times, "GBps_best": nbytes / min(times) / 1e9,
            "GBps_median": nbytes / sorted(times)[len(times) // 2] / 1e9}


def stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1], "mean": sum(s) / len(s)}


def checksum(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/slipstream/weights_checksum", timeout=600) as r:
        return json.loads(r.read())


def run(args: argparse.Namespace, result: dict[str, Any], save: Any) -> None:
    from consumers.config import TrainerConfig
    from consumers.publisher import WeightPublisher
    from consumers.snapshot import WeightSnapshot
    from consumers.trainer import TrainerRank, init_distributed
    from pipeline.weightsync import weights_checksum

    cuda = args.device == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="gpu-weights-ipc-"))
    t = time.perf_counter()
    model_dir = make_model(tmp / "model", args.shape)
    engine_dtype = "bfloat16" if cuda else "float32"
    proc, url = start_engine(model_dir, tmp, args.device, engine_dtype)
    result["setup_s"] = {"model_and_engine": time.perf_counter() - t}
    save()
    try:
        init_distributed()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        t = time.perf_counter()
        rank = TrainerRank(TrainerConfig(megatron={"bf16": True} if cuda else {}), model_dir)
        result["setup_s"]["trainer"] = time.perf_counter() - t
        named = rank.export_hf_state()
        nbytes = sum(v.numel() * v.element_size() for v in named.values())
        devices = sorted({str(v.device) for v in named.values()})
        result["model"] = {"shape": args.shape, "tensors": len(named), "parameters": sum(v.numel() for v in named.values()),
                           "bytes": nbytes, "dtypes": sorted({str(v.dtype) for v in named.values()}), "export_devices": devices}
        assert devices == [str(device)], f"the export left the device: {devices}"
        pub = WeightPublisher([url], backend="nccl" if cuda else "gloo", transport="auto" if cuda else "ipc",
                              timeout_s=300, device=device)
        pub.connect()
        result["transports"] = pub.transports
        save()
        assert pub.transports == {url: "ipc"}, f"expected the IPC transport for an engine on this GPU, got {pub.transports}"
        snap = WeightSnapshot(allocate=pub.snapshot_allocator)
        exports, takes, publishes, pauses, timings = [], [], [], [], []
        for version in range(1, args.reps + 2):  # the first is a warm-up (allocation, mapping)
            with torch.no_grad():  # a stand-in for an optimizer step: every weight changes
                for p in rank.model.parameters():
                    p.add_(1e-3)
            sync(device)
            t0 = time.perf_counter()
            named = rank.export_hf_state()
            sync(device)
            t1 = time.perf_counter()
            flat = snap.take(named)
            t2 = time.perf_counter()
            del named
            info = pub.publish(flat, version, checksum=False)
            if version == 1:
                continue
            exports.append(t1 - t0)
            takes.append(t2 - t1)
            publishes.append(info.seconds)
            pauses.append(info.pause_s)
            timings.append(info.timings)
        result["export_s"] = stats(exports)
        result["snapshot_s"] = stats(takes)
        result["publish_s"] = stats(publishes)
        result["publish_GBps_best"] = nbytes / min(publishes) / 1e9
        result["publish_GBps_median"] = nbytes / result["publish_s"]["median"] / 1e9
        result["engine_pause_s"] = stats(pauses)
        keys = sorted({k for t in timings for k in t if not k.endswith("_at")})
        result["publish_timings_mean_s"] = {k: sum(t.get(k, 0.0) for t in timings) / len(timings) for k in keys}
        save()
        result["raw_copy"] = raw_copy(nbytes, device, args.reps)
        result["publish_vs_raw_copy"] = result["publish_GBps_best"] / result["raw_copy"]["GBps_best"]
        result["pause_GBps_best"] = nbytes / min(pauses) / 1e9
        save()
        t = time.perf_counter()
        engine = checksum(url)
        mine = weights_checksum(flat)
        result["checksum"] = {"engine_version": engine["weight_version"], "match": engine["checksum"] == mine,
                              "seconds": time.perf_counter() - t}
        pub.close()
        rank.shutdown()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        result["engine_log_tail"] = (tmp / "engine.log").read_text()[-2000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=["0.6b", "tiny"], default="0.6b")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench" / "results")))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_weights_ipc-{_dt.date.today().isoformat()}.json"
    result: dict[str, Any] = {
        "benchmark": "colocated weight publish (Megatron export -> snapshot -> CUDA IPC -> embedded engine copy) vs a raw D2D copy",
        "command": " ".join([sys.executable, *sys.argv]), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(), "errors": [],
    }

    def save() -> None:
        path.write_text(json.dumps(result, indent=1))

    t0 = time.perf_counter()
    try:
        run(args, result, save)
    except Exception as e:
        result["errors"].append(f"{e!r}\n{traceback.format_exc()}")
    result["wall_s"] = time.perf_counter() - t0
    save()
    rows = [
        ("transport", result.get("transports")),
        ("model bytes", result.get("model", {}).get("bytes")),
        ("export median s", result.get("export_s", {}).get("median")),
        ("snapshot median s", result.get("snapshot_s", {}).get("median")),
        ("publish median s", result.get("publish_s", {}).get("median")),
        ("publish GB/s (best)", result.get("publish_GBps_best")),
        ("raw D2D copy GB/s (best)", result.get("raw_copy", {}).get("GBps_best")),
        ("publish / raw copy", result.get("publish_vs_raw_copy")),
        ("engine pause median ms", None if "engine_pause_s" not in result else result["engine_pause_s"]["median"] * 1e3),
        ("checksum match", result.get("checksum", {}).get("match")),
        ("errors", len(result["errors"])),
        ("wall s", result["wall_s"]),
    ]
    print(f"\n{'gpu_weights_ipc':28s} {result['device']}")
    for k, v in rows:
        print(f"  {k:26s} {v:.4g}" if isinstance(v, float) else f"  {k:26s} {v}")
    print(f"results: {path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
