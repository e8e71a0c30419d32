"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al., 2019).

The controller owns the base coefficient; per-sample coefficients (the group-adaptive KL in
``gipo.groups``) scale it per sample.
"""

from __future__ import annotations


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        """A fixed coefficient ignores the measured KL."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Proportional control of log(KL / target), clipped to +-20% per update, as in Ziegler et al."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_samples / self.horizon


def make_kl_controller(kl_coef: float, adaptive: bool, target: float, horizon: int) -> FixedKLController:
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
