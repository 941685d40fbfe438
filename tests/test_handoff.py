"""Batches that were valid in SQLite arrive valid in PostgreSQL (issue 11, kinds 3 and 4), against the dev server and
the real PostgREST 12.2.12 (skipped with the reason when SYNCD_TEST_POSTGREST is unset).

SQLite checks a transaction's end state; PostgreSQL checks an upsert's rows one by one against non-deferrable unique
constraints, and refuses one conflict key twice in one statement (21000, which the real PostgREST answers with HTTP
500). Each test: the app writes through stdlib sqlite3, `syncd run --once` ships, and PostgreSQL must hold exactly
SQLite's rows with nothing dead-lettered, or (where no order can work) the rows dead-lettered with the reason and
the fix while everything else ships.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import create_tables
from tests.e2e import App, dead_letters, pending
from tests.postgrest import Secondary
from tests.test_source_lifecycle import make_lab, pg_rows, sqlite_rows


@pytest.fixture
def tables(pg: psycopg.Connection, secondary: Secondary) -> Iterator[Callable[..., None]]:
    """Create tables of the secondary ("CREATE TABLE name ..." each, parents first) served by `secondary`; dropped
    after."""
    made: list[str] = []

    def create(*ddl: str) -> None:
        named = {statement.split()[2]: statement for statement in ddl}
        made.extend(named)
        create_tables(secondary, named)

    yield create
    for name in reversed(made):
        pg.execute(f"DROP TABLE IF EXISTS public.{name} CASCADE")
    pg.execute("NOTIFY pgrst, 'reload schema'")


def lab(tmp_path: Path, server: Secondary, schema: str, tables: str) -> App:
    return make_lab(tmp_path, server, schema, tables)  # type: ignore[arg-type]


def write(app: App, sql: str) -> None:
    conn = app.connect()
    try:
        conn.executescript(sql)
    finally:
        conn.close()


def run_once(app: App) -> str:
    done = app.syncd("run", "--once", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def same(app: App, pg: psycopg.Connection, sqlite_sql: str, pg_sql: str) -> None:
    assert sqlite_rows(app.db, sqlite_sql) == pg_rows(pg, pg_sql)


ITEMS_SQLITE = """CREATE TABLE items (id INTEGER PRIMARY KEY, list_id INTEGER NOT NULL, position INTEGER NOT NULL,
                                      title TEXT, UNIQUE (list_id, position));"""
ITEMS_PG = ("CREATE TABLE ho_items (id bigint PRIMARY KEY, list_id bigint NOT NULL, position bigint NOT NULL, "
            "title text, UNIQUE (list_id, position))")
ITEMS_TOML = '[[table]]\nname = "items"\ntarget = "ho_items"\n'
ITEMS = ("SELECT id, list_id, position, title FROM items", "SELECT id, list_id, position, title FROM ho_items")


@pytest.mark.parametrize("moves", [
    # two rows swap positions through a temporary value, as SQLite requires (field case 08)
    ["UPDATE items SET position = -1 WHERE id = 1", "UPDATE items SET position = 1 WHERE id = 2",
     "UPDATE items SET position = 2 WHERE id = 1"],
    # three rows rotate their positions
    ["UPDATE items SET position = position + 10", "UPDATE items SET position = 2 WHERE id = 1",
     "UPDATE items SET position = 3 WHERE id = 2", "UPDATE items SET position = 1 WHERE id = 3"],
    # a chain, no cycle: each row takes the position the next one gives up
    ["UPDATE items SET position = 4 WHERE id = 3", "UPDATE items SET position = 3 WHERE id = 2",
     "UPDATE items SET position = 2 WHERE id = 1"],
    # a row takes the position of a row deleted in the same transaction
    ["DELETE FROM items WHERE id = 2", "UPDATE items SET position = 2 WHERE id = 1"],
], ids=["swap", "rotation", "chain", "taken-from-deleted"])
def test_unique_values_handed_over_in_one_transaction_arrive(tmp_path: Path, secondary: Secondary, tables, pg, moves):
    tables(ITEMS_PG)
    app = lab(tmp_path, secondary, ITEMS_SQLITE, ITEMS_TOML)
    write(app, "INSERT INTO items VALUES (1, 1, 1, 'a'), (2, 1, 2, 'b'), (3, 1, 3, 'c'), (4, 2, 1, 'other list');")
    run_once(app)
    write(app, "BEGIN;\n" + ";\n".join(moves) + ";\nCOMMIT;")
    run_once(app)
    assert dead_letters(app) == []
    assert pending(app) == 0
    same(app, pg, *ITEMS)


USERS_SQLITE = "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL UNIQUE);"
USERS_PG = "CREATE TABLE ho_users (id bigint PRIMARY KEY, username text NOT NULL UNIQUE)"
USERS_TOML = '[[table]]\nname = "users"\ntarget = "ho_users"\n'


def test_a_unique_value_freed_by_a_delete_is_taken_by_a_new_row(tmp_path: Path, secondary: Secondary, tables, pg):
    """Deletes ship after upserts (children before parents needs it), so the new row is refused first: it is sent
    again once the delete is in, in the same run."""
    tables(USERS_PG)
    app = lab(tmp_path, secondary, USERS_SQLITE, USERS_TOML)
    write(app, "INSERT INTO users VALUES (1, 'alice'), (3, 'bob');")
    run_once(app)
    write(app, "DELETE FROM users WHERE id = 1; INSERT INTO users VALUES (2, 'alice');"
               "UPDATE users SET username = 'carol' WHERE id = 3; INSERT INTO users VALUES (4, 'bob');")
    run_once(app)
    assert dead_letters(app) == []
    same(app, pg, "SELECT id, username FROM users", "SELECT id, username FROM ho_users")


def test_a_value_held_by_a_row_syncd_does_not_know_is_dead_lettered_with_the_fix(tmp_path: Path, secondary: Secondary,
                                                                                 tables, pg):
    """A real clash (the secondary has a row SQLite lacks) is no matter of order: after the retries the row is
    dead-lettered with PostgreSQL's reason and the hint; the other rows ship and run --once returns."""
    tables(USERS_PG)
    pg.execute("INSERT INTO ho_users VALUES (99, 'mallory')")
    app = lab(tmp_path, secondary, USERS_SQLITE, USERS_TOML)
    write(app, "INSERT INTO users VALUES (1, 'mallory'), (2, 'dave');")
    for _ in range(4):  # fk_retries (3) requeues, then the dead letter
        run_once(app)
    letters = dead_letters(app)
    assert [(table, key) for table, key, *_ in letters] == [("users", "1")], letters
    reason = str(letters[0][4])
    assert "23505" in reason and "DEFERRABLE INITIALLY DEFERRED" in reason and "syncd replay --dead-letters" in reason
    assert pg_rows(pg, "SELECT id, username FROM ho_users") == {(99, "mallory"), (2, "dave")}


