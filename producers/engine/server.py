"""HTTP server of the embedded engine: SGLang's HTTP API subset over aiohttp, plus ``main()``.

What: loads a Hugging Face causal LM through transformers, starts the decode scheduler
(``decode.py``) and the weight receiver (``weights.py``) and serves:

- ``POST /generate`` (``input_ids`` single or batch, ``sampling_params``, ``return_logprob``, ``rid``);
- ``GET /health``, ``/health_generate``, ``/get_model_info``, ``/get_server_info``, ``/metrics``;
- ``POST /pause_generation`` (``abort`` | ``retract`` | ``in_place``), ``/continue_generation``,
  ``/abort_request``, ``/flush_cache`` (GET too; a no-op: there is no prefix cache);
- ``POST /init_weights_update_group``, ``/destroy_weights_update_group``,
  ``/update_weights_from_distributed``, ``/update_weight_version``;
- ``GET /slipstream/weights_checksum`` (slipstream extension, for tests and debugging);
- ``POST /start_profile``, ``/stop_profile`` (SGLang's: a torch.profiler window over decode steps,
  ``profile_routes.py``).

Why: the producer's HTTP client is the one used against real SGLang servers, so the embedded
engine must speak the same fields (``docs/notes/sglang-0.5.23-api.md``).  The event loop only parses,
validates and waits: the model runs on the scheduler thread and broadcasts are received on the
weight-receive thread, so neither blocks HTTP nor decoding.

Contract notes (where this engine differs from, or extends, SGLang):
- ``text`` in responses is always ``""`` (no detokenization); text prompts are refused (400).
- ``meta_info`` adds ``output_token_weight_versions`` (policy version per token) and
  ``output_token_times`` (engine monotonic clock per token).  Update replies add ``pause_seconds``,
  ``adopted`` and ``timings`` (where the request spent its time); a multi-part update's reply
  (``slipstream_parts``, one part per trainer pipeline stage) adds ``parts``.
- ``pause_generation`` mode ``retract`` drops the KV caches of running sequences and re-prefills
  them on ``continue_generation`` (with the weights live at that time); ``in_place`` keeps them.
- ``ignore_eos`` disables both EOS and ``stop_token_ids`` (SGLang's rule); ``max_new_tokens`` wins
  over a stop token sampled at the last position.  prompt + max_new_tokens must fit the context.
- ``flush_cache`` is accepted and has nothing to flush (no prefix cache).  A client that
  disconnects does not abort its request (use ``/abort_request``); ``request_timeout_s`` bounds it.

How to run::

    python -m producers.engine --model DIR --host 127.0.0.1 --port 0 --port-file /tmp/port \\
        [--seed N] [--max-running-requests N] [--weight-version V] [--start-paused] [--log-format json] \\
        [--set key=value]...

``--port 0`` binds a free port, logs ``engine listening on http://HOST:PORT`` and writes the port
to ``--port-file``.  SIGTERM/SIGINT abort running requests and exit 0 within a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from aiohttp import web

from pipeline.configbase import ConfigError, apply_override, from_dict, parse_override
from pipeline.logs import setup_logging
from pipeline.metrics import VERSION, exposition, new_registry
from pipeline.weightsync import device_identity, weights_checksum
from producers.engine.config import EngineConfig
from producers.engine.decode import GenRequest, Scheduler
from producers.engine.kvcache import cuda_index
from producers.engine.metrics import EngineMetrics
from producers.engine.profile_routes import ProfileRoutes
from producers.engine.sampling import RequestError, parse_generate_request
from producers.engine.weights import WeightReceiver, WeightUpdateError, parse_update_request
from producers.engine.weights_ipc import IPCReceiver
from schemas import weight_update as wu

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PAUSE_MODES = ("abort", "retract", "in_place")


def _daemon_call(fn: Callable[[], T], name: str) -> cf.Future[T]:
    """Run a blocking call on a daemon thread (a hung rendezvous must not hold up process exit)."""
    fut: cf.Future[T] = cf.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``body[key]`` checked against ``kind``; missing (or null) gives ``default``, or 400 when required."""
    value = body.get(key)
    if value is None:
        if default is ...:
            raise RequestError(key, "is required")
        return default
    bool_ok = kind is bool or (isinstance(kind, tuple) and bool in kind)
    if not isinstance(value, kind) or (isinstance(value, bool) and not bool_ok):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RequestError(key, f"expected {names}, got {value!r}")
    return value


