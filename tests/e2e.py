"""End-to-end helpers: an application's SQLite file with syncd installed, the real `syncd` process, and
row-by-row comparison with PostgreSQL behind the dev server or the real PostgREST (after mapping, computed
independently). The `app` ships to the dev server, or to `secondary` (tests/conftest.py) when the test asks for it:
then it runs once against each server."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd.devserver.launcher import RunningDevServer as DevServer
from tests.postgrest import Secondary, free_port

APP_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, flag INTEGER, doc_json TEXT, made INTEGER,
                   email TEXT UNIQUE, scratch TEXT);
CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id), name TEXT);
CREATE TABLE pair (a TEXT, b INTEGER, v TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
"""
TARGET_TABLES = "public.e2e_items, public.e2e_children, public.e2e_parents, public.e2e_pairs"


@dataclass
class App:
    """An application's SQLite file with syncd installed, and the configuration to ship it."""

    db: Path
    config: Path
    metrics: str

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.db, isolation_level=None, timeout=30)

    def syncd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(self.config), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def write_config(path: Path, db: Path, server: Secondary, metrics: str, *, key: str | None = None,
                 extra: str = "") -> None:
    """syncd.toml shipping `db`'s four tables to `server` (its API URL; the dev server's ends in /rest/v1, the real
    PostgREST's is its root), signing with `key` when given, else minting from the server's JWT secret."""
    secret = f'service_key = "{key}"' if key else f'jwt_secret = "{server.jwt_secret}"'
    path.write_text(f"""
[source]
path = "{db}"

[target]
url = "{server.url}"
{secret}

[worker]
metrics_addr = "{metrics}"
poll_interval = 0.2
max_backoff = 1.0
lease_seconds = 3
{extra}

[[table]]
name = "item"
target = "e2e_items"
exclude = ["scratch"]
[table.columns.doc_json]
rename = "doc"
transform = "json"
[table.columns.flag]
transform = "bool"
[table.columns.made]
transform = "timestamp"

[[table]]
name = "parent"
target = "e2e_parents"

[[table]]
name = "child"
target = "e2e_children"

[[table]]
name = "pair"
target = "e2e_pairs"
""")


on_both_servers = pytest.mark.usefixtures("secondary")
"""Marks a test to run once against the dev server and once against the real PostgREST (through `app`)."""


def chosen_server(request: pytest.FixtureRequest, devserver: DevServer) -> Secondary:
    """`secondary` when the test asked for it (parametrized over both servers), else the dev server."""
    if "secondary" in request.fixturenames:
        return request.getfixturevalue("secondary")
    return devserver


@pytest.fixture
def app(request: pytest.FixtureRequest, tmp_path: Path, devserver: DevServer, pg: psycopg.Connection) -> Iterator[App]:
    server = chosen_server(request, devserver)
    pg.execute(f"TRUNCATE {TARGET_TABLES}")
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript(APP_SCHEMA)
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "syncd.toml"
    write_config(config, db, server, metrics)
    the_app = App(db, config, metrics)
    installed = the_app.syncd("install")
    assert installed.returncode == 0, installed.stderr
    yield the_app


def expected_items(db: Path) -> set[tuple[object, ...]]:
    """The source after mapping, computed independently of syncd's own mapping code."""
    rows = sqlite3.connect(db).execute("SELECT id, name, qty, flag, doc_json, made, email FROM item").fetchall()
    return {(i, name, qty, None if flag is None else bool(flag), json.dumps(json.loads(doc)) if doc else None,
             datetime.fromtimestamp(made, UTC) if made is not None else None, email)
            for i, name, qty, flag, doc, made, email in rows}


def actual_items(pg: psycopg.Connection) -> set[tuple[object, ...]]:
    rows = pg.execute("SELECT id, name, qty, flag, doc, made, email FROM e2e_items").fetchall()
    return {(i, name, qty, flag, json.dumps(doc) if doc is not None else None, made, email)
            for i, name, qty, flag, doc, made, email in rows}


def source(db: Path, sql: str) -> set[tuple[object, ...]]:
    return set(sqlite3.connect(db).execute(sql).fetchall())


def target(pg: psycopg.Connection, sql: str) -> set[tuple[object, ...]]:
    return set(pg.execute(sql).fetchall())


def assert_converged(app: App, pg: psycopg.Connection) -> None:
    assert actual_items(pg) == expected_items(app.db)
    assert target(pg, "SELECT id, name FROM e2e_parents") == source(app.db, "SELECT id, name FROM parent")
    assert target(pg, "SELECT id, parent_id, name FROM e2e_children") == \
        source(app.db, "SELECT id, parent_id, name FROM child")
    assert target(pg, "SELECT a, b, v FROM e2e_pairs") == source(app.db, "SELECT a, b, v FROM pair")


def wait_converged(app: App, pg: psycopg.Connection, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_converged(app, pg)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def poll(url: str, until: Callable[[httpx.Response], bool], timeout: float = 30) -> httpx.Response:
    """GET url until `until` holds (the daemon may still be starting its metrics server)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url)
            if until(response) or time.monotonic() > deadline:
                return response
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def pending(app: App) -> int:
    return sqlite3.connect(app.db).execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]


def dead_letters(app: App) -> list[tuple[object, ...]]:
    return sqlite3.connect(app.db).execute("SELECT tbl, key, status, code, message FROM _syncd_dead_letter").fetchall()


def write_mixed_workload(db: sqlite3.Connection, start: int, count: int, rng: random.Random) -> None:
    """Inserts, updates, deletes, key changes, REPLACE and upserts, some in rolled-back transactions."""
    for i in range(start, start + count):
        db.execute("BEGIN")
        db.execute("INSERT INTO item (id, name, qty, flag, doc_json, made, email, scratch) VALUES "
                   "(?, ?, ?, ?, ?, ?, ?, 'x')",
                   (i, f"n{i}", rng.randint(0, 9), rng.randint(0, 1), json.dumps({"i": i, "s": "é,\"q\""}),
                    1_700_000_000 + i, f"u{i}@x"))
        choice = rng.random()
        if choice < 0.15:
            db.execute("UPDATE item SET qty = qty + 1, doc_json = '' WHERE id = ?", (rng.randint(start, i),))
        elif choice < 0.25:
            db.execute("DELETE FROM item WHERE id = ?", (rng.randint(start, i),))
        elif choice < 0.30:
            db.execute("UPDATE OR IGNORE item SET id = ? WHERE id = ?", (-i, i))  # negative: never reinserted
        elif choice < 0.35:
            db.execute("INSERT OR REPLACE INTO item (id, name, email) VALUES (?, 'replaced', ?)",
                       (-i - 10_000_000, f"u{i}@x"))
        elif choice < 0.40:
            db.execute("INSERT INTO item (id, name) VALUES (?, 'upserted') ON CONFLICT (id) DO UPDATE SET "
                       "name = excluded.name", (rng.randint(start, i),))
        if rng.random() < 0.1:
            db.execute("ROLLBACK")
        else:
            db.execute("COMMIT")
    db.execute("INSERT OR IGNORE INTO parent VALUES (?, ?)", (start, f"p{start}"))
    db.execute("INSERT INTO child VALUES (?, ?, 'c')", (start, start))
    db.execute("INSERT OR REPLACE INTO pair VALUES (?, ?, ?)", (f"a,{start}", start % 3, "v"))
