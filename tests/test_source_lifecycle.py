"""The source changes under a running `syncd run` (issue 10; DESIGN.md, "Living with a source that changes"):
migrations that alter or rebuild a table (real Alembic, SQLite's 12-step procedure, ADD / RENAME / DROP COLUMN),
a key that changed, the file restored from a backup, the app holding the write lock for seconds, the drain loop
dying, and SIGHUP re-reading a rotated key. The real process, the app writing through stdlib sqlite3 (or
SQLAlchemy and Alembic), real PostgreSQL behind the dev server; each test ends with the secondary equal to the
file, row for row.

The figures the notes need (schema change -> capture repaired, file replaced -> reopened) are printed as
`FIGURE ...` lines: run with -s to see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations

from syncd.auth import mint_token
from tests.conftest import DevServer
from tests.e2e import (
    APP_SCHEMA,
    TARGET_TABLES,
    App,
    dead_letters,
    free_port,
    pending,
    wait_converged,
    write_config,
)

LOCK_SECONDS = 8.0  # how long the app holds the write lock: longer than syncd's busy timeout (5 s)
ITEMS_SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);"
ITEMS_TABLES = '[[table]]\nname = "items"\ntarget = "lc_items"\n'
ITEMS_PG = "id bigint PRIMARY KEY, v text"
ITEMS = ("SELECT id, v FROM items", "SELECT id, v FROM lc_items")


# -- the secondary ----------------------------------------------------------------------------------------


def api_columns(devserver: DevServer, table: str) -> set[str] | None:
    """The columns of `table` in the API's OpenAPI description (None: the API does not serve it)."""
    with devserver.client(devserver.service_key) as client:
        definition = client.get("/").json().get("definitions", {}).get(table)
    return set(definition.get("properties", {})) if definition else None


def api_follows(pg: psycopg.Connection, devserver: DevServer, table: str, timeout: float = 10) -> None:
    """NOTIFY pgrst, 'reload schema', and wait until the API describes `table` with PostgreSQL's columns."""
    pg.execute("NOTIFY pgrst, 'reload schema'")
    want = {name for (name,) in pg.execute("SELECT column_name FROM information_schema.columns "
                                           "WHERE table_schema = 'public' AND table_name = %s", (table,))}
    deadline = time.monotonic() + timeout
    while api_columns(devserver, table) != (want or None):
        assert time.monotonic() < deadline, f"the API did not pick up {table}'s columns {want} in {timeout} s"
        time.sleep(0.05)


def drop_table(pg: psycopg.Connection, devserver: DevServer, name: str) -> None:
    """Drop a table of the secondary and wait until the API no longer serves it. (Waiting for each reload matters:
    DDL made while the dev server reloads its schema cache can end its reloads for good, see the report.)"""
    pg.execute(f"DROP TABLE IF EXISTS public.{name} CASCADE")
    api_follows(pg, devserver, name)


@pytest.fixture
def pg_tables(pg: psycopg.Connection, devserver: DevServer) -> Iterator[Callable[[str, str], None]]:
    """Create a table of the secondary for one test (granted to service_role, served by the API); dropped after."""
    made: list[str] = []

    def create(name: str, columns: str) -> None:
        drop_table(pg, devserver, name)
        pg.execute(f"CREATE TABLE public.{name} ({columns})")
        pg.execute(f"GRANT ALL ON public.{name} TO service_role")
        made.append(name)
        api_follows(pg, devserver, name)

    yield create
    for name in made:
        drop_table(pg, devserver, name)


def count(pg: psycopg.Connection, table: str, where: str = "true") -> int:
    return pg.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


# -- the application's file ----------------------------------------------------------------------------------


def worker_settings(metrics: str, **overrides: object) -> str:
    settings = {"metrics_addr": metrics, "poll_interval": 0.2, "max_backoff": 1.0, "lease_seconds": 3,
                "schema_recheck_interval": 0.5, **overrides}
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())


def write_lab_config(app: App, devserver: DevServer, tables: str, *, secret: str | None = None,
                     url: str | None = None, **worker: object) -> None:
    """The configuration of `app` for these `[[table]]` sections (TOML), minting its own tokens unless `secret`
    says otherwise; `worker` overrides [worker] settings."""
    secret = f'jwt_secret = "{devserver.jwt_secret}"' if secret is None else secret
    app.config.write_text(f'[source]\npath = "{app.db}"\n\n[target]\nurl = "{url or devserver.url}"\n{secret}\n\n'
                          f"[worker]\n{worker_settings(app.metrics, **worker)}\n\n{tables}\n")


def make_lab(tmp_path: Path, devserver: DevServer, schema: str, tables: str, *, journal_mode: str = "wal",
             install: bool = True, **config: object) -> App:
    """An application's SQLite file with `schema`, its configuration, and syncd installed."""
    db = tmp_path / "app.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.executescript(schema)
    conn.close()
    app = App(db, tmp_path / "syncd.toml", f"127.0.0.1:{free_port()}")
    write_lab_config(app, devserver, tables, **config)  # type: ignore[arg-type]
    if install:
        installed = app.syncd("install")
        assert installed.returncode == 0, installed.stderr
    return app


def sqlite_rows(db: Path, sql: str) -> set[tuple[object, ...]]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return set(conn.execute(sql).fetchall())
    finally:
        conn.close()


def pg_rows(pg: psycopg.Connection, sql: str) -> set[tuple[object, ...]]:
    return set(pg.execute(sql).fetchall())


def syncd_triggers(db: Path, table: str) -> set[str]:
    return {name for (name,) in sqlite_rows(db, "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND "
                                                f"tbl_name = '{table}' AND substr(name, 1, 7) = '_syncd_'")}


def backup(db: Path, to: Path) -> None:
    """A consistent copy of the live file (SQLite's online backup), as a backup tool makes it."""
    source, copy = sqlite3.connect(db), sqlite3.connect(to)
    source.backup(copy)
    copy.close()
    source.close()


