"""Rollout allocation rules behind a registry: how many samples (generations) each prompt of a batch gets.

A rule is built as ``rule(config, num_groups)`` and has one interface (``RolloutAllocation``): ``allocate`` gives
each prompt its number of samples from the prompts' groups, within a fixed total (the batch size), ``observe``
reads each update's per-group scores, and a ``state_dict`` that checkpoints keep. ``rollout_allocation: NAME``
picks one; ``register_rollout_allocation`` adds one, and ``python:MODULE:CLASS`` loads one. (A *group* is a set
of prompts: a pass-rate bin or an inferred group; a prompt's samples are what GRPO calls its group.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from gipo.registry import Registry, Stateless


class RolloutAllocation(Protocol):
    needs_groups: bool  # reads the prompts' groups

    def allocate(self, groups: torch.Tensor, budget: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Samples per prompt (P,) long, summing to ``budget``, from each prompt's group (P,) long; and metrics.
        Every process must allocate alike, so seed any draw with the step."""

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        """One update's score per group (M,) (``gdro_score``) and which groups the batch held (M,) bool; returns
        metrics."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Equal(Stateless):
    """``num_generations`` samples for every prompt."""

    needs_groups = False

    def __init__(self, config: Any, num_groups: int):
        self.generations = config.num_generations

    def allocate(self, groups: torch.Tensor, budget: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.full((len(groups),), self.generations, dtype=torch.long), {}

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        return {}


def exact_budget_choice(log_probs: torch.Tensor, counts: list[int], arms: list[int], budget: int) -> list[int]:
    """One arm per group (indices into ``arms``) maximizing sum_g log_probs[g, arm_g] over the choices that spend
    exactly ``budget`` = sum_g counts[g] * arms[arm_g]: a knapsack over the groups, by dynamic programming on
    the amount spent. Groups with no prompt (count 0) take their most likely arm. ValueError if no choice
    spends the budget exactly."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for g, count in enumerate(counts):
        step: dict[int, tuple[float, list[int]]] = {}
        options = range(len(arms)) if count else [int(log_probs[g].argmax())]
        for spent, (score, picks) in best.items():
            for arm in options:
                total = spent + count * arms[arm]
                if total > budget:
                    continue
                candidate = (score + float(log_probs[g, arm]), [*picks, arm])
                if total not in step or candidate[0] > step[total][0]:
                    step[total] = candidate
        best = step
    if budget not in best:
        raise ValueError(f"no allocation of {arms} samples to groups of {counts} prompts spends exactly {budget}")
    return best[budget][1]


class RolloutGDRO:
    """Rollout-GDRO (Panaganti et al., 2026, section 3.3): each group (pass-rate bin) plays a bandit over the
    number of samples its prompts get, arms ``rollout_min_generations`` .. ``rollout_max_generations``, under a
    mean budget of ``num_generations`` per prompt.

    Each group's arm probabilities are p_g = (1 - gamma) softmax(eta S_g) + gamma / K (EXP3's
    ``rollout_bandit_eta``, ``rollout_bandit_gamma``). Each group draws an arm by the Gumbel-max trick (log p_g plus
    Gumbel noise, seeded by the step); a dynamic program then picks the joint choice that spends the batch
    exactly and scores highest on those same perturbed log-probabilities (``exact_budget_choice``): the group's
    own draw where the budget allows. A deterministic most-likely choice would reinforce whichever arm it picked
    first whenever the rewards are positive. After the update, the chosen arm's score gains the
    importance-weighted reward (x_g - mu (n_g - n_bar) / n_bar) / p_g(n_g), x_g the group's score (``gdro_score``,
    as Prompt-GDRO's). The shadow price mu moves by ``rollout_dual_step`` times the relative overspend of the
    unconstrained draws (the exact choice never overspends, so it could not move mu)."""

    needs_groups = True

    def __init__(self, config: Any, num_groups: int):
        self.arms = list(range(config.rollout_min_generations, config.rollout_max_generations + 1))
        self.mean, self.seed = config.num_generations, config.seed
        self.eta, self.gamma = config.rollout_bandit_eta, config.rollout_bandit_gamma
        self.dual_step = config.rollout_dual_step
        self.scores = torch.zeros(num_groups, len(self.arms), dtype=torch.float64)
        self.mu = 0.0
        self.chosen = torch.zeros(num_groups, dtype=torch.long)  # each group's arm in the last allocation

    def probabilities(self) -> torch.Tensor:
        """(M, K) each group's arm probabilities."""
        return (1 - self.gamma) * torch.softmax(self.eta * self.scores, dim=1) + self.gamma / len(self.arms)

    def allocate(self, groups: torch.Tensor, budget: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        probs = self.probabilities()
        counts = torch.bincount(groups, minlength=len(probs)).tolist()
        generator = torch.Generator().manual_seed(self.seed * 100_003 + step)
        uniform = torch.rand(probs.shape, generator=generator, dtype=probs.dtype).clamp(1e-12, 1 - 1e-12)
        perturbed = probs.log() - torch.log(-torch.log(uniform))
        self.chosen = torch.tensor(exact_budget_choice(perturbed, counts, self.arms, budget))
        drawn = torch.tensor(self.arms)[perturbed.argmax(dim=1)]  # each group's own draw from p_g
        wanted = sum(c * int(n) for c, n in zip(counts, drawn, strict=True)) / max(1, sum(counts))
        self.mu = max(0.0, self.mu + self.dual_step * (wanted - self.mean) / self.mean)
        arms = torch.tensor(self.arms)[self.chosen]
        metrics = {f"rollouts/generations/{g}": float(arms[g]) for g, c in enumerate(counts) if c}
        metrics.update({"rollouts/dual_mu": self.mu, "rollouts/wanted_mean": wanted})
        return arms[groups], metrics

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        probs = self.probabilities()
        for g in observed.nonzero().flatten().tolist():
            arm = int(self.chosen[g])
            reward = float(scores[g]) - self.mu * (self.arms[arm] - self.mean) / self.mean
            self.scores[g, arm] += reward / float(probs[g, arm])
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "mu": self.mu, "chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores, self.mu, self.chosen = state["scores"], state["mu"], state["chosen"]


ROLLOUT_ALLOCATIONS: Registry[Callable[[Any, int], RolloutAllocation]] = Registry(
    "rollout allocation rule", "rollout_allocation", lambda spec, rule: rule)
ROLLOUT_ALLOCATIONS.register("equal", Equal, "num_generations samples for every prompt")
ROLLOUT_ALLOCATIONS.register("rollout_gdro", RolloutGDRO, "Rollout-GDRO: a bandit per group over the samples its "
                             "prompts get, under the batch's budget (needs groups; one process)")


def register_rollout_allocation(name: str, rule: Callable[[Any, int], RolloutAllocation], about: str = "", *,
                                replace: bool = False) -> None:
    """Add a rule, found as ``rollout_allocation: NAME``: ``rule(config, num_groups)`` builds it."""
    ROLLOUT_ALLOCATIONS.register(name, rule, about, replace=replace)
