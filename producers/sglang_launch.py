"""SGLang servers launched by slipstream (``producer.engine = "sglang"``): flags, GPUs, health, router.

What:
- :func:`validate_sglang_flags` checks every ``producer.sglang`` key (``--sglang-*`` flags) against
  the fields of SGLang's ``ServerArgs`` (:mod:`producers.sglang_args`: the installed sglang's
  source, else the list recorded from 0.5.23).  An unknown flag, a flag slipstream sets itself
  (model path, host, port) or a value of the wrong shape is a ConfigError naming the key.
- :func:`server_argv` builds ``python -m sglang.launch_server --model-path M --host H --port P
  --weight-version 0`` plus one flag per ``producer.sglang`` key (``true`` -> a bare store-true flag,
  ``false`` -> left out, a list -> several values, a table -> JSON).
- :func:`gpu_slices` gives server ``i`` its GPUs (``CUDA_VISIBLE_DEVICES``): ``tp x pp x dp`` of them
  (from the flags), consecutive from ``producer.sglang_gpu_ids`` (default 0, 1, ...).
- :func:`router_argv` builds ``python -m sglang_router.launch_router --worker-urls ...`` when
  ``producer.sglang_router`` is on; producers then generate through the router while the trainer
  still publishes weights to each server.
- :func:`wait_healthy` polls ``GET /health`` until it answers 200 (the launcher's readiness check for
  these servers; the embedded engine writes a port file instead).

The launcher (``pipeline/launcher.py``) starts the servers with these, supervises them like its
other children (a server that dies is restarted on the same port, up to ``run.max_restarts``;
the trainer's ``weights.resync_engines`` then brings it up to date) and stops them with SIGTERM.

Why: so a run can bring its own SGLang (slime's and verl's users pass ``--sglang-*`` flags), with
flags that are checked before anything starts.  SGLang itself cannot run on slipstream's test
machines: the launch path is tested against ``tests/sglang_standin.py`` (records its argv, serves
the HTTP subset with the embedded engine) and the argv against ``ServerArgs`` in the 0.5.23 wheel
(``tests/test_sglang_launch.py``).  No real SGLang server has been started by these tests.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from pipeline.configbase import ConfigError

log = logging.getLogger(__name__)

KEY = "producer.sglang"
#: ServerArgs fields slipstream sets itself on every server it launches.
RESERVED = ("model_path", "host", "port", "weight_version")


def _fields() -> tuple[dict[str, dict[str, Any]], dict[str, str], str]:
    from producers.sglang_args import flag_index, server_fields

    fields, where = server_fields()
    return fields, flag_index(fields), where


def normalise(flags: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{config key: (ServerArgs field, value)}``; raises ConfigError for unknown or reserved keys."""
    import difflib

    fields, index, where = _fields()
    out: dict[str, tuple[str, Any]] = {}
    for key, value in flags.items():
        name = index.get(key.replace("-", "_").lstrip("_"))
        if name is None:
            close = difflib.get_close_matches(key.replace("-", "_"), list(index), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{KEY}.{key}", f"--{key.replace('_', '-')} is not a flag of SGLang's ServerArgs{hint}; checked against {where}")
        if name in RESERVED:
            raise ConfigError(f"{KEY}.{key}", f"--{key.replace('_', '-')} is set by slipstream itself (model.path, the launcher's host and port, "
                                              "version 0): remove it")
        kind = fields[name]["kind"]
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{KEY}.{key}", f"--{key.replace('_', '-')} is a switch: expected true/false, got {value!r}")
        if kind != "bool" and isinstance(value, bool) and value is False:
            raise ConfigError(f"{KEY}.{key}", f"--{key.replace('_', '-')} takes a value, got false")
        out[key] = (name, value)
    return out


def validate_sglang_flags(flags: dict[str, Any]) -> None:
    normalise(flags)


def flag_args(flags: dict[str, Any]) -> list[str]:
    """The command-line arguments of ``producer.sglang`` (validated)."""
    fields, _, _ = _fields()
    args: list[str] = []
    for _key, (name, value) in normalise(flags).items():
        flag = fields[name]["flags"][0]
        if fields[name]["kind"] == "bool":
            if value:
                args.append(flag)
        elif isinstance(value, list):
            args += [flag, *(json.dumps(v) if isinstance(v, dict | list) else str(v) for v in value)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, bool):
            args += [flag, "true"]
        else:
            args += [flag, str(value)]
    return args


def server_argv(command: list[str], model_path: str, host: str, port: int, flags: dict[str, Any]) -> list[str]:
    base = list(command) or [sys.executable, "-m", "sglang.launch_server"]
    return [*base, "--model-path", model_path, "--host", host, "--port", str(port), "--weight-version", "0", *flag_args(flags)]


def gpus_per_server(flags: dict[str, Any], override: int = 0) -> int:
    """GPUs one server uses: ``override`` if set, else tp x pp x dp from the flags (default 1 each)."""
    if override:
        return override
    sizes = {"tp_size": 1, "pp_size": 1, "dp_size": 1}
    for _key, (name, value) in normalise(flags).items():
        if name in sizes:
            sizes[name] = int(value)
    return sizes["tp_size"] * sizes["pp_size"] * sizes["dp_size"]


def gpu_slices(num_servers: int, per_server: int, gpu_ids: list[int]) -> list[list[int]]:
    """Consecutive, disjoint GPU ids for each server (``gpu_ids`` empty = 0, 1, 2, ...)."""
    need = num_servers * per_server
    ids = list(gpu_ids) or list(range(need))
    if len(ids) < need:
        raise ConfigError("producer.sglang_gpu_ids", f"{num_servers} SGLang servers x {per_server} GPUs need {need} GPU ids, got {ids}")
    return [ids[i * per_server:(i + 1) * per_server] for i in range(num_servers)]


def router_argv(command: list[str], host: str, port: int, worker_urls: list[str]) -> list[str]:
    base = list(command) or [sys.executable, "-m", "sglang_router.launch_router"]
    return [*base, "--host", host, "--port", str(port), "--worker-urls", *worker_urls]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float, what: str, alive: Callable[[], bool] | None = None, poll_s: float = 0.25) -> None:
    """Poll ``GET url/health`` until 200; ``alive()`` False aborts (the process died)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    log.info("waiting up to %.0fs for %s at %s/health", timeout_s, what, url)
    while True:
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited before it was ready (waited for {url}/health: {last})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2.0) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not healthy after {timeout_s:.0f}s (GET {url}/health: {last}); see its log, "
                               "or raise run.startup_timeout_s")
        time.sleep(poll_s)


def plan(cfg: Any, host: str) -> list[dict[str, Any]]:
    """One entry per server to start: name, argv, env (CUDA_VISIBLE_DEVICES), url; and the router
    (``role`` "router") last when ``producer.sglang_router`` is on.  Ports are picked free now and
    kept across restarts."""
    p = cfg.producer
    per = gpus_per_server(p.sglang, p.sglang_gpus_per_server)
    out = []
    for i, gpus in enumerate(gpu_slices(p.num_engines, per, list(p.sglang_gpu_ids))):
        port = free_port(host)
        out.append({"name": f"sglang-{i}", "role": "server", "url": f"http://{host}:{port}",
                    "argv": server_argv(list(p.sglang_command), cfg.model.path, host, port, p.sglang),
                    "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}})
    if p.sglang_router:
        port = free_port(host)
        out.append({"name": "sglang-router", "role": "router", "url": f"http://{host}:{port}",
                    "argv": router_argv(list(p.sglang_router_command), host, port, [s["url"] for s in out]), "env": {}})
    return out
