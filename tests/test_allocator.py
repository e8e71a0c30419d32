"""With freed memory kept in the process, a large tensor allocated again reuses pages instead of faulting
in fresh ones (glibc would otherwise ``mmap`` and ``munmap`` it each time)."""

from __future__ import annotations

import ctypes
import json
import platform
import subprocess
import sys

import pytest

from gipo.allocator import keep_freed_memory

# In a fresh process (the test process may have switched already): page faults of a 64 MiB tensor allocated
# a second time, before and after keep_freed_memory().
CHILD = """
import json, resource, torch
from gipo.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(64 * 2**20, dtype=torch.uint8)  # writing every byte touches every page
    count = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del tensor
    return count

faults()
default = faults()
switched = keep_freed_memory()
faults(), faults()  # the heap grows, twice: an aligned request does not fit the exact chunk freed before it
print(json.dumps({"pages": 64 * 2**20 // resource.getpagesize(), "default": default, "switched": switched,
                  "kept": faults()}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the setting is glibc's (mallopt)")
def test_a_freed_tensor_leaves_its_pages_for_the_next_one():
    result = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                       check=True).stdout)
    assert result["switched"]
    assert result["default"] > result["pages"] // 2  # by default the pages go back to the system
    assert result["kept"] < result["pages"] // 20


def test_off_glibc_it_reports_that_nothing_changed(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is False
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a C library without mallopt (musl)
    assert keep_freed_memory() is False
