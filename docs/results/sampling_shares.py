# Where did group sampling move the batches? For each run of a compare (a run folder or its archive), averaged
# over seeds and over a stretch of training iterations: the sampler's favoured group (the largest sampling
# weight at that iteration), that weight, the favoured group's share of the batch and its pass rate, and each
# true domain's share of the batch (`domain/share/*`, where the run logged it).
# Run from the repository root:
#   python docs/results/sampling_shares.py runs/rlvr-groups grpo,grpo_prompt_gdro,grpo_gipo_sampling 5
#   python docs/results/sampling_shares.py docs/results/rlvr-swap-sampling/runs grpo,grpo_prompt_gdro,grpo_gipo_sampling 5
import sys
from pathlib import Path

from gipo.tracking import read_metrics

STRETCHES = ((1, 120), (121, 240), (241, 480))


def favoured(row: dict) -> dict[str, float] | None:
    weights = {k.rsplit("/", 1)[1]: v for k, v in row.items() if k.startswith("groups/sampling_weight/")}
    if not weights:
        return None
    group = max(weights, key=weights.get)
    return {"weight": weights[group], "share": row.get(f"groups/sample_share/{group}", 0.0),
            "pass rate": row.get(f"groups/pass_rate/{group}")}


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


out, methods, seeds = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
for method in methods:
    runs = [read_metrics(out / f"seed-{seed}" / method / "metrics.jsonl") for seed in range(seeds)]
    for first, last in STRETCHES:
        rows = [row for run in runs for row in run if first <= row["step"] <= last]
        if not rows:
            continue
        picks = [f for f in map(favoured, rows) if f is not None]
        domains = sorted({k.removeprefix("domain/share/") for row in rows for k in row if k.startswith("domain/share/")})
        parts = [f"favoured group: weight {mean([p['weight'] for p in picks]):.2f}, "
                 f"batch share {mean([p['share'] for p in picks]):.3f}"] if picks else []
        if picks and mean([p["pass rate"] for p in picks]) is not None:
            parts.append(f"pass rate {mean([p['pass rate'] for p in picks]):.3f}")
        if domains:
            parts.append("domain shares " + ", ".join(
                f"{d} {mean([row.get(f'domain/share/{d}') for row in rows]):.3f}" for d in domains))
        print(f"{method:<20} iterations {first:>3}-{last:<3} " + ("; ".join(parts) or "no sampling metrics"))
