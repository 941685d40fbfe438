"""replay and resync: keys go back into the outbox and `syncd run` ships their current rows, to the dev server and to
the real PostgREST."""

from __future__ import annotations

import sqlite3
import threading
import time

import psycopg
import pytest

from syncd.timeparse import parse_time
from tests.e2e import App, assert_converged, dead_letters, on_both_servers, pending, target

NOW = 1_700_000_000.0


@on_both_servers
def test_dead_letters_replayed_after_the_cause_is_fixed_land(app: App, pg: psycopg.Connection):
    """A row refused by a CHECK is dead-lettered; after the constraint is relaxed, replay lands it."""
    db = app.connect()
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, 'n', ?)", [(1, 1), (2, -5), (3, -7)])
    assert app.syncd("run", "--once").returncode == 0
    assert len(dead_letters(app)) == 2
    dry = app.syncd("replay", "--dead-letters", "--table", "item", "--dry-run")
    assert "would re-enqueue 2 dead letter(s)" in dry.stdout and len(dead_letters(app)) == 2 and pending(app) == 0
    pg.execute("ALTER TABLE e2e_items DROP CONSTRAINT e2e_items_qty_check")
    try:
        replayed = app.syncd("replay", "--dead-letters", "--table", "item")
        assert replayed.returncode == 0 and "re-enqueued 2 dead letter(s)" in replayed.stdout
        assert dead_letters(app) == [] and pending(app) == 2
        assert app.syncd("run", "--once").returncode == 0
        assert_converged(app, pg)
    finally:
        pg.execute("DELETE FROM e2e_items WHERE qty < 0")
        pg.execute("ALTER TABLE e2e_items ADD CONSTRAINT e2e_items_qty_check CHECK (qty >= 0)")


@on_both_servers
def test_replay_of_chosen_dead_letter_ids_only(app: App):
    db = app.connect()
    db.executemany("INSERT INTO item (id, name, qty) VALUES (?, 'n', -1)", [(i,) for i in range(3)])
    app.syncd("run", "--once")
    first_id = sqlite3.connect(app.db).execute("SELECT min(id) FROM _syncd_dead_letter").fetchone()[0]
    assert app.syncd("replay", "--dead-letters", "--id", str(first_id)).returncode == 0
    assert len(dead_letters(app)) == 2 and pending(app) == 1


@on_both_servers
def test_replay_since_repairs_a_secondary_restored_from_an_older_backup(app: App, pg: psycopg.Connection):
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(50)])
    assert app.syncd("run", "--once").returncode == 0
    pg.execute("TRUNCATE e2e_parents CASCADE")  # the secondary came back from a backup without them
    assert app.syncd("replay", "--since", "1h", "--until", "2099-01-01T00:00:00Z", "--dry-run").stdout.startswith(
        "would re-enqueue 50")
    assert app.syncd("replay", "--since", "1h", "--table", "parent").returncode == 0
    assert app.syncd("run", "--once").returncode == 0
    assert_converged(app, pg)


@on_both_servers
def test_resync_during_writes_converges(app: App, pg: psycopg.Connection):
    """Rows that predate install are backfilled in chunks while the app keeps writing."""
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, 'old')", [(i,) for i in range(4500)])
    db.executemany("INSERT INTO pair VALUES (?, ?, 'v')", [(f"k,{i % 7}", i) for i in range(2500)])
    db.execute("DELETE FROM _syncd_outbox")  # as if these rows were there before `syncd install`
    stop = threading.Event()

    def keep_writing() -> None:
        writer, n = app.connect(), 0
        while not stop.is_set():
            writer.execute("UPDATE parent SET name = ? WHERE id = ?", (f"new{n}", n % 4500))
            writer.execute("INSERT INTO parent VALUES (?, 'fresh')", (10_000 + n,))
            n += 1
            time.sleep(0.002)

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        resynced = app.syncd("backfill", "--table", "parent")
        assert resynced.returncode == 0 and "enqueued" in resynced.stdout
        assert app.syncd("resync", "--table", "pair").returncode == 0
    finally:
        stop.set()
        thread.join()
    assert app.syncd("run", "--once").returncode == 0
    assert_converged(app, pg)


@on_both_servers
def test_resync_where_and_dry_run(app: App, pg: psycopg.Connection):
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, ?)", [(i, "a" if i % 2 else "b") for i in range(100)])
    db.execute("DELETE FROM _syncd_outbox")
    dry = app.syncd("resync", "--table", "parent", "--where", "name = 'a'", "--dry-run")
    assert "would enqueue 50 key(s)" in dry.stdout and pending(app) == 0
    assert app.syncd("resync", "--table", "parent", "--where", "name = 'a'").returncode == 0
    assert pending(app) == 50
    app.syncd("run", "--once")
    assert target(pg, "SELECT count(*) FROM e2e_parents") == {(50,)}


def test_resync_of_an_unknown_table_or_bad_where_is_a_clear_error(app: App):
    assert "is not configured" in app.syncd("resync", "--table", "nope").stderr
    bad = app.syncd("resync", "--table", "parent", "--where", "no_such_column = 1")
    assert bad.returncode == 2 and "no such column" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", NOW - 90), ("15m", NOW - 900), ("2h", NOW - 7200), ("7d", NOW - 7 * 86400),
    ("2023-11-14T22:13:20Z", NOW), ("2023-11-14T22:13:20", NOW), ("2023-11-14T23:13:20+01:00", NOW),
])
def test_parse_time(text: str, expected: float):
    assert parse_time(text, NOW) == expected


def test_parse_time_refuses_nonsense():
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday", NOW)
