"""The real PostgREST 12.2.12 in front of the dev server's PostgreSQL, for the tests that must agree with it.

`SYNCD_TEST_POSTGREST` names the binary (`.ci/run` sets it from ../shared/postgrest/install.sh); without it the
tests that need the real server are skipped with the reason. It logs in as `authenticator` (created by
deploy/supabase/migrations/000_roles_and_auth.sql) over the same PostgreSQL as the dev server and is signed with
the same JWT secret, so the dev server's keys and tokens work on both.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

import httpx

from syncd.devserver.launcher import RunningDevServer, api_client

BINARY_VARIABLE = "SYNCD_TEST_POSTGREST"
SKIP_REASON = (f"{BINARY_VARIABLE} is not set: the real PostgREST 12.2.12 is not available here "
               "(BIN=$(../shared/postgrest/install.sh); export SYNCD_TEST_POSTGREST=$BIN)")
START_TIMEOUT = 60  # seconds until it answers GET /


def binary() -> str | None:
    """The PostgREST binary the tests may start, or None."""
    return os.environ.get(BINARY_VARIABLE) or None


@dataclass
class RunningPostgrest:
    """A real PostgREST process: its API URL (its root: PostgREST has no path prefix; Supabase's gateway adds
    /rest/v1) and the dev server whose database and keys it shares. Has the dev server's fields (pg_url, keys,
    token(), client()) so a test can take either."""

    url: str
    root: str
    devserver: RunningDevServer
    process: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def pg_url(self) -> str:
        return self.devserver.pg_url

    @property
    def jwt_secret(self) -> str:
        return self.devserver.jwt_secret

    @property
    def service_key(self) -> str:
        return self.devserver.service_key

    @property
    def anon_key(self) -> str:
        return self.devserver.anon_key

    def token(self, role: str, **claims: object) -> str:
        return self.devserver.token(role, **claims)

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        return api_client(self.url, key, **headers)

    def logged(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FREE_PORT_SPAN = 12000  # ports below the ephemeral range to draw from


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts later. Drawn below the kernel's ephemeral range
    (ip_local_port_range, 32768-60999 by default): a port from bind(0) lies in that range, where any outgoing
    connection of the suite (clients of the dev server, of PostgreSQL) may take it before the server binds it, and
    the server then fails with "Address already in use" (seen in a CI rehearsal)."""
    try:
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    draw = random.SystemRandom()  # not the random module's state, which tests seed
    for _ in range(100):
        port = draw.randrange(max(1024, low - FREE_PORT_SPAN), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def authenticator_uri(pg_url: str) -> str:
    """`pg_url` (the dev server's admin URL, a unix socket or TCP) with the user changed to `authenticator`. The
    throwaway PostgreSQL trusts local connections; SYNCD_TEST_PG_URL's server must let authenticator in too."""
    parts = urlsplit(pg_url)
    host = parse_qs(parts.query).get("host", [""])[0]
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = f"?host={host}" if host else ""
    return f"postgres://authenticator@{netloc}{parts.path or '/postgres'}{query}"


def wait_until_ready(root: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"postgrest exited with {process.returncode}")
        try:
            if httpx.get(root + "/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"postgrest did not answer GET / in {timeout} s")


Secondary = RunningDevServer | RunningPostgrest
"""Either secondary a test can ship to: both have url, pg_url, jwt_secret, service_key, anon_key, token(), client()."""


def start_postgrest(devserver: RunningDevServer, *, schemas: str = "public,syncd_test",
                    **settings: str) -> RunningPostgrest:
    """Start the binary named by SYNCD_TEST_POSTGREST over `devserver`'s PostgreSQL, with its JWT secret, on a free
    loopback port; `settings` are further PGRST_* variables (`db_max_rows="1000"` sets PGRST_DB_MAX_ROWS). Returns
    once it answers GET / with 200. Raises RuntimeError when it exits or does not answer in time."""
    path = binary()
    if not path:
        raise RuntimeError(SKIP_REASON)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PGRST_DB_URI": authenticator_uri(devserver.pg_url),
        "PGRST_DB_SCHEMAS": schemas,
        "PGRST_DB_ANON_ROLE": "anon",
        "PGRST_JWT_SECRET": devserver.jwt_secret,
        "PGRST_SERVER_HOST": "127.0.0.1",
        "PGRST_SERVER_PORT": str(port),
        "PGRST_DB_CHANNEL_ENABLED": "true",
        "PGRST_LOG_LEVEL": "error",
        **{f"PGRST_{name.upper()}": value for name, value in settings.items()},
    }
    log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen([path], env=env, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(root, START_TIMEOUT, process)
    except BaseException as exc:
        process.kill()
        process.wait()
        log.seek(0)
        raise RuntimeError(f"{exc}: {log.read().decode(errors='replace')[-2000:]}") from None
    # PostgREST serves the API at its root (Supabase puts its gateway's /rest/v1 in front of it).
    return RunningPostgrest(root, root, devserver, process, log)