CHILD_PG = "CREATE TABLE ho_child (id bigint PRIMARY KEY, item_id bigint REFERENCES ho_items (id) ON DELETE CASCADE)"


def test_a_swap_is_not_reinserted_when_a_foreign_key_points_at_the_table(tmp_path: Path, secondary: Secondary,
                                                                         tables, pg):
    """Deleting the rows to apply a swap would cascade to the child table: the rows are dead-lettered with the fix
    (a DEFERRABLE constraint) instead, and the secondary's children are untouched."""
    tables(ITEMS_PG, CHILD_PG)
    app = lab(tmp_path, secondary, ITEMS_SQLITE, ITEMS_TOML)
    write(app, "INSERT INTO items VALUES (1, 1, 1, 'a'), (2, 1, 2, 'b');")
    run_once(app)
    pg.execute("INSERT INTO ho_child VALUES (10, 1), (20, 2)")
    write(app, "BEGIN; UPDATE items SET position = -1 WHERE id = 1; UPDATE items SET position = 1 WHERE id = 2;"
               "UPDATE items SET position = 2 WHERE id = 1; COMMIT;")
    for _ in range(4):
        run_once(app)
    assert sorted(key for _, key, *_ in dead_letters(app)) == ["1", "2"]
    assert all("DEFERRABLE INITIALLY DEFERRED" in str(letter[4]) for letter in dead_letters(app))
    assert pg_rows(pg, "SELECT id, item_id FROM ho_child") == {(10, 1), (20, 2)}


def test_a_deferrable_unique_constraint_takes_a_swap_in_one_request(tmp_path: Path, secondary: Secondary, tables, pg):
    """The fix the dead letter names works: with the constraint DEFERRABLE INITIALLY DEFERRED, PostgreSQL checks it
    at commit, the swap arrives in one upsert, and the replay of the dead letters converges."""
    tables(ITEMS_PG.replace("UNIQUE (list_id, position)", "UNIQUE (list_id, position) DEFERRABLE INITIALLY DEFERRED"),
           CHILD_PG)
    app = lab(tmp_path, secondary, ITEMS_SQLITE, ITEMS_TOML)
    write(app, "INSERT INTO items VALUES (1, 1, 1, 'a'), (2, 1, 2, 'b');")
    run_once(app)
    write(app, "BEGIN; UPDATE items SET position = -1 WHERE id = 1; UPDATE items SET position = 1 WHERE id = 2;"
               "UPDATE items SET position = 2 WHERE id = 1; COMMIT;")
    log = run_once(app)
    assert dead_letters(app) == []
    assert "deleted and inserted again" not in log
    same(app, pg, *ITEMS)


