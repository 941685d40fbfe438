"""The outbox and syncd's other tables in the application's file: every read and write of `_syncd_outbox`,
`_syncd_dead_letter`, `_syncd_journal` and `_syncd_meta` is a function of this module.

- The outbox: what is pending; `claim` (a batch of entries and the current rows of their keys, from one
  snapshot) and `acknowledge` (one short write transaction: delete what shipped, file dead letters, journal
  what shipped, move requeued keys to the tail, record halts); `enqueue` for every operation that puts keys in.
- Dead letters: counted, and moved back into the outbox by a replay.
- The journal of shipped keys: read by a replay of a time window, expired after its retention.
- Meta: the installed tables' keys, the daemon's state per table (last shipment, last error, halted) and
  the lease's row (`syncd.lease` owns what it means).

The triggers that append to the outbox are capture's; the tables themselves are created and dropped here.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import apsw

from syncd.keys import MAX_PARAMS, NOW_SQL, decode_key, julian_day, key_sql, read_rows, unix_time
from syncd.sqlite import immediate, quote_ident, quote_text

__all__ = [
    "SCHEMA_VERSION",
    "Change",
    "DeadLetter",
    "Entry",
    "Pending",
    "acknowledge",
    "claim",
    "create",
    "dead_letters_by_table",
    "drop",
    "enqueue",
    "installed",
    "pending_by_table",
]

SCHEMA_VERSION = 1
TABLES = {
    "_syncd_outbox": """CREATE TABLE IF NOT EXISTS _syncd_outbox (
        seq INTEGER PRIMARY KEY,
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        op TEXT NOT NULL,
        at REAL NOT NULL)""",  # op: I U D, R for a row a REPLACE may delete, S for an enqueued key; at: Julian day
    "_syncd_dead_letter": """CREATE TABLE IF NOT EXISTS _syncd_dead_letter (
        id INTEGER PRIMARY KEY,
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        op TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        failed_at REAL NOT NULL,
        status INTEGER,
        code TEXT,
        message TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1)""",  # enqueued_at, failed_at: unix seconds
    "_syncd_journal": """CREATE TABLE IF NOT EXISTS _syncd_journal (
        tbl TEXT NOT NULL,
        key TEXT NOT NULL,
        shipped_at REAL NOT NULL)""",  # unix seconds
    "_syncd_meta": """CREATE TABLE IF NOT EXISTS _syncd_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
}
INDEXES = ["CREATE INDEX IF NOT EXISTS _syncd_journal_shipped_at ON _syncd_journal (shipped_at)"]
CHUNK = 2000  # keys per transaction when enqueueing many: short write locks, the app is never held up long


# -- the tables themselves ------------------------------------------------------------------------------


def create(conn: apsw.Connection) -> None:
    """Create syncd's tables and indexes where missing (inside the caller's transaction)."""
    for ddl in [*TABLES.values(), *INDEXES]:
        conn.execute(ddl)
    set_meta(conn, "schema_version", str(SCHEMA_VERSION))


def installed(conn: apsw.Connection) -> bool:
    """Whether syncd's tables exist in this file (`syncd install` ran)."""
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_syncd_outbox'").fetchone() is not None


def drop(conn: apsw.Connection) -> list[str]:
    """Drop syncd's tables (inside the caller's transaction); the names dropped."""
    for table in TABLES:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    return list(TABLES)


def archive(conn: apsw.Connection, path: Path) -> None:
    """Copy syncd's tables into a new SQLite file at `path` (created here; committed before the caller drops
    anything)."""
    apsw.Connection(str(path)).close()  # create it: the app's file was opened without CREATE, and ATTACH inherits that
    conn.execute("ATTACH DATABASE ? AS syncd_archive", (str(path),))
    try:
        with immediate(conn):
            for table in TABLES:
                conn.execute(f"CREATE TABLE syncd_archive.{table} AS SELECT * FROM main.{table}")
    finally:
        conn.execute("DETACH DATABASE syncd_archive")


# -- meta -----------------------------------------------------------------------------------------------


def get_meta(conn: apsw.Connection, key: str) -> str | None:
    """The value of one meta entry, None when there is none."""
    row = conn.execute("SELECT value FROM _syncd_meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: apsw.Connection, key: str, value: str) -> None:
    """Write a meta entry only when it differs, so a repeated install writes nothing at all."""
    if get_meta(conn, key) != value:
        conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)", (key, value))


def delete_meta(conn: apsw.Connection, key: str, holder: str | None = None) -> None:
    """Remove a meta entry; with `holder`, only while its JSON value's `holder` is that one (the lease)."""
    if holder is None:
        conn.execute("DELETE FROM _syncd_meta WHERE key = ?", (key,))
    else:
        conn.execute("DELETE FROM _syncd_meta WHERE key = ? AND json_extract(value, '$.holder') = ?", (key, holder))


def record_table(conn: apsw.Connection, table: str, key: Sequence[str], target: str) -> None:
    """Remember a table's key and target as installed (what `status` compares the schema with later)."""
    set_meta(conn, f"table:{table}", json.dumps({"key": list(key), "target": target}))


