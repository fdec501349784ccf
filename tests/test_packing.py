"""Sequence packing (``trainer.packing = "block_diagonal"``): layout, mask, and packed == padded.

Layout (no Megatron): first-fit-decreasing rows respect their capacity; every per-token tensor of a
packed microbatch, unpacked to one row per trajectory, equals the padded microbatch's row; the
block-diagonal causal mask has the expected entries; config validation.

Equivalence (real megatron-core on CPU, gloo, fp32, TP=1 in-process): for the same batch, packed
and padded training give the same per-token log-probs (max abs diff <= 1e-5), the same loss and
statistics (rel 1e-5), and the same gradients (``main_grad``, grad_clip 0, max abs diff <= 1e-5),
for GRPO+TIS token mean, GRPO seq mean, GSPO seq mean and PPO + decoupled/log-linear + KL to a
reference + entropy bonus; the SFT step too.  Typical measured differences are ~1e-7.

The mask matters: with the mask dropped (plain causal attention over the packed row) the
log-probs of a trajectory packed after another change by far more than the tolerance.  RoPE: a
trajectory placed at offset ~300 in a row gets the log-probs it gets alone (Megatron rotates by
absolute row position; the scores depend only on relative offsets).

TP=2 and PP=2 (torchrun, 2 processes): the same packed == padded checks, marked slow.  Run the
worker by hand: ``OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/test_packing.py MODEL OUT``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.configbase import ConfigError
from schemas.messages import Trajectory, TrajectoryGroup
from tests.helpers import torchrun

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]

LP_TOL = 1e-5  # fp32 per-token log-prob, packed vs padded
GRAD_TOL = 1e-5  # fp32 gradient entries (main_grad), packed vs padded
REL_TOL = 1e-5  # loss and statistics


def _traj(prompt, response, rng, tid, reward=None, version_span=0):
    n = len(response)
    return Trajectory(
        trajectory_id=tid,
        prompt_tokens=np.asarray(prompt, np.int32),
        response_tokens=np.asarray(response, np.int32),
        logprobs=(-rng.random(n) * 3).astype(np.float32),
        versions=rng.integers(0, version_span + 1, size=n).astype(np.int32),
        loss_mask=(rng.random(n) > 0.2).astype(np.uint8),
        reward=float(rng.random()) if reward is None else reward,
    )


def groups_for(seed: int = 0, n_groups: int = 4, group_size: int = 4, max_resp: int = 24, version_span: int = 0):
    """Groups with varied lengths (prompts 3-8, responses 1..max_resp) so rows hold several."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_groups):
        prompt = rng.integers(3, 16, size=int(rng.integers(3, 9)))
        trajs = [
            _traj(prompt, rng.integers(1, 16, size=int(rng.integers(1, max_resp + 1))), rng, f"t{i}.{j}", version_span=version_span)
            for j in range(group_size)
        ]
        out.append(TrajectoryGroup(f"g{i}", f"p{i}", "prod", 0, i, trajs))
    return out


# ------------------------------------------------------------------ layout (no Megatron)


def test_pack_rows_first_fit_decreasing():
    from consumers.batching import pack_rows

    lengths = [5, 9, 3, 12, 4, 4, 1]
    rows = pack_rows(lengths, row_tokens=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert rows == [[3], [1, 6], [0, 4], [5, 2]]  # 12 alone (over capacity); 9+1; 5+4; 4+3
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows if len(r) > 1)
    assert pack_rows(lengths, 10, max_per_row=1) == [[i] for i in (3, 1, 0, 4, 5, 2, 6)]
    with pytest.raises(ValueError):
        pack_rows(lengths, 0)


