"""`syncd run` end to end: the real process, the app writing through stdlib sqlite3, real PostgreSQL
behind the dev server; the secondary must end equal to the source, row by row, after mapping."""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import DevServer

APP_SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, flag INTEGER, doc_json TEXT, made INTEGER,
                   email TEXT UNIQUE, scratch TEXT);
CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id), name TEXT);
CREATE TABLE pair (a TEXT, b INTEGER, v TEXT, PRIMARY KEY (a, b)) WITHOUT ROWID;
"""
TARGET_TABLES = "public.e2e_items, public.e2e_children, public.e2e_parents, public.e2e_pairs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def write_config(path: Path, db: Path, devserver: DevServer, metrics: str, *, key: str | None = None,
                 extra: str = "") -> None:
    secret = f'service_key = "{key}"' if key else f'jwt_secret = "{devserver.jwt_secret}"'
    path.write_text(f"""
[source]
path = "{db}"

[target]
url = "{devserver.url}"
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


@pytest.fixture
def app(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection) -> Iterator[App]:
    pg.execute(f"TRUNCATE {TARGET_TABLES}")
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript(APP_SCHEMA)
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "syncd.toml"
    write_config(config, db, devserver, metrics)
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


def test_run_once_ships_every_kind_of_change(app: App, pg: psycopg.Connection):
    """Inserts, updates, deletes, key changes, REPLACE, upserts and rollbacks converge exactly."""
    db = app.connect()
    write_mixed_workload(db, 1, 300, random.Random(1))
    db.execute("DELETE FROM item WHERE id % 7 = 0")
    result = app.syncd("run", "--once")
    assert result.returncode == 0, result.stderr
    assert_converged(app, pg)
    assert pending(app) == 0 and dead_letters(app) == []
    assert '"event": "batch"' in result.stderr


def test_ten_thousand_rows_in_one_transaction(app: App, pg: psycopg.Connection):
    db = app.connect()
    db.execute("BEGIN")
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, ?, ?)", ((i, f"n{i}", i % 5) for i in range(10_000)))
    db.execute("COMMIT")
    assert app.syncd("run", "--once").returncode == 0
    assert pg.execute("SELECT count(*) FROM e2e_items").fetchone() == (10_000,)
    assert_converged(app, pg)


def test_daemon_keeps_up_with_concurrent_writers_and_stops_cleanly(app: App, pg: psycopg.Connection):
    daemon = app.start()
    try:
        writers = [threading.Thread(target=lambda n=n: write_mixed_workload(app.connect(), n * 10_000, 150,
                                                                            random.Random(n))) for n in range(1, 4)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
        wait_converged(app, pg)
        metrics = httpx.get(f"http://{app.metrics}/metrics").text
        assert 'syncd_rows_shipped_total{op="upsert",table="item"}' in metrics
        assert httpx.get(f"http://{app.metrics}/readyz").status_code == 200
        assert httpx.get(f"http://{app.metrics}/healthz").status_code == 200
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    assert pending(app) == 0


def test_faults_errors_resets_timeouts_and_an_outage(app: App, pg: psycopg.Connection, faults,
                                                     devserver: DevServer) -> None:
    """30% errors, resets and applied-but-unanswered requests, then 10 s down: equal, no dead letters."""
    write_config(app.config, app.db, devserver, app.metrics, extra="request_timeout = 1.0\nbatch_size = 50")
    faults(error_rate=0.3, error_status=503, reset_rate=0.1, timeout_rate=0.1, delay_ms=1500, seed=4)
    daemon = app.start()
    try:
        write_mixed_workload(app.connect(), 1, 300, random.Random(2))
        time.sleep(3)
        faults(down=True, retry_after=1, error_rate=0, reset_rate=0, timeout_rate=0, delay_ms=0)
        write_mixed_workload(app.connect(), 5_000, 100, random.Random(3))
        time.sleep(10)
        faults(down=False)
        wait_converged(app, pg, timeout=90)
        metrics = httpx.get(f"http://{app.metrics}/metrics").text
        assert 'syncd_ship_failures_total{class="transient"' in metrics
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert dead_letters(app) == []


def test_kill_9_at_random_moments_loses_nothing(app: App, pg: psycopg.Connection):
    rng = random.Random(9)
    stop = threading.Event()

    def keep_writing() -> None:
        db, n = app.connect(), 0
        while not stop.is_set():
            write_mixed_workload(db, 100_000 + n * 1000, 20, rng)
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        for _ in range(20):
            daemon = app.start("--batch-size", "25")
            time.sleep(rng.uniform(0.3, 1.2))
            daemon.kill()
            daemon.wait()
    finally:
        stop.set()
        writer.join()
    assert app.syncd("run", "--once").returncode == 0
    assert_converged(app, pg)
    assert dead_letters(app) == []


def test_poison_rows_are_dead_lettered_and_everything_else_lands(app: App, pg: psycopg.Connection):
    """A check violation, a foreign key to nothing and a wrong type: exactly those three rows fail."""
    db = app.connect()
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, ?, ?)", [(i, f"n{i}", 1) for i in range(100)])
    db.execute("UPDATE item SET qty = -5 WHERE id = 13")  # CHECK (qty >= 0) in the secondary
    db.execute("UPDATE item SET qty = 'many' WHERE id = 42")  # SQLite keeps text; integer column there
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("INSERT INTO child VALUES (1, 1, 'ok'), (2, 999, 'orphan')")
    result = app.syncd("run", "--once")
    assert result.returncode == 0, result.stderr
    dead = {(t, k, code) for t, k, _, code, _ in dead_letters(app)}
    assert dead == {("item", "13", "23514"), ("item", "42", "22P02"), ("child", "2", "23503")}
    assert pg.execute("SELECT count(*) FROM e2e_items").fetchone() == (98,)
    assert target(pg, "SELECT id FROM e2e_children") == {(1,)}
    shown = app.syncd("status")
    assert shown.returncode == 1 and "syncd replay --dead-letters --table item" in shown.stdout


