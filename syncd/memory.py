"""Giving freed memory back to the operating system.

CPython returns the memory of freed objects to the C allocator, and glibc's malloc keeps most of it in its heaps for
reuse rather than returning it to the system: after multi-file mode closes a thousand files it had open at start
(their SQLite page caches, statements and workers, about 400 KB a file), the process stays at the size it had with
all of them open. `malloc_trim(0)` returns the free pages of every heap (glibc's malloc(3) and malloc_trim(3)).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up among the symbols the process already has (its C library is loaded), or None
    under another C library (musl, macOS), which has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the allocator's free pages to the operating system; True when some were (False: none to return, or
    no glibc). Takes milliseconds on a heap of hundreds of MB: call it after memory was freed, not in a loop."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
