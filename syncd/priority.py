"""The CPU priority of syncd's shipping work: below the application's by default (`worker.nice`), so that a
catch-up never takes a core from the app's commits.

Why: on a machine syncd shares with the app, the app's extra commit latency while syncd drains a backlog is
competition for the CPU, not for SQLite's write lock (issue 21's measurement: 2.96x the idle p99 at nice 0, 1.20x
with syncd at nice 19). A lower priority costs syncd nothing when a core is free: the kernel only prefers the app
when both want to run.

On Linux a nice value belongs to one thread, and a thread starts with its creator's (sched(7), "The nice value";
setpriority(2), NOTES): lowering it on the worker thread lowers it for the threads that ship its batches, which it
starts, while the main thread (signals, `/metrics`, `/healthz`) keeps the process's own. Elsewhere the nice value
is the process's, and the whole daemon yields.

What holds the app's write lock (the flush, and the checkpoint after it) runs at the app's priority instead
(`AppPriority`): a thread of lower priority preempted while it holds the lock would keep the app's writers waiting
for it (a priority inversion), which is worse for the app than sharing the CPU.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["AppPriority", "lower_priority", "niceness"]

T = TypeVar("T")


def niceness() -> int:
    """The calling thread's nice value (Linux) or the process's (elsewhere), from -20 to 19."""
    return os.getpriority(os.PRIO_PROCESS, own_id())


def lower_priority(nice: int) -> tuple[int, str | None]:
    """Run the calling thread (and the threads it starts later) at nice value `nice` (0-19), unless it already runs
    at that or lower a priority: syncd never raises its own priority (that needs CAP_SYS_NICE). Returns (the nice
    value now, None) or, when the system refused (a seccomp policy, a missing syscall), (the nice value unchanged,
    what it said): never a reason to stop shipping."""
    current = niceness()
    if nice <= current:
        return current, None
    try:
        os.setpriority(os.PRIO_PROCESS, own_id(), nice)
    except OSError as exc:
        return current, f"{exc.strerror or exc} (setpriority)"
    return niceness(), None


def own_id() -> int:
    """What setpriority(2) names the calling thread by: its kernel thread id on Linux, 0 (this process) elsewhere."""
    return threading.get_native_id() if sys.platform.startswith("linux") else 0


class AppPriority:
    """One thread, started by its creator at the creator's priority, that runs the work it is given while the caller
    waits (`run`): how the worker thread, at a lower priority, flushes at the app's. Create it before lowering."""

    def __init__(self) -> None:
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-flush")
        self.thread.submit(niceness).result()  # started now, on the creating thread: it inherits that one's priority

    def run(self, work: Callable[[], T]) -> T:
        """`work()` on that thread: its result, or its exception raised here."""
        return self.thread.submit(work).result()

    def close(self) -> None:
        self.thread.shutdown(wait=True)