def remove_wal_and_shm(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def restore(copy: Path, db: Path, how: str) -> float:
    """Put `copy` in place of the live file as a restore tool does (the app stopped, syncd still running): by
    rename over it, or by deleting it and copying the backup in (a new inode). The time it happened."""
    if how == "rename":
        remove_wal_and_shm(db)
        os.replace(copy, db)
    else:
        db.unlink()
        remove_wal_and_shm(db)
        shutil.copyfile(copy, db)
    return time.time()


class WriteLock(threading.Thread):
    """The application holding SQLite's write lock (a migration, a batch job): BEGIN <mode>; one write; sleep;
    COMMIT. In rollback-journal mode, EXCLUSIVE blocks readers too."""

    def __init__(self, db: Path, write: str, seconds: float = LOCK_SECONDS, mode: str = "IMMEDIATE") -> None:
        super().__init__(daemon=True)
        self.db, self.write, self.seconds, self.mode = db, write, seconds, mode
        self.held = threading.Event()
        self.error: BaseException | None = None
        self.since = 0.0

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
            conn.execute(f"BEGIN {self.mode}")
            conn.execute(self.write)
            self.since = time.monotonic()
            self.held.set()
            time.sleep(self.seconds)
            conn.execute("COMMIT")
            conn.close()
        except BaseException as exc:
            self.error = exc
            self.held.set()

    def hold(self) -> WriteLock:
        self.start()
        assert self.held.wait(30) and self.error is None, self.error
        return self

    def release(self) -> None:
        self.join(self.seconds + 30)
        assert self.error is None, self.error


# -- the daemon ---------------------------------------------------------------------------------------------


def logged_at(event: dict[str, object]) -> float:
    """Unix seconds of a JSON log line (structlog's ISO 8601 UTC timestamp)."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def figure(what: str, seconds: float) -> None:
    print(f"\nFIGURE {what}: {seconds:.3f} s")


def shorten(line: str) -> str:
    """A log line cut to 400 characters, except a traceback's last 2,000 (where the error is)."""
    if '"exception"' in line and len(line) > 400:
        return line[:400] + " ... " + line[-2000:]
    return line[:400]


class Daemon:
    """A `syncd run` process whose JSON log lines go to a file that the test reads while it runs."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        self.file = log.open("a")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.file, text=True)

    def text(self) -> str:
        return self.log.read_text()

    def tail(self, lines: int = 25) -> str:
        return "\n".join(shorten(line) for line in self.text().splitlines()[-lines:])

    def events(self) -> list[dict[str, object]]:
        found = []
        for line in self.text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                found.append(event)
        return found

    def find(self, text: str, **fields: object) -> list[dict[str, object]]:
        """The log lines whose event contains `text` and whose fields have these values."""
        return [e for e in self.events() if text in str(e.get("event", ""))
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, text: str, timeout: float = 30, **fields: object) -> dict[str, object]:
        """The first log line like `find`'s, waiting for it up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(text, **fields)
            if found:
                return found[0]
            if not self.alive():
                raise AssertionError(f"syncd run exited ({self.process.returncode}) without logging {text!r} "
                                     f"{fields or ''}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {text!r} {fields or ''} within {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (unless it already exited); the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def reconciled_keys(daemon: Daemon, table: str) -> int:
    """Keys the daemon's reconciles of `table` found different in the secondary and enqueued (from its log)."""
    return sum(int(e["keys_enqueued"]) for e in daemon.find("reconciled with the secondary", table=table))  # type: ignore[call-overload]


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `syncd run --config <app's> ARGS` (or `command`), logging to a file; killed at the end of the test."""
    started: list[Daemon] = []

    def start(app: App, *args: str, command: list[str] | None = None) -> Daemon:
        argv = command or [sys.executable, "-m", "syncd", "run", "--config", str(app.config), *args]
        daemon = Daemon(argv, tmp_path / f"daemon-{len(started)}.log")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.alive():
            daemon.process.kill()
            daemon.process.wait()
        daemon.file.close()


def patched_run(app: App, patch: str, *args: str) -> list[str]:
    """`syncd run` through `python -c`, after `patch` (Python) has changed something in syncd: fault injection."""
    code = f"import sys\n{textwrap.dedent(patch)}\nfrom syncd.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, "run", "--config", str(app.config), *args]


def readyz(app: App) -> tuple[int, str] | None:
    """(status, reason) of the daemon's /readyz; None when it does not answer."""
    try:
        response = httpx.get(f"http://{app.metrics}/readyz", timeout=2)
    except httpx.TransportError:
        return None
    return response.status_code, str(response.json().get("reason", ""))


def wait_readyz(app: App, until: Callable[[int, str], bool], timeout: float = 30) -> tuple[int, str] | None:
    """/readyz until `until(status, reason)` holds or `timeout` passed; the last answer (None: never answered)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        answer = readyz(app)
        last = answer if answer is not None else last
        if (answer is not None and until(*answer)) or time.monotonic() > deadline:
            return last
        time.sleep(0.05)


def metric(app: App, sample: str) -> float | None:
    """The value of one sample of /metrics (`name{labels}` as exposed); None when it is not there."""
    for line in httpx.get(f"http://{app.metrics}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def status(app: App) -> tuple[int, dict[str, object]]:
    result = app.syncd("status", "--json")
    return result.returncode, json.loads(result.stdout)


def table_status(app: App, table: str) -> dict[str, object]:
    return next(t for t in status(app)[1]["tables"] if t["name"] == table)  # type: ignore[index, union-attr]


def wait_table_status(app: App, table: str, until: Callable[[dict[str, object]], bool],
                      timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        shown = table_status(app, table)
        if until(shown) or time.monotonic() > deadline:
            return shown
        time.sleep(0.2)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30, daemon: Daemon | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"syncd run exited ({daemon.process.returncode}) while waiting for {what}:\n"
                                 f"{daemon.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}" + (f"\n{daemon.tail()}" if daemon else ""))
        time.sleep(0.1)


def wait_equal(db: Path, pg: psycopg.Connection, queries: tuple[str, str], timeout: float = 30,
               daemon: Daemon | None = None) -> set[tuple[object, ...]]:
    """Wait until the secondary (queries[1]) equals the file (queries[0]) row for row; the rows."""
    deadline = time.monotonic() + timeout
    while True:
        want, got = sqlite_rows(db, queries[0]), pg_rows(pg, queries[1])
        if want == got:
            return want
        if time.monotonic() > deadline:
            missing, extra = sorted(want - got, key=repr), sorted(got - want, key=repr)
            raise AssertionError(
                f"the secondary differs from the file after {timeout} s: {len(missing)} row(s) of the file missing "
                f"or different there (e.g. {missing[:5]}), {len(extra)} extra or stale (e.g. {extra[:5]})"
                + (f"\ndaemon log:\n{daemon.tail()}" if daemon else ""))
        time.sleep(0.2)


# == 1. Alembic's batch_alter_table while the daemon runs and the app writes ===================================

NOTE_SCHEMA = "CREATE TABLE note (id INTEGER PRIMARY KEY, body TEXT, n INTEGER);"
NOTE_TABLES = '[[table]]\nname = "note"\ntarget = "lc_notes"\n'


class AppWriter(threading.Thread):
    """The application writing on through stdlib sqlite3: inserts, updates and deletes of `note`, and, once the
    migration added it (`tagged`), the new column `tag` too."""

    def __init__(self, db: Path) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.stop = threading.Event()
        self.tagged = threading.Event()
        self.error: BaseException | None = None
        self.writes = 0

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
            rng = random.Random(10)
            i = 1
            while not self.stop.is_set():
                if self.tagged.is_set():
                    conn.execute("INSERT INTO note (id, body, n, tag) VALUES (?, ?, ?, ?)",
                                 (i, f"b{i}", i % 5, f"t{i}"))
                else:
                    conn.execute("INSERT INTO note (id, body, n) VALUES (?, ?, ?)", (i, f"b{i}", i % 5))
                conn.execute("UPDATE note SET n = n + 1 WHERE id = ?", (rng.randint(1, i),))
                if i % 7 == 0:
                    conn.execute("DELETE FROM note WHERE id = ?", (rng.randint(1, i),))
                self.writes += 1
                i += 1
                time.sleep(0.01)
            conn.close()
        except BaseException as exc:
            self.error = exc


def alembic_add_column(db: Path, recreate: str) -> float:
    """An Alembic migration, run programmatically on a SQLAlchemy connection to the file: batch_alter_table adds
    `note.tag` (`recreate="auto"`: ALTER TABLE in place; "always": copy into a new table, drop the old one, rename),
    then a data step sets it and deletes some rows, all in one transaction (BEGIN IMMEDIATE, SQLAlchemy's recipe
    for transactional DDL on SQLite). The time of the commit."""
    engine = sa.create_engine(f"sqlite:///{db}", connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def leave_transactions_to_sqlalchemy(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def take_the_write_lock(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    try:
        with engine.begin() as connection:
            op = Operations(MigrationContext.configure(connection))
            with op.batch_alter_table("note", recreate=recreate) as batch:
                batch.add_column(sa.Column("tag", sa.Text()))
            op.execute("UPDATE note SET tag = 'migrated', n = n + 100 WHERE id % 3 = 0")
            op.execute("DELETE FROM note WHERE id % 10 = 1")
        return time.time()
    finally:
        engine.dispose()


@pytest.mark.parametrize("recreate", ["auto", "always"], ids=["in-place", "recreate-always"])
def test_alembic_batch_migration_while_the_app_writes(recreate: str, tmp_path: Path, devserver: DevServer,
                                                       pg: psycopg.Connection, pg_tables, run_daemon) -> None:
    """The table halts while the secondary lacks the new column (nothing dead-lettered), resumes by itself once the
    DBA added it, and converges, the writes made between the migration's commit and the trigger reinstall included
    (recreate="always" loses syncd's triggers with the old table: repaired and reconciled)."""
    pg_tables("lc_notes", "id bigint PRIMARY KEY, body text, n integer")
    app = make_lab(tmp_path, devserver, NOTE_SCHEMA, NOTE_TABLES)
    daemon = run_daemon(app)
    writer = AppWriter(app.db)
    writer.start()
    try:
        wait_until(lambda: count(pg, "lc_notes") >= 30, "the first rows shipped", daemon=daemon)
        committed = alembic_add_column(app.db, recreate)
        writer.tagged.set()
        halted = daemon.wait_for("table halted", table="note")
        assert "tag" in str(halted["reason"]), halted
        ready = wait_readyz(app, lambda code, reason: code == 503 and "note" in reason, timeout=5)
        assert ready is not None and ready[0] == 503 and "tag" in ready[1], ready
        time.sleep(2)  # the DBA migrates the secondary a little later
        pg.execute("ALTER TABLE public.lc_notes ADD COLUMN tag text")
        pg.execute("GRANT ALL ON public.lc_notes TO service_role")
        api_follows(pg, devserver, "lc_notes")
        daemon.wait_for("table(s) resumed", timeout=15)
        time.sleep(1)
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None, writer.error
    wait_equal(app.db, pg, ("SELECT id, body, n, tag FROM note", "SELECT id, body, n, tag FROM lc_notes"),
               timeout=60, daemon=daemon)
    assert dead_letters(app) == []
    assert daemon.alive()
    repaired = daemon.find("capture repaired")
    if recreate == "always":
        assert [e["table"] for e in repaired] == ["note"], repaired
        figure("alembic batch recreate=always: commit -> 'capture repaired' logged", logged_at(repaired[0]) - committed)
        assert metric(app, 'syncd_capture_repairs_total{table="note"}') == 1.0
        assert reconciled_keys(daemon, "note") > 0  # the migration's data step was not captured: the reconcile sent it
        note = wait_table_status(app, "note", lambda t: t["reconcile"] is None and t["last_reconcile"] is not None)
        assert note["last_repair"] is not None and note["reconcile"] is None and note["triggers"] == "ok", note
    else:
        assert repaired == []  # ALTER TABLE ADD COLUMN keeps the triggers: nothing to repair
        assert table_status(app, "note")["triggers"] == "ok"
    code, shown = status(app)
    assert code == 0 and shown["healthy"], shown
    assert daemon.stop() == 0


def test_a_column_added_with_a_default_reaches_the_rows_already_shipped(tmp_path: Path, devserver: DevServer,
                                                                       pg: psycopg.Connection, pg_tables, run_daemon):
    """ALTER TABLE ADD COLUMN ... DEFAULT gives every existing row the default in SQLite without any write (no
    trigger fires); the secondary adds the column empty. The table halts until the secondary has the column, then a
    reconcile sends the rows whose value differs: the secondary ends equal, with no write by the app."""
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES)
    with app.connect() as conn:
        conn.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"v{i}") for i in range(40)])
    daemon = run_daemon(app)
    wait_until(lambda: count(pg, "lc_items") == 40, "the rows shipped", daemon=daemon)
    with app.connect() as conn:
        conn.execute("ALTER TABLE items ADD COLUMN flag INTEGER NOT NULL DEFAULT 7")
    daemon.wait_for("table halted", table="items")
    pg.execute("ALTER TABLE public.lc_items ADD COLUMN flag integer")
    api_follows(pg, devserver, "lc_items")
    wait_equal(app.db, pg, ("SELECT id, v, flag FROM items", "SELECT id, v, flag FROM lc_items"), timeout=60,
               daemon=daemon)
    assert reconciled_keys(daemon, "items") == 40
    assert daemon.stop() == 0


