"""gipo compare: statistics on known inputs, reports from fake run directories, and a killed compare resuming."""

from __future__ import annotations

import json
import math

import pytest

from gipo.cli import main
from gipo.compare import (
    REPORTED_METRICS,
    archive_results,
    interpolate,
    matched_kl_differences,
    matched_kl_paired,
    max_gold_drop,
    mean_ci,
    paired_differences,
    pass_rates,
    plan_runs,
    proxy_gold_gap,
    run_compare,
    win_rates,
)
from gipo.config import ConfigError, read_yaml
from gipo.ppo import PPOTrainer
from gipo.report import write_compare_report
from gipo.tracking import read_metrics


def test_mean_ci_known_values():
    # mean 2, sample sd 1, n = 3: half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.4844
    figure = mean_ci([1.0, 2.0, 3.0])
    assert figure["mean"] == pytest.approx(2.0)
    assert figure["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean_ci([5.0]) == {"mean": 5.0, "ci95": None}
    assert mean_ci([None, None]) == {"mean": None, "ci95": None}
    # n = 40 (dof 39 > 30): the normal quantile; sd of 0,1 alternating = sqrt(40/39 * 0.25)
    forty = mean_ci([0.0, 1.0] * 20)
    assert forty["ci95"] == pytest.approx(1.96 * math.sqrt(0.25 * 40 / 39) / math.sqrt(40))


def test_max_gold_drop_and_proxy_gap():
    rows = [{"step": 1, "eval/gold/a": 0.5, "eval/gold/b": 0.3},  # mean 0.4
            {"step": 2, "eval/gold/a": 0.9, "eval/gold/b": 0.7, "eval/gold/ood_long": 0.0},  # 0.8 (ood ignored)
            {"step": 3},
            {"step": 4, "eval/gold/a": 0.5, "eval/gold/b": 0.5}]  # 0.5: drop 0.3 below the best
    assert max_gold_drop(rows) == pytest.approx(0.3)
    assert max_gold_drop([{"step": 1}]) is None
    sft = [{"reward": 0.0, "gold": 0.0}, {"reward": 2.0, "gold": 1.0}]  # sd: reward sqrt(2), gold sqrt(.5)
    run = [{"reward": 2.0, "gold": 0.5}, {"reward": 4.0, "gold": 0.5}]  # gains: reward 2, gold 0
    assert proxy_gold_gap(run, sft) == pytest.approx(2 / math.sqrt(2) - 0.0)


def test_win_rates_count_ties_and_pool_seeds():
    gold = lambda *values: [{"gold": v, "reward": 0.0} for v in values]  # noqa: E731
    rows = {"a": [gold(1, 0, 0.5), gold(1)], "b": [gold(0, 0, 1), gold(0)]}
    # pooled prompts: a>b, tie, a<b, a>b -> win 2/4, tie 1/4, lose 1/4
    assert win_rates(["a", "b"], rows) == {"a_vs_b": {"win": 0.5, "tie": 0.25, "lose": 0.25, "judge": "gold"}}


def test_plan_runs_with_a_sweep_keeps_dpo_once():
    runs = plan_runs(["gipo", "dpo"], ("beta_policy", [0, 0.3]))
    assert [r.name for r in runs] == ["gipo@beta_policy=0", "gipo@beta_policy=0.3", "dpo"]
    assert runs[1].overrides == {"beta_policy": 0.3}


def test_plan_runs_treats_gr_dpo_like_dpo():
    runs = plan_runs(["gipo", "gr_dpo", "dpo"], ("beta_policy", [0, 0.3]))
    assert [r.name for r in runs] == ["gipo@beta_policy=0", "gipo@beta_policy=0.3", "gr_dpo", "dpo"]
    assert [(r.method, r.overrides) for r in runs[2:]] == [("gr_dpo", {}), ("dpo", {})]
    assert [(r.name, r.method) for r in plan_runs(["gr_dpo", "ppo"], None)] == [("gr_dpo", "gr_dpo"), ("ppo", "ppo")]


def test_report_from_fake_run_directories(tmp_path):
    for seed in range(2):
        for name, gold in (("ppo", 0.5), ("gipo", 0.6)):
            run_dir = tmp_path / f"seed-{seed}" / name
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(f"groups: {'inferred' if name == 'gipo' else 'none'}\n")
            rows = [{"step": s, "eval/gold/copy": gold + 0.01 * s, "eval/gold/add": gold - 0.2, "groups/nmi": 0.5}
                    for s in (10, 20)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            groups = {g: {"n": 4, "reward": 1.0, "gold": gold + d, "kl": 2.0, "length": 3.0}
                      for g, d in (("copy", 0.1), ("add", -0.2))}
            (run_dir / "eval.json").write_text(json.dumps({"groups": groups, "worst_group": {},
                                                           "ood": {"long": {**groups["copy"], "n": 8}}}))
    figure = {"mean": 0.5, "ci95": 0.1}
    summary = {"methods": {name: {"seeds": 2, "groups": {g: {"gold": figure, "reward": figure} for g in ("copy", "add")},
                                  "ood": {"long": {"gold": figure, "reward": figure}}, "worst_group_gold": figure,
                                  "spread_gold": figure, "kl": figure, "max_gold_drop": figure,
                                  "proxy_gold_gap": {"mean": None, "ci95": None}} for name in ("ppo", "gipo")},
               "win_rates": {"ppo_vs_gipo": {"win": 0.25, "tie": 0.5, "lose": 0.25, "judge": "gold"}}}
    write_compare_report(tmp_path, summary, ["ppo", "gipo"], 2)
    markdown = (tmp_path / "report.md").read_text()
    assert "| ppo | 0.500 ± 0.100 |" in markdown and "ppo vs gipo" in markdown
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    for plot in ("curves", "frontier", "bars", "nmi"):
        assert (tmp_path / f"{plot}.png").stat().st_size > 1000


TINY = {"sft": {"max_steps": 2, "batch_size": 8, "progress": False, "device": "cpu"},
        "rm": {"max_steps": 2, "batch_size": 8, "num_pairs": 40, "progress": False, "device": "cpu"},
        "ppo": {"max_steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6,
                "eval_prompts": 3, "eval_every": 1, "checkpoint_every": 1, "progress": False, "device": "cpu"},
        "dpo": {"max_steps": 2, "batch_size": 8, "eval_prompts": 3, "progress": False, "device": "cpu"}}


def test_killed_compare_resumes_and_reuses_finished_runs(tmp_path, monkeypatch):
    original = PPOTrainer.training_step
    calls = {"n": 0}

    def dies_in_second_run(self):
        calls["n"] += 1
        if self.config.method == "gipo" and self.step == 2:
            raise KeyboardInterrupt  # the compare is killed mid-way through its second run
        return original(self)

    monkeypatch.setattr(PPOTrainer, "training_step", dies_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        run_compare(tmp_path, ["ppo", "gipo"], 1, TINY, log=lambda _: None)
    finished = tmp_path / "seed-0" / "ppo" / "final" / "model.safetensors"
    stamp = finished.stat().st_mtime_ns
    assert (tmp_path / "seed-0" / "gipo" / "checkpoints" / "step-1").exists()
    monkeypatch.setattr(PPOTrainer, "training_step", original)
    messages = []
    summary = run_compare(tmp_path, ["ppo", "gipo"], 1, TINY, log=messages.append)
    assert finished.stat().st_mtime_ns == stamp  # the finished run was reused, not retrained
    assert any("resuming" in m and "gipo" in m for m in messages)
    assert not any("seed 0: sft" in m or "seed 0: ppo" in m for m in messages)
    rows = [json.loads(line) for line in (tmp_path / "seed-0" / "gipo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert set(summary["methods"]) == {"ppo", "gipo"} and "ppo_vs_gipo" in summary["win_rates"]
    for key in ("worst_group_gold", "spread_gold", "kl", "max_gold_drop", "proxy_gold_gap"):
        assert set(summary["methods"]["gipo"][key]) == {"mean", "ci95"}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_paired_differences_subtract_the_baseline_seed_by_seed():
    def figures(worst, golds, ood):
        return {"worst_group_gold": worst, "groups": {f"g{i}": {"gold": g} for i, g in enumerate(golds)},
                "ood": {"long": {"gold": ood}}}

    per_seed = {"ppo": [figures(0.2, [0.2, 0.6], 0.3), figures(0.5, [0.5, 0.9], 0.4)],
                "gipo": [figures(0.3, [0.3, 0.6], 0.3), figures(0.6, [0.6, 1.0], 0.2)]}
    diff = paired_differences(["ppo", "gipo"], per_seed)["gipo"]
    # worst: +0.1 both seeds -> mean 0.1, sd 0 -> ci 0; mean gold: +0.05, +0.1 -> 0.075
    assert diff["worst_group_gold"]["mean"] == pytest.approx(0.1)
    assert diff["worst_group_gold"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert diff["mean_gold"]["mean"] == pytest.approx(0.075)
    # ood: 0, -0.2 -> mean -0.1, sd sqrt(0.02) -> ci 12.706 * 0.1414 / 1.414 = 1.2706
    assert diff["ood_long_gold"]["mean"] == pytest.approx(-0.1)
    assert diff["ood_long_gold"]["ci95"] == pytest.approx(1.2706, rel=1e-3)


def test_win_rates_without_gold_take_the_judge_over_the_runs_own_reward_model():
    # reward says a wins both; the judge says b wins one, ties the other; without a judge, reward decides.
    rows = {"a": [[{"gold": None, "judge": 0.0, "reward": 5.0}, {"gold": None, "judge": 1.0, "reward": 5.0}]],
            "b": [[{"gold": None, "judge": 0.5, "reward": 1.0}, {"gold": None, "judge": 1.0, "reward": 1.0}]]}
    assert win_rates(["a", "b"], rows)["a_vs_b"] == {"win": 0.0, "tie": 0.5, "lose": 0.5, "judge": "judge"}
    unjudged = {name: [[{**r, "judge": None} for r in seed] for seed in runs] for name, runs in rows.items()}
    assert win_rates(["a", "b"], unjudged)["a_vs_b"] == {"win": 1.0, "tie": 0.0, "lose": 0.0, "judge": "reward"}


def test_compare_trains_gr_dpo_like_dpo_on_the_reward_models_pairs(tmp_path, capsys):
    with pytest.raises(ConfigError, match="each DPO method sets its own group_objective"):
        run_compare(tmp_path, ["gr_dpo"], 1, {**TINY, "dpo": {**TINY["dpo"], "group_objective": "dro"}})
    assert main(["compare", "--methods", "ppo,nope", "--out", str(tmp_path / "x")]) == 2
    assert "dpo, gr_dpo" in capsys.readouterr().err  # among the allowed methods
    summary = run_compare(tmp_path, ["dpo", "gr_dpo"], 1, TINY, log=lambda _: None)
    assert set(summary["methods"]) == {"dpo", "gr_dpo"}
    objectives = {name: read_yaml(tmp_path / "seed-0" / name / "config.yaml") for name in ("dpo", "gr_dpo")}
    assert objectives["dpo"]["group_objective"] == "none" and objectives["gr_dpo"]["group_objective"] == "dro"
    assert objectives["dpo"]["dataset"] == objectives["gr_dpo"]["dataset"] == str(tmp_path / "seed-0" / "rm" /
                                                                                 "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "seed-0" / "gr_dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("groups/alpha/") for key in rows[-1])


def test_pass_rate_is_the_share_of_exact_answers_per_group():
    rows = [{"group": "add", "gold": 1.0}, {"group": "add", "gold": 0.99}, {"group": "add", "gold": 1.0},
            {"group": "copy", "gold": 0.5}, {"group": "chat", "gold": None}]
    # add: 2 of 3 exact; copy: 0 of 1; a group without gold has no pass rate.
    assert pass_rates(rows) == {"add": pytest.approx(2 / 3), "copy": 0.0}


def test_matched_kl_interpolates_the_baseline_frontier_and_never_extrapolates():
    frontiers = {"ppo": [{"run": "ppo@kl_coef=0.1", "kl": 1.0, "mean_gold": 0.50},
                         {"run": "ppo@kl_coef=0.02", "kl": 3.0, "mean_gold": 0.70}],
                 "gipo": [{"run": "gipo@kl_coef=0.1", "kl": 2.5, "mean_gold": 0.60},
                          {"run": "gipo@kl_coef=0.02", "kl": 4.0, "mean_gold": 0.80}]}
    # ppo at KL 2.5: 0.5 + (0.7 - 0.5) * (2.5 - 1) / (3 - 1) = 0.65, so gipo's 0.60 is -0.05 at matched KL,
    # although gipo's own best (0.80) beats ppo's best (0.70): it got there with more KL.
    assert interpolate(frontiers["ppo"], "mean_gold", 2.5) == pytest.approx(0.65)
    (at_25, at_4) = matched_kl_differences(frontiers, "ppo")["gipo"]
    assert at_25 == {"run": "gipo@kl_coef=0.1", "kl": 2.5, "mean_gold": pytest.approx(-0.05)}
    assert at_4["mean_gold"] is None  # KL 4 is beyond ppo's frontier (1 to 3)


def test_matched_kl_paired_by_seed_compares_each_seed_with_its_own_baseline_frontier():
    def figures(kl: float, gold: float) -> dict:
        return {"groups": {"add": {"gold": gold}}, "kl": kl, "worst_group_gold": gold, "ood": {}}

    per_seed = {"ppo@kl_coef=0.1": [figures(1.0, 0.5), figures(1.0, 0.4)],
                "ppo@kl_coef=0.02": [figures(3.0, 0.7), figures(3.0, 0.8)],
                "gipo@kl_coef=0.1": [figures(2.0, 0.55), figures(2.0, 0.7)],
                "gipo@kl_coef=0.02": [figures(4.0, 0.9), figures(2.5, 0.6)]}
    paired = matched_kl_paired(per_seed, "ppo")["gipo"]
    # Seed 0: ppo at KL 2 is 0.6, so gipo@0.1 is -0.05; gipo@0.02 (KL 4) is beyond ppo's range (1 to 3).
    # Seed 1: ppo at KL 2 is 0.6 -> +0.10; at KL 2.5 it is 0.4 + 0.4 * 0.75 = 0.7 -> gipo@0.02 is -0.10.
    one = paired["runs"]["gipo@kl_coef=0.1"]
    assert one["mean_gold"]["mean"] == pytest.approx(0.025)
    assert one["mean_gold"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.0225 / 2) / math.sqrt(2))
    assert one["kl"] == {"mean": 2.0, "ci95": 0.0}
    assert paired["runs"]["gipo@kl_coef=0.02"]["worst_group_gold"] == {"mean": pytest.approx(-0.10), "ci95": None}
    # all runs: seed 0 has only -0.05 inside the range, seed 1 the mean of +0.10 and -0.10 = 0.
    assert paired["all"]["mean_gold"]["mean"] == pytest.approx(-0.025)
    assert paired["all"]["mean_gold"]["ci95"] == pytest.approx(12.706 * math.sqrt(0.00125) / math.sqrt(2))


def test_a_kl_sweep_reports_the_frontier_and_the_matched_kl_table(tmp_path):
    summary = run_compare(tmp_path, ["ppo", "gipo"], 1, TINY, sweep=("kl_coef", [0.02, 0.2]), log=lambda _: None)
    assert [p["run"] for p in sorted(summary["kl_frontier"]["ppo"], key=lambda p: p["run"])] == [
        "ppo@kl_coef=0.02", "ppo@kl_coef=0.2"]
    assert [p["run"] for p in summary["matched_kl_vs_ppo"]["gipo"]]
    assert set(summary["matched_kl_paired_vs_ppo"]["gipo"]["runs"]) == {"gipo@kl_coef=0.02", "gipo@kl_coef=0.2"}
    report = (tmp_path / "sweep-kl_coef" / "report.md").read_text()
    assert "At matched KL" in report and "At matched KL, paired by seed" in report and "kl_frontier.png" in report
    assert (tmp_path / "sweep-kl_coef" / "kl_frontier.png").stat().st_size > 1000


def test_a_sweep_value_equal_to_the_compares_config_reuses_its_run(tmp_path):
    run_compare(tmp_path, ["ppo"], 1, TINY, log=lambda _: None)
    messages = []
    run_compare(tmp_path, ["ppo"], 1, TINY, sweep=("kl_coef", [0.05, 0.2]), log=messages.append)
    seed_dir = tmp_path / "seed-0"
    assert (seed_dir / "ppo@kl_coef=0.05").resolve() == (seed_dir / "ppo").resolve()  # the default kl_coef
    assert not (seed_dir / "ppo@kl_coef=0.2").is_symlink() and (seed_dir / "ppo@kl_coef=0.2" / "eval.json").exists()
    trained = [m for m in messages if "training" in m]
    assert len(trained) == 1 and "kl_coef=0.2" in trained[0], messages
    assert len(list(archive_results(tmp_path, tmp_path / "kept"))) > 0
    assert (tmp_path / "kept" / "seed-0" / "ppo@kl_coef=0.05" / "eval.json").is_file()


def test_seeds_shared_between_processes_then_reported_together(tmp_path):
    assert run_compare(tmp_path, ["ppo"], 1, TINY, first_seed=1, log=lambda _: None) is None
    assert (tmp_path / "seed-1" / "ppo" / "eval.json").exists() and not (tmp_path / "seed-0").exists()
    assert not (tmp_path / "summary.json").exists()
    stamp = (tmp_path / "seed-1" / "ppo" / "eval.json").stat().st_mtime_ns
    summary = run_compare(tmp_path, ["ppo"], 2, TINY, log=lambda _: None)
    assert summary["methods"]["ppo"]["seeds"] == 2
    assert (tmp_path / "seed-1" / "ppo" / "eval.json").stat().st_mtime_ns == stamp  # reused, not retrained


def test_an_archived_compare_reports_without_retraining(tmp_path):
    summary = run_compare(tmp_path / "run", ["ppo", "dpo"], 1, TINY, log=lambda _: None)
    written = archive_results(tmp_path / "run", tmp_path / "kept")
    assert {p.name for p in written} >= {"eval.json", "eval_rows.jsonl.gz", "metrics.jsonl.gz", "config.yaml"}
    assert not list((tmp_path / "kept").rglob("*.safetensors")) and not list((tmp_path / "kept").rglob("pairs*"))
    kept_metrics = read_metrics(tmp_path / "kept" / "seed-0" / "ppo" / "metrics.jsonl")
    full_metrics = read_metrics(tmp_path / "run" / "seed-0" / "ppo" / "metrics.jsonl")
    assert kept_metrics and all(k == "step" or k.startswith(REPORTED_METRICS) for r in kept_metrics for k in r)
    assert [r["step"] for r in kept_metrics] == [r["step"] for r in full_metrics
                                                 if any(k.startswith(REPORTED_METRICS) for k in r)]
    assert any("objective/scores" in r for r in full_metrics)  # cut from the kept copy by the check above
    messages = []
    again = run_compare(tmp_path / "kept", ["ppo", "dpo"], 1, TINY, log=messages.append)
    assert not any("training" in m or "resuming" in m for m in messages), messages
    assert again["methods"] == summary["methods"] and again["win_rates"] == summary["win_rates"]
    # A method not yet run on that seed brings back its SFT model and reward model (retrained the same way).
    run_compare(tmp_path / "kept", ["ppo", "gipo"], 1, TINY, log=messages.append)
    assert any("seed 0: sft" in m for m in messages) and (tmp_path / "kept" / "seed-0" / "gipo" / "eval.json").exists()


def test_a_compare_on_the_gold_reward_trains_no_reward_model(tmp_path):
    gold = {**TINY, "ppo": {**TINY["ppo"], "reward": "gold"}}
    messages = []
    summary = run_compare(tmp_path, ["grpo", "ppo"], 1, gold, log=messages.append)
    assert not (tmp_path / "seed-0" / "rm").exists()
    assert not any("reward model" in m for m in messages), messages
    assert summary["methods"]["grpo"]["groups"]["add"]["gold"]["mean"] is not None
    assert summary["methods"]["ppo"]["groups"]["add"]["reward"]["mean"] is None  # no proxy to score with
