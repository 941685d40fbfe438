"""The outbox: the lease, what is pending, and the claim / acknowledge steps of the drain loop.

The lease is a row of `_syncd_meta` written in a short IMMEDIATE transaction: one daemon holds it
and renews it; a holder that died stops renewing, and once `expires_at` has passed another may take it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import apsw

from syncd.capture import decode_key, julian_day, unix_time
from syncd.mapping import InvalidText
from syncd.sqlite import immediate, quote_ident

LEASE_KEY = "lease"
DEFAULT_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    expires_at: float

    def alive(self, now: float) -> bool:
        return self.expires_at > now


def read_lease(conn: apsw.Connection) -> LeaseInfo | None:
    row = conn.execute("SELECT value FROM _syncd_meta WHERE key = ?", (LEASE_KEY,)).fetchone()
    if row is None:
        return None
    data = json.loads(row[0])
    return LeaseInfo(data["holder"], data["host"], int(data["pid"]), float(data["expires_at"]))


class Lease:
    """The right to drain one database file. `acquire` and `renew` are the same step: take or extend."""

    def __init__(self, conn: apsw.Connection, seconds: float = DEFAULT_LEASE_SECONDS,
                 holder: str | None = None) -> None:
        self.conn = conn
        self.seconds = seconds
        self.holder = holder or uuid.uuid4().hex

    def acquire(self, now: float | None = None) -> bool:
        """Take the lease if it is free, expired or already ours; False while another live holder has it."""
        now = time.time() if now is None else now
        with immediate(self.conn):
            current = read_lease(self.conn)
            if current is not None and current.holder != self.holder and current.alive(now):
                return False
            value = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                     "expires_at": now + self.seconds}
            self.conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)",
                              (LEASE_KEY, json.dumps(value)))
        return True

    renew = acquire

    def release(self) -> None:
        """Give the lease up at a clean shutdown so the next daemon need not wait for expiry."""
        with self.conn:
            self.conn.execute("DELETE FROM _syncd_meta WHERE key = ? AND json_extract(value, '$.holder') = ?",
                              (LEASE_KEY, self.holder))


@dataclass(frozen=True)
class Pending:
    count: int
    oldest_at: float | None  # unix seconds


def pending_by_table(conn: apsw.Connection) -> dict[str, Pending]:
    rows = conn.execute("SELECT tbl, count(*), min(at) FROM _syncd_outbox GROUP BY tbl")
    return {table: Pending(count, unix_time(oldest) if oldest is not None else None) for table, count, oldest in rows}


def dead_letters_by_table(conn: apsw.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT tbl, count(*) FROM _syncd_dead_letter GROUP BY tbl").fetchall())


def table_state(conn: apsw.Connection, table: str) -> dict[str, object]:
    """What the daemon last recorded for a table: last_shipped_at, last_error, halted (written by `run`)."""
    row = conn.execute("SELECT value FROM _syncd_meta WHERE key = ?", (f"state:{table}",)).fetchone()
    return json.loads(row[0]) if row else {}


# -- claim: one snapshot of keys and their current rows ---------------------------------------------------

MAX_PARAMS = 30_000  # below SQLite's default limit of 32,766 host parameters


@dataclass
class Entry:
    seq: int
    op: str
    at: float  # unix seconds of the change


@dataclass
class Change:
    """One key of one table with every outbox entry claimed for it, and the row as it is now."""

    table: str
    key_text: str | bytes  # as stored in the outbox (bytes when it is not valid UTF-8)
    entries: list[Entry]
    key: tuple[object, ...] | None = None  # decoded; None when it cannot be
    row: dict[str, object] | None = None  # None: the row is gone (ship a delete)
    problem: str | None = None  # why it cannot be read at all (goes to the dead letters)
    raw_key: bytes = b""  # the key's bytes as read from the outbox (what claims compare)

    def __post_init__(self) -> None:
        if not self.raw_key:
            self.raw_key = self.key_text if isinstance(self.key_text, bytes) else self.key_text.encode("utf-8")

    @property
    def oldest_at(self) -> float:
        return min(e.at for e in self.entries)


def claim(conn: apsw.Connection, limit: int, keys: Mapping[str, Sequence[str]],
          in_flight: Sequence[Change] = ()) -> list[Change]:
    """The first `limit` outbox entries of the given tables, grouped by key, with the current row of each
    key, all read in one transaction so that the rows are the state at one instant.

    Entries and keys of `in_flight` (a batch whose request is under way) are left out: the same key is
    never in two requests at once, and its newer entries wait until that request is acknowledged.
    """
    if not keys:
        return []
    tables = list(keys)
    busy_seqs = json.dumps([e.seq for change in in_flight for e in change.entries])
    busy_keys = {(c.table, c.raw_key) for c in in_flight}
    conn.execute("BEGIN")
    try:
        rows = conn.execute(
            f"SELECT seq, tbl, CAST(key AS BLOB), op, at FROM _syncd_outbox WHERE tbl IN "
            f"({', '.join('?' * len(tables))}) AND seq NOT IN (SELECT value FROM json_each(?)) "
            "ORDER BY seq LIMIT ?", (*tables, busy_seqs, limit)).fetchall()
        changes = [c for c in group_entries(rows) if (c.table, c.raw_key) not in busy_keys]
        for table in dict.fromkeys(c.table for c in changes):
            readable = [c for c in changes if c.table == table and c.key is not None]
            attach_rows(conn, table, keys[table], readable)
    finally:
        conn.execute("COMMIT")
    return changes


def group_entries(rows: Sequence[tuple[int, str, bytes, str, float]]) -> list[Change]:
    by_key: dict[tuple[str, bytes], Change] = {}
    for seq, table, raw_key, op, at in rows:
        change = by_key.get((table, raw_key))
        if change is None:
            change = by_key[(table, raw_key)] = decode_change(table, raw_key)
        change.entries.append(Entry(seq, op, unix_time(at)))
    return list(by_key.values())


def decode_change(table: str, raw_key: bytes) -> Change:
    try:
        text = raw_key.decode("utf-8")
    except UnicodeDecodeError:
        return Change(table, raw_key, [], problem=f"table {table!r}: the key holds text that is not valid UTF-8 "
                                                  f"({raw_key[:40].hex()}...); fix the key in SQLite", raw_key=raw_key)
    try:
        return Change(table, text, [], key=decode_key(text), raw_key=raw_key)
    except ValueError as exc:
        return Change(table, text, [], problem=f"table {table!r}: {exc}", raw_key=raw_key)


def attach_rows(conn: apsw.Connection, table: str, key_columns: Sequence[str], changes: list[Change]) -> None:
    per_chunk = max(1, MAX_PARAMS // len(key_columns))
    for start in range(0, len(changes), per_chunk):
        chunk = changes[start:start + per_chunk]
        try:
            found = read_rows(conn, table, key_columns, [c.key for c in chunk])  # type: ignore[misc]
        except UnicodeDecodeError:
            found = read_rows(conn, table, key_columns, [c.key for c in chunk], safe=True)  # type: ignore[misc]
        for change in chunk:
            change.row = found.get(change.key)  # type: ignore[arg-type]


def read_rows(conn: apsw.Connection, table: str, key_columns: Sequence[str], keys: list[tuple[object, ...]],
              safe: bool = False) -> dict[tuple[object, ...], dict[str, object]]:
    """Current rows for `keys`, by key. `safe` reads TEXT as bytes so invalid UTF-8 cannot stop the batch."""
    columns = [r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})")]
    width = len(key_columns)
    select = safe_select(columns) if safe else ", ".join(quote_ident(c) for c in columns)
    key_sql = ", ".join(quote_ident(c) for c in key_columns)
    row_value = "(" + ", ".join("?" * width) + ")"
    matches = (f"{key_sql} IN ({', '.join('?' * len(keys))})" if width == 1 else
               f"({key_sql}) IN (VALUES {', '.join([row_value] * len(keys))})")
    params = [value for key in keys for value in key]
    found = {}
    for values in conn.execute(f"SELECT {select} FROM {quote_ident(table)} WHERE {matches}", params):
        row = decode_safe_row(columns, values) if safe else dict(zip(columns, values, strict=True))
        found[tuple(row[c] for c in key_columns)] = row
    return found


def safe_select(columns: Sequence[str]) -> str:
    """A select list that reads TEXT as bytes (type, value per column), so invalid UTF-8 cannot stop a read;
    `decode_safe_row` turns such a row back into values."""
    return ", ".join(f"typeof({quote_ident(c)}), CASE typeof({quote_ident(c)}) WHEN 'text' THEN "
                     f"CAST({quote_ident(c)} AS BLOB) ELSE {quote_ident(c)} END" for c in columns)


def decode_safe_row(columns: list[str], values: Sequence[object]) -> dict[str, object]:
    row: dict[str, object] = {}
    for i, column in enumerate(columns):
        kind, value = values[2 * i], values[2 * i + 1]
        if kind == "text":
            assert isinstance(value, bytes)
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = InvalidText(value)
        row[column] = value
    return row


# -- acknowledge: one short write transaction ----------------------------------------------------------


@dataclass
class DeadLetter:
    change: Change
    message: str
    status: int | None = None
    code: str | None = None


def acknowledge(conn: apsw.Connection, shipped: Sequence[Change], dead: Sequence[DeadLetter],
                requeued: Sequence[Change] = (), now: float | None = None) -> None:
    """Delete the entries of shipped and dead-lettered keys, file the dead letters, journal what shipped,
    and move requeued keys (a foreign key refused them: their parent may still be queued) to the tail.

    Only the claimed seqs are deleted: an entry the app added for the same key after the claim stays,
    so its newer state ships next (no loss, no regression).
    """
    now = time.time() if now is None else now
    if not (shipped or dead or requeued):
        return
    shipped_seqs = json.dumps([e.seq for change in shipped for e in change.entries])
    seqs = json.dumps([e.seq for change in [*shipped, *(d.change for d in dead), *requeued] for e in change.entries])
    with immediate(conn):
        # The journal rows are built in SQL from the very entries being deleted: one row per shipped key.
        conn.execute("INSERT INTO _syncd_journal (tbl, key, shipped_at) SELECT DISTINCT tbl, key, ? "
                     "FROM _syncd_outbox WHERE seq IN (SELECT value FROM json_each(?))", (now, shipped_seqs))
        conn.execute("DELETE FROM _syncd_outbox WHERE seq IN (SELECT value FROM json_each(?))", (seqs,))
        conn.executemany(
            "INSERT INTO _syncd_dead_letter (tbl, key, op, enqueued_at, failed_at, status, code, message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(d.change.table, d.change.key_text, d.change.entries[-1].op, d.change.oldest_at, now, d.status,
              d.code, d.message) for d in dead])
        conn.executemany("INSERT INTO _syncd_outbox (tbl, key, op, at) VALUES (?, ?, ?, ?)",
                         [(c.table, c.key_text, c.entries[-1].op, julian_day(c.oldest_at)) for c in requeued])
        for table in dict.fromkeys(c.table for c in shipped):
            update_table_state(conn, table, last_shipped_at=now)


def update_table_state(conn: apsw.Connection, table: str, **fields: object) -> None:
    """Merge fields into meta `state:<table>` (what `status` shows: last_shipped_at, last_error, halted)."""
    state = table_state(conn, table)
    state.update(fields)
    conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)", (f"state:{table}", json.dumps(state)))


def expire_journal(conn: apsw.Connection, older_than: float, limit: int = 5000) -> int:
    """Delete at most `limit` journal rows shipped before `older_than` (small steps: short write locks)."""
    with immediate(conn):
        conn.execute("DELETE FROM _syncd_journal WHERE rowid IN (SELECT rowid FROM _syncd_journal "
                     "WHERE shipped_at < ? LIMIT ?)", (older_than, limit))
        return conn.changes()
