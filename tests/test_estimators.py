"""Hand-computed checks of the critic-free estimators in gipo.estimators.

Layout: G samples per prompt side by side, so ``[a, b, c, d]`` with G = 2 is prompt 0 = (a, b), prompt 1 = (c, d).
Every expected number is worked out in a comment from the definition.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gipo.estimators import (
    STD_EPS,
    grpo_advantages,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
    zero_std_prompts,
)
from tests.conftest import t


def test_grpo_all_samples_equal_gives_zero_advantage():
    # Prompt 0: all 1.0 -> mean 1, std 0 -> (1 - 1) / (0 + eps) = 0; no division by zero.
    advantages = grpo_advantages(t([1.0, 1.0, 1.0, 0.0, 0.0, 3.0]), 3)
    assert_close(advantages[:3], t([0.0, 0.0, 0.0]))
    assert torch.isfinite(advantages).all()


def test_grpo_one_sample_differs():
    # Prompt (0, 0, 0, 1): mean 0.25; unbiased std = sqrt((3 * 0.0625 + 0.5625) / 3) = sqrt(0.25) = 0.5.
    # -> (0 - 0.25) / 0.5 = -0.5 three times, (1 - 0.25) / 0.5 = 1.5 (up to eps = 1e-4 in the denominator).
    advantages = grpo_advantages(t([0.0, 0.0, 0.0, 1.0]), 4)
    assert_close(advantages, t([-0.25, -0.25, -0.25, 0.75]) / (0.5 + STD_EPS))


def test_grpo_batch_scale_and_none():
    rewards = t([0.0, 2.0, 1.0, 1.0])
    # Centred per prompt: (-1, 1), (0, 0). Batch std of (0, 2, 1, 1): mean 1, unbiased var (1 + 1 + 0 + 0) / 3.
    batch_std = math.sqrt(2 / 3)
    assert_close(grpo_advantages(rewards, 2, "batch"), t([-1.0, 1.0, 0.0, 0.0]) / (batch_std + STD_EPS))
    # Dr. GRPO: no division at all.
    assert_close(grpo_advantages(rewards, 2, "none"), t([-1.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="allowed: group, batch, none"):
        grpo_advantages(rewards, 2, "prompt")


def test_grpo_needs_whole_prompts():
    with pytest.raises(ValueError, match="do not split into prompts of 4"):
        grpo_advantages(t([0.0, 1.0, 2.0]), 4)


def test_rloo_leaves_each_sample_out():
    # Prompt (1, 2, 6): baselines are the others' means: (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    # -> 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5. Prompt (5, 5, 5): all equal -> 0.
    advantages = rloo_advantages(t([1.0, 2.0, 6.0, 5.0, 5.0, 5.0]), 3)
    assert_close(advantages, t([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(t([1.0]), 1)


def test_reward_to_go_with_padding():
    rewards = t([[0.1, 0.2, 1.0], [0.5, 9.0, 9.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])  # the second response is one token; 9.0 sits on padding
    # gamma 0.5: row 0: G_2 = 1, G_1 = 0.2 + 0.5 = 0.7, G_0 = 0.1 + 0.35 = 0.45; row 1: G_0 = 0.5, padding 0.
    assert_close(reward_to_go(rewards, mask, 0.5), t([[0.45, 0.7, 1.0], [0.5, 0.0, 0.0]]))


def test_reinforce_pp_whitens_returns_over_the_batch_tokens():
    rewards = t([[0.0, 1.0], [0.0, 3.0]])
    mask = t([[1, 1], [1, 0]])  # row 1 ends after one token: its 3.0 is padding
    # gamma 1: returns (1, 1) and (0, -); over the 3 tokens: mean 2/3, unbiased var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3.
    std = math.sqrt(1 / 3)
    expected = t([[1 / 3, 1 / 3], [-2 / 3, 0.0]]) / std
    assert_close(reinforce_pp_advantages(rewards, mask, 1.0), expected, atol=1e-6, rtol=1e-6)


def test_zero_std_prompts_marks_every_sample_of_a_uniform_prompt():
    # Prompts (1, 1), (0, 1), (0.5, 0.5): the first and the last teach nothing.
    assert zero_std_prompts(t([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2).tolist() == [True, True, False, False, True, True]
