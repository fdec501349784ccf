"""TrainerRank with the selectable losses: on-policy data makes every correction the same step,
the KL reference is the initial policy, the entropy bonus moves the step, SFT learns, and
token-balanced microbatches (tests/test_policy_loss.py has the numpy checks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from consumers.batching import build_microbatches, split_indices
from consumers.config import SFTConfig, TrainerConfig
from consumers.sft import load_examples, run_sft
from consumers.trainer import TrainerRank, init_distributed
from schemas.messages import TrajectoryGroup
from tests.test_trainer_step import _random_groups

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    init_distributed()
    from pipeline.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _on_policy(model_dir, groups):
    """The groups with behaviour log-probs = the model's own (transformers forward)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for g in groups:
        trajs = []
        for t in g.trajectories:
            ids = torch.tensor([list(t.prompt_tokens) + list(t.response_tokens)])
            with torch.no_grad():
                lp = torch.log_softmax(m(input_ids=ids).logits[0, :-1], -1)
            p = len(t.prompt_tokens)
            resp = torch.tensor(t.response_tokens, dtype=torch.long)
            t.logprobs = lp[p - 1 :].gather(-1, resp[:, None]).squeeze(-1).numpy().astype(np.float32)
            trajs.append(t)
        out.append(TrajectoryGroup(g.group_id, g.prompt_id, g.producer_id, g.epoch, g.seq, trajs))
    return out


def test_on_policy_all_corrections_same_step(model_dir):
    groups = _on_policy(model_dir, _random_groups(seed=21))
    results = {}
    for name, kw in {
        "grpo-tis": {}, "grpo-none": {"off_policy": "none"}, "ppo-tis": {"loss": "ppo"},
        "ppo-icepop": {"loss": "ppo", "off_policy": "icepop"},
        "ppo-decoupled-loglinear": {"loss": "ppo", "off_policy": "decoupled", "proximal": "loglinear"},
    }.items():
        rank = TrainerRank(TrainerConfig(seed=4, micro_batch_size=5, **kw), model_dir)
        st = rank.train_step(groups)
        results[name] = (st, rank.export_hf_state())
        assert st["is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and st["clip_fraction"] == 0.0, name
        assert st["logprob_mismatch"] < 1e-4, name
    base_st, base_w = results["grpo-tis"]
    for name, (st, w) in results.items():
        assert st["grad_norm"] == pytest.approx(base_st["grad_norm"], rel=1e-4), name
        # behaviour = transformers' log-probs (~1e-6 from Megatron's): Adam's first step is ~lr*sign(g),
        # so a different gradient would move weights by ~lr = 3e-4; near-zero components may flip
        assert max(float((w[k] - base_w[k]).abs().max()) for k in w) < 0.05 * 3e-4, name


def test_kl_reference_and_entropy_bonus(model_dir):
    groups = _random_groups(seed=22)
    rank = TrainerRank(TrainerConfig(seed=4, kl_coef=0.5, kl_estimator="k3", lr=1e-2), model_dir)
    assert rank.ref_model is not None
    s1 = rank.train_step(groups)
    assert s1["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial weights
    s2 = rank.train_step(groups)
    assert s2["kl_ref"] > 1e-5 and math.isfinite(s2["loss"])
    plain = TrainerRank(TrainerConfig(seed=4), model_dir).train_step(groups)
    bonus = TrainerRank(TrainerConfig(seed=4, entropy_coef=0.1), model_dir).train_step(groups)
    assert bonus["entropy"] == pytest.approx(plain["entropy"], rel=1e-6)
    assert bonus["loss"] == pytest.approx(plain["loss"] - 0.1 * plain["entropy"], rel=1e-5)
    assert bonus["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-6)


def test_seq_mean_and_gspo_run(model_dir):
    groups = _random_groups(seed=23)
    st = TrainerRank(TrainerConfig(seed=4, loss="gspo", off_policy="none", loss_agg="seq_mean", eps_clip_low=3e-4, eps_clip_high=4e-4), model_dir).train_step(groups)
    assert all(math.isfinite(st[k]) for k in ("loss", "grad_norm", "clip_fraction"))
    assert 0 < st["clip_fraction"] <= 1  # off-policy fixture: sequence ratios leave the tiny clip range


def test_split_indices_token_balanced():
    lengths = [10, 3, 7, 3, 12, 2, 5]
    assert split_indices(lengths, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    parts = split_indices(lengths, 100, max_tokens=20)
    assert sorted(i for p in parts for i in p) == list(range(7))
    for p in parts:  # rows x longest <= 20, or a single sequence
        assert len(p) == 1 or len(p) * max(lengths[i] for i in p) <= 20
    assert parts == [[4], [0, 2], [6, 1, 3, 5]]  # longest first, greedy (4 rows x 5 = 20)
    assert split_indices([30, 4], 8, max_tokens=20) == [[0], [1]]  # too long: travels alone
    assert split_indices([4] * 6, 2, max_tokens=100) == [[0, 1], [2, 3], [4, 5]]  # row cap still applies


def test_token_balanced_microbatches_same_step(model_dir):
    groups = _random_groups(seed=24)
    mbs = build_microbatches(groups, 64, True, max_tokens=24)
    assert len(mbs) > 1 and all(mb.tokens.numel() <= 24 or mb.tokens.shape[0] == 1 for mb in mbs)
    a = TrainerRank(TrainerConfig(seed=4), model_dir).train_step(groups)
    b = TrainerRank(TrainerConfig(seed=4, max_tokens_per_microbatch=24), model_dir).train_step(groups)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_sft_stage_learns_demonstrations(model_dir, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "sft.jsonl"
    with data.open("w") as f:
        for _ in range(40):
            d = [int(x) for x in rng.integers(0, 10, size=3)]
            f.write(json.dumps({"prompt": "".join(map(str, d)) + "=", "response": "".join(map(str, d[::-1]))}) + "\n")
        f.write(json.dumps({"prompt": [1, 4, 5, 13], "response": [5, 4, 2]}) + "\n")
    ex = load_examples(data, model_dir)
    assert ex[0][1][-1] == 2 and len(ex[0][1]) == 4  # 3 digits + EOS
    assert ex[-1] == ([1, 4, 5, 13], [5, 4, 2])
    rank = TrainerRank(TrainerConfig(seed=4, lr=1e-3), model_dir)
    hist = run_sft(rank, SFTConfig(data=str(data), steps=30, lr=3e-3, batch_size=16), model_dir, tmp_path)
    assert rank.policy_version == 1 and rank.steps_done == 30
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], [h["loss"] for h in hist]
    assert rank.optimizer.param_groups[0]["lr"] == 1e-3  # RL lr restored
    assert len((tmp_path / "sft_steps.jsonl").read_text().splitlines()) == 30
