"""PPO math as pure functions of tensors: no models, no state, each unit-tested by hand.

Shapes: B samples, T response tokens; ``mask`` (B, T) is 1 on response tokens (EOS included) and 0
on padding after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gipo.distributed import Reduce, local_sum


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                reduce: Reduce = local_sum) -> torch.Tensor:
    """Mean over the masked entries; with ``dim``, per row. ``reduce`` makes the whole-tensor mean one
    over all processes' entries (a token-weighted mean of the global batch)."""
    if dim is None:
        return reduce(masked_sum(values, mask)) / reduce(mask.sum()).clamp(min=1)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               reduce: Reduce = local_sum) -> torch.Tensor:
    mean = masked_mean(values, mask, reduce=reduce)
    var = masked_mean((values - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        n = reduce(mask.sum())
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce: Reduce = local_sum) -> torch.Tensor:
    """Zero mean (optional) and unit variance over the masked entries (of all processes, with ``reduce``)."""
    mean, var = masked_mean(values, mask, reduce=reduce), masked_var(values, mask, reduce=reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor,
                         log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax(logits)[tokens], without materializing the full log-softmax tensor. ``log_normalizer``
    is logsumexp(logits, -1) where the caller has it already (one pass over the vocabulary less)."""
    if log_normalizer is None:
        log_normalizer = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normalizer


def entropy_from_logits(logits: torch.Tensor, log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by ``logits``: log Z - sum p * logits, with
    p = exp(logits - log Z); ``log_normalizer`` (log Z) as in :func:`logprobs_from_logits`."""
    if log_normalizer is None:
        log_normalizer = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - log_normalizer.unsqueeze(-1))
    return log_normalizer - (probs * logits).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = (r - 1) - log r with
    r = pi_ref / pi (unbiased, never negative, lower variance near the reference).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator {estimator!r}; allowed: k1, k3.")


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: torch.Tensor | float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL on every token, plus the score on the last response token.

    ``kl_coef`` is a float or a per-sample tensor (B,): the seam for group-adaptive KL.
    """
    coef = kl_coef.unsqueeze(-1) if isinstance(kl_coef, torch.Tensor) else kl_coef
    rewards = -coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded responses.

    The value after the last response token is 0 (the episode ends there). Returns advantages and
    returns (advantages + values), both zero on padding.
    """
    values = values * mask
    rewards = rewards * mask
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(next_advantage)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, clip_range_high: float | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1 - eps, 1 + eps_high)), with r = pi / pi_old.

    ``clip_range_high`` (DAPO's clip-higher, Yu et al., 2025) lets the ratio of a token with a positive
    advantage rise further than ``clip_range`` lets it fall; None clips symmetrically.
    Returns the (B, T) loss and per-token stats (clipped indicator, approximate KL to the old policy)
    for the caller to average under its mask.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = clip_range if clip_range_high is None else clip_range_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    stats = {"clipped": (clipped > unclipped).float(), "approxkl": 0.5 * log_ratio.detach() ** 2,
             "ratio": ratio.detach()}
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip within clip_range_value of the old V.

    Returns the (B, T) loss and the clipped indicator.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped).float()


def sample_mean(values: torch.Tensor, reduce: Reduce = local_sum) -> torch.Tensor:
    """Mean of per-sample values (B,) over the batch (of all processes, with ``reduce``)."""
    return reduce(values.sum()) / reduce(values.new_tensor(float(values.shape[0])))


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregated_sample_losses(token_losses: torch.Tensor, mask: torch.Tensor, aggregation: str, *,
                             max_tokens: int, keep: torch.Tensor | None = None,
                             reduce: Reduce = local_sum) -> torch.Tensor:
    """Per-sample losses (B,) whose plain mean over the batch is the batch loss under ``aggregation``, so that
    group objectives, which weight per-sample losses, work with every aggregation.

    ``seq_mean_token_mean``: the mean over samples of each sample's token mean (PPO's and GRPO's);
    ``token_mean``: the mean over every token of the batch (a long response weighs more; DAPO's);
    ``seq_mean_token_sum_norm``: the sum over tokens divided by ``max_tokens`` per sample (Dr. GRPO's constant
    normalizer, free of the length bias). ``keep`` (B,) 0/1 drops samples: they add nothing and are not
    counted (filtered prompts, truncated responses).
    """
    count = reduce(mask.new_tensor(float(mask.shape[0])))
    if keep is not None:
        mask = mask * keep.unsqueeze(-1)
        scale = count / reduce(keep.sum()).clamp(min=1)
    else:
        scale = 1.0
    if aggregation == "seq_mean_token_mean":
        return masked_mean(token_losses, mask, dim=1) * scale
    if aggregation == "token_mean":
        return masked_sum(token_losses, mask, dim=1) * count / reduce(mask.sum()).clamp(min=1)
    if aggregation == "seq_mean_token_sum_norm":
        return masked_sum(token_losses, mask, dim=1) / max_tokens * scale
    raise ValueError(f"Unknown loss aggregation {aggregation!r}; allowed: {', '.join(LOSS_AGGREGATIONS)}.")


def pairwise_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                         center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), plus an optional centring penalty."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def dpo_pair_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                    ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO per pair: -log sigmoid(beta * ((log pi_c - log ref_c) - (log pi_r - log ref_r))), on sequence
    log-probs (B,).

    Returns the per-pair losses (B,) and the per-pair implicit reward margin (detached).
    """
    margin = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin), margin.detach()


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023): the mean of :func:`dpo_pair_losses` over the batch, and the per-pair margin."""
    losses, margin = dpo_pair_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return losses.mean(), margin


ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_correction_weights(train_logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, mask: torch.Tensor,
                               mode: str, high: float, low: float = 0.0) -> torch.Tensor:
    """Importance weights (B, T) for responses sampled by another engine than the one that trains (a vLLM
    engine, a bf16 sampler): r = pi_train / pi_sampling per token (``token_*``) or per response, the product over
    its tokens (``sequence_*``). ``*_truncate`` clamps r to [low, high] (truncated importance sampling);
    ``*_mask`` gives 0 where r falls outside [low, high] (the sample or token is dropped). Detached; 0 on padding."""
    log_ratio = (train_logprobs - sampling_logprobs).detach() * mask
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
    ratio = torch.exp(log_ratio.clamp(-20, 20))
    if mode.endswith("truncate"):
        weights = ratio.clamp(min=low, max=high)
    elif mode.endswith("mask"):
        weights = torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))
    else:
        raise ValueError(f"Unknown rollout correction {mode!r}; allowed: {', '.join(ROLLOUT_CORRECTIONS[1:])}.")
    return weights * mask