# -- one key of the secondary, two keys of SQLite -------------------------------------------------------------

READINGS_SQLITE = ("CREATE TABLE readings (sensor TEXT NOT NULL, ts TEXT NOT NULL, value REAL, "
                   "PRIMARY KEY (sensor, ts)); CREATE TABLE other (id INTEGER PRIMARY KEY, v TEXT);")
READINGS_PG = ("CREATE TABLE ho_readings (sensor text, ts timestamptz, value double precision, "
               "PRIMARY KEY (sensor, ts))", "CREATE TABLE ho_other (id bigint PRIMARY KEY, v text)")
READINGS_TOML = ('[[table]]\nname = "readings"\ntarget = "ho_readings"\n[table.columns.ts]\ntransform = "timestamp"\n'
                 '[[table]]\nname = "other"\ntarget = "ho_other"\n')


@pytest.mark.parametrize("spellings", [
    ("2024-01-15 10:30:00", "2024-01-15T10:30:00Z"),  # field case 09
    ("2024-01-15T12:30:00+02:00", "2024-01-15 10:30:00.000"),
])
def test_one_instant_spelt_two_ways_ships_the_newest_row_and_stalls_nothing(tmp_path: Path, secondary: Secondary,
                                                                           tables, pg, spellings):
    tables(*READINGS_PG)
    app = lab(tmp_path, secondary, READINGS_SQLITE, READINGS_TOML)
    write(app, f"INSERT INTO readings VALUES ('s1', '{spellings[0]}', 1.5);"
               f"INSERT INTO readings VALUES ('s1', '{spellings[1]}', 2.5);"
               "INSERT INTO other VALUES (1, 'queued behind');")
    log = run_once(app)
    assert pending(app) == 0 and dead_letters(app) == []
    assert pg_rows(pg, "SELECT sensor, value FROM ho_readings") == {("s1", 2.5)}  # the newest state wins
    assert pg_rows(pg, "SELECT id, v FROM ho_other") == {(1, "queued behind")}
    assert "one key in the secondary" in log


UNTYPED_SQLITE = "CREATE TABLE tags (id PRIMARY KEY, label TEXT);"  # no type: 1 and '1' are two keys
UNTYPED_PG = "CREATE TABLE ho_tags (id bigint PRIMARY KEY, label text)"
UNTYPED_TOML = '[[table]]\nname = "tags"\ntarget = "ho_tags"\n'


def test_a_number_and_its_text_in_an_untyped_key_are_one_row_of_the_secondary(tmp_path: Path, secondary: Secondary,
                                                                              tables, pg):
    tables(UNTYPED_PG)
    app = lab(tmp_path, secondary, UNTYPED_SQLITE, UNTYPED_TOML)
    write(app, "INSERT INTO tags VALUES (1, 'number'); INSERT INTO tags VALUES ('1', 'text');"
               "INSERT INTO tags VALUES ('01', 'zero-padded'); INSERT INTO tags VALUES (2, 'two');")
    logged = run_once(app)
    assert "(PostgreSQL answered 21000)" in logged, logged  # what only PostgreSQL's cast found is not silent
    assert pending(app) == 0 and dead_letters(app) == []
    # '01' is also 1 for a bigint: syncd cannot know that, PostgreSQL answers 21000 and the rows go apart, newest last
    assert pg_rows(pg, "SELECT id, label FROM ho_tags") == {(1, "zero-padded"), (2, "two")}
    # four rows in the file, two in the secondary: verify says so instead of "equal (4 rows)"
    verified = app.syncd("verify")
    assert verified.returncode == 1 and "2 one key of the secondary with another row" in verified.stdout, \
        verified.stdout


