"""Prompt-GDRO as published (pass-rate bins with hysteresis, bin scores, weights on the advantages), learnability
sampling, and the run directories of the sampling variant that carried Prompt-GDRO's name before."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from gipo import groups as G
from gipo.advantage_weighting import ADVANTAGE_WEIGHTINGS, PromptGDRO, register_advantage_weighting
from gipo.config import PPOConfig, build_config, upgrade_saved_config
from gipo.data import EpochSampler
from gipo.errors import ConfigError
from gipo.losses import clipped_policy_loss
from gipo.ppo import PPOTrainer
from gipo.prompt_groups import PassRateBins
from gipo.sampling import Learnability
from gipo.tracking import read_metrics
from tests.conftest import QUIET


def test_bins_move_only_past_an_edge_by_the_hysteresis():
    # 4 bins of width 0.25; prompts: new, in bin 1 at 0.51 (edge 0.5 crossed by 0.01), at 0.54 (by 0.04),
    # in bin 2 at 0.49 (down by 0.01), at 0.46 (down by 0.04), and a new prompt at rate 1.
    rates = torch.tensor([0.30, 0.51, 0.54, 0.49, 0.46, 1.0])
    current = torch.tensor([-1, 1, 1, 2, 2, -1])
    assert G.bins_with_hysteresis(rates, current, 4, 0.03).tolist() == [1, 1, 2, 2, 1, 3]
    assert G.bins_with_hysteresis(rates, current, 4, 0.0).tolist() == [1, 2, 2, 1, 1, 3]


def test_pass_rate_bins_count_a_prompts_own_visits_in_a_window():
    bins = PassRateBins(num_bins=2, window=3, hysteresis=0.0)
    assert bins.assign([7]).tolist() == [0]  # never seen: rate 0, the hardest bin
    for passed in (True, True, False):
        bins.update([7], [passed])
    assert bins.history[7] == [1, 1, 0] and bins.assign([7]).tolist() == [1]  # 2/3
    bins.update([7], [False])  # the first visit leaves the window: 1/3
    assert bins.history[7] == [1, 0, 0] and bins.assign([7]).tolist() == [0]


def test_bin_weights_by_hand():
    # eta 1, scores 0 and ln 3 on the two bins present: softmax 1/4, 3/4; gamma 0.1 mixes in 0.05 each.
    q = G.gdro_bin_weights(torch.tensor([0.0, math.log(3.0), 5.0]), torch.tensor([True, True, False]), 1.0, 0.1)
    torch.testing.assert_close(q, torch.tensor([0.275, 0.725, 0.0]))
    # Samples in bins 0, 0, 0, 1 with weights 0.2 and 0.8: mean-1 rescale 4 / 1.4, then the cap at 2.
    weights = G.gdro_sample_weights(torch.tensor([0.2, 0.8]), torch.tensor([0, 0, 0, 1]), cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([0.8 / 1.4, 0.8 / 1.4, 0.8 / 1.4, 2.0]))


def test_bin_scores_are_an_ema_of_the_observed_scores():
    config = SimpleNamespace(gdro_eta=0.65, gdro_gamma=0.01, gdro_ema_beta=0.5, gdro_weight_cap=15.0)
    rule = PromptGDRO(config, 2)
    rule.observe(torch.tensor([0.4, 9.0]), torch.tensor([True, False]))
    torch.testing.assert_close(rule.scores, torch.tensor([0.4, 0.0]))  # a first observation is the score; bin 1 absent
    rule.observe(torch.tensor([0.2, 0.4]), torch.tensor([True, True]))
    torch.testing.assert_close(rule.scores, torch.tensor([0.5 * 0.4 + 0.5 * 0.2, 0.4]))
    rule.scores = torch.tensor([0.4, 0.4])
    weights, metrics = rule.weights(torch.eye(2)[[0, 1, 1]])
    assert metrics["gdro/bin_weight/0"] == pytest.approx(metrics["gdro/bin_weight/1"])  # equal scores
    torch.testing.assert_close(weights.mean(), torch.tensor(1.0))


def test_a_weight_on_the_surrogate_equals_the_surrogate_of_the_weighted_advantage():
    torch.manual_seed(0)
    logprobs, old = torch.randn(4, 5), torch.randn(4, 5)
    advantages, weights = torch.randn(4, 5), torch.tensor([0.5, 1.0, 2.0, 15.0])
    scaled, _ = clipped_policy_loss(logprobs, old, advantages * weights[:, None], 0.2, 0.28)
    plain, _ = clipped_policy_loss(logprobs, old, advantages, 0.2, 0.28)
    torch.testing.assert_close(scaled, plain * weights[:, None])


def test_learnability_draws_the_prompts_at_the_frontier():
    rule = Learnability(SimpleNamespace(seed=0, group_sampling_floor=0.0), 2)
    rates = {i: (0.5 if i % 4 == 0 else float(i % 2)) for i in range(64)}  # a quarter at p = 1/2, others 0 or 1
    prompts = SimpleNamespace(pass_rates=lambda indices: torch.tensor([rates[i] for i in indices]))
    chosen = rule.choose(EpochSampler(64, seed=0), 16, step=1, prompts=prompts)  # the candidates: all 64
    assert sorted(chosen) == list(range(0, 64, 4))
    assert G.learnability(torch.tensor([0.0, 0.25, 0.5, 1.0])).tolist() == [0.0, 0.1875, 0.25, 0.0]


def test_presets_name_their_mechanisms():
    published = PPOConfig(method="grpo_prompt_gdro")
    assert (published.groups, published.prompt_sampling, published.advantage_weighting) == (
        "pass_bins", "uniform", "prompt_gdro")
    sampling = PPOConfig(method="grpo_gdro_sampling")
    assert (sampling.groups, sampling.prompt_sampling, sampling.advantage_weighting) == (
        "difficulty", "group_weights", "none")
    with pytest.raises(ConfigError, match="advantage_weighting=prompt_gdro weighs samples by their group"):
        build_config(PPOConfig, {"method": "custom", "estimator": "grpo", "num_generations": 4,
                                 "advantage_weighting": "prompt_gdro"})


def test_a_saved_config_of_the_old_name_reads_as_the_sampling_variant():
    old = {"method": "grpo_prompt_gdro", "groups": "difficulty", "prompt_sampling": "group_weights"}
    assert upgrade_saved_config(old)["method"] == "grpo_gdro_sampling"
    new = {**old, "method": "grpo_prompt_gdro", "advantage_weighting": "prompt_gdro"}
    assert upgrade_saved_config(new)["method"] == "grpo_prompt_gdro"


def test_compare_refuses_to_report_a_finished_run_of_the_old_mechanism_under_the_new_name(tmp_path):
    from gipo.compare import _check_finished_run

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"method": "grpo_prompt_gdro", "groups": "difficulty"}))
    _check_finished_run(tmp_path, "grpo_gdro_sampling")
    with pytest.raises(ConfigError, match="finished run of method 'grpo_gdro_sampling', not 'grpo_prompt_gdro'"):
        _check_finished_run(tmp_path, "grpo_prompt_gdro")


def test_prompt_gdro_trains_and_logs_its_bins(tiny_pipeline, tmp_path):
    """Four prompts, two a batch, so every prompt comes round again and the bins fill."""
    config = build_config(PPOConfig, {
        **QUIET, "method": "grpo_prompt_gdro", "reward": "gold", "num_generations": 4, "batch_size": 8,
        "mini_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 6, "max_steps": 6, "eval_every": 0,
        "train_prompts_per_group": 1, "num_groups": 3, "pass_window": 2,
        "policy": str(tiny_pipeline["sft"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / "run")
    trainer.train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    last = rows[-1]
    assert {f"gdro/bin_weight/{g}" for g in range(3)} <= last.keys()
    assert {f"groups/{name}/0" for name in ("surrogate_loss", "ratio_drift", "loss_kl", "sample_share")} <= last.keys()
    present = [last[f"gdro/bin_weight/{g}"] for g in range(3) if last[f"groups/sample_share/{g}"] > 0]
    assert sum(present) == pytest.approx(1.0)
    assert set(trainer.groups.prompt_groups.pass_bins.history) == set(range(len(trainer.records)))
    assert all(len(v) == 2 for v in trainer.groups.prompt_groups.pass_bins.history.values())  # the window
    assert trainer.groups.weighting.seen.any()


def test_an_advantage_weighting_is_one_registration(tiny_pipeline, tmp_path):
    class Double:
        def __init__(self, config, num_groups):
            self.calls = 0

        def weights(self, probs, reduce=None):
            return torch.full((probs.shape[0],), 2.0), {"test/double": 1.0}

        def observe(self, scores, observed):
            return {}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    register_advantage_weighting("test_double", Double, "doubles every advantage", replace=True)
    assert "test_double" in ADVANTAGE_WEIGHTINGS.names()
    config = build_config(PPOConfig, {
        **QUIET, "method": "custom", "estimator": "grpo", "groups": "oracle", "advantage_weighting": "test_double",
        "reward": "gold", "num_generations": 4, "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
        "max_new_tokens": 6, "max_steps": 1, "eval_every": 0, "train_prompts_per_group": 4,
        "policy": str(tiny_pipeline["sft"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["test/double"] == 1.0


# --- unequal generations per prompt, and Rollout-GDRO ----------------------------------------------------------

def test_estimators_with_unequal_samples_per_prompt_by_hand():
    from gipo.estimators import grpo_advantages, rloo_advantages, zero_std_prompts

    rewards, sizes = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([2, 3])
    # Prompt 0: mean 1/2, std sqrt(1/2); prompt 1: mean 2/3, std sqrt(1/3) (unbiased).
    expected = torch.tensor([0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4),
                             (1 / 3) / (math.sqrt(1 / 3) + 1e-4), (1 / 3) / (math.sqrt(1 / 3) + 1e-4),
                             (-2 / 3) / (math.sqrt(1 / 3) + 1e-4)])
    torch.testing.assert_close(grpo_advantages(rewards, sizes, "group"), expected)
    torch.testing.assert_close(grpo_advantages(rewards, sizes, "none"), torch.tensor([0.5, -0.5, 1 / 3, 1 / 3, -2 / 3]))
    # RLOO: each reward minus the mean of its prompt's other samples.
    torch.testing.assert_close(rloo_advantages(rewards, sizes), torch.tensor([1.0, -1.0, 0.5, 0.5, -1.0]))
    assert zero_std_prompts(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]), sizes).tolist() == [True, True, False,
                                                                                          False, False]
    with pytest.raises(ValueError, match="do not split into prompts"):
        grpo_advantages(rewards, torch.tensor([2, 2]))


def test_exact_budget_choice_by_hand():
    from gipo.rollout_allocation import exact_budget_choice

    arms = [2, 4, 6]
    log_probs = torch.tensor([[0.0, -1.0, -5.0], [-5.0, -1.0, 0.0], [0.0, 0.0, 0.0]]).log_softmax(dim=1)
    # Two prompts in group 0 and two in group 1, 16 samples: (2, 6) is the most likely exact split; group 2 has
    # no prompt and takes its most likely arm.
    assert exact_budget_choice(log_probs, [2, 2, 0], arms, 16) == [0, 2, 0]
    with pytest.raises(ValueError, match="spends exactly 7"):
        exact_budget_choice(log_probs, [2, 2, 0], arms, 7)


def test_rollout_gdro_keeps_the_budget_and_rewards_the_chosen_arm():
    from gipo.rollout_allocation import RolloutGDRO

    config = SimpleNamespace(rollout_min_generations=2, rollout_max_generations=6, num_generations=4, seed=0,
                             rollout_bandit_eta=0.05, rollout_bandit_gamma=0.1, rollout_dual_step=0.05)
    rule = RolloutGDRO(config, 2)
    groups = torch.tensor([0, 0, 1, 1, 1])
    sizes, metrics = rule.allocate(groups, 20, step=1)
    assert int(sizes.sum()) == 20 and sizes.min() >= 2 and sizes.max() <= 6
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3] == sizes[4]  # one arm per group
    probs = rule.probabilities()
    arm = int(rule.chosen[0])
    rule.mu = 0.0
    rule.observe(torch.tensor([0.3, 0.0]), torch.tensor([True, False]))
    assert rule.scores[0, arm] == pytest.approx(0.3 / float(probs[0, arm]))  # importance-weighted (EXP3)
    assert rule.scores[1].abs().sum() == 0  # group 1 not in the update
    assert "rollouts/dual_mu" in metrics and metrics["rollouts/generations/0"] == float(sizes[0])


def test_rollout_gdro_trains_with_unequal_samples_per_prompt(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {
        **QUIET, "method": "grpo_rollout_gdro", "reward": "gold", "num_generations": 4, "batch_size": 16,
        "mini_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 6, "max_steps": 6, "eval_every": 0,
        "train_prompts_per_group": 1, "num_groups": 3, "pass_window": 2, "rollout_max_generations": 8,
        "policy": str(tiny_pipeline["sft"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / "run")
    # Two prompts in the hardest bin and two in the easiest, whose bandits lean to 2 and to 6 samples.
    trainer.groups.prompt_groups.pass_bins.bins = {0: 0, 1: 2, 2: 0, 3: 2}
    trainer.groups.allocation.scores[0, 0] = trainer.groups.allocation.scores[2, 4] = 400.0
    sizes_seen = []
    collect = trainer.collector.collect

    def recording(indices, step, kl_coef, sizes=None):
        sizes_seen.append(sizes.tolist())
        return collect(indices, step, kl_coef, sizes)

    trainer.collector.collect = recording
    trainer.train()
    assert all(sum(s) == 16 and len(s) == 4 for s in sizes_seen)
    assert sorted(sizes_seen[0]) == [2, 2, 6, 6]  # the first batch, binned as set above
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("rollouts/dual_mu" in r and math.isfinite(r["loss/policy_avg"]) for r in rows)


def test_the_data_labels_can_play_rollout_gdros_bandits(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {
        **QUIET, "method": "custom", "estimator": "grpo", "groups": "oracle", "rollout_allocation": "rollout_gdro",
        "reward": "gold", "num_generations": 4, "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
        "max_new_tokens": 6, "max_steps": 2, "eval_every": 0, "train_prompts_per_group": 2,
        "policy": str(tiny_pipeline["sft"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and all(any(k.startswith("rollouts/generations/") for k in r) for r in rows)


def test_a_failure_rate_score_is_one_minus_the_bins_pass_rate(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {
        **QUIET, "method": "grpo_prompt_gdro", "gdro_score": "failure_rate", "reward": "gold", "num_generations": 4,
        "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 6, "max_steps": 2,
        "eval_every": 0, "train_prompts_per_group": 2, "policy": str(tiny_pipeline["sft"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    for row in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        observed = [k.rsplit("/", 1)[1] for k in row if k.startswith("groups/score_observation/")]
        assert observed
        for g in observed:
            assert row[f"groups/score_observation/{g}"] == pytest.approx(1 - row[f"groups/pass_rate/{g}"])


def test_rollout_gdro_explores_when_every_reward_is_positive():
    """A failure-rate score is positive for every arm: the draws must still move between arms, not lock onto
    the first one chosen."""
    from gipo.rollout_allocation import RolloutGDRO

    config = SimpleNamespace(rollout_min_generations=2, rollout_max_generations=6, num_generations=4, seed=0,
                             rollout_bandit_eta=0.05, rollout_bandit_gamma=0.1, rollout_dual_step=0.05)
    rule = RolloutGDRO(config, 2)
    groups, chosen = torch.tensor([0, 0, 1, 1]), set()
    for step in range(1, 30):
        sizes, _ = rule.allocate(groups, 16, step)
        assert int(sizes.sum()) == 16
        chosen.add(int(sizes[0]))
        rule.observe(torch.tensor([0.9, 0.1]), torch.tensor([True, True]))
    assert len(chosen) > 2
