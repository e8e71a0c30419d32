"""An RL run's group state: where each sample's group comes from (the data's labels, the critic's group head,
or groups of whole prompts), the sampling rule that fills the next batch, the advantage weighting rule, the
group-adaptive KL coefficients, group DRO's weights, and the per-group and per-domain metrics; all of it in
checkpoints.

The collect step hands ``GroupState.observe`` its scored batch once (``GroupBatch``) and gets back what it needs
(``GroupView``): the assignment, the per-sample KL coefficients and the signal the groups separate. A *group*
is a set of prompts (a domain, an inferred group, a difficulty bin), not GRPO's samples of one prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from gipo import distributed as dist
from gipo import groups as G
from gipo.advantage_weighting import ADVANTAGE_WEIGHTINGS
from gipo.config import PPOConfig
from gipo.data import EpochSampler
from gipo.estimators import per_prompt_mean
from gipo.losses import shape_rewards
from gipo.prompt_groups import PromptGroups
from gipo.rollout_allocation import ROLLOUT_ALLOCATIONS
from gipo.sampling import SAMPLING_RULES
from gipo.tasks import EXACT


@dataclass
class GroupBatch:
    """One collected batch, as the group state reads it."""

    indices: list[int]  # each sample's prompt, a prompt's samples side by side
    prompt_sizes: torch.Tensor  # (P,) the samples of each prompt
    raw_scores: torch.Tensor  # (B,) the reward as scored
    scores: torch.Tensor  # (B,) after normalization and clipping
    reward_kl: torch.Tensor  # (B, T) the per-token KL that goes into the reward (zeros when it is in the loss)
    response_mask: torch.Tensor  # (B, T)
    group_logits: torch.Tensor | None = None  # (B, M) the critic's group head
    kl_sum: torch.Tensor | None = None  # (B,) each response's KL to the reference (k1), for the metrics
    gold: torch.Tensor | None = None  # (B,) the task's gold reward, for the per-domain metrics


@dataclass
class GroupView:
    """What the collect step gets back."""

    kl_coef: torch.Tensor | float  # the KL coefficient: per sample (B,) when group-adaptive
    probs: torch.Tensor | None = None  # (B, M) each sample's group assignment; None without groups
    fixed_probs: torch.Tensor | None = None  # (B, M) the assignment the update keeps (labels, prompt groups)
    signal: torch.Tensor | None = None  # (B,) what the groups separate; None without groups
    advantage_weights: torch.Tensor | None = None  # (B,) multipliers of the advantages; None: all 1
    metrics: dict[str, float] = field(default_factory=dict)


def group_count(config: PPOConfig, records: list[dict[str, Any]]) -> int:
    """M: the data's labels with oracle groups, else ``num_groups``."""
    return len({r["group"] for r in records}) if config.groups == "oracle" else config.num_groups


