"""Shared test helpers: start real slipstream processes, wait for their port files, read /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def torchrun(script: str | Path, *args: str, nproc: int = 2) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run ``script`` under ``torchrun --standalone`` with ``nproc``
    processes: :func:`env` (the repo on PYTHONPATH, one OpenMP thread each) minus any
    torch.distributed variables inherited from an enclosing launcher."""
    e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    return cmd, e


def wait_json(path: Path, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not written within {timeout_s}s")
        time.sleep(0.05)
    return json.loads(path.read_text())


@contextlib.contextmanager
def process(cmd: list[str], log_path: Path, timeout_s: float = 15.0) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` for the duration of the block; SIGTERM (then SIGKILL) it afterwards."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def scrape(url: str) -> dict[str, float]:
    """Parse a Prometheus text exposition into {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def broker_config(tmp_path: Path, queue_toml: str, group_size: int = 3) -> Path:
    """Write a broker-only config: a stand-in model dir (just config.json with vocab 16, which the
    broker reads to range-check token ids) and ``[queue]`` keys from ``queue_toml``."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"vocab_size": 16}))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[model]\npath = "{model}"\n[queue]\n{queue_toml.strip()}\n[producer]\ngroup_size = {group_size}\n')
    return cfg


def slipstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]
