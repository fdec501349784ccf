"""TrainerRank at TP=1 in-process: batch layout, one GRPO+TIS step against a transformers
reference, temperature, microbatching, empty shards and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consumers.config import TrainerConfig
from consumers.trainer import STAT_KEYS, TrainerRank, build_microbatches, init_distributed
from schemas.messages import Trajectory, TrajectoryGroup

# megatron-core's own deprecation/fallback chatter ("Apex is not installed", tp_group=None, ...)
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]


def _traj(prompt, response, logprobs=None, mask=None, reward=0.0):
    n = len(response)
    return Trajectory(
        trajectory_id=f"t{id(response)}",
        prompt_tokens=np.asarray(prompt, np.int32),
        response_tokens=np.asarray(response, np.int32),
        logprobs=np.asarray(logprobs if logprobs is not None else [-1.0] * n, np.float32),
        versions=np.zeros(n, np.int32),
        loss_mask=np.asarray(mask if mask is not None else [1] * n, np.uint8),
        reward=reward,
    )


def _random_groups(seed=0, n_groups=4, group_size=4):
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_groups):
        prompt = rng.integers(3, 16, size=int(rng.integers(3, 7)))
        trajs = [
            _traj(
                prompt,
                rng.integers(1, 16, size=(n := int(rng.integers(1, 8)))),
                logprobs=-rng.random(n) * 3,
                mask=(rng.random(n) > 0.2).astype(np.uint8),
                reward=float(rng.random()),
            )
            for _ in range(group_size)
        ]
        groups.append(TrajectoryGroup(f"g{i}", f"p{i}", "prod", 0, i, trajs))
    return groups


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    init_distributed()
    from pipeline.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_batch_layout():
    g = TrajectoryGroup(
        "g", "p", "prod", 0, 0,
        [
            _traj([1, 5, 6], [7, 2], logprobs=[-0.5, -0.25], mask=[1, 0], reward=1.0),
            _traj([1, 4], [9, 9, 9, 2], logprobs=[-1, -2, -3, -4], reward=0.0),
        ],
    )
    (mb,) = build_microbatches([g], micro_batch_size=8, std_norm=False)
    # row 0: tokens 1 5 6 7 2 (+ pad): labels 5 6 7 2 pad; response tokens are labels 2 and 3
    assert mb.tokens.tolist() == [[1, 5, 6, 7, 2], [1, 4, 9, 9, 9]]
    assert mb.labels.tolist() == [[5, 6, 7, 2, 0], [4, 9, 9, 9, 2]]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert mb.behav_logprobs.tolist() == [[0, 0, -0.5, -0.25, 0], [0, -1, -2, -3, -4]]
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0, 0], [0, -0.5, -0.5, -0.5, -0.5]]  # Dr.GRPO: r - mean
    assert mb.position_ids.tolist() == [list(range(5))] * 2
    assert mb.num_tokens == 5


def test_microbatch_split_and_empty():
    groups = _random_groups(n_groups=3, group_size=4)
    mbs = build_microbatches(groups, micro_batch_size=5, std_norm=True)
    assert [mb.tokens.shape[0] for mb in mbs] == [5, 5, 2]
    (dummy,) = build_microbatches([], micro_batch_size=5, std_norm=True)
    assert dummy.num_tokens == 0


def _hf_reference(model_dir, groups, cfg):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, n, ent = 0.0, 0.0, 0.0
    for mb in build_microbatches(groups, 10_000, cfg.advantage_std_norm):
        logits = m(input_ids=mb.tokens).logits / cfg.temperature
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, mb.labels.unsqueeze(-1)).squeeze(-1)
        w = torch.clamp(torch.exp(logp.detach() - mb.behav_logprobs), max=cfg.tis_cap)
        total = total - (mb.loss_mask * mb.advantages * w * logp).sum()
        ent += float((-(logp_all.exp() * logp_all).sum(-1) * mb.loss_mask).sum())
        n += float(mb.loss_mask.sum())
    loss = total / n
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip))
    torch.optim.AdamW(m.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=0.0).step()
    return float(loss), gnorm, ent / n, {k: v.detach() for k, v in m.named_parameters()}


def test_train_step_matches_transformers(model_dir):
    cfg = TrainerConfig(temperature=0.7, micro_batch_size=5, grad_clip=1.0, seed=3)
    groups = _random_groups()
    ref_loss, ref_gnorm, ref_entropy, ref_after = _hf_reference(model_dir, groups, cfg)
    trainer = TrainerRank(cfg, model_dir)
    assert (trainer.dp_rank, trainer.dp_size, trainer.is_publisher) == (0, 1, True)
    stats = trainer.train_step(groups)
    assert set(STAT_KEYS) <= set(stats) and all(isinstance(v, float) for v in stats.values())
    assert stats["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert stats["grad_norm"] == pytest.approx(ref_gnorm, rel=1e-5)
    assert stats["entropy"] == pytest.approx(ref_entropy, rel=1e-5)
    assert stats["tokens_trained"] == sum(int(t.loss_mask.sum()) for g in groups for t in g.trajectories)
    assert stats["num_sequences"] == 16
    assert stats["reward_mean"] == pytest.approx(np.mean([t.reward for g in groups for t in g.trajectories]))
    assert 0 <= stats["is_clip_fraction"] <= 1 and stats["is_weight_mean"] <= cfg.tis_cap
    after = trainer.export_hf_state()
    # Adam's first step is ~lr*sign(g): a wrong gradient would differ by ~lr
    assert max(float((after[k] - ref_after[k]).abs().max()) for k in after) < 0.1 * cfg.lr


def test_empty_shard_and_no_trainable_tokens(model_dir):
    trainer = TrainerRank(TrainerConfig(seed=3), model_dir)
    before = trainer.export_hf_state()
    stats = trainer.train_step([])
    assert stats["tokens_trained"] == 0 and stats["loss"] == 0.0 and math.isnan(stats["reward_mean"])
    g = TrajectoryGroup("g", "p", "prod", 0, 0, [_traj([1, 3], [4, 5], mask=[0, 0], reward=1.0)])
    stats = trainer.train_step([g])
    assert stats["tokens_trained"] == 0 and stats["reward_mean"] == 1.0 and stats["grad_norm"] == 0.0
    after = trainer.export_hf_state()
    assert all(torch.equal(before[k], after[k]) for k in before), "no signal must not move the weights"


def test_deterministic_for_fixed_seed(model_dir):
    runs = []
    for _ in range(2):
        torch.manual_seed(12345)  # unrelated global RNG use must not matter
        trainer = TrainerRank(TrainerConfig(seed=5, micro_batch_size=7), model_dir)
        stats = [trainer.train_step(_random_groups(seed=s)) for s in (1, 2)]
        runs.append((stats, trainer.export_hf_state()))
    (s1, w1), (s2, w2) = runs
    for a, b in zip(s1, s2, strict=True):
        assert {k: v for k, v in a.items() if k != "step_seconds"} == {k: v for k, v in b.items() if k != "step_seconds"}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_learns_to_prefer_rewarded_token(model_dir):
    """Sanity of the sign: rewarding responses that start with token 9 raises its probability."""
    trainer = TrainerRank(TrainerConfig(lr=1e-3, seed=1), model_dir)
    prompt = [1, 4, 5, 13]

    def logp9() -> float:
        named = trainer.export_hf_state()
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        m.load_state_dict(named, strict=False)
        with torch.no_grad():
            return float(torch.log_softmax(m(input_ids=torch.tensor([prompt])).logits[0, -1], -1)[9])

    start = logp9()
    for _ in range(5):
        trajs = [_traj(prompt, [tok, 2], logprobs=[-2.8, -2.8], reward=float(tok == 9)) for tok in (9, 4, 5, 6)]
        trainer.train_step([TrajectoryGroup("g", "p", "prod", 0, 0, trajs)])
    assert logp9() > start + 0.5


def test_megatron_passthrough_bf16_distributed_optimizer(model_dir):
    """[trainer.megatron] keys reach Megatron: bf16 params (Float16Module) + distributed optimizer."""
    trainer = TrainerRank(TrainerConfig(seed=2, megatron={"bf16": True, "use_distributed_optimizer": True}), model_dir)
    assert trainer.mconfig.bf16 and trainer.model.ddp_config.use_distributed_optimizer
    before = trainer.export_hf_state()
    stats = trainer.train_step(_random_groups(seed=4, n_groups=2))
    assert all(math.isfinite(stats[k]) for k in ("loss", "grad_norm", "entropy", "kl"))
    after = trainer.export_hf_state()
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert any(not torch.equal(before[k], after[k]) for k in before)
