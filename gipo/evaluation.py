"""Evaluation of a policy per group and on out-of-distribution splits: reward, gold, KL, length.

Shape of the result (written as ``eval.json``)::

    {"groups": {NAME: {"n", "reward", "gold", "judge", "kl", "length"}},
     "worst_group": {"name", "reward", "gold"},
     "ood": {SPLIT: {"n", "reward", "gold", "judge", "kl", "length"}}}

``gold`` is null where the task has no gold reward, ``reward`` where no reward model is given,
``judge`` where no judge reward model is given. The
worst group is chosen by gold reward, else by reward-model score. ``kl`` is the mean over responses
of sum_t log pi(y_t) - log pi_ref(y_t) on sampled responses (an unbiased estimate of KL per response).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gipo.config import ConfigError, EvalConfig, read_yaml
from gipo.data import encode_prompts, fit_to_length, load_prompts, pad_left
from gipo.rollout import RewardScorer, SamplingSettings, decode_responses, generate, response_logprobs
from gipo.tasks import PromptRecord, get_task, in_test_split


@torch.no_grad()
def score_prompts(policy, tokenizer, records: list[PromptRecord], *, settings: SamplingSettings,
                  reference=None, scorer: RewardScorer | None = None, judge: RewardScorer | None = None,
                  gold_reward: Callable[[PromptRecord, str], float] | None = None,
                  batch_size: int = 128, max_prompt_length: int = 512, seed: int = 0,
                  device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Sample one response per prompt and measure it: one dict per prompt."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        encoded = encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length, "evaluation prompts")
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            ids, mask = pad_left(encoded[start:start + batch_size], tokenizer.pad_token_id)
            rollout = generate(policy, ids.to(device), mask.to(device), tokenizer.eos_token_id,
                               tokenizer.pad_token_id, settings)
            texts = decode_responses(tokenizer, rollout)
            kl = torch.zeros(len(batch))
            if reference is not None and reference is not policy:
                logprobs, _ = response_logprobs(policy, rollout, settings.temperature)
                ref_logprobs, _ = response_logprobs(reference, rollout, settings.temperature)
                kl = ((logprobs - ref_logprobs) * rollout.response_mask).sum(-1).cpu()
            prompts = [r["prompt"] for r in batch]
            scores = scorer(rollout, prompts).cpu() if scorer is not None else None
            judged = judge(rollout, prompts).cpu() if judge is not None else None
            lengths = rollout.lengths.cpu()
            for i, record in enumerate(batch):
                rows.append({
                    "group": record["group"], "response": texts[i],
                    "reward": None if scores is None else float(scores[i]),
                    "judge": None if judged is None else float(judged[i]),
                    "gold": None if gold_reward is None else float(gold_reward(record, texts[i])),
                    "kl": float(kl[i]) if reference is not None else None, "length": float(lengths[i]),
                })
    finally:
        torch.set_rng_state(generator_state)
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"n": len(rows), **{key: _mean([r.get(key) for r in rows])
                               for key in ("reward", "gold", "judge", "kl", "length")}}


def summarize_by_group(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_group: dict[str, list] = defaultdict(list)
    for row in rows:
        by_group[row["group"]].append(row)
    return {name: summarize(group_rows) for name, group_rows in sorted(by_group.items())}


def worst_group(groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    key = "gold" if any(g["gold"] is not None for g in groups.values()) else "reward"
    candidates = {name: g for name, g in groups.items() if g[key] is not None}
    if not candidates:
        return {"name": None, "reward": None, "gold": None}
    name = min(candidates, key=lambda n: candidates[n][key])
    return {"name": name, "reward": groups[name]["reward"], "gold": groups[name]["gold"]}


def build_report(test_rows: list[dict[str, Any]], ood_rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    groups = summarize_by_group(test_rows)
    return {"groups": groups, "worst_group": worst_group(groups),
            "ood": {split: summarize(rows) for split, rows in ood_rows.items()}}


GoldReward = Callable[[PromptRecord, str], float]


def evaluation_prompts(dataset: str, n_per_group: int, ood_dataset: str | None = None
                       ) -> tuple[list[PromptRecord], GoldReward | None,
                                  dict[str, tuple[list[PromptRecord], GoldReward | None]]]:
    """Held-out test prompts and their gold reward (None without one) for ``dataset``, and the OOD
    splits with theirs: the task's own, and each group of ``ood_dataset`` (its test split; no gold).

    The prompts do not depend on the run's seed, so every run of a comparison meets the same ones.
    """
    task = get_task(dataset)
    if task is not None:
        test, gold = task.prompts("test", n_per_group, seed=0), task.gold_reward
        ood = {split: (task.prompts(split, n_per_group, seed=0), gold) for split in task.ood_splits}
    else:
        test, gold, ood = _test_prompts_by_group(dataset, n_per_group), None, {}
    if ood_dataset:
        for record in _test_prompts_by_group(ood_dataset, n_per_group):
            if record["group"] in ood and ood[record["group"]][1] is not None:
                raise ConfigError(f"ood_dataset {ood_dataset}: group {record['group']!r} has the name of one of "
                                  f"{dataset}'s own OOD splits; name the source's group another way (SOURCE@GROUP).")
            ood.setdefault(record["group"], ([], None))[0].append(record)
    return test, gold, ood


def _test_prompts_by_group(dataset: str, n_per_group: int) -> list[PromptRecord]:
    records = [r for r in load_prompts(dataset, "test", n_per_group, 0) if in_test_split(str(r["prompt"]))]
    by_group: dict[str, list[PromptRecord]] = defaultdict(list)
    for record in records:
        if len(by_group[record["group"]]) < n_per_group:
            by_group[record["group"]].append(record)
    return [r for rows in by_group.values() for r in rows]


def evaluate_policy(policy, tokenizer, dataset: str, *, n_per_group: int, settings: SamplingSettings,
                    reference=None, scorer: RewardScorer | None = None, batch_size: int = 128,
                    max_prompt_length: int = 512, seed: int = 1234, device: torch.device | str = "cpu",
                    rows_path: Path | None = None, long_prompts: str = "error",
                    ood_dataset: str | None = None, judge: RewardScorer | None = None) -> dict[str, Any]:
    """The ``eval.json`` report for ``policy`` on ``dataset``'s held-out prompts and OOD splits (those of
    the task, and each group of ``ood_dataset``).

    With ``rows_path``, every held-out prompt's response and scores are written there (JSON lines, in a
    fixed prompt order, so two runs' files compare prompt by prompt). ``long_prompts="shorten"`` fits
    prompts longer than ``max_prompt_length`` as training does (oldest turns dropped, else skipped).
    """
    test, gold, ood = evaluation_prompts(dataset, n_per_group, ood_dataset)
    if long_prompts == "shorten":
        test, _ = fit_to_length(tokenizer, test, max_prompt_length, sides=())
        ood = {split: (fit_to_length(tokenizer, rows, max_prompt_length, sides=())[0], split_gold)
               for split, (rows, split_gold) in ood.items()}
    kwargs = dict(settings=settings, reference=reference, scorer=scorer, judge=judge, batch_size=batch_size,
                  max_prompt_length=max_prompt_length, seed=seed, device=device)
    test_rows = score_prompts(policy, tokenizer, test, gold_reward=gold, **kwargs)
    if rows_path is not None:
        rows_path.write_text("".join(json.dumps({"prompt": str(r["prompt"]), **row}) + "\n"
                                     for r, row in zip(test, test_rows, strict=True)), encoding="utf-8")
    return build_report(test_rows, {split: score_prompts(policy, tokenizer, rows, gold_reward=split_gold, **kwargs)
                                    for split, (rows, split_gold) in ood.items()})


def detect_stage(run_config: dict[str, Any]) -> str:
    if "policy" in run_config:
        return "ppo"
    if "beta" in run_config:
        return "dpo"
    return "rm" if "num_pairs" in run_config else "sft"


def evaluate_run(run_dir: str | Path, config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``run_dir/final`` as its config describes (overridden by ``config``).

    Writes ``eval.json`` and ``eval_rows.jsonl`` (each held-out prompt's response, reward, gold, KL).
    """
    from gipo.models import load_causal_lm, load_reward_model, load_tokenizer
    from gipo.trainer import resolve_device

    run_dir = Path(run_dir)
    run_config = read_yaml(run_dir / "config.yaml")
    stage = detect_stage(run_config)
    if stage == "rm":
        raise ConfigError(f"{run_dir} is a reward-model run; `gipo rm` writes its eval.json (pairwise accuracy). "
                          "gipo eval evaluates policies.")
    policy_path = config.policy or str(run_dir / "final")
    start = {"ppo": run_config.get("reference") or run_config.get("policy"), "dpo": run_config.get("model")}
    reference_path = config.reference or start.get(stage) or policy_path
    # A run trained on reward functions (reward: gold or python) has no reward model to score with.
    trained_on_model = run_config.get("reward", "model") == "model"
    reward_path = config.reward_model or (run_config.get("reward_model") if trained_on_model else None)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(policy_path)
    policy = load_causal_lm(policy_path).to(device)
    reference = policy if reference_path == policy_path else load_causal_lm(reference_path).to(device)
    scorer = None
    if reward_path:
        scorer = RewardScorer(load_reward_model(reward_path).to(device), load_tokenizer(reward_path), tokenizer)
    judge = None
    if config.judge:
        judge = RewardScorer(load_reward_model(config.judge).to(device), load_tokenizer(config.judge), tokenizer)
    settings = SamplingSettings(max_new_tokens=config.max_new_tokens, temperature=config.temperature, backend="hf")
    dataset = config.dataset or run_config.get("eval_dataset") or run_config["dataset"]
    report = evaluate_policy(policy, tokenizer, dataset,
                             n_per_group=config.eval_prompts, settings=settings, reference=reference, scorer=scorer,
                             batch_size=config.batch_size, seed=config.seed, device=device,
                             max_prompt_length=run_config.get("max_prompt_length", 512),
                             long_prompts=run_config.get("long_prompts", "error"),
                             ood_dataset=config.ood_dataset or run_config.get("ood_dataset"), judge=judge,
                             rows_path=run_dir / "eval_rows.jsonl")
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    return report


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An ``eval.json`` report as the metrics a training run logs: ``eval/gold/GROUP``, ``eval/reward/GROUP``,
    ``eval/gold/ood_SPLIT`` and ``eval/worst_group_gold``."""
    metrics = {}
    for name, group in report["groups"].items():
        for key in ("gold", "reward"):
            if group[key] is not None:
                metrics[f"eval/{key}/{name}"] = group[key]
    for split, summary in report["ood"].items():
        for key in ("gold", "reward"):
            if summary[key] is not None:
                metrics[f"eval/{key}/ood_{split}"] = summary[key]
    if report["worst_group"]["gold"] is not None:
        metrics["eval/worst_group_gold"] = report["worst_group"]["gold"]
    return metrics
