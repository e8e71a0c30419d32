"""Typed configuration: dataclasses loaded from YAML and overridden with ``--set key=value``.

Every field carries its help text and, where it matters, the allowed values or range, so a bad
value is rejected with a message that names the key and what is allowed, before any work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gipo.advantage_weighting import ADVANTAGE_WEIGHTINGS
from gipo.errors import ConfigError
from gipo.estimators import ESTIMATORS, get_estimator
from gipo.losses import ROLLOUT_CORRECTIONS
from gipo.registry import Registry
from gipo.reward_functions import REWARD_SOURCES, STANDALONE, reward_specs
from gipo.rollout import GENERATION_BACKENDS
from gipo.rollout_allocation import ROLLOUT_ALLOCATIONS
from gipo.sampling import SAMPLING_RULES


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None, min_exclusive: bool = False, result_affecting: bool = True,
           registry: Registry | None = None) -> Any:
    """A config field with its documentation and validation rules; ``registry``: the names it takes are that
    registry's (listed by ``--help`` as they are when it runs, user registrations included)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "result_affecting": result_affecting, "registry": registry}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Settings every training command shares."""

    seed: int = option(0, "Random seed for Python, NumPy and torch.")
    max_steps: int = option(200, "Training iterations (PPO) or optimizer steps (SFT, reward model).", min=1, result_affecting=False)
    learning_rate: float = option(1e-3, "Peak learning rate of AdamW.", min=0, min_exclusive=True)
    weight_decay: float = option(0.0, "AdamW weight decay.", min=0)
    warmup_steps: int = option(0, "Linear warm-up steps before a constant learning rate.", min=0)
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm (0 turns it off).", min=0)
    gradient_accumulation_steps: int = option(1, "Micro-batches accumulated per optimizer step.", min=1)
    device: str = option("auto", "Where to train: auto (CUDA if present), cpu or cuda.",
                         choices=("auto", "cpu", "cuda"))
    bf16: bool = option(False, "bf16 autocast on hardware that has it (ignored on the CPU).")
    logging_steps: int = option(1, "Write metrics every N steps.", min=1, result_affecting=False)
    checkpoint_every: int = option(50, "Save a checkpoint every N steps.", min=1, result_affecting=False)
    keep_last: int = option(2, "How many checkpoints to keep.", min=1, result_affecting=False)
    progress: bool = option(True, "Show a progress bar.", result_affecting=False)
    cpu_keep_freed_memory: bool = option(
        True, "On the CPU (Linux, glibc): keep freed memory in the process for the next iteration instead of "
        "returning it to the system, so large tensors do not fault in fresh pages each time (faster; the "
        "resident size then stays at its peak).", result_affecting=False)
    on_nonfinite: str = option("stop", "What to do when NaN/inf appears in a reward, loss or advantage: "
                               "stop the run, or skip the batch and count it.", choices=("stop", "skip"))


@dataclass
class SFTConfig(RunConfig):
    """Supervised fine-tuning on prompt/completion demonstrations."""

    model: str = option("embedded", "Policy to fine-tune: 'embedded' (built locally), a hub id or a local path.")
    dataset: str = option("builtin", "A registered task name, a .jsonl/.json(.gz) file or a Hugging Face "
                          "dataset id with prompt/completion (or messages) rows.")
    batch_size: int = option(64, "Sequences per optimizer step.", min=1)
    max_length: int = option(64, "Longest prompt + completion in tokens; longer rows are an error.", min=8)
    completion_only_loss: bool = option(True, "Train on completion tokens only, not the prompt.")
    eval_prompts: int = option(64, "Held-out prompts per group for `gipo eval`.", min=1)
    max_steps: int = option(1000, "Optimizer steps.", min=1, result_affecting=False)
    learning_rate: float = option(3e-3, "Peak learning rate of AdamW.", min=0, min_exclusive=True)
    warmup_steps: int = option(20, "Linear warm-up steps.", min=0)


@dataclass
class RewardConfig(RunConfig):
    """Bradley-Terry reward model on chosen/rejected pairs."""

    model: str = option("runs/demo/sft/final", "Backbone to start from (the SFT model, as in InstructGPT).")
    dataset: str = option("builtin", "A registered task name (pairs are then sampled from `model` and "
                          "labelled by the gold reward), or a file / dataset id with prompt/chosen/rejected.")
    batch_size: int = option(64, "Pairs per optimizer step.", min=1)
    max_length: int = option(64, "Longest prompt + response in tokens.", min=8)
    num_pairs: int = option(16000, "Pairs to sample when the dataset is a task.", min=10)
    pair_split: str = option("train", "Which split (by a hash of the prompt) of a file or dataset id to train on: "
                             "train; validation for a judge reward model disjoint from the one PPO trains "
                             "against; test; or all. (A task's pairs are sampled from its train prompts.)",
                             choices=("train", "validation", "test", "all"))
    label_noise_temperature: float = option(
        0.05, "Bradley-Terry temperature of the simulated labeller: P(a > b) = sigmoid((gold_a - gold_b) / T).",
        min=0, min_exclusive=True)
    eval_fraction: float = option(0.15, "Share of pairs held out for accuracy.", min=0, max=0.9)
    max_steps: int = option(1000, "Optimizer steps.", min=1, result_affecting=False)
    learning_rate: float = option(3e-4, "Peak learning rate of AdamW.", min=0, min_exclusive=True)
    warmup_steps: int = option(20, "Linear warm-up steps.", min=0)
    center_rewards_coefficient: float = option(
        0.01, "Penalty on the squared score, keeping scores near zero (as TRL's RewardTrainer).", min=0)
    long_examples: str = option("error", "A pair longer than max_length: error, or shorten (drop a chat "
                                "prompt's oldest turns; drop the pair if it still does not fit).",
                                choices=("error", "shorten"))
    extra_eval: str | None = option(None, "Other preference data to report accuracy on, per group, in eval.json's "
                                    "`extra` (a dataset spec, e.g. bigbench:../shared/data/bigbench-hhh); fitted "
                                    "to max_length like the training pairs when long_examples=shorten.")


