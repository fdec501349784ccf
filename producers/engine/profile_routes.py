"""SGLang's profiling routes on the embedded engine: ``POST /start_profile`` and ``POST /stop_profile``.

What: ``/start_profile`` takes the fields of SGLang's ``ProfileReq`` (sglang 0.5.23) (``output_dir``, ``num_steps``,
``start_step``, ``activities`` of "CPU"/"GPU", ``record_shapes``, ``with_stack``, ``profile_prefix``;
see :func:`pipeline.profiling.parse_request`) and starts a ``torch.profiler`` window over the
engine's decode steps; it ends after ``num_steps`` decode steps, or at ``/stop_profile``.  The
window writes ``<output_dir>/<profile_prefix or engine-PID>.trace.json.gz`` and ``.summary.json``
(:class:`pipeline.profiling.ProfileWindow`).  Both routes answer SGLang's plain-text bodies
("Start profiling." / "Stop profiling. This will take some time."), so a client written for SGLang
works unchanged; a request that cannot be honoured gets HTTP 400 with the reason.

Why: ``run.profile_steps`` has trainer rank 0 profile a window of steps and every engine the same
window, over these routes, whether the engines are embedded or SGLang servers
(``consumers/profiling.py``).  The profiler starts, steps and stops on the scheduler thread (between
decode steps), where the model runs; ``/stop_profile`` waits while the trace is written.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pipeline.profiling import START_ROUTE, STOP_ROUTE, ProfileError, ProfileWindow, parse_request
from producers.engine.decode import Scheduler


class ProfileRoutes:
    """The two handlers, bound to one engine's scheduler.  ``read_json(request, allow_empty)`` is
    the server's own body reader (a malformed body is its 400, as on every other route)."""

    def __init__(self, scheduler: Scheduler, read_json: Callable[..., Awaitable[dict[str, Any]]], default_dir: str = "/tmp") -> None:
        self.scheduler = scheduler
        self.read_json = read_json
        self.default_dir = default_dir

    def add(self, router: web.UrlDispatcher) -> None:
        router.add_post(START_ROUTE, self.start)
        router.add_post(STOP_ROUTE, self.stop)

    async def start(self, request: web.Request) -> web.Response:
        body = await self.read_json(request, allow_empty=True)
        try:
            req = parse_request(body, self.default_dir)
            window = ProfileWindow(req["output_dir"], req["prefix"] or f"engine-{os.getpid()}", req["activities"],
                                   req["num_steps"], req["record_shapes"], req["with_stack"])
            await asyncio.wrap_future(self.scheduler.call(lambda: self.scheduler.profiler.arm(window, req["start_step"])))
        except ProfileError as e:
            return _refused(str(e))
        return web.Response(text="Start profiling.\n")

    async def stop(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wrap_future(self.scheduler.call(self.scheduler.profiler.stop))
        except ProfileError as e:
            return _refused(str(e))
        return web.Response(text="Stop profiling. This will take some time.\n")


def _refused(message: str) -> web.Response:
    return web.json_response({"success": False, "message": message, "error": {"message": message}}, status=400)
