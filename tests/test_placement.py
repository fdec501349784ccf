"""Placement (pipeline/placement.py): the plan for 0, 1, 2, 4 and 8 GPUs, its validation errors,
GPU detection (nvidia-smi, CUDA_VISIBLE_DEVICES, /dev/nvidia*, torch in a subprocess: faked
runners, no GPU needed), and the environment real child processes get from the launcher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipeline import placement
from pipeline.config import SlipstreamConfig, load_config
from pipeline.configbase import ConfigError
from pipeline.launcher import Launcher
from pipeline.placement import Detected, Gpu, assumed_gpus, detect_gpus, make_plan, plan_for, weight_backend
from tests.helpers import REPO, env, slipstream

TINY = REPO / "examples" / "tiny" / "config.toml"


def cfg_with(*sets: str, transport: str | None = "auto", mem_fraction: float | None = None) -> SlipstreamConfig:
    """The tiny example's config with overrides.  ``transport``/``mem_fraction`` stand in for the
    weights.transport and engine.mem_fraction keys of the weights and engine branches when this
    build lacks them (the plan reads them with getattr)."""
    cfg = load_config(TINY, list(sets))
    if transport is not None:
        cfg.weights.transport = transport  # type: ignore[attr-defined]
    if mem_fraction is not None:
        cfg.engine.mem_fraction = mem_fraction  # type: ignore[attr-defined]
    return cfg


def gpus(n: int, mem_gib: int = 141) -> Detected:
    return Detected([Gpu(i, str(i), "NVIDIA H200", mem_gib * 2**30) for i in range(n)], f"test: {n} GPUs")


# ------------------------------------------------------------------------------------- defaults
def test_no_gpu_puts_everything_on_the_cpu() -> None:
    plan = make_plan(cfg_with("producer.num_engines=2"), gpus(0), {})
    assert plan.mode == "cpu" and plan.trainer == [] and [e.gpu for e in plan.engines] == [None, None]
    assert {e.transport for e in plan.engines} == {"broadcast (gloo)"}
    for name in ("trainer", "engine-0", "engine-1", ""):
        assert plan.env_for(name, {})["CUDA_VISIBLE_DEVICES"] == ""
    assert "PYTORCH_CUDA_ALLOC_CONF" not in plan.env_for("trainer", {})  # no GPU: nothing to configure


def test_one_gpu_colocates_trainer_and_engines() -> None:
    plan = make_plan(cfg_with("producer.num_engines=2"), gpus(1), {})
    assert plan.mode == "colocated" and plan.trainer == [0] and [e.gpu for e in plan.engines] == [0, 0]
    assert [e.transport for e in plan.engines] == ["ipc", "ipc"]
    assert plan.engines[0].shares_with == ["trainer rank 0", "engine-1"]
    assert plan.env_for("trainer", {})["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan.env_for("engine-1", {})["CUDA_VISIBLE_DEVICES"] == "0"
    assert plan.env_for("", {})["CUDA_VISIBLE_DEVICES"] == ""  # broker and producers see no GPU


@pytest.mark.parametrize(("n", "tp", "engines", "trainer", "engine_gpus"), [
    (2, 1, 1, [0], [1]),
    (2, 1, 3, [0], [1, 1, 1]),
    (4, 1, 3, [0], [1, 2, 3]),
    (4, 2, 2, [0, 1], [2, 3]),
    (4, 2, 4, [0, 1], [2, 3, 2, 3]),
    (8, 2, 6, [0, 1], [2, 3, 4, 5, 6, 7]),
    (8, 4, 2, [0, 1, 2, 3], [4, 5]),
    (2, 2, 2, [0, 1], [0, 1]),  # the trainer takes every GPU: engines share its GPUs, round robin
])
def test_several_gpus_disaggregate(n: int, tp: int, engines: int, trainer: list[int], engine_gpus: list[int]) -> None:
    plan = make_plan(cfg_with(f"trainer.tensor_parallel={tp}", f"producer.num_engines={engines}"), gpus(n), {})
    assert plan.trainer == trainer and [e.gpu for e in plan.engines] == engine_gpus
    assert plan.ranks == tp and plan.publishers == [0]
    assert plan.env_for("trainer", {})["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, trainer))
    for i, g in enumerate(engine_gpus):
        assert plan.env_for(f"engine-{i}", {})["CUDA_VISIBLE_DEVICES"] == str(g)
        assert plan.engines[i].transport == ("ipc" if g == trainer[0] else "broadcast (nccl)")
    shared = set(trainer) & set(engine_gpus)
    assert plan.mode == ("disaggregated" if not shared else "colocated" if set(engine_gpus) <= set(trainer) else "mixed")


def test_unused_gpus_are_noted() -> None:
    plan = make_plan(cfg_with(), gpus(8), {})
    assert plan.trainer == [0] and plan.engines[0].gpu == 1
    assert any("[2, 3, 4, 5, 6, 7] unused" in n for n in plan.notes)


def test_explicit_devices_and_visible_ids() -> None:
    cfg = cfg_with("trainer.tensor_parallel=2", "producer.num_engines=3", "placement.trainer_devices=[2, 3]",
                   "placement.engine_devices=[0, 0, 1]")
    plan = make_plan(cfg, assumed_gpus(4, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}), {})
    assert plan.trainer == [2, 3] and [e.gpu for e in plan.engines] == [0, 0, 1]
    assert plan.env_for("trainer", {})["CUDA_VISIBLE_DEVICES"] == "6,7"  # local rank r -> the r-th listed
    assert plan.env_for("engine-2", {})["CUDA_VISIBLE_DEVICES"] == "5"
    assert plan.mode == "disaggregated"


def test_per_stage_publishing_ranks_are_the_stage_leaders() -> None:
    cfg = cfg_with("trainer.tensor_parallel=2", "trainer.pipeline_parallel=2", "trainer.data_parallel=2",
                   "producer.num_engines=2", "placement.engine_devices=[0, 4]")
    plan = make_plan(cfg, gpus(8), {})
    assert plan.publishers == [0, 4] and plan.trainer == list(range(8))
    assert [e.transport for e in plan.engines] == ["ipc", "ipc"]  # each shares a stage leader's GPU
    cfg.weights.per_stage_publish = False
    assert make_plan(cfg, gpus(8), {}).publishers == [0]


def test_engine_memory_budget_in_the_plan() -> None:
    plan = make_plan(cfg_with(mem_fraction=0.25), gpus(1, mem_gib=140), {})
    assert plan.engines[0].budget_bytes == 35 * 2**30
    assert "0.25 of 140 GiB = 35.0 GiB" in plan.engines[0].budget
    assert plan.to_json()["engines"][0]["memory_budget_bytes"] == 35 * 2**30



def test_auto_engine_memory_fraction_follows_the_device_and_its_neighbours() -> None:
    """engine.mem_fraction = 0 (the default): 0.3 of a GPU shared with a trainer rank, 0.85 of a GPU
    of its own, 0.5 of host RAM on CPU, each split between the engines there; the launcher starts
    each engine with its resolved fraction."""
    one = make_plan(cfg_with(), gpus(1, mem_gib=100), {}).engines[0]
    assert (one.mem_fraction, one.budget_bytes) == (0.3, int(0.3 * 100 * 2**30)) and "(auto)" in one.budget
    alone = make_plan(cfg_with("producer.num_engines=2", "placement.engine_devices=[1, 1]"), gpus(2), {}).engines
    assert [e.mem_fraction for e in alone] == [0.425, 0.425]
    cpu = make_plan(cfg_with("producer.num_engines=2"), gpus(0), {}).engines
    assert [e.mem_fraction for e in cpu] == [0.25, 0.25] and "host memory" in cpu[0].budget
    assert make_plan(cfg_with(mem_fraction=0.6), gpus(1), {}).engines[0].mem_fraction == 0.6  # explicit: as set


def test_sglang_servers_are_listed_and_checked() -> None:
    """producer.engine = 'sglang': the servers keep producers.sglang_launch's GPUs; one on the
    publishing rank's GPU is refused with the ids to use instead."""
    sglang = ["producer.engine='sglang'", "weights.engine_kind='sglang'", "producer.num_engines=2", "run.verify_weights=false"]
    plan = make_plan(cfg_with(*sglang, "producer.sglang_gpu_ids=[1, 2]"), gpus(3), {})
    assert plan.engines == [] and plan.trainer == [0] and plan.mode == "disaggregated"
    assert any("2 SGLang server(s) on GPUs [[1], [2]]" in n for n in plan.notes)
    with pytest.raises(ConfigError) as e:
        make_plan(cfg_with(*sglang), gpus(3), {})  # their default ids 0, 1: GPU 0 is the trainer's
    assert e.value.key == "producer.sglang_gpu_ids" and "GPU(s) [0]" in e.value.message and "= [1, 2]" in e.value.message
    assert make_plan(cfg_with(*sglang), gpus(0), {}).mode == "cpu"  # no GPU: nothing to clash


