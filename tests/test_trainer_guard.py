"""Non-finite steps are never applied; the learning-rate schedule (consumers/optim.py).

- A NaN reward makes the loss NaN: the step is skipped (weights unchanged, by checksum of the
  exported HF state), counted in the stats that go to steps.jsonl (``step_skipped``,
  ``skipped_steps``, ``bad_steps_in_a_row``), the trajectory ids are logged, and the next clean
  step trains again and resets the run of bad steps; ``max_bad_steps`` NaN steps in a row raise
  NonFiniteStepError naming the key.  A gradient with an inf in it (finite loss) is caught too.
- The schedule: megatron-core's OptimizerParamScheduler gives the closed-form learning rate of
  every update for linear, cosine and inverse-square-root decay after a warm-up; through
  TrainerRank.train_step the k-th applied update uses lr(k), a skipped step does not advance it;
  a checkpoint resume continues the schedule where it stopped; the default is today's constant lr.
"""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch

from consumers.config import TrainerConfig
from consumers.optim import NonFiniteStepError, closed_form_lr
from tests.test_trainer_step import _random_groups

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from consumers.trainer import init_distributed
    from pipeline.tiny import make_tiny_model

    torch.set_num_threads(1)
    init_distributed()
    return make_tiny_model(tmp_path_factory.mktemp("guard") / "m")


def _checksum(rank) -> str:
    h = hashlib.sha256()
    for name, t in sorted(rank.export_hf_state().items()):
        h.update(name.encode())
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _nan_groups(seed: int = 5):
    groups = _random_groups(seed=seed, n_groups=2)
    groups[1].trajectories[2].reward = float("nan")  # -> NaN advantages for the group -> NaN loss
    return groups


def test_nan_loss_step_is_skipped_and_counted(model_dir, caplog):
    from consumers.trainer import TrainerRank

    rank = TrainerRank(TrainerConfig(seed=3, max_bad_steps=2), model_dir)
    before = _checksum(rank)
    bad = _nan_groups()
    with caplog.at_level(logging.WARNING, logger="consumers.optim"):
        st = rank.train_step(bad)
    assert _checksum(rank) == before, "a NaN step must not change the weights"
    assert (st["step_skipped"], st["skipped_steps"], st["bad_steps_in_a_row"]) == (1.0, 1.0, 1.0)
    assert math.isnan(st["grad_norm"]) and math.isnan(st["loss"])
    assert "non-finite loss" in caplog.text and bad[1].trajectories[2].trajectory_id in caplog.text
    st = rank.train_step(_random_groups(seed=6, n_groups=2))  # a clean batch trains and resets the run
    assert st["step_skipped"] == 0.0 and st["bad_steps_in_a_row"] == 0.0 and st["skipped_steps"] == 1.0
    after_clean = _checksum(rank)
    assert after_clean != before and math.isfinite(st["grad_norm"])
    rank.train_step(_nan_groups())
    with pytest.raises(NonFiniteStepError, match=r"trainer\.max_bad_steps = 2"):
        rank.train_step(_nan_groups(seed=7))
    assert _checksum(rank) == after_clean
    assert rank.policy_version == 4  # versions count steps, applied or not (the loop publishes each)


def test_nonfinite_gradient_is_caught(model_dir):
    from consumers.optim import nonfinite_flags
    from consumers.trainer import TrainerRank

    rank = TrainerRank(TrainerConfig(seed=3), model_dir)
    rank.train_step(_random_groups(seed=1, n_groups=2))  # leaves this step's gradients in the buffers
    assert nonfinite_flags([torch.tensor(1.0)], rank.model, rank.optimizer, rank._device) == (False, False)
    rank.model.buffers[0].grad_data.view(-1)[3] = float("inf")
    assert nonfinite_flags([torch.tensor(1.0)], rank.model, rank.optimizer, rank._device) == (False, True)
    assert nonfinite_flags([torch.tensor(float("nan"))], rank.model, rank.optimizer, rank._device) == (True, True)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "inverse-square-root", "constant"])
