"""Packaging: an SPDX license string with the LICENSE file, declared dependencies for what the code
imports at the top level of its commands (PyYAML for scrape-config), one version string, and
``slipstream --version``."""

from __future__ import annotations

import subprocess
import tomllib

from pipeline import __version__
from tests.helpers import REPO, env, slipstream

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_spdx_and_shipped() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


def test_runtime_dependencies_are_declared() -> None:
    deps = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in PYPROJECT["project"]["dependencies"]}
    assert {"pyyaml", "huggingface_hub", "transformers", "safetensors", "torch", "megatron-core"} <= deps
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("datasets") for d in extras["data"]) and any(d.startswith("sentencepiece") for d in extras["tokenizers"])


def test_version_flag() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}
    r = subprocess.run(slipstream("--version"), capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 0 and r.stdout.startswith(f"slipstream {__version__} (Python "), r.stdout + r.stderr
