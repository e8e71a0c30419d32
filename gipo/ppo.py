"""The RL stage: PPO for language models, the critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) and the
group methods on both, in one loop.

One iteration, as a recipe (``training_step``):
1. choose prompts (the sampling rule) and collect experience: generate, score (a reward model, the task's gold
   reward or functions), shape the rewards with the (group-adaptive) KL, advantages (``gipo.experience``);
2. several epochs over minibatches: a critic step (value loss - beta_critic * R_var, where there is a critic) and
   a policy step (clipped loss aggregated over tokens, or its group form, plus the KL when it is in the loss);
3. update the KL controller; evaluate; log and checkpoint (``gipo.trainer``).
The math lives in ``gipo.losses``, ``gipo.estimators`` and ``gipo.groups``; the group state in
``gipo.group_state``; this file wires the update.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gipo import distributed as dist
from gipo import groups as G
from gipo.config import PPOConfig
from gipo.data import EpochSampler, load_training_prompts
from gipo.errors import ConfigError
from gipo.evaluation import evaluate_policy, report_metrics
from gipo.experience import Experience, ExperienceCollector, Models, present
from gipo.group_state import group_count
from gipo.kl_control import make_kl_controller
from gipo.lora import load_adapter_weights, save_merged
from gipo.losses import (
    aggregated_sample_losses,
    clipped_policy_loss,
    clipped_value_loss,
    kl_per_token,
    masked_mean,
    sample_mean,
)
from gipo.models import Critic, ValueHeads, load_causal_lm, load_tokenizer
from gipo.reward_functions import ModelReward, RewardContext, RewardFunction, make_reward_source
from gipo.rl_models import make_critic, make_reference, prepare_policy
from gipo.rollout import (
    SamplingSettings,
    critic_values,
    engine_options,
    logprobs_and_values,
    release_engines,
    response_logprobs,
    sampling_logprobs_reusable,
)
from gipo.trainer import BaseTrainer, check_finite, make_optimizer


class PPOTrainer(BaseTrainer):
    """``PPOTrainer(config).train()``; pass models, tokenizer or prompt records you already hold."""

    stage = "ppo"
    supports_several_processes = True
    progress_keys = ("objective/scores", "objective/kl", "groups/r_var")

    def __init__(self, config: PPOConfig, policy=None, tokenizer=None, reference=None, reward_model=None,
                 reward_tokenizer=None, critic: ValueHeads | None = None, prompts: list[dict] | None = None,
                 output_dir: str | Path = "runs/ppo", *, overwrite: bool = False,
                 reward_functions: list[RewardFunction] | None = None):
        super().__init__(config, output_dir, overwrite=overwrite)
        self.tokenizer = tokenizer or load_tokenizer(config.policy)
        self.records, encoded, self.task = load_training_prompts(
            self.tokenizer, config.dataset, prompts, config.train_prompts_per_group, config.seed,
            config.max_prompt_length, config.long_prompts)
        self.reward = make_reward_source(RewardContext(
            config.reward, config.reward_weights, config.dataset, self.task, self.tokenizer, self.device,
            config.reward_model, reward_model, reward_tokenizer, reward_functions or []))
        self.scorer = self.reward.scorer if isinstance(self.reward, ModelReward) else None
        self.policy = (policy or load_causal_lm(config.policy)).to(self.device)
        if config.uses_critic:  # before LoRA goes into the policy
            self.critic = make_critic(config, self.policy, group_count(config, self.records), critic, self.scorer and self.scorer.model,
                                      bool(self.scorer and self.scorer.same_tokenizer)).to(self.device)
        else:
            self.critic = None
        self.policy = prepare_policy(config, self.policy)
        self.reference = make_reference(config, self.policy, reference, self.device)
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
        self.kl_ctl = make_kl_controller(config.kl_coef, config.adaptive_kl, config.target_kl, config.kl_horizon)
        self.settings = SamplingSettings(config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                                         config.stop_on_eos, backend=config.generation_backend,
                                         share_prompts=config.share_prompt_prefix, draws=config.sampling_draws,
                                         engine=engine_options(vars(config)))
        reuse_logprobs = config.reuse_generation_logprobs and sampling_logprobs_reusable(
            self.policy, self.settings, isinstance(self.autocast(), contextlib.nullcontext))
        self.collector = ExperienceCollector(config, self.tokenizer, self.records, encoded,
                                             Models(self.policy, self.critic, self.reference), self.reward, self.task,
                                             self.settings, reuse_logprobs, self.autocast, self.device)
        self.groups = self.collector.groups
        self.reduce = dist.global_sum
        processes = dist.world_size()
        if config.prompts_per_batch % processes or config.mini_batch_size % processes:
            raise ConfigError(f"batch_size={config.batch_size} (samples: {config.prompts_per_batch} prompts x "
                              f"num_generations={config.num_generations}) and mini_batch_size={config.mini_batch_size} "
                              f"are global (over all processes): the prompts and mini_batch_size must be multiples of "
                              f"the {processes} processes (each process holds every sample of its prompts).")
        self.local_mini_batch_size = config.mini_batch_size // processes
        if processes > 1 and self.groups.allocation.needs_groups:
            raise ConfigError(f"rollout_allocation={config.rollout_allocation} runs in one process: under several, "
                              "each process would need the same number of samples from its own prompts.")

    def trained_models(self) -> list[torch.nn.Module]:
        """The policy, and the critic where the estimator has one."""
        return [self.policy] if self.critic is None else [self.policy, self.critic]

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

    # --- the recipe -------------------------------------------------------------------------------------
    def training_step(self) -> dict[str, float]:
        config = self.config
        started = time.perf_counter()
        prompts = dist.shard(self.groups.choose_prompts(self.sampler, config.prompts_per_batch, self.step))
        # Each process samples every response of its own prompts, a prompt's samples side by side, so the
        # per-prompt statistics of the critic-free estimators need no communication.
        sizes, allocation_metrics = self.groups.generations(prompts, self.step)
        indices = [i for i, n in zip(prompts, sizes.tolist(), strict=True) for _ in range(n)]
        experience, metrics = self.collector.collect(indices, self.step, self.kl_ctl.value, sizes)
        metrics.update(allocation_metrics)
        metrics["time/rollout"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics.update(self.update(experience))
        metrics["time/update"] = time.perf_counter() - started
        self.kl_ctl.update(metrics.get("objective/kl", 0.0), config.batch_size)
        # Sharded weights need every process in each forward: then all evaluate, and the main process logs.
        if (config.eval_every and self.step % config.eval_every == 0
                and (dist.is_main_process() or self.sharded)):
            metrics.update(report_metrics(self.evaluate()))
        return metrics

    # --- the update --------------------------------------------------------------------------------------
    def update(self, experience: Experience) -> dict[str, float]:
        config = self.config
        if experience.keep is not None and not dist.global_sum(experience.keep.sum()).item():
            return {"policy/skipped_updates": 1.0}  # every sample dropped: nothing to learn from this batch
        sums: dict[str, float] = {}
        count = 0
        # Per group over the whole update: mass, surrogate loss, ratio drift and KL of its samples (summed).
        group_totals = torch.zeros(4, self.groups.num_groups, device=self.device)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(experience))
            for start in range(0, len(experience), self.local_mini_batch_size):
                minibatch = order[start:start + self.local_mini_batch_size].tolist()
                for micro in self.micro_batches(minibatch):
                    stats = self._micro_step(experience, torch.tensor(micro, device=self.device),
                                             len(micro) / len(minibatch), group_totals)
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
        metrics = {key: value / (steps if key.endswith("grad_norm") else count) for key, value in sums.items()}
        if "groups/policy_loss/0" in metrics:  # the update had groups
            metrics.update(self._learn_groups(metrics, group_totals))
        return metrics

    def _learn_groups(self, metrics: dict[str, float], group_totals: torch.Tensor) -> dict[str, float]:
        """The group state learns from the update (group DRO's weights, the advantage weighting's scores); the
        per-group surrogate loss, ratio drift and KL show what a loss-based group score tracks."""
        mass, surrogate, drift, kl = self.reduce(group_totals).cpu()  # this process's sums, then all processes
        means = {name: total / mass.clamp(min=1e-8) for name, total in
                 (("surrogate_loss", surrogate), ("ratio_drift", drift), ("loss_kl", kl))}
        out = {f"groups/{name}/{g}": float(v) for name, values in means.items() for g, v in enumerate(values)}
        policy_losses = torch.tensor([metrics[f"groups/policy_loss/{g}"] for g in range(self.groups.num_groups)])
        out.update(self.groups.learn_from_update(policy_losses, means["surrogate_loss"], mass / mass.sum()))
        return out

    def _micro_step(self, experience: Experience, index: torch.Tensor, weight: float,
                    group_totals: torch.Tensor) -> dict[str, float]:
        """Backward of the critic loss (with a critic) and the policy loss on one micro-batch; returns its stats
        and adds its samples' group statistics to ``group_totals``."""
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
        surrogate_tokens, policy_stats = clipped_policy_loss(logprobs, experience.old_logprobs[index],
                                                             experience.advantages[index], config.clip_range,
                                                             config.clip_range_high)
        policy_tokens = surrogate_tokens
        if experience.correction_weights is not None:  # responses from another engine than the trainer
            policy_tokens = policy_tokens * experience.correction_weights[index]
        if experience.advantage_weights is not None:  # the surrogate of the weighted advantage (see the rules)
            policy_tokens = policy_tokens * experience.advantage_weights[index].unsqueeze(-1)
        kl_tokens = None
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
                dro_weights=self.groups.dro_weights.to(self.device) if config.dro_step_size > 0 else None,
                reduce=self.reduce)
            stats.update({f"groups/policy_loss/{g}": v.item() for g, v in enumerate(group_losses)})
            per_sample = [masked_mean(t.detach(), mask, dim=1) for t in (
                surrogate_tokens, (policy_stats["ratio"] - 1).abs(),
                kl_tokens if kl_tokens is not None else torch.zeros_like(surrogate_tokens))]
            group_totals += torch.stack([assignment.sum(0), *(assignment.T @ v for v in per_sample)])
            stats["groups/policy_loss_var"] = G.group_variance(
                group_losses, G.group_masses(assignment, self.reduce), config.group_var).item()
        entropy_mean = masked_mean(entropy, mask, reduce=self.reduce)
        loss = policy_loss - config.entropy_coef * entropy_mean
        check_finite(self.step, **present(policy_loss=loss, value_loss=critic_loss))
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

    def on_train_end(self) -> None:
        release_engines()

    # --- evaluation and state -----------------------------------------------------------------------------
    def evaluate(self, n_per_group: int | None = None) -> dict[str, Any]:
        """The ``eval.json`` report of the current policy (held-out prompts, OOD splits)."""
        return evaluate_policy(self.policy, self.tokenizer, self.config.dataset,
                               n_per_group=n_per_group or self.config.eval_prompts, settings=self.settings,
                               reference=self.reference, scorer=self.scorer, device=self.device,
                               max_prompt_length=self.config.max_prompt_length,
                               long_prompts=self.config.long_prompts, ood_dataset=self.config.ood_dataset,
                               samples=self.config.eval_samples, greedy=self.config.eval_greedy,
                               train_prompts=self.config.eval_train_prompts)

    def trainer_state(self) -> dict[str, Any]:
        critic = {} if self.critic is None else {"critic_optimizer": self.optimizer_state(self.critic_optimizer),
                                                 "critic_scheduler": self.critic_scheduler.state_dict()}
        return {**super().trainer_state(), **critic, "kl_ctl": self.kl_ctl.state_dict(),
                "score_moments": self.collector.score_moments.state_dict(), **self.groups.state_dict()}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        super().load_trainer_state(state)
        if self.critic is not None:
            self.load_optimizer_state(self.critic_optimizer, state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.collector.score_moments.load_state_dict(state["score_moments"])
        self.groups.load_state_dict(state)

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
            dist.load_state_dict(self.critic, Critic.from_backbone(str(folder / "critic"),
                                                             self.groups.num_groups).state_dict())
