"""Resume after Ctrl-C (GitHub issue 19): the run directory, the console, and a real interrupted run.

The unit tests need no processes: :func:`pipeline.resume.prepare_run_dir` keeps the journal of a
run resumed in its own directory and moves an earlier run's aside; the console shows only the
resumed part's steps, with tokens/s over the trainer's own step interval.  The slow test runs the
tiny example twice with real processes: a run interrupted with SIGINT (as Ctrl-C does), and its
resume in the same run directory.

    pytest tests/test_resume.py            # the slow test too (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.resume import prepare_run_dir
from tests.test_faults import TINY, _audit, _logs, _run, _wait_steps


def _step(step: int, wall: float, interval: float | None = None, tokens: int = 120) -> str:
    rec = {"step": step, "policy_version": step, "reward_mean": 0.5, "tokens_trained": tokens, "queue_depth": 3,
           "staleness_mean": 0.5, "staleness_max": 1, "trajectories_dropped": 0, "wall_time_s": wall}
    if interval is not None:
        rec["interval_s"] = interval
    return json.dumps(rec)


def _checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": step, "policy_version": step}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)


def _earlier_part(run_dir: Path) -> None:
    (run_dir / "journal").mkdir(parents=True)
    (run_dir / "journal" / "segment-00000001.journal").write_bytes(b"x")
    (run_dir / "stats").mkdir()
    for name in ("producer-0", "producer-0.incarnation-0", "broker"):
        (run_dir / "stats" / f"{name}.json").write_text(json.dumps({"trajectories_generated": 64}))
    (run_dir / "summary.json").write_text("{}")


def test_resume_in_the_same_run_dir_keeps_the_journal_and_the_earlier_stats(tmp_path: Path) -> None:
    _earlier_part(tmp_path)
    _checkpoint(tmp_path, 13)
    cfg = load_config(TINY, ['trainer.resume_from="latest"'])
    resume = prepare_run_dir(cfg, tmp_path)
    assert resume is not None and (resume.step, resume.policy_version, resume.same_run, resume.part) == (13, 13, True, 2)
    assert (tmp_path / "journal" / "segment-00000001.journal").exists(), "the resumed run's broker replays this journal"
    assert not list(tmp_path.glob("journal.previous-*"))
    stats = sorted(p.name for p in (tmp_path / "stats").iterdir())
    assert stats == ["broker.json", "producer-0.incarnation-0.part1.json", "producer-0.part1.json"], stats
    assert (tmp_path / "summary.part1.json").exists() and not (tmp_path / "summary.json").exists()
    # A second resume: part 3; part 2's files get .part2, part 1's keep theirs.
    (tmp_path / "stats" / "producer-0.json").write_text("{}")
    again = prepare_run_dir(cfg, tmp_path)
    assert again is not None and again.part == 3
    assert (tmp_path / "stats" / "producer-0.part2.json").exists() and (tmp_path / "stats" / "producer-0.part1.json").exists()


@pytest.mark.parametrize("resume_from", ["", '"latest"', "other"])
def test_a_fresh_run_or_another_runs_checkpoint_moves_the_journal_aside(tmp_path: Path, resume_from: str) -> None:
    """No checkpoint to resume from (fresh, or 'latest' before any was written), or one of another
    run directory: the journal here is not this run's queue."""
    run_dir = tmp_path / "run"
    _earlier_part(run_dir)
    if resume_from == "other":
        _checkpoint(tmp_path / "elsewhere", 7)
        resume_from = json.dumps(str(tmp_path / "elsewhere" / "checkpoints" / "step-7"))
    cfg = load_config(TINY, [f"trainer.resume_from={resume_from}"] if resume_from else [])
    resume = prepare_run_dir(cfg, run_dir)
    assert not (run_dir / "journal").exists() and len(list(run_dir.glob("journal.previous-*"))) == 1
    assert (resume is not None) == ("elsewhere" in resume_from)
    assert resume is None or (resume.step, resume.same_run) == (7, False)


