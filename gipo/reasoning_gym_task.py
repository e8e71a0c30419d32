"""reasoning-gym's procedural tasks as one gipo task: verifiable, labelled, multi-domain prompts, offline.

``dataset: reasoning_gym:TASK[?KEY=VALUE&...][,TASK...][;OPTION=VALUE&...]`` mixes tasks of the
``reasoning-gym`` package (``pip install gipo[reasoning]``), each with its own parameters (values read as YAML
scalars: ``max_digits=2``, ``operators=[+,-]``)::

    reasoning_gym:chain_sum?max_terms=2&max_digits=2,products?max_digits=1;extract=last_number

``dataset: reasoning_gym:FILE.yaml`` reads the same from a file, with each task's weight in the mix and its
out-of-distribution (OOD) setting (see ``configs/reasoning_tasks.yaml``)::

    tasks:
      chain_sum: {params: {max_terms: 2, max_digits: 2}, weight: 2, ood: {max_digits: 3}}
      products: {params: {max_digits: 1}}
    extract: last_number
    system_prompt: Answer the question. Give only the final answer, nothing else.

Each prompt's group is its task's name. Splits: ``train`` (``weight`` x the requested prompts per task, drawn
from a stream seeded by the run's seed), ``validation`` and ``test`` (seed-independent streams), and one OOD split
per task, ``harder_TASK``. A question's split is also fixed by a hash of its text (6/8 train, 1/8 validation,
1/8 test, as for every gipo dataset), so no held-out question is ever trained on, even where a task's question
space is small; held-out and OOD questions are distinct within their split (a small space gives fewer of them).
The OOD setting is the task's ``ood`` parameters over its own, else every numeric ``max_*`` parameter doubled
(``chain_sum?max_digits=2`` -> ``max_digits=4``): harder questions of the same kind.

The gold reward is the task's own ``score_answer`` on the answer extracted from the reply (``extract``, a name of
:data:`gipo.answers.EXTRACTORS`); a task with ``math_verify: true`` also counts an answer ``math-verify`` finds
equal to the reference. Nothing here imports ``reasoning_gym`` until such a dataset is used.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from gipo.answers import EXTRACTORS
from gipo.errors import ConfigError, DataError
from gipo.reward_functions import register_reward
from gipo.tasks import EXACT, PromptRecord, Task, register_task_family, split_of

FAMILY = "reasoning_gym"
DEFAULT_SYSTEM_PROMPT = "Answer the question. Give only the final answer, nothing else."
PROMPT_FORMATS = ("chat", "plain")
TASK_KEYS = ("params", "weight", "ood", "math_verify")
OPTIONS = ("extract", "system_prompt", "prompt_format")
ANSWER_FORMS = {"answer_tags": "<answer>{}</answer>", "boxed": "\\boxed{{{}}}"}
"""How a demonstration writes the answer for an extractor (the bare answer for the others)."""
DRAWS_PER_PROMPT = 50
"""A held-out split stops looking for new distinct questions after this many draws per prompt asked for."""


@dataclass(frozen=True)
class TaskSetting:
    """One task of the mix: its reasoning-gym name, parameters, weight and OOD parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    ood: dict[str, Any] | None = None
    math_verify: bool = False


@dataclass(frozen=True)
class ReasoningMix:
    tasks: tuple[TaskSetting, ...]
    extract: str = "last_number"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    prompt_format: str = "chat"


def _reasoning_gym():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise ConfigError("A reasoning_gym: dataset needs the reasoning-gym package: pip install 'gipo[reasoning]' "
                          "(or pip install reasoning-gym).") from None
    return reasoning_gym, DATASETS


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside brackets, so ``operators=[+,-]`` stays one value."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _query(text: str, where: str) -> dict[str, Any]:
    """``a=1&b=[x,y]`` -> ``{"a": 1, "b": ["x", "y"]}`` (values as YAML scalars)."""
    values: dict[str, Any] = {}
    for pair in filter(None, _split_top_level(text, "&")):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"{where}: '{pair}' is not KEY=VALUE.")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise DataError(f"{where}: the value of {key.strip()} ({raw!r}) is not a YAML scalar: {err}") from None
    return values


def _mix_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataError(f"{where}: unknown option {', '.join(unknown)}; options: {', '.join(OPTIONS)}.")
    if "extract" in options:
        EXTRACTORS.get(str(options["extract"]))
    if options.get("prompt_format", "chat") not in PROMPT_FORMATS:
        raise DataError(f"{where}: prompt_format must be one of {', '.join(PROMPT_FORMATS)}.")
    if "system_prompt" in options and options["system_prompt"] is not None:
        options["system_prompt"] = str(options["system_prompt"])
    return options


