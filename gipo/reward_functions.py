"""Reward sources behind a registry: what scores a response. ``reward: NAME`` picks one:

- ``model``: a learned reward model (``ModelReward``, scoring the rollout's tokens);
- ``gold``: the task's own gold reward, a verifiable reward;
- ``python:MODULE:FUNCTION``, or a name given to ``register_reward``: a function (as TRL's reward functions)
  ``f(prompts, responses, records) -> list[float]``: ``prompts`` as the data gives them (text or chat
  messages), ``responses`` the decoded responses, ``records`` the prompt records (every field of the row, its
  ``group`` included). Several, comma-separated, are summed with ``reward_weights``.

Every source has one protocol, ``RewardSource``: ``source(rollout, prompts, records, step) -> scores (B,)``. The
registry holds factories ``(RewardContext) -> RewardSource``; a function's values are checked on every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gipo.errors import ConfigError, NonFiniteError
from gipo.models import load_reward_model, load_tokenizer
from gipo.registry import PYTHON_PREFIX, Registry, is_python_spec
from gipo.rollout import RewardScorer, Rollout, decode_responses
from gipo.tasks import Task

RewardFunction = Callable[[list[Any], list[str], list[dict[str, Any]]], Sequence[float]]


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


class RewardSource(Protocol):
    """Scores one batch of rollouts: (B,) on the rollout's device."""

    def __call__(self, rollout: Rollout, prompts: list[Any], records: list[dict[str, Any]],
                 step: int) -> torch.Tensor: ...


@dataclass
class RewardContext:
    """What a reward source may be built from: the run's keys, the policy's tokenizer, and anything passed in."""

    reward: str
    reward_weights: list[float] | None
    dataset: str
    task: Task | None
    tokenizer: Any
    device: torch.device
    reward_model_path: str = ""
    reward_model: Any = None
    reward_tokenizer: Any = None
    functions: list[RewardFunction] = field(default_factory=list)


class ModelReward:
    """A learned reward model's score of each rollout (``reward: model``)."""

    def __init__(self, context: RewardContext):
        model = context.reward_model or load_reward_model(context.reward_model_path)
        self.reward_model = model.to(context.device).eval().requires_grad_(False)
        tokenizer = context.reward_tokenizer or load_tokenizer(context.reward_model_path)
        self.scorer = RewardScorer(self.reward_model, tokenizer, context.tokenizer)

    def __call__(self, rollout: Rollout, prompts: list[Any], records: list[dict[str, Any]],
                 step: int) -> torch.Tensor:
        return self.scorer(rollout, prompts)


class FunctionReward:
    """Reward functions of the decoded responses, checked and summed with their weights."""

    def __init__(self, functions: list[NamedReward], tokenizer: Any):
        self.functions = functions
        self.tokenizer = tokenizer

    def __call__(self, rollout: Rollout, prompts: list[Any], records: list[dict[str, Any]],
                 step: int) -> torch.Tensor:
        responses = decode_responses(self.tokenizer, rollout)
        return self.score_texts(prompts, responses, records, step).to(rollout.query_ids.device)

    def score_texts(self, prompts: list[Any], responses: list[str], records: list[dict[str, Any]],
                    step: int = 0) -> torch.Tensor:
        """Each function on the decoded responses, its values checked, summed with the weights: (B,)."""
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


RewardFactory = Callable[[RewardContext], RewardSource]


def _gold(context: RewardContext) -> FunctionReward:
    if context.task is None:
        raise ConfigError(f"reward=gold needs dataset to be a registered task whose prompts the trainer loads "
                          f"(dataset={context.dataset!r}; prompts passed in carry no gold reward); give "
                          "reward_functions= or reward=python:MODULE:FUNCTION instead.")
    return FunctionReward([NamedReward("gold", gold_reward_function(context.task))], context.tokenizer)


def _function_factory(name: str, function: RewardFunction) -> RewardFactory:
    return lambda context: FunctionReward([NamedReward(name, function)], context.tokenizer)


REWARD_SOURCES: Registry[RewardFactory] = Registry(
    "reward source", "reward", lambda spec, function: _function_factory(spec.removeprefix(PYTHON_PREFIX), function))
REWARD_SOURCES.register("model", ModelReward, "the reward model at reward_model")
REWARD_SOURCES.register("gold", _gold, "the task's own gold reward: a verifiable reward, no reward model")
STANDALONE = ("model",)  # sources that are not functions, so cannot be summed with others


def register_reward(name: str, function: RewardFunction, about: str = "", *, replace: bool = False) -> None:
    """Add a reward function ``f(prompts, responses, records) -> list[float]``, found as ``reward: NAME``."""
    REWARD_SOURCES.register(name, _function_factory(name, function), about, replace=replace)


def reward_specs(reward: str) -> list[str]:
    """``"python:a:f,gold"`` -> one spec per source, each registered or a python spec (not loaded here)."""
    specs = [part.strip() for part in reward.split(",") if part.strip()]
    if not specs:
        raise ConfigError(f"reward is empty. {REWARD_SOURCES.describe()}")
    for spec in specs:
        if spec in STANDALONE and len(specs) > 1:
            raise ConfigError(f"reward={reward!r}: {spec} stands alone; combine only reward functions.")
        if spec not in REWARD_SOURCES and not is_python_spec(spec):
            raise ConfigError(f"reward={reward!r}: {spec!r} is not a registered reward source or "
                              f"python:MODULE:FUNCTION (MODULE a dotted module name or a .py file). "
                              f"{REWARD_SOURCES.describe()}")
    return specs


def make_reward_source(context: RewardContext) -> RewardSource:
    """The source ``context.reward`` names, or the functions passed in (``context.functions``), with weights."""
    if context.functions:
        sources = [FunctionReward([NamedReward(getattr(f, "__name__", f"function {i}"), f)
                                   for i, f in enumerate(context.functions)], context.tokenizer)]
    else:
        sources = [REWARD_SOURCES.get(spec)(context) for spec in reward_specs(context.reward)]
    if len(sources) == 1 and not isinstance(sources[0], FunctionReward):
        return sources[0]
    functions = [named for source in sources for named in source.functions]
    if context.reward_weights is not None:
        if len(context.reward_weights) != len(functions):
            raise ConfigError(f"reward_weights has {len(context.reward_weights)} weights for {len(functions)} reward "
                              f"functions ({', '.join(f.name for f in functions)}).")
        for named, weight in zip(functions, context.reward_weights, strict=True):
            named.weight = weight
    return FunctionReward(functions, context.tokenizer)
