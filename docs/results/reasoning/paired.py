"""Paired per-seed differences of held-out pass@1 against a base method: each task, mean, worst task, OOD mean.

    python docs/results/reasoning/paired.py RUNS_DIR BASE_METHOD METHOD [METHOD ...]
"""
import json
import sys
from pathlib import Path

from gipo.compare import mean_ci

out, base, *methods = sys.argv[1:]
seeds = sorted(int(p.name.split("-")[1]) for p in Path(out).glob("seed-*"))
def load(s, m):
    p = Path(out) / f"seed-{s}" / m / "eval.json"
    return json.loads(p.read_text()) if p.exists() else None
for m in methods:
    rows = {}
    for s in seeds:
        b, e = load(s, base), load(s, m)
        if not b or not e:
            continue
        tb = {k: v["pass@1"] for k, v in b["groups"].items()}
        te = {k: v["pass@1"] for k, v in e["groups"].items()}
        ob = sum(v["pass@1"] for v in b["ood"].values()) / len(b["ood"])
        oe = sum(v["pass@1"] for v in e["ood"].values()) / len(e["ood"])
        d = {k: te[k] - tb[k] for k in tb}
        d["mean"] = sum(te.values()) / len(te) - sum(tb.values()) / len(tb)
        d["worst"] = min(te.values()) - min(tb.values())
        d["ood_mean"] = oe - ob
        print(f"{m} seed {s}: base {tb} worst {min(tb, key=tb.get)}; method {te}; diffs " +
              ", ".join(f"{k} {v:+.3f}" for k, v in d.items()))
        for k, v in d.items():
            rows.setdefault(k, []).append(v)
    for k, v in rows.items():
        print(f"  {m} {k}: n={len(v)} {mean_ci(v)}")
