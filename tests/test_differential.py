"""The dev server against the real PostgREST 12.2.12: the same request, from the same database state, to both.

Both serve the session dev server's PostgreSQL (the real one logs in as `authenticator`, signed with the same JWT
secret), so every case runs its setup SQL, asks the dev server, runs the setup again, asks PostgREST, and compares
what syncd depends on: the status; for an error its `code` and its body's keys; for rows the rows; the
Content-Range and Preference-Applied headers; and what the table holds afterwards. A second pair, the dev server with
`--max-rows 1000` and PostgREST with `PGRST_DB_MAX_ROWS=1000` (Supabase's default cap), compares capped reads.

The one deliberate difference is listed in `SAFEUPDATE`: an unfiltered DELETE or PATCH, which PostgREST performs and
the dev server refuses as Supabase's pg-safeupdate does (400 21000).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from syncd.devserver.launcher import launch
from tests.conftest import CONFORMANCE_TABLES, DevServer, reload_schema
from tests.postgrest import SKIP_REASON, RunningPostgrest, binary, start_postgrest

pytestmark = pytest.mark.skipif(binary() is None, reason=SKIP_REASON)

MAX_ROWS = 1000
MERGE = {"Prefer": "resolution=merge-duplicates,return=minimal"}  # what syncd sends with every upsert
COMPARED_HEADERS = ("content-range", "preference-applied")
ITEMS = "INSERT INTO items (id, name, qty) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', NULL)"
AWKWARD = ("INSERT INTO pairs (a, b, v) VALUES ('a\"b', 1, 'x'), ('c,d', 2, 'x'), ('(e)', 3, 'x'), ('ü✓', 4, 'x'),"
           " ('', 5, 'x'), ('null', 6, 'x'), ('back\\slash', 7, 'x'), ('sp ace', 8, 'x'), ('dot.ted', 9, 'x'),"
           " ('semi;colon', 10, NULL)")
AWKWARD_IN = '("a\\"b","c,d","(e)",ü✓,"","null","back\\\\slash","sp ace","dot.ted")'
AWKWARD_OR = ('(and(a.eq."a\\"b",b.eq.1),and(a.eq."c,d",b.eq.2),and(a.eq."(e)",b.eq.3),and(a.eq.ü✓,b.eq.4),'
              'and(a.eq."",b.eq.5),and(a.eq.null,b.eq.6),and(a.eq."back\\\\slash",b.eq.7),and(v.is.null,b.eq.10))')
MANY = f"INSERT INTO bench (id, a) SELECT g, 'x' FROM generate_series(1, {MAX_ROWS + 500}) AS g"


@dataclass
class Case:
    """One request of the corpus: its method, path (below the API URL), JSON body (or raw bytes), headers, the
    token to send (a name of `tokens`, or None for none), the SQL that sets the database up before it, and the table
    whose contents are compared afterwards."""

    method: str
    path: str
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    token: str | None = "service"
    setup: str = ""
    table: str | None = None


CORPUS: dict[str, Case] = {
    # bulk upserts as syncd sends them, with conflicts and bad rows
    "upsert new rows": Case("POST", "/items?on_conflict=id", [{"id": 5, "name": "e"}, {"id": 6, "name": "f"}],
                            MERGE, setup=ITEMS, table="items"),
    "upsert existing rows": Case("POST", "/items?on_conflict=id", [{"id": 1, "name": "z"}], MERGE, setup=ITEMS,
                                 table="items"),
    "upsert mixed, representation": Case(
        "POST", "/items?on_conflict=id&select=id,name", [{"id": 1, "name": "z"}, {"id": 7, "name": "g"}],
        {"Prefer": "resolution=merge-duplicates,return=representation"}, setup=ITEMS, table="items"),
    "upsert empty array": Case("POST", "/items?on_conflict=id", [], MERGE, setup=ITEMS, table="items"),
    "upsert one key twice (21000, HTTP 500)": Case(
        "POST", "/items?on_conflict=id", [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], MERGE, table="items"),
    "upsert unique violation (23505)": Case(
        "POST", "/people?on_conflict=id", [{"id": 2, "email": "x@y"}], MERGE,
        setup="INSERT INTO people VALUES (1, 'x@y')", table="people"),
    "upsert on a unique column": Case("POST", "/people?on_conflict=email", [{"id": 2, "email": "x@y"}], MERGE,
                                      setup="INSERT INTO people VALUES (1, 'x@y')", table="people"),
    "upsert foreign key violation (23503)": Case("POST", "/children?on_conflict=id",
                                                 [{"id": 1, "parent_id": 99, "name": "c"}], MERGE, table="children"),
    "upsert bad integer (22P02)": Case("POST", "/items?on_conflict=id", [{"id": "x", "name": "a"}], MERGE),
    "upsert null in NOT NULL (23502)": Case("POST", "/items?on_conflict=id", [{"id": 9, "name": None}], MERGE),
    "upsert check violation (23514)": Case("POST", "/items?on_conflict=id", [{"id": 9, "name": "a", "qty": -1}],
                                           MERGE),
    "upsert unknown column (PGRST204)": Case("POST", "/items?on_conflict=id", [{"id": 9, "name": "a", "nme": 1}],
                                             MERGE),
    "upsert keys differ (PGRST102)": Case("POST", "/items?on_conflict=id", [{"id": 9, "name": "a"}, {"id": 8}],
                                          MERGE),
    "upsert invalid JSON": Case("POST", "/items?on_conflict=id", b"[{", MERGE),
    "upsert on_conflict without a unique constraint (42P10)": Case("POST", "/items?on_conflict=name",
                                                                   [{"id": 9, "name": "a"}], MERGE),
    "upsert on_conflict unknown column": Case("POST", "/items?on_conflict=nope", [{"id": 9, "name": "a"}], MERGE),
    "upsert missing=default": Case(
        "POST", "/items?columns=id,name,note&on_conflict=id&select=id,name,note", [{"id": 9, "name": "a"}],
        {"Prefer": "resolution=merge-duplicates,missing=default,return=representation"}, table="items"),
    "ignore-duplicates of an existing row": Case(
        "POST", "/items?on_conflict=id", [{"id": 1, "name": "z"}],
        {"Prefer": "resolution=ignore-duplicates,return=minimal"}, setup=ITEMS, table="items"),
    "plain insert": Case("POST", "/items", [{"id": 9, "name": "a"}], table="items"),
    "plain insert of an existing key": Case("POST", "/items", {"id": 1, "name": "a"}, setup=ITEMS, table="items"),
    "composite key with odd names": Case(
        "POST", '/odd%20names?on_conflict="my col","b.c"', [{"my col": "x", "b.c": 1, "v,w": "y"}], MERGE,
        setup="""INSERT INTO "odd names" VALUES ('x', 1, 'old')""", table='"odd names"'),
    # deletes with awkward keys
    "delete in.() of awkward keys": Case("DELETE", f"/pairs?a=in.{AWKWARD_IN}", setup=AWKWARD, table="pairs"),
    "delete or=(and(...)) of awkward keys": Case("DELETE", f"/pairs?or={AWKWARD_OR}", setup=AWKWARD, table="pairs"),
    "delete and=() with representation": Case(
        "DELETE", '/pairs?and=(a.eq."c,d",b.eq.2)&select=a,b', headers={"Prefer": "return=representation"},
        setup=AWKWARD, table="pairs"),
    "delete in.() that is empty": Case("DELETE", "/pairs?a=in.()", setup=AWKWARD, table="pairs"),
    "delete unquoted empty element": Case("DELETE", "/pairs?a=in.(,x)", setup=AWKWARD, table="pairs"),
    "delete bad integer in a key list": Case("DELETE", "/pairs?b=in.(1,x)", setup=AWKWARD, table="pairs"),
    "delete malformed in list": Case("DELETE", "/pairs?a=in.a,b", setup=AWKWARD, table="pairs"),
    "delete of odd names": Case("DELETE", '/odd%20names?or=(and("my col".eq.x,"b.c".eq.1))',
                                setup="""INSERT INTO "odd names" VALUES ('x', 1, 'old')""", table='"odd names"'),
    "patch": Case("PATCH", "/items?id=in.(1,2)", {"name": "q"}, setup=ITEMS, table="items"),
    # reads: filters, order, limit/offset, Range, count
    "read a page with count=exact": Case("GET", "/pairs?select=a,b&b=gte.3&order=b.desc&limit=3&offset=1",
                                         headers={"Prefer": "count=exact"}, setup=AWKWARD),
    "read with a Range header": Case("GET", "/pairs?select=b&order=b",
                                     headers={"Range": "2-4", "Prefer": "count=exact"}, setup=AWKWARD),
    "read with an open Range": Case("GET", "/pairs?select=b&order=b", headers={"Range": "7-"}, setup=AWKWARD),
    "read a Range backwards": Case("GET", "/pairs?select=b&order=b", headers={"Range": "5-3"}, setup=AWKWARD),
    "read past the end counted (416)": Case("GET", "/pairs?select=b&offset=50", headers={"Prefer": "count=exact"},
                                            setup=AWKWARD),
    "read at the end counted": Case("GET", "/pairs?select=b&offset=10", headers={"Prefer": "count=exact"},
                                    setup=AWKWARD),
    "read past the end uncounted": Case("GET", "/pairs?select=b&offset=50", setup=AWKWARD),
    "read keyset page": Case("GET", "/pairs?select=a,b&order=a.asc&a=gt.c&limit=3", setup=AWKWARD),
    "read is.null and like": Case("GET", "/pairs?select=b&or=(v.is.null,a.like.*ed)&order=b", setup=AWKWARD),
    "read limit that is not a number": Case("GET", "/items?select=id&order=id&limit=x", setup=ITEMS),
    "read negative limit": Case("GET", "/items?select=id&order=id&limit=-1", setup=ITEMS),
    "read negative offset": Case("GET", "/items?select=id&order=id&offset=-1", setup=ITEMS),
    "read HEAD counted": Case("HEAD", "/items", headers={"Prefer": "count=exact"}, setup=ITEMS),
    "read unknown column": Case("GET", "/items?select=nope"),
    "filter on an unknown column": Case("GET", "/items?nope=eq.1"),
    "filter with an unknown operator": Case("GET", "/items?id=zz.1"),
    "schema not exposed (PGRST106)": Case("GET", "/items", headers={"Accept-Profile": "hidden"}),
    "second schema by Accept-Profile": Case("GET", "/items?select=id", headers={"Accept-Profile": "syncd_test"}),
    # unknown tables, each method
    "unknown table GET": Case("GET", "/nosuch?select=id&id=eq.1"),
    "unknown table HEAD": Case("HEAD", "/nosuch"),
    "unknown table GET in the second schema": Case("GET", "/nosuch", headers={"Accept-Profile": "syncd_test"}),
    "unknown table POST": Case("POST", "/nosuch?on_conflict=id", [{"id": 1}], MERGE),
    "unknown table POST of nothing": Case("POST", "/nosuch", []),
    "unknown table POST of bad JSON": Case("POST", "/nosuch", b"nope"),
    "unknown table PATCH": Case("PATCH", "/nosuch?id=eq.1", {"id": 1}),
    "unknown table PATCH of nothing": Case("PATCH", "/nosuch?id=eq.1", {}),
    "unknown table DELETE": Case("DELETE", "/nosuch?id=in.(1,2)"),
    "unknown table with a bad filter": Case("GET", "/nosuch?id=zz.1"),
    "unknown table anonymous": Case("GET", "/nosuch", token=None),
    # tokens and roles
    "expired token (PGRST301)": Case("GET", "/items", token="expired"),
    "token of another secret": Case("GET", "/items", token="wrong_secret"),
    "token that is not a JWT": Case("GET", "/items", token="garbage"),
    "token not valid yet": Case("GET", "/items", token="not_yet"),
    "token issued in the future": Case("GET", "/items", token="future"),
    "role that does not exist": Case("GET", "/items", token="no_such_role"),
    "token without a role claim": Case("GET", "/items?select=id", token="no_role", setup=ITEMS),
    "Authorization of another scheme": Case("GET", "/items?select=id", {"Authorization": "Basic eDp5"}, token=None,
                                            setup=ITEMS),
    "Bearer without a token": Case("GET", "/items?select=id", {"Authorization": "Bearer"}, token=None, setup=ITEMS),
    "anon reads what it may": Case("GET", "/items?select=id&order=id", token=None, setup=ITEMS),
    "anon denied a write (42501, 401)": Case("POST", "/parents", [{"id": 1, "name": "p"}], MERGE, token=None,
                                             table="parents"),
    "anon denied a read": Case("GET", "/parents", token=None),
    "authenticated denied a write (42501, 403)": Case("POST", "/parents", [{"id": 1}], MERGE,
                                                      token="authenticated", table="parents"),
    "authenticated denied a delete": Case("DELETE", "/parents?id=eq.1", token="authenticated",
                                          setup="INSERT INTO parents VALUES (1, 'p')", table="parents"),
}

CAPPED: dict[str, Case] = {
    "capped read": Case("GET", "/bench?select=id&order=id", setup=MANY),
    "capped read counted": Case("GET", "/bench?select=id&order=id", headers={"Prefer": "count=exact"}, setup=MANY),
    "capped read asking for more": Case("GET", "/bench?select=id&order=id&limit=5000",
                                        headers={"Prefer": "count=exact"}, setup=MANY),
    "capped read from an offset": Case("GET", "/bench?select=id&order=id&offset=1200", setup=MANY),
    "capped read under the cap": Case("GET", "/bench?select=id&order=id&limit=10&offset=1495",
                                      headers={"Prefer": "count=exact"}, setup=MANY),
    "capped read by Range": Case("GET", "/bench?select=id&order=id", headers={"Range": "100-1400"}, setup=MANY),
    "capped read past the end": Case("GET", "/bench?select=id&offset=2000", headers={"Prefer": "count=exact"},
                                     setup=MANY),
    "cap does not apply to a write's rows": Case(
        "DELETE", "/bench?id=gt.0&select=id", headers={"Prefer": "return=representation"}, setup=MANY, table="bench"),
}

# PostgREST performs these; the dev server refuses them as Supabase's pg-safeupdate does (POSTGREST.md).
SAFEUPDATE: dict[str, Case] = {
    "unfiltered DELETE": Case("DELETE", "/items", setup=ITEMS, table="items"),
    "unfiltered PATCH": Case("PATCH", "/items", {"name": "q"}, setup=ITEMS, table="items"),
}


@dataclass
class Answer:
    """What one server answered, reduced to what is compared: status, the compared headers, the body's shape (an
    error's code and keys, or the rows, or the JSON as it is) and the case's table afterwards."""

    status: int
    headers: dict[str, str]
    body: Any
    table: Any


@pytest.fixture(scope="module")
def real(devserver: DevServer) -> Iterator[RunningPostgrest]:
    server = start_postgrest(devserver)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def capped_pair(devserver: DevServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(dev server URL, PostgREST URL), both capping reads at MAX_ROWS rows, over the session's database."""
    no_migrations = tmp_path_factory.mktemp("no-migrations")
    dev = launch(["--port", "0", "--pg-url", devserver.pg_url, "--migrations", str(no_migrations), "--schemas",
                  "public,syncd_test", "--jwt-secret", devserver.jwt_secret, "--max-rows", str(MAX_ROWS)])
    postgrest = start_postgrest(devserver, db_max_rows=str(MAX_ROWS))
    yield dev.url, postgrest.url
    postgrest.stop()
    dev.stop()


