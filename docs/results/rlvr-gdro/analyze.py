"""Where the group methods' weights and samples went, and what Prompt-GDRO's bin score tracks.

    python docs/results/rlvr-gdro/analyze.py RUNS_DIR [OUT.json]

RUNS_DIR is a compare's folder or its archive (seed-*/METHOD/metrics.jsonl[.gz]), finished runs only (an eval.json).
For every run it reads the held-out figures; for every method it averages
over seeds and iterations each domain's share of the samples and, where the run has bins, each bin's share,
pass rate, Prompt-GDRO weight and Rollout-GDRO samples per prompt, and each domain's gold reward on its training
samples over the last tenth of the iterations (``train_gold_late``: far above the held-out gold, the run has learnt
its training prompts rather than the domain). For the runs with a bin score it correlates,
over (iteration, bin) pairs, the score's observation x_b (the bin's surrogate loss over its share of the batch)
with the bin's ratio drift, KL and pass rate. Writes OUT.json (default: analysis.json beside this script).
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from collections import defaultdict
from pathlib import Path


def read_rows(run: Path) -> list[dict]:
    for name in ("metrics.jsonl", "metrics.jsonl.gz"):
        path = run / name
        if path.exists():
            text = gzip.decompress(path.read_bytes()).decode() if name.endswith(".gz") else path.read_text()
            return [json.loads(line) for line in text.splitlines() if line.strip()]
    return []


def pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


LATE = 0.1
"""The share of a run's last iterations whose training gold is averaged (``train_gold_late``)."""


def late_training_gold(rows: list[dict]) -> dict[str, float]:
    """Each domain's gold reward on the training samples, averaged over the last ``LATE`` of the iterations."""
    steps = [row["step"] for row in rows if any(key.startswith("domain/gold/") for key in row)]
    if not steps:
        return {}
    start = max(steps) - LATE * max(steps)
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("step", -1) > start:
            for key, value in row.items():
                if key.startswith("domain/gold/"):
                    values[f"train_gold_late/{key.rsplit('/', 1)[1]}"].append(value)
    return {key: mean(v) for key, v in sorted(values.items())}


def summarize(runs: list[Path]) -> dict:
    per_key: dict[str, list[float]] = defaultdict(list)
    pairs: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        rows = read_rows(run)
        for key, value in late_training_gold(rows).items():
            per_key[key].append(value)
        for row in rows:
            if "step" not in row or not any(key.startswith("domain/share/") for key in row):
                continue  # not a training iteration (an archive keeps only a few keys of each row)
            for key, value in row.items():
                if key.startswith(("domain/share/", "groups/sample_share/", "groups/pass_rate/", "gdro/bin_weight/",
                                   "rollouts/generations/", "gdro/sample_weight_max")) and isinstance(value, float):
                    group = key.rsplit("/", 1)[1] if key.count("/") > 1 else ""
                    share = row.get(f"groups/sample_share/{group}", 1.0)
                    if key.startswith(("groups/pass_rate/", "gdro/bin_weight/")) and not share:
                        continue  # a bin absent from the batch has no pass rate or weight
                    per_key[key].append(value)
            bins = {k.rsplit("/", 1)[1] for k in row if k.startswith("groups/surrogate_loss/")}
            for b in bins:
                share = row.get(f"groups/sample_share/{b}", 0.0)
                if share <= 0:
                    continue
                pairs["observation"].append(row[f"groups/surrogate_loss/{b}"] / share)
                pairs["ratio_drift"].append(row[f"groups/ratio_drift/{b}"])
                pairs["loss_kl"].append(row[f"groups/loss_kl/{b}"])
                pairs["pass_rate"].append(row.get(f"groups/pass_rate/{b}", 0.0))
    out = {"means": {k: mean(v) for k, v in sorted(per_key.items())}}
    if pairs["observation"]:
        out["score_observation_correlation"] = {
            name: pearson(pairs["observation"], pairs[name]) for name in ("ratio_drift", "loss_kl", "pass_rate")}
        out["score_observation_pairs"] = len(pairs["observation"])
    return out


def held_out(run: Path) -> dict[str, float] | None:
    """The finished run's held-out gold and pass@1 per domain, their means over domains, and OOD gold."""
    path = run / "eval.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    groups = report["groups"]
    figures = {f"gold/{g}": v["gold"] for g, v in groups.items()}
    figures.update({f"pass@1/{g}": v["pass@1"] for g, v in groups.items() if "pass@1" in v})
    figures["mean_gold"] = sum(v["gold"] for v in groups.values()) / len(groups)
    figures.update({f"ood_gold/{g}": v["gold"] for g, v in report.get("ood", {}).items()})
    return figures


def main(runs_dir: Path, out: Path) -> None:
    methods: dict[str, list[Path]] = defaultdict(list)
    for seed_dir in sorted(runs_dir.glob("seed-*")):
        for run in sorted(p for p in seed_dir.iterdir() if p.is_dir() and p.name not in ("sft", "rm", "start")):
            if (run / "eval.json").exists():  # finished runs only
                methods[run.name].append(run)
    report = {name: {"seeds": [r.parent.name for r in runs], "held_out": {r.parent.name: held_out(r) for r in runs},
                     **summarize(runs)} for name, runs in methods.items()}
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, entry in report.items():
        print(name, json.dumps(entry.get("score_observation_correlation", {})))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).with_name("analysis.json"))