def test_packed_layout_matches_padded_rows():
    from consumers.batching import build_microbatches, flatten, make_microbatches, unpack

    groups = groups_for(seed=1)
    trajs, _ = flatten(groups, True)
    padded = build_microbatches(groups, 1, True)  # one trajectory per microbatch, in flatten order
    packed = make_microbatches(groups, True, "block_diagonal", micro_batch_size=2, max_tokens=0, row_tokens=48)
    assert sum(len(mb.traj_order) for mb in packed) == len(trajs)
    assert any(mb.segment_ids is not None and int(mb.segment_ids.max()) >= 2 for mb in packed), "rows should hold several"
    seen = set()
    for mb in packed:
        b = mb.tokens.shape[0]
        assert b <= 2 and int(mb.seq_valid.sum()) <= 48 * b
        fields = ("tokens", "labels", "loss_mask", "behav_logprobs", "advantages", "versions", "position_ids")
        for k, i in enumerate(mb.traj_order):
            seen.add(i)
            ref = padded[i]
            n = ref.tokens.shape[1]
            assert int(mb.seq_valid[k].sum()) == n
            for f in fields:
                got = unpack(getattr(mb, f), mb)[k, :n]
                assert torch.equal(got.to(getattr(ref, f).dtype), getattr(ref, f)[0]), (f, i)
        assert mb.num_tokens == sum(padded[i].num_tokens for i in mb.traj_order)
    assert seen == set(range(len(trajs)))
    # row_tokens = 0: rows no longer than the batch's longest trajectory
    longest = max(len(t.prompt_tokens) + len(t.response_tokens) - 1 for t in trajs)
    auto = make_microbatches(groups, True, "block_diagonal", micro_batch_size=64, max_tokens=0, row_tokens=0)
    assert max(mb.tokens.shape[1] for mb in auto) == longest
    assert sum(mb.tokens.shape[0] for mb in auto) < len(trajs)


def test_block_causal_mask_entries():
    from consumers.batching import block_causal_mask

    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~block_causal_mask(seg)[0, 0]
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert block_causal_mask(seg).shape == (1, 1, 6, 6) and block_causal_mask(seg).dtype == torch.bool
    assert torch.equal(allowed, expect)


def test_config_validation():
    from consumers.config import TrainerConfig

    assert TrainerConfig(packing="block_diagonal", pack_row_tokens=128).packing == "block_diagonal"
    assert TrainerConfig(packing="block_diagonal").pack_row_tokens == 0
    with pytest.raises(ConfigError, match="pack_row_tokens"):
        TrainerConfig(packing="block_diagonal", pack_row_tokens=1024, max_tokens_per_microbatch=512)
    with pytest.raises(ConfigError, match="pack_row_tokens"):
        TrainerConfig(pack_row_tokens=-1)
    with pytest.raises(ConfigError, match="packing"):
        TrainerConfig(packing="thd", pack_row_tokens=8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="masked_softmax_fusion"):
        TrainerConfig(packing="block_diagonal", pack_row_tokens=8, megatron={"masked_softmax_fusion": True})


# ------------------------------------------------------------------ Megatron, TP=1 in-process


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from consumers.trainer import init_distributed
    from pipeline.tiny import make_tiny_model

    torch.set_num_threads(1)
    init_distributed()
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", max_position_embeddings=1024)


def run_both(model_dir, groups, **cfg_kw):
    """{packing: (per-trajectory log-probs, stats, {name: grad}, microbatches)} for padded and packed."""
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    out = {}
    for packing in ("none", "block_diagonal"):
        kw = {"seed": 3, "grad_clip": 0.0, "micro_batch_size": 4, "max_tokens_per_microbatch": 64, **cfg_kw}
        tr = TrainerRank(TrainerConfig(packing=packing, **kw), model_dir)
        lps = tr.token_logprobs(groups)
        mbs = tr._microbatches(groups, tr.cfg.advantage_std_norm)
        stats = tr.train_step(groups)
        grads = {n: p.main_grad.detach().clone() for n, p in tr.model.named_parameters()}
        out[packing] = (lps, stats, grads, mbs)
    return out


def compare(res) -> dict[str, float]:
    (lp0, st0, g0, _), (lp1, st1, g1, mbs) = res["none"], res["block_diagonal"]
    assert any(mb.segment_ids is not None and int(mb.segment_ids.max()) >= 1 for mb in mbs), "nothing was packed"
    assert len(lp0) == len(lp1) and all(a.shape == b.shape for a, b in zip(lp0, lp1, strict=True))
    lp_diff = max(float(np.abs(a - b).max()) for a, b in zip(lp0, lp1, strict=True) if a.size)
    g_diff = max(float((g0[k] - g1[k]).abs().max()) for k in g0)
    g_scale = max(float(g0[k].abs().max()) for k in g0)
    assert lp_diff <= LP_TOL, lp_diff
    assert g_scale > 1e-4, "gradients should not vanish"
    assert g_diff <= GRAD_TOL, g_diff
    for k, v in st0.items():
        if k in ("step_seconds",) or (isinstance(v, float) and np.isnan(v)):
            continue
        assert st1[k] == pytest.approx(v, rel=REL_TOL, abs=1e-7), k
    return {"logprob": lp_diff, "grad": g_diff, "loss": abs(st0["loss"] - st1["loss"])}


