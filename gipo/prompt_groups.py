"""Groups of prompts for the critic-free estimators: which group a prompt is in, which prompts fill the next
batch, and what carries over between iterations (the group head and its optimizer, per-prompt pass-rate EMAs,
the sampling weights), all of it in checkpoints.

Without a critic a prompt's G samples measure its performance directly: the mean reward of its samples (its
pass rate under a verifiable 0/1 reward, its mean gold under the built-in suites). Three sources of groups:
- ``inferred``: the paper's group inference with that per-prompt mean in place of the critic's return. A linear
  head reads the policy's hidden state at the prompt's last token (detached: the head never trains the policy)
  and is trained to maximize the mass-weighted between-group variance of the per-prompt means;
- ``difficulty``: equal-width bins of an EMA of each prompt's mean reward;
- ``pass_bins``: Prompt-GDRO's bins (Panaganti et al., 2026) of each prompt's windowed any-of-k pass rate, with
  hysteresis;
- ``oracle``: the data's labels.
Which prompts fill the next batch is the sampling rule's choice (``gipo.sampling``), made from these groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gipo import distributed as dist
from gipo import groups as G
from gipo.config import PPOConfig


def train_group_head(head: nn.Module, optimizer: torch.optim.Optimizer, states: torch.Tensor, signal: torch.Tensor,
                     steps: int, reduce: dist.Reduce = dist.local_sum) -> float:
    """``steps`` gradient steps of the head toward the largest mass-weighted between-group variance of ``signal``
    (P,) given ``states`` (P, H); returns that variance before the last step. Under several processes each
    process holds its own prompts and a copy of the head: the variance is over all of them, and the gradients
    are averaged so that every copy takes the same step."""
    r_var = torch.zeros(())
    states, signal = states.detach(), signal.detach()
    with torch.enable_grad():  # called while a rollout is collected, under no_grad
        for _ in range(steps):
            probs = F.softmax(head(states), dim=-1)
            r_var = G.invariance_violation(probs, signal, "mass", reduce)
            optimizer.zero_grad(set_to_none=True)
            (-r_var).backward()
            if dist.world_size() > 1:
                for parameter in head.parameters():
                    parameter.grad = dist.global_sum(parameter.grad) / dist.world_size()
            optimizer.step()
    return float(r_var.detach())


class DifficultyTracker:
    """An EMA of each prompt's mean reward; a prompt not seen yet takes the mean of those seen (0.5 at first)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.rates: dict[int, float] = {}

    def pass_rates(self, indices: list[int]) -> torch.Tensor:
        prior = sum(self.rates.values()) / len(self.rates) if self.rates else 0.5
        return torch.tensor([self.rates.get(i, prior) for i in indices])

    def update(self, indices: list[int], means: list[float]) -> None:
        for index, mean in zip(indices, means, strict=True):
            old = self.rates.get(index)
            self.rates[index] = mean if old is None else self.decay * old + (1 - self.decay) * mean


