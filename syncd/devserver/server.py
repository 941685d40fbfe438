"""Wire the dev server together: database, schema cache and its reload, HTTP, faults, signals; or, with
`--upstream`, HTTP and faults in front of another PostgREST."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import psycopg_pool

from syncd import auth
from syncd.devserver import errors, postgres, schema
from syncd.devserver.api import JSON, Api, ApiSettings, error_response
from syncd.devserver.faults import Faults
from syncd.devserver.http import Abort, HttpServer, Request, Response
from syncd.devserver.options import Options, StartError, check, listen_error, resolve_secret
from syncd.devserver.upstream import Upstream

RELOAD_PAYLOADS = {"", "reload schema"}
APPLICATION_NAME = "syncd-devserver"

Backend = Callable[[Request], Awaitable[Response]]


class DevServer:
    """The HTTP front: routes API requests through fault injection to the backend (the Api over PostgreSQL, or the
    Upstream it passes them on to), and `/_dev/*` to faults."""

    def __init__(self, backend: Backend, prefix: str, faults: Faults | None) -> None:
        self.backend = backend
        self.prefix = prefix.rstrip("/")
        self.faults = faults

    async def handle(self, request: Request) -> Response | Abort:
        """Answer one request; a bug of ours becomes a 500 XX000 and a traceback on stderr."""
        try:
            return await self.route(request)
        except Exception:  # a bug of ours: answer like PostgREST's 500, keep serving, leave a trace on stderr
            traceback.print_exc(file=sys.stderr)
            return error_response(errors.ApiError(500, "XX000", "internal error in syncd dev-server"))

    async def route(self, request: Request) -> Response | Abort:
        """`/_dev/*` (with faults) to the dev endpoints, paths below the prefix to the API (through fault injection
        when on), anything else 404 `{}`."""
        if self.faults is not None and request.path.startswith("/_dev/"):
            return self.dev_endpoint(request)
        if not (request.path == self.prefix or request.path.startswith(self.prefix + "/")):
            return error_response(errors.ApiError(404, None, ""))
        api_request = Request(request.method, request.path[len(self.prefix):] or "/", request.query,
                              request.headers, request.body)
        if self.faults is None:
            return await self.backend(api_request)
        return await self.with_faults(api_request)

    async def with_faults(self, request: Request) -> Response | Abort:
        """Answer an API request by the fate drawn for it: reset (closed at once, unanswered), or after `delay_ms`
        down (503 PGRST000), an injected error, the real answer, or for a timeout the request applied and no answer."""
        assert self.faults is not None
        settings, fate = self.faults.settings, self.faults.draw()
        if fate == "reset":
            return Abort()
        if fate == "down":
            response = error_response(errors.database_unreachable(settings.retry_after))
        elif fate == "error":
            response = error_response(errors.ApiError(
                settings.error_status, "PGRST000" if settings.error_status == 503 else None,
                f"fault injected by syncd dev-server: HTTP {settings.error_status}",
                hint="set error_rate to 0 with PUT /_dev/faults"))
        else:
            response = await self.backend(request)
        if settings.delay_ms:
            await asyncio.sleep(settings.delay_ms / 1000)
        if fate == "timeout":
            return Abort()
        self.faults.count(request.method, response.status)
        return response

    def dev_endpoint(self, request: Request) -> Response:
        """The `/_dev/*` endpoints (with --faults): GET and PUT /_dev/faults read or change the fault settings (400
        for an invalid change), GET and DELETE /_dev/stats read or reset the counts."""
        assert self.faults is not None
        if request.path == "/_dev/faults" and request.method == "GET":
            return Response(200, self.faults.settings.model_dump_json().encode(), JSON)
        if request.path == "/_dev/faults" and request.method == "PUT":
            try:
                changes = json.loads(request.body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object")
                settings = self.faults.configure(changes)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                return Response(400, json.dumps({"message": str(exc)}).encode(), JSON)
            return Response(200, settings.model_dump_json().encode(), JSON)
        if request.path == "/_dev/stats" and request.method == "GET":
            return Response(200, json.dumps(self.faults.stats()).encode(), JSON)
        if request.path == "/_dev/stats" and request.method == "DELETE":
            self.faults.reset_stats()
            return Response(204)
        return Response(404, b'{"message": "unknown dev endpoint"}', JSON)


async def keep_schema_fresh(api: Api, conninfo: str, ready: asyncio.Event) -> None:
    """Load the schema cache, then reload it on every `NOTIFY pgrst, 'reload schema'` (and reconnect).

    The cache is read on a connection of its own: the listening one is busy inside `notifies()`.
    """
    delay = 0.5
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as listener:
                await listener.execute("LISTEN pgrst")
                api.cache = await load_schema(conninfo, api.settings.schemas)
                ready.set()
                delay = 0.5
                async for notice in listener.notifies():
                    if notice.payload.strip() in RELOAD_PAYLOADS:
                        api.cache = await load_schema(conninfo, api.settings.schemas)
        except psycopg.OperationalError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 32)
        except (psycopg.Error, KeyError) as exc:  # a reload that failed must not end reloading for good
            print(f"dev-server: schema cache reload failed ({exc!r}); listening again", file=sys.stderr)
            await asyncio.sleep(0.1)


async def load_schema(conninfo: str, schemas: list[str]) -> schema.SchemaCache:
    """A fresh schema cache of `schemas`, read on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        return await schema.load(conn, schemas)


