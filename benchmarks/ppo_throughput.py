#!/usr/bin/env python
"""PPO throughput: gipo's PPOTrainer (methods ``ppo`` and ``gipo``) against TRL 1.12's PPO.

Both sides get the same models (policy, reference, reward model and value model, saved once to a
work folder and loaded by each side from there), the same prompts (token ids checked equal) and the
same PPO shape (batch, minibatch, epochs, response length, no stop token, temperature 1). Each run is
its own subprocess, so timings and peak memory (``ru_maxrss`` of that process at the end of its last
iteration, before gipo saves its final model) belong to one side:
TRL runs with the python of a separate virtual environment that holds TRL 1.12.0 (made on the
first call), gipo with the project's python. Sides alternate, ``--repeats`` times each.

    python benchmarks/ppo_throughput.py                                  # tiny and smollm2, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/ppo_throughput.py --settings tiny --repeats 1 --iterations 3
    python benchmarks/ppo_throughput.py --profile --json ppo_throughput.json
    python benchmarks/ppo_throughput.py --quality                        # default vs plain path
    python benchmarks/ppo_throughput.py --settings tiny --gipo-set generation_backend=hf   # gipo option A/B

Seconds per iteration are wall time between the ends of consecutive PPO iterations (TRL: its
``on_step_end`` callback; gipo: around ``training_step`` inside ``train()``), so both include the
per-iteration logging; the first iteration of every run (warm-up) is left out. Generated tokens per
second = generated tokens per iteration / median seconds per iteration. Ratios are paired: the
ratio of the medians of the two runs of the same repeat, then the median over repeats.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRL_VENV = ROOT / "benchmarks" / ".venv-trl112"
TRL_VERSION = "1.12.0"
TORCH_VERSION = "2.13.0"
HH_HARMLESS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SMOLLM2 = "smollm2-135m-instruct"
SIDES = ("trl", "gipo_ppo", "gipo_gipo")
SETTINGS = {
    # 2-layer Llama (hidden 128, 4 heads, MLP 512, 1,000-token BPE): ~0.78M parameters.
    "tiny": {"batch_size": 16, "mini_batch_size": 16, "ppo_epochs": 4, "response_length": 32,
             "iterations": 20, "learning_rate": 1e-4, "prompt_tokens": "5 to 25"},
    # SmolLM2-135M-Instruct on HH-RLHF harmless prompts (chat template, at most 64 tokens).
    "smollm2": {"batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "response_length": 32,
                "iterations": 10, "learning_rate": 3e-6, "prompt_tokens": "at most 64"},
}
PREPARED_ONLY = {"reasoning"}
"""Settings this script prepares for grpo_throughput.py but does not run itself."""
# Hyperparameters both sides share (TRL's names differ; see run_trl / run_gipo).
KL_COEF, VF_COEF, CLIP, CLIP_VALUE, GAMMA, LAM, TEMPERATURE = 0.05, 0.1, 0.2, 0.2, 1.0, 0.95, 1.0
PROFILE_ROWS = (
    "generation",
    "rollout: policy logprobs",
    "rollout: reference logprobs",
    "rollout: critic values",
    "rollout: reward model",
    "rollout: other (advantages, metrics)",
    "update: forward (policy + critic)",
    "update: backward",
    "update: optimizer steps",
    "update: other (losses, stats)",
    "empty_cache",
    "gc.collect",
    "logging",
    "other (unmeasured: GAE, losses, ...)",
)


# --------------------------------------------------------------------------------------------------
# Small helpers (stdlib only: this file is also run by the TRL environment's python)
# --------------------------------------------------------------------------------------------------
def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONHASHSEED": "0", "TRANSFORMERS_VERBOSITY": "error",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"})
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    return env


def run_child(python: str, args: list[str], log: Path, threads: int | None, script: str | Path = __file__) -> None:
    """``python script args...`` (default: this file), output to ``log``; its last lines on failure."""
    command = [python, str(Path(script).resolve()), *args]
    with log.open("w") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(threads),
                              cwd=str(ROOT), check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{' '.join(command)}\nfailed with exit code {proc.returncode}; "
                         f"last lines of {log}:\n{tail}")


def median_min_max(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def side_summary(results: list[dict]) -> dict:
    """One side's runs: s/iter over every timed iteration (the first of each run left out), generated tok/s
    at the median, the largest peak memory."""
    times = [t for r in results for t in r["intervals"][1:]]
    per_iter = [statistics.mean(r["tokens"]) for r in results]
    stats = median_min_max(times)
    return {"s_per_iter": stats, "tokens_per_s": statistics.mean(per_iter) / stats["median"],
            "peak_mib": max(r["peak_mib"] for r in results), "runs": len(results),
            "tokens_per_iter": statistics.mean(per_iter)}


def paired_ratios(runs: dict[str, list[dict]], a: str, b: str, key: str) -> list[float]:
    """Per repeat, side ``a``'s ``key`` over side ``b``'s."""
    return [ra[key] / rb[key] for ra, rb in zip(runs[a], runs[b], strict=True)]


def ratio_span(values: list[float]) -> str:
    """``median [min, max]`` of paired ratios (the median alone for one repeat)."""
    spread = f" [{min(values):.2f}, {max(values):.2f}]" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


class Profile:
    """Seconds per named phase, collected per iteration."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}
        self.iterations: list[dict[str, float]] = []

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def timed(self, name, fn):
        """``fn`` wrapped to add its wall time under ``name`` (a string or a function of the call's args)."""

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name(*args, **kwargs) if callable(name) else name, time.perf_counter() - started)

        return wrapper

    def flush(self) -> None:
        self.iterations.append(self.current)
        self.current = {}


