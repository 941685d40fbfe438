"""`syncd status`, the lease, and the capture commands as a real process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from syncd import capture, outbox, status
from syncd.lease import Lease, read_lease
from syncd.state import connect
from tests.test_capture import app, installed

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE u (code TEXT PRIMARY KEY);"
TABLES = ({"name": "t", "target": "things"}, {"name": "u"})


def test_healthy_after_install(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    result = status.collect(connect(path), config)
    assert result.healthy and result.installed
    assert [(t.name, t.target, t.triggers, t.pending) for t in result.tables] == [("t", "things", "ok", 0),
                                                                                  ("u", "u", "ok", 0)]


def test_pending_count_and_oldest_age(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    db = app(path)
    db.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    result = status.collect(connect(path), config, now=time.time() + 10)
    t = result.tables[0]
    assert t.pending == 2 and 9 < t.oldest_pending_age < 12
    assert result.healthy
    stale = status.collect(connect(path), config, max_lag=5, now=time.time() + 10)
    assert not stale.healthy and "more than 5 s" in stale.tables[0].problems[0]


def test_dead_letters_need_an_operator(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO _syncd_dead_letter (tbl, key, op, enqueued_at, failed_at, status, code, message) "
                   "VALUES ('u', '''x''', 'I', 0, 0, 409, '23505', 'duplicate')")
    result = status.collect(connect(path), config)
    assert not result.healthy and result.tables[1].dead_letters == 1
    assert "syncd replay --dead-letters --table u" in result.tables[1].problems[0]


def test_missing_trigger_is_reported(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    app(path).execute("DROP TRIGGER _syncd_t_upd")
    result = status.collect(connect(path), config)
    assert result.tables[0].triggers == "missing" and not result.healthy


def test_renamed_key_column_is_reported(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    app(path).execute("ALTER TABLE u RENAME COLUMN code TO ident")
    result = status.collect(connect(path), config)
    assert result.tables[1].triggers == "outdated"
    assert not result.healthy


def test_dropped_key_column_of_a_configured_key_is_reported(tmp_path: Path):
    path, config = installed(tmp_path, "CREATE TABLE k (id INTEGER PRIMARY KEY, code TEXT);",
                             {"name": "k", "key": ["code"]})
    db = app(path)
    for trigger in capture.existing_triggers(connect(path)):  # SQLite refuses DROP COLUMN under a trigger
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("ALTER TABLE k DROP COLUMN code")
    result = status.collect(connect(path), config)
    assert result.tables[0].triggers == "invalid" and "renamed or dropped" in result.tables[0].problems[0]


def test_not_installed_is_a_problem(tmp_path: Path):
    path = tmp_path / "app.sqlite3"
    sqlite3.connect(path).executescript(SCHEMA)
    from tests.test_capture import config_for

    result = status.collect(connect(path), config_for(path, *TABLES))
    assert not result.installed and not result.healthy


def test_status_works_while_the_app_holds_the_write_lock(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    db = app(path)
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (1, 'a')")
    try:
        assert status.collect(connect(path), config).tables[0].pending == 0
    finally:
        db.execute("COMMIT")


EXCLUSIVE_APP = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("INSERT INTO t VALUES (7, 'held')")
conn.commit()
print("held", flush=True)
time.sleep(60)
"""