# ------------------------------------------------------------------------------------ allocator
def test_allocator_option_unless_the_user_set_one() -> None:
    plan = make_plan(cfg_with(), gpus(1), {})
    base = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    e = plan.env_for("engine-0", base)
    assert e["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert e["NCCL_NVLS_ENABLE"] == "0" and e["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"  # kept
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        user = {key: "garbage_collection_threshold:0.8"}
        p = make_plan(cfg_with(), gpus(1), user)
        assert p.alloc_conf == "" and p.env_for("trainer", user) == {**user, "CUDA_VISIBLE_DEVICES": "0"}
        assert any("from the environment" in n for n in p.notes)
    off = make_plan(cfg_with("placement.alloc_conf=''"), gpus(1), {})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in off.env_for("trainer", {})


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("sets", "n", "key", "words"), [
    (["placement.trainer_devices=[2]"], 2, "placement.trainer_devices[0]", "GPU 2 does not exist: 2 GPUs are visible"),
    (["producer.num_engines=2", "placement.engine_devices=[1, 5]"], 4, "placement.engine_devices[1]", "indices 0..3"),
    (["placement.engine_devices=[0]"], 0, "placement.engine_devices[0]", "0 GPUs are visible"),
    (["trainer.tensor_parallel=2", "placement.trainer_devices=[0]"], 4, "placement.trainer_devices", "has 1 entry but the trainer has 2 rank(s)"),
    (["trainer.tensor_parallel=2"], 1, "placement.trainer_devices", "the trainer has 2 ranks (TP x PP x DP = 2 x 1 x 1) but 1 GPU is visible"),
    (["trainer.data_parallel=4", "trainer.tensor_parallel=2"], 4, "placement.trainer_devices", "has 8 ranks"),
    (["producer.num_engines=2", "placement.engine_devices=[1]"], 2, "placement.engine_devices", "producer.num_engines = 2"),
    (["producer.engine='attach'", "producer.engine_urls=['http://x:1']", "placement.engine_devices=[1]"], 2,
     "placement.engine_devices", "starts none"),
    (["engine.device='cpu'"], 2, "<backend>", "NCCL, which needs a GPU on both ends"),
])
def test_plan_errors_name_the_key(sets: list[str], n: int, key: str, words: str) -> None:
    cfg = cfg_with(*sets)
    with pytest.raises(ConfigError) as e:
        make_plan(cfg, gpus(n), {})
    assert e.value.key == (weight_backend(cfg, True)[1] if key == "<backend>" else key) and words in e.value.message, e.value


