"""Reward functions the tests load by name (``reward: python:tests/rewards.py:NAME``), as a user's would be."""

from __future__ import annotations

from typing import Any


def constant_one(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    return [1.0] * len(responses)


def constant_half(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    return [0.5 for _ in responses]


def one_too_few(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    return [0.0] * (len(responses) - 1)


def nan_in_row_three(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    return [float("nan") if i == 3 else 0.0 for i in range(len(responses))]


def a_string_in_row_two(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[Any]:
    return ["correct" if i == 2 else 1.0 for i in range(len(responses))]


def raises(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    raise KeyError("answer")