def test_status_names_an_app_in_exclusive_locking_mode_and_the_fix(tmp_path: Path):
    """Issue 19, point 12: an app in PRAGMA locking_mode=EXCLUSIVE keeps every other process out of the file for as
    long as its connection is open. status says who holds what, how long it waited and the fix, within its short
    default wait (5 s), instead of "database is locked"."""
    path, _ = installed(tmp_path, SCHEMA, *TABLES)
    (tmp_path / "syncd.toml").write_text(f'[source]\npath = "{path}"\n\n[target]\nurl = "http://127.0.0.1:9"\n'
                                         'jwt_secret = "' + "s" * 40 + '"\n\n[[table]]\nname = "t"\n')
    holder = subprocess.Popen([sys.executable, "-c", EXCLUSIVE_APP, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        shown = subprocess.run([sys.executable, "-m", "syncd", "status", "--config", str(tmp_path / "syncd.toml")],
                               capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert shown.returncode == 1 and took < 15, (took, shown.stderr)
    error = shown.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: process {holder.pid} (python") and "locking_mode=EXCLUSIVE" in error, error
    assert "syncd waited 5 s" in error and "remove that PRAGMA" in error, error


def test_lease_has_one_holder_and_expires(tmp_path: Path):
    path, _ = installed(tmp_path, SCHEMA, *TABLES)
    first, second = Lease(connect(path), seconds=30), Lease(connect(path), seconds=30)
    now = time.time()
    assert first.acquire(now)
    assert not second.acquire(now + 1)
    assert first.renew(now + 20)
    assert not second.acquire(now + 40)
    assert second.acquire(now + 51)  # the first holder stopped renewing
    assert not first.renew(now + 52)
    second.release()
    assert read_lease(connect(path)) is None


def test_lease_is_exclusive_under_concurrent_acquires(tmp_path: Path):
    path, _ = installed(tmp_path, SCHEMA, *TABLES)
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        lease = Lease(connect(path), seconds=60)
        lease.conn.set_busy_timeout(5000)
        barrier.wait()
        wins.append(lease.acquire())

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1


def test_status_shows_the_lease_holder(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    Lease(connect(path)).acquire()
    result = status.collect(connect(path), config)
    assert result.lease is not None and result.lease["alive"] and not result.lease["holder_gone"]
    assert "lease held" in status.render(result)


def test_a_lease_whose_holder_died_on_this_host_is_not_shown_as_a_running_daemon(tmp_path: Path):
    """kill -9 leaves the lease until it expires: status said 'running (lease held)' with exit 0 meanwhile."""
    path, config = installed(tmp_path, SCHEMA, *TABLES)
    holder = subprocess.run([sys.executable, "-c", "import os, sys; from syncd.lease import Lease; "
                             "from syncd.state import connect; from pathlib import Path; "
                             "assert Lease(connect(Path(sys.argv[1])), seconds=60).acquire(); print(os.getpid())",
                             str(path)], capture_output=True, text=True, check=True)
    result = status.collect(connect(path), config)
    assert result.lease is not None and result.lease["alive"] and result.lease["holder_gone"]
    assert f"pid {holder.stdout.strip()}" in status.render(result) and "NOT RUNNING" in status.render(result)
    assert any("no longer runs" in problem for problem in result.problems), result.problems


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def write_config(tmp_path: Path, db: Path) -> Path:
    config = tmp_path / "syncd.toml"
    config.write_text(f'[source]\npath = "{db}"\n\n[[table]]\nname = "t"\ntarget = "things"\n\n'
                      '[[table]]\nname = "u"\n')
    return config


def test_cli_install_status_uninstall(tmp_path: Path):
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript(SCHEMA)
    config = write_config(tmp_path, db)
    first = run_cli("install", "--config", str(config))
    assert first.returncode == 0 and "6 trigger(s) created" in first.stdout
    assert "0 trigger(s) created, 0 replaced, 6 unchanged" in run_cli("install", "--config", str(config)).stdout
    app(db).execute("INSERT INTO t VALUES (1, 'a')")
    shown = run_cli("status", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stdout
    report = json.loads(shown.stdout)
    assert report["healthy"] and report["tables"][0]["pending"] == 1
    human = run_cli("status", "--config", str(config))
    assert "things" in human.stdout and "healthy" in human.stdout
    app(db).execute("DROP TRIGGER _syncd_u_ins")
    assert run_cli("status", "--config", str(config)).returncode == 1
    removed = run_cli("uninstall", "--config", str(config), "--drop-outbox")
    assert removed.returncode == 2 and "--force" in removed.stderr
    assert run_cli("uninstall", "--config", str(config), "--drop-outbox", "--force").returncode == 0


def test_cli_refusal_is_a_clear_message_not_a_traceback(tmp_path: Path):
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript("CREATE TABLE t (a, b);")
    config = write_config(tmp_path, db)
    result = run_cli("install", "--config", str(config))
    assert result.returncode == 2
    assert "table 't' has no primary key" in result.stderr and "table 'u' does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not outbox.installed(connect(db))


def test_cli_missing_database_is_a_clear_error(tmp_path: Path):
    config = write_config(tmp_path, tmp_path / "nope.sqlite3")
    result = run_cli("status", "--config", str(config))
    assert result.returncode == 2 and "database file not found" in result.stderr
    assert not (tmp_path / "nope.sqlite3").exists()