@pytest.fixture(scope="module")
def tokens(devserver: DevServer) -> dict[str, str]:
    """Bearer tokens by name: good ones for each role and each kind of bad one."""
    secret, now = devserver.jwt_secret, int(time.time())
    return {
        "service": devserver.service_key,
        "authenticated": devserver.token("authenticated"),
        "expired": jwt.encode({"role": "service_role", "exp": now - 120}, secret, algorithm="HS256"),
        "wrong_secret": jwt.encode({"role": "service_role"}, "w" * 40, algorithm="HS256"),
        "garbage": "not-a-token",
        "not_yet": jwt.encode({"role": "service_role", "nbf": now + 3600}, secret, algorithm="HS256"),
        "future": jwt.encode({"role": "service_role", "iat": now + 3600}, secret, algorithm="HS256"),
        "no_such_role": devserver.token("no_such_role"),
        "no_role": jwt.encode({"sub": "someone"}, secret, algorithm="HS256"),
    }


def shape(response: httpx.Response) -> Any:
    """The body as compared: an error object -> its code and sorted keys; other JSON as it is; no body -> None."""
    if not response.content:
        return None
    body = response.json()
    if isinstance(body, dict) and "code" in body:
        return {"code": body["code"], "keys": sorted(body)}
    return body


def table_rows(pg: psycopg.Connection, table: str | None) -> list[Any] | None:
    """Every row of `table` as JSON, in a stable order, without `made` (its default is the time of the insert); None
    without a table."""
    if table is None:
        return None
    rows = pg.execute(f"SELECT to_jsonb(t) - 'made' FROM {table} AS t").fetchall()
    return sorted(json.dumps(row[0], sort_keys=True) for row in rows)


