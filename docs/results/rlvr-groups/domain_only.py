# Is `add` neglected by the mixed run while learnable? GRPO on `add` prompts alone, from each seed's SFT model
# of the mixed compare, with the mixed runs' budget (480 iterations of 8 prompts x 8 samples, gold reward),
# evaluated on the built-in suite's held-out prompts like the mixed runs.
# Run from the repository root, after the compare has trained each seed's SFT model:
#   python docs/results/rlvr-groups/domain_only.py runs/rlvr-groups 0 1 2
import sys
from pathlib import Path

from gipo import PPOConfig, PPOTrainer
from gipo.config import EvalConfig, build_config
from gipo.evaluation import evaluate_run
from gipo.tasks import BUILTIN, Task, register_task

ADD_ONLY = register_task(Task(name="builtin_add", groups=["add"],
                              make_split=lambda split, n, rng: [r for r in BUILTIN.make_split(split, n, rng)
                                                                if r["group"] == "add"],
                              gold_reward=BUILTIN.gold_reward, demonstration=BUILTIN.demonstration,
                              ood_splits=[]))

out = Path(sys.argv[1])
for seed in map(int, sys.argv[2:]):
    run_dir = out / f"seed-{seed}" / "grpo_add_only"
    if (run_dir / "eval.json").exists():
        continue
    config = build_config(PPOConfig, {"method": "grpo", "reward": "gold", "dataset": "builtin_add",
                                      "max_steps": 480, "eval_every": 40,
                                      "seed": seed, "policy": str(out / f"seed-{seed}" / "sft" / "final")})
    PPOTrainer(config, output_dir=run_dir, overwrite=True).train()
    evaluate_run(run_dir, EvalConfig(dataset="builtin"))
    print(f"seed {seed}: {(run_dir / 'eval.json').read_text()[:400]}")
