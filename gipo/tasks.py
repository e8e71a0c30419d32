"""Tasks with a programmatic gold reward, and the built-in suite the embedded default trains on.

A *task* is a set of prompts, each labelled with its *group* (a domain such as ``copy``; in gipo a
group is a set of prompts, not GRPO's set of samples for one prompt), split into train / test and
out-of-distribution (OOD) splits, with a gold reward in [0, 1] for any response. The group labels
are used for reporting (and by the ``oracle`` method); the training signal is the reward model.

Register your own with :func:`register_task`. A *task family* builds tasks from a parametrized name,
``FAMILY:ARGUMENTS`` (``reasoning_gym:chain_sum?max_terms=2,products``): register one with
:func:`register_task_family`; each distinct name is built once per process.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gipo.registry import Registry

PromptRecord = dict[str, Any]
"""``{"prompt": str | list[message], "group": str, ...task fields}``."""


@dataclass
class Task:
    """Prompts by split plus a gold reward. ``make_split(split, n, rng)`` returns prompt records."""

    name: str
    groups: list[str]
    make_split: Callable[[str, int, random.Random], list[PromptRecord]]
    gold_reward: Callable[[PromptRecord, str], float]
    demonstration: Callable[[PromptRecord, random.Random], str] | None = None
    ood_splits: list[str] = field(default_factory=list)
    train_shares: dict[str, float] = field(default_factory=dict)
    """Per group, the fraction of ``n_per_group`` it keeps in the train split (default 1): a minority domain
    has fewer prompts for SFT, the reward model's pairs and PPO alike (every ``prompts("train", ...)`` call;
    ``shares=False`` draws evenly). It keeps the first prompts of the even draw, so the other groups' prompts
    do not change. Test, validation and OOD splits stay ``n_per_group`` per group."""

    def prompts(self, split: str, n_per_group: int, seed: int, *, shares: bool = True) -> list[PromptRecord]:
        records = self.make_split(split, n_per_group, random.Random(f"{self.name}/{split}/{seed}"))
        if split != "train" or not shares or not self.train_shares:
            return records
        keep = {g: math.ceil(n_per_group * share) for g, share in self.train_shares.items()}
        kept: dict[str, int] = {}
        out = []
        for record in records:
            g = record["group"]
            kept[g] = kept.get(g, 0) + 1
            if g not in keep or kept[g] <= keep[g]:
                out.append(record)
        return out


_TASKS: dict[str, Task] = {}
_BUILT: dict[str, Task] = {}

TaskFamily = Callable[[str], Task]
"""``build(arguments) -> Task`` for the name ``FAMILY:arguments``; bad arguments raise a DataError."""

TASK_FAMILIES: Registry[TaskFamily] = Registry("task family", "dataset")


def register_task(task: Task) -> Task:
    """Make ``task`` usable by name in any config's ``dataset`` key."""
    _TASKS[task.name] = task
    return task


def register_task_family(prefix: str, build: TaskFamily, about: str = "", *, replace: bool = False) -> None:
    """Make ``PREFIX:ARGUMENTS`` a task name: ``build(ARGUMENTS)`` makes the task (once per distinct name)."""
    TASK_FAMILIES.register(prefix, build, about, replace=replace)


def get_task(name: str) -> Task | None:
    """The task registered as ``name`` or built by its family (``FAMILY:ARGUMENTS``); None for anything else
    (a file, a dataset id)."""
    if name in _TASKS:
        return _TASKS[name]
    family, sep, arguments = name.partition(":")
    if not sep or family not in TASK_FAMILIES:
        return None
    if name not in _BUILT:
        _BUILT[name] = TASK_FAMILIES.get(family)(arguments)
    return _BUILT[name]


def task_names() -> list[str]:
    return sorted(_TASKS) + [f"{family}:..." for family in TASK_FAMILIES.names()]


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


EXACT = 1.0 - 1e-9
"""A reward of at least this is an exact answer (the built-in gold is 1 - normalized edit distance)."""


def similarity(response: str, target: str) -> float:
    """1 - normalized edit distance: 1 for an exact answer, 0 for nothing in common."""
    longest = max(len(response), len(target), 1)
    return 1.0 - edit_distance(response, target) / longest


# --- The built-in suite ---------------------------------------------------------------------------
# Four string-manipulation domains whose difficulty for a tiny transformer differs: copying is easy,
# sorting and reversing need more, multi-digit addition with carries is hard. The OOD split asks the
# same operations on longer inputs than training ever shows.

_LETTERS = "abcdefghij"
_TRAIN_LENGTHS = (3, 6)
_OOD_LENGTHS = (7, 8)
DEMO_NOISE = 0.25
"""Share of demonstrations with one corrupted character: SFT imitates it, so RL has room to improve."""


