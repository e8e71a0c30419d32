"""Advantage estimators as pure functions of tensors behind a registry: GAE (PPO, with a critic) and the
critic-free GRPO, Dr. GRPO, RLOO and REINFORCE++.

Every registered estimator has one signature, ``AdvantageFn``::

    fn(token_rewards, response_mask, values, settings, reduce) -> (advantages, returns)

``token_rewards`` (B, T) are the shaped per-token rewards (the score on each response's last token, a KL
penalty per token where it is in the reward), ``values`` (B, T) the critic's (None without a critic),
``settings`` the config keys estimators read (``AdvantageSettings``); it returns per-token advantages (B, T) and
the critic's targets (None without a critic). ``register_estimator`` adds one, with what it needs (a critic,
several samples per prompt) and the defaults it implies for the keys left unset.

Layout: a batch holds each prompt's samples next to each other: ``G = num_generations`` of each, or as many as
``settings.prompt_sizes`` (P,) gives each prompt where a rule sets the generations per prompt (Rollout-GDRO).
The per-prompt statistics run over those segments. (These per-prompt sets of samples are what GRPO calls a
"group"; in gipo a *group* is a set of prompts, so here they are a prompt's *samples*.)
Every process holds whole prompts, so the per-prompt statistics need no communication; batch statistics
(``scale_rewards="batch"``, REINFORCE++'s whitening) go through ``reduce``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gipo.distributed import Reduce, local_sum
from gipo.errors import ConfigError
from gipo.losses import compute_gae, masked_whiten
from gipo.registry import Registry

# As TRL's GRPOTrainer: keeps a prompt whose samples are nearly equal from dividing by ~0.
STD_EPS = 1e-4


PromptSizes = int | torch.Tensor
"""The samples of each prompt: G for every prompt alike, or (P,) counts."""


def prompt_sizes(num_samples: int, sizes: PromptSizes) -> torch.Tensor:
    """(P,) samples per prompt; a clear error when they do not add up to the batch."""
    if isinstance(sizes, int):
        if sizes < 1 or num_samples % sizes:
            raise ValueError(f"{num_samples} samples do not split into prompts of {sizes} samples each")
        return torch.full((num_samples // sizes,), sizes, dtype=torch.long)
    if int(sizes.sum()) != num_samples or bool((sizes < 1).any()):
        raise ValueError(f"{num_samples} samples do not split into prompts of {sizes.tolist()} samples")
    return sizes.long().cpu()


def sample_prompts(num_samples: int, sizes: PromptSizes) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's prompt (B,) and the samples per prompt (P,)."""
    counts = prompt_sizes(num_samples, sizes)
    return torch.repeat_interleave(torch.arange(len(counts)), counts), counts


def per_prompt_sum(values: torch.Tensor, sizes: PromptSizes) -> torch.Tensor:
    """(B,) -> (P,): the sum over each prompt's samples."""
    which, counts = sample_prompts(values.shape[0], sizes)
    return torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, which.to(values.device),
                                                                                         values)


def per_prompt_mean(values: torch.Tensor, sizes: PromptSizes) -> torch.Tensor:
    """(B,) -> (P,): the mean of each prompt's samples."""
    return per_prompt_sum(values, sizes) / prompt_sizes(values.shape[0], sizes).to(values.device, values.dtype)


def per_prompt_std(values: torch.Tensor, sizes: PromptSizes) -> torch.Tensor:
    """(B,) -> (P,): the unbiased std of each prompt's samples (as ``torch.std``); 0 for a prompt with one."""
    which, counts = sample_prompts(values.shape[0], sizes)
    which, counts = which.to(values.device), counts.to(values.device, values.dtype)
    sums = per_prompt_sum((values - per_prompt_mean(values, sizes)[which]) ** 2, sizes)
    return torch.where(counts > 1, (sums / (counts - 1).clamp(min=1)).sqrt(), torch.zeros_like(sums))


