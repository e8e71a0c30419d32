"""Direct Preference Optimization on the same preference pairs as the reward model: a baseline for PPO.

With ``group_objective: dro`` it is GR-DPO (Ramesh et al., 2024): the pairs' groups weighed by alpha, which
exponentiated-gradient steps raise toward the groups with the larger DPO loss (docs/method.md).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gipo import groups as G
from gipo.config import ConfigError, DPOConfig
from gipo.data import DataError, EpochSampler, pad_right, render_prompt
from gipo.evaluation import evaluate_policy
from gipo.losses import dpo_pair_losses, logprobs_from_logits
from gipo.models import load_causal_lm, load_tokenizer, position_ids_from_mask
from gipo.reward import pairs_for
from gipo.rollout import SamplingSettings
from gipo.trainer import BaseTrainer, check_finite, make_optimizer

EncodedPair = tuple[int, list[int], list[int]]  # prompt length, chosen ids, rejected ids
UNLABELLED_GROUP = "all"  # the group gipo.data gives a row that names none


def pair_group_ids(pairs: list[dict[str, Any]], source: str) -> tuple[list[str], list[int]]:
    """The group names (sorted) and each pair's index into them, for GR-DPO.

    Pairs with no group labels at all, or with a single group, are a ConfigError; among labelled pairs,
    one without a group (no ``group``, or the ``all`` the loader gives a row without one) is a DataError
    naming its row.
    """
    labels = [str(p["group"]) if p.get("group") not in (None, "") else UNLABELLED_GROUP for p in pairs]
    names = sorted(set(labels) - {UNLABELLED_GROUP})
    if not names:
        raise ConfigError(f"DPOConfig: group_objective=dro (GR-DPO) needs group labels, and the pairs of {source} "
                          "have none. Give each pair a `group` (gipo rm's pairs.jsonl and the built-in tasks have one) "
                          "or name each source's group in the dataset spec (FILE@GROUP,...).")
    for row, label in enumerate(labels, 1):
        if label == UNLABELLED_GROUP:
            raise DataError(f"{source}, row {row}: the pair has no group, while others do ({', '.join(names)}); "
                            "GR-DPO (group_objective=dro) needs each pair's `group`.")
    if len(names) < 2:
        raise ConfigError(f"DPOConfig: group_objective=dro (GR-DPO) weighs groups against each other, and every pair "
                          f"of {source} is in the group {names[0]!r}; use group_objective=none (plain DPO).")
    index = {name: i for i, name in enumerate(names)}
    return names, [index[label] for label in labels]


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
            pairs = pairs_for(config, self.tokenizer, self.device, self.output_dir)
        self.encoded = encode_dpo_pairs(self.tokenizer, pairs, config.max_length, config.dataset)
        self.sampler = EpochSampler(len(self.encoded), config.seed)
        # GR-DPO: alpha_g (``group_weights``, uniform at the start, kept in checkpoints) and N_g / N, the groups'
        # shares of the training pairs, which undo their sampling frequency (gipo.groups).
        self.group_names: list[str] = []
        self.group_weights: torch.Tensor | None = None
        if config.group_objective == "dro":
            self.group_names, ids = pair_group_ids(pairs, config.dataset)
            self.pair_groups = torch.tensor(ids)
            self.group_shares = torch.bincount(self.pair_groups, minlength=len(self.group_names)) / len(ids)
            self.group_weights = torch.full((len(self.group_names),), 1.0 / len(self.group_names))
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
        batch_losses = []  # each pair's DPO loss, detached, in the order of the chunks
        for chunk in chunks:
            batch = [self.encoded[i] for i in chunk]
            with torch.no_grad():
                ref_chosen, ref_rejected = self._logps(self.reference, batch)
            with self.autocast():
                chosen, rejected = self._logps(self.model, batch)
            pair_losses, margin = dpo_pair_losses(chosen, rejected, ref_chosen, ref_rejected, self.config.beta)
            loss = self._loss_part(pair_losses, chunk, len(indices))
            check_finite(self.step, dpo_loss=loss)
            loss.backward()
            total_loss += loss.item()
            batch_losses.append(pair_losses.detach().cpu())
            correct += (margin > 0).float().sum().item()
            margins += margin.sum().item()
        grad_norm = self.optimizer_step(self.model, self.optimizer, self.scheduler)
        metrics = {"train/loss": total_loss, "train/accuracy": correct / len(indices),
                   "train/margin": margins / len(indices), "train/grad_norm": grad_norm}
        if self.group_weights is not None:  # after a step that was taken: a skipped batch leaves alpha as it was
            metrics.update(self._step_group_weights(torch.cat(batch_losses), [i for chunk in chunks for i in chunk]))
        if self.config.eval_every and self.step % self.config.eval_every == 0:
            report = self.evaluate()
            metrics.update({f"eval/gold/{name}": g["gold"] for name, g in report["groups"].items()
                            if g["gold"] is not None})
        return metrics

    def _loss_part(self, pair_losses: torch.Tensor, chunk: list[int], batch_size: int) -> torch.Tensor:
        """A micro-batch's part of the batch's loss (the parts add up to it): the mean DPO loss, or GR-DPO's
        sum_g alpha_g L_g."""
        if self.group_weights is None:
            return pair_losses.sum() / batch_size
        group_losses = G.importance_weighted_group_losses(pair_losses, self._group_probs(chunk).to(pair_losses),
                                                          self.group_shares.to(pair_losses), batch_size)
        # The alpha of the step before: alpha moves after the optimizer step (as PPO's dro_weights do), so a batch
        # split into micro-batches needs no second forward pass to know its L_g before the first backward.
        return G.group_robust_loss(group_losses, self.group_weights.to(pair_losses))

    def _group_probs(self, indices: list[int]) -> torch.Tensor:
        """The one-hot group assignment of these pairs: (len(indices), M)."""
        return F.one_hot(self.pair_groups[indices], len(self.group_names)).float()

    def _step_group_weights(self, pair_losses: torch.Tensor, indices: list[int]) -> dict[str, float]:
        """GR-DPO's exponentiated-gradient step of alpha on the batch's L_g; returns the per-group metrics."""
        probs = self._group_probs(indices)
        group_losses = G.importance_weighted_group_losses(pair_losses, probs, self.group_shares, len(indices))
        self.group_weights = G.update_dro_weights(self.group_weights, group_losses, self.config.group_step_size)
        counts, sums = probs.sum(0), probs.transpose(0, 1) @ pair_losses
        metrics = {"train/dpo_loss": pair_losses.mean().item()}
        for g, name in enumerate(self.group_names):
            metrics[f"groups/alpha/{name}"] = self.group_weights[g].item()
            if counts[g] > 0:  # a group absent from the batch has no loss this step
                metrics[f"groups/dpo_loss/{name}"] = (sums[g] / counts[g]).item()
        return metrics

    def trainer_state(self) -> dict[str, Any]:
        state = super().trainer_state()
        if self.group_weights is not None:
            state["group_weights"] = self.group_weights
        return state

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        if self.group_weights is not None:
            self.group_weights = state["group_weights"]

    def evaluate(self, n_per_group: int | None = None) -> dict[str, Any]:
        return evaluate_policy(self.model, self.tokenizer, self.config.eval_dataset or self.config.dataset,
                               n_per_group=n_per_group or self.config.eval_prompts, settings=SamplingSettings(backend="hf"),
                               reference=self.reference, device=self.device)
