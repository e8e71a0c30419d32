"""Hand-computed checks of Group Invariant Learning in gipo.groups, its gradients, and group recovery.

Expected numbers are worked out in comments from the definitions (METHOD.md), not recomputed with
the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from gipo import distributed
from gipo.distributed import local_sum
from gipo.groups import (
    adaptive_kl_coefficients,
    group_masses,
    group_objective_loss,
    group_robust_loss,
    group_variance,
    importance_weighted_group_losses,
    invariance_violation,
    min_mass_penalty,
    normalized_mutual_information,
    rank_weights,
    soft_group_means,
    update_dro_weights,
)
from tests.conftest import D, t

# ----------------------------------------------------------------------------- soft group statistics


def test_soft_group_means_by_hand():
    probs = t([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    values = t([1.0, 2.0, 3.0])
    # g0: (1 * 1 + 0.5 * 2 + 0 * 3) / (1 + 0.5 + 0) = 2 / 1.5 = 4/3
    # g1: (0 * 1 + 0.5 * 2 + 1 * 3) / (0 + 0.5 + 1) = 4 / 1.5 = 8/3
    assert_close(soft_group_means(probs, values), t([4.0 / 3.0, 8.0 / 3.0]))


def test_soft_group_means_hard_assignment_and_empty_group():
    probs = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    values = t([1.0, 10.0, 3.0, 20.0])
    # hard groups: mean(1, 3) = 2, mean(10, 20) = 15; the empty group gives 0 / (0 + eps) = 0, not nan.
    assert_close(soft_group_means(probs, values), t([2.0, 15.0, 0.0]))


def test_group_masses_by_hand():
    probs = t([[1.0, 0.0], [1.0, 0.0], [0.25, 0.75], [0.75, 0.25]])
    # column sums 3 and 1 over N = 4: (0.75, 0.25)
    assert_close(group_masses(probs), t([0.75, 0.25]))


def test_group_variance_two_groups():
    values, masses = t([1.0, 3.0]), t([0.75, 0.25])
    # unweighted: mean 2, ((1 - 2)^2 + (3 - 2)^2) / 2 = 1, whatever the masses.
    assert_close(group_variance(values, masses, "unweighted"), t(1.0))
    assert_close(group_variance(values, t([0.5, 0.5])), t(1.0))
    # mass: R_bar = 0.75 * 1 + 0.25 * 3 = 1.5; 0.75 * 0.25 + 0.25 * 2.25 = 0.1875 + 0.5625 = 0.75.
    assert_close(group_variance(values, masses, "mass"), t(0.75))


def test_group_variance_three_groups():
    values = t([0.0, 3.0, 6.0])
    # unweighted: mean 3, (9 + 0 + 9) / 3 = 6.
    assert_close(group_variance(values, t([0.5, 0.25, 0.25]), "unweighted"), t(6.0))
    # mass (0.5, 0.25, 0.25): R_bar = 0 + 0.75 + 1.5 = 2.25;
    # 0.5 * 2.25^2 + 0.25 * 0.75^2 + 0.25 * 3.75^2 = 2.53125 + 0.140625 + 3.515625 = 6.1875.
    assert_close(group_variance(values, t([0.5, 0.25, 0.25]), "mass"), t(6.1875))
    # masses are normalized first: (2, 1, 1) gives the same.
    assert_close(group_variance(values, t([2.0, 1.0, 1.0]), "mass"), t(6.1875))


def test_group_variance_unknown_kind_raises():
    with pytest.raises(ValueError, match="weird"):
        group_variance(t([1.0, 2.0]), t([0.5, 0.5]), "weird")


def test_invariance_violation_by_hand():
    probs = t([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    values = t([1.0, 1.0, 1.0, 5.0])
    # R = (1, 5), masses (0.75, 0.25).
    # unweighted: mean 3, ((1 - 3)^2 + (5 - 3)^2) / 2 = 4.
    assert_close(invariance_violation(probs, values, "unweighted"), t(4.0))
    # mass: R_bar = 0.75 + 1.25 = 2; 0.75 * 1 + 0.25 * 9 = 3: the small group counts for less.
    assert_close(invariance_violation(probs, values, "mass"), t(3.0))
    # a uniform assignment makes both groups equal: no violation.
    assert_close(invariance_violation(torch.full((4, 2), 0.5, dtype=D), values), t(0.0))


def test_min_mass_penalty():
    # relu(0.1 - 0.05)^2 + relu(0.1 - 0.95)^2 = 0.0025 + 0
    assert_close(min_mass_penalty(t([0.05, 0.95]), 0.1), t(0.0025))
    assert_close(min_mass_penalty(t([0.5, 0.5]), 0.1), t(0.0))
    # three groups, min 0.2: 0.2^2 + 0.1^2 + 0 = 0.05
    assert_close(min_mass_penalty(t([0.0, 0.1, 0.9]), 0.2), t(0.05))


# ----------------------------------------------------------------------------- policy objective

LOSSES = [1.0, 2.0, 3.0, 6.0]
PROBS = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
# group losses: mean(1, 2, 3) = 2 and 6; masses (0.75, 0.25); plain mean 12 / 4 = 3.


def test_group_objective_none():
    loss, group_losses = group_objective_loss(t(LOSSES), t(PROBS), "none")
    assert_close(loss, t(3.0))
    assert_close(group_losses, t([2.0, 6.0]))


@pytest.mark.parametrize(("kind", "expected"), [
    # unweighted variance of (2, 6) = 4: 3 + 0.5 * 4 = 5
    ("unweighted", 5.0),
    # mass: R_bar = 0.75 * 2 + 0.25 * 6 = 3; 0.75 * 1 + 0.25 * 9 = 3; 3 + 0.5 * 3 = 4.5
    ("mass", 4.5),
])
def test_group_objective_variance(kind, expected):
    loss, group_losses = group_objective_loss(t(LOSSES), t(PROBS), "variance", beta=0.5, kind=kind)
    assert_close(loss, t(expected))
    assert_close(group_losses, t([2.0, 6.0]))


def test_group_objective_variance_beta_zero_is_plain_mean():
    loss, _ = group_objective_loss(t(LOSSES), t(PROBS), "variance", beta=0.0)
    assert_close(loss, t(3.0))


def test_group_objective_macro_mean():
    # (2 + 6) / 2 = 4, not the sample mean 3
    loss, _ = group_objective_loss(t(LOSSES), t(PROBS), "macro_mean")
    assert_close(loss, t(4.0))


def test_group_objective_dro():
    # the worst group: max(2, 6) = 6
    loss, _ = group_objective_loss(t(LOSSES), t(PROBS), "dro")
    assert_close(loss, t(6.0))
    # weighted: 0.25 * 2 + 0.75 * 6 = 5
    loss, _ = group_objective_loss(t(LOSSES), t(PROBS), "dro", dro_weights=t([0.25, 0.75]))
    assert_close(loss, t(5.0))


def test_group_objective_unknown_raises():
    with pytest.raises(ValueError, match="median"):
        group_objective_loss(t(LOSSES), t(PROBS), "median")


@pytest.mark.parametrize("objective", ["none", "variance", "macro_mean", "dro"])
def test_group_objective_holds_probs_fixed(objective):
    losses = t(LOSSES).requires_grad_()
    probs = t([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]).requires_grad_()
    loss, _ = group_objective_loss(losses, probs, objective, kind="mass")
    loss.backward()
    assert probs.grad is None
    assert losses.grad is not None and losses.grad.abs().sum() > 0


def test_group_objective_gradients_by_hand():
    # none: d mean / d l_i = 1/4 for each of the 4 samples.
    losses = t(LOSSES).requires_grad_()
    group_objective_loss(losses, t(PROBS), "none")[0].backward()
    assert_close(losses.grad, t([0.25] * 4))
    # macro_mean with hard groups {0, 1, 2}, {3}: 0.5 * (1/3, 1/3, 1/3, 1).
    losses = t(LOSSES).requires_grad_()
    group_objective_loss(losses, t(PROBS), "macro_mean")[0].backward()
    assert_close(losses.grad, t([1 / 6, 1 / 6, 1 / 6, 0.5]))
    # dro without weights: only the worst group {3} gets gradient, 1.
    losses = t(LOSSES).requires_grad_()
    group_objective_loss(losses, t(PROBS), "dro")[0].backward()
    assert_close(losses.grad, t([0.0, 0.0, 0.0, 1.0]))
    # variance, unweighted, beta 1: d/dL_g of ((L0 - L1) / 2)^2 is (L0 - L1) / 2 = -2 for g0 and +2 for g1;
    # d L0 / d l_i = 1/3 (i < 3), d L1 / d l_3 = 1; plus 1/4 from the mean: 0.25 - 2/3, ..., 0.25 + 2.
    losses = t(LOSSES).requires_grad_()
    group_objective_loss(losses, t(PROBS), "variance", beta=1.0)[0].backward()
    assert_close(losses.grad, t([0.25 - 2 / 3, 0.25 - 2 / 3, 0.25 - 2 / 3, 2.25]))


def test_update_dro_weights():
    # q * exp(eta L): (0.5 * 1, 0.5 * 3) with eta = 1, L = (0, ln 3); normalized (0.25, 0.75).
    assert_close(update_dro_weights(t([0.5, 0.5]), t([0.0, math.log(3.0)]), 1.0), t([0.25, 0.75]))
    # eta = 0.5, L = (0, ln 4): exp(0.5 ln 4) = 2, so (1/3, 2/3).
    assert_close(update_dro_weights(t([0.5, 0.5]), t([0.0, math.log(4.0)]), 0.5), t([1 / 3, 2 / 3]))
    # a non-uniform start: (0.2, 0.8) * (e^1, e^1) with equal losses stays (0.2, 0.8).
    assert_close(update_dro_weights(t([0.2, 0.8]), t([1.0, 1.0]), 1.0), t([0.2, 0.8]))
    # no gradient flows back into the losses
    losses = t([1.0, 2.0]).requires_grad_()
    assert not update_dro_weights(t([0.5, 0.5]), losses, 1.0).requires_grad


# ----------------------------------------------------------------------------- GR-DPO

# Four pairs, groups (0, 1, 1, 0), per-pair DPO losses (1, 2, 3, 4); the training set is 3/4 group 0 and
# 1/4 group 1 (N_g / N), so group 1 holds half of this batch where it holds a quarter of the data.
GR_LOSSES, GR_PROBS, GR_SHARES = [1.0, 2.0, 3.0, 4.0], [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]], [0.75, 0.25]


def test_importance_weighted_group_losses_by_hand():
    # L_g = (N / N_g) (1 / B) sum_{i in g} l_i with B = 4:
    # group 0: (4/3) * (1 + 4) / 4 = 5/3; group 1: 4 * (2 + 3) / 4 = 5. Both groups' batch means are 2.5:
    # the over-represented group 1 counts twice ((N / N_1) (B_1 / B) = 4 * 1/2), group 0 two thirds.
    losses = importance_weighted_group_losses(t(GR_LOSSES), t(GR_PROBS), t(GR_SHARES), 4)
    assert_close(losses, t([5 / 3, 5.0]))


def test_importance_weighted_group_losses_of_micro_batches_add_up():
    # micro-batches (pairs 0, 1) and (2, 3), each passing the whole batch's B = 4:
    # first: group 0 (4/3) * 1/4 = 1/3, group 1 4 * 2/4 = 2; second: (4/3) * 4/4 = 4/3, 4 * 3/4 = 3.
    first = importance_weighted_group_losses(t(GR_LOSSES[:2]), t(GR_PROBS[:2]), t(GR_SHARES), 4)
    second = importance_weighted_group_losses(t(GR_LOSSES[2:]), t(GR_PROBS[2:]), t(GR_SHARES), 4)
    assert_close(first, t([1 / 3, 2.0]))
    assert_close(second, t([4 / 3, 3.0]))
    assert_close(first + second, t([5 / 3, 5.0]))  # the whole batch's


def test_group_robust_loss_and_its_gradient_by_hand():
    losses = t(GR_LOSSES).requires_grad_()
    group_losses = importance_weighted_group_losses(losses, t(GR_PROBS), t(GR_SHARES), 4)
    weights = t([0.25, 0.75]).requires_grad_()
    loss = group_robust_loss(group_losses, weights)
    # 0.25 * 5/3 + 0.75 * 5 = 5/12 + 45/12 = 25/6
    assert_close(loss, t(25 / 6))
    loss.backward()
    # d/dl_i = alpha_g (N / N_g) / B: group 0 0.25 * (4/3) / 4 = 1/12, group 1 0.75 * 4 / 4 = 3/4
    assert_close(losses.grad, t([1 / 12, 0.75, 0.75, 1 / 12]))
    assert weights.grad is None  # the weights are held fixed


def test_gr_dpo_weight_update_two_groups_by_hand():
    # groups (0, 0, 1, 0) in the data's proportions (3/4, 1/4), losses (1, 1, 3, 1):
    # L_0 = (4/3) * 3/4 = 1, L_1 = 4 * 3/4 = 3. From uniform weights with eta = 0.5:
    # alpha_1 = e^{1.5} / (e^{0.5} + e^{1.5}) = sigmoid(1) = 0.7310586, alpha_0 = sigmoid(-1) = 0.2689414.
    probs = t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    group_losses = importance_weighted_group_losses(t([1.0, 1.0, 3.0, 1.0]), probs, t(GR_SHARES), 4)
    assert_close(group_losses, t([1.0, 3.0]))
    weights = update_dro_weights(t([0.5, 0.5]), group_losses, 0.5)
    assert_close(weights, t([0.2689414, 0.7310586]), rtol=0, atol=1e-7)
    # eta = 0: the weights stay uniform
    assert_close(update_dro_weights(t([0.5, 0.5]), group_losses, 0.0), t([0.5, 0.5]))


def test_gr_dpo_group_absent_from_the_batch_gets_no_factor():
    # three groups, shares (1/2, 1/4, 1/4); the batch holds groups (0, 1, 0, 1), group 2 none; losses all 1:
    # L_0 = 2 * 2/4 = 1, L_1 = 4 * 2/4 = 2, L_2 = 0 (no pair). With eta = ln 2 the factors are 2^L = 2, 4, 1:
    # (0.2, 0.3, 0.5) -> (0.4, 1.2, 0.5), sum 2.1 -> (4/21, 12/21, 5/21).
    probs = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    group_losses = importance_weighted_group_losses(t([1.0] * 4), probs, t([0.5, 0.25, 0.25]), 4)
    assert_close(group_losses, t([1.0, 2.0, 0.0]))
    weights = update_dro_weights(t([0.2, 0.3, 0.5]), group_losses, math.log(2.0))
    assert_close(weights, t([4 / 21, 12 / 21, 5 / 21]))
    # the absent group's weight moved by the renormalization only: alpha_2 / alpha_0 went from 2.5 to 1.25
    # (halved by group 0's factor of 2), alpha_2 / alpha_1 from 5/3 to 5/12 (group 1's factor of 4).
    assert (weights[2] / weights[0]).item() == pytest.approx(1.25)


# ----------------------------------------------------------------------------- adaptive KL


def test_rank_weights_two_groups_is_indicator_of_best():
    assert_close(rank_weights(t([0.3, 0.7])), t([0.0, 1.0]))
    assert_close(rank_weights(t([0.7, 0.3])), t([1.0, 0.0]))
    assert_close(rank_weights(t([-5.0, -6.0])), t([1.0, 0.0]))


def test_rank_weights_linear_in_rank():
    # M = 3, returns (1, 3, 2): ranks from the top 2, 0, 1 -> 1 - rank / 2 = (0, 1, 0.5).
    assert_close(rank_weights(t([1.0, 3.0, 2.0])), t([0.0, 1.0, 0.5]))
    # M = 4, returns (4, 1, 3, 2): ranks 0, 3, 1, 2 -> 1 - rank / 3 = (1, 0, 2/3, 1/3).
    assert_close(rank_weights(t([4.0, 1.0, 3.0, 2.0])), t([1.0, 0.0, 2 / 3, 1 / 3]))


def test_rank_weights_single_group_is_one():
    # M = 1 (oracle groups on single-label data): no rank to weigh by, the full coefficient.
    assert_close(rank_weights(t([0.3])), t([1.0]))


def test_adaptive_kl_two_groups_is_eta_times_p_high():
    probs = t([[0.2, 0.8], [0.9, 0.1]])
    # g_high = 1 (return 2 > 1): eta * p(g1 | i) = 0.05 * (0.8, 0.1) = (0.04, 0.005)
    assert_close(adaptive_kl_coefficients(probs, t([1.0, 2.0]), 0.05), t([0.04, 0.005]))
    # g_high = 0: 0.05 * (0.2, 0.9) = (0.01, 0.045)
    assert_close(adaptive_kl_coefficients(probs, t([2.0, 1.0]), 0.05), t([0.01, 0.045]))


def test_adaptive_kl_floor():
    probs = t([[0.2, 0.8], [0.9, 0.1]])
    # weights (0.8, 0.1) floored at 0.5: (0.8, 0.5), times 0.05: (0.04, 0.025)
    assert_close(adaptive_kl_coefficients(probs, t([1.0, 2.0]), 0.05, floor=0.5), t([0.04, 0.025]))


def test_adaptive_kl_three_groups():
    probs = t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    # returns (3, 1, 2): weights (1, 0, 0.5); sample 0: 0.5 * 1 + 0.5 * 0 = 0.5; sample 1: 0.5. eta 0.1.
    assert_close(adaptive_kl_coefficients(probs, t([3.0, 1.0, 2.0]), 0.1), t([0.05, 0.05]))


# ----------------------------------------------------------------------------- NMI


def labels(values) -> torch.Tensor:
    return torch.tensor(values)


def test_nmi_identical_and_permuted():
    true = labels([0, 0, 1, 1, 2, 2, 2])
    assert normalized_mutual_information(true, true) == pytest.approx(1.0)
    # the same partition under other names
    assert normalized_mutual_information(labels([5, 5, 0, 0, 1, 1, 1]), true) == pytest.approx(1.0)
    assert normalized_mutual_information(labels([1, 1, 0, 0]), labels([0, 0, 1, 1])) == pytest.approx(1.0)


def test_nmi_independent():
    # every predicted cluster holds exactly half of each true cluster: mutual information 0.
    assert normalized_mutual_information(labels([0, 0, 1, 1]), labels([0, 1, 0, 1])) == pytest.approx(0.0)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 2, (4000,), generator=gen), torch.randint(0, 3, (4000,), generator=gen)
    assert normalized_mutual_information(a, b) < 0.01


def test_nmi_by_hand():
    # predicted (0, 0, 1, 1), true (0, 0, 0, 1), n = 4. Joint counts (0,0): 2, (1,0): 1, (1,1): 1;
    # predicted counts 2, 2; true counts 3, 1.
    # I = 2/4 ln(2*4 / (2*3)) + 1/4 ln(1*4 / (2*3)) + 1/4 ln(1*4 / (2*1))
    #   = 0.5 ln(4/3) + 0.25 ln(2/3) + 0.25 ln 2 = 0.143841 - 0.101366 + 0.173287 = 0.215762
    # H_pred = ln 2 = 0.693147; H_true = 0.75 ln(4/3) + 0.25 ln 4 = 0.215762 + 0.346574 = 0.562335
    # NMI = 2 I / (H_pred + H_true) = 0.431523 / 1.255482 = 0.343711
    assert normalized_mutual_information(labels([0, 0, 1, 1]), labels([0, 0, 0, 1])) == pytest.approx(
        0.343711, abs=1e-6)


def test_nmi_degenerate():
    one = labels([3, 3, 3])
    assert normalized_mutual_information(one, one) == 1.0  # one cluster each: the same partition
    assert normalized_mutual_information(one, labels([0, 1, 0])) == pytest.approx(0.0)
    assert normalized_mutual_information(labels([]), labels([])) == 0.0


# ----------------------------------------------------------------------------- reduce (multi-process)


class TwoProcessReduce:
    """Emulates an all-reduce sum over two processes, in one: the other process's tensors are recorded
    first (in call order) and added to ours. Valid because every reduce input in gipo.groups is local."""

    def __init__(self, other: list[torch.Tensor] | None = None):
        self.recorded: list[torch.Tensor] = []
        self.other = other

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.other is None:
            self.recorded.append(tensor.detach().clone())
            return tensor
        return tensor + self.other.pop(0)


def sharded(fn, *tensors):
    """fn(*shard, reduce) on the first half of the batch, with the second half on the 'other process'."""
    recorder = TwoProcessReduce()
    fn(*[x[3:] for x in tensors], recorder)
    adder = TwoProcessReduce(recorder.recorded)
    out = fn(*[x[:3] for x in tensors], adder)
    assert adder.other == []  # both processes made the same reduce calls
    return out


def test_reduce_over_two_processes_equals_whole_batch():
    probs = t([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    values = t([1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 7.0])
    for kind in ("unweighted", "mass"):
        whole = invariance_violation(probs, values, kind)
        assert_close(sharded(lambda p, v, r, k=kind: invariance_violation(p, v, k, r), probs, values), whole)
    assert_close(sharded(lambda p, r: group_masses(p, r), probs), group_masses(probs))
    for objective in ("none", "variance", "macro_mean", "dro"):
        whole, whole_groups = group_objective_loss(values, probs, objective, beta=0.7, kind="mass")
        loss, groups = sharded(lambda v, p, r, o=objective: group_objective_loss(v, p, o, beta=0.7, kind="mass",
                                                                                 reduce=r), values, probs)
        assert_close(loss, whole)
        assert_close(groups, whole_groups)


def test_global_sum_is_identity_without_distributed():
    x = t([1.0, 2.0])
    assert distributed.global_sum(x) is x and local_sum(x) is x


# ----------------------------------------------------------------------------- gradient directions


@pytest.mark.parametrize("kind", ["unweighted", "mass"])
def test_group_head_ascent_step_raises_violation(kind):
    torch.manual_seed(0)
    features = torch.randn(32, 5)
    values = features[:, 0] + 0.5 * torch.randn(32)
    head = torch.nn.Linear(5, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5, maximize=True)

    def violation() -> torch.Tensor:
        return invariance_violation(torch.softmax(head(features), -1), values, kind)

    before = violation()
    optimizer.zero_grad()
    before.backward()
    assert head.weight.grad.abs().sum() > 0
    optimizer.step()
    with torch.no_grad():
        after = violation()
    assert after > before.detach() * 1.01


def variance_after_one_step(kind: str, beta: float) -> tuple[float, float]:
    """Group-loss variance before and after one SGD step on a tiny linear model's squared errors."""
    torch.manual_seed(0)
    features, targets = torch.randn(32, 3), torch.randn(32)
    targets[:16] += 3.0  # the first half has larger losses at the start
    # soft and fixed: the first half leans to group 1, the second to group 0
    logits = torch.randn(32, 2)
    logits[:16, 1] += 2.0
    logits[16:, 0] += 2.0
    probs = torch.softmax(logits, -1)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def spread() -> tuple[torch.Tensor, torch.Tensor]:
        losses = (model(features).squeeze(-1) - targets) ** 2
        loss, group_losses = group_objective_loss(losses, probs, "variance", beta=beta, kind=kind)
        return loss, group_variance(group_losses, group_masses(probs), kind)

    loss, before = spread()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        _, after = spread()
    return before.item(), after.item()


