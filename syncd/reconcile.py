"""Reconcile: bring a table back in step with the secondary after a gap in capture (triggers lost to a
migration, a file restored from a backup), by the comparison `verify --repair` makes for that table: keys
missing, different or extra in the secondary are put into the outbox, and the daemon ships them like any
change (the outbox says which rows changed; the table says what they are now).

Reconciles run on a thread of their own with their own connection, so a large table does not hold up the
drain; a reconcile that fails (the secondary unreachable, its schema lagging, the app holding the write lock)
is tried again with backoff. The mark that asked for it (`outbox.request_reconcile`) is cleared only when it
finished, so a crash in between reconciles again at the next start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import apsw

from syncd import backoff, capture, source, sqlite, verify
from syncd.config import Config
from syncd.observer import Observer
from syncd.target import PostgrestTarget, TargetError

__all__ = ["Reconciler"]

RETRY_CAP_SECONDS = 60.0


@dataclass
class Job:
    """One table to reconcile: why, how often it failed, and not before when (monotonic seconds)."""

    reason: str
    failures: int = 0
    not_before: float = 0.0


class Reconciler:
    """Reconciles the tables asked for, one at a time, on its own thread (`start`) or inline (`run_pending`).
    `settings` gives the configuration and the target to use now (they change on SIGHUP)."""

    def __init__(self, path: Path, settings: Callable[[], tuple[Config, PostgrestTarget]], observer: Observer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.settings = settings
        self.observer = observer
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.running: str | None = None
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def request(self, table: str, reason: str) -> None:
        """Reconcile `table` (again, if it is running now: what it has read may predate the gap)."""
        with self.lock:
            queued = table not in self.jobs
            if queued:
                self.jobs[table] = Job(reason)
            running = self.running == table
        if queued:
            self.observer.reconcile_queued(table, reason, running)
        self.wake.set()

    def pending(self) -> frozenset[str]:
        """The tables whose reconcile is waiting or running: their keys that differ may not all be in the outbox
        yet."""
        with self.lock:
            return frozenset(self.jobs) | ({self.running} if self.running is not None else set())

    def retry_now(self) -> None:
        """Tables resumed (a schema fixed, SIGHUP): the reconciles waiting out a backoff are tried again at once
        (what failed them may be what was fixed; changes may wait for them, see `Halts.follow_reconciles`)."""
        with self.lock:
            for job in self.jobs.values():
                job.not_before = 0.0
        self.wake.set()

    def busy(self) -> bool:
        """Whether a reconcile is waiting or running."""
        with self.lock:
            return bool(self.jobs) or self.running is not None

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run reconciles on a daemon thread until `stop` is set."""
        thread = threading.Thread(target=self.serve, args=(stop,), name="syncd-reconcile", daemon=True)
        thread.start()
        return thread

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.run_next():
                self.wake.wait(1.0)
                self.wake.clear()

    def run_pending(self, stop: threading.Event) -> None:
        """Reconcile every table asked for, inline, waiting out retries, until none is left or `stop` is set."""
        while self.busy() and not stop.is_set():
            if not self.run_next():
                stop.wait(0.2)

    def run_next(self) -> bool:
        """Reconcile the next table that is due; False when none is."""
        with self.lock:
            now = self.clock()
            due = next((t for t, job in self.jobs.items() if job.not_before <= now), None)
            if due is None:
                return False
            job = self.jobs.pop(due)
            self.running = due
        try:
            self.reconcile(due, job)
        finally:
            with self.lock:
                self.running = None
        return True

    def reconcile(self, table: str, job: Job) -> None:
        started = time.monotonic()
        config, target = self.settings()
        try:
            with source.side_connection(self.path) as conn:
                report = verify.verify(conn, config, target, tables=[table], repair=True).tables[0]
            problem = report.error
        except (apsw.Error, TargetError, capture.CaptureError, sqlite.SourceFileError, sqlite.ForeignCollation) as exc:
            problem = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug: this thread must not die of it silently (the mark stays; it is retried)
            self.observer.log.exception("reconcile stopped on an unexpected error (a bug): retried with backoff",
                                        table=table)
            problem = f"unexpected {type(exc).__name__}: {exc}"
        if problem is None:
            self.observer.reconciled(table, report.repair or 0, time.monotonic() - started, report.answered,
                                     report.cleared)
            return
        job.failures += 1
        pause = backoff.delay(job.failures, base=1.0, cap=RETRY_CAP_SECONDS, rand=lambda: 1.0)
        job.not_before = self.clock() + pause
        with self.lock:
            newer = self.jobs.setdefault(table, job)  # asked again meanwhile: one job, keeping the backoff
            newer.failures, newer.not_before = job.failures, max(newer.not_before, job.not_before)
        self.observer.reconcile_failed(table, problem, pause)
