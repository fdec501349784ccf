"""Record and replay (pipeline/record.py): run.mode = rollout_only | train_only, run.record_rollouts.

- a recording is the wire format, checksummed: a flipped byte, a missing file, a short recording
  and a gap in the steps are each one clear error naming the file or key (and nothing starts);
- a recorded batch decodes to exactly what was written (ids, arrays, shards);
- end to end (slow): a live run records 20 steps; a train_only run replays them with the same
  trainer seed and config, through the broker, with no producer or engine: every step trains the
  same trajectories in the same order and the losses equal the live run's; its account balances;
- end to end (slow): a rollout_only run (no trainer) records its batches with staleness within η and
  a balanced account, the engines' version label following the steps; a train_only run trains them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.configbase import ConfigError
from pipeline.record import Recorder, check_recording, load_batch, read_index
from schemas.messages import Batch, Trajectory, TrajectoryGroup
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


def _batch(step: int, groups: int = 2) -> Batch:
    rng = np.random.default_rng(step)
    gs = []
    for g in range(groups):
        trajs = [Trajectory(trajectory_id=f"s{step}-g{g}-t{t}", prompt_tokens=rng.integers(0, 14, 5).astype(np.int32),
                            response_tokens=rng.integers(0, 14, 3).astype(np.int32), logprobs=-rng.random(3).astype(np.float32),
                            versions=np.full(3, step - 1, dtype=np.int32), loss_mask=np.ones(3, dtype=np.uint8), reward=float(t) / 4)
                 for t in range(4)]
        gs.append(TrajectoryGroup(group_id=f"p-{step}-{g}", prompt_id=f"q{g}", producer_id="producer-0", epoch=1, seq=step * 10 + g, trajectories=trajs))
    return Batch(step=step, lease_id=f"L{step}", groups=gs, shards=[list(range(groups))])


def test_a_recorded_batch_reads_back_exactly(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    written = [_batch(s) for s in (1, 2, 3)]
    for b in written:
        rec.write(b.step, b, b.step - 1)
    index = check_recording(tmp_path, 3)
    assert [r["step"] for r in index] == [1, 2, 3] and all(r["trajectories"] == 8 for r in index)
    for b, r in zip(written, index, strict=True):
        got = load_batch(tmp_path, r)
        assert (got.step, got.lease_id, got.shards) == (b.step, b.lease_id, b.shards)
        for g0, g1 in zip(b.groups, got.groups, strict=True):
            assert (g0.group_id, g0.prompt_id, g0.seq) == (g1.group_id, g1.prompt_id, g1.seq)
            for t0, t1 in zip(g0.trajectories, g1.trajectories, strict=True):
                assert t0.trajectory_id == t1.trajectory_id and t0.reward == t1.reward
                for name in ("prompt_tokens", "response_tokens", "logprobs", "versions", "loss_mask"):
                    assert np.array_equal(getattr(t0, name), getattr(t1, name)), name


def test_a_damaged_recording_is_one_error_naming_what_is_wrong(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    for s in (1, 2):
        rec.write(s, _batch(s), s - 1)
    with pytest.raises(ConfigError, match=r"run\.steps.*recorded only 2"):
        check_recording(tmp_path, 3)
    f = tmp_path / "rollouts" / "step-000002.batch"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    check_recording(tmp_path, 1)  # step 1 is intact
    with pytest.raises(ConfigError, match=r"step-000002\.batch is corrupt"):
        check_recording(tmp_path, 2)
    (tmp_path / "rollouts" / "index.jsonl").write_text(json.dumps({**read_index(tmp_path)[0], "step": 3}) + "\n")
    with pytest.raises(ConfigError, match=r"does not hold steps 1\.\.1"):
        read_index(tmp_path)
    with pytest.raises(ConfigError, match=r"index\.jsonl does not exist"):
        read_index(tmp_path / "nowhere")


def test_train_only_needs_a_recording_and_says_so(tmp_path: Path) -> None:
    from pipeline.config import load_config

    with pytest.raises(ConfigError, match=r"run\.replay_from"):
        load_config(TINY, ["run.mode='train_only'"])
    with pytest.raises(ConfigError, match=r"trainer\.checkpoint_every"):
        load_config(TINY, ["run.mode='rollout_only'", "trainer.checkpoint_every=5"])
    r = subprocess.run(slipstream("run", str(TINY), "--run-dir", str(tmp_path / "r"), "--set", "run.mode='train_only'",
                                  "--set", f"run.replay_from='{tmp_path / 'missing'}'"), capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and "run.replay_from" in r.stderr and "index.jsonl does not exist" in r.stderr


def _run(tmp_path: Path, name: str, *overrides: str) -> Path:
    run_dir = tmp_path / name
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'", "--set", "run.verify_weights=false"]
    for o in overrides:
        args += ["--set", o]
    r = subprocess.run(slipstream(*args), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
    return run_dir


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _balanced(run_dir: Path, trajectories: int) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    t = s["trajectories"]
    assert t["balanced"], t
    assert t["accepted"] == t["consumed"] + sum(t["dropped"].values()) + t["still_queued"]
    assert t["consumed"] == trajectories
    return s


@pytest.mark.slow
def test_replay_reproduces_the_live_runs_losses(tmp_path: Path) -> None:
    live = _run(tmp_path, "live", "run.steps=20", "run.record_rollouts=true")
    replay = _run(tmp_path, "replay", "run.steps=20", "run.mode='train_only'", f"run.replay_from='{live}'")

    processes = {p["role"] for p in json.loads((replay / "processes.json").read_text())}
    assert processes == {"broker", "replayer", "trainer"}, "train_only runs no producer and no engine"
    a, b = _lines(live / "steps.jsonl"), _lines(replay / "steps.jsonl")
    assert [s["step"] for s in b] == list(range(1, 21))
    ids = {}
    for run in (live, replay):
        by_step: dict[int, list[str]] = {}
        for c in _lines(run / "consumed.jsonl"):
            by_step.setdefault(c["step"], []).append(c["trajectory_id"])
        ids[run.name] = by_step
    assert ids["replay"] == ids["live"], "the replay trained other trajectories (or another order) than the live run"
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "reward_mean", "tokens_trained", "staleness_mean", "staleness_max", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-9), (x["step"], key, x[key], y[key])
    assert max(s["staleness_max"] for s in b) <= 1  # the tiny example's η

    s = _balanced(replay, 20 * 64)
    assert s["trajectories"]["generated"] == s["trajectories"]["accepted"] == 20 * 64  # what the replayer sent
    assert sum(s["trajectories"]["dropped"].values()) == 0 and s["trajectories"]["duplicates_rejected_groups"] == 0
    stats = json.loads((replay / "stats" / "replayer-0.json").read_text())
    assert stats["groups_acked"] == 20 * 8 and stats["requeues_not_replayable"] == 0 and stats["rejected"] == {}


@pytest.mark.slow
def test_rollout_only_records_then_train_only_trains_it(tmp_path: Path) -> None:
    rec = _run(tmp_path, "rollouts", "run.steps=6", "run.mode='rollout_only'", "queue.max_staleness=1")
    processes = {p["role"] for p in json.loads((rec / "processes.json").read_text())}
    assert processes == {"broker", "engine", "producer", "trainer"}  # "trainer" is the recorder here
    assert "record" in next(p["cmd"] for p in json.loads((rec / "processes.json").read_text()) if p["role"] == "trainer")
    assert not (rec / "checkpoints").exists() and not (rec / "hf-final").exists()
    index = check_recording(rec, 6)
    batches = [load_batch(rec, r) for r in index]
    for step, b in enumerate(batches, start=1):
        assert len(b.groups) == 8
        lags = [(step - 1) - t.min_version for g in b.groups for t in g.trajectories]
        assert min(lags) >= 0 and max(lags) <= 1, f"step {step}: staleness {max(lags)} beyond η = 1"
    assert max(int(t.versions.max()) for b in batches for g in b.groups for t in g.trajectories) >= 1, "the engines' version never moved"
    _balanced(rec, 6 * 64)

    replay = _run(tmp_path, "replay", "run.steps=6", "run.mode='train_only'", f"run.replay_from='{rec}'", "queue.max_staleness=1")
    trained = [c["trajectory_id"] for c in _lines(replay / "consumed.jsonl")]
    assert trained == [t.trajectory_id for b in batches for g in b.groups for t in g.trajectories]
    assert all(np.isfinite(s["loss"]) for s in _lines(replay / "steps.jsonl"))
    _balanced(replay, 6 * 64)
