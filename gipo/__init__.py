"""gipo: Group Invariant Policy Optimization, RLHF with group-invariant learning.

The Python API mirrors the command line::

    from gipo import PPOConfig, PPOTrainer
    trainer = PPOTrainer(PPOConfig(method="gipo", policy=..., reward_model=...), output_dir="runs/ppo")
    trainer.train()
    trainer.evaluate()
    trainer.save_pretrained("my-policy")
"""

import os

import torch

if not torch.cuda.is_available():
    # accelerate and transformers import DeepSpeed whenever it is installed (to unwrap models on save); on a machine
    # without GPUs it then prints a warning to stdout unless told the device. Telling it keeps stdout clean.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from gipo.advantage_weighting import register_advantage_weighting
from gipo.answers import register_extractor
from gipo.config import EvalConfig, PPOConfig, RewardConfig, SFTConfig, build_config, load_config
from gipo.estimators import register_estimator
from gipo.models import Critic, build_embedded_model, build_embedded_tokenizer
from gipo.ppo import PPOTrainer
from gipo.reasoning_gym_task import ReasoningGymTask
from gipo.reward import RewardTrainer
from gipo.reward_functions import register_reward
from gipo.rollout import register_generation_backend
from gipo.rollout_allocation import register_rollout_allocation
from gipo.sampling import register_sampling_rule
from gipo.sft import SFTTrainer
from gipo.tasks import Task, register_task, register_task_family

__all__ = [
    "Critic", "EvalConfig", "PPOConfig", "PPOTrainer", "ReasoningGymTask", "RewardConfig", "RewardTrainer", "SFTConfig",
    "SFTTrainer", "Task", "build_config", "build_embedded_model", "build_embedded_tokenizer", "load_config",
    "register_advantage_weighting", "register_estimator", "register_extractor", "register_generation_backend", "register_reward", "register_rollout_allocation", "register_sampling_rule", "register_task",
    "register_task_family",
]