@dataclass
class DPOConfig(RunConfig):
    """Direct Preference Optimization (Rafailov et al., 2023) on the same preference pairs, as a baseline;
    group-robust (GR-DPO) with ``group_objective: dro``."""

    model: str = option("runs/demo/sft/final", "Policy to start from (and the frozen reference).")
    dataset: str = option("builtin", "Preference pairs: a file or dataset id with prompt/chosen/rejected "
                          "(e.g. a reward-model run's pairs.jsonl), or a task name (pairs sampled as for `gipo rm`).")
    beta: float = option(0.1, "DPO temperature: strength of the implicit KL to the reference.", min=0,
                         min_exclusive=True)
    batch_size: int = option(64, "Pairs per optimizer step.", min=1)
    max_length: int = option(64, "Longest prompt + response in tokens.", min=8)
    num_pairs: int = option(16000, "Pairs to sample when the dataset is a task.", min=10)
    pair_split: str = option("train", "Which split (by a hash of the prompt) of a file or dataset id to train on: "
                             "train; validation for a judge reward model disjoint from the one PPO trains "
                             "against; test; or all. (A task's pairs are sampled from its train prompts.)",
                             choices=("train", "validation", "test", "all"))
    label_noise_temperature: float = option(0.05, "As for `gipo rm`, when pairs are sampled.", min=0,
                                            min_exclusive=True)
    max_steps: int = option(300, "Optimizer steps.", min=1, result_affecting=False)
    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.", min=0, min_exclusive=True)
    warmup_steps: int = option(10, "Linear warm-up steps.", min=0)
    eval_every: int = option(0, "Evaluate gold reward on held-out prompts every N steps (0 = off).", min=0)
    eval_prompts: int = option(64, "Held-out prompts per group for evaluation.", min=1)
    eval_dataset: str | None = option(None, "Prompts to evaluate on (default: `dataset`; set it when `dataset` "
                                      "is a pairs file, e.g. builtin).")
    # GR-DPO (docs/method.md)
    group_objective: str = option("none", "Objective across the pairs' groups: none (DPO, the mean over pairs) or "
                                  "dro (GR-DPO, Ramesh et al. 2024: sum_g alpha_g L_g, group weights alpha raised "
                                  "toward the groups with the larger loss; needs each pair's `group`).",
                                  choices=("none", "dro"))
    group_step_size: float = option(0.01, "GR-DPO: eta, the step of the group weights alpha_g <- alpha_g "
                                    "exp(eta L_g), normalized, once per step (0 keeps them uniform).", min=0)


DPO_METHODS: dict[str, str] = {"dpo": "none", "gr_dpo": "dro"}
"""`gipo compare` methods trained by DPOTrainer on the reward model's pairs: method -> its ``group_objective``."""


_NO_GROUPS = {"groups": "none", "group_objective": "none", "group_kl": False}
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "ppo": {"_about": "plain PPO", "estimator": "gae", **_NO_GROUPS},
    "ppo_no_kl": {"_about": "PPO without KL penalty", "estimator": "gae", **_NO_GROUPS, "kl_coef": 0.0},
    "gipo_fixed_kl": {"_about": "inferred groups + invariant objective, fixed KL", "estimator": "gae",
                      "groups": "inferred", "group_objective": "variance", "group_kl": False},
    "gipo": {"_about": "all three parts, as in the paper", "estimator": "gae", "groups": "inferred",
             "group_objective": "variance", "group_kl": True},
    "gipo_gain": {"_about": "all three, groups from the per-prompt gain, mass-weighted variance", "estimator": "gae",
                  "groups": "inferred", "group_objective": "variance", "group_kl": True, "group_signal": "gain",
                  "group_var": "mass"},
    "oracle_dro": {"_about": "group DRO on the data's group labels", "estimator": "gae", "groups": "oracle",
                   "group_objective": "dro", "group_kl": False},
    "grpo": {"_about": "GRPO, no critic", "estimator": "grpo", **_NO_GROUPS},
    "dr_grpo": {"_about": "Dr. GRPO, no critic", "estimator": "dr_grpo", **_NO_GROUPS},
    "rloo": {"_about": "RLOO, no critic", "estimator": "rloo", **_NO_GROUPS},
    "reinforce_pp": {"_about": "REINFORCE++, no critic", "estimator": "reinforce_pp", **_NO_GROUPS},
    "grpo_gipo": {"_about": "GRPO with the paper's three parts: groups inferred from the prompts' mean rewards, "
                  "invariant objective, group-adaptive KL", "estimator": "grpo", "groups": "inferred",
                  "group_objective": "variance", "group_kl": True, "group_var": "mass", "prompt_sampling": "uniform"},
    "grpo_prompt_gdro": {"_about": "GRPO with Prompt-GDRO as published: uniform sampler, each advantage times its "
                         "pass-rate bin's weight", "estimator": "grpo", "groups": "pass_bins",
                         "group_objective": "none", "group_kl": False, "prompt_sampling": "uniform",
                         "advantage_weighting": "prompt_gdro"},
    "grpo_gdro_sampling": {"_about": "GRPO whose batches are filled by the mean-reward bins' sampling weights (the "
                           "mechanism gipo named grpo_prompt_gdro before it followed the paper)", "estimator": "grpo",
                           "groups": "difficulty", "group_objective": "none", "group_kl": False,
                           "prompt_sampling": "group_weights", "advantage_weighting": "none"},
    "grpo_rollout_gdro": {"_about": "GRPO with Rollout-GDRO: each pass-rate bin's bandit sets how many samples its "
                          "prompts get, under the same total", "estimator": "grpo", "groups": "pass_bins",
                          "group_objective": "none", "group_kl": False, "prompt_sampling": "uniform",
                          "advantage_weighting": "none", "rollout_allocation": "rollout_gdro"},
    "grpo_gipo_rollout": {"_about": "GRPO whose inferred groups (no labels) play Rollout-GDRO's bandits: they set "
                          "how many samples each prompt gets", "estimator": "grpo", "groups": "inferred",
                          "group_objective": "none", "group_kl": False, "group_var": "mass",
                          "prompt_sampling": "uniform", "advantage_weighting": "none",
                          "rollout_allocation": "rollout_gdro"},
    "grpo_learnability": {"_about": "GRPO with learnability sampling: prompts drawn by p(1-p) at their pass rate "
                          "(Foster et al. 2025); mean-reward bins only for the per-bin metrics", "estimator": "grpo",
                          "groups": "difficulty", "group_objective": "none", "group_kl": False,
                          "prompt_sampling": "learnability", "advantage_weighting": "none"},
    "grpo_gipo_sampling": {"_about": "GRPO whose batches are filled by the inferred groups' sampling weights (the "
                           "head places every prompt, seen or not, from its hidden state)", "estimator": "grpo",
                           "groups": "inferred", "group_objective": "none", "group_kl": False, "group_var": "mass",
                           "prompt_sampling": "group_weights"},
    "grpo_oracle_sampling": {"_about": "GRPO whose batches are filled by the data's labelled groups' sampling "
                             "weights (the oracle-group baseline of grpo_gipo_sampling)", "estimator": "grpo",
                             "groups": "oracle", "group_objective": "none", "group_kl": False,
                             "prompt_sampling": "group_weights"},
    "grpo_oracle_dro": {"_about": "GRPO with group DRO on the data's labels", "estimator": "grpo",
                        "groups": "oracle", "group_objective": "dro", "group_kl": False, "prompt_sampling": "uniform"},
    "custom": {"_about": "no preset: set the group keys and the estimator yourself"},
}

