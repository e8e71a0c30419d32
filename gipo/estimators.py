"""Critic-free advantage estimators as pure functions of tensors: GRPO, Dr. GRPO, RLOO, REINFORCE++.

Layout: a batch holds ``G = num_generations`` samples of each prompt, one prompt's samples next to each
other, so ``rewards.view(-1, G)`` has one row per prompt. (These per-prompt sets of samples are what GRPO
calls a "group"; in gipo a *group* is a set of prompts, so here they are a prompt's *samples*.)
Every process holds whole prompts, so the per-prompt statistics need no communication; batch statistics
(``scale_rewards="batch"``, REINFORCE++'s whitening) go through ``reduce``.
"""

from __future__ import annotations

import torch

from gipo.distributed import Reduce, local_sum
from gipo.losses import masked_whiten

# As TRL's GRPOTrainer: keeps a prompt whose samples are nearly equal from dividing by ~0.
STD_EPS = 1e-4


def per_prompt(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """(B,) -> (P, G): one row per prompt; a clear error when B is not a multiple of G."""
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise ValueError(f"{rewards.shape[0]} samples do not split into prompts of {num_generations} samples each")
    return rewards.view(-1, num_generations)


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                    reduce: Reduce = local_sum) -> torch.Tensor:
    """GRPO (Shao et al., 2024): r_i minus the mean of its prompt's samples, divided by a standard deviation.

    ``scale_rewards``: ``group`` divides by the std of the prompt's samples (unbiased, as ``torch.std``),
    ``batch`` by the std of all rewards in the batch, ``none`` not at all (Dr. GRPO, Liu et al., 2025).
    Returns (B,) sequence-level advantages.
    """
    rows = per_prompt(rewards, num_generations)
    centred = rows - rows.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred.reshape(-1)
    if scale_rewards == "group":
        std = rows.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(rows[:, :1])
    elif scale_rewards == "batch":
        n = reduce(rewards.new_tensor(float(rewards.numel())))
        mean = reduce(rewards.sum()) / n
        std = (reduce(((rewards - mean) ** 2).sum()) / (n - 1).clamp(min=1)).sqrt()
    else:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; allowed: group, batch, none.")
    return (centred / (std + STD_EPS)).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO (Kool et al., 2019; Ahmadian et al., 2024): r_i minus the mean of the prompt's *other* samples,
    which equals G / (G - 1) * (r_i - mean of all G). Needs G > 1. Returns (B,)."""
    if num_generations < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (num_generations > 1)")
    rows = per_prompt(rewards, num_generations)
    others = (rows.sum(dim=1, keepdim=True) - rows) / (num_generations - 1)
    return (rows - others).reshape(-1)


def reward_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return from each response token to the end: G_t = sum_{s >= t} gamma^(s-t) r_s, 0 on padding."""
    rewards = token_rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                            reduce: Reduce = local_sum) -> torch.Tensor:
    """REINFORCE++ (Hu, 2025): the per-token return (the KL penalty is in the per-token reward, the score on
    the last token), whitened over every response token of the batch. Returns (B, T)."""
    return masked_whiten(reward_to_go(token_rewards, mask, gamma), mask, reduce=reduce)


def zero_std_prompts(rewards: torch.Tensor, num_generations: int, tol: float = 1e-6) -> torch.Tensor:
    """(B,) bool: the samples of prompts whose samples all got the same reward (their GRPO/RLOO advantage is 0,
    so they teach nothing; DAPO's dynamic sampling drops them)."""
    rows = per_prompt(rewards, num_generations)
    same = (rows.max(dim=1).values - rows.min(dim=1).values) <= tol
    return same.repeat_interleave(num_generations)
