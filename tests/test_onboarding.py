"""Applications nobody here wrote, onboarded with README's commands as typed (issue 19): `syncd init --db FILE` in the
file's directory, schema.sql applied in one transaction, `syncd install && syncd resync --all && syncd run`, then
the application writing through its own code, then `syncd verify`: equal, with no manual edit of anything syncd
wrote. One of each kind the field tried: a sample database with a deep foreign-key graph (Chinook), an app with its
own collation (Anki's unicase), a tool that rebuilds tables (sqlite-utils), an ORM with migrations (SQLAlchemy and
Alembic). The deep graph against the dev server and the real PostgREST, the others against the dev server (what
they test is on SQLite's side); the commands find ./syncd.toml themselves."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from benchmarks import chinook
from tests.conftest import Secondary, reload_schema


class Onboarded:
    """An app's directory after the README's commands: run syncd there as the user would."""

    def __init__(self, work: Path, secondary: Secondary) -> None:
        self.work = work
        self.env = {**os.environ, "SYNCD_TARGET_URL": secondary.url, "SUPABASE_SERVICE_KEY": secondary.service_key}
        self.env.pop("SYNCD_CONFIG", None)

    def syncd(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        if args[0] == "run":
            args = (*args, "--metrics-addr", "127.0.0.1:0")
        done = subprocess.run([sys.executable, "-m", "syncd", *args], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=300)
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        if ok:
            assert done.returncode == 0, f"syncd {' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done

    def verify_equal(self) -> str:
        checked = self.syncd("verify")
        assert "table(s) equal" in checked.stdout, checked.stdout
        return checked.stdout


def onboard(work: Path, secondary: Secondary, pg: psycopg.Connection, drop: list[str]) -> Onboarded:
    """README's start, verbatim: init in the directory, schema.sql applied (`psql -1 -f`), install, resync --all,
    run --once. `drop`: the secondary's tables of this app, dropped first (an earlier run's)."""
    for table in drop:
        pg.execute(f'DROP TABLE IF EXISTS public."{table}" CASCADE')
    app = Onboarded(work, secondary)
    app.syncd("init", "--db", "app.sqlite3")
    with pg.transaction():
        pg.execute((work / "schema.sql").read_text())
    reload_schema(secondary, drop[-1])
    app.syncd("install")
    app.syncd("resync", "--all")
    app.syncd("run", "--once")
    return app


def test_a_sample_database_with_a_deep_foreign_key_graph(tmp_path: Path, secondary: Secondary,
                                                          pg: psycopg.Connection) -> None:
    rows = chinook.build(tmp_path / "app.sqlite3", scale=0.05)
    app = onboard(tmp_path, secondary, pg, list(reversed(chinook.TABLES)))
    assert sum(pg.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in chinook.TABLES) == rows
    conn = sqlite3.connect(tmp_path / "app.sqlite3", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("INSERT INTO Artist VALUES (9001, 'New Artist')")
    conn.execute("INSERT INTO Album VALUES (9001, 'New Album', 9001)")
    conn.execute("INSERT INTO Track VALUES (9001, 'New Track', 9001, 1, 1, NULL, 1000, 1, '1.29')")
    conn.execute("UPDATE Track SET AlbumId = 9001 WHERE TrackId = 1")
    conn.execute("DELETE FROM InvoiceLine WHERE TrackId = 2")
    conn.execute("DELETE FROM PlaylistTrack WHERE TrackId = 2")
    conn.execute("DELETE FROM Track WHERE TrackId = 2")
    conn.close()
    shipped = app.syncd("run", "--once")
    assert '"dead_lettered": 0' in shipped.stderr or "dead_lettered" not in shipped.stderr
    app.verify_equal()
    status = app.syncd("status")
    assert "healthy" in status.stdout


UNICASE_SCHEMA = """
CREATE TABLE decks (id INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL COLLATE unicase, mtime INTEGER NOT NULL);
CREATE UNIQUE INDEX idx_decks_name ON decks (name);
CREATE TABLE fields (ntid INTEGER NOT NULL, ord INTEGER NOT NULL, name TEXT NOT NULL COLLATE unicase,
                     config BLOB NOT NULL, PRIMARY KEY (ntid, ord)) WITHOUT ROWID;
