"""Direct Preference Optimization on the same preference pairs as the reward model: a baseline for PPO."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from gipo.config import DPOConfig
from gipo.data import DataError, EpochSampler, pad_right, render_prompt
from gipo.evaluation import evaluate_policy
from gipo.losses import dpo_loss, logprobs_from_logits
from gipo.models import load_causal_lm, load_tokenizer, position_ids_from_mask
from gipo.reward import load_or_sample_pairs
from gipo.rollout import SamplingSettings
from gipo.trainer import BaseTrainer, check_finite, make_optimizer

EncodedPair = tuple[int, list[int], list[int]]  # prompt length, chosen ids, rejected ids


def encode_dpo_pairs(tokenizer, pairs: list[dict[str, Any]], max_length: int, source: str) -> list[EncodedPair]:
    encoded = []
    for i, pair in enumerate(pairs, 1):
        prompt_ids = tokenizer(render_prompt(tokenizer, pair["prompt"]), add_special_tokens=False)["input_ids"]
        sides = []
        for side in ("chosen", "rejected"):
            ids = prompt_ids + tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) > max_length:
                raise DataError(f"{source}, row {i}: prompt + {side} is {len(ids)} tokens, longer than "
                                f"max_length={max_length}.")
            sides.append(ids)
        encoded.append((len(prompt_ids), sides[0], sides[1]))
    return encoded


def sequence_logprobs(model, sequences: list[list[int]], prompt_lengths: list[int], pad_id: int,
                      device: torch.device) -> torch.Tensor:
    """Sum of log-probabilities of each sequence's response tokens (after its prompt): (B,)."""
    ids, mask = pad_right(sequences, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, :-1]
    token_logps = logprobs_from_logits(logits.float(), ids[:, 1:])
    positions = torch.arange(ids.shape[1] - 1, device=device)
    starts = torch.tensor(prompt_lengths, device=device).unsqueeze(1) - 1
    response = (positions >= starts) & mask[:, 1:].bool()
    return (token_logps * response).sum(-1)


class DPOTrainer(BaseTrainer):
    """``DPOTrainer(config).train()``; pass ``model``, ``tokenizer`` or ``pairs`` you already hold."""

    stage = "dpo"
    progress_keys = ("train/loss", "train/accuracy")

    def __init__(self, config: DPOConfig, model=None, tokenizer=None, pairs: list[dict] | None = None,
                 output_dir: str | Path = "runs/dpo", *, overwrite: bool = False):
        super().__init__(config, output_dir, overwrite=overwrite)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.model = (model or load_causal_lm(config.model)).to(self.device)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if pairs is None:
            pairs = load_or_sample_pairs(config.dataset, self.tokenizer, config.model, config.num_pairs,
                                         config.label_noise_temperature, config.seed, self.device, self.output_dir,
                                         config.pair_split)
        self.encoded = encode_dpo_pairs(self.tokenizer, pairs, config.max_length, config.dataset)
        self.sampler = EpochSampler(len(self.encoded), config.seed)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), config.learning_rate,
                                                        config.weight_decay, config.warmup_steps)

    def _logps(self, model, batch: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = [p for p, _, _ in batch]
        logps = sequence_logprobs(model, [c for _, c, _ in batch] + [r for _, _, r in batch], lengths + lengths,
                                  self.tokenizer.pad_token_id, self.device)
        return logps[: len(batch)], logps[len(batch):]

    def training_step(self) -> dict[str, float]:
        self.model.train()
        indices = self.sampler.next_batch(self.config.batch_size)
        chunks = self.micro_batches(indices)
        total_loss, correct, margins = 0.0, 0.0, 0.0
        for chunk in chunks:
            batch = [self.encoded[i] for i in chunk]
            with torch.no_grad():
                ref_chosen, ref_rejected = self._logps(self.reference, batch)
            with self.autocast():
                chosen, rejected = self._logps(self.model, batch)
            loss, margin = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.beta)
            check_finite(self.step, dpo_loss=loss)
            (loss / len(chunks)).backward()
            total_loss += loss.item() / len(chunks)
            correct += (margin > 0).float().sum().item()
            margins += margin.sum().item()
        grad_norm = self.optimizer_step(self.model, self.optimizer, self.scheduler)
        metrics = {"train/loss": total_loss, "train/accuracy": correct / len(indices),
                   "train/margin": margins / len(indices), "train/grad_norm": grad_norm}
        if self.config.eval_every and self.step % self.config.eval_every == 0:
            report = self.evaluate()
            metrics.update({f"eval/gold/{name}": g["gold"] for name, g in report["groups"].items()
                            if g["gold"] is not None})
        return metrics

    def evaluate(self, n_per_group: int | None = None) -> dict[str, Any]:
        return evaluate_policy(self.model, self.tokenizer, self.config.eval_dataset or self.config.dataset,
                               n_per_group=n_per_group or self.config.eval_prompts, settings=SamplingSettings(),
                               reference=self.reference, device=self.device)
