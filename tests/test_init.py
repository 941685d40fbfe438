"""`syncd init`: the casting table, the config and SQL it writes from a SQLite file, and the round trip with no edit
of either: init -> apply to PostgreSQL -> install -> the app writes (stdlib sqlite3) -> run --once -> verify equal,
for the demo schema and for a schema of every SQLite type affinity and quirk (keyword names, quoted names, WITHOUT
ROWID, STRICT, composite keys, self-references, a foreign-key cycle, generated columns)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from syncd.casting import affinity, json_checked_columns, pg_type, transform_for
from syncd.config import load_config
from syncd.demo.app import DemoApp, Workload
from tests.conftest import DevServer
from tests.e2e import free_port
from tests.postgrest import Secondary

SCHEMA = "syncd_test"  # exposed by the session dev server (and the real PostgREST of tests/postgrest.py)
QUIRKS = """
CREATE TABLE "user" (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, created DATETIME, active BOOLEAN,
                     prefs JSON, avatar BLOB);
CREATE TABLE "order" (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES "user" (id) ON DELETE CASCADE,
                      total DECIMAL(10,2), note TEXT CHECK (note IS NULL OR json_valid(note)),
                      parent_id REFERENCES "order" (id), big UNSIGNED BIG INT, ratio DOUBLE, day DATE,
                      twice INTEGER GENERATED ALWAYS AS (id * 2) VIRTUAL);
CREATE TABLE "group" (name TEXT, code TEXT NOT NULL, UNIQUE (code));
CREATE TABLE "odd ""name"" x" ("col one" TEXT, "x""y" VARCHAR(255), n INT, u UUID, t TIME, s STRING, untyped,
                               PRIMARY KEY ("col one", n)) WITHOUT ROWID;
CREATE TABLE q_a (id INTEGER PRIMARY KEY, b_id INTEGER REFERENCES q_b (id));
CREATE TABLE q_b (id INTEGER PRIMARY KEY, a_id INTEGER REFERENCES q_a (id));
CREATE TABLE q_strict (id INTEGER PRIMARY KEY, v ANY, r REAL, label TEXT UNIQUE) STRICT;
CREATE TABLE q_ref (id INTEGER PRIMARY KEY, label TEXT REFERENCES q_strict (label));
CREATE TABLE q_nokey (a, b);
CREATE VIEW q_view AS SELECT * FROM q_a;
"""
QUIRK_TABLES = ["order", "user", "group", 'odd "name" x', "q_a", "q_b", "q_strict", "q_ref"]
DEMO_TABLES = ["fact", "evidence", "search_chunk", "document_section", "document_table", "api_endpoint", "log", "tag",
               "tag_prompt", "entity", "structure", "metric_hit", "summary", "artifact", "document", "cipher_memory",
               "user_pref", "skill"]


# ---- the casting table --------------------------------------------------------------------------------


@pytest.mark.parametrize(("declared", "expected"), [
    ("INTEGER", ("bigint", None)), ("INT", ("bigint", None)), ("TINYINT", ("bigint", None)),
    ("BIGINT", ("bigint", None)), ("INT(11) UNSIGNED", ("bigint", None)),
    ("UNSIGNED BIG INT", ("numeric", None)), ("BIGINT UNSIGNED", ("numeric", None)),
    ("REAL", ("double precision", None)), ("DOUBLE", ("double precision", None)),
    ("DOUBLE PRECISION", ("double precision", None)), ("FLOAT", ("double precision", None)),
    ("NUMERIC", ("numeric", None)), ("DECIMAL(10,2)", ("numeric", None)), ("decimal (10, 5)", ("numeric", None)),
    ("TEXT", ("text", None)), ("VARCHAR(255)", ("text", None)), ("CHARACTER VARYING(70)", ("text", None)),
    ("NATIVE CHARACTER(70)", ("text", None)), ("CLOB", ("text", None)), ("NVARCHAR(100)", ("text", None)),
    ("BLOB", ("bytea", "bytea")), ("BOOLEAN", ("boolean", "bool")), ("bool", ("boolean", "bool")),
    ("DATE", ("date", None)), ("DATETIME", ("timestamptz", "timestamp")), ("TIMESTAMP", ("timestamptz", "timestamp")),
    ("timestamp with time zone", ("timestamptz", "timestamp")), ("JSON", ("jsonb", "json")),
    ("JSONB", ("jsonb", "json")), ("UUID", ("text", None)), ("TIME", ("text", None)), ("", ("text", None)),
    ("STRING", ("text", None)), ("ANY", ("text", None)), ("MONEY", ("text", None)),
    ("FLOATING POINT", ("bigint", None)),  # SQLite's own example: "POINT" holds INT, so INTEGER affinity
    ("INTERVAL", ("bigint", None)),
])
def test_declared_types_cast_as_documented(declared: str, expected: tuple[str, str | None]):
    """Each declaration gets the type and transform of the casting table (SQLite's affinity rules where no name
    matches)."""
    assert (pg_type(declared), transform_for(declared)) == expected


def test_affinity_follows_sqlite_rule_order():
    """https://sqlite.org/datatype3.html 3.1: INT before CHAR ("CHARINT" is INTEGER), BLOB, REAL, else NUMERIC."""
    assert [affinity(t) for t in ("CHARINT", "VARCHAR", "BLOB", "FLOA", "DATETIME", "")] == \
        ["INTEGER", "TEXT", "BLOB", "REAL", "NUMERIC", ""]


