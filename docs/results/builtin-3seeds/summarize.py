# How docs/results/builtin-3seeds was made: gipo's own compare functions over the finished runs of seeds 0, 1, 3.
# Run from the repository root: python docs/results/builtin-3seeds/summarize.py docs/results/builtin-3seeds
import json
import sys
from pathlib import Path

from gipo.compare import _read_rows, aggregate, paired_differences, seed_figures
from gipo.report import compare_tables

out = Path("runs/compare16")
seeds = [0, 1, 3]
names = ["ppo", "ppo_no_kl", "gipo_fixed_kl", "gipo", "gipo_gain"]
per_seed = {n: [] for n in names}
for s in seeds:
    sft_rows = _read_rows(out / f"seed-{s}" / "sft" / "eval_rows.jsonl")
    for n in names:
        per_seed[n].append(seed_figures(out / f"seed-{s}" / n, sft_rows))
summary = {"seeds_used": seeds, "methods": {n: aggregate(per_seed[n]) for n in names}, "win_rates": {},
           "paired_vs_ppo": paired_differences(names, per_seed)}
dest = Path(sys.argv[1])
dest.mkdir(parents=True, exist_ok=True)
(dest / "summary.json").write_text(json.dumps(summary, indent=2))
md = [f"# gipo compare (seeds {seeds}; the PPO-family runs that had finished)", ""]
for title, (header, rows) in compare_tables(summary).items():
    if not rows:
        continue
    md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows] + [""]
(dest / "report.md").write_text("\n".join(md))
print("\n".join(md))