class PassRateBins:
    """Prompt-GDRO's bins: a prompt's any-of-k pass rate over its last ``window`` visits (a visit passes when any
    of its samples does), binned with hysteresis (``G.bins_with_hysteresis``). The window counts the prompt's own
    visits, not iterations. A prompt not seen yet has rate 0, bin 0, as in the authors' code: until prompts come
    round again every prompt sits in the hardest bin."""

    def __init__(self, num_bins: int, window: int, hysteresis: float):
        self.num_bins, self.window, self.hysteresis = num_bins, window, hysteresis
        self.history: dict[int, list[int]] = {}
        self.bins: dict[int, int] = {}

    def assign(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor([self.bins.get(i, 0) for i in indices], dtype=torch.long)

    def update(self, indices: list[int], passed: list[bool]) -> None:
        for index, flag in zip(indices, passed, strict=True):
            visits = self.history.setdefault(index, [])
            visits.append(int(flag))
            del visits[:-self.window]
        rates = torch.tensor([sum(self.history[i]) / len(self.history[i]) for i in indices])
        current = torch.tensor([self.bins.get(i, -1) for i in indices], dtype=torch.long)
        moved = G.bins_with_hysteresis(rates, current, self.num_bins, self.hysteresis)
        self.bins.update(zip(indices, moved.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {"history": {i: list(v) for i, v in self.history.items()}, "bins": dict(self.bins)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {i: list(v) for i, v in state["history"].items()}
        self.bins = dict(state["bins"])


class PromptGroups:
    """Groups of whole prompts. ``labels(indices)`` gives the data's group index of prompts; ``states(indices)``
    the policy's hidden states at their last tokens (for the inferred head)."""

    def __init__(self, config: PPOConfig, num_groups: int, hidden_size: int,
                 labels: Callable[[list[int]], torch.Tensor], states: Callable[[list[int]], torch.Tensor],
                 device: torch.device):
        self.config, self.num_groups, self.device = config, num_groups, device
        self.labels, self.states = labels, states
        self.head: nn.Module | None = None
        if config.groups == "inferred":
            self.head = nn.Linear(hidden_size, num_groups).to(device)
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
            self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=config.group_head_learning_rate)
        self.difficulty = DifficultyTracker(config.difficulty_ema)
        self.pass_bins = PassRateBins(num_groups, config.pass_window, config.pass_hysteresis)

    def pass_rates(self, indices: list[int]) -> torch.Tensor:
        """Each prompt's mean-reward EMA (its pass rate under a 0/1 reward); the mean of those seen if unseen."""
        return self.difficulty.pass_rates(indices)

    def assign(self, indices: list[int], states: torch.Tensor | None = None) -> torch.Tensor:
        """Each prompt's group assignment (P, M): the head's soft one, a one-hot bin or label."""
        if self.config.groups == "inferred":
            with torch.no_grad():
                states = self.states(indices) if states is None else states
                return F.softmax(self.head(states.float()), dim=-1)
        if self.config.groups == "difficulty":
            groups = G.difficulty_bins(self.difficulty.pass_rates(indices), self.num_groups)
        elif self.config.groups == "pass_bins":
            groups = self.pass_bins.assign(indices)
        else:
            groups = self.labels(indices)
        return F.one_hot(groups, self.num_groups).float().to(self.device)

    # --- learning from a batch --------------------------------------------------------------------------
    def observe(self, indices: list[int], means: torch.Tensor, passed: torch.Tensor,
                reduce: dist.Reduce = dist.local_sum) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch's prompts (this process's), their mean rewards (P,) and whether any of each one's samples
        passed (P,) bool: returns their assignment (P, M) for the policy's objective and the KL, and moves the
        head, the pass-rate EMAs and the pass-rate bins."""
        metrics: dict[str, float] = {}
        states = None
        if self.head is not None:  # the head learns first, then assigns: as the critic's head does in PPO
            states = self.states(indices)
            metrics["groups/head_r_var"] = train_group_head(self.head, self.head_optimizer, states, means,
                                                            self.config.group_head_steps, reduce)
        probs = self.assign(indices, states)  # bins: those the prompts were in when drawn
        # Every process keeps every prompt's EMA and bin.
        for part_indices, part_means, part_passed in dist.gather_objects((indices, means.tolist(), passed.tolist())):
            self.difficulty.update(part_indices, part_means)
            if self.config.groups == "pass_bins":
                self.pass_bins.update(part_indices, part_passed)
        return probs, metrics

    # --- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"difficulty": dict(self.difficulty.rates), "pass_bins": self.pass_bins.state_dict()}
        if self.head is not None:
            state.update(head=self.head.state_dict(), head_optimizer=self.head_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.difficulty.rates = dict(state["difficulty"])
        if "pass_bins" in state:  # checkpoints written before pass-rate bins have none
            self.pass_bins.load_state_dict(state["pass_bins"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])
            self.head_optimizer.load_state_dict(state["head_optimizer"])
