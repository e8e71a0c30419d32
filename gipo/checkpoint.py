"""Checkpoints: written atomically with a checksum manifest, found again on resume.

A checkpoint is a folder ``checkpoints/step-N/`` holding each model in ``save_pretrained`` format and
``trainer_state.pt`` (optimizers, schedulers, controllers, data position, random-generator states).
It is written to a temporary folder and renamed only once complete, with ``manifest.json`` listing
every file's SHA-256, so a half-written or damaged checkpoint is never taken for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)``, add a manifest, and rename the folder to ``final`` when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(folder: Path) -> str | None:
    """None if every file in the manifest is present with its checksum, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            return f"missing file {name}"
        if _sha256(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest checks out; damaged ones are skipped with a warning."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"Skipping damaged checkpoint {folder}: {problem}.", stacklevel=2)
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` complete checkpoints (called after a new one is complete)."""
    for folder in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def save_state(state: dict[str, Any], folder: Path) -> None:
    torch.save(state, folder / STATE_FILE)


def load_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, weights_only=True)
