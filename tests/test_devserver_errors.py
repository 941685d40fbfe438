"""Every row of POSTGREST.md's error table, authentication failures and client mistakes: PostgREST's
status, code and body, produced through the real request path (a trigger raises the SQLSTATEs that
cannot be provoked directly)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from syncd import auth
from tests.conftest import DevServer, start_devserver

pytestmark = pytest.mark.usefixtures("clean")


def assert_error(r: httpx.Response, status: int, code: str | None) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "details", "hint", "message"}
    assert body["code"] == code
    return body


@pytest.mark.parametrize(("sqlstate", "status"), [
    ("42883", 404), ("08006", 503), ("53300", 503), ("57P01", 503), ("57014", 500), ("40001", 500),
    ("40P01", 500), ("53400", 500), ("XX000", 500), ("P0001", 400), ("22023", 400),
])
def test_sqlstate_maps_to_postgrest_status(service: httpx.Client, sqlstate: str, status: int):
    """A PostgreSQL error passes through with its SQLSTATE and message, under PostgREST's status."""
    body = assert_error(service.post("/raiser", json={"id": 1, "code": sqlstate}), status, sqlstate)
    assert body["message"] == f"raised {sqlstate}"


def test_foreign_key_violation_is_409(service: httpx.Client):
    body = assert_error(service.post("/children", json={"id": 1, "parent_id": 99}), 409, "23503")
    assert "parent_id" in str(body["details"])


def test_unique_violation_is_409(service: httpx.Client):
    service.post("/people", json={"id": 1, "email": "a@x"})
    assert_error(service.post("/people", json={"id": 2, "email": "a@x"}), 409, "23505")


def test_not_null_violation_is_400(service: httpx.Client):
    assert_error(service.post("/items", json={"id": 1, "name": None}), 400, "23502")


def test_check_violation_is_400(service: httpx.Client):
    assert_error(service.post("/items", json={"id": 1, "name": "a", "qty": -1}), 400, "23514")


def test_invalid_text_for_the_type_is_400(service: httpx.Client):
    assert_error(service.post("/items", json={"id": "abc", "name": "a"}), 400, "22P02")
    assert_error(service.get("/items?id=eq.abc"), 400, "22P02")


def test_undefined_column_in_a_filter_is_400_42703(service: httpx.Client):
    body = assert_error(service.get("/items?nope=eq.1"), 400, "42703")
    assert body["message"] == "column items.nope does not exist"


def test_on_conflict_without_unique_constraint_is_400_42P10(service: httpx.Client):
    r = service.post("/items?on_conflict=name", json=[{"id": 1, "name": "a"}],
                     headers={"Prefer": "resolution=merge-duplicates"})
    assert_error(r, 400, "42P10")


