"""The loop every trainer shares: run directory, resume, steps, metrics, checkpoints, final model.

A trainer subclass supplies one ``training_step`` and says what to save; the plumbing here is the
same for SFT, the reward model and PPO.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gipo import checkpoint as ckpt
from gipo import distributed as dist
from gipo.allocator import keep_freed_memory
from gipo.config import RunConfig
from gipo.environment import write_environment
from gipo.errors import ConfigError, NonFiniteError
from gipo.run_dir import CHECKPOINT_SIZE_FACTOR, RunDir
from gipo.tracking import MetricsLogger


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA device is available; use device=cpu or auto.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain floating-point tensors on the CPU or
    CUDA (not sharded DTensors, not other devices)."""
    return bool(params) and all(type(p.data) is torch.Tensor and p.is_floating_point()
                                and p.device.type in ("cpu", "cuda") for p in params)


def make_optimizer(params, lr: float, weight_decay: float, warmup_steps: int, fused: bool = False):
    """AdamW (``fused``: torch's fused kernel, one op per step instead of several per tensor, where it applies)
    with linear warm-up."""
    trained = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay,
                                  **({"fused": True} if fused and fused_adamw_applies(trained) else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
    return optimizer, scheduler


def check_finite(step: int, **tensors: torch.Tensor) -> None:
    """Raise on the first quantity with NaN or inf, on every process when any process has one (so all
    processes skip or stop together)."""
    device = next(iter(tensors.values())).device
    flags = torch.tensor([not bool(torch.isfinite(v).all()) for v in tensors.values()], device=device)
    for name, bad in zip(tensors, dist.any_process(flags).tolist(), strict=True):
        if bad:
            raise NonFiniteError(name, step)


class BaseTrainer:
    """Subclasses implement ``training_step``, ``trainer_state`` / ``load_trainer_state`` and
    ``save_pretrained`` / ``load_weights``.

    Under ``accelerate launch`` with several processes (``supports_several_processes`` trainers only),
    ``self.accelerator`` wraps the trained models in DDP (PPO shards them itself with ``fsdp: true``, and builds
    DeepSpeed engines under a DeepSpeed launch);
    every process trains on its share of each batch and only the main process writes to the run directory.
    """

    stage = "train"
    supports_several_processes = False

    def __init__(self, config: RunConfig, output_dir: str | Path, *, overwrite: bool = False):
        self.config = config
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.cpu_keep_freed_memory:
            keep_freed_memory()
        self.accelerator = None
        if dist.launched_with_several_processes():
            if not self.supports_several_processes:
                raise ConfigError(f"gipo {self.stage} runs in one process; several processes (accelerate launch "
                                  "--num_processes N) are supported by `gipo train` (PPO and the group methods).")
            if dist.launched_with_deepspeed():
                self.device = dist.start_deepspeed_processes(cpu=self.device.type == "cpu")
            else:
                self.accelerator = dist.make_accelerator(cpu=self.device.type == "cpu",
                                                         find_unused_parameters=self.has_unused_parameters())
                self.device = self.accelerator.device
        self.step = 0
        self.skipped_batches = 0
        seed_everything(config.seed)

    # --- hooks -----------------------------------------------------------------------------------
    def training_step(self) -> dict[str, float]:
        raise NotImplementedError

    def trainer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer_state(self.optimizer), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict()}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What a checkpoint keeps of ``optimizer`` (every process calls it)."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def gather_weights(self) -> None:
        """Before the main process saves the models: collect what it needs from every process (sharded
        weights). Every process calls it."""

    def save_pretrained(self, path: str | Path) -> None:
        """The trained model and its tokenizer, loadable with ``from_pretrained``."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def load_weights(self, folder: Path) -> None:
        """Restore the trained model from a checkpoint folder (a causal LM; other stages override)."""
        from gipo.models import load_causal_lm

        self.model.load_state_dict(load_causal_lm(str(folder)).state_dict())

    def on_train_end(self) -> None:
        """Work after the final model is saved (e.g. evaluation)."""

    def has_unused_parameters(self) -> bool:
        """Whether some trained parameters may take no part in a loss (DDP must then look for them)."""
        return False

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """Split a batch for gradient accumulation."""
        n = self.config.gradient_accumulation_steps
        return [indices[i::n] for i in range(n) if indices[i::n]]

    def prepare(self, *objects):
        """Models and optimizers as the launch config wraps them (DDP, ...); as they are in one process."""
        if self.accelerator is None:
            return objects if len(objects) > 1 else objects[0]
        return self.accelerator.prepare(*objects)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self, model: torch.nn.Module, optimizer, scheduler) -> float:
        """Clip, check and apply the accumulated gradients of ``model`` (as trained: plain, DDP-wrapped or a
        DeepSpeed engine); returns the gradient norm before clipping."""
        if dist.is_deepspeed_engine(model):
            model.step()  # DeepSpeed reduces, clips, steps and zeroes the gradients itself
            scheduler.step()
            grad_norm = float(model.get_global_grad_norm())
            if not math.isfinite(grad_norm):
                raise NonFiniteError("gradient norm", self.step)
            return grad_norm
        max_norm = self.config.max_grad_norm or float("inf")
        parameters = list(model.parameters())
        grad_norm = (torch.nn.utils.clip_grad_norm_(parameters, max_norm) if self.accelerator is None
                     else self.accelerator.clip_grad_norm_(parameters, max_norm))
        if hasattr(grad_norm, "full_tensor"):  # the norm over sharded gradients (FSDP2) is a DTensor
            grad_norm = grad_norm.full_tensor()
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError("gradient norm", self.step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    # --- plumbing --------------------------------------------------------------------------------
    def autocast(self):
        if self.config.bf16 and self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def checkpoint_size_estimate(self) -> int:
        """Bytes to have free before training: ``CHECKPOINT_SIZE_FACTOR`` times the size of the
        parameters the optimizers train (the models a checkpoint saves)."""
        try:
            optimizers = self.optimizers()
        except AttributeError:
            return 0
        params = {id(p): p for opt in optimizers for group in opt.param_groups for p in group["params"]}
        return CHECKPOINT_SIZE_FACTOR * sum(p.numel() * p.element_size() for p in params.values())

    def save_checkpoint(self) -> Path:
        rng = dist.gather_objects(ckpt.rng_state())
        state = {"step": self.step, "skipped_batches": self.skipped_batches, "rng": rng[0],
                 "trainer": self.trainer_state()}
        if len(rng) > 1:
            state["rng_per_process"] = rng

        def write(folder: Path) -> None:
            self.save_pretrained(folder)
            ckpt.save_state(state, folder)

        def write_and_prune() -> Path:
            folder = ckpt.write_atomically(self.output_dir / "checkpoints" / f"step-{self.step}", write)
            ckpt.prune(self.output_dir, self.config.keep_last)
            return folder

        self.gather_weights()
        return self._on_main_process(write_and_prune)

    def _restore(self, folder: Path) -> None:
        self.load_weights(folder)
        state = ckpt.load_state(folder, dist.checkpoint_classes())
        self.step, self.skipped_batches = state["step"], state["skipped_batches"]
        self.load_trainer_state(state["trainer"])
        per_process = state.get("rng_per_process", [])
        ckpt.set_rng_state(per_process[dist.rank()] if len(per_process) == dist.world_size() else state["rng"])

    @staticmethod
    def _on_main_process(work):
        """Run ``work`` on the main process only; every process gets its result, or raises its error."""
        result, error = None, None
        if dist.is_main_process():
            try:
                result = work()
            except Exception as err:  # re-raised below, on every process
                error = err
        result, error = dist.broadcast_from_main((result, error))
        if error is not None:
            raise error
        return result

    def train(self, resume: bool = False) -> BaseTrainer:
        """Run until ``max_steps``; with ``resume``, continue from the newest good checkpoint.

        The run directory is locked for the whole call (``RunDirLock``): a second run on it fails."""
        run_dir = RunDir(self.output_dir, self.stage, overwrite=self.overwrite)
        self._on_main_process(lambda: run_dir.open(resume))
        try:
            self._train_locked(run_dir, resume)
        finally:
            run_dir.release()
        return self

    def _open_checkpoints(self, run_dir: RunDir, resume: bool) -> Path | None:
        latest = run_dir.prepare(resume, self.config)
        run_dir.check_disk_space(self.checkpoint_size_estimate())
        return latest

    def _train_locked(self, run_dir: RunDir, resume: bool) -> None:
        latest = self._on_main_process(lambda: self._open_checkpoints(run_dir, resume))
        if latest is not None:
            self._restore(latest)
        main = dist.is_main_process()
        if main:
            run_dir.save_config(self.config)
            # The same code, config and seed give other numbers on a CPU with other kernels (or other library
            # versions): the record tells two runs' environments apart.
            write_environment(self.output_dir, self.device, resume=latest is not None)
        logger = MetricsLogger(self.output_dir, resume_step=self.step if latest is not None else None) if main else None
        bar = tqdm(total=self.config.max_steps, initial=self.step, desc=f"gipo {self.stage}",
                   disable=not (self.config.progress and main), dynamic_ncols=True)
        try:
            while self.step < self.config.max_steps:
                self.step += 1
                try:
                    metrics = self.training_step()
                except NonFiniteError as err:
                    if self.config.on_nonfinite == "stop":
                        raise
                    for optimizer in self.optimizers():
                        optimizer.zero_grad(set_to_none=True)
                    self.skipped_batches += 1
                    metrics = {"nonfinite/last_quantity_skipped": err.quantity}
                metrics["nonfinite/skipped_batches"] = self.skipped_batches
                if logger and (self.step % self.config.logging_steps == 0 or self.step == self.config.max_steps):
                    logger.log(self.step, metrics)
                    bar.set_postfix(self.progress_summary(metrics), refresh=False)
                bar.update(1)
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if logger:
                logger.close()
        self.gather_weights()
        self._on_main_process(lambda: ckpt.write_atomically(self.output_dir / "final", self.save_pretrained))
        self.on_train_end()

    def progress_summary(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                if k in self.progress_keys and isinstance(v, float) and math.isfinite(v)}

    progress_keys: tuple[str, ...] = ()
