"""Fixtures: a real `syncd dev-server` process over real PostgreSQL, and clients for it.

One dev server (with --faults) is shared by the session; its PostgreSQL is the throwaway one from the
pgserver wheel unless SYNCD_TEST_PG_URL names a superuser URL to use instead. When SYNCD_TEST_POSTGREST names the
real PostgREST 12.2.12 binary, one real PostgREST is started over the same PostgreSQL (same JWT secret and keys),
and a test that asks for `secondary` runs once against each server (the "postgrest" run is skipped with the reason
when the binary is not set).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from syncd.devserver.launcher import RunningDevServer, launch
from tests.postgrest import SKIP_REASON, RunningPostgrest, Secondary, binary, start_postgrest

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = ROOT / "deploy" / "supabase" / "migrations"
TEST_SQL = Path(__file__).resolve().parent / "sql"
CONFORMANCE_TABLES = "public.items, public.children, public.parents, public.pairs, public.people, " \
                     "public.raiser, public.bench, syncd_test.items, public.\"odd names\""


DevServer = RunningDevServer


def start_devserver(*args: str, migrations: Path = MIGRATIONS, timeout: float = 120) -> DevServer:
    """A dev server on a free port; on SYNCD_TEST_PG_URL's database when that is set."""
    args = ("--port", "0", "--migrations", str(migrations), *args)
    if os.environ.get("SYNCD_TEST_PG_URL") and "--pg-url" not in args:
        args += ("--pg-url", os.environ["SYNCD_TEST_PG_URL"])
    return launch(args, timeout)


@pytest.fixture(scope="session")
def migrations_with_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("migrations")
    for source in [*MIGRATIONS.glob("*.sql"), *TEST_SQL.glob("*.sql")]:
        shutil.copy(source, directory / source.name)
    return directory


@pytest.fixture(scope="session")
def devserver(migrations_with_tests: Path) -> Iterator[DevServer]:
    server = start_devserver("--faults", "--schemas", "public,syncd_test", migrations=migrations_with_tests)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgrest(devserver: DevServer) -> Iterator[RunningPostgrest]:
    """The real PostgREST over the session dev server's PostgreSQL; skips the test when the binary is not set. It
    loads its schema cache at start, after the dev server applied the migrations (tests/sql included)."""
    if binary() is None:
        pytest.skip(SKIP_REASON)
    server = start_postgrest(devserver)
    yield server
    server.stop()


SECONDARIES = [pytest.param("dev-server"),
               pytest.param("postgrest", marks=pytest.mark.skipif(binary() is None, reason=SKIP_REASON))]


@pytest.fixture(params=SECONDARIES)
def secondary(request: pytest.FixtureRequest, devserver: DevServer) -> Secondary:
    """The dev server, then the real PostgREST: the test runs against each. The `app` fixture ships to it when the
    test asks for it."""
    if request.param == "postgrest":
        return request.getfixturevalue("postgrest")
    return devserver


def reload_schema(server: Secondary, table: str, timeout: float = 10) -> None:
    """NOTIFY the schema cache reload and wait until `server` serves `table` ("name" in public or "schema.name") as
    it is now, for a table created or re-created after the server started. Both servers answer 404 to a write into
    such a table until then; the real PostgREST answers GET of it with 200 meanwhile (measured on 12.2.12), so a read
    is no readiness signal, and neither is the table's name in the OpenAPI (`GET /`): a reload NOTIFYed by an earlier
    test's DROP may still be running and finish after the name was seen, serving a cache without the table (a write
    then answers 404 `{}`). So a fresh comment on the table marks this reload; the cache serves the table once its
    OpenAPI definition carries that comment. Raises AssertionError when it does not within `timeout` seconds."""
    schema, _, name = table.rpartition(".")
    marker = f"schema cache marker {uuid.uuid4()}"
    with psycopg.connect(server.pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            sql.Identifier(schema or "public", name), sql.Literal(marker)))
        conn.execute("NOTIFY pgrst, 'reload schema'")
    profile = {"Accept-Profile": schema} if schema else {}
    deadline = time.monotonic() + timeout
    with server.client(server.service_key, **profile) as client:
        while time.monotonic() < deadline:
            answer = client.get("/")
            if answer.status_code == 200:
                definition = answer.json().get("definitions", {}).get(name, {})
                if definition.get("description") == marker:
                    return
            time.sleep(0.1)
    raise AssertionError(f"{table} as created is not in the schema cache of {server.url} after {timeout} s")


def create_tables(server: Secondary, tables: dict[str, str]) -> None:
    """Drop and create tables of the secondary ({name: "CREATE TABLE name ..."}, in order), grant them to
    service_role, and wait until `server` serves each (reload_schema)."""
    with psycopg.connect(server.pg_url, autocommit=True) as conn:
        for name in reversed(tables):
            conn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
        for name, ddl in tables.items():
            conn.execute(ddl)
            conn.execute(f"GRANT ALL ON {name} TO service_role")
    for name in tables:
        reload_schema(server, name)


@pytest.fixture
def pg(devserver: DevServer) -> Iterator[psycopg.Connection]:
    with psycopg.connect(devserver.pg_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def service(devserver: DevServer) -> Iterator[httpx.Client]:
    with devserver.client(devserver.service_key) as client:
        yield client


@pytest.fixture
def clean(pg: psycopg.Connection) -> None:
    """Empty the conformance tables before a test."""
    pg.execute(f"TRUNCATE {CONFORMANCE_TABLES} CASCADE")


@pytest.fixture
def faults(devserver: DevServer) -> Iterator[Callable[..., dict[str, object]]]:
    """Set fault injection for one test; everything is back to normal afterwards."""
    def configure(**settings: object) -> dict[str, object]:
        response = httpx.put(f"{devserver.root}/_dev/faults", json=settings)
        assert response.status_code == 200, response.text
        return response.json()

    httpx.delete(f"{devserver.root}/_dev/stats")
    yield configure
    httpx.put(f"{devserver.root}/_dev/faults", json={"error_rate": 0, "reset_rate": 0, "timeout_rate": 0,
                                                      "delay_ms": 0, "down": False, "error_status": 503})
    httpx.delete(f"{devserver.root}/_dev/stats")


from tests.e2e import app  # noqa: E402, F401 - the `app` fixture of the end-to-end tests
