"""The numerics environment of a run: what, besides the code, the config and the seed, decides its last bits.

On one machine a run is bitwise reproducible (``tests/test_reproducibility.py``). On another machine it
need not be: torch picks its CPU kernels by the instruction set it finds (``AVX512``, ``AVX2``, ``DEFAULT``;
``ATEN_CPU_CAPABILITY`` lowers it), and kernels of different vector widths add in different orders, so the
gradients differ in their last bits from the first step; sampling from the policy then draws other tokens
and the runs part ways. MKL and oneDNN dispatch on the CPU too, CUDA kernels on the GPU, and other library
versions may compute differently. Each run writes this record to ``RUN_DIR/environment.json``, so two runs
whose numbers differ can be told apart by their records.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_FILE = "environment.json"
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
                    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG")
"""Environment variables that change which kernels run, or how many threads split their work."""


def _cpu_model() -> str:
    """The CPU's model name with its family and model numbers (a VM may show only ``AMD EPYC``, while the
    numbers tell its generations apart; ``platform.processor()`` says only ``x86_64`` on Linux)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
    return fields["model name"] + numbers


def _library_builds() -> list[str]:
    """The BLAS and oneDNN builds torch was compiled with, as ``torch.__config__.show()`` names them."""
    return [line.strip().lstrip("- ") for line in torch.__config__.show().splitlines()
            if "Math Kernel Library" in line or "MKL-DNN" in line or "oneDNN" in line or "OpenBLAS" in line][:2]


def numerics_environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, kernel dispatch and threads of this process, for ``device``: the facts that decide whether
    another machine can reproduce a run bit for bit."""
    import numpy
    import transformers

    device = torch.device(device)
    record: dict[str, Any] = {
        "torch": torch.__version__, "transformers": transformers.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "device": device.type, "cpu": _cpu_model(),
        # Which vectorized ATen kernels run: the CPU's best, unless ATEN_CPU_CAPABILITY lowers it.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
        "libraries": _library_builds(),
        "variables": {name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ},
    }
    if device.type == "cuda":
        record.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      cudnn=torch.backends.cudnn.version())
    return record


def describe_environment(record: dict[str, Any]) -> str:
    """One line: ``torch 2.13.0+cpu, transformers 5.24.0, CPU kernels AVX512 on AMD EPYC (family 25, model 17),
    2 threads``."""
    threads = record["torch_threads"]
    where = f"CPU kernels {record['cpu_capability']} on {record['cpu']}, {threads} thread{'s' * (threads != 1)}"
    if record.get("gpu"):
        where = f"{record['gpu']} (CUDA {record['cuda']}), {where}"
    variables = "".join(f", {k}={v}" for k, v in record.get("variables", {}).items())
    return f"torch {record['torch']}, transformers {record['transformers']}, {where}{variables}"


def write_environment(run_dir: Path, device: torch.device | str, resume: bool) -> dict[str, Any]:
    """Record this process's environment in ``run_dir/environment.json``.

    A fresh run writes it. A resumed run keeps the record of the run it continues, and warns when this
    process differs from it: the resumed steps then need not match an uninterrupted run's bit for bit.
    """
    path = Path(run_dir) / ENVIRONMENT_FILE
    current = numerics_environment(device)
    if resume and path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict):
            changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
            if changed:
                warnings.warn(f"{run_dir}: resuming in another numerics environment than the run started in "
                              f"({', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed)}); "
                              "the resumed steps need not match an uninterrupted run bit for bit.", stacklevel=2)
            return saved
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a kill never leaves half a record
    return current
