"""Wire the dev server together: database, schema cache and its reload, HTTP, faults, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg_pool

from syncd import auth
from syncd.devserver import errors, postgres, schema
from syncd.devserver.api import JSON, Api, ApiSettings, error_response
from syncd.devserver.faults import Faults
from syncd.devserver.http import Abort, HttpServer, Request, Response

RELOAD_PAYLOADS = {"", "reload schema"}
APPLICATION_NAME = "syncd-devserver"


@dataclass
class Options:
    """How `syncd dev-server` runs (its command-line options)."""

    host: str = "127.0.0.1"
    port: int = 54321
    prefix: str = "/rest/v1"
    pg_url: str | None = None
    data_dir: Path | None = None
    migrations: Path | None = None
    jwt_secret: str | None = None
    require_apikey: bool = False
    faults: bool = False
    schemas: tuple[str, ...] = ("public",)
    anon_role: str = "anon"
    pool_size: int = 10
    pool_timeout: float = 10.0  # waiting longer for a connection answers 504 PGRST003


class DevServer:
    """The HTTP front: routes API requests through fault injection to the Api, and `/_dev/*` to faults."""

    def __init__(self, api: Api, prefix: str, faults: Faults | None) -> None:
        self.api = api
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
            return await self.api.handle(api_request)
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
            response = await self.api.handle(request)
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
    listening, and run until SIGTERM or SIGINT."""
    pool = psycopg_pool.AsyncConnectionPool(admin_url, min_size=1, max_size=options.pool_size,
                                            timeout=options.pool_timeout,
                                            kwargs={"application_name": APPLICATION_NAME},
                                            configure=postgres.configure_api_connection, open=False)
    await pool.open(wait=True)
    public_url = f"http://{options.host}:{options.port}{options.prefix}"
    settings = ApiSettings(secret, list(options.schemas), options.anon_role, options.require_apikey, public_url)
    api = Api(pool, settings)
    ready = asyncio.Event()
    listener = asyncio.create_task(keep_schema_fresh(api, admin_url, ready))
    await asyncio.wait_for(ready.wait(), timeout=30)
    front = DevServer(api, options.prefix, Faults() if options.faults else None)
    http = HttpServer(front.handle)
    server = await http.start(options.host, options.port)
    port = server.sockets[0].getsockname()[1]
    public_url = f"http://{options.host}:{port}{options.prefix}"
    settings.public_url = public_url
    announce(public_url, admin_url, secret)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    connections = list(http.connections)
    for task in connections:
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)  # reaped here, not reported as never retrieved
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await pool.close()


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
    """Run the dev server until SIGTERM or SIGINT; exit code 0. The JWT secret is the option's, SUPABASE_JWT_SECRET
    or a random one; PostgreSQL is started here unless `pg_url` is given; the migrations run first. Raises SystemExit
    with the message for a secret under 32 characters or no migrations directory."""
    secret = options.jwt_secret or os.environ.get("SUPABASE_JWT_SECRET") or auth.generate_secret()
    if len(secret) < auth.MIN_SECRET_LENGTH:
        raise SystemExit(f"error: the JWT secret must have at least {auth.MIN_SECRET_LENGTH} characters "
                         "(PostgREST refuses shorter ones); leave it unset to get a random one")
    migrations = options.migrations or default_migrations()
    with postgres.database(options.pg_url, options.data_dir) as db:
        postgres.apply_migrations(db.admin_url, migrations)
        asyncio.run(serve(options, db.admin_url, secret))
    return 0


def default_migrations() -> Path:
    """deploy/supabase/migrations of the source tree (or of the current directory)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base / "deploy" / "supabase" / "migrations"
        if candidate.is_dir():
            return candidate
    raise SystemExit("error: no migrations directory found; pass --migrations DIR")
