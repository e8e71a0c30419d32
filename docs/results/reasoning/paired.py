"""Paired per-seed differences of held-out pass@1 against a base method: each task, mean, worst task, OOD mean.

    python docs/results/reasoning/paired.py RUNS_DIR BASE_METHOD METHOD [METHOD ...]

The compare report pairs every method with the first run (the start model when ``ppo.policy`` is given); this
pairs them with BASE_METHOD instead, from the same ``eval.json`` files.
"""
import json
import sys
from pathlib import Path

from gipo.compare import mean_ci


def pass_rates(run: Path) -> tuple[dict[str, float], float] | None:
    """Each task's held-out pass@1 and the OOD splits' mean, or None for a run not evaluated."""
    path = run / "eval.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    ood = [split["pass@1"] for split in result["ood"].values()]
    return {task: group["pass@1"] for task, group in result["groups"].items()}, sum(ood) / len(ood)


def differences(base: tuple[dict[str, float], float], other: tuple[dict[str, float], float]) -> dict[str, float]:
    (base_tasks, base_ood), (tasks, ood) = base, other
    diff = {task: tasks[task] - base_tasks[task] for task in base_tasks}
    diff["mean"] = sum(tasks.values()) / len(tasks) - sum(base_tasks.values()) / len(base_tasks)
    diff["worst"] = min(tasks.values()) - min(base_tasks.values())
    diff["ood_mean"] = ood - base_ood
    return diff


out, base_method, *methods = sys.argv[1:]
seed_dirs = sorted(Path(out).glob("seed-*"), key=lambda d: int(d.name.split("-")[1]))
for method in methods:
    per_key: dict[str, list[float]] = {}
    for seed_dir in seed_dirs:
        base, other = pass_rates(seed_dir / base_method), pass_rates(seed_dir / method)
        if base is None or other is None:
            continue
        diff = differences(base, other)
        print(f"{method} {seed_dir.name}: " + ", ".join(f"{k} {v:+.3f}" for k, v in diff.items()))
        for key, value in diff.items():
            per_key.setdefault(key, []).append(value)
    for key, values in per_key.items():
        print(f"  {method} {key}: n={len(values)} {mean_ci(values)}")