def ask(pg: psycopg.Connection, url: str, case: Case, tokens: dict[str, str]) -> Answer:
    """Set the database up for `case`, send it to the API at `url`, and reduce the answer."""
    pg.execute(f"TRUNCATE {CONFORMANCE_TABLES}, public.bench CASCADE")
    if case.setup:
        pg.execute(case.setup)
    headers = dict(case.headers)
    if case.token is not None:
        headers["Authorization"] = f"Bearer {tokens[case.token]}"
    content = case.body if isinstance(case.body, bytes) or case.body is None else json.dumps(case.body)
    response = httpx.request(case.method, url + case.path, content=content, headers=headers, timeout=30)
    compared = {name: response.headers[name] for name in COMPARED_HEADERS if name in response.headers}
    return Answer(response.status_code, compared, shape(response), table_rows(pg, case.table))


@pytest.mark.parametrize("name", list(CORPUS))
def test_dev_server_answers_as_postgrest(name: str, devserver: DevServer, real: RunningPostgrest,
                                         pg: psycopg.Connection, tokens: dict[str, str]):
    """Status, error code and keys, rows, Content-Range, Preference-Applied and the table afterwards agree."""
    case = CORPUS[name]
    assert ask(pg, devserver.url, case, tokens) == ask(pg, real.url, case, tokens)


