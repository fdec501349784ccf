"""Fail early and say why: ``slipstream run --dry-run`` checks the model and the plug-ins, and the
launcher's error for a child that dies at start-up shows the child's own error.

- ``--dry-run`` exits 2 naming ``model.path`` for a missing directory, a directory without
  config.json, an unloadable tokenizer and an uncached hub id (offline); and an empty
  ``model.path`` has no silent default;
- it exits 2 naming the plug-in's key for a module that does not import, a module that raises
  while importing (found through ``run.python_path``), a missing attribute, a wrong signature and
  a prompt file whose rows lack the label key; a good config prints what it checked;
- a run whose engine cannot load its weights (a corrupt model.safetensors: config and tokenizer
  are fine, so the dry run passes) fails with the engine's own error line and log tail in the
  launcher's message, not only "engine-0 exited before it was ready".
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


def _dry(tmp_path: Path, *overrides: str, config: Path = TINY) -> subprocess.CompletedProcess[str]:
    args = ["run", str(config), "--dry-run"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(slipstream(*args), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=180)


def test_missing_model_fails_dry_run(tmp_path: Path, model: Path) -> None:
    r = _dry(tmp_path, f"model.path='{tmp_path / 'nope'}'", "model.make_tiny_if_missing=false")
    assert r.returncode == 2 and f"config error at 'model.path': '{tmp_path / 'nope'}' does not exist" in r.stderr, r.stderr
    r = _dry(tmp_path, "model.path='no-such-org/no-such-model'", "model.make_tiny_if_missing=false")
    assert r.returncode == 2 and "config error at 'model.path': hub id 'no-such-org/no-such-model'" in r.stderr, r.stderr
    assert "hf download no-such-org/no-such-model" in r.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    r = _dry(tmp_path, f"model.path='{bare}'")
    assert r.returncode == 2 and "config error at 'model.path': cannot load a tokenizer" in r.stderr, r.stderr
    r = _dry(tmp_path, "model.path=''")
    assert r.returncode == 2 and "config error at 'model.path': is required (no default)" in r.stderr, r.stderr
    cfg = tmp_path / "nomodel.toml"
    cfg.write_text("[run]\nsteps = 1\n")
    r = subprocess.run(slipstream("run", str(cfg), "--dry-run"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "config error at 'model.path': is required" in r.stderr, r.stderr


def test_plugins_fail_dry_run_naming_the_key(tmp_path: Path, model: Path) -> None:
    m = f"model.path='{model}'"
    r = _dry(tmp_path, m, "producer.reward='no_such_module:reward'")
    assert r.returncode == 2 and "config error at 'producer.reward': cannot import module 'no_such_module'" in r.stderr, r.stderr
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_task.py").write_text("import math\nraise RuntimeError('broken on purpose')\n")
    (plugins / "odd_task.py").write_text("def reward(sample, extra):\n    return 0.0\n\ndef prompts():\n    return iter([])\n")
    r = _dry(tmp_path, m, "producer.rollout='broken_task:rollout'", f"run.python_path=['{plugins}']")
    assert r.returncode == 2, r.stderr
    assert "config error at 'producer.rollout': importing module 'broken_task' raised RuntimeError: broken on purpose" in r.stderr
    r = _dry(tmp_path, m, "producer.reward='odd_task:reward'", f"run.python_path=['{plugins}']")
    assert r.returncode == 2 and "config error at 'producer.reward': plug-in 'odd_task:reward' has signature (sample, extra)" in r.stderr
    r = _dry(tmp_path, m, "producer.prompts='odd_task:prompts'", f"run.python_path=['{plugins}']")
    assert r.returncode == 2 and "config error at 'producer.prompts': plug-in 'odd_task:prompts' has signature ()" in r.stderr
    r = _dry(tmp_path, m, "producer.reward='odd_task:nothing'", f"run.python_path=['{plugins}']")
    assert r.returncode == 2 and "module 'odd_task' has no attribute 'nothing'" in r.stderr
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "12=", "answer": "2"}) + "\n" + json.dumps({"prompt": "34="}) + "\n")
    r = _dry(tmp_path, m, "producer.prompts='producers.datasets:make_prompts'", f"producer.prompts_args={{path='{data}'}}")
    assert r.returncode == 2, r.stderr
    assert "config error at 'producer.prompts_args.label_key': record 1 has no key 'answer'" in r.stderr
    r = _dry(tmp_path, m)
    assert r.returncode == 0, r.stderr
    assert f"checked model.path: {model} (config.json, tokenizer)" in r.stderr
    assert "checked producer.reward = producers.tasks.maxdigit:reward" in r.stderr and "config OK" in r.stderr


def test_python_path_is_relative_to_the_config_and_reaches_children(tmp_path: Path, model: Path) -> None:
    from pipeline.config import load_config
    from pipeline.launcher import child_env

    cfg_dir = tmp_path / "exp"
    shutil.copytree(REPO / "examples" / "plugins", cfg_dir)
    config = cfg_dir / "config.toml"
    config.write_text(config.read_text().replace('path = "runs/tiny-qwen3"', f'path = "{model}"'))
    r = subprocess.run(slipstream("run", str(config), "--dry-run"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=180)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["run"]["python_path"] == [str(cfg_dir.resolve())]
    cfg = load_config(config, [f"run.python_path=['{cfg_dir}']"])
    assert child_env(cfg)["PYTHONPATH"].split(":")[0] == str(cfg_dir)


def test_child_start_up_failure_shows_the_childs_error(tmp_path: Path, model: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"this is not a safetensors file")
    assert _dry(tmp_path, f"model.path='{broken}'").returncode == 0  # config and tokenizer are fine
    r = subprocess.run(slipstream("run", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", f"model.path='{broken}'",
                                  "--set", "run.startup_timeout_s=120"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "engine-0 exited before it was ready" in r.stderr
    assert re.search(rf"last \d+ lines? of {re.escape(str(tmp_path / 'run' / 'logs' / 'engine-0.log'))}:", r.stderr), r.stderr[-3000:]
    engine_error = [ln for ln in (tmp_path / "run" / "logs" / "engine-0.log").read_text().splitlines() if "could not load model" in ln]
    assert engine_error and engine_error[-1] in r.stderr, r.stderr[-3000:]


def test_launcher_log_lines_go_above_the_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While the console's bar is drawn, stderr log records are written by tqdm.write (each on a
    line of its own, the bar redrawn below), not glued onto the bar; closing restores the stream."""
    import logging
    import sys

    from pipeline.launcher import Console

    handler = logging.StreamHandler(sys.stderr)
    logger = logging.getLogger("test.console")
    logger.addHandler(handler)
    logger.propagate = False
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        console = Console(tmp_path / "steps.jsonl", 10, 1, enabled=True)
        assert handler.stream is not sys.stderr  # swapped while the bar is up
        logger.warning("hello from the launcher")
        console.close()
        assert handler.stream is sys.stderr
    finally:
        root.removeHandler(handler)
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    before, _, after = err.partition("hello from the launcher\n")
    assert _ == "hello from the launcher\n", err
    assert before.endswith(("\r", "\x1b[A", "\r\x1b[K", "\x1b[K")) or before.rstrip(" ").endswith("\r") or before == "", repr(before[-40:])
    assert "0/10" in after  # the bar is drawn again below the message