def test_duplicate_trainer_gpu_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match=r"placement.trainer_devices\[1\].*GPU 0 is already trainer rank 0's"):
        load_config(TINY, ["trainer.tensor_parallel=2", "placement.trainer_devices=[0, 0]"])
    with pytest.raises(ConfigError, match=r"placement.gpus"):
        load_config(TINY, ["placement.gpus=-2"])


def test_colocated_broadcast_over_nccl_is_refused() -> None:
    """NCCL refuses two ranks on one device: a colocated engine needs IPC (or gloo)."""
    has_ipc = hasattr(load_config(TINY).weights, "transport")
    for transport in ["broadcast"] + ([] if has_ipc else [None]):  # None: a build without weights.transport
        cfg = cfg_with(transport=transport)
        with pytest.raises(ConfigError) as e:
            make_plan(cfg, gpus(1), {})
        assert e.value.key == weight_backend(cfg, True)[1] and "NCCL refuses two ranks on one device" in e.value.message
    key = weight_backend(cfg, True)[1]
    gloo = make_plan(cfg_with(f"{key}='gloo'", transport="broadcast"), gpus(1), {})
    assert gloo.engines[0].transport == "broadcast (gloo)"
    assert make_plan(cfg_with(transport="ipc"), gpus(2), {}).engines[0].transport == "ipc"  # forced