def test_console_first_resumed_step_tokens_per_second_and_no_reprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The interrupted part wrote steps 1-5; the resumed trainer (from the checkpoint of step 3) moves
    4-5 aside and writes step 4 again: its wall_time_s goes on from step 3's, its interval_s is its
    own.  The console prints step 4 once, with tokens / interval_s, and none of the earlier lines
    (the issue saw steps 1-80 again and tokens/s 133000000000)."""
    from pipeline.launcher import Console

    steps = tmp_path / "steps.jsonl"
    earlier = [_step(s, 10.0 * s, 10.0) for s in range(1, 6)]
    steps.write_text("".join(line + "\n" for line in earlier))
    console = Console(steps, 10, 1, enabled=False)
    console.poll()
    steps.write_text("".join(line + "\n" for line in earlier[:3]))  # the resumed trainer's _supersede_steps
    console.poll()
    with steps.open("a") as f:
        f.write(_step(4, 30.0 + 0.5, 0.4, tokens=120) + "\n")  # 120 tokens in 0.4 s: 300 tokens/s
    console.poll()
    console.close()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(shown) == 1 and shown[0].startswith("step    4 |"), shown
    assert re.search(r"tokens/s +300 \|", shown[0]), shown[0]


def test_console_rereads_a_replaced_steps_file_that_grew_past_its_offset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The resumed trainer replaces steps.jsonl (a new file) and appends to it before the console's
    next poll, so the new file is already longer than the console's offset: reading on from the old
    offset would start mid-line (a JSONDecodeError killed a Ray run's launcher so). The console
    sees the new inode, rereads from the start, shows only the new lines."""
    from pipeline.launcher import Console

    steps = tmp_path / "steps.jsonl"
    earlier = [_step(s, 10.0 * s, 10.0) for s in range(1, 4)]
    steps.write_text("".join(line + "\n" for line in earlier))
    console = Console(tmp_path / "steps.jsonl", 10, 1, enabled=False)
    console.poll()
    tmp = tmp_path / "steps.tmp"
    redone = [_step(s, 10.0 * s + 0.5, 0.5, tokens=50) for s in (2, 3, 4, 5)]
    tmp.write_text("".join(line + "\n" for line in [earlier[0], *redone]))  # longer than before
    tmp.replace(steps)
    console.poll()
    console.close()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split("|")[0].strip() for line in shown] == ["step    2", "step    3", "step    4", "step    5"], shown


def test_tokens_per_second_without_a_trainer_interval() -> None:
    """Records without interval_s (the rollout_only recorder's): the growth of wall_time_s, and '-'
    (None) rather than a huge number when the clock did not grow (another process's clock)."""
    from pipeline.launcher import tokens_per_second

    assert tokens_per_second(json.loads(_step(2, 12.0)), 10.0) == 60.0
    assert tokens_per_second(json.loads(_step(2, 3.0)), 10.0) is None


def test_supersede_steps_returns_the_clock_to_go_on_from(tmp_path: Path) -> None:
    from consumers.loop import _supersede_steps

    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(_step(s, 2.0 * s) + "\n" for s in range(1, 6)))
    assert _supersede_steps(steps, 3) == 6.0
    assert [json.loads(line)["step"] for line in steps.read_text().splitlines()] == [1, 2, 3]
    assert _supersede_steps(tmp_path / "none.jsonl", 3) == 0.0


def test_sglang_default_weight_version_is_version_zero_after_a_resume() -> None:
    """An SGLang server a resumed run started answers with weight_version "default" until the trainer
    publishes: its tokens are model.path's (version 0), not the resumed version the producer knows."""
    from producers.sglang_client import parse_generation

    resp = {"meta_info": {"output_token_logprobs": [[-0.5, 3, None], [-0.1, 4, None]], "weight_version": "default",
                          "finish_reason": {"type": "stop"}}}
    gen = parse_generation(resp, version_at_submit=7)
    assert gen.versions == [0, 0] and gen.weight_version == 0
    resp["meta_info"]["weight_version"] = "7"
    assert parse_generation(resp, version_at_submit=7).versions == [7, 7]


def _requeued(summary: dict) -> int:
    return int(summary["trajectories"]["dropped"].get("stale_requeued", 0))


