"""The deployment recipes in ops/deploy/ stay valid: the Slurm scripts parse (``bash -n``), the
Kubernetes manifests have the structure KubeRay and Kubernetes need (every volume's claim and
ConfigMap defined, Prometheus annotations on every pod, the config file mounted where the
entrypoint reads it), and every config key they name (``--set KEY=...`` and the ConfigMap's
config.toml) exists and takes its value."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import SlipstreamConfig
from pipeline.configbase import field_docs, from_dict
from tests.helpers import REPO

DEPLOY = REPO / "ops" / "deploy"
KEYS = {key for key, *_ in field_docs(SlipstreamConfig)}
SBATCH = sorted((DEPLOY / "slurm").glob("*.sbatch"))
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def _set_keys(text: str) -> list[str]:
    return re.findall(r"--set\s+([a-z_][a-z0-9_.]*)=", text)


def _flat(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.extend(_flat(v, key) if isinstance(v, dict) and key not in ("producer.sglang", "trainer.megatron") else [key])
    return out


def test_recipes_exist() -> None:
    assert {p.name for p in SBATCH} == {"slipstream-ray.sbatch", "slipstream-torchrun.sbatch"}
    assert [p.name for p in MANIFESTS] == ["rayjob.yaml"]


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_scripts_parse_and_name_real_keys(script: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    r = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert text.startswith("#!/bin/bash") and re.search(r"^#SBATCH --nodes=\d+$", text, re.M)
    keys = _set_keys(text)
    assert keys and not set(keys) - KEYS, f"unknown config keys in {script.name}: {set(keys) - KEYS}"
    assert "slipstream run" in text


def _docs() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def _pod_templates(job: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    spec = job["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(g["rayStartParams"], g["template"]) for g in groups]


def test_kuberay_rayjob_structure() -> None:
    docs = _docs()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), d
        by_kind.setdefault(d["kind"], []).append(d)
    assert set(by_kind) == {"PersistentVolumeClaim", "ConfigMap", "RayJob"}
    job = by_kind["RayJob"][0]
    assert job["apiVersion"] == "ray.io/v1" and "slipstream run /config/config.toml" in job["spec"]["entrypoint"]
    claims = {c["metadata"]["name"] for c in by_kind["PersistentVolumeClaim"]}
    assert all("ReadWriteMany" in c["spec"]["accessModes"] for c in by_kind["PersistentVolumeClaim"]), "every pod mounts the run dir"
    maps = {c["metadata"]["name"]: c for c in by_kind["ConfigMap"]}
    for params, template in _pod_templates(job):
        ann = template["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == params["metrics-export-port"]
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "configMap" in v:
                assert v["configMap"]["name"] in maps
        for c in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/runs") in volumes and "persistentVolumeClaim" in volumes[mounts["/runs"]], "the run dir is the PVC"
            assert "configMap" in volumes[mounts["/config"]], "the config is mounted where the entrypoint reads it"
    head_params = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert head_params["num-cpus"] == "0", "the head runs the driver only"


def test_configmap_config_names_real_keys_and_loads() -> None:
    cm = next(d for d in _docs() if d["kind"] == "ConfigMap")
    data = tomllib.loads(cm["data"]["config.toml"])
    unknown = set(_flat(data)) - KEYS
    assert not unknown, f"unknown config keys in the ConfigMap: {unknown}"
    cfg = from_dict(SlipstreamConfig, data)  # every value valid
    assert cfg.run.launcher == "ray" and cfg.run.run_dir.startswith("/runs/") and cfg.trainer.checkpoint_every > 0
    assert cfg.queue.curve_server_key.startswith("/runs/"), "CURVE keys on the shared volume (off loopback)"
