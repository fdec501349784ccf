"""``slipstream bench``: benchmarks that record the command, the machine and a baseline run side
by side in the same run, and write JSON under ``bench/results/``.

- ``queue``: trajectories/s and per-trajectory overhead through a real broker process (producer
  DEALER -> broker -> trainer DEALER, with credits, validation, acks, leases and commits) against
  raw ZeroMQ moving the same encoded frames through a relay process (PUSH -> PULL/PUSH -> PULL).
- ``async``: wall-clock of the tiny example for the same number of steps with ``max_staleness``
  0 (synchronous) and 2 (asynchronous), on this machine.

    slipstream bench queue [--groups 2000] [--out bench/results]
    slipstream bench async [--steps 60]
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from schemas.codec import decode, encode
from schemas.messages import (
    Ack,
    Batch,
    BatchRequest,
    Commit,
    CommitAck,
    Credit,
    CreditRequest,
    Hello,
    Published,
    Trajectory,
    TrajectoryGroup,
    Welcome,
)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _group(seq: int, n: int, length: int) -> TrajectoryGroup:
    rng = np.random.default_rng(seq)
    trajs = [
        Trajectory(f"t{seq}-{i}", rng.integers(0, 100, 64).astype(np.int32), rng.integers(0, 100, length).astype(np.int32),
                   -rng.random(length).astype(np.float32), np.zeros(length, np.int32), np.ones(length, np.uint8), 0.5)
        for i in range(n)
    ]
    return TrajectoryGroup(f"g{seq}", f"p{seq}", "bench", 1, seq, trajs)


def _recv(sock: zmq.Socket, want: type, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sock.poll(100):
            msg = decode(sock.recv_multipart(copy=False))
            if isinstance(msg, want):
                return msg
    raise TimeoutError(f"bench: no {want.__name__} within {timeout_s}s")


def bench_broker(groups: int, group_size: int, length: int, workdir: Path) -> dict[str, Any]:
    cfg = workdir / "cfg.toml"
    model = workdir / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": 128}))
    per_step = 8
    cfg.write_text(f'[model]\npath = "{model}"\n[queue]\nmax_staleness = 100000\ngroups_per_step = {per_step}\n'
                   f'max_queued_trajectories = 100000\njournal = false\n[producer]\ngroup_size = {group_size}\n')
    run_dir = workdir / "run"
    log = (workdir / "broker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "broker", "--config", str(cfg), "--run-dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ports_file = run_dir / "ports" / "broker.json"
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("bench: broker did not start; see " + str(workdir / "broker.log"))
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())
        ctx = zmq.Context.instance()
        p = ctx.socket(zmq.DEALER)
        p.connect(f"tcp://127.0.0.1:{ports['producer_port']}")
        t = ctx.socket(zmq.DEALER)
        t.connect(f"tcp://127.0.0.1:{ports['trainer_port']}")
        frames = [[bytes(f) for f in encode(_group(i, group_size, length))] for i in range(groups)]
        p.send_multipart(encode(Hello(role="producer", peer_id="bench", epoch=1)))
        _recv(p, Welcome)
        t.send_multipart(encode(Hello(role="trainer", peer_id="bench-trainer")))
        _recv(t, Welcome)
        t0 = time.perf_counter()
        sent = acked = consumed = 0
        credits = 0
        version = 0
        p.send_multipart(encode(CreditRequest(want=groups)))
        requested = False
        while consumed < groups:
            while p.poll(0):
                msg = decode(p.recv_multipart(copy=False))
                if isinstance(msg, Credit):
                    credits += msg.granted
                elif isinstance(msg, Ack):
                    acked += 1
            while credits and sent < groups:
                p.send_multipart(frames[sent], copy=False)
                sent += 1
                credits -= 1
            if not requested and acked - consumed >= per_step:
                t.send_multipart(encode(BatchRequest(step=version + 1, policy_version=version, num_groups=per_step)))
                requested = True
            if requested and t.poll(1):
                batch = decode(t.recv_multipart(copy=False))
                if isinstance(batch, Batch):
                    version += 1
                    t.send_multipart(encode(Commit(batch.lease_id, version, version)))
                    _recv(t, CommitAck)
                    t.send_multipart(encode(Published(version)))
                    consumed += len(batch.groups)
                    requested = False
            elif not requested:
                p.poll(1)
        elapsed = time.perf_counter() - t0
        p.close(0)
        t.close(0)
        return {"groups": groups, "trajectories": groups * group_size, "seconds": elapsed,
                "trajectories_per_s": groups * group_size / elapsed, "us_per_trajectory": elapsed / (groups * group_size) * 1e6}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


_RELAY = """
import sys, zmq
ctx = zmq.Context(); a = ctx.socket(zmq.PULL); b = ctx.socket(zmq.PUSH)
for s in (a, b): s.setsockopt(zmq.SNDHWM, 1000); s.setsockopt(zmq.RCVHWM, 1000); s.setsockopt(zmq.LINGER, 0)
pa = a.bind_to_random_port("tcp://127.0.0.1"); pb = b.bind_to_random_port("tcp://127.0.0.1")
print(pa, pb, flush=True)
n = int(sys.argv[1])
for _ in range(n):
    b.send_multipart(a.recv_multipart(copy=False), copy=False)
