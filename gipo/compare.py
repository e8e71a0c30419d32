"""``gipo compare``: every method on every seed with the same budget, summarized with confidence intervals.

Layout under OUT: ``seed-S/sft``, ``seed-S/rm`` (trained once per seed, shared by the methods) and
``seed-S/RUN`` per method (RUN is the method, or ``method@key=value`` in a sweep). A run with an
``eval.json`` is reused, and so is another run of the seed with the same config (``RUN`` becomes a link to
it); an unfinished one resumes from its last checkpoint, so a killed compare continues where it stopped.
Then ``summary.json``, ``report.md`` and ``report.html`` are written (for a sweep, under ``OUT/sweep-KEY/``,
so a sweep can reuse a compare's SFT and reward models).
"""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gipo.config import (
    DPO_METHODS,
    ConfigError,
    DPOConfig,
    EvalConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    build_config,
    read_yaml,
    save_config,
    upgrade_saved_config,
)
from gipo.evaluation import evaluate_run
from gipo.run_dir import differing_keys
from gipo.tasks import EXACT
from gipo.tracking import read_metrics, read_text_or_gzip

# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci(values: list[float | None]) -> dict[str, float | None]:
    """Mean and the half-width of its 95% t-interval (null with fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "ci95": None}
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    dof = n - 1
    t = T95.get(dof) or (T95[max(k for k in T95 if k <= dof)] if dof <= 30 else 1.96)
    return {"mean": mean, "ci95": t * sd / math.sqrt(n)}


START = "start"
"""The run name of the start model's evaluation when ``ppo.policy`` is given (no SFT stage)."""


def evaluation_settings(ppo: PPOConfig, device: str, judge: str | None) -> EvalConfig:
    """One evaluation for every run of a compare (the start or SFT model included): the PPO stage's held-out
    prompts, sampling settings and pass@k draws."""
    return EvalConfig(eval_prompts=ppo.eval_prompts, device=device, judge=judge, max_new_tokens=ppo.max_new_tokens,
                      temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p, eval_samples=ppo.eval_samples,
                      eval_greedy=ppo.eval_greedy, eval_train_prompts=ppo.eval_train_prompts)


@dataclass
class Run:
    name: str
    method: str
    overrides: dict[str, Any]


def plan_runs(methods: list[str], sweep: tuple[str, list[Any]] | None) -> list[Run]:
    if sweep is None:
        return [Run(m, m, {}) for m in methods]
    key, values = sweep
    runs = []
    for method in methods:
        if method in DPO_METHODS:  # a sweep varies a PPO key: the DPO methods run once
            runs.append(Run(method, method, {}))
            continue
        runs.extend(Run(f"{method}@{key}={v}", method, {key: v}) for v in values)
    return runs


def max_gold_drop(metrics: list[dict[str, Any]]) -> float | None:
    """Largest fall of the mean held-out gold reward below its best so far during training."""
    curve = [sum(v) / len(v) for r in metrics
             if (v := [x for k, x in r.items() if k.startswith("eval/gold/") and not k.startswith("eval/gold/ood")])]
    if not curve:
        return None
    best, drop = curve[0], 0.0
    for value in curve:
        best = max(best, value)
        drop = max(drop, best - value)
    return drop


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """A run's sampled held-out responses (greedy ones, drawn with ``eval_greedy``, are summarized in eval.json)."""
    text = read_text_or_gzip(path)
    rows = [json.loads(line) for line in text.splitlines()] if text is not None else []
    return [row for row in rows if row.get("sample") != "greedy"]


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) or 1.0


def proxy_gold_gap(rows: list[dict[str, Any]], sft_rows: list[dict[str, Any]]) -> float | None:
    """Gain of the proxy reward over SFT minus the gain of the gold reward, each in SFT standard deviations.

    Positive: the reward model's score rose more than the true reward did (a sign of reward hacking).
    """
    if not rows or not sft_rows or rows[0]["gold"] is None or rows[0]["reward"] is None:
        return None
    def standardized_gain(key: str) -> float:
        base = [r[key] for r in sft_rows]
        return (sum(r[key] for r in rows) / len(rows) - sum(base) / len(base)) / _std(base)

    return standardized_gain("reward") - standardized_gain("gold")


