"""Onboarding (`syncd init`): from an application's SQLite file, the config that syncs it and the secondary's DDL.

`read_catalog` reads SQLite's catalog (read-only: PRAGMA table_list, table_xinfo, index_list, index_xinfo,
foreign_key_list) into `Table`s: each column's PostgreSQL type and transform from `syncd.casting`, the key syncd
will use, the UNIQUE sets and foreign keys PostgreSQL can hold, and why a table or a constraint is left out.
`render_config` writes the commented TOML that `syncd.config.load_config` loads as is; `render_sql` the
idempotent DDL (a file that drops into a Supabase CLI `supabase/migrations/` folder); `apply_sql` runs it in one
transaction.

Decisions, each measured on PostgreSQL 16 behind PostgREST 12 (tests/test_init.py):
- The key is the one `syncd install` takes without a `key =` line (the PRIMARY KEY) and, for a table without
  one, the first UNIQUE index over NOT NULL columns (written as `key = [...]`); the secondary's PRIMARY KEY is
  that key, so PostgREST's upsert (`ON CONFLICT` on it) has its arbiter. A table with neither is listed commented
  out: its rowid is no key (VACUUM may renumber it).
- Other UNIQUE sets are `DEFERRABLE INITIALLY DEFERRED`: PostgreSQL then checks them at the end of the request,
  so two rows that swap a unique value in one SQLite transaction land in one upsert (syncd/conflicts.py).
  PostgreSQL allows neither a deferrable constraint as an `ON CONFLICT` arbiter nor a foreign key to one
  (55000, "cannot use a deferrable unique constraint for referenced table"), so the key, and every UNIQUE set
  a foreign key references, stay immediate.
- Foreign keys keep SQLite's columns but not its ON DELETE / ON UPDATE actions: the secondary is a mirror, and
  every row SQLite's own actions change reaches it through the triggers; a CASCADE there would delete rows an
  application that runs without `PRAGMA foreign_keys=ON` (SQLite's default) still has. A parent deleted before
  its children is refused (23503) and retried after them. A foreign key to a table not synced, to columns
  PostgreSQL cannot reference (no PRIMARY KEY or UNIQUE on exactly them) or between columns of different types is
  left out with the reason. A column with no declared type that references another takes that column's type
  (SQLite compares it with the parent's affinity).
- A foreign key that closes a cycle between tables (a.b_id -> b, b.a_id -> a) is written commented out: syncd
  ships each table in its own request (its own transaction), so rows that point at each other could never both
  land, deferrable or not. A self-reference stays: one request's rows are checked together at its end.
- Generated columns are left out: syncd reads a row through PRAGMA table_info, which does not list them.
- The service_role policy reads `request.jwt.claims` (PostgREST v12 sets that one JSON setting per request), not
  Supabase's auth.role(), so it works on plain PostgreSQL too.
- Multi-file mode (`init --glob`, a `Tenancy`): every table gets the tenant column (text NOT NULL) first, in its
  key, in every UNIQUE set (a value unique in one tenant's file is unique per tenant only) and on both sides of
  every foreign key (a child row references its parent in its own tenant), and a SELECT policy that lets the role
  `authenticated` read the rows whose tenant column equals a claim of its JWT (`request.jwt.claims ->> claim`,
  as PostgREST v12 sets it). A source column named like the tenant column is replaced by the tenant's id (as
  `syncd run` ships it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import apsw

from syncd import capture, casting
from syncd.config import TableConfig
from syncd.redact import error_line, mask_url, register_connection
from syncd.sqlite import quote_ident, quote_text

if TYPE_CHECKING:
    import psycopg

__all__ = ["Column", "ForeignKey", "Sources", "Table", "Tenancy", "apply_sql", "read_catalog", "render_config",
           "render_sql", "with_tenant"]

PG_NAME_BYTES = 63  # PostgreSQL truncates longer identifiers (NAMEDATALEN - 1)
POLICY = "syncd: service_role full access"
TENANT_POLICY = "syncd: authenticated reads its tenant"
ROLE_CLAIM = "(nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role') = 'service_role'"
SKIPPED_PREFIXES = ("sqlite_", capture.OWNED_PREFIX)

# A row of PRAGMA table_xinfo: cid, name, declared type, notnull, default, pk (position in it, 0 if none), hidden.
_ColumnInfo = tuple[int, str, str, int, str | None, int, int]
# A row of PRAGMA foreign_key_list: id, seq, parent table, column, parent column (None: its primary key), on update,
# on delete, match.
_ForeignKeyInfo = tuple[int, int, str, str, str | None, str, str, str]


@dataclass(frozen=True)
class Tenancy:
    """Multi-file mode's DDL: the tenant column every table carries, and the JWT claim that names the tenant whose
    rows an `authenticated` user may read."""

    column: str = "tenant_id"
    claim: str = "tenant_id"

    def policy_condition(self) -> str:
        """The RLS condition: the row's tenant is the one the request's JWT claim names (NULL, so no row, without
        that claim or a token; PostgREST v12 sets request.jwt.claims per request)."""
        return (f"{quote_ident(self.column)} = (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> "
                f"{quote_text(self.claim)})")


class OnboardError(Exception):
    """`init` cannot do what was asked (an unknown table in --tables, a database that refuses the SQL); the message
    starts with the flag and says the fix."""


@dataclass
class Column:
    """One shipped column: its SQLite name and declared type, PostgreSQL type, transform and NOT NULL."""

    name: str
    declared: str
    pg_type: str
    transform: str | None
    not_null: bool


@dataclass
class ForeignKey:
    """A foreign key of a synced table onto another synced one, its columns resolved to their declared names."""

    columns: list[str]
    parent: str
    parent_columns: list[str]
    violations: int = 0  # rows of the file that break it now (PRAGMA foreign_key_check): the app does not enforce it
    enforced: bool = True  # written as a constraint (False: commented out, see `decide_foreign_keys`)


@dataclass
class Table:
    """What `init` knows of one SQLite table. `refused`: why it is not synced (then only `name` counts)."""

    name: str
    columns: list[Column] = field(default_factory=list)
    key: list[str] = field(default_factory=list)
    key_declared: bool = True  # the PRIMARY KEY (False: a UNIQUE index chosen as the key, written as key = [...])
    unique: list[list[str]] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refused: str | None = None

    def column(self, name: str) -> Column | None:
        """The shipped column of that name, in any letter case (as SQLite resolves names)."""
        return next((c for c in self.columns if c.name.lower() == name.lower()), None)


# ---- reading SQLite's catalog ----------------------------------------------------------------------------


def read_catalog(conn: apsw.Connection, only: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Table]:
    """Every table of the file (or those in `only`), minus `exclude`, in name order, views and SQLite's and syncd's
    own tables left out. Raises OnboardError naming --tables or --exclude for a name the file does not have."""
    kinds = {name: kind for _, name, kind, *_ in conn.execute("PRAGMA main.table_list")
             if not name.lower().startswith(SKIPPED_PREFIXES)}
    candidates = sorted(n for n, kind in kinds.items() if kind in ("table", "virtual"))
    for flag, names in (("--tables", only), ("--exclude", exclude)):
        unknown = [n for n in names if n.lower() not in {c.lower() for c in candidates}]
        views = [n for n in unknown if any(k.lower() == n.lower() and v == "view" for k, v in kinds.items())]
        if views:
            raise OnboardError(f"{flag}: {', '.join(map(repr, views))} is a view: syncd ships tables (a view's "
                               f"rows arrive with the tables it reads); its tables are {', '.join(candidates)}")
        if unknown:
            raise OnboardError(f"{flag}: no table {', '.join(map(repr, unknown))} in the database; its tables are "
                               f"{', '.join(candidates) or '(none)'}")
    wanted = {n.lower() for n in only} if only else {c.lower() for c in candidates}
    wanted -= {n.lower() for n in exclude}
    tables = [read_table(conn, name, kinds[name]) for name in candidates if name.lower() in wanted]
    link_foreign_keys(conn, tables)
    return tables


def shape_differences(tables: Sequence[Table], conn: apsw.Connection) -> list[str]:
    """How another tenant's file differs from the one `tables` were read from, for the synced tables: a table it
    lacks, a column it lacks or declares with another type, another key. Empty when it has the same shape (it may
    have more tables or columns: only the configured ones ship)."""
    problems = []
    for table in tables:
        if table.refused is not None:
            continue
        rows = list(conn.execute(f"PRAGMA main.table_xinfo({quote_text(table.name)})"))
        if not rows:
            problems.append(f"no table {table.name!r}")
            continue
        declared = {str(name).lower(): str(kind) for _, name, kind, *_ in rows}
        for column in table.columns:
            there = declared.get(column.name.lower())
            if there is None:
                problems.append(f"{table.name}.{column.name} is missing")
            elif casting.pg_type(there) != casting.pg_type(column.declared):
                problems.append(f"{table.name}.{column.name} is declared {there or '(no type)'}, "
                                f"not {column.declared or '(no type)'}")
        key = sorted(str(row[1]).lower() for row in rows if row[5])
        if table.key_declared and key != sorted(c.lower() for c in table.key):
            problems.append(f"{table.name}'s PRIMARY KEY is ({', '.join(key) or 'none'}), not "
                            f"({', '.join(table.key)})")
    return problems


def read_table(conn: apsw.Connection, name: str, kind: str) -> Table:
    """One table's columns, key and UNIQUE sets (foreign keys come later, once every table is known)."""
    table = Table(name)
    if kind == "virtual":
        table.refused = "a virtual table: its content cannot be captured with triggers"
        return table
    if len(name.encode()) > PG_NAME_BYTES:
        table.refused = f"its name is longer than {PG_NAME_BYTES} bytes, which PostgreSQL truncates; rename it"
        return table
    row = conn.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (name,)).fetchone()
    sql = cast(tuple[str | None], row)[0] or ""
    info = cast(list[_ColumnInfo], conn.execute(f"PRAGMA table_xinfo({quote_ident(name)})").fetchall())
    json_checked = casting.json_checked_columns(sql, [r[1] for r in info])
    generated = [r[1] for r in info if r[6] in (2, 3)]
    for _, column, declared, not_null, _, _, hidden in info:
        if hidden in (2, 3):
            continue
        if len(column.encode()) > PG_NAME_BYTES:
            table.refused = (f"column {column!r} has a name longer than {PG_NAME_BYTES} bytes, which PostgreSQL "
                             "truncates; rename it in SQLite")
            return table
        checked = column in json_checked
        table.columns.append(Column(column, declared or "", casting.pg_type(declared or "", checked),
                                    casting.transform_for(declared or "", checked), bool(not_null)))
    if generated:
        table.notes.append(f"generated column(s) {', '.join(map(repr, generated))} left out: syncd does not ship "
                           "them (PRAGMA table_info does not list them)")
    primary = [r[1] for r in sorted((r for r in info if r[5] > 0), key=lambda r: r[5])]
    unique = unique_sets(conn, table)
    table.key = primary
    if not primary:
        table.key_declared = False
        table.key = next((u for u in unique if all((col := table.column(c)) and col.not_null for c in u)), [])
    table.unique = [u for u in unique if sorted(u) != sorted(table.key)]
    table.refused = key_refusal(conn, table)
    return table


