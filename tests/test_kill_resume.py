"""SIGKILL at random moments, resume each time: the run ends as if it had never been interrupted.

A small server process imports torch and gipo once and forks one child per attempt, so a kill/resume
cycle costs a fraction of a second instead of a fresh interpreter's import time. Each child builds an
``SFTTrainer`` and calls ``train(resume=...)``; the test kills it with SIGKILL

* at a random moment after it starts (``step``: mid-step, mid-metrics, mid-checkpoint, anywhere),
* the moment a checkpoint's temporary folder appears (``tmp``: the real timing, no help),
* inside a checkpoint write, weights written and trainer state not yet (``state``),
* after a new checkpoint is renamed into place and before older ones are pruned (``prune``),
* inside the write of ``final/`` (``final``).

For the last three the child sleeps at that point (the code path is the real one; the window is
only wider). Then it resumes (or starts over when no checkpoint exists yet) until the run completes,
and compares the final weights and every logged metric with an uninterrupted run.
Set GIPO_KILL_SEED to vary the schedule; the summary line is printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from gipo.checkpoint import latest_good_checkpoint, list_checkpoints, step_of, verify
from gipo.models import load_causal_lm
from gipo.tracking import read_metrics

MAX_STEPS = 30
KEEP_LAST = 2
SETTINGS = {"progress": False, "device": "cpu", "max_steps": MAX_STEPS, "batch_size": 8, "checkpoint_every": 1,
            "keep_last": KEEP_LAST, "logging_steps": 1}
PAUSE_S = 0.3

SERVER = r'''
import json, os, sys, time, traceback

import torch

torch.set_num_threads(1)
import transformers

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
import torch.utils.tensorboard  # noqa: F401  (imported once here, not in every child)
from gipo import checkpoint as ckpt
from gipo.config import SFTConfig, build_config
from gipo.sft import SFTTrainer

SETTINGS = json.loads(sys.argv[1])


def widen(pause, seconds):
    """Sleep at one point of the checkpoint code, so that a kill from the test lands there."""
    if pause == "state":  # in a step checkpoint's temporary folder: weights written, trainer state not yet
        save_state = ckpt.save_state

        def slow_save_state(state, folder):
            time.sleep(seconds)
            save_state(state, folder)

        ckpt.save_state = slow_save_state
    elif pause == "final":  # in final's temporary folder: weights written, no manifest yet
        write_atomically = ckpt.write_atomically

        def slow_write_atomically(final, write):
            def slow_write(tmp):
                write(tmp)
                if final.name == "final":
                    time.sleep(seconds)
            return write_atomically(final, slow_write)

        ckpt.write_atomically = slow_write_atomically
    elif pause == "prune":  # the new checkpoint renamed into place, the oldest not yet removed
        prune = ckpt.prune

        def slow_prune(run_dir, keep_last):
            time.sleep(seconds)
            prune(run_dir, keep_last)

        ckpt.prune = slow_prune


def run(job):
    widen(job["pause"], job["seconds"])
    config = build_config(SFTConfig, SETTINGS)
    trainer = SFTTrainer(config, output_dir=job["out"], examples_per_group=10, overwrite=job["overwrite"])
    open(job["ready"], "w").close()
    trainer.train(resume=job["resume"])


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run(job)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"started": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"ended": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Server:
    """The forking server: ``start(job)`` returns the child's PID, ``exit_code()`` its exit code once ended."""

    def __init__(self, tmp_path: Path):
        script = tmp_path / "server.py"
        script.write_text(SERVER)
        self.log_path = tmp_path / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen([sys.executable, str(script), json.dumps(SETTINGS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[1])
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next(120)  # imports done
        self.code: int | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))
        self.messages.put(None)

    def _next(self, timeout: float) -> dict:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the training server did not answer in {timeout} s; log:\n{self.log()}")
        if message is None:
            pytest.fail(f"the training server died; log:\n{self.log()}")
        return message

    def log(self) -> str:
        return self.log_path.read_text()[-5000:]

    def start(self, out: Path, ready: Path, *, resume: bool, overwrite: bool, pause: str | None = None) -> int:
        ready.unlink(missing_ok=True)
        job = {"out": str(out), "ready": str(ready), "resume": resume, "overwrite": overwrite, "pause": pause,
               "seconds": PAUSE_S}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        self.code = None
        return self._next(30)["started"]

    def ended(self) -> bool:
        if self.code is None:
            try:
                message = self.messages.get_nowait()
            except queue.Empty:
                return False
            if message is None:
                pytest.fail(f"the training server died; log:\n{self.log()}")
            self.code = message["code"]
        return True

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while not self.ended():
            if time.monotonic() > deadline:
                pytest.fail(f"a training child did not end in {timeout} s; log:\n{self.log()}")
            time.sleep(0.005)
        return self.code

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def _until(server: Server, condition, timeout: float = 60) -> bool:
    """Poll ``condition`` until true (True) or the child ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if server.ended():
            return condition()
        time.sleep(0.001)
    pytest.fail(f"timed out waiting for a kill point; log:\n{server.log()}")


def _names(folder: Path) -> list[str]:
    """The entries of a folder the child may be removing right now (a start-over clears the run): [] if gone."""
    try:
        return [p.name for p in folder.iterdir()]
    except FileNotFoundError:
        return []


def _temporaries(run_dir: Path) -> list[str]:
    found = []
    for folder in (run_dir, run_dir / "checkpoints"):
        found += [name for name in _names(folder) if ".tmp-" in name or ".old-" in name]
    return sorted(found)


def _step_folders(run_dir: Path) -> list[str]:
    return sorted(name for name in _names(run_dir / "checkpoints") if name.startswith("step-"))


def _latest(run_dir: Path) -> Path | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged checkpoint would warn: kills must never leave one
        return latest_good_checkpoint(run_dir)


def _kill_point(mode: str, rng: random.Random, run_dir: Path, ready: Path, server: Server,
                nth: int | None = None) -> bool:
    """Wait for this mode's moment and return True, or False when the child ended first."""
    if not _until(server, ready.exists):
        return False
    if mode == "step":
        time.sleep(rng.uniform(0.0, 0.5))
        return not server.ended()
    if mode in ("tmp", "state"):
        root = run_dir / "checkpoints"
        before = set(_step_folders(run_dir))
        seen: set[str] = set()
        wanted = nth or rng.randint(1, 5)

        def nth_write() -> bool:  # the n-th checkpoint write of this attempt has begun
            seen.update(re.sub(r"^\.|\.tmp-\d+$", "", name) for name in _names(root) if name not in before)
            return len(seen) >= wanted

        if not _until(server, nth_write):
            return False
        if mode == "state":
            time.sleep(rng.uniform(0.0, PAUSE_S * 0.6))
        return not server.ended()
    if mode == "prune":
        if not _until(server, lambda: len(_step_folders(run_dir)) > KEEP_LAST):
            return False
        time.sleep(rng.uniform(0.0, PAUSE_S * 0.6))
        return not server.ended()
    if mode == "final":
        if not _until(server, lambda: any(name.startswith(".final.tmp-") for name in _names(run_dir))):
            return False
        time.sleep(rng.uniform(0.0, PAUSE_S * 0.6))
        return not server.ended()
    raise AssertionError(mode)


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir / "metrics.jsonl")]


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    seed = int(os.environ.get("GIPO_KILL_SEED", "0"))
    rng = random.Random(seed)
    run_dir, straight_dir, ready = tmp_path / "killed", tmp_path / "straight", tmp_path / "ready"
    server = Server(tmp_path)
    try:
        server.start(straight_dir, ready, resume=False, overwrite=False)
        assert server.wait() == 0, server.log()

        opening = ["step", "tmp", "state", "prune"]
        rng.shuffle(opening)  # each kind early, while there are steps left for it
        kills: list[str] = []
        trace: list[str] = []  # kind of kill @ the newest good checkpoint it left
        seen = {"temporaries left by a kill": 0, "extra checkpoint (killed before prune)": 0,
                "metrics rows past the checkpoint": 0, "final/ half-written": 0, "started over (no checkpoint)": 0}
        for _attempt in range(40):
            latest = _latest(run_dir)
            resume = latest is not None
            if not resume and run_dir.exists():
                seen["started over (no checkpoint)"] += 1
            latest_step = step_of(latest) if latest else 0
            if not kills:
                mode = "state"  # inside the very first checkpoint write: no checkpoint, so it starts over
            elif "final" not in kills and (len(kills) >= 9 or latest_step >= MAX_STEPS - 6):
                mode = "final"  # runs to the end, then is killed writing final/
            elif len(kills) <= len(opening):
                mode = opening[len(kills) - 1]
            elif len(kills) < 9:
                mode = rng.choice(["step", "step", "tmp", "state", "prune"])
            else:
                mode = None  # enough: let it finish
            pause = mode if mode in ("state", "prune", "final") else None
            pid = server.start(run_dir, ready, resume=resume, overwrite=not resume, pause=pause)
            if mode is not None and _kill_point(mode, rng, run_dir, ready, server, nth=None if kills else 1):
                os.kill(pid, signal.SIGKILL)
                code = server.wait()
                if code == -signal.SIGKILL:
                    kills.append(mode)
                    latest = _latest(run_dir)
                    latest_step = step_of(latest) if latest else 0
                    seen["temporaries left by a kill"] += bool(_temporaries(run_dir))
                    seen["extra checkpoint (killed before prune)"] += len(_step_folders(run_dir)) > KEEP_LAST
                    seen["metrics rows past the checkpoint"] += any(r["step"] > latest_step
                                                                    for r in read_metrics(run_dir / "metrics.jsonl"))
                    seen["final/ half-written"] += any(p.startswith(".final.tmp-") for p in _temporaries(run_dir))
                    trace.append(f"{mode}@{latest_step}")
                    continue
            else:
                code = server.wait()
            assert code == 0, f"attempt ended with {code}; log:\n{server.log()}"
            if (run_dir / "final").exists() and _latest(run_dir) and step_of(_latest(run_dir)) == MAX_STEPS:
                break
        else:
            pytest.fail(f"the run did not complete after {len(kills)} kills")
    finally:
        server.close()

    straight = load_causal_lm(str(straight_dir / "final")).state_dict()
    resumed = load_causal_lm(str(run_dir / "final")).state_dict()
    identical = all(torch.equal(straight[k], resumed[k]) for k in straight)
    print(f"\nkill/resume seed={seed}: {len(kills)} kills ({' '.join(trace)}); {seen}; "
          f"final weights identical: {identical}")
    assert len(kills) >= 5, kills
    assert all(seen.values()), seen  # every situation the kills are aimed at did happen
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], msg=key)

    rows, straight_rows = _metrics(run_dir), _metrics(straight_dir)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(straight_rows, rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert _tensorboard_steps(run_dir, "train/loss") == list(range(1, MAX_STEPS + 1))

    # Every leftover was cleared by the saves that followed; keep_last holds; all that is left verifies.
    assert _temporaries(run_dir) == []
    assert _step_folders(run_dir) == [f"step-{MAX_STEPS - 1}", f"step-{MAX_STEPS}"]
    for folder in [*list_checkpoints(run_dir), run_dir / "final"]:
        assert verify(folder) is None, folder
