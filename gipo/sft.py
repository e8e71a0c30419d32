"""Supervised fine-tuning on demonstrations (prompt -> completion), loss on the completion.

We run our own short loop rather than TRL's SFTTrainer so that every stage shares one checkpoint
format, resume path and NaN guard (``gipo.trainer``); the loss is the same token cross-entropy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gipo.config import SFTConfig
from gipo.data import DataError, EpochSampler, load_sft_examples, pad_right, render_prompt
from gipo.evaluation import evaluate_policy
from gipo.models import load_causal_lm, load_tokenizer, position_ids_from_mask
from gipo.rollout import SamplingSettings
from gipo.trainer import BaseTrainer, check_finite, make_optimizer

IGNORE_INDEX = -100


def encode_demonstrations(tokenizer, examples: list[dict[str, Any]], max_length: int,
                          completion_only: bool, source: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; prompt tokens get IGNORE_INDEX labels when ``completion_only``."""
    encoded = []
    for i, example in enumerate(examples, 1):
        prompt_ids = tokenizer(render_prompt(tokenizer, example["prompt"]), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            raise DataError(f"{source}, row {i}: prompt + completion is {len(ids)} tokens, longer than "
                            f"max_length={max_length}.")
        labels = ([IGNORE_INDEX] * len(prompt_ids) if completion_only else prompt_ids) + ids[len(prompt_ids):]
        encoded.append((ids, labels))
    return encoded


class SFTTrainer(BaseTrainer):
    """``SFTTrainer(config).train()``; pass ``model``, ``tokenizer`` or ``examples`` you already hold."""

    stage = "sft"
    progress_keys = ("train/loss",)

    def __init__(self, config: SFTConfig, model=None, tokenizer=None, examples: list[dict] | None = None,
                 output_dir: str | Path = "runs/sft", *, overwrite: bool = False, examples_per_group: int = 1500):
        super().__init__(config, output_dir, overwrite=overwrite)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self.model = (model or load_causal_lm(config.model, seed=config.seed)).to(self.device)
        examples = examples if examples is not None else load_sft_examples(config.dataset, examples_per_group,
                                                                           config.seed)
        self.examples = encode_demonstrations(self.tokenizer, examples, config.max_length,
                                              config.completion_only_loss, config.dataset)
        self.sampler = EpochSampler(len(self.examples), config.seed)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), config.learning_rate,
                                                        config.weight_decay, config.warmup_steps)

    def training_step(self) -> dict[str, float]:
        config = self.config
        self.model.train()
        indices = self.sampler.next_batch(config.batch_size)
        chunks = self.micro_batches(indices)
        total_loss = 0.0
        for chunk in chunks:
            ids, mask = pad_right([self.examples[i][0] for i in chunk], self.tokenizer.pad_token_id)
            labels, _ = pad_right([self.examples[i][1] for i in chunk], IGNORE_INDEX)
            ids, mask, labels = ids.to(self.device), mask.to(self.device), labels.to(self.device)
            with self.autocast():
                loss = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                  labels=labels).loss
            check_finite(self.step, loss=loss)
            (loss / len(chunks)).backward()
            total_loss += loss.item() / len(chunks)
        grad_norm = self.optimizer_step(self.model, self.optimizer, self.scheduler)
        return {"train/loss": total_loss, "train/grad_norm": grad_norm,
                "train/learning_rate": self.scheduler.get_last_lr()[0]}

    def evaluate(self, reward_scorer=None, n_per_group: int | None = None,
                 settings: SamplingSettings | None = None) -> dict[str, Any]:
        """Per-group gold (and reward, given a scorer) of the current model on held-out prompts."""
        return evaluate_policy(self.model, self.tokenizer, self.config.dataset,
                               n_per_group=n_per_group or self.config.eval_prompts,
                               settings=settings or SamplingSettings(backend="hf"), scorer=reward_scorer,
                               reference=self.model, device=self.device)