"""


def bench_raw(groups: int, group_size: int, length: int) -> dict[str, Any]:
    frames = [[bytes(f) for f in encode(_group(i, group_size, length))] for i in range(groups)]
    proc = subprocess.Popen([sys.executable, "-c", _RELAY, str(groups)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pa, pb = map(int, proc.stdout.readline().split())
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{pa}")
        pull = ctx.socket(zmq.PULL)
        pull.connect(f"tcp://127.0.0.1:{pb}")
        t0 = time.perf_counter()
        sent = got = 0
        while got < groups:
            while sent < groups and sent - got < 500:
                push.send_multipart(frames[sent], copy=False)
                sent += 1
            pull.recv_multipart(copy=False)
            got += 1
        elapsed = time.perf_counter() - t0
        push.close(0)
        pull.close(0)
        return {"groups": groups, "trajectories": groups * group_size, "seconds": elapsed,
                "trajectories_per_s": groups * group_size / elapsed, "us_per_trajectory": elapsed / (groups * group_size) * 1e6}
    finally:
        proc.wait(30)


def run_queue(groups: int, out_dir: Path, command: str) -> dict[str, Any]:
    group_size, length = 8, 256
    with tempfile.TemporaryDirectory() as d:
        raw = bench_raw(groups, group_size, length)
        broker = bench_broker(groups, group_size, length, Path(d))
    result = {
        "benchmark": "queue overhead: broker vs raw ZeroMQ relay (same frames, same machine, same run)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "machine": machine(),
        "workload": {"groups": groups, "group_size": group_size, "response_tokens": length, "prompt_tokens": 64},
        "baseline_raw_zmq_relay": raw,
        "slipstream_broker": broker,
        "overhead_us_per_trajectory": broker["us_per_trajectory"] - raw["us_per_trajectory"],
        "broker_vs_raw_throughput": broker["trajectories_per_s"] / raw["trajectories_per_s"],
    }
    _write(out_dir, "queue", result)
    return result


def run_async(steps: int, out_dir: Path, command: str) -> dict[str, Any]:
    repo = Path(__file__).resolve().parent.parent
    cfg = repo / "examples" / "tiny" / "config.toml"
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for eta in (0, 2):
            rd = Path(d) / f"eta{eta}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(cfg), "--run-dir", str(rd), "--set", f"run.steps={steps}",
                                "--set", f"queue.max_staleness={eta}", "--set", "run.verify_weights=false",
                                "--set", f"model.path='{Path(d) / 'model'}'"], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise RuntimeError(f"bench async: run with max_staleness={eta} failed:\n{r.stderr[-2000:]}")
            lines = (rd / "steps.jsonl").read_text().splitlines()
            last = json.loads(lines[-1])
            runs[f"max_staleness_{eta}"] = {"steps": len(lines), "trainer_loop_seconds": last["wall_time_s"], "process_wall_seconds": wall,
                                            "reward_last10": sum(json.loads(x)["reward_mean"] for x in lines[-10:]) / 10}
    result = {
        "benchmark": "async (max_staleness=2) vs synchronous (max_staleness=0) wall-clock, tiny example, same steps, same machine",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": command,
        "machine": machine(),
        "runs": runs,
        "speedup_trainer_loop": runs["max_staleness_0"]["trainer_loop_seconds"] / runs["max_staleness_2"]["trainer_loop_seconds"],
    }
    _write(out_dir, "async", result)
    return result


def _write(out_dir: Path, name: str, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y-%m-%d')}-{name}-cpu.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    print(json.dumps(result, indent=2))
