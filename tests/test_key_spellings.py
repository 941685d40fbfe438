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


def test_character_keys_compare_as_postgresql_pads_them_and_repair_deletes_only_extras(
        tmp_path: Path, devserver: DevServer, pg: psycopg.Connection, pg_tables) -> None:
    """character(n) pads with spaces and ignores trailing spaces in comparisons: 'ab' comes back as 'ab  '. verify
    sees one key, and a repair deletes the row only the secondary has, never a live one."""
    pg_tables("ks_codes", "code character(4) PRIMARY KEY, label character(6)")
    app = make_lab(tmp_path, devserver, "CREATE TABLE codes (code TEXT PRIMARY KEY, label TEXT);",
                   '[[table]]\nname = "codes"\ntarget = "ks_codes"\n')
    with closing(app.connect()) as conn:
        conn.executemany("INSERT INTO codes VALUES (?, ?)", [("ab", "x"), ("cd", "yy")])
    assert app.syncd("run", "--once").returncode == 0
    checked = app.syncd("verify")
    assert checked.returncode == 0, checked.stdout
    pg.execute("INSERT INTO ks_codes VALUES ('zz', 'only')")
    repaired = app.syncd("verify", "--repair")
    assert "1 extra in the secondary" in repaired.stdout and "enqueued 1 key(s)" in repaired.stdout, repaired.stdout
    assert app.syncd("run", "--once").returncode == 0
    assert {r[0] for r in pg.execute("SELECT code FROM ks_codes")} == {"ab  ", "cd  "}
    assert app.syncd("verify").returncode == 0


def test_an_extra_row_keyed_by_a_type_syncd_does_not_model_is_reported_not_deleted(
        tmp_path: Path, devserver: DevServer, pg: psycopg.Connection, pg_tables) -> None:
    """An enum key: PostgreSQL's equality for it is its own. A row only the secondary has is reported as not
    repaired, with the reason, rather than deleted (another spelling could be a live row's key)."""
    pg.execute("DROP TYPE IF EXISTS ks_colour CASCADE")
    pg.execute("CREATE TYPE ks_colour AS ENUM ('red', 'green', 'blue')")
    pg_tables("ks_colours", "colour ks_colour PRIMARY KEY, hex text")
    app = make_lab(tmp_path, devserver, "CREATE TABLE colours (colour TEXT PRIMARY KEY, hex TEXT);",
                   '[[table]]\nname = "colours"\ntarget = "ks_colours"\n')
    with closing(app.connect()) as conn:
        conn.execute("INSERT INTO colours VALUES ('red', '#f00')")
    assert app.syncd("run", "--once").returncode == 0
    pg.execute("INSERT INTO ks_colours VALUES ('blue', '#00f')")
    repaired = app.syncd("verify", "--repair")
    assert "not deleted, since its key (colour " in repaired.stdout, repaired.stdout
    assert "ks_colour) is compared by rules" in repaired.stdout
    assert app.syncd("run", "--once").returncode == 0
    assert {r[0] for r in pg.execute("SELECT colour::text FROM ks_colours")} == {"red", "blue"}
