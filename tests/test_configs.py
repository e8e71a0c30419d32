"""The shipped example configs load into their typed configs, and the defaults are self-consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from gipo.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, build_config, load_config, read_yaml

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