def test_a_json_valid_check_makes_jsonb():
    """CHECK (json_valid(col)) in any spelling of the name marks the column; json_valid outside a CHECK does not."""
    sql = ('CREATE TABLE t (a TEXT CHECK (a IS NULL OR json_valid(a)), "B c" TEXT, d TEXT DEFAULT (json_valid(\'x\')),'
           ' e TEXT, CHECK (JSON_VALID( "B c" )), CHECK (e <> \'json_valid(d)\'))')
    assert json_checked_columns(sql, ["a", "B c", "d", "e"]) == {"a", "B c"}
    assert (pg_type("TEXT", True), transform_for("TEXT", True)) == ("jsonb", "json")


# ---- the files ----------------------------------------------------------------------------------------


def init(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", "init", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def quirks_db(path: Path) -> Path:
    sqlite3.connect(path).executescript(QUIRKS)
    return path


def test_config_loads_as_written_with_keys_transforms_and_refusals(tmp_path: Path):
    """The written config loads with syncd's loader untouched: one [[table]] per table with a key (a UNIQUE over NOT
    NULL columns is the key of a table without PRIMARY KEY), the transforms of the casting table, the keyless table
    commented out with the reason, views and SQLite's own tables left out."""
    db = quirks_db(tmp_path / "app.db")
    result = init("--db", str(db), "--out", str(tmp_path / "syncd.toml"), "--sql", str(tmp_path / "schema.sql"),
                  "--schema", SCHEMA)
    assert result.returncode == 0, result.stderr
    config = load_config(tmp_path / "syncd.toml", env={})
    assert config.source.path == db and config.target.schema_name == SCHEMA
    assert sorted(t.name for t in config.tables) == sorted(QUIRK_TABLES)
    assert config.table("group").key == ["code"] and config.table("order").key is None
    transforms = {(t.name, c): s.transform for t in config.tables for c, s in t.columns.items()}
    assert transforms == {("user", "created"): "timestamp", ("user", "active"): "bool", ("user", "prefs"): "json",
                          ("user", "avatar"): "bytea", ("order", "note"): "json"}
    text = (tmp_path / "syncd.toml").read_text()
    assert '# name = "q_nokey"' in text and "no PRIMARY KEY and no UNIQUE index over NOT NULL columns" in text
    assert "q_view" not in text and "service_key =" not in text


def test_only_and_exclude_choose_tables(tmp_path: Path):
    """--tables keeps those, --exclude drops those; a foreign key onto a table left out is left out of the SQL."""
    db = quirks_db(tmp_path / "app.db")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"),
                  "--tables", "order", "user", "q_a", "--exclude", "user")
    assert result.returncode == 0, result.stderr
    assert [t.name for t in load_config(tmp_path / "c.toml", env={}).tables] == ["order", "q_a"]
    sql = (tmp_path / "s.sql").read_text()
    assert "foreign key (user_id) -> user left out: the parent table is not synced" in sql
    assert 'REFERENCES "public"."order" ("id")' in sql and 'REFERENCES "public"."user"' not in sql


