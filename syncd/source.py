"""The source: the application's SQLite file as the daemon lives with it. Its open connection, the file's
identity (device and inode) and its schema version, checked on every wake-up so that a migration, a restore
or a deleted file is noticed at once (DESIGN.md, "Living with a source that changes").

A change of `PRAGMA schema_version` means the schema changed (SQLite increments it on every schema change,
ALTER TABLE and a table rebuilt by a migration included: https://sqlite.org/pragma.html#pragma_schema_version).
A change of identity means the file was replaced (a restore renames or copies a new file into place): the
connection still reads the old, deleted inode, so the source is reopened. A file that is gone is reported;
gone for good (longer than the grace the caller allows) it is fatal.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

import apsw

from syncd import sqlite

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
        self.conn = conn if conn is not None else sqlite.connect(path)
        self.schema_version: int | None = None
        self.configured = False

    def configure(self) -> None:
        """Settle the connection once it can read the file (raises apsw.BusyError while an exclusive lock is held,
        in rollback-journal mode): in WAL mode syncd's own commits skip the fsync, since a lost acknowledgement
        (a power cut before the WAL reaches the disk) only means entries ship again; outside WAL, NORMAL is not
        corruption-safe, so SQLite's default stays (https://sqlite.org/pragma.html#pragma_synchronous)."""
        if self.configured:
            return
        if self.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            self.conn.execute("PRAGMA synchronous = NORMAL")
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