@pytest.mark.parametrize("name", list(CAPPED))
def test_max_rows_caps_reads_as_postgrest(name: str, capped_pair: tuple[str, str], pg: psycopg.Connection,
                                          tokens: dict[str, str]):
    """--max-rows 1000 and PGRST_DB_MAX_ROWS=1000 answer a read of 1500 rows alike (status, Content-Range, rows)."""
    dev_url, real_url = capped_pair
    case = CAPPED[name]
    assert ask(pg, dev_url, case, tokens) == ask(pg, real_url, case, tokens)


def test_capped_read_says_what_it_returned(capped_pair: tuple[str, str], pg: psycopg.Connection,
                                           tokens: dict[str, str]):
    """The measured values themselves: 1000 of 1500 rows, 206 with `0-999/1500` counted, 200 `0-999/*` uncounted."""
    dev_url, _ = capped_pair
    counted = ask(pg, dev_url, CAPPED["capped read asking for more"], tokens)
    assert (counted.status, counted.headers["content-range"], len(counted.body)) == (206, "0-999/1500", MAX_ROWS)
    plain = ask(pg, dev_url, CAPPED["capped read"], tokens)
    assert (plain.status, plain.headers["content-range"], len(plain.body)) == (200, "0-999/*", MAX_ROWS)