@pytest.mark.parametrize(("args", "flag"), [
    (["--apply"], "--pg-url"),
    (["--pg-url", "postgresql://u@127.0.0.1:1/db"], "--pg-url"),  # without --apply: read the schema there
    (["--tables", "nope"], "--tables"),
    (["--exclude", "orders"], "--exclude"),
    (["--schema", ""], "--schema"),
    (["--tables", "q_view"], "is a view"),
])
def test_usage_errors_name_the_flag(tmp_path: Path, args: list[str], flag: str):
    """A usage mistake is exit 2 with one `error:` line naming the flag, and no file written."""
    db = quirks_db(tmp_path / "app.db")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"), *args)
    assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "c.toml").exists() and not (tmp_path / "s.sql").exists()


def test_existing_files_are_never_overwritten(tmp_path: Path):
    """An existing --out or --sql is refused (exit 2) and stays as it was; so is a --db that is not SQLite."""
    db = quirks_db(tmp_path / "app.db")
    (tmp_path / "s.sql").write_text("mine")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"))
    assert result.returncode == 2 and "--sql" in result.stderr and "already exist" in result.stderr
    assert (tmp_path / "s.sql").read_text() == "mine" and not (tmp_path / "c.toml").exists()
    (tmp_path / "c.toml").write_text("mine too")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"))
    assert "--out" in result.stderr and "--sql" in result.stderr  # both named at once
    (tmp_path / "x.txt").write_text("not a database")
    result = init("--db", str(tmp_path / "x.txt"), "--out", str(tmp_path / "d.toml"), "--sql", str(tmp_path / "d.sql"))
    assert result.returncode == 2 and "--db" in result.stderr and "not a SQLite database" in result.stderr
    assert "source.path" not in result.stderr  # init has no config: the message names its flag


def test_nothing_is_written_or_applied_when_a_file_cannot_be_written(tmp_path: Path, pg: psycopg.Connection,
                                                                     devserver: DevServer):
    """A missing folder for --out or --sql is found before the SQL is applied or a file is written."""
    db = quirks_db(tmp_path / "app.db")
    drop_tables(devserver.pg_url, ["user"])
    for out, sql in (("missing/c.toml", "s.sql"), ("c.toml", "missing/s.sql")):
        result = init("--db", str(db), "--out", str(tmp_path / out), "--sql", str(tmp_path / sql), "--schema", SCHEMA,
                      "--apply", "--pg-url", devserver.pg_url)
        assert result.returncode == 2 and "is not a directory" in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "c.toml").exists() and not (tmp_path / "s.sql").exists()
    assert pg.execute("SELECT to_regclass(%s)", (f'{SCHEMA}."user"',)).fetchone() == (None,)


@pytest.mark.parametrize("schema", ["", "CREATE TABLE log (at TEXT, line TEXT);"], ids=["no-tables", "no-key"])
def test_a_file_with_nothing_to_sync_is_refused(tmp_path: Path, schema: str):
    db = tmp_path / "app.db"
    sqlite3.connect(db).executescript(schema or "PRAGMA user_version = 1;")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"))
    assert result.returncode == 2 and "no table" in result.stderr and "nothing was written" in result.stderr
    assert not (tmp_path / "c.toml").exists() and not (tmp_path / "s.sql").exists()


