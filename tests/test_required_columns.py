"""A NOT NULL column only the secondary has (issue 19, point 9; ../shared/field-cases/39, supabase/postgrest-js#515):
a Supabase migration adds `tenant`, backfills it and sets it NOT NULL. PostgreSQL checks NOT NULL on the INSERT half
of an upsert before ON CONFLICT, so every change is refused with 23502, an update of a row that holds a tenant
included. The table halts with the fix (nothing dead-lettered, `run --once` exits 1), and once the column has a
DEFAULT the changes ship by themselves. The real process, against the dev server and the real PostgREST (whose
description says when the column got its default)."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path

import psycopg

from tests.conftest import Secondary, create_tables, reload_schema
from tests.test_source_lifecycle import make_lab


def test_a_not_null_column_only_the_secondary_has_halts_the_table_until_it_has_a_default(
        tmp_path: Path, secondary: Secondary, pg: psycopg.Connection) -> None:
    create_tables(secondary, {"rq_items": "CREATE TABLE rq_items (id bigint PRIMARY KEY, v text)"})
    app = make_lab(tmp_path, secondary, "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);",
                   '[[table]]\nname = "items"\ntarget = "rq_items"\n', schema_recheck_interval=0.5)
    with closing(app.connect()) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'first')")
    first = app.syncd("run", "--once")
    assert first.returncode == 0, first.stderr[-2000:]
    pg.execute("ALTER TABLE rq_items ADD COLUMN tenant text")
    pg.execute("UPDATE rq_items SET tenant = 't1'")
    pg.execute("ALTER TABLE rq_items ALTER COLUMN tenant SET NOT NULL")
    reload_schema(secondary, "rq_items")
    with closing(app.connect()) as conn:
        conn.execute("UPDATE items SET v = 'changed' WHERE id = 1")
        conn.execute("INSERT INTO items VALUES (2, 'second')")

    halted = app.syncd("run", "--once")
    assert halted.returncode == 1, halted.stderr[-2000:]
    with closing(app.connect()) as conn:
        assert conn.execute("SELECT count(*) FROM _syncd_dead_letter").fetchone()[0] == 0
    status = json.loads(app.syncd("status", "--json").stdout)
    [items] = [t for t in status["tables"] if t["name"] == "items"]
    assert items["halted"] and "'tenant'" in items["last_error"] and "SET DEFAULT" in items["last_error"], items
    assert pg.execute("SELECT id, v, tenant FROM rq_items ORDER BY id").fetchall() == [(1, "first", "t1")]

    pg.execute("ALTER TABLE rq_items ALTER COLUMN tenant SET DEFAULT 'default-tenant'")
    reload_schema(secondary, "rq_items")
    resumed = app.syncd("run", "--once")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert pg.execute("SELECT id, v, tenant FROM rq_items ORDER BY id").fetchall() == [
        (1, "changed", "t1"), (2, "second", "default-tenant")]