# == 2. SQLite's 12-step rebuild, ADD / RENAME / DROP COLUMN, a table dropped and re-created ====================

DOC_SCHEMA = ("CREATE TABLE doc (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT, n INTEGER); "
              "CREATE INDEX doc_n ON doc (n);")
DOC_TABLES = '[[table]]\nname = "doc"\ntarget = "lc_docs"\n'
DOC_PG = "id bigint PRIMARY KEY, title text NOT NULL, body text, n integer, extra text"
AFTER_CHANGE = """
INSERT INTO doc (id, title, n) VALUES (101, 'after', 1), (102, 'after', 2);
UPDATE doc SET n = n + 10 WHERE id IN (2, 5);
DELETE FROM doc WHERE id = 8;
"""


@dataclass(frozen=True)
class SchemaChange:
    name: str
    script: str  # what the app runs (its migration), in one go
    columns: str  # the columns compared afterwards, named the same on both sides (after `secondary`)
    triggers_lost: bool
    after: str = ""  # what the app writes afterwards, besides AFTER_CHANGE
    secondary: str | None = None  # what the DBA runs in PostgreSQL once the table halted for the schema


SCHEMA_CHANGES = [
    # https://sqlite.org/lang_altertable.html#otheralter: new table, copy, drop old, rename; the app's index made
    # again; the data step inside the same transaction runs before any trigger exists on the new table.
    SchemaChange("12-step rebuild", """
        PRAGMA foreign_keys = OFF;
        BEGIN;
        CREATE TABLE new_doc (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT,
                              n INTEGER NOT NULL DEFAULT 0 CHECK (n >= 0));
        INSERT INTO new_doc (id, title, body, n) SELECT id, title, body, coalesce(n, 0) FROM doc;
        DROP TABLE doc;
        ALTER TABLE new_doc RENAME TO doc;
        CREATE INDEX doc_n ON doc (n);
        PRAGMA foreign_key_check;
        UPDATE doc SET title = 'rebuilt ' || title WHERE id % 4 = 0;
        INSERT INTO doc (id, title, n) VALUES (500, 'written during the rebuild', 1);
        DELETE FROM doc WHERE id = 3;
        COMMIT;
        PRAGMA foreign_keys = ON;
    """, "id, title, body, n", triggers_lost=True),
    SchemaChange("add column", "ALTER TABLE doc ADD COLUMN extra TEXT;", "id, title, body, n, extra",
                 triggers_lost=False, after="UPDATE doc SET extra = 'e' || id WHERE id % 5 = 0;"),
    SchemaChange("rename column", "ALTER TABLE doc RENAME COLUMN body TO content;", "id, title, content, n",
                 triggers_lost=False, after="UPDATE doc SET content = 'renamed' WHERE id = 4;",
                 secondary="ALTER TABLE public.lc_docs RENAME COLUMN body TO content"),
    SchemaChange("drop column", "ALTER TABLE doc DROP COLUMN body;", "id, title, n", triggers_lost=False),
    SchemaChange("drop and re-create", """
        BEGIN;
        CREATE TEMP TABLE kept AS SELECT * FROM doc WHERE id % 2 = 0;
        DROP TABLE doc;
        CREATE TABLE doc (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT, n INTEGER);
        CREATE INDEX doc_n ON doc (n);
        INSERT INTO doc SELECT * FROM kept;
        INSERT INTO doc (id, title, n) VALUES (600, 'new in the re-created table', 2);
        DROP TABLE kept;
        COMMIT;
    """, "id, title, body, n", triggers_lost=True),
]


