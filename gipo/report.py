"""Reports: the terminal table comparing evaluations, and plots of per-group reward over training."""

from __future__ import annotations

import json
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


def _cell(figure: dict[str, Any] | None) -> str:
    if not figure or figure.get("mean") is None:
        return "-"
    ci = figure.get("ci95")
    return f"{figure['mean']:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def _number(value: float | None, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def compare_tables(summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as (header, rows), shared by the Markdown and HTML reports."""
    methods = summary["methods"]
    first = next(iter(methods.values()))
    groups, splits = list(first["groups"]), list(first["ood"])
    main_header = ["method", "worst domain gold", "spread gold", *[f"{g} gold" for g in groups],
                   *[f"OOD {s} gold" for s in splits], "KL", "max gold drop", "proxy-gold gap"]
    main_rows = [[name, _cell(m["worst_group_gold"]), _cell(m["spread_gold"]),
                  *[_cell(m["groups"][g]["gold"]) for g in groups], *[_cell(m["ood"][s]["gold"]) for s in splits],
                  _cell(m["kl"]), _cell(m["max_gold_drop"]), _cell(m["proxy_gold_gap"])]
                 for name, m in methods.items()]
    pass_rates = {}
    if any(m["groups"][g].get("pass_rate", {}).get("mean") is not None for m in methods.values() for g in groups):
        pass_rates = {"Pass rate on held-out prompts: share of exact answers (mean ± 95% CI over seeds)": (
            ["method", "worst domain", "mean", *groups],
            [[name, _cell(m.get("worst_group_pass_rate")), _cell(m.get("mean_pass_rate")),
              *[_cell(m["groups"][g].get("pass_rate")) for g in groups]] for name, m in methods.items()])}
    proxy_header = ["method", *[f"{g} reward" for g in groups], *[f"OOD {s} reward" for s in splits]]
    proxy_rows = [[name, *[_cell(m["groups"][g]["reward"]) for g in groups],
                   *[_cell(m["ood"][s]["reward"]) for s in splits]] for name, m in methods.items()]
    win_header = ["A vs B", "A wins", "tie", "B wins", "judge"]
    win_rows = [[pair.replace("_vs_", " vs "), f"{w['win']:.2f}", f"{w['tie']:.2f}", f"{w['lose']:.2f}", w["judge"]]
                for pair, w in summary["win_rates"].items()]
    tables = {"Gold reward on held-out prompts (mean ± 95% CI over seeds)": (main_header, main_rows), **pass_rates}
    paired_key = next((k for k in summary if k.startswith("paired_vs_")), None)
    if paired_key and summary[paired_key]:
        baseline = paired_key[len("paired_vs_"):]
        keys = list(next(iter(summary[paired_key].values())))
        tables[f"Difference to {baseline} on the same seed (mean ± 95% CI; > 0: better than {baseline})"] = (
            ["method", *[k.replace("_", " ") for k in keys]],
            [[name, *[_cell(d[k]) for k in keys]] for name, d in summary[paired_key].items()])
    matched_key = next((k for k in summary if k.startswith("matched_kl_vs_")), None)
    if matched_key and summary[matched_key]:
        baseline = matched_key[len("matched_kl_vs_"):]
        points = [p for method_points in summary[matched_key].values() for p in method_points]
        keys = [k for k in points[0] if k not in ("run", "kl")] if points else []
        tables[f"At matched KL: each run minus {baseline}'s KL frontier interpolated at the run's KL (seed means; "
               f"- where the run's KL lies outside {baseline}'s range)"] = (
            ["run", "KL", *[k.replace("_", " ") for k in keys]],
            [[p["run"], _number(p["kl"]), *[_number(p[k], signed=True) for k in keys]] for p in points])
    matched_paired_key = next((k for k in summary if k.startswith("matched_kl_paired_vs_")), None)
    if matched_paired_key and summary[matched_paired_key]:
        baseline = matched_paired_key[len("matched_kl_paired_vs_"):]
        methods_paired = summary[matched_paired_key]
        keys = list(next(iter(methods_paired.values()))["all"])
        rows = []
        for method, paired in methods_paired.items():
            rows += [[run, _cell(d["kl"]), *[_cell(d[k]) for k in keys]] for run, d in paired["runs"].items()]
            rows.append([f"{method}: all runs", "", *[_cell(paired["all"][k]) for k in keys]])
        tables[f"At matched KL, paired by seed: each run minus {baseline}'s frontier of the same seed at the run's "
               f"KL (mean ± 95% CI over the seeds where the run's KL lies inside {baseline}'s range; 'all runs': "
               "on each seed the mean of the method's runs that do)"] = (
            ["run", "KL", *[k.replace("_", " ") for k in keys]], rows)
    return {**tables,
            "Proxy (reward-model) score": (proxy_header, proxy_rows),
            "Win rates on the same held-out prompts": (win_header, win_rows)}