async def _json(request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object body (``{}`` for an empty body when ``allow_empty``), else a
    RequestError (a 400 naming the problem)."""
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestError("body", "a JSON object is required")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("body", f"invalid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    return body


def _eos_field(eos_ids: frozenset[int]) -> int | list[int] | None:
    """``eos_token_id`` as SGLang's /get_model_info writes it: one id, a list, or null."""
    ids = sorted(eos_ids)
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _parsed(parse: Callable[..., T], *args: Any) -> T:
    """A :mod:`schemas.weight_update` parser's result; its FieldError becomes a RequestError (400)."""
    try:
        return parse(*args)
    except wu.FieldError as e:
        raise RequestError(e.field, e.message) from None


def load_model(model_path: str, cfg: EngineConfig) -> tuple[torch.nn.Module, torch.device]:
    """Load the checkpoint with transformers in cfg.dtype on cfg.device, frozen, in eval mode."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":  # an indexed device: torch.cuda's memory calls refuse a bare "cuda"
        device = torch.device("cuda", cuda_index(device))
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation
    )
    model.to(device).eval()
    model.requires_grad_(False)
    return model, device


class EngineClosing(Exception):
    """Raised into handlers still waiting on a blocking weight operation when the engine shuts down."""


class EngineServer:
    """The model, the scheduler, the weight receiver and the aiohttp application around them."""

    def __init__(self, cfg: EngineConfig, model_path: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.model, self.device = load_model(model_path, cfg)
        self.registry = new_registry("engine")
        self.metrics = EngineMetrics(self.registry)
        self.scheduler = Scheduler(self.model, cfg, self.metrics, self.device)
        self.receiver = WeightReceiver(self.model, self.device, self.metrics, cfg.weight_group_timeout_s,
                                       swap=lambda staged, version, adopt: self.scheduler.swap_weights(staged, version, adopt=adopt),
                                       adopt=self.scheduler.adopts)
        self.ipc = IPCReceiver(self.device, self.metrics, cfg.weight_group_timeout_s, check=self.receiver.checked,
                               swap=lambda staged, version, adopt: self.scheduler.swap_weights(staged, version, adopt=adopt),
                               before=self.receiver.fault)
        self._inflight: set[str] = set()
        self._counter = 0
        self._closing = asyncio.Event()
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("loaded %s: %d parameters, %s on %s, context %d, weight version %d", model_path, n_params,
                 cfg.dtype, self.device, self.scheduler.context_len, cfg.weight_version)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Blocking: abort every request, stop the scheduler, leave the weight groups."""
        self.scheduler.stop(timeout=self.cfg.shutdown_timeout_s)
        self.receiver.close()

    def closing(self) -> None:
        """Release handlers blocked on a rendezvous or a broadcast (they answer 503)."""
        self._closing.set()

    async def _until_closing(self, fut: cf.Future[T]) -> T:
        waiter = asyncio.wrap_future(fut)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if not waiter.done():
            waiter.cancel()
            raise EngineClosing
        return waiter.result()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_request_bytes, middlewares=[self._errors])
        r = app.router
        r.add_post("/generate", self.generate)
        r.add_put("/generate", self.generate)
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health)
        r.add_get("/get_model_info", self.model_info)
        r.add_get("/get_server_info", self.server_info)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/flush_cache", self.flush_cache)
        r.add_post("/flush_cache", self.flush_cache)
        r.add_post("/pause_generation", self.pause)
        r.add_post("/continue_generation", self.resume)
        r.add_post("/abort_request", self.abort)
        r.add_post(wu.ROUTE_INIT_GROUP, self.init_group)
        r.add_post(wu.ROUTE_DESTROY_GROUP, self.destroy_group)
        r.add_post(wu.ROUTE_UPDATE, self.update_weights)
        r.add_post(wu.ROUTE_UPDATE_VERSION, self.update_version)
        r.add_post(wu.ROUTE_UPDATE_IPC, self.update_weights_ipc)
        r.add_post(wu.ROUTE_BEGIN_UPDATE, self.weight_session)
        r.add_post(wu.ROUTE_END_UPDATE, self.weight_session)
        r.add_get(wu.ROUTE_CHECKSUM, self.checksum)
        ProfileRoutes(self.scheduler, _json).add(r)  # SGLang's /start_profile, /stop_profile
        return app

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as e:
            self.metrics.bad_requests.inc()
            msg = f"{e.field}: {e.message}"
            log.info("400 %s %s: %s", request.method, request.path, msg)
            body: dict[str, Any] = {"error": {"message": msg, "field": e.field}}
            if request.path in wu.WEIGHT_ROUTES:
                body.update(success=False, message=msg)
            return web.json_response(body, status=400)
        except EngineClosing:
            return web.json_response({"success": False, "message": "engine shutting down",
                                      "error": {"message": "engine shutting down"}}, status=503)
        except web.HTTPException:
            raise
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": {"message": f"internal error: {e}"}}, status=500)

    def _new_rid(self) -> str:
        self._counter += 1
        return f"engine-{os.getpid()}-{self._counter}"

    # ------------------------------------------------------------------ generation
    def _requests(self, body: dict[str, Any]) -> tuple[list[GenRequest], bool]:
        sched = self.scheduler
        if sched.context_len < sched.model_context_len:
            limit = f"engine.max_seq_len = {sched.context_len} (the KV slot size; the model's context is {sched.model_context_len})"
        else:
            limit = f"the model's context length {sched.context_len}"
        items, batch = parse_generate_request(
            body, vocab_size=sched.vocab_size, context_len=sched.context_len,
            max_new_tokens_cap=self.cfg.max_new_tokens_cap, default_max_new_tokens=self.cfg.default_max_new_tokens,
            context_name=limit,
        )
        reqs: list[GenRequest] = []
        for i, item in enumerate(items):
            rid = item.rid if item.rid is not None else self._new_rid()
            if rid in self._inflight or any(r.rid == rid for r in reqs):
                raise RequestError(f"rid[{i}]" if batch else "rid", f"request id {rid!r} is already in flight")
            reqs.append(GenRequest(rid=rid, input_ids=item.input_ids, params=item.params,
                                   return_logprob=item.return_logprob))
        return reqs, batch

    async def generate(self, request: web.Request) -> web.Response:
        reqs, batch = self._requests(await _json(request))
        self._inflight.update(r.rid for r in reqs)
        try:
            futs = [asyncio.wrap_future(self.scheduler.submit(r)) for r in reqs]
            results = await asyncio.gather(*futs)
        except asyncio.CancelledError:
            for r in reqs:
                self.scheduler.abort(r.rid, "client disconnected")
            raise
        finally:
            self._inflight.difference_update(r.rid for r in reqs)
        return web.json_response(results if batch else results[0])

    # ------------------------------------------------------------------ info
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def model_info(self, request: web.Request) -> web.Response:
        mcfg = self.model.config
        return web.json_response({
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(self.scheduler.version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(mcfg, "model_type", None),
            "architectures": getattr(mcfg, "architectures", None),
            "vocab_size": self.scheduler.vocab_size,
            "eos_token_id": _eos_field(self.scheduler.eos_ids),
            "context_length": self.scheduler.context_len,
            "dtype": self.cfg.dtype,
        })

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "version": f"slipstream-engine {VERSION}",
            "engine": "slipstream",
            "model_path": self.model_path,
            "device": str(self.device),
            "max_running_requests": self.cfg.max_running_requests,
            "context_length": self.scheduler.context_len,
            wu.DEVICE_FIELD: device_identity(self.device),  # slipstream extension: lets a trainer tell a colocated engine
            "memory": self.scheduler.memory(),  # slipstream extension: budget and use, bytes
            "decode": self.scheduler.decode_info(),  # slipstream extension: how decode runs (graphs, compile)
            **self.scheduler.state(),
        })

    async def prometheus(self, request: web.Request) -> web.Response:
        body, ctype = exposition(self.registry)
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def checksum(self, request: web.Request) -> web.Response:
        def compute() -> dict[str, Any]:
            named = dict(self.model.named_parameters())
            return {"weight_version": str(self.scheduler.version), "checksum": weights_checksum(named),
                    "num_tensors": len(named)}

        return web.json_response(await asyncio.wrap_future(self.scheduler.call(compute)))

    # ------------------------------------------------------------------ control
    async def flush_cache(self, request: web.Request) -> web.Response:
        return web.json_response({"success": True, "message": "Cache flushed (the embedded engine keeps no prefix cache)."})

    async def pause(self, request: web.Request) -> web.Response:
        body = await _json(request, allow_empty=True)
        mode = _field(body, "mode", str, "abort")
        if mode not in PAUSE_MODES:
            raise RequestError("mode", f"must be one of {list(PAUSE_MODES)}, got {mode!r}")
        await asyncio.wrap_future(self.scheduler.pause(mode))
        return web.json_response({"success": True, "message": f"Generation paused (mode={mode})."})

    async def resume(self, request: web.Request) -> web.Response:
        await _json(request, allow_empty=True)
        await asyncio.wrap_future(self.scheduler.resume())
        return web.json_response({"success": True, "message": "Generation continued."})

    async def abort(self, request: web.Request) -> web.Response:
        body = await _json(request)
        if _field(body, "abort_all", bool, False):
            self.scheduler.abort(None, "aborted by /abort_request abort_all")
            return web.json_response({"success": True, "message": "Aborted all requests."})
        rid = _field(body, "rid", str)
        self.scheduler.abort(rid, "aborted by /abort_request")
        return web.json_response({"success": True, "message": f"Abort of {rid!r} requested."})

    # ------------------------------------------------------------------ weights
    async def init_group(self, request: web.Request) -> web.Response:
        req = _parsed(wu.InitGroupRequest.parse, await _json(request))
        fut = _daemon_call(lambda: self.receiver.init_group(req.master_address, req.master_port, req.rank_offset,
                                                            req.world_size, req.backend, req.group_name),
                           "engine-weight-group-init")
        try:
            message = await self._until_closing(fut)
        except EngineClosing:
            raise
        except Exception as e:
            log.error("init_weights_update_group failed: %s", e)
            return web.json_response({"success": False, "message": f"Failed to init weight group: {e}"}, status=400)
        return web.json_response({"success": True, "message": message})

    async def destroy_group(self, request: web.Request) -> web.Response:
        name = _parsed(wu.DestroyGroupRequest.parse, await _json(request, allow_empty=True)).group_name
        ok = await asyncio.to_thread(self.receiver.destroy_group, name)
        return web.json_response({"success": ok, "message": "destroyed" if ok else f"no weight group {name!r}"},
                                 status=200 if ok else 400)

    async def update_weights(self, request: web.Request) -> web.Response:
        started_at, started = time.monotonic(), time.perf_counter()
        spec = parse_update_request(await _json(request), self.receiver.layouts)
        if spec.abort_all_requests:
            self.scheduler.abort(None, "aborted for a weight update (abort_all_requests)")
        parsed = time.perf_counter()
        try:
            result = await self._until_closing(self.receiver.submit_bucket(spec))
        except WeightUpdateError as e:
            self.metrics.updates.labels("failed").inc()
            log.error("weight update refused: %s", e)
            return web.json_response({"success": False, "message": str(e)}, status=400)
        if spec.weight_version is None or result.staged_update is None:
            return web.json_response({"success": True, "message": f"staged {result.num_tensors} tensors "
                                      f"({result.nbytes} bytes) in {result.receive_s * 1e3:.1f} ms"})
        assert result.swap is not None  # the receiver started the swap (its swap hook)
        pause = await asyncio.wrap_future(result.swap)
        swapped = time.perf_counter()
        self.metrics.updates.labels("success").inc()
        return web.json_response({
            "success": True,
            "message": f"updated {len(result.staged_update)} tensors to version {spec.weight_version}; "
                       f"generation paused {pause * 1e3:.2f} ms",
            "weight_version": str(spec.weight_version),
            "pause_seconds": pause,  # slipstream extension: time decoding stopped for the swap
            "adopted": result.adoptable,  # slipstream extension: parameters now point at the received tensors (no copy)
            # slipstream extension: where this request spent its time (seconds), and when it started
            # (time.monotonic(): comparable with other processes' on the same host only)
            "timings": {"started_at": started_at, "parse_s": parsed - started, "queue_s": result.posted_at - parsed,
                        "receive_s": result.received_at - result.posted_at,
                        "swap_wait_s": swapped - result.received_at - pause, "swap_s": pause,
                        "handler_s": swapped - started},
            # slipstream extension, multi-part updates (slipstream_parts): bytes and receive time per part
            **({"parts": result.parts} if result.parts is not None else {}),
        })

    async def update_weights_ipc(self, request: web.Request) -> web.Response:
        """slipstream extension: an update from the trainer's shared snapshot (colocated mode)."""
        started = time.perf_counter()
        req = _parsed(wu.IPCUpdateRequest.parse, await _json(request), self.receiver.layouts)
        try:
            timings = await self._until_closing(_daemon_call(lambda: self.ipc.update(req), "engine-weight-ipc"))
        except WeightUpdateError as e:
            self.metrics.updates.labels("failed").inc()
            log.error("weight update refused: %s", e)
            return web.json_response({"success": False, "message": str(e)}, status=400)
        self.metrics.updates.labels("success").inc()
        return web.json_response({
            "success": True, "weight_version": str(req.weight_version), "pause_seconds": timings["swap_s"], "adopted": False,
            "message": f"copied {len(req.names)} tensors from the trainer's shared buffer, version {req.weight_version}; "
                       f"generation paused {timings['swap_s'] * 1e3:.2f} ms",
            "timings": {**timings, "request_s": time.perf_counter() - started},
        })

    async def weight_session(self, request: web.Request) -> web.Response:
        """SGLang's /begin_weight_update and /end_weight_update: the embedded engine needs no
        session (its updates are whole or nothing by themselves), so both just succeed."""
        await _json(request, allow_empty=True)
        return web.json_response({"success": True, "message": "Success"})

    async def update_version(self, request: web.Request) -> web.Response:
        body = await _json(request)
        version = _parsed(wu.parse_version, _field(body, "new_version", (str, int)), "new_version")
        if _field(body, "abort_all_requests", bool, True):
            self.scheduler.abort(None, "aborted for a weight-version change")
        pause = await asyncio.wrap_future(self.scheduler.swap_weights({}, version))
        return web.json_response({"success": True, "message": f"version set to {version}",
                                  "weight_version": str(version), "pause_seconds": pause})


