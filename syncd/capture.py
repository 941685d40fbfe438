"""Capture: the triggers that record changed keys in the outbox, and installing or removing them.

Each synced table gets AFTER INSERT/UPDATE/DELETE triggers that append (table, key, op, time) to
`_syncd_outbox` inside the application's own transaction: never the row image, so they cost little and
cannot fail for any value the app can store. The key is spelt as `syncd.keys` says (SQLite's `quote()`, exact
for every storage class). `install` creates syncd's tables (their owner is `syncd.outbox`) and the triggers in
one transaction; `uninstall` removes them.

`INSERT OR REPLACE` and `UPDATE OR REPLACE` delete rows that collide on a UNIQUE index other than the
key without firing delete triggers; BEFORE triggers record the keys of those would-be victims, so the
shipper re-reads them, finds them gone, and deletes them in the secondary too.

Every comparison a trigger makes decides as SQLite decided the write. PostgreSQL's keys are compared byte for
byte, so "did the key change?" and "is this row the one being written?" compare the key `COLLATE BINARY`
(`'Python'` becoming `'python'` under a NOCASE key is a delete of one key and an upsert of another); "which rows
does REPLACE evict?" compares each unique set with the collation its index declares (PRAGMA index_xinfo), which
may differ from the column's, and the key's own index counts as such a set when it is not BINARY (an
`INSERT OR REPLACE` of `'RUST'` evicts `'Rust'`). A comparison names a collation only where the column's own
would decide otherwise, so the triggers of tables that compare BINARY throughout are unchanged. A collation the
application registers itself (not BINARY, NOCASE or RTRIM) is known only to the application's connections: on a
key column it is refused (syncd's own connection looks rows up by key and cannot evaluate it: "no such collation
sequence"); on another unique index the eviction trigger names it, and an UPDATE compiles that trigger only when
it writes the index's columns, which needs the collation anyway, so a connection without it is never broken by syncd.
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import apsw

from syncd import outbox, state
from syncd.config import Config, TableConfig
from syncd.keys import NOW_SQL, key_sql
from syncd.sqlite import SchemaMoved, immediate, quote_ident, quote_text, schema_version

OWNED_PREFIX = "_syncd_"
BUILTIN_COLLATIONS = frozenset({"BINARY", "NOCASE", "RTRIM"})  # every SQLite connection has these

# A row of PRAGMA table_info: cid, name, declared type, notnull, default, pk (position in it, 0 if none).
_ColumnInfo = tuple[int, str, str, int, str | None, int]


class CaptureError(Exception):
    """A table cannot be captured; the message says which and what to do."""


class MappingError(CaptureError):
    """A table's mapping names a column the table does not have, or ships one under another column's name."""


class CollationError(CaptureError):
    """A key column compares with a collation that only the application registers, so syncd cannot find its rows."""


@dataclass
class UniqueSet:
    """One uniqueness SQLite enforces (the primary key's or a UNIQUE index's): its columns and the collation each is
    compared with, as PRAGMA index_xinfo reports it (e.g. `["email"]`, `["NOCASE"]`; BINARY for the rowid)."""

    columns: list[str]
    collations: list[str]

    @property
    def binary(self) -> bool:
        """Whether every column compares byte for byte (then equal means the same key in PostgreSQL too)."""
        return all(c.upper() == "BINARY" for c in self.collations)


@dataclass
class SourceTable:
    """What capture needs to know about one application table, read from SQLite's catalog."""

    name: str
    columns: list[str]
    primary_key: list[str]
    # Every uniqueness constraint, the primary key's first (None for an index on expressions).
    unique: list[UniqueSet | None] = field(default_factory=list)
    # Each column's own collation ({column: name}, as declared by COLLATE in its definition; BINARY by default).
    collations: dict[str, str] = field(default_factory=dict)
    # Collations its columns or indexes name that SQLite does not have by itself (the application registers them).
    app_collations: list[str] = field(default_factory=list)

    def collation(self, column: str) -> str:
        """The collation SQLite compares `column` with when an expression does not name one."""
        return self.collations.get(column, "BINARY")

    def key_collations(self, key: Sequence[str]) -> list[str]:
        """The collation of each `key` column under which the keys are distinct: the one its unique index (or the
        primary key's) declares, which may differ from the column's own (`email TEXT COLLATE NOCASE` with
        `PRIMARY KEY (email COLLATE BINARY)` holds 'A@x' and 'a@x'); BINARY, the finest, when no unique index
        covers exactly these columns. An order and a `>` under these visit every key once (keyset pagination)."""
        for unique in self.unique:
            if unique is not None and sorted(unique.columns) == sorted(key):
                by_column = dict(zip(unique.columns, unique.collations, strict=True))
                return [by_column[column] for column in key]
        return ["BINARY"] * len(key)


