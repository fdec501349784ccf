"""``slipstream bench engine``: the embedded engine against transformers ``generate``, same model, same run.

What it measures, in one run on one device (results as JSON under ``--out``, default
``bench/results/``, or ``$OUT`` when set; a summary table at the end):

1. memory bandwidth: a large device-to-device copy (read + write), and from it the *weight-read
   limit* of one decode step: model bytes / bandwidth;
2. the engine over HTTP (a real ``python -m producers.engine`` subprocess): one ``/generate`` of
   ``B`` prompts x ``--prompt-len`` random tokens, ``--new-tokens`` each (EOS ignored), for each
   batch size: tokens/s, time per decode step (median gap between a row's tokens, engine clock),
   time to first token, engine peak memory; after one warm-up run per batch size (CUDA graphs
   are captured there);
3. generation kept while the weights change every second: an engine in this process (the GPU
   has one device, so the "update" is a local ``Scheduler.swap_weights`` of a fresh copy of
   every weight, the scheduler's real swap path, not a broadcast), ``B`` sequences kept running;
   windows without and with updates alternate; the ratio of their tokens/s;
4. transformers ``generate`` on the same checkpoint and prompts (sampling, full vocabulary, no
   EOS): dynamic cache, static cache, and static cache + ``torch.compile`` (transformers'
   automatic compile; CUDA only by default), each in its own subprocess.

Everything runs under one time budget (``--time-budget-s``): baselines that would not fit are
recorded as skipped, so the run always ends (and writes its JSON) in time.

How to run::

    slipstream bench engine --device cuda            # 0.6B Qwen3 shapes, bf16, batches 1/64/256
    slipstream bench engine --device cpu             # small model, batches 1/16/64 (minutes on 2 cores)
    python -m producers.engine.bench --help

Nothing is downloaded: the model is random-initialised from a Qwen3 config (seed 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# Qwen3 shapes: (hidden, intermediate, layers, heads, kv heads, head_dim, vocab)
SHAPES = {
    "0.6b": (1024, 3072, 28, 16, 8, 128, 151936),
    "small": (256, 768, 4, 4, 2, 64, 8192),
    "tiny": (64, 128, 2, 4, 2, 16, 256),
}
HF_MODES = ("compile", "static", "dynamic")


def model_config(shape: str, context: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, hd, vocab = SHAPES[shape]
    return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                head_dim=hd, max_position_embeddings=context, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_model(path: Path, shape: str, context: int, dtype: str, device: str) -> int:
    """Write a random Qwen3 checkpoint; returns its parameter bytes (tied weights once)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(Qwen3Config(**model_config(shape, context))).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return nbytes


def bandwidth(device: str) -> dict[str, float]:
    """Bytes/s of a large copy (read + write counted), best of 10."""
    import torch

    n = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"copy_bytes": n, "seconds": best, "bytes_per_s": 2 * n / best}