def pass_rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per group, the share of held-out responses with an exact answer (gold 1); empty without gold."""
    by_group: dict[str, list[float]] = {}
    for row in rows:
        if row.get("gold") is not None:
            by_group.setdefault(row["group"], []).append(float(row["gold"] >= EXACT))
    return {name: sum(v) / len(v) for name, v in by_group.items()}


EXTRA_FIGURES = ("greedy_pass@1", "length")
"""Per-group figures of eval.json carried into summary.json besides gold, reward and pass rate (and pass@k)."""


def _extra(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k in EXTRA_FIGURES or k.startswith("pass@")}


def seed_figures(run_dir: Path, sft_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-seed numbers that summary.json averages."""
    report = json.loads((run_dir / "eval.json").read_text())
    groups = report["groups"]
    rows = _read_rows(run_dir / "eval_rows.jsonl")
    passes = pass_rates(rows)
    golds = [g["gold"] for g in groups.values() if g["gold"] is not None]
    n_total = sum(g["n"] for g in groups.values())
    kls = [g["kl"] * g["n"] for g in groups.values() if g["kl"] is not None]
    return {
        "groups": {name: {"gold": g["gold"], "reward": g["reward"], "pass_rate": passes.get(name), **_extra(g)}
                   for name, g in groups.items()},
        "worst_group_gold": min(golds) if golds else None,
        "worst_group_pass_rate": min(passes.values()) if passes else None,
        "mean_pass_rate": sum(passes.values()) / len(passes) if passes else None,
        "spread_gold": max(golds) - min(golds) if golds else None,
        "ood": {split: {"gold": s["gold"], "reward": s["reward"], **_extra(s)} for split, s in report["ood"].items()},
        "kl": sum(kls) / n_total if kls else None,
        "max_gold_drop": max_gold_drop(read_metrics(run_dir / "metrics.jsonl")),
        "proxy_gold_gap": proxy_gold_gap(rows, sft_rows),
    }


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and ci95 over seeds of every figure in :func:`seed_figures`."""
    def nested(part: str) -> dict[str, dict[str, Any]]:
        first = per_seed[0][part]
        return {name: {k: mean_ci([s[part][name].get(k) for s in per_seed]) for k in first[name]} for name in first}

    return {"seeds": len(per_seed), "groups": nested("groups"), "ood": nested("ood"),
            **{k: mean_ci([s[k] for s in per_seed])
               for k in ("worst_group_gold", "spread_gold", "kl", "max_gold_drop", "proxy_gold_gap",
                         "worst_group_pass_rate", "mean_pass_rate")}}


def paired_differences(names: list[str], per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each run minus the first run (the baseline) on the same seed, averaged over seeds with a 95% CI.

    Seeds differ mostly in their SFT and reward model, which every method shares; pairing by seed
    removes that shared part, so these intervals are the ones that say whether a method beats the baseline.
    """
    def mean_gold(figures: dict[str, Any]) -> float:
        golds = [g["gold"] for g in figures["groups"].values()]
        return sum(golds) / len(golds)

    base = per_seed[names[0]]
    def difference(get: Callable[[dict[str, Any]], float | None], a: dict[str, Any], b: dict[str, Any]) -> float | None:
        first, second = get(a), get(b)
        return None if first is None or second is None else first - second

    figures = {"worst_group_gold": lambda f: f["worst_group_gold"], "mean_gold": mean_gold,
               "worst_group_pass_rate": lambda f: f.get("worst_group_pass_rate"),
               "mean_pass_rate": lambda f: f.get("mean_pass_rate"),
               **{f"ood_{split}_gold": (lambda f, s=split: f["ood"][s]["gold"]) for split in base[0]["ood"]},
               **{f"ood_{split}_pass@1": (lambda f, s=split: f["ood"][s].get("pass@1"))
                  for split in base[0]["ood"] if "pass@1" in base[0]["ood"][split]},
               **{f"{name}_pass_rate": (lambda f, g=name: f["groups"][g]["pass_rate"])
                  for name, group in base[0]["groups"].items() if group.get("pass_rate") is not None}}
    return {name: {key: mean_ci([difference(get, a, b) for a, b in zip(per_seed[name], base, strict=True)])
                   for key, get in figures.items()} for name in names[1:]}


