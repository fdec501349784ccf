"""Durability benchmark: trajectories/s through a real broker process with the journal off, on
with ``journal_fsync = "never"``, and on with ``"always"``, side by side in one run.

One producer (a DEALER in this process) keeps ``--window`` groups in flight and counts acks, so
the number is the broker's accept rate (decode, validate, journal, ack), not generation speed.
Results go to ``bench/results/journal-<date>.json`` with the machine (CPU model, cores), the
journal's filesystem, the date and the command line.

    python bench/journal.py [--groups 2000] [--group-size 8] [--response-tokens 256] [--window 64] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from schemas.codec import decode, encode  # noqa: E402
from schemas.messages import Ack, Error, Hello, Trajectory, TrajectoryGroup, Welcome  # noqa: E402

MODES = {"off": ["queue.journal=false"], "fsync_never": ['queue.journal_fsync="never"'], "fsync_always": ['queue.journal_fsync="always"']}


def make_group(seq: int, group_size: int, n_resp: int, rng: np.random.Generator) -> TrajectoryGroup:
    trajs = [Trajectory(
        trajectory_id=f"b-{seq}-{i}", prompt_tokens=rng.integers(0, 1000, 64).astype(np.int32),
        response_tokens=rng.integers(0, 1000, n_resp).astype(np.int32), logprobs=-rng.random(n_resp).astype(np.float32),
        versions=np.zeros(n_resp, np.int32), loss_mask=np.ones(n_resp, np.uint8), reward=1.0,
    ) for i in range(group_size)]
    return TrajectoryGroup(f"g{seq}", f"p{seq}", "bench", 1, seq, trajs, {})


def run_mode(mode: str, workdir: Path, frames: list[list[bytes]], window: int, group_size: int) -> dict:
    run_dir = workdir / mode
    model = workdir / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    overrides = [f"model.path='{model}'", f"producer.group_size={group_size}", "queue.max_queued_trajectories=10000000",
                 "queue.max_queued_bytes=68719476736", "queue.socket_hwm=100000", "metrics.enabled=false", *MODES[mode]]
    cmd = [sys.executable, "-m", "pipeline.cli", "broker", "--config", str(_cfg(workdir)), "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = (workdir / f"{mode}.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        port_file = run_dir / "ports" / "broker.json"
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker ({mode}) did not start; see {workdir / f'{mode}.log'}")
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["producer_port"]
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart(encode(Hello(role="producer", peer_id="bench", epoch=1)))
        _recv_until(sock, Welcome)
        t0 = time.perf_counter()
        sent = acked = 0
        while acked < len(frames):
            while sent < len(frames) and sent - acked < window:
                sock.send_multipart(frames[sent], copy=False)
                sent += 1
            msg = _recv_until(sock, (Ack, Error))
            if isinstance(msg, Error):
                raise RuntimeError(f"broker rejected a benchmark group: {msg}")
            acked += 1
        dt = time.perf_counter() - t0
        sock.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    journal = run_dir / "journal"
    return {
        "mode": mode, "groups": len(frames), "trajectories": len(frames) * group_size, "seconds": round(dt, 3),
        "trajectories_per_s": round(len(frames) * group_size / dt, 1), "groups_per_s": round(len(frames) / dt, 1),
        "journal_bytes": sum(p.stat().st_size for p in journal.glob("*.journal")) if journal.exists() else 0,
    }


def _cfg(workdir: Path) -> Path:
    p = workdir / "bench.toml"
    p.write_text("")
    return p


def _recv_until(sock: zmq.Socket, want: type | tuple[type, ...], timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(1000):
            msg = decode(sock.recv_multipart(), None)
            if isinstance(msg, want):
                return msg
    raise TimeoutError(f"benchmark waited {timeout_s}s for {want} from the broker")


def machine(workdir: Path) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    fs = subprocess.run(["df", "-T", str(workdir)], capture_output=True, text=True).stdout.splitlines()[-1].split()
    return {"cpu_model": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "journal_filesystem": {"type": fs[1], "mount": fs[-1]} if len(fs) > 2 else {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--window", type=int, default=64, help="groups in flight (unacked) at once")
    ap.add_argument("--dir", type=Path, default=None, help="where the journals go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / f"journal-{time.strftime('%Y-%m-%d')}.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    frames = [[bytes(f) for f in encode(make_group(s, args.group_size, args.response_tokens, rng))] for s in range(args.groups)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        results = [run_mode(mode, workdir, frames, args.window, args.group_size) for mode in MODES]
        info = machine(workdir)
    base = results[0]["trajectories_per_s"]
    for r in results:
        r["relative_to_off"] = round(r["trajectories_per_s"] / base, 3)
    out = {"benchmark": "journal", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join([sys.executable, *sys.argv]),
           "machine": info, "params": {"groups": args.groups, "group_size": args.group_size, "response_tokens": args.response_tokens,
                                       "window": args.window, "group_bytes": sum(len(f) for f in frames[0])}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for r in results:
        print(f"{r['mode']:>13}: {r['trajectories_per_s']:>9.0f} trajectories/s ({r['relative_to_off']:.2f}x of journal off)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
