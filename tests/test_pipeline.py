"""End to end on tiny settings: run directories, every method preset, eval.json, the Python API, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from gipo import PPOConfig, PPOTrainer, build_config
from gipo.checkpoint import list_checkpoints, verify
from gipo.cli import main
from gipo.config import METHOD_PRESETS, EvalConfig
from gipo.data import DataError
from gipo.evaluation import evaluate_run
from tests.conftest import QUIET

TINY_PPO = {**QUIET, "train_prompts_per_group": 8, "max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 6,
            "eval_prompts": 4, "checkpoint_every": 1}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_and_reward_run_directories(tiny_pipeline):
    for stage in ("sft", "rm"):
        run_dir = tiny_pipeline[stage]
        assert (run_dir / "config.yaml").exists()
        rows = _metrics(run_dir)
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
        assert all("train/loss" in r for r in rows)
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        checkpoints = list_checkpoints(run_dir)
        assert checkpoints and all(verify(c) is None for c in checkpoints)
    AutoModelForCausalLM.from_pretrained(tiny_pipeline["sft"] / "final")
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_pipeline["rm"] / "final")
    assert reward_model.config.num_labels == 1
    report = json.loads((tiny_pipeline["rm"] / "eval.json").read_text())
    assert set(report) == {"groups", "accuracy"}
    assert set(report["groups"]) <= {"copy", "sort", "reverse", "add"}
    assert all(0 <= g["accuracy"] <= 1 and g["n"] > 0 for g in report["groups"].values())


@pytest.mark.parametrize("method", [m for m in METHOD_PRESETS if m != "custom"])
def test_every_method_trains_and_logs(tiny_pipeline, tmp_path, method):
    config = build_config(PPOConfig, {**TINY_PPO, "method": method, "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward_model": str(tiny_pipeline["rm"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / method)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters(), strict=True))
    rows = _metrics(tmp_path / method)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("objective/scores", "objective/entropy", "policy/approxkl_avg", "policy/clipfrac_avg",
                "loss/policy_avg"):
        assert key in rows[-1], key
    # With 8 samples per prompt a batch of 8 holds one prompt: some domain, not every one.
    assert any(k.startswith("domain/gold/") for k in rows[-1])
    assert ("objective/kl" in rows[-1]) == (config.kl_coef > 0)  # kl_coef=0 holds no reference to measure it
    assert ("loss/value_avg" in rows[-1]) == config.uses_critic
    assert ("objective/frac_reward_zero_std" in rows[-1]) == (config.num_generations > 1)
    if config.groups != "none":
        m = trainer.groups.num_groups
        for key in ["groups/r_var", "groups/nmi"] + [f"groups/{k}/{g}" for k in ("mass", "return", "kl", "kl_coef")
                                                     for g in range(m)]:
            assert key in rows[-1], key
        assert sum(rows[-1][f"groups/mass/{g}"] for g in range(m)) == pytest.approx(1.0, abs=1e-4)
    if method == "ppo_no_kl":
        assert rows[-1]["objective/kl_coef"] == 0.0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / method / "final")
    assert torch.equal(next(loaded.parameters()), next(trainer.policy.parameters()).detach())
    assert (tmp_path / method / "final" / "critic" / "critic_heads.safetensors").exists() == config.uses_critic


def test_eval_json_shape(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {**TINY_PPO, "max_steps": 1, "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward_model": str(tiny_pipeline["rm"] / "final")})
    PPOTrainer(config, output_dir=tmp_path / "ppo").train()
    report = evaluate_run(tmp_path / "ppo", EvalConfig(eval_prompts=3, max_new_tokens=6, device="cpu"))
    assert json.loads((tmp_path / "ppo" / "eval.json").read_text()) == report
    assert set(report) == {"groups", "worst_group", "ood"}
    assert set(report["groups"]) == {"copy", "sort", "reverse", "add"}
    for summary in [*report["groups"].values(), *report["ood"].values()]:
        assert set(summary) == {"n", "reward", "gold", "judge", "kl", "length", "pass@1"}  # 1 sample a prompt
        assert 0.0 <= summary["gold"] <= 1.0 and summary["length"] >= 1 and summary["judge"] is None
    assert report["groups"]["copy"]["n"] == 3 and "long" in report["ood"]
    worst = report["worst_group"]
    assert worst["gold"] == min(g["gold"] for g in report["groups"].values())
    assert report["groups"][worst["name"]]["gold"] == worst["gold"]


def test_python_api_with_models_in_hand_and_chat_prompts(tiny_pipeline, tmp_path):
    """A notebook user: models already loaded, prompts as chat conversations, no files but the output."""
    sft_dir, rm_dir = tiny_pipeline["sft"] / "final", tiny_pipeline["rm"] / "final"
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    prompts = [{"prompt": [{"role": "user", "content": f"copy {w}="}], "group": "copy"} for w in ("abc", "ghij")]
    prompts += [{"prompt": f"reverse {w}=", "group": "reverse"} for w in ("abc", "dcb")]
    config = PPOConfig(**{**TINY_PPO, "batch_size": 4, "mini_batch_size": 2}, method="gipo")
    trainer = PPOTrainer(config, policy=AutoModelForCausalLM.from_pretrained(sft_dir), tokenizer=tokenizer,
                         reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir),
                         reward_tokenizer=tokenizer, prompts=prompts, output_dir=tmp_path / "api")
    rendered = tokenizer.apply_chat_template(prompts[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert trainer.collector.encoded[0] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    trainer.train()
    report = trainer.evaluate(n_per_group=2)
    assert set(report["groups"]) == {"copy", "sort", "reverse", "add"}
    trainer.save_pretrained(tmp_path / "saved")
    AutoModelForCausalLM.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("method", ["gipo", "grpo"])
def test_cli_demo_end_to_end(tmp_path, capsys, method):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--set", "max_steps=2", "--set", "sft.batch_size=8",
                 "--set", "rm.num_pairs=40", "--set", "rm.batch_size=8", "--set", "ppo.batch_size=8",
                 "--set", "ppo.mini_batch_size=4", "--set", "ppo.max_new_tokens=6", "--set", "eval_prompts=3",
                 "--set", "progress=false", "--set", "device=cpu", "--set", f"ppo.method={method}",
                 *(["--set", "ppo.num_generations=4"] if method == "grpo" else [])])
    assert code == 0
    printed = capsys.readouterr().out
    assert "worst group" in printed and "gold sft" in printed
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "final" / "config.json").exists()
        assert (out / stage / "eval.json").exists()
    assert (out / "ppo" / "training_curves.png").stat().st_size > 0
    sft_eval, ppo_eval = (json.loads((out / s / "eval.json").read_text()) for s in ("sft", "ppo"))
    assert sft_eval["groups"].keys() == ppo_eval["groups"].keys()
    assert sft_eval["groups"]["add"]["reward"] is not None
    assert f"method: {method}" in (out / "ppo" / "config.yaml").read_text()


def test_lora_trains_adapters_and_uses_the_adapter_free_model_as_reference(tiny_pipeline, tmp_path):
    sft_dir = tiny_pipeline["sft"] / "final"
    config = build_config(PPOConfig, {**TINY_PPO, "lora_r": 4, "lora_target_modules": "q_proj,v_proj,o_proj",
                                      "learning_rate": 1e-2, "policy": str(sft_dir),
                                      "reward_model": str(tiny_pipeline["rm"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / "lora")
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([[5, 20, 21, 22]])
    mask = torch.ones_like(ids)
    reference_before = trainer.reference(input_ids=ids, attention_mask=mask).logits
    trainer.train()
    torch.testing.assert_close(trainer.reference(input_ids=ids, attention_mask=mask).logits, reference_before)
    policy_after = trainer.policy(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(policy_after, reference_before)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, policy_after, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "lora" / "final" / "adapter" / "adapter_model.safetensors").exists()


def test_a_critic_copied_from_the_frozen_reward_model_is_trained_in_full(tiny_pipeline, tmp_path):
    config = build_config(PPOConfig, {**TINY_PPO, "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward_model": str(tiny_pipeline["rm"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / "run")
    assert trainer.scorer.same_tokenizer
    before = {name: p.detach().clone() for name, p in trainer.critic.backbone.named_parameters()}
    trainer.training_step()
    trained = {id(p) for group in trainer.critic_optimizer.param_groups for p in group["params"]}
    assert all(id(p) in trained for p in trainer.critic.parameters())
    assert all(not torch.equal(before[name], p) for name, p in trainer.critic.backbone.named_parameters()
               if "norm" not in name)
    assert not any(p.requires_grad for p in trainer.scorer.model.parameters())  # the reward model stays frozen


def test_with_lora_a_critic_copied_from_the_policy_is_trained_in_full(tiny_pipeline, tmp_path):
    """The critic starts from the policy's backbone when the reward model reads other tokens: it must be a
    copy made before the adapters go in (else it would hold frozen weights and adapters of its own)."""
    import copy

    from gipo.models import load_tokenizer

    rm_dir = tiny_pipeline["rm"] / "final"
    reward_tokenizer = copy.deepcopy(load_tokenizer(str(rm_dir)))
    reward_tokenizer.add_tokens(["<other-vocabulary>"])
    config = build_config(PPOConfig, {**TINY_PPO, "lora_r": 4, "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward_model": str(rm_dir)})
    trainer = PPOTrainer(config, reward_tokenizer=reward_tokenizer, output_dir=tmp_path / "run")
    assert not trainer.scorer.same_tokenizer
    critic_names = [n for n, _ in trainer.critic.named_parameters()]
    assert not any("lora_" in n for n in critic_names)
    assert all(p.requires_grad for p in trainer.critic.parameters())


def test_a_registered_task_trains_and_evaluates_by_name(tiny_pipeline, tmp_path):
    """A user's own task: prompts with a domain label and a gold reward, used as `dataset: NAME`."""
    from gipo.tasks import Task, get_task, register_task

    def make_split(split, n, rng):
        return [{"prompt": f"say {w}=", "group": group, "answer": w}
                for group, words in (("short", "ab"), ("long", "abcd")) for w in [words] * n]

    register_task(Task(name="echo", groups=["short", "long"], make_split=make_split,
                       gold_reward=lambda record, response: float(response == record["answer"])))
    assert get_task("echo") is not None
    config = build_config(PPOConfig, {**TINY_PPO, "dataset": "echo", "train_prompts_per_group": 4, "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward_model": str(tiny_pipeline["rm"] / "final")})
    trainer = PPOTrainer(config, output_dir=tmp_path / "echo").train()
    assert {"domain/gold/short", "domain/gold/long"} <= set(_metrics(tmp_path / "echo")[-1])
    report = trainer.evaluate(n_per_group=2)
    assert set(report["groups"]) == {"short", "long"} and report["ood"] == {}
    assert all(g["gold"] in (0.0, 0.5, 1.0) for g in report["groups"].values())


