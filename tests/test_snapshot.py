"""Snapshot mode (issue 22): a reader of the secondary never sees a state the SQLite file never had.

The app writes `orders` and `order_lines` in one SQLite transaction each (an order's total always equals the sum of
its lines); a reader polls PostgreSQL in REPEATABLE READ and counts the snapshots in which an order disagrees with
its lines. In snapshot mode there are none, through kill -9 of the daemon and while large snapshots are staged in
chunks; in key mode (the default) there are, which is what the mode is for. Against the dev server and the real
PostgREST. The SQL functions themselves (syncd/snapshot.sql) are tested straight in PostgreSQL first."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import cast

import apsw
import psycopg
import pytest
from psycopg import sql

from syncd import capture, outbox, state
from syncd.config import Config
from syncd.halts import Halt
from syncd.lease import LeaseHeld
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.settings import Target
from syncd.shipping import Interrupted
from syncd.snapshot import function_sql, refusal_hint
from syncd.source import Source
from syncd.target import TargetError
from syncd.worker import Worker
from tests.conftest import ROOT, create_tables
from tests.e2e import free_port, poll
from tests.postgrest import Secondary

TABLES = '[{"table": "%(orders)s", "key": ["id"]}, {"table": "%(lines)s", "key": ["id"]}]'


def test_the_migration_is_the_sql_init_writes() -> None:
    assert (ROOT / "deploy/supabase/migrations/003_syncd_snapshots.sql").read_text() == function_sql()


# -- the functions, in PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture
def shop(pg: psycopg.Connection) -> dict[str, str]:
    """Two fresh tables of the secondary, lines referencing orders (NOT DEFERRABLE), granted to service_role."""
    suffix = uuid.uuid4().hex[:8]
    names = {"orders": f"snap_orders_{suffix}", "lines": f"snap_lines_{suffix}"}
    pg.execute(f"CREATE TABLE {names['orders']} (id integer PRIMARY KEY, total integer NOT NULL)")
    pg.execute(f"CREATE TABLE {names['lines']} (id integer PRIMARY KEY, order_id integer NOT NULL REFERENCES "
               f"{names['orders']} (id), amount integer NOT NULL CHECK (amount >= 0))")
    pg.execute(f"GRANT ALL ON {names['orders']}, {names['lines']} TO service_role")
    return names


def apply(pg: psycopg.Connection, shop: dict[str, str], source: str, snapshot: str, doc: dict[str, object],
          staged: int = 0) -> dict[str, object]:
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        row = pg.execute("SELECT public.syncd_apply(%s, %s, %s, %s, %s)",
                         (source, snapshot, TABLES % shop, json.dumps(doc), staged)).fetchone()
    assert row is not None
    return dict(row[0])


def stage(pg: psycopg.Connection, source: str, snapshot: str, chunk: int, doc: dict[str, object]) -> None:
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        pg.execute("SELECT public.syncd_stage(%s, %s, %s, %s)", (source, snapshot, chunk, json.dumps(doc)))


def rows(pg: psycopg.Connection, table: str) -> list[tuple[object, ...]]:
    return pg.execute(sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(table))).fetchall()


def test_an_apply_takes_parents_first_whatever_order_the_document_has_and_a_retry_changes_nothing(
        pg: psycopg.Connection, shop: dict[str, str]) -> None:
    source = uuid.uuid4().hex
    doc = {"upserts": [{"table": shop["lines"], "rows": [{"id": 1, "order_id": 1, "amount": 5}]},
                       {"table": shop["orders"], "rows": [{"id": 1, "total": 5}]}], "deletes": []}
    assert apply(pg, shop, source, "s1", doc) == {"applied": True, "rows": 2}
    pg.execute(sql.SQL("UPDATE {} SET total = 99").format(sql.Identifier(shop["orders"])))  # another writer
    assert apply(pg, shop, source, "s1", doc) == {"applied": False, "rows": 0}  # its answer was lost: retried
    assert rows(pg, shop["orders"]) == [(1, 99)]
    gone = {"deletes": [{"table": shop["orders"], "keys": [{"id": 1}]}, {"table": shop["lines"], "keys": [{"id": 1}]}]}
    assert apply(pg, shop, source, "s2", gone) == {"applied": True, "rows": 2}  # children deleted first
    assert rows(pg, shop["orders"]) == [] and rows(pg, shop["lines"]) == []


def test_staged_chunks_apply_in_one_transaction_and_leftovers_of_another_snapshot_are_removed(
        pg: psycopg.Connection, shop: dict[str, str]) -> None:
    source = uuid.uuid4().hex
    stage(pg, source, "crashed", 0, {"upserts": [{"table": shop["orders"], "rows": [{"id": 7, "total": 0}]}]})
    stage(pg, source, "s1", 0, {"upserts": [{"table": shop["lines"], "rows": [{"id": 1, "order_id": 1, "amount": 2}]}]})
    stage(pg, source, "s1", 1, {"upserts": [{"table": shop["lines"], "rows": [{"id": 2, "order_id": 1, "amount": 3}]}]})
    staged = pg.execute("SELECT snapshot, chunk FROM syncd_staging WHERE source = %s ORDER BY chunk",
                        (source,)).fetchall()
    assert staged == [("s1", 0), ("s1", 1)]  # the crashed snapshot's chunk is gone
    assert apply(pg, shop, source, "s1", {"upserts": [{"table": shop["orders"], "rows": [{"id": 1, "total": 5}]}]},
                 staged=2) == {"applied": True, "rows": 3}
    assert rows(pg, shop["lines"]) == [(1, 1, 2), (2, 1, 3)]
    assert pg.execute("SELECT count(*) FROM syncd_staging WHERE source = %s", (source,)).fetchone() == (0,)


def test_a_refused_row_or_a_missing_chunk_applies_nothing(pg: psycopg.Connection, shop: dict[str, str]) -> None:
    source = uuid.uuid4().hex
    bad = {"upserts": [{"table": shop["orders"], "rows": [{"id": 1, "total": 1}]},
                       {"table": shop["lines"], "rows": [{"id": 1, "order_id": 1, "amount": -1}]}]}
    with pytest.raises(psycopg.errors.CheckViolation):
        apply(pg, shop, source, "s1", bad)
    with pytest.raises(psycopg.Error) as missing:
        apply(pg, shop, source, "s2", {"upserts": []}, staged=1)
    assert missing.value.sqlstate == "PT503"
    assert rows(pg, shop["orders"]) == [] and rows(pg, shop["lines"]) == []
    assert pg.execute("SELECT count(*) FROM syncd_snapshot WHERE source = %s", (source,)).fetchone() == (0,)


# -- end to end: the torn reads ------------------------------------------------------------------------------

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE orders (id INTEGER PRIMARY KEY, total INTEGER NOT NULL);
CREATE TABLE order_lines (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders (id),
                          amount INTEGER NOT NULL);
"""


