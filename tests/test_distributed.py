"""Two processes (accelerate launch, gloo on CPU) compute what one process computes with the same global
batch: the same losses, KL, rewards and group statistics, step by step, and the same trained weights.
A two-process run that is stopped and resumed ends where the uninterrupted one-process run ends.

Sampling uses top_k=1 so that both runs generate the same responses (random draws cannot match across
a different split of the batch); one minibatch per epoch, so that both runs update on the same samples.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gipo import distributed
from gipo.tracking import read_metrics

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate")
                                .exists(), reason="the accelerate command is not installed")

COMPARED_PREFIXES = ("loss/", "objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy",
                     "policy/approxkl_avg", "val/ratio", "groups/", "domain/", "response/length")


def _settings(pipeline: dict[str, Path], method: str, **extra) -> list[str]:
    settings = {**extra, "method": method, "policy": pipeline["sft"] / "final", "reward_model": pipeline["rm"] / "final",
                "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 6, "top_k": 1,
                "eval_every": 0, "device": "cpu", "progress": False, "checkpoint_every": 2, "seed": 3}
    return [f"--set={key}={value}" for key, value in settings.items()]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


ENTRIES = {"gipo": ("-m", "gipo"), "ranked": (str(Path(__file__).with_name("ranked_sampling.py")),)}


def _run(command: list[str], processes: int, mode: tuple[str, ...] = ("--multi_gpu",),
         entry: tuple[str, ...] = ENTRIES["gipo"]) -> None:
    # DeepSpeed compiles its shared-memory op on first use under a file lock; a build killed mid-way elsewhere
    # (another checkout sharing ~/.cache) leaves that lock behind and every later launch waits on it for ever.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    if processes > 1:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        launch = [accelerate, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                  *entry]
    else:
        launch = [sys.executable, *entry]
    result = subprocess.run(launch + command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]  # room for a crashed rank's Python stack above torchrun's report


def _compared(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith(COMPARED_PREFIXES) and isinstance(v, float)}


def _assert_same_metrics(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        first, second = _compared(a), _compared(b)
        assert first.keys() == second.keys(), f"step {a['step']}: {sorted(first.keys() ^ second.keys())}"
        for key, value in first.items():
            assert math.isclose(value, second[key], rel_tol=1e-4, abs_tol=1e-5), \
                f"step {a['step']} {key}: one process {value}, two processes {second[key]}"


def _assert_same_weights(one: Path, two: Path) -> None:
    first, second = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, second[name], rtol=1e-4, atol=1e-5, msg=name)


# GRPO and RLOO on the gold reward, with a sampler that gives each of a prompt's 4 samples its own response
# (tests/ranked_sampling.py): greedy samples of a prompt would be alike, and their advantages cancel.
RANKED = {"reward": "gold", "num_generations": 4, "reuse_generation_logprobs": False, "_entry": "ranked"}


@pytest.mark.parametrize(("method", "extra"), [("ppo", {}), ("gipo", {}), ("oracle_dro", {}),
                                               ("gipo", {"lora_r": 4, "gradient_checkpointing": True}),
                                               ("ppo", {"fsdp": True}), ("gipo", {"fsdp": True}),
                                               ("grpo", RANKED), ("rloo", RANKED), ("grpo_gipo", RANKED),
                                               ("grpo_gdro_sampling", RANKED), ("grpo_prompt_gdro", RANKED)])
def test_two_processes_match_one_process_with_the_global_batch(tiny_pipeline, tmp_path, method, extra):
    extra = dict(extra)
    entry = ENTRIES[extra.pop("_entry", "gipo")]
    settings = _settings(tiny_pipeline, method, **extra)
    _run(["train", "--out", str(tmp_path / "one"), "--set=max_steps=4", *settings], processes=1, entry=entry)
    _run(["train", "--out", str(tmp_path / "two"), "--set=max_steps=4", *settings], processes=2, entry=entry)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == 4 and "loss/policy_avg" in one[-1]
    assert any(k.startswith("groups/return/") for k in one[-1]) == (method not in ("ppo", "grpo", "rloo"))
    if method not in ("ppo", "gipo", "oracle_dro"):  # every prompt's samples got different rewards, so there is a gradient
        assert one[-1]["objective/frac_reward_zero_std"] == 0.0 and one[-1]["policy/grad_norm"] > 1e-3
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")
    # Only the main process wrote: one metrics file with each step once, one set of checkpoints.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.mark.parametrize(("method", "extra"), [("gipo_gain", {}), ("gipo", {"fsdp": True})])
def test_two_processes_resume_where_they_stopped(tiny_pipeline, tmp_path, method, extra):
    """With fsdp the checkpoint holds full weights and optimizer states gathered from the shards."""
    settings = _settings(tiny_pipeline, method, **extra)
    _run(["train", "--out", str(tmp_path / "one"), "--set=max_steps=4", *settings], processes=1)
    _run(["train", "--out", str(tmp_path / "two"), "--set=max_steps=2", *settings], processes=2)
    _run(["train", "--out", str(tmp_path / "two"), "--resume", "--set=max_steps=4", *settings], processes=2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")


def _zero(stage: int) -> tuple[str, ...]:
    return ("--use_deepspeed", "--zero_stage", str(stage))


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (`make install` installs it)")


@needs_deepspeed
@pytest.mark.parametrize(("method", "stage", "accumulation"), [("ppo", 2, 1), ("gipo", 3, 1), ("gipo", 2, 2)])
def test_deepspeed_zero_matches_ddp_and_one_process(tiny_pipeline, tmp_path, method, stage, accumulation):
    """One DeepSpeed engine per trained model; with ZeRO-3 the weights themselves are split, so sampling and
    the checkpoints' full weights need both processes. With gradient accumulation the reference is DDP with
    the same two processes: token-mean losses over micro-batches depend on how the batch is split."""
    settings = _settings(tiny_pipeline, method, gradient_accumulation_steps=accumulation)
    reference = ["train", "--out", str(tmp_path / "reference"), "--set=max_steps=4", *settings]
    _run(reference, processes=1 if accumulation == 1 else 2)
    _run(["train", "--out", str(tmp_path / "zero"), "--set=max_steps=4", *settings], processes=2, mode=_zero(stage))
    one = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    two = read_metrics(tmp_path / "zero" / "metrics.jsonl")
    assert len(one) == 4 and "loss/policy_avg" in one[-1]
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "reference" / "final", tmp_path / "zero" / "final")
    assert sorted(p.name for p in (tmp_path / "zero" / "checkpoints").iterdir()) == ["step-2", "step-4"]


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_runs_resume_where_they_stopped(tiny_pipeline, tmp_path, stage):
    """The checkpoint holds the full weights and every process's ZeRO partition of the optimizer states."""
    settings = _settings(tiny_pipeline, "gipo")
    _run(["train", "--out", str(tmp_path / "one"), "--set=max_steps=4", *settings], processes=1)
    _run(["train", "--out", str(tmp_path / "two"), "--set=max_steps=2", *settings], processes=2, mode=_zero(stage))
    _run(["train", "--out", str(tmp_path / "two"), "--resume", "--set=max_steps=4", *settings], processes=2,
         mode=_zero(stage))
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    _assert_same_metrics(one, two)
    _assert_same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final")