@dataclass
class Capture:
    """The triggers of one configured table, derived from its config and its current schema."""

    table: SourceTable
    key: list[str]
    target: str

    def triggers(self) -> dict[str, str]:
        """name -> CREATE TRIGGER statement, exactly as sqlite_master will store it."""
        t, name = quote_ident(self.table.name), self.table.name
        literal = quote_text(name)
        triggers = {
            f"_syncd_{name}_ins": (
                f"CREATE TRIGGER {quote_ident(f'_syncd_{name}_ins')} AFTER INSERT ON {t} FOR EACH ROW BEGIN "
                f"{self.append(literal, 'NEW', 'I')}; END"),
            f"_syncd_{name}_upd": (
                f"CREATE TRIGGER {quote_ident(f'_syncd_{name}_upd')} AFTER UPDATE ON {t} FOR EACH ROW BEGIN "
                f"{self.append(literal, 'OLD', 'D', where=self.key_changed())}; "
                f"{self.append(literal, 'NEW', 'U')}; END"),
            f"_syncd_{name}_del": (
                f"CREATE TRIGGER {quote_ident(f'_syncd_{name}_del')} AFTER DELETE ON {t} FOR EACH ROW BEGIN "
                f"{self.append(literal, 'OLD', 'D')}; END"),
        }
        collisions = self.collision_condition()
        if collisions:
            for event, suffix, itself in (("INSERT", "rep_ins", "NEW"), (self.update_event(), "rep_upd", "OLD")):
                trigger = f"_syncd_{name}_{suffix}"
                same_key = " AND ".join(f"{t}.{quote_ident(c)} IS {itself}.{quote_ident(c)}{self.binary(c)}"
                                        for c in self.key)
                triggers[trigger] = (
                    f"CREATE TRIGGER {quote_ident(trigger)} BEFORE {event} ON {t} FOR EACH ROW BEGIN "
                    f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT {literal}, {key_sql(self.key, t)}, 'R', "
                    f"{NOW_SQL} FROM {t} WHERE ({collisions}) AND NOT ({same_key}); END")
        return triggers

    def append(self, literal: str, row: str, op: str, where: str | None = None) -> str:
        """The SQL statement that appends one outbox entry: the table (`literal`, its name as an SQL string), the key
        of `row` (`NEW` or `OLD`), `op` and the time; with `where`, only when that SQL condition holds."""
        values = f"{literal}, {key_sql(self.key, row)}, '{op}', {NOW_SQL}"
        if where is None:
            return f"INSERT INTO _syncd_outbox (tbl, key, op, at) VALUES ({values})"
        return f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT {values} WHERE {where}"

    def key_changed(self) -> str:
        """SQL that is true when an UPDATE changed a key column byte for byte (`IS NOT`, so NULLs compare too; BINARY,
        as PostgreSQL compares keys, whatever the column's collation): the old key is then recorded as deleted."""
        return " OR ".join(f"OLD.{quote_ident(c)} IS NOT NEW.{quote_ident(c)}{self.binary(c)}" for c in self.key)

    def binary(self, column: str) -> str:
        """` COLLATE BINARY` when `column`'s own collation would compare it otherwise, else nothing."""
        return self.collate(column, "BINARY")

    def collate(self, column: str, collation: str) -> str:
        """` COLLATE <collation>` when SQLite would compare `column` with another collation by itself, else nothing
        (so triggers of tables that need none keep their SQL)."""
        if collation.upper() == self.table.collation(column).upper():
            return ""
        name = collation if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", collation) else quote_ident(collation)
        return f" COLLATE {name}"

    def eviction_sets(self) -> list[UniqueSet]:
        """The unique sets through which a REPLACE can delete a row with another key: every one but the key's own when
        that compares byte for byte (then a collision there is the written key itself) and those on expressions."""
        return [u for u in self.table.unique
                if u is not None and u.columns and not (sorted(u.columns) == sorted(self.key) and u.binary)]

    def collision_condition(self) -> str:
        """Rows (other than the one written) that a REPLACE would delete: equal to NEW on a unique set, compared with
        the collation that set's index declares."""
        t = quote_ident(self.table.name)
        conditions = []
        for unique in self.eviction_sets():
            equal = [f"{t}.{quote_ident(c)} = NEW.{quote_ident(c)}{self.collate(c, collation)}"
                     for c, collation in zip(unique.columns, unique.collations, strict=True)]
            conditions.append("(" + " AND ".join(equal) + ")")
        return " OR ".join(conditions)

    def update_event(self) -> str:
        """`UPDATE OF <columns of the eviction sets>` when a set compares other than BINARY: an UPDATE can only evict
        through a set it writes, so only such statements compile the trigger (they cost no lookup otherwise, and a
        collation the application registers is then needed only where the index needs it anyway). Plain `UPDATE`
        when every set is BINARY, as those triggers always were, so an upgrade does not reinstall them."""
        sets = self.eviction_sets()
        if all(u.binary for u in sets):
            return "UPDATE"
        columns = dict.fromkeys(c for u in sets for c in u.columns)
        return "UPDATE OF " + ", ".join(quote_ident(c) for c in columns)


