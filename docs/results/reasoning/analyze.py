# What moved in the SmolLM2 reasoning-gym compare, per task, before (the start model) and after GRPO:
# - pass@1 on the held-out prompts whose answer is one of the question's numbers ("echo-able": the last-number
#   extraction rewards a reply that repeats it) and on the others, so a gain that comes only from echoing shows;
# - the share of replies cut at max_new_tokens and the mean reply length (a task whose replies are cut off
#   cannot be scored however right the reasoning);
# - with the runs' full metrics.jsonl (a live compare folder, not the archive), where an iteration's time goes.
# Run from the repository root:
#   python docs/results/reasoning/analyze.py runs/reasoning docs/results/reasoning/analysis.json
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from gipo.config import read_yaml
from gipo.evaluation import evaluation_prompts
from gipo.tasks import EXACT
from gipo.tracking import read_metrics, read_text_or_gzip

NUMBER = re.compile(r"-?\d+")


def rows_of(run_dir: Path) -> list[dict]:
    text = read_text_or_gzip(run_dir / "eval_rows.jsonl")
    return [r for r in map(json.loads, text.splitlines()) if r.get("sample") != "greedy"]


def per_task(rows: list[dict], records: list[dict], max_new_tokens: int) -> dict[str, dict]:
    by_task: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        record = records[row["prompt_index"]]
        echo = record["answer"] in NUMBER.findall(record["question"])
        exact = float(row["gold"] >= EXACT)
        figures = by_task[row["group"]]
        figures["echo" if echo else "other"].append(exact)
        figures["cut"].append(float(row["length"] >= max_new_tokens))
        figures["length"].append(row["length"])
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {task: {"pass@1_echoable": mean(f["echo"]), "pass@1_other": mean(f["other"]),
                   "echoable_share": len(f["echo"]) / (len(f["echo"]) + len(f["other"])),
                   "cut_share": mean(f["cut"]), "mean_length": mean(f["length"])} for task, f in by_task.items()}


def timing(run_dir: Path) -> dict | None:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [m for m in metrics if "time/rollout" in m]
    if not steps:
        return None
    keys = sorted({k for m in steps for k in m if k.startswith("time/")})
    return {k: sum(m.get(k, 0.0) for m in steps) / len(steps) for k in keys} | {"iterations": len(steps)}


def main(out: Path, dest: Path) -> None:
    config = read_yaml(out / "seed-0" / "start" / "config.yaml")
    records, _, _ = evaluation_prompts(config["dataset"], config["eval_prompts"])
    result = {"dataset": config["dataset"], "runs": {}}
    for run_dir in sorted(out.glob("seed-*/*/")):
        if (run_dir / "eval.json").exists():
            name = f"{run_dir.parent.name}/{run_dir.name}"
            result["runs"][name] = {"tasks": per_task(rows_of(run_dir), records, config["max_new_tokens"]),
                                    "time_per_iteration_s": timing(run_dir)}
    dest.write_text(json.dumps(result, indent=2))
    for name, run in result["runs"].items():
        print(name, json.dumps({t: {k: round(v, 3) for k, v in f.items() if v is not None}
                                for t, f in run["tasks"].items()}))
        if run["time_per_iteration_s"]:
            print("   time per iteration:", {k: round(v, 2) for k, v in run["time_per_iteration_s"].items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