def test_reward_model_with_its_own_tokenizer_reads_its_own_layout(monkeypatch):
    """MiniLM-style: the scorer re-renders the prompt with the reward model's template and keeps the end."""
    import gipo.rollout as rollout_module
    from gipo.data import pad_left, render_prompt
    from gipo.models import build_embedded_tokenizer
    from gipo.rollout import RewardScorer, Rollout

    policy_tok, reward_tok = build_embedded_tokenizer(), build_embedded_tokenizer()
    reward_tok.add_tokens(["<extra>"])  # another vocabulary
    seen = []
    monkeypatch.setattr(rollout_module, "score_sequences",
                        lambda model, ids, mask: seen.append((ids, mask)) or torch.zeros(len(ids)))
    prompt = [{"role": "user", "content": "copy ab="}]
    query, query_mask = pad_left([policy_tok(render_prompt(policy_tok, prompt), add_special_tokens=False)
                                  ["input_ids"]], policy_tok.pad_token_id)
    response = torch.tensor([policy_tok("ab", add_special_tokens=False)["input_ids"] + [policy_tok.eos_token_id]])
    rollout = Rollout(query, query_mask, response, torch.ones_like(response, dtype=torch.float),
                      torch.tensor([True]))
    expected = reward_tok(render_prompt(reward_tok, prompt) + "ab", add_special_tokens=False)["input_ids"]
    RewardScorer(None, reward_tok, policy_tok)(rollout, [prompt])
    assert seen[-1][0][0].tolist() == expected + [reward_tok.eos_token_id]
    RewardScorer(None, reward_tok, policy_tok, max_length=5)(rollout, [prompt])
    assert seen[-1][0][0].tolist() == expected[-4:] + [reward_tok.eos_token_id]  # the response survives


