"""An advantage estimator of your own: each response's reward minus the batch's mean reward, no critic.

    gipo train --set method=custom --set estimator=python:examples/custom_estimator.py:mean_baseline \\
        --set reward=gold

Every estimator has the signature of ``gipo.estimators.AdvantageFn``: per-token shaped rewards (B, T) (the
score on each response's last token), the response mask (B, T), the critic's values (None without a critic),
the settings it may read (``AdvantageSettings``: num_generations, gamma, lam, ...) and the reduction that sums a
statistic over every process's share of the batch. It returns per-token advantages and the critic's targets
(None: it needs no critic). To give it a name and defaults, register it instead::

    gipo.register_estimator("mean_baseline", mean_baseline, defaults={"num_generations": 4})
"""

from __future__ import annotations

import torch

from gipo.distributed import Reduce, local_sum
from gipo.estimators import AdvantageSettings


def mean_baseline(token_rewards: torch.Tensor, response_mask: torch.Tensor, values: torch.Tensor | None,
                  settings: AdvantageSettings, reduce: Reduce = local_sum) -> tuple[torch.Tensor, None]:
    rewards = token_rewards.sum(-1)
    mean = reduce(rewards.sum()) / reduce(rewards.new_tensor(float(rewards.numel())))
    return (rewards - mean).unsqueeze(-1) * response_mask, None
