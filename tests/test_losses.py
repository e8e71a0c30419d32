"""Hand-computed checks of the PPO math in gipo.losses.

Every expected number below is worked out in a comment from the definition, not recomputed with the
formula under test. Tensors are float64 so that the hand numbers can be compared tightly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gipo.losses import (
    aggregated_sample_losses,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    dpo_loss,
    dpo_pair_losses,
    entropy_from_logits,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    pairwise_reward_loss,
    shape_rewards,
)
from tests.conftest import D, t

# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_all_and_per_row():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # all: (1 + 2 + 4) / 3 = 7/3; the masked-out 3, 5, 6 must not count.
    assert_close(masked_mean(values, mask), t(7.0 / 3.0))
    # per row: (1 + 2) / 2 = 1.5 and 4 / 1 = 4.
    assert_close(masked_mean(values, mask, dim=1), t([1.5, 4.0]))
    # per column: (1 + 4) / 2 = 2.5, 2 / 1 = 2, nothing / 0 -> 0 (count clamped to 1, no nan).
    assert_close(masked_mean(values, mask, dim=0), t([2.5, 2.0, 0.0]))


def test_masked_var_unbiased_and_biased():
    values = t([[1.0, 2.0, 4.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3.
    # population variance (14/3) / 3 = 14/9; unbiased (14/3) / 2 = 7/3. The padded 100 is ignored.
    assert_close(masked_var(values, mask, unbiased=False), t(14.0 / 9.0))
    assert_close(masked_var(values, mask), t(7.0 / 3.0))


def test_masked_var_single_element_is_zero_not_nan():
    # one unmasked entry: population var 0; the n / (n - 1) factor has its denominator clamped to 1.
    assert_close(masked_var(t([[5.0, 9.0]]), t([[1, 0]])), t(0.0))


def test_masked_whiten():
    values = t([[1.0, 2.0, 4.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    std = math.sqrt(7.0 / 3.0)  # unbiased variance 7/3 from the test above
    # (v - 7/3) / sqrt(7/3): -4/3, -1/3, 5/3 over std; padding -> 0.
    expected = t([[-4.0 / 3.0 / std, -1.0 / 3.0 / std, 5.0 / 3.0 / std, 0.0]])
    assert_close(masked_whiten(values, mask), expected)
    # shift_mean=False keeps the mean: the whitened values + 7/3 on the tokens, padding still 0.
    kept = expected + t([[7.0 / 3.0, 7.0 / 3.0, 7.0 / 3.0, 0.0]])
    assert_close(masked_whiten(values, mask, shift_mean=False), kept)


# ----------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_by_hand():
    # logits (0, ln 2, ln 3): softmax = (1, 2, 3) / 6, so log p(token 2) = ln(1/2), log p(token 0) = ln(1/6).
    logits = t([[0.0, math.log(2.0), math.log(3.0)], [0.0, math.log(2.0), math.log(3.0)]])
    assert_close(logprobs_from_logits(logits, torch.tensor([2, 0])), t([math.log(0.5), math.log(1 / 6)]))


def test_logprobs_stable_for_large_logits():
    # logits (1000, 0): log p(token 1) = 0 - logsumexp(1000, 0) = -1000 - log(1 + e^-1000) = -1000.
    out = logprobs_from_logits(torch.tensor([1000.0, 0.0]), torch.tensor(1))
    assert torch.isfinite(out) and out.item() == pytest.approx(-1000.0)


def test_logprobs_equal_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen, dtype=D) * 3
    tokens = torch.randint(0, 11, (3, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (3, 4)
    assert_close(out, expected)


def test_entropy_by_hand():
    logits = t([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [5.0, 5.0, 5.0, 5.0]])
    # uniform over 4: ln 4. (1/4, 3/4, ~0, ~0): -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3.
    # shifting every logit by 5 changes nothing: ln 4.
    expected = t([math.log(4.0), math.log(4.0) - 0.75 * math.log(3.0), math.log(4.0)])
    assert_close(entropy_from_logits(logits), expected)


def test_a_given_log_normalizer_gives_the_same_logprobs_and_entropy():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 13, generator=gen, dtype=D) * 4
    tokens = torch.randint(0, 13, (2, 5), generator=gen)
    log_z = torch.logsumexp(logits, -1)
    assert_close(logprobs_from_logits(logits, tokens, log_z), logprobs_from_logits(logits, tokens))
    softmax = torch.softmax(logits, -1)
    assert_close(entropy_from_logits(logits, log_z), -(softmax * torch.log_softmax(logits, -1)).sum(-1))


def test_entropy_of_near_one_hot_is_near_zero():
    assert entropy_from_logits(t([50.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-18)


# ----------------------------------------------------------------------------- KL estimators


def test_kl_per_token_by_hand():
    logprobs, ref = t([math.log(0.5), math.log(0.5)]), t([math.log(0.25), math.log(0.5)])
    # k1 = log pi - log pi_ref: ln(0.5 / 0.25) = ln 2, and 0 where they agree.
    assert_close(kl_per_token(logprobs, ref, "k1"), t([math.log(2.0), 0.0]))
    # k3 with r = pi_ref / pi = 1/2: (r - 1) - ln r = -1/2 + ln 2 = 0.19315, and 0 where r = 1.
    assert_close(kl_per_token(logprobs, ref, "k3"), t([-0.5 + math.log(2.0), 0.0]))
    # k1 is negative when pi < pi_ref; k3 is not: r = 2, (2 - 1) - ln 2 = 0.30685.
    assert_close(kl_per_token(ref, logprobs, "k1"), t([-math.log(2.0), 0.0]))
    assert_close(kl_per_token(ref, logprobs, "k3"), t([1.0 - math.log(2.0), 0.0]))


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(t([0.0]), t([0.0]), "k2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k3_never_negative(dtype):
    log_ratio = torch.cat([torch.linspace(-30, 30, 20001, dtype=D), t([1e-12, -1e-12, 1e-7, -1e-7, 1e-4])])
    k3 = kl_per_token(log_ratio.to(dtype), torch.zeros_like(log_ratio, dtype=dtype), "k3")
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()


def test_k1_and_k3_are_unbiased_on_samples():
    # p = (0.5, 0.3, 0.2), q = (0.2, 0.3, 0.5):
    # KL(p || q) = 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = (0.5 - 0.2) ln 2.5 = 0.3 * 0.9162907 = 0.2748872.
    true_kl = 0.3 * math.log(2.5)
    p, q = t([0.5, 0.3, 0.2]), t([0.2, 0.3, 0.5])
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_per_token(logp, logq, "k1"), kl_per_token(logp, logq, "k3")
    # std of k1 is about 0.72, so the standard error of the mean is about 0.0016; k3's is smaller.
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    # k1 takes ln 2.5, 0, -ln 2.5 (so some samples are negative); k3 takes 0.316, 0, 0.584 (never).
    assert (k1 < 0).any() and (k3 >= 0).all()
    # Var k1 = 0.7 * 0.8396 - 0.0756 = 0.512; Var k3 = 0.5 * 0.316^2 + 0.2 * 0.584^2 - 0.0756 = 0.043.
    assert k1.var().item() == pytest.approx(0.512, abs=0.01)
    assert k3.var().item() == pytest.approx(0.043, abs=0.005)


# ----------------------------------------------------------------------------- reward shaping


KL = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
MASK = [[1, 1, 1], [1, 1, 0]]


def test_shape_rewards_float_coef():
    scores, kl, mask = t([1.0, 2.0]), t(KL), t(MASK)
    # row 0: -0.5 * (0.1, 0.2, 0.3) = (-0.05, -0.1, -0.15), score 1 on the last token: -0.15 + 1 = 0.85.
    # row 1: -0.5 * (0.4, 0.5) = (-0.2, -0.25), score 2 on token 1 (the last unmasked): 1.75;
    #        padding 0 (its KL 0.6 and the score must not land there).
    expected = t([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])
    assert_close(shape_rewards(scores, kl, mask, 0.5), expected)
    assert_close(kl, t(KL))  # the input is not modified in place


def test_shape_rewards_per_sample_coef():
    scores, kl, mask = t([1.0, 2.0]), t(KL), t(MASK)
    coef = t([0.5, 0.1])
    # row 0 as above with 0.5; row 1 with 0.1: (-0.04, -0.05 + 2 = 1.95, 0).
    expected = t([[-0.05, -0.1, 0.85], [-0.04, 1.95, 0.0]])
    assert_close(shape_rewards(scores, kl, mask, coef), expected)
    # summed over tokens: the score minus coef * summed KL: 1 - 0.5 * 0.6 = 0.7 and 2 - 0.1 * 0.9 = 1.91.
    assert_close(shape_rewards(scores, kl, mask, coef).sum(-1), t([0.7, 1.91]))


def test_shape_rewards_zero_coef_single_token_response():
    # a one-token response: the score sits on token 0, nothing else.
    out = shape_rewards(t([3.0]), t([[0.7, 0.7, 0.7]]), t([[1, 0, 0]]), 0.0)
    assert_close(out, t([[3.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- GAE


def test_gae_by_hand_with_padding():
    gamma, lam = 0.9, 0.8
    rewards = t([[0.0, 1.0, 5.0]])  # the 5 is on padding and must be ignored
    values = t([[0.5, 0.2, 7.0]])  # the 7 is on padding: the value after the last token is 0
    mask = t([[1, 1, 0]])
    # t=1: delta = 1 + 0.9 * 0 - 0.2 = 0.8; A1 = 0.8.
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32; A0 = -0.32 + 0.9 * 0.8 * 0.8 = -0.32 + 0.576 = 0.256.
    # returns = A + V: 0.756, 1.0; padding 0.
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    assert_close(advantages, t([[0.256, 0.8, 0.0]]))
    assert_close(returns, t([[0.756, 1.0, 0.0]]))


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[1.0, 1.0, 1.0]]), t([[1, 1, 1]])
    # With gamma = lam = 1, A_t = sum_{s >= t} r_s - V_t: 6 - 1 = 5, 5 - 1 = 4, 3 - 1 = 2;
    # returns = reward-to-go: 6, 5, 3.
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    assert_close(advantages, t([[5.0, 4.0, 2.0]]))
    assert_close(returns, t([[6.0, 5.0, 3.0]]))


def test_gae_lam_zero_is_one_step_td():
    rewards, values, mask = t([[1.0, 2.0, 3.0]]), t([[1.0, 2.0, 4.0]]), t([[1, 1, 1]])
    # lam = 0: A_t = r_t + gamma V_{t+1} - V_t with gamma 0.5: 1 + 1 - 1 = 1, 2 + 2 - 2 = 2, 3 + 0 - 4 = -1.
    advantages, _ = compute_gae(rewards, values, mask, 0.5, 0.0)
    assert_close(advantages, t([[1.0, 2.0, -1.0]]))


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """CleanRL-style GAE over one unpadded episode; the value after the last step is 0."""
    advantages = [0.0] * len(rewards)
    last_gae = 0.0
    for step in reversed(range(len(rewards))):
        next_value = values[step + 1] if step + 1 < len(rewards) else 0.0
        delta = rewards[step] + gamma * next_value - values[step]
        last_gae = delta + gamma * lam * last_gae
        advantages[step] = last_gae
    return advantages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_matches_per_sample_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, width, gamma, lam = 6, 7, 0.95, 0.9
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    lengths[0] = width  # at least one full row
    lengths[1] = 1  # and a one-token one
    mask = (torch.arange(width)[None, :] < lengths[:, None]).to(D)
    # garbage on the padding: it must not leak into the result
    rewards = torch.randn(batch, width, generator=gen, dtype=D)
    values = torch.randn(batch, width, generator=gen, dtype=D)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    for i in range(batch):
        n = int(lengths[i])
        expected = reference_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert advantages[i, :n].tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert returns[i, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[i, :n].tolist(), strict=True)], rel=1e-10, abs=1e-12)
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()


# ----------------------------------------------------------------------------- PPO losses


def test_clipped_policy_loss_cases():
    clip = 0.2
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 0.9, 1.5]
    adv = t([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 2.0])
    logprobs = t([math.log(r) for r in ratios]).requires_grad_()
    old = torch.zeros(len(ratios), dtype=D)
    loss, stats = clipped_policy_loss(logprobs, old, adv, clip)
    # loss = max(-A r, -A clip(r, 0.8, 1.2)):
    # A=+1 r=1.1 inside:           max(-1.1, -1.1) = -1.1, not clipped
    # A=+1 r=1.5 above the range:  max(-1.5, -1.2) = -1.2, clipped (no gain from pushing r further)
    # A=+1 r=0.5 below the range:  max(-0.5, -0.8) = -0.5, not clipped (the pessimistic term is unclipped)
    # A=-1 r=0.5 below the range:  max( 0.5,  0.8) =  0.8, clipped
    # A=-1 r=1.5 above the range:  max( 1.5,  1.2) =  1.5, not clipped
    # A=-1 r=0.9 inside:           max( 0.9,  0.9) =  0.9, not clipped
    # A=+2 r=1.5 above the range:  max(-3.0, -2.4) = -2.4, clipped
    assert_close(loss, t([-1.1, -1.2, -0.5, 0.8, 1.5, 0.9, -2.4]))
    assert stats["clipped"].tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert_close(stats["ratio"], t(ratios))
    # approxkl = 0.5 (log r)^2
    assert_close(stats["approxkl"], t([0.5 * math.log(r) ** 2 for r in ratios]))
    # d loss / d log pi = -A r where unclipped, 0 where clipped:
    loss.sum().backward()
    assert_close(logprobs.grad, t([-1.1, 0.0, -0.5, 0.0, 1.5, 0.9, 0.0]))


def test_clipped_policy_loss_ratio_one_is_minus_advantage():
    adv = t([[0.3, -2.0]])
    loss, stats = clipped_policy_loss(t([[-1.0, -3.0]]), t([[-1.0, -3.0]]), adv, 0.1)
    # r = 1 exactly: loss = -A, nothing clipped, approxkl 0
    assert_close(loss, t([[-0.3, 2.0]]))
    assert stats["clipped"].sum() == 0 and stats["approxkl"].sum() == 0


def test_clipped_value_loss_cases():
    clip = 0.2
    values = t([1.1, 1.5, 1.5, 0.5, 0.5]).requires_grad_()
    old = t([1.0, 1.0, 1.0, 1.0, 1.0])
    returns = t([2.0, 2.0, 1.0, 2.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip)
    # V_clip = old + clamp(V - old, -0.2, 0.2); loss = 0.5 max((V - R)^2, (V_clip - R)^2)
    # V=1.1 inside: V_clip = 1.1, both 0.81 -> 0.405, not clipped
    # V=1.5 R=2: V_clip = 1.2; (0.5)^2 = 0.25 vs (0.8)^2 = 0.64 -> 0.32, clipped
    # V=1.5 R=1: V_clip = 1.2; 0.25 vs 0.04 -> 0.125, not clipped
    # V=0.5 R=2: V_clip = 0.8; 2.25 vs 1.44 -> 1.125, not clipped
    # V=0.5 R=0: V_clip = 0.8; 0.25 vs 0.64 -> 0.32, clipped
    assert_close(loss, t([0.405, 0.32, 0.125, 1.125, 0.32]))
    assert clipped.tolist() == [0, 1, 0, 0, 1]
    # gradient (V - R) where unclipped, 0 where the clipped term wins: -0.9, 0, 0.5, -1.5, 0
    loss.sum().backward()
    assert_close(values.grad, t([-0.9, 0.0, 0.5, -1.5, 0.0]))


AGG_VALUES = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
AGG_MASK = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # the last row is padding only


def test_seq_mean_token_mean_is_each_samples_token_mean():
    # (1 + 2) / 2 = 1.5; (4 + 5 + 6) / 3 = 5; an empty row gives 0, not nan.
    losses = aggregated_sample_losses(AGG_VALUES, AGG_MASK, "seq_mean_token_mean", max_tokens=3)
    assert_close(losses, t([1.5, 5.0, 0.0]))


def test_token_mean_weighs_every_token_alike():
    # 5 tokens: (1 + 2 + 4 + 5 + 6) / 5 = 3.6; per sample: token sum * 3 samples / 5 tokens -> 1.8, 9, 0.
    losses = aggregated_sample_losses(AGG_VALUES, AGG_MASK, "token_mean", max_tokens=3)
    assert_close(losses, t([1.8, 9.0, 0.0]))
    assert_close(losses.mean(), t(3.6))


def test_seq_mean_token_sum_norm_divides_by_the_constant_length():
    # Dr. GRPO: token sums 3 and 15 over max_tokens=4 -> 0.75, 3.75; the batch loss is 18 / (3 * 4) = 1.5.
    losses = aggregated_sample_losses(AGG_VALUES, AGG_MASK, "seq_mean_token_sum_norm", max_tokens=4)
    assert_close(losses, t([0.75, 3.75, 0.0]))
    assert_close(losses.mean(), t(1.5))


def test_dropped_samples_add_nothing_and_are_not_counted():
    keep = t([1.0, 0.0, 1.0])
    # Kept: samples 0 and 2 (the empty one); the mean over the 2 kept is (1.5 + 0) / 2 = 0.75.
    losses = aggregated_sample_losses(AGG_VALUES, AGG_MASK, "seq_mean_token_mean", max_tokens=3, keep=keep)
    assert_close(losses.mean(), t(0.75))
    assert losses[1].item() == 0.0
    # token_mean over the kept tokens only: (1 + 2) / 2 = 1.5.
    losses = aggregated_sample_losses(AGG_VALUES, AGG_MASK, "token_mean", max_tokens=3, keep=keep)
    assert_close(losses.mean(), t(1.5))
    with pytest.raises(ValueError, match="allowed: token_mean"):
        aggregated_sample_losses(AGG_VALUES, AGG_MASK, "sum", max_tokens=3)


def test_clip_higher_lets_a_positive_advantage_ratio_rise_further():
    logprobs = torch.log(t([1.25, 1.25, 0.7]))
    old = t([0.0, 0.0, 0.0])
    advantages = t([1.0, 1.0, -1.0])
    # Symmetric 0.2: ratio 1.25 is clipped to 1.2 -> loss -1.2. With clip_range_high 0.28 it is not: -1.25.
    # Ratio 0.7 with A < 0: max(0.7, 0.8) = 0.8 either way (the low side keeps clip_range).
    symmetric, _ = clipped_policy_loss(logprobs.view(1, -1), old.view(1, -1), advantages.view(1, -1), 0.2)
    higher, stats = clipped_policy_loss(logprobs.view(1, -1), old.view(1, -1), advantages.view(1, -1), 0.2, 0.28)
    assert_close(symmetric, t([[-1.2, -1.2, 0.8]]))
    assert_close(higher, t([[-1.25, -1.25, 0.8]]))
    assert stats["clipped"].tolist() == [[0.0, 0.0, 1.0]]


def test_pairwise_reward_loss():
    chosen, rejected = t([1.0, 0.0]), t([0.0, 0.0])
    # -log sigmoid(1) = ln(1 + e^-1) = 0.3132617; -log sigmoid(0) = ln 2 = 0.6931472; mean 0.5032044.
    plain = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert pairwise_reward_loss(chosen, rejected).item() == pytest.approx(plain, rel=1e-12)
    assert pairwise_reward_loss(chosen, rejected, 0.0).item() == pytest.approx(plain, rel=1e-12)
    # centring: 0.1 * mean((1 + 0)^2, (0 + 0)^2) = 0.1 * 0.5 = 0.05.
    assert pairwise_reward_loss(chosen, rejected, 0.1).item() == pytest.approx(plain + 0.05, rel=1e-12)
    # swapping chosen and rejected: -log sigmoid(-1) = ln(1 + e) = 1.3132617, mean with ln 2 = 1.0032044.
    swapped = (math.log(1 + math.e) + math.log(2.0)) / 2
    assert pairwise_reward_loss(rejected, chosen).item() == pytest.approx(swapped, rel=1e-12)


def test_pairwise_reward_loss_gradient_direction():
    chosen, rejected = t([0.5]).requires_grad_(), t([0.5]).requires_grad_()
    pairwise_reward_loss(chosen, rejected, 1.0).backward()
    # d/dc [-log sigmoid(c - r)] = -(1 - sigmoid(0)) = -0.5; centring adds 2 * (c + r) = 2.
    assert chosen.grad.item() == pytest.approx(-0.5 + 2.0)
    # d/dr: +0.5 + 2.
    assert rejected.grad.item() == pytest.approx(0.5 + 2.0)


def test_dpo_pair_losses_by_hand():
    # beta = 0.5; pair 1: (log pi_c - log ref_c) - (log pi_r - log ref_r) = (-1 + 2) - (-3 + 2) = 2, margin 1;
    # pair 2: (-2 + 2) - (-1 + 2) = -1, margin -0.5.
    chosen, rejected = t([-1.0, -2.0]).requires_grad_(), t([-3.0, -1.0])
    ref_chosen, ref_rejected = t([-2.0, -2.0]), t([-2.0, -2.0])
    losses, margin = dpo_pair_losses(chosen, rejected, ref_chosen, ref_rejected, 0.5)
    assert_close(margin, t([1.0, -0.5]))
    # -log sigmoid(1) = ln(1 + e^-1) = 0.3132617; -log sigmoid(-0.5) = ln(1 + e^0.5) = 0.9740770.
    assert_close(losses, t([0.3132617, 0.9740770]), rtol=0, atol=1e-7)
    assert not margin.requires_grad
    # dpo_loss is their mean, 0.6436693, with the same margins.
    mean, same_margin = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5)
    assert mean.item() == pytest.approx(0.6436693, abs=1e-7)
    assert_close(same_margin, margin)
    # d/d log pi_c of -log sigmoid(beta * x) = -beta * sigmoid(-beta * x): -0.5 * sigmoid(-1) = -0.1344707 for
    # pair 1 and -0.5 * sigmoid(0.5) = -0.3112296 for pair 2; a lower loss wants a larger log pi_c.
    losses.sum().backward()
    assert_close(chosen.grad, t([-0.1344707, -0.3112296]), rtol=0, atol=1e-7)


def test_rollout_correction_weights_by_hand():
    from gipo.losses import rollout_correction_weights

    train = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.4, 0.4, 0.1]]))
    sampling = torch.log(torch.tensor([[0.1, 0.9, 0.4], [0.2, 0.8, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Per token r = 5, 1, 0.5 and 2, 0.5 (the last token is padding).
    torch.testing.assert_close(rollout_correction_weights(train, sampling, mask, "token_truncate", 2.0),
                               torch.tensor([[2.0, 1.0, 0.5], [2.0, 0.5, 0.0]]))
    torch.testing.assert_close(rollout_correction_weights(train, sampling, mask, "token_mask", 2.5, 0.6),
                               torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    # Per response: 5 * 1 * 0.5 = 2.5 and 2 * 0.5 = 1.
    torch.testing.assert_close(rollout_correction_weights(train, sampling, mask, "sequence_truncate", 2.0),
                               torch.tensor([[2.0, 2.0, 2.0], [1.0, 1.0, 0.0]]))
    torch.testing.assert_close(rollout_correction_weights(train, sampling, mask, "sequence_mask", 2.0),
                               torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
