"""Qwen3-MoE at TP=2, PP=2 and EP=2 (and their products) under torchrun (gloo on CPU).

For each layout, against independent transformers references computed in the worker:
- logits: the Megatron forward (TP: vocab shards gathered; PP: stage 0's hidden states sent to
  stage 1; EP: tokens dispatched to the other rank's experts) matches the transformers forward,
  max abs diff <= 1e-4 in fp32;
- ``export_hf_state()`` right after loading equals the checkpoint bit for bit, with exactly the
  names and shapes of the HF model's ``named_parameters()`` (fused expert tensors);
- one ``train_step`` gives the loss and grad norm of the same GRPO+TIS loss on the HF model
  (rel 1e-5 / 1e-4), and the weights after it match one AdamW step on the HF model (< 3e-5, a
  tenth of the learning rate: Adam's first step is ~lr*sign(g), so a wrong gradient shows as ~lr);
- export -> safetensors -> re-import into a fresh rank -> export again is bit-exact;
- a Megatron distributed checkpoint (consumers/checkpoint.py) saved after the step and loaded into
  a fresh rank exports the same weights, bit for bit;
- ``export_hf_stage()`` (per-stage publishing): one leader per PP stage holds a part, and the parts
  are disjoint and together equal ``export_hf_state()``, bit for bit.

Layouts: TP2, PP2, EP2, TP2xEP2 on 2 ranks; TP2xPP2, PP2xEP2, TP2xPP2xEP2, EP4 on 4 ranks.  The
pytest tests launch ``torchrun --nproc_per_node=2`` (and 4) on this file; ``__main__`` is the worker:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/test_bridge_moe_dist.py MODEL_DIR OUT.json
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import torchrun

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = [("tp2", 2, 1, 1), ("pp2", 1, 2, 1), ("ep2", 1, 1, 2), ("tp2ep2", 2, 1, 2)]  # name, TP, PP, EP
# 4 processes (~80 s on 2 cores; the GPU test runs them on 4 GPUs)
LAYOUTS_4 = [("tp2pp2", 2, 2, 1), ("pp2ep2", 1, 2, 2), ("tp2pp2ep2", 2, 2, 2), ("ep4", 1, 1, 4)]

# one torchrun launch per world size (processes importing torch + transformers + megatron-core):
# ~35-65 s for the 2-rank layouts, ~80 s for the 4-rank ones on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _logits(trainer, ids):
    """Full-vocab logits on the ranks that have them (TP gathered, PP via stage 0 -> 1), else None."""
    import torch
    import torch.distributed as dist

    from consumers.bridge import unwrap_gpt

    ps = trainer._ps
    gpt = unwrap_gpt(trainer.model)
    gpt.eval()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    ids = ids.to(dev)
    pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            out = gpt(ids, pos, None, runtime_gather_output=True)
        elif ps.is_pipeline_first_stage():
            hidden = gpt(ids, pos, None)
            dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            out = None
        else:
            hidden = torch.empty(ids.shape[1], ids.shape[0], trainer.spec.hidden_size, device=dev)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            gpt.set_input_tensor(hidden)
            out = gpt(ids, pos, None, runtime_gather_output=True)
    gpt.train()
    return None if out is None else out.float().cpu()


def worker(model_dir: str, out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # GPU run: fp32 parity needs true fp32 matmuls
    torch.backends.cudnn.allow_tf32 = False
    from consumers.bridge import load_hf_spec, load_hf_state
    from consumers.bridge_moe import fuse_experts, split_fused_experts
    from consumers.checkpoint import load_checkpoint, save_checkpoint
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank, init_distributed
    from tests.test_trainer_dist import _groups, _hf_reference

    init_distributed()
    rank = dist.get_rank()
    groups = _groups()
    spec = load_hf_spec(model_dir)
    original = fuse_experts(split_fused_experts(load_hf_state(model_dir)), spec.num_layers, spec.num_experts)
    hf_names = None
    results: dict[str, dict[str, float]] = {}
    ids = torch.tensor([[1, 5, 9, 3, 13, 7, 7, 2, 11], [1, 4, 4, 4, 13, 12, 2, 6, 8]])
    hf_logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids=ids).logits.detach()
    world = dist.get_world_size()
    for name, tp, pp, ep in {2: LAYOUTS, 4: LAYOUTS_4}[world]:
        cfg = TrainerConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, data_parallel=world // (tp * pp),
                            micro_batch_size=5, seed=7)
        ref_loss, ref_gnorm, ref_after, hf = _hf_reference(model_dir, groups, cfg)
        hf_names = [(k, tuple(p.shape)) for k, p in hf.named_parameters()]
        t0 = time.perf_counter()
        trainer = TrainerRank(cfg, model_dir)
        res: dict[str, float] = {"build_s": time.perf_counter() - t0}
        logits = _logits(trainer, ids)
        if logits is not None:
            res[f"logits_max_diff_rank{rank}"] = float((logits - hf_logits).abs().max())
        exported = trainer.export_hf_state()
        if rank == 0:
            res["export_names_ok"] = float([(k, tuple(v.shape)) for k, v in exported.items()] == hf_names)
            res["export_max_diff_at_load"] = max(float((exported[k] - original[k]).abs().max()) for k in exported)
        t0 = time.perf_counter()
        stats = trainer.train_step(groups[trainer.dp_rank :: trainer.dp_size])
        res["step_s"] = time.perf_counter() - t0
        res["loss"], res["ref_loss"], res["grad_norm"], res["ref_grad_norm"] = (
            stats["loss"], ref_loss, stats["grad_norm"], ref_gnorm)
        after = trainer.export_hf_state()
        # per-stage publishing's export: each PP stage's leader holds its own layers, and the
        # stages' parts are disjoint and together equal the gathered export, bit for bit
        stage_parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(stage_parts, trainer.export_hf_stage())
        if rank == 0:
            held = [p for p in stage_parts if p]
            union = {k: v for p in held for k, v in p.items()}
            res["stage_leaders"], res["pp"] = float(len(held)), float(pp)
            res["stage_export_exact"] = float(
                sum(len(p) for p in held) == len(union) and list(union) != [] and set(union) == set(after)
                and all(torch.equal(union[k], after[k]) for k in after))
        ck = save_checkpoint(trainer, Path(out_path).parent / f"ck-{name}", step=1)
        trainer.shutdown()
        # a Megatron distributed checkpoint (experts sharded over EP) loads into a fresh rank
        fresh = TrainerRank(cfg, model_dir)
        load_checkpoint(fresh, ck)
        from_ck = fresh.export_hf_state()
        fresh.shutdown()
        if rank == 0:
            res["checkpoint_exact"] = float(all(torch.equal(from_ck[k], after[k]) for k in after))
        # export -> safetensors -> re-import into a fresh rank -> export: bit-exact
        again_dir = Path(out_path).parent / f"again-{name}"
        if rank == 0:
            res["after_step_max_diff"] = max(float((after[k] - ref_after[k]).abs().max()) for k in after)
            if os.environ.get("MOE_DEBUG"):
                print(name, sorted(((float((after[k] - ref_after[k]).abs().max()), k) for k in after), reverse=True)[:6])
            again_dir.mkdir(exist_ok=True)
            shutil.copy(Path(model_dir) / "config.json", again_dir / "config.json")
            save_file({k: v.contiguous() for k, v in after.items()}, str(again_dir / "model.safetensors"))
        dist.barrier()
        again = TrainerRank(cfg, again_dir)
        reexported = again.export_hf_state()
        again.shutdown()
        if rank == 0:
            res["reimport_exact"] = float(list(reexported) == list(after)
                                          and all(torch.equal(reexported[k], after[k]) for k in after))
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, res)
        results[name] = {k: v for p in parts for k, v in p.items()}
    if rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def run_layouts(tmp: Path, nproc: int = 2) -> dict[str, dict[str, float]]:
    """Make the tiny MoE checkpoint in ``tmp``, run the worker under torchrun (``nproc`` processes:
    gloo on CPU, NCCL on GPUs; 2 -> :data:`LAYOUTS`, 4 -> :data:`LAYOUTS_4`), return its results."""
    from tests.test_bridge_moe import _make

    model_dir, _ = _make(tmp, norm_topk_prob=True)
    out = tmp / "results.json"
    cmd, env = torchrun(__file__, str(model_dir), str(out), nproc=nproc)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))
    return results


def check_layout(r: dict[str, float]) -> None:
    """The acceptance checks of one layout's results (module docstring)."""
    diffs = [v for k, v in r.items() if k.startswith("logits_max_diff")]
    assert diffs and max(diffs) <= 1e-4, r
    assert r["export_names_ok"] == 1.0
    assert r["export_max_diff_at_load"] == 0.0, "export after load must equal the checkpoint bit for bit"
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6)
    assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-4)
    assert r["after_step_max_diff"] < 0.1 * 3e-4, r
    assert r["reimport_exact"] == 1.0
    assert r["checkpoint_exact"] == 1.0, "Megatron distributed checkpoint save -> load must be bit-exact"
    assert r["stage_leaders"] == r["pp"], "one stage leader per PP stage holds a part"
    assert r["stage_export_exact"] == 1.0, "the stages' own exports must add up to the gathered export"


@pytest.fixture(scope="module")
def moe_dist_results(tmp_path_factory):
    return run_layouts(tmp_path_factory.mktemp("moe-dist"))


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS])
def test_moe_layout_logits_export_and_step(moe_dist_results, layout):
    check_layout(moe_dist_results[layout])


@pytest.fixture(scope="module")
def moe_dist4_results(tmp_path_factory):
    return run_layouts(tmp_path_factory.mktemp("moe-dist4"), nproc=4)


@pytest.mark.parametrize("layout", [name for name, *_ in LAYOUTS_4])
def test_moe_layout_4_ranks(moe_dist4_results, layout):
    """TP2xPP2, PP2xEP2, TP2xPP2xEP2 and EP4: 4 processes, ~80 s on 2 cores."""
    check_layout(moe_dist4_results[layout])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # the worker imports tests.* helpers
    worker(sys.argv[1], sys.argv[2])
