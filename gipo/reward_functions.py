"""Rewards that are functions: the task's own gold reward, or a user's Python functions (as TRL's reward
functions), checked on every call.

``reward: model`` (a learned reward model) is scored in ``gipo.rollout.RewardScorer``; this module covers
``reward: gold`` and ``reward: python:MODULE:FUNCTION``. A function is called as
``f(prompts, responses, records) -> list[float]``: ``prompts`` as the data gives them (text or chat
messages), ``responses`` the decoded responses, ``records`` the prompt records (every field of the row, its
``group`` included). Several functions are summed with ``reward_weights``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gipo.config import ConfigError
from gipo.errors import NonFiniteError
from gipo.tasks import Task

RewardFunction = Callable[[list[Any], list[str], list[dict[str, Any]]], Sequence[float]]
PYTHON_PREFIX = "python:"


def reward_specs(reward: str) -> list[str]:
    """``"python:a:f,python:b:g"`` -> one spec per function; ``model`` and ``gold`` stand alone."""
    specs = [part.strip() for part in reward.split(",") if part.strip()]
    if not specs:
        raise ConfigError("reward is empty; allowed: model, gold, or python:MODULE:FUNCTION (comma-separated).")
    for spec in specs:
        if spec in ("model", "gold") and len(specs) > 1:
            raise ConfigError(f"reward={reward!r}: {spec} stands alone; combine only python:MODULE:FUNCTION specs.")
        if spec not in ("model", "gold") and not (spec.startswith(PYTHON_PREFIX) and spec.count(":") >= 2):
            raise ConfigError(f"reward={reward!r}: {spec!r} is not model, gold or python:MODULE:FUNCTION (MODULE a "
                              "dotted module name or a .py file).")
    return specs


def _import_module(name: str, spec: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"reward {spec}: file {path} does not exist.")
        loaded = importlib.util.spec_from_file_location(f"gipo_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:  # `gipo` the command does not put cwd on the path
        sys.path.append(str(Path.cwd()))
    return importlib.import_module(name)


def load_function(spec: str) -> RewardFunction:
    """``python:MODULE:FUNCTION`` -> the function; a clear ConfigError when it cannot be had."""
    module_name, _, function_name = spec.removeprefix(PYTHON_PREFIX).rpartition(":")
    try:
        module = _import_module(module_name, spec)
    except ConfigError:
        raise
    except Exception as err:  # an import runs the user's code: any error means "cannot load it"
        raise ConfigError(f"reward {spec}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"reward {spec}: {module_name} has no function {function_name!r}.")
    return function


@dataclass
class NamedReward:
    name: str
    function: RewardFunction
    weight: float = 1.0


def gold_reward_function(task: Task) -> RewardFunction:
    """The task's gold reward as a reward function."""
    def gold(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
        return [task.gold_reward(record, response) for record, response in zip(records, responses, strict=True)]

    return gold


def _checked_value(name: str, value: Any, row: int, prompt: Any, step: int) -> float:
    where = f"reward function {name}, row {row} of the batch (prompt {str(prompt)[:80]!r})"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int | float) and not hasattr(value, "__float__"):  # bools count as 0 and 1
        raise NonFiniteError(f"reward {name}", step, f"{where} returned {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteError(f"reward {name}", step, f"{where} returned {value}")
    return value


class RewardFunctions:
    """Calls each function on a batch, checks what it returns and sums the weighted rewards: (B,)."""

    def __init__(self, functions: list[NamedReward]):
        self.functions = functions

    @classmethod
    def from_config(cls, reward: str, weights: list[float] | None, task: Task | None,
                    given: list[RewardFunction] | None = None) -> RewardFunctions:
        """From ``reward`` (gold or python specs), or the functions ``given`` in Python, with ``weights``."""
        if given:
            functions = [NamedReward(getattr(f, "__name__", f"function {i}"), f) for i, f in enumerate(given)]
        elif reward == "gold":
            if task is None:
                raise ConfigError("reward=gold needs a registered task as the dataset (its gold reward scores the "
                                  "responses); for other prompts give reward=python:MODULE:FUNCTION.")
            functions = [NamedReward("gold", gold_reward_function(task))]
        else:
            functions = [NamedReward(spec.removeprefix(PYTHON_PREFIX), load_function(spec))
                         for spec in reward_specs(reward)]
        if weights is not None:
            if len(weights) != len(functions):
                raise ConfigError(f"reward_weights has {len(weights)} weights for {len(functions)} reward functions "
                                  f"({', '.join(f.name for f in functions)}).")
            for function, weight in zip(functions, weights, strict=True):
                function.weight = weight
        return cls(functions)

    def __call__(self, prompts: list[Any], responses: list[str], records: list[dict[str, Any]],
                 step: int = 0) -> torch.Tensor:
        total = torch.zeros(len(responses))
        for reward in self.functions:
            try:
                values = reward.function(prompts, responses, records)
            except Exception as err:  # the user's code: report it as theirs, with the step
                raise NonFiniteError(f"reward {reward.name}", step,
                                     f"reward function {reward.name} raised {type(err).__name__}: {err}") from err
            if isinstance(values, torch.Tensor):
                values = values.tolist()
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(responses):
                got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
                raise NonFiniteError(f"reward {reward.name}", step, f"reward function {reward.name} returned {got} "
                                     f"for {len(responses)} responses (expected one number per response)")
            checked = [_checked_value(reward.name, v, i, p, step)
                       for i, (v, p) in enumerate(zip(values, prompts, strict=True))]
            total += reward.weight * torch.tensor(checked)
        return total