def _letters(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(*lengths)))


def _builtin_record(group: str, rng: random.Random, lengths: tuple[int, int]) -> PromptRecord:
    if group == "add":
        digits = lengths[0] - 1 if lengths == _TRAIN_LENGTHS else 3
        a = rng.randint(10 ** (digits - 1), 10**digits - 1)
        b = rng.randint(10 ** (digits - 1), 10**digits - 1)
        return {"prompt": f"add {a}+{b}=", "group": group, "target": str(a + b)}
    word = _letters(rng, lengths)
    return {"prompt": f"{group} {word}=", "group": group, "target": _OPS[group](word)}


def swap_pairs(word: str) -> str:
    """Swap each adjacent pair of characters: ``abcde`` -> ``badce`` (an odd last character stays)."""
    chars = list(word)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


_OPS: dict[str, Callable[[str], str]] = {
    "copy": lambda w: w, "reverse": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w)), "swap": swap_pairs,
}

BUILTIN_GROUPS = ["copy", "sort", "reverse", "add"]

MINORITY = "swap"
MINORITY_SHARE = 1 / 6
"""``builtin_swap``: the swap domain's training prompts per normal domain's (SFT, reward-model pairs, PPO)."""
SWAP_GROUPS = [*BUILTIN_GROUPS, MINORITY]


SPLITS = ("train", "validation", "test")
"""The splits of any prompt: 6/8 train, 1/8 validation, 1/8 test, by a stable hash of the prompt."""


def prompt_key(prompt: str | list[dict[str, str]]) -> str:
    """The text a prompt is hashed by: plain text as it is, a chat conversation as ``str()`` of its list.

    ``str()`` of a record's message list is what evaluation passes to :func:`in_test_split`, so both agree;
    the loaders in ``gipo.data`` build messages as ``{"role", "content"}`` dicts in that order.
    """
    return prompt if isinstance(prompt, str) else str(prompt)


def split_of(prompt: str | list[dict[str, str]]) -> str:
    """``train``, ``validation`` or ``test``: the same prompt always lands in the same split, whatever the
    source, the seed or the other rows (a stable SHA-1 of :func:`prompt_key`, not Python's salted hash)."""
    bucket = int(hashlib.sha1(prompt_key(prompt).encode()).hexdigest(), 16) % 8
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def in_test_split(prompt: str | list[dict[str, str]]) -> bool:
    """A stable hash of the prompt decides its side, so no prompt is both trained on and tested on."""
    return split_of(prompt) == "test"


def _split_over(groups: list[str]) -> Callable[[str, int, random.Random], list[PromptRecord]]:
    def make_split(split: str, n_per_group: int, rng: random.Random) -> list[PromptRecord]:
        if split == "long":
            records = [_builtin_record(g, rng, _OOD_LENGTHS) for _ in range(n_per_group) for g in ("copy", "reverse")]
            for r in records:
                r["group"] = f"long_{r['group']}"
            return records
        want_test = split == "test"
        records = []
        for group in groups:
            kept = 0
            while kept < n_per_group:
                record = _builtin_record(group, rng, _TRAIN_LENGTHS)
                if in_test_split(record["prompt"]) == want_test:
                    records.append(record)
                    kept += 1
        return records
    return make_split


def _builtin_gold(record: PromptRecord, response: str) -> float:
    return similarity(response.strip(), record["target"])


def _builtin_demonstration(record: PromptRecord, rng: random.Random) -> str:
    target = record["target"]
    if rng.random() < DEMO_NOISE and target:
        chars = list(target)
        chars[rng.randrange(len(chars))] = rng.choice(_LETTERS + "0123456789")
        return "".join(chars)
    return target


BUILTIN = register_task(Task(
    name="builtin",
    groups=BUILTIN_GROUPS,
    make_split=_split_over(BUILTIN_GROUPS),
    gold_reward=_builtin_gold,
    demonstration=_builtin_demonstration,
    ood_splits=["long"],
))

BUILTIN_SWAP = register_task(Task(
    name="builtin_swap",
    groups=SWAP_GROUPS,
    make_split=_split_over(SWAP_GROUPS),
    gold_reward=_builtin_gold,
    demonstration=_builtin_demonstration,
    ood_splits=["long"],
    train_shares={MINORITY: MINORITY_SHARE},
))
"""The built-in suite plus a minority domain ``swap`` (adjacent pairs swapped: ``swap abcde=`` -> ``badce``)
with 1/6 of a normal domain's training prompts (SFT, reward-model pairs, PPO) and the same number of test
prompts as every other domain. Its prompts are drawn from the same distributions as ``builtin``'s (not
the same draws: a task's random streams are keyed by its name)."""
