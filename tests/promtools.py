"""Find Prometheus's binaries for the monitoring tests: on PATH, else in .ci/prometheus/usr/bin
(where .ci/run unpacks Debian's package).  Tests skip, saying how to get them, when absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL_BIN = REPO / ".ci" / "prometheus" / "usr" / "bin"
HOW = ("get them with: mkdir -p .ci/prometheus && cd .ci/prometheus && apt-get download prometheus "
       "&& dpkg -x prometheus_*.deb .  (.ci/run does this)")


def find(binary: str) -> str | None:
    path = shutil.which(binary)
    if path:
        return path
    local = LOCAL_BIN / binary
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


def require(binary: str) -> str:
    path = find(binary)
    if path is None:
        pytest.skip(f"{binary} not found on PATH or in {LOCAL_BIN}; {HOW}")
    return path
