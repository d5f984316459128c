"""Non-finite losses: the update is skipped and logged; too many in a row stop the run."""

from __future__ import annotations

import pytest
import torch

from grpo_ray import grpo
from grpo_ray.actors.learner import LearnerActor, NonFiniteError
from grpo_ray.actors.rollout import RolloutActor
from grpo_ray.config import load_config
from grpo_ray.rewards.scoring import combine_scores, score_rollout
from tests.integration.test_trainer import ROWS, tiny_overrides, vowel_reward


def scored_rollouts(tiny_model_dir, tmp_path, n: int):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "trainer.max_nonfinite_steps=2", "trainer.lr=1e-2"))
    actor = RolloutActor(cfg, str(tiny_model_dir))
    out = []
    for version in range(n):
        rollout = actor.generate(ROWS, 0)
        rollout.version = version  # the learner bumps its version on skipped steps too
        out.append(combine_scores(rollout, [score_rollout(rollout, [vowel_reward], None)], ["vowel"], None, "group"))
    return cfg, out


def test_nan_loss_skips_the_update_then_training_goes_on(tiny_model_dir, tmp_path, monkeypatch, caplog):
    cfg, batches = scored_rollouts(tiny_model_dir, tmp_path, 3)
    learner = LearnerActor(cfg, str(tiny_model_dir))
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    real = grpo.policy_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    metrics = learner.train_step(batches[0]).metrics
    assert metrics["numerics/skipped_update"] == 1.0
    assert "non-finite loss" in caplog.text and "advantages mean" in caplog.text  # logged with batch stats
    for name, p in learner.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name  # no update, no NaN in the weights
            assert p.grad is None

    monkeypatch.setattr(grpo, "policy_loss", real)
    metrics = learner.train_step(batches[1]).metrics
    assert metrics["numerics/skipped_update"] == 0.0 and learner.nonfinite_streak == 0
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters() if p.requires_grad)


def test_nan_losses_in_a_row_stop_the_run_with_the_cause(tiny_model_dir, tmp_path, monkeypatch):
    cfg, batches = scored_rollouts(tiny_model_dir, tmp_path, 2)
    learner = LearnerActor(cfg, str(tiny_model_dir))
    real = grpo.policy_loss
    monkeypatch.setattr(grpo, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("inf"), real(*a, **k)[1]))
    learner.train_step(batches[0])
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .*trainer.max_nonfinite_steps=2"):
        learner.train_step(batches[1])
