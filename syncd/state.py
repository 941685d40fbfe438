"""The state file: syncd's own bookkeeping, beside the application's file and never in it (`app.sqlite3-syncd`).

Every write syncd commits to the app's file makes a concurrent DEFERRED read-then-write transaction of the app
fail at once with "database is locked" (SQLite cannot upgrade a read snapshot that another connection's commit
made stale: https://sqlite.org/lang_transaction.html, "BEGIN DEFERRED"; SQLITE_BUSY_SNAPSHOT). So what changes
with every batch lives here: the journal of shipped keys, the daemon's state per table, the lease, reconcile
marks, and the outbox entries acknowledged but not yet deleted from the app's file (`acked`). The app's file
keeps the outbox (the triggers append to it), the dead letters (operators read them there) and what capture
itself needs (the installed keys).

Every connection syncd opens to the app's file has the state file attached as `st` (`connect`); a file that
does not exist yet is an empty in-memory stand-in for readers, and is created, with the app file's permissions,
by `ensure` (install, the daemon). Losing it is safe: entries acknowledged but not deleted ship again (upserts and
deletes by key are idempotent), the journal and the daemon's notes start afresh.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from pathlib import Path

import apsw

from syncd import sqlite

__all__ = ["SUFFIX", "connect", "ensure", "path_for", "remove", "writing"]

SUFFIX = "-syncd"
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS st.journal (
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        shipped_at REAL NOT NULL)""",  # unix seconds
    "CREATE INDEX IF NOT EXISTS st.journal_shipped_at ON journal (shipped_at)",
    # The journal as written since issue 21: one row per acknowledged batch and table, its keys a JSON array of
    # outbox keys (one row of 500 keys costs the acknowledgement what one key did). `st.journal` is still read:
    # the rows an older syncd wrote there expire as before.
    """CREATE TABLE IF NOT EXISTS st.journal_batches (
        tbl TEXT NOT NULL,
        keys TEXT NOT NULL,
        shipped_at REAL NOT NULL)""",  # unix seconds
    "CREATE INDEX IF NOT EXISTS st.journal_batches_shipped_at ON journal_batches (shipped_at)",
    """CREATE TABLE IF NOT EXISTS st.meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # Outbox entries settled by the daemon but still in the app's outbox, identified by (seq, at) so that an entry
    # of a restored file that reuses a seq is never mistaken for one. fate: shipped | dead | requeue | merged.
    """CREATE TABLE IF NOT EXISTS st.acked (
        seq INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        fate TEXT NOT NULL,
        since REAL,  -- dead: when the key's oldest change was written (unix s); requeue: the Julian day it keeps
        failed_at REAL,
        status INTEGER,
        code TEXT,
        message TEXT)""",
    # The few entries a flush handles apart from the shipped ones (dead letters, requeues), found without a scan.
    "CREATE INDEX IF NOT EXISTS st.acked_apart ON acked (fate, seq) WHERE fate IN ('dead', 'requeue')",
]


def path_for(database: Path) -> Path:
    """The state file of the app's file at `database`: the same path with `-syncd` appended."""
    return database.with_name(database.name + SUFFIX)


def connect(database: Path, *, readonly: bool = False) -> apsw.Connection:
    """Open the app's file as every syncd command does (sqlite.connect), with its state file attached as `st`
    (an empty stand-in when there is none yet). Raises sqlite.DatabaseNotFound when the app's file is missing."""
    conn = sqlite.connect(database, readonly=readonly)
    attach(conn, database)
    return conn


def attach(conn: apsw.Connection, database: Path) -> None:
    """Attach the state file of `database` to `conn` as `st`; an in-memory stand-in when it does not exist."""
    state = path_for(database)
    if state.exists():
        try:
            conn.execute("ATTACH DATABASE ? AS st", (str(state),))
            if not conn.readonly("st"):
                create_schema(conn)
        except (apsw.NotADBError, apsw.CorruptError, apsw.CantOpenError, apsw.IOError) as exc:
            conn.execute("SELECT count(*) FROM main.sqlite_schema").fetchall()  # raises when the app's file is damaged
            raise sqlite.SourceFileError(
                f"the state file {state} cannot be used ({exc}; a directory, or not a state file syncd wrote): move it "
                "aside and run the command again; syncd writes a new one (losing it is safe: README, 'the state "
                "file')") from None
        return
    conn.execute("ATTACH DATABASE ':memory:' AS st")
    conn.deserialize("st", empty_image())  # an attached database inherits read-only: load the tables instead


@functools.cache
def empty_image() -> bytes:
    """A serialized empty state file (its tables, no rows): the stand-in for a state file that does not exist."""
    memory = apsw.Connection(":memory:")
    memory.execute("ATTACH DATABASE ':memory:' AS st")
    create_schema(memory)
    return memory.serialize("st")


def ensure(conn: apsw.Connection, database: Path) -> None:
    """Make `st` the real state file of `database`, creating it (WAL, the app file's permissions, no more readable
    than the app's file) when it does not exist. Raises OSError when it cannot be created."""
    state = path_for(database)
    if conn.db_filename("st") == str(state.resolve()) or conn.db_filename("st") == str(state):
        return
    if not state.exists():
        create(state, stat.S_IMODE(os.stat(database).st_mode))
    conn.execute("DETACH DATABASE st")
    attach(conn, database)


def create_private(path: Path, mode: int) -> bool:
    """Create an empty file at `path` with permissions `mode` (a file syncd writes is never more readable than the
    app's file it comes from; SQLite gives -wal and -shm the permissions of their database file). False when it
    exists already. Raises OSError (a missing directory, no permission)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o666)
    except FileExistsError:
        return False
    os.close(descriptor)
    os.chmod(path, mode & 0o666)  # the umask may have taken bits the app's file has
    return True


def create(path: Path, mode: int) -> None:
    """Create an empty state file at `path` with permissions `mode`, in WAL mode."""
    if not create_private(path, mode):
        return  # another process made it first
    conn = apsw.Connection(str(path))
    try:
        conn.execute("PRAGMA journal_mode = WAL").fetchall()  # the daemon writes it often; readers never wait
    finally:
        conn.close()


def create_schema(conn: apsw.Connection) -> None:
    """The state file's tables, where missing (nothing is written when they exist)."""
    for ddl in SCHEMA:
        conn.execute(ddl)


def writing(conn: apsw.Connection) -> contextlib.AbstractContextManager[apsw.Connection]:
    """A transaction that writes the state file only: DEFERRED, so that the write lock is taken on `st` alone
    when its first statement writes there (BEGIN IMMEDIATE would lock the app's file too). The first statement
    inside must be a write to `st`, so that no read snapshot is upgraded."""
    return sqlite.transaction(conn, "BEGIN")


def remove(conn: apsw.Connection, database: Path) -> None:
    """Detach the state file of `database` from `conn` and delete it, with its -wal and -shm (uninstall)."""
    conn.execute("DETACH DATABASE st")
    for path in (path_for(database), Path(f"{path_for(database)}-wal"), Path(f"{path_for(database)}-shm")):
        path.unlink(missing_ok=True)
    attach(conn, database)
