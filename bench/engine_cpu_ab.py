"""The embedded engine on CPU, before and after a change: two checkouts, the same HTTP workloads,
alternating rounds (the machine is shared, so each round compares neighbours in time).

Workloads (tiny 2-layer Qwen3 model, one engine subprocess per checkout and workload):
- ``tiny_example``: the tiny example's generation pattern: 8 concurrent /generate calls of 8
  maxdigit-style prompts, 7 new tokens, ``max_running_requests=128``, 30 rounds;
- ``long_b64``: one call of 64 prompts x 200 new tokens;  ``long_b1``: one prompt x 200 new tokens.

    python bench/engine_cpu_ab.py --before /tmp/engine-before --after . --rounds 3 --out bench/results
    # /tmp/engine-before: e.g. `git archive <commit> | tar -x -C /tmp/engine-before`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp


def start(repo: Path, model: Path, tmp: Path, *sets: str) -> tuple[subprocess.Popen[bytes], str]:
    pf = tmp / f"port-{time.monotonic_ns()}"
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "producers.engine", "--model", str(model), "--port", "0", "--port-file", str(pf)]
    for s in sets:
        args += ["--set", s]
    log = (tmp / "engine.log").open("a")
    proc = subprocess.Popen(args, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not pf.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"engine from {repo} did not start (waited for its port file)")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{int(pf.read_text())}"


async def workload(url: str, group: int, new: int, prompt: Any, conc: int, rounds: int) -> float:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def one(i: int) -> int:
            body = {"input_ids": [prompt(i, j) for j in range(group)], "return_logprob": True,
                    "sampling_params": {"max_new_tokens": new, "temperature": 1.0, "ignore_eos": True}}
            async with s.post(url + "/generate", json=body) as r:
                res = await r.json()
            return sum(len(x["output_ids"]) for x in res)

        await asyncio.gather(*[one(i) for i in range(conc)])  # warm-up
        t0, toks = time.perf_counter(), 0
        for r in range(rounds):
            toks += sum(await asyncio.gather(*[one(r * conc + i) for i in range(conc)]))
        return toks / (time.perf_counter() - t0)


def measure(repo: Path, tmp: Path) -> dict[str, float]:
    sys.path.insert(0, str(repo))
    from pipeline.tiny import make_tiny_model

    rng = random.Random(0)

    def digits(i: int, j: int) -> list[int]:
        return [1] + [3 + rng.randrange(10) for _ in range(3 + (i + j) % 3)] + [13]

    out: dict[str, float] = {}
    m1 = tmp / "m1" if (tmp / "m1").exists() else make_tiny_model(tmp / "m1")
    p, url = start(repo, m1, tmp, "max_running_requests=128")
    try:
        out["tiny_example_tok_s"] = asyncio.run(workload(url, 8, 7, digits, 8, 30))
    finally:
        p.terminate()
        p.wait(30)
    m2 = tmp / "m2" if (tmp / "m2").exists() else make_tiny_model(tmp / "m2", max_position_embeddings=1024)
    p, url = start(repo, m2, tmp, "max_running_requests=64")
    try:
        out["long_b64_tok_s"] = asyncio.run(workload(
            url, 64, 200, lambda i, j: [1] + [3 + (i * 7 + j * 3 + k) % 10 for k in range(15)], 1, 2))
        out["long_b1_tok_s"] = asyncio.run(workload(url, 1, 200, lambda i, j: [1, 4, 5, 6], 1, 3))
    finally:
        p.terminate()
        p.wait(30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            for label, repo in (("before", a.before), ("after", a.after)):
                # each measurement in a fresh interpreter, so the two checkouts' modules never mix
                code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import engine_cpu_ab as m; "
                        f"from pathlib import Path; print(json.dumps(m.measure(Path({str(repo.resolve())!r}), Path({d!r}))))")
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
                row = {"round": r + 1, "which": label, "load_avg_1m": os.getloadavg()[0],
                       **json.loads(res.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                rounds.append(row)
    result = {"benchmark": "embedded engine on CPU, before vs after, alternating rounds",
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": "python " + " ".join(sys.argv), "machine": {"cores": os.cpu_count(), "uname": os.uname().release},
              "rounds": rounds}
    for key in ("tiny_example_tok_s", "long_b64_tok_s", "long_b1_tok_s"):
        pairs = [(b[key], f[key]) for b, f in zip(rounds[::2], rounds[1::2], strict=True)]
        result[f"{key}_after_over_before"] = [f / b for b, f in pairs]
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"{time.strftime('%Y-%m-%d')}-engine-cpu-before-after.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
