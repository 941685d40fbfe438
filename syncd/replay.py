"""Replay and resync: every operation puts keys into the outbox, so it obeys the same ordering,
acknowledgement and dead-letter rules as live changes, and runs while the app writes and the daemon ships.

- `replay_dead_letters`: dead letters back into the outbox (the current row is re-read at ship time, so a
  replay never ships stale data), after the operator fixed the cause.
- `replay_journal`: every key shipped in a time window, again (a secondary restored from an older backup).
- `resync`: every key of a table (optionally filtered), in chunks, each its own short transaction so the
  app is never blocked: the initial backfill, or a full resync.
- `enqueue`: the step they share with `verify --repair`: given keys into the outbox, a chunk per transaction.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import apsw

from syncd.capture import Capture, key_sql
from syncd.progress import Reporter, Silent
from syncd.sqlite import immediate, quote_ident, quote_text
from syncd.timeparse import parse_time

__all__ = ["Enqueued", "enqueue", "parse_time", "replay_dead_letters", "replay_journal", "resync"]

CHUNK = 2000
SILENT = Silent()


@dataclass
class Enqueued:
    keys: int
    dry_run: bool


def replay_dead_letters(conn: apsw.Connection, *, table: str | None = None, ids: Sequence[int] = (),
                        dry_run: bool = False, progress: Reporter = SILENT) -> Enqueued:
    """Move the matching dead letters back into the outbox, a chunk per transaction."""
    where, params = dead_letter_filter(table, ids)
    (count,) = conn.execute(f"SELECT count(*) FROM _syncd_dead_letter WHERE {where}", params).fetchone()
    if dry_run:
        return Enqueued(count, True)
    progress.set_total(count)
    total = 0
    while True:
        with immediate(conn):
            batch = conn.execute(f"SELECT id FROM _syncd_dead_letter WHERE {where} ORDER BY id LIMIT ?",
                                 (*params, CHUNK)).fetchall()
            chosen = json.dumps([row[0] for row in batch])
            conn.execute("INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT tbl, key, op, julianday('now') "
                         "FROM _syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                         (chosen,))
            conn.execute("DELETE FROM _syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?))", (chosen,))
        total += len(batch)
        progress(total)
        if len(batch) < CHUNK:
            return Enqueued(total, False)


def dead_letter_filter(table: str | None, ids: Sequence[int]) -> tuple[str, tuple[object, ...]]:
    conditions, params = ["1"], []
    if table is not None:
        conditions.append("tbl = ?")
        params.append(table)
    if ids:
        conditions.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(ids)))
    return " AND ".join(conditions), tuple(params)


def replay_journal(conn: apsw.Connection, since: float, until: float | None = None, *, table: str | None = None,
                   dry_run: bool = False, progress: Reporter = SILENT) -> Enqueued:
    """Enqueue again every key the journal says was shipped in [since, until)."""
    conditions, params = ["shipped_at >= ?"], [since]
    if until is not None:
        conditions.append("shipped_at < ?")
        params.append(until)
    if table is not None:
        conditions.append("tbl = ?")
        params.append(table)
    keys = conn.execute(f"SELECT DISTINCT tbl, key FROM _syncd_journal WHERE {' AND '.join(conditions)} "
                        "ORDER BY tbl, key", params).fetchall()
    if not dry_run:
        progress.set_total(len(keys))
        enqueue(conn, keys, progress)
    return Enqueued(len(keys), dry_run)


def enqueue(conn: apsw.Connection, keys: Iterable[tuple[str, str]], progress: Reporter = SILENT) -> int:
    """Put (table, outbox key) pairs into the outbox, CHUNK per short write transaction; how many."""
    total = 0
    chunks = iter(keys)
    while chunk := list(itertools.islice(chunks, CHUNK)):
        with immediate(conn):
            conn.executemany("INSERT INTO _syncd_outbox (tbl, key, op, at) VALUES (?, ?, 'S', julianday('now'))",
                             chunk)
        total += len(chunk)
        progress(total)
    return total


def resync(conn: apsw.Connection, capture: Capture, *, where: str | None = None, dry_run: bool = False,
           progress: Reporter = SILENT) -> Enqueued:
    """Enqueue every key of a table in key order, CHUNK keys per short transaction (keyset pagination).

    `where` is the operator's own SQL condition on the table (e.g. "created_at > '2024-01-01'"). Rows
    whose key holds NULL are skipped: they cannot be shipped (a live change to them is dead-lettered).
    """
    table, key = quote_ident(capture.table.name), capture.key
    columns = ", ".join(f"{table}.{quote_ident(c)}" for c in key)
    filters = [f"({where})"] if where else []
    filters += [f"{table}.{quote_ident(c)} IS NOT NULL" for c in key]
    (count,) = conn.execute(f"SELECT count(*) FROM {table} WHERE {' AND '.join(filters)}").fetchone()
    if dry_run:
        return Enqueued(count, True)
    progress.set_total(count)  # live writes may add a few while it runs
    total, last = 0, None
    while True:
        bound = [f"({columns}) > ({', '.join('?' * len(key))})"] if last is not None else []
        condition = " AND ".join(filters + bound) or "1"
        with immediate(conn):
            chunk = conn.execute(f"SELECT {columns} FROM {table} WHERE {condition} ORDER BY {columns} LIMIT ?",
                                 (*(last or ()), CHUNK)).fetchall()
            if not chunk:
                return Enqueued(total, False)
            upper = f"({columns}) <= ({', '.join('?' * len(key))})"
            conn.execute(f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT {quote_text(capture.table.name)}, "
                         f"{key_sql(key, table)}, 'S', julianday('now') FROM {table} WHERE {condition} AND {upper}",
                         (*(last or ()), *chunk[-1]))
        total += len(chunk)
        last = tuple(chunk[-1])
        progress(total)

