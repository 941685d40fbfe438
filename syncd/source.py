"""The source: the application's SQLite file as the daemon lives with it. Its open connection, the file's
identity (device and inode) and its schema version, checked on every wake-up so that a migration, a restore
or a deleted file is noticed at once (DESIGN.md, "Living with a source that changes").

`others_in_transaction` tells whether another process is inside a transaction on the file right now (from the
locks SQLite holds on it), so that syncd commits to the app's file only when that cannot make an app
transaction fail.

A change of `PRAGMA schema_version` means the schema changed (SQLite increments it on every schema change,
ALTER TABLE and a table rebuilt by a migration included: https://sqlite.org/pragma.html#pragma_schema_version).
A change of identity means the file was replaced (a restore renames or copies a new file into place): the
connection still reads the old, deleted inode, so the source is reopened. A file that is gone is reported;
gone for good (longer than the grace the caller allows) it is fatal.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import apsw

from syncd import outbox, sqlite, state

STALE_SETTLE = 2.0  # seconds a lost WAL index may stay missing before syncd reads the file anew (see Source.settled)

__all__ = ["Event", "Identity", "LockProbe", "LockWait", "Source", "StaleWalIndex", "identity", "side_connection"]


@dataclass(frozen=True)
class Identity:
    """What makes a file the same file: its device and inode."""

    device: int
    inode: int


def identity(path: Path) -> Identity | None:
    """The identity of the file at `path` now; None when there is no file there."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return Identity(stat.st_dev, stat.st_ino)


class Event(enum.Enum):
    """What `Source.check` found since the last check."""

    NONE = "none"
    SCHEMA = "schema changed"
    REPLACED = "file replaced"
    STALE = "WAL index lost"  # the -shm our connection maps is no longer the file's: it reads a dead WAL
    GONE = "file gone"


