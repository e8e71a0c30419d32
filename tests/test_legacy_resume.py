"""Run directories written by an earlier gipo (tests/fixtures/legacy_runs, see its make.py) resume on this code:
the checkpoint format is read back, the restored state is the saved one, and where the CPU kernels are the
ones that wrote them the resumed steps give the earlier code's metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from gipo import PPOConfig, PPOTrainer, build_config
from gipo.checkpoint import latest_good_checkpoint, load_state
from gipo.environment import numerics_environment

FIXTURES = Path(__file__).with_name("fixtures") / "legacy_runs"
NUMERICS = ("torch", "transformers", "cpu", "cpu_capability", "torch_threads")


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("method", ["gipo", "grpo_prompt_gdro", "grpo_gipo_sampling"])
def test_a_run_written_by_the_earlier_code_resumes(tmp_path, method):
    run_dir = tmp_path / method
    shutil.copytree(FIXTURES / method, run_dir)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["policy"] = str(FIXTURES / "model")  # the fixture's model, wherever the repository lies
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    values = {k: v for k, v in saved.items() if k in {f for f in PPOConfig.__dataclass_fields__}}
    config = build_config(PPOConfig, {**values, "max_steps": 4})
    trainer = PPOTrainer(config, output_dir=run_dir, prompts_per_group=8)
    state = load_state(latest_good_checkpoint(run_dir))["trainer"]

    trainer.train(resume=True)
    rows = _rows(run_dir / "metrics.jsonl")
    expected = _rows(run_dir / "expected_metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [set(r) for r in rows] == [set(r) for r in expected]
    if method != "gipo":  # the prompt groups' state came back and moved on from it
        assert set(state["prompt_groups"]) >= {"weights", "loss_ema", "seen", "difficulty"}
    written = json.loads((FIXTURES / method / "environment.json").read_text())
    here = numerics_environment("cpu") | {"torch_threads": torch.get_num_threads()}
    if any(written[key] != here[key] for key in NUMERICS):
        pytest.skip(f"The fixture was written with other CPU kernels or library versions ({', '.join(f'{k}: {written[k]}' for k in NUMERICS)}); "
                    "its run resumed, and its metrics are compared only on such a machine.")
    for got, want in zip(rows[2:], expected[2:], strict=True):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
