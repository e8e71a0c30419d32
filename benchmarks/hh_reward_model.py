"""Reward model on real data: MiniLM-L6 on HH-RLHF helpful + harmless, pairwise accuracy per group.

    OMP_NUM_THREADS=1 python benchmarks/hh_reward_model.py --out /tmp/hh_rm --steps 200

Trains on the train split (by a hash of the prompt) of the HH-RLHF helpful-base and harmless-base files in
../shared/data, then reports held-out accuracy on their validation and test splits, per group, and on
the four BIG-bench HHH groups. Prompts too long for ``--max-length`` lose their oldest turns
(``gipo.data.fit_to_length``); held-out pairs are fitted to ``--eval-max-length`` the same way. Writes the
reward model to OUT/final and the numbers to OUT/real_data_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from gipo.config import RewardConfig, build_config
from gipo.data import fit_to_length, load_preference_pairs
from gipo.models import load_tokenizer
from gipo.reward import RewardTrainer

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="/tmp/hh_rm")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-max-length", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="Held-out pairs per set (0 = all; for a smoke run).")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    data = Path(args.data)
    hh = (f"hh:{data}/hh-rlhf/helpful-base/test.jsonl.gz@helpful,"
          f"hh:{data}/hh-rlhf/harmless-base/test.jsonl.gz@harmless")
    tokenizer = load_tokenizer(args.model)
    started = time.perf_counter()
    train, train_fit = fit_to_length(tokenizer, load_preference_pairs(hh, "train"), args.max_length)
    held_out = {}
    for name, pairs in (("hh_validation", load_preference_pairs(hh, "validation")),
                        ("hh_test", load_preference_pairs(hh, "test")),
                        ("bigbench_hhh", load_preference_pairs(f"bigbench:{data}/bigbench-hhh"))):
        pairs = pairs[:args.limit] if args.limit else pairs
        held_out[name] = fit_to_length(tokenizer, pairs, args.eval_max_length) + (len(pairs),)
    print(f"train pairs: {len(train)} ({train_fit}); held out: "
          + ", ".join(f"{k} {len(v[0])} of {v[2]} ({v[1]})" for k, v in held_out.items()), flush=True)

    config = build_config(RewardConfig, {
        "model": args.model, "dataset": hh, "batch_size": args.batch_size, "max_length": args.eval_max_length,
        "max_steps": args.steps, "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps,
        "eval_fraction": 0.0, "seed": args.seed, "device": "cpu", "progress": False,
        "checkpoint_every": max(1, min(args.steps, 40)), "keep_last": 1})
    trainer = RewardTrainer(config, tokenizer=tokenizer, pairs=train, output_dir=args.out, overwrite=True)
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    results = {name: trainer.evaluate(pairs=pairs, batch_size=32) for name, (pairs, _, _) in held_out.items()}
    eval_seconds = time.perf_counter() - started
    report = {
        "settings": {**vars(args), "omp_num_threads": torch.get_num_threads(), "train_pairs": len(train),
                     "train_fit": train_fit,
                     "held_out": {k: {"pairs": len(v[0]), "of": v[2], **v[1]} for k, v in held_out.items()}},
        "seconds": {"load": round(load_seconds, 1), "train": round(train_seconds, 1),
                    "per_step": round(train_seconds / args.steps, 2), "eval": round(eval_seconds, 1)},
        "results": results,
    }
    Path(args.out, "real_data_eval.json").write_text(json.dumps(report, indent=2))
    for name, result in results.items():
        groups = ", ".join(f"{g} {r['accuracy']:.3f} (n={r['n']})" for g, r in result["groups"].items())
        print(f"{name}: {groups}; all {result['accuracy']:.3f}")
    print(json.dumps(report["seconds"]))


if __name__ == "__main__":
    main()
