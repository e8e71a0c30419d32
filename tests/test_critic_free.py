"""Critic-free RL in the PPO trainer (GRPO, Dr. GRPO, RLOO, REINFORCE++) with rewards that are functions:
what is built and what is not, how prompts are sampled, where the KL goes, and bad reward functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gipo import PPOConfig, PPOTrainer, build_config
from gipo.cli import main
from gipo.compare import run_compare
from gipo.config import ConfigError
from gipo.errors import NonFiniteError
from tests.conftest import QUIET

REWARDS = Path(__file__).with_name("rewards.py")
TINY = {**QUIET, "train_prompts_per_group": 8, "max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
        "eval_every": 0, "checkpoint_every": 1, "num_generations": 4}


def _function(name: str) -> str:
    return f"python:{REWARDS}:{name}"


def _trainer(tiny_pipeline, run_dir: Path, **settings) -> PPOTrainer:
    config = build_config(PPOConfig, {**TINY, "method": "grpo", "reward": "gold",
                                      "policy": str(tiny_pipeline["sft"] / "final"), **settings})
    return PPOTrainer(config, output_dir=run_dir)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gold_reward_grpo_holds_no_critic_reward_model_or_reference(tiny_pipeline, tmp_path):
    # The reward model's path does not exist: with reward=gold nothing may try to load it.
    trainer = _trainer(tiny_pipeline, tmp_path / "run", kl_coef=0.0, reward_model=str(tmp_path / "no-such-rm"))
    assert trainer.critic is None and trainer.scorer is None and trainer.reference is None
    assert len(trainer.optimizers()) == 1
    trainer.train()
    assert not (tmp_path / "run" / "final" / "critic").exists()
    last = _rows(tmp_path / "run")[-1]
    assert "loss/value_avg" not in last and "objective/kl" not in last
    assert 0.0 <= last["objective/frac_reward_zero_std"] <= 1.0
    # The score is the gold reward itself.
    domains = [k.removeprefix("domain/gold/") for k in last if k.startswith("domain/gold/")]
    assert domains
    for domain in domains:
        assert last[f"domain/score/{domain}"] == pytest.approx(last[f"domain/gold/{domain}"], abs=1e-6)
    # Every domain's share of the batch is logged, drawn or not, and the shares add up to the whole batch.
    shares = {k.removeprefix("domain/share/"): v for k, v in last.items() if k.startswith("domain/share/")}
    assert set(domains) <= set(shares) and sum(shares.values()) == pytest.approx(1.0)


def test_each_prompt_is_sampled_num_generations_times_side_by_side(tiny_pipeline, tmp_path):
    trainer = _trainer(tiny_pipeline, tmp_path / "run", max_steps=1)
    seen: list[list[int]] = []
    score = trainer.collector.score

    def recording(rollout, indices, step):
        seen.append(list(indices))
        return score(rollout, indices, step)

    trainer.collector.score = recording
    trainer.train()
    (indices,) = seen
    assert len(indices) == 8
    prompts = [indices[i:i + 4] for i in range(0, 8, 4)]
    assert all(len(set(chunk)) == 1 for chunk in prompts)  # 4 samples of one prompt, side by side
    assert prompts[0][0] != prompts[1][0]


def test_reward_functions_are_weighted_and_summed(tiny_pipeline, tmp_path):
    reward = f"{_function('constant_one')},{_function('constant_half')}"
    _trainer(tiny_pipeline, tmp_path / "run", reward=reward, reward_weights=[2.0, -1.0]).train()
    assert [r["objective/scores"] for r in _rows(tmp_path / "run")] == pytest.approx([1.5, 1.5])  # 2 * 1 - 0.5


def test_kl_in_the_loss_or_in_the_reward(tiny_pipeline, tmp_path):
    _trainer(tiny_pipeline, tmp_path / "loss", kl_coef=0.1).train()
    in_loss = _rows(tmp_path / "loss")[-1]
    assert in_loss["loss/kl_avg"] >= 0.0  # k3 is never negative
    assert in_loss["objective/non_score_reward"] == 0.0
    _trainer(tiny_pipeline, tmp_path / "reward", kl_coef=0.1, kl_in="reward").train()
    in_reward = _rows(tmp_path / "reward")[-1]
    assert "loss/kl_avg" not in in_reward
    assert in_reward["objective/non_score_reward"] == pytest.approx(-0.1 * in_reward["objective/kl"], rel=1e-4)


@pytest.mark.parametrize(("function", "fragments"), [
    ("one_too_few", ("returned 7 values for 8 responses",)),
    ("nan_in_row_three", ("row 3 of the batch", "returned nan")),
    ("a_string_in_row_two", ("row 2 of the batch", "'correct'", "not a number")),
    ("raises", ("raised KeyError", "'answer'")),
])
def test_a_bad_reward_function_is_named_with_the_row(tiny_pipeline, tmp_path, function, fragments):
    trainer = _trainer(tiny_pipeline, tmp_path / "run", reward=_function(function))
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    for fragment in ("Step 1", f"reward function {REWARDS}:{function}", *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_a_bad_reward_batch_is_skipped_and_counted(tiny_pipeline, tmp_path):
    _trainer(tiny_pipeline, tmp_path / "run", reward=_function("nan_in_row_three"), on_nonfinite="skip").train()
    rows = _rows(tmp_path / "run")
    assert [r["nonfinite/skipped_batches"] for r in rows] == [1, 2]
    assert rows[0]["nonfinite/last_quantity_skipped"] == f"reward {REWARDS}:nan_in_row_three"


def test_a_reward_function_that_cannot_be_loaded_is_a_config_error(tiny_pipeline, tmp_path):
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        _trainer(tiny_pipeline, tmp_path / "a", reward=_function("nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        _trainer(tiny_pipeline, tmp_path / "b", reward=f"python:{tmp_path / 'missing.py'}:f")
    with pytest.raises(ConfigError, match="2 weights for 1 reward functions"):
        _trainer(tiny_pipeline, tmp_path / "c", reward=_function("constant_one"), reward_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="reward=gold needs dataset to be a registered task"):
        config = build_config(PPOConfig, {**TINY, "method": "grpo", "reward": "gold",
                                          "policy": str(tiny_pipeline["sft"] / "final")})
        PPOTrainer(config, output_dir=tmp_path / "d", prompts=[{"prompt": "copy ab=", "group": "copy"}])


def test_cli_train_with_a_critic_free_preset_and_a_bad_function(tiny_pipeline, tmp_path, capsys):
    common = ["--set=reward=gold", f"--set=policy={tiny_pipeline['sft'] / 'final'}", "--set=max_steps=1",
              "--set=batch_size=8", "--set=mini_batch_size=8", "--set=max_new_tokens=4", "--set=eval_every=0",
              "--set=progress=false", "--set=device=cpu"]
    assert main(["train", "--out", str(tmp_path / "rloo"), "--set=method=rloo", "--set=num_generations=2",
                 *common]) == 0
    assert (tmp_path / "rloo" / "final" / "model.safetensors").exists()
    assert main(["train", "--out", str(tmp_path / "bad"), "--set=method=grpo", "--set=num_generations=4",
                 *common, f"--set=reward={_function('raises')}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "raised KeyError" in error and "Traceback" not in error and len(error.splitlines()) == 1
    assert main(["train", "--out", str(tmp_path / "odd"), "--set=method=grpo", "--set=num_generations=3",
                 *common]) == 2
    assert "multiple of num_generations (3)" in capsys.readouterr().err


def test_compare_runs_critic_free_methods_beside_ppo(tmp_path):
    budget = {"sft": {"max_steps": 4, "batch_size": 16}, "rm": {"max_steps": 3, "batch_size": 8, "num_pairs": 60},
              "ppo": {"max_steps": 2, "batch_size": 8, "mini_batch_size": 8, "max_new_tokens": 4, "eval_every": 0,
                      "eval_prompts": 4, "reward": "gold", "num_generations": 4, "progress": False},
              "dpo": {}}
    summary = run_compare(tmp_path, ["ppo", "grpo", "reinforce_pp"], 1, budget, log=lambda _: None)
    assert set(summary["methods"]) == {"ppo", "grpo", "reinforce_pp"}
    assert not (tmp_path / "seed-0" / "grpo" / "final" / "critic").exists()
    assert (tmp_path / "seed-0" / "ppo" / "final" / "critic").exists()
    assert json.loads((tmp_path / "seed-0" / "grpo" / "eval.json").read_text())["groups"]