class Source:
    """The application's file, open. `conn` changes when the file is replaced and `reopen` is called;
    read it through this object, never keep a copy of it."""

    def __init__(self, path: Path, conn: apsw.Connection | None = None) -> None:
        """Open `path` (or adopt `conn`, already open on it) without reading it yet: nothing here waits for a lock.
        Raises sqlite.DatabaseNotFound when there is no file."""
        self.path = path
        # The identity first: a file replaced between the two steps is then seen (and reopened) at the next check.
        self.identity = identity(path)
        # No SQL yet, not even the state file's ATTACH: in rollback-journal mode an app's EXCLUSIVE lock makes any
        # statement wait; `configure` does it later, where waiting is handled.
        if conn is not None:  # a connection given (a test's VFS) needs syncd's SQL functions, as connect adds them
            sqlite.register_functions(conn)
            sqlite.refuse_quoted_strings(conn)
        self.conn = conn if conn is not None else sqlite.connect(path)
        self.schema_version: int | None = None
        self.configured = False
        self.wal = True
        self.wal_index: os.stat_result | None = None  # the -shm our connection maps, as it was when it first read
        self.wal_file: os.stat_result | None = None  # the -wal our connection reads, likewise
        self.shares_stale_index = False
        self.stale_since: float | None = None  # when a lost WAL index was first seen (monotonic)
        self.probe: LockProbe | None = None

    def configure(self) -> None:
        """Settle the connection once it can read the file (raises apsw.BusyError while an exclusive lock is held,
        in rollback-journal mode): attach the state file (`syncd.state`, created when missing); in WAL mode
        syncd's own commits skip the fsync, since a lost acknowledgement (a power cut before the WAL reaches the
        disk) only means entries ship again; outside WAL, NORMAL is not corruption-safe, so SQLite's default stays
        (https://sqlite.org/pragma.html#pragma_synchronous)."""
        if self.configured:
            return
        if "st" not in {row[1] for row in self.conn.execute("PRAGMA database_list")}:
            state.attach(self.conn, self.path)
        state.ensure(self.conn, self.path)
        self.wal = sqlite.value_of(self.conn, "PRAGMA main.journal_mode") == "wal"
        if self.wal:
            self.conn.execute("PRAGMA main.synchronous = NORMAL")
            self.wal_index = wal_index(self.path)
            self.wal_file = stat_or_none(f"{self.path}-wal")
            # Opened while another connection of this process still maps a deleted WAL index, this one reads
            # through it too (SQLite shares it per inode): then it is lost from the start.
            self.shares_stale_index = sqlite.stale_wal_index_mapped(self.path)
        self.conn.execute("PRAGMA st.synchronous = NORMAL")  # the state file is WAL: a lost write ships again
        if self.schema_version is None:
            self.schema_version = self.read_schema_version()
        self.configured = True

    def read_schema_version(self) -> int:
        """SQLite's schema cookie; raises apsw.BusyError while a writer holds an exclusive lock (rollback mode)."""
        return sqlite.schema_version(self.conn)

    def check(self) -> Event:
        """What changed since the last check: the file gone or replaced (checked first), the WAL index our
        connection maps no longer the file's, else the schema. A schema change is reported once; a replacement,
        a lost WAL index or an absence until `reopen` succeeds."""
        now = identity(self.path)
        if now is None:
            return Event.GONE
        if now != self.identity:
            return Event.REPLACED
        if self.wal_index_lost():
            return Event.STALE
        version = self.read_schema_version()
        if self.schema_version is None:
            self.schema_version = version
        elif version != self.schema_version:
            self.schema_version = version
            return Event.SCHEMA
        return Event.NONE

    def wal_index_lost(self) -> bool:
        """Whether the -shm at the path is no longer the one our connection maps (deleted, or deleted and made
        anew): our connection then reads a WAL nobody writes, and sees no commit of the app's any more. SQLite
        deletes them only when no other connection holds a lock on the file, so this means syncd's lock was lost."""
        if not self.configured or not self.wal or self.wal_index is None:
            return False
        if self.shares_stale_index:
            return True
        now = wal_index(self.path)
        return now is None or (now.st_dev, now.st_ino) != (self.wal_index.st_dev, self.wal_index.st_ino)

    def wal_left_behind(self) -> int:
        """After a replacement: the size of the `-wal` at the path when it is still the one the old file's connection
        reads and holds frames (more than SQLite's 32-byte header), else 0. Those frames are the old file's pages:
        SQLite pairs a database with its WAL by name, so every connection to the new file would read them as its
        own (https://sqlite.org/howtocorrupt.html, 2.4: the restored file then reads as corrupt)."""
        now = stat_or_none(f"{self.path}-wal")
        if now is None or self.wal_file is None or (now.st_dev, now.st_ino) != (self.wal_file.st_dev,
                                                                               self.wal_file.st_ino):
            return 0
        return now.st_size if now.st_size > WAL_HEADER_BYTES else 0

    def settled(self) -> bool:
        """After a lost WAL index (Event.STALE, the file the same): whether to read the file anew now. A restore
        deletes -wal and -shm, then renames a backup into place; a connection opened in between makes a new -wal at
        the path, and the restored file would pair with it, frames of the old file and all. So syncd waits
        STALE_SETTLE seconds for the rename, unless another process has made a -shm again (the app reads the file)."""
        now = time.monotonic()
        if self.stale_since is None:
            self.stale_since = now
        return wal_index(self.path) is not None or now - self.stale_since >= STALE_SETTLE

    def checkpoint(self) -> None:
        """A PASSIVE checkpoint of the WAL (never waits for, never blocks, the app); raises sqlite.FileMoved, with
        nothing copied, when the file or its WAL index at the path is no longer the one the connection reads: a
        checkpoint through the old file's connection would mark the new file's frames as copied into it."""
        if identity(self.path) != self.identity or self.wal_index_lost():
            raise sqlite.FileMoved(f"{self.path} was replaced, or its WAL index deleted, while syncd had it open: "
                                   "no checkpoint through the old connection; the file is read anew")
        self.conn.execute("PRAGMA main.wal_checkpoint(PASSIVE)").fetchall()

    def reopen(self, *, configure: bool = True) -> None:
        """Open the file now at `path` (after a replacement, or a lost WAL index), configured as at start (the state
        file attached) unless `configure` is False, and close the old connection. Raises sqlite.SourceFileError (the
        old connection kept, the replacement still pending) when the new file is not one syncd can use, and
        apsw.BusyError (the new connection kept, not configured yet: `configure` again) while the app holds an
        exclusive lock.

        The old connection closes without SQLite's checkpoint on close (`sqlite.close`): the file it read is
        replaced, or its WAL index deleted, and that checkpoint would delete the live file's -wal and -shm. When the
        inode is the same (a lost WAL index), it closes before the new one opens, so that the new one does not
        share the old one's deleted WAL index (SQLite shares it among a process's connections to an inode)."""
        now = identity(self.path)
        if now is not None and now == self.identity:
            sqlite.check(self.path)
            sqlite.close(self.conn, checkpoint=False)
            self.conn = sqlite.connect(self.path)
        else:
            old, self.conn = self.conn, sqlite.connect(self.path)
            sqlite.close(old, checkpoint=False)
        self.identity = now
        self.schema_version, self.configured, self.wal_index, self.probe = None, False, None, None
        self.wal_file = None
        self.shares_stale_index, self.stale_since = False, None
        if configure:
            self.configure()

    def others_in_transaction(self) -> bool:
        """Whether another process holds a lock on the app's file that a transaction holds (see LockProbe)."""
        if self.probe is None or self.probe.database != self.path or self.probe.identity != self.identity:
            self.probe = LockProbe(self.path, self.identity, wal=self.wal)
        return self.probe.others_in_transaction()

    # -- continuity: is this the file syncd last shipped from? ---------------------------------------------

    def discontinuity(self, *, thorough: bool = False) -> str | None:
        """Why the file is not the one syncd last shipped from, as the state file recorded it (None when it is): a
        position other than the one syncd's last flush gave it (a copy restored from a backup, whatever its inode),
        another inode (replaced while syncd was not running), no position (a copy from before install), or, with
        `thorough` (at start and takeover), entries syncd shipped that the outbox no longer holds (a backup taken
        after the last flush but before those changes). A state file with no record of a file syncd has flushed
        before is a discontinuity too: what the secondary holds cannot be told. A flush whose state-file half was
        lost to a crash (the app's file one flush ahead) is completed here. Under the lease only."""
        if not outbox.installed(self.conn):
            return None  # nothing to compare: `prepare` says to run syncd install
        position = outbox.file_position(self.conn)
        recorded = outbox.recorded_source(self.conn)
        inode = self.identity.inode if self.identity else None
        if recorded is None:
            if position is not None and position.flushes > 0:
                return ("the state file has no record of this database file, which syncd has shipped from before "
                        "(the state file was lost or replaced): what the secondary holds cannot be told")
            self.remember(position)
            return None
        if position is None:
            return "the database file carries no position of syncd's (a copy from before syncd install?)"
        if position.generation != recorded.position.generation:
            return (f"the database file is of another installation of syncd ({outbox.describe_position(position)}, "
                    f"recorded: {outbox.describe_position(recorded.position)})")
        if position.flushes == recorded.position.flushes + 1:  # the flush's app half committed, its state half not
            outbox.forget_flushed(self.conn)
            self.remember(position)
            return None
        if position.flushes != recorded.position.flushes:
            return (f"the database file is at another position than syncd last left it ({position.flushes} flushes, "
                    f"recorded {recorded.position.flushes}): a copy restored from a backup?")
        if recorded.inode is not None and inode != recorded.inode:
            return (f"the database file is another file (inode {inode}) than the one syncd last shipped from "
                    f"(inode {recorded.inode}): replaced while syncd was not running?")
        if thorough and (missing := outbox.acked_missing(self.conn)):
            return (f"{missing} outbox entries syncd has shipped are not in the database file: a copy restored from a "
                    "backup taken before those changes?")
        if recorded.inode is None:
            self.remember(position)
        return None

    def remember(self, position: outbox.Position | None = None) -> None:
        """Record the file as it is now (its position, given one when it has none, and its inode) as the one syncd
        ships from (after adopting it)."""
        position = position or outbox.file_position(self.conn) or outbox.position_for_new_file(self.conn)
        outbox.record_source(self.conn, position, self.identity.inode if self.identity else None)


