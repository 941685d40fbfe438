"""No secret leaves syncd, not even in part: every command is run against a secondary reached through a proxy that
echoes the credentials back in its answers (whole, cut short, in pieces, in a PostgREST error and in an HTML page
cut across the 200th character), and every output, log line, metric, /readyz answer, syncd table and archive is
searched for the service key, the apikey, the JWT secret, every token syncd minted, a password in a URL, and any
PARTIAL_RUN characters of them in a row.
"""

from __future__ import annotations

import http.server
import json
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import psycopg
import pytest

from syncd import state
from syncd.redact import PARTIAL_RUN
from tests.e2e import App, poll

PG_PASSWORD = "pg-" + secrets.token_hex(12)


class Echo:
    """What the proxy does: forward (None), or answer every request with the credentials it carried echoed back:
    "row" a PostgREST 400 (a row error: dead-lettered), "page" an HTML 502 with the token across the cut."""

    mode: ClassVar[str | None] = None
    seen: ClassVar[set[str]] = set()


def echo_body(mode: str, token: str, apikey: str) -> tuple[int, str, bytes]:
    if mode == "row":
        body = {"code": "22P02", "message": f"invalid input syntax: Bearer {token}",
                "details": f"apikey={apikey[:-1]} token={token[:-3]}",
                "hint": f"piece {token[10:10 + PARTIAL_RUN + 3]} and {apikey[5:5 + PARTIAL_RUN]}"}
        return 400, "application/json", json.dumps(body).encode()
    page = "E" * (201 - len(token)) + token + f" end apikey: {apikey}" if len(token) < 201 else token
    return 502, "text/html", f"<html><body>Bad gateway: {page}</body></html>".encode()


def proxy_handler(upstream: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            apikey = self.headers.get("apikey") or ""
            Echo.seen.update(filter(None, (token, apikey)))
            if Echo.mode is not None:
                status, kind, content = echo_body(Echo.mode, token, apikey)
                headers = {"Content-Type": kind}
            else:
                headers_in = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, headers=headers_in, content=body,
                                       timeout=30)
                status, content = answer.status_code, answer.content
                headers = {k: v for k, v in answer.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                "content-encoding")}
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PATCH = do_DELETE = do_HEAD = relay

        def log_message(self, *args: object) -> None:
            pass

    return Proxy


@pytest.fixture
def proxy(devserver) -> Iterator[str]:  # type: ignore[no-untyped-def]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), proxy_handler(devserver.root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Echo.mode, Echo.seen = None, set()
    yield f"http://127.0.0.1:{server.server_address[1]}/rest/v1"
    server.shutdown()


def configure(app: App, url: str, target: str) -> None:
    text = app.config.read_text()
    head, _, rest = text.partition("[target]")
    _, _, tail = rest.partition("[worker]")
    app.config.write_text(f'{head}[target]\nurl = "{url}"\n{target}\n\n[worker]{tail}')


def windows(secret: str) -> set[str]:
    return {secret[i:i + PARTIAL_RUN] for i in range(len(secret) - PARTIAL_RUN + 1)}


def leaks(texts: dict[str, str], secret_values: set[str]) -> list[str]:
    """Which texts hold a secret, or PARTIAL_RUN characters of one in a row: `where: secret[:6]...`."""
    found = []
    for where, text in texts.items():
        for secret in secret_values:
            if any(window in text for window in windows(secret)):
                found.append(f"{where}: {secret[:6]}...")
    return found


