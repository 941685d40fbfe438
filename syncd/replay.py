"""Replay and resync: every operation puts keys into the outbox, so it obeys the same ordering,
acknowledgement and dead-letter rules as live changes, and runs while the app writes and the daemon ships.

- `replay_dead_letters`: dead letters back into the outbox (the current row is re-read at ship time, so a
  replay never ships stale data), after the operator fixed the cause.
- `replay_journal`: every key shipped in a time window, again (a secondary restored from an older backup).
- `resync`: every key of a table (optionally filtered), in chunks, each its own short transaction so the
  app is never blocked: the initial backfill, or a full resync.
Each writes to the outbox through `syncd.outbox` (`enqueue`, the step they share with `verify --repair`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import apsw
import apsw.ext

from syncd import capture, outbox
from syncd.capture import Capture
from syncd.config import Config
from syncd.progress import Reporter, Silent
from syncd.sqlite import immediate, quote_ident
from syncd.timeparse import parse_time

__all__ = ["Enqueued", "replay_dead_letters", "replay_journal", "replay_window", "resync", "resync_table"]

CHUNK = outbox.CHUNK
SILENT = Silent()


@dataclass
class Enqueued:
    """What a replay or resync did: how many keys it put into the outbox (dead letters moved back, for a replay of
    them) or, with `dry_run`, would have."""

    keys: int
    dry_run: bool


def require_installed(conn: apsw.Connection) -> None:
    """Raise CaptureError (with the command that fixes it) where syncd is not installed: there is no outbox."""
    if not outbox.installed(conn):
        raise capture.CaptureError(f"syncd is not installed in {conn.db_filename('main')}; run: syncd install")


def replay_dead_letters(conn: apsw.Connection, *, table: str | None = None, ids: Sequence[int] = (),
                        dry_run: bool = False, progress: Reporter = SILENT) -> Enqueued:
    """Move the matching dead letters back into the outbox, a chunk per transaction. Raises CaptureError where
    syncd is not installed."""
    require_installed(conn)
    count = outbox.count_dead_letters(conn, table=table, ids=ids)
    if dry_run:
        return Enqueued(count, True)
    progress.set_total(count)
    total = 0
    while True:
        moved = outbox.requeue_dead_letters(conn, table=table, ids=ids)
        total += moved
        progress(total)
        if moved < CHUNK:
            return Enqueued(total, False)


def replay_journal(conn: apsw.Connection, since: float, until: float | None = None, *, table: str | None = None,
                   dry_run: bool = False, progress: Reporter = SILENT) -> Enqueued:
    """Enqueue again every key the journal says was shipped in [since, until) (unix seconds). Raises CaptureError
    where syncd is not installed, ValueError when `until` is not after `since`."""
    require_installed(conn)
    if until is not None and until <= since:
        raise ValueError("--until must be later than --since (the window is [since, until))")
    keys = outbox.journal_keys(conn, since, until, table)
    if not dry_run:
        progress.set_total(len(keys))
        outbox.enqueue(conn, keys, progress)
    return Enqueued(len(keys), dry_run)


def replay_window(conn: apsw.Connection, since: str, until: str | None = None, *, table: str | None = None,
                  dry_run: bool = False, progress: Reporter = SILENT, now: float | None = None) -> Enqueued:
    """`replay_journal` for times as operators type them (ISO 8601, or 90s, 15m, 2h, 7d back from now).
    Raises ValueError naming the time that cannot be read."""
    now = time.time() if now is None else now
    return replay_journal(conn, parse_time(since, now), parse_time(until, now) if until else None, table=table,
                          dry_run=dry_run, progress=progress)


def unknown_table(conn: apsw.Connection, config: Config, table: str, dead_letters: bool) -> str | None:
    """Why `table` names nothing to replay (not configured and, for dead letters, holding none: a table dropped
    from the config may still hold some), or None."""
    if config.table(table) is not None or (dead_letters and table in outbox.dead_letters_by_table(conn)):
        return None
    held = " and holds no dead letters" if dead_letters else ""
    return (f"table {table!r} is not configured{held}; the configured tables are "
            f"{', '.join(t.name for t in config.tables)}")


def resync_table(conn: apsw.Connection, config: Config, table: str, *, where: str | None = None,
                 dry_run: bool = False, progress: Reporter = SILENT) -> Enqueued:
    """`resync` of a configured table by name. Raises CaptureError when it is not configured, cannot be captured
    or syncd is not installed; ValueError when `where` is not one read-only condition on the table."""
    require_installed(conn)
    table_config = config.table(table)
    if table_config is None:
        raise capture.CaptureError(f"table {table!r} is not configured; add a [[table]] section for it")
    return resync(conn, capture.plan_table(conn, table_config), where=where, dry_run=dry_run, progress=progress)


def resync(conn: apsw.Connection, planned: Capture, *, where: str | None = None, dry_run: bool = False,
           progress: Reporter = SILENT) -> Enqueued:
    """Enqueue every key of a table in key order, CHUNK keys per short transaction (keyset pagination).

    `where` is the operator's own SQL condition on the table (e.g. "created_at > '2024-01-01'"): exactly one
    boolean expression, read-only (`check_where`; ValueError otherwise). Rows whose key holds NULL are skipped: they
    cannot be shipped (a live change to them is dead-lettered).
    """
    if where is not None:
        check_where(conn, planned.table.name, where)
    table, key = quote_ident(planned.table.name), planned.key
    columns = ", ".join(f"{table}.{quote_ident(c)}" for c in key)
    filters = [f"({where})"] if where else []
    filters += [f"{table}.{quote_ident(c)} IS NOT NULL" for c in key]
    try:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {' AND '.join(filters)}").fetchone()
        (count,) = cast(tuple[int], row)
    except apsw.SQLError as exc:  # prepared fine, fails when run (a MATCH outside full-text search...)
        raise ValueError(f"{where!r} fails when SQLite runs it on {planned.table.name!r}: {exc}") from None
    if dry_run:
        return Enqueued(count, True)
    progress.set_total(count)  # live writes may add a few while it runs
    total, last = 0, None
    while True:
        bound: list[str] = [f"({columns}) > ({', '.join('?' * len(key))})"] if last is not None else []
        condition = " AND ".join(filters + bound) or "1"
        with immediate(conn):
            chunk = conn.execute(f"SELECT {columns} FROM {table} WHERE {condition} ORDER BY {columns} LIMIT ?",
                                 (*(last or ()), CHUNK)).fetchall()
            if not chunk:
                return Enqueued(total, False)
            upper = f"({columns}) <= ({', '.join('?' * len(key))})"
            outbox.enqueue_rows(conn, planned.table.name, key, f"{condition} AND {upper}",
                                (*(last or ()), *chunk[-1]))
        total += len(chunk)
        last = tuple(chunk[-1])
        progress(total)


# What SQLite's authorizer reports for a query that only reads (https://sqlite.org/c3ref/c_alter_table.html), and the
# functions a condition may not call although the authorizer calls them reads (extensions are off in apsw anyway).
READ_ACTIONS = frozenset({"SQLITE_SELECT", "SQLITE_READ", "SQLITE_FUNCTION", "SQLITE_RECURSIVE"})
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})
# The pragmas whose table-valued functions only describe the schema (https://sqlite.org/pragma.html#pragfunc);
# any other may set something (journal_mode('delete')) or write (optimize runs ANALYZE).
READ_PRAGMAS = frozenset({"pragma_table_info", "pragma_table_xinfo", "pragma_index_list", "pragma_index_info",
                          "pragma_index_xinfo", "pragma_foreign_key_list", "pragma_collation_list"})


def check_where(conn: apsw.Connection, table: str, where: str) -> None:
    """Accept `where` only as one SQL condition on `table` that reads and writes nothing else: prepared alone as
    `SELECT 1 FROM table WHERE (where)`, with nothing after it (apsw would run a second statement), read-only (by
    `sqlite3_stmt_readonly` and by every action SQLite's authorizer reports), without parameters, without
    load_extension() and without a pragma's table-valued function. Raises ValueError saying which."""
    if not where.strip():
        raise ValueError("give an SQL condition on the table, e.g. \"created_at > '2024-01-01'\", or leave it out")
    if (problem := unbalanced(where)) is not None:
        raise ValueError(f"{where!r} is not one condition: {problem}")
    try:
        info = apsw.ext.query_info(conn, f"SELECT 1 FROM {quote_ident(table)} WHERE ({where})", actions=True)
    except apsw.Error as exc:
        raise ValueError(f"{where!r} is not an SQL condition on {table!r}: {exc}") from None
    if info.query_remaining and info.query_remaining.strip(" \t\r\n;"):
        raise ValueError(f"{where!r} holds more than one condition (a ';' and more SQL after it): give one "
                         "boolean expression") from None
    if not info.is_readonly:
        raise ValueError(f"{where!r} would write: give a read-only condition") from None
    if info.bindings_count:
        raise ValueError(f"{where!r} has parameters (?, :name, $name or @name): write the values into the "
                         "condition") from None
    for action in info.actions or ():
        pragma = (action.table_name or "").lower()
        if pragma.startswith("pragma_") and pragma not in READ_PRAGMAS:
            # a pragma's table-valued function reads as SQLITE_READ, yet pragma_optimize runs ANALYZE and
            # pragma_journal_mode('delete') changes the file's journal mode
            raise ValueError(f"{where!r} calls {action.table_name}, which a condition may not (only the schema's "
                             f"pragmas that read: {', '.join(sorted(READ_PRAGMAS))})") from None
        if action.action_name not in READ_ACTIONS:
            raise ValueError(f"{where!r} does more than read ({action.action_name}): give a condition") from None
        if action.function_name and action.function_name.lower() in REFUSED_FUNCTIONS:
            raise ValueError(f"{where!r} calls {action.function_name}(), which a condition may not") from None


def unbalanced(sql: str) -> str | None:
    """Why `sql` cannot stand alone inside the parentheses syncd puts around a condition (`1) OR (1` would escape
    them, a comment would swallow what follows), or None: its parentheses pair up outside string literals and quoted
    names, none closes before it opened, and it holds no comment."""
    depth, i = 0, 0
    closers = {"'": "'", '"': '"', "`": "`", "[": "]"}
    while i < len(sql):
        char = sql[i]
        if char in closers:
            end = sql.find(closers[char], i + 1)
            if end < 0:
                return f"a {char} is not closed"
            i = end + 1
            continue
        if sql.startswith("--", i) or sql.startswith("/*", i):
            return "it holds an SQL comment"
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return "a ')' closes a parenthesis it did not open"
        i += 1
    return None if depth == 0 else "a '(' is not closed"
