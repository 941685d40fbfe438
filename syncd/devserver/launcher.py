"""Start `syncd dev-server` as a child process and wait for its JSON line (tests, benchmarks, demo)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any

import httpx

from syncd import auth


@dataclass
class RunningDevServer:
    """A dev server started by `launch`: its API URL, PostgreSQL URL, JWT secret and keys, and its process."""

    url: str
    pg_url: str
    jwt_secret: str
    anon_key: str
    service_key: str
    process: subprocess.Popen[str]
    stderr: IO[str]

    @property
    def root(self) -> str:
        """scheme://host:port, where /_dev/* lives."""
        return self.url.rsplit("/rest/v1", 1)[0]

    def token(self, role: str, **claims: Any) -> str:
        """A token for `role` (and any further claims) signed with the server's secret, valid for ten years."""
        return auth.mint_token(self.jwt_secret, role, **claims)

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        """An httpx client for the API URL (`api_client`)."""
        return api_client(self.url, key, **headers)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the server and wait up to `timeout` seconds; its exit code. Raises subprocess.TimeoutExpired when
        it does not exit in time."""
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self.stderr.close()
        return code


def api_client(url: str, key: str | None = None, **headers: str) -> httpx.Client:
    """An httpx client for the API at `url` that sends `key` as the bearer token when given, and `headers`; 30 s
    timeout."""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def launch(args: Sequence[str], timeout: float = 120, *, stderr: IO[str] | None = None,
           **popen: Any) -> RunningDevServer:
    """Run `python -m syncd dev-server ARGS` and return once it printed its JSON line. Its stderr goes to
    `stderr` (else a temporary file); `popen` are further subprocess.Popen options (a session of its own...)."""
    command = [sys.executable, "-m", "syncd", "dev-server", *args]
    log = stderr or tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server process
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, **popen)
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            line = process.stdout.readline() if ready else ""
            if line:
                info = json.loads(line)
                return RunningDevServer(info["url"], info["pg_url"], info["jwt_secret"], info["anon_key"],
                                        info["service_key"], process, log)
            if process.poll() is not None:
                break
    except BaseException:
        process.kill()
        raise
    process.kill()
    if stderr is not None:
        raise RuntimeError(f"syncd dev-server did not start; see {stderr.name}")
    log.seek(0)
    raise RuntimeError(f"syncd dev-server did not start: {log.read()[-4000:]}")
