"""The outbox and syncd's other tables: every read and write of them is a function of this module.

In the application's file (`_syncd_outbox`, `_syncd_dead_letter`, `_syncd_meta`): the outbox the triggers
append to, the dead letters operators read, and what capture needs (the installed tables' keys). In the state
file beside it (`syncd.state`, attached as `st`): the journal of shipped keys, the daemon's state per table, the
lease's row (`syncd.lease` owns what it means), reconcile marks, and `acked`: outbox entries settled by the daemon
(shipped, dead-lettered, requeued) whose deletion from the app's file is still due.

The drain writes only the state file: `claim` reads a batch of entries (leaving out the acked ones) and the
current rows of their keys from one snapshot; `acknowledge` records what was settled, the journal and the table
state in one state-file transaction. `flush` applies the acked entries to the app's file (delete them, file the
dead letters, move requeued keys to the tail) in short transactions that never wait for the app's lock: the
only frequent write syncd makes to the app's file, done when no other connection is in a transaction there.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import apsw

from syncd.keys import (
    MAX_PARAMS,
    NOW_SQL,
    decode_key,
    key_sql,
    other_spellings,
    read_rendered,
    read_rows,
    table_columns,
    unix_time,
)
from syncd.sqlite import (
    BUSY_TIMEOUT_MS,
    ForeignCollation,
    SchemaMoved,
    immediate,
    quote_ident,
    quote_text,
    schema_version,
)
from syncd.state import create_private, writing

__all__ = [
    "SCHEMA_VERSION",
    "Change",
    "Claim",
    "DeadLetter",
    "Entry",
    "Flushed",
    "Pending",
    "acknowledge",
    "claim",
    "create",
    "dead_letters_by_table",
    "drop",
    "enqueue",
    "flush",
    "installed",
    "pending_by_table",
]

SCHEMA_VERSION = 2  # 2: the journal, the daemon's state and the lease live in the state file
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
    "_syncd_meta": """CREATE TABLE IF NOT EXISTS _syncd_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
}
LEGACY_TABLES = ("_syncd_journal",)  # schema version 1 kept the journal in the app's file
CHUNK = 2000  # keys per transaction when enqueueing many: short write locks, the app is never held up long
# Acked entries deleted from the app's file per transaction: ~0.4 ms of its write lock, which fits between two of an
# app's transactions at 200/s (chunks of 2,000 held it 1.3 ms, and an app's deferred transactions that wrote
# meanwhile failed: 7-9 of 4,000 while syncd drained 200k; with 500, 0-3, median 1: benchmarks/bench_app.py).
FLUSH_CHUNK = 500
# The journal one row per shipped key: the rows written by batch (their keys a JSON array), and an older syncd's.
JOURNAL_ROWS = ("SELECT tbl, k.value AS key, shipped_at FROM st.journal_batches, json_each(keys) k "
                "UNION ALL SELECT tbl, key, shipped_at FROM st.journal")
NOT_ACKED = "NOT EXISTS (SELECT 1 FROM st.acked a WHERE a.seq = o.seq AND a.at = o.at)"


# -- the tables themselves ------------------------------------------------------------------------------


def create(conn: apsw.Connection) -> None:
    """Create syncd's tables in the app's file where missing, and its position (inside the caller's transaction)."""
    for ddl in TABLES.values():
        conn.execute(ddl)
    set_capture_meta(conn, "schema_version", str(SCHEMA_VERSION))
    if get_capture_meta(conn, POSITION_KEY) is None:
        set_capture_meta(conn, POSITION_KEY, Position.new().text)


def installed(conn: apsw.Connection) -> bool:
    """Whether syncd's tables exist in the app's file (`syncd install` ran)."""
    return conn.execute("SELECT 1 FROM main.sqlite_schema WHERE name = '_syncd_outbox'").fetchone() is not None


def drop(conn: apsw.Connection) -> list[str]:
    """Drop syncd's tables from the app's file and empty the state file (inside the caller's transaction); the
    names of the app file's tables dropped."""
    for table in [*TABLES, *LEGACY_TABLES]:
        conn.execute(f"DROP TABLE IF EXISTS main.{table}")
    for table in ("journal", "journal_batches", "meta", "acked"):
        conn.execute(f"DELETE FROM st.{table}")
    return list(TABLES)


def archive(conn: apsw.Connection, path: Path) -> None:
    """Copy syncd's tables of both files into a new SQLite file at `path` (created here; committed before the caller
    drops anything): `_syncd_outbox` and `_syncd_dead_letter` as they are, `_syncd_journal` from the state file,
    `_syncd_meta` holding the rows of both files' meta, `_syncd_acked` the entries settled but not yet flushed."""
    create_private(path, stat.S_IMODE(os.stat(conn.db_filename("main")).st_mode))  # no more readable than the app's
    conn.execute("ATTACH DATABASE ? AS syncd_archive", (str(path),))
    try:
        with immediate(conn):
            for table in TABLES:
                conn.execute(f"CREATE TABLE syncd_archive.{table} AS SELECT * FROM main.{table}")
            conn.execute("INSERT INTO syncd_archive._syncd_meta SELECT key, value FROM st.meta WHERE key NOT IN "
                         "(SELECT key FROM syncd_archive._syncd_meta)")
            conn.execute(f"CREATE TABLE syncd_archive._syncd_journal AS {JOURNAL_ROWS} ORDER BY shipped_at")
            conn.execute("CREATE TABLE syncd_archive._syncd_acked AS SELECT * FROM st.acked")
    finally:
        conn.execute("DETACH DATABASE syncd_archive")


