"""LoRA through PEFT: train adapters only, and use the adapter-disabled model as the frozen reference.

The reference then costs no second copy of the weights: it is the same module with its adapters
switched off for the forward pass.
"""

from __future__ import annotations

import copy
from pathlib import Path

from transformers import PreTrainedModel

ADAPTER_FOLDER = "adapter"


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: str):
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class AdapterDisabledReference:
    """The PEFT policy seen with its adapters off: forward and generate like a frozen reference model."""

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model.generate(*args, **kwargs)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> AdapterDisabledReference:
        self.model.train(mode)
        return self

    def eval(self) -> AdapterDisabledReference:
        return self.train(False)


def save_merged(peft_model, path: str | Path) -> None:
    """Save the policy with adapters merged (plain ``from_pretrained`` loads it) and the adapters alone."""
    peft_model.save_pretrained(Path(path) / ADAPTER_FOLDER)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged.save_pretrained(path)


def load_adapter_weights(peft_model, folder: str | Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(Path(folder) / ADAPTER_FOLDER / "adapter_model.safetensors")))
