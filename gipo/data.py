"""Data: prompts, demonstrations and preference pairs, from a registered task, a file or a dataset id.

Rows are checked as they are read: a missing or empty field, a wrong type or an over-long prompt is
a :class:`DataError` naming the file, the row and the field, never a crash later in training.

A config's ``dataset`` is a registered task name, or a *spec* of one or more sources (docs/real_data.md)::

    SPEC   := SOURCE ("," SOURCE)*
    SOURCE := [FORMAT ":"] LOCATION ["#" HUB_SPLIT] ["@" GROUP]

FORMAT is ``hh`` (HH-RLHF transcripts), ``bigbench`` (BIG-bench ``target_scores``), ``chat`` (prompt /
chosen / rejected rows whose text prompt becomes one user turn) or ``pairs`` (prompt / chosen / rejected
or prompt rows, as given); without it the format is read off the first row. LOCATION is a .jsonl / .json
file (optionally .gz), a folder (each data file in it, grouped by its name) or a Hugging Face dataset id
with an optional data_dir (``Anthropic/hh-rlhf/helpful-base``; HUB_SPLIT defaults to train). GROUP names
the source's group (else a row's ``group`` field, else ``all``). Whatever the source, train / validation /
test come from a hash of the prompt (:func:`gipo.tasks.split_of`).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gipo.errors import DataError
from gipo.tasks import SPLITS, PromptRecord, Task, get_task, prompt_key, split_of, task_names

Prompt = str | list[dict[str, str]]


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
    """Rows of a dataset id; ``owner/name/more/parts`` reads ``owner/name`` with data_dir ``more/parts``."""
    parts = name.split("/")
    repo, data_dir = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        import datasets

        kwargs = {"data_dir": data_dir} if data_dir else {}
        dataset = datasets.load_dataset(repo, split=split, **kwargs)
    except Exception as err:  # the hub client raises many types; all mean "not available"
        raise DataError(f"'{name}' is neither a registered task ({', '.join(task_names())}), nor a local file, "
                        f"nor a loadable dataset: {type(err).__name__}: {err}") from None
    return [{**row, "_row": i} for i, row in enumerate(dataset, 1)]


CHAT_ROLES = ("system", "user", "assistant")


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
            if turn["role"] not in CHAT_ROLES:
                raise DataError(f"{where}: field '{name}' has a message with role {turn['role']!r}; allowed roles: "
                                f"{', '.join(CHAT_ROLES)}.")
    return value


def resolve_task(spec: str) -> Task | None:
    return get_task(spec)


# --- Sources and formats ------------------------------------------------------------------------------

FORMATS = ("hh", "bigbench", "chat", "pairs")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


@dataclass(frozen=True)
class Source:
    """One source of a dataset spec: where the rows are, how to read them, and their group."""

    location: str
    format: str = "auto"
    group: str | None = None
    hub_split: str = "train"


def parse_spec(spec: str) -> list[Source]:
    """``[FORMAT:]LOCATION[#HUB_SPLIT][@GROUP]``, comma-separated (see the module docstring)."""
    if Path(spec).exists():
        return [Source(spec)]
    sources = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise DataError(f"Dataset spec '{spec}': an empty source between commas.")
        fmt, group, hub_split = "auto", None, "train"
        head, sep, tail = part.partition(":")
        if sep and head in FORMATS:
            fmt, part = head, tail
        elif sep and re.fullmatch(r"[a-z_]+", head) and not Path(part).exists():
            raise DataError(f"Dataset spec '{spec}': unknown format '{head}'; formats: {', '.join(FORMATS)}.")
        if "@" in part and not Path(part).exists():
            part, group = part.rsplit("@", 1)
            if not re.fullmatch(r"[\w.+-]+", group):
                raise DataError(f"Dataset spec '{spec}': group '{group}' must be a plain name (letters, digits, "
                                "_ . + -).")
        if "#" in part and not Path(part).exists():
            part, hub_split = part.rsplit("#", 1)
        if not part:
            raise DataError(f"Dataset spec '{spec}': a source without a location.")
        sources.append(Source(part, fmt, group, hub_split))
    return sources


def _source_files(source: Source) -> list[tuple[str, str | None]]:
    """``(file or dataset id, default group)``: a folder gives each data file in it, grouped by its name."""
    path = Path(source.location)
    if not path.is_dir():
        return [(source.location, None)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise DataError(f"{source.location}: the folder holds no data files ({', '.join(DATA_SUFFIXES)}).")
    return [(str(p), p.name.split(".")[0]) for p in files]


def _detect_format(row: dict[str, Any]) -> str:
    if "target_scores" in row or "multiple_choice_scores" in row:
        return "bigbench"
    if "prompt" not in row and "chosen" in row and "rejected" in row:
        return "hh"
    return "pairs"


_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str, where: str) -> list[dict[str, str]]:
    """``\\n\\nHuman: ...\\n\\nAssistant: ...`` as chat messages; consecutive turns of one role are merged."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = _TURN.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first 'Human:' turn ({parts[0].strip()[:40]!r}); an HH "
                        "transcript is a sequence of '\\n\\nHuman: ...' and '\\n\\nAssistant: ...' turns.")
    messages: list[dict[str, str]] = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _ROLES[role], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def split_hh_pair(chosen: str, rejected: str, where: str) -> tuple[list[dict[str, str]], str, str]:
    """Prompt messages and the two final replies of an HH pair (two transcripts that share all but the end).

    The prompt runs to the last ``\\n\\nAssistant:`` that both transcripts share, so a reply that itself
    holds a made-up ``Human:`` turn stays one reply.
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    marker = "\n\nAssistant:"
    cut = chosen.rfind(marker, 0, common)
    if cut < 0 and chosen.startswith("Assistant:"):
        raise DataError(f"{where}: the transcripts start with an Assistant turn; there is no prompt.")
    if cut < 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no conversation ending in '\\n\\nAssistant:'; "
                        "an HH row holds two whole transcripts that differ only in the last Assistant turn.")
    prompt = parse_transcript(chosen[:cut], where)
    if not prompt:
        raise DataError(f"{where}: the conversation before the last Assistant turn is empty.")
    return prompt, chosen[cut + len(marker):].strip(), rejected[cut + len(marker):].strip()