def unique_sets(conn: apsw.Connection, table: Table) -> list[list[str]]:
    """The column lists of the table's UNIQUE constraints and unique indexes that PostgreSQL can hold as a UNIQUE
    constraint (PRAGMA index_list / index_xinfo): not the primary key's, not partial, not on expressions or the
    rowid, no duplicates. A collation is dropped: PostgreSQL then compares byte for byte, which refuses nothing
    SQLite accepted."""
    found: list[list[str]] = []
    for _, index, unique, origin, partial in conn.execute(f"PRAGMA index_list({quote_ident(table.name)})"):
        if not unique or origin == "pk" or partial:
            continue
        keyed = [r for r in conn.execute(f"PRAGMA index_xinfo({quote_ident(index)})") if r[5]]
        columns = [r[2] for r in keyed]
        if any(r[1] < 0 for r in keyed):
            table.notes.append(f"unique index {index!r} is on an expression or the rowid: left out")
        elif columns not in found and all(table.column(c) for c in columns):
            found.append(columns)
    for _, index, unique, _, partial in conn.execute(f"PRAGMA index_list({quote_ident(table.name)})"):
        if unique and partial:
            table.notes.append(f"partial unique index {index!r} left out (PostgreSQL holds it only as an index)")
    return sorted(found, key=lambda u: (len(u), u))


