"""Reports: the terminal table comparing evaluations, and plots of per-group reward over training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gipo.tracking import read_metrics


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def comparison_table(evals: dict[str, dict[str, Any]]) -> str:
    """Rows per group (and OOD split, and the worst group), columns gold / reward for each named eval."""
    names = list(evals)
    first = evals[names[0]]
    header = f"{'group':<16}" + "".join(f"{'gold ' + n:>14}" for n in names) + "".join(
        f"{'reward ' + n:>14}" for n in names) + "".join(f"{'kl ' + n:>12}" for n in names)
    lines = [header, "-" * len(header)]

    def row(label: str, get) -> str:
        cells = [get(evals[n]) or {} for n in names]
        return (f"{label:<16}" + "".join(f"{_fmt(c.get('gold')):>14}" for c in cells)
                + "".join(f"{_fmt(c.get('reward')):>14}" for c in cells)
                + "".join(f"{_fmt(c.get('kl')):>12}" for c in cells))

    for group in first["groups"]:
        lines.append(row(group, lambda e, g=group: e["groups"].get(g)))
    lines.append(row("worst group", lambda e: {**e["worst_group"], "kl": None}))
    for split in first["ood"]:
        lines.append(row(f"ood: {split}", lambda e, s=split: e["ood"].get(s)))
    return "\n".join(lines)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total, queue = [], 0.0, []
    for v in values:
        queue.append(v)
        total += v
        if len(queue) > window:
            total -= queue.pop(0)
        out.append(total / len(queue))
    return out


def plot_training(run_dir: str | Path, out_path: str | Path | None = None, title: str = "") -> Path:
    """Per-group gold reward (held-out evaluation, else training rollouts), reward-model score and KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    out_path = Path(out_path or run_dir / "training_curves.png")
    panels = [("eval/gold/", "gold reward, held-out prompts"), ("domain/gold/", "gold reward, training rollouts"),
              ("domain/score/", "reward-model score, training rollouts")]
    panels = [p for p in panels if any(k.startswith(p[0]) for r in rows for k in r)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.6), squeeze=False)
    for ax, (prefix, label) in zip(axes[0], panels, strict=False):
        keys = sorted({k for r in rows for k in r if k.startswith(prefix)})
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
            steps, values = zip(*points, strict=True) if points else ((), ())
            smooth = prefix != "eval/gold/"
            ax.plot(steps, _smooth(list(values), 10) if smooth else values, label=key[len(prefix):],
                    marker=None if smooth else "o", markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    points = [(r["step"], r["objective/kl"]) for r in rows if isinstance(r.get("objective/kl"), float)]
    if points:
        ax.plot(*zip(*points, strict=True), color="black")
    ax.set_title("KL to reference per response", fontsize=10)
    ax.set_xlabel("PPO iteration")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
