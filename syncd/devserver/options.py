"""`syncd dev-server`'s options, and every check of them that can be made before PostgreSQL starts.

A mistake in a flag is a `StartError`: one line naming the flag, what is wrong and what to do instead, which
the command line prints as `error: ...` with exit code 2 (never a traceback). Checks that need the database
(connecting to --pg-url, running the migrations) live with the code that does those things and raise the same.
"""

from __future__ import annotations

import errno
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from syncd import auth
from syncd.redact import PASSWORD_SETTING, USERINFO_PASSWORD, connection_passwords

PORTS = range(0, 65536)
PREFIX_EXAMPLE = "/rest/v1"
# RFC 3986 path characters besides letters and digits; the request path is percent-decoded before it is matched,
# so `%` (and anything that would need it) cannot be part of a prefix.
PREFIX_CHARS = set("-._~!$&'()*+,;=:@")


class StartError(Exception):
    """The dev server cannot start as asked. `str()` is one line: the flag, the problem, the fix."""


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
    max_rows: int | None = None  # PostgREST's db-max-rows
    upstream: str | None = None  # proxy to this PostgREST API URL instead of serving one over PostgreSQL


# -- flag values as typed -> option values --------------------------------------------------------------------------


def parse_prefix(text: str) -> str:
    """`--prefix` as typed -> the path the API lives under: `rest/v1`, `/rest/v1/` -> `/rest/v1`; `` or `/` -> ``
    (the API at the root). Raises StartError for a URL instead of a path, an empty, `.` or `..` segment, or a
    character a URL path cannot hold as it is (space, `?`, `#`, `%`, quotes, ...)."""
    if "://" in text:
        raise StartError(f"--prefix {text}: give only the path, e.g. {PREFIX_EXAMPLE}")
    inner = text.strip("/")
    if not inner:
        return ""
    for segment in inner.split("/"):
        if segment in ("", ".", ".."):
            raise StartError(f"--prefix {text}: empty, '.' and '..' parts are not allowed; use a path such as "
                             f"{PREFIX_EXAMPLE}, or / for none")
        odd = sorted({c for c in segment if not (c.isalnum() or c in PREFIX_CHARS)})
        if odd:
            shown = " ".join(repr(c) for c in odd)
            raise StartError(f"--prefix {text!r}: {shown} cannot be part of a URL path as it is; use letters, digits "
                             f"and - . _ ~ between slashes, such as {PREFIX_EXAMPLE}")
    return "/" + inner


