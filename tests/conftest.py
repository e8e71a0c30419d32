"""Shared fixtures: a tiny SFT model and reward model on the built-in suite, trained once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from gipo.config import RewardConfig, SFTConfig, build_config
from gipo.reward import RewardTrainer
from gipo.sft import SFTTrainer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: one thread is faster than two fighting over 2 cores

QUIET = {"progress": False, "device": "cpu"}
D = torch.float64
"""Hand-computed cases use float64 so that their last digits mean something."""


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> dict[str, Path]:
    """A few SFT and reward-model steps: enough for the files and code paths, not for quality."""
    root = tmp_path_factory.mktemp("pipeline")
    sft = build_config(SFTConfig, {**QUIET, "max_steps": 4, "batch_size": 16, "checkpoint_every": 2})
    SFTTrainer(sft, output_dir=root / "sft", examples_per_group=20).train()
    rm = build_config(RewardConfig, {**QUIET, "model": str(root / "sft" / "final"), "max_steps": 3,
                                     "batch_size": 8, "num_pairs": 60})
    RewardTrainer(rm, output_dir=root / "rm").train()
    return {"root": root, "sft": root / "sft", "rm": root / "rm"}
