"""Resolve ``model.path`` to a local checkpoint directory: a directory as is, or a Hugging Face hub id.

What: :func:`resolve_model` turns ``model.path`` (and ``model.revision``) into a local directory.
A path that exists is used as it is.  Otherwise a hub id (``Qwen/Qwen3-0.6B``) is fetched once
with ``huggingface_hub.snapshot_download``: the local cache is tried first (no network), then the
hub, unless ``HF_HUB_OFFLINE`` is set.  Only what slipstream reads is fetched: config and
generation config, safetensors (and their index), tokenizer files and chat templates.

Why in the launcher, once: every child (engines, producers, trainer ranks) then reads the same
local snapshot with ``HF_HUB_OFFLINE=1`` (no child ever talks to the hub, and no two download
the same files at once), and ``config.json`` in the run directory names the exact snapshot
(``.../snapshots/<commit>``).  With no network and no cached copy the error names the id, the
cache directory and the command that pre-downloads it.

How::

    local = resolve_model("Qwen/Qwen3-0.6B", revision="")        # -> ~/.cache/huggingface/hub/models--Qwen--Qwen3-0.6B/snapshots/<sha>
    local = resolve_model("runs/tiny-qwen3")                       # an existing directory: unchanged
    resolve_model("Qwen/Qwen3-0.6B", metadata_only=True)          # config + tokenizer only (slipstream run --dry-run)

``HF_HUB_CACHE`` (or ``HF_HOME``) chooses the cache, as for every Hugging Face library.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from pipeline.configbase import ConfigError

log = logging.getLogger(__name__)

#: What a run reads from a hub snapshot (the rest of a repo, e.g. .bin/.pth/.onnx/.gguf copies, is skipped).
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]
METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """``org/name`` that is not an existing local path (``./x/y`` or ``/x`` never are)."""
    return bool(_HUB_ID.match(path)) and not Path(path).exists() and ".." not in path


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _how_to_fetch(repo: str, revision: str) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (f"pre-download it on a machine with network access with `hf download {repo}{rev}` (huggingface_hub's CLI) "
            f"into the same cache (HF_HUB_CACHE={hub_cache_dir()}), or set model.path to a local checkpoint directory")


def resolve_model(path: str, revision: str = "", key: str = "model.path", metadata_only: bool = False) -> str:
    """A local directory holding the checkpoint ``path`` names (see the module docstring).
    Raises ConfigError naming ``key`` when it cannot be resolved."""
    if not path:
        raise ConfigError(key, "is empty: set it to a Hugging Face checkpoint directory or hub id (e.g. 'Qwen/Qwen3-0.6B')")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(key, f"{path!r} is a file; expected a checkpoint directory (config.json, safetensors, tokenizer)")
        if not (p / "config.json").exists():
            raise ConfigError(key, f"{path!r} has no config.json: not a Hugging Face checkpoint directory")
        return str(p)
    if not is_hub_id(path):
        raise ConfigError(key, f"{path!r} does not exist (and is not a Hugging Face hub id like 'Qwen/Qwen3-0.6B')")
    return _snapshot(path, revision, key, METADATA_PATTERNS if metadata_only else WEIGHT_PATTERNS)


def _snapshot(repo: str, revision: str, key: str, patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download

    rev = revision or None
    try:
        local = snapshot_download(repo, revision=rev, allow_patterns=patterns, local_files_only=True)
        log.info("model.path %r (revision %s) found in the hub cache: %s", repo, revision or "main", local)
    except Exception as cached_error:  # LocalEntryNotFoundError and friends: not (fully) cached
        if _offline():
            raise ConfigError(key, f"hub id {repo!r} (revision {revision or 'main'}) is not in the local cache {hub_cache_dir()} "
                                   f"and HF_HUB_OFFLINE is set ({type(cached_error).__name__}): {_how_to_fetch(repo, revision)}") from None
        log.info("downloading %r (revision %s) from the Hugging Face hub into %s", repo, revision or "main", hub_cache_dir())
        try:
            local = snapshot_download(repo, revision=rev, allow_patterns=patterns)
        except Exception as e:  # network errors, RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, ...
            raise ConfigError(key, f"cannot fetch hub id {repo!r} (revision {revision or 'main'}): {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}; {_how_to_fetch(repo, revision)}") from None
    if not (Path(local) / "config.json").exists():
        raise ConfigError(key, f"hub snapshot {local} of {repo!r} has no config.json: not a transformers model repository")
    return str(local)


def local_model_dir(path: str, key: str) -> str:
    """For callers that only read (a tokenizer path in a plug-in's args): an existing directory,
    or the cached snapshot of a hub id (the launcher has already fetched ``model.path``)."""
    p = Path(path).expanduser()
    if p.is_dir() or not is_hub_id(path):
        return str(p)
    return _snapshot(path, "", key, METADATA_PATTERNS)
