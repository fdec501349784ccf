"""Helpers for the embedded-engine tests: start a real engine subprocess and talk HTTP to it.

No tests here; the other ``tests/test_engine_*.py`` modules import it as ``tests.test_engine_helpers``.
Engines are started exactly as the launcher does:
``python -m producers.engine --model DIR --port 0 --port-file FILE``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Engine:
    """A running ``python -m producers.engine`` subprocess."""

    def __init__(self, model_dir: Path, workdir: Path, *args: str, startup_timeout: float = 90.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file = workdir / "port"
        self.log_path = workdir / "engine.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producers.engine", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", "0", "--port-file", str(self.port_file), "--log-level", "INFO", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        deadline = time.monotonic() + startup_timeout
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"engine did not start (rc={self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())
        self.base = f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-n:]

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, status = resp.read(), resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def post(self, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
        return self.request("POST", path, {} if body is None else body, timeout)

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, Any]:
        return self.request("GET", path, None, timeout)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, out = self.request(method, path, body)
        assert status == 200, (status, out)
        return out

    def generate(self, body: dict[str, Any]) -> Any:
        return self.ok("POST", "/generate", body)

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def version(self) -> int:
        return int(self.ok("GET", "/get_model_info")["weight_version"])

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn() on a thread; the result (or exception) lands in the returned dict under 'out'/'err'."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def reference_logprobs(model: torch.nn.Module, prompt: list[int], output: list[int], temperature: float) -> list[float]:
    """Log-probs of ``output`` under a plain transformers forward over prompt+output (the independent check)."""
    ids = torch.tensor([prompt + output])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    scale = temperature if temperature >= 1e-6 else 1.0
    logp = torch.log_softmax(logits / scale, dim=-1)
    return [float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(output)]


def load_reference(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model