def syncd(app: App, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(app.config)], capture_output=True,
                          text=True, timeout=120)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def text_of_tables(db: Path) -> str:
    """Every value of every table of a SQLite file, as text (the app's file: syncd's tables and the app's)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(repr(row) for name in names for row in conn.execute(f'SELECT * FROM "{name}"'))
    finally:
        conn.close()


def test_no_command_output_log_metric_or_table_holds_a_secret(app: App, devserver, proxy: str,  # type: ignore[no-untyped-def]
                                                               pg: psycopg.Connection, tmp_path: Path) -> None:
    service_key = devserver.token("service_role", note="x" * 40)  # a real key, long and distinctive
    apikey = "sb_secret_" + secrets.token_urlsafe(30)
    configure(app, proxy, f'service_key = "{service_key}"\napikey = "{apikey}"')
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, ?)", [(i, f"p{i}") for i in range(1, 6)])
    outputs: dict[str, str] = {}

    Echo.mode = "row"  # every write refused with the credentials echoed: the rows are dead-lettered
    outputs["run --once, rows refused"] = syncd(app, "run", "--once", "--metrics-addr", "127.0.0.1:0")
    (dead,) = sqlite3.connect(app.db).execute("SELECT count(*) FROM _syncd_dead_letter").fetchone()
    assert dead == 5, outputs  # the echo really reached the dead letters' messages
    assert "<redacted>" in text_of_tables(app.db)
    Echo.mode = "page"
    for args in (("check",), ("verify",), ("verify", "--json"), ("cutover", "--timeout", "1s")):
        outputs[" ".join(args) + ", page echoed"] = syncd(app, *args)
    Echo.mode = None
    pg_url = f"postgresql://postgres:{PG_PASSWORD}@127.0.0.1:9/postgres"
    for args in (("install",), ("status",), ("status", "--json"), ("check", "--pg-url", pg_url),
                 ("replay", "--dead-letters"), ("resync", "--table", "parent"), ("verify",), ("verify", "--json")):
        outputs[" ".join(args)] = syncd(app, *args)
    outputs["run --once"] = syncd(app, "run", "--once", "--metrics-addr", "127.0.0.1:0")

    # The daemon, minting its own tokens, against the echoing page: its log, /metrics, /readyz and status.
    configure(app, proxy, f'jwt_secret = "{devserver.jwt_secret}"\napikey = "{apikey}"')
    db.executemany("INSERT INTO parent VALUES (?, ?)", [(i, f"p{i}") for i in range(10, 15)])
    Echo.mode = "page"
    daemon = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(app.config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = poll(f"http://{app.metrics}/readyz", lambda r: r.status_code == 503 and "502" in r.text)
        outputs["/readyz"] = ready.text
        outputs["/metrics"] = httpx.get(f"http://{app.metrics}/metrics").text
        outputs["status --json, daemon failing"] = syncd(app, "status", "--json")
        Echo.mode = None
        poll(f"http://{app.metrics}/readyz", lambda r: r.status_code == 200)
    finally:
        daemon.send_signal(signal.SIGTERM)
        log, _ = daemon.communicate(timeout=60)
    outputs["daemon log"] = log
    assert "502" in log and "<redacted>" in log, log  # the echo really reached the log

    archive = tmp_path / "archive.sqlite3"
    outputs["uninstall --archive"] = syncd(app, "uninstall", "--archive", str(archive))
    outputs["archive"] = text_of_tables(archive)
    outputs["app's file"] = text_of_tables(app.db)
    outputs["state file"] = text_of_tables(state.path_for(app.db)) if state.path_for(app.db).exists() else ""

    minted = {token for token in Echo.seen if token not in (service_key, apikey)}
    assert minted, "the daemon minted no token: the test would miss the minted ones"
    found = leaks(outputs, {service_key, apikey, devserver.jwt_secret, PG_PASSWORD, *minted})
    assert found == [], found


@pytest.mark.parametrize("separator", ["-", "@"], ids=["plain", "unencoded-at-sign"])
def test_a_password_in_a_url_is_never_printed_or_sent(app: App, devserver, proxy: str,  # type: ignore[no-untyped-def]
                                                      separator: str) -> None:
    password = "pw" + separator + secrets.token_hex(10)
    user_url = proxy.replace("http://", f"http://admin:{password}@")
    configure(app, user_url, f'jwt_secret = "{devserver.jwt_secret}"')
    outputs = {" ".join(args): syncd(app, *args) for args in (("check",), ("status",), ("verify",),
                                                               ("cutover", "--timeout", "1s"))}
    for args, text in outputs.items():
        assert "target.url" in text and "user and password" in text, (args, text)
    assert leaks(outputs, {password}) == []
    assert Echo.seen == set()  # refused before any request: no Basic credentials went out
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "syncd", "run", "--config", str(app.config)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and password not in run.stdout + run.stderr and time.monotonic() - started < 30
