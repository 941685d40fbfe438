"""Keys the secondary's type spells otherwise (issue 19, point 7; field case 25, twentyhq/twenty#21754): a TEXT key
in SQLite holding UUIDs in spellings PostgreSQL's `uuid` reads as one value (upper case, braces, no hyphens).
verify compares them as PostgreSQL stores them, and `verify --repair` followed by `run --once` deletes no live
row. The real process against the dev server over real PostgreSQL (the uuid parsing is PostgreSQL's)."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path

import psycopg

from tests import test_source_lifecycle as lab
from tests.conftest import DevServer
from tests.test_source_lifecycle import make_lab

pg_tables = lab.pg_tables  # the source lifecycle's fixture, used here too
SPELLINGS = ["A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a12}",
             "c2eebc999c0b4ef8bb6d6bb9bd380a13", "d3eebc99-9c0b4ef8-bb6d6bb9-bd380a14"]


def test_uuid_spellings_are_one_key_and_repair_deletes_no_live_row(tmp_path: Path, devserver: DevServer,
                                                                    pg: psycopg.Connection, pg_tables) -> None:
    pg_tables("ks_docs", "id uuid PRIMARY KEY, title text")
    app = make_lab(tmp_path, devserver, "CREATE TABLE docs (id TEXT PRIMARY KEY, title TEXT);",
                   '[[table]]\nname = "docs"\ntarget = "ks_docs"\n')
    with closing(app.connect()) as conn:
        conn.executemany("INSERT INTO docs VALUES (?, 'v1')", [(u,) for u in SPELLINGS])
    shipped = app.syncd("run", "--once")
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert pg.execute("SELECT count(*) FROM ks_docs").fetchone()[0] == len(SPELLINGS)
    checked = app.syncd("verify")
    assert checked.returncode == 0, checked.stdout
    repaired = app.syncd("verify", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    again = app.syncd("run", "--once")
    assert again.returncode == 0, again.stderr[-2000:]
    assert pg.execute("SELECT count(*) FROM ks_docs").fetchone()[0] == len(SPELLINGS), "repair deleted live rows"
