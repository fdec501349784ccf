"""``slipstream bench``: benchmarks that record the command, the machine and a baseline run side
by side in the same run, and write JSON under ``bench/results/``.

- ``queue``: trajectories/s and per-trajectory overhead through a real broker process (producer
  DEALER -> broker -> trainer DEALER, with credits, validation, acks, leases and commits) against
  raw ZeroMQ moving the same encoded frames through a relay process (PUSH -> PULL/PUSH -> PULL).
- ``async``: wall-clock of the tiny example for the same number of steps with ``max_staleness``
  0 (synchronous) and 2 (asynchronous), on this machine.

    slipstream bench queue [--groups 2000] [--out bench/results]
    slipstream bench async [--steps 60]

Every socket wait has a deadline (``WAIT_S``, or the caller's ``timeout_s``); when it passes, a
:class:`BenchTimeout` says what was awaited and how far the run got, instead of hanging (issue 19:
the raw relay used to exit with ``LINGER 0`` and drop its last frames, so the baseline's
``recv_multipart`` waited forever).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def _group(seq: int, n: int, length: int, epoch: int = 1) -> TrajectoryGroup:
    rng = np.random.default_rng(seq)
    trajs = [
        Trajectory(f"t{seq}-{i}", rng.integers(0, 100, 64).astype(np.int32), rng.integers(0, 100, length).astype(np.int32),
                   -rng.random(length).astype(np.float32), np.zeros(length, np.int32), np.ones(length, np.uint8), 0.5)
        for i in range(n)
    ]
    return TrajectoryGroup(f"g{seq}", f"p{seq}", "bench", epoch, seq, trajs)


#: the longest any single socket wait of a benchmark may take (seconds)
WAIT_S = 30.0


class BenchTimeout(TimeoutError):
    """A benchmark's socket wait ran past its deadline (the message says what it waited for)."""


def _wait_readable(sock: zmq.Socket, deadline: float, what: str) -> None:
    """Block until ``sock`` has a message or ``deadline`` (monotonic) passes."""
    left = deadline - time.monotonic()
    if left <= 0 or not sock.poll(max(1, int(left * 1000))):
        raise BenchTimeout(f"bench: no {what} within the deadline")