def test_engines_that_cannot_share_a_gpu() -> None:
    with pytest.raises(ConfigError) as e:
        make_plan(cfg_with("producer.num_engines=3", "placement.engine_devices=[1, 1, 1]", mem_fraction=0.4), gpus(2), {})
    assert e.value.key == "engine.mem_fraction" and "3 engines share GPU 1" in e.value.message
    make_plan(cfg_with("producer.num_engines=2", "placement.engine_devices=[1, 1]", mem_fraction=0.4), gpus(2), {})


# ------------------------------------------------------------------------------------ detection
def _runner(smi_stdout: str | None, torch_count: int | None = None) -> Any:
    calls: list[list[str]] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if cmd[0] == "nvidia-smi":
            assert smi_stdout is not None
            return subprocess.CompletedProcess(cmd, 0, smi_stdout, "")
        assert torch_count is not None, f"unexpected command {cmd}"
        return subprocess.CompletedProcess(cmd, 0, f"{torch_count}\n", "")

    run.calls = calls  # type: ignore[attr-defined]
    return run


SMI = ("0, GPU-aaaa-1111, NVIDIA H200, 143771\n1, GPU-bbbb-2222, NVIDIA H200, 143771\n"
       "2, GPU-cccc-3333, NVIDIA H200, 143771\n3, GPU-dddd-4444, NVIDIA H200, 143771\n")


def test_detect_with_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    d = detect_gpus({}, _runner(SMI))
    assert [g.visible_id for g in d.gpus] == ["0", "1", "2", "3"] and d.source == "nvidia-smi"
    assert d.gpus[0].memory_bytes == 143771 * 2**20 and d.gpus[0].name == "NVIDIA H200"
    d = detect_gpus({"CUDA_VISIBLE_DEVICES": "2,GPU-aaaa"}, _runner(SMI))  # an index and a UUID prefix
    assert [(g.index, g.visible_id, g.memory_bytes) for g in d.gpus] == [(0, "2", 143771 * 2**20), (1, "GPU-aaaa", 143771 * 2**20)]


@pytest.mark.parametrize(("visible", "n"), [("", 0), ("-1", 0), ("1,-1,2", 1), ("0,1", 2), ("3", 1)])
def test_detect_respects_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, visible: str, n: int) -> None:
    monkeypatch.setattr(placement.shutil, "which", lambda name: None)
    assert len(detect_gpus({"CUDA_VISIBLE_DEVICES": visible}, _runner(None)).gpus) == n


def test_detect_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(placement.shutil, "which", lambda name: None)
    run = _runner(None)  # would fail the test if torch were asked
    d = detect_gpus({}, run, dev=tmp_path)
    assert d.gpus == [] and run.calls == [] and "no nvidia-smi" in d.source
    (tmp_path / "nvidia0").touch()
    run = _runner(None, torch_count=2)
    d = detect_gpus({}, run, dev=tmp_path)
    assert len(d.gpus) == 2 and run.calls[0][:2] == [sys.executable, "-c"] and "torch" in d.source


