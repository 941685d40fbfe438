"""Opening the application's SQLite file through apsw, the way every syncd command does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import apsw

BUSY_TIMEOUT_MS = 5000


class DatabaseNotFound(Exception):
    """The database file does not exist (syncd never creates one)."""


def connect(path: Path, *, readonly: bool = False) -> apsw.Connection:
    """Open an existing database (never create one: a typo in source.path must not make an empty file), with a
    busy timeout of BUSY_TIMEOUT_MS. Raises DatabaseNotFound when `path` does not exist."""
    if not path.exists():
        raise DatabaseNotFound(f"database file not found: {path} (check source.path or SYNCD_DB)")
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE
    conn = apsw.Connection(str(path), flags=flags)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    return conn


def quote_ident(name: str) -> str:
    """`name` as an SQL identifier: in double quotes, with `"` doubled."""
    return '"' + name.replace('"', '""') + '"'


def quote_text(value: str) -> str:
    """`value` as an SQL string literal: in single quotes, with `'` doubled."""
    return "'" + value.replace("'", "''") + "'"


@contextlib.contextmanager
def immediate(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """A write transaction that takes the write lock up front (waiting up to the busy timeout)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