def test_apply_refuses_a_table_of_that_name_with_other_columns(tmp_path: Path, pg: psycopg.Connection,
                                                               devserver: DevServer):
    """CREATE TABLE IF NOT EXISTS would keep a table of another shape and report success; init names it instead,
    and applies nothing."""
    db = quirks_db(tmp_path / "app.db")
    drop_tables(devserver.pg_url, ["user", "order"])
    pg.execute(f'CREATE TABLE {SCHEMA}."user" (id bigint PRIMARY KEY, tag text NOT NULL)')
    try:
        result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"),
                      "--schema", SCHEMA, "--apply", "--pg-url", devserver.pg_url)
        assert result.returncode == 2, result.stderr
        assert f"table {SCHEMA}.user already exists and has NOT NULL column(s) 'tag'" in result.stderr
        assert "give them a default there" in result.stderr and "nothing was applied" in result.stderr
        assert pg.execute("SELECT to_regclass(%s)", (f'{SCHEMA}."order"',)).fetchone() == (None,)
    finally:
        drop_tables(devserver.pg_url, ["user"])


def apply_file(pg_url: str, sql_file: Path) -> str | None:
    """schema.sql as `psql -1 -f` runs it: one transaction; the error's message, or None when it applied."""
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn, conn.transaction():
            conn.execute(sql_file.read_text().encode())
    except psycopg.Error as exc:
        return str(exc)
    return None


def test_schema_sql_converges_a_table_that_exists_and_stops_on_what_it_cannot(tmp_path: Path, pg: psycopg.Connection,
                                                                              devserver: DevServer):
    """Issue 19, point 5: CREATE TABLE IF NOT EXISTS keeps a table of that name as it is; the SQL then adds the
    columns it lacks, and stops the whole transaction, naming the table, the column and the fix, on a column of
    another type or a table without a unique key on syncd's key columns."""
    db = quirks_db(tmp_path / "app.db")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"),
                  "--schema", SCHEMA)
    assert result.returncode == 0, result.stderr
    drop_tables(devserver.pg_url, ["user", "order"])
    try:
        pg.execute(f'CREATE TABLE {SCHEMA}."user" (id bigint PRIMARY KEY, created timestamptz)')
        assert apply_file(devserver.pg_url, tmp_path / "s.sql") is None
        columns = {r[0]: r[1] for r in pg.execute("SELECT column_name, data_type FROM information_schema.columns "
                                                  "WHERE table_schema = %s AND table_name = 'user'", (SCHEMA,))}
        assert {"email", "active", "prefs", "avatar"} <= set(columns) and columns["prefs"] == "jsonb"
        drop_tables(devserver.pg_url, ["user", "order"])
        pg.execute(f'CREATE TABLE {SCHEMA}."user" (id bigint PRIMARY KEY, active text)')
        error = apply_file(devserver.pg_url, tmp_path / "s.sql")
        assert error is not None and f"table {SCHEMA}.user already exists" in error, error
        assert "column active is text there, syncd ships boolean" in error and "ALTER COLUMN active TYPE" in error
        assert pg.execute("SELECT to_regclass(%s)", (f'{SCHEMA}."order"',)).fetchone() == (None,)  # one transaction
        drop_tables(devserver.pg_url, ["user"])
        pg.execute(f'CREATE TABLE {SCHEMA}."user" (id bigint, email text)')
        error = apply_file(devserver.pg_url, tmp_path / "s.sql")
        assert error is not None and "no PRIMARY KEY or UNIQUE constraint on exactly its key (id)" in error, error
    finally:
        drop_tables(devserver.pg_url, ["user", "order"])


