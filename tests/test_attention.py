"""The SDPA layer spec (consumers/attention.py) against megatron-core's local spec, and packing.

In-process (TP = 1, CPU, fp32):
- logits of the sdpa spec equal the local spec's (1e-5 relative) for the tiny dense Qwen3 and a
  tiny Qwen3-MoE, from the same checkpoint; the layer really is SDPAttention;
- packed rows do not attend across documents: at the module level, changing the keys/values of
  one segment leaves every other segment's output unchanged and each segment equals causal
  attention over that segment alone; at the model level, a document's log-probs do not change
  when the other document in its row changes;
- the jagged (variable-length) path's plumbing -- segment offsets, nested-tensor round trip,
  GQA expansion, output layout -- equals per-segment dense attention (non-causal here: the
  jagged causal kernel exists on CUDA only; the GPU benchmark checks the causal one);
- spec resolution: auto -> sdpa without Transformer Engine, te refused without it, te refused
  with packing; the layout registry forgets dead tensors.

TP = 2 and PP = 2 (torchrun, 2 processes, slow): per-token log-probs of the sdpa spec equal the
local spec's for dense and MoE models (and gathered logits at TP = 2).  Worker by hand:
``OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/test_attention.py DENSE_DIR MOE_DIR OUT.json``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import torchrun

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

REL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _moe_model(out: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from pipeline.tiny import build_tokenizer

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=16, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, tie_word_embeddings=True, max_position_embeddings=64, pad_token_id=0,
    )
    model = Qwen3MoeForCausalLM(cfg).float()
    with torch.no_grad():  # decisive routing, so tiny rounding cannot flip an expert choice
        for n, p in model.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from consumers.trainer import init_distributed
    from pipeline.tiny import make_tiny_model

    torch.set_num_threads(1)
    init_distributed()
    tmp = tmp_path_factory.mktemp("attn")
    return {"dense": make_tiny_model(tmp / "dense"), "moe": _moe_model(tmp / "moe")}


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_sdpa_logits_equal_local(models, kind):
    from consumers.attention import SDPAttention
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    tokens = torch.randint(1, 16, (3, 13), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(13).expand(3, 13)
    out = {}
    for spec in ("local", "sdpa"):
        rank = TrainerRank(TrainerConfig(seed=1, layer_spec=spec), models[kind])
        core = rank._gpt.decoder.layers[0].self_attention.core_attention
        assert isinstance(core, SDPAttention) == (spec == "sdpa")
        rank.model.eval()
        with torch.no_grad():
            out[spec] = rank.model(tokens, pos, None).float()
        rank.shutdown()
    diff = _rel(out["sdpa"], out["local"])
    print(f"{kind}: sdpa vs local logits, max rel diff {diff:.3g}")
    assert diff < REL


def _attention_module(heads: int = 4, groups: int = 2, dim: int = 8):
    """An SDPAttention built by megatron-core's own constructor (parallel state TP = 1)."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from consumers.attention import PackedLayouts, sdpa_attention_class
    from consumers.model import initialize_parallel
    from consumers.shim import apply_cpu_shim
    from consumers.trainer import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    apply_cpu_shim()
    initialize_parallel(1, 1)
    cfg = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
                            kv_channels=dim, attention_dropout=0.0, use_cpu_initialization=True)
    layouts = PackedLayouts()
    cls = sdpa_attention_class(layouts)
    return cls(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"), layouts


def _qkv(s: int, b: int, heads: int = 4, groups: int = 2, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, heads, dim, generator=g, dtype=torch.float64),
            torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64),
            torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64))


def _per_segment(q, k, v, seg, causal: bool):
    """Reference: attention of each run of equal segment id on its own ([s, b, hidden])."""
    s, b, heads, dim = q.shape
    rep = heads // k.shape[2]
    out = torch.zeros(s, b, heads * dim, dtype=q.dtype)
    for r in range(b):
        ids = seg[r].tolist()
        start = 0
        for i in range(1, s + 1):
            if i == s or ids[i] != ids[start]:
                sl = slice(start, i)
                qq = q[sl, r].transpose(0, 1)
                kk = k[sl, r].repeat_interleave(rep, dim=1).transpose(0, 1)
                vv = v[sl, r].repeat_interleave(rep, dim=1).transpose(0, 1)
                o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
                out[sl, r] = o.transpose(0, 1).reshape(i - start, heads * dim)
                start = i
    return out


SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])


def test_packed_rows_do_not_attend_across_segments():
    attn, _ = _attention_module()
    q, k, v = _qkv(10, 2)
    out = attn(q, k, v, SEGMENTS)  # CPU: the dense block-diagonal causal mask
    assert _rel(out, _per_segment(q, k, v, SEGMENTS, causal=True)) < 1e-12
    k2, v2 = k.clone(), v.clone()
    k2[0:3, 0] += 5.0  # segment 0 of row 0 only
    v2[0:3, 0] -= 3.0
    out2 = attn(q, k2, v2, SEGMENTS)
    assert torch.equal(out2[3:, 0], out[3:, 0]) and torch.equal(out2[:, 1], out[:, 1])
    assert not torch.allclose(out2[0:3, 0], out[0:3, 0])
    # Megatron's own convention (bool, True = masked) gives the same
    from consumers.batching import block_causal_mask

    assert _rel(attn(q, k, v, block_causal_mask(SEGMENTS)), out) < 1e-12


