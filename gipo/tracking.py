"""Metrics: one JSON object per step in ``metrics.jsonl`` and the same scalars in TensorBoard."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path
from typing import Any


def read_text_or_gzip(path: Path) -> str | None:
    """The text of ``path``, or of ``path.gz`` where only a compressed copy was kept (a results archive)."""
    if path.exists():
        return path.read_text(encoding="utf-8")
    packed = path.with_name(path.name + ".gz")
    return gzip.decompress(packed.read_bytes()).decode("utf-8") if packed.exists() else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    text = read_text_or_gzip(path)
    if text is None:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is unreliable
    return rows


class MetricsLogger:
    """Appends metrics; on resume, drops rows past the checkpoint so each step appears exactly once."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            # Rows past the checkpoint come from steps the resumed run repeats. The file is replaced
            # in one rename, so a kill here leaves either the old rows or the kept ones, never none.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=
                                         None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