# -- reading the application's schema ------------------------------------------------------------------


def inspect_table(conn: apsw.Connection, name: str) -> SourceTable:
    """Read one table's columns, key and unique constraints; refuse what cannot be captured."""
    if name.startswith(OWNED_PREFIX):
        raise CaptureError(f"table {name!r}: names starting with {OWNED_PREFIX} belong to syncd; rename the table")
    row = conn.execute("SELECT type, name, sql FROM sqlite_schema WHERE name = ? COLLATE NOCASE "
                       "AND type IN ('table', 'view')", (name,)).fetchone()
    if row is None:
        raise CaptureError(f"table {name!r} does not exist in the database; check [[table]] name in the config")
    kind, actual, sql = row
    if kind == "view":
        raise CaptureError(f"{name!r} is a view; syncd captures tables only (sync the tables behind the view)")
    if re.match(r"\s*CREATE\s+VIRTUAL\s+TABLE", sql or "", re.I):
        raise CaptureError(f"{name!r} is a virtual table; its content cannot be captured with triggers")
    info = cast(list[_ColumnInfo], conn.execute(f"PRAGMA table_info({quote_ident(actual)})").fetchall())
    columns = [r[1] for r in info]
    primary_key = [r[1] for r in sorted((r for r in info if r[5] > 0), key=lambda r: r[5])]
    collations = {c: conn.column_metadata("main", actual, c)[1] for c in columns}
    named = {*collations.values(), *index_collations(conn, actual)}
    return SourceTable(actual, columns, primary_key, unique_sets(conn, actual, primary_key), collations,
                       sorted(c for c in named if c.upper() not in BUILTIN_COLLATIONS))


def index_collations(conn: apsw.Connection, table: str) -> set[str]:
    """Every collation an index of `table` compares with (PRAGMA index_xinfo, unique or not)."""
    return {r[4] for (_, index, *_) in conn.execute(f"PRAGMA index_list({quote_ident(table)})")
            for r in conn.execute(f"PRAGMA index_xinfo({quote_ident(index)})") if r[5]}


def unique_sets(conn: apsw.Connection, table: str, primary_key: list[str]) -> list[UniqueSet | None]:
    """Every uniqueness constraint of `table`, the primary key's first, with the collation of each column as its index
    declares it (SQLite's `PRAGMA index_list` and `index_xinfo`); None for an index on expressions (SQLite reports
    their column number as -2). An INTEGER PRIMARY KEY is the rowid and has no index: its set compares BINARY."""
    primary: list[UniqueSet | None] = []
    others: list[UniqueSet | None] = []
    for _, index, unique, origin, _partial in conn.execute(f"PRAGMA index_list({quote_ident(table)})"):
        if not unique:
            continue
        keyed = [r for r in conn.execute(f"PRAGMA index_xinfo({quote_ident(index)})") if r[5]]
        found = None if any(r[1] == -2 for r in keyed) else UniqueSet([r[2] for r in keyed], [r[4] for r in keyed])
        (primary if origin == "pk" else others).append(found)
    if primary_key and not primary:
        primary.append(UniqueSet(primary_key, ["BINARY"] * len(primary_key)))
    return primary + others