def grpo_advantages(rewards: torch.Tensor, sizes: PromptSizes, scale_rewards: str = "group",
                    reduce: Reduce = local_sum) -> torch.Tensor:
    """GRPO (Shao et al., 2024): r_i minus the mean of its prompt's samples, divided by a standard deviation.

    ``sizes``: the samples of each prompt (``num_generations``, or (P,) counts). ``scale_rewards``: ``group``
    divides by the std of the prompt's samples (unbiased, as ``torch.std``), ``batch`` by the std of all rewards
    in the batch, ``none`` not at all (Dr. GRPO, Liu et al., 2025). Returns (B,) sequence-level advantages.
    """
    which, _ = sample_prompts(rewards.shape[0], sizes)
    which = which.to(rewards.device)
    centred = rewards - per_prompt_mean(rewards, sizes)[which]
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = per_prompt_std(rewards, sizes)[which]
    elif scale_rewards == "batch":
        n = reduce(rewards.new_tensor(float(rewards.numel())))
        mean = reduce(rewards.sum()) / n
        std = (reduce(((rewards - mean) ** 2).sum()) / (n - 1).clamp(min=1)).sqrt()
    else:
        raise ValueError(f"Unknown scale_rewards {scale_rewards!r}; allowed: group, batch, none.")
    return centred / (std + STD_EPS)


def rloo_advantages(rewards: torch.Tensor, sizes: PromptSizes) -> torch.Tensor:
    """RLOO (Kool et al., 2019; Ahmadian et al., 2024): r_i minus the mean of the prompt's *other* samples,
    which equals n / (n - 1) * (r_i - mean of all n), n the prompt's samples. Needs n > 1. Returns (B,)."""
    which, counts = sample_prompts(rewards.shape[0], sizes)
    if bool((counts < 2).any()):
        raise ValueError("RLOO needs at least 2 samples per prompt (num_generations > 1)")
    which = which.to(rewards.device)
    n = counts.to(rewards.device, rewards.dtype)[which]
    return rewards - (per_prompt_sum(rewards, sizes)[which] - rewards) / (n - 1)


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


def zero_std_prompts(rewards: torch.Tensor, sizes: PromptSizes, tol: float = 1e-6) -> torch.Tensor:
    """(B,) bool: the samples of prompts whose samples all got the same reward (their GRPO/RLOO advantage is 0,
    so they teach nothing; DAPO's dynamic sampling drops them)."""
    which, counts = sample_prompts(rewards.shape[0], sizes)
    which = which.to(rewards.device)
    high = torch.full((len(counts),), -torch.inf, dtype=rewards.dtype, device=rewards.device)
    low = torch.full((len(counts),), torch.inf, dtype=rewards.dtype, device=rewards.device)
    high = high.scatter_reduce(0, which, rewards, "amax")
    low = low.scatter_reduce(0, which, rewards, "amin")
    return ((high - low) <= tol)[which]


# --- the registry ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvantageSettings:
    """The config keys an estimator reads."""

    num_generations: int = 1
    prompt_sizes: torch.Tensor | None = None  # (P,) this batch's samples per prompt, where they differ
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    scale_rewards: str = "none"

    @classmethod
    def from_config(cls, config: Any) -> AdvantageSettings:
        return cls(config.num_generations, None, config.gamma, config.lam, config.whiten_advantages,
                   config.scale_rewards)

    @property
    def sizes(self) -> PromptSizes:
        """The batch's samples per prompt."""
        return self.num_generations if self.prompt_sizes is None else self.prompt_sizes


AdvantageFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, AdvantageSettings, Reduce],
                       tuple[torch.Tensor, torch.Tensor | None]]