def test_bulk_insert_is_rolled_back_whole_by_one_bad_row(service: httpx.Client, pg: psycopg.Connection):
    """One statement, one transaction: a bad row in the middle means no row at all."""
    body = [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": -5}, {"id": 3, "name": "c", "qty": 1}]
    assert_error(service.post("/items", json=body), 400, "23514")
    assert pg.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_rls_denial_is_401_for_anon_and_403_for_a_signed_in_role(devserver: DevServer):
    anon = httpx.post(f"{devserver.url}/items", json={"id": 1, "name": "a"})
    body = assert_error(anon, 401, "42501")
    assert anon.headers["www-authenticate"] == "Bearer"
    assert "permission denied" in str(body["message"])
    user = devserver.client(devserver.token("authenticated", sub="00000000-0000-0000-0000-000000000001"))
    assert_error(user.post("/items", json={"id": 1, "name": "a"}), 403, "42501")


def test_a_token_cannot_claim_the_superuser_role(devserver: DevServer):
    """Requests run as `authenticator`, which can only become the API roles (as in PostgREST)."""
    client = devserver.client(devserver.token("postgres"))
    assert_error(client.get("/items"), 403, "42501")


def test_undefined_table_after_the_cache_loaded_is_404_42P01(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("CREATE TABLE IF NOT EXISTS public.doomed (id int); GRANT ALL ON public.doomed TO service_role")
    pg.execute("NOTIFY pgrst, 'reload schema'")
    deadline = time.monotonic() + 5
    while service.get("/doomed").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    pg.execute("DROP TABLE public.doomed")
    assert_error(service.get("/doomed"), 404, "42P01")
    pg.execute("NOTIFY pgrst, 'reload schema'")


def test_unknown_table_read_is_404_42p01_and_a_write_of_columns_404_empty(service: httpx.Client):
    """As PostgREST 12 (measured): a read or delete reaches PostgreSQL (42P01 with its text); a write naming columns
    fails in the schema cache first (404 `{}`)."""
    body = assert_error(service.get("/no_such_table"), 404, "42P01")
    assert body["message"] == 'relation "public.no_such_table" does not exist'
    assert_error(service.delete("/no_such_table?id=eq.1"), 404, "42P01")
    r = service.post("/no_such_table", json=[{"id": 1}])
    assert r.status_code == 404 and r.json() == {}


def test_schema_not_exposed_is_406_pgrst106(service: httpx.Client):
    body = assert_error(service.get("/items", headers={"Accept-Profile": "hidden"}), 406, "PGRST106")
    assert body["message"] == "The schema must be one of the following: public, syncd_test"
    assert_error(service.post("/items", json={"id": 1}, headers={"Content-Profile": "hidden"}), 406, "PGRST106")


def test_unfiltered_delete_and_patch_are_refused_like_pg_safeupdate(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    body = assert_error(service.delete("/items"), 400, "21000")
    assert body["message"] == "DELETE requires a WHERE clause"
    assert_error(service.patch("/items", json={"name": "b"}), 400, "21000")
    assert pg.execute("SELECT name FROM items").fetchall() == [("a",)]


def test_terminated_database_connections_answer_503_then_recover(service: httpx.Client, pg: psycopg.Connection):
    """A connection killed under the server (57P01 / lost) is a 503; the pool then reconnects."""
    service.get("/items")
    pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'syncd-devserver'")
    statuses = [service.get("/items").status_code for _ in range(12)]
    assert 503 in statuses
    assert statuses[-1] == 200


@pytest.fixture(scope="module")
def tiny_pool(devserver: DevServer, migrations_with_tests) -> Iterator[DevServer]:
    server = start_devserver("--pg-url", devserver.pg_url, "--pool-size", "1", "--pool-timeout", "0.3",
                             "--jwt-secret", devserver.jwt_secret, migrations=migrations_with_tests)
    yield server
    server.stop()


def test_pool_exhaustion_is_504_pgrst003(tiny_pool: DevServer):
    """Waiting longer than --pool-timeout for a database connection answers 504 PGRST003."""
    client = tiny_pool.client(tiny_pool.service_key)
    slow = threading.Thread(target=lambda: client.post("/raiser", json={"id": 1, "seconds": 1.5}))
    slow.start()
    time.sleep(0.3)
    r = tiny_pool.client(tiny_pool.service_key).get("/items")
    slow.join()
    assert_error(r, 504, "PGRST003")
    assert "retry-after" not in r.headers


# -- authentication -------------------------------------------------------------------------------------


def test_expired_token_is_401_pgrst301_with_www_authenticate(devserver: DevServer):
    token = auth.mint_token(devserver.jwt_secret, "service_role", expires_in=-60)
    r = devserver.client(token).get("/items")
    body = assert_error(r, 401, "PGRST301")
    assert body["message"] == "JWT expired"
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token", error_description="JWT expired"'


def test_clock_skew_of_thirty_seconds_is_tolerated(devserver: DevServer):
    recently_expired = auth.mint_token(devserver.jwt_secret, "service_role", expires_in=-10)
    assert devserver.client(recently_expired).get("/items").status_code == 200
    issued_soon = auth.mint_token(devserver.jwt_secret, "service_role", now=time.time() + 20)
    assert devserver.client(issued_soon).get("/items").status_code == 200
    not_yet = auth.mint_token(devserver.jwt_secret, "service_role", nbf=int(time.time()) + 120)
    assert_error(devserver.client(not_yet).get("/items"), 401, "PGRST301")


def test_bad_signature_is_401_pgrst301(devserver: DevServer):
    forged = auth.mint_token("x" * 40, "service_role")
    r = devserver.client(forged).get("/items")
    body = assert_error(r, 401, "PGRST301")
    assert body["message"] == "JWSError JWSInvalidSignature"
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b", "a.b.c"])
def test_malformed_token_is_401_pgrst301(devserver: DevServer, token: str):
    assert_error(devserver.client(token).get("/items"), 401, "PGRST301")


def test_token_without_role_claim_runs_as_anon(devserver: DevServer, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    roleless = __import__("jwt").encode({"sub": "x", "exp": int(time.time()) + 60}, devserver.jwt_secret)
    client = devserver.client(roleless)
    assert client.get("/items?select=id").json() == [{"id": 1}]
    assert_error(client.post("/items", json={"id": 2, "name": "b"}), 401, "42501")


def test_request_claims_reach_postgresql(devserver: DevServer, pg: psycopg.Connection):
    """request.jwt.claims holds all claims (what auth.uid() and RLS policies read)."""
    pg.execute("""CREATE OR REPLACE FUNCTION public.stamp_claims() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN NEW.body := current_setting('request.jwt.claims', true) || '|' || current_user; RETURN NEW; END $$;
        DROP TRIGGER IF EXISTS stamp ON public.items;
        CREATE TRIGGER stamp BEFORE INSERT ON public.items FOR EACH ROW EXECUTE FUNCTION public.stamp_claims()""")
    try:
        client = devserver.client(devserver.token("service_role", sub="abc", email="e@x"))
        assert client.post("/items", json={"id": 1, "name": "a"}).status_code == 201
        claims, role = pg.execute("SELECT body FROM items").fetchone()[0].split("|")
        assert role == "service_role"
        assert __import__("json").loads(claims)["email"] == "e@x"
    finally:
        pg.execute("DROP TRIGGER stamp ON public.items")


# -- client mistakes: always PostgREST's 4xx, never a 500 ------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_bad_json_body_is_400_pgrst102(service: httpx.Client, body: bytes):
    r = service.post("/items", content=body, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "PGRST102")


def test_objects_with_different_keys_are_400_pgrst102(service: httpx.Client):
    body = assert_error(service.post("/items", json=[{"id": 1, "name": "a"}, {"id": 2}]), 400, "PGRST102")
    assert body["message"] == "All object keys must match"


def test_unknown_column_in_a_write_is_400_pgrst204(service: httpx.Client):
    body = assert_error(service.post("/items", json=[{"id": 1, "nme": "a"}]), 400, "PGRST204")
    assert body["message"] == "Could not find the 'nme' column of 'items' in the schema cache"
    assert_error(service.patch("/items?id=eq.1", json={"nme": "a"}), 400, "PGRST204")


@pytest.mark.parametrize("url", [
    "/items?id=eq", "/items?id=zz.1", "/items?id=in.1,2", "/items?id=in.(1,\"2)", "/items?or=id.eq.1",
    "/items?or=(id.eq.1", "/items?order=id.sideways", "/items?select=id::bad;type",
    "/items?id=is.maybe", "/items?and=()",
])
def test_bad_filter_syntax_is_400_pgrst100(service: httpx.Client, url: str):
    assert_error(service.get(url), 400, "PGRST100")


@pytest.mark.parametrize("url", [
    "/items?select=nope", "/items?order=nope", "/items?id=like.%", "/items?qty=cs.notarray",
    "/items?made=gt.yesterday-ish", "/items?body=fts(nolang).x", "/%22weird%22?x=eq.1", "/items?id=eq.%00",
])
def test_odd_requests_never_answer_500(service: httpx.Client, url: str):
    r = service.get(url)
    assert 400 <= r.status_code < 500, r.text
