"""Checkpoints: written atomically with a checksum manifest, found again on resume.

A checkpoint is a folder ``checkpoints/step-N/`` holding each model in ``save_pretrained`` format and
``trainer_state.pt`` (optimizers, schedulers, controllers, data position, random-generator states).
It is written to a temporary folder and renamed only once complete, with ``manifest.json`` listing
every file's SHA-256, so a half-written or damaged checkpoint is never taken for a good one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gipo.errors import CheckpointError

MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"


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


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Disk space under which a failed write is reported as a full disk: torch.save and safetensors do not
# raise OSError(ENOSPC) on a full disk but their own errors ("unexpected pos", "I/O error: ...").
_FULL_DISK_BYTES = 1 << 20


def _write_failure(final: Path, err: Exception, free: int | None) -> CheckpointError:
    text = str(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "no space left" in str(err).lower() \
        or (free is not None and free < _FULL_DISK_BYTES)
    if full:
        where = f" ({free} bytes free)" if free is not None else ""
        reason = f"no space left on device{where}; the error was: {text}. Free some disk space and resume"
    else:
        reason = text
    return CheckpointError(f"Could not write {final}: {reason}. The half-written copy was removed; earlier "
                           "checkpoints are untouched.")


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_folder)``, add a manifest, and rename the folder to ``final`` when complete.

    Any failure (a full disk included) removes the temporary folder and raises ``CheckpointError``
    naming ``final``; whatever was at ``final`` before, and every other checkpoint, stays as it was.
    A process killed here leaves a ``.NAME.tmp-PID`` folder that ``remove_temporaries`` clears."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
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
        _fsync_dir(final.parent)
    except Exception as err:
        try:
            free = shutil.disk_usage(final.parent).free  # before the removal below frees space again
        except OSError:
            free = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(final, err, free) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-\d+$")


def remove_temporaries(folder: Path) -> None:
    """Clear what ``write_atomically`` leaves when its process is killed: ``.NAME.tmp-PID`` folders
    (incomplete writes) are removed; a ``.NAME.old-PID`` folder (the previous complete copy, renamed
    aside just before the new one was to take its place) is moved back to NAME if NAME is missing,
    else removed. Call only while no other process writes to ``folder`` (the run directory lock)."""
    if not folder.is_dir():
        return
    entries = [(p, m) for p in folder.iterdir() if (m := _TEMPORARY.match(p.name))]
    for path, match in sorted(entries, key=lambda e: e[1]["kind"] == "tmp", reverse=True):  # tmp first
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            path.rename(target)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
    """Remove all but the newest ``keep_last`` complete checkpoints (called after a new one is complete),
    and the temporary folders of writes that a killed run left behind."""
    for folder in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
    remove_temporaries(run_dir / "checkpoints")


def save_state(state: dict[str, Any], folder: Path) -> None:
    torch.save(state, folder / STATE_FILE)


def load_state(folder: Path, allowed_classes: list[type] | tuple[type, ...] = ()) -> dict[str, Any]:
    """The trainer state, unpickled with tensors and plain types only, plus ``allowed_classes``."""
    with torch.serialization.safe_globals(list(allowed_classes)):
        return torch.load(folder / STATE_FILE, weights_only=True)
