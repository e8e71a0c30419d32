"""Same machine, same thread count: a run is bitwise reproducible, and its record says what else it depends on.

Each run is a fresh interpreter (so Python's string hashing, PYTHONHASHSEED, differs between them) going
through the whole pipeline: SFT, preference pairs sampled from the SFT policy, the reward model, PPO and the
evaluations. What can still differ from one machine to another (the CPU kernels torch dispatches to, the
library versions, the threads) is written to each run's ``environment.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gipo.environment import ENVIRONMENT_FILE, numerics_environment
from gipo.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_DEMO = ["max_steps=3", "sft.batch_size=8", "rm.num_pairs=40", "rm.batch_size=8", "ppo.batch_size=8",
             "ppo.mini_batch_size=4", "ppo.max_new_tokens=6", "ppo.max_steps=2", "eval_prompts=3", "progress=false",
             "device=cpu"]
STAGES = ("sft", "rm", "ppo")


def _start(command: list[str], out: Path, **variables: str) -> subprocess.Popen:
    """``python -m gipo COMMAND --out OUT`` in a fresh interpreter, one thread (as on any host: the thread
    count is then no variable), with ``variables`` added to its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_NUM_THREADS")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **variables)
    return subprocess.Popen([sys.executable, "-m", "gipo", *command, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(*processes: subprocess.Popen) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-4000:]


def _numbers(row: dict) -> dict:
    """A metrics row without its wall-clock timings (the only values that may differ run to run)."""
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def _digests(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file that holds results: weights, tokenizer, pairs, evaluations."""
    kept = [p for p in sorted(run_dir.rglob("*")) if p.is_file() and "checkpoints" not in p.parts
            and "tensorboard" not in p.parts and p.suffix in (".safetensors", ".json", ".jsonl")
            and p.name not in ("metrics.jsonl", ENVIRONMENT_FILE)]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}


def test_two_processes_give_bitwise_identical_pipelines(tmp_path):
    demo = ["demo", *(arg for pair in TINY_DEMO for arg in ("--set", pair))]
    # Side by side (one thread each): the runs share nothing but the machine.
    _wait(_start(demo, tmp_path / "a", PYTHONHASHSEED="1"), _start(demo, tmp_path / "b", PYTHONHASHSEED="2"))
    for stage in STAGES:
        a, b = tmp_path / "a" / stage, tmp_path / "b" / stage
        rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
        assert len(rows_a) == (2 if stage == "ppo" else 3)
        assert [_numbers(r) for r in rows_a] == [_numbers(r) for r in rows_b], stage  # floats compared exactly
        digests = _digests(a)
        assert "final/model.safetensors" in digests and "eval.json" in digests
        assert digests == _digests(b), stage
        environment = json.loads((a / ENVIRONMENT_FILE).read_text())
        assert environment == json.loads((b / ENVIRONMENT_FILE).read_text())
        assert environment["torch_threads"] == 1 and environment["variables"]["OMP_NUM_THREADS"] == "1"
        assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert environment["torch"] == torch.__version__
    assert (tmp_path / "a" / "rm" / "pairs.jsonl").read_bytes() == (tmp_path / "b" / "rm" / "pairs.jsonl").read_bytes()


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="torch's CPU kernels are "
                    "already the unvectorized ones here")
def test_the_record_tells_a_run_on_other_cpu_kernels_apart(tmp_path):
    """ATEN_CPU_CAPABILITY=default runs torch's unvectorized kernels, as a CPU without AVX2 would: other last
    bits (the reason two machines of one kind may disagree). The run's record says so."""
    _wait(_start(["sft", "--set", "max_steps=1", "--set", "batch_size=4", "--set", "progress=false",
                  "--set", "device=cpu"], tmp_path / "sft", ATEN_CPU_CAPABILITY="default"))
    environment = json.loads((tmp_path / "sft" / ENVIRONMENT_FILE).read_text())
    assert environment["cpu_capability"] == "DEFAULT"
    assert environment["variables"]["ATEN_CPU_CAPABILITY"] == "default"
    assert environment["cpu_capability"] != numerics_environment()["cpu_capability"]


def test_a_resume_in_another_environment_warns_and_keeps_the_first_record(tmp_path, monkeypatch):
    from gipo.config import SFTConfig, build_config
    from gipo.sft import SFTTrainer

    config = build_config(SFTConfig, {"progress": False, "device": "cpu", "max_steps": 1, "batch_size": 4})
    SFTTrainer(config, output_dir=tmp_path, examples_per_group=4).train()
    first = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert first == numerics_environment("cpu")
    with pytest.warns(UserWarning, match="torch_threads"):
        monkeypatch.setattr(torch, "get_num_threads", lambda: first["torch_threads"] + 1)
        resumed = build_config(SFTConfig, {"progress": False, "device": "cpu", "max_steps": 2, "batch_size": 4})
        SFTTrainer(resumed, output_dir=tmp_path, examples_per_group=4).train(resume=True)
    assert json.loads((tmp_path / ENVIRONMENT_FILE).read_text()) == first