def kl_frontiers(methods: dict[str, dict[str, Any]],
                 value: Callable[[Any], float | None] = lambda figure: figure["mean"],
                 ) -> dict[str, list[dict[str, float | str | None]]]:
    """Per method (a sweep's runs ``method@key=value`` share one), its runs as points ordered by KL: KL,
    worst-domain gold, mean gold and each OOD split's gold. ``methods`` maps runs to their figures: by default
    the aggregated ones (the seed means are read); with ``value=lambda x: x``, one seed's :func:`seed_figures`."""
    frontiers: dict[str, list[dict[str, Any]]] = {}
    for name, figures in methods.items():
        golds = [gold for g in figures["groups"].values() if (gold := value(g["gold"])) is not None]
        point = {"run": name, "kl": value(figures["kl"]), "worst_group_gold": value(figures["worst_group_gold"]),
                 "mean_gold": sum(golds) / len(golds) if golds else None,
                 **{f"ood_{split}_gold": value(s["gold"]) for split, s in figures["ood"].items()}}
        frontiers.setdefault(name.split("@")[0], []).append(point)
    return {method: sorted(points, key=lambda p: (p["kl"] is None, p["kl"] or 0.0))
            for method, points in frontiers.items()}


def interpolate(points: list[dict[str, Any]], key: str, kl: float) -> float | None:
    """``key`` of a frontier (points ordered by KL) at ``kl``, linear between its points; None outside its range
    (no extrapolation)."""
    known = [(p["kl"], p[key]) for p in points if p["kl"] is not None and p.get(key) is not None]
    for (kl_a, a), (kl_b, b) in zip(known, known[1:], strict=False):
        if kl_a <= kl <= kl_b:
            return a if kl_b == kl_a else a + (b - a) * (kl - kl_a) / (kl_b - kl_a)
    return known[0][1] if len(known) == 1 and known[0][0] == kl else None


def matched_kl_differences(frontiers: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, list[dict]]:
    """Each other method's points minus the baseline's frontier interpolated at the same KL: a method that
    looks better only because it ends at another KL shows no difference here."""
    base = frontiers[baseline]
    keys = [k for k in base[0] if k not in ("run", "kl")]
    out = {}
    for method, points in frontiers.items():
        if method == baseline:
            continue
        out[method] = []
        for point in points:
            diffs: dict[str, Any] = {"run": point["run"], "kl": point["kl"]}
            for key in keys:
                matched = None if point["kl"] is None else interpolate(base, key, point["kl"])
                diffs[key] = None if matched is None or point.get(key) is None else point[key] - matched
            out[method].append(diffs)
    return out


def matched_kl_paired(per_seed: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, dict[str, Any]]:
    """:func:`matched_kl_differences` within each seed (each run against the baseline's frontier of the same
    seed, so the seed's shared SFT and reward model cancel), then mean and 95% CI over seeds: per run, and per
    method (``all``: on each seed, the mean of the method's runs that lie inside the baseline's KL range).

    A seed where a run's KL lies outside the baseline's range on that seed contributes nothing to that run."""
    seeds = len(next(iter(per_seed.values())))
    by_seed = [matched_kl_differences(kl_frontiers({name: runs[i] for name, runs in per_seed.items()},
                                                   value=lambda x: x), baseline) for i in range(seeds)]
    out: dict[str, dict[str, Any]] = {}
    for method, points in by_seed[0].items():
        keys = [k for k in points[0] if k not in ("run", "kl")]
        runs = {point["run"]: {key: mean_ci([_point_named(seed[method], point["run"])[key] for seed in by_seed])
                               for key in ["kl", *keys]} for point in points}
        out[method] = {"runs": runs, "all": {key: mean_ci([_mean_inside(seed[method], key) for seed in by_seed])
                                             for key in keys}}
    return out


def _point_named(points: list[dict[str, Any]], run: str) -> dict[str, Any]:
    return next(point for point in points if point["run"] == run)


