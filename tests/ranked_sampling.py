"""``python tests/ranked_sampling.py ARGS``: the ``gipo`` command with a deterministic sampler that still gives a
prompt's samples different responses (its r-th sample answers the first r characters of the built-in task's right
answer, so their gold rewards differ), for tests that compare runs split across processes with one process. Greedy samples of one prompt are alike, and GRPO's or RLOO's advantages, which
sum to zero over a prompt's samples, then give a gradient of zero: only rounding noise, which Adam blows up."""

from __future__ import annotations

import sys

import torch

from gipo import experience
from gipo.cli import main
from gipo.models import build_embedded_tokenizer
from gipo.rollout import Rollout, response_logprobs
from gipo.tasks import _OPS


def right_answer(prompt: str) -> str:
    """``add 47+85=`` -> ``132``; ``reverse dbca=`` -> ``acbd``."""
    group, _, argument = prompt.strip().rstrip("=").partition(" ")
    if group == "add":
        a, b = argument.split("+")
        return str(int(a) + int(b))
    return _OPS[group](argument)


def ranked_generate(model, query_ids: torch.Tensor, query_mask: torch.Tensor, eos_id: int, pad_id: int, settings,
                    greedy: bool = False, with_logprobs: bool = False, with_states: bool = False) -> Rollout:
    tokenizer = build_embedded_tokenizer()
    ranks: list[int] = []
    for j in range(len(query_ids)):
        ranks.append(ranks[-1] + 1 if j and torch.equal(query_ids[j], query_ids[j - 1]) else 0)
    prompts = tokenizer.batch_decode(query_ids, skip_special_tokens=True)
    rows = [tokenizer(right_answer(p)[:r], add_special_tokens=False)["input_ids"] + [eos_id]
            for p, r in zip(prompts, ranks, strict=True)]
    width = max(len(row) for row in rows)
    response_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=query_ids.device)
    mask = torch.tensor([[1.0] * len(row) + [0.0] * (width - len(row)) for row in rows], device=query_ids.device)
    rollout = Rollout(query_ids, query_mask, response_ids, mask, torch.ones(len(rows), dtype=torch.bool))
    if with_logprobs:
        rollout.sampled_logprobs = response_logprobs(model, rollout, settings.temperature)[0] * mask
    return rollout


if __name__ == "__main__":
    experience.generate = ranked_generate
    sys.exit(main(sys.argv[1:]))
