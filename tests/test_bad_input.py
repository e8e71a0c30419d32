"""Bad input gives a clear, one-paragraph error naming the file, the row or key, and what is allowed.

Each table row writes a small bad input under ``tmp_path``, calls the Python API (or the ``gipo``
command in-process) and checks the exception type and what the message names, not just the type.
"""

from __future__ import annotations

import gzip
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from gipo.cli import main
from gipo.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, load_config
from gipo.data import (
    DataError,
    encode_prompts,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    read_rows,
)
from gipo.models import (
    EMBEDDED,
    ModelLoadError,
    build_embedded_model,
    build_embedded_tokenizer,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
)
from gipo.sft import encode_demonstrations

# --- helpers that write bad input --------------------------------------------------------------


def write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(tmp: Path, name: str, *rows: Any) -> str:
    """One line per row: a dict/list is dumped as JSON, a str is written as it is (for broken lines)."""
    return write(tmp, name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def model_folder(tmp: Path, name: str, *, weights: bool = False, tokenizer: bool = True,
                 pad_token: bool = True, pad_token_id: bool = True) -> str:
    """A folder with the embedded model's config.json, optionally its weights and its tokenizer."""
    folder = tmp / name
    tok = build_embedded_tokenizer()
    model = build_embedded_model(tok)
    if not pad_token_id:
        model.config.pad_token_id = None
    if weights:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    if tokenizer:
        if not pad_token:
            tok.pad_token = None
        tok.save_pretrained(folder)
    return str(folder)


GOOD_SFT = {"prompt": "Copy: ab\n", "completion": "ab"}
GOOD_PAIR = {"prompt": "Copy: ab\n", "chosen": "ab", "rejected": "ba"}
USER_HI = {"role": "user", "content": "hi"}


def failing_hub(monkeypatch):
    """Stand-in for ``datasets`` so a name that is no file and no task fails fast, without the network."""

    def load_dataset(name, split):
        raise ConnectionError(f"cannot reach the hub for {name}")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


# --- Python level --------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    error: type[Exception]
    call: Callable[[Path, Any], Any]  # (tmp_path, monkeypatch) -> raises
    names: tuple[str, ...]  # fragments the message must contain


def case(id: str, error: type[Exception], call: Callable[[Path, Any], Any], *names: str) -> Any:
    return pytest.param(Case(id, error, call, names), id=id)


CASES = [
    # Dataset rows: missing / empty field, wrong type, messages format.
    case("sft-missing-completion", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "sft.jsonl", GOOD_SFT, {"prompt": "x"}), 1, 0),
         "sft.jsonl", "row 2", "missing field 'completion'"),
    case("sft-null-completion", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "sft.jsonl", {"prompt": "x", "completion": None}), 1, 0),
         "sft.jsonl", "row 1", "missing field 'completion'"),
    case("sft-empty-prompt", DataError,
         lambda t, m: load_sft_examples(
             jsonl(t, "sft.jsonl", GOOD_SFT, GOOD_SFT, {"prompt": "", "completion": "a"}), 1, 0),
         "sft.jsonl", "row 3", "field 'prompt' is empty"),
    case("sft-prompt-wrong-type", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "sft.jsonl", {"prompt": 42, "completion": "a"}), 1, 0),
         "sft.jsonl", "row 1", "field 'prompt' must be str or list", "got int"),
    case("sft-completion-wrong-type", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "sft.jsonl", {"prompt": "x", "completion": ["a"]}), 1, 0),
         "sft.jsonl", "row 1", "field 'completion' must be str", "got list"),
    case("sft-messages-last-not-assistant", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "chat.jsonl", {"messages": [USER_HI]}), 1, 0),
         "chat.jsonl", "row 1", "last message must be the assistant's"),
    case("sft-messages-turn-without-content", DataError,
         lambda t, m: load_sft_examples(
             jsonl(t, "chat.jsonl", {"messages": [USER_HI, {"role": "assistant"}]}), 1, 0),
         "chat.jsonl", "row 1", "field 'messages' must be a list of {'role', 'content'} messages"),
    case("prompt-message-unknown-role", DataError,
         lambda t, m: load_prompts(jsonl(t, "chat.jsonl", {"prompt": [USER_HI]},
                                         {"prompt": [{"role": "robot", "content": "beep"}]}), "all", 10, 0),
         "chat.jsonl", "row 2", "role 'robot'", "system, user, assistant"),
    case("sft-messages-unknown-role", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "chat.jsonl", {"messages": [
             {"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]}), 1, 0),
         "chat.jsonl", "row 1", "field 'messages'", "role 'robot'"),
    case("sft-messages-empty", DataError,
         lambda t, m: load_sft_examples(jsonl(t, "chat.jsonl", {"messages": []}), 1, 0),
         "chat.jsonl", "row 1", "field 'messages' is empty"),
    case("pairs-missing-rejected", DataError,
         lambda t, m: load_preference_pairs(jsonl(t, "pairs.jsonl", GOOD_PAIR, GOOD_PAIR,
                                                  {"prompt": "x", "chosen": "a"})),
         "pairs.jsonl", "row 3", "missing field 'rejected'"),
    case("pairs-chosen-wrong-type", DataError,
         lambda t, m: load_preference_pairs(jsonl(t, "pairs.jsonl", {**GOOD_PAIR, "chosen": 1.5})),
         "pairs.jsonl", "row 1", "field 'chosen' must be str", "got float"),
    case("prompts-missing-prompt", DataError,
         lambda t, m: load_prompts(jsonl(t, "prompts.jsonl", {"prompt": "a"}, {"text": "b"}), "train", 1, 0),
         "prompts.jsonl", "row 2", "missing field 'prompt'"),
    case("prompts-nan-prompt", DataError,
         lambda t, m: load_prompts(jsonl(t, "prompts.jsonl", '{"prompt": NaN}'), "train", 1, 0),
         "prompts.jsonl", "row 1", "field 'prompt' must be str or list", "got float"),
    # Files: invalid JSON, wrong shape, empty, undecodable, unreadable, missing.
    case("jsonl-invalid-json-line", DataError,
         lambda t, m: read_rows(jsonl(t, "rows.jsonl", GOOD_SFT, GOOD_SFT, '{"prompt": "a",')),
         "rows.jsonl", "row 3", "not valid JSON"),
    case("jsonl-row-not-object", DataError,
         lambda t, m: read_rows(jsonl(t, "rows.jsonl", GOOD_SFT, ["a", "b"])),
         "rows.jsonl", "row 2", "expected a JSON object, got list"),
    case("jsonl-empty-file", DataError,
         lambda t, m: read_rows(write(t, "rows.jsonl", "\n  \n")),
         "rows.jsonl", "holds no rows"),
    case("json-empty-file", DataError,
         lambda t, m: read_rows(write(t, "rows.json", "")),
         "rows.json", "holds no rows"),
    case("json-not-a-list", DataError,
         lambda t, m: read_rows(write(t, "rows.json", '{"rows": []}')),
         "rows.json", "expected a list of rows"),
    case("json-item-not-object", DataError,
         lambda t, m: read_rows(write(t, "rows.json", json.dumps([GOOD_SFT, "oops"]))),
         "rows.json", "row 2", "expected a JSON object, got str"),
    case("jsonl-undecodable-row", DataError,
         lambda t, m: read_rows(write(t, "rows.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')),
         "rows.jsonl", "row 2", "UTF-8"),
    case("jsonl-undecodable-row-deep-in-a-big-file", DataError,  # past the first read buffer
         lambda t, m: read_rows(write(t, "rows.jsonl", b'{"prompt": "%s"}\n' % (b"a" * 60) * 500
                                      + b'{"prompt": "\xff"}\n')),
         "rows.jsonl", "row 501", "UTF-8"),
    case("jsonl-gz-not-gzip", DataError,
         lambda t, m: read_rows(write(t, "rows.jsonl.gz", b"plain text, not gzip")),
         "rows.jsonl.gz", "cannot read"),
    case("jsonl-gz-corrupt-stream", DataError,
         lambda t, m: read_rows(write(t, "rows.jsonl.gz", (lambda g: g[:10] + b"\xff" * 6 + g[16:])(
             gzip.compress(b'{"prompt": "a"}\n' * 100)))),
         "rows.jsonl.gz", "cannot read"),
    case("data-file-missing", DataError,
         lambda t, m: load_sft_examples(str(t / "nowhere" / "sft.jsonl"), 1, 0),
         "sft.jsonl", "does not exist"),
    case("dataset-name-not-task-nor-file", DataError,  # a typo of the task name
         lambda t, m: (failing_hub(m), load_prompts("bultin", "train", 1, 0)),
         "'bultin'", "neither a registered task (builtin, builtin_swap, reasoning_gym:...)", "nor a local file"),
    # Token lengths and chat templates.
    case("prompt-longer-than-allowed", DataError,
         lambda t, m: encode_prompts(build_embedded_tokenizer(), ["short", "x" * 12], 8, "prompts.jsonl"),
         "prompts.jsonl", "prompt 2", "12 tokens", "allowed 8"),
    case("demonstration-longer-than-max-length", DataError,
         lambda t, m: encode_demonstrations(
             build_embedded_tokenizer(), [{"prompt": "x" * 10, "completion": "y"}], 8, True, "sft.jsonl"),
         "sft.jsonl", "row 1", "max_length=8"),
    case("chat-prompt-without-chat-template", DataError,
         lambda t, m: encode_prompts((lambda tok: (setattr(tok, "chat_template", None), tok)[1])(
             build_embedded_tokenizer()), ["plain", [{"role": "user", "content": "hi"}]], 64, "chat.jsonl"),
         "chat.jsonl", "prompt 2", "chat template"),
    # Config files and --set overrides.
    case("config-unknown-key", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", "learnig_rate: 0.1\n")),
         "cfg.yaml", "unknown key 'learnig_rate'", "Did you mean: learning_rate", "Allowed keys:"),
    case("config-wrong-type", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", "max_steps: ten\n")),
         "cfg.yaml", "'max_steps'", "expects an integer", "'ten'"),
    case("config-optional-wrong-type", ConfigError,
         lambda t, m: load_config(PPOConfig, write(t, "cfg.yaml", "reference: 5\n")),
         "cfg.yaml", "'reference'", "expects str or null"),
    case("config-bool-wrong-type", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["progress=maybe"]),
         "SFTConfig", "'progress'", "expects true or false"),
    case("negative-learning-rate", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["learning_rate=-1"]),
         "SFTConfig", "'learning_rate'", "-1", "must be > 0"),
    case("nan-learning-rate", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["learning_rate=.nan"]),
         "SFTConfig", "'learning_rate'", "finite"),
    case("num-groups-below-two", ConfigError,
         lambda t, m: load_config(PPOConfig, write(t, "ppo.yaml", "num_groups: 1\n")),
         "ppo.yaml", "'num_groups'", "must be >= 2"),
    case("value-above-max", ConfigError,
         lambda t, m: load_config(RewardConfig, None, ["eval_fraction=0.95"]),
         "'eval_fraction'", "must be <= 0.9"),
    case("value-not-a-choice", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["device=tpu"]),
         "'device'", "'tpu'", "allowed values: auto, cpu, cuda"),
    case("config-not-a-mapping", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", "- max_steps: 1\n")),
         "cfg.yaml", "must hold a mapping", "not list"),
    case("config-file-missing", ConfigError,
         lambda t, m: load_config(SFTConfig, t / "missing.yaml"),
         "missing.yaml", "does not exist"),
    case("config-file-is-a-folder", ConfigError,
         lambda t, m: ((t / "cfg.yaml").mkdir(), load_config(SFTConfig, t / "cfg.yaml")),
         "cfg.yaml", "cannot read"),
    case("config-invalid-yaml", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", "max_steps: [1\nseed: 2\n")),
         "cfg.yaml", "not valid YAML", "line 2"),
    case("config-not-utf8", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", b"dataset: caf\xe9.jsonl\n")),
         "cfg.yaml", "not valid YAML"),
    case("config-non-string-key", ConfigError,
         lambda t, m: load_config(SFTConfig, write(t, "cfg.yaml", "1: 2\n")),
         "cfg.yaml", "unknown key '1'"),
    case("set-without-equals", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["max_steps"]),
         "--set expects key=value", "'max_steps'"),
    case("set-value-not-yaml", ConfigError,
         lambda t, m: load_config(SFTConfig, None, ["dataset=[a.jsonl"]),
         "--set dataset", "cannot read value '[a.jsonl'"),
    case("preset-conflict", ConfigError,
         lambda t, m: load_config(PPOConfig, write(t, "ppo.yaml", "method: gipo\ngroup_objective: dro\n")),
         "ppo.yaml", "method=gipo sets group_objective='variance'", "'dro' was given", "method=custom"),
    case("mini-batch-does-not-divide", ConfigError,
         lambda t, m: load_config(PPOConfig, write(t, "ppo.yaml", "batch_size: 4\nmini_batch_size: 3\n")),
         "ppo.yaml", "mini_batch_size (3) must divide batch_size (4)"),
    case("group-objective-without-groups", ConfigError,
         lambda t, m: load_config(PPOConfig, None, ["method=custom", "group_objective=variance"]),
         "group_objective=variance needs groups", "inferred or oracle"),
    # Model paths and tokenizers.
    case("model-path-missing", ModelLoadError,
         lambda t, m: load_causal_lm(str(t / "no-model")),
         "no-model", "does not exist"),
    case("model-folder-not-a-model", ModelLoadError,
         lambda t, m: ((t / "notes").mkdir(), load_tokenizer(str(t / "notes"))),
         "notes", "not a model", "config.json"),
    case("model-path-is-a-file", ModelLoadError,
         lambda t, m: load_causal_lm(write(t, "model.safetensors", "x")),
         "model.safetensors", "is a file"),
    case("model-folder-without-weights", ModelLoadError,
         lambda t, m: load_causal_lm(model_folder(t, "policy")),
         "policy", "model.safetensors"),
    case("model-folder-without-tokenizer", ModelLoadError,
         lambda t, m: load_tokenizer(model_folder(t, "policy", tokenizer=False)),
         "policy", "no tokenizer", "tokenizer.json"),
    case("tokenizer-without-pad-token", ModelLoadError,
         lambda t, m: load_tokenizer(model_folder(t, "policy", pad_token=False)),
         "policy", "no pad token", "pad_token"),
    case("reward-model-without-pad-token-id", ModelLoadError,
         lambda t, m: load_reward_model(model_folder(t, "rm", weights=True, pad_token_id=False)),
         "rm", "no pad_token_id"),
    case("model-type-unknown", ModelLoadError,
         lambda t, m: load_causal_lm(
             str(Path(write(t, "odd/config.json", '{"model_type": "frobnicator"}')).parent)),
         "odd", "frobnicator"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_named(bad: Case, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(bad.error) as info:
        bad.call(tmp_path, monkeypatch)
    message = str(info.value)
    for fragment in bad.names:
        assert fragment in message, f"{fragment!r} not in message: {message!r}"
    assert "\n" not in message.strip(), f"not one paragraph: {message!r}"
    assert "Traceback" not in message


def test_yaml_exponent_is_a_number() -> None:
    """PyYAML reads ``1e-3`` as a string; a float key still takes it (``--set learning_rate=1e-3``)."""
    assert load_config(SFTConfig, None, ["learning_rate=1e-3"]).learning_rate == pytest.approx(1e-3)


def test_embedded_still_loads() -> None:
    assert load_tokenizer(EMBEDDED).pad_token == "<pad>"


# --- CLI level ----------------------------------------------------------------------------------


def sft_data(tmp: Path) -> str:
    return jsonl(tmp, "sft.jsonl", GOOD_SFT, GOOD_SFT)


def fake_run(tmp: Path, *, checkpoint: bool = False, learning_rate: float = 0.003) -> str:
    """A run directory that holds a run: config.yaml, and optionally a complete (empty) checkpoint."""
    out = tmp / "run"
    out.mkdir()
    config = SFTConfig(dataset=sft_data(tmp), learning_rate=learning_rate)
    (out / "config.yaml").write_text(json.dumps(vars(config)))
    if checkpoint:
        folder = out / "checkpoints" / "step-1"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"files": {}}))
    return str(out)