# --------------------------------------------------------------------------------------------------
# TRL environment
# --------------------------------------------------------------------------------------------------
def venv_versions(python: Path) -> dict[str, str] | None:
    code = ("import json, torch, transformers, trl; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'trl': trl.__version__}))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_trl_venv(path: Path) -> tuple[str, dict[str, str]]:
    """The TRL environment's python: ``python3 -m venv``, then pinned torch, then trl==1.12.0."""
    python = path / "bin" / "python"
    versions = venv_versions(python) if python.exists() else None
    if versions and versions["trl"] == TRL_VERSION and versions["torch"].split("+")[0] == TORCH_VERSION:
        return str(python), versions
    if not python.exists():
        print(f"Creating the TRL environment {path} (python3 -m venv) ...", flush=True)
        subprocess.run(["python3", "-m", "venv", str(path)], check=True)
    for requirement in (f"torch=={TORCH_VERSION}", f"trl=={TRL_VERSION}"):
        print(f"  pip install {requirement} ...", flush=True)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"pip install {requirement} into {path} failed:\n{proc.stdout[-3000:]}"
                             f"{proc.stderr[-3000:]}")
    versions = venv_versions(python)
    if not versions or versions["trl"] != TRL_VERSION:
        raise SystemExit(f"{path} does not import trl {TRL_VERSION} after installing it: {versions}")
    return str(python), versions


# --------------------------------------------------------------------------------------------------
# Assets: models, tokenizer and prompts, saved once per setting (runs in the project's python)
# --------------------------------------------------------------------------------------------------
SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["an", "el", "is", "or", "um", "th", "st"]


def synthetic_text(seed: int, lines: int) -> tuple[list[str], list[str]]:
    """Sentences of made-up words with Zipf-like frequencies: food for a BPE tokenizer and for prompts."""
    import random

    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)})
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 30)))
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!", ","]))
    return out, words


def save_value_model(reward_model, tokenizer, path: Path, seed: int) -> None:
    """The value model both sides start from: a copy of the reward model. For gipo's critic, its score
    head is also written as the value head (critic_heads.safetensors, read by Critic.from_backbone)."""
    import torch
    from safetensors.torch import save_file

    reward_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    score = reward_model.score.weight.detach().float().clone()  # (1, hidden)
    generator = torch.Generator().manual_seed(seed)
    heads = {"value_head.weight": score.contiguous(), "value_head.bias": torch.zeros(1),
             "group_head.weight": torch.randn(2, score.shape[1], generator=generator) * 0.02,
             "group_head.bias": torch.zeros(2)}
    save_file(heads, str(path / "critic_heads.safetensors"))


def prepare_tiny(out: Path, seed: int, n_prompts: int = 256) -> dict:
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    lines, _ = synthetic_text(seed, 6000)
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>", padding_side="left",
                                        model_max_length=256)

    rng = random.Random(seed + 1)
    prompt_lines, _ = synthetic_text(seed + 2, 4 * n_prompts)
    texts, ids = [], []
    for line in prompt_lines:
        if len(texts) == n_prompts:
            break
        length = rng.randint(5, 25)
        tokens = tokenizer(line + " " + line, add_special_tokens=False)["input_ids"][:length]
        text = tokenizer.decode(tokens)
        if len(tokens) == length and tokenizer(text, add_special_tokens=False)["input_ids"] == tokens:
            texts.append(text)
            ids.append(tokens)
    if len(texts) < n_prompts:
        raise RuntimeError(f"only {len(texts)} of {n_prompts} synthetic prompts round-trip through the "
                           "tokenizer")

    shape = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
             "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
             "tie_word_embeddings": False}
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(**shape))
    torch.manual_seed(seed + 1)
    reward = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    paths = {name: out / name for name in ("policy", "reward", "value")}
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])
    save_value_model(reward, tokenizer, paths["value"], seed)
    return {"paths": {k: str(v) for k, v in paths.items()}, "prompts": texts, "prompt_ids": ids,
            "parameters": sum(p.numel() for p in policy.parameters())}


def hh_prompts(path: Path, limit: int) -> list[str]:
    """First human turns of HH-RLHF transcripts, in file order, without repeats."""
    seen, out = set(), []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            text = json.loads(line)["chosen"]
            first = text.split("\n\nHuman: ", 1)[-1].split("\n\nAssistant:", 1)[0].strip()
            if first and first not in seen:
                seen.add(first)
                out.append(first)
            if len(out) >= limit:
                break
    return out