def test_jagged_path_plumbing_on_cpu():
    from consumers.attention import segment_offsets

    attn, layouts = _attention_module()
    offsets, mx, mn = segment_offsets(SEGMENTS)
    assert offsets.tolist() == [0, 3, 7, 9, 10, 15, 20] and (mx, mn) == (5, 1)
    q, k, v = (x.requires_grad_() for x in _qkv(10, 2, seed=3))
    layout = layouts.put(SEGMENTS)
    assert layouts.get(SEGMENTS) is layout and len(layouts) == 1
    got = attn.jagged_attention(q, k, v, layout, causal=False)
    ref = _per_segment(q, k, v, SEGMENTS, causal=False)
    assert _rel(got, ref) < 1e-12
    w = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad((w * got).sum(), (q, k, v))
    rg = torch.autograd.grad((w * ref).sum(), (q, k, v))
    assert max(_rel(a, b) for a, b in zip(g, rg, strict=True)) < 1e-12  # gradients flow through the jagged views
    other = SEGMENTS.clone()
    layouts.put(other)
    del other
    gc.collect()
    layouts.put(SEGMENTS)  # a put forgets entries whose tensor is gone
    assert len(layouts) == 1 and layouts.get(SEGMENTS.clone()) is None


def test_packed_documents_independent_in_model(models):
    """Two documents share a row; editing document A leaves document B's log-probs unchanged."""
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank
    from schemas.messages import Trajectory, TrajectoryGroup

    def traj(tid, prompt, resp):
        n = len(resp)
        return Trajectory(trajectory_id=tid, prompt_tokens=np.asarray(prompt, np.int32), response_tokens=np.asarray(resp, np.int32),
                          logprobs=np.full(n, -1.0, np.float32), versions=np.zeros(n, np.int32),
                          loss_mask=np.ones(n, np.uint8), reward=0.0)

    rank = TrainerRank(TrainerConfig(seed=1, layer_spec="sdpa", packing="block_diagonal", pack_row_tokens=64), models["dense"])
    b = traj("b", [3, 4, 5], [6, 7, 8, 9])
    lps = []
    for a_tokens in ([2, 9, 11, 4, 4, 12, 13, 14], [5, 5, 5, 1, 2, 3, 4, 5]):
        g = [TrajectoryGroup("g", "p", "prod", 0, 0, [traj("a", a_tokens[:3], a_tokens[3:]), b])]
        mbs = rank._microbatches(g, False)
        assert len(mbs) == 1 and mbs[0].tokens.shape[0] == 1 and mbs[0].segment_ids is not None  # one shared row
        lps.append(rank.token_logprobs(g))
    assert np.array_equal(lps[0][1], lps[1][1]), "document B must not see document A"
    assert not np.allclose(lps[0][0], lps[1][0])


def test_layer_spec_resolution():
    from consumers.attention import resolve_layer_spec, te_available

    assert not te_available()  # Transformer Engine is not installable on this CPU machine
    assert resolve_layer_spec("auto") == "sdpa" and resolve_layer_spec("local") == "local"
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        resolve_layer_spec("te")
    with pytest.raises(ValueError, match="unknown layer spec"):
        resolve_layer_spec("flash")
    from consumers.config import TrainerConfig
    from pipeline.configbase import ConfigError

    with pytest.raises(ConfigError, match="packing"):
        TrainerConfig(layer_spec="te", packing="block_diagonal")


# ------------------------------------------------------------------ TP = 2, PP = 2


def _groups(seed: int = 0):
    from tests.test_trainer_dist import _groups as make

    return make(seed)


def worker(dense: str, moe: str, out_path: str) -> None:
    import torch.distributed as dist

    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank, init_distributed

    torch.set_num_threads(1)
    init_distributed()
    res: dict[str, float] = {}
    groups = _groups()
    for kind, path in (("dense", dense), ("moe", moe)):
        for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
            lps, logits = {}, {}
            for spec in ("local", "sdpa"):
                rank = TrainerRank(TrainerConfig(tensor_parallel=tp, pipeline_parallel=pp, seed=5, layer_spec=spec), path)
                lps[spec] = rank.token_logprobs(groups)
                if tp == 2:
                    ids = torch.tensor([[1, 5, 9, 3, 13, 7, 7, 2], [1, 4, 4, 4, 13, 12, 2, 0]])
                    rank.model.eval()
                    with torch.no_grad():
                        logits[spec] = rank.model(ids, torch.arange(8).expand(2, 8), None, runtime_gather_output=True)
                rank.shutdown()
            if lps["local"]:  # the last PP stage
                a = np.concatenate(lps["sdpa"])
                b = np.concatenate(lps["local"])
                res[f"{kind}-{name}-logprobs"] = float(np.abs(a - b).max() / np.abs(b).max())
            if logits:
                res[f"{kind}-{name}-logits"] = _rel(logits["sdpa"], logits["local"])
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, res)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sdpa_equals_local_tp2_pp2(models, tmp_path):
    out = tmp_path / "res.json"
    cmd, env = torchrun(__file__, str(models["dense"]), str(models["moe"]), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    merged: dict[str, float] = {}
    for r in json.loads(out.read_text()):
        merged.update(r)
    print(merged)
    for kind in ("dense", "moe"):
        assert {f"{kind}-tp2-logprobs", f"{kind}-tp2-logits", f"{kind}-pp2-logprobs"} <= set(merged)
    assert all(v < REL for v in merged.values()), merged


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
