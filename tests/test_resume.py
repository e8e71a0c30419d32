"""Resume: N steps in one go equal N/2, resume, N/2; damaged checkpoints are skipped; run dirs are guarded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gipo import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer, build_config
from gipo.checkpoint import latest_good_checkpoint, list_checkpoints
from gipo.config import ConfigError
from gipo.errors import RunDirError
from tests.conftest import QUIET


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _ppo(tiny_pipeline, run_dir, max_steps, method="gipo", **extra):
    config = build_config(PPOConfig, {
        **QUIET, "train_prompts_per_group": 8, "max_steps": max_steps, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
        "max_new_tokens": 6, "checkpoint_every": 2, "keep_last": 5, "method": method, "adaptive_kl": True,
        "policy": str(tiny_pipeline["sft"] / "final"), "reward_model": str(tiny_pipeline["rm"] / "final"), **extra})
    return PPOTrainer(config, output_dir=run_dir)


CRITIC_FREE = {"reward": "gold", "num_generations": 4, "adaptive_kl": False}


@pytest.mark.parametrize(("method", "extra"), [
    ("ppo", {}), ("gipo_gain", {}), ("gipo", {"lora_r": 4}), ("gipo", {"shared_critic": True}),
    ("grpo", {**CRITIC_FREE, "filter_zero_std": True}), ("rloo", CRITIC_FREE),
    ("grpo_gipo", CRITIC_FREE), ("grpo_prompt_gdro", CRITIC_FREE),
    ("grpo_gipo_sampling", CRITIC_FREE), ("grpo_gdro_sampling", CRITIC_FREE), ("grpo_learnability", CRITIC_FREE),
    ("grpo_rollout_gdro", CRITIC_FREE), ("grpo_gipo_rollout", CRITIC_FREE),
    ("custom", {**CRITIC_FREE, "estimator": "grpo", "groups": "oracle", "group_objective": "dro",
                "dro_step_size": 0.1, "group_kl": True})])
def test_ppo_resume_equals_uninterrupted(tiny_pipeline, tmp_path, method, extra):
    straight = _ppo(tiny_pipeline, tmp_path / "straight", 4, method, **extra).train()
    _ppo(tiny_pipeline, tmp_path / "split", 2, method, **extra).train()
    resumed = _ppo(tiny_pipeline, tmp_path / "split", 4, method, **extra).train(resume=True)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (straight.critic is None) == (resumed.critic is None) == (method not in ("ppo", "gipo", "gipo_gain"))
    for a, b in zip(straight.critic.parameters() if straight.critic else [],
                    resumed.critic.parameters() if resumed.critic else [], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(straight.groups.dro_weights, resumed.groups.dro_weights)
    if straight.groups.prompt_groups is not None:  # sampling weights, EMAs and the prompt head came back
        first, second = straight.groups.prompt_groups.state_dict(), resumed.groups.prompt_groups.state_dict()
        rule_first, rule_second = straight.groups.rule.state_dict(), resumed.groups.rule.state_dict()
        assert rule_first.keys() == rule_second.keys()
        for key in ("weights", "loss_ema"):  # the group_weights rule's state
            if key in rule_first:
                torch.testing.assert_close(rule_first[key], rule_second[key])
        assert first["difficulty"] == pytest.approx(second["difficulty"])
        assert first["pass_bins"] == second["pass_bins"]
        for rule in ("weighting", "allocation"):  # Prompt-GDRO's bin scores, Rollout-GDRO's bandits
            first_state, second_state = (getattr(t.groups, rule).state_dict() for t in (straight, resumed))
            for key, value in first_state.items():
                torch.testing.assert_close(value, second_state[key])
        if "head" in first:
            torch.testing.assert_close(first["head"], second["head"])
    assert straight.kl_ctl.value == pytest.approx(resumed.kl_ctl.value)
    rows_straight, rows_resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    for a, b in zip(rows_straight, rows_resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_sft_resume_equals_uninterrupted(tmp_path):
    def sft(run_dir, steps):
        config = build_config(SFTConfig, {**QUIET, "max_steps": steps, "batch_size": 8, "checkpoint_every": 3})
        return SFTTrainer(config, output_dir=run_dir, examples_per_group=10)

    straight = sft(tmp_path / "a", 6).train()
    sft(tmp_path / "b", 3).train()
    resumed = sft(tmp_path / "b", 6).train(resume=True)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert [r["train/loss"] for r in _rows(tmp_path / "a")] == pytest.approx(
        [r["train/loss"] for r in _rows(tmp_path / "b")], rel=1e-5)


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tiny_pipeline, tmp_path):
    run_dir = tmp_path / "run"
    _ppo(tiny_pipeline, run_dir, 4, "ppo").train()
    newest = list_checkpoints(run_dir)[-1]
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a crash mid-copy
    with pytest.warns(UserWarning, match=f"Skipping damaged checkpoint .*{newest.name}.*checksum"):
        assert latest_good_checkpoint(run_dir) == list_checkpoints(run_dir)[-2]
    half_written = run_dir / "checkpoints" / "step-9"
    shutil.copytree(list_checkpoints(run_dir)[0], half_written)
    (half_written / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="step-9.*no manifest"):
        latest_good_checkpoint(run_dir)


def test_run_directory_guards(tiny_pipeline, tmp_path):
    run_dir = tmp_path / "run"
    _ppo(tiny_pipeline, run_dir, 2, "ppo").train()
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        _ppo(tiny_pipeline, run_dir, 2, "ppo").train()
    with pytest.raises(ConfigError, match="clip_range"):
        _ppo(tiny_pipeline, run_dir, 4, "ppo", clip_range=0.3).train(resume=True)
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        _ppo(tiny_pipeline, tmp_path / "empty", 2, "ppo").train(resume=True)
    _ppo(tiny_pipeline, run_dir, 2, "ppo", logging_steps=1, keep_last=1).train(resume=True)  # logging keys may differ
    trainer = _ppo(tiny_pipeline, run_dir, 1, "ppo")
    trainer.overwrite = True
    trainer.train()
    assert [r["step"] for r in _rows(run_dir)] == [1]