def plan(conn: apsw.Connection, config: Config) -> list[Capture]:
    """The triggers every configured table needs; every problem of every table in one CaptureError."""
    captures, problems = [], []
    for table_config in config.tables:
        try:
            captures.append(plan_table(conn, table_config))
        except CaptureError as exc:
            problems.append(str(exc))
    if problems:
        raise CaptureError("\n".join(problems))
    return captures


def plan_table(conn: apsw.Connection, table_config: TableConfig) -> Capture:
    """The triggers of one configured table, keyed by the config's `key` or else the primary key. Raises CaptureError
    when the table cannot be captured (missing, a view or virtual table, a name of syncd's), has no key, or lacks a
    key column."""
    table = inspect_table(conn, table_config.name)
    key = table_config.key or table.primary_key
    if not key:
        raise CaptureError(f"table {table.name!r} has no primary key; set key = [\"col\", ...] in its [[table]] "
                           "section to columns that identify a row")
    missing = [c for c in key if c not in table.columns]
    if missing:
        raise CaptureError(f"table {table.name!r}: key column(s) {', '.join(map(repr, missing))} do not exist; "
                           f"columns are {', '.join(table.columns)}")
    refuse_foreign_collations(table, key)
    problems = [f"table {table.name!r}: exclude {column!r}: it is a key column (the table's primary key); a key is "
                "always shipped, remove it from exclude" for column in key if column in table_config.exclude]
    problems += mapping_problems(table, table_config)
    if problems:
        raise MappingError("\n".join(problems))
    return Capture(table, list(key), table_config.target_name)


def refuse_foreign_collations(table: SourceTable, key: list[str]) -> None:
    """Raise CollationError when a key column compares with a collation the application registers itself: syncd's
    own connection finds rows by key (`WHERE key IN (...)`), and SQLite refuses to prepare that without the
    collation ("no such collation sequence"); guessing one could miss rows and delete them in the secondary."""
    for column in key:
        collation = table.collation(column)
        if collation.upper() not in BUILTIN_COLLATIONS:
            raise CollationError(
                f"table {table.name!r}: key column {column!r} is declared COLLATE {collation}, a collation only the "
                "application registers: syncd looks rows up by key and cannot know that collation's order, so it "
                "cannot ship this table by this key. Leave the table out (remove its [[table]] section; `syncd init` "
                "does so), or set key = [...] in its [[table]] section to columns that identify its rows under "
                "a built-in collation (the app's schema stays as it is)")


def mapping_problems(table: SourceTable, table_config: TableConfig) -> list[str]:
    """What the table's mapping names that the table does not have, or ships under a name another column has:
    each a line with the key, the problem and the fix (a "did you mean" from the table's real columns)."""
    problems = []
    for column in [*table_config.columns, *table_config.exclude]:
        if column not in table.columns:
            where = f"[table.columns.{column}]" if column in table_config.columns else f"exclude {column!r}"
            problems.append(f"table {table.name!r}: {where}: no such column in SQLite; {one_of(column, table.columns)}")
    configured = set(table_config.columns) | set(table_config.exclude)
    for column, spec in table_config.columns.items():
        target = spec.rename
        if target is None or target == column or column in table_config.exclude:
            continue
        if target in table.columns and target not in configured:
            problems.append(f"table {table.name!r}: [table.columns.{column}] rename = {target!r}: {target!r} is "
                            "already a column of the table, which ships under that name too; choose another name, "
                            f"or exclude {target!r} (or rename it)")
    return problems


def one_of(name: str, valid: list[str]) -> str:
    """`did you mean 'x'?` from the close matches, else the list of valid names."""
    match = difflib.get_close_matches(name, valid, n=1)
    return f"did you mean {match[0]!r}?" if match else f"the columns are {', '.join(valid)}"


