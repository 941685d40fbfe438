"""The source watch: what happened to the app's file since the loop last looked, as one event (DESIGN.md, "Living
with a source that changes"). Gone (a restore in progress), replaced by a file syncd cannot use, its WAL index
lost and not settled yet: the turn waits (`Look.WAIT`). Replaced, or its WAL index lost: the file is reopened and
adopting it is due (`Look.REOPENED`, with the reason). Its schema changed: planned again (`Look.SCHEMA`). And the
faults of the file (the app's write lock held past the busy timeout, a full disk, a read-only file, I/O
errors), waited out with backoff: never a reason to stop.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass

import apsw

from syncd import backoff
from syncd.observer import Observer
from syncd.settings import Settings
from syncd.source import STALE_SETTLE, Source
from syncd.source import Event as SourceEvent
from syncd.sqlite import BUSY_TIMEOUT_MS, SourceFileError

__all__ = ["SOURCE_FAULTS", "Look", "Seen", "SourceGone", "SourceWatch", "fault_kind", "fault_problem"]

SOURCE_GONE_GRACE = 60.0  # seconds the database file may be missing (a restore in progress) before syncd exits
GONE_POLL = 0.1  # seconds between looks for a missing file (a restore renames or copies it back)
GONE_LOG_EVERY = 5.0  # seconds between warnings while it is missing

# Faults of the application's file: waited out (`SourceWatch.wait_out_fault`), never a reason to stop.
SOURCE_FAULTS = (apsw.BusyError, apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CantOpenError)


class SourceGone(Exception):
    """The application's file has been gone longer than SOURCE_GONE_GRACE seconds: nothing left to drain."""


class Seen(enum.Enum):
    SAME = "same"  # nothing to do
    SCHEMA = "schema changed"  # plan the tables again
    REOPENED = "reopened"  # replaced or its WAL index lost: a new connection, not configured yet; adopting it is due
    WAIT = "wait"  # no usable file now: the turn is over


@dataclass(frozen=True)
class Look:
    """What `SourceWatch.look` saw, and for REOPENED why the file is not the one syncd shipped from."""

    seen: Seen
    reason: str = ""