def migrate(conn: apsw.Connection) -> bool:
    """Move what schema version 1 kept in the app's file (the journal, the daemon's state per table, the lease) to
    the state file, then remove it from the app's file; True when there was something to move. One transaction on
    both files; the state file must be the real one (`state.ensure`)."""
    legacy = conn.execute("SELECT 1 FROM main.sqlite_schema WHERE name = '_syncd_journal'").fetchone() is not None
    sql = "SELECT count(*) FROM main._syncd_meta WHERE key = 'lease' OR key LIKE 'state:%'"
    moved = cast(tuple[int], conn.execute(sql).fetchone())[0] if installed(conn) else 0
    if not (legacy or moved):
        return False
    with immediate(conn):
        if legacy:
            conn.execute("INSERT INTO st.journal (tbl, key, shipped_at) SELECT tbl, key, shipped_at "
                         "FROM main._syncd_journal")
            conn.execute("DROP TABLE main._syncd_journal")
        conn.execute("INSERT OR REPLACE INTO st.meta (key, value) SELECT key, value FROM main._syncd_meta "
                     "WHERE key LIKE 'state:%'")
        conn.execute("DELETE FROM main._syncd_meta WHERE key = 'lease' OR key LIKE 'state:%'")
        set_capture_meta(conn, "schema_version", str(SCHEMA_VERSION))
    return True


# -- capture's meta, in the app's file ------------------------------------------------------------------


def get_capture_meta(conn: apsw.Connection, key: str) -> str | None:
    """A meta entry of the app's file (what capture recorded), None when there is none."""
    row = conn.execute("SELECT value FROM main._syncd_meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_capture_meta(conn: apsw.Connection, key: str, value: str) -> None:
    """Write a meta entry of the app's file only when it differs, so a repeated install writes nothing at all."""
    if get_capture_meta(conn, key) != value:
        conn.execute("INSERT OR REPLACE INTO main._syncd_meta (key, value) VALUES (?, ?)", (key, value))


def record_table(conn: apsw.Connection, table: str, key: Sequence[str], target: str) -> None:
    """Remember a table's key and target as installed (what `status` compares the schema with later)."""
    set_capture_meta(conn, f"table:{table}", json.dumps({"key": list(key), "target": target}))


def installed_key(conn: apsw.Connection, table: str) -> list[str] | None:
    """The key columns a table had when it was last installed; None when it was never installed."""
    value = get_capture_meta(conn, f"table:{table}")
    return json.loads(value)["key"] if value else None


def forget_tables(conn: apsw.Connection) -> None:
    """Forget every installed table (uninstall without dropping the outbox)."""
    conn.execute("DELETE FROM main._syncd_meta WHERE key LIKE 'table:%'")


# -- the file's position: what tells a restored copy from the file syncd last shipped from ----------------


POSITION_KEY = "position"  # in the app's `_syncd_meta`
SOURCE_KEY = "source"  # in the state file's meta: the position and inode of the file syncd last shipped from


class Discontinuity(Exception):
    """The app's file is not the one syncd last shipped from (a restore, a copy): nothing may be flushed into it
    before it is adopted (every table reconciled)."""


@dataclass(frozen=True)
class Position:
    """Where the app's file is in syncd's history of it: a `generation` drawn at install and the number of `flushes`
    syncd committed to it since (litestream's generation and position, for an outbox). Every flush advances it in
    the app's file and in the state file, in the same transaction; a copy restored from a backup carries an older
    one (or none)."""

    generation: str
    flushes: int

    @classmethod
    def new(cls) -> Position:
        return cls(os.urandom(8).hex(), 0)

    @classmethod
    def parse(cls, text: str | None) -> Position | None:
        if text is None:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["generation"]), int(data["flushes"]))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def text(self) -> str:
        return json.dumps({"generation": self.generation, "flushes": self.flushes})

    def advanced(self) -> Position:
        return Position(self.generation, self.flushes + 1)


@dataclass(frozen=True)
class Recorded:
    """What the state file says of the file syncd last shipped from: its position and its inode."""

    position: Position
    inode: int | None


def file_position(conn: apsw.Connection) -> Position | None:
    """The position recorded in the app's file; None when it has none (a copy from before install or from before
    positions existed)."""
    return Position.parse(get_capture_meta(conn, POSITION_KEY))


def recorded_source(conn: apsw.Connection) -> Recorded | None:
    """What the state file recorded of the file syncd last shipped from; None when nothing (a new state file)."""
    value = get_meta(conn, SOURCE_KEY)
    if value is None:
        return None
    position = Position.parse(value)
    if position is None:
        return None
    inode = json.loads(value).get("inode")
    return Recorded(position, int(inode) if inode is not None else None)


def record_source(conn: apsw.Connection, position: Position, inode: int | None) -> None:
    """Remember `position` and `inode` as the file's that syncd ships from now (one state-file transaction)."""
    value = json.dumps({"generation": position.generation, "flushes": position.flushes, "inode": inode})
    with writing(conn):
        conn.execute("INSERT OR REPLACE INTO st.meta (key, value) VALUES (?, ?)", (SOURCE_KEY, value))


def position_for_new_file(conn: apsw.Connection) -> Position:
    """Give an app's file that has no position one (one short write transaction); the position it has now."""
    with immediate(conn):
        position = file_position(conn)
        if position is None:
            position = Position.new()
            set_capture_meta(conn, POSITION_KEY, position.text)
    return position


def fork_position(conn: apsw.Connection) -> Position:
    """Give the app's file a new generation (one short write transaction) after syncd adopted it as it is (a restore):
    backups of it from before, or of another file restored from the same backup, then carry another generation. The
    new position."""
    position = Position.new()
    with immediate(conn):
        set_capture_meta(conn, POSITION_KEY, position.text)
    return position