@pytest.mark.parametrize("change", SCHEMA_CHANGES, ids=[c.name for c in SCHEMA_CHANGES])
def test_schema_change_under_a_running_daemon(change: SchemaChange, tmp_path: Path, devserver: DevServer,
                                              pg: psycopg.Connection, pg_tables, run_daemon) -> None:
    """Writes before and after the change converge; lost triggers are repaired (a warning, the metric, status'
    last_repair) and the table reconciled; a change that keeps the triggers repairs nothing."""
    pg_tables("lc_docs", DOC_PG)
    app = make_lab(tmp_path, devserver, DOC_SCHEMA, DOC_TABLES)
    daemon = run_daemon(app)
    db = app.connect()
    db.executemany("INSERT INTO doc (id, title, body, n) VALUES (?, ?, ?, ?)",
                   [(i, f"t{i}", f"b{i}", i % 4) for i in range(1, 31)])
    db.execute("UPDATE doc SET body = 'changed' WHERE id = 2")
    db.execute("DELETE FROM doc WHERE id = 9")
    wait_equal(app.db, pg, ("SELECT id, title, body, n FROM doc", "SELECT id, title, body, n FROM lc_docs"),
               daemon=daemon)
    installed = sqlite_rows(app.db, "SELECT sql FROM sqlite_schema WHERE type = 'trigger'")
    named = {column for (sql,) in installed for column in re.findall(r'\b(?:NEW|OLD)\."?(\w+)', sql)}
    assert len(installed) == 3 and named == {"id"}  # syncd's triggers name the key only: DROP COLUMN body may go

    db.executescript(change.script)
    committed = time.time()
    db.executescript(AFTER_CHANGE + change.after)
    if change.secondary:
        halted = daemon.wait_for("table halted", table="doc")
        assert "content" in str(halted["reason"]), halted
        pg.execute(change.secondary)
        api_follows(pg, devserver, "lc_docs")
    rows = wait_equal(app.db, pg, (f"SELECT {change.columns} FROM doc", f"SELECT {change.columns} FROM lc_docs"),
                      daemon=daemon)
    assert (101, "after") in {row[:2] for row in rows} and not any(row[0] == 8 for row in rows)
    assert dead_letters(app) == []
    assert daemon.alive()

    repaired = daemon.find("capture repaired")
    if change.triggers_lost:
        assert [(e["table"], e["level"]) for e in repaired] == [("doc", "warning")], repaired
        figure(f"{change.name}: commit -> 'capture repaired' logged", logged_at(repaired[0]) - committed)
        assert metric(app, 'syncd_capture_repairs_total{table="doc"}') == 1.0
        assert reconciled_keys(daemon, "doc") > 0  # what the app wrote before the reinstall was not captured
        doc = wait_table_status(app, "doc", lambda t: t["reconcile"] is None and t["last_reconcile"] is not None)
        assert doc["last_repair"] is not None and doc["reconcile"] is None, doc
    else:
        assert repaired == []
        assert metric(app, 'syncd_capture_repairs_total{table="doc"}') in (None, 0.0)
        # a column that appears (added, or a rename's new name) marks a reconcile, which runs soon after
        doc = wait_table_status(app, "doc", lambda t: t["reconcile"] is None)
        assert doc["last_repair"] is None and doc["reconcile"] is None, doc
    assert doc["triggers"] == "ok" and syncd_triggers(app.db, "doc") == {"_syncd_doc_ins", "_syncd_doc_upd",
                                                                         "_syncd_doc_del"}
    code, shown = status(app)
    assert code == 0 and shown["healthy"], shown
    assert daemon.stop() == 0


# == 3. A key column changed: halt that table, say what changed and what to do, never guess =====================

ACCT_SCHEMA = ("CREATE TABLE acct (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE, v TEXT); "
               "CREATE TABLE other (id INTEGER PRIMARY KEY, v TEXT);")


def acct_tables(acct_extra: str = "") -> str:
    return (f'[[table]]\nname = "acct"\ntarget = "lc_accts"\n{acct_extra}\n'
            '[[table]]\nname = "other"\ntarget = "lc_others"\n')


@dataclass(frozen=True)
class KeyChange:
    name: str
    script: str
    id_column: str  # what the column that was `id` is called now
    key_now: str  # the primary key now
    fix: str  # what the operator adds to acct's [[table]] section, as the halt says
    triggers_kept: bool  # SQLite rewrote syncd's triggers (a rename) rather than dropping them (a rebuild)


KEY_CHANGES = [
    KeyChange("primary key renamed", "ALTER TABLE acct RENAME COLUMN id TO acct_id;", "acct_id", "acct_id",
              '[table.columns.acct_id]\nrename = "id"\n', triggers_kept=True),
    KeyChange("rebuilt with another primary key", """
        PRAGMA foreign_keys = OFF;
        BEGIN;
        CREATE TABLE new_acct (code TEXT PRIMARY KEY, id INTEGER NOT NULL UNIQUE, v TEXT);
        INSERT INTO new_acct (code, id, v) SELECT code, id, v FROM acct;
        DROP TABLE acct;
        ALTER TABLE new_acct RENAME TO acct;
        COMMIT;
        PRAGMA foreign_keys = ON;
    """, "id", "code", 'key = ["id"]\n', triggers_kept=False),
]


@pytest.mark.parametrize("change", KEY_CHANGES, ids=[c.name for c in KEY_CHANGES])
def test_a_changed_key_halts_its_table_and_says_what_to_do(change: KeyChange, tmp_path: Path, devserver: DevServer,
                                                           pg: psycopg.Connection, pg_tables, run_daemon) -> None:
    """The table whose key changed halts with the old and new key and the fix (log, /readyz, status); no trigger
    is installed on a guessed key; the other table keeps shipping. Doing what the message says (map the key,
    syncd install, SIGHUP) converges."""
    pg_tables("lc_accts", "id bigint PRIMARY KEY, code text NOT NULL UNIQUE, v text")
    pg_tables("lc_others", "id bigint PRIMARY KEY, v text")
    app = make_lab(tmp_path, devserver, ACCT_SCHEMA, acct_tables())
    others = ("SELECT id, v FROM other", "SELECT id, v FROM lc_others")
    accts = (f"SELECT {change.id_column}, code, v FROM acct", "SELECT id, code, v FROM lc_accts")
    daemon = run_daemon(app)
    db = app.connect()
    db.executemany("INSERT INTO acct VALUES (?, ?, ?)", [(i, f"c{i}", "before") for i in range(1, 11)])
    db.executemany("INSERT INTO other VALUES (?, ?)", [(i, "before") for i in range(1, 6)])
    before = wait_equal(app.db, pg, ("SELECT id, code, v FROM acct", accts[1]), daemon=daemon)
    wait_equal(app.db, pg, others, daemon=daemon)

    db.executescript(change.script)
    db.execute(f"INSERT INTO acct ({change.id_column}, code, v) VALUES (11, 'c11', 'after')")
    db.execute("UPDATE acct SET v = 'after' WHERE code = 'c2'")
    db.execute("DELETE FROM acct WHERE code = 'c3'")
    db.executemany("INSERT INTO other VALUES (?, ?)", [(i, "after") for i in range(6, 11)])

    halted = daemon.wait_for("table halted", table="acct")
    reason = str(halted["reason"])
    assert "was id" in reason and f"now {change.key_now}" in reason and "syncd install" in reason, reason
    wait_equal(app.db, pg, others, daemon=daemon)  # the other table keeps shipping
    ready = wait_readyz(app, lambda code, why: code == 503 and "acct" in why, timeout=5)
    assert ready is not None and ready[0] == 503 and f"now {change.key_now}" in ready[1], ready
    acct = table_status(app, "acct")
    assert acct["halted"] and any(f"now {change.key_now}" in p and "syncd install" in p
                                  for p in acct["problems"]), acct  # type: ignore[attr-defined]
    assert not table_status(app, "other")["halted"]
    assert daemon.find("capture repaired") == []  # never a guessed key
    triggers = syncd_triggers(app.db, "acct")
    if change.triggers_kept:
        assert {"_syncd_acct_ins", "_syncd_acct_upd", "_syncd_acct_del"} <= triggers  # SQLite renamed inside them
    else:
        assert triggers == set()
    assert pg_rows(pg, accts[1]) == before  # nothing shipped under another key
    assert dead_letters(app) == []

    write_lab_config(app, devserver, acct_tables(change.fix))
    installed = app.syncd("install")
    assert installed.returncode == 0, installed.stderr
    daemon.signal(signal.SIGHUP)
    wait_equal(app.db, pg, accts, daemon=daemon)
    wait_equal(app.db, pg, others, daemon=daemon)
    assert dead_letters(app) == []
    code, shown = status(app)
    assert code == 0 and shown["healthy"], shown
    assert daemon.stop() == 0


