"""Peak memory of one PPO process on SmolLM2-135M-Instruct: full fine-tuning, LoRA, LoRA + gradient checkpointing.

    OMP_NUM_THREADS=1 python benchmarks/ppo_memory.py [--steps 3] [--method gipo] [--json PATH]

Each variant runs in a fresh subprocess: the policy SmolLM2-135M-Instruct (bundled, see docs/real_data.md),
a critic copied from its backbone (fully trained, as in TRL), the MiniLM reward model (its score head
untrained: memory and time do not depend on what it says), HH-RLHF helpful + harmless prompts of at most
64 tokens, batch 8, 32 new tokens, 1 epoch. Reports the process's peak resident memory (CPU) or peak
allocated GPU memory (CUDA), the trained parameters, and seconds per iteration (first one excluded).
Under ``accelerate launch`` each process holds the same models, so the figure is the memory per process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "full": {},
    "lora": {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": "q_proj,v_proj"},
    "lora+gc": {"lora_r": 16, "lora_alpha": 32, "lora_target_modules": "q_proj,v_proj",
                "gradient_checkpointing": True},
}


def measure(variant: str, steps: int, method: str, data: Path) -> dict:
    import torch

    from gipo.config import PPOConfig, build_config
    from gipo.data import load_prompts, render_prompt
    from gipo.models import load_tokenizer
    from gipo.ppo import PPOTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = (f"hh:{data}/hh-rlhf/helpful-base/test.jsonl.gz@helpful,"
            f"hh:{data}/hh-rlhf/harmless-base/test.jsonl.gz@harmless")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    records = [r for r in load_prompts(spec, "train", 400, 0)
               if len(tokenizer(render_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) <= 64]
    config = build_config(PPOConfig, {
        "method": method, "policy": "smollm2-135m-instruct", "reward_model": "minilm-l6", "dataset": spec,
        "batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 32, "max_prompt_length": 64,
        "max_steps": steps, "eval_every": 0, "checkpoint_every": 10_000, "progress": False, "device": "auto",
        "bf16": True, **VARIANTS[variant]})
    out = Path(f"/tmp/gipo_ppo_memory/{variant}")
    trainer = PPOTrainer(config, tokenizer=tokenizer, prompts=records, output_dir=out, overwrite=True)
    trained = sum(p.numel() for opt in trainer.optimizers() for g in opt.param_groups for p in g["params"])
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        trainer.step += 1
        trainer.training_step()
        times.append(time.perf_counter() - started)
    cuda = torch.cuda.is_available()
    peak_mib = (torch.cuda.max_memory_allocated() if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    later = sorted(times[1:]) or times
    return {"variant": variant, "device": "cuda" if cuda else "cpu", "peak_mib": round(peak_mib),
            "trained_parameters": trained, "s_per_iter_median": round(later[len(later) // 2], 2),
            "prompts": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", default="gipo")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.method, Path(args.data))))
        return
    rows = []
    for variant in args.variants.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                               "--method", args.method, "--data", args.data], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{variant:8s} {row['device']}: peak {row['peak_mib']:>6} MiB, trained {row['trained_parameters'] / 1e6:.1f}M "
              f"parameters, {row['s_per_iter_median']} s/iteration", flush=True)
    base = rows[0]["peak_mib"]
    for row in rows[1:]:
        print(f"{row['variant']} / {rows[0]['variant']} peak memory: {row['peak_mib'] / base:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