def key_refusal(conn: apsw.Connection, table: Table) -> str | None:
    """Why `syncd install` would refuse the table with this key (its own words, from capture.plan_table), or
    None."""
    if not table.key:
        return ("no PRIMARY KEY and no UNIQUE index over NOT NULL columns: the rowid is no key (VACUUM may renumber "
                "it); declare a key in SQLite, or set key = [\"col\", ...] here to columns that identify a row")
    try:
        capture.plan_table(conn, TableConfig(name=table.name, key=None if table.key_declared else table.key))
    except capture.CaptureError as exc:
        return str(exc)
    return None


def link_foreign_keys(conn: apsw.Connection, tables: list[Table]) -> None:
    """Each synced table's foreign keys onto synced tables (PRAGMA foreign_key_list), resolved to the parent's
    declared names; an untyped child column takes its parent column's type; what PostgreSQL cannot hold is noted."""
    synced = {t.name.lower(): t for t in tables if t.refused is None}
    for table in synced.values():
        listed = conn.execute(f"PRAGMA foreign_key_list({quote_ident(table.name)})").fetchall()
        rows = cast(list[_ForeignKeyInfo], listed)
        for fk_id in sorted({r[0] for r in rows}):
            parts = sorted((r for r in rows if r[0] == fk_id), key=lambda r: r[1])
            columns, parent_name = [r[3] for r in parts], parts[0][2]
            parent = synced.get(parent_name.lower())
            problem, fk = foreign_key(table, columns, parent, [r[4] for r in parts])
            if fk is None:
                table.notes.append(f"foreign key ({', '.join(columns)}) -> {parent_name} left out: {problem}")
            else:
                row = conn.execute(f"SELECT count(*) FROM pragma_foreign_key_check({quote_text(table.name)}) "
                                   "WHERE fkid = ?", (fk_id,)).fetchone()
                fk.violations = cast(tuple[int], row)[0]
                table.foreign_keys.append(fk)


FOREIGN_KEY_CHOICES = ("auto", "enforce", "comment")