# == 4. The file restored from a backup ========================================================================


def write_parents_and_items(db: sqlite3.Connection, ids: range, label: str) -> None:
    db.executemany("INSERT INTO parent VALUES (?, ?)", [(i, label) for i in ids])
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, ?, 1)", [(i, label) for i in ids])


def live_and_backup(app: App, pg: psycopg.Connection, copy: Path) -> None:
    """Rows before the backup (kept by the restore), the backup, then rows after it (inserted, updated, deleted:
    undone by the restore), all shipped."""
    db = app.connect()
    write_parents_and_items(db, range(1, 21), "before backup")
    wait_converged(app, pg)
    backup(app.db, copy)
    write_parents_and_items(db, range(21, 31), "after backup")
    db.execute("UPDATE parent SET name = 'changed after backup' WHERE id <= 5")
    db.execute("DELETE FROM parent WHERE id = 6")
    db.execute("DELETE FROM item WHERE id = 3")
    wait_converged(app, pg)
    db.close()


def assert_restored(pg: psycopg.Connection) -> None:
    assert count(pg, "e2e_parents", "id BETWEEN 21 AND 30") == 0 and count(pg, "e2e_items", "id BETWEEN 21 AND 30") == 0
    assert count(pg, "e2e_parents", "name = 'changed after backup'") == 0
    assert count(pg, "e2e_parents", "id = 6") == 1 and count(pg, "e2e_items", "id = 3") == 1
    assert count(pg, "e2e_parents", "id >= 100") == 6


@pytest.mark.parametrize("how", ["rename", "copy"])
def test_restore_from_a_backup_under_a_running_daemon(how: str, app: App, pg: psycopg.Connection, tmp_path: Path,
                                                      run_daemon) -> None:
    """The daemon reopens the restored file and reconciles every table: rows written after the backup are deleted
    (or set back) in the secondary, rows written after the restore ship."""
    daemon = run_daemon(app)
    copy = tmp_path / "backup.sqlite3"
    live_and_backup(app, pg, copy)
    replaced = restore(copy, app.db, how)
    reopened = daemon.wait_for("the database file was replaced")
    figure(f"restore by {how}: replaced -> 'the database file was replaced' logged", logged_at(reopened) - replaced)
    db = app.connect()
    write_parents_and_items(db, range(100, 106), "after restore")
    db.execute("UPDATE parent SET name = 'changed after restore' WHERE id = 7")
    wait_converged(app, pg, timeout=60)
    assert_restored(pg)
    assert reconciled_keys(daemon, "parent") > 0 and reconciled_keys(daemon, "item") > 0
    assert dead_letters(app) == []
    assert daemon.alive()
    assert metric(app, "syncd_source_replaced_total") == 1.0
    for table in ("item", "parent", "child", "pair"):
        shown = wait_table_status(app, table, lambda t: t["reconcile"] is None)
        assert shown["reconcile"] is None and shown["last_reconcile"] is not None, shown
    code, whole = status(app)
    assert code == 0 and whole["healthy"], whole
    assert daemon.stop() == 0


def test_restore_with_on_source_replaced_halt_waits_for_sighup(app: App, pg: psycopg.Connection,
                                                               devserver: DevServer, tmp_path: Path,
                                                               run_daemon) -> None:
    """`on_source_replaced = "halt"`: every table halts, /readyz 503 says why, status says what to run; after
    SIGHUP every table is reconciled and ships."""
    write_config(app.config, app.db, devserver, app.metrics, extra='on_source_replaced = "halt"')
    daemon = run_daemon(app)
    copy = tmp_path / "backup.sqlite3"
    live_and_backup(app, pg, copy)
    restore(copy, app.db, "rename")
    daemon.wait_for("the database file was replaced")
    db = app.connect()
    write_parents_and_items(db, range(100, 106), "after restore")
    ready = wait_readyz(app, lambda code, why: code == 503 and "replaced" in why, timeout=10)
    assert ready is not None and ready[0] == 503 and "replaced" in ready[1], ready
    assert all(table in ready[1] for table in ("item", "parent", "child", "pair")), ready
    time.sleep(1)
    assert count(pg, "e2e_parents", "id >= 100") == 0 and count(pg, "e2e_parents", "id BETWEEN 21 AND 30") == 10
    code, shown = status(app)
    assert code == 1 and all(t["halted"] for t in shown["tables"]), shown  # type: ignore[union-attr]
    human = app.syncd("status").stdout
    assert "replaced" in human and "SIGHUP" in human, human  # what to run to resume

    daemon.signal(signal.SIGHUP)
    wait_converged(app, pg, timeout=60)
    assert_restored(pg)
    assert dead_letters(app) == []
    assert wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    assert daemon.stop() == 0


def test_a_file_replaced_by_one_that_is_not_sqlite_waits_then_adopts_the_real_restore(
        app: App, pg: psycopg.Connection, tmp_path: Path, run_daemon) -> None:
    """A restore that puts the wrong file in place first (the backup's .gz): the daemon keeps running, says so in
    /readyz, status and the log, and adopts the real file when it comes."""
    daemon = run_daemon(app)
    copy = tmp_path / "backup.sqlite3"
    live_and_backup(app, pg, copy)
    wrong = tmp_path / "backup.sqlite3.gz"
    wrong.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    restore(wrong, app.db, "rename")
    logged = daemon.wait_for("replaced by one syncd cannot use")
    assert "not a SQLite database" in str(logged["event"]), logged
    ready = wait_readyz(app, lambda code, why: code == 503 and "not a SQLite database" in why, timeout=10)
    assert ready is not None and ready[0] == 503, ready
    assert metric(app, 'syncd_source_errors_total{kind="unusable"}') >= 1.0  # type: ignore[operator]
    assert daemon.alive()

    restore(copy, app.db, "rename")
    daemon.wait_for("the database file was replaced")
    wait_converged(app, pg, timeout=60)
    assert_restored_before_new_rows(pg)
    assert wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    assert daemon.stop() == 0


def assert_restored_before_new_rows(pg: psycopg.Connection) -> None:
    assert count(pg, "e2e_parents", "id BETWEEN 21 AND 30") == 0 and count(pg, "e2e_items", "id BETWEEN 21 AND 30") == 0
    assert count(pg, "e2e_parents", "id = 6") == 1 and count(pg, "e2e_items", "id = 3") == 1


