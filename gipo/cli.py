"""The ``gipo`` command: a thin layer that loads YAML into the typed configs and calls the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import sys
from pathlib import Path

from gipo.config import (
    DPO_METHODS,
    METHOD_PRESETS,
    ConfigError,
    DPOConfig,
    EvalConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    build_config,
    describe,
    load_config,
    parse_overrides,
    read_yaml,
)
from gipo.distributed import is_main_process, shutdown
from gipo.errors import USER_ERRORS

STAGES = {"sft": SFTConfig, "rm": RewardConfig, "train": PPOConfig, "dpo": DPOConfig}


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_run_flags(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key (repeatable), e.g. --set max_steps=10.")
    parser.add_argument("--out", default=default_out, help=f"Run directory (default: {default_out}).")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="Continue from the newest complete checkpoint in --out.")
    mode.add_argument("--overwrite", action="store_true", help="Replace an existing run in --out.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gipo", description="Group Invariant Policy Optimization: RLHF with "
                                     "SFT, a reward model and PPO, plus group-invariant learning.")
    commands = parser.add_subparsers(dest="command", required=True)
    about = {"sft": "Supervised fine-tuning on demonstrations.",
             "rm": "Train a Bradley-Terry reward model on preference pairs.",
             "train": "RL: PPO with a critic, or a critic-free estimator (--set method=grpo, rloo, ...), scored by a "
                      "reward model, the task's gold reward (--set reward=gold) or reward functions; the group "
                      "methods on either (--set method=gipo, grpo_gipo, ...).",
             "dpo": "DPO on preference pairs (a baseline for the RL methods)."}
    for name, cls in STAGES.items():
        sub = commands.add_parser(name, help=about[name], description=f"{about[name]}\n\nConfig keys:\n{describe(cls)}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("config", nargs="?", help="YAML config file (optional; defaults work on the built-in suite).")
        _add_run_flags(sub, f"runs/{name}")
    evaluate = commands.add_parser(
        "eval", help="Evaluate a run's final policy per group and out of distribution; writes RUN_DIR/eval.json.",
        description=f"Keys for --set:\n{describe(EvalConfig)}", formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo = commands.add_parser(
        "demo", help="SFT, reward model and PPO end to end on the embedded default (no download).",
        description="Runs the whole pipeline into OUT/sft, OUT/rm, OUT/ppo and prints per-domain results. "
        "--set KEY=VALUE goes to every stage that has KEY; prefix it (sft.KEY, rm.KEY, ppo.KEY) for one stage.")
    _add_run_flags(demo, "runs/demo")
    compare = commands.add_parser(
        "compare", help="Train methods side by side over seeds; write summary.json, report.md, report.html.",
        description="Every method on every seed with the same budget (SFT and the reward model trained once per "
        "seed and shared). Finished runs are reused and unfinished ones resumed, so a killed compare continues. "
        "CONFIG (optional) is YAML with sections sft, rm, ppo, dpo; --set KEY=VALUE goes to every stage with KEY, "
        "or to one with a prefix (ppo.KEY).")
    compare.add_argument("config", nargs="?", help="YAML with optional sections sft, rm, ppo, dpo, or a `gipo "
                         "train` config (the ppo section; with its `policy` set, RL starts from that model).")
    compare.add_argument("--methods", default="ppo,gipo", help="Comma-separated: "
                         + ", ".join([m for m in METHOD_PRESETS if m != "custom"] + list(DPO_METHODS))
                         + " (default: ppo,gipo).")
    compare.add_argument("--seeds", type=int, default=None, help="Seeds per method (default 3; 2 with --quick).")
    compare.add_argument("--first-seed", type=int, default=0, help="Train only seeds FIRST .. FIRST+SEEDS-1 and "
                         "write no report (share a compare's seeds between processes; then report with a call "
                         "without it).")
    compare.add_argument("--sweep", metavar="KEY=V1,V2,...", help="Run each PPO-family method once per value.")
    compare.add_argument("--quick", action="store_true", help="A small budget that finishes in minutes.")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--out", default="runs/compare", help="Output folder (default: runs/compare).")
    compare.add_argument("--archive", metavar="DIR", help="After the report, copy what it read (each run's "
                         "config, evaluation and held-out curves; no weights) to DIR, small enough for git: a later "
                         "compare with --out a copy of DIR reports again or adds seeds without retraining these.")
    compare.add_argument("--judge", default=None, help="A reward model that judges win rates where the task has "
                         "no gold reward (default: each run's own reward model).")
    return parser


def _stage_overrides(overrides: list[str], fields: dict[str, type] | None = None) -> dict[str, list[str]]:
    """Route overrides: ``ppo.kl_coef=0.1`` to one stage, ``max_steps=5`` to every stage with the key."""
    fields = fields or {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig}
    routed: dict[str, list[str]] = {name: [] for name in fields}
    for pair in overrides:
        key = pair.split("=", 1)[0]
        stage, _, bare = key.partition(".")
        if bare and stage in routed:
            routed[stage].append(pair[len(stage) + 1:])
            continue
        targets = [s for s, cls in fields.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if not targets:
            raise ConfigError(f"--set {key}: no stage has this key ({', '.join(fields)}; see `gipo sft --help`, "
                              "`gipo rm --help`, `gipo train --help`, `gipo dpo --help`).")
        for stage_name in targets:
            routed[stage_name].append(pair)
    return routed


def run(args: argparse.Namespace) -> int:
    if args.command in STAGES:
        from gipo.dpo import DPOTrainer
        from gipo.ppo import PPOTrainer
        from gipo.reward import RewardTrainer
        from gipo.sft import SFTTrainer

        config = load_config(STAGES[args.command], args.config, args.overrides)
        trainer_cls = {"sft": SFTTrainer, "rm": RewardTrainer, "train": PPOTrainer, "dpo": DPOTrainer}[args.command]
        trainer_cls(config, output_dir=args.out, overwrite=args.overwrite).train(resume=args.resume)
        if is_main_process():
            print(f"Done: {Path(args.out) / 'final'}")
    elif args.command == "eval":
        from gipo.evaluation import evaluate_run

        report = evaluate_run(args.run_dir, load_config(EvalConfig, None, args.overrides))
        print(json.dumps(report, indent=2))
    elif args.command == "demo":
        from gipo.pipeline import run_pipeline

        routed = _stage_overrides(args.overrides)
        configs = {name: load_config(cls, None, routed[name])
                   for name, cls in (("sft", SFTConfig), ("rm", RewardConfig), ("ppo", PPOConfig))}
        run_pipeline(args.out, configs["sft"], configs["rm"], configs["ppo"], overwrite=args.overwrite,
                     resume=args.resume)
    elif args.command == "compare":
        run_compare_command(args)
    return 0


def run_compare_command(args: argparse.Namespace) -> None:
    from gipo.compare import run_compare

    stages = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig}
    sections = read_yaml(args.config) if args.config else {}
    if sections and not set(sections) & set(stages):  # a training config (`gipo train`'s) is the PPO stage's
        sections = {"ppo": sections}
    unknown = set(sections) - set(stages)
    if unknown:
        raise ConfigError(f"{args.config}: unknown sections {', '.join(sorted(unknown))}; allowed: sft, rm, ppo, dpo.")
    routed = _stage_overrides(args.overrides, stages)
    overrides = {name: {**(sections.get(name) or {}), **parse_overrides(routed[name])} for name in stages}
    for name, cls in stages.items():  # validate now, not after an hour of training
        build_config(cls, {k: v for k, v in overrides[name].items() if k != "method"}, source=f"compare {name}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    allowed = [m for m in METHOD_PRESETS if m != "custom"] + list(DPO_METHODS)
    bad = [m for m in methods if m not in allowed]
    if bad or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(allowed)}.")
    sweep = None
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        if key not in {f.name for f in dataclasses.fields(PPOConfig)} or not values:
            raise ConfigError(f"--sweep {args.sweep}: expected KEY=V1,V2 with a PPO config key.")
        sweep = (key, [parse_overrides([f"{key}={v}"])[key] for v in values.split(",")])
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1.")
    if args.first_seed < 0:
        raise ConfigError("--first-seed must be 0 or more.")
    run_compare(args.out, methods, seeds, overrides, sweep=sweep, quick=args.quick, judge=args.judge,
                first_seed=args.first_seed, archive=args.archive)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    if not faulthandler.is_enabled():  # a crash in native code (a rank's abort) then shows where Python was
        faulthandler.enable()
    try:
        code = run(args)
        shutdown()
        return code
    except USER_ERRORS as err:
        print(f"gipo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gipo {args.command}: interrupted; resume with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