def decide_foreign_keys(tables: Sequence[Table], choice: str) -> list[str]:
    """Which foreign keys schema.sql enforces (`choice`: auto, enforce, comment), and what to tell the user.

    SQLite enforces a foreign key only in connections that set PRAGMA foreign_keys=ON, a setting of each
    connection that init cannot see (https://sqlite.org/foreignkeys.html#fk_enable; sqlite-utils, like SQLite by
    default, never sets it), so an app may legitimately hold rows PostgreSQL would refuse (23503, dead-lettered).
    auto: a foreign key that rows of the file break now is written commented out, with the numbers; the others are
    enforced, with a note that says how to turn them into comments. comment: all commented out. enforce: all
    enforced. The lines to print."""
    said = []
    for table in tables:
        for fk in table.foreign_keys:
            fk.enforced = choice == "enforce" or (choice == "auto" and fk.violations == 0)
            if choice == "auto" and fk.violations:
                said.append(f"note: {fk.violations} row(s) of {table.name!r} reference a missing {fk.parent!r} row "
                            f"({', '.join(fk.columns)}): the app does not enforce this foreign key, so schema.sql "
                            "has it commented out (PostgreSQL would refuse those rows with 23503)")
    enforced = sum(fk.enforced for table in tables for fk in table.foreign_keys)
    if enforced and choice == "auto":
        said.append(f"note: {enforced} foreign key(s) written as constraints: no row of the file breaks them now, but "
                    "SQLite enforces them only where the app sets PRAGMA foreign_keys=ON, which init cannot see; if "
                    "the app may delete a parent that rows still reference, PostgreSQL refuses that delete (23503, "
                    "dead-lettered): run init with --foreign-keys comment to write them as comments")
    return said


def foreign_key(table: Table, columns: list[str], parent: Table | None,
                to: list[str | None]) -> tuple[str, ForeignKey | None]:
    """(why not, None) or ("", the ForeignKey) for one SQLite foreign key of `table`."""
    if parent is None:
        return "the parent table is not synced", None
    targets = parent.key if all(c is None for c in to) else [str(c) for c in to]
    parent_columns = [parent.column(c) for c in targets]
    child_columns = [table.column(c) for c in columns]
    if not targets or None in parent_columns or None in child_columns or len(targets) != len(columns):
        return "it names columns that are not shipped", None
    names = [c.name for c in parent_columns if c]
    if sorted(names) not in [sorted(parent.key), *map(sorted, parent.unique)]:
        return f"no PRIMARY KEY or UNIQUE on exactly ({', '.join(names)}) in {parent.name}", None
    for child, referenced in zip(child_columns, parent_columns, strict=True):
        if child and referenced and not child.declared:
            child.pg_type, child.transform = referenced.pg_type, referenced.transform
    if any(c and p and c.pg_type != p.pg_type for c, p in zip(child_columns, parent_columns, strict=True)):
        return "the columns' types differ in PostgreSQL", None
    return "", ForeignKey([c.name for c in child_columns if c], parent.name, names)


# ---- the config ------------------------------------------------------------------------------------------


def toml_string(text: str) -> str:
    """`text` as a TOML basic string (JSON's escapes are TOML's; DEL must be escaped too in TOML)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


@dataclass(frozen=True)
class Sources:
    """Multi-file mode's [source]: the glob (as given, relative to the working directory or absolute), the tenant
    pattern and the tenant column."""

    glob: str
    tenant: str = "{stem}"
    tenant_column: str = "tenant_id"

    def lines(self, out: Path) -> list[str]:
        """The [source] keys, the glob relative to `out`'s directory (as syncd reads it)."""
        pattern = self.glob if os.path.isabs(self.glob) else os.path.relpath(os.path.abspath(self.glob),
                                                                             out.absolute().parent)
        return [f"glob = {toml_string(pattern)}  # relative to this file; one file per tenant, each with this schema",
                f"tenant = {toml_string(self.tenant)}  # the tenant id from a file's name",
                f"tenant_column = {toml_string(self.tenant_column)}  # the secondary's column holding it, first in "
                "every key",
                "# auto_install = true  # install capture in a tenant's file that appears later (it changes the file)"]


