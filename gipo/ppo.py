"""PPO for language models, with Group Invariant Learning as switchable parts, and the critic-free
estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) in the same loop.

One iteration, as a recipe (``training_step``):
1. sample prompts (each ``num_generations`` times) and generate responses with the policy;
2. score them: policy and reference log-probabilities, critic values and group assignments (with a
   critic), rewards (a reward model, the task's gold reward or Python functions);
3. shape per-token rewards with the (group-adaptive) KL penalty; advantages: GAE and returns with a critic,
   else the estimator's (``gipo.estimators``) -- the one branch point between PPO and the critic-free methods;
4. several epochs over minibatches: a critic step (value loss - beta_critic * R_var; gae only) and a policy
   step (clipped loss aggregated over tokens, or its group-invariant form, plus the KL when it is in the loss);
5. update the KL controller and the group statistics; log.
The math lives in ``gipo.losses``, ``gipo.estimators`` and ``gipo.groups``; this file only wires it.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gipo import distributed as dist
from gipo import estimators as E
from gipo import groups as G
from gipo.config import ConfigError, PPOConfig
from gipo.data import EpochSampler, encode_prompts, fit_to_length, load_prompts, pad_left
from gipo.evaluation import evaluate_policy
from gipo.kl_control import make_kl_controller
from gipo.lora import AdapterDisabledReference, apply_lora, load_adapter_weights, save_merged
from gipo.losses import (
    aggregated_sample_losses,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    sample_mean,
    shape_rewards,
)
from gipo.models import Critic, ValueHeads, load_causal_lm, load_reward_model, load_tokenizer
from gipo.prompt_groups import PromptGroups, per_prompt_means
from gipo.reward_functions import RewardFunction, RewardFunctions
from gipo.rollout import (
    RewardScorer,
    Rollout,
    SamplingSettings,
    critic_values,
    decode_responses,
    fast_sampling_supported,
    generate,
    has_active_dropout,
    logprobs_and_values,
    prompt_states,
    response_logprobs,
    sampled_values,
)
from gipo.tasks import EXACT, get_task
from gipo.trainer import BaseTrainer, check_finite, make_optimizer


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
    group_signal: torch.Tensor  # (B,) what the group head separates
    label_probs: torch.Tensor | None  # (B, M) one-hot of the data's groups (oracle), else None
    ref_logprobs: torch.Tensor | None = None  # (B, T) when the KL is in the loss
    loss_kl_coef: torch.Tensor | None = None  # (B,) its per-sample coefficient
    keep: torch.Tensor | None = None  # (B,) 0 for samples the loss drops (filter_zero_std, mask_truncated)

    def __len__(self) -> int:
        return self.rollout.response_ids.shape[0]


def _present(**tensors: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The named tensors that exist (for ``check_finite``: a critic-free run has no values or returns)."""
    return {name: value for name, value in tensors.items() if value is not None}


