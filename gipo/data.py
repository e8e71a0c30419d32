"""Data: prompts, demonstrations and preference pairs, from a registered task, a file or a dataset id.

Rows are checked as they are read: a missing or empty field, a wrong type or an over-long prompt is
a :class:`DataError` naming the file, the row and the field, never a crash later in training.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gipo.tasks import PromptRecord, Task, get_task, task_names

Prompt = str | list[dict[str, str]]


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, row and field."""


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _decode(raw: bytes, where: str, unit: str) -> str:
    """UTF-8 text of ``raw`` (a row or the whole file); bad bytes are an error naming where they are."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        place = f"byte {err.start}, line {line}" if unit == "file" else f"byte {err.start} of the {unit}"
        raise DataError(f"{where}: cannot decode the {unit} as UTF-8 ({err.reason} at {place}). "
                        "Save the file as UTF-8.") from None


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a .jsonl / .json (optionally .gz) file, or of a Hugging Face dataset id."""
    path = Path(source)
    if not path.exists():
        if source.endswith((".json", ".jsonl", ".gz")) or source.startswith((".", "/")):
            raise DataError(f"Data file {source} does not exist.")
        return _read_hub_dataset(source, split)
    rows: list[dict[str, Any]] = []
    try:
        with _open_bytes(path) as handle:
            if ".jsonl" in path.name:
                for line_no, raw in enumerate(handle, 1):
                    line = _decode(raw, f"{source}, row {line_no}", "row")
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{source}, row {line_no}: not valid JSON ({err.msg}).") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{source}, row {line_no}: expected a JSON object, got "
                                        f"{type(row).__name__}.")
                    row["_row"] = line_no
                    rows.append(row)
            else:
                text = _decode(handle.read(), source, "file")
                data = json.loads(text) if text.strip() else []
                items = data.get("examples", data.get("data")) if isinstance(data, dict) else data
                if not isinstance(items, list):
                    raise DataError(f"{source}: expected a list of rows (or an 'examples' list).")
                for i, row in enumerate(items, 1):
                    if not isinstance(row, dict):
                        raise DataError(f"{source}, row {i}: expected a JSON object, got {type(row).__name__}.")
                    rows.append({**row, "_row": i})
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{source}: cannot read the file ({err}).") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{source}: not valid JSON ({err.msg}, line {err.lineno}).") from None
    if not rows:
        raise DataError(f"{source}: the file holds no rows.")
    return rows


def _read_hub_dataset(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many types; all mean "not available"
        raise DataError(f"'{name}' is neither a registered task ({', '.join(task_names())}), nor a local file, "
                        f"nor a loadable dataset: {type(err).__name__}: {err}") from None
    return [{**row, "_row": i} for i, row in enumerate(dataset, 1)]


def _field(row: dict[str, Any], name: str, source: str, kinds: tuple[type, ...] = (str,),
           allow_empty: bool = False) -> Any:
    where = f"{source}, row {row.get('_row', '?')}"
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}'.")
    value = row[name]
    if not isinstance(value, kinds):
        raise DataError(f"{where}: field '{name}' must be {' or '.join(k.__name__ for k in kinds)}, "
                        f"got {type(value).__name__}.")
    if isinstance(value, str | list) and len(value) == 0 and not allow_empty:
        raise DataError(f"{where}: field '{name}' is empty.")
    if isinstance(value, list):
        for turn in value:
            if not (isinstance(turn, dict) and isinstance(turn.get("role"), str)
                    and isinstance(turn.get("content"), str)):
                raise DataError(f"{where}: field '{name}' must be a list of {{'role', 'content'}} messages.")
    return value


def resolve_task(spec: str) -> Task | None:
    return get_task(spec)


def load_prompts(spec: str, split: str, n_per_group: int, seed: int) -> list[PromptRecord]:
    """Prompt records ``{"prompt", "group", ...}`` for ``split`` (train, test or an OOD split)."""
    task = resolve_task(spec)
    if task is not None:
        return task.prompts(split, n_per_group, seed)
    rows = read_rows(spec, split)
    return [{"prompt": _field(r, "prompt", spec, (str, list)), "group": str(r.get("group") or "all"),
             **{k: v for k, v in r.items() if k not in ("prompt", "group", "_row")}} for r in rows]


def load_sft_examples(spec: str, n_per_group: int, seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "completion", "group"}`` rows: a task's demonstrations, or prompt/completion rows."""
    task = resolve_task(spec)
    if task is not None:
        if task.demonstration is None:
            raise DataError(f"Task '{spec}' has no demonstrations to fine-tune on.")
        rng = random.Random(f"demos/{seed}")
        return [{**r, "completion": task.demonstration(r, rng)} for r in task.prompts("train", n_per_group, seed)]
    rows = read_rows(spec)
    out = []
    for r in rows:
        if "messages" in r:
            messages = _field(r, "messages", spec, (list,))
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{spec}, row {r['_row']}: the last message must be the assistant's.")
            out.append({"prompt": messages[:-1], "completion": messages[-1]["content"],
                        "group": str(r.get("group") or "all")})
        else:
            out.append({"prompt": _field(r, "prompt", spec, (str, list)),
                        "completion": _field(r, "completion", spec), "group": str(r.get("group") or "all")})
    return out


def load_preference_pairs(spec: str) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected", "group"}`` rows from a file or dataset id."""
    rows = read_rows(spec)
    return [{"prompt": _field(r, "prompt", spec, (str, list)), "chosen": _field(r, "chosen", spec, allow_empty=True),
             "rejected": _field(r, "rejected", spec, allow_empty=True), "group": str(r.get("group") or "all")} for r in rows]


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Plain text as it is; a chat conversation through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("A chat-format prompt needs a tokenizer with a chat template; this one has none.")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[Prompt], max_length: int, source: str) -> list[list[int]]:
    """Token ids per prompt; a prompt longer than ``max_length`` is an error naming it."""
    encoded = []
    for i, prompt in enumerate(prompts, 1):
        try:
            text = render_prompt(tokenizer, prompt)
        except DataError as err:
            raise DataError(f"{source}, prompt {i}: {err}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{source}, prompt {i}: empty after tokenization.")
        if len(ids) > max_length:
            raise DataError(f"{source}, prompt {i}: {len(ids)} tokens, longer than the allowed {max_length} "
                            "(max_prompt_length / max_length).")
        encoded.append(ids)
    return encoded


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, the layout generation needs."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


class EpochSampler:
    """Shuffled passes over ``n`` items, with a position that checkpoints save and restore."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        batch = []
        while len(batch) < size:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(size - len(batch), self.n - self.position)
            batch.extend(self._order[self.position: self.position + take])
            self.position += take
        return batch

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