def test_a_delete_of_a_key_another_present_row_maps_to_keeps_the_row(tmp_path: Path, secondary: Secondary, tables, pg):
    tables(UNTYPED_PG)
    app = lab(tmp_path, secondary, UNTYPED_SQLITE, UNTYPED_TOML)
    write(app, "INSERT INTO tags VALUES (1, 'number');")
    run_once(app)
    write(app, "INSERT INTO tags VALUES ('1', 'text'); DELETE FROM tags WHERE id = 1 AND typeof(id) = 'integer';")
    run_once(app)
    assert sqlite_rows(app.db, "SELECT id, label FROM tags") == {("1", "text")}
    assert pg_rows(pg, "SELECT id, label FROM ho_tags") == {(1, "text")}


def test_keys_only_postgresql_finds_equal_are_named_in_a_warning(tmp_path: Path, secondary: Secondary, tables,
                                                                pg) -> None:
    """'1.0' and '1' are two TEXT keys in SQLite and one numeric key in PostgreSQL: syncd cannot know that, PostgreSQL
    answers 21000; the rows go apart, the newest last, and the warning names the two keys."""
    tables("CREATE TABLE ho_tags (id numeric PRIMARY KEY, label text)")
    app = lab(tmp_path, secondary, "CREATE TABLE tags (id TEXT PRIMARY KEY, label TEXT);", UNTYPED_TOML)
    write(app, "INSERT INTO tags VALUES ('1.0', 'older'); INSERT INTO tags VALUES ('1', 'newer');")
    logged = run_once(app)
    assert "(PostgreSQL answered 21000)" in logged and "('1.0',) -> ('1',)" in logged, logged
    assert pending(app) == 0 and dead_letters(app) == []
    assert pg_rows(pg, "SELECT id::text, label FROM ho_tags") == {("1", "newer")}


@pytest.mark.parametrize("pg_type", ["bigint", "text"])
def test_a_delete_in_a_later_batch_of_a_key_another_row_still_is_keeps_that_row(tmp_path: Path, secondary: Secondary,
                                                                              tables, pg, pg_type: str) -> None:
    """`1` shipped, `'1'` shipped over it later (one key of the secondary), then `'1'` deleted: the secondary must
    keep row 1 as the file has it, not lose it to the delete."""
    tables(f"CREATE TABLE ho_tags (id {pg_type} PRIMARY KEY, label text)")
    app = lab(tmp_path, secondary, UNTYPED_SQLITE, UNTYPED_TOML)
    write(app, "INSERT INTO tags VALUES (1, 'int one');")
    run_once(app)
    write(app, "INSERT INTO tags VALUES ('1', 'text one');")
    run_once(app)
    write(app, "DELETE FROM tags WHERE id = '1' AND typeof(id) = 'text';")
    logged = run_once(app)
    assert "that row was sent instead of the delete" in logged and "('1',) -> (1,)" in logged, logged
    assert pending(app) == 0 and dead_letters(app) == []
    assert sqlite_rows(app.db, "SELECT id, label FROM tags") == {(1, "int one")}
    assert pg_rows(pg, "SELECT id::text, label FROM ho_tags") == {("1", "int one")}


def test_the_real_postgrest_answers_one_key_twice_with_500_21000_and_syncd_calls_it_a_row_error(
        secondary: Secondary, tables) -> None:
    """The wire fact behind kind 4, on both servers; `target.classify` turns it into a row error (not an outage)."""
    from syncd.target import classify
    tables(UNTYPED_PG)
    with secondary.client(secondary.service_key) as client:
        answer = client.post("/ho_tags", params={"on_conflict": "id"}, json=[{"id": 1, "label": "a"},
                                                                             {"id": 1, "label": "b"}],
                             headers={"Prefer": "resolution=merge-duplicates,return=minimal"})
    assert (answer.status_code, answer.json().get("code")) == (500, "21000"), answer.text
    error = classify(answer)
    assert error is not None and error.kind == "row"


def test_collapsing_is_logged_and_metrics_stay_healthy(tmp_path: Path, secondary: Secondary, tables, pg) -> None:
    """A permanent row problem never flips the secondary's health: syncd_target_up stays 1."""
    tables(UNTYPED_PG)
    app = lab(tmp_path, secondary, UNTYPED_SQLITE, UNTYPED_TOML)
    write(app, "INSERT INTO tags VALUES (5, 'number'); INSERT INTO tags VALUES ('05', 'padded');")
    daemon = app.start()
    try:
        deadline = time.monotonic() + 30
        while pending(app):
            assert time.monotonic() < deadline, "the outbox did not drain"
            time.sleep(0.1)
        metrics = httpx.get(f"http://{app.metrics}/metrics").text
        assert "syncd_target_up 1.0" in metrics
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert pg_rows(pg, "SELECT id, label FROM ho_tags") == {(5, "padded")}
