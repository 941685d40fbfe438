"""The CPU priority of syncd (`worker.nice`): below the application's when asked, so that syncd's work never takes a
busy core from the app first. Not by default: on a loaded machine a flush preempted while it holds the app's write
lock makes the app's DEFERRED read-then-write transactions fail (README, Performance).

Set once, on the main thread, before `syncd run` starts any other thread: on Linux a nice value belongs to one
thread and a thread starts with its creator's (sched(7), "The nice value"; setpriority(2), NOTES), so every thread
of the daemon (the worker, the threads that ship its batches, the reconciler, the metrics server) runs at it;
elsewhere the nice value is the process's. The whole process, not only its shipping threads: with those lowered
and the flush kept on a thread at the app's priority, the app's commit p99 did not improve (the flush needs the
GIL, which the lowered threads hold); README, Performance, has the measured effect.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["lower_priority", "niceness"]


def niceness() -> int:
    """The calling thread's nice value (Linux) or the process's (elsewhere), from -20 to 19."""
    return os.getpriority(os.PRIO_PROCESS, own_id())


def lower_priority(nice: int) -> tuple[int, str | None]:
    """Run the calling thread (and the threads it starts later: from the main thread, before any other starts, the
    whole process) at nice value `nice` (0-19), unless it already runs at that or a lower priority: syncd never
    raises its own priority (that needs CAP_SYS_NICE). Returns (the nice value now, None) or, when the system refused
    (a seccomp policy, a missing syscall), (the nice value unchanged, what it said): never a reason to stop."""
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

