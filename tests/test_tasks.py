"""The built-in task suites: ``builtin`` unchanged, ``builtin_swap`` with its minority domain ``swap``."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

from gipo.tasks import (
    BUILTIN,
    BUILTIN_GROUPS,
    MINORITY,
    MINORITY_SHARE,
    SWAP_GROUPS,
    get_task,
    in_test_split,
    swap_pairs,
)
from gipo.tasks import BUILTIN_SWAP as TASK


def test_swap_pairs_by_hand():
    assert swap_pairs("abcdef") == "badcfe"
    assert swap_pairs("abcde") == "badce"  # an odd last character stays
    assert swap_pairs("abc") == "bac"
    assert swap_pairs("a") == "a"
    assert swap_pairs("") == ""


def test_swap_gold_reward_by_hand():
    record = {"prompt": "swap abcd=", "group": "swap", "target": "badc"}
    assert TASK.gold_reward(record, "badc") == 1.0
    assert TASK.gold_reward(record, " badc ") == 1.0  # surrounding whitespace ignored
    assert TASK.gold_reward(record, "bacd") == 0.5  # first pair swapped, second not: 2 edits of 4
    assert TASK.gold_reward(record, "abcd") == 0.25  # the unswapped word: 3 edits (bcd, bad, badc) of 4
    assert TASK.gold_reward(record, "badcx") == 0.8  # one insertion, longest 5
    assert TASK.gold_reward(record, "") == 0.0


def test_swap_records_have_the_right_target():
    for record in TASK.prompts("test", 50, seed=0):
        if record["group"] == "swap":
            word = record["prompt"][len("swap "):-1]
            assert record["target"] == swap_pairs(word)
            assert 3 <= len(word) <= 6


def test_minority_share_of_training_prompts():
    assert get_task("builtin_swap") is TASK and SWAP_GROUPS == [*BUILTIN_GROUPS, MINORITY] == TASK.groups
    counts = Counter(r["group"] for r in TASK.prompts("train", 600, seed=0))
    assert counts[MINORITY] == 100 == round(600 * MINORITY_SHARE)
    assert all(counts[g] == 600 for g in BUILTIN_GROUPS)
    even = Counter(r["group"] for r in TASK.prompts("train", 600, seed=0, shares=False))
    assert all(even[g] == 600 for g in SWAP_GROUPS)


def test_test_and_ood_splits_are_even():
    counts = Counter(r["group"] for r in TASK.prompts("test", 64, seed=0))
    assert counts == Counter({g: 64 for g in SWAP_GROUPS})
    assert Counter(r["group"] for r in TASK.prompts("validation", 8, seed=0)) == Counter({g: 8 for g in SWAP_GROUPS})
    ood = Counter(r["group"] for r in TASK.prompts("long", 16, seed=0))
    assert ood == Counter({"long_copy": 16, "long_reverse": 16})


def test_splits_are_deterministic_and_disjoint():
    assert TASK.prompts("train", 200, seed=3) == TASK.prompts("train", 200, seed=3)
    assert TASK.prompts("test", 64, seed=0) == TASK.prompts("test", 64, seed=0)
    assert TASK.prompts("train", 200, seed=3) != TASK.prompts("train", 200, seed=4)
    train = {r["prompt"] for r in TASK.prompts("train", 300, seed=1)}
    test = {r["prompt"] for r in TASK.prompts("test", 64, seed=0)}
    assert all(in_test_split(p) for p in test)
    assert not any(in_test_split(p) for p in train)
    assert not train & test


def test_minority_training_prompts_are_a_prefix_of_the_even_draw():
    """The share keeps the first prompts of the even draw, so the other domains are untouched by it."""
    full = TASK.prompts("train", 120, seed=2, shares=False)
    kept = TASK.prompts("train", 120, seed=2)
    assert [r for r in kept if r["group"] != MINORITY] == [r for r in full if r["group"] != MINORITY]
    assert [r for r in kept if r["group"] == MINORITY] == [r for r in full if r["group"] == MINORITY][:20]


def test_swap_demonstrations_are_mostly_exact():
    rng = random.Random(0)
    records = [r for r in TASK.prompts("train", 2400, seed=0) if r["group"] == MINORITY]
    exact = sum(TASK.demonstration(r, rng) == r["target"] for r in records)
    assert 0.65 < exact / len(records) < 0.85  # a quarter corrupted (the odd one to itself)


BUILTIN_FINGERPRINT = "22755b174286dbacb0f1a5f3b488423fa2a309a65ef83c3386283563b91ea7c2"
"""SHA-256 of the prompts and demonstrations below as ``builtin`` drew them before the swap domain was added
(computed with that version of gipo/tasks.py): every result in docs/results was measured on them."""


def test_builtin_suite_is_unchanged():
    """``builtin`` keeps its four domains, and draws the very prompts and demonstrations it always drew."""
    assert BUILTIN.groups == BUILTIN_GROUPS == ["copy", "sort", "reverse", "add"] and not BUILTIN.train_shares
    rows = [BUILTIN.prompts(split, n, seed) for split, n, seed in (("train", 60, 0), ("test", 64, 0), ("long", 32, 0),
                                                                    ("train", 30, 5))]
    rng = random.Random(7)
    rows.append([BUILTIN.demonstration(r, rng) for r in BUILTIN.prompts("train", 50, 0)])
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest() == BUILTIN_FINGERPRINT
