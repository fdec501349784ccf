"""``model.path`` as a Hugging Face hub id (pipeline/hub.py), resolved once by the launcher.

- a local fake hub cache (``HF_HUB_CACHE`` pointing at a directory filled in the hub layout:
  ``models--ORG--NAME/refs/main`` + ``snapshots/<commit>/``) resolves a hub id with no network; a
  pinned revision that is not cached, an id that is not cached (offline), and an unreachable hub
  (a closed loopback port as ``HF_ENDPOINT``) each fail naming the id, the cache and ``hf download``;
- local paths are used as they are; a directory without config.json and a non-id path are errors;
- end to end (slow, in tests/test_e2e.py::test_tiny_example_learns_within_bounds, which runs the tiny
  example from this fake cache: one 150-step run instead of two): ``slipstream run`` with
  ``model.path = "slipstream-test/tiny-qwen3"`` learns; every process got the snapshot's local path
  (config.json), no child talked to a hub (``HF_HUB_OFFLINE=1`` in their environment);
  ``slipstream status`` on the finished run shows its final step, reward and summary and exits 0.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.configbase import ConfigError
from pipeline.hub import is_hub_id, resolve_model

REPO_ID = "slipstream-test/tiny-qwen3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache: Path, repo: str = REPO_ID, commit: str = COMMIT) -> Path:
    """The hub cache layout huggingface_hub reads, holding the tiny example model at ``commit``."""
    from pipeline.tiny import make_tiny_model

    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    make_tiny_model(snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    c = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(c))  # read at import time from the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def test_resolves_a_cached_hub_id_without_network(cache: Path) -> None:
    snapshot = fill_cache(cache)
    assert is_hub_id(REPO_ID) and not is_hub_id("./a/b") and not is_hub_id("/a/b") and not is_hub_id("a/b/c")
    assert resolve_model(REPO_ID) == str(snapshot)
    assert resolve_model(REPO_ID, metadata_only=True) == str(snapshot)
    assert resolve_model(str(snapshot)) == str(snapshot)  # a local directory: as is


def test_offline_errors_name_the_id_the_cache_and_the_fix(cache: Path) -> None:
    fill_cache(cache)
    with pytest.raises(ConfigError, match=r"'model.path': hub id 'slipstream-test/other' \(revision main\) is not in the local cache "
                                          rf"{cache}.*`hf download slipstream-test/other`"):
        resolve_model("slipstream-test/other")
    with pytest.raises(ConfigError, match=r"revision v2\).*`hf download slipstream-test/tiny-qwen3 --revision v2`"):
        resolve_model(REPO_ID, revision="v2")


def test_unreachable_hub_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match=r"'model.path': cannot fetch hub id 'slipstream-test/absent' \(revision main\).*"
                                          rf"HF_HUB_CACHE={cache}"):
        resolve_model("slipstream-test/absent")


def test_local_path_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"does not exist \(and is not a Hugging Face hub id"):
        resolve_model(str(tmp_path / "missing" / "dir" / "x"))
    with pytest.raises(ConfigError, match="is empty"):
        resolve_model("")