# What the estimator-dependent keys left unset (None) become; an estimator overrides some of them.
UNSET_DEFAULTS: dict[str, Any] = {"num_generations": 1, "kl_in": "reward", "loss_aggregation":
                                        "seq_mean_token_mean", "scale_rewards": "none", "normalize_reward": False}


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: its function, what it needs, and the defaults it implies."""

    name: str
    fn: AdvantageFn
    needs_critic: bool = False
    min_generations: int = 1  # > 1: it compares a prompt's samples with each other
    defaults: dict[str, Any] = field(default_factory=lambda: dict(UNSET_DEFAULTS))
    requires: dict[str, Any] = field(default_factory=dict)  # keys that must hold these values

    def check(self, config: Any) -> None:
        """A ConfigError when ``config`` cannot run this estimator."""
        if config.num_generations < self.min_generations:
            raise ConfigError(f"PPOConfig: estimator={self.name} compares a prompt's samples with each other and "
                              f"needs num_generations >= {self.min_generations} (got {config.num_generations}).")
        for key, value in self.requires.items():
            if getattr(config, key) != value:
                raise ConfigError(f"PPOConfig: estimator={self.name} needs {key}={value} (got "
                                  f"{getattr(config, key)}).")


def _from_python(spec: str, fn: Any) -> Estimator:
    return fn if isinstance(fn, Estimator) else Estimator(spec, fn)


ESTIMATORS: Registry[Estimator] = Registry("advantage estimator", "estimator", _from_python)


def register_estimator(name: str, fn: AdvantageFn, *, needs_critic: bool = False, min_generations: int = 1,
                       defaults: dict[str, Any] | None = None, requires: dict[str, Any] | None = None,
                       about: str = "", replace: bool = False) -> Estimator:
    """Add an estimator, found by name from YAML (``estimator: NAME``) and Python. ``defaults`` fill the keys a
    config leaves unset (num_generations, kl_in, loss_aggregation, scale_rewards, normalize_reward; the rest
    from ``UNSET_DEFAULTS``); ``requires`` are values the estimator cannot run without."""
    entry = Estimator(name, fn, needs_critic, min_generations, {**UNSET_DEFAULTS, **(defaults or {})},
                      dict(requires or {}))
    return ESTIMATORS.register(name, entry, about, replace=replace)


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS.get(name)


def gae(token_rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, settings: AdvantageSettings,
        reduce: Reduce = local_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the critic's values, whitened over the batch where ``whiten_advantages``; returns its targets."""
    advantages, returns = compute_gae(token_rewards, values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    return advantages, returns


def _per_sequence(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level advantage (B,) on every response token (B, T)."""
    return advantages.unsqueeze(-1) * mask


def grpo(token_rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, settings: AdvantageSettings,
         reduce: Reduce = local_sum) -> tuple[torch.Tensor, None]:
    advantages = grpo_advantages(token_rewards.sum(-1), settings.sizes, settings.scale_rewards, reduce)
    return _per_sequence(advantages, mask), None


def rloo(token_rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None, settings: AdvantageSettings,
         reduce: Reduce = local_sum) -> tuple[torch.Tensor, None]:
    return _per_sequence(rloo_advantages(token_rewards.sum(-1), settings.sizes), mask), None


def reinforce_pp(token_rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                 settings: AdvantageSettings, reduce: Reduce = local_sum) -> tuple[torch.Tensor, None]:
    return reinforce_pp_advantages(token_rewards, mask, settings.gamma, reduce), None


register_estimator("gae", gae, needs_critic=True, about="PPO with a critic: GAE, whitened",
                   defaults={"normalize_reward": True})
register_estimator("grpo", grpo, min_generations=2, about="reward minus the mean of the prompt's samples, over their "
                   "std", defaults={"num_generations": 8, "kl_in": "loss", "scale_rewards": "group"})
register_estimator("dr_grpo", grpo, min_generations=2, about="GRPO without the std, a constant loss normalizer",
                   defaults={"num_generations": 8, "kl_in": "loss", "loss_aggregation": "seq_mean_token_sum_norm"},
                   requires={"scale_rewards": "none"})
register_estimator("rloo", rloo, min_generations=2, about="leave-one-out baseline", defaults={"num_generations": 8})
register_estimator("reinforce_pp", reinforce_pp, about="REINFORCE++: batch-whitened return, KL in the reward")