@pytest.mark.parametrize("choice", ["auto", "comment", "enforce"])
def test_foreign_keys_are_enforced_or_commented_as_asked_and_auto_says_why(tmp_path: Path, choice: str):
    """Issue 19, point 3: no row of the quirks file breaks its foreign keys, so auto enforces them and says how
    to write them as comments; comment writes each as a comment; enforce says nothing."""
    db = quirks_db(tmp_path / "app.db")
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"),
                  "--foreign-keys", choice)
    assert result.returncode == 0, result.stderr
    sql = (tmp_path / "s.sql").read_text()
    inline = [line for line in sql.splitlines() if line.startswith("    FOREIGN KEY")]
    assert bool(inline) == (choice != "comment"), sql
    assert ("-- Left out (init --foreign-keys comment)" in sql) == (choice == "comment")
    assert ("--foreign-keys comment to write them as comments" in result.stdout) == (choice == "auto"), result.stdout


PG_URL_FORMS = ["postgresql://app:{secret}@127.0.0.1:{port}/db", "postgresql://127.0.0.1:{port}/db?password={secret}",
                "host=127.0.0.1 port={port} user=app password={secret} dbname=db",
                "host=127.0.0.1 port={port} password='{secret}' dbname=db",
                "postgresql://app:{secret}@[::1",  # a malformed URL: libpq refuses it
                "postgresql://app:Pa@{secret}@127.0.0.1:{port}/db"]  # an unencoded "@": libpq calls the rest the host


@pytest.mark.parametrize("form", PG_URL_FORMS, ids=["userinfo", "query", "keywords", "quoted", "malformed", "at-sign"])
def test_the_pg_url_password_is_never_printed(tmp_path: Path, form: str):
    """A database that cannot be reached, in every form libpq takes: exit 2, nothing written, the URL shown without
    its password, no traceback (`check --pg-url`: tests/test_bad_input.py)."""
    db = quirks_db(tmp_path / "app.db")
    secret = "s3cr3t-pa55word-xyz"
    url = form.format(secret=secret, port=free_port())
    result = init("--db", str(db), "--out", str(tmp_path / "c.toml"), "--sql", str(tmp_path / "s.sql"), "--apply",
                  "--pg-url", url)
    assert result.returncode == 2 and "--pg-url" in result.stderr and "nothing was applied" in result.stderr
    assert "Traceback" not in result.stderr
    assert secret not in result.stderr + result.stdout and not (tmp_path / "s.sql").exists()


# ---- the round trip ----------------------------------------------------------------------------------


def drop_tables(pg_url: str, names: list[str]) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP TABLE IF EXISTS {SCHEMA}."{name.replace(chr(34), chr(34) * 2)}" CASCADE')


def exposed(server: Secondary) -> set[str]:
    """The tables of SCHEMA the secondary's OpenAPI lists now."""
    with server.client(server.service_key, **{"Accept-Profile": SCHEMA}) as client:
        answer = client.get("/")
    return set(answer.json().get("definitions", {})) if answer.status_code == 200 else set()