def attention_microbench(batch: int, width: int, shape: str, dtype: str) -> dict[str, Any]:
    """One layer's decode attention at (batch, width) as the engine lays it out (a view of slot
    caches, grouped-query heads folded into the query), per SDPA backend and for matmul+softmax:
    seconds per call and the bytes of K/V read per second.  Informs the choice of kernel."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, _, _, heads, kv, hd, _ = SHAPES[shape]
    dt = getattr(torch, dtype)
    cache = torch.randn(batch + 1, kv, width + 64, hd, dtype=dt, device="cuda")
    k, v = cache[:batch, :, :width], cache[:batch, :, :width]
    q = torch.randn(batch, kv, heads // kv, hd, dtype=dt, device="cuda")
    lens = torch.randint(1, width, (batch,), device="cuda")
    valid = (torch.arange(width, device="cuda")[None, :] < lens[:, None]).view(batch, 1, 1, width)
    bias = torch.zeros(valid.shape, dtype=dt, device="cuda").masked_fill_(~valid, float("-inf"))

    def eager() -> torch.Tensor:
        s = torch.matmul(q, k.transpose(-1, -2)) * hd ** -0.5
        return torch.matmul(torch.softmax(s.masked_fill(~valid, float("-inf")), -1, dtype=torch.float32).to(dt), v)

    def sdpa(backend: Any) -> Any:
        def run() -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return run

    out: dict[str, Any] = {"batch": batch, "width": width}
    ref = eager()
    for name, fn in (("matmul_softmax", eager), ("sdpa_efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION)),
                     ("sdpa_math", sdpa(SDPBackend.MATH)), ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))):
        try:
            err = float((fn().float() - ref.float()).abs().max())
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            sec = (time.perf_counter() - t0) / 20
            out[name] = {"s_per_call": sec, "kv_bytes_per_s": 2 * k.numel() * k.element_size() / sec, "max_diff": err}
        except Exception as e:
            out[name] = {"error": repr(e)[:300]}
    return out


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else float("nan")


# ---------------------------------------------------------------------- the engine over HTTP
class EngineProcess:
    def __init__(self, model_dir: Path, workdir: Path, sets: dict[str, Any], timeout_s: float) -> None:
        self.port_file = workdir / "engine.port"
        self.log_path = workdir / "engine.log"
        args = [sys.executable, "-m", "producers.engine", "--model", str(model_dir), "--port", "0",
                "--port-file", str(self.port_file)]
        for key, value in sets.items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"engine did not start within {timeout_s:.0f}s (waiting for its port file); log:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.base = f"http://127.0.0.1:{int(self.port_file.read_text())}"

    def request(self, path: str, body: Any = None, timeout: float = 600.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def engine_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The engine config of both engine runs: the workload's, plus ``--engine-set`` overrides."""
    from pipeline.configbase import parse_override

    sets: dict[str, Any] = {"device": a.device, "dtype": a.dtype, "max_running_requests": max(a.batches),
                            "max_seq_len": a.prompt_len + a.new_tokens, "threads": a.threads, "request_timeout_s": 0}
    for text in a.engine_set:
        path, value = parse_override(text)
        sets[".".join(path)] = value
    return sets


