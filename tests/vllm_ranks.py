"""``accelerate launch --num_processes 2 tests/vllm_ranks.py OUT_DIR ddp|fsdp``: 2 GRPO iterations of SmolLM2 with
the vLLM backend, one engine in every process. Each process writes OUT_DIR/rank-R.json: its engine's and its
trainer's log-probabilities of a fixed reply after training, its engine's before, and the second iteration's
rollout-correction KL that the run logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gipo import distributed as dist
from tests.test_vllm import engine_and_trainer_logprobs, grpo_trainer


def main(out: Path, sharding: str) -> None:
    trainer = grpo_trainer(out / "run", 2, fsdp=sharding == "fsdp")
    prompt = list(trainer.collector.encoded[0])
    reply = trainer.tokenizer(" The answer is 42.", add_special_tokens=False).input_ids
    initial_engine, _ = engine_and_trainer_logprobs(trainer, prompt, reply)
    trainer.train()
    trained_engine, trained_policy = engine_and_trainer_logprobs(trainer, prompt, reply)
    (out / f"rank-{dist.rank()}.json").write_text(json.dumps({
        "world_size": dist.world_size(), "initial_engine": initial_engine.tolist(),
        "trained_engine": trained_engine.tolist(), "trained_policy": trained_policy.tolist()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
