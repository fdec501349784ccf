"""``run.profile_steps``: the trainer profiles a window of its steps, and asks every engine to
profile the same window.

What: :class:`TrainerProfile` is called around each trainer step.  Before step FIRST it starts a
:class:`pipeline.profiling.ProfileWindow` named ``trainer-rank<R>`` on this rank, and (rank 0 only)
posts SGLang's ``POST /start_profile`` to every engine with ``output_dir = RUN_DIR/profile`` and
``profile_prefix = engine-<i>``; after step LAST it stops its window and posts ``/stop_profile``.
Each process writes its trace and summary into ``RUN_DIR/profile`` (see pipeline/profiling.py).

Why: with the trainer and an engine sharing a GPU, how the device's time was split between them,
and what a weight swap overlapped, is read from the two profiles of the same window.  An engine
that refuses or cannot be reached is logged and left out: a profile never fails a run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from consumers.engine_http import PublishError, post_json
from pipeline.profiling import START_ROUTE, STOP_ROUTE, ProfileError, ProfileWindow, start_body

log = logging.getLogger(__name__)
ENGINE_TIMEOUT_S = 120.0  # /stop_profile returns once the engine has written its trace


def _post(url: str, body: dict[str, object] | None, timeout_s: float) -> str | None:
    """POST ``body`` as JSON (SGLang answers these routes in plain text); the error, or None on success."""
    try:
        post_json(url, body if body is not None else {}, timeout_s, url.rsplit("/", 1)[-1], text_reply=True)
        return None
    except PublishError as e:
        return str(e)


class TrainerProfile:
    """Profiles steps ``first..last`` of one rank (a no-op when ``steps`` is empty)."""

    def __init__(self, steps: list[int], run_dir: Path, rank: int, engine_urls: list[str]) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.out_dir = Path(run_dir) / "profile"
        self.engine_urls = list(engine_urls) if rank == 0 else []
        self.window = ProfileWindow(self.out_dir, f"trainer-rank{rank}") if steps else None
        self.engines_started: list[str] = []

    def before_step(self, step: int) -> None:
        if self.window is None or step != self.first or self.window.active:
            return
        for i, url in enumerate(self.engine_urls):
            err = _post(url.rstrip("/") + START_ROUTE, start_body(str(self.out_dir.resolve()), f"engine-{i}"), ENGINE_TIMEOUT_S)
            if err is None:
                self.engines_started.append(url)
            else:
                log.warning("profile: engine %s did not start profiling (%s); it is left out", url, err)
        try:
            self.window.start()
        except ProfileError as e:
            log.warning("profile: the trainer window did not start (%s)", e)

    def after_step(self, step: int) -> None:
        if self.window is None or not self.window.active:
            return
        self.window.step()
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop whatever is running (the last step, or a run that ended inside the window).  The
        engines are asked to stop at the same moment as this rank (each writes its trace meanwhile),
        so every window ends together rather than after this rank's trace export."""
        def stop_engine(url: str) -> None:
            err = _post(url.rstrip("/") + STOP_ROUTE, None, ENGINE_TIMEOUT_S)
            if err is not None:
                log.warning("profile: engine %s did not stop profiling (%s)", url, err)

        threads = [threading.Thread(target=stop_engine, args=(u,), name="profile-stop", daemon=True) for u in self.engines_started]
        for t in threads:
            t.start()
        if self.window is not None and self.window.active:
            self.window.stop()
        for t in threads:
            t.join(ENGINE_TIMEOUT_S + 5)
        self.engines_started = []