def test_restore_of_a_copy_that_predates_install(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                 run_daemon) -> None:
    """The restored copy has no _syncd_ tables: the daemon installs itself in it and reconciles every table."""
    pg.execute(f"TRUNCATE {TARGET_TABLES}")
    db_path = tmp_path / "app.sqlite3"
    sqlite3.connect(db_path).executescript(APP_SCHEMA)
    app = App(db_path, tmp_path / "syncd.toml", f"127.0.0.1:{free_port()}")
    write_config(app.config, app.db, devserver, app.metrics)
    db = app.connect()
    write_parents_and_items(db, range(1, 11), "before install")
    copy = tmp_path / "backup.sqlite3"
    backup(app.db, copy)
    assert not sqlite_rows(copy, "SELECT name FROM sqlite_schema WHERE name LIKE '\\_syncd\\_%' ESCAPE '\\'")
    assert app.syncd("install").returncode == 0
    assert app.syncd("verify", "--repair").returncode in (0, 1)  # the initial load of the rows of before install
    daemon = run_daemon(app)
    wait_converged(app, pg)
    write_parents_and_items(db, range(21, 31), "after backup")
    db.execute("UPDATE parent SET name = 'changed after backup' WHERE id <= 5")
    db.execute("DELETE FROM parent WHERE id = 6")
    db.execute("DELETE FROM item WHERE id = 3")
    wait_converged(app, pg)
    db.close()

    replaced = restore(copy, app.db, "rename")
    reopened = daemon.wait_for("the database file was replaced")
    figure("restore of a pre-install copy: replaced -> 'the database file was replaced' logged",
           logged_at(reopened) - replaced)
    assert reopened["installed_now"] is True
    db = app.connect()
    write_parents_and_items(db, range(100, 106), "after restore")
    wait_converged(app, pg, timeout=60)
    assert count(pg, "e2e_parents") == 16 and count(pg, "e2e_parents", "id BETWEEN 1 AND 10") == 10
    assert count(pg, "e2e_parents", "id BETWEEN 21 AND 30") == 0
    assert syncd_triggers(app.db, "parent") >= {"_syncd_parent_ins", "_syncd_parent_upd", "_syncd_parent_del"}
    assert dead_letters(app) == []
    assert daemon.stop() == 0


# == 5. The app holds the write lock for seconds ==============================================================


@pytest.mark.serial  # how long the daemon waits is measured
def test_write_lock_held_mid_drain(app: App, pg: psycopg.Connection, run_daemon) -> None:
    """8 s of write lock while a 20k-row backlog ships: the drain goes on (acknowledging writes only the state file),
    deleting the shipped entries from the app's file waits; the daemon says for how long, /readyz 503 with that
    reason meanwhile, and the outbox empties after."""
    db = app.connect()
    db.execute("BEGIN")
    db.executemany("INSERT INTO parent VALUES (?, 'backlog')", ((i,) for i in range(1, 20_001)))
    db.execute("COMMIT")
    daemon = run_daemon(app, "--batch-size", "100")
    wait_until(lambda: count(pg, "e2e_parents") >= 1000, "the drain under way", daemon=daemon)
    lock = WriteLock(app.db, "INSERT INTO parent VALUES (30000, 'written under the lock')").hold()
    wait_until(lambda: count(pg, "e2e_parents") == 20_000, "the backlog shipped while the app holds the lock",
               daemon=daemon)
    warning = daemon.wait_for("write lock", timeout=LOCK_SECONDS + 10)
    ready = wait_readyz(app, lambda code, why: code == 503 and "write lock" in why, timeout=LOCK_SECONDS)
    assert daemon.alive()
    lock.release()
    wait_converged(app, pg, timeout=60)
    assert count(pg, "e2e_parents") == 20_001
    assert warning["level"] == "warning" and float(warning["lasting_s"]) >= 4.5, warning  # type: ignore[arg-type]
    assert ready is not None and ready[0] == 503 and "write lock" in ready[1], ready
    assert wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    wait_until(lambda: pending(app) == 0, "the shipped entries deleted from the app's outbox", daemon=daemon)
    assert dead_letters(app) == []
    assert daemon.stop() == 0