def render_config(tables: list[Table], db: Path, out: Path, schema: str, *, consistency: str = "key",
                  sources: Sources | None = None) -> str:
    """The commented syncd.toml: [source] (the file, relative to `out`'s directory, or with `sources` the glob, the
    tenant pattern and column), [target] (the schema; the URL and key from the environment, never written),
    [worker] when `consistency` is "snapshot", one [[table]] per synced table with its transforms, and the tables
    left out, commented, with the reason."""
    synced = [t for t in tables if t.refused is None]
    origin = db.name if sources is None else f"{db.name} (the first of the files matching {sources.glob})"
    source = ([f"path = {toml_string(os.path.relpath(db.absolute(), out.absolute().parent))}  # relative to this file"]
              if sources is None else sources.lines(out))
    lines = [f"# syncd configuration, written by `syncd init` from {origin}: {len(synced)} table(s) synced"
             + (f", {len(tables) - len(synced)} left out (at the end, with the reason)." if len(synced) < len(tables)
                else "."),
             "# Apply the SQL written beside it to the secondary, then: syncd install && syncd run",
             "", "[source]", *source,
             "", "[target]",
             "# The PostgREST endpoint: set SUPABASE_URL (the project's URL; /rest/v1 is added) or SYNCD_TARGET_URL",
             "# (the API URL as is), or write it here:",
             '# url = "https://PROJECT.supabase.co/rest/v1"',
             f"schema = {toml_string(schema)}",
             "# The key is never written here: set SUPABASE_SERVICE_KEY (the service_role key) or",
             "# SUPABASE_SERVICE_KEY_FILE, or SUPABASE_JWT_SECRET (syncd then mints short-lived tokens itself).",
             *(["", "[worker]",
                "# Every state of the secondary's tables is one the file had (README, \"Consistency\"):",
                "# needs syncd_apply and syncd_stage, whose SQL is at the end of the SQL written beside this file.",
                'consistency = "snapshot"'] if consistency == "snapshot" else []),
             "",
             "# Shipping order: parents before children, from the foreign keys SQLite declares. `after = [...]` in a",
             "# [[table]] is only needed for a foreign key the secondary has and SQLite does not declare."]
    for table in synced:
        lines += ["", *table_section(table)]
    for table in tables:
        if table.refused is not None:
            lines += ["", f"# Not synced: {table.refused}".replace("\n", "\n# "), "# [[table]]",
                      f"# name = {toml_string(table.name)}"]
    return "\n".join(lines) + "\n"


def table_section(table: Table) -> list[str]:
    """One [[table]]: its name, the key when it is not the PRIMARY KEY, each transform with the declared type."""
    key = ", ".join(table.key)
    lines = ["[[table]]", f"name = {toml_string(table.name)}"]
    if table.key_declared:
        lines.insert(0, f"# key: the PRIMARY KEY ({key})")
    else:
        lines.insert(0, f"# key: no PRIMARY KEY; a UNIQUE index over NOT NULL columns ({key}) identifies a row")
        lines.append(f"key = [{', '.join(toml_string(c) for c in table.key)}]")
    for column in table.columns:
        if column.transform:
            lines += [f"[table.columns.{toml_string(column.name)}]  # {column.declared or '(no type)'} -> "
                      f"{column.pg_type}", f"transform = {toml_string(column.transform)}"]
    return lines


# ---- the SQL ---------------------------------------------------------------------------------------------


def with_tenant(table: Table, column: str) -> Table:
    """`table` as the secondary holds it in multi-file mode: the tenant column (text NOT NULL) first, and first in
    the key, in every UNIQUE set and on both sides of every foreign key. A source column of that name is left out
    (syncd ships the tenant's id in its place), with a note."""
    def prefixed(columns: Sequence[str]) -> list[str]:
        return [column, *(c for c in columns if c.lower() != column.lower())]

    kept = [c for c in table.columns if c.name.lower() != column.lower()]
    notes = list(table.notes)
    if len(kept) < len(table.columns):
        notes.append(f"the source column {column!r} is not shipped: syncd fills {column!r} with the file's tenant id")
    return Table(table.name, [Column(column, "", "text", None, True), *kept], prefixed(table.key), table.key_declared,
                 [prefixed(u) for u in table.unique],
                 [ForeignKey(prefixed(fk.columns), fk.parent, prefixed(fk.parent_columns), fk.violations, fk.enforced)
                  for fk in table.foreign_keys], notes, table.refused)


def pg_name(*parts: str, suffix: str) -> str:
    """A PostgreSQL object name from `parts` and `suffix` (`order_user_id_fkey`), cut to 63 bytes with a hash
    of the whole so two long names stay apart."""
    name = "_".join([*parts, suffix])
    if len(name.encode()) <= PG_NAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return name.encode()[:PG_NAME_BYTES - 10].decode(errors="ignore") + f"_{digest}_{suffix[:1]}"


def creation_order(tables: list[Table]) -> tuple[list[Table], set[tuple[str, int]]]:
    """Tables parents first (by their foreign keys, name order among equals); a cycle is broken at the table of the
    smallest name, and the foreign keys that point forward from there are returned as (table, index): those that
    close a cycle."""
    pending = {t.name: t for t in tables}
    done: list[Table] = []
    later: set[tuple[str, int]] = set()
    while pending:
        ready = [t for t in pending.values()
                 if all(fk.parent == t.name or fk.parent not in pending for fk in t.foreign_keys)]
        chosen = min(ready or pending.values(), key=lambda t: t.name)
        later |= {(chosen.name, i) for i, fk in enumerate(chosen.foreign_keys)
                  if fk.parent != chosen.name and fk.parent in pending}
        done.append(pending.pop(chosen.name))
    return done, later


