"""Freed memory given back to the system (`syncd.memory`): what keeps a multi-file daemon's idle RSS down after it
closed the files it had open."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, os
from syncd.memory import release_freed_memory

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

blocks = [bytes(1000) for _ in range(100_000)]  # 100 MB through malloc (pymalloc keeps objects up to 512 bytes)
pinned = bytes(1000)  # above them in the heap: glibc's own trim of the heap's top cannot return them
del blocks
before = rss()
released = release_freed_memory()
print(json.dumps({"released": released, "before": before, "after": rss()}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_freed_but_kept_by_the_allocator_is_given_back() -> None:
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(probe.stdout)
    assert seen["released"] is True
    assert seen["after"] < seen["before"] - 50 * 2**20, seen