@pytest.mark.slow
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """SIGINT to ``slipstream run`` mid-run, checkpoints on, then the same command with
    ``trainer.resume_from = "latest"`` in the same run directory.

    ``checkpoint_every`` exceeds the run's steps, so the only checkpoint the interrupted part can
    leave is the one written at exit.  The control for requeues is the run's own uninterrupted
    first part (no separate control run: it would add a minute to the suite): the requeued
    (stale) trajectories of the resumed part must stay within 2x of the first part's, per step;
    a first part that requeued none counts as one group, so that a single stale group does not
    fail the test.  The bug requeued hundreds: every group sampled by engines still at version 0,
    or granted by an admission budget inflated to (η + v + 1) steps (a mutant that starts the
    engines unpaused requeued 112 here)."""
    steps, every, group_size = 12, 1000, 8
    sets = (f"trainer.checkpoint_every={every}",)
    with _run(tmp_path, steps, *sets) as (proc, run_dir):
        _wait_steps(proc, run_dir, 4, tmp_path, poll_s=0.02)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does: only the launcher gets it
        assert proc.wait(timeout=120) == 130, _logs(tmp_path)
    first = json.loads((run_dir / "summary.json").read_text())
    done = [json.loads(line)["step"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    last = done[-1]
    assert last < steps, "the run finished before the interrupt: nothing to resume"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{last}", "no checkpoint of the last step at exit"
    meta = json.loads((run_dir / "checkpoints" / f"step-{last}" / "meta.json").read_text())
    assert meta["at_exit"] is True and meta["interrupted"] is True and meta["policy_version"] == last, meta
    assert first["trajectories"]["balanced"] is True, first

    with _run(tmp_path, steps, *sets, 'trainer.resume_from="latest"') as (proc, run_dir):
        assert proc.wait(timeout=240) == 0, _logs(tmp_path)
    summary = _audit(run_dir)  # every acked trajectory consumed once, dropped or still queued, across both parts
    t = summary["trajectories"]
    assert summary["resume"]["step"] == last and summary["resume"]["journal_kept"] is True, summary
    assert not list(run_dir.glob("journal.previous-*")), "the launcher moved the resumed run's journal aside"
    broker_log = (run_dir / "logs" / "broker.log").read_text()
    recovered = re.findall(r"recovered from the journal \(\d+ segments\): (\d+) unconsumed groups.*policy version (\d+)", broker_log)
    assert recovered == [(str(first["trajectories"]["still_queued"] // group_size), str(last))], (recovered, first)
    assert t["accepted"] >= first["trajectories"]["accepted"] and t["consumed"] == steps * 8 * group_size, (t, first)
    assert t["generated"] >= t["accepted"], "generated must count both parts' producers"
    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert [r["policy_version"] for r in records] == list(range(1, steps + 1))
    assert not (run_dir / "steps.superseded.jsonl").exists(), "the exit checkpoint covers every step the first part trained"
    walls = [r["wall_time_s"] for r in records]
    assert walls == sorted(walls), "wall_time_s goes on from the checkpointed step's"
    engine_log = (run_dir / "logs" / "engine-0.log").read_text()
    assert engine_log.count("generation paused until the trainer sends the current weights") == 1, "resumed engines start paused"
    lines = [json.loads(line) for line in (run_dir / "consumed.jsonl").read_text().splitlines()]
    resumed = [c for c in lines if c["step"] > last]
    assert resumed and min(c["min_version"] for c in resumed) >= last - 1, "the resumed trainer trained data of an older policy"
    before, after = _requeued(first), _requeued(summary) - _requeued(first)
    bound = 2 * max(before * (steps - last) / last, group_size)
    assert after <= bound, f"requeued {after} in the {steps - last} resumed steps vs {before} in the {last} uninterrupted ones (bound {bound})"
    # Console: the resumed part printed only its own steps.
    part2_log = (tmp_path / "launcher.log").read_text()  # _run rewrites it: the resumed launch's output only
    shown = [int(m) for m in re.findall(r"^step +(\d+) \|", part2_log, re.M)]
    assert shown == list(range(last + 1, steps + 1)), shown
    assert all(float(m) < 1e7 for m in re.findall(r"tokens/s +([\d.]+) \|", part2_log)), part2_log[-2000:]
