"""Capture: install/uninstall and the triggers, with the application writing through stdlib sqlite3
(SQLite 3.40 here, as on Debian 12) and through apsw."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import apsw
import pytest

from syncd import capture
from syncd.capture import CaptureError
from syncd.config import Config
from syncd.keys import decode_key, unix_time
from syncd.outbox import group_entries
from syncd.state import connect


def make_db(tmp_path: Path, schema: str) -> Path:
    path = tmp_path / "app.sqlite3"
    app = sqlite3.connect(path)
    app.executescript("PRAGMA journal_mode=WAL;" + schema)
    app.close()
    return path


def config_for(path: Path, *tables: dict[str, object]) -> Config:
    return Config.model_validate({"source": {"path": str(path)}, "table": list(tables)})


def installed(tmp_path: Path, schema: str, *tables: dict[str, object]) -> tuple[Path, Config]:
    path = make_db(tmp_path, schema)
    config = config_for(path, *tables)
    capture.install(connect(path), config)
    return path, config


def outbox(path: Path) -> list[tuple[str, tuple[object, ...], str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT tbl, key, op FROM _syncd_outbox ORDER BY seq")
        return [(t, decode_key(k), op) for t, k, op in rows]


def app(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_stdlib_sqlite_is_the_debian_12_version():
    """The triggers are exercised with the SQLite the app most likely links (3.40 on Debian 12)."""
    assert sqlite3.sqlite_version_info[:2] <= (3, 46)


def test_insert_update_delete_are_recorded_in_the_apps_transaction(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1, 'a')")
    db.execute("UPDATE t SET v = 'b' WHERE id = 1")
    db.execute("DELETE FROM t WHERE id = 1")
    assert outbox(path) == [("t", (1,), "I"), ("t", (1,), "U"), ("t", (1,), "D")]


def test_apsw_writes_are_recorded_too(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id TEXT PRIMARY KEY, v);", {"name": "t"})
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute("INSERT INTO t VALUES ('k', 1)")
    assert outbox(path) == [("t", ("k",), "I")]


def test_install_twice_changes_nothing(tmp_path: Path):
    path, config = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, u TEXT UNIQUE);", {"name": "t"})
    before = sqlite3.connect(path).execute("SELECT type, name, sql FROM sqlite_schema ORDER BY name").fetchall()
    conn = connect(path)
    changes = conn.total_changes()
    report = capture.install(conn, config)
    assert conn.total_changes() == changes
    assert not report.created and not report.replaced and len(report.unchanged) == 5
    assert sqlite3.connect(path).execute("SELECT type, name, sql FROM sqlite_schema ORDER BY name").fetchall() == before


def test_install_names_the_tables_whose_existing_rows_need_a_resync(tmp_path: Path):
    """Triggers capture what comes after install; rows already there ship only after a resync, and install says so
    for each table installed now that holds rows (not again at the next install)."""
    path = make_db(tmp_path, "CREATE TABLE full (id INTEGER PRIMARY KEY); CREATE TABLE empty (id INTEGER PRIMARY KEY);"
                             "INSERT INTO full VALUES (1);")
    config = config_for(path, {"name": "full"}, {"name": "empty"})
    assert capture.install(connect(path), config).unshipped == ["full"]
    assert capture.install(connect(path), config).unshipped == []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("schema", "table", "message"), [
    ("CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "missing"}, "does not exist"),
    ("CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE VIEW v AS SELECT * FROM t;", {"name": "v"}, "is a view"),
    ("CREATE TABLE t (a, b);", {"name": "t"}, "has no primary key"),
    ("CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t", "key": ["nope"]}, "do not exist"),
])
def test_install_refuses_without_touching_the_file(tmp_path: Path, schema: str, table: dict[str, object],
                                                   message: str):
    path = make_db(tmp_path, schema + "CREATE TABLE ok (id INTEGER PRIMARY KEY);")
    before = digest(path)
    with pytest.raises(CaptureError, match=message):
        capture.install(connect(path), config_for(path, {"name": "ok"}, table))
    assert digest(path) == before


def test_install_refuses_a_virtual_table(tmp_path: Path):
    path = make_db(tmp_path, "")
    conn = apsw.Connection(str(path))
    conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
    conn.close()
    with pytest.raises(CaptureError, match="virtual table"):
        capture.install(connect(path), config_for(path, {"name": "docs"}))


def test_table_without_primary_key_works_with_a_configured_key(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (code TEXT, v);", {"name": "t", "key": ["code"]})
    app(path).execute("INSERT INTO t VALUES ('x', 1)")
    assert outbox(path) == [("t", ("x",), "I")]


def test_any_identifier_works(tmp_path: Path):
    """Spaces, quotes, dots, non-ASCII and SQL keywords in table and column names."""
    schema = 'CREATE TABLE "my ""odd"" table.v2" ("clé primaire" TEXT PRIMARY KEY, "select" INT);' \
             'CREATE TABLE "order" ("group" INTEGER PRIMARY KEY);'
    path, _ = installed(tmp_path, schema, {"name": 'my "odd" table.v2'}, {"name": "order"})
    db = app(path)
    db.execute('INSERT INTO "my ""odd"" table.v2" VALUES (\'ü,1\', 1)')
    db.execute('INSERT INTO "order" VALUES (7)')
    db.execute('UPDATE "order" SET "group" = 8')
    assert outbox(path) == [('my "odd" table.v2', ("ü,1",), "I"), ("order", (7,), "I"), ("order", (7,), "D"),
                            ("order", (8,), "U")]


def test_composite_key_on_a_without_rowid_table(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE p (a TEXT, b INT, v, PRIMARY KEY (a, b)) WITHOUT ROWID;",
                        {"name": "p"})
    db = app(path)
    db.execute("INSERT INTO p VALUES ('x,y', 1, 'v')")
    db.execute("UPDATE p SET b = 2")
    assert outbox(path) == [("p", ("x,y", 1), "I"), ("p", ("x,y", 1), "D"), ("p", ("x,y", 2), "U")]


def test_update_that_changes_the_key_records_old_and_new(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1, 'a')")
    db.execute("UPDATE t SET id = 2")
    assert outbox(path)[1:] == [("t", (1,), "D"), ("t", (2,), "U")]


def test_insert_or_replace_records_rows_deleted_through_another_unique_index(tmp_path: Path):
    """REPLACE silently deletes a row colliding on UNIQUE(email): its key must reach the outbox."""
    path, _ = installed(tmp_path, "CREATE TABLE u (id INTEGER PRIMARY KEY, email TEXT UNIQUE, v);", {"name": "u"})
    db = app(path)
    db.execute("PRAGMA recursive_triggers = OFF")
    db.execute("INSERT INTO u VALUES (1, 'a@x', 'first')")
    db.execute("INSERT OR REPLACE INTO u VALUES (2, 'a@x', 'second')")
    assert db.execute("SELECT id FROM u").fetchall() == [(2,)]
    keys = {key for _, key, _ in outbox(path)}
    assert keys == {(1,), (2,)}


def test_update_or_replace_records_the_row_it_deletes(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE u (id INTEGER PRIMARY KEY, email TEXT UNIQUE);", {"name": "u"})
    db = app(path)
    db.execute("INSERT INTO u VALUES (1, 'a'), (2, 'b')")
    db.execute("UPDATE OR REPLACE u SET email = 'a' WHERE id = 2")
    assert db.execute("SELECT id FROM u").fetchall() == [(2,)]
    assert ("u", (1,), "R") in outbox(path)


def test_replace_on_the_key_itself_and_upsert_are_recorded(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1, 'a')")
    db.execute("INSERT OR REPLACE INTO t VALUES (1, 'b')")
    db.execute("INSERT INTO t VALUES (1, 'c') ON CONFLICT (id) DO UPDATE SET v = excluded.v")
    assert [(k, op) for _, k, op in outbox(path)] == [((1,), "I"), ((1,), "I"), ((1,), "U")]


def test_configured_key_other_than_rowid_sees_replace_on_the_primary_key(tmp_path: Path):
    """With key = [uuid], a REPLACE on the integer primary key deletes a row with another uuid."""
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, uuid TEXT UNIQUE);",
                        {"name": "t", "key": ["uuid"]})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1, 'old')")
    db.execute("INSERT OR REPLACE INTO t VALUES (1, 'new')")
    assert {key for _, key, _ in outbox(path)} == {("old",), ("new",)}


def test_rolled_back_transactions_and_savepoints_record_nothing(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    db = app(path)
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (1)")
    db.execute("ROLLBACK")
    db.execute("BEGIN")
    db.execute("INSERT INTO t VALUES (2)")
    db.execute("SAVEPOINT s")
    db.execute("INSERT INTO t VALUES (3)")
    db.execute("ROLLBACK TO s")
    db.execute("COMMIT")
    assert outbox(path) == [("t", (2,), "I")]


def test_hundred_thousand_rows_in_one_transaction(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);", {"name": "t"})
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO t VALUES (?, ?)", ((i, "x") for i in range(100_000)))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*), count(DISTINCT key) FROM _syncd_outbox").fetchone() == (100_000, 100_000)


def test_delete_without_where_records_every_row(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    db = app(path)
    db.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50) "
               "INSERT INTO t SELECT i FROM n")
    db.execute("DELETE FROM t")
    deletes = [key for _, key, op in outbox(path) if op == "D"]
    assert sorted(deletes) == [(i,) for i in range(1, 51)]


def test_any_storable_value_never_fails_the_apps_statement(tmp_path: Path):
    """BLOB and invalid UTF-8 keys, NULL in a TEXT primary key, huge TEXT, Infinity: all captured."""
    path, _ = installed(tmp_path, "CREATE TABLE t (k TEXT PRIMARY KEY, v);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (X'00FF10', 'blob key')")
    db.execute("INSERT INTO t VALUES (CAST(X'C328' AS TEXT), 'invalid utf-8 key')")
    db.execute("INSERT INTO t VALUES (NULL, 'null key')")
    db.execute("INSERT INTO t VALUES ('huge', ?)", ("x" * 5_000_000,))
    db.execute("INSERT INTO t VALUES (9e999, 'infinity')")
    db.execute("INSERT INTO t VALUES ('blob value', X'DEADBEEF')")
    with sqlite3.connect(path) as conn:
        conn.text_factory = bytes
        keys = [k for (k,) in conn.execute("SELECT key FROM _syncd_outbox ORDER BY seq")]
    assert keys == [b"X'00FF10'", b"'\xc3('", b"NULL", b"'huge'", b"'Inf'", b"'blob value'"]
    assert decode_key("X'00FF10'") == (b"\x00\xff\x10",)
    assert decode_key("NULL") == (None,)


@pytest.mark.parametrize("value", [0, -1, 2**63 - 1, -(2**63), 0.1 + 0.2, 1e300, -2.5e-300, float("inf"),
                                   float("-inf"), "", "it's", "a,b", "NULL", "'", "\n", "é東", b"", b"\x00'",
                                   None, 1.0])
def test_decode_key_inverts_sqlite_quote(value: object):
    conn = sqlite3.connect(":memory:")
    (encoded,) = conn.execute("SELECT quote(?) || ',' || quote(?)", (value, 7)).fetchone()
    decoded = decode_key(encoded)
    assert decoded == (value, 7) and type(decoded[0]) is type(value)


@pytest.mark.parametrize("value", [0, 7, 2**63 - 1, -1, -(2**63), "7", "07", 7.0, b"7", None, "\u0667"])
def test_a_claimed_key_decodes_alike_on_the_integer_fast_path_and_the_general_one(value: object):
    """`group_entries` decodes a key of ASCII digits at once (the common INTEGER key); every other spelling goes
    through `decode_key`: both read what SQLite's quote() wrote, type included."""
    conn = sqlite3.connect(":memory:")
    (raw,) = conn.execute("SELECT CAST(quote(?) AS BLOB)", (value,)).fetchone()
    (change,) = group_entries([(1, "t", raw, "I", 2461000.5)])
    assert change.key == decode_key(raw.decode("utf-8")) == (value,)
    assert type(change.key[0]) is type(value) and change.raw_key == raw and change.key_text == raw.decode("utf-8")
    assert change.entries[0].at == unix_time(2461000.5)