def test_wrong_key_halts_loses_nothing_and_resumes_after_the_fix(app: App, pg: psycopg.Connection,
                                                                  devserver: DevServer):
    forged = devserver.token("service_role").rsplit(".", 1)[0] + ".forged-signature"
    write_config(app.config, app.db, devserver, app.metrics, key=forged)
    app.connect().executemany("INSERT INTO parent VALUES (?, ?)", [(i, "p") for i in range(10)])
    result = app.syncd("run", "--once")
    assert result.returncode == 0
    assert "table halted" in result.stderr and forged not in result.stderr
    shown = app.syncd("status", "--json")
    assert shown.returncode == 1
    parent = next(t for t in json.loads(shown.stdout)["tables"] if t["name"] == "parent")
    assert parent["halted"] and parent["pending"] == 10 and "PGRST301" in parent["last_error"]
    assert forged not in shown.stdout
    write_config(app.config, app.db, devserver, app.metrics, key=devserver.service_key)
    assert app.syncd("run", "--once").returncode == 0
    assert target(pg, "SELECT count(*) FROM e2e_parents") == {(10,)}
    assert app.syncd("status").returncode == 0


def test_a_second_daemon_stands_by_and_takes_over(app: App, pg: psycopg.Connection):
    first = app.start()
    time.sleep(1.5)
    second = app.start("--metrics-addr", f"127.0.0.1:{free_port()}")
    try:
        time.sleep(1.5)
        app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(50)])
        wait_converged(app, pg)
        first.kill()
        first.wait()
        app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(50, 80)])
        wait_converged(app, pg, timeout=30)  # the lease (3 s) expires and the second daemon drains
    finally:
        second.send_signal(signal.SIGTERM)
        _, errors = second.communicate(timeout=30)
    assert "standing by" in errors


def test_sighup_resumes_a_table_halted_by_a_privilege_error(app: App, pg: psycopg.Connection):
    """403 42501 (privilege revoked) halts the table; after the grant, SIGHUP resumes without a restart."""
    pg.execute("REVOKE ALL ON public.e2e_parents FROM service_role")
    daemon = app.start()
    try:
        app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(5)])
        ready = poll(f"http://{app.metrics}/readyz", lambda r: r.status_code == 503)
        assert ready.status_code == 503 and "halted" in ready.json()["reason"]
        assert 'syncd_table_halted{table="parent"} 1.0' in httpx.get(f"http://{app.metrics}/metrics").text
        pg.execute("GRANT ALL ON public.e2e_parents TO service_role")
        daemon.send_signal(signal.SIGHUP)
        wait_converged(app, pg, timeout=30)
    finally:
        pg.execute("GRANT ALL ON public.e2e_parents TO service_role")
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_shutdown_abandons_a_slow_request_within_the_timeout_and_loses_nothing(app: App, pg: psycopg.Connection,
                                                                              faults) -> None:
    """SIGTERM while a request hangs: exit 0 within --shutdown-timeout; the batch ships at the next start."""
    faults(delay_ms=10_000)
    app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(20)])
    daemon = app.start("--shutdown-timeout", "1")
    time.sleep(2)  # the first request is now held by the secondary
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    assert time.monotonic() - started < 5
    assert pending(app) == 20
    faults(delay_ms=0)
    assert app.syncd("run", "--once").returncode == 0
    assert_converged(app, pg)


def test_busy_metrics_port_is_a_clear_error(app: App):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = app.syncd("run", "--once", "--metrics-addr", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "worker.metrics_addr: cannot listen" in result.stderr and "Traceback" not in result.stderr