class StaleWalIndex(sqlite.SourceFileError):
    """A connection of this process would read the app's file through a deleted WAL index (see
    sqlite.stale_wal_index_mapped): the worker is reopening the file; try again in a moment."""


@contextlib.contextmanager
def side_connection(database: Path) -> Iterator[apsw.Connection]:
    """Another connection of the daemon's to the app's file (the reconciler's), with the state file attached
    (state.connect), for the length of one job. Raises StaleWalIndex, before anything is read through it, when it
    would read through a deleted WAL index; closes without SQLite's checkpoint on close when the file was replaced
    or its WAL index deleted meanwhile (see Source.reopen)."""
    opened = identity(database)
    conn = state.connect(database)
    try:
        conn.execute("SELECT 1 FROM main.sqlite_schema LIMIT 1").fetchall()  # maps the WAL index (in WAL mode)
        if sqlite.stale_wal_index_mapped(database):
            raise StaleWalIndex(f"the WAL index of {database} was deleted while syncd had the file open; the file is "
                                "being reopened (retried)")
        yield conn
    finally:
        unchanged = identity(database) == opened and not sqlite.stale_wal_index_mapped(database)
        sqlite.close(conn, checkpoint=unchanged)


def wal_index(database: Path) -> os.stat_result | None:
    """The -shm of `database` now; None when there is none."""
    return stat_or_none(f"{database}-shm")


def stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


WAL_HEADER_BYTES = 32  # https://sqlite.org/fileformat.html#the_write_ahead_log


# SQLite's locks, as its unix VFS places them (https://sqlite.org/walformat.html, "The WAL-Index File Format",
# and https://sqlite.org/lockingv3.html): in WAL mode the -shm's lock bytes 120-127 (write, checkpoint,
# recover, the five read marks); in rollback-journal mode the database file's PENDING, RESERVED and SHARED range.
WAL_LOCKS = (120, 8)
ROLLBACK_LOCKS = (0x40000000, 512)
FLOCK = "hhqqi"  # struct flock on Linux x86-64 and aarch64: l_type, l_whence, l_start, l_len, l_pid


class LockProbe:
    """Asks the kernel whether another process holds one of SQLite's transaction locks on the app's file (F_GETLK:
    POSIX record locks of this process never conflict with its own, so only other processes are seen).

    It opens nothing: it borrows the descriptor SQLite's own connection of this process has open on that file
    (found in /proc/self/fd, by device and inode). Opening and closing a descriptor of our own would drop every POSIX
    lock this process holds on the file, SQLite's included (https://sqlite.org/howtocorrupt.html, 2.1), and another
    process's connection could then delete the -wal our connection still reads. Without such a descriptor (no
    connection of this process has read the file yet) it cannot tell."""

    def __init__(self, database: Path, identity: Identity | None, *, wal: bool) -> None:
        self.database, self.identity = database, identity
        self.path, (self.start, self.length) = (f"{database}-shm", WAL_LOCKS) if wal else (str(database),
                                                                                           ROLLBACK_LOCKS)
        self.descriptor: int | None = None

    def others_in_transaction(self) -> bool:
        """True while another process is inside a transaction on the file (a read transaction holds a read mark of
        the WAL index, a writer the write lock; in rollback-journal mode SHARED or more), and when it cannot tell."""
        try:
            return self.holder(self.start, self.length) is not None
        except OSError:
            return True

    def holder(self, start: int, length: int) -> int | None:
        """The pid of a process holding a lock on bytes `start`..`start + length` of the probed file, None when
        none does (or the file does not exist). Raises OSError when it cannot tell (no connection of this process
        has the file open, or the descriptor changed while it asked)."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return None  # no -shm: no connection has the file open in WAL mode (ours open it lazily)
        if self.descriptor is None or not same_file(self.descriptor, current):
            self.descriptor = descriptor_of(current)
        if self.descriptor is None:
            raise OSError(f"no connection of this process has {self.path} open")
        probe = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, length, 0)
        kind, _, _, _, pid = struct.unpack(FLOCK, fcntl.fcntl(self.descriptor, fcntl.F_GETLK, probe))
        if not same_file(self.descriptor, current):  # SQLite closed it meanwhile: the answer was about another file
            self.descriptor = None
            raise OSError(f"the descriptor of {self.path} changed while asking")
        return None if kind == fcntl.F_UNLCK else pid


def descriptor_of(file: os.stat_result) -> int | None:
    """A descriptor this process already has open on `file` (SQLite's own, in practice), found in /proc/self/fd by
    device and inode without opening anything; None when there is none."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for name in names:
        try:
            linked = os.stat(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (or the listing's own descriptor)
            continue
        if (linked.st_dev, linked.st_ino) == (file.st_dev, file.st_ino):
            return int(name)
    return None


def same_file(descriptor: int, file: os.stat_result) -> bool:
    """Whether `descriptor` is open on `file` (same device and inode)."""
    try:
        opened = os.fstat(descriptor)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) == (file.st_dev, file.st_ino)


# The bytes a writer locks (https://sqlite.org/walformat.html; https://sqlite.org/lockingv3.html): WAL mode's
# write lock in the -shm, rollback mode's RESERVED and PENDING bytes, then its SHARED range (a reader at commit).
WRITER_LOCKS = ((True, 120, 1), (False, 0x40000000, 2), (False, 0x40000002, 510))
WAIT_FIRST_REPORT = 1.0  # seconds of waiting before the first "waiting for the lock" line
WAIT_REPORT_EVERY = 5.0  # seconds between "still waiting" lines
WAIT_STEP = 0.05  # seconds slept per call of the busy handler


class LockWait:
    """A busy handler for a command's connection (apsw `Connection.set_busy_handler`): while another process holds
    the lock SQLite needs, wait, and every WAIT_REPORT_EVERY seconds `report` who holds it (pid and process name, as
    the kernel's F_GETLK tells) and for how long we have waited; after `limit` seconds give up (the statement then
    raises apsw.BusyError, and `describe` says who held it). Its probes open nothing (see LockProbe)."""

    def __init__(self, database: Path, limit: float, report: Callable[[str], None]) -> None:
        self.database, self.limit, self.report = database, limit, report
        self.probes = {wal: LockProbe(database, identity(database), wal=wal) for wal in (True, False)}
        self.since: float | None = None
        self.next_report = 0.0

    def __call__(self, calls: int) -> bool:
        now = time.monotonic()
        if calls == 0 or self.since is None:
            self.since, self.next_report = now, now + WAIT_FIRST_REPORT  # not for a blip
        waited = now - self.since
        if waited >= self.limit:
            return False
        if now >= self.next_report:
            self.next_report = now + WAIT_REPORT_EVERY
            holder = self.holder()
            what = (EXCLUSIVE_MODE if holder and holder[1] and wal_mode(self.database) else
                    "a migration or a long batch?")
            self.report(f"waiting for the lock on {self.database}: {self.who()} holds it ({what}); waited "
                        f"{waited:.0f} s of up to {self.limit:.0f} s (--lock-wait); Ctrl-C stops, nothing is changed "
                        "until syncd gets the lock")
        time.sleep(WAIT_STEP)
        return True

    def who(self) -> str:
        """`process 4242 (python3)`, or `another process` when the kernel does not tell."""
        holder = self.holder()
        return f"process {holder[0]}{process_name(holder[0])}" if holder else "another process"

    def holder(self) -> tuple[int, bool] | None:
        """(pid, whether the lock is on the database file itself) of a process holding a writer's lock, None when
        the kernel does not tell."""
        for wal, start, length in WRITER_LOCKS:
            try:
                pid = self.probes[wal].holder(start, length)
            except OSError:
                continue
            if pid:
                return pid, not wal
        return None

    def describe(self) -> str:
        """The message for giving up: who held the lock, which, how long we waited, what to do. In WAL mode a lock
        on the database file itself (not its -shm) is what `PRAGMA locking_mode=EXCLUSIVE` takes and keeps for as
        long as that connection is open (https://sqlite.org/pragma.html#pragma_locking_mode): no other process can
        read the file meanwhile, so waiting longer will not help."""
        waited = 0.0 if self.since is None else time.monotonic() - self.since
        holder = self.holder()
        who = f"process {holder[0]}{process_name(holder[0])}" if holder else "another process"
        if holder and holder[1] and wal_mode(self.database):
            return (f"{who} holds an exclusive lock on the database file {self.database} itself (syncd waited "
                    f"{waited:.0f} s): {EXCLUSIVE_MODE}; nothing was changed. syncd needs the app in "
                    "locking_mode=NORMAL (SQLite's default): remove that PRAGMA from the app")
        return (f"{who} held the lock on {self.database} for the {waited:.0f} s syncd waited; nothing was "
                "changed: run the command again once the application's transaction (a migration? a long batch?) "
                "is done")


EXCLUSIVE_MODE = ("in WAL mode, a lock on the file itself is an application connection in PRAGMA "
                  "locking_mode=EXCLUSIVE, which keeps every other process out, syncd included, for as long as it is "
                  "open")


def wal_mode(database: Path) -> bool:
    """Whether the file's header says WAL (bytes 18 and 19 are 2: https://sqlite.org/fileformat.html), read through
    SQLite's VFS like every read of syncd's (see sqlite.read_header); False when it cannot be read."""
    try:
        header = sqlite.read_header(database, 20)
    except (OSError, sqlite.SourceFileError, apsw.Error):
        return False
    return len(header) >= 20 and header[18] == 2 and header[19] == 2


def process_name(pid: int) -> str:
    """` (python3)`: the process's name from /proc, empty where there is none."""
    try:
        return f" ({Path(f'/proc/{pid}/comm').read_text().strip()})"
    except OSError:
        return ""