class SourceWatch:
    """Watches one source: since when it is missing or unusable (`gone_since`), and the fault of the file in
    progress (since `fault_since`, monotonic seconds; `faults` tries so far)."""

    def __init__(self, source: Source, observer: Observer, settings: Settings) -> None:
        self.source = source
        self.observer = observer
        self.settings = settings
        self.gone_since: float | None = None
        self.gone_logged = 0.0
        self.fault_since: float | None = None
        self.faults = 0

    def look(self, stop: threading.Event) -> Look:
        """Check the file (`Source.check`) and act on what changed: wait for a missing or unusable file (raises
        SourceGone once it has lasted SOURCE_GONE_GRACE seconds), reopen a replaced one (a file syncd cannot use is
        waited for too)."""
        source = self.source
        event = source.check()
        if event is SourceEvent.GONE:
            return self.wait_for_file("gone", f"the database file {source.path} is gone (a restore in progress?)",
                                      stop)
        if event is SourceEvent.REPLACED and (left := source.wal_left_behind()):
            wal = f"{source.path}-wal"
            return self.wait_for_file("unusable", f"the database file was replaced, but {wal} beside it is still the "
                                      f"old file's ({left} bytes of its changes), which the new file would read as "
                                      f"its own pages: with the app stopped, delete {wal} and {source.path}-shm "
                                      "(a backup is whole without them)", stop)
        if event is SourceEvent.STALE and not source.settled():
            return self.wait_for_file("stale", "the WAL index (-shm) syncd's connection maps was deleted while syncd "
                                      f"had the file open; reading the file anew in {STALE_SETTLE:.0f} s unless a "
                                      "restore puts another file in place first", stop)
        if event in (SourceEvent.REPLACED, SourceEvent.STALE):
            reason = ("the database file was replaced (a restore?)" if event is SourceEvent.REPLACED else
                      "the WAL index (-shm) syncd's connection maps is no longer the file's: it was deleted while "
                      "syncd had the file open, so syncd's lock on it had been lost; reading the file anew")
            try:
                source.reopen(configure=False)
            except SourceFileError as exc:  # a directory, a file that is not SQLite (yet?), not ours to write
                return self.wait_for_file("unusable", f"the database file was replaced by one syncd cannot use: {exc}",
                                          stop)
            return Look(Seen.REOPENED, reason)  # usable once configured and not stale (`still_stale`)
        self.gone_since = None
        return Look(Seen.SCHEMA if event is SourceEvent.SCHEMA else Seen.SAME)

    def still_stale(self, stop: threading.Event) -> bool:
        """After a reopen, configured: whether the new connection still reads through the deleted WAL index, kept
        alive by another connection of syncd's (the reconciler's; it ends soon). Then the turn waits."""
        if not self.source.wal_index_lost():
            self.gone_since = None
            return False
        self.wait_for_file("stale", "another connection of syncd's still maps the deleted WAL index (-shm) of the "
                           "database file; reopening once it closes", stop)
        return True

    def wait_for_file(self, kind: str, problem: str, stop: threading.Event) -> Look:
        """No usable file at source.path (`kind`: gone, unusable, stale; `problem` says which): report it every
        GONE_LOG_EVERY seconds and wait GONE_POLL; raises SourceGone once it has lasted SOURCE_GONE_GRACE
        seconds."""
        now = time.monotonic()
        if self.gone_since is None or now - self.gone_logged >= GONE_LOG_EVERY:
            self.gone_since = now if self.gone_since is None else self.gone_since
            self.gone_logged = now
            self.observer.source_fault(kind, f"{problem}: waiting for a usable file", now - self.gone_since,
                                       GONE_POLL)
        if now - self.gone_since > SOURCE_GONE_GRACE:
            raise SourceGone(f"{problem}, for more than {SOURCE_GONE_GRACE:.0f} s; restore the file (or fix "
                             "source.path), then start syncd run")
        stop.wait(GONE_POLL)
        return Look(Seen.WAIT)

    def wait_out_fault(self, exc: Exception, stop: threading.Event) -> None:
        """Wait (with backoff) for the app to release the write lock, or the disk to take writes again."""
        stop.wait(self.fault_pause(exc))

    def fault_pause(self, exc: Exception) -> float:
        """A fault of the file seen: announce it; the seconds to wait (backoff) before trying the file again."""
        kind = fault_kind(exc)
        now = time.monotonic()
        if self.fault_since is None:
            # BUSY arrives after the busy timeout: the app has held the lock at least that long already.
            self.fault_since = now - (BUSY_TIMEOUT_MS / 1000 if kind == "busy" else 0.0)
        self.faults += 1
        pause = backoff.delay(self.faults, base=0.5, cap=self.settings.config.worker.max_backoff, rand=lambda: 1.0)
        lasting = now - self.fault_since
        self.observer.source_fault(kind, fault_problem(kind, exc, lasting), lasting, pause)
        return pause

    def usable(self, *, flush_refused: bool) -> None:
        """A turn of the loop used the file without a fault (a due flush still refused by the app's lock, told by
        `flush_refused`, is one)."""
        self.fault_since, self.faults = None, 0
        if not flush_refused:
            self.observer.source_ok()


def fault_kind(exc: Exception) -> str:
    """busy | full | readonly | io: the kind of a fault of the application's file."""
    if isinstance(exc, apsw.BusyError):
        return "busy"
    if isinstance(exc, apsw.FullError):
        return "full"
    if isinstance(exc, apsw.ReadOnlyError):
        return "readonly"
    return "io"


def fault_problem(kind: str, exc: Exception, lasting: float) -> str:
    """The operator message for a fault of the application's file, lasting `lasting` seconds so far."""
    if kind == "busy":
        return (f"the application has held the database's write lock for {lasting:.0f} s: syncd waits (nothing is "
                "lost); a long migration or batch job?")
    if kind == "full":
        return (f"the disk holding the database is full ({lasting:.0f} s): syncd cannot record what it shipped and "
                "retries (nothing is lost); free disk space")
    if kind == "readonly":
        return (f"the database file is read-only for syncd ({lasting:.0f} s): give syncd's user write access to "
                "the file and its directory (syncd retries; nothing is lost)")
    return f"I/O error on the database file ({lasting:.0f} s): {exc}; check the disk (syncd retries)"
