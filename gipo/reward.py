"""Bradley-Terry reward model on chosen/rejected pairs, and synthetic pairs for tasks with a gold reward.

For a task, pairs are two responses sampled from the policy for the same prompt, labelled by a
simulated annotator: P(a preferred) = sigmoid((gold_a - gold_b) / T). Pairs whose gold rewards tie
carry no signal and are dropped. The reward model starts from the policy's weights (InstructGPT).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gipo.config import DPOConfig, RewardConfig
from gipo.data import (
    DataError,
    EpochSampler,
    encode_prompts,
    fit_to_length,
    load_preference_pairs,
    pad_left,
    pad_right,
    render_prompt,
)
from gipo.losses import pairwise_reward_loss
from gipo.models import load_causal_lm, load_reward_model, load_tokenizer
from gipo.rollout import SamplingSettings, decode_responses, generate, score_sequences
from gipo.tasks import Task, get_task
from gipo.trainer import BaseTrainer, check_finite, make_optimizer


@torch.no_grad()
def sample_preference_pairs(policy, tokenizer, task: Task, num_pairs: int, noise_temperature: float,
                            seed: int, settings: SamplingSettings, batch_size: int = 256,
                            device: torch.device | str = "cpu", progress: bool = False) -> list[dict[str, Any]]:
    """Up to ``num_pairs`` labelled pairs from two policy samples per training prompt (ties dropped)."""
    rng = random.Random(f"pairs/{seed}")
    prompts = task.prompts("train", math.ceil(num_pairs / len(task.groups) * 2), seed=seed + 1)
    rng.shuffle(prompts)
    torch.manual_seed(seed)
    pairs: list[dict[str, Any]] = []
    with tqdm(total=num_pairs, desc="gipo pairs", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            ids, mask = pad_left(encode_prompts(tokenizer, [r["prompt"] for r in batch], 512, task.name),
                                 tokenizer.pad_token_id)
            ids, mask = ids.repeat(2, 1).to(device), mask.repeat(2, 1).to(device)
            texts = decode_responses(tokenizer, generate(policy, ids, mask, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id, settings))
            for i, record in enumerate(batch):
                a, b = texts[i], texts[i + len(batch)]
                gold_a, gold_b = task.gold_reward(record, a), task.gold_reward(record, b)
                if abs(gold_a - gold_b) < 1e-9:
                    continue
                a_wins = rng.random() < 1.0 / (1.0 + math.exp(-(gold_a - gold_b) / noise_temperature))
                (chosen, gold_chosen), (rejected, gold_rejected) = ((a, gold_a), (b, gold_b))[:: 1 if a_wins else -1]
                pairs.append({"prompt": record["prompt"], "group": record["group"], "chosen": chosen,
                              "rejected": rejected, "gold_chosen": gold_chosen, "gold_rejected": gold_rejected})
                bar.update()
                if len(pairs) >= num_pairs:
                    return pairs
        return pairs


def pairs_for(config: RewardConfig | DPOConfig, tokenizer, device: torch.device, out_dir: Path) -> list[dict[str, Any]]:
    """The preference pairs a reward-model or DPO config names (its dataset, model, pair split and sampling)."""
    return load_or_sample_pairs(config.dataset, tokenizer, config.model, config.num_pairs,
                                config.label_noise_temperature, config.seed, device, out_dir, config.pair_split,
                                progress=config.progress)


def load_or_sample_pairs(dataset: str, tokenizer, policy_path: str, num_pairs: int, noise_temperature: float,
                         seed: int, device: torch.device, out_dir: Path, split: str = "train",
                         progress: bool = False) -> list[dict[str, Any]]:
    """Pairs of ``split`` of a file or dataset id; for a task, sampled from ``policy_path`` and saved to
    ``out_dir/pairs.jsonl``."""
    task = get_task(dataset)
    if task is None:
        return load_preference_pairs(dataset, split)
    policy = load_causal_lm(policy_path).to(device)
    pairs = sample_preference_pairs(policy, tokenizer, task, num_pairs, noise_temperature, seed, SamplingSettings(backend="hf"),
                                    device=device, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "pairs.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(p) + "\n" for p in pairs)
    return pairs


def encode_pairs(tokenizer, pairs: list[dict[str, Any]], max_length: int, source: str) -> list[tuple[list[int], list[int]]]:
    encoded = []
    for i, pair in enumerate(pairs, 1):
        prompt = render_prompt(tokenizer, pair["prompt"])
        both = []
        for side in ("chosen", "rejected"):
            ids = tokenizer(prompt + pair[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) > max_length:
                raise DataError(f"{source}, row {i}: prompt + {side} is {len(ids)} tokens, longer than "
                                f"max_length={max_length}.")
            both.append(ids)
        encoded.append((both[0], both[1]))
    return encoded


def split_pairs(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(pairs)))
    random.Random(f"split/{seed}").shuffle(order)
    n_eval = int(len(pairs) * eval_fraction)
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


class RewardTrainer(BaseTrainer):
    """``RewardTrainer(config).train()``; pass ``model``, ``tokenizer`` or ``pairs`` you already hold."""

    stage = "rm"
    progress_keys = ("train/loss", "train/accuracy")

    def __init__(self, config: RewardConfig, model=None, tokenizer=None, pairs: list[dict] | None = None,
                 output_dir: str | Path = "runs/rm", *, overwrite: bool = False):
        super().__init__(config, output_dir, overwrite=overwrite)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        if pairs is None:
            pairs = pairs_for(config, self.tokenizer, self.device, self.output_dir)
        if config.long_examples == "shorten":
            pairs, self.shortened = fit_to_length(self.tokenizer, pairs, config.max_length)
        self.train_pairs, self.eval_pairs = split_pairs(pairs, config.eval_fraction, config.seed)
        if not self.train_pairs:
            raise DataError(f"{config.dataset}: no preference pairs left to train on.")
        self.model = (model or load_reward_model(config.model)).to(self.device)
        self.encoded = encode_pairs(self.tokenizer, self.train_pairs, config.max_length, config.dataset)
        self.sampler = EpochSampler(len(self.encoded), config.seed)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), config.learning_rate,
                                                        config.weight_decay, config.warmup_steps)

    def _scores(self, encoded: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_right([c for c, _ in encoded] + [r for _, r in encoded], self.tokenizer.pad_token_id)
        with self.autocast():
            scores = score_sequences(self.model, ids.to(self.device), mask.to(self.device))
        return scores[: len(encoded)], scores[len(encoded):]

    def training_step(self) -> dict[str, float]:
        config = self.config
        self.model.train()
        indices = self.sampler.next_batch(config.batch_size)
        chunks = self.micro_batches(indices)
        total_loss, correct = 0.0, 0.0
        for chunk in chunks:
            chosen, rejected = self._scores([self.encoded[i] for i in chunk])
            loss = pairwise_reward_loss(chosen, rejected, config.center_rewards_coefficient)
            check_finite(self.step, reward_loss=loss)
            (loss / len(chunks)).backward()
            total_loss += loss.item() / len(chunks)
            correct += (chosen > rejected).float().sum().item()
        grad_norm = self.optimizer_step(self.model, self.optimizer, self.scheduler)
        return {"train/loss": total_loss, "train/accuracy": correct / len(indices), "train/grad_norm": grad_norm,
                "train/learning_rate": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def evaluate(self, pairs: list[dict[str, Any]] | None = None, batch_size: int = 256) -> dict[str, Any]:
        """Held-out pairwise accuracy, per group and overall: ``{"groups": {NAME: {"n", "accuracy"}}, "accuracy"}``."""
        pairs = self.eval_pairs if pairs is None else pairs
        self.model.eval()
        encoded = encode_pairs(self.tokenizer, pairs, self.config.max_length, "evaluation pairs")
        hits: dict[str, list[float]] = defaultdict(list)
        for start in range(0, len(encoded), batch_size):
            chosen, rejected = self._scores(encoded[start:start + batch_size])
            for pair, hit in zip(pairs[start:start + batch_size], (chosen > rejected).tolist(), strict=True):
                hits[pair["group"]].append(float(hit))
        groups = {name: {"n": len(v), "accuracy": sum(v) / len(v)} for name, v in sorted(hits.items())}
        total = [h for v in hits.values() for h in v]
        return {"groups": groups, "accuracy": sum(total) / len(total) if total else None}

    def on_train_end(self) -> None:
        report = self.evaluate() if self.eval_pairs else {}
        if self.config.extra_eval:
            report["extra"] = self.evaluate_extra()
        if report:
            (self.output_dir / "eval.json").write_text(json.dumps(report, indent=2))

    def evaluate_extra(self) -> dict[str, Any]:
        """Accuracy on the ``extra_eval`` pairs (all of them), per group."""
        pairs = load_preference_pairs(self.config.extra_eval)
        if self.config.long_examples == "shorten":
            pairs, _ = fit_to_length(self.tokenizer, pairs, self.config.max_length)
        return {"dataset": self.config.extra_eval, **self.evaluate(pairs)}

    def load_weights(self, folder: Path) -> None:
        self.model.load_state_dict(load_reward_model(str(folder)).state_dict())