def parse_mix(arguments: str) -> ReasoningMix:
    """The mix a ``reasoning_gym:`` name describes (query form, or a YAML file); checked against reasoning-gym."""
    where = f"dataset {FAMILY}:{arguments}"
    if arguments.endswith((".yaml", ".yml")):
        return _mix_from_file(Path(arguments))
    head, _, tail = arguments.partition(";")
    settings = []
    for part in _split_top_level(head, ","):
        name, _, query = part.strip().partition("?")
        if not name:
            raise DataError(f"{where}: an empty task name (tasks are comma-separated).")
        settings.append(TaskSetting(name, _query(query, f"{where}, task {name}")))
    return _checked(ReasoningMix(tuple(settings), **_mix_options(_query(tail, where), where)), where)


def _mix_from_file(path: Path) -> ReasoningMix:
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such file (a reasoning_gym: dataset file).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise DataError(f"{where}: expected a mapping with 'tasks' (task name -> {{{', '.join(TASK_KEYS)}}}).")
    settings = []
    for name, entry in data["tasks"].items():
        entry = entry or {}
        if not isinstance(entry, dict) or set(entry) - set(TASK_KEYS):
            raise DataError(f"{where}, task {name}: keys must be among {', '.join(TASK_KEYS)} (got {entry!r}).")
        for key in ("params", "ood"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                raise DataError(f"{where}, task {name}: '{key}' must be a mapping of parameters.")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            raise DataError(f"{where}, task {name}: 'weight' must be a positive number (got {weight!r}).")
        settings.append(TaskSetting(str(name), dict(entry.get("params") or {}), float(weight), entry.get("ood"),
                                    bool(entry.get("math_verify", False))))
    options = {k: v for k, v in data.items() if k != "tasks"}
    return _checked(ReasoningMix(tuple(settings), **_mix_options(options, where)), where)


def _as_config_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def harder_params(setting: TaskSetting, defaults: dict[str, Any]) -> dict[str, Any]:
    """The OOD setting: the task's ``ood`` parameters over its own, else each numeric ``max_*`` doubled."""
    if setting.ood is not None:
        return {**setting.params, **setting.ood}
    harder = dict(setting.params)
    for key, default in defaults.items():
        value = setting.params.get(key, default)
        if key.startswith("max_") and isinstance(value, int | float) and not isinstance(value, bool):
            harder[key] = type(value)(value * 2)
    return harder


def _config_fields(config_class) -> dict[str, Any]:
    return {f.name: f.default for f in fields(config_class) if f.name not in ("seed", "size")}


def _make_dataset(name: str, params: dict[str, Any], seed: int, size: int, where: str):
    reasoning_gym, _ = _reasoning_gym()
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size,
                                            **{k: _as_config_value(v) for k, v in params.items()})
    except Exception as err:  # reasoning-gym validates its configs with asserts and ValueErrors
        raise DataError(f"{where}, task {name} with {params}: reasoning-gym refuses it: "
                        f"{type(err).__name__}: {err}") from None


