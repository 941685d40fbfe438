"""Opening the application's SQLite file through apsw, the way every syncd command does."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw

BUSY_TIMEOUT_MS = 5000


HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database (https://sqlite.org/fileformat.html)


class SourceFileError(Exception):
    """The application's file cannot be used as it is: missing, a directory, not SQLite, not readable or not
    writable. The message names the file, what is wrong and the fix."""


class DatabaseNotFound(SourceFileError):
    """The database file does not exist (syncd never creates one)."""


class SchemaMoved(Exception):
    """The file's schema changed since what syncd planned was read from it (`PRAGMA schema_version` moved): the plan
    is stale and nothing was read or written through it; plan again."""


class FileMoved(SourceFileError):
    """A commit of syncd's was refused, and rolled back with nothing written, because the file at the path is no
    longer the one the connection has open (a restore renamed or copied another one into place) or its WAL index
    (`-shm`) no longer the one the connection maps (deleted under it). The file is to be read anew."""


def connect(path: Path, *, readonly: bool = False, setting: str = "source.path") -> apsw.Connection:
    """Open an existing database (never create one: a typo in source.path must not make an empty file), with a
    busy timeout of BUSY_TIMEOUT_MS. Nothing is read through SQLite yet (no statement: in rollback-journal mode an
    app's EXCLUSIVE lock makes any wait). Raises DatabaseNotFound when `path` does not exist, SourceFileError when
    it is a directory, not a SQLite database, or not readable (or, unless `readonly`, not writable) for this user;
    the messages name `setting` (the config key, or the flag of a command that has no config)."""
    check(path, readonly=readonly, setting=setting)
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    guard = None if readonly else CommitGuard(path)  # before the open: what the connection opens is this file
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    if guard is not None:
        conn.set_commit_hook(guard)
    register_functions(conn)
    refuse_quoted_strings(conn)
    conn.collation_needed(stand_in_collation)
    return conn


def schema_version(conn: apsw.Connection) -> int:
    """The main database's schema cookie, which SQLite increments on every schema change, ALTER TABLE and a table
    rebuilt by a migration included (https://sqlite.org/pragma.html#pragma_schema_version); inside a transaction,
    that of its snapshot. Raises apsw.BusyError while a writer holds an exclusive lock (rollback mode)."""
    return int(value_of(conn, "PRAGMA main.schema_version"))


def refuse_quoted_strings(conn: apsw.Connection) -> None:
    """Turn off SQLite's double-quoted string literals on syncd's connection: by default an identifier in double
    quotes that names no column is read as a string (https://sqlite.org/quirks.html#dblquote), so a statement
    planned before the app renamed a column would compare the key with the text 'id', find no row and ship a
    delete. With this off, it fails with "no such column" instead. The app's schema is unaffected: SQLite reads
    the stored schema with the legacy rule whatever the setting."""
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DML, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DQS_DDL, 0)


FileId = tuple[int, int]  # st_dev, st_ino


def file_id(path: Path | str) -> FileId | None:
    """The device and inode of the file at `path` now; None when there is none."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


class CommitGuard:
    """SQLite's commit hook on every connection of syncd's that may write the app's file: raises FileMoved (the
    commit then becomes a rollback: https://sqlite.org/c3ref/commit_hook.html) when the file at the path is not
    the inode the connection opened, or its `-shm` not the one it mapped at its first commit.

    SQLite pairs a database with its `-wal` and `-shm` by name only. A restore deletes them and renames a backup
    into place; a connection still open on the old inode (or opened on it in between) writes its frames into
    whatever `-wal` is at the path, and every connection to the new file then reads those frames as its own pages:
    the restored file is corrupt ("no such table", "malformed"; https://sqlite.org/howtocorrupt.html, 2.2 and 2.4).
    The check runs right before SQLite writes the commit, so a rename can slip in only during the commit itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.database = file_id(path)
        self.wal_index: FileId | None = None

    def __call__(self) -> bool:
        self.verify()
        return False  # let the commit go on

    def verify(self) -> None:
        """Raise FileMoved unless the connection's file and WAL index are still the ones at the path."""
        if file_id(self.path) != self.database:
            raise FileMoved(f"{self.path} was replaced while syncd had it open (a restore?): syncd's commit was "
                            "rolled back, the new file is read anew")
        shm = file_id(f"{self.path}-shm")
        if self.wal_index is None:  # the first commit (or still no WAL: rollback-journal mode)
            self.wal_index = shm
        elif shm != self.wal_index:
            raise FileMoved(f"the WAL index of {self.path} (-shm) was deleted while syncd had the file open: "
                            "syncd's commit was rolled back, the file is read anew")


class ForeignCollation(Exception):
    """A statement of syncd's had to compare two values by a collation only the application registers."""


def stand_in_collation(conn: apsw.Connection, name: str) -> None:
    """Register a stand-in for a collation the application registers itself (Anki's unicase), when SQLite asks for
    it (sqlite3_collation_needed): SQLite wants every collation a table or index declares before it prepares any
    statement on it (even a full scan of a WITHOUT ROWID table), though syncd never compares by one (it never writes
    the app's tables, and every comparison of its own says COLLATE BINARY or is on a key, where such a collation is
    refused up front). Should a statement ever compare by it, the stand-in raises ForeignCollation rather than guess
    an order, which could miss rows."""
    def refuse(left: str, right: str) -> int:
        raise ForeignCollation(f"this needs to compare by the collation {name!r}, which only the application "
                               "registers (syncd cannot know its order): leave such a column out of the condition")
    conn.create_collation(name, refuse)


def close(conn: apsw.Connection, *, checkpoint: bool = True) -> None:
    """Close `conn`; with `checkpoint` False, without the checkpoint SQLite's last connection to a file makes on
    close. That checkpoint is followed by deleting `-wal` and `-shm` by name (sqlite3WalClose in SQLite's wal.c):
    closed on a file that was replaced, or through a WAL index that was deleted under it, it would delete the
    live file's WAL, committed transactions and all, or copy a dead WAL's pages into it. SQLite skips both when
    SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE is set (https://sqlite.org/c3ref/c_dbconfig_defensive.html)."""
    if not checkpoint:
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.close()


def stale_wal_index_mapped(database: Path) -> bool:
    """Whether this process maps a WAL index (`-shm`) of `database` that is no longer the one at its path (deleted,
    or deleted and made anew). SQLite's unix VFS shares one WAL index among all connections of a process to one
    database inode (unixShmNode in os_unix.c), so a connection opened while another still maps a deleted one reads
    through that one too: a WAL nobody writes any more. From /proc/self/maps (Linux); False where there is none."""
    shm = os.path.realpath(database) + "-shm"
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(" (deleted)") and fields[5][: -len(" (deleted)")] == shm:
            return True
    return False


def register_functions(conn: apsw.Connection) -> None:
    """The SQL functions syncd's own statements use: `syncd_real_json(x)`, a REAL as the shortest text that gives
    back its double (Python's repr, JSON.stringify's, PostgreSQL's float8 output), to be wrapped in json(). SQLite's
    own rendering (json_object, quote, printf) uses 15 digits when they give the double back and 17 otherwise, so
    1.0/3 reads 0.33333333333333332: another decimal for a numeric or text column of the secondary."""
    conn.create_scalar_function("syncd_real_json", real_json, 1, deterministic=True)


def real_json(*values: apsw.SQLiteValue) -> apsw.SQLiteValue:  # one value (registered with 1 argument)
    value = values[0]
    return repr(value) if isinstance(value, float) else value


def check(path: Path, *, readonly: bool = False, setting: str = "source.path") -> None:
    """Refuse, with the fix, an application file syncd cannot use (see `connect`)."""
    if not path.exists():
        where = "source.path or SYNCD_DB" if setting == "source.path" else setting
        raise DatabaseNotFound(f"database file not found: {path} (check {where})")
    if path.is_dir():
        raise SourceFileError(f"{setting}: {path} is a directory; give the application's SQLite file")
    if not os.access(path, os.R_OK):
        raise SourceFileError(f"{setting}: cannot read {path} (permission denied): give syncd's user read access "
                              "to the file")
    header = read_header(path)
    if header and header != HEADER:  # an empty file is an empty database
        raise SourceFileError(f"{setting}: {path} is not a SQLite database (its first bytes are not SQLite's "
                              f"header); check {setting}")
    if not readonly and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        what = "the file" if not os.access(path, os.W_OK) else "its directory (SQLite creates -wal and -shm there)"
        raise SourceFileError(f"{setting}: cannot write to {path}: {what} is read-only for this user; syncd "
                              "records changes in it (check the owner and permissions)")


def read_header(path: Path, length: int = len(HEADER)) -> bytes:
    """The first `length` bytes of the file at `path` (default SQLite's magic string), read through SQLite's own VFS.

    Never with `open()`: closing any descriptor of a file drops every POSIX lock this process holds on it, SQLite's
    included, and then another process's connection may delete the -wal this process still reads
    (https://sqlite.org/howtocorrupt.html, 2.1). SQLite's unix VFS shares one record of each file among all of a
    process's opens and keeps a descriptor open while the process holds locks on that file, so a file it opens and
    closes drops nothing. Raises SourceFileError when the file cannot be opened."""
    flags = apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_MAIN_DB
    try:
        handle = apsw.VFSFile("", str(path), [flags, 0])
    except apsw.CantOpenError:
        raise SourceFileError(f"cannot open {path}: check that it is a file syncd's user may read") from None
    try:
        return bytes(handle.xRead(length, 0))
    finally:
        handle.xClose()


def value_of(conn: apsw.Connection, sql: str) -> Any:
    """The first column of the first row `sql` returns (a PRAGMA's value); raises LookupError when it returns none."""
    row = conn.execute(sql).fetchone()
    if row is None:
        raise LookupError(f"no row from {sql}")
    return row[0]


def quote_ident(name: str) -> str:
    """`name` as an SQL identifier: in double quotes, with `"` doubled."""
    return '"' + name.replace('"', '""') + '"'


def quote_text(value: str) -> str:
    """`value` as an SQL string literal: in single quotes, with `'` doubled."""
    return "'" + value.replace("'", "''") + "'"


def immediate(conn: apsw.Connection) -> contextlib.AbstractContextManager[apsw.Connection]:
    """A write transaction that takes the write lock up front (waiting up to the busy timeout)."""
    return transaction(conn, "BEGIN IMMEDIATE")


@contextlib.contextmanager
def transaction(conn: apsw.Connection, begin: str = "BEGIN") -> Iterator[apsw.Connection]:
    """A transaction opened with `begin` (BEGIN, BEGIN IMMEDIATE): committed at the end, rolled back (when still
    open) on any exception, which goes on."""
    conn.execute(begin)
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
