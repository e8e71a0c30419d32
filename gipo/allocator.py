"""The process's memory allocator on the CPU.

glibc's malloc serves each large tensor (a layer's activations, the logits) with a fresh ``mmap`` and hands
it back to the system when the tensor is freed; the next iteration's tensors of the same sizes then fault in
new zeroed pages, hundreds of thousands per update of a 135M-parameter model, which costs seconds on a
virtual machine. Keeping freed memory in the process lets the next iteration reuse it. The price is memory:
the heap never shrinks and its holes count too, so the resident size stays at its peak instead of falling
between phases, and that peak is higher (on SmolLM2-135M GRPO about 6% more).
(``benchmarks/grpo_throughput.py`` runs gipo with it and TRL without it; docs/performance.md shows both sides.)
"""

from __future__ import annotations

import ctypes
import platform

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and never trim it (``mallopt``: no ``mmap`` chunks, and a
    trim threshold of -1, which turns trimming off). For the rest of the process. Returns whether it took
    effect: False where the C library is not glibc."""
    if platform.system() != "Linux":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
