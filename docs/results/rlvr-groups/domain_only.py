# Is a domain neglected by the mixed run while learnable? GRPO on one domain's prompts alone, from each seed's
# SFT model of the mixed compare, with the mixed runs' budget (480 iterations of 8 prompts x 8 samples, gold
# reward), evaluated on the suite's held-out prompts like the mixed runs (run `seed-K/grpo_only_DOMAIN`).
# Run from the repository root, after the compare has trained each seed's SFT model:
#   python docs/results/rlvr-groups/domain_only.py runs/rlvr-swap builtin_swap swap 0 1 2
#   python docs/results/rlvr-groups/domain_only.py runs/rlvr-swap builtin_swap add 0 1 2
# KEY=VALUE arguments after the seeds set the runs' other PPO keys, as the compare's --set ppo.KEY=VALUE did:
#   python docs/results/rlvr-groups/domain_only.py runs/rlvr-gdro builtin add 0 1 2 3 4 train_prompts_per_group=64
import json
import sys
from pathlib import Path

import yaml

from gipo import PPOConfig, PPOTrainer
from gipo.compare import pass_rates
from gipo.config import EvalConfig, build_config
from gipo.evaluation import evaluate_run
from gipo.tasks import Task, get_task, register_task
from gipo.tracking import read_text_or_gzip

out, suite_name, domain = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
seeds = [int(a) for a in sys.argv[4:] if "=" not in a]
overrides = {key: yaml.safe_load(value) for key, value in (a.split("=", 1) for a in sys.argv[4:] if "=" in a)}
suite = get_task(suite_name)
only = register_task(Task(name=f"{suite_name}_{domain}_only", groups=[domain],
                          make_split=lambda split, n, rng: [r for r in suite.make_split(split, n, rng)
                                                            if r["group"] == domain],
                          gold_reward=suite.gold_reward, demonstration=suite.demonstration, ood_splits=[]))
for seed in seeds:
    run_dir = out / f"seed-{seed}" / f"grpo_only_{domain}"
    if not (run_dir / "eval.json").exists():
        config = build_config(PPOConfig, {"method": "grpo", "reward": "gold", "dataset": only.name,
                                          "max_steps": 480, "eval_every": 40, "progress": False,
                                          "seed": seed, "policy": str(out / f"seed-{seed}" / "sft" / "final"),
                                          **overrides})
        PPOTrainer(config, output_dir=run_dir, overwrite=True).train()
        evaluate_run(run_dir, EvalConfig(dataset=suite_name))
    only_run, mixed_run = run_dir, out / f"seed-{seed}" / "grpo"
    figures = {}
    for label, folder in (("alone", only_run), ("mixed", mixed_run)):
        if (folder / "eval.json").exists():
            gold = json.loads((folder / "eval.json").read_text())["groups"][domain]["gold"]
            rows = read_text_or_gzip(folder / "eval_rows.jsonl").splitlines()  # a run folder, or its archive
            passes = pass_rates([json.loads(line) for line in rows])
            figures[label] = f"gold {gold:.3f}, pass rate {passes[domain]:.3f}"
    print(f"seed {seed}, held-out {domain}: GRPO on {domain} alone: {figures['alone']}; "
          f"GRPO on the mixed suite: {figures.get('mixed', 'not run')}")