class GroupState:
    """``records`` are the run's prompt records (their ``group`` labels); ``prompt_states(indices)`` gives the
    policy's hidden states at those prompts, ``baseline_scores(indices)`` the reference's mean score on them
    (for ``group_signal: gain``)."""

    def __init__(self, config: PPOConfig, records: list[dict[str, Any]], hidden_size: int,
                 prompt_states: Callable[[list[int]], torch.Tensor],
                 baseline_scores: Callable[[list[int]], torch.Tensor], device: torch.device):
        self.config, self.records, self.device = config, records, device
        self.label_names = sorted({r["group"] for r in records})
        self.num_groups = group_count(config, records)
        self.baseline_scores = baseline_scores
        self.reduce = dist.global_sum
        self.rule = SAMPLING_RULES.get(config.prompt_sampling)(config, self.num_groups)
        self.weighting = ADVANTAGE_WEIGHTINGS.get(config.advantage_weighting)(config, self.num_groups)
        self.allocation = ROLLOUT_ALLOCATIONS.get(config.rollout_allocation)(config, self.num_groups)
        self.prompt_groups: PromptGroups | None = None
        if (config.groups in ("difficulty", "pass_bins") or config.group_sampling or self.allocation.needs_groups
                or (config.groups == "inferred" and not config.uses_critic)):
            self.prompt_groups = PromptGroups(config, self.num_groups, hidden_size, self.label_indices, prompt_states,
                                              device)
        self.group_returns_ema: torch.Tensor | None = None
        self.dro_weights = torch.full((self.num_groups,), 1.0 / self.num_groups)
        self.gain_baseline: dict[int, float] = {}
        self.batch_pass_rates = torch.zeros(self.num_groups)

    # --- which prompts ----------------------------------------------------------------------------------
    def choose_prompts(self, sampler: EpochSampler, n: int, step: int) -> list[int]:
        """The next batch's ``n`` prompts, as the sampling rule chooses them (from the prompt groups, if any)."""
        if self.prompt_groups is None and self.rule.needs_groups:
            raise RuntimeError(f"prompt_sampling={self.config.prompt_sampling} reads groups, and this run has none.")
        return self.rule.choose(sampler, n, step, self.prompt_groups)

    def generations(self, prompts: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """How many samples each of ``prompts`` gets (P,), as the rollout allocation rule sets them from the
        prompts' groups (a rule that reads none sees every prompt in group 0), and the rule's metrics."""
        groups = (self.prompt_groups.assign(prompts).argmax(-1).cpu() if self.allocation.needs_groups
                  else torch.zeros(len(prompts), dtype=torch.long))
        return self.allocation.allocate(groups, len(prompts) * self.config.num_generations, step)

    def label_indices(self, indices: list[int]) -> torch.Tensor:
        """The data's group label of each sample, as an index into ``label_names``."""
        return torch.tensor([self.label_names.index(self.records[i]["group"]) for i in indices])

    def label_probs(self, indices: list[int]) -> torch.Tensor:
        return F.one_hot(self.label_indices(indices), len(self.label_names)).float().to(self.device)

    # --- one batch --------------------------------------------------------------------------------------
    def observe(self, batch: GroupBatch, kl_coef: float) -> GroupView:
        """Assign the batch's samples to groups, give their KL coefficients, learn from the batch (the prompt
        head, pass-rate bins, sampling weights, the groups' return EMA) and measure it."""
        config = self.config
        fixed = self.label_probs(batch.indices) if config.groups == "oracle" else None
        signal, prompt_metrics = None, {}
        if self.prompt_groups is not None:
            fixed, signal, prompt_metrics = self._prompt_group_assignment(batch.indices, batch.prompt_sizes,
                                                                          batch.raw_scores)
        # The data's labels (oracle), else the critic's group head (None without a critic: no groups then).
        probs = fixed if fixed is not None or batch.group_logits is None else F.softmax(batch.group_logits, dim=-1)
        coef = kl_coef
        if config.group_kl and self.group_returns_ema is not None:
            coef = G.adaptive_kl_coefficients(probs, self.group_returns_ema, kl_coef, config.group_kl_floor)
        view = GroupView(coef, probs, fixed, metrics=self._domain_metrics(batch))
        if config.groups == "none":
            return view
        view.advantage_weights, weighting_metrics = self.weighting.weights(probs, self.reduce)
        view.metrics.update(weighting_metrics)
        view.signal = signal if signal is not None else self._group_signal(batch, coef)
        group_returns = G.soft_group_means(probs, view.signal, self.reduce)
        self.group_returns_ema = group_returns if self.group_returns_ema is None else (
            config.group_ema * self.group_returns_ema + (1 - config.group_ema) * group_returns)
        view.metrics.update(self._group_metrics(batch, probs, view.signal, coef))
        view.metrics.update(prompt_metrics)
        view.metrics.update(self._group_shares(probs, batch.raw_scores))
        return view

    def _prompt_group_assignment(self, indices: list[int], sizes: torch.Tensor, raw_scores: torch.Tensor
                                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The prompt groups' assignment of each sample (B, M), its prompt's mean reward (B,) as the group signal,
        and their metrics; the head, the pass-rate EMAs and the sampling rule learn from this batch."""
        means = per_prompt_mean(raw_scores.float(), sizes)
        passed = per_prompt_mean((raw_scores >= EXACT).float(), sizes) > 0
        firsts = (torch.cumsum(sizes, 0) - sizes).tolist()
        probs, metrics = self.prompt_groups.observe([indices[i] for i in firsts], means, passed, self.reduce)
        observed = (G.group_masses(probs, self.reduce) > 0).cpu()
        metrics.update(self.rule.observe(-G.soft_group_means(probs, means, self.reduce).cpu(), observed))
        repeats = sizes.to(probs.device)
        return probs.repeat_interleave(repeats, dim=0), means.repeat_interleave(repeats), metrics

    def _group_signal(self, batch: GroupBatch, kl_coef: torch.Tensor | float) -> torch.Tensor:
        signal = self.config.group_signal
        if signal == "return":  # the shaped return, as the collect step shapes it
            return shape_rewards(batch.scores, batch.reward_kl, batch.response_mask, kl_coef).sum(-1)
        if signal == "score":
            return batch.raw_scores
        missing = [i for i in dict.fromkeys(batch.indices) if i not in self.gain_baseline]
        if missing:
            self.gain_baseline.update(zip(missing, self.baseline_scores(missing).tolist(), strict=True))
        baseline = torch.tensor([self.gain_baseline[i] for i in batch.indices], device=batch.raw_scores.device)
        return batch.raw_scores - baseline

    def learn_from_update(self, policy_losses: torch.Tensor, surrogate_losses: torch.Tensor, shares: torch.Tensor
                          ) -> dict[str, float]:
        """After an update, from each group's mean policy loss (M,) (group DRO's step), mean surrogate loss (M,)
        and share of the batch (M,): each group's score (``gdro_score``) goes to the advantage weighting and the
        rollout allocation rules."""
        if self.config.group_objective == "dro" and self.config.dro_step_size > 0:
            self.dro_weights = G.update_dro_weights(self.dro_weights, policy_losses, self.config.dro_step_size)
        observed = shares > 0
        if self.config.gdro_score == "failure_rate":
            scores = 1 - self.batch_pass_rates
        else:
            scores = surrogate_losses / shares.clamp(min=1e-8) if self.config.gdro_score_by_share else surrogate_losses
        return {**self.weighting.observe(scores, observed), **self.allocation.observe(scores, observed),
                **{f"groups/score_observation/{g}": float(v) for g, v in enumerate(scores) if observed[g]}}

    # --- metrics ----------------------------------------------------------------------------------------
    def _group_metrics(self, batch: GroupBatch, probs: torch.Tensor, signal: torch.Tensor,
                       kl_coef: torch.Tensor | float) -> dict[str, float]:
        masses = G.group_masses(probs, self.reduce)
        kl_sum = torch.zeros_like(signal) if batch.kl_sum is None else batch.kl_sum  # no reference: no KL
        coef = kl_coef if isinstance(kl_coef, torch.Tensor) else torch.full_like(kl_sum, kl_coef)
        metrics = {"groups/r_var": G.invariance_violation(probs, signal, self.config.group_var, self.reduce).item()}
        for g, (mass, ret, kl, c) in enumerate(zip(masses, G.soft_group_means(probs, signal, self.reduce),
                                                   G.soft_group_means(probs, kl_sum, self.reduce),
                                                   G.soft_group_means(probs, coef, self.reduce), strict=True)):
            metrics.update({f"groups/mass/{g}": mass.item(), f"groups/return/{g}": ret.item(),
                            f"groups/kl/{g}": kl.item(), f"groups/kl_coef/{g}": c.item()})
        if len(self.label_names) > 1:
            inferred = dist.gather(probs.argmax(-1)).cpu()
            true_labels = dist.gather(self.label_indices(batch.indices).to(probs.device)).cpu()
            metrics["groups/nmi"] = G.normalized_mutual_information(inferred, true_labels)
        return metrics

    def _group_shares(self, probs: torch.Tensor, raw_scores: torch.Tensor) -> dict[str, float]:
        """Per group: its share of the batch's samples and its pass rate (share of samples with reward >= 1:
        exact answers under the gold reward)."""
        passed = (raw_scores >= EXACT).float()
        shares, pass_rates = G.group_masses(probs, self.reduce), G.soft_group_means(probs, passed, self.reduce)
        self.batch_pass_rates = pass_rates.cpu()  # a failure-rate group score reads them after the update
        return {**{f"groups/sample_share/{g}": float(v) for g, v in enumerate(shares)},
                **{f"groups/pass_rate/{g}": float(v) for g, v in enumerate(pass_rates)}}

    def _domain_metrics(self, batch: GroupBatch) -> dict[str, float]:
        """Per true domain (reporting only): score, KL (with a reference) and, where the task has one, gold reward."""
        quantities = {"score": batch.raw_scores, **({"kl": batch.kl_sum} if batch.kl_sum is not None else {}),
                      **({"gold": batch.gold} if batch.gold is not None else {})}
        labels = self.label_probs(batch.indices)
        shares = G.group_masses(labels, self.reduce)
        means = {name: G.soft_group_means(labels, values.float(), self.reduce) for name, values in quantities.items()}
        return {**{f"domain/{name}/{label}": mean[g].item() for name, mean in means.items()
                   for g, label in enumerate(self.label_names) if shares[g] > 0},
                **{f"domain/share/{label}": shares[g].item() for g, label in enumerate(self.label_names)}}

    # --- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        gain_baseline = {}  # each process has filled the baselines of the prompts it has seen
        for part in dist.gather_objects(self.gain_baseline):
            gain_baseline.update(part)
        return {"group_returns_ema": self.group_returns_ema, "dro_weights": self.dro_weights,
                "gain_baseline": gain_baseline,
                "prompt_groups": self.prompt_groups.state_dict() if self.prompt_groups is not None else None,
                "sampling_rule": self.rule.state_dict(), "advantage_weighting": self.weighting.state_dict(),
                "rollout_allocation": self.allocation.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.group_returns_ema, self.dro_weights = state["group_returns_ema"], state["dro_weights"]
        self.gain_baseline = state["gain_baseline"]
        if self.prompt_groups is not None:
            self.prompt_groups.load_state_dict(state["prompt_groups"])
        # Checkpoints written before sampling rules kept the group-weights state with the prompt groups.
        self.rule.load_state_dict(state.get("sampling_rule", state["prompt_groups"] or {}))
        self.weighting.load_state_dict(state.get("advantage_weighting", {}))
        self.allocation.load_state_dict(state.get("rollout_allocation", {}))