def _mean_inside(points: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the points that have it (inside the baseline's KL range)."""
    values = [p[key] for p in points if p[key] is not None]
    return sum(values) / len(values) if values else None


def win_rates(runs: list[str], rows: dict[str, list[list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """Pairwise win/tie/lose on the same held-out prompts, pooled over seeds; judged by the gold reward where
    the task has one, else by the judge reward model where evaluation had one, else by the run's reward model."""
    out = {}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            counts = [0, 0, 0]
            judge = "gold"
            for rows_a, rows_b in zip(rows[a], rows[b], strict=True):
                for ra, rb in zip(rows_a, rows_b, strict=True):
                    judge = next(k for k in ("gold", "judge", "reward") if ra.get(k) is not None)
                    diff = ra[judge] - rb[judge]
                    counts[0 if diff > 1e-9 else 1 if abs(diff) <= 1e-9 else 2] += 1
            total = sum(counts) or 1
            out[f"{a}_vs_{b}"] = {"win": counts[0] / total, "tie": counts[1] / total, "lose": counts[2] / total,
                                  "judge": judge}
    return out


def quick_budget(sft: dict, rm: dict, ppo: dict, dpo: dict) -> None:
    """The --quick budget: enough to see the shape of the result in a few minutes, not to settle it."""
    sft.setdefault("max_steps", 300)
    rm.update({k: v for k, v in {"max_steps": 300, "num_pairs": 6000}.items() if k not in rm})
    ppo.update({k: v for k, v in {"max_steps": 30, "eval_every": 10, "eval_prompts": 32}.items() if k not in ppo})
    dpo.update({k: v for k, v in {"max_steps": 80, "eval_every": 20, "eval_prompts": 32}.items() if k not in dpo})


def run_compare(out: str | Path, methods: list[str], seeds: int, overrides: dict[str, dict[str, Any]], *,
                sweep: tuple[str, list[Any]] | None = None, quick: bool = False, judge: str | None = None,
                first_seed: int = 0, archive: str | Path | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Train and evaluate every run on every seed (reusing finished ones); write summary and reports.

    With ``first_seed`` > 0 only seeds ``first_seed .. first_seed + seeds - 1`` are trained, and nothing is
    reported (None is returned): so that several processes or machines can share the seeds of one compare, and
    a last call without it reports on all of them, reusing every finished run. With ``archive``, what the report
    read is then copied there by :func:`archive_results`."""
    from gipo.dpo import DPOTrainer
    from gipo.ppo import PPOTrainer
    from gipo.reward import RewardTrainer
    from gipo.sft import SFTTrainer

    out = Path(out)
    sft_o, rm_o, ppo_o, dpo_o = (dict(overrides.get(k, {})) for k in ("sft", "rm", "ppo", "dpo"))
    if "group_objective" in dpo_o:  # the method decides it; a given value would silently turn dpo into gr_dpo
        own = ", ".join(f"{method}: {objective}" for method, objective in DPO_METHODS.items())
        raise ConfigError(f"compare: each DPO method sets its own group_objective ({own}); choose with --methods, "
                          "not dpo.group_objective.")
    ppo_o.setdefault("eval_every", 10)
    dpo_o.setdefault("eval_every", 50)
    if quick:
        quick_budget(sft_o, rm_o, ppo_o, dpo_o)
    # With ppo.policy given, RL starts from that model: no SFT stage, and the start model, evaluated as a run
    # named "start", is the baseline every method is paired with (before and after).
    start_policy = ppo_o.get("policy")
    runs = ([Run(START, START, {})] if start_policy else []) + plan_runs(methods, sweep)
    all_rows: dict[str, list] = {r.name: [] for r in runs}
    per_seed: dict[str, list] = {r.name: [] for r in runs}
    for seed in range(first_seed, first_seed + seeds):
        seed_dir = out / f"seed-{seed}"
        sft_dir, rm_dir = seed_dir / (START if start_policy else "sft"), seed_dir / "rm"
        sft_cfg = build_config(SFTConfig, {**sft_o, "seed": seed})
        rm_cfg = build_config(RewardConfig, {**rm_o, "seed": seed, "model": str(sft_dir / "final")})
        seed_ppo = build_config(PPOConfig, {**ppo_o, "seed": seed})
        eval_config = evaluation_settings(seed_ppo, sft_cfg.device, judge)
        # A seed whose runs are all evaluated reports from its files alone: a compare folder kept without its
        # weights (eval.json, eval_rows.jsonl, metrics.jsonl, config.yaml per run) reports without retraining.
        evaluated = [sft_dir, *(seed_dir / run.name for run in runs)]
        # Runs on a programmatic reward (reward=gold, python:...) never read the reward model: when none of a
        # seed's runs does, its pair sampling and reward-model training (a third of a seed's time) are skipped.
        uses_reward_model = (rm_dir / "final").exists() or any(
            run.method in DPO_METHODS or {**ppo_o, **run.overrides}.get("reward", PPOConfig.reward) == "model"
            for run in runs if not (seed_dir / run.name / "eval.json").exists())
        if not all((folder / "eval.json").exists() for folder in evaluated):
            if not start_policy:
                _train(SFTTrainer, sft_cfg, sft_dir, f"seed {seed}: sft", log)
            if uses_reward_model:
                _train(RewardTrainer, rm_cfg, rm_dir, f"seed {seed}: reward model", log)
        if not (sft_dir / "eval.json").exists():
            given = {"policy": start_policy} if start_policy else {}
            if start_policy:  # the start folder holds the config its evaluation reads, no weights
                sft_dir.mkdir(parents=True, exist_ok=True)
                save_config(seed_ppo, sft_dir / "config.yaml")
            earlier = next((d.parent for d in sorted(out.glob(f"seed-*/{START}/eval.json"))), None)
            if start_policy and not uses_reward_model and earlier is not None:
                # The start model and its evaluation (fixed prompts and sampling seed) are the same for every seed.
                for name in ("eval.json", "eval_rows.jsonl"):
                    shutil.copyfile(earlier / name, sft_dir / name)
            else:
                log(f"[seed {seed}: {sft_dir.name}] evaluating")
                evaluate_run(sft_dir, replace(eval_config, **given, reward_model=str(rm_dir / "final")
                                              if uses_reward_model else None))
        sft_rows = _read_rows(sft_dir / "eval_rows.jsonl")
        for run in runs:
            run_dir = seed_dir / run.name
            if (run_dir / "eval.json").exists() and run.method not in (*DPO_METHODS, START):
                _check_finished_run(run_dir, run.method)
            if not (run_dir / "eval.json").exists():
                if run.method in DPO_METHODS:
                    config = build_config(DPOConfig, {**dpo_o, "group_objective": DPO_METHODS[run.method], "seed": seed,
                                                      "model": str(sft_dir / "final"),
                                                      "dataset": str(rm_dir / "pairs.jsonl"),
                                                      "eval_dataset": rm_cfg.dataset})
                    _train(DPOTrainer, config, run_dir, f"seed {seed}: {run.name}", log)
                    evaluate_run(run_dir, replace(eval_config, reward_model=str(rm_dir / "final")))
                else:
                    config = build_config(PPOConfig, {**ppo_o, **run.overrides, "method": run.method, "seed": seed,
                                                      "policy": start_policy or str(sft_dir / "final"),
                                                      "reward_model": str(rm_dir / "final")})
                    twin = None if run_dir.exists() else identical_run(seed_dir, config)
                    if twin is not None:
                        run_dir.symlink_to(twin.name, target_is_directory=True)
                        log(f"[seed {seed}: {run.name}] trained already as {twin.name} (same config): reused")
                    else:
                        _train(PPOTrainer, config, run_dir, f"seed {seed}: {run.name}", log)
                        evaluate_run(run_dir, eval_config)
            per_seed[run.name].append(seed_figures(run_dir, sft_rows))
            all_rows[run.name].append(_read_rows(run_dir / "eval_rows.jsonl"))
    if first_seed:
        log(f"Trained seeds {first_seed} to {first_seed + seeds - 1} under {out}; report with --seeds "
            f"{first_seed + seeds} and no --first-seed.")
        return None
    names = [r.name for r in runs]
    summary = {"methods": {name: aggregate(per_seed[name]) for name in names},
               "win_rates": win_rates(names, all_rows),
               f"paired_vs_{names[0]}": paired_differences(names, per_seed)}
    if sweep:
        frontiers = kl_frontiers(summary["methods"])
        summary["kl_frontier"] = frontiers
        baseline = names[0].split("@")[0]
        summary[f"matched_kl_vs_{baseline}"] = matched_kl_differences(frontiers, baseline)
        summary[f"matched_kl_paired_vs_{baseline}"] = matched_kl_paired(per_seed, baseline)
    # A sweep shares the seeds' SFT and reward model with the plain compare but reports on its own.
    report_dir = out / f"sweep-{sweep[0]}" if sweep else out
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from gipo.report import write_compare_report

    write_compare_report(out, summary, names, seeds, report_dir)
    log(f"Wrote {report_dir / 'summary.json'}, {report_dir / 'report.md'}, {report_dir / 'report.html'}")
    if archive:
        archive_results(out, archive)
        log(f"Archived the runs' reported files under {archive}")
    return summary


ARCHIVED = ("config.yaml", "environment.json", "eval.json", "eval_rows.jsonl", "metrics.jsonl")
"""What a compare reports from, per run: kept by :func:`archive_results`, the two ``.jsonl`` compressed."""

REPORTED_METRICS = ("eval/", "groups/nmi", "domain/share/", "domain/gold/", "groups/sample_share/",
                    "groups/sampling_weight/", "groups/pass_rate/", "gdro/", "rollouts/", "groups/surrogate_loss/",
                    "groups/ratio_drift/", "groups/loss_kl/")
"""The metric keys a report reads (held-out curves, the groups' NMI) and those that show where the group methods
moved the batches and what drove them (each domain's and each group's share, each domain's gold reward on the
training samples beside its held-out one, the groups' sampling weights and pass rates, Prompt-GDRO's bin weights
and scores, Rollout-GDRO's samples per prompt, and what a bin score observes): all an archive keeps of
metrics.jsonl."""


def reported_metrics(text: str) -> str:
    """The lines of a metrics.jsonl, each cut to its step and the keys a report reads; lines with none dropped."""
    kept = []
    for line in text.splitlines():
        row = json.loads(line)
        reported = {k: v for k, v in row.items() if k.startswith(REPORTED_METRICS)}
        if reported:
            kept.append(json.dumps({"step": row["step"], **reported}))
    return "".join(f"{line}\n" for line in kept)


def archive_results(out: str | Path, dest: str | Path) -> list[Path]:
    """Copy what the compare under ``out`` reports from (no weights, checkpoints or pairs) to ``dest``.

    Small enough to keep beside a report in git (a run's metrics cut to what the report reads, the row files
    compressed): ``gipo compare --out DEST`` with the same methods and seeds then reports without retraining, and
    a compare with more methods or seeds continues from a copy of it (retraining a seed's SFT model and reward
    model only where a new run needs them). Returns the files written."""
    out, dest = Path(out), Path(dest)
    written = []
    for eval_file in sorted(out.glob("seed-*/*/eval.json")):
        run_dir = eval_file.parent
        target = dest / run_dir.relative_to(out)
        target.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED:
            text = read_text_or_gzip(run_dir / name)
            if text is None:
                continue
            if name == "metrics.jsonl":
                text = reported_metrics(text)
            packed = name.endswith(".jsonl")
            copy = target / (f"{name}.gz" if packed else name)
            copy.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0) if packed else text.encode("utf-8"))
            written.append(copy)
    return written


def _check_finished_run(run_dir: Path, method: str) -> None:
    """A finished run is reused only if it was trained as ``method`` (one trained under a name whose mechanism has
    moved to another name would otherwise be reported under the new mechanism's name)."""
    saved = upgrade_saved_config(read_yaml(run_dir / "config.yaml")).get("method")
    if saved != method:
        raise ConfigError(f"compare: {run_dir} holds a finished run of method {saved!r}, not {method!r} (a method "
                          "renamed since?). Remove it, or compare into another --out.")


def identical_run(seed_dir: Path, config: PPOConfig) -> Path | None:
    """An evaluated run of this seed whose saved config equals ``config`` in every key that changes results (a
    sweep value equal to the plain compare's, say): training ``config`` again would only repeat it."""
    for candidate in sorted(seed_dir.iterdir()):
        if candidate.is_symlink() or not (candidate / "eval.json").exists() or not (candidate / "config.yaml").exists():
            continue
        if not differing_keys(read_yaml(candidate / "config.yaml"), config, missing_differ=True):
            return candidate
    return None


def _train(trainer_cls, config, run_dir: Path, label: str, log: Callable[[str], None]) -> None:
    if (run_dir / "final").exists():
        return
    resume = (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("step-*"))
    log(f"[{label}] {'resuming' if resume else 'training'} -> {run_dir}")
    trainer_cls(config, output_dir=run_dir, overwrite=not resume).train(resume=resume)