REASONING_DATASET = "reasoning_gym:configs/reasoning_tasks.yaml"
"""The ``reasoning`` setting's prompts: the mix of configs/smollm2_reasoning.yaml (docs/reasoning.md)."""


def reasoning_records(n_prompts: int, seed: int) -> list[dict]:
    """The ``reasoning`` setting's prompt records, the same in every process (train split of the run's seed)."""
    from gipo.tasks import get_task

    task = get_task(REASONING_DATASET)
    return task.prompts("train", n_prompts // len(task.groups), seed)


def prepare_smollm2(out: Path, seed: int, hh_path: Path, n_prompts: int = 128, max_tokens: int = 64,
                    reasoning: bool = False) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gipo.data import encode_prompts
    from gipo.models import load_causal_lm, load_tokenizer

    try:
        policy = load_causal_lm(SMOLLM2)
    except Exception as err:  # noqa: BLE001 - any failure means "not bundled here"
        return {"skip": f"gipo.models.load_causal_lm({SMOLLM2!r}) failed ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}); the bundled SmolLM2 is not available here."}
    source = getattr(policy, "name_or_path", "") or policy.config._name_or_path
    try:
        tokenizer = load_tokenizer(SMOLLM2)
    except Exception:  # noqa: BLE001 - e.g. no pad token set; the folder's tokenizer is still usable
        tokenizer = AutoTokenizer.from_pretrained(source)
    if "<empty_output>" not in tokenizer.get_vocab():
        return {"skip": f"the {SMOLLM2} tokenizer has no <empty_output> token to pad with"}
    if reasoning:
        try:
            chats = [r["prompt"] for r in reasoning_records(n_prompts, seed)]
        except Exception as err:  # noqa: BLE001 - reasoning-gym missing, or the mix's file
            return {"skip": f"reasoning-gym prompts unavailable ({type(err).__name__}: {err})"}
        max_tokens = 128
    elif not hh_path.exists():
        return {"skip": f"HH-RLHF harmless prompts not found at {hh_path}"}
    else:
        chats = [[{"role": "user", "content": text}] for text in hh_prompts(hh_path, 20 * n_prompts)]
    tokenizer.pad_token = "<empty_output>"
    tokenizer.padding_side = "left"
    policy.config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id

    prompts, ids = [], []
    for messages in chats:
        encoded = encode_prompts(tokenizer, [messages], 10**6, "prompts")[0]
        if len(encoded) <= max_tokens:
            prompts.append(messages)
            ids.append(encoded)
        if len(prompts) == n_prompts:
            break
    if len(prompts) < 16 or reasoning and len(prompts) < len(chats):
        return {"skip": f"only {len(prompts)} prompts fit in {max_tokens} tokens"}

    paths = {name: out / name for name in ("policy", "reward", "value")}
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    torch.manual_seed(seed + 1)  # the fresh score head
    reward = AutoModelForSequenceClassification.from_pretrained(paths["policy"], num_labels=1,
                                                                dtype=torch.float32)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(paths["reward"])
    tokenizer.save_pretrained(paths["reward"])
    save_value_model(reward, tokenizer, paths["value"], seed)
    return {"paths": {k: str(v) for k, v in paths.items()}, "prompts": prompts, "prompt_ids": ids,
            "parameters": sum(p.numel() for p in policy.parameters()), "source": str(source)}


def child_prepare(args) -> None:
    out = Path(args.out).parent
    if args.setting == "tiny":
        assets = prepare_tiny(out, args.seed)
    else:
        assets = prepare_smollm2(out, args.seed, Path(args.hh_path), reasoning=args.setting == "reasoning")
    Path(args.out).write_text(json.dumps(assets))


# --------------------------------------------------------------------------------------------------
# Sides (each in its own process)
# --------------------------------------------------------------------------------------------------
def setup_threads(spec: dict) -> int:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return torch.get_num_threads()


def run_trl(spec: dict, profile: bool) -> dict:
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    threads = setup_threads(spec)
    transformers.logging.set_verbosity_error()
    paths, setting = spec["paths"], spec["setting"]
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    tokenizer.padding_side = "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "TRL's PPO needs a pad token distinct from EOS"
    dtype = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(paths["policy"], **dtype)
    reference = AutoModelForCausalLM.from_pretrained(paths["policy"], **dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"], num_labels=1, **dtype)
    value = AutoModelForSequenceClassification.from_pretrained(paths["value"], num_labels=1, **dtype)
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})
    batch, iterations = setting["batch_size"], spec["iterations"]
    config = PPOConfig(
        output_dir=spec["run_dir"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_mini_batches=batch // setting["mini_batch_size"], num_ppo_epochs=setting["ppo_epochs"],
        response_length=setting["response_length"], total_episodes=batch * iterations,
        local_rollout_forward_batch_size=batch, stop_token=None, temperature=TEMPERATURE,
        learning_rate=setting["learning_rate"], kl_coef=KL_COEF, vf_coef=VF_COEF, cliprange=CLIP,
        cliprange_value=CLIP_VALUE, gamma=GAMMA, lam=LAM, seed=spec["seed"], bf16=False, use_cpu=True,
        num_sample_generations=0, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)

    ends: list[float] = []
    peaks: list[float] = []
    prof = Profile()

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            peaks.append(peak_mib())
            prof.flush()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "objective/scores" in logs:
                scores.append(logs["objective/scores"])

    scores: list[float] = []
    tokens: list[int] = []
    generation = trl_ppo.batch_generation

    def counted_generation(model, queries, *args, **kwargs):
        result = generation(model, queries, *args, **kwargs)
        tokens.append((result[0].shape[1] - queries.shape[1]) * queries.shape[0])
        return result

    trl_ppo.batch_generation = prof.timed("generation", counted_generation)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value, eval_dataset=dataset,
                         callbacks=[Timer()])
    if profile:
        trl_ppo.forward = prof.timed(
            lambda *a, **k: "update: forward (policy + critic)" if torch.is_grad_enabled()
            else "rollout: reference logprobs", trl_ppo.forward)
        trl_ppo.get_reward = prof.timed(
            lambda model, *a, **k: "rollout: reward model" if model is trainer.reward_model
            else "rollout: critic values", trl_ppo.get_reward)
        trainer.accelerator.backward = prof.timed("update: backward", trainer.accelerator.backward)
        trainer.optimizer.step = prof.timed("update: optimizer steps", trainer.optimizer.step)
        trl_ppo.empty_cache = prof.timed("empty_cache", trl_ppo.empty_cache)
        timed_collect = prof.timed("gc.collect", trl_ppo.gc.collect)
        trl_ppo.gc = type("TimedGC", (), {"collect": staticmethod(timed_collect)})
        trainer.log = prof.timed("logging", trainer.log)
    trainer.train()
    return {"intervals": [b - a for a, b in zip(ends, ends[1:], strict=False)], "tokens": tokens,
            "scores": scores, "profile": prof.iterations if profile else None, "peak_mib": peaks[-1],
            "peak_mib_exit": peak_mib(), "threads": threads,
            "versions": {"trl": trl.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def plain_response_logprobs(model, rollout, temperature: float, with_entropy: bool = False,
                            entropy_grad: bool = False, share_prompts: bool = False):
    """The straightforward path: full logits for every position, a full log_softmax, then gather (every
    sample runs its own prompt: ``share_prompts`` is ignored)."""
    import torch

    from gipo.models import position_ids_from_mask

    mask = rollout.attention_mask
    logits = model(input_ids=rollout.sequences, attention_mask=mask,
                   position_ids=position_ids_from_mask(mask)).logits
    logits = logits[:, rollout.query_ids.shape[1] - 1:-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return picked, (entropy if entropy is None or entropy_grad else entropy.detach())


def plain_optimizer(make_optimizer):
    """``make_optimizer`` whose AdamW takes the plain per-tensor loop (no foreach or fused kernel)."""

    def make(*args, **kwargs):
        optimizer, scheduler = make_optimizer(*args, **kwargs)
        for group in optimizer.param_groups:
            group.update({"foreach": False, "fused": False} if "fused" in group else {"foreach": False})
        return optimizer, scheduler

    return make


def measure_floor(trainer, batch: int, repeats: int = 3) -> dict:
    """One generate plus one forward/backward of the policy on a batch of the same shape (with the trainer's
    sampling settings and prompt sharing)."""
    import torch

    from gipo.data import pad_left
    from gipo.rollout import generate, response_logprobs

    samples = trainer.config.num_generations  # each prompt's samples, as a training batch holds them
    ids, mask = pad_left([trainer.encoded[i] for i in range(batch // samples) for _ in range(samples)],
                         trainer.tokenizer.pad_token_id)
    generate_s, backward_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rollout = generate(trainer.policy, ids, mask, trainer.tokenizer.eos_token_id,
                           trainer.tokenizer.pad_token_id, trainer.settings)
        generate_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        logprobs, _ = response_logprobs(trainer.policy, rollout, trainer.config.temperature,
                                        share_prompts=trainer.config.share_prompt_prefix)
        (logprobs * rollout.response_mask).sum().backward()
        backward_s.append(time.perf_counter() - started)
        trainer.policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        started = time.perf_counter()
        response_logprobs(trainer.policy, rollout, trainer.config.temperature,
                          share_prompts=trainer.config.share_prompt_prefix)
        forward_s = time.perf_counter() - started
    return {"generate_s": statistics.median(generate_s), "forward_backward_s": statistics.median(backward_s),
            "forward_s": forward_s, "total_s": statistics.median(generate_s) + statistics.median(backward_s)}


PLAIN_OPTIONS = {"generation_backend": "hf", "reuse_generation_logprobs": False, "fused_optimizer": False}


def count_gipo_generation(prof: Profile, tokens: list[int], lengths: list[float] | None = None) -> None:
    """gipo.experience's ``generate`` timed as "generation"; each call appends its generated token positions to
    ``tokens`` (and, given ``lengths``, the mean response length)."""
    import gipo.experience as gipo_experience

    generation = gipo_experience.generate

    def counted_generation(*args, **kwargs):
        rollout = generation(*args, **kwargs)
        tokens.append(rollout.response_ids.numel())
        if lengths is not None:
            lengths.append(rollout.response_mask.sum(-1).float().mean().item())
        return rollout

    gipo_experience.generate = prof.timed("generation", counted_generation)


def run_gipo(spec: dict, method: str, profile: bool, variant: str) -> dict:
    import torch
    import transformers

    import gipo.experience as gipo_experience
    import gipo.ppo as gipo_ppo
    import gipo.rollout as gipo_rollout
    import gipo.trainer as gipo_trainer
    from gipo import PPOConfig, PPOTrainer, build_config

    threads = setup_threads(spec)
    transformers.logging.set_verbosity_error()
    if variant == "plain":
        gipo_ppo.response_logprobs = gipo_experience.response_logprobs = gipo_rollout.response_logprobs = \
            plain_response_logprobs
        gipo_ppo.make_optimizer = plain_optimizer(gipo_ppo.make_optimizer)
    paths, setting = spec["paths"], spec["setting"]
    # The plain variant keeps what the options change in the method (shared_critic, ...), not the speed paths.
    overrides = {**spec.get("gipo_overrides", {}), **(PLAIN_OPTIONS if variant == "plain" else {})}
    config = build_config(PPOConfig, {
        "method": method, "policy": paths["policy"], "reward_model": paths["reward"],
        # The same value model as TRL's side, unless the heads sit on the policy (shared_critic).
        "critic": None if overrides.get("shared_critic") else paths["value"],
        "dataset": f"ppo_throughput/{spec['setting_name']}", "batch_size": setting["batch_size"],
        "mini_batch_size": setting["mini_batch_size"], "ppo_epochs": setting["ppo_epochs"],
        "max_new_tokens": setting["response_length"], "stop_on_eos": False, "temperature": TEMPERATURE,
        "max_steps": spec["iterations"], "learning_rate": setting["learning_rate"],
        "critic_learning_rate": setting["learning_rate"], "kl_coef": KL_COEF, "vf_coef": VF_COEF,
        "clip_range": CLIP, "clip_range_value": CLIP_VALUE, "gamma": GAMMA, "lam": LAM,
        "max_prompt_length": 64, "eval_every": 0, "checkpoint_every": 10**6, "progress": False,
        "device": "cpu", "seed": spec["seed"],
        # The plain variant also samples with HF generate, scores with a policy forward and steps a plain AdamW.
        **overrides,
    }, source="ppo_throughput")
    records = [{"prompt": p, "group": "all"} for p in spec["prompts"]]
    trainer = PPOTrainer(config, prompts=records, output_dir=spec["run_dir"], overwrite=True)
    if trainer.collector.encoded != spec["prompt_ids"]:
        print("note: gipo encoded the prompts differently; using the shared token ids", flush=True)
        trainer.collector.encoded = [list(ids) for ids in spec["prompt_ids"]]

    ends: list[float] = []
    steps: list[float] = []
    rows: list[dict] = []
    tokens: list[int] = []
    peaks: list[float] = []
    prof = Profile()
    count_gipo_generation(prof, tokens)
    if profile:
        trainer.update = prof.timed("update", trainer.update)
        for module in (gipo_ppo, gipo_experience):  # the update's forwards, and the rollout's
            module.response_logprobs = prof.timed(
                lambda model, *a, **k: "update: forward (policy + critic)" if torch.is_grad_enabled() else
                "rollout: policy logprobs" if model is trainer.policy else "rollout: reference logprobs",
                module.response_logprobs)
            module.critic_values = prof.timed(
                lambda *a, **k: "update: forward (policy + critic)" if torch.is_grad_enabled() else
                "rollout: critic values", module.critic_values)
        trainer.collector.reward = prof.timed("rollout: reward model", trainer.collector.reward)
        trainer.optimizer_step = prof.timed("update: optimizer steps", trainer.optimizer_step)
        torch.Tensor.backward = prof.timed("update: backward", torch.Tensor.backward)
        gipo_trainer.MetricsLogger.log = prof.timed("logging", gipo_trainer.MetricsLogger.log)
    training_step = trainer.training_step

    def timed_step():
        started = time.perf_counter()
        if not ends:
            ends.append(started)
        metrics = training_step()
        ends.append(time.perf_counter())
        peaks.append(peak_mib())
        steps.append(ends[-1] - started)
        rows.append({k: metrics.get(k) for k in ("time/rollout", "time/update", "objective/scores",
                                                 "objective/kl")})
        if profile:
            rollout_parts = ("generation", "rollout: policy logprobs", "rollout: reference logprobs",
                             "rollout: critic values", "rollout: reward model")
            prof.current["rollout: other (advantages, metrics)"] = metrics["time/rollout"] - sum(
                prof.current.get(k, 0.0) for k in rollout_parts)
            update = prof.current.pop("update", metrics["time/update"])
            prof.current["update: other (losses, stats)"] = update - sum(
                prof.current.get(k, 0.0) for k in PROFILE_ROWS if k.startswith("update: "))
            prof.flush()
        return metrics

    trainer.training_step = timed_step
    trainer.train()
    floor = measure_floor(trainer, setting["batch_size"]) if profile else None
    return {"intervals": [b - a for a, b in zip(ends, ends[1:], strict=False)], "steps": steps,
            "tokens": tokens, "rows": rows, "scores": [r["objective/scores"] for r in rows],
            "kl": [r["objective/kl"] for r in rows],
            "profile": prof.iterations if profile else None, "floor": floor, "peak_mib": peaks[-1],
            "peak_mib_exit": peak_mib(), "threads": threads,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def child_run(args) -> None:
    spec = json.loads(Path(args.spec).read_text())
    if args.side == "trl":
        result = run_trl(spec, args.profile)
    else:
        result = run_gipo(spec, args.side.removeprefix("gipo_"), args.profile, args.variant)
    Path(args.out).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent: orchestration and report
# --------------------------------------------------------------------------------------------------
def gipo_python() -> str:
    project = ROOT / ".venv" / "bin" / "python"
    return str(project) if project.exists() else sys.executable


def prepare_setting(name: str, work: Path, args) -> dict | None:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "assets.json"
    print(f"[{name}] preparing models, tokenizer and prompts in {folder} ...", flush=True)
    command = ["--child", "prepare", "--setting", name, "--seed", str(args.seed), "--out", str(out),
               "--hh-path", str(args.hh_path)]
    run_child(gipo_python(), command, folder / "prepare.log", args.threads)
    assets = json.loads(out.read_text())
    if "skip" in assets:
        print(f"[{name}] SKIPPED: {assets['skip']}", flush=True)
        return None
    setting = SETTINGS.get(name, {})  # a PREPARED_ONLY setting gets its shape from the calling benchmark
    spec = {**assets, "setting_name": name, "setting": setting, "seed": args.seed, "threads": args.threads,
            "iterations": args.iterations or setting.get("iterations")}
    lengths = [len(ids) for ids in assets["prompt_ids"]]
    print(f"[{name}] policy {assets['parameters'] / 1e6:.2f}M parameters; {len(lengths)} prompts of "
          f"{min(lengths)} to {max(lengths)} tokens", flush=True)
    return spec


def run_side(spec: dict, side: str, label: str, work: Path, args, python: str, variant: str = "fast", *,
             script: str | Path = __file__, child_args: list[str] | None = None) -> dict:
    """One side's run, ``script --child run`` in its own process (``child_args``, default ``--variant``);
    its result, with the median s/iter."""
    run_dir = work / f"{label}-{side}".replace("/", "of").replace(" ", "-")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, out = run_dir / "spec.json", run_dir / "result.json"
    from gipo.config import parse_overrides  # the parent runs with the project's python; `--set`'s parsing

    spec_path.write_text(json.dumps({**spec, "run_dir": str(run_dir / "run"),
                                     "gipo_overrides": parse_overrides(args.gipo_set)}))
    started = time.perf_counter()
    command = ["--child", "run", "--side", side, "--spec", str(spec_path), "--out", str(out),
               *(["--variant", variant] if child_args is None else child_args)]
    run_child(python, command + (["--profile"] if args.profile else []), run_dir / "child.log", args.threads,
              script=script)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    timed = result["intervals"][1:]
    if not timed:
        raise SystemExit("need at least 2 iterations: the first one is warm-up and left out")
    result["median_s"] = statistics.median(timed)
    length = f", mean response {result['mean_length']:.1f} tokens" if "mean_length" in result else ""
    print(f"[{label}] {side:9s} {result['median_s']:.3f} s/iter (median of {len(timed)}), "
          f"peak {result['peak_mib']:.0f} MiB{length}, {result['threads']} threads, process "
          f"{result['wall_s']:.0f} s", flush=True)
    shutil.rmtree(run_dir / "run", ignore_errors=True)
    return result


def alternating(sides: tuple[str, ...], repeats: int):
    """``(repeat, side)`` in run order: every side once per repeat, who goes first rotating."""
    for repeat in range(repeats):
        for side in sides[repeat % len(sides):] + sides[:repeat % len(sides)]:
            yield repeat, side


def summarize(runs: dict[str, list[dict]]) -> dict:
    summary: dict = {side: side_summary(results) for side, results in runs.items()}
    pairs = {"ppo_vs_trl": paired_ratios(runs, "gipo_ppo", "trl", "median_s"),
             "gipo_vs_ppo": paired_ratios(runs, "gipo_gipo", "gipo_ppo", "median_s"),
             "gipo_vs_trl": paired_ratios(runs, "gipo_gipo", "trl", "median_s"),
             "memory_ppo_vs_trl": paired_ratios(runs, "gipo_ppo", "trl", "peak_mib")}
    summary["ratio_ppo_vs_trl"] = statistics.median(pairs["ppo_vs_trl"])
    summary["ratio_gipo_vs_ppo"] = statistics.median(pairs["gipo_vs_ppo"])
    summary["memory_ratio_ppo_vs_trl"] = statistics.median(pairs["memory_ppo_vs_trl"])
    summary["paired_ratios"] = pairs
    return summary


def profile_table(runs: dict[str, list[dict]], rows: tuple[str, ...] = PROFILE_ROWS) -> dict[str, dict[str, float]]:
    """Mean seconds per iteration per phase (iterations after the first, all repeats); the last of ``rows`` is
    what the measured phases leave of the iteration."""
    table: dict[str, dict[str, float]] = {}
    for side, results in runs.items():
        if not results or results[0].get("profile") is None:
            continue
        phases: dict[str, list[float]] = {row: [] for row in rows}
        totals = []
        for r in results:
            for interval, parts in zip(r["intervals"][1:], r["profile"][1:], strict=False):
                totals.append(interval)
                for row in rows[:-1]:
                    phases[row].append(parts.get(row, float("nan")))
                phases[rows[-1]].append(interval - sum(v for v in parts.values()))
        table[side] = {row: statistics.mean(v) for row, v in phases.items() if v}
        table[side]["iteration"] = statistics.mean(totals)
    return table


def print_side_table(summary: dict, sides, extra: dict[str, str] | None = None) -> None:
    """One row per side: s/iter median [min, max], generated tok/s, peak MiB, then the ``extra`` columns
    (header: key of the side's summary)."""
    extra = extra or {}
    print(f"{'side':10s} {'s/iter median':>13s} {'[min, max]':>18s} {'gen tok/s':>10s} {'peak MiB':>9s}"
          + "".join(f" {header:>9s}" for header in extra))
    for side in sides:
        r = summary[side]
        st = r["s_per_iter"]
        spread = f"[{st['min']:.3f}, {st['max']:.3f}]"
        print(f"{side:10s} {st['median']:13.3f} {spread:>18s} {r['tokens_per_s']:10.1f} {r['peak_mib']:9.0f}"
              + "".join(f" {r[key]:9.1f}" for key in extra.values()))


def print_phase_table(table: dict[str, dict[str, float]], sides, rows: tuple[str, ...], width: int = 40) -> None:
    """``profile_table``'s mean seconds per phase, a column per side ("-" where a side has no such phase)."""
    print(f"{'phase':{width}s}" + "".join(f"{side:>11s}" for side in sides))
    for row in (*rows, "iteration"):
        cells = []
        for side in sides:
            value = table.get(side, {}).get(row)
            cells.append(f"{value:11.3f}" if value is not None and value == value else f"{'-':>11s}")
        print(f"{row:{width}s}" + "".join(cells))


def print_setting(name: str, spec: dict, runs: dict[str, list[dict]], summary: dict, args) -> None:
    s = spec["setting"]
    threads = sorted({r["threads"] for results in runs.values() for r in results})
    print(f"\n== {name}: batch {s['batch_size']} prompts ({s['prompt_tokens']} tokens), "
          f"{s['response_length']} response tokens (no stop), {s['ppo_epochs']} PPO epoch(s), "
          f"minibatch {s['mini_batch_size']}, "
          f"{spec['iterations']} iterations x {args.repeats} repeat(s), torch threads {threads}")
    print_side_table(summary, SIDES)
    pairs = summary["paired_ratios"]
    print(f"gipo ppo / TRL    time {ratio_span(pairs['ppo_vs_trl'])}   memory "
          f"{ratio_span(pairs['memory_ppo_vs_trl'])}   (paired by repeat; < 1: gipo faster / smaller)")
    print(f"gipo gipo / ppo   time {ratio_span(pairs['gipo_vs_ppo'])}")
    print(f"gipo gipo / TRL   time {ratio_span(pairs['gipo_vs_trl'])}")
    if args.profile:
        table = profile_table(runs)
        print("\nwhere the time goes (mean s per iteration, first iteration left out):")
        print_phase_table(table, SIDES, PROFILE_ROWS)
        floors = [r["floor"] for side in ("gipo_ppo", "gipo_gipo") for r in runs[side] if r.get("floor")]
        if floors:
            gen = statistics.median(f["generate_s"] for f in floors)
            fb = statistics.median(f["forward_backward_s"] for f in floors)
            fwd = statistics.median(f["forward_s"] for f in floors)
            floor = gen + fb
            print(f"floor (one generate {gen:.3f} s + one policy forward/backward {fb:.3f} s) = "
                  f"{floor:.3f} s; policy forward alone {fwd:.3f} s")
            print("iteration / floor: " + ", ".join(
                f"{side} {summary[side]['s_per_iter']['median'] / floor:.2f}" for side in SIDES))


def benchmark(args) -> dict:
    trl_python, trl_versions = ensure_trl_venv(Path(args.trl_venv))
    print(f"TRL side: {trl_python} (trl {trl_versions['trl']}, torch {trl_versions['torch']}, transformers "
          f"{trl_versions['transformers']}); gipo side: {gipo_python()}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo_throughput-"))
    report: dict = {"settings": {}, "meta": {"repeats": args.repeats, "threads": args.threads,
                                              "seed": args.seed, "trl_versions": trl_versions}}
    try:
        for name in args.settings:
            spec = prepare_setting(name, work, args)
            if spec is None:
                report["settings"][name] = {"skipped": True}
                continue
            runs: dict[str, list[dict]] = {side: [] for side in SIDES}
            for repeat, side in alternating(SIDES, args.repeats):
                python = trl_python if side == "trl" else gipo_python()
                runs[side].append(run_side(spec, side, f"{name} {repeat + 1}/{args.repeats}",
                                           work / name, args, python))
            summary = summarize(runs)
            print_setting(name, spec, runs, summary, args)
            entry = {side: {k: summary[side][k] for k in ("s_per_iter", "tokens_per_s", "peak_mib")}
                     for side in SIDES}
            entry.update({k: summary[k] for k in ("ratio_ppo_vs_trl", "ratio_gipo_vs_ppo",
                                                  "memory_ratio_ppo_vs_trl", "paired_ratios")})
            entry["iterations"] = spec["iterations"]
            if args.profile:
                entry["profile"] = profile_table(runs)
                floors = [r["floor"] for side in ("gipo_ppo", "gipo_gipo") for r in runs[side]
                          if r.get("floor")]
                entry["floor"] = floors[0] if len(floors) == 1 else {
                    k: statistics.median(f[k] for f in floors) for k in floors[0]} if floors else None
            report["settings"][name] = entry
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return report


def quality(args) -> dict:
    """gipo ppo on tiny, same seed, twice: the default (fast) path, and a plain one (HF generate, a policy
    forward for the old log-probabilities, full logits and a full log_softmax for every log-probability,
    AdamW without foreach/fused kernels): reward curves."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ppo_quality-"))
    # Both sides draw as HF generate does, so that they sample the same tokens and differ only in numerics.
    args.gipo_set = [*args.gipo_set, "sampling_draws=multinomial"]
    try:
        spec = prepare_setting("tiny", work, args)
        curves = {}
        for variant in ("fast", "plain"):
            curves[variant] = run_side(spec, "gipo_ppo", f"quality {variant}", work / "tiny", args,
                                       gipo_python(), variant)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    fast, plain = curves["fast"]["scores"], curves["plain"]["scores"]
    diffs = [abs(a - b) for a, b in zip(fast, plain, strict=True)]
    kl_diff = max(abs(a - b) for a, b in zip(curves["fast"]["kl"], curves["plain"]["kl"], strict=True))
    print(f"\n== quality: gipo ppo on tiny, seed {args.seed}, {len(fast)} iterations; "
          "objective/scores per iteration")
    print(f"{'iter':>4s} {'fast':>12s} {'plain':>12s} {'|diff|':>10s}")
    for i, (a, b, d) in enumerate(zip(fast, plain, diffs, strict=True), 1):
        print(f"{i:4d} {a:12.6f} {b:12.6f} {d:10.2e}")
    print(f"max |fast - plain| objective/scores = {max(diffs):.3e}; objective/kl = {kl_diff:.3e}; "
          f"s/iter fast {curves['fast']['median_s']:.3f}, plain {curves['plain']['median_s']:.3f}")
    return {"quality": {"fast": fast, "plain": plain, "max_abs_diff": max(diffs), "max_abs_diff_kl": kl_diff,
                        "s_per_iter": {v: curves[v]["median_s"] for v in ("fast", "plain")}}}


def add_run_arguments(parser: argparse.ArgumentParser, gipo_set_help: str) -> None:
    """Options the benchmarks here share: torch threads, seed, gipo settings, work folder, HH-RLHF prompts."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run (default: OMP_NUM_THREADS or torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gipo-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a gipo PPOConfig setting for the gipo sides (repeatable), e.g. " + gipo_set_help)
    parser.add_argument("--workdir", default=None,
                        help="keep models and logs here (default: a temp folder, removed at the end)")
    parser.add_argument("--hh-path", default=str(HH_HARMLESS), help="HH-RLHF harmless-base test.jsonl.gz")


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, known: dict) -> None:
    """``args.settings`` as a list of names in ``known``; ``args.threads`` from OMP_NUM_THREADS when unset."""
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in known]
    if unknown:
        parser.error(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        args.threads = int(os.environ["OMP_NUM_THREADS"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and setting (alternating)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="PPO iterations per run (default: tiny 20, smollm2 10; the first is warm-up)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--profile", action="store_true",
                        help="where the time goes per phase, next to the floor (one generate + one "
                        "forward/backward)")
    parser.add_argument("--quality", action="store_true",
                        help="instead: gipo ppo on tiny with the fast and a plain log-prob path, same seed")
    parser.add_argument("--trl-venv", default=str(DEFAULT_TRL_VENV),
                        help="where the TRL 1.12 environment lives (made there if missing)")
    add_run_arguments(parser, "--gipo-set generation_backend=fast; --quality's plain run keeps them except the "
                      "speed paths (generation_backend, reuse_generation_logprobs, fused_optimizer)")
    # Internal: what a child process does.
    parser.add_argument("--child", choices=("prepare", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=(*SETTINGS, *PREPARED_ONLY), help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("fast", "plain"), default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args, SETTINGS)
    if args.iterations is not None and args.iterations < 2:
        parser.error("--iterations must be at least 2 (the first iteration is warm-up and left out)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "prepare":
        child_prepare(args)
        return
    if args.child == "run":
        child_run(args)
        return
    report = quality(args) if args.quality else benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