# ---------------------------------------------------------------------- entry point
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slipstream engine",
        description="slipstream's embedded inference engine: serves a Hugging Face checkpoint over SGLang's HTTP API subset "
                    "(/generate with per-token log-probs, weight updates from a trainer, /health, /metrics). 'slipstream run' "
                    "starts it for you; start it by hand to attach a run to it (producer.engine = 'attach').",
        epilog="Engine settings (slipstream config, keys engine.*) go in with --set KEY=VALUE, e.g. --set max_running_requests=64.")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=30000, help="port to bind; 0 picks a free one")
    p.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    p.add_argument("--seed", type=int, default=None, help="engine seed (config key 'seed')")
    p.add_argument("--max-running-requests", type=int, default=None, help="batch cap (config key)")
    p.add_argument("--weight-version", type=int, default=None, help="policy version of --model (default 0)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="plain text, or one JSON object per line (run.log_format)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="EngineConfig override")
    p.add_argument("--start-paused", action="store_true",
                   help="start with generation paused (requests queue; /continue_generation resumes): the launcher "
                        "restarts a crashed engine so, and the trainer resumes it once it holds the current weights")
    return p


def build_config(args: argparse.Namespace) -> EngineConfig:
    data: dict[str, Any] = {}
    for text in args.set:
        path, value = parse_override(text)
        apply_override(data, path, value)
    for key in ("seed", "max_running_requests", "weight_version"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    return from_dict(EngineConfig, data)


async def serve(cfg: EngineConfig, args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        engine = EngineServer(cfg, args.model)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    except Exception as e:
        log.error("could not load model %s: %s", args.model, e)
        return 1
    engine.start()
    if args.start_paused:  # before the port opens: no request is decoded with the weights loaded from --model
        engine.scheduler.pause("in_place").result(timeout=60)
        log.info("generation paused until the trainer sends the current weights and continues it (--start-paused)")
    runner = web.AppRunner(engine.app(), shutdown_timeout=cfg.shutdown_timeout_s, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as e:
        log.error("could not bind %s:%d: %s", args.host, args.port, e)
        await asyncio.to_thread(engine.stop)
        await runner.cleanup()
        return 1
    port = int(runner.addresses[0][1])
    log.info("engine listening on http://%s:%d", args.host, port)
    if args.port_file:
        tmp = Path(f"{args.port_file}.tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, args.port_file)
    await stop.wait()
    log.info("shutting down: aborting running requests")
    engine.closing()
    await asyncio.to_thread(engine.stop)  # in-flight /generate calls get their abort responses
    await runner.cleanup()
    log.info("engine stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    setup_logging("engine", args.log_level, args.log_format)
    logging.captureWarnings(True)  # library warnings become log records (one JSON object each with --log-format json)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(cfg, args))
