"""End to end through ``slipstream run`` with plug-ins (every role a real process):

- the multi-turn calculator example: tool tokens reach the trainer with loss_mask 0, in spans the
  calculator could have written, and with η = 0 every token (tool tokens included) carries the
  version being trained;
- a user plug-in living outside the package (examples/plugins, on PYTHONPATH) with a group-scope
  async reward and the drop_uniform group filter: filtered groups never reach the trainer; held-out
  evaluation (pass@k) runs alongside;
- a plug-in returning the wrong type stops the run quickly (no hang), and the launcher's message
  names the producer, the plug-in and the field.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from tests.helpers import REPO, env, slipstream

EXAMPLES = REPO / "examples"


def _run(tmp_path: Path, config: Path, *overrides: str, pythonpath: list[Path] | None = None, timeout_s: float = 120) -> tuple[subprocess.CompletedProcess[str], Path]:
    run_dir = tmp_path / "run"
    args = ["run", str(config), "--run-dir", str(run_dir), "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'"]
    for o in overrides:
        args += ["--set", o]
    e = env()
    if pythonpath:
        e["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), e["PYTHONPATH"]])
    r = subprocess.run(slipstream(*args), capture_output=True, text=True, env=e, cwd=tmp_path, timeout=timeout_s)
    return r, run_dir


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _balanced(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trajectories"]["balanced"] is True, summary
    return summary


@pytest.mark.slow
def test_multiturn_calculator_masks_and_versions(tmp_path: Path) -> None:
    r, run_dir = _run(tmp_path, EXAMPLES / "multiturn" / "config.toml", "run.steps=6", "queue.max_staleness=0")
    assert r.returncode == 0, r.stderr[-3000:]
    consumed = _jsonl(run_dir / "consumed.jsonl")
    assert len(consumed) == 6 * 8 * 8
    with_tool = [c for c in consumed if c["masked_tokens"] > 0]
    assert len(with_tool) >= 10, "the random tiny model calls the calculator now and then"
    for c in consumed:
        spans = c["mask_spans"]
        assert sum(e - s for s, e in spans) == c["masked_tokens"]
        # A calculator answer is 1-2 digits (sum of <= 3 digits), after at least "d =" of the model,
        # and at most max_turns - 1 = 2 tool turns; the model always samples the first token.
        assert len(spans) <= 2 and all(1 <= e - s <= 2 and s >= 1 and e <= c["num_tokens"] for s, e in spans), c
        assert c["masked_tokens"] < c["num_tokens"]
        assert c["num_tokens"] + 2 <= 24, "max_total_tokens (prompt is 3-4 tokens)"
        # η = 0: on-policy, tool tokens included (they carry the current version, not an old one).
        assert c["min_version"] == c["max_version"] == c["trained_from_version"], c
    _balanced(run_dir)


@pytest.mark.slow
def test_user_plugin_outside_the_package_with_dynamic_sampling(tmp_path: Path) -> None:
    evaluation = ["producer.eval_prompts='my_task:prompts'", "producer.eval_every_versions=2", "producer.eval_num_prompts=4",
                  "producer.eval_samples=4", "producer.eval_ks=[1, 4]", "producer.eval_pass_threshold=0.5"]
    r, run_dir = _run(tmp_path, EXAMPLES / "plugins" / "config.toml", "run.steps=5", *evaluation, pythonpath=[EXAMPLES / "plugins"])
    assert r.returncode == 0, r.stderr[-3000:]
    consumed = _jsonl(run_dir / "consumed.jsonl")
    assert len(consumed) == 5 * 8 * 8
    assert all(c["prompt_id"].startswith("mindigit-") for c in consumed), "the user's prompt source was used"
    by_group: dict[str, list[float]] = defaultdict(list)
    for c in consumed:
        assert c["reward"] in (0.0, 0.5, 1.0)
        by_group[c["group_id"]].append(c["reward"])
    assert all(len(set(rs)) > 1 for rs in by_group.values()), "a group with equal rewards reached the trainer"
    stats = json.loads((run_dir / "stats" / "producer-0.json").read_text())
    filtered = stats["filtered_prompt_ids"]
    assert sum(stats["groups_filtered"].values()) == len(filtered) > 0
    assert set(stats["groups_filtered"]) <= {"all_zero", "all_one", "all_equal"}
    assert not set(filtered) & {c["prompt_id"] for c in consumed}, "a filtered group was trained on"
    summary = _balanced(run_dir)
    assert summary["trajectories"]["generated"] == summary["trajectories"]["accepted"], "filtered groups are never sent"
    # Held-out evaluation ran alongside (producer 0), at version 0 and then every 2 versions.
    evals = _jsonl(run_dir / "eval.jsonl")
    assert len(evals) >= 2 and evals[0]["policy_version"] == 0, evals
    buckets = [e["policy_version"] // 2 for e in evals]
    assert buckets == sorted(set(buckets))
    for e in evals:
        assert e["prompts"] == 4 and e["samples_per_prompt"] == 4
        assert 0.0 <= e["pass@1"] <= e["pass@4"] <= 1.0


@pytest.mark.slow
def test_malformed_plugin_stops_the_run_naming_it(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "bad_reward.py").write_text("def reward(sample):\n    return 'one'\n")
    r, run_dir = _run(tmp_path, EXAMPLES / "tiny" / "config.toml", "run.steps=5", "producer.reward='bad_reward:reward'", pythonpath=[plugins], timeout_s=90)
    assert r.returncode == 1
    err = r.stderr
    assert "producer-0 exited unexpectedly with code 2" in err, err[-3000:]
    assert "plug-in 'bad_reward:reward': reward of sample 0 is 'one' (str), expected a finite float" in err
    assert "config error at 'producer.reward'" in (run_dir / "logs" / "producer-0.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["exit_code"] == 1