def render_sql(tables: list[Table], schema: str, db: Path, tenancy: Tenancy | None = None) -> str:
    """The secondary's DDL for the synced `tables` in `schema`: idempotent (IF NOT EXISTS, DO blocks that test the
    catalog), one statement after another, for one transaction (`apply_sql`) or a migration tool. With `tenancy`
    (multi-file mode), `tables` are those of `with_tenant`, and each gets the tenant read policy."""
    synced = [t for t in tables if t.refused is None]
    order, later = creation_order(synced)
    referenced = {(fk.parent, tuple(sorted(fk.parent_columns))) for t in synced for fk in t.foreign_keys}
    s = quote_ident(schema)
    out = [f"-- The secondary's tables for syncd, written by `syncd init` from {db.name} (SQLite).",
           "-- Types: the casting table of syncd/casting.py (README, \"Start in three commands\"). Idempotent: run",
           "-- it again and nothing changes. Foreign keys carry no ON DELETE action: SQLite's own actions arrive as",
           "-- rows. Needs the role service_role (Supabase has it; plain PostgreSQL:",
           "-- deploy/supabase/migrations/000_roles_and_auth.sql).",
           "",
           do_block("IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN RAISE EXCEPTION "
                    "'role service_role does not exist: create it first (Supabase has it; plain PostgreSQL: "
                    "deploy/supabase/migrations/000_roles_and_auth.sql)'; END IF;")]
    if tenancy is not None:
        out[-1:-1] = [f"-- One secondary for every tenant's file: {quote_ident(tenancy.column)} comes first in every "
                      "key, and", f"-- `authenticated` reads the rows of the tenant its JWT's {tenancy.claim!r} claim "
                      "names (README, \"Many files\")."]
        out.append(do_block("IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN RAISE "
                            "EXCEPTION 'role authenticated does not exist: create it first (Supabase has it; plain "
                            "PostgreSQL: deploy/supabase/migrations/000_roles_and_auth.sql)'; END IF;"))
    if schema != "public":
        out += [f"CREATE SCHEMA IF NOT EXISTS {s};", f"GRANT USAGE ON SCHEMA {s} TO service_role;"]
        if tenancy is not None:
            out.append(f"GRANT USAGE ON SCHEMA {s} TO authenticated;")
    for table in order:
        out += ["", *create_table(table, schema, later, referenced)]
        if tenancy is not None:
            out += tenant_policy(table, schema, tenancy)
    for name, index in sorted(later):
        table = next(t for t in synced if t.name == name)
        cycle = one_line(cycle_text(table, index, synced))
        out += ["", f"-- Left out: this foreign key closes a cycle ({cycle}). syncd ships each table in its own",
                "-- request, so two rows that point at each other could never both land. Uncomment it only if no rows",
                "-- ever do:", f"-- {add_foreign_key(table, index, schema)}"]
    out += ["", "NOTIFY pgrst, 'reload schema';"]
    return "\n".join(out) + "\n"


def cycle_text(table: Table, index: int, tables: list[Table]) -> str:
    """`a -> b -> a`: the cycle that the foreign key `index` of `table` closes (shortest, by breadth-first search)."""
    by_name = {t.name: t for t in tables}
    start = table.foreign_keys[index].parent
    paths = {start: [start]}
    queue = [start]
    while queue:
        current = queue.pop(0)
        if current == table.name:
            return " -> ".join([table.name, *paths[current]])
        for fk in by_name[current].foreign_keys:
            if fk.parent not in paths:
                paths[fk.parent] = [*paths[current], fk.parent]
                queue.append(fk.parent)
    return f"{table.name} -> {start}"


def do_block(body: str, declare: str = "") -> str:
    """`body` (PL/pgSQL statements, after `declare`'s variables) as an anonymous DO block, with a dollar quote that
    neither holds."""
    tag = "$syncd$"
    while tag in body or tag in declare:
        tag = tag[:-1] + "_$"
    return f"DO {tag} {'DECLARE ' + declare + ' ' if declare else ''}BEGIN {body} END {tag};"


