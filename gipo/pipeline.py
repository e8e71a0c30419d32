"""The whole pipeline, SFT -> reward model -> PPO (or a group method) -> evaluation, as ``gipo demo`` runs it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from gipo.config import EvalConfig, PPOConfig, RewardConfig, SFTConfig
from gipo.environment import ENVIRONMENT_FILE, describe_environment
from gipo.evaluation import evaluate_run
from gipo.ppo import PPOTrainer
from gipo.report import comparison_table, plot_training
from gipo.reward import RewardTrainer
from gipo.sft import SFTTrainer


def run_pipeline(out: str | Path, sft: SFTConfig, rm: RewardConfig, ppo: PPOConfig, *, overwrite: bool = False,
                 resume: bool = False, log=print) -> dict[str, Any]:
    """Train the three stages into ``out/sft``, ``out/rm``, ``out/ppo`` and evaluate SFT and PPO alike.

    Returns ``{"sft": eval, "ppo": eval, "rm": eval}``. With ``resume``, finished stages are kept and an
    unfinished one continues from its last checkpoint.
    """
    out = Path(out)
    sft_dir, rm_dir, ppo_dir = out / "sft", out / "rm", out / "ppo"
    rm = replace(rm, model=str(sft_dir / "final"))
    ppo = replace(ppo, policy=str(sft_dir / "final"), reward_model=str(rm_dir / "final"))

    def stage(name: str, make, run_dir: Path) -> None:
        if resume and (run_dir / "final").exists():
            log(f"[{name}] kept: {run_dir / 'final'} exists")
            return
        log(f"[{name}] training -> {run_dir}")
        started = resume and (run_dir / "checkpoints").exists()
        make(run_dir).train(resume=started)

    stage("sft", lambda d: SFTTrainer(sft, output_dir=d, overwrite=overwrite or resume), sft_dir)
    stage("rm", lambda d: RewardTrainer(rm, output_dir=d, overwrite=overwrite or resume), rm_dir)
    stage("ppo", lambda d: PPOTrainer(ppo, output_dir=d, overwrite=overwrite or resume), ppo_dir)

    log("[eval] SFT and PPO policies on the same held-out prompts")
    eval_config = EvalConfig(eval_prompts=ppo.eval_prompts, max_new_tokens=ppo.max_new_tokens,
                             temperature=ppo.temperature, device=ppo.device)
    results = {
        "sft": evaluate_run(sft_dir, replace(eval_config, reward_model=str(rm_dir / "final"))),
        "ppo": evaluate_run(ppo_dir, eval_config),
        "rm": json.loads((rm_dir / "eval.json").read_text()),
    }
    plot = plot_training(ppo_dir, title=f"gipo demo: method={ppo.method}")
    log("\nReward-model held-out pairwise accuracy: "
        + ", ".join(f"{g} {v['accuracy']:.2f}" for g, v in results["rm"]["groups"].items())
        + f" (all {results['rm']['accuracy']:.2f})")
    log(f"\nPer-domain gold and proxy reward, after SFT and after RL ({ppo.method}):")
    log(comparison_table({"sft": results["sft"], ppo.method: results["ppo"]}))
    # Printed with the table: these numbers reproduce bit for bit only where this line reads the same.
    environment = json.loads((ppo_dir / ENVIRONMENT_FILE).read_text())
    log(f"\nNumerics: {describe_environment(environment)} (in {ppo_dir / ENVIRONMENT_FILE})")
    log(f"\nPlot: {plot}\nRuns: {sft_dir}, {rm_dir}, {ppo_dir}")
    return results