def engine_run(eng: EngineProcess, batch: int, prompt_len: int, new: int, vocab: int, seed: int) -> dict[str, Any]:
    body = {"input_ids": prompts(batch, prompt_len, vocab, seed), "return_logprob": True,
            "sampling_params": [{"max_new_tokens": new, "ignore_eos": True, "temperature": 1.0,
                                 "sampling_seed": seed * 100_000 + i} for i in range(batch)]}
    sent = time.monotonic()
    outs = eng.request("/generate", body)
    wall = time.monotonic() - sent
    tokens = sum(len(o["output_ids"]) for o in outs)
    firsts = [o["meta_info"]["output_token_times"][0] - sent for o in outs]
    gaps = []
    for o in outs:
        t = o["meta_info"]["output_token_times"]
        gaps.append(_median([b - a for a, b in itertools.pairwise(t)]))
    samples = [(p, o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
               for p, o in zip(body["input_ids"][:2], outs[:2], strict=True)]
    return {"batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "decode_step_s": _median(gaps), "ttft_s_median": _median(firsts), "ttft_s_max": max(firsts),
            "samples": samples}


def bench_engine(model_dir: Path, work: Path, a: argparse.Namespace, vocab: int, budget: Budget) -> dict[str, Any]:
    sets = engine_settings(a)
    t0 = time.monotonic()
    eng = EngineProcess(model_dir, work, sets, timeout_s=budget.left(60))
    out: dict[str, Any] = {"config": sets, "startup_s": time.monotonic() - t0, "runs": []}
    try:
        for b in a.batches:
            engine_run(eng, b, a.prompt_len, a.new_tokens, vocab, seed=1)  # warm-up: graphs, allocator
            runs = [engine_run(eng, b, a.prompt_len, a.new_tokens, vocab, seed=2 + r) for r in range(a.repeats)]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            out["samples"] = best.pop("samples")  # the largest batch's, for the log-prob check
            for r in runs:
                r.pop("samples", None)
            info = eng.request("/get_server_info")
            best.update(peak_memory_bytes=info["memory"]["peak_bytes"], repeats=[r["tokens_per_s"] for r in runs])
            out["runs"].append(best)
            print(f"engine batch {b}: {best['tokens_per_s']:,.0f} tok/s, step {best['decode_step_s'] * 1e3:.2f} ms, "
                  f"ttft {best['ttft_s_median'] * 1e3:.0f} ms", flush=True)
        info = eng.request("/get_server_info")
        out["decode"], out["memory"] = info["decode"], info["memory"]
    finally:
        eng.stop()
        out["log_tail"] = eng.log_path.read_text()[-4000:]
    return out


# ---------------------------------------------------------------------- updates every second (in process)
def logprob_parity(model: Any, samples: list[Any]) -> dict[str, Any]:
    """The engine's log-probs (over HTTP, largest batch) against a plain transformers forward over
    prompt + output: how far the engine's forward, graphs and sampler are from the reference."""
    import torch

    diffs: list[float] = []
    with torch.inference_mode():
        for prompt, ids, got in samples:
            logits = model(input_ids=torch.tensor([prompt + ids], device=model.device)).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            want = logp[len(prompt) - 1 : -1].gather(1, torch.tensor(ids, device=model.device)[:, None])[:, 0].tolist()
            diffs += [abs(a - b) for a, b in zip(got, want, strict=True)]
    return {"tokens": len(diffs), "max_abs_diff": max(diffs, default=0.0),
            "mean_abs_diff": sum(diffs) / max(len(diffs), 1)}


def bench_updates(model_dir: Path, a: argparse.Namespace, vocab: int, samples: list[Any]) -> dict[str, Any]:
    import torch

    from pipeline.metrics import new_registry
    from producers.engine.batch import GenRequest
    from producers.engine.config import EngineConfig
    from producers.engine.decode import Scheduler
    from producers.engine.metrics import EngineMetrics
    from producers.engine.sampling import SamplingParams
    from producers.engine.server import load_model

    torch.set_num_threads(a.threads)
    batch = a.update_batch
    cfg = EngineConfig(**{**engine_settings(a), "max_running_requests": batch})
    model, device = load_model(str(model_dir), cfg)
    parity = logprob_parity(model, samples) if samples else {"tokens": 0, "max_abs_diff": 0.0, "mean_abs_diff": 0.0}
    print(f"engine log-probs vs transformers forward: max |diff| {parity['max_abs_diff']:.4f}, mean "
          f"{parity['mean_abs_diff']:.5f} over {parity['tokens']} tokens", flush=True)
    metrics = EngineMetrics(new_registry("engine"))
    sched = Scheduler(model, cfg, metrics, device)
    sched.start()
    # a fresh copy of every weight, swapped in as a new version each time (the swap copies it in)
    staged = {n: p.detach().clone() for n, p in model.named_parameters()}
    stop = threading.Event()
    rng = random.Random(5)
    counter = iter(range(1 << 40))

    def submit() -> None:
        if stop.is_set():
            return
        i = next(counter)
        req = GenRequest(rid=f"u{i}", input_ids=[rng.randrange(3, vocab) for _ in range(a.prompt_len)],
                         params=SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True), return_logprob=False)
        sched.submit(req).add_done_callback(lambda _f: submit())

    def tokens() -> float:
        return float(metrics.generated_tokens._value.get())

    pauses: list[float] = []
    version = [cfg.weight_version]

    def updater(until: float) -> None:
        nxt = time.monotonic() + 1.0
        while time.monotonic() < until and not stop.is_set():
            time.sleep(max(0.0, nxt - time.monotonic()))
            nxt += 1.0
            version[0] += 1
            pauses.append(sched.swap_weights(staged, version[0]).result(timeout=120))

    windows: list[dict[str, Any]] = []
    try:
        for _ in range(batch):
            submit()
        time.sleep(a.update_window_s / 2)  # warm-up: graphs for the widths this load reaches
        for _ in range(a.update_pairs):
            for mode in ("no_updates", "update_every_1s"):
                t0, n0 = time.monotonic(), tokens()
                th = None
                if mode == "update_every_1s":
                    th = threading.Thread(target=updater, args=(t0 + a.update_window_s,), daemon=True)
                    th.start()
                time.sleep(a.update_window_s)
                windows.append({"mode": mode, "tokens_per_s": (tokens() - n0) / (time.monotonic() - t0)})
                if th is not None:
                    th.join(60)
    finally:
        stop.set()
        sched.stop(timeout=30)
    plain = [w["tokens_per_s"] for w in windows if w["mode"] == "no_updates"]
    upd = [w["tokens_per_s"] for w in windows if w["mode"] == "update_every_1s"]
    ratio = (sum(upd) / len(upd)) / (sum(plain) / len(plain))
    print(f"updates every 1 s: {ratio:.3f} of the no-update throughput ({len(pauses)} swaps, "
          f"median pause {_median(pauses) * 1e3:.2f} ms)", flush=True)
    return {"what": "Scheduler.swap_weights of a full fresh copy every 1 s, in process (one device: no broadcast)",
            "batch": batch, "window_s": a.update_window_s, "windows": windows, "updates": len(pauses),
            "pause_s_median": _median(pauses), "pause_s_max": max(pauses, default=0.0), "ratio": ratio,
            "logprob_parity": parity}