def test_plan_for_assumes_or_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(plan_for(cfg_with("placement.gpus=4"), {}).gpus) == 4
    assert plan_for(cfg_with("placement.gpus=0"), {"CUDA_VISIBLE_DEVICES": "0,1"}).mode == "cpu"
    monkeypatch.setattr(placement, "detect_gpus", lambda env: gpus(2))
    assert plan_for(cfg_with(), {}).engines[0].gpu == 1


# ------------------------------------------------------------------------ launcher and CLI level
def test_children_get_their_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real child processes started by the launcher see their GPUs, the allocator option and the
    launcher's NCCL settings; processes.json records the GPUs; the engine's re-run script too."""
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    cfg = cfg_with("producer.num_engines=2", "trainer.tensor_parallel=2", "placement.gpus=4")
    launcher = Launcher(cfg, tmp_path, plan_for(cfg, {}))
    show = "import json, os; print(json.dumps({k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'PYTORCH_CUDA_ALLOC_CONF', 'NCCL_NVLS_ENABLE')}))"
    for name, role in (("trainer", "trainer"), ("engine-1", "engine"), ("producer-0", "producer")):
        launcher._spawn(name, role, [sys.executable, "-c", show])
    for c in launcher.children:
        assert c.wait(60) == 0
    launcher._write_processes()
    launcher.shutdown()
    seen = {c.name: json.loads(c.log_path.read_text().strip().splitlines()[-1]) for c in launcher.children}
    assert seen["trainer"] == {"CUDA_VISIBLE_DEVICES": "0,1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "NCCL_NVLS_ENABLE": "0"}
    assert seen["engine-1"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["producer-0"]["CUDA_VISIBLE_DEVICES"] == ""
    procs = {p["name"]: p for p in json.loads((tmp_path / "processes.json").read_text())}
    assert procs["trainer"]["gpus"] == [0, 1] and procs["engine-1"]["gpus"] == [3] and procs["producer-0"]["gpus"] == []
    assert procs["engine-1"]["weight_transport_expected"] == "broadcast (nccl)"
    assert "CUDA_VISIBLE_DEVICES=3 " in (tmp_path / "cmds" / "engine-1.sh").read_text()


def test_processes_json_shows_the_transport_the_trainer_chose(tmp_path: Path) -> None:
    cfg = cfg_with("placement.gpus=0")
    launcher = Launcher(cfg, tmp_path, plan_for(cfg, {}))
    child = launcher._spawn("engine-0", "engine", [sys.executable, "-c", "pass"])
    child.extra["url"] = "http://127.0.0.1:1234"
    child.wait(60)
    launcher._write_processes()
    assert "weight_transport" not in json.loads((tmp_path / "processes.json").read_text())[0]
    (tmp_path / "ports").mkdir(exist_ok=True)
    (tmp_path / "ports" / "trainer.json").write_text(json.dumps({"metrics_port": 1, "weight_transports": {"http://127.0.0.1:1234/": "broadcast"}}))
    launcher._refresh_processes()
    assert json.loads((tmp_path / "processes.json").read_text())[0]["weight_transport"] == "broadcast"
    launcher.shutdown()


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    r = subprocess.run(slipstream("run", str(TINY), "--dry-run", "--set", "placement.gpus=4", "--set", "producer.num_engines=2",
                                  "--set", "trainer.tensor_parallel=2"), capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "placement: disaggregated (4 GPUs: placement.gpus = 4)" in r.stderr
    assert "engine-1           GPU 3" in r.stderr and "weights by broadcast (nccl)" in r.stderr
    r = subprocess.run(slipstream("run", str(TINY), "--dry-run", "--set", "placement.gpus=1", "--set", "trainer.data_parallel=2"),
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "placement.trainer_devices" in r.stderr and "2 ranks" in r.stderr
