"""Run directories in the format an earlier gipo wrote (commit 0817b4b, recorded in
tests/fixtures/legacy_runs/legacy_format.json by its make.py) resume on this code: the test writes a 2-step run,
rewrites it into that format (checked against the record), resumes it, and finds the same metrics as an
uninterrupted run; where the CPU kernels are the recorded ones, also the earlier code's own metrics."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from gipo.checkpoint import MANIFEST, STATE_FILE, load_state, save_state
from gipo.config import RENAMED_METHODS
from gipo.environment import numerics_environment
from tests.fixtures.legacy_runs.make import RUNS, describe_run, micro_model, trainer

LEGACY = json.loads((Path(__file__).with_name("fixtures") / "legacy_runs" / "legacy_format.json").read_text())
NUMERICS = ("torch", "transformers", "cpu", "cpu_capability")


KEYS_ADDED_SINCE = ("prompt_sampling", "eval_samples", "eval_greedy", "eval_train_prompts", "train_prompts_per_group",
                    "advantage_weighting", "pass_window", "pass_hysteresis", "gdro_eta", "gdro_ema_beta", "gdro_gamma",
                    "gdro_weight_cap", "gdro_score_by_share", "rollout_allocation", "rollout_min_generations",
                    "rollout_max_generations", "rollout_dual_step", "rollout_bandit_eta", "rollout_bandit_gamma", "gdro_score", "rollout_correction",
                    "rollout_correction_max", "rollout_correction_min", "vllm_gpu_memory_utilization", "vllm_sleep",
                    "vllm_cpu_kv_cache_gb", "vllm_enforce_eager", "vllm_dtype")
METRICS_ADDED_SINCE = ("groups/surrogate_loss/", "groups/ratio_drift/", "groups/loss_kl/", "groups/score_observation/")
# Each recorded run as today's code names its method (a preset whose mechanism moved keeps it under a new name).
TODAY = {name: {**extra, "method": RENAMED_METHODS.get(extra["method"], (extra["method"],))[0]}
         for name, extra in RUNS.items()}


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _rows(path: Path) -> list[dict]:
    return _untimed([json.loads(line) for line in path.read_text().splitlines()])


def as_written_before(run_dir: Path, method: str) -> None:
    """Rewrite a run directory as commit 0817b4b wrote it: the method under its name then, none of the config keys
    added since (``KEYS_ADDED_SINCE``) in config.yaml, no ``sampling_rule``, ``advantage_weighting`` or
    ``rollout_allocation`` in the trainer state, no pass-rate bins with the prompt groups (and their mean-reward
    EMAs only with difficulty bins), and the group-weights state (weights, loss EMA,
    groups seen) kept with the prompt groups whatever the sampling (at its start values where the run sampled
    uniformly)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in KEYS_ADDED_SINCE:
        config.pop(key)
    config["method"] = method
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = run_dir / "checkpoints" / "step-2"
    state = load_state(checkpoint)
    trainer_state = state["trainer"]
    rule = trainer_state.pop("sampling_rule")
    trainer_state.pop("advantage_weighting")
    trainer_state.pop("rollout_allocation")
    groups = trainer_state["prompt_groups"]
    if groups is not None:
        groups.pop("pass_bins")
        if config["groups"] != "difficulty":  # the mean-reward EMAs were kept for difficulty bins only
            groups["difficulty"] = {}
        m = len(trainer_state["dro_weights"])
        groups.update(rule or {"weights": torch.full((m,), 1.0 / m), "loss_ema": torch.zeros(m),
                               "seen": torch.zeros(m, dtype=torch.bool)})
    save_state(state, checkpoint)
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][STATE_FILE] = hashlib.sha256((checkpoint / STATE_FILE).read_bytes()).hexdigest()
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("legacy") / "model"


@pytest.mark.parametrize("method", list(RUNS))
def test_a_run_in_the_earlier_format_resumes(tmp_path, model_dir, method):
    out = model_dir.parent
    if not model_dir.exists():
        micro_model(model_dir)
    record = LEGACY["runs"][method]
    trainer(out, tmp_path / "split", 2, TODAY[method]).train()
    as_written_before(tmp_path / "split", RUNS[method]["method"])
    assert describe_run(tmp_path / "split") == {k: v for k, v in record.items() if k != "metrics_4_steps"}

    trainer(out, tmp_path / "split", 4, TODAY[method]).train(resume=True)
    trainer(out, tmp_path / "straight", 4, TODAY[method]).train()
    resumed, straight = _rows(tmp_path / "split" / "metrics.jsonl"), _rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for got, want in zip(resumed, straight, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)

    earlier = _untimed(record["metrics_4_steps"])
    added = [{k for k in r if k.startswith(METRICS_ADDED_SINCE)} for r in straight]
    assert [set(r) - a for r, a in zip(straight, added, strict=True)] == [set(r) for r in earlier]  # no name lost
    written, here = LEGACY["environment"], numerics_environment("cpu")
    if any(written[key] != here[key] for key in NUMERICS):
        pytest.skip("The earlier code's metrics were recorded with other CPU kernels or library versions ("
                    + ", ".join(f"{k}: {written[k]}" for k in NUMERICS) + "); the run resumed as an uninterrupted "
                    "one, and the numbers are compared with the earlier code's only on such a machine.")
    for got, want in zip(resumed, earlier, strict=True):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