@pytest.mark.parametrize("kind", ["unweighted", "mass"])
def test_policy_descent_step_lowers_group_loss_variance(kind):
    before, after = variance_after_one_step(kind, beta=10.0)
    assert before > 0.5
    assert after < 0.5 * before
    # the variance term does the work: the same step on the plain mean (beta 0) leaves more of the spread.
    _, after_plain = variance_after_one_step(kind, beta=0.0)
    assert after < 0.5 * after_plain


# ----------------------------------------------------------------------------- recovering hidden domains


@pytest.mark.parametrize("kind", ["mass", "unweighted"])
def test_group_head_recovers_hidden_domains(kind):
    gen = torch.Generator().manual_seed(1)
    n = 128
    domain = torch.arange(n) % 2
    # feature 0 carries the domain (+-1, noise 0.3); features 1-3 are pure noise of larger scale.
    features = torch.randn(n, 4, generator=gen) * torch.tensor([0.3, 1.0, 1.0, 1.0])
    features[:, 0] += 2.0 * domain - 1.0
    # the return depends on the domain only: mean 0 or 1, noise 0.5
    returns = domain.float() + 0.5 * torch.randn(n, generator=gen)
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 2)
    with torch.no_grad():
        head.weight[:, 0] = 0.0  # start blind to the domain feature: any agreement must be learned
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    start = normalized_mutual_information(head(features).argmax(-1), domain)
    for _ in range(200):
        loss = -invariance_violation(torch.softmax(head(features), -1), returns, kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(head(features), -1)
    assert start < 0.1
    assert normalized_mutual_information(probs.argmax(-1), domain) > 0.8
    # both groups keep a real share of the batch
    assert group_masses(probs).min() > 0.3