def config_text(db: Path, server: Secondary, names: dict[str, str], metrics: str, consistency: str) -> str:
    return f"""
[source]
path = "{db}"

[target]
url = "{server.url}"
jwt_secret = "{server.jwt_secret}"

[worker]
metrics_addr = "{metrics}"
poll_interval = 0.05
max_backoff = 0.5
lease_seconds = 3
batch_size = 40
consistency = "{consistency}"

[[table]]
name = "orders"
target = "{names['orders']}"

[[table]]
name = "order_lines"
target = "{names['lines']}"
"""


class Shop:
    """The app: one SQLite transaction per order written, changed or removed, its total always its lines' sum."""

    def __init__(self, db: Path, seed: int) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.next_order, self.next_line = 1, 1
        self.orders: dict[int, list[int]] = {}

    def transaction(self, conn: sqlite3.Connection) -> None:
        rng = self.rng
        conn.execute("BEGIN IMMEDIATE")
        roll = rng.random()
        if roll < 0.5 or len(self.orders) < 5:
            order, lines = self.next_order, []
            self.next_order += 1
            conn.execute("INSERT INTO orders VALUES (?, 0)", (order,))
            for _ in range(rng.randint(1, 4)):
                conn.execute("INSERT INTO order_lines VALUES (?, ?, ?)", (self.next_line, order, rng.randint(1, 50)))
                lines.append(self.next_line)
                self.next_line += 1
            self.orders[order] = lines
        elif roll < 0.85:
            order = rng.choice(list(self.orders))
            line = rng.choice(self.orders[order])
            conn.execute("UPDATE order_lines SET amount = ? WHERE id = ?", (rng.randint(1, 50), line))
        else:
            order = rng.choice(list(self.orders))
            conn.execute("DELETE FROM order_lines WHERE order_id = ?", (order,))
            conn.execute("DELETE FROM orders WHERE id = ?", (order,))
            del self.orders[order]
            conn.execute("COMMIT")
            return
        conn.execute("UPDATE orders SET total = (SELECT sum(amount) FROM order_lines WHERE order_id = ?) WHERE id = ?",
                     (order, order))
        conn.execute("COMMIT")