def acked_missing(conn: apsw.Connection) -> int:
    """How many entries syncd settled (shipped, dead-lettered, requeued) are not in the app's outbox any more, while
    nothing but a flush deletes them (a flush forgets them in the same transaction): more than 0 means the file is not
    the one they were claimed from."""
    row = conn.execute("SELECT count(*) FROM st.acked a WHERE NOT EXISTS (SELECT 1 FROM main._syncd_outbox o "
                       "WHERE o.seq = a.seq AND o.at = a.at)").fetchone()
    return cast(tuple[int], row)[0]


def forget_flushed(conn: apsw.Connection) -> None:
    """Forget the acked entries no longer in the app's outbox (a flush committed in the app's file, its state-file
    half lost to a crash: SQLite commits attached WAL databases one by one)."""
    with writing(conn):
        conn.execute("DELETE FROM st.acked WHERE NOT EXISTS (SELECT 1 FROM main._syncd_outbox o "
                     "WHERE o.seq = st.acked.seq AND o.at = st.acked.at)")


def advance_position(conn: apsw.Connection) -> None:
    """Inside a flush's transaction (both files locked): advance the position in the app's file and in the state
    file. Raises Discontinuity when the app's file does not carry the position the state file recorded."""
    position = file_position(conn)
    recorded = recorded_source(conn)
    if recorded is not None and position != recorded.position:
        raise Discontinuity(f"the database file's position ({describe_position(position)}) is not the one syncd "
                            f"recorded ({describe_position(recorded.position)})")
    position = (position or Position.new()).advanced()
    conn.execute("INSERT OR REPLACE INTO main._syncd_meta (key, value) VALUES (?, ?)", (POSITION_KEY, position.text))
    value = json.dumps({"generation": position.generation, "flushes": position.flushes,
                        "inode": recorded.inode if recorded else None})
    conn.execute("INSERT OR REPLACE INTO st.meta (key, value) VALUES (?, ?)", (SOURCE_KEY, value))


def describe_position(position: Position | None) -> str:
    """`generation 1f3a… after 42 flushes`, or `none`."""
    return "none" if position is None else f"generation {position.generation} after {position.flushes} flushes"


# -- the daemon's meta, in the state file ----------------------------------------------------------------


