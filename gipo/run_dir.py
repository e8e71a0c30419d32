"""A run's directory: the lock that keeps two runs out of it, the checks before a run starts or resumes, and
its config file.

``RunDir`` is the whole interface the training loop sees: ``open`` (main process; check, create, lock),
``prepare`` (find the checkpoint to resume from, or clear an old run), ``check_disk_space``, ``save_config``
and ``release``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from gipo import checkpoint as ckpt
from gipo.config import RunConfig, read_yaml, save_config, upgrade_saved_config
from gipo.errors import ConfigError, RunDirError

LOCK_FILE = ".lock"
# Free space a run needs before it starts, as a multiple of the trained parameters' size in bytes.
CHECKPOINT_SIZE_FACTOR = 3  # weights plus AdamW's two moment buffers
# What --overwrite removes of an earlier run (config.yaml is rewritten by the new run).
RUN_FILES = ("checkpoints", "final", "tensorboard", "metrics.jsonl", "eval.json", "environment.json")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def differing_keys(saved: dict[str, Any], current: RunConfig, *, missing_differ: bool = False) -> list[str]:
    """Keys that change results and differ between a saved config and ``current`` (a key the saved config lacks
    counts only with ``missing_differ``). A saved method that has since moved to another name is read as that name."""
    saved = upgrade_saved_config(saved)
    keys = []
    for f in dataclasses.fields(current):
        if not f.metadata.get("result_affecting", True):
            continue
        if f.name not in saved:
            if missing_differ:
                keys.append(f"{f.name} (not saved)")
        elif saved[f.name] != getattr(current, f.name):
            keys.append(f"{f.name} (saved {saved[f.name]!r}, now {getattr(current, f.name)!r})")
    return keys


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` for the length of a run, so two runs never write the
    same run directory at once.

    The kernel drops a ``flock`` when its holder dies, so the file a killed run leaves behind never
    blocks the next one; the PID and host written into it only serve the error message.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def _holder(self, fd: int) -> str:
        text = ""
        for _ in range(5):  # the holder may have locked the file but not yet written its PID
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8", "replace").strip()
            if text:
                break
            time.sleep(0.02)
        try:
            info = json.loads(text)
            where = f" on host {info['host']}" if info.get("host") else ""
            since = f", started {info['started']}" if info.get("started") else ""
            return f"PID {info['pid']}{where}{since}"
        except (ValueError, KeyError, TypeError):
            return f"PID unknown ({self.path} reads {text[:200]!r})" if text else "PID unknown"

    def acquire(self, stage: str = "train") -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"Cannot create the lock file {self.path}: {err.strerror or err}. "
                              "Is the run directory writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunDirError(f"Cannot lock {self.path}: {err.strerror or err}.") from None
            holder = self._holder(fd)
            os.close(fd)
            raise RunDirError(f"Run directory {self.run_dir} is in use by another run ({holder}), which holds "
                              f"{self.path}. Wait for it to finish or stop it, or give this run another "
                              "--out.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: nobody holds it
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDir:
    """The run directory of one ``train`` call: ``overwrite`` lets a new run replace an old one."""

    def __init__(self, path: str | Path, stage: str, *, overwrite: bool = False):
        self.path = Path(path)
        self.stage, self.overwrite = stage, overwrite
        self.lock = RunDirLock(self.path)

    def open(self, resume: bool) -> None:
        """Check that the folder can be (or is) a writable run directory, create it and lock it."""
        self._check_path(resume)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"Cannot create run directory {self.path}: {err.strerror or err}.") from None
        self.lock.acquire(self.stage)

    def release(self) -> None:
        self.lock.release()

    def _check_path(self, resume: bool) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunDirError(f"Run directory {out} is a file; give --out a folder.")
        if out.exists():
            if not os.access(out, os.W_OK | os.X_OK):
                raise RunDirError(f"Run directory {out} is not writable.")
            for name in ("checkpoints", "final"):
                sub = out / name
                if sub.is_dir() and not os.access(sub, os.W_OK | os.X_OK):
                    raise RunDirError(f"Run directory {out}: {sub} is not writable.")
            return
        if resume:
            raise RunDirError(f"--resume: {out} holds no complete checkpoint to resume from (it does not exist).")
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise RunDirError(f"Cannot create run directory {out}: {parent} is a file, not a folder.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"Cannot create run directory {out}: {parent} is not writable.")

    def prepare(self, resume: bool, config: RunConfig) -> Path | None:
        """With the directory locked: remove what a killed run left half-written, then return the checkpoint to
        resume from (its config must match ``config`` in every key that changes results), or clear an old run."""
        out = self.path
        ckpt.remove_temporaries(out)  # nobody else writes here while we hold the lock
        ckpt.remove_temporaries(out / "checkpoints")
        started = any((out / n).exists() for n in ("config.yaml", "metrics.jsonl", "checkpoints"))
        if resume:
            latest = ckpt.latest_good_checkpoint(out)
            if latest is None:
                raise RunDirError(f"--resume: {out} holds no complete checkpoint to resume from.")
            differences = differing_keys(read_yaml(out / "config.yaml"), config)
            if differences:
                raise ConfigError(f"--resume: the config differs from the one saved in {out}/config.yaml in keys "
                                  f"that change results: {'; '.join(differences)}. Resume with the same "
                                  "values, or start a new run with --out.")
            return latest
        if started:
            if not self.overwrite:
                raise RunDirError(f"Run directory {out} already holds a run. Pass --resume to continue it or "
                                  "--overwrite to replace it.")
            for name in RUN_FILES:
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        return None

    def check_disk_space(self, needed: int) -> None:
        """``needed`` bytes must be free for a checkpoint (see ``CHECKPOINT_SIZE_FACTOR``)."""
        free = shutil.disk_usage(self.path).free
        if free < needed:
            raise RunDirError(f"Not enough free disk space for a checkpoint in {self.path}: "
                              f"{format_bytes(free)} free, about {format_bytes(needed)} needed "
                              f"({CHECKPOINT_SIZE_FACTOR}x the trained parameters). Free some space or give "
                              "--out on another disk.")

    def save_config(self, config: RunConfig) -> None:
        path = self.path / "config.yaml"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_config(config, tmp)
        os.replace(tmp, path)  # a kill never leaves a half-written config.yaml for --resume to read