class Reader(threading.Thread):
    """Polls the secondary in REPEATABLE READ every 10 ms: how many reads, how many showed an order whose total is
    not its lines' sum (an order without its lines counts: its total is not 0)."""

    def __init__(self, pg_url: str, names: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.pg_url, self.names = pg_url, names
        self.stop = threading.Event()
        self.reads = self.torn = 0
        self.examples: list[tuple[object, ...]] = []  # (order, its total, its lines' sum) of the first torn reads
        self.query = sql.SQL(
            "SELECT o.id, o.total, l.total FROM {orders} o LEFT JOIN (SELECT order_id, sum(amount) AS total FROM "
            "{lines} GROUP BY order_id) l ON l.order_id = o.id WHERE o.total <> coalesce(l.total, 0)").format(
                orders=sql.Identifier(names["orders"]), lines=sql.Identifier(names["lines"]))

    def run(self) -> None:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            while not self.stop.is_set():
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    found = conn.execute(self.query).fetchall()
                self.reads += 1
                if found:
                    self.torn += 1
                    self.examples += found[:3] if len(self.examples) < 9 else []
                time.sleep(0.01)


def syncd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(config)], capture_output=True,
                          text=True, timeout=120)


def start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def converged(db: Path, pg: psycopg.Connection, names: dict[str, str]) -> bool:
    with sqlite3.connect(db) as conn:
        orders = conn.execute("SELECT id, total FROM orders ORDER BY id").fetchall()
        lines = conn.execute("SELECT id, order_id, amount FROM order_lines ORDER BY id").fetchall()
    return (rows(pg, names["orders"]) == orders and rows(pg, names["lines"]) == lines)


def shop_daemon_files(tmp_path: Path, secondary: Secondary, consistency: str = "snapshot", *, check: str = "",
                      schema: str = "public") -> tuple[Path, Path, str, dict[str, str]]:
    """A shop file installed for `consistency` mode, its config and metrics address, and its two fresh target tables
    in `schema` (`check`: an extra constraint on the lines' amount)."""
    suffix = uuid.uuid4().hex[:8]
    names = {"orders": f"shop_orders_{suffix}", "lines": f"shop_lines_{suffix}"}
    orders, lines = f"{schema}.{names['orders']}", f"{schema}.{names['lines']}"
    create_tables(secondary, {
        orders: f"CREATE TABLE {orders} (id integer PRIMARY KEY, total integer NOT NULL)",
        lines: f"CREATE TABLE {lines} (id integer PRIMARY KEY, order_id integer NOT NULL REFERENCES {orders} (id), "
               f"amount integer NOT NULL {check})"})
    db = tmp_path / "shop.sqlite3"
    sqlite3.connect(db).executescript(SCHEMA)
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "syncd.toml"
    text = config_text(db, secondary, names, metrics, consistency)
    config.write_text(text if schema == "public" else text.replace("[target]\n", f'[target]\nschema = "{schema}"\n'))
    assert (installed := syncd(config, "install")).returncode == 0, installed.stderr
    return db, config, metrics, names