CREATE UNIQUE INDEX idx_fields_name_ntid ON fields (name, ntid);
CREATE TABLE tags (tag TEXT NOT NULL PRIMARY KEY COLLATE unicase, usn INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE cards (id INTEGER PRIMARY KEY, did INTEGER NOT NULL, ord INTEGER NOT NULL, due INTEGER NOT NULL);
"""


def unicase(left: str, right: str) -> int:
    """Anki's collation as the app registers it: case-insensitive for every script."""
    a, b = left.casefold(), right.casefold()
    return (a > b) - (a < b)


def anki(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_collation("unicase", unicase)
    return conn


def test_an_app_with_its_own_collation(tmp_path: Path, devserver: Secondary, pg: psycopg.Connection) -> None:
    """Anki registers unicase and uses it on keys, on other columns and in unique indexes, and runs ANALYZE: syncd's
    connection has no unicase. The table keyed by it is left out by init with the collation named and a fix that
    keeps the schema; the others ship, a WITHOUT ROWID one included, and an INSERT OR REPLACE that evicts a row
    through the unicase index is captured."""
    conn = anki(tmp_path / "app.sqlite3")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(UNICASE_SCHEMA)
    conn.executemany("INSERT INTO decks VALUES (?, ?, 1)", [(i, f"Deck {i}") for i in range(20)])
    conn.executemany("INSERT INTO fields VALUES (1, ?, ?, x'00')", [(i, f"Field {i}") for i in range(5)])
    conn.executemany("INSERT INTO tags VALUES (?, 0)", [(f"Tag{i}",) for i in range(5)])
    conn.executemany("INSERT INTO cards VALUES (?, ?, 0, ?)", [(i, i % 20, i) for i in range(50)])
    conn.execute("ANALYZE")
    app = onboard(tmp_path, devserver, pg, ["cards", "fields", "decks"])
    config = (tmp_path / "syncd.toml").read_text()
    assert "# Not synced: table 'tags': key column 'tag' is declared COLLATE unicase" in config
    assert "the app's schema stays as it is" in config
    conn.execute("UPDATE decks SET name = 'DECK 1 renamed' WHERE id = 1")
    conn.execute("INSERT OR REPLACE INTO decks VALUES (60, 'deck 2', 5)")  # evicts id 2: 'Deck 2' under unicase
    conn.execute("UPDATE fields SET name = 'Front' WHERE ntid = 1 AND ord = 0")
    conn.execute("DELETE FROM cards WHERE id < 10")
    conn.close()
    app.syncd("run", "--once")
    app.verify_equal()
    assert pg.execute("SELECT count(*) FROM decks WHERE id = 2").fetchone()[0] == 0


def test_a_tool_that_rebuilds_tables(tmp_path: Path, devserver: Secondary, pg: psycopg.Connection) -> None:
    """sqlite-utils: insert with blobs, extract (a lookup table and a foreign key), FTS5 with triggers (its virtual
    and shadow tables left out), then, once syncd is installed, `transform` (a table rebuilt: syncd's triggers lost
    and healed) and more inserts."""
    sqlite_utils = pytest.importorskip("sqlite_utils")
    db = sqlite_utils.Database(tmp_path / "app.sqlite3")
    db.conn.execute("PRAGMA journal_mode = WAL")
    db["articles"].insert_all([{"id": i, "title": f"Article {i}", "writer": f"Writer {i % 3}", "body": "text " * 5,
                                "cover": bytes([i % 256]) * 8} for i in range(30)], pk="id")
    db["articles"].extract("writer")
    db["articles"].enable_fts(["title", "body"], create_triggers=True)
    db.conn.close()
    app = onboard(tmp_path, devserver, pg, ["articles", "writer"])
    config = (tmp_path / "syncd.toml").read_text()
    assert '\nname = "articles"' in config and '\nname = "writer"' in config
    assert '\nname = "articles_fts' not in config and '# name = "articles_fts"' in config  # virtual: left out
    db = sqlite_utils.Database(tmp_path / "app.sqlite3")
    db["articles"].transform(not_null={"title"})  # the 12-step rebuild
    db["articles"].insert({"id": 100, "title": "After the rebuild", "writer_id": 1, "body": "new", "cover": b"\x00"})
    db["articles"].update(3, {"title": "Renamed"})
    db.conn.close()
    app.syncd("run", "--once")
    app.verify_equal()


def test_foreign_keys_the_app_does_not_enforce(tmp_path: Path, devserver: Secondary, pg: psycopg.Connection) -> None:
    """Issue 19, point 3: an app without PRAGMA foreign_keys=ON (sqlite-utils never sets it) holds children whose
    parent is gone, and goes on deleting parents they reference. init writes the foreign key such rows break as a
    comment, with the numbers; nothing is dead-lettered and verify is equal."""
    conn = sqlite3.connect(tmp_path / "app.sqlite3", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript("CREATE TABLE nf_owner (id INTEGER PRIMARY KEY, name TEXT);"
                       "CREATE TABLE nf_pet (id INTEGER PRIMARY KEY, owner_id INTEGER REFERENCES nf_owner (id), "
                       "name TEXT);")
    conn.executemany("INSERT INTO nf_owner VALUES (?, 'o')", [(i,) for i in range(5)])
    conn.executemany("INSERT INTO nf_pet VALUES (?, ?, 'p')", [(i, i % 5) for i in range(20)])
    conn.execute("DELETE FROM nf_owner WHERE id = 4")  # its four pets stay: nothing enforces the foreign key
    app = onboard(tmp_path, devserver, pg, ["nf_pet", "nf_owner"])
    sql = (tmp_path / "schema.sql").read_text()
    assert "-- Left out (4 row(s) of the file break it: the app does not enforce it)" in sql
    conn.execute("DELETE FROM nf_owner WHERE id = 3")  # referenced by pets 3, 8, 13 and 18
    conn.close()
    app.syncd("run", "--once")
    app.verify_equal()
    assert pg.execute("SELECT count(*) FROM nf_pet").fetchone()[0] == 20
    dead = sqlite3.connect(tmp_path / "app.sqlite3").execute("SELECT count(*) FROM _syncd_dead_letter").fetchone()
    assert dead == (0,)


def migrate(path: Path, steps: Callable[..., None]) -> None:
    """Run Alembic operations against the app's file, as a migration script would."""
    from alembic.migration import MigrationContext
    from alembic.operations import Operations
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        steps(Operations(MigrationContext.configure(connection)))
    engine.dispose()


def test_an_orm_project_with_migrations(tmp_path: Path, devserver: Secondary, pg: psycopg.Connection) -> None:
    """SQLAlchemy models created by an Alembic migration; after onboarding, a second migration adds a column with
    batch_alter_table (SQLite's table rebuild) and the secondary gets it from its own migration; the ORM writes on."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    path = tmp_path / "app.sqlite3"
    sqlite3.connect(path).execute("PRAGMA journal_mode = WAL").close()

    def first(op) -> None:  # type: ignore[no-untyped-def]
        op.create_table("onb_users", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("email", sa.String(120), nullable=False, unique=True),
                        sa.Column("joined", sa.DateTime, nullable=False))
        op.create_table("onb_posts", sa.Column("id", sa.Integer, primary_key=True),
                        sa.Column("author_id", sa.Integer, sa.ForeignKey("onb_users.id"), nullable=False),
                        sa.Column("body", sa.Text), sa.Column("published", sa.Boolean, nullable=False))

    migrate(path, first)
    metadata = sa.MetaData()
    users = sa.Table("onb_users", metadata, autoload_with=sa.create_engine(f"sqlite:///{path}"))
    posts = sa.Table("onb_posts", metadata, autoload_with=sa.create_engine(f"sqlite:///{path}"))
    engine = sa.create_engine(f"sqlite:///{path}")
    import datetime

    with Session(engine) as session, session.begin():
        session.execute(users.insert(), [{"id": i, "email": f"u{i}@example.test",
                                          "joined": datetime.datetime(2024, 1, i + 1)} for i in range(10)])
        session.execute(posts.insert(), [{"id": i, "author_id": i % 10, "body": f"post {i}",
                                          "published": i % 2 == 0} for i in range(30)])
    engine.dispose()
    app = onboard(tmp_path, devserver, pg, ["onb_posts", "onb_users"])

    def second(op) -> None:  # type: ignore[no-untyped-def]
        with op.batch_alter_table("onb_posts") as batch:
            batch.add_column(sa.Column("likes", sa.Integer, nullable=True))

    migrate(path, second)
    pg.execute("ALTER TABLE public.onb_posts ADD COLUMN likes integer")
    reload_schema(devserver, "onb_posts")
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE onb_posts SET likes = id * 2 WHERE id < 5"))
        connection.execute(sa.text("INSERT INTO onb_posts (id, author_id, body, published, likes) "
                                   "VALUES (100, 1, 'new', 1, 7)"))
        connection.execute(sa.text("DELETE FROM onb_posts WHERE id = 29"))
    engine.dispose()
    app.syncd("run", "--once")
    app.verify_equal()


def test_every_command_syncd_prints_runs_as_printed(tmp_path: Path, devserver: Secondary,
                                                    pg: psycopg.Connection) -> None:
    """Issue 19, point 1: the commands init and install print (in backquotes) are pasted as they are, from the
    directory they were printed in, with a config elsewhere and a table name that needs quoting."""
    import re
    import shlex

    conn = sqlite3.connect(tmp_path / "app.sqlite3")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute('CREATE TABLE "my items" (id INTEGER PRIMARY KEY, v TEXT)')
    conn.executemany('INSERT INTO "my items" VALUES (?, ?)', [(i, "v") for i in range(3)])
    conn.commit()
    conn.close()
    (tmp_path / "conf").mkdir()
    pg.execute('DROP TABLE IF EXISTS public."my items"')
    app = Onboarded(tmp_path, devserver)
    printed = app.syncd("init", "--db", "app.sqlite3", "--out", "conf/syncd.toml", "--sql", "conf/schema.sql").stdout
    with pg.transaction():
        pg.execute((tmp_path / "conf" / "schema.sql").read_text())
    reload_schema(devserver, "my items")
    commands = re.findall(r"`(syncd [^`]+)`", printed.splitlines()[-1])
    assert [shlex.split(c)[1] for c in commands] == ["install", "resync", "run"], printed
    installed = app.syncd(*shlex.split(commands[0])[1:])
    noted = re.findall(r"`(syncd [^`]+)`", installed.stderr)
    assert noted and "--config conf/syncd.toml" in noted[0], installed.stderr
    app.syncd(*shlex.split(noted[0])[1:])  # resync --all, as install printed it
    app.syncd(*shlex.split(commands[2])[1:], "--once")
    assert pg.execute('SELECT count(*) FROM public."my items"').fetchone()[0] == 3
