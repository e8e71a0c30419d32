"""Advantage weighting rules behind a registry: a multiplier on each sample's advantage, from its group.

A rule is built as ``rule(config, num_groups)`` and has one interface (``AdvantageWeighting``): ``weights`` gives
the batch's per-sample multipliers from the samples' group assignment, ``observe`` reads each update's mean
score per group, and a ``state_dict`` that checkpoints keep. ``advantage_weighting: NAME`` picks one;
``register_advantage_weighting`` adds one, and ``python:MODULE:CLASS`` loads one. (A *group* is a set of prompts:
here mostly Prompt-GDRO's pass-rate bins.)

The update multiplies the clipped surrogate of each sample by its weight, which equals the surrogate of the
weighted advantage (the clip depends only on the advantage's sign); the KL and entropy terms stay unweighted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from gipo import groups as G
from gipo.distributed import Reduce, local_sum
from gipo.registry import Registry, Stateless


class AdvantageWeighting(Protocol):
    def weights(self, probs: torch.Tensor, reduce: Reduce = local_sum) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Per-sample multipliers (B,) (None: all 1) from the samples' group assignment (B, M), and metrics."""

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        """One update's score per group (M,) (``gdro_score``: by default the mean surrogate loss, unweighted
        advantages and no KL, over the group's share of the batch) and which groups it held (M,) bool; returns
        metrics to log."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Unweighted(Stateless):
    """Every advantage as the estimator gave it."""

    def __init__(self, config: Any, num_groups: int):
        pass

    def weights(self, probs: torch.Tensor, reduce: Reduce = local_sum) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        return {}


class PromptGDRO:
    """Prompt-GDRO (Panaganti et al., 2026, section 3.2): each bin's score s_b is an EMA (``gdro_ema_beta``) of its
    observed score (``gdro_score``: the mean surrogate loss, divided by the bin's share of the batch with
    ``gdro_score_by_share``, as published; or its failure rate); the bins present in the
    batch get q_b = (1 - gamma) softmax(eta s)_b + gamma / |present| (``gdro_eta``, ``gdro_gamma``), and each
    sample's advantage is multiplied by its bin's q, rescaled to a batch mean of 1 and capped at
    ``gdro_weight_cap``. The sampler stays as it is (uniform in the preset)."""

    def __init__(self, config: Any, num_groups: int):
        self.eta, self.gamma, self.beta = config.gdro_eta, config.gdro_gamma, config.gdro_ema_beta
        self.cap = config.gdro_weight_cap
        self.scores = torch.zeros(num_groups)
        self.seen = torch.zeros(num_groups, dtype=torch.bool)

    def weights(self, probs: torch.Tensor, reduce: Reduce = local_sum) -> tuple[torch.Tensor | None, dict[str, float]]:
        present = (reduce(probs.sum(0)) > 0).cpu()
        q = G.gdro_bin_weights(self.scores, present, self.eta, self.gamma)
        weights = G.gdro_sample_weights(q.to(probs.device), probs.argmax(-1), self.cap, reduce)
        metrics = {f"gdro/bin_weight/{g}": float(v) for g, v in enumerate(q)}
        metrics.update({f"gdro/score/{g}": float(v) for g, v in enumerate(self.scores)})
        metrics["gdro/sample_weight_max"] = float(weights.max()) if weights.numel() else 0.0
        return weights, metrics

    def observe(self, scores: torch.Tensor, observed: torch.Tensor) -> dict[str, float]:
        self.scores = G.update_loss_ema(self.scores, scores, observed, self.seen, 1 - self.beta)
        self.seen = self.seen | observed
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores, self.seen = state["scores"], state["seen"]


ADVANTAGE_WEIGHTINGS: Registry[Callable[[Any, int], AdvantageWeighting]] = Registry(
    "advantage weighting rule", "advantage_weighting", lambda spec, rule: rule)
ADVANTAGE_WEIGHTINGS.register("none", Unweighted, "every advantage as the estimator gave it")
ADVANTAGE_WEIGHTINGS.register("prompt_gdro", PromptGDRO, "Prompt-GDRO: each sample's advantage times its bin's "
                              "weight, exp(eta * EMA of the bin's mean surrogate loss), mixed with the uniform, "
                              "batch-normalized and capped (needs groups)")


def register_advantage_weighting(name: str, rule: Callable[[Any, int], AdvantageWeighting], about: str = "", *,
                                 replace: bool = False) -> None:
    """Add a rule, found as ``advantage_weighting: NAME``: ``rule(config, num_groups)`` builds it."""
    ADVANTAGE_WEIGHTINGS.register(name, rule, about, replace=replace)
