"""Group Invariant Learning as pure functions: soft group returns, R_var, the invariant policy loss,
per-sample KL coefficients, and agreement with true labels; and group DRO's weights, as PPO's ``dro``
objective and GR-DPO use them.

A *group* here is a set of prompts/trajectories (a domain, inferred or labelled), not GRPO's set of
samples drawn for one prompt. ``probs`` (B, M) is the soft assignment p(g | x, y), rows summing to 1.

Every batch statistic goes through ``reduce``: ``local_sum`` here, ``gipo.distributed.global_sum`` in
training (a sum over the processes' shares of the batch), so a multi-process run computes the same
numbers as one process with the whole batch.
"""

from __future__ import annotations

import math

import torch

from gipo.distributed import Reduce, local_sum
from gipo.losses import sample_mean


def soft_group_means(probs: torch.Tensor, values: torch.Tensor, reduce: Reduce = local_sum,
                     eps: float = 1e-8) -> torch.Tensor:
    """R_g = sum_i p(g|i) v_i / sum_i p(g|i), for each group g: (M,)."""
    numerator = reduce(probs.transpose(0, 1) @ values)
    denominator = reduce(probs.sum(0))
    return numerator / (denominator + eps)


def group_masses(probs: torch.Tensor, reduce: Reduce = local_sum) -> torch.Tensor:
    """Each group's share of the batch, m_g = sum_i p(g|i) / N: (M,), summing to 1."""
    total = reduce(probs.new_tensor(float(probs.shape[0])))
    return reduce(probs.sum(0)) / total


def group_variance(group_values: torch.Tensor, masses: torch.Tensor, kind: str = "unweighted") -> torch.Tensor:
    """Spread of per-group values.

    ``unweighted`` (the paper): the population variance of the M group values.
    ``mass``: between-group variance sum_g m_g (R_g - R_bar)^2 with R_bar = sum_g m_g R_g; a group with
    little mass contributes little, so a tiny extreme tail cannot dominate it.
    """
    if kind == "unweighted":
        return ((group_values - group_values.mean()) ** 2).mean()
    if kind == "mass":
        weights = masses / masses.sum()
        mean = (weights * group_values).sum()
        return (weights * (group_values - mean) ** 2).sum()
    raise ValueError(f"Unknown group variance {kind!r}; allowed: unweighted, mass.")


def invariance_violation(probs: torch.Tensor, values: torch.Tensor, kind: str = "unweighted",
                         reduce: Reduce = local_sum) -> torch.Tensor:
    """R_var = Var_g[R_g]: what the group head maximizes and the policy term minimizes."""
    return group_variance(soft_group_means(probs, values, reduce), group_masses(probs, reduce), kind)


def min_mass_penalty(masses: torch.Tensor, min_mass: float) -> torch.Tensor:
    """sum_g relu(min_mass - m_g)^2: keeps the group head from emptying a group."""
    return torch.relu(min_mass - masses).pow(2).sum()