CLI_CASES = [
    pytest.param(lambda t: ["sft", write(t, "cfg.yaml", "learnig_rate: 0.1\n"), "--out", str(t / "run")],
                 "sft", ("cfg.yaml", "unknown key 'learnig_rate'", "Did you mean: learning_rate"),
                 id="sft-config-unknown-key"),
    pytest.param(lambda t: ["train", "--set", "learning_rate=-1", "--out", str(t / "run")],
                 "train", ("'learning_rate'", "must be > 0"), id="train-negative-learning-rate"),
    pytest.param(lambda t: ["train", "--set", "method=gipo", "--set", "group_kl=false",  # group_kl's default
                            "--out", str(t / "run")],
                 "train", ("method=gipo sets group_kl=True", "method=custom"), id="train-preset-conflict"),
    pytest.param(lambda t: ["sft", "--set", "max_steps", "--out", str(t / "run")],
                 "sft", ("--set expects key=value", "'max_steps'"), id="sft-set-without-equals"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={t / 'x' / 'missing.jsonl'}", "--out", str(t / "run")],
                 "sft", ("missing.jsonl", "does not exist"), id="sft-dataset-missing"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={jsonl(t, 'sft.jsonl', GOOD_SFT, {'prompt': 'x'})}",
                            "--out", str(t / "run")],
                 "sft", ("sft.jsonl", "row 2", "missing field 'completion'"), id="sft-dataset-bad-row"),
    pytest.param(lambda t: ["rm", "--set", "model=/nonexistent", "--out", str(t / "run")],
                 "rm", ("/nonexistent", "does not exist"), id="rm-model-missing"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={sft_data(t)}", "--out", fake_run(t)],
                 "sft", ("already holds a run", "--resume", "--overwrite"), id="sft-run-dir-taken"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={sft_data(t)}", "--out", str(t / "empty"), "--resume"],
                 "sft", ("--resume", "empty", "no complete checkpoint"), id="sft-resume-nothing"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={t / 'sft.jsonl'}", "--set", "learning_rate=0.1",
                            "--out", fake_run(t, checkpoint=True), "--resume"],
                 "sft", ("--resume", "config.yaml", "learning_rate (saved 0.003, now 0.1)"),
                 id="sft-resume-different-config"),
    pytest.param(lambda t: ["demo", "--set", "nosuchkey=1", "--out", str(t / "demo")],
                 "demo", ("--set nosuchkey", "no stage has this key"), id="demo-unknown-key"),
    pytest.param(lambda t: ["eval", str(t / "no-run")],
                 "eval", ("no-run", "config.yaml", "does not exist"), id="eval-missing-run"),
    pytest.param(lambda t: ["sft", "--set", f"dataset={sft_data(t)}", "--out", write(t, "taken", "a file")],
                 "sft", ("taken", "is a file"), id="sft-out-is-a-file"),
]


@pytest.mark.parametrize(("argv", "command", "names"), CLI_CASES)
def test_cli_bad_input(argv, command: str, names: tuple[str, ...], tmp_path: Path, capsys,
                       monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"gipo {command}: error:")]
    assert len(lines) == 1, err
    for fragment in names:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda(tmp_path: Path, capsys) -> None:
    assert main(["sft", "--set", "device=cuda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gipo sft: error: device=cuda, but no CUDA device is available"), err


@pytest.mark.parametrize(("argv", "names"), [
    pytest.param(["sft", "--resume", "--overwrite"], ("gipo sft: error:", "--overwrite", "--resume"),
                 id="resume-and-overwrite"),
    pytest.param(["sft", "a.yaml", "b.yaml"], ("gipo: error:", "unrecognized arguments: b.yaml"),
                 id="two-config-files"),
    pytest.param(["frobnicate"], ("gipo: error:", "invalid choice: 'frobnicate'", "sft"),
                 id="unknown-command"),
    pytest.param(["eval"], ("gipo eval: error:", "run_dir"), id="eval-without-run-dir"),
])
def test_cli_bad_flags(argv: list[str], names: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in names:
        assert fragment in err, f"{fragment!r} not in {err!r}"
