"""Prompt sampling rules behind a registry: which prompts fill the next batch, given the groups.

A rule is built as ``rule(config, num_groups)`` and has one interface (``SamplingRule``): ``choose`` the next
batch's prompts (reading the prompts' groups or pass rates through a ``PromptView``), ``observe`` each batch's
per-group mean losses, and a ``state_dict`` that checkpoints keep, so
a resumed run samples exactly as an uninterrupted one. ``prompt_sampling: NAME`` picks one; ``register_sampling_rule``
adds one, and ``python:MODULE:CLASS`` loads one. (A *group* is a set of prompts: a domain, a difficulty bin or an
inferred group.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from gipo import groups as G
from gipo.data import EpochSampler
from gipo.registry import Registry, Stateless

# Candidates drawn per prompt of the batch when sampling by group weights: enough for a group with a small share
# of the data to be found among them.
POOL_FACTOR = 4

class PromptView(Protocol):
    """What a rule may read of prompts, by index."""

    def assign(self, indices: list[int]) -> torch.Tensor:
        """The prompts' group assignment (P, M) (soft, or one-hot bins and labels)."""

    def pass_rates(self, indices: list[int]) -> torch.Tensor:
        """Each prompt's recent mean reward (P,) (its pass rate under a 0/1 reward)."""


class SamplingRule(Protocol):
    needs_groups: bool  # reads the run's prompt groups (and their pass rates)

    def choose(self, sampler: EpochSampler, n: int, step: int, prompts: PromptView) -> list[int]:
        """The next batch's ``n`` prompts; every process must choose the same."""

    def observe(self, group_losses: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        """One batch's mean loss per group (M,) (the negative mean reward) and which groups it held (M,) bool;
        returns metrics to log."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Uniform(Stateless):
    """Every prompt alike: the sampler's next shuffled prompts."""

    needs_groups = False

    def __init__(self, config: Any, num_groups: int):
        pass

    def choose(self, sampler: EpochSampler, n: int, step: int, prompts: PromptView) -> list[int]:
        return sampler.next_batch(n)

    def observe(self, group_losses: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        return {}


class GroupWeights:
    """Multiplicative weights on an EMA of each group's mean loss, mixed with the uniform distribution
    (``group_sampling_step_size``, ``group_sampling_floor``, ``difficulty_ema``): of the next ``POOL_FACTOR * n``
    prompts, ``n`` chosen so that their groups follow the weights."""

    needs_groups = True

    def __init__(self, config: Any, num_groups: int):
        self.seed, self.step_size = config.seed, config.group_sampling_step_size
        self.floor, self.decay = config.group_sampling_floor, config.difficulty_ema
        self.weights = torch.full((num_groups,), 1.0 / num_groups)
        self.loss_ema = torch.zeros(num_groups)
        self.seen = torch.zeros(num_groups, dtype=torch.bool)

    def choose(self, sampler: EpochSampler, n: int, step: int, prompts: PromptView) -> list[int]:
        candidates = sampler.next_batch(POOL_FACTOR * n)
        groups = prompts.assign(candidates).argmax(-1).tolist()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        return [candidates[p] for p in G.select_by_group_weights(groups, self.weights, n, generator)]

    def observe(self, group_losses: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        self.loss_ema = G.update_loss_ema(self.loss_ema, group_losses, observed, self.seen, self.decay)
        self.seen = self.seen | observed
        self.weights = G.update_sampling_weights(self.weights, self.loss_ema, self.seen, self.step_size, self.floor)
        return {f"groups/sampling_weight/{g}": float(w) for g, w in enumerate(self.weights)}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "loss_ema": self.loss_ema, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.loss_ema, self.seen = state["weights"], state["loss_ema"], state["seen"]


class Learnability(Stateless):
    """Learnability sampling (Foster et al., 2025): of the next ``POOL_FACTOR * n`` prompts, ``n`` drawn without
    replacement with probability proportional to p (1 - p) at each one's pass rate p, mixed with the uniform
    (``group_sampling_floor``) so that a prompt at p = 0 or 1 can still come back. Needs no groups of its own;
    the pass rates are the prompt groups' per-prompt EMA (``difficulty_ema``)."""

    needs_groups = True

    def __init__(self, config: Any, num_groups: int):
        self.seed, self.floor = config.seed, config.group_sampling_floor
        self.last_mean = 0.0

    def choose(self, sampler: EpochSampler, n: int, step: int, prompts: PromptView) -> list[int]:
        candidates = sampler.next_batch(POOL_FACTOR * n)
        scores = G.learnability(prompts.pass_rates(candidates).float().cpu())
        probs = scores / scores.sum() if scores.sum() > 0 else torch.full_like(scores, 1.0 / len(scores))
        probs = (1 - self.floor) * probs + self.floor / len(probs)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        chosen = torch.multinomial(probs, min(n, len(candidates)), replacement=False, generator=generator)
        self.last_mean = float(scores[chosen].mean())
        return [candidates[p] for p in chosen.tolist()]

    def observe(self, group_losses: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        return {"sampling/learnability_mean": self.last_mean}


SAMPLING_RULES: Registry[Callable[[Any, int], SamplingRule]] = Registry(
    "prompt sampling rule", "prompt_sampling", lambda spec, rule: rule)
SAMPLING_RULES.register("uniform", Uniform, "every prompt alike")
SAMPLING_RULES.register("group_weights", GroupWeights, "the groups' multiplicative weights on their mean-loss EMA "
                        "choose which prompts fill the batch (needs groups)")
SAMPLING_RULES.register("learnability", Learnability, "prompts drawn by p(1-p) at their pass rate p (Foster et al. "
                        "2025; needs prompt groups for the pass rates)")


def register_sampling_rule(name: str, rule: Callable[[Any, int], SamplingRule], about: str = "", *,
                           replace: bool = False) -> None:
    """Add a rule, found as ``prompt_sampling: NAME``: ``rule(config, num_groups)`` builds it."""
    SAMPLING_RULES.register(name, rule, about, replace=replace)