def _recv(sock: zmq.Socket, want: type, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        _wait_readable(sock, deadline, f"{want.__name__} from the broker (waited {timeout_s:.0f}s)")
        msg = decode(sock.recv_multipart(copy=False))
        if isinstance(msg, want):
            return msg


PER_STEP = 8  # groups per trainer step of the queue benchmark


@contextlib.contextmanager
def broker_process(workdir: Path, group_size: int, timeout_s: float = WAIT_S) -> Iterator[dict[str, int]]:
    """A real ``slipstream broker`` process (journal off) for the queue benchmark; yields its ports."""
    cfg = workdir / "cfg.toml"
    model = workdir / "model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": 128}))
    cfg.write_text(f'[model]\npath = "{model}"\n[queue]\nmax_staleness = 100000\ngroups_per_step = {PER_STEP}\n'
                   f'max_queued_trajectories = 100000\njournal = false\n[producer]\ngroup_size = {group_size}\n')
    run_dir = workdir / "run"
    log = (workdir / "broker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "broker", "--config", str(cfg), "--run-dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ports_file = run_dir / "ports" / "broker.json"
        deadline = time.monotonic() + max(60.0, timeout_s)
        while not ports_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchTimeout(f"bench: the broker did not write {ports_file} within {max(60.0, timeout_s):.0f}s "
                                   f"(exit code {proc.poll()}); see {workdir / 'broker.log'}")
            time.sleep(0.05)
        yield json.loads(ports_file.read_text())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
        log.close()


def bench_broker(groups: int, group_size: int, length: int, workdir: Path, timeout_s: float = WAIT_S,
                 ports: dict[str, int] | None = None, epoch: int = 1) -> dict[str, Any]:
    """Move ``groups`` groups producer -> broker -> trainer (credits, acks, leases, commits). With
    ``ports`` it drives that running broker (``epoch`` must be new to it), else it starts one."""
    if ports is None:
        with broker_process(workdir, group_size, timeout_s) as started:
            return bench_broker(groups, group_size, length, workdir, timeout_s, started, epoch)
    per_step = PER_STEP
    ctx = zmq.Context.instance()
    p = ctx.socket(zmq.DEALER)
    t = ctx.socket(zmq.DEALER)
    try:
        p.connect(f"tcp://127.0.0.1:{ports['producer_port']}")
        t.connect(f"tcp://127.0.0.1:{ports['trainer_port']}")
        frames = [[bytes(f) for f in encode(_group(i, group_size, length, epoch))] for i in range(groups)]
        for sock in (p, t):
            sock.setsockopt(zmq.LINGER, 0)
        p.send_multipart(encode(Hello(role="producer", peer_id="bench", epoch=epoch)))
        _recv(p, Welcome, timeout_s)
        t.send_multipart(encode(Hello(role="trainer", peer_id="bench-trainer")))
        _recv(t, Welcome, timeout_s)
        t0 = time.perf_counter()
        sent = acked = consumed = 0
        credits = 0
        version = 0
        p.send_multipart(encode(CreditRequest(want=groups)))
        requested = False
        progress = time.monotonic()  # the last time anything arrived: a stall past timeout_s fails the bench
        while consumed < groups:
            if time.monotonic() - progress > timeout_s:
                raise BenchTimeout(f"bench: broker made no progress for {timeout_s:.0f}s (sent {sent}, acked {acked}, "
                                   f"consumed {consumed} of {groups} groups, credits {credits}, batch requested: {requested})")
            while p.poll(0):
                msg = decode(p.recv_multipart(copy=False))
                if isinstance(msg, Credit):  # progress; heartbeats are not
                    credits += msg.granted
                    progress = time.monotonic()
                elif isinstance(msg, Ack):
                    acked += 1
                    progress = time.monotonic()
            while credits and sent < groups:
                p.send_multipart(frames[sent], copy=False)
                sent += 1
                credits -= 1
            want = min(per_step, groups - consumed)
            if not requested and acked - consumed >= want:
                t.send_multipart(encode(BatchRequest(step=version + 1, policy_version=version, num_groups=want)))
                requested = True
            if requested and t.poll(1):
                batch = decode(t.recv_multipart(copy=False))
                if isinstance(batch, Batch):
                    progress = time.monotonic()
                    version += 1
                    t.send_multipart(encode(Commit(batch.lease_id, version, version)))
                    _recv(t, CommitAck, timeout_s)
                    t.send_multipart(encode(Published(version)))
                    consumed += len(batch.groups)
                    requested = False
            elif not requested:
                p.poll(1)
        elapsed = time.perf_counter() - t0
    finally:
        p.close(0)
        t.close(0)
    return {"groups": groups, "trajectories": groups * group_size, "seconds": elapsed,
            "trajectories_per_s": groups * group_size / elapsed, "us_per_trajectory": elapsed / (groups * group_size) * 1e6}


_RELAY = """
import sys, zmq
ctx = zmq.Context(); a = ctx.socket(zmq.PULL); b = ctx.socket(zmq.PUSH)
timeout_ms = int(float(sys.argv[2]) * 1000)
# LINGER > 0: after the last relayed message the process exits, and LINGER 0 would drop the frames
# still queued in b (the baseline's hang, issue 19); a bounded linger delivers them or gives up.
for s in (a, b): s.setsockopt(zmq.SNDHWM, 1000); s.setsockopt(zmq.RCVHWM, 1000); s.setsockopt(zmq.LINGER, timeout_ms)
a.setsockopt(zmq.RCVTIMEO, timeout_ms); b.setsockopt(zmq.SNDTIMEO, timeout_ms)
pa = a.bind_to_random_port("tcp://127.0.0.1"); pb = b.bind_to_random_port("tcp://127.0.0.1")
print(pa, pb, flush=True)
n = int(sys.argv[1])
for i in range(n):
    try:
        b.send_multipart(a.recv_multipart(copy=False), copy=False)
    except zmq.Again:
        sys.exit(f"bench relay: message {i} of {n} not received or not forwarded within {timeout_ms} ms")
ctx.destroy(linger=timeout_ms)  # closes both sockets; b delivers what it still holds first
"""


def bench_raw(groups: int, group_size: int, length: int, timeout_s: float = WAIT_S) -> dict[str, Any]:
    frames = [[bytes(f) for f in encode(_group(i, group_size, length))] for i in range(groups)]
    proc = subprocess.Popen([sys.executable, "-c", _RELAY, str(groups), str(timeout_s)], stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        ready = ""
        while not ready:  # the relay prints its two ports once bound
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchTimeout(f"bench: the raw relay process did not report its ports within {timeout_s:.0f}s (exit code {proc.poll()})")
            ready = proc.stdout.readline()
        pa, pb = map(int, ready.split())
        for sock in (push, pull):
            sock.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        push.connect(f"tcp://127.0.0.1:{pa}")
        pull.connect(f"tcp://127.0.0.1:{pb}")
        t0 = time.perf_counter()
        sent = got = 0
        while got < groups:
            while sent < groups and sent - got < 500:
                try:
                    push.send_multipart(frames[sent], copy=False)
                except zmq.Again:
                    raise BenchTimeout(f"bench: the raw relay took no message for {timeout_s:.0f}s (sent {sent}, got back {got} of {groups})") from None
                sent += 1
            _wait_readable(pull, time.monotonic() + timeout_s,
                           f"message back from the raw relay after {timeout_s:.0f}s (sent {sent}, got back {got} of {groups}; relay exit code {proc.poll()})")
            pull.recv_multipart(copy=False)
            got += 1
        elapsed = time.perf_counter() - t0
        return {"groups": groups, "trajectories": groups * group_size, "seconds": elapsed,
                "trajectories_per_s": groups * group_size / elapsed, "us_per_trajectory": elapsed / (groups * group_size) * 1e6}
    finally:
        push.close(0)
        pull.close(0)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def run_queue(groups: int, out_dir: Path, command: str, group_size: int = 8, length: int = 256,
              timeout_s: float = WAIT_S, name: str = "queue", ports: dict[str, int] | None = None,
              epoch: int = 1) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        raw = bench_raw(groups, group_size, length, timeout_s)
        broker = bench_broker(groups, group_size, length, Path(d), timeout_s, ports, epoch)
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
    _write(out_dir, name, result)
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