def run_shop(tmp_path: Path, secondary: Secondary, pg: psycopg.Connection, consistency: str, *, seconds: float,
             kills: int = 0, before_start: Callable[[], object] = lambda: None, min_reads: int = 0) -> Reader:
    """The app writing ~100 transactions a second for `seconds` while syncd ships in `consistency` mode (killed with
    SIGKILL and started again `kills` times meanwhile) and the reader polls; then everything converges.
    `before_start` runs once the tables are there, before the daemon starts (fault injection)."""
    db, config, metrics, names = shop_daemon_files(tmp_path, secondary, consistency)
    shop, reader = Shop(db, seed=22), Reader(secondary.pg_url, names)
    (began_at,) = cast(tuple[datetime], pg.execute("SELECT now()").fetchone())
    app = sqlite3.connect(db, isolation_level=None, timeout=30)
    before_start()
    daemon = start(config)
    reader.start()
    try:
        poll(f"http://{metrics}/healthz", lambda r: r.status_code == 200)
        kill_at = sorted(random.Random(5).uniform(0.5, seconds) for _ in range(kills))
        began = time.monotonic()
        # at least `seconds`, and on until the reader has read `min_reads` times (a loaded machine reads slower)
        while (elapsed := time.monotonic() - began) < seconds or (reader.reads < min_reads and elapsed < 90):
            shop.transaction(app)
            if kill_at and elapsed >= kill_at[0]:
                kill_at.pop(0)
                daemon.kill()
                daemon.wait()
                daemon = start(config)
            time.sleep(0.01)
        deadline = time.monotonic() + 60
        while not converged(db, pg, names):
            assert time.monotonic() < deadline, "the secondary did not converge"
            time.sleep(0.2)
    finally:
        reader.stop.set()
        reader.join()
        daemon.terminate()
        daemon.wait(timeout=30)
    assert daemon.returncode == 0, daemon.stderr.read() if daemon.stderr else ""
    (applied,) = cast(tuple[int], pg.execute("SELECT count(*) FROM syncd_snapshot WHERE applied_at >= %s",
                                             (began_at,)).fetchone())
    assert (applied > 0) == (consistency == "snapshot")  # the mode was the one asked for
    return reader


def test_snapshot_mode_never_shows_an_order_that_disagrees_with_its_lines(
        tmp_path: Path, secondary: Secondary, pg: psycopg.Connection) -> None:
    reader = run_shop(tmp_path, secondary, pg, "snapshot", seconds=15, kills=5, min_reads=1500)
    assert reader.reads >= 1500 and reader.torn == 0, (reader.reads, reader.torn, reader.examples)


def test_key_mode_shows_torn_states_which_is_what_snapshot_mode_is_for(
        tmp_path: Path, devserver: Secondary, pg: psycopg.Connection) -> None:
    reader = run_shop(tmp_path, devserver, pg, "key", seconds=4)
    assert reader.reads > 100 and reader.torn > 0, (reader.reads, reader.torn)


# -- what the operator sees ----------------------------------------------------------------------------------




def test_a_refused_snapshot_applies_nothing_says_so_everywhere_and_ships_once_the_row_is_fixed(
        tmp_path: Path, secondary: Secondary, pg: psycopg.Connection) -> None:
    db, config, metrics, names = shop_daemon_files(tmp_path, secondary, check="CHECK (amount >= 0)")
    app = sqlite3.connect(db, isolation_level=None)
    app.executescript("BEGIN; INSERT INTO orders VALUES (1, 4); INSERT INTO order_lines VALUES (1, 1, 5), "
                      "(2, 1, -1); COMMIT;")
    daemon = start(config)
    try:
        ready = poll(f"http://{metrics}/readyz", lambda r: "refused" in r.text)
        assert ready.status_code == 503 and "23514" in ready.text and "fix the row in the app" in ready.text
        shown = syncd(config, "status", "--json")
        status = json.loads(shown.stdout)
        assert shown.returncode == 1 and status["consistency"] == "snapshot"
        assert "refused" in str(status["daemon"]["reason"])
        assert 'syncd_snapshots_total{outcome="refused"}' in poll(f"http://{metrics}/metrics",
                                                                   lambda r: "refused" in r.text).text
        assert rows(pg, names["orders"]) == [] and rows(pg, names["lines"]) == []  # nothing of it, not the order
        app.executescript("BEGIN; UPDATE order_lines SET amount = 0 WHERE id = 2; UPDATE orders SET total = 5; "
                          "COMMIT;")
        poll(f"http://{metrics}/readyz", lambda r: r.status_code == 200)
        deadline = time.monotonic() + 30
        while not converged(db, pg, names):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert "snapshot refused: will retry" in (daemon.stderr.read() if daemon.stderr else "")


