"""Every error gipo raises for a user to act on; the command line prints their message, not a stack trace.

They live apart from the modules that raise them so that any module can raise any of them without importing
the others (config, data, checkpoints, the trainer).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class DataError(ValueError):
    """Input data that cannot be used; the message names the source, row and field."""


class ModelLoadError(RuntimeError):
    """A model path or id that cannot be loaded; the message says what was tried."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used: missing, not writable, locked by another run, or already holding one."""


class NonFiniteError(FloatingPointError):
    """NaN or inf in a quantity the run would train on."""

    def __init__(self, quantity: str, step: int, problem: str | None = None):
        super().__init__(f"Step {step}: {problem or f'{quantity} contains NaN or inf'}; the run stopped before "
                         "training on it (the last checkpoint is intact). Lower the learning rate, check the reward "
                         "and data, or set on_nonfinite=skip to skip such batches.")
        self.quantity, self.step = quantity, step


USER_ERRORS = (ConfigError, DataError, ModelLoadError, RunDirError, CheckpointError, NonFiniteError)
"""What the command line reports as one line (exit status 2)."""