def parse_schemas(text: str) -> tuple[str, ...]:
    """`--schemas public,extra` -> ("public", "extra") (spaces around names and repeats dropped). Raises StartError
    when no name is left."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise StartError(f"--schemas {text!r}: name at least one schema to expose, e.g. public (comma separated)")
    return names


# -- checks before anything starts ----------------------------------------------------------------------------------


def check(options: Options) -> None:
    """Every check that needs no database, cheapest first; a port or host that cannot be bound is found here, before
    a throwaway PostgreSQL is started. Raises StartError."""
    check_port(options.port)
    if options.upstream is not None:
        check_upstream(options)
        check_listen(options.host, options.port)
        return
    check_pool(options.pool_size, options.pool_timeout)
    if options.max_rows is not None and options.max_rows < 1:
        raise StartError(f"--max-rows {options.max_rows}: use 1 or more rows (PostgREST's db-max-rows; leave it out "
                         "for no cap)")
    if not options.anon_role.strip():
        raise StartError("--anon-role: empty; name the role of requests without a token (default anon)")
    if options.pg_url is not None and not options.pg_url.strip():
        raise StartError("--pg-url: empty; give a URL such as postgresql://user:password@host:5432/dbname, or leave "
                         "it out to start a throwaway PostgreSQL")
    if options.pg_url and options.data_dir is not None:
        raise StartError("--data-dir: only for the throwaway PostgreSQL, not with --pg-url; pass one of them")
    if options.data_dir is not None:
        check_data_dir(options.data_dir)
    if options.migrations is not None:
        check_migrations(options.migrations)
    check_listen(options.host, options.port)


# Flags that only mean something when the dev server runs its own API over PostgreSQL: (flag, its option, default).
DATABASE_FLAGS = (
    ("--pg-url", "pg_url", None), ("--data-dir", "data_dir", None), ("--migrations", "migrations", None),
    ("--jwt-secret", "jwt_secret", None), ("--require-apikey", "require_apikey", False),
    ("--schemas", "schemas", ("public",)), ("--anon-role", "anon_role", "anon"), ("--pool-size", "pool_size", 10),
    ("--pool-timeout", "pool_timeout", 10.0), ("--max-rows", "max_rows", None),
)


def check_upstream(options: Options) -> None:
    """`--upstream URL`: an http(s) URL of a PostgREST API (its root, or Supabase's https://x.supabase.co/rest/v1),
    without credentials, query or fragment, and none of the flags of the dev server's own API (the upstream decides
    all of that). Raises StartError naming the flag."""
    url = options.upstream or ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise StartError(f"--upstream {mask_url(url)}: not a URL ({exc}); give e.g. "
                         "https://PROJECT.supabase.co/rest/v1 or http://127.0.0.1:3000") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StartError(f"--upstream {mask_url(url)}: give an http:// or https:// URL with a host, e.g. "
                         "https://PROJECT.supabase.co/rest/v1 or http://127.0.0.1:3000")
    if parts.username is not None or parts.password is not None:
        raise StartError(f"--upstream {mask_url(url)}: no credentials in the URL; clients send their own "
                         "Authorization and apikey headers, which the dev server passes on")
    if parts.query or parts.fragment:
        raise StartError(f"--upstream {url}: no ?query or #fragment; give the API's base URL")
    for flag, name, default in DATABASE_FLAGS:
        if getattr(options, name) != default:
            raise StartError(f"{flag}: not with --upstream (the upstream PostgREST has its own database, keys and "
                             f"settings); leave out {flag}, or --upstream to serve an API over PostgreSQL")


def check_port(port: int) -> None:
    """Raises StartError for a port outside 0-65535."""
    if port not in PORTS:
        raise StartError(f"--port {port}: use a port from 0 to 65535 (0: any free port)")


def check_pool(size: int, timeout: float) -> None:
    """Raises StartError for a pool size under 1, or a pool timeout that is not a finite number of seconds above 0."""
    if size < 1:
        raise StartError(f"--pool-size {size}: use 1 or more database connections (default 10)")
    if not (math.isfinite(timeout) and timeout > 0):
        raise StartError(f"--pool-timeout {timeout:g}: use a number of seconds above 0, such as 10 (the default)")


def check_data_dir(path: Path) -> None:
    """Raises StartError unless `path` is missing (it is created), empty, or a PostgreSQL data directory (one a
    previous dev server kept)."""
    if path.exists() and not path.is_dir():
        raise StartError(f"--data-dir {path}: is a file; give a directory (it is created when missing)")
    above = next((parent for parent in path.absolute().parents if parent.exists()), None)
    if not path.exists() and above is not None and not above.is_dir():
        raise StartError(f"--data-dir {path}: {above} is a file; give a directory (it is created when missing)")
    if path.is_dir() and not (path / "PG_VERSION").exists() and any(path.iterdir()):
        raise StartError(f"--data-dir {path}: neither empty nor a PostgreSQL data directory; give a new or empty "
                         "directory, or one a previous dev-server kept")


def check_migrations(path: Path) -> None:
    """Raises StartError unless `path` is a directory."""
    if not path.exists():
        raise StartError(f"--migrations {path}: no such directory; give the directory of the *.sql migrations "
                         "(default deploy/supabase/migrations)")
    if not path.is_dir():
        raise StartError(f"--migrations {path}: not a directory; give the directory of the *.sql migrations, "
                         "which run in name order")


def check_listen(host: str, port: int) -> None:
    """Bind every address `host` resolves to on `port` (as asyncio.start_server will) and let go again. Raises
    StartError for an empty host, one that does not resolve, or an address that cannot be bound (in use, not of
    this machine, a privileged port)."""
    if not host.strip():
        raise StartError("--host: empty; give the address to listen on, e.g. 127.0.0.1 (or 0.0.0.0 for every one)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise StartError(f"--host {host}: cannot resolve it ({reason}); use an address of this machine, "
                         "e.g. 127.0.0.1 or 0.0.0.0") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                # An AF_INET or AF_INET6 address: (host, port, ...), the host a string.
                raise listen_error(host, port, exc, cast(str, address[0])) from None


def listen_error(host: str, port: int, exc: OSError, address: str | None = None) -> StartError:
    """The StartError for a failed bind of `address` (default `host`):`port`, naming the flag to change."""
    shown = address or host
    where = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return StartError(f"--port {port}: cannot listen on {where}: address already in use; choose another port "
                          "or 0 (any free port)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartError(f"--host {host}: cannot listen on {where}: not an address of this machine; use "
                          "127.0.0.1, 0.0.0.0 or one of its addresses")
    if exc.errno == errno.EACCES:
        return StartError(f"--port {port}: cannot listen on {where}: permission denied (ports below 1024 need "
                          "privileges); choose a port above 1023 or 0")
    reason = exc.strerror or str(exc)
    return StartError(f"--host {host} --port {port}: cannot listen on {where}: {reason}")


def resolve_secret(flag: str | None) -> str:
    """The JWT secret: `flag` (--jwt-secret), else $SUPABASE_JWT_SECRET, else a random one. Raises StartError for
    one under auth.MIN_SECRET_LENGTH characters, naming where it came from."""
    source, secret = ("--jwt-secret", flag) if flag is not None else \
        ("SUPABASE_JWT_SECRET", os.environ.get("SUPABASE_JWT_SECRET"))
    if not secret:
        if flag is not None:
            raise StartError("--jwt-secret: empty; leave it out to get a random secret (or try: syncd jwt gen)")
        return auth.generate_secret()
    if len(secret) < auth.MIN_SECRET_LENGTH:
        raise StartError(f"{source}: use at least {auth.MIN_SECRET_LENGTH} characters (PostgREST refuses shorter "
                         "secrets); leave it unset to get a random one (or try: syncd jwt gen)")
    return secret


# -- URLs in messages -----------------------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """A PostgreSQL URL or key=value string fit to print: `user:password@` -> `user:***@`, `password=x` ->
    `password=***`."""
    masked = USERINFO_PASSWORD.sub(lambda m: f"{m['head']}:***@", url)
    return PASSWORD_SETTING.sub(lambda m: f"{m['head']}***", masked)


def scrub(text: str, url: str) -> str:
    """`text` (an error message about `url`) with every password that `url` holds replaced by `***`."""
    for secret in sorted(connection_passwords(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