def test_status_and_verify_say_which_mode_the_file_ships_in(tmp_path: Path, secondary: Secondary,
                                                          pg: psycopg.Connection) -> None:
    db, config, _, names = shop_daemon_files(tmp_path, secondary)
    sqlite3.connect(db, isolation_level=None).executescript(
        "BEGIN; INSERT INTO orders VALUES (1, 5); INSERT INTO order_lines VALUES (1, 1, 5); COMMIT;")
    assert (once := syncd(config, "run", "--once")).returncode == 0, once.stderr
    assert rows(pg, names["lines"]) == [(1, 1, 5)]
    shown = syncd(config, "status")
    assert "ships:    whole snapshots" in shown.stdout, shown.stdout
    verified = syncd(config, "verify", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["consistency"] == "snapshot", verified.stdout
    assert 'ships in snapshot mode' in syncd(config, "verify").stdout


def test_init_writes_snapshot_mode_and_its_functions(tmp_path: Path) -> None:
    db = tmp_path / "shop.sqlite3"
    sqlite3.connect(db).executescript(SCHEMA)
    written = subprocess.run([sys.executable, "-m", "syncd", "init", "--db", str(db), "--consistency", "snapshot"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert written.returncode == 0, written.stderr
    from syncd.config import load_config

    assert load_config(tmp_path / "syncd.toml").worker.consistency == "snapshot"
    assert (tmp_path / "schema.sql").read_text().endswith(function_sql())
    other = subprocess.run([sys.executable, "-m", "syncd", "init", "--db", str(db), "--consistency", "snapshot",
                            "--schema", "app", "--out", "other.toml", "--sql", "other.sql"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert other.returncode == 0, other.stderr
    sql = (tmp_path / "other.sql").read_text()
    assert sql.endswith(function_sql("app")) and 'FUNCTION "app".syncd_apply(' in sql and "public.syncd" not in sql


def test_snapshot_mode_stays_whole_through_errors_resets_and_timeouts_while_it_stages(
        tmp_path: Path, devserver: Secondary, pg: psycopg.Connection, faults: Callable[..., object]) -> None:
    """Every request may fail (503, a reset connection, a timeout after the server applied it), and for 1.5 s the
    secondary answers nothing: a staged snapshot goes on from the chunk that failed, an apply whose answer was lost
    is recognised by its id, and no reader ever sees half of one."""
    outage = [threading.Timer(2.0, lambda: faults(down=True, retry_after=1)),
              threading.Timer(3.5, lambda: faults(down=False))]  # the secondary unreachable for 1.5 s as well

    def inject() -> None:
        faults(error_rate=0.2, error_status=503, reset_rate=0.1, timeout_rate=0.05, delay_ms=300, seed=22)
        for timer in outage:
            timer.start()

    reader = run_shop(tmp_path, devserver, pg, "snapshot", seconds=6, kills=1, before_start=inject)
    assert reader.reads > 150 and reader.torn == 0, (reader.reads, reader.torn, reader.examples)


# -- in process ----------------------------------------------------------------------------------------------


class Functions:
    """A secondary that only records the functions called (and answers as syncd_apply does)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []  # appended from the shipping threads too (atomic)

    def call(self, function: str, body: bytes) -> bytes:
        self.calls.append((function, json.loads(body)))
        return b'{"applied": true, "rows": 0}'

    def describe(self) -> dict[str, object]:
        return {"definitions": {"orders": {"properties": {"id": {}, "total": {}}},
                                "order_lines": {"properties": {"id": {}, "order_id": {}, "amount": {}}}}}

    def ping(self, table: str) -> None:
        return None


def in_process(tmp_path: Path) -> tuple[Worker, apsw.Connection, Functions]:
    path = tmp_path / "shop.sqlite3"
    setup = apsw.Connection(str(path))
    for _ in setup.execute(SCHEMA):  # apsw runs the statements after the first as the cursor is read
        pass
    setup.close()
    config = Config.model_validate({"source": {"path": str(path)},
                                    "table": [{"name": "orders"}, {"name": "order_lines"}],
                                    "worker": {"consistency": "snapshot", "batch_size": 10}})
    capture.install(state.connect(path), config)
    functions = Functions()
    worker = Worker(Source(path), config, cast(Target, functions), Observer(Metrics()))
    worker.keeper.prepare()
    return worker, apsw.Connection(str(path)), functions


def test_a_halted_table_holds_every_table_of_the_file_in_snapshot_mode(tmp_path: Path) -> None:
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN; INSERT INTO orders VALUES (1, 5); INSERT INTO order_lines VALUES (1, 1, 5); COMMIT;")
    worker.halts.halt("order_lines", Halt("config", "a test's halt"))
    assert worker.drain_once().claimed == 0 and functions.calls == []  # the order alone would be half a transaction
    worker.halts.resume()
    assert worker.drain_once().claimed == 2 and [f for f, _ in functions.calls] == ["syncd_apply"]


def test_a_snapshot_larger_than_a_chunk_is_staged_and_acknowledged_as_one_range(tmp_path: Path) -> None:
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN")
    for order in range(1, 9):
        app.execute("INSERT INTO orders VALUES (?, 1)", (order,))
        app.execute("INSERT INTO order_lines VALUES (?, ?, 1)", (order, order))
    app.execute("COMMIT")
    app.execute("DELETE FROM order_lines WHERE id = 8; DELETE FROM orders WHERE id = 8")  # two commits
    done = worker.drain_once()
    assert done.claimed == 18 and done.shipped == 16  # 16 keys (8 of them gone), one snapshot: 2 commits merged
    called = [(f, body.get("chunk"), body.get("staged")) for f, body in functions.calls]
    assert called == [("syncd_stage", 0, None), ("syncd_apply", None, 1)]  # 10 entries a chunk
    ids = {body["snapshot"] for _, body in functions.calls}
    assert len(ids) == 1
    docs = [body["doc"] for _, body in functions.calls]
    upserted = sorted(row["id"] for doc in docs for group in doc["upserts"] if group["table"] == "orders"
                      for row in group["rows"])
    deleted = [key["id"] for doc in docs for group in doc["deletes"] if group["table"] == "orders"
               for key in group["keys"]]
    assert upserted == list(range(1, 8)) and deleted == [8]
    assert worker.drain_once().claimed == 0 and outbox.pending_total(worker.conn) == 0


def test_a_range_acknowledgement_files_the_dead_letters_and_skips_what_was_acknowledged(tmp_path: Path) -> None:
    worker, app, _ = in_process(tmp_path)
    app.execute("INSERT INTO orders VALUES (1, 1); INSERT INTO orders VALUES (2, 2); INSERT INTO orders VALUES (3, 3)")
    conn = worker.conn
    changes = outbox.claim(conn, 10, {"orders": ["id"]}).changes
    outbox.acknowledge(conn, changes[:1], [])  # seq 1 acknowledged before
    settled = outbox.acknowledge_range(conn, 1, 3, ["orders"], [outbox.DeadLetter(changes[2], "a test's refusal")],
                                       {"orders": ["2"]})
    assert settled == 2
    fates = conn.execute("SELECT seq, fate FROM st.acked ORDER BY seq").fetchall()
    assert fates == [(1, "shipped"), (2, "shipped"), (3, "dead")]
    assert outbox.flush(conn) == 3
    assert app.execute("SELECT key, message FROM _syncd_dead_letter").fetchall() == [("3", "a test's refusal")]


def test_a_snapshot_interrupted_while_staging_goes_on_from_the_chunk_that_failed(tmp_path: Path) -> None:
    """A large snapshot restaged from its first chunk after every failure might never get through an unreliable
    network while the backlog grows; it is held, and the next try sends only what is missing."""
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN")
    for order in range(1, 26):  # three chunks of 10, 10 and 5 entries
        app.execute("INSERT INTO orders VALUES (?, 0)", (order,))
    app.execute("COMMIT")
    answer = functions.call
    failed = threading.Lock()

    def fail_the_second_chunk(function: str, body: bytes) -> bytes:
        if json.loads(body).get("chunk") == 1 and failed.acquire(blocking=False):  # its first try only
            raise TargetError("transient", "a test's 503", status=503)
        return answer(function, body)

    functions.call = fail_the_second_chunk  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        worker.drain_once()
    app.execute("INSERT INTO orders VALUES (99, 0)")  # after the snapshot's read: not in it
    assert worker.drain_once().claimed == 25
    sent = [(f, body.get("chunk"), body.get("staged")) for f, body in functions.calls]
    # each chunk got through once (staged side by side: in any order), then the apply of both
    assert sorted(sent[:2]) == [("syncd_stage", 0, None), ("syncd_stage", 1, None)]
    assert sent[2:] == [("syncd_apply", None, 2)]
    assert worker.drain_once().claimed == 1  # then the next snapshot


def test_a_row_syncd_cannot_send_is_dead_lettered_and_the_rest_of_the_snapshot_ships(tmp_path: Path) -> None:
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN; INSERT INTO orders VALUES (1, 9e999); INSERT INTO orders VALUES (2, 5); COMMIT;")  # +Inf
    done = worker.drain_once()
    assert (done.claimed, done.shipped, done.dead) == (2, 1, 1)
    (_, body), = functions.calls
    assert [row["id"] for group in body["doc"]["upserts"] for row in group["rows"]] == [2]
    (key, message), = app.execute("SELECT key, message FROM _syncd_dead_letter").fetchall()
    assert key == "1" and "JSON" in message, message
    assert outbox.pending_total(worker.conn) == 0


def test_the_caller_s_rights_apply_inside_syncd_apply(pg: psycopg.Connection, shop: dict[str, str]) -> None:
    """SECURITY INVOKER: a role without BYPASSRLS meets the table's policies exactly as its table requests would."""
    role = f"snap_writer_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        pg.execute(f"GRANT EXECUTE ON FUNCTION public.syncd_apply(text, text, jsonb, jsonb, integer) TO {role}")
        pg.execute(f"GRANT ALL ON syncd_snapshot, syncd_staging, {shop['orders']}, {shop['lines']} TO {role}")
        pg.execute(f"ALTER TABLE {shop['orders']} ENABLE ROW LEVEL SECURITY")
        pg.execute(f"CREATE POLICY small ON {shop['orders']} TO {role} USING (total < 100) WITH CHECK (total < 100)")
        pg.execute(f"CREATE POLICY own ON syncd_snapshot TO {role} USING (true) WITH CHECK (true)")
        doc = {"upserts": [{"table": shop["orders"], "rows": [{"id": 1, "total": 500}]}]}
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"), pg.transaction():
            pg.execute(f"SET LOCAL ROLE {role}")
            pg.execute("SELECT public.syncd_apply(%s, 's1', %s, %s)", (uuid.uuid4().hex, TABLES % shop,
                                                                      json.dumps(doc)))
        assert rows(pg, shop["orders"]) == []
    finally:
        pg.execute("DROP POLICY IF EXISTS own ON syncd_snapshot")
        pg.execute(f"DROP OWNED BY {role}")
        pg.execute(f"DROP ROLE {role}")


def test_a_daemon_that_loses_the_lease_while_it_stages_stops_that_snapshot_unapplied(tmp_path: Path) -> None:
    """Reading and staging a large snapshot may outlast the lease: the lease is renewed between the requests, and a
    daemon that finds another holding the file stops before the apply and acknowledges nothing."""
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN")
    for order in range(1, 26):
        app.execute("INSERT INTO orders VALUES (?, 0)", (order,))
    app.execute("COMMIT")
    looks = 0

    def taken_over_at_the_apply() -> None:
        nonlocal looks
        looks += 1
        if looks == 3:  # before the apply: the looks before the first request and the staging window passed
            raise LeaseHeld(None)

    worker.snapshots.keep_lease = taken_over_at_the_apply
    assert worker.drain_once().claimed == 0
    assert [f for f, _ in functions.calls] == ["syncd_stage", "syncd_stage"] and not worker.holding
    assert outbox.pending_total(worker.conn) == 25 and outbox.unflushed(worker.conn) == 0


@pytest.mark.parametrize(("error", "says"), [
    (TargetError("schema", "", status=404, code="PGRST202"), "syncd init --consistency snapshot"),
    (TargetError("config", "", status=403, code="42501"), "grant syncd's role EXECUTE"),
    (TargetError("schema", "", status=400, code="42703"), "add the table or column"),
    (TargetError("row", "", status=400, code="23514"), "fix the row in the app"),
])
def test_a_refusal_says_what_to_fix_by_what_refused_it(error: TargetError, says: str) -> None:
    assert says in refusal_hint(error)


def test_run_once_ends_with_exit_1_on_a_refused_snapshot(tmp_path: Path, devserver: Secondary,
                                                        pg: psycopg.Connection) -> None:
    """A cron job's `run --once` must not retry forever what no retry fixes by itself, nor exit 0."""
    db, config, _, names = shop_daemon_files(tmp_path, devserver, check="CHECK (amount >= 0)")
    sqlite3.connect(db, isolation_level=None).executescript(
        "BEGIN; INSERT INTO orders VALUES (1, -1); INSERT INTO order_lines VALUES (1, 1, -1); COMMIT;")
    once = syncd(config, "run", "--once")
    assert once.returncode == 1 and "snapshot the secondary refused" in once.stderr and "23514" in once.stderr
    assert rows(pg, names["orders"]) == []


def test_an_apply_refuses_a_document_that_names_a_table_its_list_leaves_out(pg: psycopg.Connection,
                                                                            shop: dict[str, str]) -> None:
    doc = {"upserts": [{"table": shop["orders"], "rows": [{"id": 1, "total": 0}]},
                       {"table": "not_listed", "rows": [{"id": 1}]}]}
    with pytest.raises(psycopg.errors.RaiseException, match="names a table"):
        apply(pg, shop, uuid.uuid4().hex, "s1", doc)
    assert rows(pg, shop["orders"]) == []


def test_a_key_that_cannot_be_sent_in_two_chunks_of_a_snapshot_is_one_dead_letter(tmp_path: Path) -> None:
    worker, app, _ = in_process(tmp_path)
    app.execute("BEGIN; INSERT INTO orders VALUES (1, 9e999)")
    for order in range(2, 12):  # the chunk of 10 entries ends here
        app.execute("INSERT INTO orders VALUES (?, 0)", (order,))
    app.execute("UPDATE orders SET total = -9e999 WHERE id = 1; COMMIT")  # key 1 again, in the second chunk
    done = worker.drain_once()
    assert (done.claimed, done.dead) == (12, 1)
    assert app.execute("SELECT key FROM _syncd_dead_letter").fetchall() == [("1",)]
    assert outbox.pending_total(worker.conn) == 0


def test_snapshot_mode_ships_into_a_schema_other_than_public(tmp_path: Path, secondary: Secondary,
                                                           pg: psycopg.Connection) -> None:
    """The functions live beside the tables: PostgREST looks /rpc/ up in the request's Content-Profile schema."""
    with pg.transaction():
        pg.execute("SELECT pg_advisory_xact_lock(22)")  # the other server's run of this test creates them too
        pg.execute(function_sql("syncd_test"))
    db, config, _, names = shop_daemon_files(tmp_path, secondary, schema="syncd_test")
    sqlite3.connect(db, isolation_level=None).executescript(
        "BEGIN; INSERT INTO orders VALUES (1, 5); INSERT INTO order_lines VALUES (1, 1, 5); COMMIT;")
    assert (once := syncd(config, "run", "--once")).returncode == 0, once.stderr
    lines = pg.execute(sql.SQL("SELECT * FROM syncd_test.{}").format(sql.Identifier(names["lines"]))).fetchall()
    assert lines == [(1, 1, 5)]
    assert pg.execute("SELECT count(*) FROM syncd_test.syncd_snapshot").fetchone() != (0,)


def test_a_snapshot_whose_staged_chunks_the_secondary_lost_is_staged_again_whole(tmp_path: Path) -> None:
    worker, app, functions = in_process(tmp_path)
    app.execute("BEGIN")
    for order in range(1, 26):
        app.execute("INSERT INTO orders VALUES (?, 0)", (order,))
    app.execute("COMMIT")
    answer = functions.call
    lost = threading.Lock()

    def lose_the_chunks_once(function: str, body: bytes) -> bytes:
        if function == "syncd_apply" and lost.acquire(blocking=False):
            raise TargetError("transient", "a chunk is not staged", status=503, code="PT503")
        return answer(function, body)

    functions.call = lose_the_chunks_once  # type: ignore[method-assign]
    with pytest.raises(Interrupted):
        worker.drain_once()
    assert worker.drain_once().claimed == 25
    sent = sorted((f, body.get("chunk")) for f, body in functions.calls)
    # each chunk staged twice (the first staging was lost), one successful apply
    assert sent == [("syncd_apply", None), ("syncd_stage", 0), ("syncd_stage", 0), ("syncd_stage", 1),
                    ("syncd_stage", 1)]


def test_status_says_the_mode_before_syncd_is_installed_too(tmp_path: Path) -> None:
    from syncd import status as status_of

    path = tmp_path / "shop.sqlite3"
    sqlite3.connect(path).executescript(SCHEMA)
    config = Config.model_validate({"source": {"path": str(path)}, "table": [{"name": "orders"}],
                                    "worker": {"consistency": "snapshot"}})
    shown = status_of.collect(apsw.Connection(str(path)), config)
    assert not shown.installed and shown.as_dict()["consistency"] == "snapshot"
