"""syncd runs below the app's CPU priority when asked (`worker.nice`, `syncd.priority`): a thread's nice value is
inherited by the threads it starts, so it is set on the main thread before any other; never raised back; a refusal
is said, not fatal. The effect on the app is measured in benchmarks/bench_app.py (README, Performance)."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd import priority
from tests.e2e import App, poll, wait_converged, write_mixed_workload

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread nice values are Linux's")


def in_thread(work):  # type: ignore[no-untyped-def]
    """What `work()` returns when run on a new thread."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def test_a_thread_lowers_its_own_priority_and_its_children_inherit_it() -> None:
    base = priority.niceness()
    wanted = min(19, base + 5)

    def lower_then_start_one() -> tuple[tuple[int, str | None], int]:
        lowered = priority.lower_priority(wanted)
        return lowered, in_thread(priority.niceness)

    lowered, child = in_thread(lower_then_start_one)
    assert lowered == (wanted, None)
    assert child == wanted  # the threads that ship a batch are started by the worker thread
    assert priority.niceness() == base  # the caller's (the main thread's) is its own


def test_it_never_raises_a_priority_it_lowered() -> None:
    def lower_twice() -> tuple[tuple[int, str | None], tuple[int, str | None]]:
        return priority.lower_priority(min(19, priority.niceness() + 4)), priority.lower_priority(0)

    first, second = in_thread(lower_twice)
    assert first[1] is None and second == (first[0], None)


def test_a_refusal_is_reported_and_shipping_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    base = priority.niceness()
    if base >= 19:
        pytest.skip("this test process already runs at the lowest priority")
    assert in_thread(lambda: priority.lower_priority(19)) == (base, "Operation not permitted (setpriority)")


def task_nice_values(pid: int) -> dict[int, int]:
    """{thread id: nice value} of every thread of process `pid` (proc(5): /proc/PID/task/TID/stat, field 19)."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        values[int(task.name)] = int(fields[16])  # field 19 counted from 1, the first two (pid, comm) cut off
    return values


def test_nice_10_lowers_every_thread_of_the_daemon(app: App, pg: psycopg.Connection) -> None:
    """With worker.nice = 10 every thread of `syncd run` (the main thread, the worker, the threads that ship its
    batches, the metrics server) runs at nice 10, set before any of them started; the rows converge as ever and
    /healthz answers."""
    app.config.write_text(app.config.read_text().replace("[worker]\n", "[worker]\nnice = 10\n", 1))
    base = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = app.start()
    try:
        write_mixed_workload(app.connect(), 1, 200, random.Random(21))
        wait_converged(app, pg)
        assert poll(f"http://{app.metrics}/healthz", lambda r: r.status_code == 200).status_code == 200
        values = task_nice_values(daemon.pid)
        assert len(values) >= 3 and set(values.values()) == {max(base, 10)}, values
    finally:
        daemon.send_signal(signal.SIGTERM)
        stderr = daemon.communicate(timeout=30)[1]
    assert daemon.returncode == 0
    assert '"nice": 10' in stderr or base >= 10


def test_by_default_the_priority_is_left_as_it_was_started(app: App, pg: psycopg.Connection) -> None:
    """Not lowered by default: a flush preempted while it holds the app's write lock makes the app's DEFERRED
    read-then-write transactions fail on a loaded machine (README, Performance)."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = app.start()
    try:
        write_mixed_workload(app.connect(), 1, 50, random.Random(22))
        wait_converged(app, pg)
        assert httpx.get(f"http://{app.metrics}/healthz").status_code == 200
        assert set(task_nice_values(daemon.pid).values()) == {base}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
