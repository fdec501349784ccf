"""``slipstream bench e2e`` on the CPU with the tiny example: both runs happen through the real
launcher, and the figures in the JSON agree with the run directories it keeps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.bench_e2e import analyse, table
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


@pytest.mark.slow  # two whole runs of the tiny example
def test_bench_e2e_numbers_match_the_run_directories(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps = 4
    r = subprocess.run(slipstream("bench", "e2e", str(TINY), "--steps", str(steps), "--staleness", "0,2", "--out", str(out),
                                  "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'"),
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (path,) = out.glob("*-e2e-cpu.json")
    result = json.loads(path.read_text())
    assert result["command"].startswith("slipstream bench e2e") and result["device"]["cores"] and result["date"]
    assert result["complete"] and result["common_steps"] == steps and result["baseline"] == "max_staleness_0"
    assert result["placement"]["mode"] == "cpu"
    assert "trainer loop (s)" in r.stdout and "speedup vs max_staleness_0" in r.stdout  # the summary table
    kept = Path(result["kept_run_files"])
    for eta in (0, 2):
        run = result["runs"][f"max_staleness_{eta}"]
        rd = kept / f"eta{eta}"
        lines = [json.loads(x) for x in (rd / "steps.jsonl").read_text().splitlines()]
        summary = json.loads((rd / "summary.json").read_text())
        config = json.loads((rd / "config.json").read_text())
        assert config["queue"]["max_staleness"] == eta and config["run"]["steps"] == steps and config["run"]["verify_weights"]
        assert run["exit_code"] == 0 and run["steps_completed"] == steps == len(lines)
        assert run["trainer_loop_s"] == lines[-1]["wall_time_s"]
        assert run["tokens_trained"] == sum(s["tokens_trained"] for s in lines) > 0
        assert run["tokens_trained_per_s"] == pytest.approx(run["tokens_trained"] / run["trainer_loop_s"])
        assert run["trainer_wait_s_mean"] == pytest.approx(sum(s["wait_s"] for s in lines) / steps)
        assert run["publish_gb_per_s"] == pytest.approx(sum(s["publish_bytes"] for s in lines) / sum(s["publish_s"] for s in lines) / 1e9)
        assert run["engine_pause_s_max"] == max(s["engine_pause_s"] for s in lines)
        # the publish split: hashing for verify_weights is part of publish_s, the transfer is the rest
        assert all(0 < s["publish_checksum_s"] < s["publish_s"] and 0 < s["publish_send_s"] < s["publish_s"] for s in lines)
        assert run["publish_checksum_s_mean"] == pytest.approx(sum(s["publish_checksum_s"] for s in lines) / steps)
        assert run["publish_send_gb_per_s"] == pytest.approx(sum(s["publish_bytes"] for s in lines) / sum(s["publish_send_s"] for s in lines) / 1e9)
        assert all(s["verify_s"] > 0 for s in lines)
        assert run["summary_balanced"] is True and summary["trajectories"]["balanced"] is True
        assert run["verify_weights_every_step"] is True
        assert all(s["engine_checksums"] == [s["weights_checksum"]] for s in lines)
        # the engines' counter covers every sampled token: at least the trained ones
        assert run["tokens_generated"] >= run["tokens_trained"] and run["tokens_generated_per_s"] > 0
        assert set(run["host_rss_peak_bytes_by_process"]) == {"broker", "engine-0", "producer-0", "trainer"}
        assert min(run["host_rss_peak_bytes_by_process"].values()) > 10 * 2**20
        assert run["samples_in_loop"] >= 1 and (rd / "logs" / "trainer.log").exists()
        assert max(s["staleness_max"] for s in lines) <= eta
    loop = {k: v["trainer_loop_s"] for k, v in result["runs"].items()}
    assert result["speedup_trainer_loop"]["max_staleness_2"] == pytest.approx(loop["max_staleness_0"] / loop["max_staleness_2"])


def test_analyse_compares_the_steps_every_run_completed(tmp_path: Path) -> None:
    """A run cut short (--max-run-seconds) is compared on the steps both runs have."""
    rd = tmp_path / "run"
    rd.mkdir()
    lines = [{"step": i, "wall_time_s": 2.0 * i, "tokens_trained": 100, "wait_s": 0.5, "train_s": 1.0, "publish_s": 0.25,
              "publish_bytes": 10**9, "engine_pause_s": 0.001 * i, "staleness_mean": 1.0, "reward_mean": 0.1 * i,
              "weights_checksum": "c", "engine_checksums": ["c"] if i != 5 else ["x"]} for i in range(1, 6)]
    (rd / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (rd / "summary.json").write_text(json.dumps({"trajectories": {"balanced": True}}))
    samples = [{"t": float(t), "steps": t // 2, "devices": [{"index": 0, "util_pct": 50.0 + t, "mem_used_bytes": t << 30, "mem_total_bytes": 8 << 30}],
                "gpu_mem": {"trainer": t << 29}, "rss": {"trainer": 1 << 30},
                "engines": {"engine-0": {"slipstream_engine_generated_tokens_total": 100.0 * t, "slipstream_engine_memory_limit_bytes": 5e9,
                                         "slipstream_engine_memory_peak_bytes": 4e9 + t},
                            "engine-1": {"slipstream_engine_memory_limit_bytes": 5e9, "slipstream_engine_memory_peak_bytes": 4.5e9 + 1e8 * t}}}
               for t in range(0, 12)]
    a = analyse(rd, samples, 30.0, 130, steps_wanted=10, common=4)
    assert a["steps_completed"] == 5 and a["steps_compared"] == 4 and a["trainer_loop_s"] == 8.0
    assert a["steady_s_per_step"] == 2.0 and a["tokens_trained"] == 400 and a["publish_gb_per_s"] == 4.0
    assert a["verify_weights_every_step"] is True  # step 5's mismatch lies beyond the compared steps
    assert analyse(rd, samples, 30.0, 130, steps_wanted=10)["verify_weights_every_step"] is False
    assert a["gpu_util_pct_mean"] == {"0": pytest.approx(sum(50.0 + t for t in range(2, 12)) / 10)}
    assert a["gpu_mem_peak_bytes_by_process"] == {"trainer": 11 << 29} and a["gpu_mem_peak_bytes_by_device"] == {"0": 11 << 30}
    assert a["tokens_generated_per_s"] == pytest.approx(100.0)  # from the first token to the last step's sample
    assert a["engine_memory_within_budget"] == {"engine-0": True, "engine-1": False}  # engine-1 peaked at 5.6e9 > 5e9
    assert a["profile"] is None  # no run.profile_steps
    (rd / "profile").mkdir()
    (rd / "profile" / "engine-0.summary.json").write_text(json.dumps(
        {"name": "engine-0", "wall_s": 2.0, "steps": 40, "device_busy_s": 1.5, "device_busy_share": 0.75,
         "top_ops": [{"name": f"k{i}", "device_s": 0.1} for i in range(12)]}))
    prof = analyse(rd, samples, 30.0, 130, steps_wanted=10, common=4)["profile"]
    assert prof["engine-0"]["device_busy_share"] == 0.75 and len(prof["engine-0"]["top_ops"]) == 8
    assert "engine-0: 0.75" in table({"runs": {"x": {"profile": prof}}, "baseline": "x", "speedup_trainer_loop": {"x": 1.0}})
    # gauges averaged over the loop samples (t = 2..11), and the share of them with nothing running
    assert a["engine_gauges_mean_in_loop"]["engine-0:slipstream_engine_memory_peak_bytes"] == pytest.approx(4e9 + 6.5)
    assert a["engine_idle_share_in_loop"] == {"engine-0": 0.0, "engine-1": 0.0}
    for i, s in enumerate(samples):
        s["engines"]["engine-0"]["slipstream_engine_running_requests"] = float(i % 2) * 8  # idle every other sample
    b = analyse(rd, samples, 30.0, 130, steps_wanted=10, common=4)
    assert b["engine_idle_share_in_loop"]["engine-0"] == 0.5
    assert b["engine_gauges_mean_in_loop"]["engine-0:slipstream_engine_running_requests"] == 4.0
    result = {"runs": {"max_staleness_0": a}, "baseline": "max_staleness_0", "speedup_trainer_loop": {"max_staleness_0": 1.0}}
    assert "trainer loop (s)" in table(result)
    assert "engine-0: 4" in table({**result, "runs": {"max_staleness_0": b}})  # the mean running requests


def test_gpu_memory_seen_before_processes_json_named_it_is_given_its_name(tmp_path: Path) -> None:
    """NVML lists a process as soon as it holds GPU memory; processes.json names it only once the
    launcher has started it: the earlier samples' "other (pid N)" becomes its name."""
    import os

    from pipeline.bench_e2e import Sampler

    me = os.getpid()
    sampler = Sampler(tmp_path)
    sampler.gpus = type("G", (), {"sample": lambda self: ([], {me: 5 << 30})})()
    sampler.samples.append(sampler._sample())
    assert sampler.samples[0]["gpu_mem"] == {f"other (pid {me})": 5 << 30}
    (tmp_path / "processes.json").write_text(json.dumps([{"name": "engine-0", "role": "engine", "pid": me}]))
    sampler.samples.append(sampler._sample())
    assert [s["gpu_mem"] for s in sampler.samples] == [{"engine-0": 5 << 30}, {"engine-0": 5 << 30}]