# -- health: how each table's capture stands now ---------------------------------------------------------


@dataclass
class TableHealth:
    """How one configured table's capture stands. `triggers`: ok | missing | outdated | invalid (what `status`
    shows); `problem`: what is wrong and the fix; `plan`: the capture as the table now is (None when it cannot
    be captured); `key_changed`: the key is not the one installed (never repaired by guessing)."""

    table: str
    triggers: str = "ok"
    problem: str | None = None
    finding: str | None = None  # what was wrong, without the fix: true still once the daemon repaired it
    plan: Capture | None = None
    key_changed: bool = False

    @property
    def repairable(self) -> bool:
        """Triggers missing or outdated while the key is unchanged: reinstalling them for the table as it now is
        restores capture."""
        return self.triggers in ("missing", "outdated") and self.plan is not None and not self.key_changed


def examine(conn: apsw.Connection, table_config: TableConfig,
            current: dict[str, tuple[str, str]] | None = None) -> TableHealth:
    """Compare a configured table's triggers and key with what its schema needs now (`current`: the triggers
    installed, {name: (table, sql)}, read when not given)."""
    current = existing_triggers(conn) if current is None else current
    health = TableHealth(table_config.name)
    try:
        health.plan = plan_table(conn, table_config)
    except CaptureError as exc:
        health.triggers = "invalid"
        if isinstance(exc, MappingError):  # the table is fine; its [[table]] section is not (or no longer)
            health.problem = (f"{exc} (fix the table's [[table]] section, or the migration that dropped the column, "
                              "then send SIGHUP to syncd run)")
        elif isinstance(exc, CollationError):
            health.problem = f"{exc}; then run: syncd install"
        elif table_exists(conn, table_config.name):
            health.key_changed = True
            health.problem = (f"{exc} (the key column may have been renamed or dropped); map the key again (key = "
                              "[...] in its [[table]] section, and the secondary's key), run: syncd install, then "
                              "send SIGHUP to syncd run")
        else:
            health.problem = (f"table {table_config.name!r} no longer exists in SQLite: nothing of it is captured; "
                              "restore it, or remove its [[table]] section (then SIGHUP)")
        return health
    planned = health.plan
    installed_key = outbox.installed_key(conn, planned.table.name) if outbox.installed(conn) else None
    expected = planned.triggers()
    missing = [n for n in expected if n not in current]
    outdated = [n for n in expected if n in current and current[n][1] != expected[n]]
    if installed_key is not None and installed_key != planned.key:
        health.triggers, health.key_changed = "outdated", True
        health.problem = (f"the key was {', '.join(installed_key)} at install and is now {', '.join(planned.key)} "
                          "(renamed?); map the new name to the secondary's column (rename in the config), then run: "
                          "syncd install")
    elif missing:
        health.triggers = "missing"
        health.problem = f"trigger(s) {', '.join(missing)} missing: changes are NOT being captured; run: syncd install"
        health.finding = f"trigger(s) {', '.join(missing)} were missing: changes made meanwhile were not captured"
    elif outdated:
        health.triggers = "outdated"
        health.problem = (f"trigger(s) {', '.join(outdated)} differ from what the config and schema need "
                          "(key column renamed, key or unique index changed); run: syncd install")
        health.finding = (f"trigger(s) {', '.join(outdated)} differed from what the config and schema need (key "
                          "column renamed, key or unique index changed)")
    return health


def table_exists(conn: apsw.Connection, name: str) -> bool:
    """Whether a table (or view) of that name exists, in any letter case (as SQLite resolves names)."""
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ? COLLATE NOCASE AND type IN ('table', 'view')",
                        (name,)).fetchone() is not None


