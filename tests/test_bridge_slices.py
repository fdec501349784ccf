"""Trainer ranks load only their own tensor slices of a HF checkpoint (``bridge.HFCheckpoint``).

- ``HFCheckpoint.read`` returns exactly ``torch.chunk``'s piece (dims 0 and 1, uneven sizes too),
  from a sharded checkpoint with an index as from a single file;
- every TP shard the bridge builds from the lazy reader equals the one built from the whole
  checkpoint in memory (all parameter kinds, TP = 1, 2, 4, qkv bias included);
- memory (slow): a TP = 2 trainer rank (torchrun, 2 processes, gloo) builds its Megatron stage and
  loads a 197M-parameter checkpoint (790 MB fp32) either the old way (``load_hf_state``: the whole
  checkpoint in memory) or by slices; the sliced load's peak RSS (VmHWM, imports included) must be
  below 0.75x the whole load's, and the loaded weights must be identical.  The figures go to
  ``bench/results/`` when ``SLIPSTREAM_BENCH_OUT`` names a file (``bench/load_rss.py`` does that).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/test_bridge_slices.py MODEL_DIR whole|sliced OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RSS_RATIO_BOUND = 0.75

#: A Qwen3 shape whose checkpoint dominates a rank's memory (197M parameters, 790 MB fp32), with a
#: small vocabulary: Megatron's CPU initialisation builds each full weight before slicing it, so the
#: largest single tensor (here an FFN weight, 34 MB) bounds the build's transient peak.
BIG = {"vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 12,
       "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 256}


def write_checkpoint(path: Path, shard_bytes: int | None = None, seed: int = 0, extra: dict[str, tuple[int, ...]] | None = None,
                     **overrides: object) -> Path:
    """A random Qwen3 HF checkpoint (tiny example config + ``overrides``, plus random tensors of
    the ``extra`` shapes) without building the model in memory: shapes from a meta-device model,
    one random tensor at a time."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pipeline.tiny import build_tokenizer, tiny_qwen3_config

    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_qwen3_config(**overrides)
    (path / "config.json").write_text(json.dumps(cfg))
    build_tokenizer(path)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in cfg.items() if k != "architectures"}))
    gen = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head is not listed twice
    shapes.update(extra or {})
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * 0.02
        if shard_bytes and size + t.numel() * 4 > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i, sd in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sd, str(path / fname))
            weight_map.update(dict.fromkeys(sd, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("sharded", [False, True])
def test_read_is_torch_chunk(tmp_path: Path, sharded: bool) -> None:
    from consumers.bridge import HFCheckpoint, load_hf_state

    path = write_checkpoint(tmp_path / "m", shard_bytes=20_000 if sharded else None, vocab_size=18, intermediate_size=100)
    assert (path / "model.safetensors.index.json").exists() == sharded
    whole = load_hf_state(path)
    ckpt = HFCheckpoint(path)
    assert set(ckpt) == set(whole) and len(ckpt) == len(whole)
    for name, t in whole.items():
        assert torch.equal(ckpt[name], t)
        for dim in range(t.dim()):
            for size in (1, 2, 3, 4):
                for rank in range(size):
                    assert torch.equal(ckpt.read(name, dim, rank, size), torch.chunk(t, size, dim)[rank]) if rank < len(torch.chunk(t, size, dim)) \
                        else ckpt.read(name, dim, rank, size).numel() == 0, (name, dim, rank, size)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_lazy_shards_equal_whole_shards(tmp_path: Path, tp: int, qkv_bias: bool) -> None:
    from consumers import bridge

    heads, kv, hd, layers = 8, 4, 32, 2
    biases = {f"model.layers.{i}.self_attn.{p}_proj.bias": (n * hd,) for i in range(layers) for p, n in (("q", heads), ("k", kv), ("v", kv))}
    path = write_checkpoint(tmp_path / "m", shard_bytes=30_000, extra=biases if qkv_bias else None, num_attention_heads=heads,
                            num_key_value_heads=kv, tie_word_embeddings=False)
    spec = bridge.load_hf_spec(path)
    whole, lazy = bridge.load_hf_state(path), bridge.open_hf_checkpoint(path)
    entries = []
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}.self_attn"
        entries.append(bridge._Entry(f"{m}.qkv", "qkv", (f"{h}.q_proj.weight", f"{h}.k_proj.weight", f"{h}.v_proj.weight")))
        if qkv_bias:
            entries.append(bridge._Entry(f"{m}.qkv_b", "qkv", (f"{h}.q_proj.bias", f"{h}.k_proj.bias", f"{h}.v_proj.bias")))
        entries.append(bridge._Entry(f"{m}.proj", "row", (f"{h}.o_proj.weight",)))
        mlp = f"model.layers.{i}.mlp"
        entries.append(bridge._Entry(f"{m}.fc1", "fc1", (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight")))
        entries.append(bridge._Entry(f"{m}.fc2", "row", (f"{mlp}.down_proj.weight",)))
        entries.append(bridge._Entry(f"{m}.ln", "rep", (f"model.layers.{i}.input_layernorm.weight",)))
    entries.append(bridge._Entry("emb", "embed", ("model.embed_tokens.weight",)))
    entries.append(bridge._Entry("out", "embed", ("lm_head.weight",)))
    for e in entries:
        full = None
        if e.kind == "qkv":
            full = bridge._fuse_qkv(*(whole[n] for n in e.hf_names), spec)
        for rank in range(tp):
            got = bridge._to_megatron(e, lazy, spec, rank, tp)
            if full is not None:  # the old code path: fuse the whole tensors, then chunk
                assert torch.equal(got, torch.chunk(full, tp, 0)[rank]), (e.megatron_name, rank)
            assert torch.equal(got, bridge._to_megatron(e, whole, spec, rank, tp)), (e.megatron_name, rank)


# ------------------------------------------------------------------------------- peak RSS (torchrun)
def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(model_dir: str, mode: str, out_path: str) -> None:
    """One TP=2 rank: build the Megatron stage and load the checkpoint ``mode`` = whole | sliced."""
    import hashlib
    import time

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from consumers import bridge
    from consumers.config import TrainerConfig
    from consumers.model import build_transformer_config, initialize_parallel, seed_all
    from consumers.shim import apply_cpu_shim
    from consumers.trainer import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    apply_cpu_shim()
    cfg = TrainerConfig(tensor_parallel=2)
    spec = bridge.load_hf_spec(model_dir)
    initialize_parallel(2, 1)
    seed_all(cfg.seed)
    before = _peak_rss_bytes()
    t0 = time.monotonic()
    gpt = GPTModel(build_transformer_config(cfg, spec), **bridge.gpt_model_kwargs(spec), pre_process=True, post_process=True)
    built = _peak_rss_bytes()
    hf = bridge.load_hf_state(model_dir) if mode == "whole" else bridge.open_hf_checkpoint(model_dir)
    n = bridge.load_hf_into_megatron(gpt, hf, ps.get_tensor_model_parallel_rank(), 2, spec)
    del hf
    seconds = time.monotonic() - t0
    digest = hashlib.sha256()
    for _, p in sorted(gpt.named_parameters()):
        digest.update(p.detach().contiguous().numpy().tobytes())
    result = {"rank": dist.get_rank(), "mode": mode, "params_loaded": n, "peak_rss_before_build_bytes": before,
              "peak_rss_after_build_bytes": built, "peak_rss_bytes": _peak_rss_bytes(), "build_and_load_seconds": round(seconds, 3),
              "weights_sha256": digest.hexdigest()}
    results: list[dict] = [{}] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure(model_dir: Path, mode: str, out: Path) -> list[dict]:
    from tests.helpers import torchrun

    cmd, env = torchrun(__file__, str(model_dir), mode, str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun ({mode}) failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tp2_sliced_load_peak_rss_below_bound(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "big", shard_bytes=256 * 2**20, **BIG)
    whole = measure(model, "whole", tmp_path / "whole.json")
    sliced = measure(model, "sliced", tmp_path / "sliced.json")
    for w, s in zip(whole, sliced, strict=True):
        assert w["weights_sha256"] == s["weights_sha256"] and w["params_loaded"] == s["params_loaded"], (w, s)
    peak_whole = max(r["peak_rss_bytes"] for r in whole)
    peak_sliced = max(r["peak_rss_bytes"] for r in sliced)
    ratio = peak_sliced / peak_whole
    report = {"checkpoint_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")), "tensor_parallel": 2,
              "whole": whole, "sliced": sliced, "peak_rss_ratio_sliced_over_whole": round(ratio, 4), "bound": RSS_RATIO_BOUND}
    if os.environ.get("SLIPSTREAM_BENCH_OUT"):
        Path(os.environ["SLIPSTREAM_BENCH_OUT"]).write_text(json.dumps(report, indent=1))
    assert ratio < RSS_RATIO_BOUND, json.dumps(report, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    worker(*sys.argv[1:4])
