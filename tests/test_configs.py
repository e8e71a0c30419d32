"""The shipped example configs load into their typed configs, and the defaults are self-consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from gipo.config import (
    ConfigError,
    DPOConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    build_config,
    load_config,
    read_yaml,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(("name", "cls"), [("sft.yaml", SFTConfig), ("rm.yaml", RewardConfig),
                                           ("ppo.yaml", PPOConfig), ("gipo.yaml", PPOConfig)])
def test_example_config_loads(name, cls):
    config = load_config(cls, CONFIGS / name, ["max_steps=3"])
    assert config.max_steps == 3
    if name == "gipo.yaml":
        assert (config.groups, config.group_objective, config.group_kl) == ("inferred", "variance", True)


def test_compare_config_sections_load():
    sections = read_yaml(CONFIGS / "compare.yaml")
    for name, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig), ("dpo", DPOConfig)):
        build_config(cls, sections.get(name) or {})


def test_defaults_build():
    for cls in (SFTConfig, RewardConfig, PPOConfig, DPOConfig):
        build_config(cls, {})


def test_a_named_preset_applies_over_the_file_and_under_explicit_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 100\nbatch_size: 16\nmini_batch_size: 4\nkl_coef: 0.1\n"
                    "presets:\n  small: {max_steps: 5, batch_size: 4}\n  tiny: {max_steps: 1}\n")
    full = load_config(PPOConfig, path)
    assert (full.max_steps, full.batch_size, full.kl_coef) == (100, 16, 0.1)
    small = load_config(PPOConfig, path, ["preset=small", "batch_size=8"])
    assert (small.max_steps, small.batch_size, small.kl_coef) == (5, 8, 0.1)


def test_an_unknown_preset_names_the_file_and_the_presets_it_has(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("presets:\n  small: {max_steps: 5}\n")
    with pytest.raises(ConfigError, match=r"run.yaml has no preset 'big' \(presets there: small\)"):
        load_config(PPOConfig, path, ["preset=big"])
    with pytest.raises(ConfigError, match="no config file has no preset"):
        load_config(PPOConfig, None, ["preset=small"])


def test_a_shared_critic_and_a_separate_critic_model_conflict():
    with pytest.raises(ConfigError, match="shared_critic puts the critic's heads on the policy"):
        build_config(PPOConfig, {"shared_critic": True, "critic": "runs/x/final"})