def reinstall(conn: apsw.Connection, captures: list[Capture], reason: str,
              examined_at: int | None = None) -> InstallReport:
    """Reinstall these tables' triggers as their schema now is, in one transaction, and mark each for a reconcile
    (`reason` says why). What the daemon does when a migration lost or outdated them. With `examined_at`, the
    schema cookie the captures were planned at, raises SchemaMoved (nothing written) when the app changed the
    schema since: a trigger written for a column renamed meanwhile would fail the app's own writes. The report's
    `schema_version` is the cookie once the triggers are in."""
    report = InstallReport()
    with immediate(conn):
        if examined_at is not None and (now := schema_version(conn)) != examined_at:
            raise SchemaMoved(f"the schema changed since it was examined (schema_version {examined_at} -> {now})")
        current = existing_triggers(conn)
        for capture in captures:
            install_capture(conn, capture, current, report, reason)
            if capture.table.name not in report.reconcile:
                outbox.request_reconcile(conn, capture.table.name, reason)
                report.reconcile.append(capture.table.name)
            outbox.update_table_state(conn, capture.table.name, last_repair={"at": time.time(), "what": reason})
        report.schema_version = schema_version(conn)
    return report


# -- install / uninstall --------------------------------------------------------------------------------


@dataclass
class InstallReport:
    """What `install` did: the triggers created, replaced (changed, or dropped because no longer needed) and left
    unchanged, by name, and warnings for the operator."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reconcile: list[str] = field(default_factory=list)  # tables whose lost changes a reconcile must bring over
    unshipped: list[str] = field(default_factory=list)  # tables installed now that hold rows written before
    schema_version: int | None = None  # the schema cookie once the triggers were in (reinstall)


def existing_triggers(conn: apsw.Connection) -> dict[str, tuple[str, str]]:
    """name -> (table, sql) of every trigger syncd owns."""
    rows = conn.execute("SELECT name, tbl_name, sql FROM sqlite_schema WHERE type = 'trigger' "
                        "AND substr(name, 1, 7) = '_syncd_'")
    return {name: (table, sql) for name, table, sql in rows}


def install(conn: apsw.Connection, config: Config) -> InstallReport:
    """Create the outbox objects and every configured table's triggers in one transaction.

    Validation happens first and refuses without touching the file (CaptureError naming every table that cannot
    be captured). Running it again changes nothing. A table that was installed before and had lost triggers
    (a migration rebuilt it) is marked for a reconcile: the changes made meanwhile were not captured, and
    `syncd run` (or `syncd verify --repair --table T`) brings the secondary back in step.
    """
    report = InstallReport()
    if not config.tables:
        raise CaptureError("the configuration has no [[table]]: there is nothing to capture, so nothing was created; "
                           "add a [[table]] section per table to sync (`syncd init --db FILE` writes them)")
    plan(conn, config)  # refuse before anything is created, the state file included
    with immediate(conn):
        pass  # wait out an app's transaction before creating anything: one that outlasts the wait leaves no trace
    database = Path(conn.db_filename("main"))
    state.ensure(conn, database)
    outbox.migrate(conn)
    with immediate(conn):
        captures = plan(conn, config)
        outbox.create(conn)
        current = existing_triggers(conn)
        for capture in captures:
            install_capture(conn, capture, current, report)
        configured = {c.table.name for c in captures}
        strays = sorted({table for table, _ in current.values()} - configured)
        report.warnings += [f"table {t!r} still has syncd triggers but is not configured; run syncd uninstall "
                            "to remove every trigger, then install again" for t in strays]
    return report


def install_capture(conn: apsw.Connection, capture: Capture, current: dict[str, tuple[str, str]],
                    report: InstallReport, reason: str = "its triggers had been lost (a migration rebuilt the table?)"
                    ) -> None:
    """Install one table's triggers as its schema now is (inside the caller's transaction), drop those it no
    longer needs, record its key, and mark it for a reconcile (`reason`) when triggers had been lost or outdated
    since it was installed."""
    name = capture.table.name
    first = outbox.installed_key(conn, name) is None
    if first and cast(tuple[int], conn.execute(f"SELECT EXISTS (SELECT 1 FROM {quote_ident(name)})").fetchone())[0]:
        report.unshipped.append(name)  # triggers capture what comes; these rows ship after a resync
    lost = not first and any(
        current.get(trigger, ("", ""))[1] != sql for trigger, sql in capture.triggers().items())
    for trigger, sql in capture.triggers().items():
        install_trigger(conn, trigger, sql, current, report)
    for trigger, (table, _) in current.items():
        if table == name and trigger not in capture.triggers():
            conn.execute(f"DROP TRIGGER {quote_ident(trigger)}")
            report.replaced.append(trigger)
    if None in capture.table.unique:
        report.warnings.append(f"table {name!r} has a UNIQUE index on expressions: rows that "
                               "INSERT OR REPLACE deletes through it are not seen; avoid REPLACE on it")
    if capture.table.app_collations:
        report.warnings.append(
            f"table {name!r} uses COLLATE {', '.join(capture.table.app_collations)}, which only the application "
            "registers: its triggers compare with it in the application's connections, so REPLACE through such an "
            "index is captured; syncd's own connection has no such collation, so a read there that needs it (verify "
            "counting rows through such an index, a --where on such a column) fails with \"no such collation "
            "sequence\" instead of guessing an order")
    outbox.record_table(conn, name, capture.key, capture.target)
    if lost:
        outbox.request_reconcile(conn, name, reason)
        report.reconcile.append(name)


def install_trigger(conn: apsw.Connection, name: str, sql: str, current: dict[str, tuple[str, str]],
                    report: InstallReport) -> None:
    """Create trigger `name` from `sql` unless `current` ({name: (table, sql)}) holds it exactly; one of that name
    with other SQL is dropped first. Records which in `report`."""
    if name in current and current[name][1] == sql:
        report.unchanged.append(name)
        return
    if name in current:
        conn.execute(f"DROP TRIGGER {quote_ident(name)}")
        report.replaced.append(name)
    else:
        report.created.append(name)
    conn.execute(sql)


@dataclass
class UninstallReport:
    """What `uninstall` dropped: syncd's triggers, and (with drop_outbox) its tables, by name; `found`: whether
    syncd was there at all (its tables or a trigger)."""

    dropped_triggers: list[str] = field(default_factory=list)
    dropped_tables: list[str] = field(default_factory=list)
    found: bool = True


def uninstall(conn: apsw.Connection, *, drop_outbox: bool = False, force: bool = False,
              archive: Path | None = None) -> UninstallReport:
    """Remove every syncd trigger; with drop_outbox also the outbox, dead letters, journal and meta.

    Dropping a non-empty outbox or dead-letter table loses changes that never reached the secondary,
    so it needs force, unless `archive` names a new file that receives a copy of all four tables first
    (the seed's Phase 4: archive, then clean up).
    """
    report = UninstallReport(found=outbox.installed(conn) or bool(existing_triggers(conn)))
    if archive is not None:
        if not archive.name:
            raise CaptureError(f"the archive {str(archive)!r} names no file; give a new file's path, e.g. "
                               "syncd-archive.sqlite3")
        if archive.is_symlink() or archive.exists():  # a dangling symlink exists too: SQLite would not create it
            raise CaptureError(f"archive {archive} already exists; choose a new file name")
        if not archive.parent.is_dir():
            raise CaptureError(f"cannot create the archive {archive}: the directory {archive.parent} does not exist")
        if not os.access(archive.parent, os.W_OK):
            raise CaptureError(f"cannot create the archive {archive}: the directory {archive.parent} is not writable "
                               "for this user")
    if not report.found:
        return report
    if archive is not None:
        if not outbox.installed(conn):
            raise CaptureError("there is nothing to archive: syncd's tables are not in this database")
        outbox.archive(conn, archive)
        drop_outbox, force = True, True
    with immediate(conn):
        for name in existing_triggers(conn):
            conn.execute(f"DROP TRIGGER {quote_ident(name)}")
            report.dropped_triggers.append(name)
        if drop_outbox and outbox.installed(conn):
            refuse_losing_changes(conn, force)
            report.dropped_tables += outbox.drop(conn)
        elif outbox.installed(conn):
            outbox.forget_tables(conn)
    if drop_outbox:
        state.remove(conn, Path(conn.db_filename("main")))
    return report


def refuse_losing_changes(conn: apsw.Connection, force: bool) -> None:
    """Raise CaptureError when dropping syncd's tables would lose changes that never reached the secondary."""
    pending, dead = outbox.pending_total(conn), sum(outbox.dead_letters_by_table(conn).values())
    if (pending or dead) and not force:
        raise CaptureError(f"the outbox holds {pending} pending change(s) and {dead} dead letter(s) that never "
                           "reached the secondary; let the daemon drain them, or add --force to drop them anyway")
