"""Supabase's API keys that are not JWTs (issue 19, point 11): `sb_secret_...` and `sb_publishable_...` go in the
`apikey` header, and Supabase's gateway gives PostgREST the role's token; an `Authorization` header it passes through
unchanged (https://supabase.com/docs/guides/api/api-keys), so a key sent as `Authorization: Bearer sb_secret_...`
reaches PostgREST as a malformed JWT. Against a gateway that does exactly that, in front of the dev server and of the
real PostgREST: syncd ships with a secret key, `check` and `status` tell a publishable key for what it is, and no
output holds either key."""

from __future__ import annotations

import http.server
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd import auth
from tests.conftest import Secondary, create_tables
from tests.test_source_lifecycle import make_lab, write_lab_config

SECRET = "sb_secret_" + secrets.token_urlsafe(24)
PUBLISHABLE = "sb_publishable_" + secrets.token_urlsafe(24)
ITEMS = {"ak_items": "CREATE TABLE ak_items (id bigint PRIMARY KEY, v text)"}


@dataclass
class Gateway:
    """A loopback gateway in front of `upstream`: demands an apikey, turns SECRET and PUBLISHABLE into a
    service_role or anon token unless the request brings an Authorization header (passed through unchanged)."""

    url: str
    seen_authorization: list[str]


@pytest.fixture
def gateway(secondary: Secondary) -> Iterator[Gateway]:
    roles = {SECRET: "service_role", PUBLISHABLE: "anon"}
    upstream = secondary.url.rstrip("/")
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            role = roles.get(self.headers.get("apikey", ""))
            if role is None:
                self.answer(401, b'{"message":"Invalid API key"}', {"Content-Type": "application/json"})
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "apikey", "content-length")}
            if "authorization" in {k.lower() for k in headers}:
                seen.append(self.headers["Authorization"])
            else:
                headers["Authorization"] = f"Bearer {auth.mint_token(secondary.jwt_secret, role, expires_in=600)}"
            answer = httpx.request(self.command, upstream + self.path, headers=headers, content=body, timeout=30)
            self.answer(answer.status_code, answer.content,
                        {k: v for k, v in answer.headers.items()
                         if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")})

        def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = do_HEAD = relay

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Gateway(f"http://127.0.0.1:{server.server_address[1]}", seen)
    server.shutdown()
    server.server_close()


def lab(tmp_path: Path, secondary: Secondary, gateway: Gateway, key: str):  # type: ignore[no-untyped-def]
    create_tables(secondary, ITEMS)
    app = make_lab(tmp_path, secondary, "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT);",
                   '[[table]]\nname = "items"\ntarget = "ak_items"\n', install=False)
    write_lab_config(app, secondary, '[[table]]\nname = "items"\ntarget = "ak_items"\n',
                     secret=f'service_key = "{key}"', url=gateway.url)
    assert app.syncd("install").returncode == 0
    return app


def test_a_secret_key_goes_in_the_apikey_header_alone_and_ships(tmp_path: Path, secondary: Secondary,
                                                                 gateway: Gateway, pg: psycopg.Connection) -> None:
    app = lab(tmp_path, secondary, gateway, SECRET)
    with closing(app.connect()) as conn:
        conn.executemany("INSERT INTO items VALUES (?, 'v')", [(i,) for i in range(5)])
    shipped = app.syncd("run", "--once")
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert pg.execute("SELECT count(*) FROM ak_items").fetchone()[0] == 5
    assert gateway.seen_authorization == []  # never sent as a bearer token
    checked = app.syncd("check")
    assert checked.returncode == 0, checked.stdout
    assert "OK    auth: a Supabase secret key (sb_secret_...)" in checked.stdout
    status = app.syncd("status", "--json")
    assert json.loads(status.stdout)["key"] == {"kind": "secret", "role": "service_role"}
    for output in (shipped.stdout + shipped.stderr, checked.stdout, status.stdout, app.syncd("status").stdout):
        assert SECRET not in output and SECRET[10:22] not in output


@pytest.mark.parametrize("secondary", ["dev-server"], indirect=True)  # what it tells is syncd's, not the server's
def test_a_publishable_key_is_told_for_what_it_is(tmp_path: Path, secondary: Secondary, gateway: Gateway) -> None:
    app = lab(tmp_path, secondary, gateway, PUBLISHABLE)
    checked = app.syncd("check")
    assert checked.returncode == 1
    assert "ERROR auth: a Supabase publishable key (sb_publishable_...): it acts as the anon role" in checked.stdout
    status = app.syncd("status", "--json")
    shown = json.loads(status.stdout)
    assert status.returncode == 1 and shown["key"] == {"kind": "publishable", "role": "anon"}
    assert any("publishable key" in problem for problem in shown["problems"])
    human = app.syncd("status").stdout
    assert "key:      a Supabase publishable key (sb_publishable_...), role anon" in human
    for output in (checked.stdout, status.stdout, human):
        assert PUBLISHABLE not in output and PUBLISHABLE[15:27] not in output
