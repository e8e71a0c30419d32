"""One collect step of the RL loop: sample responses to a batch of prompts, score them, shape the rewards with
the (group-adaptive) KL penalty and compute advantages; the result is an ``Experience`` the update reads.

``ExperienceCollector.collect(indices, step, kl_coef, sizes)`` does all of it and hands the scored batch to the run's
``GroupState`` once. The math lives in ``gipo.losses`` and ``gipo.estimators``; this module wires it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from gipo import distributed as dist
from gipo import estimators as E
from gipo.config import PPOConfig
from gipo.data import pad_left
from gipo.group_state import GroupBatch, GroupState
from gipo.losses import kl_per_token, masked_mean, rollout_correction_weights, shape_rewards
from gipo.reward_functions import ModelReward, RewardSource
from gipo.rollout import (
    Rollout,
    SamplingSettings,
    critic_values,
    decode_responses,
    generate,
    logprobs_and_values,
    prompt_states,
    response_logprobs,
    sampled_values,
)
from gipo.tasks import Task
from gipo.trainer import check_finite


class RunningMoments:
    """Running mean and standard deviation over every score seen (for reward normalization)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, values: torch.Tensor, reduce: dist.Reduce = dist.local_sum) -> None:
        n = float(reduce(values.new_tensor(float(values.numel()))))
        batch_mean = float(reduce(values.sum())) / n
        batch_var = float(reduce(((values - batch_mean) ** 2).sum())) / n
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


@dataclass
class Experience:
    """One iteration's rollouts and everything the update reads from them (fixed during the epochs)."""

    rollout: Rollout
    old_logprobs: torch.Tensor  # (B, T)
    old_values: torch.Tensor | None  # (B, T); None without a critic
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor | None  # (B, T) the critic's targets; None without a critic
    group_signal: torch.Tensor | None  # (B,) what the group head separates; None without groups
    label_probs: torch.Tensor | None  # (B, M) fixed assignment (labels, prompt groups); None: the critic's head
    ref_logprobs: torch.Tensor | None = None  # (B, T) when the KL is in the loss
    loss_kl_coef: torch.Tensor | None = None  # (B,) its per-sample coefficient
    keep: torch.Tensor | None = None  # (B,) 0 for samples the loss drops (filter_zero_std, mask_truncated)
    advantage_weights: torch.Tensor | None = None  # (B,) the advantage weighting rule's multipliers; None: all 1
    correction_weights: torch.Tensor | None = None  # (B, T) sampler-to-trainer importance weights; None: all 1

    def __len__(self) -> int:
        return self.rollout.response_ids.shape[0]


