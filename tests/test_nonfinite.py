"""NaN or inf in what the run trains on stops it naming step and quantity, or is skipped and counted."""

from __future__ import annotations

import json

import pytest
import torch

from gipo import PPOConfig, PPOTrainer, build_config
from gipo.checkpoint import latest_good_checkpoint
from gipo.errors import NonFiniteError
from tests.conftest import QUIET


def _trainer(tiny_pipeline, run_dir, on_nonfinite):
    config = build_config(PPOConfig, {
        **QUIET, "train_prompts_per_group": 8, "max_steps": 3, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
        "checkpoint_every": 1, "method": "gipo", "on_nonfinite": on_nonfinite,
        "policy": str(tiny_pipeline["sft"] / "final"), "reward_model": str(tiny_pipeline["rm"] / "final")})
    trainer = PPOTrainer(config, output_dir=run_dir)
    score = trainer.reward.scorer.__call__

    def poisoned(rollout, prompts=None):  # the reward model returns NaN on iteration 2 only
        scores = score(rollout, prompts)
        return scores * float("nan") if trainer.step == 2 else scores

    trainer.reward.scorer = poisoned
    return trainer


def test_nan_reward_stops_the_run_naming_step_and_quantity(tiny_pipeline, tmp_path):
    trainer = _trainer(tiny_pipeline, tmp_path / "run", "stop")
    with pytest.raises(NonFiniteError, match=r"Step 2: reward_model_scores contains NaN or inf"):
        trainer.train()
    assert latest_good_checkpoint(tmp_path / "run").name == "step-1"
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())


def test_nan_reward_batch_is_skipped_and_counted(tiny_pipeline, tmp_path):
    trainer = _trainer(tiny_pipeline, tmp_path / "run", "skip")
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite/skipped_batches"] for r in rows] == [0, 1, 1]
    assert rows[1]["nonfinite/last_quantity_skipped"] == "reward_model_scores"
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))
    assert all(p.grad is None for p in trainer.critic.parameters())
