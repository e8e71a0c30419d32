"""The run directory: one run at a time (lock), checks before training, a full disk mid-checkpoint, keep_last."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gipo import SFTConfig, SFTTrainer, build_config
from gipo import checkpoint as ckpt
from gipo.checkpoint import latest_good_checkpoint, list_checkpoints, verify
from gipo.errors import CheckpointError, RunDirError
from gipo.run_dir import CHECKPOINT_SIZE_FACTOR, LOCK_FILE, RunDirLock
from gipo.tracking import read_metrics
from tests.conftest import QUIET


def _sft(run_dir: Path, steps: int, **extra) -> SFTTrainer:
    config = build_config(SFTConfig, {**QUIET, "max_steps": steps, "batch_size": 8, "checkpoint_every": 1,
                                      "keep_last": 2, **extra})
    return SFTTrainer(config, output_dir=run_dir, examples_per_group=10)


def _no_training(trainer: SFTTrainer) -> SFTTrainer:
    def fail():
        raise AssertionError("training started")

    trainer.training_step = fail
    return trainer


def _temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for folder in (run_dir, run_dir / "checkpoints") if folder.is_dir()
                  for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]


HOLDER = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("locked", flush=True)
sys.stdin.read()  # hold the lock until killed or stdin closes
"""


def test_a_second_run_on_a_locked_run_dir_names_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another run \(PID {holder.pid} on host "
                                              rf"{socket.gethostname()}\)"):
            _no_training(_sft(run_dir, 2)).train()
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its PID stays in the file
        holder.wait(timeout=30)
    assert str(holder.pid) in (run_dir / LOCK_FILE).read_text()
    _sft(run_dir, 2).train()  # the kernel dropped the dead process's flock
    assert _steps(run_dir) == [1, 2]
    assert (run_dir / LOCK_FILE).read_text() == ""  # released at the end


def test_lock_is_per_run_in_process_and_released_on_errors(tmp_path):
    run_dir = tmp_path / "run"
    _sft(run_dir, 2).train()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    other = RunDirLock(run_dir)  # a second open file description: flock conflicts with it as with a process
    other.acquire("ppo")
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    try:
        trainer = _no_training(_sft(run_dir, 2))
        trainer.overwrite = True
        with pytest.raises(RunDirError, match=f"PID {os.getpid()} on host .* started"):
            trainer.train()
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
            _no_training(_sft(run_dir, 4)).train(resume=True)
    finally:
        other.release()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # overwrite waited for the lock

    trainer = _sft(run_dir, 4)

    def boom():
        raise RuntimeError("boom")

    trainer.training_step = boom
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(resume=True)
    mine = RunDirLock(run_dir)
    mine.acquire()  # free again although train() raised
    mine.release()


def test_unwritable_run_dir_is_refused_before_training(tmp_path, monkeypatch):
    """Root ignores file modes, so 'not writable' comes from a patched os.access; a path under a regular
    file is real."""
    real_access = os.access
    blocked = {tmp_path / "existing", tmp_path / "parent"}
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) not in blocked and
                        real_access(path, mode, **kw))
    (tmp_path / "existing").mkdir()
    with pytest.raises(RunDirError, match=r"existing is not writable"):
        _no_training(_sft(tmp_path / "existing", 2)).train()
    (tmp_path / "parent").mkdir()
    with pytest.raises(RunDirError, match=r"Cannot create run directory .*new.*parent is not writable"):
        _no_training(_sft(tmp_path / "parent" / "deeper" / "new", 2)).train()
    assert list((tmp_path / "parent").iterdir()) == []
    monkeypatch.undo()

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RunDirError, match=r"a-file is a file, not a folder"):
        _no_training(_sft(tmp_path / "a-file" / "run", 2)).train()
    with pytest.raises(RunDirError, match=r"a-file is a file; give --out a folder"):
        _no_training(_sft(tmp_path / "a-file", 2)).train()


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    trainer = _no_training(_sft(tmp_path / "run", 2))
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    assert trainer.checkpoint_size_estimate() == CHECKPOINT_SIZE_FACTOR * params
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=params))
    with pytest.raises(RunDirError, match=rf"Not enough free disk space .* free, about .* needed \({CHECKPOINT_SIZE_FACTOR}x"):
        trainer.train()
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=CHECKPOINT_SIZE_FACTOR * params + 1))
    _sft(tmp_path / "run", 1).train()  # enough: trains (and the lock was released by the refusal)


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _sft(run_dir, 2).train()
    good = latest_good_checkpoint(run_dir)
    assert good.name == "step-2"

    def full_disk(state, folder):
        (folder / ckpt.STATE_FILE).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / ckpt.STATE_FILE))

    monkeypatch.setattr(ckpt, "save_state", full_disk)
    with pytest.raises(CheckpointError, match=r"Could not write .*checkpoints/step-3: no space left on device"):
        _sft(run_dir, 4).train(resume=True)
    assert latest_good_checkpoint(run_dir) == good and verify(good) is None
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-1", "step-2"]
    assert _temporaries(run_dir) == []
    assert _steps(run_dir) == [1, 2, 3]  # step 3 was logged before its checkpoint failed

    monkeypatch.undo()  # space freed: resume repeats step 3 and logs it once
    _sft(run_dir, 4).train(resume=True)
    assert _steps(run_dir) == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-4"]


def test_write_failures_name_the_folder_and_leave_the_previous_copy(tmp_path, monkeypatch):
    target = tmp_path / "final"
    ckpt.write_atomically(target, lambda folder: (folder / "w.bin").write_bytes(b"old"))

    def torch_on_a_full_disk(folder):  # torch.save's error on ENOSPC is not an OSError
        (folder / "w.bin").write_bytes(b"ne")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=0))
    with pytest.raises(CheckpointError, match=r"Could not write .*final: no space left on device .*unexpected pos"):
        ckpt.write_atomically(target, torch_on_a_full_disk)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"Could not write .*final: ValueError: bad\. The half-written"):
        ckpt.write_atomically(target, lambda folder: (_ for _ in ()).throw(ValueError("bad")))
    assert (target / "w.bin").read_bytes() == b"old" and verify(target) is None
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_remove_temporaries_clears_what_a_kill_leaves(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("step-2", ".step-3.tmp-111", ".step-2.old-5"):
        (checkpoints / name).mkdir(parents=True)
    (tmp_path / ".final.old-7").mkdir()  # killed between moving final/ aside and renaming the new one in
    (tmp_path / ".final.old-7" / "w.bin").write_text("previous final")
    (tmp_path / ".final.tmp-7").mkdir()
    (tmp_path / ".config.yaml.tmp-9").write_text("half")
    ckpt.remove_temporaries(checkpoints)
    ckpt.remove_temporaries(tmp_path)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final"]
    assert (tmp_path / "final" / "w.bin").read_text() == "previous final"


def test_keep_last_leaves_exactly_the_newest_checkpoints_and_no_temporaries(tmp_path):
    run_dir = tmp_path / "run"
    _sft(run_dir, 5).train()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert _temporaries(run_dir) == []
    for folder in [*list_checkpoints(run_dir), run_dir / "final"]:
        assert verify(folder) is None

    for leftover in ("checkpoints/.step-6.tmp-424242", ".final.tmp-424242"):  # as a killed run leaves them
        (run_dir / leftover).mkdir()
        (run_dir / leftover / "model.safetensors").write_bytes(b"half")
    assert latest_good_checkpoint(run_dir).name == "step-5"  # ignored
    _sft(run_dir, 7).train(resume=True)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-6", "step-7"]
    assert _temporaries(run_dir) == []
    assert _steps(run_dir) == list(range(1, 8))
