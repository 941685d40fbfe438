"""The flush: when syncd writes to the app's file, and how little (DESIGN.md, "Never block the app").

An acknowledgement writes the state file only; the acknowledged entries are deleted from the app's outbox later,
in chunks, by the flush: once they are FLUSH_AFTER seconds old or FLUSH_ROWS many, at a moment when no other
process is inside a transaction on the file (right after an app commit), in transactions that never wait for its
lock; after FLUSH_DEADLINE seconds, or at the end, whatever the app does. A commit while an app transaction has
read but not yet written would make the app's write fail at once (SQLITE_BUSY_SNAPSHOT,
https://sqlite.org/wal.html#busy). After the flush syncd checkpoints the WAL itself (PASSIVE), so that no commit
of the app's has to.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import apsw

from syncd import outbox
from syncd.observer import Observer
from syncd.source import Source
from syncd.sqlite import BUSY_TIMEOUT_MS, FileMoved, value_of
from syncd.watch import SOURCE_FAULTS, fault_problem
from syncd.window import Window

__all__ = ["FLUSH_AFTER", "FLUSH_DEADLINE", "FLUSH_RETRY", "Flush"]

FLUSH_AFTER = 0.5  # seconds after an acknowledgement before its entries may be deleted from the app's file
FLUSH_ROWS = 20_000  # ... or once this many wait, whatever their age
FLUSH_DEADLINE = 2.0  # seconds after which they are deleted even while the app stays inside transactions
FLUSH_REFUSAL_REPORT_EVERY = 30.0  # seconds between two warnings while the app's lock keeps a due flush out
FORCE_SEARCH = 0.25  # seconds a due flush still looks for a moment no app transaction is open before it goes ahead
FLUSH_RETRY = 0.01  # seconds between looks for a moment when no other connection is inside a transaction
GAP_WAIT = 0.05  # seconds a due flush waits for the app's next commit (right after it, the app is between two)
GAP_BUDGET = 0.001  # seconds after the app's commit during which further chunks follow without a new wait
GAP_POLL = 0.0002  # seconds between looks at PRAGMA data_version meanwhile
APP_IDLE_AFTER = 0.25  # seconds without an app commit after which the app counts as idle
SHARED_CHECKPOINT_BYTES = 1 << 20  # multi-file mode: a flush checkpoints once the -wal holds this much (SQLite's own
# automatic checkpoint, in the app's commit, comes at 1,000 pages: https://sqlite.org/pragma.html#pragma_wal_autocheckpoint)


class Flush:
    """The acknowledged entries not yet deleted from the app's file (`unflushed`, -1 until counted; the oldest
    since `unflushed_since`, monotonic seconds), when the next try may come (`next_flush_try`), and since when
    the app's lock keeps a due flush out (`refused_since`). Flushing deletes the highest seqs too, which SQLite
    may hand out again: the window's claims then start over.

    `shared`: the thread flushing serves other files too (multi-file mode). It then never waits for the app's next
    commit (GAP_WAIT would keep every other file waiting): a flush goes ahead when the lock probe sees no other
    process inside a transaction, else at a later turn (the app's next commit makes one due at once); and it
    checkpoints only once the WAL holds SHARED_CHECKPOINT_BYTES, not after every flush (a checkpoint syncs the file:
    at a thousand files' flushes a second, that is most of a core)."""

    def __init__(self, source: Source, observer: Observer, window: Window, *, shared: bool = False) -> None:
        self.source = source
        self.observer = observer
        self.window = window
        self.gap_wait = 0.0 if shared else GAP_WAIT
        self.checkpoint_from = SHARED_CHECKPOINT_BYTES if shared else 0
        self.unflushed = -1
        self.unflushed_since: float | None = None
        self.next_flush_try = 0.0
        self.refused_since: float | None = None
        self.force_flush_at: float | None = None  # when a due flush stops waiting for a quiet moment
        self.refusal_reported = 0.0
        self.requeued_keys = 0  # keys requeued (a foreign key refused them) by the last flushes
        self.app_version: int | None = None  # PRAGMA data_version when last read: it changes when the app commits
        self.app_committed_at = 0.0  # monotonic seconds when an app commit was last seen
        self.gap_began: float | None = None  # when an app commit was seen the moment it happened (while waiting)

    def acknowledged(self, entries: int, requeued: int) -> None:
        """`entries` entries were acknowledged (`requeued` keys of them requeued); start the clock of the oldest
        unflushed one."""
        if self.unflushed < 0:
            self.unflushed = outbox.unflushed(self.source.conn)
        else:
            self.unflushed += entries
        if self.unflushed and self.unflushed_since is None:
            self.unflushed_since = time.monotonic()
        self.requeued_keys += requeued

    def forget(self) -> None:
        """Nothing acknowledged is waiting any more (the file was adopted: those were the old file's entries)."""
        self.unflushed, self.unflushed_since = 0, None

    def when_due(self, *, final: bool = False) -> str | None:
        """Flush once due (see the module's docstring); with `final`, now and whatever the app does. Returns why the
        file is not the one the entries were claimed from, when the flush finds it so (a copy restored into the open
        file), having flushed nothing; else None."""
        if self.unflushed < 0:
            self.acknowledged(0, 0)
        if not self.unflushed:
            return None
        now = time.monotonic()
        age = now - (self.unflushed_since or now)
        must = final or age >= FLUSH_DEADLINE
        if not must and (now < self.next_flush_try or (age < FLUSH_AFTER and self.unflushed < FLUSH_ROWS)):
            return None
        if must and self.force_flush_at is None:  # due: a last FORCE_SEARCH seconds of looking for a quiet moment
            self.force_flush_at = now + FORCE_SEARCH
        forced = final or (self.force_flush_at is not None and now >= self.force_flush_at)
        quiet: Callable[[], bool] = (lambda: True) if forced else (lambda: not self.source.others_in_transaction())
        while self.unflushed:
            self.wait_for_a_gap()  # forced too: right after an app commit a commit of ours is least likely to fail one
            if not quiet():
                self.next_flush_try = time.monotonic() + FLUSH_RETRY
                return None
            try:
                applied = outbox.flush(self.source.conn, wait=final, quiet=quiet)
            except outbox.Discontinuity as exc:
                return f"{exc}: a copy restored from a backup into the open file?"
            if applied is None:
                self.next_flush_try = time.monotonic() + FLUSH_RETRY
                if must:
                    self.refused()
                return None
            self.refused_since = self.force_flush_at = None
            self.window.flushed(applied.highest)
            self.unflushed = 0 if applied < outbox.FLUSH_CHUNK else max(0, self.unflushed - applied)
        self.unflushed_since = self.force_flush_at = None
        if self.source.wal and self.wal_bytes() >= self.checkpoint_from:
            self.source.checkpoint()  # PASSIVE: never waits for, never blocks, the app (https://sqlite.org/wal.html#ckpt)
        return None

    def refused(self) -> None:
        """A due flush found the app holding the write lock. The drain goes on (acknowledging writes the state file
        only) and the flush is tried again at every step, never waiting for the lock; once the lock has been held
        past the busy timeout it is reported as a fault of the file (log, /readyz, `syncd_source_ok`) until a flush
        gets through."""
        now = time.monotonic()
        if self.refused_since is None:
            self.refused_since, self.refusal_reported = now, 0.0
        lasting = now - self.refused_since
        if lasting >= BUSY_TIMEOUT_MS / 1000 and now - self.refusal_reported >= FLUSH_REFUSAL_REPORT_EVERY:
            self.refusal_reported = now
            self.observer.source_fault("busy", fault_problem("busy", apsw.BusyError(), lasting), lasting,
                                       FLUSH_RETRY)

    def wal_bytes(self) -> int:
        """The size of the app's -wal now (0 when there is none, or when any size will do)."""
        if not self.checkpoint_from:
            return 0
        try:
            return os.stat(f"{self.source.path}-wal").st_size
        except OSError:
            return 0

    def wait_for_a_gap(self) -> None:
        """While the app is writing, wait (up to `gap_wait` seconds: GAP_WAIT, or none when `shared`) for the moment
        right after it commits: it is then between two transactions, where a transaction of ours cannot catch one of
        them between its read and its write (a deferred transaction that has read fails at once when it tries to write
        while another connection holds the write lock or has committed since its read: the busy handler is not called,
        as waiting could deadlock; https://sqlite.org/lang_transaction.html,
        https://sqlite.org/c3ref/busy_handler.html). The chunks that follow within GAP_BUDGET seconds of that commit
        need no new wait. An app that has committed nothing for APP_IDLE_AFTER seconds is idle: no wait. The first look
        waits once (a flush at a random moment of an app writing since before syncd started could catch one of its
        transactions); when no commit comes, the app counts as idle from then on, and the first flushes of a start wait
        no more."""
        conn = self.source.conn
        version = value_of(conn, "PRAGMA main.data_version")
        now = time.monotonic()
        first = self.app_version is None
        if first:  # the first look: a value to compare with, not a commit seen
            self.app_version = version
        elif version != self.app_version:  # a commit made since the last look, at a moment not known
            self.app_version, self.app_committed_at, self.gap_began = version, now, None
        if now - self.app_committed_at >= APP_IDLE_AFTER and not first:
            return  # idle; at the first look whether the app is writing is not known: one wait tells
        if self.gap_began is not None and now - self.gap_began < GAP_BUDGET:
            return  # still right after the commit this gap began with
        deadline = now + self.gap_wait
        while time.monotonic() < deadline:
            time.sleep(GAP_POLL)
            if (seen := value_of(conn, "PRAGMA main.data_version")) != version:
                self.app_version = seen
                self.app_committed_at = self.gap_began = time.monotonic()
                return

    def on_the_way_out(self, flush: Callable[[bool], None]) -> None:
        """At a clean stop, apply what was acked through `flush(final)`: at a quiet moment within FLUSH_DEADLINE
        seconds, else at once (left for the next start only when the file refuses)."""
        deadline = time.monotonic() + FLUSH_DEADLINE
        with contextlib.suppress(*SOURCE_FAULTS, FileMoved):
            while self.unflushed and time.monotonic() < deadline:
                self.next_flush_try, self.unflushed_since = 0.0, time.monotonic() - FLUSH_AFTER
                flush(False)
                if self.unflushed:
                    time.sleep(FLUSH_RETRY)
            flush(True)

    def due_in(self, poll_interval: float) -> float:
        """How long an idle loop may wait: `poll_interval`, or less when a flush falls due sooner."""
        if self.unflushed_since is None:
            return poll_interval
        due = max(self.unflushed_since + FLUSH_AFTER, self.next_flush_try) - time.monotonic()
        return max(0.0, min(poll_interval, due))