def installed_key(conn: apsw.Connection, table: str) -> list[str] | None:
    """The key columns a table had when it was last installed; None when it was never installed."""
    value = get_meta(conn, f"table:{table}")
    return json.loads(value)["key"] if value else None


def forget_tables(conn: apsw.Connection) -> None:
    """Forget every installed table (uninstall without dropping the outbox)."""
    conn.execute("DELETE FROM _syncd_meta WHERE key LIKE 'table:%'")


def table_state(conn: apsw.Connection, table: str) -> dict[str, object]:
    """What the daemon last recorded for a table: last_shipped_at (unix seconds), last_error, halted."""
    value = get_meta(conn, f"state:{table}")
    return json.loads(value) if value else {}


def update_table_state(conn: apsw.Connection, table: str, **fields: object) -> None:
    """Merge fields into a table's state (inside the caller's transaction)."""
    state = table_state(conn, table)
    state.update(fields)
    conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)", (f"state:{table}", json.dumps(state)))


def request_reconcile(conn: apsw.Connection, table: str, reason: str) -> None:
    """Mark a table whose capture had a gap (`reason` says which): until a reconcile clears the mark, `status`
    says so and the daemon reconciles it (inside the caller's transaction)."""
    update_table_state(conn, table, reconcile=reason)


def tables_to_reconcile(conn: apsw.Connection) -> dict[str, str]:
    """{table: why it needs a reconcile} for every table marked by `request_reconcile` and not reconciled since."""
    rows = conn.execute("SELECT substr(key, 7), json_extract(value, '$.reconcile') FROM _syncd_meta "
                        "WHERE key LIKE 'state:%' AND json_extract(value, '$.reconcile') IS NOT NULL")
    return dict(rows.fetchall())


def reconciled(conn: apsw.Connection, table: str, keys: int, at: float, marked: str | None) -> None:
    """Record a finished reconcile (`keys` enqueued, at unix seconds `at`) and clear the mark it answered, unless
    the mark changed meanwhile (a newer gap needs its own reconcile). One short write transaction."""
    with immediate(conn):
        state = table_state(conn, table)
        if state.get("reconcile") == marked:
            state["reconcile"] = None
        state["last_reconcile"] = {"at": at, "keys": keys}
        conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)",
                     (f"state:{table}", json.dumps(state)))


# -- what is pending ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """One table's backlog: how many outbox entries wait, and when the oldest of them was written."""

    count: int
    oldest_at: float | None  # unix seconds


def pending_by_table(conn: apsw.Connection) -> dict[str, Pending]:
    """{table: how many outbox entries wait, and the time of the oldest}."""
    rows = conn.execute("SELECT tbl, count(*), min(at) FROM _syncd_outbox GROUP BY tbl")
    return {table: Pending(count, unix_time(oldest) if oldest is not None else None) for table, count, oldest in rows}


def pending_total(conn: apsw.Connection) -> int:
    """How many outbox entries wait, all tables together."""
    return conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]


def dead_letters_by_table(conn: apsw.Connection) -> dict[str, int]:
    """{table: how many dead letters}."""
    return dict(conn.execute("SELECT tbl, count(*) FROM _syncd_dead_letter GROUP BY tbl").fetchall())


# -- claim: one snapshot of keys and their current rows ---------------------------------------------------


@dataclass
class Entry:
    """One claimed outbox entry: its seq, its op (I, U, D; R or S as in `_syncd_outbox`) and its time."""

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
        """When the oldest entry claimed for this key was written (unix seconds)."""
        return min(e.at for e in self.entries)


def claim(conn: apsw.Connection, limit: int, keys: Mapping[str, Sequence[str]],
          in_flight: Sequence[Change] = ()) -> list[Change]:
    """The first `limit` outbox entries of the tables in `keys` ({table: key columns}), grouped by key, with
    the current row of each key, all read in one transaction so that the rows are the state at one instant.

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
    """Outbox rows (seq, table, key as bytes, op, Julian day), in seq order -> one Change per (table, key), in order
    of first entry, with its entries (times in unix seconds)."""
    by_key: dict[tuple[str, bytes], Change] = {}
    for seq, table, raw_key, op, at in rows:
        change = by_key.get((table, raw_key))
        if change is None:
            change = by_key[(table, raw_key)] = decode_change(table, raw_key)
        change.entries.append(Entry(seq, op, unix_time(at)))
    return list(by_key.values())


def decode_change(table: str, raw_key: bytes) -> Change:
    """A Change without entries for a key read as bytes: its key decoded, or `problem` set when the key is not UTF-8
    or not a key `decode_key` reads (such a change goes to the dead letters)."""
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
    """Set each change's `row` to the current row of its key in `table`, or None when the row is gone; the keys must
    be decoded. At most MAX_PARAMS key values per statement; a chunk holding text that is not UTF-8 is read again
    with TEXT as bytes (that text becomes InvalidText)."""
    per_chunk = max(1, MAX_PARAMS // len(key_columns))
    for start in range(0, len(changes), per_chunk):
        chunk = changes[start:start + per_chunk]
        try:
            found = read_rows(conn, table, key_columns, [c.key for c in chunk])  # type: ignore[misc]
        except UnicodeDecodeError:
            found = read_rows(conn, table, key_columns, [c.key for c in chunk], safe=True)  # type: ignore[misc]
        for change in chunk:
            change.row = found.get(change.key)  # type: ignore[arg-type]


# -- acknowledge: one short write transaction ----------------------------------------------------------


@dataclass
class DeadLetter:
    """A change the daemon gives up on: the message for the operator, and the secondary's HTTP status and error code
    when it answered."""

    change: Change
    message: str
    status: int | None = None
    code: str | None = None


def acknowledge(conn: apsw.Connection, shipped: Sequence[Change], dead: Sequence[DeadLetter],
                requeued: Sequence[Change] = (), now: float | None = None) -> None:
    """Delete the entries of shipped and dead-lettered keys, file the dead letters, journal what shipped,
    move requeued keys (a foreign key refused them: their parent may still be queued) to the tail, and
    record each shipping table's last shipment, in one transaction.

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