def _text(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        missing = name not in row or value is None
        raise DataError(f"{where}: {'missing field' if missing else 'field'} '{name}'"
                        + ("." if missing else f" must be str, got {type(value).__name__}."))
    return value


def _where(row: dict[str, Any], location: str) -> str:
    return f"{location}, row {row.get('_row', '?')}"


def _hh_examples(row: dict[str, Any], location: str, need_pairs: bool) -> list[dict[str, Any]]:
    where = _where(row, location)
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    prompt, chosen_reply, rejected_reply = split_hh_pair(chosen, rejected, where)
    if chosen_reply == rejected_reply:
        return []  # two identical replies carry no preference
    return [{"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}]


def _bigbench_examples(row: dict[str, Any], location: str, need_pairs: bool) -> list[dict[str, Any]]:
    """The reply scored 1 against each reply scored 0; the input (with its own turns) as chat messages."""
    where = _where(row, location)
    text = row.get("input", row.get("inputs"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty field 'input' (a BIG-bench example is "
                        "{'input': ..., 'target_scores': {reply: 1 or 0}}).")
    scores = row.get("target_scores")
    if scores is None and isinstance(row.get("multiple_choice_targets"), list):  # the hub's layout
        scores = dict(zip(row["multiple_choice_targets"], row.get("multiple_choice_scores") or [], strict=False))
    if not isinstance(scores, dict) or not all(isinstance(k, str) and isinstance(v, int | float)
                                               for k, v in scores.items()):
        raise DataError(f"{where}: field 'target_scores' must map each reply to a score (1 or 0).")
    best = [reply for reply, score in scores.items() if score == 1]
    worse = [reply for reply, score in scores.items() if score == 0]
    if len(best) != 1 or not worse:
        raise DataError(f"{where}: 'target_scores' needs exactly one reply scored 1 and at least one scored 0; "
                        f"it has {len(best)} and {len(worse)}.")
    prompt = parse_transcript("\n\nHuman: " + text, where)
    return [{"prompt": prompt, "chosen": best[0].strip(), "rejected": reply.strip()} for reply in worse]


def _safety_pair(row: dict[str, Any]) -> dict[str, Any] | None:
    """PKU-SafeRLHF's raw rows (response_0/1 with is_response_*_safe) as chosen = the only safe reply."""
    safe = (row.get("is_response_0_safe"), row.get("is_response_1_safe"))
    if "chosen" in row or "response_0" not in row or None in safe:
        return row
    if safe[0] == safe[1]:
        return None
    keep, drop = (0, 1) if safe[0] else (1, 0)
    return {**row, "chosen": row[f"response_{keep}"], "rejected": row[f"response_{drop}"]}


def _pairs_examples(row: dict[str, Any], location: str, need_pairs: bool,
                    chat: bool = False) -> list[dict[str, Any]]:
    row = _safety_pair(row)
    if row is None:
        return []
    prompt = _field(row, "prompt", location, (str, list))
    if isinstance(prompt, list):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif chat:
        prompt = [{"role": "user", "content": prompt}]
    example = {"prompt": prompt}
    if need_pairs:
        example["chosen"] = _field(row, "chosen", location, allow_empty=True)
        example["rejected"] = _field(row, "rejected", location, allow_empty=True)
    else:
        example.update({k: v for k, v in row.items() if k not in ("prompt", "group", "_row", "chosen", "rejected")})
    return [example]


_READERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "hh": _hh_examples, "bigbench": _bigbench_examples, "pairs": _pairs_examples,
    "chat": lambda row, location, need_pairs: _pairs_examples(row, location, need_pairs, chat=True),
}


def load_examples(spec: str, need_pairs: bool = True) -> list[dict[str, Any]]:
    """Every example of a spec's sources, ``{"prompt", "group", ["chosen", "rejected"]}``, in source order."""
    examples: list[dict[str, Any]] = []
    for source in parse_spec(spec):
        for location, default_group in _source_files(source):
            rows = read_rows(location, source.hub_split)
            fmt = source.format if source.format != "auto" else _detect_format(rows[0])
            for row in rows:
                group = source.group or str(row.get("group") or default_group or "all")
                for example in _READERS[fmt](row, location, need_pairs):
                    examples.append({**example, "group": group})
    return examples


def _in_split(examples: list[dict[str, Any]], split: str | None, spec: str) -> list[dict[str, Any]]:
    if split is None or split == "all":
        return examples
    if split not in SPLITS:
        raise DataError(f"{spec}: no split '{split}'; a file or dataset id has {', '.join(SPLITS)} (by a hash "
                        "of the prompt) and all.")
    return [e for e in examples if split_of(e["prompt"]) == split]


def load_prompts(spec: str, split: str, n_per_group: int, seed: int) -> list[PromptRecord]:
    """Prompt records ``{"prompt", "group", ...}`` for ``split`` (train, validation, test, all, or a task's OOD split).

    From files and dataset ids: each distinct prompt once per group, in source order, at most
    ``n_per_group`` per group, those whose hash puts them in ``split``.
    """
    task = resolve_task(spec)
    if task is not None:
        return task.prompts(split, n_per_group, seed)
    examples = _in_split(load_examples(spec, need_pairs=False), split, spec)
    seen: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    records = []
    for example in examples:
        key = (example["group"], prompt_key(example["prompt"]))
        if key in seen or counts.get(example["group"], 0) >= n_per_group:
            continue
        seen.add(key)
        counts[example["group"]] = counts.get(example["group"], 0) + 1
        records.append({k: v for k, v in example.items() if k not in ("chosen", "rejected")})
    if not records and split == "train":
        raise DataError(f"{spec}: no prompt falls in the train split (6 in 8 prompts do, by a hash of the prompt); "
                        "give more prompts.")
    return records


def load_training_prompts(tokenizer, dataset: str, given: list[PromptRecord] | None, n_per_group: int, seed: int,
                          max_length: int, long_prompts: str) -> tuple[list[PromptRecord], list[list[int]], Task | None]:
    """An RL run's prompt records (``given``, else the dataset's train split), their token ids, and the task whose
    gold reward scores them (None for prompts passed in: they carry no gold)."""
    records = given if given is not None else load_prompts(dataset, "train", n_per_group, seed)
    if long_prompts == "shorten":
        records, _ = fit_to_length(tokenizer, records, max_length, sides=())
    encoded = encode_prompts(tokenizer, [r["prompt"] for r in records], max_length, dataset)
    return records, encoded, get_task(dataset) if given is None else None


def load_sft_examples(spec: str, n_per_group: int, seed: int) -> list[dict[str, Any]]:
    """``{"prompt", "completion", "group"}`` rows: a task's demonstrations, prompt/completion rows, or the
    chosen replies of a preference spec (hh:, chat:, bigbench:, several sources)."""
    task = resolve_task(spec)
    if task is not None:
        if task.demonstration is None:
            raise DataError(f"Task '{spec}' has no demonstrations to fine-tune on.")
        rng = random.Random(f"demos/{seed}")
        return [{**r, "completion": task.demonstration(r, rng)} for r in task.prompts("train", n_per_group, seed)]
    rows = read_rows(spec) if parse_spec(spec) == [Source(spec)] else []
    if not rows or not ({"messages", "completion"} & set(rows[0]) or _detect_format(rows[0]) == "pairs"
                        and "chosen" not in rows[0]):
        return [{"prompt": e["prompt"], "completion": e["chosen"], "group": e["group"]}
                for e in _in_split(load_examples(spec), "train", spec)]
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


def load_preference_pairs(spec: str, split: str | None = None) -> list[dict[str, Any]]:
    """``{"prompt", "chosen", "rejected", "group"}`` rows from a spec; ``split`` keeps one hash split of them."""
    return _in_split(load_examples(spec, need_pairs=True), split, spec)


def fit_to_length(tokenizer, examples: list[dict[str, Any]], max_length: int,
                  sides: tuple[str, ...] = ("chosen", "rejected")) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Examples that fit ``max_length`` tokens as the trainers encode them (rendered prompt + reply + EOS).

    A chat prompt that is too long loses its oldest turns (a user turn and the reply to it at a time),
    keeping the last user turn; an example that still does not fit is dropped. Returns the examples and
    ``{"shortened": n, "dropped": n}``.
    """
    eos = 1 if tokenizer.eos_token_id is not None else 0

    def longest(prompt: Prompt, example: dict[str, Any]) -> int:
        text = render_prompt(tokenizer, prompt)
        texts = [text + example.get(side, "") for side in sides] or [text]
        return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]) + (
            eos if sides else 0)

    kept, stats = [], {"shortened": 0, "dropped": 0}
    for example in examples:
        prompt = example["prompt"]
        length = longest(prompt, example)
        while length > max_length and isinstance(prompt, list) and len(prompt) > 1:
            drop = 2 if prompt[0]["role"] == "user" and len(prompt) > 2 else 1
            prompt = prompt[drop:]
            length = longest(prompt, example)
        if length > max_length:
            stats["dropped"] += 1
            continue
        if prompt is not example["prompt"]:
            stats["shortened"] += 1
            example = {**example, "prompt": prompt}
        kept.append(example)
    return kept, stats


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

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
