"""`syncd dev-server --upstream URL`: the fault API in front of another PostgREST (here another dev server, and the
real PostgREST 12.2.12 when SYNCD_TEST_POSTGREST names it). Requests pass through unchanged, faults apply in front,
and `syncd run --once` through faults converges against the real server."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd.devserver.launcher import RunningDevServer, launch
from tests.conftest import DevServer
from tests.e2e import APP_SCHEMA, TARGET_TABLES, App, assert_converged, free_port, write_config
from tests.postgrest import RunningPostgrest

pytestmark = pytest.mark.usefixtures("clean")
UPSERT = {"Prefer": "resolution=merge-duplicates,return=minimal"}
NO_FAULTS = {"error_rate": 0, "reset_rate": 0, "timeout_rate": 0, "delay_ms": 0, "down": False, "seed": 0}


def start_proxy(upstream: str) -> RunningDevServer:
    """A dev server on a free port passing requests on to `upstream` (its pg_url, secret and keys are None)."""
    return launch(["--port", "0", "--upstream", upstream], timeout=30)


@pytest.fixture(scope="module")
def proxy(devserver: DevServer) -> Iterator[RunningDevServer]:
    """The proxy in front of the session's dev server."""
    server = start_proxy(devserver.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def real(postgrest: RunningPostgrest) -> RunningPostgrest:
    """The session's real PostgREST (skips without the binary)."""
    return postgrest


@pytest.fixture(scope="module")
def real_proxy(real: RunningPostgrest) -> Iterator[RunningDevServer]:
    """The proxy in front of the real PostgREST (its API at its root)."""
    server = start_proxy(real.url)
    yield server
    server.stop()


def set_faults(proxy: RunningDevServer, **settings: object) -> None:
    assert httpx.put(f"{proxy.root}/_dev/faults", json={**NO_FAULTS, **settings}).status_code == 200


@pytest.fixture(autouse=True)
def no_faults_after(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every proxy a test used is back to no faults and zero counts afterwards."""
    yield
    for name in ("proxy", "real_proxy"):
        if name in request.fixturenames:
            server = request.getfixturevalue(name)
            set_faults(server)
            httpx.delete(f"{server.root}/_dev/stats")


def same_answer(direct: httpx.Response, proxied: httpx.Response) -> None:
    """Status, body and the headers a client reads are the same with and without the proxy."""
    assert proxied.status_code == direct.status_code
    assert proxied.content == direct.content
    for name in ("content-type", "content-range", "preference-applied", "www-authenticate", "retry-after"):
        assert proxied.headers.get(name) == direct.headers.get(name), name


def assert_same_through_proxy(direct_url: str, proxy_url: str, key: str, pg: psycopg.Connection, reset: str,
                              method: str, path: str, body: object, headers: dict[str, str]) -> None:
    """The same request from the same state (`reset` run before each) answers the same directly and through the
    proxy (same_answer)."""
    answers = []
    for url in (direct_url, proxy_url):
        pg.execute(reset)
        answers.append(httpx.request(method, url + path, json=body, headers={"Authorization": f"Bearer {key}",
                                                                             **headers}))
    same_answer(*answers)


def test_the_json_line_names_the_url_and_nothing_it_cannot_know(proxy: RunningDevServer, devserver: DevServer):
    """url is the proxy's API URL; upstream is the URL given; pg_url, jwt_secret and the keys are null."""
    assert proxy.url.endswith("/rest/v1") and proxy.url != devserver.url
    assert (proxy.pg_url, proxy.jwt_secret, proxy.service_key, proxy.anon_key) == (None, None, None, None)


@pytest.mark.parametrize(("method", "path", "body", "headers"), [
    ("POST", "/items?on_conflict=id", [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], UPSERT),
    ("GET", "/items?select=id,name&order=id&limit=1&offset=1", None, {"Prefer": "count=exact"}),
    ("GET", "/pairs?a=in.(%22c,d%22,%C3%BC)&select=a", None, {}),
    ("GET", "/nosuch", None, {}),
    ("POST", "/items", [{"id": 1, "nme": "a"}], {}),
    ("DELETE", "/items?id=in.(1,2)", None, {}),
    ("GET", "/", None, {"Accept": "application/openapi+json"}),
])
def test_requests_pass_through_unchanged(proxy: RunningDevServer, devserver: DevServer, pg: psycopg.Connection,
                                         method: str, path: str, body: object, headers: dict[str, str]):
    """The same request from the same state answers the same through the proxy as directly."""
    assert_same_through_proxy(devserver.url, proxy.url, devserver.service_key, pg,
                              "TRUNCATE items, pairs CASCADE; INSERT INTO items (id, name) VALUES (1, 'x'), (3, 'y')",
                              method, path, body, headers)


def test_tokens_and_apikey_reach_the_upstream(proxy: RunningDevServer, devserver: DevServer):
    """Authorization passes on (an anonymous write is refused upstream; the service key's is not)."""
    anonymous = httpx.post(f"{proxy.url}/parents", json=[{"id": 1}])
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "42501"
    signed = httpx.post(f"{proxy.url}/parents", json=[{"id": 1}], headers={
        "Authorization": f"Bearer {devserver.service_key}", "apikey": devserver.anon_key})
    assert signed.status_code == 201


def test_faults_apply_in_front(proxy: RunningDevServer, devserver: DevServer, pg: psycopg.Connection):
    """An injected error answers instead of the upstream (nothing written); down is 503 with Retry-After; a reset
    closes the connection; the counts are kept."""
    client = proxy.client(devserver.service_key)
    set_faults(proxy, error_rate=1)
    r = client.post("/items", json=[{"id": 5, "name": "e"}])
    assert r.status_code == 503 and r.json()["code"] == "PGRST000"
    assert pg.execute("SELECT count(*) FROM items").fetchone() == (0,)
    set_faults(proxy, down=True, retry_after=7)
    r = client.get("/items")
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    set_faults(proxy, reset_rate=1)
    with pytest.raises(httpx.TransportError):
        client.get("/items")
    stats = httpx.get(f"{proxy.root}/_dev/stats").json()
    assert stats["faults"] == {"error": 1, "down": 1, "reset": 1}


def test_an_unreachable_upstream_is_502(tmp_path: Path):
    """Nothing listening upstream: 502 with a gateway's message, no traceback."""
    server = start_proxy(f"http://127.0.0.1:{free_port()}")
    try:
        r = httpx.get(f"{server.url}/items", headers={"Authorization": "Bearer secret-token-value"})
        assert r.status_code == 502 and "unreachable" in r.json()["message"]
        assert "secret-token-value" not in r.text
    finally:
        server.stop()


@pytest.mark.parametrize(("flags", "expected"), [
    (("--upstream", "http://127.0.0.1:1", "--pg-url", "postgresql://x@y/z"), "--pg-url: not with --upstream"),
    (("--upstream", "http://127.0.0.1:1", "--migrations", "."), "--migrations: not with --upstream"),
    (("--upstream", "http://127.0.0.1:1", "--data-dir", "d"), "--data-dir: not with --upstream"),
    (("--upstream", "http://127.0.0.1:1", "--max-rows", "5"), "--max-rows: not with --upstream"),
    (("--upstream", "ftp://example.com"), "give an http:// or https:// URL"),
    (("--upstream", "https://user:hunter2@example.com/rest/v1"), "no credentials in the URL"),
    (("--max-rows", "0"), "--max-rows 0: use 1 or more rows"),
])
def test_flags_that_make_no_sense_are_refused(flags: tuple[str, ...], expected: str):
    """One line naming the flag, exit 2, before anything starts (no password echoed)."""
    done = subprocess.run([sys.executable, "-m", "syncd", "dev-server", "--port", "0", *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert "hunter2" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_passes_through_to_the_real_postgrest(real_proxy: RunningDevServer, real: RunningPostgrest,
                                              pg: psycopg.Connection):
    """In front of the real PostgREST: upsert, counted page and the 500 21000 of one key twice are its own."""
    cases = [("POST", "/items?on_conflict=id", [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], UPSERT),
             ("GET", "/items?select=id&order=id&limit=1", None, {"Prefer": "count=exact"}),
             ("POST", "/items?on_conflict=id", [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], UPSERT),
             ("GET", "/nosuch", None, {})]
    for method, path, body, headers in cases:
        assert_same_through_proxy(real.url, real_proxy.url, real.service_key, pg, "TRUNCATE items CASCADE",
                                  method, path, body, headers)


@dataclass
class Through:
    """The secondary as a syncd configuration sees it: the proxy's URL, the real server's secret."""

    url: str
    jwt_secret: str


@pytest.mark.parametrize("behind", ["dev-server", "postgrest"])
def test_run_once_through_faults_converges(behind: str, request: pytest.FixtureRequest, pg: psycopg.Connection,
                                           tmp_path: Path):
    """Errors and resets in front of either server: `syncd run --once` retries until every row arrived, none
    dead-lettered. (It once exited 0 with entries left: a flush between two batches of a drain forgot the seqs of
    the batches in flight, and when one of them was interrupted its entries lay below where claims started.)"""
    if behind == "postgrest":
        real_proxy, secret = request.getfixturevalue("real_proxy"), request.getfixturevalue("real").jwt_secret
    else:
        real_proxy, secret = request.getfixturevalue("proxy"), request.getfixturevalue("devserver").jwt_secret
    pg.execute(f"TRUNCATE {TARGET_TABLES}")
    db = tmp_path / "app.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(APP_SCHEMA)
    config = tmp_path / "syncd.toml"
    metrics = f"127.0.0.1:{free_port()}"
    write_config(config, db, Through(real_proxy.url, secret), metrics, extra="batch_size = 7")
    run = [sys.executable, "-m", "syncd"]
    assert subprocess.run([*run, "install", "--config", str(config)], capture_output=True, timeout=60).returncode == 0
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.executemany("INSERT INTO parent VALUES (?, ?)", [(i, f"p{i}") for i in range(1, 21)])
        conn.executemany("INSERT INTO child VALUES (?, ?, ?)", [(i, i % 20 + 1, f"c{i}") for i in range(1, 41)])
        conn.executemany("INSERT INTO item (id, name, qty) VALUES (?, ?, ?)", [(i, f"n{i}", i) for i in range(60)])
        conn.executemany("INSERT INTO pair VALUES (?, ?, ?)", [(f"a,{i}", i, "v") for i in range(15)])
        conn.execute("DELETE FROM item WHERE id < 5")
    set_faults(real_proxy, error_rate=0.3, reset_rate=0.2, seed=11)
    done = subprocess.run([*run, "run", "--once", "--config", str(config)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = httpx.get(f"{real_proxy.root}/_dev/stats").json()
    assert stats["faults"].get("error", 0) > 0 and stats["faults"].get("reset", 0) > 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM _syncd_dead_letter").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (0,)
    assert_converged(App(db, config, metrics), pg)
