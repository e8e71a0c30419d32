"""Extension points: an estimator, a reward function and a sampling rule added by name or by python: spec train
like the built-in ones; names are listed once, where they are registered; bad names are clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import gipo
from gipo import PPOConfig, PPOTrainer, build_config
from gipo.cli import main
from gipo.errors import ConfigError
from gipo.estimators import ESTIMATORS, AdvantageSettings, get_estimator
from gipo.reward_functions import REWARD_SOURCES
from gipo.sampling import SAMPLING_RULES, Uniform
from tests.conftest import QUIET

EXAMPLES = Path(__file__).parents[1] / "examples"
TINY = {**QUIET, "train_prompts_per_group": 8, "max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
        "eval_every": 0, "checkpoint_every": 1}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_example_estimator_trains_from_the_command_line(tiny_pipeline, tmp_path):
    run_dir = tmp_path / "mean-baseline"
    assert main(["train", "--out", str(run_dir), "--set=method=custom", "--set=reward=gold",
                 f"--set=estimator=python:{EXAMPLES / 'custom_estimator.py'}:mean_baseline",
                 f"--set=policy={tiny_pipeline['sft'] / 'final'}", "--set=max_steps=2", "--set=batch_size=8",
                 "--set=mini_batch_size=4", "--set=max_new_tokens=6", "--set=eval_every=0",
                 "--set=progress=false", "--set=device=cpu"]) == 0
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert "loss/value_avg" not in rows[-1]  # a python: estimator needs no critic unless registered so
    assert (run_dir / "final" / "model.safetensors").exists() and not (run_dir / "final" / "critic").exists()


def test_the_example_estimator_is_reward_minus_the_batch_mean():
    fn = get_estimator(f"python:{EXAMPLES / 'custom_estimator.py'}:mean_baseline").fn
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0], [2.0, 0.0]])  # sequence rewards 1, 3, 2: mean 2
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    advantages, returns = fn(rewards, mask, None, AdvantageSettings(), lambda x: x)
    assert returns is None
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))


def test_a_registered_estimator_reward_and_rule_are_found_by_name(tiny_pipeline, tmp_path):
    calls = {"estimator": 0, "reward": 0, "rule": 0}

    def constant_advantage(token_rewards, mask, values, settings, reduce):
        calls["estimator"] += 1
        return torch.ones_like(token_rewards) * mask, None

    def length_reward(prompts, responses, records):
        calls["reward"] += 1
        return [float(len(r)) for r in responses]

    class CountingUniform(Uniform):
        def choose(self, sampler, n, step, assign):
            calls["rule"] += 1
            return super().choose(sampler, n, step, assign)

    gipo.register_estimator("test_constant", constant_advantage, defaults={"num_generations": 2})
    gipo.register_reward("test_length", length_reward)
    gipo.register_sampling_rule("test_counting", CountingUniform)
    config = build_config(PPOConfig, {**TINY, "method": "custom", "estimator": "test_constant",
                                      "reward": "test_length", "prompt_sampling": "test_counting",
                                      "policy": str(tiny_pipeline["sft"] / "final"), "kl_coef": 0.0})
    assert config.num_generations == 2 and not config.uses_critic
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    assert calls == {"estimator": 2, "reward": 2, "rule": 2}
    assert "test_constant" in ESTIMATORS.describe()
    with pytest.raises(ValueError, match="registered already"):
        gipo.register_estimator("test_constant", constant_advantage)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("estimator", "grpoo", "not a registered advantage estimator. Did you mean grpo"),
    ("reward", "gould", "'gould' is not a registered reward source"),
    ("prompt_sampling", "group_weight", "not a registered prompt sampling rule. Did you mean group_weights"),
    ("estimator", "python:no_such_module_here:f", "cannot import no_such_module_here"),
])
def test_an_unknown_name_lists_the_registered_ones(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        build_config(PPOConfig, {"method": "custom", "estimator": "grpo", key: value})
    assert fragment in str(info.value)


def test_help_lists_every_registered_name():
    from gipo.config import describe

    text = describe(PPOConfig)
    for registry in (ESTIMATORS, REWARD_SOURCES, SAMPLING_RULES):
        for name in registry.names():
            assert name in text, name


def test_help_says_what_batch_size_counts_and_names_the_critic_free_estimators(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "batch_size = 64: Samples (responses) per iteration" in text
    assert "critic-free" in text and "reward functions" in text.lower()
    assert PPOConfig(method="grpo", batch_size=64).prompts_per_batch == 8


def test_a_generation_backend_is_one_registration(tiny_pipeline, tmp_path):
    from gipo.rollout import generate_hf

    calls = []

    def greedy_hf(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, with_logprobs, with_states):
        calls.append(len(query_ids))
        return generate_hf(model, query_ids, query_mask, eos_id, pad_id, settings, True, with_logprobs, with_states)

    gipo.register_generation_backend("test_greedy", greedy_hf, "argmax through HF generate", replace=True)
    config = build_config(PPOConfig, {**TINY, "method": "grpo", "reward": "gold", "num_generations": 4,
                                      "generation_backend": "test_greedy",
                                      "policy": str(tiny_pipeline["sft"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    assert calls[:2] == [8, 8]  # the two iterations' batches
    rows = _rows(tmp_path / "run")
    assert all(r["objective/frac_reward_zero_std"] == 1.0 for r in rows)  # a prompt's argmax samples agree
    with pytest.raises(ConfigError, match="test_greedy"):
        build_config(PPOConfig, {"generation_backend": "test_greed"})


def test_a_backend_with_its_own_log_probabilities_gets_the_rollout_correction(tiny_pipeline, tmp_path):
    """A backend whose recorded log-probabilities differ from the trainer's (as a vLLM engine's would): the
    trainer recomputes the old policy's, and the importance weights between the two are logged and clamped."""
    from gipo.rollout import generate_hf

    def shifted(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, with_logprobs, with_states):
        rollout = generate_hf(model, query_ids, query_mask, eos_id, pad_id, settings, greedy, True, with_states)
        rollout.sampled_logprobs = (rollout.sampled_logprobs - 1.0) * rollout.response_mask  # r = e per token
        return rollout

    gipo.register_generation_backend("test_shifted", shifted, "HF generate, log-probabilities off by one nat",
                                     replace=True)
    config = build_config(PPOConfig, {**TINY, "method": "grpo", "reward": "gold", "num_generations": 4,
                                      "generation_backend": "test_shifted", "reuse_generation_logprobs": False,
                                      "policy": str(tiny_pipeline["sft"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    row = _rows(tmp_path / "run")[-1]
    assert row["rollout_correction/ratio_mean"] == pytest.approx(math.e, rel=1e-4)
    assert row["rollout_correction/kl"] == pytest.approx(-1.0, abs=1e-4)
    assert row["rollout_correction/clipped_share"] == 1.0  # every token's e clamped at 2
