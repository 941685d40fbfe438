"""Collations: every comparison a trigger makes decides as SQLite decided the write, whatever collation the key column
or a unique index declares, so PostgreSQL (whose text keys compare byte for byte) ends with exactly SQLite's rows.

Each case: the app writes through stdlib sqlite3 (3.40) with syncd's triggers installed, the worker ships to
PostgreSQL behind the dev server after each step, and the rows must then be equal, spelling for spelling. Shipping
between steps matters: an old spelling only lingers in PostgreSQL when it had arrived there before the change."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import psycopg
import pytest

from syncd import capture, outbox, verify
from syncd.auth import StaticToken
from syncd.capture import CaptureError
from syncd.config import Config
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.source import Source
from syncd.state import connect
from syncd.target import PostgrestTarget
from syncd.worker import Worker
from tests.conftest import DevServer, create_tables

TARGETS = {
    "collation_tags": "CREATE TABLE collation_tags (name text PRIMARY KEY, uses bigint)",
    "collation_users": "CREATE TABLE collation_users (id bigint PRIMARY KEY, email text, v text)",
    "collation_pairs": "CREATE TABLE collation_pairs (a text, b text, v bigint, PRIMARY KEY (a, b))",
}
COLUMNS = {"collation_tags": "name, uses", "collation_users": "id, email, v", "collation_pairs": "a, b, v"}


def casefold_collation(left: str, right: str) -> int:
    """A collation an app registers itself (Unicode case folding: 'Straße' = 'STRASSE'); SQLite does not know it."""
    a, b = left.casefold(), right.casefold()
    return (a > b) - (a < b)


@dataclass
class Case:
    """SQLite's schema, the [[table]] section, and the app's steps (each a list of statements, shipped after it)."""

    schema: str
    table: dict[str, object]
    steps: list[list[str]]
    collations: dict[str, Callable[[str, str], int]] = field(default_factory=dict)


NOCASE_STEPS = [
    ["INSERT INTO collation_tags VALUES ('Python', 1), ('Rust', 1), ('Go', 1), ('Zig', 1)"],
    ["UPDATE collation_tags SET name = 'python' WHERE name = 'Python'",  # the field case: only the case changes
     "INSERT OR REPLACE INTO collation_tags VALUES ('RUST', 2)",  # evicts 'Rust' through the key itself
     "INSERT INTO collation_tags VALUES ('GO', 3) ON CONFLICT (name) DO UPDATE SET name = excluded.name, "
     "uses = excluded.uses"],
    ["BEGIN", "UPDATE collation_tags SET name = 'ZIG' WHERE name = 'zig'",
     "UPDATE collation_tags SET name = 'zIg' WHERE name = 'ZIG'", "COMMIT",  # the newest spelling wins
     "UPDATE OR REPLACE collation_tags SET name = 'PYTHON' WHERE name = 'rust'"],  # evicts 'python'
]
USERS = ["INSERT INTO collation_users VALUES (1, 'a@x', 'one'), (2, 'b@x', 'two'), (3, 'c@x', 'three')"]
CASES = {
    "nocase key": Case("CREATE TABLE collation_tags (name TEXT COLLATE NOCASE PRIMARY KEY, uses INTEGER)",
                       {"name": "collation_tags"}, NOCASE_STEPS),
    "nocase key, without rowid": Case(
        "CREATE TABLE collation_tags (name TEXT COLLATE NOCASE PRIMARY KEY, uses INTEGER) WITHOUT ROWID",
        {"name": "collation_tags"}, NOCASE_STEPS),
    "binary column, nocase primary key constraint": Case(
        "CREATE TABLE collation_tags (name TEXT, uses INTEGER, PRIMARY KEY (name COLLATE NOCASE))",
        {"name": "collation_tags"}, NOCASE_STEPS),
    "nocase unique key, rowid changed": Case(
        "CREATE TABLE collation_tags (id INTEGER PRIMARY KEY, name TEXT COLLATE NOCASE UNIQUE, uses INTEGER)",
        {"name": "collation_tags", "key": ["name"], "exclude": ["id"]},
        [["INSERT INTO collation_tags VALUES (1, 'Python', 1), (2, 'Rust', 1)"],
         ["UPDATE collation_tags SET id = 10 WHERE id = 1", "UPDATE collation_tags SET name = 'python' WHERE id = 10",
          "INSERT OR REPLACE INTO collation_tags VALUES (3, 'RUST', 2)"]]),
    "nocase key folds ASCII only, recursive triggers on": Case(
        "CREATE TABLE collation_tags (name TEXT COLLATE NOCASE PRIMARY KEY, uses INTEGER)", {"name": "collation_tags"},
        [["INSERT INTO collation_tags VALUES ('É', 1), ('é', 1), ('Ab', 1)"],
         ["PRAGMA recursive_triggers = ON", "INSERT OR REPLACE INTO collation_tags VALUES ('é', 2), ('AB', 2)",
          "UPDATE collation_tags SET name = 'ÉÉ' WHERE name = 'É'"]]),
    "configured key with a nocase index on a binary column": Case(
        "CREATE TABLE collation_tags (id INTEGER PRIMARY KEY, name TEXT, uses INTEGER);"
        "CREATE UNIQUE INDEX collation_tags_name ON collation_tags (name COLLATE NOCASE);",
        {"name": "collation_tags", "key": ["name"], "exclude": ["id"]},
        [["INSERT INTO collation_tags VALUES (1, 'Python', 1), (2, 'Rust', 1)"],
         ["UPDATE collation_tags SET name = 'python' WHERE id = 1",
          "INSERT OR REPLACE INTO collation_tags VALUES (3, 'RUST', 2)"]]),
    "nocase column, binary primary key": Case(  # 'A@x' and 'a@x' are two keys, though the column says NOCASE
        "CREATE TABLE collation_tags (name TEXT COLLATE NOCASE NOT NULL, uses INTEGER, "
        "PRIMARY KEY (name COLLATE BINARY))",
        {"name": "collation_tags"},
        [["INSERT INTO collation_tags VALUES ('A@x', 1), ('a@x', 2), ('B@x', 3), ('b@x', 4)"],
         ["UPDATE collation_tags SET uses = 5 WHERE name = 'a@x'", "DELETE FROM collation_tags WHERE name = 'B@x'"]]),
    "rtrim key": Case(
        "CREATE TABLE collation_tags (name TEXT COLLATE RTRIM PRIMARY KEY, uses INTEGER)", {"name": "collation_tags"},
        [["INSERT INTO collation_tags VALUES ('a', 1), ('b  ', 1)"],
         ["UPDATE collation_tags SET name = 'a ' WHERE name = 'a'",
          "INSERT OR REPLACE INTO collation_tags VALUES ('b', 2)"]]),
    "nocase unique index on a binary column": Case(
        "CREATE TABLE collation_users (id INTEGER PRIMARY KEY, email TEXT, v TEXT);"
        "CREATE UNIQUE INDEX collation_users_email ON collation_users (email COLLATE NOCASE);",
        {"name": "collation_users"},
        [USERS, ["INSERT OR REPLACE INTO collation_users VALUES (4, 'A@X', 'four')",
                 "UPDATE OR REPLACE collation_users SET email = 'B@X' WHERE id = 3"]]),
    "nocase unique table constraint": Case(
        "CREATE TABLE collation_users (id INTEGER PRIMARY KEY, email TEXT, v TEXT, UNIQUE (email COLLATE NOCASE))",
        {"name": "collation_users"},
        [USERS, ["INSERT OR REPLACE INTO collation_users VALUES (4, 'A@X', 'four')",
                 "INSERT INTO collation_users VALUES (5, 'C@X', 'five') ON CONFLICT DO NOTHING"]]),
    "rtrim unique index": Case(
        "CREATE TABLE collation_users (id INTEGER PRIMARY KEY, email TEXT, v TEXT);"
        "CREATE UNIQUE INDEX collation_users_email ON collation_users (email COLLATE RTRIM);",
        {"name": "collation_users"},
        [USERS, ["INSERT OR REPLACE INTO collation_users VALUES (4, 'a@x   ', 'four')"]]),
    "partial nocase unique index": Case(
        "CREATE TABLE collation_users (id INTEGER PRIMARY KEY, email TEXT, v TEXT);"
        "CREATE UNIQUE INDEX collation_users_email ON collation_users (email COLLATE NOCASE) WHERE v IS NOT NULL;",
        {"name": "collation_users"},
        [["INSERT INTO collation_users VALUES (1, 'a@x', 'one'), (2, 'A@X', NULL)"],
         ["INSERT OR REPLACE INTO collation_users VALUES (3, 'a@X', 'three')"]]),  # evicts 1; 2 is not indexed
    "composite key, nocase and binary": Case(
        "CREATE TABLE collation_pairs (a TEXT, b TEXT, v INTEGER, PRIMARY KEY (a COLLATE NOCASE, b)) WITHOUT ROWID",
        {"name": "collation_pairs"},
        [["INSERT INTO collation_pairs VALUES ('x', 'k', 1), ('y', 'k', 1), ('y', 'K', 1)"],
         ["UPDATE collation_pairs SET a = 'X' WHERE a = 'x'",
          "INSERT OR REPLACE INTO collation_pairs VALUES ('Y', 'k', 2)"]]),  # evicts ('y','k'), not ('y','K')
    "app's own collation on a unique index": Case(
        "CREATE TABLE collation_users (id INTEGER PRIMARY KEY, email TEXT, v TEXT);"
        "CREATE UNIQUE INDEX collation_users_email ON collation_users (email COLLATE casefold);",
        {"name": "collation_users"},
        [["INSERT INTO collation_users VALUES (1, 'straße@x', 'one'), (2, 'b@x', 'two')"],
         ["INSERT OR REPLACE INTO collation_users VALUES (3, 'STRASSE@X', 'three')",
          "UPDATE OR REPLACE collation_users SET email = 'B@x' WHERE id = 3"]],
        {"casefold": casefold_collation}),
}


@pytest.fixture(scope="module")
def targets(devserver: DevServer) -> None:
    """The secondary's tables: text keys compare byte for byte there (PostgreSQL's default collation)."""
    create_tables(devserver, TARGETS)


@pytest.fixture
def target(devserver: DevServer, targets: None, pg: psycopg.Connection) -> Iterator[PostgrestTarget]:
    pg.execute(f"TRUNCATE {', '.join(TARGETS)}")
    with PostgrestTarget(devserver.url, StaticToken(devserver.service_key)) as client:
        yield client


def app_connection(path: Path, case: Case) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for name, function in case.collations.items():
        db.create_collation(name, function)
    return db


def install(tmp_path: Path, case: Case) -> tuple[Path, Config]:
    path = tmp_path / "app.sqlite3"
    with contextlib.closing(app_connection(path, case)) as db:
        db.executescript("PRAGMA journal_mode=WAL;" + case.schema)
    config = Config.model_validate({"source": {"path": str(path)}, "table": [case.table]})
    capture.install(connect(path), config)
    return path, config


def ship(worker: Worker) -> None:
    """Drain the outbox into the secondary, as `syncd run --once` does, through syncd's own connection (which has
    no collation but SQLite's own)."""
    while (result := worker.drain_once()).claimed:
        assert result.dead == 0
    assert outbox.pending_total(worker.conn) == 0