def _run_curves(out: Path, name: str, seeds: int, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per key under ``prefix``: steps and the mean over seeds (steps every seed logged)."""
    by_key: dict[str, dict[int, list[float]]] = {}
    for seed in range(seeds):
        for row in read_metrics(out / f"seed-{seed}" / name / "metrics.jsonl"):
            for key, value in row.items():
                if key.startswith(prefix) and isinstance(value, float):
                    by_key.setdefault(key[len(prefix):], {}).setdefault(row["step"], []).append(value)
    return {key: (sorted(points), [sum(points[s]) / len(points[s]) for s in sorted(points)])
            for key, points in by_key.items()}


def compare_plots(out: Path, summary: dict[str, Any], names: list[str], seeds: int,
                  report_dir: Path | None = None) -> dict[str, Path]:
    """The report's plots, from the runs under ``out``, written to ``report_dir`` (default ``out``)."""
    report_dir = report_dir or out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    first = next(iter(summary["methods"].values()))
    domains = list(first["groups"]) + [f"ood_{s}" for s in first["ood"]]
    plots = {}

    fig, axes = plt.subplots(1, len(domains), figsize=(3.3 * len(domains), 3.2), squeeze=False, sharey=True)
    for ax, domain in zip(axes[0], domains, strict=True):
        for name in names:
            curves = _run_curves(out, name, seeds, "eval/gold/")
            if domain in curves:
                steps, values = curves[domain]
                # PPO counts iterations and DPO optimizer steps: compare them as shares of each budget.
                ax.plot([s / steps[-1] for s in steps], values, label=name, color=colors[name], marker="o",
                        markersize=2)
        ax.set_title(domain, fontsize=10)
        ax.set_xlabel("share of training")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold reward (held-out)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle("Per-domain gold reward during training (mean over seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    plots["curves"] = report_dir / "curves.png"
    fig.savefig(plots["curves"], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name in names:
        for seed in range(seeds):
            report_path = out / f"seed-{seed}" / name / "eval.json"
            if not report_path.exists():
                continue
            groups = json.loads(report_path.read_text())["groups"].values()
            kl = sum((g["kl"] or 0.0) * g["n"] for g in groups) / sum(g["n"] for g in groups)
            for ax, key in zip(axes, ("gold", "reward"), strict=True):
                values = [g[key] for g in groups if g[key] is not None]
                if values:
                    ax.scatter(kl, sum(values) / len(values), color=colors[name], label=name if seed == 0 else None)
    for ax, label in zip(axes, ("mean gold reward", "mean proxy reward"), strict=True):
        ax.set_xlabel("KL to reference per response")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    labelled = next((ax for ax in axes[::-1] if ax.get_legend_handles_labels()[0]), None)  # no proxy: gold's panel
    if labelled is not None:
        labelled.legend(fontsize=7)
    fig.suptitle("Reward against KL, one point per run (the over-optimization frontier)", fontsize=11)
    fig.tight_layout()
    plots["frontier"] = report_dir / "frontier.png"
    fig.savefig(plots["frontier"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(domains) * len(names) / 3), 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        method = summary["methods"][name]
        figures = [method["groups"][d]["gold"] if d in method["groups"] else method["ood"][d[4:]]["gold"]
                   for d in domains]
        ax.bar([j + i * width for j in range(len(domains))], [f["mean"] or 0 for f in figures], width,
               yerr=[f["ci95"] or 0 for f in figures], label=name, color=colors[name], capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("gold reward (held-out)")
    ax.set_ylim(0, 1.05)  # gold lives in [0, 1]; a wide interval from few seeds is cut at the axis
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("Final per-domain gold reward (error bars: 95% CI over seeds)", fontsize=11)
    fig.tight_layout()
    plots["bars"] = report_dir / "bars.png"
    fig.savefig(plots["bars"], dpi=100)
    plt.close(fig)

    if summary.get("kl_frontier"):
        plots["kl_frontier"] = _kl_frontier_plot(summary["kl_frontier"], report_dir / "kl_frontier.png", plt)

    inferred = [name for name in names if (out / "seed-0" / name / "config.yaml").exists()
                and "groups: inferred" in (out / "seed-0" / name / "config.yaml").read_text()]
    nmi = {name: _run_curves(out, name, seeds, "groups/").get("nmi") for name in inferred}
    nmi = {name: curve for name, curve in nmi.items() if curve}
    if nmi:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, curve in nmi.items():
            ax.plot(*curve, label=name, color=colors[name])
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel("NMI(inferred groups, true domains)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        ax.set_title("Do the inferred groups find the domains?", fontsize=11)
        fig.tight_layout()
        plots["nmi"] = report_dir / "nmi.png"
        fig.savefig(plots["nmi"], dpi=100)
        plt.close(fig)
    return plots


def _kl_frontier_plot(frontiers: dict[str, list[dict[str, Any]]], path: Path, plt) -> Path:
    """Held-out gold against KL, one line per method through its sweep's runs (seed means)."""
    keys = [k for k in next(iter(frontiers.values()))[0] if k not in ("run", "kl")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for i, (method, points) in enumerate(frontiers.items()):
        for ax, key in zip(axes[0], keys, strict=True):
            shown = [(p["kl"], p[key]) for p in points if p["kl"] is not None and p.get(key) is not None]
            if shown:
                ax.plot(*zip(*shown, strict=True), marker="o", color=plt.cm.tab10(i % 10), label=method)
    for ax, key in zip(axes[0], keys, strict=True):
        ax.set_xlabel("KL to reference per response")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Gold against KL along the sweep (mean over seeds): higher at the same KL is better", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PLOT_CAPTIONS = {
    "kl_frontier": "Worst-domain, mean and OOD gold against KL along the sweep, one line per method.",
    "curves": "Per-domain gold reward on held-out prompts during training.",
    "frontier": "Reward against KL: a method above and left of another gets more for less drift.",
    "bars": "Final per-domain gold reward with 95% confidence intervals over seeds.",
    "nmi": "Agreement (normalized mutual information) of inferred groups with the true domains.",
}


def write_compare_report(out: Path, summary: dict[str, Any], names: list[str], seeds: int,
                         report_dir: Path | None = None) -> None:
    """``report.md`` (images beside it) and a self-contained ``report.html`` (images embedded), in
    ``report_dir`` (default ``out``, where the runs are)."""
    report_dir = report_dir or out
    report_dir.mkdir(parents=True, exist_ok=True)
    import base64
    import html

    plots = compare_plots(out, summary, names, seeds, report_dir)
    tables = compare_tables(summary)
    intro = (f"{len(names)} runs x {seeds} seed(s). Gold reward in [0, 1]; the worst domain is the lowest gold "
             "per seed; spread is best minus worst domain; max gold drop is the largest fall of mean held-out "
             "gold below its best during training; proxy-gold gap is the reward model's gain over SFT minus the "
             "gold gain, in SFT standard deviations (positive: reward hacking).")
    md = ["# gipo compare", "", intro, ""]
    for title, (header, rows) in tables.items():
        md += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    for key, path in plots.items():
        md += [f"## {PLOT_CAPTIONS[key]}", "", f"![{key}]({path.name})", ""]
    (report_dir / "report.md").write_text("\n".join(md), encoding="utf-8")

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>gipo compare</title><style>"
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%;border:1px solid #eee}</style></head><body>",
             "<h1>gipo compare</h1>", f"<p>{html.escape(intro)}</p>"]
    for title, (header, rows) in tables.items():
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    for key, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(PLOT_CAPTIONS[key])}</h2><img alt='{key}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    (report_dir / "report.html").write_text("\n".join(parts), encoding="utf-8")