@pytest.mark.parametrize("name", list(SAFEUPDATE))
def test_unfiltered_write_is_the_one_deliberate_difference(name: str, devserver: DevServer, real: RunningPostgrest,
                                                           pg: psycopg.Connection, tokens: dict[str, str]):
    """PostgREST changes every row; the dev server answers 400 21000 as Supabase (pg-safeupdate) and changes none."""
    case = SAFEUPDATE[name]
    dev, postgrest = ask(pg, devserver.url, case, tokens), ask(pg, real.url, case, tokens)
    assert (dev.status, dev.body["code"]) == (400, "21000")
    assert postgrest.status == 204 and postgrest.table != dev.table


DEFAULTS_TABLE = """CREATE TABLE public.diff_defaults (
    id bigint PRIMARY KEY, serial_no bigserial, by_default bigint GENERATED BY DEFAULT AS IDENTITY,
    always bigint GENERATED ALWAYS AS IDENTITY, derived text GENERATED ALWAYS AS (plain || '!') STORED,
    plain text NOT NULL DEFAULT 'x', five_text text DEFAULT '5', quoted text DEFAULT 'it''s', null_text text DEFAULT
    'null', varying character varying(9) DEFAULT 'v', five integer DEFAULT 5, negative integer DEFAULT -3, ratio
    numeric DEFAULT 1.5, flag boolean NOT NULL DEFAULT true, doc jsonb DEFAULT '{}', day date DEFAULT '2020-01-01',
    made timestamptz NOT NULL DEFAULT now(), uid uuid DEFAULT gen_random_uuid(), counted bigint DEFAULT
    (nextval('diff_defaults_serial_no_seq') + 1), mention text DEFAULT ('nextval' || 'x'), tags text[] DEFAULT '{}',
    required_text text NOT NULL)"""