# ---------------------------------------------------------------------- transformers baselines
def hf_worker(spec: dict[str, Any]) -> None:
    """One transformers mode over several batch sizes; one JSON line per batch on stdout."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]),
                                                 attn_implementation="sdpa").to(device).eval()

    class FirstToken(LogitsProcessor):
        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    mode, new = spec["mode"], spec["new_tokens"]
    kw: dict[str, Any] = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                              min_new_tokens=new, pad_token_id=0)
    if mode in ("static", "compile"):
        kw["cache_implementation"] = "static"
    if mode == "static":
        kw["disable_compile"] = True
    for b in spec["batches"]:
        ids = torch.tensor(prompts(b, spec["prompt_len"], spec["vocab"], seed=2), device=device)
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            # warm-up; in "compile" mode the full length (the static cache's shape is part of what is compiled)
            warm = kw if mode == "compile" else {**kw, "max_new_tokens": 8, "min_new_tokens": 8}
            model.generate(input_ids=ids, attention_mask=mask, **warm)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            first = FirstToken()
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, logits_processor=LogitsProcessorList([first]), **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        tokens = int((out.shape[1] - ids.shape[1]) * b)
        ttft = (first.at or t0) - t0
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print(json.dumps({"batch": b, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                          "decode_step_s": (wall - ttft) / max(new - 1, 1), "ttft_s": ttft, "peak_memory_bytes": peak}),
              flush=True)


def bench_hf(model_dir: Path, a: argparse.Namespace, vocab: int, budget: Budget) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in a.hf_modes:
        left = budget.left(0)
        if left < 30:
            out[mode] = {"skipped": f"time budget ({left:.0f} s left)"}
            continue
        spec = {"mode": mode, "model": str(model_dir), "device": a.device, "dtype": a.dtype, "threads": a.threads,
                "batches": sorted(a.batches, reverse=True), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                "vocab": vocab}
        t0 = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "producers.engine.bench", "--hf-worker", json.dumps(spec)],
                                  cwd=REPO, capture_output=True, text=True, timeout=left)
            stdout, err, status = proc.stdout, proc.stderr, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, status = "", f"stopped at the time budget after {left:.0f} s"
        runs = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
        out[mode] = {"runs": runs, "status": status, "seconds": time.monotonic() - t0}
        if status != "exit 0":
            out[mode]["stderr_tail"] = err[-3000:]
        for r in runs:
            print(f"transformers {mode} batch {r['batch']}: {r['tokens_per_s']:,.0f} tok/s, "
                  f"step {r['decode_step_s'] * 1e3:.2f} ms", flush=True)
    return out


# ---------------------------------------------------------------------- orchestration
class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, reserve: float) -> float:
        return max(0.0, self.end - time.monotonic() - reserve)


def device_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                            "platform": platform.platform()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        cpu = "unknown"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        info["cpu"] = cpu
    return info


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    eng = {r["batch"]: r for r in result["engine"].get("runs", [])}
    hf = {mode: {r["batch"]: r for r in v.get("runs", [])} for mode, v in result["transformers"].items()
          if isinstance(v, dict)}
    s: dict[str, Any] = {"engine_vs_transformers": {}}
    for b, r in eng.items():
        s["engine_vs_transformers"][str(b)] = {mode: r["tokens_per_s"] / runs[b]["tokens_per_s"]
                                               for mode, runs in hf.items() if b in runs}
    if 1 in eng:
        s["batch1_step_over_weight_read_limit"] = eng[1]["decode_step_s"] / result["weight_read_limit_s"]
    if result.get("updates") and "ratio" in result["updates"]:
        s["throughput_kept_with_updates"] = result["updates"]["ratio"]
        s["logprob_max_abs_diff_vs_transformers"] = result["updates"]["logprob_parity"]["max_abs_diff"]
    return s


def table(result: dict[str, Any]) -> str:
    hf = {mode: {r["batch"]: r for r in v.get("runs", [])} for mode, v in result["transformers"].items()
          if isinstance(v, dict) and "error" not in v}
    lines = [f"{'batch':>5} | {'engine tok/s':>12} | {'step ms':>8} | {'ttft ms':>8} | "
             + " | ".join(f"{'HF ' + m:>13}" for m in hf) + " | engine / HF compile"]
    for r in result["engine"].get("runs", []):
        b = r["batch"]
        cells = [f"{hf[m][b]['tokens_per_s']:>13,.0f}" if b in hf[m] else f"{'-':>13}" for m in hf]
        ratio = result["summary"]["engine_vs_transformers"].get(str(b), {}).get("compile")
        lines.append(f"{b:>5} | {r['tokens_per_s']:>12,.0f} | {r['decode_step_s'] * 1e3:>8.2f} | "
                     f"{r['ttft_s_median'] * 1e3:>8.0f} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}x'}")
    s = result["summary"]
    lines.append(f"weight-read limit per step: {result['weight_read_limit_s'] * 1e3:.3f} ms "
                 f"({result['model']['bytes'] / 1e9:.3f} GB at {result['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s)")
    if "batch1_step_over_weight_read_limit" in s:
        lines.append(f"batch-1 step / weight-read limit: {s['batch1_step_over_weight_read_limit']:.2f}x")
    if "throughput_kept_with_updates" in s:
        lines.append(f"throughput kept with a weight update every second: {s['throughput_kept_with_updates']:.1%}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slipstream bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="Qwen3 shape (default: 0.6b on cuda, small on cpu)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,64,256 on cuda, 1,16,64 on cpu)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128 on cuda, 32 on cpu)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per sequence (default 256 on cuda, 64 on cpu)")
    p.add_argument("--repeats", type=int, default=2, help="measured engine runs per batch size (the best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (engine and transformers alike)")
    p.add_argument("--hf-modes", default=None, help="comma-separated of compile,static,dynamic (default: all on cuda, "
                                                     "static,dynamic on cpu; '' for none)")
    p.add_argument("--update-batch", type=int, default=None, help="sequences kept running in the update test (default 64)")
    p.add_argument("--update-window-s", type=float, default=None, help="length of each update-test window (10 s cuda, 5 s cpu)")
    p.add_argument("--update-pairs", type=int, default=2, help="(no updates, updates) window pairs; 0 skips the test")
    p.add_argument("--engine-set", action="append", default=[], metavar="KEY=VALUE",
                   help="engine config override for both engine runs (e.g. attn_implementation=eager, cuda_graphs=false)")
    p.add_argument("--time-budget-s", type=float, default=450.0, help="the whole run ends within this (default 7.5 min)")
    p.add_argument("--out", type=Path, default=None, help="directory for the JSON (default $OUT or bench/results)")
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hf_worker is not None:
        return a
    import torch

    cuda = torch.cuda.is_available()
    a.device = a.device or ("cuda" if cuda else "cpu")
    if a.device == "cuda" and not cuda:
        p.error("--device cuda but CUDA is not available")
    gpu = a.device == "cuda"
    a.shape = a.shape or ("0.6b" if gpu else "small")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.batches = [int(x) for x in (a.batches or ("1,64,256" if gpu else "1,16,64")).split(",")]
    a.prompt_len = a.prompt_len or (128 if gpu else 32)
    a.new_tokens = a.new_tokens or (256 if gpu else 64)
    modes = a.hf_modes if a.hf_modes is not None else ("compile,static,dynamic" if gpu else "static,dynamic")
    a.hf_modes = [m for m in modes.split(",") if m]
    bad = [m for m in a.hf_modes if m not in HF_MODES]
    if bad:
        p.error(f"unknown --hf-modes {bad}; choose from {list(HF_MODES)}")
    a.update_batch = a.update_batch or min(64, max(a.batches))
    a.update_window_s = a.update_window_s or (10.0 if gpu else 5.0)
    a.out = a.out or Path(os.environ.get("OUT") or REPO / "bench" / "results")
    return a


def _phase(name: str, fn: Any) -> dict[str, Any]:
    """Run one part of the benchmark; a failure is recorded (and printed), not fatal: the JSON with
    every other part is still written."""
    try:
        return fn()
    except Exception as e:
        import traceback

        print(f"bench phase {name!r} failed: {e!r}", flush=True)
        return {"error": repr(e), "traceback": traceback.format_exc()[-4000:]}


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    a = parse_args(argv)
    if a.hf_worker is not None:
        hf_worker(json.loads(a.hf_worker))
        return 0
    budget = Budget(a.time_budget_s)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    info = device_info(a.device)
    work = Path(tempfile.mkdtemp(prefix="slipstream-bench-engine-"))
    try:
        context = a.prompt_len + a.new_tokens + 64
        t0 = time.monotonic()
        nbytes = make_model(work / "model", a.shape, context, a.dtype, a.device)
        vocab = SHAPES[a.shape][6]
        bw = bandwidth(a.device)
        result: dict[str, Any] = {
            "benchmark": "embedded engine (HTTP) vs transformers generate, same model and prompts, same run",
            "date": started, "command": command or "python -m producers.engine.bench " + " ".join(argv or sys.argv[1:]),
            "device": info,
            "model": {"shape": a.shape, "config": model_config(a.shape, context), "dtype": a.dtype, "bytes": nbytes,
                      "build_s": time.monotonic() - t0},
            "workload": {"batches": a.batches, "prompt_tokens": a.prompt_len, "new_tokens": a.new_tokens,
                         "sampling": "temperature 1.0, full vocabulary, EOS ignored"},
            "bandwidth": bw, "weight_read_limit_s": nbytes / bw["bytes_per_s"],
        }
        print(f"model {a.shape} {a.dtype}: {nbytes / 1e9:.3f} GB; copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s; "
              f"weight-read limit {result['weight_read_limit_s'] * 1e3:.3f} ms per step", flush=True)
        if a.device == "cuda":
            result["attention_microbench"] = _phase("attention", lambda: attention_microbench(
                max(a.batches), a.prompt_len + a.new_tokens, a.shape, a.dtype))
        result["engine"] = _phase("engine", lambda: bench_engine(work / "model", work, a, vocab, budget))
        samples = result["engine"].pop("samples", [])
        result["updates"] = (_phase("updates", lambda: bench_updates(work / "model", a, vocab, samples))
                             if a.update_pairs > 0 and budget.left(60) > 0 else None)
        if a.device == "cuda":  # the transformers baselines run next, in their own processes
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        result["transformers"] = _phase("transformers", lambda: bench_hf(work / "model", a, vocab, budget))
        result["summary"] = summarize(result)
        result["seconds"] = a.time_budget_s - budget.left(0)
        a.out.mkdir(parents=True, exist_ok=True)
        tag = "cpu" if a.device == "cpu" else info["gpu"].replace("NVIDIA ", "").split()[0].lower()
        path = a.out / f"{time.strftime('%Y-%m-%d')}-engine-{tag}.json"
        path.write_text(json.dumps(result, indent=2))
        print(table(result))
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