def present(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The named tensors that exist (for ``check_finite``: a critic-free run has no values or returns)."""
    return {name: value for name, value in tensors.items() if value is not None}


@dataclass
class Models:
    """The models a collect step runs; ``critic`` None without one, ``reference`` None with no KL to read."""

    policy: torch.nn.Module
    critic: torch.nn.Module | None
    reference: torch.nn.Module | None


class ExperienceCollector:
    """Collects experience from the prompts ``records`` (token ids ``encoded``); owns the run's group state and
    reward normalization. ``reuse_logprobs``: the old policy's log-probabilities (and a shared critic's values)
    come from sampling instead of a forward."""

    def __init__(self, config: PPOConfig, tokenizer: Any, records: list[dict[str, Any]], encoded: list[list[int]],
                 models: Models, reward: RewardSource, task: Task | None, settings: SamplingSettings,
                 reuse_logprobs: bool, autocast: Callable[[], Any], device: torch.device):
        self.config, self.tokenizer, self.records, self.encoded = config, tokenizer, records, encoded
        self.models, self.reward, self.task, self.settings = models, reward, task, settings
        self.reuse_logprobs, self.autocast, self.device = reuse_logprobs, autocast, device
        self.advantage_settings = E.AdvantageSettings.from_config(config)
        self.estimator = E.get_estimator(config.estimator)
        self.score_moments = RunningMoments()
        self.reduce = dist.global_sum
        self.groups = GroupState(config, records, models.policy.config.hidden_size, self.prompt_states,
                                 self.reference_mean_scores, device)

    def _query(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = pad_left([self.encoded[i] for i in indices], self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def collect(self, indices: list[int], step: int, kl_coef: float, sizes: torch.Tensor | None = None
                ) -> tuple[Experience, dict[str, float]]:
        """Sample, score, shape and estimate for ``indices``: each prompt's samples side by side, ``sizes`` (P,) of
        them per prompt (None: ``num_generations`` each)."""
        config, models = self.config, self.models
        sizes = E.prompt_sizes(len(indices), config.num_generations if sizes is None else sizes)
        clock = time.perf_counter()
        rollout = generate(models.policy, *self._query(indices), self.tokenizer.eos_token_id,
                           self.tokenizer.pad_token_id, self.settings, with_logprobs=self.reuse_logprobs,
                           with_states=self.reuse_logprobs and config.shared_critic)
        timings = {"time/generation": time.perf_counter() - clock}
        mask = rollout.response_mask
        with self.autocast():
            clock = time.perf_counter()
            logprobs, values, group_logits = self._old_policy(rollout)
            ref_logprobs = None
            if models.reference is not None:
                ref_logprobs, _ = response_logprobs(models.reference, rollout, config.temperature,
                                                    share_prompts=config.share_prompt_prefix)
            timings["time/logprobs"] = time.perf_counter() - clock
            clock = time.perf_counter()
            raw_scores = self.score(rollout, indices, step)
            timings["time/scoring"] = time.perf_counter() - clock
        check_finite(step, **present(**{"reward_model_scores" if isinstance(self.reward, ModelReward) else "rewards": raw_scores},
                                     log_probabilities=logprobs, reference_log_probabilities=ref_logprobs,
                                     values=values))
        scores = self._normalized(raw_scores, rollout)
        kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator) if ref_logprobs is not None \
            else torch.zeros_like(logprobs)
        reward_kl = kl if config.kl_in == "reward" else torch.zeros_like(kl)
        kl_sum = None
        if ref_logprobs is not None:
            k1 = kl if config.kl_estimator == "k1" else kl_per_token(logprobs, ref_logprobs, "k1")
            kl_sum = (k1 * mask).sum(-1)
        view = self.groups.observe(GroupBatch(indices, sizes, raw_scores, scores, reward_kl, mask, group_logits,
                                              kl_sum, self._gold(indices, rollout, raw_scores)), kl_coef)

        rewards = shape_rewards(scores, reward_kl, mask, view.kl_coef)
        advantages, returns = self.estimator.fn(rewards, mask, values,
                                                replace(self.advantage_settings, prompt_sizes=sizes), self.reduce)
        check_finite(step, **present(shaped_rewards=rewards, advantages=advantages, returns=returns,
                                     advantage_weights=view.advantage_weights))

        keep, sample_metrics = self._kept_samples(raw_scores, rollout, sizes)
        correction, correction_metrics = self._rollout_correction(logprobs, rollout, step)
        loss_kl = config.kl_in == "loss" and ref_logprobs is not None
        experience = Experience(rollout, logprobs, values, advantages, returns, view.signal, view.fixed_probs,
                                ref_logprobs=ref_logprobs if loss_kl else None, keep=keep,
                                advantage_weights=view.advantage_weights, correction_weights=correction,
                                loss_kl_coef=torch.as_tensor(view.kl_coef, device=self.device).expand(len(indices))
                                if loss_kl else None)
        metrics = {
            "objective/kl_coef": kl_coef,
            "objective/scores": dist.global_mean(raw_scores).item(),
            "objective/non_score_reward": dist.global_mean(rewards.sum(-1) - scores).item(),
            "objective/rlhf_reward": dist.global_mean(rewards.sum(-1)).item(),
            "val/num_eos_tokens": dist.global_sum(rollout.has_eos.float().sum()).item(),
            "response/length": dist.global_mean(rollout.lengths.float()).item(),
            **sample_metrics,
            **correction_metrics,
            **timings,
        }
        if kl_sum is not None:
            metrics["objective/kl"] = dist.global_mean(kl_sum).item()
        metrics.update(view.metrics)
        return experience, metrics

    def _old_policy(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The sampling policy's log-probabilities, and the critic's values and group logits where there is one."""
        config, models = self.config, self.models
        values = group_logits = None
        if config.shared_critic and self.reuse_logprobs:
            logprobs = rollout.sampled_logprobs
            values, group_logits = sampled_values(models.critic, rollout)
        elif config.shared_critic:
            logprobs, _, values, group_logits = logprobs_and_values(models.policy, models.critic, rollout,
                                                                    config.temperature)
        else:
            logprobs = (rollout.sampled_logprobs if self.reuse_logprobs
                        else response_logprobs(models.policy, rollout, config.temperature,
                                               share_prompts=config.share_prompt_prefix)[0])
            if models.critic is not None:
                values, group_logits = critic_values(models.critic, rollout)
        return logprobs, values, group_logits

    def score(self, rollout: Rollout, indices: list[int], step: int) -> torch.Tensor:
        """One reward per sample, from the run's reward source."""
        return self.reward(rollout, [self.records[i]["prompt"] for i in indices], [self.records[i] for i in indices],
                           step)

    def _normalized(self, raw_scores: torch.Tensor, rollout: Rollout) -> torch.Tensor:
        """The scores the reward is shaped from: the missing-EOS penalty, running whitening and clipping applied."""
        config = self.config
        scores = raw_scores.clone()
        if config.missing_eos_penalty is not None:
            scores[~rollout.has_eos] -= config.missing_eos_penalty
        if config.normalize_reward:
            self.score_moments.update(scores, self.reduce)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if config.reward_clip:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)
        return scores

    def _gold(self, indices: list[int], rollout: Rollout, raw_scores: torch.Tensor) -> torch.Tensor | None:
        """The task's gold reward of each sample, for the per-domain metrics (None where the task has none)."""
        if self.config.reward == "gold":  # the score is the gold reward: no second decode and scoring
            return raw_scores
        if self.task is None:
            return None
        texts = decode_responses(self.tokenizer, rollout)
        return raw_scores.new_tensor([self.task.gold_reward(self.records[i], text)
                                      for i, text in zip(indices, texts, strict=True)])

    def _rollout_correction(self, logprobs: torch.Tensor, rollout: Rollout, step: int
                            ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Importance weights from the sampler's log-probabilities to the trainer's (None where the old policy's
        are the sampler's own, or there are none), and how far apart the two engines were."""
        config = self.config
        if config.rollout_correction == "none" or rollout.sampled_logprobs is None or self.reuse_logprobs:
            return None, {}
        mask = rollout.response_mask
        weights = rollout_correction_weights(logprobs, rollout.sampled_logprobs, mask, config.rollout_correction,
                                             config.rollout_correction_max, config.rollout_correction_min)
        log_ratio = (logprobs - rollout.sampled_logprobs) * mask
        ratio = torch.exp(log_ratio.clamp(-20, 20))
        changed = ((weights - ratio).abs() > 1e-6).float()
        metrics = {"rollout_correction/ratio_mean": masked_mean(ratio, mask, reduce=self.reduce).item(),
                   "rollout_correction/ratio_max": dist.gather(torch.where(mask.bool(), ratio, 0).amax().view(1))
                   .max().item(),
                   "rollout_correction/kl": masked_mean(-log_ratio, mask, reduce=self.reduce).item(),
                   "rollout_correction/clipped_share": masked_mean(changed, mask, reduce=self.reduce).item()}
        check_finite(step, rollout_correction_weights=weights)
        return weights, metrics

    def _kept_samples(self, raw_scores: torch.Tensor, rollout: Rollout, sizes: torch.Tensor
                      ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Which samples the loss keeps (None: all), and how many prompts teach nothing (all samples alike)."""
        config = self.config
        metrics: dict[str, float] = {}
        keep = torch.ones_like(raw_scores)
        if config.num_generations > 1:
            zero_std = E.zero_std_prompts(raw_scores, sizes)
            metrics["objective/frac_reward_zero_std"] = dist.global_mean(zero_std.float()).item()
            prompt_std = E.per_prompt_std(raw_scores, sizes)
            metrics["objective/reward_std"] = dist.global_mean(prompt_std).item()
            if config.filter_zero_std:
                keep = keep * (~zero_std).float()
        if config.mask_truncated:
            keep = keep * rollout.has_eos.float()
        if not (config.filter_zero_std or config.mask_truncated):
            return None, metrics
        metrics["objective/frac_samples_kept"] = dist.global_mean(keep).item()
        return keep, metrics

    def prompt_states(self, indices: list[int]) -> torch.Tensor:
        """The policy's hidden states at the prompts' last tokens (what an inferred prompt head reads)."""
        with self.autocast():
            return prompt_states(self.models.policy, *self._query(indices))

    @torch.no_grad()
    def reference_mean_scores(self, indices: list[int]) -> torch.Tensor:
        """Mean score of ``gain_baseline_samples`` reference responses to each prompt (the gain's baseline)."""
        repeats = self.config.gain_baseline_samples
        ids, mask = self._query(indices)
        rollout = generate(self.models.reference, ids.repeat(repeats, 1), mask.repeat(repeats, 1),
                           self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.settings)
        return self.score(rollout, indices * repeats, 0).view(repeats, len(indices)).mean(0)