class PPOTrainer(BaseTrainer):
    """``PPOTrainer(config).train()``; pass models, tokenizer or prompt records you already hold."""

    stage = "ppo"
    supports_several_processes = True
    progress_keys = ("objective/scores", "objective/kl", "groups/r_var")

    def __init__(self, config: PPOConfig, policy=None, tokenizer=None, reference=None, reward_model=None,
                 reward_tokenizer=None, critic: ValueHeads | None = None, prompts: list[dict] | None = None,
                 output_dir: str | Path = "runs/ppo", *, overwrite: bool = False, prompts_per_group: int = 2000,
                 reward_functions: list[RewardFunction] | None = None):
        super().__init__(config, output_dir, overwrite=overwrite)
        self.tokenizer = tokenizer or load_tokenizer(config.policy)
        self._load_prompts(prompts, prompts_per_group)
        reward_model = self._make_reward(reward_model, reward_tokenizer, reward_functions)
        self.label_names = sorted({r["group"] for r in self.records})
        self.num_groups = len(self.label_names) if config.groups == "oracle" else config.num_groups
        self.policy = (policy or load_causal_lm(config.policy)).to(self.device)
        # Before LoRA goes into the policy; only gae has a critic.
        self.critic = self._make_critic(critic, reward_model).to(self.device) if config.uses_critic else None
        if config.gradient_checkpointing:
            # Non-reentrant checkpointing works under DDP (the reentrant kind marks parameters ready twice).
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora_r:
            self.policy = apply_lora(self.policy, config.lora_r, config.lora_alpha, config.lora_dropout,
                                     config.lora_target_modules)
        self.reference = self._make_reference(reference)
        self.deepspeed = dist.launched_with_deepspeed() and dist.launched_with_several_processes()
        if self.deepspeed and (config.lora_r or config.fsdp):
            raise ConfigError("Under a DeepSpeed launch gipo trains full models with ZeRO; with lora_r use DDP "
                              "(examples/accelerate/ddp.yaml), and leave fsdp unset (DeepSpeed shards).")
        if config.fsdp and dist.launched_with_several_processes():  # one process holds it all anyway
            for model in self.trained_models():
                dist.shard_model(model)  # before the optimizers, which must hold the shards
        self.full_weights: dict[str, dict[str, torch.Tensor]] = {}
        self._make_optimizers()
        # Weights split across processes (FSDP, ZeRO-3) need every process in each forward of the trained models.
        self.sharded = dist.is_sharded(self.policy)
        self.sampler = EpochSampler(len(self.records), config.seed)
        self.prompt_groups = self._make_prompt_groups()
        self.kl_ctl = make_kl_controller(config.kl_coef, config.adaptive_kl, config.target_kl, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.group_returns_ema: torch.Tensor | None = None
        self.dro_weights = torch.full((self.num_groups,), 1.0 / self.num_groups)
        self.gain_baseline: dict[int, float] = {}
        self.settings = SamplingSettings(config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                                         config.stop_on_eos, backend=config.generation_backend,
                                         share_prompts=config.share_prompt_prefix, draws=config.sampling_draws)
        # Sampling log-probabilities stand in for the old policy's only where a forward would give the same
        # numbers: the fast loop records them, no dropout makes the training-mode forward differ, and no bf16
        # autocast rounds the training forwards differently from the cached sampling ones.
        # With a shared critic, its heads read the hidden states recorded while sampling as well.
        self.reuse_logprobs = (config.reuse_generation_logprobs and config.generation_backend == "fast"
                               and fast_sampling_supported(self.policy) and not has_active_dropout(self.policy)
                               and isinstance(self.autocast(), contextlib.nullcontext))
        self.reduce = dist.global_sum
        processes = dist.world_size()
        if config.prompts_per_batch % processes or config.mini_batch_size % processes:
            raise ConfigError(f"batch_size={config.batch_size} (samples: {config.prompts_per_batch} prompts x "
                              f"num_generations={config.num_generations}) and mini_batch_size={config.mini_batch_size} "
                              f"are global (over all processes): the prompts and mini_batch_size must be multiples of "
                              f"the {processes} processes (each process holds every sample of its prompts).")
        self.local_mini_batch_size = config.mini_batch_size // processes

    def _make_prompt_groups(self) -> PromptGroups | None:
        """Groups of whole prompts (difficulty bins; inferred without a critic; any that decide the sampling)."""
        config = self.config
        if not (config.groups == "difficulty" or config.group_sampling
                or (config.groups == "inferred" and not config.uses_critic)):
            return None
        return PromptGroups(config, self.num_groups, self.policy.config.hidden_size,
                            labels=self._label_indices, states=self._prompt_states, device=self.device)

    def _prompt_states(self, indices: list[int]) -> torch.Tensor:
        ids, mask = pad_left([self.encoded[i] for i in indices], self.tokenizer.pad_token_id)
        with self.autocast():
            return prompt_states(self.policy, ids.to(self.device), mask.to(self.device))

    def trained_models(self) -> list[torch.nn.Module]:
        """The policy, and the critic where the estimator has one."""
        return [self.policy] if self.critic is None else [self.policy, self.critic]

    def _load_prompts(self, prompts: list[dict] | None, prompts_per_group: int) -> None:
        config = self.config
        self.records = prompts if prompts is not None else load_prompts(config.dataset, "train", prompts_per_group,
                                                                        config.seed)
        if config.long_prompts == "shorten":
            self.records, _ = fit_to_length(self.tokenizer, self.records, config.max_prompt_length, sides=())
        # Gold rewards need the task's own prompt records; prompts passed in carry no gold.
        self.task = get_task(config.dataset) if prompts is None else None
        self.encoded = encode_prompts(self.tokenizer, [r["prompt"] for r in self.records],
                                      config.max_prompt_length, config.dataset)

    def _make_reward(self, reward_model, reward_tokenizer, reward_functions: list[RewardFunction] | None):
        """The reward model's scorer (``reward: model``), else the checked reward functions (the task's gold
        reward, or Python functions); no reward model is loaded then. Returns the reward model or None."""
        config = self.config
        self.scorer, self.reward_functions = None, None
        if config.reward != "model" or reward_functions:
            if config.reward == "gold" and self.task is None:
                raise ConfigError(f"reward=gold needs dataset to be a registered task whose prompts the trainer loads "
                                  f"(dataset={config.dataset!r}; prompts passed in carry no gold reward); give "
                                  "reward_functions= or reward=python:MODULE:FUNCTION instead.")
            self.reward_functions = RewardFunctions.from_config(config.reward, config.reward_weights, self.task,
                                                                reward_functions)
            return None
        reward_model = (reward_model or load_reward_model(config.reward_model)).to(self.device)
        reward_model.eval().requires_grad_(False)
        self.scorer = RewardScorer(reward_model, reward_tokenizer or load_tokenizer(config.reward_model),
                                   self.tokenizer)
        return reward_model

    def _make_critic(self, critic: ValueHeads | None, reward_model) -> ValueHeads:
        config = self.config
        if config.shared_critic:
            if getattr(self.policy.config, "final_logit_softcapping", None) or dist.launched_with_several_processes():
                raise ConfigError("shared_critic needs one process and a policy whose logits are its LM head's "
                                  "output (no logit soft-capping); use a separate critic (shared_critic=false).")
            return critic or ValueHeads(self.policy.config.hidden_size, self.num_groups)
        if critic is not None:
            return critic
        if config.critic:
            return Critic.from_backbone(config.critic, self.num_groups)
        # As in TRL, the critic starts from the reward model; from the policy when their tokens differ or there is
        # no reward model (a copy of the policy without LoRA adapters: the critic is trained in full).
        from_reward_model = reward_model is not None and self.scorer.same_tokenizer
        source = reward_model.base_model if from_reward_model else self.policy.base_model
        return Critic(copy.deepcopy(source).requires_grad_(True), self.num_groups)  # the reward model itself is frozen

    def _make_reference(self, reference) -> torch.nn.Module | None:
        """The frozen reference; none with kl_coef=0 (nothing reads it then, unless the gain's baseline samples it)."""
        config = self.config
        needed = config.kl_coef > 0 or config.adaptive_kl or (config.groups != "none" and config.group_signal == "gain")
        if not needed and reference is None:
            return None
        if reference is None and self.config.reference:
            reference = load_causal_lm(self.config.reference)
        if reference is not None:
            return reference.to(self.device).eval().requires_grad_(False)
        if self.config.lora_r:
            return AdapterDisabledReference(self.policy)
        return copy.deepcopy(self.policy).eval().requires_grad_(False)

    def _make_optimizers(self) -> None:
        """AdamW for the policy and the critic, and the models as trained (``policy_train``, ``critic_train``):
        under DDP as the launch wraps them, under DeepSpeed one engine each (their optimizers then ZeRO's),
        elsewhere the plain modules (sharded ones average their gradients themselves)."""
        config = self.config
        self.optimizer, self.scheduler = make_optimizer(self.policy.parameters(), config.learning_rate,
                                                        config.weight_decay, config.warmup_steps,
                                                        config.fused_optimizer)
        self.critic_optimizer = self.critic_scheduler = self.critic_train = None
        if self.critic is not None:
            self.critic_optimizer, self.critic_scheduler = make_optimizer(
                self.critic.parameters(), config.critic_learning_rate, config.weight_decay, config.warmup_steps,
                config.fused_optimizer)
        if self.deepspeed:
            steps = config.gradient_accumulation_steps
            micro_batch = max(1, config.mini_batch_size // dist.world_size() // steps)
            self.policy_train, self.optimizer = dist.deepspeed_engine(self.policy, self.optimizer, micro_batch, steps,
                                                                      config.max_grad_norm)
            if self.critic is not None:
                self.critic_train, self.critic_optimizer = dist.deepspeed_engine(
                    self.critic, self.critic_optimizer, micro_batch, steps, config.max_grad_norm)
        elif dist.is_sharded(self.policy):
            self.policy_train, self.critic_train = self.policy, self.critic
        elif self.critic is None:
            self.policy_train, self.optimizer = self.prepare(self.policy, self.optimizer)
        else:
            self.policy_train, self.critic_train, self.optimizer, self.critic_optimizer = self.prepare(
                self.policy, self.critic, self.optimizer, self.critic_optimizer)

    # --- 1-3: rollout and scoring ---------------------------------------------------------------------
    def training_step(self) -> dict[str, float]:
        config = self.config
        started = time.perf_counter()
        if self.prompt_groups is not None:
            prompts = self.prompt_groups.choose_prompts(self.sampler, config.prompts_per_batch, self.step)
        else:
            prompts = self.sampler.next_batch(config.prompts_per_batch)
        prompts = dist.shard(prompts)
        # Each process samples every response of its own prompts, a prompt's samples side by side, so the
        # per-prompt statistics of the critic-free estimators need no communication.
        indices = [i for i in prompts for _ in range(config.num_generations)]
        experience, metrics = self.collect_experience(indices)
        metrics["time/rollout"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics.update(self.update(experience))
        metrics["time/update"] = time.perf_counter() - started
        self.kl_ctl.update(metrics.get("objective/kl", 0.0), config.batch_size)
        # Sharded weights need every process in each forward: then all evaluate, and the main process logs.
        if (config.eval_every and self.step % config.eval_every == 0
                and (dist.is_main_process() or self.sharded)):
            metrics.update(self.eval_metrics())
        return metrics

    @torch.no_grad()
    def collect_experience(self, indices: list[int]) -> tuple[Experience, dict[str, float]]:
        config = self.config
        ids, mask = pad_left([self.encoded[i] for i in indices], self.tokenizer.pad_token_id)
        rollout = generate(self.policy, ids.to(self.device), mask.to(self.device), self.tokenizer.eos_token_id,
                           self.tokenizer.pad_token_id, self.settings, with_logprobs=self.reuse_logprobs,
                           with_states=self.reuse_logprobs and config.shared_critic)
        response_mask = rollout.response_mask
        values = group_logits = ref_logprobs = None
        with self.autocast():
            if config.shared_critic and self.reuse_logprobs:
                logprobs = rollout.sampled_logprobs
                values, group_logits = sampled_values(self.critic, rollout)
            elif config.shared_critic:
                logprobs, _, values, group_logits = logprobs_and_values(self.policy, self.critic, rollout,
                                                                        config.temperature)
            else:
                logprobs = (rollout.sampled_logprobs if self.reuse_logprobs
                            else response_logprobs(self.policy, rollout, config.temperature,
                                                   share_prompts=config.share_prompt_prefix)[0])
                if self.critic is not None:
                    values, group_logits = critic_values(self.critic, rollout)
            if self.reference is not None:
                ref_logprobs, _ = response_logprobs(self.reference, rollout, config.temperature,
                                                    share_prompts=config.share_prompt_prefix)
            raw_scores = self._score(rollout, indices)
        check_finite(self.step, **_present(**{"reward_model_scores" if self.scorer else "rewards": raw_scores},
                                           log_probabilities=logprobs, reference_log_probabilities=ref_logprobs,
                                           values=values))

        scores = raw_scores.clone()
        if config.missing_eos_penalty is not None:
            scores[~rollout.has_eos] -= config.missing_eos_penalty
        if config.normalize_reward:
            self.score_moments.update(scores, self.reduce)
            scores = (scores - self.score_moments.mean) / self.score_moments.std
        if config.reward_clip:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)

        label_probs = self._label_probs(indices) if config.groups == "oracle" else None
        prompt_signal, prompt_metrics = None, {}
        if self.prompt_groups is not None:
            label_probs, prompt_signal, prompt_metrics = self._prompt_group_assignment(indices, raw_scores)
        # The data's labels (oracle), else the critic's group head (None without a critic: no groups then).
        probs = label_probs if label_probs is not None or group_logits is None else F.softmax(group_logits, dim=-1)
        kl = (kl_per_token(logprobs, ref_logprobs, config.kl_estimator) if ref_logprobs is not None
              else torch.zeros_like(logprobs))
        kl_coef = self._kl_coefficients(probs)
        rewards = shape_rewards(scores, kl if config.kl_in == "reward" else torch.zeros_like(kl), response_mask,
                                kl_coef)
        advantages, returns = self._advantages(rewards, values, response_mask)
        check_finite(self.step, **_present(shaped_rewards=rewards, advantages=advantages, returns=returns))

        signal = prompt_signal if prompt_signal is not None else self._group_signal(indices, rewards, raw_scores)
        if config.groups != "none":
            group_returns = G.soft_group_means(probs, signal, self.reduce)
            self.group_returns_ema = group_returns if self.group_returns_ema is None else (
                config.group_ema * self.group_returns_ema + (1 - config.group_ema) * group_returns)

        keep, sample_metrics = self._kept_samples(raw_scores, rollout)
        loss_kl = config.kl_in == "loss" and ref_logprobs is not None
        experience = Experience(rollout, logprobs, values, advantages, returns, signal, label_probs,
                                ref_logprobs=ref_logprobs if loss_kl else None, keep=keep,
                                loss_kl_coef=torch.as_tensor(kl_coef, device=self.device).expand(len(indices))
                                if loss_kl else None)
        metrics = {
            "objective/kl_coef": self.kl_ctl.value,
            "objective/scores": dist.global_mean(raw_scores).item(),
            "objective/non_score_reward": dist.global_mean(rewards.sum(-1) - scores).item(),
            "objective/rlhf_reward": dist.global_mean(rewards.sum(-1)).item(),
            "val/num_eos_tokens": dist.global_sum(rollout.has_eos.float().sum()).item(),
            "response/length": dist.global_mean(rollout.lengths.float()).item(),
            **sample_metrics,
        }
        kl_sum = None
        if ref_logprobs is not None:
            k1 = kl if config.kl_estimator == "k1" else kl_per_token(logprobs, ref_logprobs, "k1")
            kl_sum = (k1 * response_mask).sum(-1)
            metrics["objective/kl"] = dist.global_mean(kl_sum).item()
        metrics.update(self._domain_metrics(indices, rollout, raw_scores, kl_sum))
        if config.groups != "none":
            metrics.update(self._group_metrics(indices, probs, signal, kl_sum, kl_coef))
            metrics.update(prompt_metrics)
            metrics.update(self._group_shares(probs, raw_scores))
        return experience, metrics

    def _prompt_group_assignment(self, indices: list[int], raw_scores: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The prompt groups' assignment of each sample (B, M), its prompt's mean reward (B,) as the group signal,
        and their metrics; the head, the pass-rate EMAs and the sampling weights learn from this batch."""
        g = self.config.num_generations
        means = per_prompt_means(raw_scores.float(), g)
        probs, metrics = self.prompt_groups.observe(indices[::g], means, self.reduce)
        return probs.repeat_interleave(g, dim=0), means.repeat_interleave(g), metrics

    def _group_shares(self, probs: torch.Tensor, raw_scores: torch.Tensor) -> dict[str, float]:
        """Per group: its share of the batch's samples and its pass rate (share of samples with reward >= 1:
        exact answers under the gold reward)."""
        passed = (raw_scores >= EXACT).float()
        shares, pass_rates = G.group_masses(probs, self.reduce), G.soft_group_means(probs, passed, self.reduce)
        return {**{f"groups/sample_share/{g}": float(v) for g, v in enumerate(shares)},
                **{f"groups/pass_rate/{g}": float(v) for g, v in enumerate(pass_rates)}}

    def _score(self, rollout: Rollout, indices: list[int]) -> torch.Tensor:
        """One reward per sample: the reward model's score, or the reward functions' (gold, Python)."""
        prompts = [self.records[i]["prompt"] for i in indices]
        if self.scorer is not None:
            return self.scorer(rollout, prompts)
        responses = decode_responses(self.tokenizer, rollout)
        return self.reward_functions(prompts, responses, [self.records[i] for i in indices],
                                     self.step).to(self.device)

    def _advantages(self, rewards: torch.Tensor, values: torch.Tensor | None,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token advantages (B, T) and the critic's returns: the one place where PPO and the critic-free
        estimators part. ``rewards`` are the per-token shaped rewards (the score on the last token)."""
        config = self.config
        if config.estimator == "gae":
            advantages, returns = compute_gae(rewards, values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, mask, reduce=self.reduce)
            return advantages, returns
        if config.estimator == "reinforce_pp":
            return E.reinforce_pp_advantages(rewards, mask, config.gamma, self.reduce), None
        sequence_rewards = rewards.sum(-1)
        if config.estimator == "rloo":
            advantages = E.rloo_advantages(sequence_rewards, config.num_generations)
        else:
            advantages = E.grpo_advantages(sequence_rewards, config.num_generations, config.scale_rewards, self.reduce)
        return advantages.unsqueeze(-1) * mask, None

    def _kept_samples(self, raw_scores: torch.Tensor, rollout: Rollout) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Which samples the loss keeps (None: all), and how many prompts teach nothing (all samples alike)."""
        config = self.config
        metrics: dict[str, float] = {}
        keep = torch.ones_like(raw_scores)
        if config.num_generations > 1:
            zero_std = E.zero_std_prompts(raw_scores, config.num_generations)
            metrics["objective/frac_reward_zero_std"] = dist.global_mean(zero_std.float()).item()
            prompt_std = E.per_prompt(raw_scores, config.num_generations).std(dim=1)
            metrics["objective/reward_std"] = dist.global_mean(prompt_std).item()
            if config.filter_zero_std:
                keep = keep * (~zero_std).float()
        if config.mask_truncated:
            keep = keep * rollout.has_eos.float()
        if not (config.filter_zero_std or config.mask_truncated):
            return None, metrics
        metrics["objective/frac_samples_kept"] = dist.global_mean(keep).item()
        return keep, metrics

    def _label_probs(self, indices: list[int]) -> torch.Tensor:
        return F.one_hot(self._label_indices(indices), len(self.label_names)).float().to(self.device)

    def _label_indices(self, indices: list[int]) -> torch.Tensor:
        """The data's group label of each sample, as an index into ``label_names``."""
        return torch.tensor([self.label_names.index(self.records[i]["group"]) for i in indices])

    def _kl_coefficients(self, probs: torch.Tensor) -> torch.Tensor | float:
        if not self.config.group_kl or self.group_returns_ema is None:
            return self.kl_ctl.value
        return G.adaptive_kl_coefficients(probs, self.group_returns_ema, self.kl_ctl.value,
                                          self.config.group_kl_floor)

    def _group_signal(self, indices: list[int], rewards: torch.Tensor, raw_scores: torch.Tensor) -> torch.Tensor:
        signal = self.config.group_signal
        if signal == "return":
            return rewards.sum(-1)
        if signal == "score":
            return raw_scores
        missing = [i for i in dict.fromkeys(indices) if i not in self.gain_baseline]
        if missing:
            self._fill_gain_baseline(missing)
        baseline = torch.tensor([self.gain_baseline[i] for i in indices], device=raw_scores.device)
        return raw_scores - baseline

    @torch.no_grad()
    def _fill_gain_baseline(self, indices: list[int]) -> None:
        """Mean score (reward model or reward functions) of the reference policy's responses, once per prompt
        (cached)."""
        repeats = self.config.gain_baseline_samples
        ids, mask = pad_left([self.encoded[i] for i in indices], self.tokenizer.pad_token_id)
        rollout = generate(self.reference, ids.repeat(repeats, 1).to(self.device),
                           mask.repeat(repeats, 1).to(self.device), self.tokenizer.eos_token_id,
                           self.tokenizer.pad_token_id, self.settings)
        scores = self._score(rollout, indices * repeats).view(repeats, len(indices)).mean(0)
        self.gain_baseline.update(zip(indices, scores.tolist(), strict=True))

    def _domain_metrics(self, indices: list[int], rollout: Rollout, raw_scores: torch.Tensor,
                        kl_sum: torch.Tensor | None) -> dict[str, float]:
        """Per true domain (reporting only): score, KL (with a reference) and, where the task has one, gold reward."""
        task = self.task
        quantities = {"score": raw_scores, **({"kl": kl_sum} if kl_sum is not None else {})}
        if self.config.reward == "gold":  # the score is the gold reward: no second decode and scoring
            quantities["gold"] = raw_scores
        elif task is not None:
            texts = decode_responses(self.tokenizer, rollout)
            quantities["gold"] = raw_scores.new_tensor([task.gold_reward(self.records[i], text)
                                                        for i, text in zip(indices, texts, strict=True)])
        labels = self._label_probs(indices)
        shares = G.group_masses(labels, self.reduce)
        means = {name: G.soft_group_means(labels, values.float(), self.reduce) for name, values in quantities.items()}
        return {**{f"domain/{name}/{label}": mean[g].item() for name, mean in means.items()
                   for g, label in enumerate(self.label_names) if shares[g] > 0},
                **{f"domain/share/{label}": shares[g].item() for g, label in enumerate(self.label_names)}}

    def _group_metrics(self, indices: list[int], probs: torch.Tensor, signal: torch.Tensor,
                       kl_sum: torch.Tensor | None, kl_coef: torch.Tensor | float) -> dict[str, float]:
        masses = G.group_masses(probs, self.reduce)
        kl_sum = torch.zeros_like(signal) if kl_sum is None else kl_sum  # no reference: no KL
        coef = kl_coef if isinstance(kl_coef, torch.Tensor) else torch.full_like(kl_sum, kl_coef)
        metrics = {"groups/r_var": G.invariance_violation(probs, signal, self.config.group_var, self.reduce).item()}
        for g, (mass, ret, kl, c) in enumerate(zip(masses, G.soft_group_means(probs, signal, self.reduce),
                                                   G.soft_group_means(probs, kl_sum, self.reduce),
                                                   G.soft_group_means(probs, coef, self.reduce), strict=True)):
            metrics.update({f"groups/mass/{g}": mass.item(), f"groups/return/{g}": ret.item(),
                            f"groups/kl/{g}": kl.item(), f"groups/kl_coef/{g}": c.item()})
        if len(self.label_names) > 1:
            inferred = dist.gather(probs.argmax(-1)).cpu()
            true_labels = dist.gather(self._label_indices(indices).to(probs.device)).cpu()
            metrics["groups/nmi"] = G.normalized_mutual_information(inferred, true_labels)
        return metrics

    # --- 4: the update ----------------------------------------------------------------------------------
    def update(self, experience: Experience) -> dict[str, float]:
        config = self.config
        if experience.keep is not None and not dist.global_sum(experience.keep.sum()).item():
            return {"policy/skipped_updates": 1.0}  # every sample dropped: nothing to learn from this batch
        sums: dict[str, float] = {}
        count = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(experience))
            for start in range(0, len(experience), self.local_mini_batch_size):
                minibatch = order[start:start + self.local_mini_batch_size].tolist()
                for micro in self.micro_batches(minibatch):
                    stats = self._micro_step(experience, torch.tensor(micro, device=self.device),
                                             len(micro) / len(minibatch))
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                grad_norms = {"policy/grad_norm": self.optimizer_step(self.policy_train, self.optimizer,
                                                                      self.scheduler)}
                if self.critic is not None:
                    grad_norms["val/grad_norm"] = self.optimizer_step(self.critic_train, self.critic_optimizer,
                                                                      self.critic_scheduler)
                for key, value in grad_norms.items():
                    sums[key] = sums.get(key, 0.0) + value
        steps = config.ppo_epochs * (len(experience) // self.local_mini_batch_size)
        if config.group_objective == "dro" and config.dro_step_size > 0:
            self.dro_weights = G.update_dro_weights(self.dro_weights, torch.tensor(
                [sums[f"groups/policy_loss/{g}"] / count for g in range(self.num_groups)]), config.dro_step_size)
        return {key: value / (steps if key.endswith("grad_norm") else count) for key, value in sums.items()}

    def _micro_step(self, experience: Experience, index: torch.Tensor, weight: float) -> dict[str, float]:
        """Backward of the critic loss (with a critic) and the policy loss on one micro-batch; returns its stats."""
        config = self.config
        rollout = experience.rollout.select(index)
        mask = rollout.response_mask
        values = group_logits = None
        with self.autocast():
            if config.shared_critic:
                logprobs, entropy, values, group_logits = logprobs_and_values(
                    self.policy_train, self.critic_train, rollout, config.temperature, with_entropy=True,
                    entropy_grad=config.entropy_coef > 0)
            else:
                if self.critic is not None:
                    values, group_logits = critic_values(self.critic_train, rollout)
                logprobs, entropy = response_logprobs(self.policy_train, rollout, config.temperature,
                                                      with_entropy=True, entropy_grad=config.entropy_coef > 0,
                                                      share_prompts=config.share_prompt_prefix)
        stats: dict[str, float] = {}
        critic_loss, assignment = self._critic_loss(experience, index, values, group_logits, mask, stats)

        # Policy step: clipped surrogate (plus the KL where it is in the loss) aggregated over tokens per sample,
        # then combined across groups (held fixed).
        policy_tokens, policy_stats = clipped_policy_loss(logprobs, experience.old_logprobs[index],
                                                          experience.advantages[index], config.clip_range,
                                                          config.clip_range_high)
        if experience.ref_logprobs is not None:
            kl_tokens = kl_per_token(logprobs, experience.ref_logprobs[index], "k3")
            policy_tokens = policy_tokens + experience.loss_kl_coef[index].unsqueeze(-1) * kl_tokens
            stats["loss/kl_avg"] = masked_mean(kl_tokens.detach(), mask, reduce=self.reduce).item()
        keep = experience.keep[index] if experience.keep is not None else None
        sample_losses = aggregated_sample_losses(policy_tokens, mask, config.loss_aggregation,
                                                 max_tokens=config.max_new_tokens, keep=keep, reduce=self.reduce)
        if assignment is None:
            policy_loss = sample_mean(sample_losses, self.reduce)
        else:
            policy_loss, group_losses = G.group_objective_loss(
                sample_losses, assignment, config.group_objective, beta=config.beta_policy, kind=config.group_var,
                dro_weights=self.dro_weights.to(self.device) if config.dro_step_size > 0 else None,
                reduce=self.reduce)
            stats.update({f"groups/policy_loss/{g}": v.item() for g, v in enumerate(group_losses)})
            stats["groups/policy_loss_var"] = G.group_variance(
                group_losses, G.group_masses(assignment, self.reduce), config.group_var).item()
        entropy_mean = masked_mean(entropy, mask, reduce=self.reduce)
        loss = policy_loss - config.entropy_coef * entropy_mean
        check_finite(self.step, **_present(policy_loss=loss, value_loss=critic_loss))
        if self.deepspeed:  # each engine runs the backward of its own model's loss (its hooks reduce the gradients)
            self.policy_train.backward(loss * weight, scale_wrt_gas=False)
            if critic_loss is not None:
                self.critic_train.backward(critic_loss * weight, scale_wrt_gas=False)
        else:
            self.backward((loss if critic_loss is None else loss + critic_loss) * weight)
        token_mean = {name: masked_mean(value.detach(), mask, reduce=self.reduce).item() for name, value in (
            ("policy/approxkl_avg", policy_stats["approxkl"]), ("policy/clipfrac_avg", policy_stats["clipped"]),
            ("val/ratio", policy_stats["ratio"]))}
        stats.update({"loss/policy_avg": policy_loss.item(), "policy/entropy_avg": entropy_mean.item(),
                      "objective/entropy": entropy_mean.item(), **token_mean})
        return stats

    def _critic_loss(self, experience: Experience, index: torch.Tensor, values: torch.Tensor | None,
                     group_logits: torch.Tensor | None, mask: torch.Tensor,
                     stats: dict[str, float]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The critic's loss (None without a critic): fit the returns, and the group head maximizes the spread of
        the group signal. Returns it with the group assignment the policy's objective uses (None: no groups)."""
        config = self.config
        assignment = experience.label_probs[index] if experience.label_probs is not None else None
        if values is None:
            return None, assignment
        value_tokens, value_clipped = clipped_value_loss(values, experience.old_values[index],
                                                         experience.returns[index], config.clip_range_value)
        value_loss = masked_mean(value_tokens, mask, reduce=self.reduce)
        critic_loss = config.vf_coef * value_loss
        stats.update({"loss/value_avg": value_loss.item(),
                      "val/clipfrac_avg": masked_mean(value_clipped, mask, reduce=self.reduce).item()})
        if config.groups == "inferred":
            probs = F.softmax(group_logits, dim=-1)
            r_var = G.invariance_violation(probs, experience.group_signal[index], config.group_var, self.reduce)
            critic_loss = critic_loss - config.beta_critic * r_var
            if config.min_group_mass > 0:
                critic_loss = critic_loss + config.min_mass_coef * G.min_mass_penalty(
                    G.group_masses(probs, self.reduce), config.min_group_mass)
            stats["groups/head_r_var"] = r_var.item()
            assignment = probs.detach()
        return critic_loss, assignment

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] if self.critic_optimizer is None else [self.optimizer, self.critic_optimizer]

    def has_unused_parameters(self) -> bool:
        return self.config.groups != "inferred"  # only inferred groups train the critic's group head

    # --- evaluation and state -----------------------------------------------------------------------------
    def evaluate(self, n_per_group: int | None = None) -> dict[str, Any]:
        """The ``eval.json`` report of the current policy (held-out prompts, OOD splits)."""
        return evaluate_policy(self.policy, self.tokenizer, self.config.dataset,
                               n_per_group=n_per_group or self.config.eval_prompts, settings=self.settings,
                               reference=self.reference, scorer=self.scorer, device=self.device,
                               max_prompt_length=self.config.max_prompt_length,
                               long_prompts=self.config.long_prompts, ood_dataset=self.config.ood_dataset)

    def eval_metrics(self) -> dict[str, float]:
        report = self.evaluate()
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

    def trainer_state(self) -> dict[str, Any]:
        gain_baseline = {}  # each process has filled the baselines of the prompts it has seen
        for part in dist.gather_objects(self.gain_baseline):
            gain_baseline.update(part)
        critic = {} if self.critic is None else {"critic_optimizer": self.optimizer_state(self.critic_optimizer),
                                                 "critic_scheduler": self.critic_scheduler.state_dict()}
        return {**super().trainer_state(), **critic, "kl_ctl": self.kl_ctl.state_dict(),
                "score_moments": self.score_moments.state_dict(), "group_returns_ema": self.group_returns_ema,
                "dro_weights": self.dro_weights, "gain_baseline": gain_baseline,
                "prompt_groups": self.prompt_groups.state_dict() if self.prompt_groups is not None else None}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        if self.critic is not None:
            self.load_optimizer_state(self.critic_optimizer, state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.group_returns_ema, self.dro_weights = state["group_returns_ema"], state["dro_weights"]
        self.gain_baseline = state["gain_baseline"]
        if self.prompt_groups is not None:
            self.prompt_groups.load_state_dict(state["prompt_groups"])

    # With fsdp, checkpoints hold full weights and full optimizer states (keyed by parameter name), as one
    # process would save them; every process reads them back and keeps its shards. Under DeepSpeed they hold the
    # full weights and every process's ZeRO partition of the optimizer states.
    def _model_of(self, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
        return self.policy if optimizer is self.optimizer else self.critic

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return dist.optimizer_state(self._model_of(optimizer), optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        dist.load_optimizer_state(self._model_of(optimizer), optimizer, state)

    def gather_weights(self) -> None:
        if self.sharded:
            self.full_weights = {"policy": dist.full_state_dict(self.policy)}
            if self.critic is not None:
                self.full_weights["critic"] = dist.full_state_dict(self.critic)

    def save_pretrained(self, path: str | Path) -> None:
        """The policy (loadable with ``from_pretrained(path)``; with LoRA, merged, and the adapters in
        ``path/adapter``) and the critic, where there is one, in ``path/critic``."""
        full, self.full_weights = self.full_weights, {}
        if self.config.lora_r:
            save_merged(self.policy, path)
        else:
            self.policy.save_pretrained(path, state_dict=full.get("policy"))
        self.tokenizer.save_pretrained(path)
        if self.critic is not None:
            self.critic.save_pretrained(Path(path) / "critic", state_dict=full.get("critic"))

    def load_weights(self, folder: Path) -> None:
        if self.config.lora_r:
            load_adapter_weights(self.policy, folder)
        else:
            dist.load_state_dict(self.policy, load_causal_lm(str(folder)).state_dict())
        if self.critic is None:
            return
        if self.config.shared_critic:
            self.critic.load_heads(folder / "critic" / ValueHeads.HEADS_FILE)
        else:
            dist.load_state_dict(self.critic, Critic.from_backbone(str(folder / "critic"), self.num_groups).state_dict())
