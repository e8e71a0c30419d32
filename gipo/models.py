"""Models: the embedded tiny LM and tokenizer, loading by hub id or path, and the critic.

The critic is a transformer backbone with a value head and a group head. The group head predicts
soft group assignments p(g | x, y) from the critic's view of a sample (``gipo.groups``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EMBEDDED = "embedded"
EMBEDDED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>"
    "{% else %}<|system|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model path or id that cannot be loaded; the message says what was tried."""


def build_embedded_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, with pad/eos/bos/unk and chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=specials[4:], model_max_length=128,
    )
    tokenizer.chat_template = EMBEDDED_CHAT_TEMPLATE
    return tokenizer


def build_embedded_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A ~0.2M-parameter Llama: small enough for a 2-core CPU, big enough to learn the suite."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _check_path(name: str) -> None:
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.exists():
        raise ModelLoadError(f"Model path {name} does not exist.")
    if path.is_file():
        raise ModelLoadError(f"{name} is a file; a model is a folder (with config.json and the weights, as "
                             "save_pretrained writes it) or a hub id.")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{name} is a folder but not a model: it has no config.json.")


def _reason(err: Exception) -> str:
    """The library's message as one paragraph."""
    return " ".join(str(err).split())


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    if name == EMBEDDED:
        return build_embedded_tokenizer()
    _check_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        files = ("tokenizer.json", "tokenizer_config.json")
        if Path(name).is_dir() and not any((Path(name) / f).exists() for f in files):
            raise ModelLoadError(f"Cannot load a tokenizer from {name}: the folder has no tokenizer (no "
                                 "tokenizer.json or tokenizer_config.json). Save one there with "
                                 "tokenizer.save_pretrained.") from None
        raise ModelLoadError(f"Cannot load a tokenizer from {name}: {_reason(err)}") from None
    if tokenizer.pad_token is None:
        raise ModelLoadError(
            f"The tokenizer of {name} has no pad token. Set one that differs from EOS (an unused special "
            "token), e.g. tokenizer.pad_token = '<pad>', save it, and point the config at that folder.")
    return tokenizer


def load_causal_lm(name: str, seed: int = 0, trust_remote_code: bool = False) -> PreTrainedModel:
    if name == EMBEDDED:
        return build_embedded_model(build_embedded_tokenizer(), seed)
    _check_path(name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot load a causal LM from {name}: {_reason(err)}") from None


def load_reward_model(name: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence classifier with one label; from a causal LM it gets a fresh score head."""
    _check_path(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot load a reward model from {name}: {_reason(err)}") from None
    if model.config.pad_token_id is None:
        raise ModelLoadError(f"Reward model {name} has no pad_token_id in its config; it cannot find the "
                             "last token of a padded sequence.")
    return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row (works with left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class Critic(nn.Module):
    """Value model: a backbone, a per-token value head, and a group head over the last token.

    The group head gives p(g | x, y) for ``num_groups`` groups from the hidden state of the last
    attended token (METHOD.md: pooling and head shape are not stated in the paper; this is our choice).
    """

    HEADS_FILE = "critic_heads.safetensors"

    def __init__(self, backbone: PreTrainedModel, num_groups: int = 2):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        self.group_head = nn.Linear(hidden, num_groups)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        nn.init.normal_(self.group_head.weight, std=0.02)
        nn.init.zeros_(self.group_head.bias)

    @classmethod
    def from_backbone(cls, name: str, num_groups: int = 2, trust_remote_code: bool = False) -> Critic:
        _check_path(name)
        heads = Path(name) / cls.HEADS_FILE
        try:
            backbone = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"Cannot load a critic backbone from {name}: {_reason(err)}") from None
        critic = cls(backbone, num_groups)
        if heads.exists():
            critic.load_heads(heads)
        return critic

    def load_heads(self, path: Path) -> None:
        state = load_file(str(path))
        self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                         if k.startswith("value_head.")})
        group_state = {k[len("group_head."):]: v for k, v in state.items() if k.startswith("group_head.")}
        if group_state["weight"].shape == self.group_head.weight.shape:
            self.group_head.load_state_dict(group_state)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns per-token values (B, T) and group logits (B, M)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        values = self.value_head(hidden).squeeze(-1)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return values, self.group_head(last)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path)
        heads = {f"value_head.{k}": v.contiguous() for k, v in self.value_head.state_dict().items()}
        heads.update({f"group_head.{k}": v.contiguous() for k, v in self.group_head.state_dict().items()})
        save_file(heads, str(path / self.HEADS_FILE))
        (path / "critic.json").write_text(json.dumps({"num_groups": self.group_head.out_features}))


def model_config_of(name: str) -> AutoConfig:
    return AutoConfig.from_pretrained(name)