def test_new_columns_need_no_reinstall(tmp_path: Path):
    path, config = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    db = app(path)
    db.execute("ALTER TABLE t ADD COLUMN extra TEXT")
    db.execute("INSERT INTO t VALUES (1, 'x')")
    assert outbox(path) == [("t", (1,), "I")]
    report = capture.install(connect(path), config)
    assert not report.created and not report.replaced


def test_uninstall_keeps_the_outbox_unless_asked(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1)")
    report = capture.uninstall(connect(path))
    assert sorted(report.dropped_triggers) == ["_syncd_t_del", "_syncd_t_ins", "_syncd_t_upd"]
    db.execute("INSERT INTO t VALUES (2)")
    assert outbox(path) == [("t", (1,), "I")]
    with pytest.raises(CaptureError, match="--force"):
        capture.uninstall(connect(path), drop_outbox=True)
    assert outbox(path) == [("t", (1,), "I")]
    capture.uninstall(connect(path), drop_outbox=True, force=True)
    names = [n for (n,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_schema")]
    assert names == ["t"]


def test_uninstall_drops_an_empty_outbox_without_force(tmp_path: Path):
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    report = capture.uninstall(connect(path), drop_outbox=True)
    assert "_syncd_outbox" in report.dropped_tables


def test_uninstall_archive_copies_everything_then_removes_syncd(tmp_path: Path):
    """Phase 4: the outbox, dead letters, journal and meta go to a new file; the app's file keeps only its own."""
    path, _ = installed(tmp_path, "CREATE TABLE t (id INTEGER PRIMARY KEY);", {"name": "t"})
    db = app(path)
    db.execute("INSERT INTO t VALUES (1), (2)")
    sqlite3.connect(f"{path}-syncd", isolation_level=None).execute("INSERT INTO journal VALUES ('t', '9', 0)")
    db.execute("INSERT INTO _syncd_dead_letter (tbl, key, op, enqueued_at, failed_at, message) "
               "VALUES ('t', '8', 'I', 0, 0, 'refused')")
    archive = tmp_path / "archive.sqlite3"
    capture.uninstall(connect(path), archive=archive)
    kept = sqlite3.connect(archive)
    assert kept.execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (2,)
    assert kept.execute("SELECT message FROM _syncd_dead_letter").fetchall() == [("refused",)]
    assert kept.execute("SELECT key FROM _syncd_journal").fetchall() == [("9",)]
    assert [n for (n,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_schema")] == ["t"]
    with pytest.raises(CaptureError, match="already exists"):
        capture.uninstall(connect(path), archive=archive)