def _models_in_hand(pipeline):
    sft_dir, rm_dir = pipeline["sft"] / "final", pipeline["rm"] / "final"
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    return dict(policy=AutoModelForCausalLM.from_pretrained(sft_dir), tokenizer=tokenizer,
                reward_model=AutoModelForSequenceClassification.from_pretrained(rm_dir), reward_tokenizer=tokenizer)


def test_long_chat_prompts_lose_their_oldest_turns_with_long_prompts_shorten(tiny_pipeline, tmp_path):
    history = [{"role": "user", "content": "copy abcdefghij="}, {"role": "assistant", "content": "abcdefghij"}] * 2
    prompts = [{"prompt": history + [{"role": "user", "content": f"copy {w}="}], "group": "copy"}
               for w in ("abc", "ghij", "bcd", "aaa")]
    settings = {**TINY_PPO, "batch_size": 4, "mini_batch_size": 2, "max_prompt_length": 40}
    with pytest.raises(DataError, match="longer than the allowed 40"):
        PPOTrainer(PPOConfig(**settings), prompts=prompts, output_dir=tmp_path / "strict",
                   **_models_in_hand(tiny_pipeline))
    trainer = PPOTrainer(PPOConfig(**settings, long_prompts="shorten"), prompts=prompts, output_dir=tmp_path / "fit",
                         **_models_in_hand(tiny_pipeline))
    assert len(trainer.records) == 4 and all(len(ids) <= 40 for ids in trainer.collector.encoded)
    for kept, given in zip(trainer.records, prompts, strict=True):
        assert kept["prompt"] == given["prompt"][-len(kept["prompt"]):] and len(kept["prompt"]) < len(given["prompt"])
    trainer.train()


