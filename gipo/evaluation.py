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
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gipo.config import ConfigError, EvalConfig, read_yaml
from gipo.data import encode_prompts, fit_to_length, load_prompts, pad_left
from gipo.rollout import (
    RewardScorer,
    SamplingSettings,
    decode_responses,
    engine_options,
    generate,
    response_logprobs,
)
from gipo.tasks import EXACT, PromptRecord, get_task, in_test_split


@torch.no_grad()
def score_prompts(policy, tokenizer, records: list[PromptRecord], *, settings: SamplingSettings,
                  reference=None, scorer: RewardScorer | None = None, judge: RewardScorer | None = None,
                  gold_reward: Callable[[PromptRecord, str], float] | None = None,
                  batch_size: int = 128, max_prompt_length: int = 512, seed: int = 0,
                  device: torch.device | str = "cpu", samples: int = 1, greedy: bool = False) -> list[dict[str, Any]]:
    """Sample ``samples`` responses per prompt (and, with ``greedy``, one more by argmax) and measure each: one dict
    per response, ``prompt_index`` naming its prompt and ``sample`` its draw (0.., or ``"greedy"``)."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    rows = []
    try:
        encoded = encode_prompts(tokenizer, [r["prompt"] for r in records], max_prompt_length, "evaluation prompts")
        sampled = [(i, j) for i in range(len(records)) for j in range(samples)]
        by_argmax = [(i, "greedy") for i in range(len(records))] if greedy else []
        batches = [(draws[start:start + batch_size], draws is by_argmax)
                   for draws in (sampled, by_argmax) for start in range(0, len(draws), batch_size)]
        for batch, argmax in batches:
            ids, mask = pad_left([encoded[i] for i, _ in batch], tokenizer.pad_token_id)
            rollout = generate(policy, ids.to(device), mask.to(device), tokenizer.eos_token_id,
                               tokenizer.pad_token_id, settings, greedy=argmax)
            texts = decode_responses(tokenizer, rollout)
            kl = torch.zeros(len(batch))
            if reference is not None and reference is not policy:
                logprobs, _ = response_logprobs(policy, rollout, settings.temperature)
                ref_logprobs, _ = response_logprobs(reference, rollout, settings.temperature)
                kl = ((logprobs - ref_logprobs) * rollout.response_mask).sum(-1).cpu()
            batch_records = [records[i] for i, _ in batch]
            prompts = [r["prompt"] for r in batch_records]
            scores = scorer(rollout, prompts).cpu() if scorer is not None else None
            judged = judge(rollout, prompts).cpu() if judge is not None else None
            lengths = rollout.lengths.cpu()
            for k, ((index, sample), record) in enumerate(zip(batch, batch_records, strict=True)):
                rows.append({
                    "group": record["group"], "prompt_index": index, "sample": sample, "response": texts[k],
                    "reward": None if scores is None else float(scores[k]),
                    "judge": None if judged is None else float(judged[k]),
                    "gold": None if gold_reward is None else float(gold_reward(record, texts[k])),
                    "kl": float(kl[k]) if reference is not None else None, "length": float(lengths[k]),
                })
    finally:
        torch.set_rng_state(generator_state)
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of one prompt with ``correct`` exact answers among ``n`` samples (Chen et al. 2021):
    the chance that ``k`` of the ``n``, drawn without replacement, hold at least one exact answer."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def pass_ks(samples: int) -> list[int]:
    """The k reported for ``samples`` draws per prompt: 1, 2, 4, ... and ``samples`` itself."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks if ks[-1] == samples else [*ks, samples]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the sampled responses; with a gold reward also pass@k over each prompt's samples and, where
    greedy responses were drawn, ``greedy_pass@1`` (an exact answer is gold >= EXACT)."""
    sampled = [r for r in rows if r.get("sample") != "greedy"]
    summary = {"n": len(sampled), **{key: _mean([r.get(key) for r in sampled])
                                     for key in ("reward", "gold", "judge", "kl", "length")}}
    if not sampled or sampled[0].get("gold") is None:
        return summary
    exact_by_prompt: dict[Any, list[bool]] = defaultdict(list)
    for position, row in enumerate(sampled):
        exact_by_prompt[row.get("prompt_index", position)].append(row["gold"] >= EXACT)
    samples = min(len(v) for v in exact_by_prompt.values())
    for k in pass_ks(samples):
        summary[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in exact_by_prompt.values()) / len(
            exact_by_prompt)
    greedy = [r["gold"] >= EXACT for r in rows if r.get("sample") == "greedy"]
    if greedy:
        summary["greedy_pass@1"] = sum(greedy) / len(greedy)
    return summary


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


def build_report(test_rows: list[dict[str, Any]], ood_rows: dict[str, list[dict[str, Any]]],
                 train_rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    groups = summarize_by_group(test_rows)
    report = {"groups": groups, "worst_group": worst_group(groups),
              "ood": {split: summarize(rows) for split, rows in ood_rows.items()}}
    if train_rows:
        report["train"] = summarize_by_group(train_rows)
    return report


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
                    ood_dataset: str | None = None, judge: RewardScorer | None = None, samples: int = 1,
                    greedy: bool = False, train_prompts: int = 0) -> dict[str, Any]:
    """The ``eval.json`` report for ``policy`` on ``dataset``'s held-out prompts and OOD splits (those of
    the task, and each group of ``ood_dataset``), ``samples`` responses per prompt (pass@k up to it), a greedy
    one with ``greedy``, and with ``train_prompts`` that many of a task's train prompts per group (``train``).

    With ``rows_path``, every held-out response and its scores are written there (JSON lines, in a fixed order,
    so two runs' files compare response by response). ``long_prompts="shorten"`` fits prompts longer than
    ``max_prompt_length`` as training does (oldest turns dropped, else skipped).
    """
    test, gold, ood = evaluation_prompts(dataset, n_per_group, ood_dataset)
    task = get_task(dataset)
    train = task.prompts("train", train_prompts, seed=0, shares=False) if task is not None and train_prompts else []
    if long_prompts == "shorten":
        test, _ = fit_to_length(tokenizer, test, max_prompt_length, sides=())
        ood = {split: (fit_to_length(tokenizer, rows, max_prompt_length, sides=())[0], split_gold)
               for split, (rows, split_gold) in ood.items()}
    kwargs = dict(settings=settings, reference=reference, scorer=scorer, judge=judge, batch_size=batch_size,
                  max_prompt_length=max_prompt_length, seed=seed, device=device, samples=samples, greedy=greedy)
    test_rows = score_prompts(policy, tokenizer, test, gold_reward=gold, **kwargs)
    if rows_path is not None:
        rows_path.write_text("".join(json.dumps({"prompt": str(test[row["prompt_index"]]["prompt"]), **row}) + "\n"
                                     for row in test_rows), encoding="utf-8")
    train_rows = score_prompts(policy, tokenizer, train, gold_reward=gold, **kwargs) if train else None
    return build_report(test_rows, {split: score_prompts(policy, tokenizer, rows, gold_reward=split_gold, **kwargs)
                                    for split, (rows, split_gold) in ood.items()}, train_rows)


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
    def sampling(key: str, default: Any) -> Any:
        given = getattr(config, key)
        return given if given is not None else run_config.get(key, default)

    # A PPO run is evaluated with its own sampling loop; other runs (SFT, DPO) with transformers' generate.
    settings = SamplingSettings(max_new_tokens=sampling("max_new_tokens", 16), temperature=sampling("temperature", 1.0),
                                top_k=sampling("top_k", 0), top_p=sampling("top_p", 1.0),
                                backend=run_config.get("generation_backend", "hf"),
                                share_prompts=run_config.get("share_prompt_prefix", False),
                                draws=run_config.get("sampling_draws", "multinomial"),
                                engine=engine_options(run_config))
    dataset = config.dataset or run_config.get("eval_dataset") or run_config["dataset"]
    report = evaluate_policy(policy, tokenizer, dataset,
                             n_per_group=config.eval_prompts, settings=settings, reference=reference, scorer=scorer,
                             batch_size=config.batch_size, seed=config.seed, device=device,
                             max_prompt_length=run_config.get("max_prompt_length", 512),
                             long_prompts=run_config.get("long_prompts", "error"),
                             ood_dataset=config.ood_dataset or run_config.get("ood_dataset"), judge=judge,
                             rows_path=run_dir / "eval_rows.jsonl", samples=sampling("eval_samples", 1),
                             greedy=sampling("eval_greedy", False), train_prompts=sampling("eval_train_prompts", 0))
    (run_dir / "eval.json").write_text(json.dumps(report, indent=2))
    return report


REPORTED = ("gold", "reward", "length", "greedy_pass@1")


def _summary_metrics(summary: dict[str, Any], prefix: str, name: str) -> dict[str, float]:
    keys = [*REPORTED, *(k for k in summary if k.startswith("pass@"))]
    return {f"{prefix}/{key}/{name}": summary[key] for key in keys if summary.get(key) is not None}


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An ``eval.json`` report as the metrics a training run logs: ``eval/KEY/GROUP`` and ``eval/KEY/ood_SPLIT``
    for KEY in gold, reward, length, pass@k, greedy_pass@1 (those measured), ``eval/train/KEY/GROUP`` for train
    prompts, and ``eval/worst_group_gold``."""
    metrics = {}
    for name, group in report["groups"].items():
        metrics.update(_summary_metrics(group, "eval", name))
    for split, summary in report["ood"].items():
        metrics.update(_summary_metrics(summary, "eval", f"ood_{split}"))
    for name, group in report.get("train", {}).items():
        metrics.update(_summary_metrics(group, "eval/train", name))
    if report["worst_group"]["gold"] is not None:
        metrics["eval/worst_group_gold"] = report["worst_group"]["gold"]
    return metrics