def wait_exposed(server: Secondary, tables: list[str], timeout: float = 20, *, listed: bool = True) -> None:
    """Until the secondary's OpenAPI for SCHEMA lists every table (the SQL ends with NOTIFY pgrst), or, with
    `listed=False`, none of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (set(tables) <= exposed(server)) if listed else not set(tables) & exposed(server):
            return
        time.sleep(0.1)
    raise AssertionError(f"{tables} {'not' if listed else 'still'} exposed by {server.url}")


def forget_tables(server: Secondary, names: list[str]) -> None:
    """Drop tables of SCHEMA and wait until the secondary's schema cache no longer serves them, so that seeing them
    listed later proves a reload that came after their creation."""
    drop_tables(server.pg_url, names)
    with psycopg.connect(server.pg_url, autocommit=True) as conn:
        conn.execute("NOTIFY pgrst, 'reload schema'")
    wait_exposed(server, names, listed=False)


def syncd(config: Path, server: Secondary, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYNCD_TARGET_URL": server.url, "SUPABASE_JWT_SECRET": server.jwt_secret}
    return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=180, env=env)


def onboard(tmp_path: Path, db: Path, server: Secondary, tables: list[str]) -> Path:
    """init --apply into SCHEMA, then install, with neither file edited; returns the config."""
    forget_tables(server, tables)
    out = tmp_path / "syncd.toml"
    result = init("--db", str(db), "--out", str(out), "--sql", str(tmp_path / "schema.sql"), "--schema", SCHEMA,
                  "--apply", "--pg-url", server.pg_url)
    assert result.returncode == 0, result.stderr
    wait_exposed(server, tables)
    installed = syncd(out, server, "install")
    assert installed.returncode == 0, installed.stderr
    return out


def ship_and_verify(config: Path, server: Secondary) -> None:
    ran = syncd(config, server, "run", "--once", "--metrics-addr", f"127.0.0.1:{free_port()}")
    assert ran.returncode == 0, ran.stderr[-3000:]
    verified = syncd(config, server, "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr[-2000:]


def test_demo_schema_round_trips(tmp_path: Path, secondary: Secondary):
    """The demo app's schema: init, apply, install, the demo workload, run --once, verify equal; against the dev
    server and the real PostgREST."""
    db = tmp_path / "app.sqlite3"
    app = DemoApp.open(db)
    config = onboard(tmp_path, db, secondary, DEMO_TABLES)
    workload = Workload(app, random.Random(12))
    for _ in range(250):
        workload.step()
    ship_and_verify(config, secondary)


def write_quirks(db: Path) -> None:
    """Values of every storage class under each declaration, keyword and quoted names, a cycle, a swap of a unique
    value inside one transaction, deletes."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript("""
        BEGIN;
        INSERT INTO "user" VALUES (1, 'a@x', '2024-01-15 10:30:00.1234567', 1, '{"n": 12345678901234567.89}', x'00ff');
        INSERT INTO "user" VALUES (2, 'b@x', 1700000000, 'false', '[1, 2.50]', NULL);
        INSERT INTO "user" VALUES (3, 'c@x', '2024-02-01T00:00:00+05:30', NULL, '', 'text as bytes');
        INSERT INTO "order" (id, user_id, total, note, parent_id, big, ratio, day) VALUES
            (1, 1, 1.005, '{"a": [1, 2]}', NULL, 18446744073709551615, 0.1, '2024-01-15'),
            (2, 1, '12345678901234567890.12', NULL, 1, 7, 3, NULL),
            (3, 2, 10, 'null', '2', NULL, -1e300, '2024-12-31');
        INSERT INTO "group" VALUES ('admins', 'A'), (NULL, 'B');
        INSERT INTO "odd ""name"" x" VALUES
            ('k''1', 'v"1', 1, 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '10:30', 'hello', 5),
            ('k''1', NULL, 2, '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}', '10:30:00.5', '123', 'text'),
            ('k 2', 'x', 3, NULL, NULL, 4.5, 2.25);
        INSERT INTO q_a VALUES (1, NULL);
        INSERT INTO q_b VALUES (1, 1);
        UPDATE q_a SET b_id = 1 WHERE id = 1;
        INSERT INTO q_strict VALUES (1, 'any text', 1.5, 'first'), (2, 42, -0.0, 'second'), (3, 2.5, NULL, NULL);
        COMMIT;
        INSERT INTO q_ref VALUES (1, 'first'), (2, NULL);
        BEGIN;
        UPDATE "user" SET email = 'tmp' WHERE id = 1;
        UPDATE "user" SET email = 'a@x' WHERE id = 2;
        UPDATE "user" SET email = 'b@x' WHERE id = 1;
        COMMIT;
        DELETE FROM "order" WHERE id = 3;
        UPDATE "user" SET email = 'c2@x' WHERE id = 3;
    """)


def test_quirks_schema_round_trips(tmp_path: Path, secondary: Secondary):
    """Every affinity and quirk: init, apply, install, writes, run --once, verify equal, with the values PostgreSQL
    holds checked where a type decides them (every digit of numeric and jsonb numbers, the instant, bytea); against the
    dev server and the real PostgREST."""
    db = quirks_db(tmp_path / "app.db")
    config = onboard(tmp_path, db, secondary, QUIRK_TABLES)
    write_quirks(db)
    ship_and_verify(config, secondary)
    with psycopg.connect(secondary.pg_url) as conn:
        user = conn.execute(f'SELECT created, active, prefs::text, avatar FROM {SCHEMA}."user" WHERE id = 1').fetchone()
        assert user[0] == datetime(2024, 1, 15, 10, 30, 0, 123457, tzinfo=UTC) and user[1] is True
        assert user[2] == '{"n": 12345678901234567.89}' and bytes(user[3]) == b"\x00\xff"
        totals = conn.execute(f'SELECT total, big FROM {SCHEMA}."order" ORDER BY id').fetchall()
        # SQLite's NUMERIC affinity stored both long numbers as REALs; numeric holds exactly the digits syncd sends
        assert totals == [(Decimal("1.005"), Decimal("18446744073709552000")), (Decimal("12345678901234567000"), 7)]
        assert conn.execute(f'SELECT id, email FROM {SCHEMA}."user" ORDER BY id').fetchall() == \
            [(1, "b@x"), (2, "a@x"), (3, "c2@x")]


def catalog_snapshot(pg_url: str) -> list[tuple[object, ...]]:
    """Every object of SCHEMA with its identity (oid): tables, indexes, constraints, policies, and the grants."""
    with psycopg.connect(pg_url) as conn:
        return conn.execute("""
            SELECT 'class', c.oid::text, c.relname, c.relacl::text FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s
            UNION ALL SELECT 'constraint', k.oid::text, k.conname, pg_get_constraintdef(k.oid) FROM pg_constraint k
              JOIN pg_namespace n ON n.oid = k.connamespace WHERE n.nspname = %(s)s
            UNION ALL SELECT 'policy', p.oid::text, p.polname, pg_get_expr(p.polqual, p.polrelid) FROM pg_policy p
              JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = %(s)s
            ORDER BY 1, 2""", {"s": SCHEMA}).fetchall()


def test_the_sql_is_idempotent_and_its_policy_needs_no_auth_schema(tmp_path: Path, devserver: DevServer):
    """Applied a second time the SQL changes nothing (same objects, same oids); its policy lets a role without
    BYPASSRLS see rows only when the request's JWT claims say service_role (no auth.role() involved); the key is
    immediate and the other UNIQUE deferrable, except one a foreign key references."""
    db = quirks_db(tmp_path / "app.db")
    onboard(tmp_path, db, devserver, QUIRK_TABLES)
    before = catalog_snapshot(devserver.pg_url)
    sql = (tmp_path / "schema.sql").read_text()
    assert "auth.role" not in sql and "auth.uid" not in sql
    with psycopg.connect(devserver.pg_url) as conn:
        conn.execute(sql.encode())
    assert catalog_snapshot(devserver.pg_url) == before
    with psycopg.connect(devserver.pg_url) as conn:
        conn.execute(f"INSERT INTO {SCHEMA}.q_strict (id) VALUES (1)")
        conn.execute("CREATE ROLE init_probe NOLOGIN NOBYPASSRLS")
        conn.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO init_probe; GRANT SELECT ON {SCHEMA}.q_strict TO init_probe")
        conn.execute("SET LOCAL ROLE init_probe")
        counts = []
        for claims in ({"role": "service_role"}, {"role": "anon"}, None):
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims) if claims else "",))
            counts.append(conn.execute(f"SELECT count(*) FROM {SCHEMA}.q_strict").fetchone()[0])
        assert counts == [1, 0, 0]
        conn.rollback()
        deferrable = dict(conn.execute(
            "SELECT conname, condeferrable FROM pg_constraint WHERE connamespace = %s::regnamespace AND contype IN "
            "('p', 'u') AND conrelid IN (%s::regclass, %s::regclass)",
            (SCHEMA, f"{SCHEMA}.q_strict", f'{SCHEMA}."user"')).fetchall())
        assert deferrable == {"q_strict_pkey": False, "q_strict_label_key": False, "user_pkey": False,
                              "user_email_key": True}
