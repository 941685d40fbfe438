"""`syncd run` end to end: the real process, the app writing through stdlib sqlite3, real PostgreSQL
behind the dev server; the secondary must end equal to the source, row by row, after mapping. The tests whose
outcome depends on the server's answers (201/200, row errors and their codes, 401, 403) run against the real
PostgREST too; the fault, kill -9, lease and metrics-port tests stay on the dev server (they use its fault API, or
the server does not decide them)."""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time

import httpx
import psycopg

from tests.conftest import DevServer
from tests.e2e import (
    App,
    assert_converged,
    dead_letters,
    free_port,
    on_both_servers,
    pending,
    poll,
    target,
    wait_converged,
    write_config,
    write_mixed_workload,
)
from tests.postgrest import Secondary


@on_both_servers
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


@on_both_servers
def test_ten_thousand_rows_in_one_transaction(app: App, pg: psycopg.Connection):
    db = app.connect()
    db.execute("BEGIN")
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, ?, ?)", ((i, f"n{i}", i % 5) for i in range(10_000)))
    db.execute("COMMIT")
    assert app.syncd("run", "--once").returncode == 0
    assert pg.execute("SELECT count(*) FROM e2e_items").fetchone() == (10_000,)
    assert_converged(app, pg)


@on_both_servers
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


def test_an_idle_daemon_becomes_ready_when_the_secondary_answers(app: App, faults) -> None:
    """With nothing to ship, /readyz still follows the secondary (a Kubernetes readiness probe relies on it;
    tests/test_worker.py covers the idle check failing and recovering)."""
    faults(down=True, retry_after=1)
    daemon = app.start()
    try:
        down = poll(f"http://{app.metrics}/readyz", lambda r: "PGRST000" in r.text)
        assert down.status_code == 503 and "PGRST000" in down.json()["reason"]
        faults(down=False)
        assert poll(f"http://{app.metrics}/readyz", lambda r: r.status_code == 200).status_code == 200
        assert "syncd_target_up 1.0" in httpx.get(f"http://{app.metrics}/metrics").text
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_status_asks_the_readiness_of_the_daemon_where_it_listens(app: App, faults) -> None:
    """A daemon started with --metrics-addr (another port than the config's): `syncd status` asks that port (the
    lease records it) and reports the outage, exit 1, instead of 'healthy'."""
    faults(down=True, retry_after=1)
    address = f"127.0.0.1:{free_port()}"
    daemon = app.start("--metrics-addr", address)
    try:
        poll(f"http://{address}/readyz", lambda r: "PGRST000" in r.text)
        shown = app.syncd("status")
        assert shown.returncode == 1 and "NOT READY" in shown.stdout and "PGRST000" in shown.stdout, shown.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


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


@on_both_servers
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
                                                                  secondary: Secondary):
    forged = secondary.token("service_role").rsplit(".", 1)[0] + ".forged-signature"
    write_config(app.config, app.db, secondary, app.metrics, key=forged)
    app.connect().executemany("INSERT INTO parent VALUES (?, ?)", [(i, "p") for i in range(10)])
    result = app.syncd("run", "--once")
    assert result.returncode == 1  # a table ended halted: a supervisor or a script must see it
    assert "table halted" in result.stderr and forged not in result.stderr
    shown = app.syncd("status", "--json")
    assert shown.returncode == 1
    parent = next(t for t in json.loads(shown.stdout)["tables"] if t["name"] == "parent")
    assert parent["halted"] and parent["pending"] == 10 and "PGRST301" in parent["last_error"]
    assert forged not in shown.stdout
    write_config(app.config, app.db, secondary, app.metrics, key=secondary.service_key)
    assert app.syncd("run", "--once").returncode == 0
    assert target(pg, "SELECT count(*) FROM e2e_parents") == {(10,)}
    assert app.syncd("status").returncode == 0


def test_the_anon_key_halts_as_the_key_never_as_a_missing_table(app: App, pg: psycopg.Connection,
                                                                 secondary: Secondary):
    """PostgREST describes only the tables the request's role may use (openapi-mode follow-privileges), so with the
    anon key every table looks missing from its description; the halt says what a read of the table answers (42501:
    the key's role may not use it) and its fix is the key, never "create the table" (issue 19, point 10)."""
    write_config(app.config, app.db, secondary, app.metrics, key=secondary.anon_key)
    app.connect().execute("INSERT INTO parent VALUES (1, 'p')")
    result = app.syncd("run", "--once")
    assert result.returncode == 1, result.stderr[-2000:]
    parent = next(t for t in json.loads(app.syncd("status", "--json").stdout)["tables"] if t["name"] == "parent")
    assert parent["halted"] and "42501" in parent["last_error"], parent
    assert "does not exist" not in parent["last_error"] and "service key" in parent["last_error"], parent


def test_a_second_daemon_stands_by_and_takes_over(app: App, pg: psycopg.Connection):
    first = app.start()
    time.sleep(1.5)
    standby_addr = f"127.0.0.1:{free_port()}"
    second = app.start("--metrics-addr", standby_addr)
    try:
        ready = poll(f"http://{standby_addr}/readyz", lambda r: "standing by" in r.text)
        assert ready.status_code == 503 and "another daemon holds the lease" in ready.text, ready.text
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


@on_both_servers
def test_sighup_resumes_a_table_halted_by_a_privilege_error(app: App, pg: psycopg.Connection):
    """403 42501 (privilege revoked) halts the table; after the grant, SIGHUP resumes without a restart."""
    pg.execute("REVOKE ALL ON public.e2e_parents FROM service_role")
    daemon = app.start()
    try:
        app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(5)])
        ready = poll(f"http://{app.metrics}/readyz", lambda r: "halted" in r.json()["reason"])
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