async def serve(options: Options, admin_url: str, secret: str) -> None:
    """Serve the API on options.host:port through a pool acting as `authenticator`, announce it on stdout once
    listening, and run until SIGTERM or SIGINT. Raises StartError when the pool cannot open, the address cannot be
    bound after all (taken since the check) or the schema cache does not load within 30 s."""
    pool = psycopg_pool.AsyncConnectionPool(admin_url, min_size=1, max_size=options.pool_size,
                                            timeout=options.pool_timeout,
                                            kwargs={"application_name": APPLICATION_NAME},
                                            configure=postgres.configure_api_connection, open=False)
    try:
        await pool.open(wait=True)
    except psycopg_pool.PoolTimeout:
        await pool.close()
        raise StartError("the API's database connections did not open within 30 s (see the messages above); check "
                         "that the login role can act as 'authenticator'") from None
    public_url = f"http://{options.host}:{options.port}{options.prefix}"
    settings = ApiSettings(secret, list(options.schemas), options.anon_role, options.require_apikey, public_url,
                           options.max_rows)
    api = Api(pool, settings)
    loaded = asyncio.Event()
    listener = asyncio.create_task(keep_schema_fresh(api, admin_url, loaded))
    try:
        await wait_until_loaded(loaded)
        front = DevServer(api.handle, options.prefix, Faults() if options.faults else None)

        def ready(url: str) -> None:
            settings.public_url = url
            announce(url, admin_url, secret)

        await listen_until_stopped(front, options, ready)
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pool.close()


async def listen_until_stopped(front: DevServer, options: Options, ready: Callable[[str], None]) -> None:
    """Serve `front` on options.host:port, call `ready` with the API URL once listening, and run until SIGTERM or
    SIGINT; open connections are closed then. Raises StartError when the address cannot be bound (taken since the
    check)."""
    http = HttpServer(front.handle)
    try:
        server = await http.start(options.host, options.port)
    except OSError as exc:
        raise listen_error(options.host, options.port, exc) from None
    port = server.sockets[0].getsockname()[1]
    ready(f"http://{options.host}:{port}{options.prefix}")
    await until_stopped()
    server.close()
    connections = list(http.connections)
    for task in connections:
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)  # reaped here, not reported as never retrieved


async def serve_upstream(options: Options) -> None:
    """`--upstream`: serve the fault API (always on) in front of options.upstream until SIGTERM or SIGINT."""
    assert options.upstream is not None
    upstream = Upstream(options.upstream)
    try:
        front = DevServer(upstream.handle, options.prefix, Faults())
        await listen_until_stopped(front, options, lambda url: announce_upstream(url, upstream.url))
    finally:
        await upstream.close()


async def wait_until_loaded(ready: asyncio.Event, timeout: float = 30) -> None:
    """Wait for the first schema cache. Raises StartError after `timeout` seconds."""
    try:
        await asyncio.wait_for(ready.wait(), timeout=timeout)
    except TimeoutError:
        raise StartError(f"the schema cache did not load within {timeout:g} s (see the messages above); check "
                         "--schemas and the migrations") from None


async def until_stopped() -> None:
    """Return on the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def announce_upstream(url: str, upstream: str) -> None:
    """The JSON line of `--upstream`: the URL to use and the upstream's; the database URL, secret and keys are the
    upstream's, unknown here, so null."""
    line = {"url": url, "upstream": upstream, "pg_url": None, "jwt_secret": None, "anon_key": None,
            "service_key": None}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def announce(url: str, pg_url: str, secret: str) -> None:
    """The one line on stdout that tells a caller (tests, demo, a person) how to reach the server."""
    line = {
        "url": url,
        "pg_url": pg_url,
        "jwt_secret": secret,
        "anon_key": auth.mint_token(secret, "anon"),
        "service_key": auth.mint_token(secret, "service_role"),
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def run(options: Options) -> int:
    """Run the dev server until SIGTERM or SIGINT; exit code 0. Checks every option before starting anything, then
    starts PostgreSQL unless `pg_url` is given (a throwaway one is removed again whatever happens), runs the
    migrations and serves. Raises StartError (one line: the flag, the problem, the fix) for anything that keeps it
    from serving. With `upstream`, no PostgreSQL: only the proxy with its faults."""
    check(options)
    if options.upstream is not None:
        asyncio.run(serve_upstream(options))
        return 0
    secret = resolve_secret(options.jwt_secret)
    migrations = options.migrations or default_migrations()
    with postgres.database(options.pg_url, options.data_dir) as db:
        with postgres.connect(db.admin_url, db.throwaway) as conn:
            postgres.apply_migrations(conn, migrations)
            for warning in postgres.check_roles(conn, options.anon_role, options.schemas):
                print(f"dev-server: warning: {warning}", file=sys.stderr)
        asyncio.run(serve(options, db.admin_url, secret))
    return 0


def default_migrations() -> Path:
    """deploy/supabase/migrations of the source tree (or of the current directory). Raises StartError when neither
    has one."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "deploy" / "supabase" / "migrations"
        if candidate.is_dir():
            return candidate
    raise StartError("--migrations: no deploy/supabase/migrations here or in syncd's source tree; pass "
                     "--migrations DIR")