def _checked(mix: ReasoningMix, where: str) -> ReasoningMix:
    _, registered = _reasoning_gym()
    if not mix.tasks:
        raise DataError(f"{where}: no tasks.")
    names = [s.name for s in mix.tasks]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: a task is named twice ({', '.join(names)}).")
    for setting in mix.tasks:
        if setting.name not in registered:
            close = difflib.get_close_matches(setting.name, registered, n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise DataError(f"{where}: reasoning-gym has no task {setting.name!r}.{hint} Its tasks: "
                            f"{', '.join(sorted(registered))}.")
        valid = _config_fields(registered[setting.name][1])
        for given in (setting.params, setting.ood or {}):
            unknown = sorted(set(given) - set(valid))
            if unknown:
                raise DataError(f"{where}, task {setting.name}: unknown parameter {', '.join(unknown)}; its "
                                f"parameters: {', '.join(valid)}.")
        _make_dataset(setting.name, setting.params, 0, 1, where)
        _make_dataset(setting.name, harder_params(setting, valid), 0, 1, f"{where} (OOD setting)")
    return mix


def _stream_seed(rng: random.Random) -> int:
    return rng.randrange(2**31)


def _prompt(mix: ReasoningMix, question: str) -> str | list[dict[str, str]]:
    if mix.prompt_format == "plain":
        return f"{mix.system_prompt}\n\n{question}\n" if mix.system_prompt else question
    messages = [{"role": "system", "content": mix.system_prompt}] if mix.system_prompt else []
    return [*messages, {"role": "user", "content": question}]


def _stable_seed(*parts: Any) -> int:
    return int(hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest(), 16) % 2**31


class ReasoningGymTask:
    """Builds the gipo :class:`~gipo.tasks.Task` of a mix: its splits and its gold reward."""

    def __init__(self, arguments: str):
        self.mix = parse_mix(arguments)
        _, registered = _reasoning_gym()
        self.settings = {s.name: s for s in self.mix.tasks}
        self.defaults = {s.name: _config_fields(registered[s.name][1]) for s in self.mix.tasks}
        self.scorers = {s.name: _make_dataset(s.name, s.params, 0, 1, FAMILY) for s in self.mix.tasks}
        self.extract = EXTRACTORS.get(self.mix.extract)
        self.task = Task(name=f"{FAMILY}:{arguments}", groups=list(self.settings), make_split=self.make_split,
                         gold_reward=self.gold_reward, demonstration=self.demonstration,
                         ood_splits=[f"harder_{name}" for name in self.settings])

    def make_split(self, split: str, n_per_group: int, rng: random.Random) -> list[PromptRecord]:
        if split.startswith("harder_") and split.removeprefix("harder_") in self.settings:
            name = split.removeprefix("harder_")
            setting = self.settings[name]
            return self._draw(setting, harder_params(setting, self.defaults[name]), "test", n_per_group,
                              _stable_seed(name, "ood"), group=split, distinct=True)
        if split not in ("train", "validation", "test"):
            raise DataError(f"{self.task.name}: no split '{split}'; splits: train, validation, test, "
                            f"{', '.join(self.task.ood_splits)}.")
        records = []
        for setting in self.mix.tasks:
            if split == "train":
                n = max(1, round(n_per_group * setting.weight))
                seed = _stream_seed(rng)
            else:
                n, seed = n_per_group, _stable_seed(setting.name, split)
            records += self._draw(setting, setting.params, split, n, seed, group=setting.name,
                                  distinct=split != "train")
        return records

    def _draw(self, setting: TaskSetting, params: dict[str, Any], split: str, n: int, seed: int, *, group: str,
              distinct: bool) -> list[PromptRecord]:
        """``n`` questions of ``setting`` whose hash puts them in ``split`` (distinct ones when asked; a small
        question space gives fewer)."""
        limit = DRAWS_PER_PROMPT * n + 1000
        dataset = _make_dataset(setting.name, params, seed, limit, self.task.name)
        records, seen = [], set()
        for index in range(limit):
            entry = dataset[index]
            question = entry["question"]
            if split_of(question) != split or (distinct and question in seen):
                continue
            seen.add(question)
            records.append({"prompt": _prompt(self.mix, question), "group": group, "task": setting.name,
                            "question": question, "answer": str(entry["answer"]), "entry": entry,
                            "extract": self.mix.extract})
            if len(records) == n:
                break
        if not records:
            raise DataError(f"{self.task.name}, task {setting.name}: no question falls in the {split} split in "
                            f"{limit} draws; widen its parameters.")
        return records

    def demonstration(self, record: PromptRecord, rng: random.Random) -> str:
        """The reference answer in the form ``extract`` reads: what an SFT stage (``gipo sft``) imitates where the
        model cannot start on a task."""
        return ANSWER_FORMS.get(self.mix.extract, "{}").format(record["answer"])

    def gold_reward(self, record: PromptRecord, response: str) -> float:
        answer = self.extract(response)
        if answer is None:
            return 0.0
        task = record["task"]
        score = float(self.scorers[task].score_answer(answer, record["entry"]) or 0.0)
        if score < EXACT and self.settings[task].math_verify and _math_equal(answer, record["answer"]):
            score = 1.0
        return min(max(score, 0.0), 1.0)


def _math_equal(answer: str, reference: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError("math_verify: true needs the math-verify package: pip install 'gipo[reasoning]'.") from None
    try:
        return bool(verify(parse(reference), parse(answer)))
    except Exception:  # a reply math-verify cannot parse is simply not equal
        return False


def answer_format(prompts: list[Any], responses: list[str], records: list[dict[str, Any]]) -> list[float]:
    """1 where the reply holds an answer in the dataset's ``extract`` form, else 0: a format reward to add to
    ``gold`` (``reward: gold,answer_format`` with ``reward_weights``)."""
    scores = []
    for record, response in zip(records, responses, strict=True):
        if "extract" not in record:
            raise ConfigError("reward answer_format needs prompts of a dataset with an 'extract' option "
                              "(reasoning_gym:...).")
        scores.append(float(EXTRACTORS.get(record["extract"])(response) is not None))
    return scores


register_reward("answer_format", answer_format, "1 where the reply holds an answer in the dataset's extract form")
register_task_family(FAMILY, lambda arguments: ReasoningGymTask(arguments).task,
                     "reasoning-gym tasks: reasoning_gym:TASK[?K=V&...][,TASK...][;OPTION=V&...] or reasoning_gym:"
                     "FILE.yaml")