def group_objective_loss(sample_losses: torch.Tensor, probs: torch.Tensor, objective: str, *, beta: float = 1.0,
                         kind: str = "unweighted", dro_weights: torch.Tensor | None = None,
                         reduce: Reduce = local_sum) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy loss over per-sample PPO losses (B,) given group assignments (held fixed).

    ``none``: the plain mean (PPO). ``variance``: mean + beta * Var_g of the soft group losses (the
    paper). ``macro_mean``: the mean of the group losses. ``dro``: the worst group's loss, or the
    groups weighted by ``dro_weights`` (exponentiated-gradient group DRO) when given.
    Returns the loss and the soft per-group losses (M,).
    """
    probs = probs.detach()
    group_losses = soft_group_means(probs, sample_losses, reduce)
    if objective == "none":
        return sample_mean(sample_losses, reduce), group_losses
    if objective == "variance":
        variance = group_variance(group_losses, group_masses(probs, reduce), kind)
        return sample_mean(sample_losses, reduce) + beta * variance, group_losses
    if objective == "macro_mean":
        return group_losses.mean(), group_losses
    if objective == "dro":
        if dro_weights is None:
            return group_losses.max(), group_losses
        return group_robust_loss(group_losses, dro_weights), group_losses
    raise ValueError(f"Unknown group objective {objective!r}; allowed: none, variance, macro_mean, dro.")


def update_dro_weights(weights: torch.Tensor, group_losses: torch.Tensor, step_size: float) -> torch.Tensor:
    """Exponentiated-gradient step of group DRO (Sagawa et al., 2020): q_g <- q_g exp(eta L_g), normalized.

    Also GR-DPO's step of alpha, on :func:`importance_weighted_group_losses` (where a group with no pair in
    the batch has L_g = 0, so its weight gets no factor of its own, only the renormalization).
    """
    new = weights * torch.exp(step_size * group_losses.detach())
    return new / new.sum()


def importance_weighted_group_losses(sample_losses: torch.Tensor, probs: torch.Tensor, group_shares: torch.Tensor,
                                     batch_size: int, reduce: Reduce = local_sum) -> torch.Tensor:
    """GR-DPO's per-group losses (Ramesh et al., 2024) from a batch drawn from the whole training set: (M,).

        L_g = (N / N_g) * (1 / B) * sum_{i in batch, i in g} l_i

    with N training pairs, N_g of them in group g (``group_shares`` = N_g / N) and B = ``batch_size``.
    Where the N / N_g goes: the paper's Algorithm 1 draws a group with probability N_g / N and weighs
    that pair's loss by N / N_g, in both the alpha step and the policy step; the authors' code
    (``divide_by_totalcount``) takes N * sum_{i in g} l_i / N_g over a batch. We divide that by B: the
    mean over the batch of Algorithm 1's per-pair terms. So L_g estimates group g's mean loss without bias
    (a group's share of the batch, B_g / B, is N_g / N on average), its scale does not grow with the
    batch, and a batch split into micro-batches (each passing the whole batch's B) gives parts that add
    up to the batch's L_g. It is *not* the group's mean loss in this batch scaled by N / N_g: that would
    count a small group N / N_g times over. A group absent from the batch gets L_g = 0.
    ``probs`` (B, M) is one-hot for labelled pairs; ``reduce`` sums over processes' shares of the batch.
    """
    return reduce(probs.transpose(0, 1) @ sample_losses) / (group_shares * batch_size)


def group_robust_loss(group_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_g alpha_g L_g: GR-DPO's policy objective, the groups weighed by ``weights`` (held fixed)."""
    return (weights.detach() * group_losses).sum()


def rank_weights(group_returns: torch.Tensor) -> torch.Tensor:
    """Weight per group by rank of its return: 1 for the highest, 0 for the lowest, linear between.

    At M = 2 this is the indicator of g_high, so the per-sample coefficient is p(g_high | x, y).
    """
    m = group_returns.shape[0]
    if m == 1:
        return torch.ones_like(group_returns)
    ranks = torch.empty_like(group_returns)
    ranks[torch.argsort(group_returns, descending=True)] = torch.arange(m, dtype=group_returns.dtype,
                                                                         device=group_returns.device)
    return 1.0 - ranks / (m - 1)


def adaptive_kl_coefficients(probs: torch.Tensor, group_returns: torch.Tensor, eta: float,
                             floor: float = 0.0) -> torch.Tensor:
    """Per-sample KL coefficient eta * max(floor, sum_g p(g|i) w_g), w from :func:`rank_weights`."""
    weight = probs @ rank_weights(group_returns)
    return eta * weight.clamp(min=floor)


def normalized_mutual_information(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """NMI (arithmetic normalization) between two labelings of the same samples; 1 = same partition."""
    predicted, true = predicted.long().tolist(), true.long().tolist()
    n = len(predicted)
    if n == 0:
        return 0.0
    joint: dict[tuple[int, int], int] = {}
    for a, b in zip(predicted, true, strict=True):
        joint[(a, b)] = joint.get((a, b), 0) + 1
    count_a = {a: predicted.count(a) for a in set(predicted)}
    count_b = {b: true.count(b) for b in set(true)}
    mutual = sum(c / n * math.log(c * n / (count_a[a] * count_b[b])) for (a, b), c in joint.items())
    entropy_a = -sum(c / n * math.log(c / n) for c in count_a.values())
    entropy_b = -sum(c / n * math.log(c / n) for c in count_b.values())
    if entropy_a + entropy_b == 0:
        return 1.0
    return 2 * mutual / (entropy_a + entropy_b)


# --- Groups without a critic: per-prompt signals, difficulty bins, where the samples go ------------------

def difficulty_bins(pass_rates: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Prompt-GDRO's bins (Panaganti et al., 2026): equal-width pass-rate bins over [0, 1], bin 0 the hardest
    (lowest pass rate), a rate of 1 in the last bin: (P,) long."""
    return (pass_rates.clamp(0, 1) * num_bins).long().clamp(max=num_bins - 1)


def update_sampling_weights(weights: torch.Tensor, loss_ema: torch.Tensor, seen: torch.Tensor, step_size: float,
                            floor: float) -> torch.Tensor:
    """Multiplicative weights over groups for sampling prompts: q_g <- q_g exp(eta * Lbar_g), normalized, then
    mixed with the uniform distribution (q <- (1 - floor) q + floor / M) so that no group stops being sampled.

    ``loss_ema`` (M,) is an EMA of each group's *mean* loss (Prompt-GDRO's EMA-debiased score): a group's weight
    grows because it stays hard, not because many of its prompts were drawn. A group not ``seen`` yet scores the
    mean of those seen: it is neither favoured nor held back for being unknown."""
    if not seen.any():
        return weights
    scores = torch.where(seen, loss_ema, loss_ema[seen].mean())
    new = weights * torch.exp(step_size * (scores - scores.max()))  # shifted: the same after normalizing
    new = new / new.sum()
    return (1 - floor) * new + floor / len(new)


def update_loss_ema(loss_ema: torch.Tensor, group_losses: torch.Tensor, observed: torch.Tensor, seen: torch.Tensor,
                    decay: float) -> torch.Tensor:
    """EMA of each group's mean loss, moved only for the groups ``observed`` (M,) bool in this batch; a group's
    first observation (not ``seen`` before) starts it."""
    moved = torch.where(seen, decay * loss_ema + (1 - decay) * group_losses, group_losses)
    return torch.where(observed, moved, loss_ema)


def select_by_group_weights(candidate_groups: list[int], weights: torch.Tensor, n: int,
                            generator: torch.Generator) -> list[int]:
    """Positions of ``n`` candidates chosen so that their groups follow ``weights`` (M,): draw a group from the
    weights (renormalized over the groups that still have unused candidates), then its next unused candidate.
    Candidates come in a random order already, so "next" is a random member."""
    by_group: dict[int, list[int]] = {}
    for position, group in enumerate(candidate_groups):
        by_group.setdefault(group, []).append(position)
    chosen: list[int] = []
    for _ in range(min(n, len(candidate_groups))):
        available = torch.tensor([float(bool(by_group.get(g))) for g in range(len(weights))])
        probs = weights.float().cpu() * available
        group = int(torch.multinomial(probs / probs.sum(), 1, generator=generator)) if probs.sum() > 0 else \
            next(g for g in range(len(weights)) if by_group.get(g))
        chosen.append(by_group[group].pop(0))
    return chosen


# --- Prompt-GDRO as published (Panaganti et al., 2026): pass-rate bins with hysteresis, weights on advantages --

def bins_with_hysteresis(pass_rates: torch.Tensor, current: torch.Tensor, num_bins: int,
                         hysteresis: float) -> torch.Tensor:
    """Each prompt's pass-rate bin (P,) long, among ``num_bins`` equal-width bins over [0, 1], bin 0 the hardest.
    A prompt already in a bin (``current`` >= 0; -1 for none yet) moves only once its rate is past the edge it
    crosses by ``hysteresis``: up when rate >= upper edge + delta, down when rate <= lower edge - delta, so a
    rate wavering at an edge does not flip its bin every visit."""
    plain = difficulty_bins(pass_rates, num_bins)
    lower = current.clamp(min=0).float() / num_bins
    upper = (current.clamp(min=0).float() + 1) / num_bins
    moves = (pass_rates >= upper + hysteresis) | (pass_rates <= lower - hysteresis)
    return torch.where((current < 0) | moves, plain, current)


def gdro_bin_weights(scores: torch.Tensor, present: torch.Tensor, eta: float, gamma: float) -> torch.Tensor:
    """Prompt-GDRO's bin weights over the bins ``present`` in the batch (M,) bool: w_b = exp(eta s_b),
    normalized over the present bins and mixed with the uniform over them, q_b = (1 - gamma) w_b / sum w +
    gamma / |present|; an absent bin gets 0. (M,)"""
    shifted = torch.where(present, eta * scores, torch.full_like(scores, -math.inf))
    w = torch.softmax(shifted - shifted.max(), dim=0)  # exp(eta s) / sum exp(eta s), overflow-safe
    return torch.where(present, (1 - gamma) * w + gamma / present.sum(), torch.zeros_like(w))


def gdro_sample_weights(bin_weights: torch.Tensor, bins: torch.Tensor, cap: float,
                        reduce: Reduce = local_sum) -> torch.Tensor:
    """Each sample's advantage multiplier (B,): its bin's weight, rescaled so that the batch's mean weight is 1,
    then capped at ``cap`` (the cap after the rescale, as the authors' code applies it). ``bins`` (B,) long."""
    raw = bin_weights[bins]
    count = reduce(raw.new_tensor(float(raw.numel())))
    return (raw * count / reduce(raw.sum())).clamp(max=cap)


def learnability(pass_rates: torch.Tensor) -> torch.Tensor:
    """p (1 - p): the variance of a prompt's 0/1 success at pass rate p (Foster et al., 2025), largest at p = 1/2."""
    p = pass_rates.clamp(0, 1)
    return p * (1 - p)