def create_table(table: Table, schema: str, later: set[tuple[str, int]], referenced: set[tuple[str, tuple[str, ...]]]
                 ) -> list[str]:
    """CREATE TABLE IF NOT EXISTS with its key, UNIQUE sets and the foreign keys that can be inline; the indexes on
    foreign-key columns; row-level security with the service_role policy; the grants."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table.name)}"
    items = [f"    {quote_ident(c.name)} {c.pg_type}{' NOT NULL' if c.not_null else ''}" for c in table.columns]
    items.append(f"    PRIMARY KEY ({column_list(table.key)})")
    for unique in table.unique:
        deferred = "" if (table.name, tuple(sorted(unique))) in referenced else " DEFERRABLE INITIALLY DEFERRED"
        items.append(f"    UNIQUE ({column_list(unique)}){deferred}")
    items += [f"    {references(fk, schema)}" for i, fk in enumerate(table.foreign_keys)
              if (table.name, i) not in later and fk.enforced]
    notes = [f"-- {one_line(note)}" for note in table.notes]
    lines = [f"-- {one_line(table.name)}", *notes, f"CREATE TABLE IF NOT EXISTS {qualified} (", ",\n".join(items), ");",
             *converge(table, schema)]
    for index, fk in enumerate(table.foreign_keys):
        if not fk.enforced and (table.name, index) not in later:
            why = (f"{fk.violations} row(s) of the file break it: the app does not enforce it" if fk.violations else
                   "init --foreign-keys comment")
            lines += [f"-- Left out ({why}); PostgreSQL would refuse such rows (23503). Uncomment it once they are "
                      "gone:", f"-- {add_foreign_key(table, index, schema)}"]
    indexed = [table.key, *table.unique]
    for fk in table.foreign_keys:
        if not any(u[:len(fk.columns)] == fk.columns for u in indexed):
            indexed.append(fk.columns)
            lines.append(f"CREATE INDEX IF NOT EXISTS {quote_ident(pg_name(table.name, *fk.columns, suffix='idx'))} "
                         f"ON {qualified} ({column_list(fk.columns)});")
    policy = quote_ident(POLICY)
    lines += [f"ALTER TABLE {qualified} ENABLE ROW LEVEL SECURITY;",
              do_block(f"IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = {quote_text(schema)} AND "
                       f"tablename = {quote_text(table.name)} AND policyname = {quote_text(POLICY)}) THEN "
                       f"CREATE POLICY {policy} ON {qualified} FOR ALL USING ({ROLE_CLAIM}) WITH CHECK ({ROLE_CLAIM}); "
                       "END IF;"),
              f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {qualified} TO service_role;"]
    return lines


def tenant_policy(table: Table, schema: str, tenancy: Tenancy) -> list[str]:
    """The SELECT policy (created when missing) and grant that let `authenticated` read its tenant's rows only."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table.name)}"
    return [do_block(f"IF NOT EXISTS (SELECT 1 FROM pg_policies WHERE schemaname = {quote_text(schema)} AND "
                     f"tablename = {quote_text(table.name)} AND policyname = {quote_text(TENANT_POLICY)}) THEN "
                     f"CREATE POLICY {quote_ident(TENANT_POLICY)} ON {qualified} FOR SELECT TO authenticated "
                     f"USING ({tenancy.policy_condition()}); END IF;"),
            f"GRANT SELECT ON TABLE {qualified} TO authenticated;"]


