"""The loop every trainer shares: run directory, resume, steps, metrics, checkpoints, final model.

A trainer subclass supplies one ``training_step`` and says what to save; the plumbing here is the
same for SFT, the reward model and PPO.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gipo import checkpoint as ckpt
from gipo.config import ConfigError, RunConfig, read_yaml, save_config
from gipo.tracking import MetricsLogger


class NonFiniteError(FloatingPointError):
    """NaN or inf in a quantity the run would train on."""

    def __init__(self, quantity: str, step: int):
        super().__init__(f"Step {step}: {quantity} contains NaN or inf; the run stopped before training on it "
                         "(the last checkpoint is intact). Lower the learning rate, check the reward model and "
                         "data, or set on_nonfinite=skip to skip such batches.")
        self.quantity, self.step = quantity, step


class RunDirError(RuntimeError):
    pass


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


def make_optimizer(params, lr: float, weight_decay: float, warmup_steps: int):
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0)
    return optimizer, scheduler


def check_finite(step: int, **tensors: torch.Tensor) -> None:
    for name, value in tensors.items():
        if not torch.isfinite(value).all():
            raise NonFiniteError(name, step)


def differing_keys(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """Keys that change results and differ between a saved config and ``current``."""
    import dataclasses

    keys = []
    for f in dataclasses.fields(current):
        if f.metadata.get("result_affecting", True) and f.name in saved and saved[f.name] != getattr(current, f.name):
            keys.append(f"{f.name} (saved {saved[f.name]!r}, now {getattr(current, f.name)!r})")
    return keys


class BaseTrainer:
    """Subclasses implement ``training_step``, ``trainer_state`` / ``load_trainer_state`` and
    ``save_pretrained`` / ``load_weights``."""

    stage = "train"

    def __init__(self, config: RunConfig, output_dir: str | Path, *, overwrite: bool = False):
        self.config = config
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self.device = resolve_device(config.device)
        self.step = 0
        self.skipped_batches = 0
        seed_everything(config.seed)

    # --- hooks -----------------------------------------------------------------------------------
    def training_step(self) -> dict[str, float]:
        raise NotImplementedError

    def trainer_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict()}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])

    def save_pretrained(self, path: str | Path) -> None:
        """The trained model and its tokenizer, loadable with ``from_pretrained``."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def load_weights(self, folder: Path) -> None:
        raise NotImplementedError

    def on_train_end(self) -> None:
        """Work after the final model is saved (e.g. evaluation)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def micro_batches(self, indices: list[int]) -> list[list[int]]:
        """Split a batch for gradient accumulation."""
        n = self.config.gradient_accumulation_steps
        return [indices[i::n] for i in range(n) if indices[i::n]]

    def optimizer_step(self, parameters, optimizer, scheduler) -> float:
        """Clip, check and apply the accumulated gradients; returns the gradient norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(list(parameters), self.config.max_grad_norm or float("inf"))
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

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise RunDirError(f"Run directory {out} is a file; give --out a folder.")
        if out.exists() and not os.access(out, os.W_OK):
            raise RunDirError(f"Run directory {out} is not writable.")
        started = out.exists() and any((out / n).exists() for n in ("config.yaml", "metrics.jsonl", "checkpoints"))
        if resume:
            latest = ckpt.latest_good_checkpoint(out)
            if latest is None:
                raise RunDirError(f"--resume: {out} holds no complete checkpoint to resume from.")
            saved = read_yaml(out / "config.yaml")
            differences = differing_keys(saved, self.config)
            if differences:
                raise ConfigError(f"--resume: the config differs from the one saved in {out}/config.yaml in keys "
                                  f"that change results: {'; '.join(differences)}. Resume with the same "
                                  "values, or start a new run with --out.")
            return latest
        if started:
            if not self.overwrite:
                raise RunDirError(f"Run directory {out} already holds a run. Pass --resume to continue it or "
                                  "--overwrite to replace it.")
            for name in ("checkpoints", "final", "tensorboard", "metrics.jsonl", "eval.json"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        return None

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "skipped_batches": self.skipped_batches, "rng": ckpt.rng_state(),
                 "trainer": self.trainer_state()}

        def write(folder: Path) -> None:
            self.save_pretrained(folder)
            ckpt.save_state(state, folder)

        folder = ckpt.write_atomically(self.output_dir / "checkpoints" / f"step-{self.step}", write)
        ckpt.prune(self.output_dir, self.config.keep_last)
        return folder

    def _restore(self, folder: Path) -> None:
        self.load_weights(folder)
        state = ckpt.load_state(folder)
        self.step, self.skipped_batches = state["step"], state["skipped_batches"]
        self.load_trainer_state(state["trainer"])
        ckpt.set_rng_state(state["rng"])

    def train(self, resume: bool = False) -> BaseTrainer:
        """Run until ``max_steps``; with ``resume``, continue from the newest good checkpoint."""
        latest = self._prepare_run_dir(resume)
        if latest is not None:
            self._restore(latest)
        save_config(self.config, self.output_dir / "config.yaml")
        logger = MetricsLogger(self.output_dir, resume_step=self.step if latest is not None else None)
        bar = tqdm(total=self.config.max_steps, initial=self.step, desc=f"gipo {self.stage}",
                   disable=not self.config.progress, dynamic_ncols=True)
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
                if self.step % self.config.logging_steps == 0 or self.step == self.config.max_steps:
                    logger.log(self.step, metrics)
                    bar.set_postfix(self.progress_summary(metrics), refresh=False)
                bar.update(1)
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.max_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            logger.close()
        ckpt.write_atomically(self.output_dir / "final", self.save_pretrained)
        self.on_train_end()
        return self

    def progress_summary(self, metrics: dict[str, Any]) -> dict[str, str]:
        return {k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items()
                if k in self.progress_keys and isinstance(v, float) and math.isfinite(v)}

    progress_keys: tuple[str, ...] = ()
