"""Prometheus plumbing shared by every slipstream process.

Each process owns one :class:`prometheus_client.CollectorRegistry` (never the global default), made
by :func:`new_registry`, which also registers ``slipstream_build_info`` and the standard process
metrics.  Metric names start with ``slipstream_``, use base units (``_seconds``, ``_bytes``),
counters end in ``_total``, and labels take values from small fixed sets.

    registry = new_registry("broker")
    depth = Gauge("slipstream_queue_depth_trajectories", "...", registry=registry)
    server = serve_metrics(registry, host="127.0.0.1", port=0)   # -> (server, bound_port)
"""

from __future__ import annotations

import os
import platform
import threading
from http.server import ThreadingHTTPServer

os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import MetricsHandler

from pipeline import __version__

VERSION = __version__

# Explicit histogram buckets (base units).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def new_registry(role: str) -> CollectorRegistry:
    """A fresh registry with build info and process metrics for a process of ``role``."""
    registry = CollectorRegistry(auto_describe=True)
    info = Gauge(
        "slipstream_build_info",
        "Build information; always 1.",
        ["version", "role", "python"],
        registry=registry,
    )
    info.labels(VERSION, role, platform.python_version()).set(1)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def policy_version_gauge(registry: CollectorRegistry) -> Gauge:
    """``slipstream_policy_version{role}``: the one definition every role (broker, producer,
    trainer) registers (DESIGN §9: the current policy version per process)."""
    return Gauge("slipstream_policy_version", "Policy version this process knows to be published.", ["role"], registry=registry)


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of the text exposition, for HTTP servers that serve /metrics themselves."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, int]:
    """Serve ``/metrics`` (and ``/health``) for ``registry`` on a daemon thread. Returns the server
    (call ``shutdown()`` to stop) and the bound port (useful with ``port=0``)."""
    metrics_handler = MetricsHandler.factory(registry)

    class Handler(metrics_handler):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            if self.path.startswith("/health"):
                body = b'{"status": "ok"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # silence per-request logs
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, server.server_address[1]