RENAMED_METHODS: dict[str, tuple[str, str]] = {"grpo_prompt_gdro": ("grpo_gdro_sampling", "advantage_weighting")}
"""Presets whose mechanism moved to another name: old name -> (new name, the key added with the move). A saved
config with the old name and without that key was written before the move."""


def upgrade_saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A run directory's saved config as today's names call it (for --resume and compare's reuse checks)."""
    renamed = RENAMED_METHODS.get(saved.get("method", ""))
    if renamed is not None and renamed[1] not in saved:
        return {**saved, "method": renamed[0]}
    return saved


def _preset_conflict(method: str, key: str, preset: Any, given: Any) -> str:
    return (f"PPOConfig: method={method} sets {key}={preset!r}, but {key}={given!r} was given. Use "
            "method=custom to combine the group keys freely.")


@dataclass
class PPOConfig(RunConfig):
    """The RL stage: PPO with a critic (estimator gae) or a critic-free estimator (GRPO, Dr. GRPO, RLOO,
    REINFORCE++, or one registered), scored by a reward model, the task's gold reward or reward functions, with a
    KL penalty to a frozen reference; the group methods sit on top of either."""

    policy: str = option("runs/demo/sft/final", "Policy to train: a hub id or a local path.")
    reference: str | None = option(None, "Frozen reference policy (default: a copy of `policy`).")
    reward_model: str = option("runs/demo/rm/final", "Reward model (AutoModelForSequenceClassification, 1 label), "
                               "read when reward=model.")
    reward: str = option("model", "What scores a response: model (the reward model), gold (the task's own gold "
                         "reward: a verifiable reward, no reward model loaded), a registered reward function, or "
                         "python:MODULE:FUNCTION (a function f(prompts, responses, records) -> list of floats; MODULE "
                         "a dotted name or a .py file); several functions comma-separated, summed with "
                         "reward_weights.", registry=REWARD_SOURCES)
    reward_weights: list[float] | None = option(None, "Weights of the reward functions, one each (default: 1 each).")
    critic: str | None = option(None, "Critic backbone (default: the reward model, as in TRL; the policy when "
                                "there is no reward model); a value head and a group head are added on top. "
                                "Only the gae estimator has a critic.")
    shared_critic: bool = option(False, "Value and group heads on the policy's own decoder instead of a critic "
                                 "model: one forward and backward serve both, and no second model is held. The "
                                 "value loss (times vf_coef) then trains the policy's weights too; the group head "
                                 "reads detached hidden states. One process only.")
    dataset: str = option("builtin", "Prompts: a registered task name, a file or a dataset id with a prompt "
                          "(text or chat messages) and optionally a group per row.")
    train_prompts_per_group: int = option(2000, "Training prompts per group (domain) taken from the dataset's train "
                                          "split (fewer if it has fewer): with fewer, each prompt comes round "
                                          "more often.", min=1)
    batch_size: int = option(64, "Samples (responses) per iteration, the rollout batch: num_generations samples of "
                             "each of batch_size / num_generations prompts.", min=1)
    mini_batch_size: int = option(32, "Samples per optimizer step within an epoch.", min=1)
    ppo_epochs: int = option(4, "Passes over each rollout batch.", min=1)
    max_steps: int = option(120, "PPO iterations.", min=1, result_affecting=False)
    learning_rate: float = option(1e-4, "Policy learning rate.", min=0, min_exclusive=True)
    critic_learning_rate: float = option(1e-3, "Critic learning rate.", min=0, min_exclusive=True)
    max_prompt_length: int = option(48, "Longest prompt in tokens (see `long_prompts`).", min=1)
    long_prompts: str = option("error", "A prompt longer than max_prompt_length (training and evaluation): error, "
                               "or shorten (drop a chat prompt's oldest turns; skip the prompt if it still does "
                               "not fit).", choices=("error", "shorten"))
    # Sampling
    max_new_tokens: int = option(16, "Response length limit.", min=1)
    temperature: float = option(1.0, "Sampling temperature (also used to score log-probabilities).",
                                min=0, min_exclusive=True)
    top_k: int = option(0, "Top-k sampling; 0 leaves transformers' default in place, which is top-50 (a known "
                        "quirk kept so that published results reproduce; set top_k to the vocabulary size for none).",
                        min=0)
    top_p: float = option(1.0, "Nucleus sampling mass.", min=0, max=1, min_exclusive=True)
    stop_on_eos: bool = option(True, "End a response at the EOS token.")
    generation_backend: str = option(
        "fast", "Sampling loop: a registered generation backend or python:MODULE:FUNCTION (docs/extending.md).",
        registry=GENERATION_BACKENDS)
    reuse_generation_logprobs: bool = option(
        True, "Take the old policy's log-probabilities from sampling (the fast backend records them, equal to a "
        "forward's within float rounding) instead of one more policy forward; with shared_critic, the values and "
        "group logits too, from the hidden states recorded while sampling. Used only with the fast backend "
        "and a policy without active dropout, in fp32 (with bf16 autocast or dropout the forward runs).")
    rollout_correction: str = option(
        "token_truncate", "Where the responses come with their sampler's own log-probabilities and the trainer "
        "recomputes the old policy's (a backend such as vLLM that records its own; not with the fast backend's "
        "reused ones), weight each token's surrogate by r = pi_train / pi_sampling: token_truncate / "
        "sequence_truncate clamp r (per token, or the product over the response) to [rollout_correction_min, "
        "rollout_correction_max] (truncated importance sampling); token_mask / sequence_mask drop what falls "
        "outside; none.", choices=ROLLOUT_CORRECTIONS)
    rollout_correction_max: float = option(2.0, "Upper bound of the rollout correction's ratio.", min=1)
    rollout_correction_min: float = option(0.0, "Lower bound of the rollout correction's ratio.", min=0, max=1)
    vllm_gpu_memory_utilization: float = option(
        0.3, "generation_backend=vllm on a GPU: the share of the GPU's memory the engine may take (weights and KV "
        "cache), as vLLM's gpu_memory_utilization.", min=0, max=1, min_exclusive=True)
    vllm_sleep: bool = option(
        True, "generation_backend=vllm on a GPU: put the engine to sleep while the trainer trains (vLLM sleep mode, "
        "level 2: weights and KV cache leave the GPU; woken and given the new weights before each sampling call).")
    vllm_cpu_kv_cache_gb: float = option(
        1.0, "generation_backend=vllm on a CPU: GiB of memory for the engine's KV cache (VLLM_CPU_KVCACHE_SPACE, "
        "which wins where it is set).", min=0, min_exclusive=True)
    vllm_enforce_eager: bool = option(
        False, "generation_backend=vllm: run the engine eagerly, without torch.compile or CUDA graphs (starts in "
        "seconds rather than minutes; decodes more slowly on a GPU).")
    vllm_dtype: str = option(
        "auto", "generation_backend=vllm: the engine's weight dtype (float32, bfloat16, float16); auto: the "
        "policy's own.")
    sampling_draws: str = option(
        "inverse_cdf", "How the fast sampling loop draws each token from its probabilities: inverse_cdf (one uniform "
        "number per sample, looked up in the cumulative probabilities) or multinomial (torch.multinomial as HF "
        "generate calls it, one exponential per vocabulary entry: the same tokens as the hf backend under the same "
        "seed, and slower on a CPU). Both sample the same distribution.", choices=("inverse_cdf", "multinomial"))
    share_prompt_prefix: bool = option(
        True, "Where a batch holds several samples of one prompt (num_generations > 1), run that prompt's forward "
        "once (the sampling prefill, the policy and reference log-probabilities) and every sample's response on "
        "a copy of its KV cache: the same numbers and gradient up to float rounding, for less compute and "
        "activation memory. Used where the model allows it: a decoder with a KV cache, no active dropout, no "
        "gradient checkpointing, one process without DDP / FSDP / DeepSpeed.")
    fused_optimizer: bool = option(True, "AdamW with torch's fused kernel: fewer, larger ops per step; the same "
                                   "update up to float rounding. Where the kernel does not apply (parameters off the "
                                   "CPU and CUDA, or not plain floating-point tensors) the plain AdamW runs.")
    missing_eos_penalty: float | None = option(None, "Subtracted from the score of a response without EOS.", min=0)
    # Reward
    normalize_reward: bool | None = option(None, "Whiten scores with their running mean and std (default: true for "
                                           "gae, false for the critic-free estimators, which normalize per prompt or "
                                           "batch themselves).")
    reward_clip: float = option(5.0, "Clip (normalized) scores to [-c, c] (0 = off).", min=0)
    # KL
    kl_coef: float = option(0.05, "Per-token KL coefficient (the initial one when adaptive).", min=0)
    kl_estimator: str = option("k1", "Per-token KL estimator in the reward: k1 (log-ratio) or k3.",
                               choices=("k1", "k3"))
    adaptive_kl: bool = option(False, "Adapt the KL coefficient toward `target_kl` (Ziegler et al.).")
    target_kl: float = option(3.0, "Target KL per response for the adaptive controller.", min=0,
                              min_exclusive=True)
    kl_horizon: int = option(10000, "Horizon of the adaptive KL controller, in samples.", min=1)
    # Advantage estimator (docs/method.md, "Critic-free RL")
    estimator: str = option("gae", "Advantage estimator, a registered name or python:MODULE:FUNCTION "
                            "(docs/extending.md). Only one that needs a critic (gae) builds a critic.",
                            registry=ESTIMATORS)
    num_generations: int | None = option(None, "Samples per prompt (default: 8 for grpo, dr_grpo and rloo, else 1); "
                                         "batch_size counts samples and must be a multiple of it.", min=1)
    scale_rewards: str | None = option(None, "GRPO's advantage scale: group (the std of the prompt's samples, the "
                                       "default for grpo), batch (the std of the batch) or none (dr_grpo).",
                                       choices=("group", "batch", "none"))
    kl_in: str | None = option(None, "Where the KL to the reference goes: reward (a per-token penalty in the reward; "
                               "default for gae, rloo, reinforce_pp) or loss (k3 per token times kl_coef added to the "
                               "policy loss, as GRPO; default for grpo, dr_grpo). kl_coef=0 loads no reference.",
                               choices=("reward", "loss"))
    loss_aggregation: str | None = option(None, "Policy loss over tokens: token_mean (every token of the batch "
                                          "alike), seq_mean_token_mean (each response's token mean, then the mean "
                                          "over responses; the default) or seq_mean_token_sum_norm (token sums over "
                                          "max_new_tokens; the dr_grpo default).",
                                          choices=("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"))
    clip_range_high: float | None = option(None, "Upper ratio clip (DAPO's clip-higher, e.g. 0.28; default: "
                                           "clip_range).", min=0, min_exclusive=True)
    filter_zero_std: bool = option(False, "Drop from the loss the prompts whose samples all got the same reward "
                                   "(DAPO's dynamic sampling, without refilling); logged as "
                                   "objective/frac_reward_zero_std either way.")
    mask_truncated: bool = option(False, "Responses that end without EOS (cut at max_new_tokens) get no loss.")
    # PPO
    gamma: float = option(1.0, "Discount.", min=0, max=1)
    lam: float = option(0.95, "GAE lambda.", min=0, max=1)
    clip_range: float = option(0.2, "Policy ratio clip.", min=0, min_exclusive=True)
    clip_range_value: float = option(0.2, "Value clip around the old values.", min=0, min_exclusive=True)
    vf_coef: float = option(0.5, "Weight of the value loss.", min=0)
    whiten_advantages: bool = option(True, "Whiten GAE advantages over the batch (gae only; the other estimators "
                                     "normalize as their papers do).")
    entropy_coef: float = option(0.0, "Entropy bonus (0 logs entropy without training on it).", min=0)
    eval_every: int = option(10, "Evaluate on held-out prompts every N iterations (0 = off); curves in "
                             "metrics.jsonl as eval/gold/GROUP.", min=0)
    eval_prompts: int = option(64, "Held-out prompts per group for evaluation.", min=1)
    eval_samples: int = option(1, "Responses sampled per held-out prompt at evaluation: pass@k is reported for "
                               "k = 1, 2, 4, ... up to it.", min=1)
    eval_greedy: bool = option(False, "Also one greedy response per evaluated prompt (greedy_pass@1).")
    eval_train_prompts: int = option(0, "Train-split prompts per group also evaluated (`eval/train/...`; a task's "
                                     "prompts only).", min=0)
    ood_dataset: str | None = option(None, "Out-of-distribution prompts evaluated besides the held-out ones "
                                     "(a dataset spec; each of its groups is an OOD split in eval.json), e.g. "
                                     "chat:../shared/data/pku-saferlhf/test.jsonl.gz@pku_safety.")
    # Parameter-efficient training
    lora_r: int = option(0, "LoRA rank for the policy (0 = train all weights). With LoRA and no `reference`, "
                         "the reference is the policy with adapters disabled: no second copy.", min=0)
    lora_alpha: int = option(16, "LoRA scaling numerator.", min=1)
    lora_dropout: float = option(0.0, "LoRA dropout.", min=0, max=1)
    lora_target_modules: str = option("q_proj,v_proj", "Comma-separated module names that get adapters.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).")
    fsdp: bool = option(False, "Under several processes, shard the policy's and the critic's weights, gradients and "
                        "optimizer states across them (PyTorch FSDP2, one unit per transformer block) instead of "
                        "holding a full copy in each (DDP). Full fine-tuning only (not with lora_r or shared_critic); "
                        "the reference and reward models stay whole in every process.")
    # Group Invariant Learning (docs/method.md); `method` picks a preset of the keys below.
    method: str = option("ppo", "Preset: " + ", ".join(f"{k} ({v['_about']})" for k, v in METHOD_PRESETS.items())
                         + ". A group key set explicitly to another value than the preset's is an error "
                         "(use custom).", choices=tuple(METHOD_PRESETS))
    groups: str = option("none", "Where groups come from: none, inferred (a group head trained to maximize R_var: "
                         "on the critic with gae, on the policy's detached hidden state at the prompt with the "
                         "critic-free estimators), difficulty (equal-width bins of each prompt's mean-reward EMA), "
                         "pass_bins (Prompt-GDRO's bins of each prompt's any-of-k pass rate over its last "
                         "pass_window visits, with hysteresis) or oracle (the data's group labels).",
                         choices=("none", "inferred", "difficulty", "pass_bins", "oracle"))
    num_groups: int = option(2, "M, the number of inferred groups (the paper: 2) or of equal-width bins (difficulty, "
                             "pass_bins; Prompt-GDRO's authors found about 6 best).", min=2)
    group_signal: str = option("return", "Per-sample performance that forms the groups: return (shaped PPO "
                               "return, the paper), score (reward-model score) or gain (score minus the "
                               "reference policy's mean score on the same prompt).",
                               choices=("return", "score", "gain"))
    group_var: str = option("unweighted", "Variance across groups: unweighted (the paper) or mass "
                            "(between-group variance weighted by group mass).", choices=("unweighted", "mass"))
    group_objective: str = option("none", "Policy objective across groups: none (PPO), variance (PPO + "
                                  "beta_policy * R_var, the paper), macro_mean, dro.",
                                  choices=("none", "variance", "macro_mean", "dro"))
    beta_policy: float = option(0.1, "Weight of R_var in the policy loss (0.1: at 1 the variance of a small "
                                "group's loss dominated PPO's and wrecked the easy domains, docs/method.md).", min=0)
    beta_critic: float = option(1.0, "Weight of R_var (maximized) in the critic loss (the paper: 1).", min=0)
    dro_step_size: float = option(0.0, "Group DRO: 0 takes the worst group's loss; > 0 uses exponentiated-"
                                  "gradient group weights with this step size.", min=0)
    min_group_mass: float = option(0.0, "Penalize groups whose mass falls below this share (0 = off).",
                                   min=0, max=0.5)
    min_mass_coef: float = option(10.0, "Weight of the minimum-mass penalty in the critic loss.", min=0)
    group_kl: bool = option(False, "Group-adaptive KL: per-sample coefficient kl_coef * p(g_high | x, y) "
                            "(rank-weighted for M > 2).")
    group_kl_floor: float = option(0.0, "Lower bound of the group-adaptive KL weight.", min=0, max=1)
    group_ema: float = option(0.9, "Smoothing of group returns across iterations (for g_high).", min=0, max=0.999)
    gain_baseline_samples: int = option(2, "Reference responses per prompt for the gain's baseline.", min=1)
    # Groups of prompts without a critic (docs/method.md, "Groups without a critic")
    prompt_sampling: str = option("uniform", "Which prompts fill the next batch: a registered sampling rule or "
                                  "python:MODULE:CLASS (docs/extending.md). Rules that read the groups need them "
                                  "(critic-free estimators, or groups=oracle/difficulty).", registry=SAMPLING_RULES)
    group_sampling: bool = option(False, "Shorthand for prompt_sampling=group_weights (configs written before "
                                  "prompt_sampling); set to true whenever the sampling rule reads the groups.")
    group_sampling_step_size: float = option(1.0, "eta of the sampling weights' multiplicative step (per unit of "
                                             "mean reward).", min=0)
    group_sampling_floor: float = option(0.1, "Share of the sampling mixed in uniformly over the groups, so that "
                                         "none stops being seen.", min=0, max=1)
    advantage_weighting: str = option("none", "A multiplier on each sample's advantage from its group: a registered "
                                      "rule or python:MODULE:CLASS (docs/extending.md); prompt_gdro needs groups.",
                                      registry=ADVANTAGE_WEIGHTINGS)
    rollout_allocation: str = option("equal", "How many samples each prompt of a batch gets: a registered rule or "
                                     "python:MODULE:CLASS (docs/extending.md); rollout_gdro needs groups and one "
                                     "process. The batch keeps batch_size samples, num_generations per prompt on "
                                     "average.", registry=ROLLOUT_ALLOCATIONS)
    rollout_min_generations: int = option(2, "rollout_gdro: the fewest samples a prompt gets (its smallest arm).",
                                          min=2)
    rollout_max_generations: int = option(12, "rollout_gdro: the most samples a prompt gets (its largest arm).",
                                          min=2)
    rollout_bandit_eta: float = option(0.05, "rollout_gdro: EXP3's step eta on a group's importance-weighted rewards "
                                       "(its arm probabilities are softmax(eta S)).", min=0)
    rollout_bandit_gamma: float = option(0.1, "rollout_gdro: EXP3's share of each group's arm probabilities mixed "
                                         "in uniformly (exploration).", min=0, max=1)
    rollout_dual_step: float = option(0.05, "rollout_gdro: step of the shadow price mu on the budget, per unit of "
                                      "relative overspend.", min=0)
    pass_window: int = option(50, "pass_bins: a prompt's pass rate is the share of its last pass_window visits in "
                              "which any of its samples passed (reward >= 1); Prompt-GDRO's H.", min=1)
    pass_hysteresis: float = option(0.03, "pass_bins: a prompt changes bin only once its pass rate is past the "
                                    "bin's edge by this much; Prompt-GDRO's delta.", min=0, max=0.5)
    gdro_eta: float = option(0.65, "prompt_gdro: eta, the bin weights' exp(eta * score) step.", min=0)
    gdro_ema_beta: float = option(0.12, "prompt_gdro: beta of each bin score's EMA, s <- (1 - beta) s + beta x.",
                                  min=0, max=1, min_exclusive=True)
    gdro_gamma: float = option(0.01, "prompt_gdro: share of the bin weights mixed in uniformly over the bins "
                               "present in the batch.", min=0, max=1)
    gdro_weight_cap: float = option(15.0, "prompt_gdro: largest advantage multiplier, after rescaling the batch's "
                                    "weights to a mean of 1.", min=1)
    gdro_score: str = option("surrogate_loss", "What a group's score, read by prompt_gdro's weights and rollout_gdro's "
                             "bandits, observes after each update: surrogate_loss (the group's mean clipped "
                             "surrogate, as published) or failure_rate (1 - the share of its samples with reward "
                             ">= 1 in the batch: the loss of a 0/1 reward, which tracks difficulty).",
                             choices=("surrogate_loss", "failure_rate"))
    gdro_score_by_share: bool = option(True, "gdro_score=surrogate_loss: divide a group's mean surrogate loss by its "
                                       "share of the batch (the authors' runs do).")
    difficulty_ema: float = option(0.8, "Decay of each prompt's mean-reward EMA (difficulty bins) and of each "
                                   "group's mean-loss EMA (sampling weights).", min=0, max=0.999)
    group_head_steps: int = option(5, "Gradient steps per iteration of the prompt group head (inferred groups "
                                   "without a critic).", min=1)
    group_head_learning_rate: float = option(1e-2, "Adam learning rate of the prompt group head.", min=0,
                                             min_exclusive=True)

    def __post_init__(self) -> None:
        """Fill the preset's keys that were left at their defaults; a conflicting explicit value is an error."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in METHOD_PRESETS.get(self.method, {}).items():
            if key.startswith("_") or getattr(self, key) == value:
                continue
            if getattr(self, key) != defaults[key]:
                raise ConfigError(_preset_conflict(self.method, key, value, getattr(self, key)))
            setattr(self, key, value)
        for key, value in get_estimator(self.estimator).defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.group_sampling and self.prompt_sampling == "uniform":
            self.prompt_sampling = "group_weights"
        self.group_sampling = bool(getattr(SAMPLING_RULES.get(self.prompt_sampling), "needs_groups", False))

    @property
    def uses_critic(self) -> bool:
        return get_estimator(self.estimator).needs_critic

    @property
    def prompts_per_batch(self) -> int:
        return self.batch_size // self.num_generations

    @staticmethod
    def check_given(given: dict[str, Any]) -> None:
        """A key given explicitly, even at its default, that the method preset sets otherwise is an error."""
        method = given.get("method", "ppo")
        for key, value in METHOD_PRESETS.get(method, {}).items():
            if not key.startswith("_") and key in given and given[key] != value:
                raise ConfigError(_preset_conflict(method, key, value, given[key]))

    def validate(self) -> None:
        self._validate_estimator()
        if self.fsdp and (self.lora_r or self.shared_critic):
            raise ConfigError("PPOConfig: fsdp shards fully trained models; with lora_r or shared_critic use DDP (fsdp: "
                              "false): LoRA's trained weights are small, and a shared critic runs in one process.")
        if self.shared_critic and self.critic:
            raise ConfigError(f"PPOConfig: shared_critic puts the critic's heads on the policy; critic={self.critic!r} "
                              "names a separate critic model. Set one of them.")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise ConfigError(f"PPOConfig: mini_batch_size ({self.mini_batch_size}) must divide batch_size "
                              f"({self.batch_size}).")
        if self.group_objective != "none" and self.groups == "none":
            raise ConfigError(f"PPOConfig: group_objective={self.group_objective} needs groups: set groups to "
                              "inferred or oracle.")
        if self.min_group_mass * self.num_groups > 1:
            raise ConfigError(f"PPOConfig: min_group_mass={self.min_group_mass} cannot hold for num_groups="
                              f"{self.num_groups} groups (at most 1/num_groups).")
        if self.group_kl and self.groups == "none":
            raise ConfigError("PPOConfig: group_kl needs groups: set groups to inferred or oracle.")

    def _validate_estimator(self) -> None:
        reward_specs(self.reward)
        if self.reward_weights is not None and self.reward in STANDALONE:
            raise ConfigError(f"PPOConfig: reward_weights weight reward functions; reward={self.reward!r} has none "
                              "(give reward=python:MODULE:FUNCTION,...).")
        get_estimator(self.estimator).check(self)
        g = self.num_generations
        if self.batch_size % g:
            raise ConfigError(f"PPOConfig: batch_size ({self.batch_size}) counts samples and must be a multiple of "
                              f"num_generations ({g}).")
        if self.filter_zero_std and g < 2:
            raise ConfigError("PPOConfig: filter_zero_std compares a prompt's samples; it needs num_generations > 1.")
        if not self.uses_critic:
            needs = [name for name, on in (("shared_critic", self.shared_critic), ("critic", self.critic)) if on]
            if needs:
                raise ConfigError(f"PPOConfig: {', '.join(needs)} need a critic, which only estimator=gae has "
                                  f"(estimator={self.estimator}).")
            if self.groups == "inferred" and self.group_signal != "return":
                raise ConfigError(f"PPOConfig: without a critic, inferred groups form from each prompt's mean reward; "
                                  f"group_signal={self.group_signal} is the critic's (estimator=gae).")
        if self.rollout_allocation != "equal":
            if self.groups == "none" or self.uses_critic:
                raise ConfigError(f"PPOConfig: rollout_allocation={self.rollout_allocation} gives each group's prompts "
                                  "their number of samples: it needs groups and a critic-free estimator.")
            if not self.rollout_min_generations <= self.num_generations <= self.rollout_max_generations:
                raise ConfigError(f"PPOConfig: num_generations={self.num_generations} is the mean budget per prompt; "
                                  f"it must lie within rollout_min_generations={self.rollout_min_generations} and "
                                  f"rollout_max_generations={self.rollout_max_generations}.")
        if self.advantage_weighting != "none" and self.groups == "none":
            raise ConfigError(f"PPOConfig: advantage_weighting={self.advantage_weighting} weighs samples by their "
                              "group: set groups (pass_bins for Prompt-GDRO).")
        if self.group_sampling and self.groups == "none":
            raise ConfigError(f"PPOConfig: prompt_sampling={self.prompt_sampling} reads the groups: set groups to "
                              "inferred, difficulty or oracle.")
        if self.group_sampling and self.uses_critic and self.groups == "inferred":
            raise ConfigError(f"PPOConfig: prompt_sampling={self.prompt_sampling} with inferred groups reads the "
                              "prompt head of the critic-free estimators; with gae use groups=difficulty or oracle.")


@dataclass
class EvalConfig:
    """What `gipo eval` measures; read from the run directory, overridable."""

    policy: str | None = option(None, "Policy to evaluate (default: RUN_DIR/final).")
    reference: str | None = option(None, "Reference for the KL (default: the run's reference or start model).")
    reward_model: str | None = option(None, "Reward model for `reward` (default: the run's, if any).")
    dataset: str | None = option(None, "Prompts (default: the run's dataset).")
    ood_dataset: str | None = option(None, "Out-of-distribution prompts (default: the run's `ood_dataset`).")
    judge: str | None = option(None, "A second reward model that scores every response as `judge` (for win rates "
                               "where the task has no gold reward; train it on data disjoint from the run's "
                               "reward model, e.g. `pair_split: validation`).")
    eval_prompts: int = option(64, "Held-out prompts per group.", min=1)
    max_new_tokens: int | None = option(None, "Response length limit (default: the run's, else 16).", min=1)
    temperature: float | None = option(None, "Sampling temperature (default: the run's, else 1).", min=0,
                                       min_exclusive=True)
    top_k: int | None = option(None, "Top-k filter, 0 = off (default: the run's, else 0).", min=0)
    top_p: float | None = option(None, "Nucleus filter, 1 = off (default: the run's, else 1).", min=0, max=1,
                                 min_exclusive=True)
    eval_samples: int | None = option(None, "Responses sampled per held-out prompt: pass@k is reported for k = 1, "
                                      "2, 4, ... up to it (default: the run's, else 1).", min=1)
    eval_greedy: bool | None = option(None, "Also one greedy response per prompt: greedy_pass@1 (default: the "
                                      "run's, else false).")
    eval_train_prompts: int | None = option(None, "Train-split prompts per group also evaluated, as `train` in "
                                            "eval.json (default: the run's, else 0).", min=0)
    batch_size: int = option(128, "Responses per generation batch.", min=1)
    seed: int = option(1234, "Sampling seed (fixed so evaluations compare like with like).")
    device: str = option("auto", "auto, cpu or cuda.", choices=("auto", "cpu", "cuda"))


C = TypeVar("C")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(cls_name: str, key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; strings from ``--set`` are parsed as YAML."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(cls_name, key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{cls_name}: key '{key}' expects {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}.")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # --set reward_weights=1,0.5
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{cls_name}: key '{key}' expects a list of {_type_name(item)}, got {value!r}.")
        return [_coerce(cls_name, key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{cls_name}: key '{key}' expects true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{cls_name}: key '{key}' expects an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{cls_name}: key '{key}' expects a finite number, got {value!r}.")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{cls_name}: key '{key}' expects a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{cls_name}: key '{key}' expects a string, got {value!r}.")
    return value


def _check_range(cls_name: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{cls_name}: key '{f.name}' is {value!r}; allowed values: "
                          f"{', '.join(map(str, meta['choices']))}.")
    if meta.get("registry") is not None:  # every name a registered entry (or a python: spec that loads)
        for name in str(value).split(","):
            meta["registry"].get(name.strip())
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        bound = f"> {lo}" if meta.get("min_exclusive") else f">= {lo}"
        raise ConfigError(f"{cls_name}: key '{f.name}' is {value!r}; it must be {bound}.")
    if hi is not None and value > hi:
        raise ConfigError(f"{cls_name}: key '{f.name}' is {value!r}; it must be <= {hi}.")


def _from_source(source: str, cls: type, err: ConfigError) -> ConfigError:
    """``err`` naming the config's source (the file to edit) in place of the class name."""
    return ConfigError(f"{source}: {str(err).removeprefix(f'{cls.__name__}: ')}")


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make ``cls`` from a mapping, rejecting unknown keys and bad values with a clear message."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: unknown key '{key}' for {cls.__name__}.{hint} "
                              f"Allowed keys: {', '.join(sorted(fields))}.")
        kwargs[key] = _coerce(source, key, value, hints[key])
    try:
        check_given = getattr(cls, "check_given", None)
        if check_given:
            check_given(kwargs)
        config = cls(**kwargs)
    except ConfigError as err:
        raise _from_source(source, cls, err) from None
    for f in dataclasses.fields(cls):
        _check_range(source, f, getattr(config, f.name))
    validate = getattr(config, "validate", None)
    if validate:
        try:
            validate()
        except ConfigError as err:
            raise _from_source(source, cls, err) from None
    return config


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}.")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot read value {raw!r}: {_yaml_problem(err)}.") from None
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where it is."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if not problem:
        return " ".join(str(err).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {_yaml_problem(err)}.") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}.") from None
    except OSError as err:
        raise ConfigError(f"Config file {path}: cannot read it ({err.strerror or err}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of key: value, not {type(data).__name__}.")
    return data


PRESETS_KEY = "presets"


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """YAML file (optional) plus ``--set`` overrides, validated into ``cls``.

    A file may hold named sets of values under ``presets:`` (e.g. ``presets: {small: {max_steps: 20}}``);
    ``--set preset=small`` applies one over the file's values, and other ``--set`` keys win over it.
    """
    values = read_yaml(path) if path else {}
    given = parse_overrides(overrides or [])
    presets = values.pop(PRESETS_KEY, None) or {}
    name = given.pop("preset", None)
    if name is not None:
        if not isinstance(presets, dict) or name not in presets or not isinstance(presets[name], dict):
            available = ", ".join(sorted(presets)) if isinstance(presets, dict) and presets else "none"
            raise ConfigError(f"--set preset={name}: {path or 'no config file'} has no preset {name!r} "
                              f"(presets there: {available}).")
        values.update(presets[name])
    values.update(given)
    return build_config(cls, values, source=str(path) if path else cls.__name__)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def describe(cls: type) -> str:
    """Help text listing every key, its default and what it does."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f" (one of: {', '.join(map(str, f.metadata['choices']))})" if f.metadata.get("choices") else ""
        if f.metadata.get("registry") is not None:
            extra = f" {f.metadata['registry'].describe()}"
        lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)