def test_ood_dataset_groups_are_evaluated_as_ood_splits_without_gold(tiny_pipeline, tmp_path):
    from itertools import product

    from gipo.evaluation import evaluation_prompts
    from gipo.tasks import in_test_split

    path = tmp_path / "ood.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"copy {''.join(w)}=", "group": "far"}) + "\n"
                            for w in product("abcdef", repeat=3)))
    _, gold, ood = evaluation_prompts("builtin", 5, str(path))
    assert gold is not None and set(ood) == {"long", "far"}
    rows, far_gold = ood["far"]
    assert len(rows) == 5 and far_gold is None and all(in_test_split(r["prompt"]) for r in rows)
    config = PPOConfig(**{**TINY_PPO, "eval_prompts": 5}, ood_dataset=str(path))
    report = PPOTrainer(config, output_dir=tmp_path / "run",
                        **_models_in_hand(tiny_pipeline)).evaluate()
    assert report["ood"]["far"]["n"] == 5 and report["ood"]["far"]["gold"] is None
    assert report["ood"]["far"]["reward"] is not None and report["ood"]["long"]["gold"] is not None


def test_gipo_eval_with_a_judge_scores_every_response_with_it(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    PPOTrainer(build_config(PPOConfig, {**TINY_PPO, "max_steps": 1, "policy": str(tiny_pipeline["sft"] / "final"),
                                        "reward_model": str(tiny_pipeline["rm"] / "final")}),
               output_dir=run).train()
    # The judge here is the SFT model's backbone with a fresh score head: any other reward model would do.
    report = evaluate_run(run, EvalConfig(eval_prompts=3, device="cpu", judge=str(tiny_pipeline["sft"] / "final")))
    rows = [json.loads(line) for line in (run / "eval_rows.jsonl").read_text().splitlines()]
    assert all(isinstance(r["judge"], float) for r in rows)
    assert all(r["judge"] != r["reward"] for r in rows)
    assert all(group["judge"] is not None for group in report["groups"].values())
