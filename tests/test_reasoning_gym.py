"""reasoning-gym tasks as a dataset (spec parsing, splits, gold reward), answer extraction, pass@k, and a short
GRPO run of the tiny model on two reasoning-gym tasks with per-task metrics."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from gipo import PPOConfig, PPOTrainer, build_config
from gipo.answers import EXTRACTORS, extract_answer, register_extractor
from gipo.errors import ConfigError, DataError
from gipo.evaluation import pass_at_k, pass_ks, summarize
from gipo.tasks import get_task
from tests.conftest import QUIET

pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed: pip install 'gipo[reasoning]' "
                    "(make test installs it)")

from gipo.reasoning_gym_task import answer_format, parse_mix  # noqa: E402

# Two tasks with short questions; plain prompts without a system prompt keep the tiny model's inputs short.
SPEC = "reasoning_gym:chain_sum?max_terms=2&max_digits=1,products?max_digits=1;prompt_format=plain&system_prompt="


@pytest.mark.parametrize("name, reply, expected", [
    ("whole", "  42.\n", "42"),
    ("whole", "   ", None),
    ("answer_tags", "think <answer>1</answer> then <answer> 7 </answer>", "7"),
    ("answer_tags", "7", None),
    ("last_number", "3 + 4 = 7.", "7"),
    ("last_number", "It is -12.5 or 1,024 apples", "1024"),
    ("last_number", "no digits", None),
    ("boxed", r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    ("boxed", r"\boxed{3} and \boxed{4", None),
    ("first_line", "\n  yes.\nbecause", "yes"),
])
def test_extractors_on_hand_written_replies(name, reply, expected):
    assert extract_answer(name, reply) == expected


def test_a_registered_extractor_is_found_by_name_and_an_unknown_one_is_listed():
    register_extractor("test_upper", lambda reply: reply.upper() or None, replace=True)
    assert extract_answer("test_upper", "ab") == "AB"
    with pytest.raises(ConfigError, match="last_number"):
        EXTRACTORS.get("last_numbr")


def test_spec_parses_tasks_parameters_and_options():
    mix = parse_mix("chain_sum?max_terms=2&max_digits=2,basic_arithmetic?operators=[+,-];extract=whole")
    assert [s.name for s in mix.tasks] == ["chain_sum", "basic_arithmetic"]
    assert mix.tasks[0].params == {"max_terms": 2, "max_digits": 2}
    assert mix.tasks[1].params == {"operators": ["+", "-"]}
    assert mix.extract == "whole"


def test_yaml_form_has_weights_and_ood_settings(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("tasks:\n  chain_sum: {params: {max_digits: 1, max_terms: 2}, weight: 2, ood: {max_digits: 3}}\n"
                    "  products: {params: {max_digits: 1}}\nextract: last_number\nsystem_prompt: Be brief.\n")
    task = get_task(f"reasoning_gym:{path}")
    train = task.prompts("train", 5, seed=0)
    assert [r["group"] for r in train].count("chain_sum") == 10 and [r["group"] for r in train].count("products") == 5
    assert train[0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    harder = task.prompts("harder_chain_sum", 5, seed=0)
    assert {r["group"] for r in harder} == {"harder_chain_sum"}
    assert max(r["entry"]["metadata"]["num_digits"] for r in harder) == 3  # ood: max_digits 3 over 1


def test_splits_are_disjoint_distinct_and_seeded():
    task = get_task(SPEC)
    assert task.groups == ["chain_sum", "products"]
    assert task.ood_splits == ["harder_chain_sum", "harder_products"]
    test = task.prompts("test", 8, seed=0)
    held_out = {r["question"] for r in test + task.prompts("validation", 8, seed=0)}
    for seed in (0, 1):
        train = task.prompts("train", 40, seed=seed)
        assert not held_out & {r["question"] for r in train}
    assert [r["question"] for r in task.prompts("train", 40, seed=0)] != [r["question"] for r in
                                                                            task.prompts("train", 40, seed=1)]
    assert len({r["question"] for r in test}) == len(test)  # held-out questions are distinct
    assert [r["question"] for r in test] == [r["question"] for r in task.prompts("test", 8, seed=5)]
    # The generic OOD setting doubles every max_* parameter: 1-digit products become up to 2-digit ones.
    assert max(r["entry"]["metadata"]["num_digits"] for r in task.prompts("harder_products", 20, seed=0)) == 2


def test_gold_reward_is_the_tasks_score_on_the_extracted_answer():
    task = get_task(SPEC)
    record = task.prompts("test", 1, seed=0)[0]
    answer = record["answer"]
    assert task.gold_reward(record, f"The result is {answer}.") == 1.0
    assert task.gold_reward(record, f"{int(answer) + 1}") == 0.0
    assert task.gold_reward(record, "I cannot say") == 0.0
    assert answer_format([None, None], ["it is 3", "none"], [record, record]) == [1.0, 0.0]


@pytest.mark.parametrize("extract, form", [("last_number", "{}"), ("answer_tags", "<answer>{}</answer>"),
                                           ("boxed", "\\boxed{{{}}}")])
def test_demonstrations_write_the_answer_as_the_extractor_reads_it(extract, form):
    task = get_task(f"reasoning_gym:chain_sum?max_terms=2&max_digits=1;extract={extract}")
    record = task.prompts("train", 1, seed=0)[0]
    demonstration = task.demonstration(record, random.Random(0))
    assert demonstration == form.format(record["answer"]) and task.gold_reward(record, demonstration) == 1.0


def test_math_verify_counts_equal_math_answers(tmp_path):
    pytest.importorskip("math_verify", reason="math-verify is not installed: pip install 'gipo[reasoning]'")
    path = tmp_path / "mix.yaml"
    path.write_text("tasks:\n  chain_sum: {params: {max_digits: 1, max_terms: 2}, math_verify: true}\n"
                    "extract: whole\n")
    task = get_task(f"reasoning_gym:{path}")
    record = task.prompts("test", 1, seed=0)[0]
    assert task.gold_reward(record, f"{record['answer']}.0") == 1.0  # chain_sum's own check wants "7", not "7.0"


@pytest.mark.parametrize("spec, fragments", [
    ("reasoning_gym:chain_summ", ["no task 'chain_summ'", "chain_sum", "products"]),
    ("reasoning_gym:chain_sum?max_term=2", ["unknown parameter max_term", "max_terms"]),
    ("reasoning_gym:chain_sum?min_terms=4&max_terms=2", ["chain_sum", "refuses"]),
    ("reasoning_gym:chain_sum;extract=tags", ["tags", "answer_tags"]),
    ("reasoning_gym:chain_sum;colour=red", ["unknown option colour", "extract"]),
    ("reasoning_gym:chain_sum,chain_sum", ["named twice"]),
    ("reasoning_gym:chain_sum?max_terms", ["not KEY=VALUE"]),
    ("reasoning_gym:no-such-file.yaml", ["no-such-file.yaml", "no such file"]),
])
def test_bad_specs_are_clear_errors(spec, fragments):
    with pytest.raises((ConfigError, DataError)) as caught:
        get_task(spec)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_pass_at_k_on_hand_computed_cases():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 3, 2) == 1.0  # any 2 of 4 hold one of the 3
    assert pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]
    rows = [{"prompt_index": 0, "sample": j, "gold": g, "reward": None, "judge": None, "kl": None, "length": 3.0}
            for j, g in enumerate([1.0, 0.0, 0.0, 0.0])]
    rows += [{"prompt_index": 1, "sample": j, "gold": 0.0, "reward": None, "judge": None, "kl": None, "length": 5.0}
             for j in range(4)]
    rows += [{"prompt_index": 0, "sample": "greedy", "gold": 1.0, "reward": None, "judge": None, "kl": None,
              "length": 1.0}, {"prompt_index": 1, "sample": "greedy", "gold": 0.3, "reward": None, "judge": None,
                               "kl": None, "length": 1.0}]
    summary = summarize(rows)
    assert summary["n"] == 8 and summary["length"] == 4.0  # greedy rows are not in the sampled means
    assert summary["pass@1"] == pytest.approx(0.125) and summary["pass@2"] == pytest.approx(0.25)
    assert summary["pass@4"] == pytest.approx(0.5) and summary["greedy_pass@1"] == 0.5


def test_two_grpo_iterations_on_two_tasks_log_per_task_metrics(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {
        **QUIET, "train_prompts_per_group": 8, "method": "grpo", "reward": "gold,answer_format", "reward_weights": [1.0, 0.1], "dataset": SPEC,
        "policy": str(tiny_pipeline["sft"] / "final"), "max_steps": 2, "batch_size": 8, "mini_batch_size": 8,
        "ppo_epochs": 1, "num_generations": 4, "max_new_tokens": 4, "max_prompt_length": 128, "eval_every": 2,
        "eval_prompts": 2, "eval_samples": 2, "eval_greedy": True, "eval_train_prompts": 1, "checkpoint_every": 1})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    last = rows[-1]
    for task in ("chain_sum", "products"):
        assert f"domain/gold/{task}" in rows[0]  # the training batch's gold reward, per task, every step
        for key in ("pass@1", "pass@2", "greedy_pass@1", "length", "gold"):
            assert f"eval/{key}/{task}" in last and f"eval/train/{key}/{task}" in last
            assert f"eval/{key}/ood_harder_{task}" in last
        assert 0.0 <= last[f"eval/pass@1/{task}"] <= last[f"eval/pass@2/{task}"] <= 1.0
    assert (tmp_path / "run" / "final").is_dir()


def test_compare_starts_from_a_given_policy_and_pairs_with_it(tiny_pipeline, tmp_path):
    from gipo.compare import run_compare

    ppo = {**QUIET, "reward": "gold", "dataset": SPEC, "policy": str(tiny_pipeline["sft"] / "final"), "max_steps": 1,
           "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "num_generations": 4, "max_new_tokens": 4,
           "max_prompt_length": 128, "eval_every": 0, "eval_prompts": 2, "eval_samples": 2}
    summary = run_compare(tmp_path / "cmp", ["grpo"], 2, {"ppo": ppo}, log=lambda _: None)
    assert list(summary["methods"]) == ["start", "grpo"] and "grpo" in summary["paired_vs_start"]
    for seed in (0, 1):
        start = tmp_path / "cmp" / f"seed-{seed}" / "start"
        assert (start / "eval.json").exists() and not (start / "final").exists()
        assert not (tmp_path / "cmp" / f"seed-{seed}" / "sft").exists()
    assert summary["methods"]["start"]["groups"]["products"]["pass_rate"]["mean"] is not None
    assert summary["methods"]["grpo"]["groups"]["products"]["pass@2"]["mean"] is not None
    paired = summary["paired_vs_start"]["grpo"]
    assert {"products_pass_rate", "chain_sum_pass_rate", "mean_pass_rate", "ood_harder_products_pass@1"} <= set(paired)
    # Both evaluations drew 2 responses per prompt with the PPO stage's settings.
    rows = (tmp_path / "cmp" / "seed-0" / "grpo" / "eval_rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 * 2 and Path(tmp_path / "cmp" / "report.md").exists()


def test_an_sft_stage_imitates_the_reference_answers(tmp_path):
    from gipo import SFTConfig, SFTTrainer
    from gipo.data import load_sft_examples

    examples = load_sft_examples(SPEC, 4, seed=0)
    assert len(examples) == 8 and all(e["completion"] == e["answer"] for e in examples)
    config = build_config(SFTConfig, {**QUIET, "dataset": SPEC, "max_steps": 2, "batch_size": 4, "max_length": 160})
    SFTTrainer(config, output_dir=tmp_path / "sft", examples_per_group=4).train()
    assert (tmp_path / "sft" / "final").is_dir()