def converge(table: Table, schema: str) -> list[str]:
    """What makes a table of that name that already existed (CREATE TABLE IF NOT EXISTS keeps it as it is) fit, or
    stops the whole transaction with the table, the column and the fix: the columns it lacks are added (a key
    column cannot be: the error says so); a column of another type, no PRIMARY KEY or UNIQUE
    on exactly the key columns (upserts need one: 42P10), or a NOT NULL column without a default that syncd does not
    send (every upsert refused: 23502) raise an exception. Types compare as PostgreSQL resolves them (regtype: the
    same type under any of its names), without their modifiers."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table.name)}"
    where = quote_text(qualified)
    # In the DO block, not as ADD COLUMN IF NOT EXISTS: that prints a NOTICE per column of a table just created.
    adds = "".join(f"IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = {where}::regclass AND attname = "
                   f"{quote_text(c.name)} AND NOT attisdropped) THEN ALTER TABLE {qualified} ADD COLUMN "
                   f"{quote_ident(c.name)} {c.pg_type}; END IF; " for c in table.columns if c.name not in table.key)
    wanted = ", ".join(f"({quote_text(c.name)}, {quote_text(c.pg_type)})" for c in table.columns)
    names = ", ".join(quote_text(c.name) for c in table.columns)
    key = ", ".join(quote_text(c) for c in sorted(table.key))
    prefix = quote_text(f"syncd init: table {schema}.{table.name} already exists")
    fix_at = one_line(qualified).replace("'", "''")  # inside format()'s literals
    lines = [do_block(
        adds + f"SELECT string_agg(format('column %I is %s there, syncd ships %s (fix: ALTER TABLE {fix_at} "
        "ALTER COLUMN %I TYPE %s, or exclude the column in syncd.toml)', a.attname, format_type(a.atttypid, "
        "a.atttypmod), want.type, a.attname, want.type), '; ') INTO problem "
        f"FROM (VALUES {wanted}) AS want(name, type) JOIN pg_attribute a ON a.attrelid = {where}::regclass "
        "AND a.attname = want.name AND NOT a.attisdropped WHERE a.atttypid <> want.type::regtype; "
        f"IF problem IS NOT NULL THEN RAISE EXCEPTION '%: %', {prefix}, problem; END IF; "
        "SELECT string_agg(format('key column %I is missing there (fix: drop the table, or rename it, and run this "
        "again)', want), '; ') INTO problem "
        f"FROM unnest(ARRAY[{key}]::name[]) AS want WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE "
        f"a.attrelid = {where}::regclass AND a.attname = want AND NOT a.attisdropped); "
        f"IF problem IS NOT NULL THEN RAISE EXCEPTION '%: %', {prefix}, problem; END IF; "
        f"IF NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = {where}::regclass AND k.contype IN ('p', "
        "'u') AND (SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_attribute a WHERE a.attrelid = "
        f"k.conrelid AND a.attnum = ANY (k.conkey)) = ARRAY[{key}]::name[]) THEN RAISE EXCEPTION "
        f"'%: no PRIMARY KEY or UNIQUE constraint on exactly its key ({one_line(', '.join(table.key))}), which "
        f"upserts need (fix: ALTER TABLE {fix_at} ADD UNIQUE (...) on those columns)', {prefix}; "
        "END IF; "
        "SELECT string_agg(format('column %I is NOT NULL without a default there, and SQLite has no such column "
        "(fix: give it a default, or drop its NOT NULL)', a.attname), '; ') INTO problem FROM pg_attribute a "
        f"LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum WHERE a.attrelid = {where}::regclass "
        "AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull AND d.adbin IS NULL AND a.attidentity = '' "
        f"AND a.attgenerated = '' AND a.attname <> ALL (ARRAY[{names}]::name[]); "
        f"IF problem IS NOT NULL THEN RAISE EXCEPTION '%: %', {prefix}, problem; END IF;", declare="problem text;")]
    return lines


def one_line(text: str) -> str:
    """`text` for an SQL comment: a line break in a name would end the comment."""
    return " ".join(text.splitlines())


def column_list(columns: Sequence[str]) -> str:
    return ", ".join(quote_ident(c) for c in columns)


def references(fk: ForeignKey, schema: str) -> str:
    return (f"FOREIGN KEY ({column_list(fk.columns)}) REFERENCES {quote_ident(schema)}.{quote_ident(fk.parent)} "
            f"({column_list(fk.parent_columns)})")


def add_foreign_key(table: Table, index: int, schema: str) -> str:
    """The statement that adds a foreign key once every table exists, when no constraint of its name is there."""
    fk = table.foreign_keys[index]
    name = pg_name(table.name, *fk.columns, suffix="fkey")
    qualified = f"{quote_ident(schema)}.{quote_ident(table.name)}"
    return do_block(f"IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = {quote_text(name)} AND conrelid = "
                    f"{quote_text(qualified)}::regclass) THEN ALTER TABLE {qualified} ADD CONSTRAINT "
                    f"{quote_ident(name)} {references(fk, schema)}; END IF;")


# ---- applying it -----------------------------------------------------------------------------------------


def apply_sql(sql: str, pg_url: str, tables: Sequence[Table] = (), schema: str = "public") -> None:
    """Run `sql` on the PostgreSQL at `pg_url` in one transaction (all of it or nothing), after checking that no
    table of `tables` already exists there with other columns (CREATE TABLE IF NOT EXISTS would leave it as it is,
    and every row would then be refused). Raises OnboardError when psycopg is not installed (the `postgres` extra),
    a table is in the way, or the database cannot be reached or refuses (the message masks the password)."""
    try:
        import psycopg
    except ImportError:
        raise OnboardError("--apply needs psycopg: pip install 'syncd[postgres]', or run the SQL file with your own "
                           "migration tool (psql -1 -f schema.sql)") from None
    register_connection(pg_url)
    try:
        with psycopg.connect(pg_url, connect_timeout=10) as conn, conn.transaction():
            clashes = [clash for table in tables if table.refused is None
                       for clash in [table_in_the_way(conn, schema, table)] if clash]
            if clashes:
                raise OnboardError(f"--apply: {'; '.join(clashes)}; drop or rename those tables, or give another "
                                   "--schema (nothing was applied)")
            conn.execute(sql.encode())
    except psycopg.Error as exc:
        reason = error_line(exc, 500)
        raise OnboardError(f"--pg-url {mask_url(pg_url)}: {reason}; nothing was applied (one transaction)") from None


def table_in_the_way(conn: psycopg.Connection, schema: str, table: Table) -> str | None:
    """Why an existing table of that name in `schema` cannot take the rows, that the SQL cannot converge (NOT NULL
    columns without a default that syncd never fills), or None (absent, or fit once the SQL has added the columns
    it lacks: `converge`). The SQL itself stops on the rest (a column of another type, no unique key)."""
    rows = conn.execute(
        "SELECT column_name, is_nullable = 'NO' AND column_default IS NULL AND is_identity = 'NO' "
        "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s", (schema, table.name)).fetchall()
    if not rows:
        return None
    existing: dict[str, bool] = dict(rows)
    shipped = {c.name for c in table.columns}
    unfed = [name for name, required in existing.items() if required and name not in shipped]
    return (f"table {schema}.{table.name} already exists and has NOT NULL column(s) {', '.join(map(repr, unfed))} "
            "without a default that SQLite does not have (every upsert would be refused: give them a default there, "
            "or drop their NOT NULL)") if unfed else None


def write_new(files: Sequence[tuple[Path, str]]) -> None:
    """Write each (path, text) as a new file, all or none: a file that exists already, or one that cannot be
    written, leaves none of them behind. Raises OSError (FileExistsError included)."""
    written: list[Path] = []
    try:
        for path, text in files:
            with path.open("x", encoding="utf-8") as out:
                written.append(path)
                out.write(text)
    except OSError:
        for path in written:
            path.unlink(missing_ok=True)
        raise
