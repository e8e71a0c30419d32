"""The RL stage's models besides the reward: the policy (with LoRA and gradient checkpointing where asked), the
frozen reference, and the critic (a separate value model, or heads on the policy's own decoder)."""

from __future__ import annotations

import copy

import torch

from gipo import distributed as dist
from gipo.config import PPOConfig
from gipo.errors import ConfigError
from gipo.lora import AdapterDisabledReference, apply_lora
from gipo.models import Critic, ValueHeads, load_causal_lm


def prepare_policy(config: PPOConfig, policy: torch.nn.Module) -> torch.nn.Module:
    """Gradient checkpointing and LoRA adapters on the loaded policy, as the config asks."""
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works under DDP (the reentrant kind marks parameters ready twice).
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        policy = apply_lora(policy, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    return policy


def make_critic(config: PPOConfig, policy: torch.nn.Module, num_groups: int, critic: ValueHeads | None,
                reward_model: torch.nn.Module | None, same_tokenizer: bool) -> ValueHeads:
    """The critic: ``critic`` if given; heads on the policy (``shared_critic``); a backbone named by ``config.critic``;
    else, as in TRL, a copy of the reward model, or of the policy when their tokens differ or there is no reward
    model. Build it before LoRA goes into the policy (the critic is trained in full)."""
    if config.shared_critic:
        if getattr(policy.config, "final_logit_softcapping", None) or dist.launched_with_several_processes():
            raise ConfigError("shared_critic needs one process and a policy whose logits are its LM head's "
                              "output (no logit soft-capping); use a separate critic (shared_critic=false).")
        return critic or ValueHeads(policy.config.hidden_size, num_groups)
    if critic is not None:
        return critic
    if config.critic:
        return Critic.from_backbone(config.critic, num_groups)
    source = reward_model.base_model if reward_model is not None and same_tokenizer else policy.base_model
    return Critic(copy.deepcopy(source).requires_grad_(True), num_groups)  # the reward model itself is frozen


def make_reference(config: PPOConfig, policy: torch.nn.Module, reference: torch.nn.Module | None,
                   device: torch.device) -> torch.nn.Module | None:
    """The frozen reference; none with kl_coef=0 (nothing reads it then, unless the gain's baseline samples it)."""
    needed = config.kl_coef > 0 or config.adaptive_kl or (config.groups != "none" and config.group_signal == "gain")
    if not needed and reference is None:
        return None
    if reference is None and config.reference:
        reference = load_causal_lm(config.reference)
    if reference is not None:
        return reference.to(device).eval().requires_grad_(False)
    if config.lora_r:
        return AdapterDisabledReference(policy)
    return copy.deepcopy(policy).eval().requires_grad_(False)
