"""Reads as the server answered them (issue 11, kind 6): Supabase and PostgREST's db-max-rows cap every read without
an error; verify pages by what the secondary answers (the count in Content-Range, an empty page), and `syncd check`
reports the cap. Against a capping proxy in front of the dev server (always) and the real PostgREST 12.2.12 started
with db-max-rows (when SYNCD_TEST_POSTGREST names it).
"""

from __future__ import annotations

import http.server
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd.target import content_range
from syncd.verify import last_page
from tests.conftest import DevServer, reload_schema
from tests.e2e import App, free_port, write_config
from tests.postgrest import SKIP_REASON, binary, start_postgrest

CAP = 50  # rows per read, as db-max-rows; verify asks for 5000
ROWS = 3 * CAP + 7
TABLE_CONFIG = '\n[[table]]\nname = "items"\ntarget = "paging_items"\n'
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "date", "server", "content-range"}


@pytest.mark.parametrize(("header", "parsed"), [
    ("0-999/2500", (0, 999, 2500)), ("0-999/*", (0, 999, None)), ("*/0", (None, None, 0)), ("*/*", (None, None, None)),
    ("", (None, None, None)), ("10-19/20", (10, 19, 20)), ("garbage", (None, None, None)),
])
def test_content_range_is_parsed(header: str, parsed: tuple[int | None, int | None, int | None]):
    """PostgREST's Content-Range forms: a range with or without a count, no rows, no header."""
    assert content_range(header) == parsed


@pytest.mark.parametrize(("answered", "asked", "done", "total", "last"), [
    (0, 5000, 0, None, True),          # an empty page ends the table
    (1000, 5000, 1000, 2500, False),   # capped: the count says more rows match
    (500, 5000, 2500, 2500, True),     # short, and the count is reached
    (1000, 5000, 1000, None, False),   # short without a count: ask once more (an empty page ends it)
    (5000, 5000, 5000, 5000, False),   # a full page: there may be more (the next one is empty)
])
def test_last_page_trusts_the_count_not_the_page_size(answered: int, asked: int, done: int, total: int | None,
                                                      last: bool):
    """A page shorter than asked ends the table only when the count says every row was read, or when it is empty."""
    assert last_page(answered, asked, done, total) is last


# -- a capping proxy over the dev server (always runs) --------------------------------------------------------


class Capped(http.server.BaseHTTPRequestHandler):
    """Relays every request to `upstream`, answering a read of more than `cap` rows with the first `cap` and
    `206`, Content-Range 0-<cap-1>/<total>, as PostgREST 12.2.12 does with db-max-rows (measured)."""

    protocol_version = "HTTP/1.1"
    upstream = ""
    cap = CAP

    def log_message(self, *args: object) -> None:
        pass

    def relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        answer = httpx.request(self.command, self.upstream + self.path, headers=headers,
                               content=self.rfile.read(length) if length else None, timeout=30)
        status, body, extra = answer.status_code, answer.content, {}
        if "content-range" in answer.headers:
            extra["Content-Range"] = answer.headers["content-range"]
        if self.command == "GET" and status in (200, 206) and body[:1] == b"[" and len(rows := json.loads(body)) > \
                self.cap:
            body = json.dumps(rows[:self.cap]).encode()
            total = content_range(answer.headers.get("content-range", ""))[2]
            extra["Content-Range"] = f"0-{self.cap - 1}/{'*' if total is None else total}"
            status = 200 if total is None else 206
        self.send_response(status)
        for name, value in [*((k, v) for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS),
                            *extra.items()]:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_PATCH = do_HEAD = relay


@dataclass
class CappedServer:
    """The dev server behind the capping proxy: what write_config needs (url, jwt_secret)."""

    url: str
    jwt_secret: str


@pytest.fixture
def capped(devserver: DevServer) -> Iterator[CappedServer]:
    handler = type("Handler", (Capped,), {"upstream": devserver.url.rsplit("/rest/v1", 1)[0]})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    proxy.daemon_threads = True
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield CappedServer(f"http://127.0.0.1:{proxy.server_address[1]}/rest/v1", devserver.jwt_secret)
    proxy.shutdown()
    proxy.server_close()


def paging_app(tmp_path: Path, server: object, pg: psycopg.Connection, upstream: DevServer | object) -> App:
    """An app of ROWS items shipping to `server` (the target table created in PostgreSQL and in `upstream`'s
    schema cache)."""
    pg.execute("DROP TABLE IF EXISTS paging_items")
    pg.execute("CREATE TABLE paging_items (id bigint PRIMARY KEY, name text)")
    pg.execute("GRANT ALL ON paging_items TO service_role")
    reload_schema(upstream, "paging_items")  # type: ignore[arg-type]
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript("PRAGMA journal_mode=WAL; CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    config = tmp_path / "syncd.toml"
    write_config(config, db, server, f"127.0.0.1:{free_port()}")  # type: ignore[arg-type]
    config.write_text(config.read_text().split("[[table]]")[0] + TABLE_CONFIG)
    app = App(db, config, "")
    assert app.syncd("install").returncode == 0
    with app.connect() as conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(1, ROWS + 1)])
        conn.execute("COMMIT")
    result = app.syncd("run", "--once")
    assert result.returncode == 0, result.stderr
    return app


def assert_pages_past_the_cap(app: App, pg: psycopg.Connection) -> None:
    """Every row is compared although each read answers at most CAP rows: equal, nothing to repair; a row deleted
    in the secondary past the cap is found missing, and check names the cap."""
    assert pg.execute("SELECT count(*) FROM paging_items").fetchone() == (ROWS,)
    verified = app.syncd("verify", "--repair", "--json")
    assert verified.returncode == 0, verified.stdout
    (table,) = json.loads(verified.stdout)["tables"]
    assert (table["target_rows"], table["repair"]) == (ROWS, 0)
    pg.execute("DELETE FROM paging_items WHERE id = %s", (ROWS - 1,))
    (table,) = json.loads(app.syncd("verify", "--json").stdout)["tables"]
    assert (table["missing"], table["extra"], table["target_rows"]) == (1, 0, ROWS - 1)
    assert table["examples"]["missing"] == [f"(id)=({ROWS - 1})"]
    checked = app.syncd("check").stdout
    assert f"caps every read at {CAP} rows" in checked, checked


def test_verify_pages_past_a_capping_proxy(tmp_path: Path, capped: CappedServer, devserver: DevServer,
                                           pg: psycopg.Connection):
    """Field case 19 in front of the dev server: a 50-row cap, verify asking for 5000."""
    assert_pages_past_the_cap(paging_app(tmp_path, capped, pg, devserver), pg)


def test_check_says_nothing_is_capped_without_a_cap(tmp_path: Path, devserver: DevServer, pg: psycopg.Connection):
    """Without a cap, check says none was seen and how large a table it could see it on."""
    app = paging_app(tmp_path, devserver, pg, devserver)
    assert f"no cap on the rows of a read seen (the largest table holds {ROWS} rows" in app.syncd("check").stdout


@pytest.mark.skipif(binary() is None, reason=SKIP_REASON)
def test_verify_pages_past_the_real_postgrest_db_max_rows(tmp_path: Path, devserver: DevServer,
                                                          pg: psycopg.Connection):
    """The real PostgREST 12.2.12 with db-max-rows = 50 (Supabase's "Max rows" is the same setting)."""
    server = start_postgrest(devserver, db_max_rows=str(CAP))
    try:
        assert_pages_past_the_cap(paging_app(tmp_path, server, pg, server), pg)
    finally:
        server.stop()
