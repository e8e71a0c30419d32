"""Seconds per SFT optimizer step: TRL's SFTTrainer against gipo's SFTTrainer, same model, data and batch.

    python benchmarks/sft_vs_trl.py [--steps 60] [--batch 64]

Both train the embedded tiny Llama on the built-in suite's demonstrations (completion-only loss);
the first 10 steps are excluded from the median. This is the measurement behind gipo running its own
SFT loop rather than TRL's SFTTrainer (see docs/performance.md, "Why gipo's own loops").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from gipo import SFTConfig, SFTTrainer, build_config
from gipo.data import load_sft_examples
from gipo.models import build_embedded_model, build_embedded_tokenizer


def time_trl(steps: int, batch: int, examples: list[dict]) -> list[float]:
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    tokenizer = build_embedded_tokenizer()
    model = build_embedded_model(tokenizer)
    data = Dataset.from_list([{"prompt": e["prompt"], "completion": e["completion"]} for e in examples])
    stamps: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TRLSFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-3,
                            logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                            max_length=64, completion_only_loss=True, dataloader_num_workers=0,
                            disable_tqdm=True)
        TRLSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                      callbacks=[Clock()]).train()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def time_gipo(steps: int, batch: int, examples: list[dict]) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        config = build_config(SFTConfig, {"max_steps": steps, "batch_size": batch, "progress": False,
                                          "checkpoint_every": 10 * steps, "device": "cpu"})
        trainer = SFTTrainer(config, examples=examples, output_dir=out)
        step = trainer.training_step
        stamps: list[float] = []

        def timed() -> dict:
            metrics = step()
            stamps.append(time.perf_counter())
            return metrics

        trainer.training_step = timed
        trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    examples = load_sft_examples("builtin", 500, seed=0)
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps, first 10 excluded")
    results = {}
    for name, run in (("trl SFTTrainer", time_trl), ("gipo SFTTrainer", time_gipo)):
        gaps = run(args.steps, args.batch, examples)[9:]
        results[name] = statistics.median(gaps)
        print(f"{name:16s} median {results[name] * 1000:7.1f} ms/step  [min {min(gaps) * 1000:.1f}, "
              f"max {max(gaps) * 1000:.1f}]")
    print(f"gipo / trl: {results['gipo SFTTrainer'] / results['trl SFTTrainer']:.2f}")


if __name__ == "__main__":
    main()
