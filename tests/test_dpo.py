"""GR-DPO in DPOTrainer: group labels, the alpha weights' direction, per-group metrics, exact resume, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gipo.cli import main
from gipo.config import ConfigError, DPOConfig, build_config
from gipo.data import DataError
from gipo.dpo import DPOTrainer, pair_group_ids
from tests.conftest import QUIET

WORDS = ["ab", "cd", "ef", "gh", "ij", "ba", "dc", "fe"]


def _write_pairs(path, with_groups: bool = True):
    """8 learnable ``copy`` pairs (the copy preferred to its reverse) and 4 ``tie`` pairs whose chosen and rejected
    replies are the same: a tie's DPO loss stays ln 2 whatever the policy, while training lowers the copies'."""
    rows = [{"prompt": f"copy {w}=", "chosen": w, "rejected": w[::-1], "group": "copy"} for w in WORDS]
    rows += [{"prompt": f"sort {w}=", "chosen": w, "rejected": w, "group": "tie"} for w in WORDS[:4]]
    if not with_groups:
        rows = [{k: v for k, v in row.items() if k != "group"} for row in rows]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _gr_dpo(pairs_path, run_dir, max_steps: int, **extra) -> DPOTrainer:
    # batch_size = the 12 pairs: every batch holds both groups in the data's proportions, so each step's L_g is
    # the group's mean loss and the direction of alpha is known (toward the tie group, whose loss stays highest).
    config = build_config(DPOConfig, {
        **QUIET, "model": "embedded", "dataset": f"pairs:{pairs_path}", "pair_split": "all", "batch_size": 12,
        "learning_rate": 3e-3, "warmup_steps": 0, "beta": 0.5, "max_steps": max_steps, "checkpoint_every": 2,
        "keep_last": 5, "group_objective": "dro", "group_step_size": 1.0, **extra})
    return DPOTrainer(config, output_dir=run_dir)


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_pair_group_ids_and_missing_groups():
    pairs = [{"group": "b"}, {"group": "a"}, {"group": "b"}]
    assert pair_group_ids(pairs, "x.jsonl") == (["a", "b"], [1, 0, 1])
    with pytest.raises(ConfigError, match="needs group labels.*x.jsonl.*have none"):
        pair_group_ids([{"group": "all"}, {}], "x.jsonl")  # `all`: what the loader calls a row with no group
    with pytest.raises(DataError, match=r"x.jsonl, row 2: the pair has no group, while others do \(a, b\)"):
        pair_group_ids([{"group": "a"}, {"group": None}, {"group": "b"}], "x.jsonl")
    with pytest.raises(ConfigError, match="every pair of x.jsonl is in the group 'a'.*group_objective=none"):
        pair_group_ids([{"group": "a"}, {"group": "a"}], "x.jsonl")


def test_gr_dpo_raises_the_weight_of_the_group_with_the_larger_loss(tmp_path):
    trainer = _gr_dpo(_write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "run", 4).train()
    assert trainer.group_names == ["copy", "tie"]
    torch.testing.assert_close(trainer.group_shares, torch.tensor([8 / 12, 4 / 12]))
    rows = _rows(tmp_path / "run")
    for row in rows:
        for key in ("train/loss", "train/dpo_loss", "groups/alpha/copy", "groups/alpha/tie",
                    "groups/dpo_loss/copy", "groups/dpo_loss/tie"):
            assert key in row, key
        assert row["groups/alpha/copy"] + row["groups/alpha/tie"] == pytest.approx(1.0)
        assert row["groups/dpo_loss/tie"] == pytest.approx(math.log(2.0), abs=1e-5)
    # Step 1 starts at the reference, where every pair's loss is ln 2: alpha stays uniform. Then the copies' loss
    # falls below ln 2 and alpha moves toward the tie group, a little further every step.
    assert rows[0]["groups/dpo_loss/copy"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert rows[0]["groups/alpha/tie"] == pytest.approx(0.5)
    assert all(r["groups/dpo_loss/copy"] < math.log(2.0) - 1e-3 for r in rows[1:])
    tie_alpha = [r["groups/alpha/tie"] for r in rows]
    assert all(later > earlier for earlier, later in zip(tie_alpha, tie_alpha[1:], strict=False))
    assert tie_alpha[-1] > 0.5
    assert trainer.group_weights.tolist() == pytest.approx([rows[-1]["groups/alpha/copy"], tie_alpha[-1]])
    # alpha_g ∝ exp(eta * sum of the steps' L_g) from uniform; with eta = 1 and full batches:
    # alpha_tie / alpha_copy = exp(sum over steps of (L_tie - L_copy)).
    gap = sum(r["groups/dpo_loss/tie"] - r["groups/dpo_loss/copy"] for r in rows)
    assert tie_alpha[-1] / rows[-1]["groups/alpha/copy"] == pytest.approx(math.exp(gap), rel=1e-4)
    # The objective this step trained on: sum_g alpha_g L_g with the alpha of the step before.
    previous = rows[-2]
    assert rows[-1]["train/loss"] == pytest.approx(
        previous["groups/alpha/copy"] * rows[-1]["groups/dpo_loss/copy"]
        + previous["groups/alpha/tie"] * rows[-1]["groups/dpo_loss/tie"], rel=1e-5)


def test_gr_dpo_resume_equals_uninterrupted(tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    straight = _gr_dpo(pairs, tmp_path / "straight", 4).train()
    _gr_dpo(pairs, tmp_path / "split", 2).train()
    resumed = _gr_dpo(pairs, tmp_path / "split", 4).train(resume=True)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(straight.group_weights, resumed.group_weights, rtol=1e-6, atol=0)
    assert resumed.group_weights[1] > 0.5  # the alpha that moved was saved and restored, not reset to uniform
    rows_straight, rows_resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "split")
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    for a, b in zip(rows_straight, rows_resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_cli_gr_dpo_and_its_errors(tmp_path, capsys):
    flags = ["--set", "model=embedded", "--set", "pair_split=all", "--set", "batch_size=6", "--set", "max_steps=2",
             "--set", "progress=false", "--set", "device=cpu"]
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "gr_dpo"
    assert main(["dpo", "--set", f"dataset={pairs}", "--set", "group_objective=dro", *flags, "--out", str(out)]) == 0
    assert {"groups/alpha/copy", "groups/alpha/tie", "groups/dpo_loss/copy"} <= set(_rows(out)[-1])
    plain = tmp_path / "dpo"
    assert main(["dpo", "--set", f"dataset={pairs}", *flags, "--out", str(plain)]) == 0
    assert not any(k.startswith("groups/") for k in _rows(plain)[-1])
    capsys.readouterr()
    no_groups = _write_pairs(tmp_path / "no_groups.jsonl", with_groups=False)
    assert main(["dpo", "--set", f"dataset={no_groups}", "--set", "group_objective=dro", *flags,
                 "--out", str(tmp_path / "none")]) == 2
    assert "needs group labels" in capsys.readouterr().err
    assert main(["dpo", "--set", "group_step_size=-1", *flags, "--out", str(tmp_path / "bad")]) == 2
    assert "group_step_size" in capsys.readouterr().err


def test_gr_dpo_micro_batches_train_as_the_whole_batch(tmp_path):
    # Each micro-batch's L_g over the whole batch's B adds up to the batch's, with the alpha of the step before.
    # Two learnable groups here: a tie's gradient is rounding noise, which Adam would blow up differently.
    rows = [{"prompt": f"copy {w}=", "chosen": w, "rejected": w[::-1], "group": "copy"} for w in WORDS]
    rows += [{"prompt": f"sort {w}=", "chosen": "".join(sorted(w)), "rejected": "".join(sorted(w))[::-1],
              "group": "sort"} for w in WORDS[:4]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    whole = _gr_dpo(pairs, tmp_path / "whole", 3).train()
    split = _gr_dpo(pairs, tmp_path / "split", 3, gradient_accumulation_steps=3).train()
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        # Summing in another order changes the gradients in their last bits; Adam's step on a weight whose
        # gradient is almost 0 magnifies that to ~1e-5 to 1.2e-4 on a handful of weights (CPU kernels decide).
        torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-4)
    torch.testing.assert_close(whole.group_weights, split.group_weights, rtol=1e-5, atol=0)
    assert [r["train/loss"] for r in _rows(tmp_path / "whole")] == pytest.approx(
        [r["train/loss"] for r in _rows(tmp_path / "split")], rel=1e-5)