def get_meta(conn: apsw.Connection, key: str) -> str | None:
    """A meta entry of the state file (the daemon's), None when there is none."""
    row = conn.execute("SELECT value FROM st.meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def take_meta(conn: apsw.Connection, key: str, value: str, *, unless_held_by_other: tuple[str, float]) -> bool:
    """Write a state-file meta entry whose JSON value has a `holder` and an `expires_at`, unless another holder's
    entry is still alive: `unless_held_by_other` is (this holder, now in unix seconds). One statement, so one
    atomic compare-and-set under the state file's write lock; True when written (the lease's step)."""
    holder, now = unless_held_by_other
    conn.execute("INSERT INTO st.meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = "
                 "excluded.value WHERE json_extract(meta.value, '$.holder') = ? "
                 "OR json_extract(meta.value, '$.expires_at') <= ?", (key, value, holder, now))
    return conn.changes() > 0


def delete_meta(conn: apsw.Connection, key: str, holder: str | None = None) -> None:
    """Remove a state-file meta entry; with `holder`, only while its JSON value's `holder` is that one (the lease)."""
    if holder is None:
        conn.execute("DELETE FROM st.meta WHERE key = ?", (key,))
    else:
        conn.execute("DELETE FROM st.meta WHERE key = ? AND json_extract(value, '$.holder') = ?", (key, holder))


def table_state(conn: apsw.Connection, table: str) -> dict[str, object]:
    """What the daemon last recorded for a table: last_shipped_at (unix seconds), last_error, halted, reconcile
    (why one is needed), last_repair, last_reconcile."""
    value = get_meta(conn, f"state:{table}")
    return json.loads(value) if value else {}


def update_table_state(conn: apsw.Connection, table: str, **fields: object) -> None:
    """Merge fields into a table's state (inside the caller's transaction, or in one of its own)."""
    state = table_state(conn, table)
    state.update(fields)
    conn.execute("INSERT OR REPLACE INTO st.meta (key, value) VALUES (?, ?)", (f"state:{table}", json.dumps(state)))


def take_state_write_lock(conn: apsw.Connection) -> None:
    """Inside `writing`: take the state file's write lock before reading what the transaction rewrites (a write
    statement takes it when it starts, even one that changes no row), so that a read-modify-write cannot lose another
    connection's write, nor fail upgrading a read snapshot (https://sqlite.org/lang_transaction.html)."""
    conn.execute("UPDATE st.meta SET value = value WHERE 0")


def record_table_states(conn: apsw.Connection, updates: Mapping[str, Mapping[str, object]]) -> None:
    """Merge fields into several tables' states ({table: {field: value}}) in one state-file transaction."""
    if not updates:
        return
    with writing(conn):  # read in the same transaction: the reconciler's thread writes these states too
        take_state_write_lock(conn)
        states = {table: {**table_state(conn, table), **fields} for table, fields in updates.items()}
        conn.executemany("INSERT OR REPLACE INTO st.meta (key, value) VALUES (?, ?)",
                         [(f"state:{table}", json.dumps(state)) for table, state in states.items()])


def request_reconcile(conn: apsw.Connection, table: str, reason: str) -> None:
    """Mark a table whose capture had a gap (`reason` says which): until a reconcile clears the mark, `status`
    says so and the daemon reconciles it (inside the caller's transaction)."""
    update_table_state(conn, table, reconcile=reason)


def tables_to_reconcile(conn: apsw.Connection) -> dict[str, str]:
    """{table: why it needs a reconcile} for every table marked by `request_reconcile` and not reconciled since."""
    rows = conn.execute("SELECT substr(key, 7), json_extract(value, '$.reconcile') FROM st.meta "
                        "WHERE key LIKE 'state:%' AND json_extract(value, '$.reconcile') IS NOT NULL")
    return dict(cast(list[tuple[str, str]], rows.fetchall()))


def reconciled(conn: apsw.Connection, table: str, keys: int, at: float, marked: str | None) -> bool:
    """Record a finished reconcile (`keys` enqueued, at unix seconds `at`) and clear the mark it answered, unless
    the mark changed meanwhile (a newer gap needs its own reconcile). One short state-file transaction. Whether
    it cleared a mark."""
    with writing(conn):  # read in the same transaction: the worker may mark the table again meanwhile
        take_state_write_lock(conn)
        state = table_state(conn, table)
        cleared = marked is not None and state.get("reconcile") == marked
        if cleared:
            state["reconcile"] = None
        state["last_reconcile"] = {"at": at, "keys": keys}
        conn.execute("INSERT OR REPLACE INTO st.meta (key, value) VALUES (?, ?)", (f"state:{table}", json.dumps(state)))
    return cleared


# -- what is pending ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A table's backlog: how many outbox entries wait to ship, and when the oldest was written."""

    count: int
    oldest_at: float | None  # unix seconds


class Rows(Protocol):
    """A cursor as the two counts by table read it: apsw's, or sqlite3's."""

    def __iter__(self) -> Iterator[Any]: ...

    def fetchall(self) -> list[Any]: ...


class Reader(Protocol):
    """What the two counts by table need of a connection: apsw's, or the stdlib sqlite3 one the demo's dashboard
    reads through (the same DB-API calls)."""

    def execute(self, sql: str, /) -> Rows: ...


def pending_by_table(conn: Reader) -> dict[str, Pending]:
    """{table: how many outbox entries wait (acked ones left out), and the time of the oldest}."""
    rows = conn.execute(f"SELECT tbl, count(*), min(at) FROM main._syncd_outbox o WHERE {NOT_ACKED} GROUP BY tbl")
    return {table: Pending(count, unix_time(oldest) if oldest is not None else None) for table, count, oldest in rows}


def pending_total(conn: apsw.Connection) -> int:
    """How many outbox entries wait (acked ones left out), all tables together."""
    return cast(tuple[int], conn.execute(f"SELECT count(*) FROM main._syncd_outbox o WHERE {NOT_ACKED}").fetchone())[0]


def dead_letters_by_table(conn: Reader) -> dict[str, int]:
    """{table: how many dead letters}, those the daemon filed and has not yet written to the app's file included."""
    rows = conn.execute("SELECT tbl, count(*) FROM (SELECT tbl FROM main._syncd_dead_letter UNION ALL "
                        "SELECT o.tbl FROM st.acked a JOIN main._syncd_outbox o ON o.seq = a.seq AND o.at = a.at "
                        "WHERE a.fate = 'dead') GROUP BY tbl")
    return dict(cast(list[tuple[str, int]], rows.fetchall()))


def highest_seq(conn: apsw.Connection) -> int:
    """The highest seq in the app's outbox, 0 when it is empty (SQLite's next one is above it)."""
    return cast(tuple[int | None], conn.execute("SELECT max(seq) FROM main._syncd_outbox").fetchone())[0] or 0


def unflushed(conn: apsw.Connection) -> int:
    """How many acked entries are still in the app's outbox (their deletion is due)."""
    return cast(tuple[int], conn.execute("SELECT count(*) FROM st.acked").fetchone())[0]


# -- claim: one snapshot of keys and their current rows ---------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One claimed outbox entry: its seq, its op (I, U, D; R or S as in `_syncd_outbox`) and its time."""

    seq: int
    op: str
    at: float  # unix seconds of the change
    stored_at: float = 0.0  # the Julian day exactly as stored: with `seq`, the entry's identity in `acked`


@dataclass(slots=True)
class Change:
    """One key of one table with every outbox entry claimed for it, and the row as it is now."""

    table: str
    key_text: str | bytes  # as stored in the outbox (bytes when it is not valid UTF-8)
    entries: list[Entry]
    key: tuple[object, ...] | None = None  # decoded; None when it cannot be
    row: dict[str, object] | None = None  # None: the row is gone (ship a delete)
    problem: str | None = None  # why it cannot be read at all (goes to the dead letters)
    raw_key: bytes = b""  # the key's bytes as read from the outbox (what claims compare)
    rendered: str | None = None  # the row's JSON object as SQLite rendered it (then `row` stays None)
    present: bool = False  # the row is there (ship an upsert); False: it is gone (ship a delete)
    stand_in: tuple[object, ...] | None = None  # the key whose row is sent for this gone key (attach_stand_ins)

    def __post_init__(self) -> None:
        if not self.raw_key:
            self.raw_key = self.key_text if isinstance(self.key_text, bytes) else self.key_text.encode("utf-8")

    @property
    def oldest_at(self) -> float:
        """When the oldest entry claimed for this key was written (unix seconds)."""
        return min(e.at for e in self.entries)

    @property
    def decoded(self) -> tuple[object, ...]:
        """The key, decoded. Raises ValueError for a change whose key could not be decoded: it carries `problem`
        and goes to the dead letters, never to a read or a request."""
        if self.key is None:
            raise ValueError(f"table {self.table!r}: the key {self.key_text!r} was never decoded ({self.problem})")
        return self.key

    @property
    def current_row(self) -> dict[str, object]:
        """The row as read ({column: value}). Raises ValueError for a change whose row is gone or was rendered by
        SQLite (`rendered`): only a present row read into Python is mapped in Python."""
        if self.row is None:
            raise ValueError(f"table {self.table!r}: no row was read for the key {self.key_text!r}")
        return self.row


@dataclass
class Claim:
    """What one claim read: the changes to ship, and the seqs it passed over because their key was in flight
    (they are claimed again later); `last_seq` the highest seq it read (0 when none); `vanished` the seqs it was
    asked to read again (`retry`) that it did not find to claim: settled, flushed, or of a table not shipping now."""

    changes: list[Change] = field(default_factory=list)
    passed_over: list[int] = field(default_factory=list)
    last_seq: int = 0
    vanished: list[int] = field(default_factory=list)
    restarted: bool = False  # the outbox's highest seq lay below `after`: read from the first seq (see `claim`)


class HeldBatch(NamedTuple):
    """One batch in flight as a claim sees it: its keys ((table, the key's bytes)), seqs, highest seq and tables."""

    keys: Set[tuple[str, bytes]]
    seqs: Set[int]
    highest: int
    tables: Set[str]


@dataclass(frozen=True)
class InFlight:
    """What the batches on their way hold, as a claim leaves it out. Made once per batch (`window.Shipment.held`),
    so that what a claim does with them costs per batch, not per entry in flight."""

    batches: Sequence[HeldBatch] = ()

    @classmethod
    def of(cls, changes: Iterable[Change]) -> InFlight:
        """The changes of one batch (or of any list of changes) as one batch in flight."""
        changes = list(changes)
        if not changes:
            return cls()
        seqs = frozenset(e.seq for change in changes for e in change.entries)
        return cls([HeldBatch(frozenset((c.table, c.raw_key) for c in changes), seqs, max(seqs, default=0),
                              frozenset(c.table for c in changes))])

    @classmethod
    def joined(cls, parts: Iterable[InFlight]) -> InFlight:
        return cls([batch for part in parts for batch in part.batches])

    def holds(self, key: tuple[str, bytes]) -> bool:
        """Whether a batch in flight holds this (table, key's bytes)."""
        return any(key in batch.keys for batch in self.batches)

    def seqs(self) -> set[int]:
        """Every seq in flight."""
        return set().union(*(batch.seqs for batch in self.batches))

    def seqs_after(self, after: int) -> list[int]:
        """The seqs in flight above `after`, in order (only a batch claimed before a window reset has any)."""
        return sorted(seq for batch in self.batches if batch.highest > after for seq in batch.seqs if seq > after)

    def tables(self) -> set[str]:
        """The tables with a key in flight."""
        return set().union(*(batch.tables for batch in self.batches))


Renderer = Callable[[Sequence[str]], "tuple[str, str] | None"]  # a table's columns -> its rows' JSON in SQL


def claim(conn: apsw.Connection, limit: int, keys: Mapping[str, Sequence[str]],
          in_flight: Sequence[Change] | InFlight = (), after: int = 0,
          renderers: Mapping[str, Renderer] | None = None,
          planned_at: int | None = None, retry: Sequence[int] = (), in_transaction: bool = False) -> Claim:
    """The first `limit` outbox entries of the tables in `keys` ({table: key columns}) among those of the seqs
    `retry` (at most `after`, read first) and those after seq `after`, acked ones left out, grouped by key, with the
    current row of each key, all read in one transaction so that the rows are the state at one instant. Naming the
    few seqs below `after` to read again, instead of reading from the lowest, keeps a claim's cost independent of
    how many entries are in flight (`window.Window.claim_from`).

    When the outbox's highest seq lies below `after`, entries were deleted behind the caller's back (another process
    flushed, an operator deleted rows): SQLite then hands out seqs at or below `after` again
    (https://sqlite.org/autoinc.html), which a read after `after` would never see. The claim then reads from the first
    seq, and says so (`Claim.restarted`).

    Entries and keys of `in_flight` (batches whose requests are under way: their changes, or `InFlight`) are left
    out: the same key is never in two requests at once, and its newer entries wait until that request is
    acknowledged.

    `planned_at` is the schema cookie `keys` and `renderers` were planned at: raises sqlite.SchemaMoved, nothing
    claimed, when the snapshot's is another (a key column renamed since reads no row, and its entries would ship
    as deletes).

    With `in_transaction` the caller holds a read transaction already (snapshot mode reads a whole snapshot as
    several claims of one transaction); otherwise the claim opens and ends its own.
    """
    if not keys:
        return Claim()
    tables = list(keys)
    busy = in_flight if isinstance(in_flight, InFlight) else InFlight.of(in_flight)
    # Entries in flight lie at or below `after`, except after the window's reset (`after` back to 0).
    busy_seqs = json.dumps(busy.seqs_after(after))
    of_tables = f"tbl IN ({', '.join('?' * len(tables))}) AND {NOT_ACKED}"
    if not in_transaction:
        conn.execute("BEGIN")
    try:
        if planned_at is not None and (now := schema_version(conn)) != planned_at:
            raise SchemaMoved(f"the schema changed since the tables were planned (schema_version {planned_at} -> "
                              f"{now})")
        rows: list[tuple[int, str, bytes, str, float]] = []
        vanished: list[int] = []
        restarted = after > 0 and highest_seq(conn) < after
        if restarted:
            after, retry, busy_seqs = 0, (), json.dumps(busy.seqs_after(0))
        if retry:
            rows = cast(list[tuple[int, str, bytes, str, float]], conn.execute(
                "SELECT seq, tbl, CAST(key AS BLOB), op, at FROM main._syncd_outbox o WHERE seq IN (SELECT value "
                f"FROM json_each(?)) AND seq <= ? AND {of_tables} ORDER BY seq LIMIT ?",
                (json.dumps(list(retry)), after, *tables, limit)).fetchall())
            if len(rows) < limit:
                found = {row[0] for row in rows}
                vanished = [seq for seq in retry if seq not in found]
        if len(rows) < limit:
            rows += cast(list[tuple[int, str, bytes, str, float]], conn.execute(
                "SELECT seq, tbl, CAST(key AS BLOB), op, at FROM main._syncd_outbox o WHERE seq > ? AND seq NOT IN "
                f"(SELECT value FROM json_each(?)) AND {of_tables} ORDER BY seq LIMIT ?",
                (after, busy_seqs, *tables, limit - len(rows))).fetchall())
        grouped = group_entries(rows)
        changes, passed_over = grouped, list[int]()
        if busy.batches:
            changes = []
            for change in grouped:
                if busy.holds((change.table, change.raw_key)):
                    passed_over.extend(e.seq for e in change.entries)
                else:
                    changes.append(change)
        for table in dict.fromkeys(c.table for c in changes):
            readable = [c for c in changes if c.table == table and c.key is not None]
            try:
                attach_rows(conn, table, keys[table], readable, (renderers or {}).get(table))
                attach_stand_ins(conn, table, keys[table], [c for c in readable if not c.present],
                                 (renderers or {}).get(table))
            except ForeignCollation as exc:
                raise TableUnreadable(table, str(exc)) from None
            except apsw.SQLError as exc:
                if "no such collation sequence" not in str(exc):
                    raise
                raise TableUnreadable(table, str(exc)) from None
    finally:
        if not in_transaction:
            conn.execute("COMMIT")
    return Claim(changes, passed_over, rows[-1][0] if rows else 0, vanished, restarted)


class TableUnreadable(Exception):
    """syncd's connection cannot read a table's rows (a collation only the application registers was needed):
    the table's problem, never the loop's. `table` names it, `problem` says what SQLite said."""

    def __init__(self, table: str, problem: str) -> None:
        super().__init__(f"table {table!r}: {problem}")
        self.table, self.problem = table, problem


def group_entries(rows: Sequence[tuple[int, str, bytes, str, float]]) -> list[Change]:
    """Outbox rows (seq, table, key as bytes, op, Julian day), in seq order -> one Change per (table, key), in order
    of first entry, with its entries (times in unix seconds)."""
    by_key: dict[tuple[str, bytes], Change] = {}
    for seq, table, raw_key, op, at in rows:
        change = by_key.get((table, raw_key))
        if change is None:
            if raw_key.isdigit():  # the common key, a non-negative INTEGER as quote() spells it: decoded at once
                text = raw_key.decode("ascii")
                change = Change(table, text, [], key=(int(text),), raw_key=raw_key)
            else:
                change = decode_change(table, raw_key)
            by_key[(table, raw_key)] = change
        change.entries.append(Entry(seq, op, unix_time(at), at))
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


def attach_rows(conn: apsw.Connection, table: str, key_columns: Sequence[str], changes: list[Change],
                renderer: Renderer | None = None) -> None:
    """Set each change's `row` to the current row of its key in `table` ({column: value}, or None when the row is
    gone), or, when `renderer` renders the table's current columns in SQL, its `rendered` JSON object (`row` then
    stays None for a row that is there: `present` says so). The keys must be decoded. At most MAX_PARAMS key values
    per statement; a chunk holding text that is not UTF-8 is read again with TEXT as bytes (InvalidText)."""
    rendering = renderer(table_columns(conn, table)) if renderer is not None else None
    per_chunk = max(1, MAX_PARAMS // len(key_columns))
    for start in range(0, len(changes), per_chunk):
        chunk = changes[start:start + per_chunk]
        keys = [c.decoded for c in chunk]
        rendered: dict[tuple[object, ...], str | None] = {}
        if rendering is not None:
            try:
                rendered = read_rendered(conn, table, key_columns, keys, rendering)
            except UnicodeDecodeError:
                rendered = {}
        python = [c for c in chunk if rendered.get(c.decoded) is None]
        found: dict[tuple[object, ...], dict[str, object]] = {}
        if python:
            try:
                found = read_rows(conn, table, key_columns, [c.decoded for c in python])
            except UnicodeDecodeError:
                found = read_rows(conn, table, key_columns, [c.decoded for c in python], safe=True)
        for change in chunk:
            text = rendered.get(change.decoded)
            if text is not None:
                change.rendered, change.present = text, True
            else:
                change.row = found.get(change.decoded)
                change.present = change.row is not None


def attach_stand_ins(conn: apsw.Connection, table: str, key_columns: Sequence[str], gone: list[Change],
                     renderer: Renderer | None = None) -> None:
    """For each change whose row is gone, a row of `table` under another spelling of its key (`1` for `'1'`:
    `keys.other_spellings`) is the same row of the secondary, which a delete would remove while the file still
    holds it: that row is sent instead (the change gets its row or rendering, `present` and `stand_in`, its key)."""
    pairs = [(change, Change(table, "", [], key=other)) for change in gone if change.key is not None
             for other in other_spellings(change.key)]
    if not pairs:
        return
    attach_rows(conn, table, key_columns, [probe for _, probe in pairs], renderer)
    for change, probe in pairs:
        if probe.present and not change.present:
            change.row, change.rendered, change.present, change.stand_in = probe.row, probe.rendered, True, probe.key


# -- acknowledge and flush -----------------------------------------------------------------------------


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
    """Record what a batch settled, in one state-file transaction (the app's file is not written): every claimed
    entry of the shipped, dead-lettered and requeued keys joins `acked` (a dead letter and a requeue keep what
    `flush` needs), the journal gets one row per shipped key, and each shipping table its last shipment.

    Only the claimed entries are settled: an entry the app added for the same key after the claim stays, so
    its newer state ships next (no loss, no regression). Until `flush`, claims leave the acked entries out.
    """
    now = time.time() if now is None else now
    if not (shipped or dead or requeued):
        return
    seqs = sorted({e.seq for change in shipped for e in change.entries})  # once each: a range must have no gap
    acked = dead_letter_rows(dead, now)
    for change in requeued:
        *merged, last = change.entries
        acked += [(e.seq, e.stored_at, "merged", None, None, None, None, None) for e in merged]
        acked.append((last.seq, last.stored_at, "requeue", min(e.stored_at for e in change.entries), None, None,
                      None, None))
    with writing(conn):
        # The shipped entries are copied from the outbox in SQL (their seq and at exactly as stored), one statement;
        # seqs without a gap (the common batch) as a range, which SQLite reads without a list to look them up in.
        if seqs and seqs[-1] - seqs[0] + 1 == len(seqs):
            conn.execute("INSERT OR REPLACE INTO st.acked (seq, at, fate) SELECT seq, at, 'shipped' FROM "
                         "main._syncd_outbox WHERE seq BETWEEN ? AND ?", (seqs[0], seqs[-1]))
        elif seqs:
            conn.execute("INSERT OR REPLACE INTO st.acked (seq, at, fate) SELECT seq, at, 'shipped' FROM "
                         "main._syncd_outbox WHERE seq IN (SELECT value FROM json_each(?))", (json.dumps(seqs),))
        conn.executemany("INSERT OR REPLACE INTO st.acked (seq, at, fate, since, failed_at, status, code, message) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", acked)
        by_table: dict[str, list[str]] = {}
        for change in shipped:  # a shipped key is text: one that is not UTF-8 is a dead letter (decode_change)
            by_table.setdefault(change.table, []).append(cast(str, change.key_text))
        conn.executemany("INSERT INTO st.journal_batches (tbl, keys, shipped_at) VALUES (?, ?, ?)",
                         [(table, json.dumps(keys), now) for table, keys in by_table.items()])
        for table in by_table:
            update_table_state(conn, table, last_shipped_at=now)


def dead_letter_rows(dead: Sequence[DeadLetter], now: float) -> list[tuple[object, ...]]:
    """The `acked` rows (seq, at, fate, since, failed_at, status, code, message) that file `dead` letters at the next
    flush: a change's last entry as the dead letter, its earlier ones as merged into it."""
    rows: list[tuple[object, ...]] = []
    for letter in dead:
        *merged, last = letter.change.entries
        rows += [(e.seq, e.stored_at, "merged", None, None, None, None, None) for e in merged]
        rows.append((last.seq, last.stored_at, "dead", letter.change.oldest_at, now, letter.status, letter.code,
                     letter.message))
    return rows


def acknowledge_range(conn: apsw.Connection, first: int, last: int, tables: Sequence[str],
                      dead: Sequence[DeadLetter], journal: Mapping[str, Sequence[str]],
                      now: float | None = None) -> int:
    """Record a snapshot the secondary applied, in one state-file transaction: every entry of `tables` from seq
    `first` to `last` not acknowledged yet joins `acked` as shipped (copied from the outbox in SQL, its seq and at as
    stored), but the entries of the `dead` letters, which are filed as in `acknowledge`; `journal` ({table: the keys
    shipped, as stored}) gets one row per table. How many entries were acknowledged.

    Only a range a snapshot read whole may be given: its read saw every entry up to `last` (a later entry has a
    higher seq), and nothing else acknowledges entries meanwhile."""
    now = time.time() if now is None else now
    if not tables or last < first:
        return 0
    acked = dead_letter_rows(dead, now)
    with writing(conn):
        conn.execute("INSERT INTO st.acked (seq, at, fate) SELECT seq, at, 'shipped' FROM main._syncd_outbox o "
                     f"WHERE seq BETWEEN ? AND ? AND tbl IN ({', '.join('?' * len(tables))}) AND {NOT_ACKED}",
                     (first, last, *tables))
        settled = conn.changes()
        conn.executemany("INSERT OR REPLACE INTO st.acked (seq, at, fate, since, failed_at, status, code, message) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", acked)
        conn.executemany("INSERT INTO st.journal_batches (tbl, keys, shipped_at) VALUES (?, ?, ?)",
                         [(table, json.dumps(list(keys)), now) for table, keys in journal.items() if keys])
        for table in journal:
            update_table_state(conn, table, last_shipped_at=now)
    return settled


class Flushed(int):
    """How many acked entries a flush applied (the int itself), and `highest`: the highest seq left in the outbox,
    read inside the flush's transaction (SQLite hands out the next seq above it: claims need not look below)."""

    highest: int

    def __new__(cls, applied: int, highest: int) -> Flushed:
        flushed = super().__new__(cls, applied)
        flushed.highest = highest
        return flushed


def flush(conn: apsw.Connection, *, wait: bool = False, quiet: Callable[[], bool] = lambda: True,
          limit: int = FLUSH_CHUNK) -> Flushed | None:
    """Apply up to `limit` acked entries to the app's file in one short transaction: file the dead letters, append
    the requeued keys at the tail, delete the entries; then forget them in the state file. How many were applied (a
    `Flushed`, with the highest seq left); None when it did not happen: the app held the write lock (never waited
    for without `wait`; with it, apsw.BusyError after the busy timeout), or `quiet()` said before the commit that
    another connection had entered a transaction (committing then could make that transaction's later write fail).
    Entries whose (seq, at) no longer match an outbox entry (a restored file) are only forgotten. Each flush
    advances the file's position (`advance_position`); raises Discontinuity, having written nothing, when the file
    does not carry the position the state file recorded (it was restored)."""
    if wait:
        conn.execute("BEGIN IMMEDIATE")  # raises apsw.BusyError after the busy timeout: the caller reports it
    else:
        conn.set_busy_timeout(0)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            return None
        finally:
            conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    try:
        # The chunk: every acked entry up to seq `upto`. Each statement reads that range, and the dead letters and
        # requeues through their own index: the app's write lock is held ~0.8 us per entry, not 1.9
        # (benchmarks/bench_flush.py).
        first, last, apart = cast(tuple[int | None, int | None, int], conn.execute(
            "SELECT min(seq), max(seq), count(*) FILTER (WHERE fate IN ('dead', 'requeue')) FROM (SELECT seq, fate "
            "FROM st.acked ORDER BY seq LIMIT ?)", (limit,)).fetchone())
        first, upto = (0, -1) if first is None or last is None else (first, last)
        if apart:
            matched = ("FROM st.acked a JOIN main._syncd_outbox o ON o.seq = a.seq AND o.at = a.at "
                       "WHERE a.fate = ? AND a.seq <= ? ORDER BY a.seq")
            conn.execute("INSERT INTO main._syncd_dead_letter (tbl, key, op, enqueued_at, failed_at, status, code, "
                         f"message) SELECT o.tbl, o.key, o.op, a.since, a.failed_at, a.status, a.code, a.message "
                         f"{matched}", ("dead", upto))
            conn.execute(f"INSERT INTO main._syncd_outbox (tbl, key, op, at) SELECT o.tbl, o.key, o.op, a.since "
                         f"{matched}", ("requeue", upto))
        # From the chunk's first seq: below it may lie a halted table's backlog, never to be read by every chunk.
        conn.execute("DELETE FROM main._syncd_outbox AS o WHERE o.seq BETWEEN ? AND ? AND EXISTS (SELECT 1 FROM "
                     "st.acked a WHERE a.seq = o.seq AND a.at = o.at)", (first, upto))
        conn.execute("DELETE FROM st.acked WHERE seq <= ?", (upto,))
        applied = Flushed(conn.changes(), highest_seq(conn))  # under the write lock: no app insert comes between
        advance_position(conn)
        if not quiet():
            conn.execute("ROLLBACK")
            return None
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


def forget_acked(conn: apsw.Connection) -> None:
    """Forget every acked entry (they belonged to a file that was replaced: its entries ship again)."""
    with writing(conn):
        conn.execute("DELETE FROM st.acked")


# -- enqueue: every operation that puts keys in -----------------------------------------------------------


def enqueue(conn: apsw.Connection, keys: Iterable[tuple[str, str]],
            progress: Callable[[int], object] = lambda done: None) -> int:
    """Put (table, outbox key) pairs into the outbox as op 'S', CHUNK per short write transaction; how many.
    `progress` is told the running total after each chunk."""
    total = 0
    chunks = iter(keys)
    while chunk := list(itertools.islice(chunks, CHUNK)):
        with immediate(conn):
            conn.executemany(f"INSERT INTO main._syncd_outbox (tbl, key, op, at) VALUES (?, ?, 'S', {NOW_SQL})", chunk)
        total += len(chunk)
        progress(total)
    return total


def enqueue_rows(conn: apsw.Connection, table: str, key: Sequence[str], condition: str,
                 params: Sequence[object]) -> int:
    """Enqueue the key of every row of `table` matching `condition` (SQL over the table, with `params`), in
    the caller's transaction; how many."""
    conn.execute(f"INSERT INTO main._syncd_outbox (tbl, key, op, at) SELECT {quote_text(table)}, "
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
    row = conn.execute(f"SELECT count(*) FROM main._syncd_dead_letter WHERE {where}", params).fetchone()
    return cast(tuple[int], row)[0]


def requeue_dead_letters(conn: apsw.Connection, *, table: str | None = None, ids: Sequence[int] = ()) -> int:
    """Move up to CHUNK matching dead letters back into the outbox, oldest first, in one short transaction;
    how many moved (fewer than CHUNK: none are left)."""
    where, params = dead_letter_filter(table, ids)
    with immediate(conn):
        batch = conn.execute(f"SELECT id FROM main._syncd_dead_letter WHERE {where} ORDER BY id LIMIT ?",
                             (*params, CHUNK)).fetchall()
        chosen = json.dumps([row[0] for row in batch])
        conn.execute(f"INSERT INTO main._syncd_outbox (tbl, key, op, at) SELECT tbl, key, op, {NOW_SQL} "
                     "FROM main._syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id", (chosen,))
        conn.execute("DELETE FROM main._syncd_dead_letter WHERE id IN (SELECT value FROM json_each(?))", (chosen,))
    return len(batch)


def journal_keys(conn: apsw.Connection, since: float, until: float | None = None,
                 table: str | None = None) -> list[tuple[str, str]]:
    """Every (table, outbox key) the journal says was shipped in [since, until) (unix seconds), once each."""
    conditions: list[str] = ["shipped_at >= ?"]
    params: list[float | str] = [since]
    if until is not None:
        conditions.append("shipped_at < ?")
        params.append(until)
    if table is not None:
        conditions.append("tbl = ?")
        params.append(table)
    rows = conn.execute(f"SELECT DISTINCT tbl, key FROM ({JOURNAL_ROWS}) WHERE {' AND '.join(conditions)} "
                        "ORDER BY tbl, key", params)
    return cast(list[tuple[str, str]], rows.fetchall())


def expire_journal(conn: apsw.Connection, older_than: float, limit: int = 5000) -> int:
    """Delete at most `limit` journal rows (a row is one acknowledged batch of a table) shipped before `older_than`
    (unix seconds), in the state file."""
    with writing(conn):
        expired = 0
        for table in ("st.journal_batches", "st.journal"):
            conn.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "
                         "WHERE shipped_at < ? LIMIT ?)", (older_than, limit - expired))
            expired += conn.changes()
        return expired