def test_scheduler_matches_closed_form(schedule):
    from consumers.optim import build_scheduler, current_lr

    cfg = TrainerConfig(lr=1e-3, lr_min=1e-4, lr_schedule=schedule, lr_warmup_steps=4, lr_decay_steps=20)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps=None)
    for k in range(1, 26):
        sched.step(1)
        want = closed_form_lr(k, 1e-3, 1e-4, 4, 20, schedule)
        assert current_lr(opt) == pytest.approx(want, rel=1e-12), (schedule, k)
    # spot values written out by hand: warm-up, mid-decay, end
    if schedule == "cosine":
        sched2 = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, None)
        sched2.step(12)  # ratio (12 - 4) / 16 = 0.5 -> halfway between lr and lr_min
        assert current_lr(sched2.optimizer) == pytest.approx(5.5e-4)


def test_decay_needs_steps():
    from consumers.optim import build_scheduler

    cfg = TrainerConfig(lr_schedule="cosine", lr_warmup_steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    with pytest.raises(ValueError, match=r"trainer\.lr_decay_steps"):
        build_scheduler(opt, cfg, total_steps=None)
    build_scheduler(opt, cfg, total_steps=50)  # 0 = run.steps


def test_schedule_through_train_steps_and_resume(model_dir, tmp_path):
    from consumers.checkpoint import load_checkpoint, save_checkpoint
    from consumers.trainer import TrainerRank

    cfg = TrainerConfig(seed=3, lr=1e-3, lr_min=1e-4, lr_schedule="cosine", lr_warmup_steps=2)
    batches = [_random_groups(seed=20 + i, n_groups=2) for i in range(6)]
    batches[2] = _nan_groups(seed=9)  # a skipped step in the middle does not advance the schedule
    full = TrainerRank(cfg, model_dir, total_steps=6)
    lrs = [full.train_step(b)["lr"] for b in batches]
    applied = [1, 2, 2, 3, 4, 5]  # the k of each step's lr; step 3 was skipped and used none
    for step, (got, k) in enumerate(zip(lrs, applied, strict=True), start=1):
        if step != 3:
            assert got == pytest.approx(closed_form_lr(k, 1e-3, 1e-4, 2, 6, "cosine"), rel=1e-12), step
    full.shutdown()

    first = TrainerRank(cfg, model_dir, total_steps=6)
    for b in batches[:4]:
        first.train_step(b)
    path = save_checkpoint(first, tmp_path / "run", step=4)
    first.shutdown()
    resumed = TrainerRank(cfg, model_dir, total_steps=6)
    load_checkpoint(resumed, path)
    assert resumed.scheduler.num_steps == 3
    assert [resumed.train_step(b)["lr"] for b in batches[4:]] == pytest.approx(lrs[4:], rel=1e-12)
    resumed.shutdown()


def test_default_is_constant_lr(model_dir):
    from consumers.trainer import TrainerRank

    rank = TrainerRank(TrainerConfig(seed=3, lr=2e-4), model_dir)
    assert [rank.train_step(_random_groups(seed=30 + i, n_groups=1))["lr"] for i in range(3)] == [2e-4] * 3
    rank.shutdown()


def test_skipped_step_reaches_metrics_and_steps_jsonl():
    """The loop's step record carries the skip fields into steps.jsonl, and _observe counts the
    skip in slipstream_trainer_skipped_steps_total and the rate in slipstream_trainer_lr."""
    import json

    from consumers.loop import StepRecord, TrainerMetrics, _observe

    m = TrainerMetrics()
    for skipped in (1.0, 0.0, 1.0):
        rec = StepRecord(step=1, policy_version=1, reward_mean=0.5, staleness_mean=0.0, staleness_max=0, tokens_trained=10,
                         trajectories=4, trajectories_dropped=0, queue_depth=0, wall_time_s=1.0, wait_s=0.1, train_s=0.5,
                         publish_s=0.1, publish_bytes=100, weights_checksum="x",
                         stats={"step_skipped": skipped, "skipped_steps": 1.0, "lr": 2.5e-4})
        _observe(m, rec, 0.5)
    line = json.loads(rec.to_json())
    assert line["step_skipped"] == 1.0 and line["lr"] == 2.5e-4
    assert m.registry.get_sample_value("slipstream_trainer_skipped_steps_total") == 2.0
    assert m.registry.get_sample_value("slipstream_trainer_lr") == 2.5e-4