def test_a_deepspeed_checkpoint_resumes_only_under_the_launch_that_wrote_it():
    from gipo.config import ConfigError

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="holds 2 DeepSpeed ZeRO partitions, and this launch has no DeepSpeed"):
        distributed.load_optimizer_state(model, optimizer, {"zero_partitions": [{}, {}]})


def test_batch_shards_and_global_helpers_in_one_process():
    assert distributed.shard(list(range(8))) == list(range(8))
    values = torch.tensor([1.0, 2.0, 6.0])
    assert distributed.global_mean(values).item() == 3.0
    assert distributed.gather(values) is values
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.gather_objects_to_main({"a": 1}) == [{"a": 1}]
    assert distributed.any_process(torch.tensor([False, True])).tolist() == [False, True]


def test_accelerates_own_fsdp_mode_is_refused_with_directions(monkeypatch):
    from gipo.config import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="--set fsdp=true"):
        distributed.make_accelerator(cpu=True, find_unused_parameters=False)


def test_deepspeed_launch_without_deepspeed_says_how_to_install(monkeypatch):
    from gipo.config import ConfigError

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails as if it were not installed
    with pytest.raises(ConfigError, match="pip install --no-build-isolation deepspeed"):
        distributed.start_deepspeed_processes(cpu=True)


def test_fsdp_is_for_fully_trained_models():
    from gipo.config import ConfigError, PPOConfig, build_config

    for extra in ({"lora_r": 4}, {"shared_critic": True}):
        with pytest.raises(ConfigError, match="fsdp shards fully trained models"):
            build_config(PPOConfig, {"fsdp": True, **extra})