def test_openapi_defaults_and_required_columns_as_postgrest(devserver: DevServer, real: RunningPostgrest,
                                                            pg: psycopg.Connection):
    """`required` and each column's `default` in the OpenAPI description agree (syncd check and the NOT NULL halt
    of syncd run read them): PostgREST shows no default for a sequence or a generated column, and shows literals
    by their Swagger type (measured on 12.2.12)."""
    pg.execute("DROP TABLE IF EXISTS public.diff_defaults")
    pg.execute(DEFAULTS_TABLE)
    pg.execute("GRANT ALL ON public.diff_defaults TO service_role")
    described = []
    for server in (devserver, real):
        reload_schema(server, "diff_defaults")
        with server.client(server.service_key) as client:
            definition = client.get("/").json()["definitions"]["diff_defaults"]
        described.append((definition["required"],
                          {name: prop.get("default", "(none)") for name, prop in definition["properties"].items()}))
    pg.execute("DROP TABLE public.diff_defaults")
    assert described[0] == described[1]
    assert described[1][1]["serial_no"] == "(none)" and described[1][1]["five"] == 5


@pytest.mark.parametrize("token", ["service", "authenticated", "no_role"])
def test_openapi_describes_only_what_the_role_may_use_as_postgrest(token: str, devserver: DevServer,
                                                                   real: RunningPostgrest, tokens: dict[str, str]):
    """PostgREST's default openapi-mode (follow-privileges) lists the tables the request's role may read or write:
    with the anon key a table granted only to service_role is not described (syncd check and run then ask the
    table itself rather than report it missing)."""
    described = []
    for url in (devserver.url, real.url):
        answer = httpx.get(url + "/", headers={"Authorization": f"Bearer {tokens[token]}"}, timeout=30)
        assert answer.status_code == 200
        described.append(sorted(answer.json()["definitions"]))
    assert described[0] == described[1]