def test_write_lock_held_during_housekeeping(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                             pg_tables, run_daemon) -> None:
    """The idle daemon's housekeeping (journal expiry, every 300 s: made every 0.5 s here) while the app holds the
    write lock 8 s: housekeeping writes only the state file, so the daemon is not held up at all (no busy
    warning, /readyz stays 200), and what the app wrote under the lock ships after."""
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES, lease_seconds=60)
    daemon = run_daemon(app, command=patched_run(app, "import syncd.timers\nsyncd.timers.JOURNAL_EXPIRY_EVERY = 0.5"))
    db = app.connect()
    db.executemany("INSERT INTO items VALUES (?, 'before')", [(i,) for i in range(1, 11)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    time.sleep(1)  # idle: journal rows exist, housekeeping comes round
    lock = WriteLock(app.db, "INSERT INTO items VALUES (100, 'written under the lock')").hold()
    answers = []
    deadline = time.monotonic() + LOCK_SECONDS - 1
    while time.monotonic() < deadline:
        answers.append(httpx.get(f"http://{app.metrics}/readyz").status_code)
        time.sleep(0.5)
    lock.release()
    assert daemon.alive(), f"syncd run exited {daemon.process.returncode}:\n{daemon.tail()}"
    db.executemany("INSERT INTO items VALUES (?, 'after')", [(i,) for i in range(11, 21)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert set(answers) == {200} and not daemon.find("write lock")
    assert dead_letters(app) == []
    assert daemon.stop() == 0


def test_start_while_app_holds_an_exclusive_lock_in_rollback_journal_mode(tmp_path: Path, devserver: DevServer,
                                                                          pg: psycopg.Connection, pg_tables,
                                                                          run_daemon) -> None:
    """journal_mode=DELETE: the app's EXCLUSIVE lock blocks readers too. The daemon started meanwhile waits, says
    for how long, answers /readyz 503 with that reason, and ships everything once the lock is gone."""
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES, journal_mode="delete")
    assert sqlite_rows(app.db, "PRAGMA journal_mode") == {("delete",)}
    app.connect().executemany("INSERT INTO items VALUES (?, 'before')", [(i,) for i in range(1, 6)])
    lock = WriteLock(app.db, "INSERT INTO items VALUES (100, 'written under the lock')", mode="EXCLUSIVE").hold()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite3.connect(app.db, timeout=0).execute("SELECT count(*) FROM items").fetchall()
    daemon = run_daemon(app)
    warning = daemon.wait_for("lock", level="warning", timeout=LOCK_SECONDS + 5)
    remaining = LOCK_SECONDS - (time.monotonic() - lock.since)
    ready = wait_readyz(app, lambda code, why: code == 503 and "lock" in why, timeout=max(0.5, remaining - 0.5))
    assert daemon.alive()
    lock.release()
    app.connect().executemany("INSERT INTO items VALUES (?, 'after')", [(i,) for i in range(6, 11)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert "lasting_s" in warning, warning
    assert ready is not None and ready[0] == 503 and "lock" in ready[1], \
        f"/readyz while the app held the lock at start: {ready} (None: nothing listened)"
    assert dead_letters(app) == []
    assert daemon.stop() == 0


# == 6. The drain loop dies: exit non-zero, a supervisor restarts ===============================================

FAIL_ON_THIRD_ACKNOWLEDGE = """
import time
import syncd.observer
import syncd.outbox

acknowledge, died, calls = syncd.outbox.acknowledge, syncd.observer.Observer.died, []


def failing_acknowledge(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("injected: acknowledge failed on its 3rd call")
    return acknowledge(*args, **kwargs)


def died_and_lingered(self, error):
    died(self, error)
    time.sleep(2)  # keep the process a moment, so that the test sees /healthz


syncd.outbox.acknowledge = failing_acknowledge
syncd.observer.Observer.died = died_and_lingered
"""


def test_worker_failure_exits_non_zero_and_a_restart_ships_the_rest(tmp_path: Path, devserver: DevServer,
                                                                    pg: psycopg.Connection, pg_tables,
                                                                    run_daemon) -> None:
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES)
    app.connect().executemany("INSERT INTO items VALUES (?, 'v')", [(i,) for i in range(1, 1001)])
    daemon = run_daemon(app, command=patched_run(app, FAIL_ON_THIRD_ACKNOWLEDGE, "--batch-size", "50"))
    health: list[int] = []
    while daemon.alive():
        with contextlib.suppress(httpx.TransportError):
            health.append(httpx.get(f"http://{app.metrics}/healthz", timeout=1).status_code)
        time.sleep(0.05)
    assert daemon.process.wait() == 70
    died = [e for e in daemon.events() if e.get("level") == "error" and "exception" in e]
    assert died, daemon.tail()
    assert "Traceback" in str(died[0]["exception"]) and "RuntimeError: injected" in str(died[0]["exception"])
    assert 503 in health, health  # /healthz turned 503 before the exit
    shipped = count(pg, "lc_items")
    assert 0 < shipped < 1000

    restarted = run_daemon(app)  # what the supervisor does
    wait_equal(app.db, pg, ITEMS, daemon=restarted)
    assert dead_letters(app) == []
    assert restarted.stop() == 0


# == 7. SIGHUP re-reads the configuration and the secret files ================================================


def test_sighup_rereads_a_rotated_service_key_file(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                   pg_tables, run_daemon) -> None:
    """An expired fixed key halts the table (it cannot be renewed); a fresh key written into service_key_file and
    a SIGHUP resume it without a restart; the reload names target.service_key, never a key."""
    pg_tables("lc_items", ITEMS_PG)
    key_file = tmp_path / "service_key"
    expired = mint_token(devserver.jwt_secret, "service_role", now=time.time() - 3600, expires_in=60)
    key_file.write_text(expired + "\n")
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES, secret=f'service_key_file = "{key_file}"')
    daemon = run_daemon(app)
    app.connect().executemany("INSERT INTO items VALUES (?, 'v')", [(i,) for i in range(1, 11)])
    halted = daemon.wait_for("table halted", table="items")
    assert "expired" in str(halted["reason"]).lower() or "JWT" in str(halted["reason"]), halted
    ready = wait_readyz(app, lambda code, why: code == 503 and "halted" in why, timeout=5)
    assert ready is not None and ready[0] == 503, ready
    assert count(pg, "lc_items") == 0

    fresh = mint_token(devserver.jwt_secret, "service_role")
    key_file.write_text(fresh + "\n")
    daemon.signal(signal.SIGHUP)
    reloaded = daemon.wait_for("configuration reloaded")
    assert "target.service_key" in reloaded["changed"], reloaded  # type: ignore[operator]
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    app.connect().executemany("INSERT INTO items VALUES (?, 'more')", [(i,) for i in range(11, 21)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert daemon.alive()
    log = daemon.text()
    for key in (expired, fresh):
        assert key not in log and key.rsplit(".", 1)[1] not in log
    assert dead_letters(app) == []
    assert daemon.stop() == 0


def test_sighup_with_a_broken_config_keeps_the_old_one(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                       pg_tables, run_daemon) -> None:
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES)
    daemon = run_daemon(app)
    app.connect().executemany("INSERT INTO items VALUES (?, 'v')", [(i,) for i in range(1, 6)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    good = app.config.read_text()
    app.config.write_text(good.replace("poll_interval = 0.2", "poll_interval = -1\nbatch_size = 0\nbogus = 1"))
    daemon.signal(signal.SIGHUP)
    refused = daemon.wait_for("configuration NOT reloaded")
    problems = " | ".join(map(str, refused["problems"]))  # type: ignore[call-overload]
    assert refused["level"] == "error"
    assert "poll_interval" in problems and "batch_size" in problems and "bogus" in problems, problems
    app.connect().executemany("INSERT INTO items VALUES (?, 'after the bad reload')", [(i,) for i in range(6, 11)])
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert daemon.alive() and wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    assert daemon.find("configuration reloaded") == []
    assert daemon.stop() == 0


# == 8. The field cases ======================================================================================

USERS_TABLES = '[[table]]\nname = "users"\ntarget = "lc_users"\n'
USERS = ("SELECT id, name, email, nickname FROM users", "SELECT id, name, email, nickname FROM lc_users")


def test_field_case_15_table_rebuild_drops_triggers(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                    pg_tables, run_daemon) -> None:
    """../shared/field-cases/15: a rebuild while the daemon runs is repaired at once (a warning; the writes made
    after it ship). The same while no daemon runs: status says what is missing, and after `syncd install` keeps
    saying that a reconcile is needed until `syncd run` has done it."""
    pg_tables("lc_users", "id bigint PRIMARY KEY, name text, email text, nickname text")
    app = make_lab(tmp_path, devserver, "CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT, email TEXT);",
                   USERS_TABLES)
    daemon = run_daemon(app)
    a = app.connect()
    a.execute("PRAGMA busy_timeout = 5000")
    a.execute("INSERT INTO users VALUES (1, 'ann', 'ann@example.com')")
    wait_equal(app.db, pg, ("SELECT id, name, email, NULL FROM users", USERS[1]), daemon=daemon)
    a.executescript("""
        PRAGMA foreign_keys=OFF;
        BEGIN;
        CREATE TABLE new_users(id INTEGER PRIMARY KEY, name TEXT, email TEXT, nickname TEXT);
        INSERT INTO new_users(id, name, email) SELECT id, name, email FROM users;
        DROP TABLE users;
        ALTER TABLE new_users RENAME TO users;
        COMMIT;
    """)
    committed = time.time()
    a.execute("INSERT INTO users VALUES (2, 'bob', 'bob@example.com', 'bobby')")
    a.execute("UPDATE users SET nickname = 'annie' WHERE id = 1")
    repaired = daemon.wait_for("capture repaired", table="users", timeout=10)
    figure("field case 15 (12-step rebuild): commit -> 'capture repaired' logged", logged_at(repaired) - committed)
    assert repaired["level"] == "warning"
    wait_equal(app.db, pg, USERS, daemon=daemon)
    assert pg_rows(pg, USERS[1] + " ORDER BY id") == {(1, "ann", "ann@example.com", "annie"),
                                                       (2, "bob", "bob@example.com", "bobby")}
    assert syncd_triggers(app.db, "users") == {"_syncd_users_ins", "_syncd_users_upd", "_syncd_users_del"}
    assert metric(app, 'syncd_capture_repairs_total{table="users"}') == 1.0
    assert wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    users = wait_table_status(app, "users", lambda t: t["reconcile"] is None and t["last_reconcile"] is not None)
    assert users["last_repair"] is not None and users["reconcile"] is None, users
    assert app.syncd("status").returncode == 0
    assert daemon.stop() == 0

    # The same kind of migration while no daemon runs.
    a.executescript("""
        PRAGMA foreign_keys=OFF;
        BEGIN;
        CREATE TABLE new_users(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, nickname TEXT);
        INSERT INTO new_users SELECT * FROM users;
        DROP TABLE users;
        ALTER TABLE new_users RENAME TO users;
        COMMIT;
    """)
    a.execute("INSERT INTO users VALUES (3, 'cy', 'cy@example.com', NULL)")
    a.execute("UPDATE users SET email = 'ann@new.example' WHERE id = 1")
    shown = app.syncd("status")
    assert shown.returncode == 1 and "missing" in shown.stdout and "syncd install" in shown.stdout, shown.stdout
    assert app.syncd("install").returncode == 0
    shown = app.syncd("status")
    assert shown.returncode == 1 and "reconcile" in shown.stdout, shown.stdout  # not "healthy" while PG lags
    once = app.syncd("run", "--once")
    assert once.returncode == 0, once.stderr
    wait_equal(app.db, pg, USERS, timeout=5)
    shown = app.syncd("status")
    assert shown.returncode == 0 and shown.stdout.strip().endswith("healthy"), shown.stdout
    assert dead_letters(app) == []


@pytest.mark.slow
def test_field_case_21_start_while_app_holds_write_lock(tmp_path: Path, devserver: DevServer,
                                                        pg: psycopg.Connection, pg_tables, run_daemon) -> None:
    """../shared/field-cases/21 (and the write lock held at start, WAL mode): started while the app holds the
    write lock for 9 s, and locked once more for 8 s while running, the daemon never exits and ships all 12 rows.
    It needs no write to the app's file to start or to ship (its bookkeeping is in the state file), so the lock at
    start does not even hold it up: /readyz turns 200 while the app still holds it."""
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES)
    a = app.connect()
    a.execute("PRAGMA busy_timeout = 5000")
    a.execute("INSERT INTO items VALUES (1, 'a')")
    a.execute("BEGIN IMMEDIATE")
    a.execute("INSERT INTO items VALUES (2, 'b')")
    locked = time.monotonic()
    daemon = run_daemon(app)
    ready = wait_readyz(app, lambda code, _: code == 200, timeout=8)
    assert time.monotonic() - locked < 9 and not daemon.find("write lock")  # still locked, not held up
    time.sleep(max(0.0, 9 - (time.monotonic() - locked)))
    assert daemon.alive()
    a.execute("COMMIT")
    for i in range(3, 13):
        a.execute("INSERT INTO items VALUES (?, 'c')", (i,))
        if i == 6:  # and once more while it is running
            a.execute("BEGIN IMMEDIATE")
            time.sleep(8)
            a.execute("COMMIT")
    wait_until(lambda: count(pg, "lc_items") == 12, "all 12 rows in the secondary", daemon=daemon)
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert daemon.alive()
    assert ready == (200, "ok"), ready
    assert wait_readyz(app, lambda code, _: code == 200) == (200, "ok")
    wait_until(lambda: pending(app) == 0, "the shipped entries deleted from the app's outbox", daemon=daemon)
    assert dead_letters(app) == []
    assert daemon.stop() == 0


def test_field_case_22_source_file_replaced_by_restore(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                       pg_tables, run_daemon) -> None:
    """../shared/field-cases/22: the file replaced under the running daemon (os.replace of a copy, -wal/-shm
    removed): the daemon reopens it without exiting, ships the rows written to it within 40 s, and the secondary
    ends equal to the restored file by itself (no verify --repair)."""
    pg_tables("lc_items", ITEMS_PG)
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES)
    daemon = run_daemon(app)
    a = app.connect()
    a.execute("PRAGMA busy_timeout = 5000")
    for i in range(5):
        a.execute("INSERT INTO items VALUES (?, 'a')", (i,))
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    a.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(app.db, tmp_path / "backup.sqlite3")
    for i in range(5, 10):
        a.execute("INSERT INTO items VALUES (?, 'b')", (i,))
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    a.close()
    os.replace(tmp_path / "backup.sqlite3", app.db)
    replaced = time.time()
    remove_wal_and_shm(app.db)
    a = app.connect()
    for i in range(100, 105):
        a.execute("INSERT INTO items VALUES (?, 'after restore')", (i,))
    wait_until(lambda: count(pg, "lc_items", "id >= 100") == 5, "the 5 rows written after the restore", timeout=40,
               daemon=daemon)
    reopened = daemon.wait_for("the database file was replaced", timeout=1)
    figure("field case 22: replaced -> 'the database file was replaced' logged", logged_at(reopened) - replaced)
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert pg_rows(pg, ITEMS[1]) == {(i, "a") for i in range(5)} | {(i, "after restore") for i in range(100, 105)}
    assert daemon.alive()
    assert dead_letters(app) == []
    assert daemon.stop() == 0


# == 9. The input cases ======================================================================================

UNREACHABLE = "http://127.0.0.1:9/rest/v1"
T_TABLES = '[[table]]\nname = "t"\ntarget = "lc_t"\n'


def input_case_lab(tmp_path: Path, devserver: DevServer) -> App:
    """The input cases' setup: table t, a secondary that does not answer, a key that is not a JWT."""
    return make_lab(tmp_path, devserver, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", T_TABLES,
                    url=UNREACHABLE, secret='service_key = "x.y.z"')


def ship_to_the_dev_server(app: App, devserver: DevServer, pg: psycopg.Connection, daemon: Daemon) -> None:
    """Point the running daemon at the dev server (SIGHUP) and wait until the secondary equals the file."""
    write_lab_config(app, devserver, T_TABLES)
    daemon.signal(signal.SIGHUP)
    wait_equal(app.db, pg, ("SELECT id, v FROM t", "SELECT id, v FROM lc_t"), daemon=daemon)


def test_input_case_01_run_busy_at_start(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                         pg_tables, run_daemon) -> None:
    """../shared/input-cases/01: `syncd run` started while the app holds the write lock for 12 s keeps running (no
    traceback; it needs no write to the app's file to start) and exits 0 only when asked to stop."""
    pg_tables("lc_t", "id bigint PRIMARY KEY, v text")
    app = input_case_lab(tmp_path, devserver)
    lock = WriteLock(app.db, "INSERT INTO t(v) VALUES ('a')", seconds=12).hold()
    daemon = run_daemon(app)
    daemon.wait_for("syncd started", timeout=15)
    time.sleep(7)  # past the busy timeout, the app still holding the lock
    assert daemon.alive(), daemon.tail()
    lock.release()
    time.sleep(1)
    assert daemon.alive(), daemon.tail()
    assert "Traceback" not in daemon.text()
    ship_to_the_dev_server(app, devserver, pg, daemon)
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.text()


def test_input_case_02_run_sighup_busy(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection, pg_tables,
                                       run_daemon) -> None:
    """../shared/input-cases/02: SIGHUP while the app holds the write lock for 10 s: the daemon keeps running."""
    pg_tables("lc_t", "id bigint PRIMARY KEY, v text")
    app = input_case_lab(tmp_path, devserver)
    daemon = run_daemon(app)
    assert wait_readyz(app, lambda code, _: True, timeout=10) is not None  # up and running
    lock = WriteLock(app.db, "INSERT INTO t(v) VALUES ('a')", seconds=10).hold()
    daemon.signal(signal.SIGHUP)
    time.sleep(8)
    assert daemon.alive(), daemon.tail()
    lock.release()
    time.sleep(0.5)
    assert daemon.alive(), daemon.tail()
    assert "Traceback" not in daemon.text()
    ship_to_the_dev_server(app, devserver, pg, daemon)
    assert daemon.stop() == 0


def test_sighup_while_busy_resumes_a_halted_table(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection,
                                                  pg_tables, run_daemon) -> None:
    """Input case 02 with a table halted (a bad key), the key fixed and SIGHUP sent while the app holds the write
    lock: the table ships again once the lock is gone, and status no longer says it is halted."""
    pg_tables("lc_items", ITEMS_PG)
    forged = devserver.token("service_role").rsplit(".", 1)[0] + ".forged-signature"
    app = make_lab(tmp_path, devserver, ITEMS_SCHEMA, ITEMS_TABLES, secret=f'service_key = "{forged}"')
    daemon = run_daemon(app)
    app.connect().executemany("INSERT INTO items VALUES (?, 'v')", [(i,) for i in range(1, 11)])
    daemon.wait_for("table halted", table="items")
    wait_until(lambda: table_status(app, "items")["halted"], "the halt recorded for status", daemon=daemon)
    write_lab_config(app, devserver, ITEMS_TABLES, secret=f'service_key = "{devserver.service_key}"')
    lock = WriteLock(app.db, "INSERT INTO items VALUES (100, 'written under the lock')").hold()
    daemon.signal(signal.SIGHUP)
    daemon.wait_for("configuration reloaded")
    lock.release()
    wait_equal(app.db, pg, ITEMS, daemon=daemon)
    assert daemon.alive()
    items = wait_table_status(app, "items", lambda t: not t["halted"], timeout=10)
    assert not items["halted"], items
    code, shown = status(app)
    assert code == 0 and shown["healthy"], shown
    assert dead_letters(app) == []
    assert daemon.stop() == 0
