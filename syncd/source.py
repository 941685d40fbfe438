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

import enum
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import apsw

from syncd import sqlite, state

__all__ = ["Event", "Identity", "Source", "identity"]


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
        self.conn = conn if conn is not None else sqlite.connect(path)
        self.schema_version: int | None = None
        self.configured = False
        self.wal = True
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
        self.wal = self.conn.execute("PRAGMA main.journal_mode").fetchone()[0] == "wal"
        if self.wal:
            self.conn.execute("PRAGMA main.synchronous = NORMAL")
        self.conn.execute("PRAGMA st.synchronous = NORMAL")  # the state file is WAL: a lost write ships again
        if self.schema_version is None:
            self.schema_version = self.read_schema_version()
        self.configured = True

    def read_schema_version(self) -> int:
        """SQLite's schema cookie; raises apsw.BusyError while a writer holds an exclusive lock (rollback mode)."""
        return int(self.conn.execute("PRAGMA schema_version").fetchone()[0])

    def check(self) -> Event:
        """What changed since the last check: the file gone or replaced (checked first), else the schema.
        A schema change is reported once; a replacement or absence until `reopen` succeeds."""
        now = identity(self.path)
        if now is None:
            return Event.GONE
        if now != self.identity:
            return Event.REPLACED
        version = self.read_schema_version()
        if self.schema_version is None:
            self.schema_version = version
        elif version != self.schema_version:
            self.schema_version = version
            return Event.SCHEMA
        return Event.NONE

    def reopen(self) -> None:
        """Open the file now at `path` (after a replacement), and close the old connection."""
        self.identity = identity(self.path)
        old, self.conn = self.conn, sqlite.connect(self.path)
        self.schema_version, self.configured = None, False
        old.close()
        if self.probe is not None:  # after the old connection: closing its descriptor drops this process's locks
            self.probe.close()
            self.probe = None

    def others_in_transaction(self) -> bool:
        """Whether another process holds a lock on the app's file that a transaction holds (see LockProbe)."""
        if self.probe is None or self.probe.database != self.path or self.probe.identity != self.identity:
            if self.probe is not None:
                self.probe.close()
            self.probe = LockProbe(self.path, self.identity, wal=self.wal)
        return self.probe.others_in_transaction()


# SQLite's locks, as its unix VFS places them (https://sqlite.org/walformat.html, "The WAL-Index File Format",
# and https://sqlite.org/lockingv3.html): in WAL mode the -shm's lock bytes 120-127 (write, checkpoint,
# recover, the five read marks); in rollback-journal mode the database file's PENDING, RESERVED and SHARED range.
WAL_LOCKS = (120, 8)
ROLLBACK_LOCKS = (0x40000000, 512)
FLOCK = "hhqqi"  # struct flock on Linux x86-64 and aarch64: l_type, l_whence, l_start, l_len, l_pid


class LockProbe:
    """Asks the kernel whether another process holds one of SQLite's transaction locks on the app's file (F_GETLK:
    POSIX record locks of this process never conflict with its own, so only other processes are seen).

    The descriptor stays open for the life of the probe: closing any descriptor of a file drops every POSIX lock
    this process holds on it, SQLite's own included (https://sqlite.org/howtocorrupt.html, 2.1), so it is closed
    only after the connection to that file is gone (`Source.reopen`)."""

    def __init__(self, database: Path, identity: Identity | None, *, wal: bool) -> None:
        self.database, self.identity = database, identity
        self.path, (self.start, self.length) = (f"{database}-shm", WAL_LOCKS) if wal else (str(database),
                                                                                           ROLLBACK_LOCKS)
        self.descriptor: int | None = None
        self.stale: list[int] = []

    def others_in_transaction(self) -> bool:
        """True while another process is inside a transaction on the file (a read transaction holds a read mark of
        the WAL index, a writer the write lock; in rollback-journal mode SHARED or more), and when it cannot tell."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False  # no -shm: no connection has the file open in WAL mode (ours open it lazily)
        except OSError:
            return True
        if self.descriptor is not None and os.fstat(self.descriptor).st_ino != current:
            self.stale.append(self.descriptor)  # a new -shm: never close the old one while our connection lives
            self.descriptor = None
        if self.descriptor is None:
            try:
                self.descriptor = os.open(self.path, os.O_RDONLY)
            except OSError:
                return True
        try:
            probe = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, self.start, self.length, 0)
            answer = fcntl.fcntl(self.descriptor, fcntl.F_GETLK, probe)
        except OSError:
            return True
        return struct.unpack(FLOCK, answer)[0] != fcntl.F_UNLCK

    def close(self) -> None:
        """Close the descriptor (only once no connection of this process uses that file any more)."""
        for descriptor in [*self.stale, *([self.descriptor] if self.descriptor is not None else [])]:
            os.close(descriptor)
        self.descriptor, self.stale = None, []