CASES = {
    "grpo_tis_token_mean": {"loss": "grpo", "off_policy": "tis", "loss_agg": "token_mean"},
    "grpo_tis_seq_mean": {"loss": "grpo", "off_policy": "tis", "loss_agg": "seq_mean"},
    "gspo_seq_mean": {"loss": "gspo", "off_policy": "tis", "loss_agg": "seq_mean", "eps_clip_low": 3e-4, "eps_clip_high": 4e-4},
    "ppo_decoupled_kl_entropy": {
        "loss": "ppo", "off_policy": "decoupled", "proximal": "loglinear", "loss_agg": "seq_mean",
        "kl_coef": 0.1, "entropy_coef": 0.01, "temperature": 0.8,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_equals_padded(model_dir, case):
    groups = groups_for(seed=7, version_span=2)
    diffs = compare(run_both(model_dir, groups, **CASES[case]))
    print(f"{case}: max |diff| {diffs}")


def test_sequence_level_terms_see_trajectories_not_rows(model_dir, monkeypatch):
    """The equivalence test can fail: feeding policy_loss the packed rows as they are (no unpack,
    so seq_mean and GSPO's ratio would treat a row as one sequence) changes the loss."""
    import consumers.trainer as trainer_mod
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    groups = groups_for(seed=2)
    res = run_both(model_dir, groups, loss="gspo", loss_agg="seq_mean")
    assert res["block_diagonal"][1]["loss"] == pytest.approx(res["none"][1]["loss"], rel=REL_TOL)
    mbs = res["block_diagonal"][3]
    assert sum(mb.tokens.shape[0] for mb in mbs) < 16  # fewer rows than trajectories
    monkeypatch.setattr(trainer_mod, "unpack", lambda x, mb, fill=0.0: x)
    cfg = TrainerConfig(
        seed=3, grad_clip=0.0, micro_batch_size=4, max_tokens_per_microbatch=64, packing="block_diagonal",
        loss="gspo", loss_agg="seq_mean",
    )
    wrong = TrainerRank(cfg, model_dir).train_step(groups)["loss"]
    rel = abs(wrong - res["none"][1]["loss"]) / abs(res["none"][1]["loss"])
    print(f"per-row aggregation: loss off by {rel:.3g} (relative)")
    assert rel > 100 * REL_TOL


def test_sft_step_packed_equals_padded(model_dir):
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    rng = np.random.default_rng(5)
    ex = [(rng.integers(3, 16, size=int(rng.integers(2, 6))), rng.integers(1, 16, size=int(rng.integers(1, 12)))) for _ in range(12)]
    out = {}
    for packing in ("none", "block_diagonal"):
        tr = TrainerRank(TrainerConfig(seed=3, grad_clip=0.0, packing=packing, max_tokens_per_microbatch=40), model_dir)
        st = tr.sft_step(ex)
        out[packing] = (st, {n: p.main_grad.detach().clone() for n, p in tr.model.named_parameters()})
    (s0, g0), (s1, g1) = out["none"], out["block_diagonal"]
    assert s1["loss"] == pytest.approx(s0["loss"], rel=REL_TOL)
    assert max(float((g0[k] - g1[k]).abs().max()) for k in g0) <= GRAD_TOL


@pytest.mark.parametrize("layer_spec", ["local", "sdpa"])
def test_mask_is_used(model_dir, monkeypatch, layer_spec):
    """Drop the mask (the attention then is plain causal over the whole packed row): the log-probs
    of every trajectory that is not first in its row must change.  The local spec gets a
    block-diagonal mask from the trainer; the sdpa spec builds its own from the segment ids."""
    import consumers.attention as attention_mod
    import consumers.trainer as trainer_mod
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    groups = groups_for(seed=3)
    tr = TrainerRank(TrainerConfig(seed=3, packing="block_diagonal", pack_row_tokens=64, layer_spec=layer_spec), model_dir)
    with_mask = tr.token_logprobs(groups)
    padded = TrainerRank(TrainerConfig(seed=3, layer_spec=layer_spec), model_dir).token_logprobs(groups)
    assert max(float(np.abs(a - b).max()) for a, b in zip(with_mask, padded, strict=True)) <= LP_TOL
    if layer_spec == "local":
        monkeypatch.setattr(trainer_mod, "block_causal_mask", lambda seg: None)
    else:
        monkeypatch.setattr(attention_mod, "block_causal_allowed", lambda seg: None)
    no_mask = tr.token_logprobs(groups)
    mbs = tr._microbatches(groups, True)
    later = [
        i for mb in mbs if mb.segment_ids is not None
        for k, i in enumerate(mb.traj_order) if int(mb.segment_ids.reshape(-1)[mb.seq_index[k, 0]]) > 0
    ]
    assert later, "some trajectory must follow another in its row"
    worst = min(float(np.abs(no_mask[i] - padded[i]).max()) for i in later)
    print(f"without the mask, smallest per-trajectory max |diff| = {worst:.3g}")
    assert worst > 100 * LP_TOL


def test_rope_offset_invariance(model_dir):
    """A trajectory placed after a ~300-token filler in the same row gets its alone log-probs."""
    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank

    rng = np.random.default_rng(11)
    probe = _traj(rng.integers(3, 16, size=6), rng.integers(1, 16, size=40), rng, "probe")
    filler = _traj(rng.integers(3, 16, size=6), rng.integers(1, 16, size=300), rng, "filler")
    g = [TrajectoryGroup("g", "p", "prod", 0, 0, [filler, probe])]
    packed = TrainerRank(TrainerConfig(seed=3, packing="block_diagonal", pack_row_tokens=400), model_dir)
    mbs = packed._microbatches(g, True)
    assert len(mbs) == 1 and mbs[0].tokens.shape[0] == 1 and int(mbs[0].seq_index[1, 0]) == 305  # probe at 305
    lp_packed = packed.token_logprobs(g)[1]
    lp_alone = TrainerRank(TrainerConfig(seed=3), model_dir).token_logprobs([TrajectoryGroup("g", "p", "prod", 0, 0, [probe])])[0]
    diff = float(np.abs(lp_packed - lp_alone).max())
    print(f"RoPE offset 305: max |diff| = {diff:.3g}")
    assert diff <= LP_TOL


def test_refuses_fused_softmax():
    from consumers.trainer import check_packing_support

    class C:
        masked_softmax_fusion = True

    with pytest.raises(ValueError, match="masked_softmax_fusion"):
        check_packing_support(C())


# ------------------------------------------------------------------ TP=2 / PP=2 under torchrun


@pytest.mark.slow
def test_packed_equals_padded_tp2_pp2(model_dir, tmp_path):
    """One torchrun launch (2 processes, gloo) checks TP=2 and PP=2: ~20-30 s on 2 cores."""
    out = tmp_path / "out.json"
    cmd, env = torchrun(__file__, str(model_dir), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for name, d in res.items():
        print(f"{name}: {d}")
        assert d["lp"] <= LP_TOL and d["grad_norm_rel"] <= REL_TOL and d["loss_rel"] <= REL_TOL, name
        assert d["grad"] <= GRAD_TOL, name


def _worker(model_dir: str, out_path: str) -> None:
    import torch.distributed as dist

    from consumers.config import TrainerConfig
    from consumers.trainer import TrainerRank, init_distributed

    torch.set_num_threads(1)
    init_distributed()
    groups = groups_for(seed=7, version_span=2)
    res: dict[str, dict[str, float]] = {}
    for layout, tp, pp, extra in (
        ("tp2_grpo_token_mean", 2, 1, {"entropy_coef": 0.01}),
        ("tp2_gspo_seq_mean", 2, 1, {"loss": "gspo", "loss_agg": "seq_mean"}),
        ("pp2_grpo_seq_mean", 1, 2, {"loss_agg": "seq_mean"}),
    ):
        got = {}
        for packing in ("none", "block_diagonal"):
            cfg = TrainerConfig(
                seed=3, grad_clip=0.0, tensor_parallel=tp, pipeline_parallel=pp, micro_batch_size=4,
                max_tokens_per_microbatch=64, packing=packing, **extra,
            )
            tr = TrainerRank(cfg, model_dir)
            lps = tr.token_logprobs(groups)
            st = tr.train_step(groups)
            grads = {n: p.main_grad.detach().clone() for n, p in tr.model.named_parameters()}
            got[packing] = (lps, st, grads)
            tr.shutdown()
        (l0, s0, g0), (l1, s1, g1) = got["none"], got["block_diagonal"]
        d = torch.tensor([
            max((float(np.abs(a - b).max()) for a, b in zip(l0, l1, strict=True) if a.size), default=0.0),
            max(float((g0[k] - g1[k]).abs().max()) for k in g0),
        ], dtype=torch.float64)
        dist.all_reduce(d, op=dist.ReduceOp.MAX)
        res[layout] = {
            "lp": float(d[0]), "grad": float(d[1]),
            "loss_rel": abs(s0["loss"] - s1["loss"]) / max(abs(s0["loss"]), 1e-12),
            "grad_norm_rel": abs(s0["grad_norm"] - s1["grad_norm"]) / max(s0["grad_norm"], 1e-12),
        }
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
