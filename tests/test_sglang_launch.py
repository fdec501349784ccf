"""SGLang launched by slipstream (``producer.engine = "sglang"``): flags, argv, GPUs, supervision.

- ``producer.sglang`` keys are checked against SGLang's ``ServerArgs``: an unknown ``--sglang-*``
  flag fails ``--dry-run`` naming it (with a close match), so do flags slipstream sets itself,
  switches given a value, and SGLang flags with another ``producer.engine``;
- the argv: a switch is a bare flag (false: left out), a list several values, a table JSON; GPUs are
  consecutive disjoint slices of tp x pp x dp;
- contract: the recorded 0.5.23 field list is exactly what the parser reads from the sglang 0.5.23
  wheel, and every flag of a built argv exists in the wheel's ``ServerArgs``; the parser skips
  ``Derived`` and ``no_cli`` fields and reads hand-registered flags (negative cases included);
- end to end (slow): ``slipstream run`` starts the stand-in (``tests/sglang_standin.py``, which
  records its argv and serves the HTTP subset with the embedded engine) as the SGLang server, the run
  learns through it, and a killed server is restarted on the same port while the run goes on.
  No real SGLang server is started by these tests (SGLang cannot run here).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.configbase import ConfigError
from producers import sglang_args, sglang_launch
from tests.helpers import REPO, env, slipstream
from tests.test_sglang_contract import wheel  # noqa: F401  (the sglang 0.5.23 wheel fixture)

TINY = REPO / "examples" / "tiny" / "config.toml"
STANDIN = REPO / "tests" / "sglang_standin.py"
SGLANG = ["producer.engine='sglang'", "weights.engine_kind='sglang'", "run.verify_weights=false"]


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(TINY, ["model.path='m'", *SGLANG, *overrides])


# ---------------------------------------------------------------------------------- validation
def test_unknown_flag_fails_dry_run_naming_it(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(TINY), "--dry-run", *[a for o in SGLANG for a in ("--set", o)],
                                  "--sglang-nonsense-flag", "1"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "config error at 'producer.sglang.nonsense_flag': --nonsense-flag is not a flag of SGLang's ServerArgs" in r.stderr
    assert "config OK" not in r.stderr
    r = subprocess.run(slipstream("run", str(TINY), "--dry-run", *[a for o in SGLANG for a in ("--set", o)], "--sglang-mem-fraction-statik", "0.8"),
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "did you mean 'mem_fraction_static'?" in r.stderr, r.stderr


def test_flag_rules() -> None:
    assert _cfg("producer.sglang.mem_fraction_static=0.8", "producer.sglang.tensor_parallel_size=2").producer.sglang
    with pytest.raises(ConfigError, match=r"producer.sglang.port'.*set by slipstream itself"):
        _cfg("producer.sglang.port=3000")
    with pytest.raises(ConfigError, match=r"producer.sglang.model'.*set by slipstream itself"):  # an alias of model_path
        _cfg("producer.sglang.model='x'")
    with pytest.raises(ConfigError, match=r"producer.sglang.enable_metrics'.*a switch: expected true/false"):
        _cfg("producer.sglang.enable_metrics=1")
    with pytest.raises(ConfigError, match=r"'producer.sglang'.*set producer.engine = 'sglang'"):
        load_config(TINY, ["model.path='m'", "producer.sglang.mem_fraction_static=0.8"])
    with pytest.raises(ConfigError, match=r"'weights.engine_kind': must be 'sglang'"):
        load_config(TINY, ["model.path='m'", "producer.engine='sglang'"])


def test_argv_gpus_and_router() -> None:
    cfg = _cfg("producer.num_engines=2", "producer.sglang.tp_size=2", "producer.sglang.enable_metrics=true",
               "producer.sglang.disable_radix_cache=false", "producer.sglang.json_model_override_args={rope_theta=1}",
               "producer.sglang_router=true")
    entries = sglang_launch.plan(cfg, "127.0.0.1")
    servers = [e for e in entries if e["role"] == "server"]
    assert [e["env"]["CUDA_VISIBLE_DEVICES"] for e in servers] == ["0,1", "2,3"]
    argv = servers[0]["argv"]
    assert argv[:3] == [sys.executable, "-m", "sglang.launch_server"]
    port = servers[0]["url"].rsplit(":", 1)[1]
    assert argv[3:11] == ["--model-path", "m", "--host", "127.0.0.1", "--port", port, "--weight-version", "0"]
    assert argv[11:] == ["--tp-size", "2", "--enable-metrics", "--json-model-override-args", '{"rope_theta": 1}']
    router = entries[-1]
    assert router["role"] == "router" and router["argv"][-3:] == ["--worker-urls", servers[0]["url"], servers[1]["url"]]
    assert sglang_launch.flag_args({"cuda_graph_bs_decode": [1, 2, 4]}) == ["--cuda-graph-bs-decode", "1", "2", "4"]
    assert sglang_launch.gpu_slices(2, 1, [4, 6]) == [[4], [6]]
    with pytest.raises(ConfigError, match="need 4 GPU ids"):
        sglang_launch.gpu_slices(2, 2, [0, 1, 2])


# ------------------------------------------------------------------------------------ contract
def test_recorded_fields_are_the_wheels(wheel: zipfile.ZipFile) -> None:  # noqa: F811
    from_wheel = sglang_args.fields_from_sources(sglang_args.sources_from_wheel(wheel))
    recorded = json.loads(sglang_args.RECORDED.read_text())
    assert recorded["sglang_version"] == "0.5.23"
    assert recorded["fields"] == from_wheel, "regenerate with: python -m producers.sglang_args <sglang-0.5.23 wheel>"
    assert len(from_wheel) > 300
    # spot checks against the wheel's declarations
    assert from_wheel["tp_size"]["flags"] == ["--tp-size", "--tensor-parallel-size"] and from_wheel["tp_size"]["kind"] == "value"
    assert from_wheel["enable_metrics"]["kind"] == "bool"
    assert from_wheel["disable_cuda_graph"] == {"flags": ["--disable-cuda-graph"], "kind": "bool"}  # no_cli field, hand-registered flag
    assert from_wheel["model_path"]["flags"][0] == "--model-path"


def test_built_argv_flags_exist_in_the_wheel(wheel: zipfile.ZipFile) -> None:  # noqa: F811
    flags = {flag for f in sglang_args.fields_from_sources(sglang_args.sources_from_wheel(wheel)).values() for flag in f["flags"]}
    cfg = _cfg("producer.sglang.mem_fraction_static=0.8", "producer.sglang.tp_size=2", "producer.sglang.enable_metrics=true",
               "producer.sglang.context_length=4096", "producer.sglang.random_seed=1", "producer.sglang.log_level='warning'",
               "producer.sglang.skip_server_warmup=true", "producer.sglang.disable_cuda_graph=true")
    argv = sglang_launch.plan(cfg, "127.0.0.1")[0]["argv"][3:]
    used = [a for a in argv if a.startswith("--")]
    assert len(used) == 4 + 8
    missing = [a for a in used if a not in flags]
    assert not missing, f"flags not in sglang 0.5.23's ServerArgs: {missing}"
    assert "--nonsense-flag" not in flags  # the check can fail


def test_parser_skips_derived_and_no_cli_fields() -> None:
    src = '''
class Ns(msgspec.Struct):
    _NS_PATH = "ns"
    plain: A[int, "help"] = 1
    switch: A[Optional[bool], Arg(help="x", aliases=["--sw"])] = None
    many: A[List[int], "ids"] = []
    hidden: A[bool, Arg(no_cli=True)] = False
    derived: A[int, Derived(fn="a.b")] = 0
    renamed: A[str, Arg(cli_name="--other-name")] = ""
    bare: int = 0
class NotANamespace:
    nope: A[int, "x"] = 0
'''
    server = '''
class ServerArgs:
    def add_cli_args(parser):
        parser.add_argument("--config", type=str)
        parser.add_argument("--legacy-switch", action=DeprecatedStoreTrueAction, new_flag="x")
'''
    got = sglang_args.fields_from_sources({"sglang/srt/arg_groups/fields/ns.py": src, "sglang/srt/server_args.py": server})
    assert got == {
        "config": {"flags": ["--config"], "kind": "value"},
        "legacy_switch": {"flags": ["--legacy-switch"], "kind": "bool"},
        "many": {"flags": ["--many"], "kind": "list"},
        "plain": {"flags": ["--plain"], "kind": "value"},
        "renamed": {"flags": ["--other-name"], "kind": "value"},
        "switch": {"flags": ["--switch", "--sw"], "kind": "bool"},
    }
    ast.parse(src)  # the fixture itself is valid Python


# ------------------------------------------------------------------------------ end to end
def _weight_version(port: str) -> int | None:
    """``weight_version`` from SGLang's ``GET /get_model_info`` on 127.0.0.1:PORT (None: no answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_model_info", timeout=10) as r:
            return int(json.loads(r.read())["weight_version"])
    except (OSError, ValueError, KeyError):
        return None


