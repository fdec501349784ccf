"""Checks ``slipstream run --dry-run`` makes before anything starts, and the launcher's start-up hooks.

What: :func:`preflight` checks what a run would otherwise only find out inside a child process:

- ``model.path`` resolves (a local checkpoint directory, or a hub id in the cache or on the hub:
  only its config and tokenizer files are fetched) to a ``config.json`` and a tokenizer that
  transformers' ``AutoTokenizer`` loads (:mod:`producers.tokenizer`);
- every plug-in (``producer.prompts``, ``rollout``, ``reward``, ``group_filter``, ``eval_prompts``,
  their factories with ``*_args``) imports, and accepts the positional arguments the producer
  passes (checked with ``inspect.signature``); a prompt source is also started once (seed 0) and
  its first prompt taken, so a prompt file with a missing key fails here;
- the ``--sglang-*`` flags were already checked against SGLang's ``ServerArgs`` when the config was
  built (:mod:`producers.sglang_launch`).

Each failure is a :class:`~pipeline.configbase.ConfigError` naming the key.  :func:`log_tail` gives
the last lines of a child's log for the launcher's error when a child dies at start-up.

Why: a missing model or a plug-in that does not import used to pass ``--dry-run`` and then fail
as "engine-0 exited before it was ready", with the cause only in that process's log.

How: ``slipstream run CONFIG --dry-run`` calls :func:`preflight`; tests call it directly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.configbase import ConfigError

log = logging.getLogger(__name__)

#: (config attribute, positional arguments the producer passes, what they are)
PLUGINS = (
    ("prompts", 1, "(seed)"),
    ("rollout", 3, "(ctx, prompt, params)"),
    ("reward", 1, "(sample) or (samples)"),
    ("group_filter", 1, "(samples)"),
    ("eval_prompts", 1, "(seed)"),
)


@contextlib.contextmanager
def python_path(dirs: list[str]) -> Iterator[None]:
    """``dirs`` first on ``sys.path`` for the block (``run.python_path`` for plug-in imports)."""
    added = [d for d in dirs if d not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def check_model(cfg: Any) -> str:
    """The local directory of ``model.path`` (config + tokenizer checked); '' when the tiny model
    will be made at start (``model.make_tiny_if_missing`` and the path does not exist yet)."""
    from pipeline.hub import resolve_model
    from producers.tokenizer import load_tokenizer

    if cfg.model.make_tiny_if_missing and not Path(cfg.model.path).exists():
        return ""
    local = resolve_model(cfg.model.path, cfg.model.revision, metadata_only=True)
    try:
        json.loads((Path(local) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("model.path", f"{local}/config.json is not readable JSON: {e}") from None
    load_tokenizer(local)
    return local


def check_signature(fn: Any, key: str, path: str, nargs: int, what: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    try:
        sig.bind(*range(nargs))
    except TypeError as e:
        raise ConfigError(key, f"plug-in {path!r} has signature {sig}, but it is called with {nargs} positional "
                               f"argument{'s' if nargs > 1 else ''} {what}: {e}") from None


def check_plugins(producer_cfg: Any) -> list[str]:
    """Import every configured plug-in and check its signature; returns what was checked."""
    from producers.plugins import load_plugin

    checked = []
    for attr, nargs, what in PLUGINS:
        path = getattr(producer_cfg, attr)
        if not path:
            continue
        key = f"producer.{attr}"
        args = getattr(producer_cfg, f"{attr}_args", None)
        try:
            fn = load_plugin(path, key, args)
        except ConfigError:
            raise
        except Exception as e:  # a plug-in module that raises on import, a factory that raises
            raise ConfigError(f"{key}_args" if args else key, f"plug-in {path!r} failed to load: {type(e).__name__}: {e}") from None
        check_signature(fn, key, path, nargs, what)
        if attr in ("prompts", "eval_prompts"):
            try:
                first = next(iter(fn(0)), None)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(key, f"prompt source {path!r} failed on its first prompt: {type(e).__name__}: {e}") from None
            if first is None:
                raise ConfigError(key, f"prompt source {path!r} yields no prompts")
        checked.append(f"{key} = {path}")
    return checked


def preflight(cfg: Any) -> list[str]:
    """Everything ``--dry-run`` checks (see the module docstring); returns one line per check."""
    lines = []
    local = check_model(cfg)
    lines.append(f"model.path: {cfg.model.path}" + (f" -> {local} (config.json, tokenizer)" if local and local != cfg.model.path
                                                     else " (config.json, tokenizer)" if local else " (made at start)"))
    with python_path(list(cfg.run.python_path)):
        lines += check_plugins(cfg.producer)
    return lines


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a child's log, indented, for an error message ('' if none)."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    if not text:
        return f"\n  ({path} is empty)"
    return f"\n  last {len(text)} line{'s' if len(text) > 1 else ''} of {path}:\n" + "\n".join(f"    | {ln}" for ln in text)