# -- enqueue: every operation that puts keys in -----------------------------------------------------------


def enqueue(conn: apsw.Connection, keys: Iterable[tuple[str, str]],
            progress: Callable[[int], object] = lambda done: None) -> int:
    """Put (table, outbox key) pairs into the outbox as op 'S', CHUNK per short write transaction; how many.
    `progress` is told the running total after each chunk."""
    total = 0
    chunks = iter(keys)
    while chunk := list(itertools.islice(chunks, CHUNK)):
        with immediate(conn):
            conn.executemany(f"INSERT INTO _syncd_outbox (tbl, key, op, at) VALUES (?, ?, 'S', {NOW_SQL})", chunk)
        total += len(chunk)
        progress(total)
    return total


def enqueue_rows(conn: apsw.Connection, table: str, key: Sequence[str], condition: str,
                 params: Sequence[object]) -> int:
    """Enqueue the key of every row of `table` matching `condition` (SQL over the table, with `params`), in
    the caller's transaction; how many."""
    conn.execute(f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT {quote_text(table)}, "
                 f"{key_sql(key, quote_ident(table))}, 'S', {NOW_SQL} FROM {quote_ident(table)} WHERE {condition}",
                 params)
    return conn.changes()


# -- dead letters and the journal -------------------------------------------------------------------------


def dead_letter_filter(table: str | None, ids: Sequence[int]) -> tuple[str, tuple[object, ...]]:
    """The SQL condition and its parameters that select dead letters: all of them, or those of `table` and/or with
    these `ids`."""
    conditions, params = ["1"], []
    if table is not None:
        conditions.append("tbl = ?")
        params.append(table)
    if ids:
        conditions.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(ids)))
    return " AND ".join(conditions), tuple(params)


def count_dead_letters(conn: apsw.Connection, *, table: str | None = None, ids: Sequence[int] = ()) -> int:
    """How many dead letters match (all of them, those of `table`, those with these ids)."""
    where, params = dead_letter_filter(table, ids)
    return conn.execute(f"SELECT count(*) FROM _syncd_dead_letter WHERE {where}", params).fetchone()[0]


def requeue_dead_letters(conn: apsw.Connection, *, table: str | None = None, ids: Sequence[int] = ()) -> int:
    """Move up to CHUNK matching dead letters back into the outbox, oldest first, in one short transaction;
    how many moved (fewer than CHUNK: none are left)."""
    where, params = dead_letter_filter(table, ids)
    with immediate(conn):
        batch = conn.execute(f"SELECT id FROM _syncd_dead_letter WHERE {where} ORDER BY id LIMIT ?",
                             (*params, CHUNK)).fetchall()
        chosen = json.dumps([row[0] for row in batch])
        conn.execute(f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT tbl, key, op, {NOW_SQL} "
                     "FROM _syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", (chosen,))
        conn.execute("DELETE FROM _syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?))", (chosen,))
    return len(batch)


def journal_keys(conn: apsw.Connection, since: float, until: float | None = None,
                 table: str | None = None) -> list[tuple[str, str]]:
    """Every (table, outbox key) the journal says was shipped in [since, until) (unix seconds), once each."""
    conditions, params = ["shipped_at >= ?"], [since]
    if until is not None:
        conditions.append("shipped_at < ?")
        params.append(until)
    if table is not None:
        conditions.append("tbl = ?")
        params.append(table)
    return conn.execute(f"SELECT DISTINCT tbl, key FROM _syncd_journal WHERE {' AND '.join(conditions)} "
                        "ORDER BY tbl, key", params).fetchall()


def expire_journal(conn: apsw.Connection, older_than: float, limit: int = 5000) -> int:
    """Delete at most `limit` journal rows shipped before `older_than` (small steps: short write locks)."""
    with immediate(conn):
        conn.execute("DELETE FROM _syncd_journal WHERE rowid IN (SELECT rowid FROM _syncd_journal "
                     "WHERE shipped_at < ? LIMIT ?)", (older_than, limit))
        return conn.changes()