def _wait_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    steps = run_dir / "steps.jsonl"
    while not (steps.exists() and len(steps.read_text().splitlines()) >= n):
        if proc.poll() is not None:
            raise AssertionError(f"run exited with {proc.returncode}: {proc.stderr.read()[-3000:] if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"run did not reach step {n}"
        time.sleep(0.5)


@pytest.mark.slow
def test_launches_standin_learns_and_restarts_a_killed_server(tmp_path: Path) -> None:
    """Two stand-in servers on GPUs 3 and 5; sglang-0 is killed at step 10, restarted on its port,
    and brought up to date by the trainer's next publish (weights.resync_engines) while sglang-1
    keeps generating.  (With a single engine a restarted one would serve version 0 until the next
    publish, which never comes: every group it generates is too stale.)"""
    run_dir, record = tmp_path / "run", tmp_path / "argv.jsonl"
    STEPS = 200  # long enough for the killed server to restart (~10-20 s) while the trainer goes on
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--set", f"model.path='{tmp_path.parent / 'tiny-qwen3'}'",
            *[a for o in SGLANG for a in ("--set", o)],
            "--set", f"producer.sglang_command={json.dumps([sys.executable, str(STANDIN)])}",
            "--set", "producer.num_engines=2", "--set", "producer.sglang_gpu_ids=[3, 5]", "--set", f"run.steps={STEPS}",
            "--sglang-mem-fraction-static", "0.5", "--sglang-enable-metrics", "true", "--sglang-random-seed", "7"]
    e = {**env(), "SLIPSTREAM_STANDIN_RECORD": str(record)}
    proc = subprocess.Popen(slipstream(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=tmp_path)
    try:
        _wait_steps(run_dir, 10, proc)
        server = next(p for p in json.loads((run_dir / "processes.json").read_text()) if p["name"] == "sglang-0")
        os.kill(server["pid"], signal.SIGKILL)
        # While the run goes on, ask both servers their weight version over SGLang's own route
        # (GET /get_model_info): the restarted sglang-0 must have been resynced to a version the
        # trainer published after the restart, not serve version 0.
        _wait_steps(run_dir, 20, proc)
        ports = [a[a.index("--port") + 1] for a in (json.loads(line)["argv"] for line in record.read_text().splitlines()[:2])]
        deadline = time.monotonic() + 120
        while True:  # until the restarted server answers with a version published after the kill
            versions = [_weight_version(port) for port in ports]
            if all(v is not None and v > 10 for v in versions) or proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        trained = len((run_dir / "steps.jsonl").read_text().splitlines())
        _out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    assert proc.returncode == 0, err[-4000:]
    starts = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(starts) == 3, starts  # two servers started, sglang-0 killed and started again
    # the two first servers start together and record in whichever order they get there (under
    # load sglang-1 can be first): sglang-0's starts are the ones on its GPU, 3
    assert sorted(s["cuda_visible_devices"] for s in starts[:2]) == ["3", "5"] and starts[2]["cuda_visible_devices"] == "3"
    first, restarted = [s for s in starts if s["cuda_visible_devices"] == "3"]
    assert first["pid"] == server["pid"] != restarted["pid"]
    assert restarted["argv"] == first["argv"]  # the same port and flags again
    argv = first["argv"]
    assert argv[argv.index("--model-path") + 1] == str(tmp_path.parent / "tiny-qwen3")
    assert argv[argv.index("--mem-fraction-static") + 1] == "0.5" and "--enable-metrics" in argv
    assert argv[argv.index("--random-seed") + 1] == "7"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"]["engine"] == 1 and summary["trajectories"]["balanced"] is True
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == STEPS
    assert "sglang-0 exited with code -9; restarting it" in err
    # resynced: at step >= 40 each server holds a version published after the kill at step 10
    # (one publish per step; a lagging engine is brought up to date at the next publish)
    # (a version is published just before its steps.jsonl line is written: hence trained + 1)
    assert all(v is not None and 10 < v <= trained + 1 for v in versions), (versions, trained)
    first10 = sum(s["reward_mean"] for s in steps[:10]) / 10
    last10 = sum(s["reward_mean"] for s in steps[-10:]) / 10
    assert last10 - first10 >= 0.2, f"reward {first10:.3f} -> {last10:.3f}"
