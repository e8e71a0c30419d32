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


def test_bin_scores_are_an_ema_of_the_share_normalized_surrogate_loss():
    config = SimpleNamespace(gdro_eta=0.65, gdro_gamma=0.01, gdro_ema_beta=0.5, gdro_weight_cap=15.0,
                             gdro_score_by_share=True)
    rule = PromptGDRO(config, 2)
    observed = torch.tensor([True, False])
    rule.observe(torch.tensor([0.2, 9.0]), torch.tensor([0.5, 0.0]), observed)
    torch.testing.assert_close(rule.scores, torch.tensor([0.4, 0.0]))  # first observation: 0.2 / 0.5; bin 1 absent
    rule.observe(torch.tensor([0.1, 0.3]), torch.tensor([0.25, 0.75]), torch.tensor([True, True]))
    torch.testing.assert_close(rule.scores, torch.tensor([0.5 * 0.4 + 0.5 * 0.4, 0.4]))
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

        def observe(self, surrogate_losses, shares, observed):
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
