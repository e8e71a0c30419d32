"""Groups of prompts without a critic: hand-computed bins, sampling weights and per-prompt signals; a head that
finds hidden domains from hidden states; the choice of prompts by group weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gipo.config import PPOConfig, build_config
from gipo.estimators import per_prompt_mean
from gipo.groups import (
    difficulty_bins,
    normalized_mutual_information,
    select_by_group_weights,
    update_loss_ema,
    update_sampling_weights,
)
from gipo.prompt_groups import DifficultyTracker, PromptGroups, train_group_head
from tests.conftest import t


def test_per_prompt_means_of_side_by_side_samples():
    # Prompts (1, 0, 1, 1) and (0, 0, 0.5, 0.5): means 0.75 and 0.25.
    assert_close(per_prompt_mean(t([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5]), 4), t([0.75, 0.25]))
    assert_close(per_prompt_mean(t([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5]), torch.tensor([2, 5, 1])),
                 t([0.5, 0.5, 0.5]))


def test_difficulty_bins_are_equal_width_with_the_hardest_first():
    # 3 bins over [0, 1]: [0, 1/3), [1/3, 2/3), [2/3, 1]; a rate of exactly 1 lands in the last bin.
    assert difficulty_bins(t([0.0, 0.2, 0.34, 0.66, 0.7, 1.0]), 3).tolist() == [0, 0, 1, 1, 2, 2]


def test_difficulty_tracker_ema_and_prior():
    tracker = DifficultyTracker(decay=0.8)
    assert tracker.pass_rates([7]).tolist() == [0.5]  # nothing seen: 0.5
    tracker.update([7, 9], [1.0, 0.0])  # first sight sets the rate
    tracker.update([7], [0.5])  # 0.8 * 1 + 0.2 * 0.5 = 0.9
    # An unseen prompt takes the mean of those seen: (0.9 + 0) / 2 = 0.45.
    assert_close(tracker.pass_rates([7, 9, 3]), torch.tensor([0.9, 0.0, 0.45]))


def test_loss_ema_starts_at_the_first_observation_and_moves_only_observed_groups():
    ema = t([0.0, -0.5, 0.0])
    seen = torch.tensor([False, True, False])
    observed = torch.tensor([True, True, False])
    # group 0: first sight -> -0.2; group 1: 0.5 * -0.5 + 0.5 * -0.9 = -0.7; group 2 unobserved: stays 0.
    assert_close(update_loss_ema(ema, t([-0.2, -0.9, -0.4]), observed, seen, 0.5), t([-0.2, -0.7, 0.0]))


def test_sampling_weights_multiplicative_step_and_floor():
    weights = t([0.5, 0.5])
    seen = torch.tensor([True, True])
    # Losses -0.2 (hard) and -0.8 (easy), eta 1: q ~ (0.5 e^-0.2, 0.5 e^-0.8) -> e^0.6 / (1 + e^0.6) = 0.6457 for
    # the hard group; floor 0.1: 0.9 * 0.6457 + 0.05 = 0.6311.
    hard = math.exp(0.6) / (1 + math.exp(0.6))
    new = update_sampling_weights(weights, t([-0.2, -0.8]), seen, 1.0, 0.1)
    assert_close(new, t([0.9 * hard + 0.05, 0.9 * (1 - hard) + 0.05]))
    # A group not seen yet scores the mean of the seen ones: with one seen group, nothing moves but the floor.
    assert_close(update_sampling_weights(weights, t([-0.2, 0.0]), torch.tensor([True, False]), 1.0, 0.0), weights)


def test_selection_follows_the_group_weights():
    groups = [0] * 50 + [1] * 50
    generator = torch.Generator().manual_seed(0)
    chosen = select_by_group_weights(groups, torch.tensor([0.9, 0.1]), 40, generator)
    assert len(set(chosen)) == 40  # no candidate twice
    share_0 = sum(groups[p] == 0 for p in chosen) / 40
    assert 0.75 <= share_0 <= 1.0
    # A group with no weight is taken only once the others have run out of candidates.
    chosen = select_by_group_weights([0, 0, 1, 1, 1], torch.tensor([1.0, 0.0]), 3, torch.Generator().manual_seed(1))
    assert [p for p in chosen[:2]] == [0, 1] and chosen[2] in (2, 3, 4)


def test_the_head_finds_hidden_domains_from_hidden_states():
    torch.manual_seed(0)
    domains = torch.arange(64) % 2
    # Hidden states: a domain direction plus noise; the signal (the prompts' mean reward) differs by domain.
    direction = torch.randn(16)
    states = torch.randn(64, 16) * 0.5 + (domains.float() * 2 - 1).unsqueeze(1) * direction
    signal = torch.where(domains == 1, 0.8, 0.2) + 0.05 * torch.randn(64)
    head = torch.nn.Linear(16, 2)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    before = train_group_head(head, optimizer, states, signal, 1)
    after = train_group_head(head, optimizer, states, signal, 100)
    assert after > before
    nmi = normalized_mutual_information(head(states).argmax(-1), domains)
    assert nmi > 0.8, nmi
    # The ideal split's mass-weighted variance: two halves at 0.2 and 0.8 -> 0.5 * 0.3^2 * 2 = 0.09.
    assert after == pytest.approx(0.09, abs=0.02)


def test_unseen_prompts_share_the_prior_bin_while_an_inferred_head_places_them():
    """Prompt-GDRO's bins know a prompt only once it has been drawn: until then it takes the prior (the mean of
    the rates seen), so every unseen prompt lands in one bin and the sampling weights cannot find hard prompts
    among them. The inferred head (``grpo_gipo_sampling``) reads each prompt's hidden state and places it at once."""
    torch.manual_seed(0)
    domains = torch.arange(16) % 2
    direction = torch.randn(8)
    states = torch.randn(16, 8) * 0.3 + (domains.float() * 2 - 1).unsqueeze(1) * direction
    signal = torch.where(domains == 1, 0.9, 0.1)

    def make(method: str) -> PromptGroups:
        config = build_config(PPOConfig, {"method": method, "reward": "gold"})
        return PromptGroups(config, 2, 8, labels=lambda _: domains, states=lambda indices: states[indices],
                            device=torch.device("cpu"))

    difficulty = make("grpo_gdro_sampling")
    difficulty.difficulty.update([0, 1], [0.1, 0.9])  # one hard and one easy prompt seen: prior 0.5, bin 1
    assert difficulty.assign([0, 1]).argmax(-1).tolist() == [0, 1]
    assert difficulty.assign(list(range(2, 16))).argmax(-1).tolist() == [1] * 14

    inferred = make("grpo_gipo_sampling")
    train_group_head(inferred.head, inferred.head_optimizer, states[:8], signal[:8], 100)
    unseen = inferred.assign(list(range(8, 16))).argmax(-1)
    assert normalized_mutual_information(unseen, domains[8:]) == pytest.approx(1.0)
