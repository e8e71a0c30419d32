"""A reward function for ``reward: python:examples/custom_reward.py:exact_match``.

gipo calls a reward function as ``f(prompts, responses, records) -> list[float]``, one float per response:
``prompts`` as the data gives them (text or chat messages), ``responses`` the decoded responses, ``records``
the prompt records (every field of the data row, its ``group`` included).

The built-in suites (``dataset: builtin``, ``builtin_swap``) give every prompt record a ``target`` field, the
right answer (``{"prompt": "add 47+85=", "group": "add", "target": "132"}``); a jsonl file of prompt rows
keeps its extra fields, so ``{"prompt": "add 2+3=", "group": "add", "target": "5"}`` works the same way.

    gipo train --set method=grpo --set reward=python:examples/custom_reward.py:exact_match
"""

from __future__ import annotations

from typing import Any


def exact_match(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    """1.0 where the response, stripped of surrounding whitespace, equals the record's ``target``; else 0.0.

    A record without a ``target`` is an error naming the prompt, not a silent 0.
    """
    scores = []
    for prompt, response, record in zip(prompts, responses, records, strict=True):
        if "target" not in record:
            raise KeyError(f"exact_match needs a 'target' field in every prompt record; the record of prompt "
                           f"{prompt!r} has only {sorted(record)}.")
        scores.append(1.0 if response.strip() == str(record["target"]).strip() else 0.0)
    return scores