def rows_in_sqlite(db: sqlite3.Connection, table: str) -> list[tuple[object, ...]]:
    return sorted(db.execute(f"SELECT {COLUMNS[table]} FROM {table}").fetchall())


def rows_in_pg(pg: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return sorted(pg.execute(f"SELECT {COLUMNS[table]} FROM {table}").fetchall())


@pytest.mark.parametrize("name", CASES)
def test_postgresql_holds_exactly_sqlites_rows(name: str, tmp_path: Path, target: PostgrestTarget,
                                               pg: psycopg.Connection):
    """Key spelling changes, REPLACE evictions through the key or a unique index and upserts that respell the key,
    under NOCASE, RTRIM and an app's own collation: after each step PostgreSQL equals SQLite, spelling for spelling."""
    case = CASES[name]
    table = str(case.table["name"])
    path, config = install(tmp_path, case)
    db = app_connection(path, case)
    worker = Worker(Source(path), config, target, Observer(Metrics()))
    for step in case.steps:
        for statement in step:
            db.execute(statement)
        ship(worker)
        assert rows_in_pg(pg, table) == rows_in_sqlite(db, table)
    # verify pages the file under the key's unique collation: one row a page still visits every key once
    report = verify.verify(connect(path, readonly=True), config, target, page=1)
    assert report.equal, report.render()


def test_field_case_records_the_old_spelling_as_deleted(tmp_path: Path):
    """07: a case-only change of a NOCASE key is a delete of the old key and an upsert of the new; a REPLACE under
    another spelling records the evicted spelling."""
    case = CASES["nocase key"]
    path, _ = install(tmp_path, case)
    db = app_connection(path, case)
    db.execute("INSERT INTO collation_tags VALUES ('Python', 1), ('Rust', 1)")
    db.execute("DELETE FROM _syncd_outbox")
    db.execute("UPDATE collation_tags SET name = 'python' WHERE name = 'Python'")
    db.execute("INSERT OR REPLACE INTO collation_tags VALUES ('RUST', 2)")
    db.execute("UPDATE collation_tags SET uses = 5 WHERE name = 'PYTHON'")  # matches 'python'; the key is unchanged
    assert db.execute("SELECT key, op FROM _syncd_outbox ORDER BY seq").fetchall() == [
        ("'Python'", "D"), ("'python'", "U"), ("'Rust'", "R"), ("'RUST'", "I"), ("'python'", "U")]


def test_a_connection_without_the_apps_collation_is_never_broken(tmp_path: Path):
    """The eviction trigger names the app's own collation only for statements that write that index's columns (which
    need the collation anyway): a connection that lacks it still updates the other columns. Install says so."""
    case = CASES["app's own collation on a unique index"]
    path, config = install(tmp_path, case)
    warnings = capture.install(connect(path), config).warnings
    assert len(warnings) == 1 and "COLLATE casefold, which only the application registers" in warnings[0]
    app_connection(path, case).execute("INSERT INTO collation_users VALUES (1, 'a@x', 'one'), (2, 'b@x', 'two')")
    plain = sqlite3.connect(path, isolation_level=None)
    plain.execute("UPDATE collation_users SET v = 'changed' WHERE id = 1")
    with pytest.raises(sqlite3.OperationalError, match="no such collation sequence: casefold"):
        plain.execute("UPDATE collation_users SET email = 'c@x' WHERE id = 1")  # SQLite's own refusal, not syncd's
    assert plain.execute("SELECT id, v FROM collation_users").fetchall() == [(1, "changed"), (2, "two")]


def test_install_refuses_a_key_in_the_apps_own_collation(tmp_path: Path):
    """syncd's connection looks rows up by key and has no such collation: install refuses, naming the column and the
    fix, and changes nothing; the table's health says the same."""
    case = Case("CREATE TABLE collation_tags (name TEXT COLLATE casefold PRIMARY KEY, uses INTEGER)",
                {"name": "collation_tags"}, [], {"casefold": casefold_collation})
    path = tmp_path / "app.sqlite3"
    app_connection(path, case).executescript(case.schema)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    config = Config.model_validate({"source": {"path": str(path)}, "table": [case.table]})
    with pytest.raises(CaptureError, match=r"key column 'name' is declared COLLATE casefold.*built-in collation"):
        capture.install(connect(path), config)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    health = capture.examine(apsw.Connection(str(path)), config.tables[0])
    assert health.triggers == "invalid" and not health.key_changed
    assert "COLLATE casefold" in str(health.problem)


@pytest.mark.parametrize("schema", [
    "CREATE TABLE t (id INTEGER PRIMARY KEY, email TEXT UNIQUE, v TEXT)",
    "CREATE TABLE t (a TEXT, b INTEGER, PRIMARY KEY (a, b)) WITHOUT ROWID",
    "CREATE TABLE t (id TEXT PRIMARY KEY, email TEXT COLLATE NOCASE UNIQUE)",  # the column's own NOCASE decides
])
def test_triggers_name_no_collation_where_the_columns_own_decides(tmp_path: Path, schema: str):
    """Tables whose comparisons need no other collation keep their triggers as before (no reinstall on upgrade)."""
    path = tmp_path / "app.sqlite3"
    sqlite3.connect(path).executescript(schema)
    table = Config.model_validate({"table": [{"name": "t"}]}).tables[0]
    planned = capture.plan_table(apsw.Connection(str(path)), table)
    assert not [sql for sql in planned.triggers().values() if "COLLATE" in sql]


def test_an_install_with_the_old_triggers_is_repaired_and_reconciled(tmp_path: Path):
    """A NOCASE-keyed table installed by a syncd that compared with the column's collation (no eviction triggers, a
    key-change test under NOCASE) may have diverged: install replaces its triggers and asks for a reconcile."""
    case = CASES["nocase key"]
    path, config = install(tmp_path, case)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        old = db.execute("SELECT sql FROM sqlite_schema WHERE name = '_syncd_collation_tags_upd'").fetchone()[0]
        db.executescript('DROP TRIGGER "_syncd_collation_tags_rep_ins"; DROP TRIGGER "_syncd_collation_tags_rep_upd";'
                         'DROP TRIGGER "_syncd_collation_tags_upd";' + old.replace(" COLLATE BINARY", "") + ";")
    assert capture.examine(connect(path), config.tables[0]).triggers == "missing"
    report = capture.install(connect(path), config)
    assert sorted(report.created) == ["_syncd_collation_tags_rep_ins", "_syncd_collation_tags_rep_upd"]
    assert report.replaced == ["_syncd_collation_tags_upd"]
    assert report.reconcile == ["collation_tags"]
    assert capture.examine(connect(path), config.tables[0]).triggers == "ok"
