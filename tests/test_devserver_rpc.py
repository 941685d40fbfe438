"""`POST /rpc/<function>` on the dev server and on the real PostgREST 12.2.12, side by side.

Each test creates its own functions (and tables) under a unique prefix in the session's PostgreSQL, reloads both
schema caches, sends the same request to each server (from the same database state when the call writes) and
compares the status, the body (bytes for a success, the parsed JSON for an error) and the headers a client reads;
the measured answer itself is asserted too. The fuzzy hint's own rules are unit-tested at the end, against the
examples of PostgREST's source (Error.hs, noRpcHint).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from syncd.devserver import fuzzy
from tests.conftest import DevServer
from tests.postgrest import SKIP_REASON, RunningPostgrest, binary

needs_postgrest = pytest.mark.skipif(binary() is None, reason=SKIP_REASON)
COMPARED_HEADERS = ("content-type", "content-range", "content-profile", "www-authenticate", "preference-applied")
ROLES = "anon, authenticated, service_role"


@dataclass(frozen=True)
class Answer:
    """One server's answer as compared: status, body (the bytes of a success, the parsed JSON of an error) and the
    headers of COMPARED_HEADERS it sent."""

    status: int
    body: Any
    headers: dict[str, str]

    @property
    def json(self) -> Any:
        return json.loads(self.body) if isinstance(self.body, bytes) else self.body


class Functions:
    """The functions and tables of one test, named `<prefix>_<name>`: created as given, granted, and both servers'
    schema caches reloaded until they serve them; dropped at the end of the test."""

    def __init__(self, pg: psycopg.Connection, servers: tuple[DevServer, RunningPostgrest]) -> None:
        self.pg = pg
        self.servers = servers
        self.prefix = f"rpc_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []  # "function name(args)" or "table name" to drop

    def name(self, short: str) -> str:
        return f"{self.prefix}_{short}"

    def create(self, ddl: str, reload: bool = True) -> None:
        """Run `ddl` (`{p}` stands for the prefix) in one transaction with EXECUTE on every function of the prefix
        granted to anon, authenticated and service_role, then (with `reload`) wait until both servers call
        `<prefix>_ready()`."""
        with self.pg.transaction():
            self.pg.execute(ddl.replace("{p}", self.prefix))
            self.pg.execute(f"CREATE OR REPLACE FUNCTION public.{self.prefix}_ready() RETURNS int LANGUAGE sql AS "
                            "'SELECT 1'")
            for signature in self.signatures():
                self.pg.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {ROLES}")
        if reload:
            self.reload()

    def signatures(self) -> list[str]:
        rows = self.pg.execute("SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.proname LIKE %s",
                               [f"{self.prefix}%"]).fetchall()
        return [row[0] for row in rows]

    def reload(self, timeout: float = 10) -> None:
        """NOTIFY the reload and wait until both servers serve `<prefix>_ready()`: a cache holding it holds
        everything created with it. Raises AssertionError after `timeout` seconds."""
        self.pg.execute("NOTIFY pgrst, 'reload schema'")
        for server in self.servers:
            deadline = time.monotonic() + timeout
            while call(server, f"{self.prefix}_ready", {}).status != 200:
                assert time.monotonic() < deadline, f"{server.url} did not load {self.prefix}_ready()"
                time.sleep(0.05)

    def drop(self) -> None:
        for signature in self.signatures():
            self.pg.execute(f"DROP FUNCTION IF EXISTS {signature}")
        rows = self.pg.execute("SELECT oid::regclass::text FROM pg_class WHERE relname LIKE %s AND relkind = 'r'",
                               [f"{self.prefix}%"]).fetchall()
        for (table,) in rows:
            self.pg.execute(f"DROP TABLE IF EXISTS {table} CASCADE")


@pytest.fixture
def functions(pg: psycopg.Connection, devserver: DevServer, postgrest: RunningPostgrest) -> Iterator[Functions]:
    made = Functions(pg, (devserver, postgrest))
    yield made
    made.drop()


@pytest.fixture
def both(devserver: DevServer, postgrest: RunningPostgrest, pg: psycopg.Connection) -> Callable[..., Answer]:
    """Send one request to the dev server and to PostgREST (running `setup` SQL before each), assert that they
    answer alike, and return the answer."""
    def ask(function: str, body: Any = None, *, method: str = "POST", token: str | None = "service",
            setup: str = "", **options: Any) -> Answer:
        answers = []
        if token == "authenticated":  # one token for both: signed per call, its iat/exp could differ by a second
            token = devserver.token("authenticated", sub="u1")
        for server in (devserver, postgrest):
            if setup:
                pg.execute(setup)
            answers.append(call(server, function, body, method=method, token=token, **options))
        assert answers[0] == answers[1]
        return answers[0]
    return ask


def call(server: DevServer | RunningPostgrest, function: str, body: Any = None, *, method: str = "POST",
         token: str | None = "service", content: bytes | None = None, query: str = "",
         headers: dict[str, str] | None = None) -> Answer:
    """`method /rpc/<function>?query` with `body` as JSON (or the raw `content`) and a token: "service", "anon",
    "authenticated" (sub u1), None for none, or the token itself."""
    sent = dict(headers or {})
    known = {"service": server.service_key, "anon": server.anon_key,
             "authenticated": server.token("authenticated", sub="u1")}
    if token is not None:
        sent["Authorization"] = f"Bearer {known.get(token, token)}"
    if content is None and body is not None:
        content = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    url = f"{server.url}/rpc/{function}" + (f"?{query}" if query else "")
    response = httpx.request(method, url, content=content, headers=sent, timeout=30)
    kept = {name: response.headers[name] for name in COMPARED_HEADERS if name in response.headers}
    if response.status_code >= 300 and response.content:
        return Answer(response.status_code, response.json(), kept)
    return Answer(response.status_code, response.content, kept)


JSON_HEADERS = {"content-type": "application/json; charset=utf-8", "content-range": "0-0/*",
                "content-profile": "public"}
ERROR_HEADERS = {"content-type": "application/json; charset=utf-8"}


# -- calls that succeed -----------------------------------------------------------------------------


@needs_postgrest
def test_scalar_results_are_their_json(functions: Functions, both: Callable[..., Answer]):
    """jsonb, integer and text results: 200, the value as JSON, Content-Range 0-0/*, Content-Profile (two schemas are
    exposed); a value given as a string is cast to the argument's type, and an argument with a default may be left
    out."""
    functions.create("""
        CREATE FUNCTION public.{p}_echo(doc jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT doc';
        CREATE FUNCTION public.{p}_add(a integer, b integer DEFAULT 10) RETURNS integer LANGUAGE sql AS 'SELECT a + b';
        CREATE FUNCTION public.{p}_shout(t text) RETURNS text LANGUAGE sql AS $$SELECT t || '!'$$;
        CREATE FUNCTION public.{p}_nothing() RETURNS integer LANGUAGE sql AS 'SELECT NULL::integer';
    """)
    echoed = both(functions.name("echo"), {"doc": {"a": [1, 2], "b": None}})
    assert (echoed.status, echoed.body, echoed.headers) == (200, b'{"a": [1, 2], "b": null}', JSON_HEADERS)
    assert both(functions.name("add"), {"a": 1, "b": 2}).body == b"3"
    assert both(functions.name("add"), {"a": "1"}).body == b"11"
    assert both(functions.name("add"), {"a": 1, "b": None}).body == b"null"
    assert both(functions.name("shout"), {"t": "hé"}).json == "hé!"
    assert both(functions.name("nothing"), {}).body == b"null"
    assert both(functions.name("nothing"), content=b"").body == b"null"  # an empty body is {}


@needs_postgrest
def test_void_answers_204_without_a_body(functions: Functions, both: Callable[..., Answer]):
    """A void function: 204, no body, no Content-Type, Content-Range 0-0/* (measured), also with Prefer:
    return=minimal, which changes nothing for a call."""
    functions.create("CREATE FUNCTION public.{p}_touch(a integer) RETURNS void LANGUAGE plpgsql AS "
                     "'BEGIN PERFORM a; END'")
    answer = both(functions.name("touch"), {"a": 1})
    assert (answer.status, answer.body, answer.headers) == (204, b"", {"content-range": "0-0/*"})
    assert both(functions.name("touch"), {"a": 1}, headers={"Prefer": "return=minimal"}) == answer


@needs_postgrest
def test_sets_and_rows_are_arrays_and_objects(functions: Functions, both: Callable[..., Answer]):
    """SETOF a scalar and RETURNS TABLE: a JSON array, Content-Range over the rows (`*/*` for none); a single row
    (OUT arguments) an object."""
    functions.create("""
        CREATE FUNCTION public.{p}_upto(n integer) RETURNS SETOF integer LANGUAGE sql AS 'SELECT generate_series(1, n)';
        CREATE FUNCTION public.{p}_pairs(n integer) RETURNS TABLE(i integer, s text) LANGUAGE sql
            AS $$SELECT g, 'x' || g FROM generate_series(1, n) g$$;
        CREATE FUNCTION public.{p}_split(a integer, OUT x integer, OUT y text) LANGUAGE sql AS $$SELECT a, 'y'$$;
    """)
    upto = both(functions.name("upto"), {"n": 3})
    assert (upto.body, upto.headers["content-range"]) == (b"[1, 2, 3]", "0-2/*")
    assert both(functions.name("upto"), {"n": 0}).headers["content-range"] == "*/*"
    assert both(functions.name("pairs"), {"n": 2}).json == [{"i": 1, "s": "x1"}, {"i": 2, "s": "x2"}]
    assert both(functions.name("split"), {"a": 1}).json == {"x": 1, "y": "y"}


@needs_postgrest
def test_arrays_single_json_arguments_and_get(functions: Functions, both: Callable[..., Answer]):
    """An array body calls with its first object; a function with one unnamed jsonb argument takes the whole body;
    GET passes the query parameters as arguments; a VARIADIC argument takes an array."""
    functions.create("""
        CREATE FUNCTION public.{p}_times(a integer, b integer) RETURNS integer LANGUAGE sql AS 'SELECT a * b';
        CREATE FUNCTION public.{p}_whole(jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT $1';
        CREATE FUNCTION public.{p}_count(VARIADIC v integer[]) RETURNS integer LANGUAGE sql
            AS 'SELECT array_length(v, 1)';
    """)
    assert both(functions.name("times"), [{"a": 2, "b": 3}, {"a": 4, "b": 5}]).body == b"6"
    assert both(functions.name("whole"), {"any": ["thing"]}).json == {"any": ["thing"]}
    assert both(functions.name("times"), method="GET", query="a=4&b=5").body == b"20"
    head = both(functions.name("times"), method="HEAD", query="a=4&b=5")
    assert (head.status, head.body) == (200, b"")
    assert both(functions.name("count"), {"v": [1, 2, 3]}).body == b"3"


# -- the caller's role and claims ---------------------------------------------------------------------


@needs_postgrest
def test_runs_as_the_callers_role_with_its_claims_and_rls(functions: Functions, both: Callable[..., Answer]):
    """The call runs after SET LOCAL ROLE with request.jwt.claims (and search_path as PostgREST sets it); a SECURITY
    INVOKER function sees the caller's rows under RLS, a SECURITY DEFINER one (owned by the superuser) all rows."""
    functions.create(f"""
        CREATE FUNCTION public.{{p}}_whoami() RETURNS jsonb LANGUAGE sql STABLE AS $$
            SELECT jsonb_build_object('user', current_user, 'path', current_setting('search_path'),
                                      'claims', current_setting('request.jwt.claims', true)::jsonb)$$;
        CREATE TABLE public.{{p}}_notes (id integer PRIMARY KEY, owner text);
        ALTER TABLE public.{{p}}_notes ENABLE ROW LEVEL SECURITY;
        CREATE POLICY mine ON public.{{p}}_notes
            USING (owner = current_setting('request.jwt.claims', true)::jsonb ->> 'sub');
        GRANT SELECT ON public.{{p}}_notes TO {ROLES};
        INSERT INTO public.{{p}}_notes VALUES (1, 'u1'), (2, 'u2');
        CREATE FUNCTION public.{{p}}_seen() RETURNS bigint LANGUAGE sql STABLE SECURITY INVOKER
            AS 'SELECT count(*) FROM public.{{p}}_notes';
        CREATE FUNCTION public.{{p}}_all() RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER
            AS 'SELECT count(*) FROM public.{{p}}_notes';
    """)
    me = both(functions.name("whoami"), {}, token="authenticated").json
    assert (me["user"], me["claims"]["sub"], me["path"]) == ("authenticated", "u1", '"public", "public"')
    assert both(functions.name("whoami"), {}, token=None).json["claims"] == {"role": "anon"}
    assert both(functions.name("seen"), {}, token="authenticated").body == b"1"
    assert both(functions.name("all"), {}, token="authenticated").body == b"2"


@needs_postgrest
def test_permission_denied_is_401_for_anon_and_403_for_a_role(functions: Functions, both: Callable[..., Answer]):
    """EXECUTE revoked: 42501 "permission denied for function", 401 with WWW-Authenticate: Bearer without a token or
    with the anon key, 403 for authenticated; service_role, still granted, calls it."""
    functions.create("CREATE FUNCTION public.{p}_secret() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    functions.pg.execute(f"REVOKE EXECUTE ON FUNCTION public.{functions.name('secret')}() FROM PUBLIC, anon, "
                         "authenticated")
    denied = {"code": "42501", "details": None, "hint": None,
              "message": f"permission denied for function {functions.name('secret')}"}
    for token in (None, "anon"):
        answer = both(functions.name("secret"), {}, token=token)
        assert (answer.status, answer.body, answer.headers) == (401, denied, {**ERROR_HEADERS,
                                                                              "www-authenticate": "Bearer"})
    assert both(functions.name("secret"), {}, token="authenticated") == Answer(403, denied, ERROR_HEADERS)
    assert both(functions.name("secret"), {}).status == 200


@needs_postgrest
def test_jwt_failures_are_answered_before_the_call(functions: Functions, both: Callable[..., Answer],
                                                   devserver: DevServer):
    """A malformed or expired token: 401 PGRST301 with its WWW-Authenticate, as for tables."""
    functions.create("CREATE FUNCTION public.{p}_one() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    garbage = both(functions.name("one"), {}, token="not-a-token")
    assert (garbage.status, garbage.body["code"]) == (401, "PGRST301")
    expired = jwt.encode({"role": "service_role", "exp": int(time.time()) - 120}, devserver.jwt_secret,
                         algorithm="HS256")
    answer = both(functions.name("one"), {}, token=expired)
    assert (answer.status, answer.body["message"]) == (401, "JWT expired")
    assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token", error_description="JWT expired"'


# -- errors -------------------------------------------------------------------------------------------


@needs_postgrest
def test_unknown_function_or_arguments_is_pgrst202_with_its_hint(functions: Functions,
                                                                 both: Callable[..., Answer]):
    """404 PGRST202 naming the keys given (sorted); the hint guesses the closest function of the schema, or for a
    known name the closest argument list, or is null when nothing is close (PostgREST's fuzzy match)."""
    functions.create("CREATE FUNCTION public.{p}_add(a integer, b integer DEFAULT 10) RETURNS integer "
                     "LANGUAGE sql AS 'SELECT a + b'")
    add = functions.name("add")
    typo = both(f"{add}d", {"a": 1})
    assert (typo.status, typo.headers) == (404, ERROR_HEADERS)
    assert typo.body == {
        "code": "PGRST202", "message": f"Could not find the function public.{add}d(a) in the schema cache",
        "details": f"Searched for the function public.{add}d with parameter a or with a single unnamed json/jsonb "
                   "parameter, but no matches were found in the schema cache.",
        "hint": f"Perhaps you meant to call the function public.{add}"}
    keys = both(add, {"zz": 1, "aa": 2, "B": 3}).body
    assert keys["message"] == f"Could not find the function public.{add}(B, aa, zz) in the schema cache"
    assert keys["hint"] == f"Perhaps you meant to call the function public.{add}(a, b)"
    none = both(add, {}).body
    assert (none["message"], none["hint"]) == (f"Could not find the function public.{add} without parameters in the "
                                               "schema cache", None)
    assert both(add, {"zz": 1}).body["hint"] is None
    assert "without parameters, but" in both(add, method="GET").body["details"]  # GET: no json/jsonb fallback


@needs_postgrest
def test_overloads_that_both_fit_are_pgrst203(functions: Functions, both: Callable[..., Answer]):
    """Two overloads the keys fit: 300 PGRST203 listing both, integer before text."""
    functions.create("""
        CREATE FUNCTION public.{p}_over(a integer) RETURNS text LANGUAGE sql AS $$SELECT 'int'$$;
        CREATE FUNCTION public.{p}_over(a text) RETURNS text LANGUAGE sql AS $$SELECT 'text'$$;
    """)
    over = functions.name("over")
    answer = both(over, {"a": 1})
    assert (answer.status, answer.body["code"]) == (300, "PGRST203")
    assert answer.body["message"] == ("Could not choose the best candidate function between: "
                                      f"public.{over}(a => integer), public.{over}(a => text)")


@needs_postgrest
def test_errors_raised_inside_pass_through_with_the_table_statuses(functions: Functions,
                                                                   both: Callable[..., Answer]):
    """RAISE EXCEPTION: 400 P0001 with its detail and hint; a unique or foreign key violation of a statement inside:
    409 23505 / 23503; a check violation 400 23514; a value that does not cast 400 22P02; a write in a GET (a
    read-only transaction) 405 25006."""
    functions.create("""
        CREATE FUNCTION public.{p}_fail(msg text) RETURNS integer LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION '%', msg USING DETAIL = 'the detail', HINT = 'the hint'; END$$;
        CREATE TABLE public.{p}_parent (id integer PRIMARY KEY);
        CREATE TABLE public.{p}_child (id integer PRIMARY KEY, parent integer REFERENCES public.{p}_parent,
                                       qty integer CHECK (qty > 0));
        GRANT ALL ON public.{p}_parent, public.{p}_child TO service_role;
        CREATE FUNCTION public.{p}_put(id integer, parent integer, qty integer) RETURNS integer LANGUAGE sql
            AS 'INSERT INTO public.{p}_child VALUES (id, parent, qty) RETURNING id';
    """)
    raised = both(functions.name("fail"), {"msg": "boom"})
    assert (raised.status, raised.body) == (400, {"code": "P0001", "details": "the detail", "hint": "the hint",
                                                  "message": "boom"})
    put, parent, child = functions.name("put"), functions.name("parent"), functions.name("child")
    reset = f"TRUNCATE public.{child}, public.{parent}; INSERT INTO public.{parent} VALUES (1)"
    assert both(put, {"id": 1, "parent": 1, "qty": 1}, setup=reset).body == b"1"
    duplicate = both(put, {"id": 1, "parent": 1, "qty": 1}, setup=reset + f"; SELECT public.{put}(1, 1, 1)")
    assert (duplicate.status, duplicate.body["code"]) == (409, "23505")
    orphan = both(put, {"id": 2, "parent": 99, "qty": 1}, setup=reset)
    assert (orphan.status, orphan.body["code"]) == (409, "23503")
    checked = both(put, {"id": 2, "parent": 1, "qty": 0}, setup=reset)
    assert (checked.status, checked.body["code"]) == (400, "23514")
    uncast = both(put, {"id": "x", "parent": 1, "qty": 1}, setup=reset)
    assert (uncast.status, uncast.body["message"]) == (400, 'invalid input syntax for type integer: "x"')
    read_only = both(put, method="GET", query="id=3&parent=1&qty=1", setup=reset)
    assert (read_only.status, read_only.body["code"]) == (405, "25006")


@needs_postgrest
def test_bodies_that_are_not_an_object(functions: Functions, both: Callable[..., Answer]):
    """Not JSON: 400 PGRST102 "Empty or invalid json"; an array of non-objects or of differing keys: 400 PGRST102
    "All object keys must match"; another JSON value calls with no arguments; PUT: 405 PGRST101."""
    functions.create("CREATE FUNCTION public.{p}_times(a integer, b integer) RETURNS integer LANGUAGE sql "
                     "AS 'SELECT a * b'")
    times = functions.name("times")
    invalid = both(times, content=b"not json", headers={"Content-Type": "application/json"})
    assert (invalid.status, invalid.body["code"], invalid.body["message"]) == (400, "PGRST102",
                                                                              "Empty or invalid json")
    for body in ([1, 2], [{"a": 1, "b": 2}, {"a": 1}]):
        assert both(times, body).body["message"] == "All object keys must match"
    assert "without parameters" in both(times, 5).body["message"]
    put = both(times, {"a": 1, "b": 2}, method="PUT")
    assert (put.status, put.body["code"], put.body["message"]) == (405, "PGRST101", "Cannot use the PUT method on RPC")


@needs_postgrest
def test_a_function_is_callable_after_the_reload_signal(functions: Functions, both: Callable[..., Answer]):
    """A function created after the cache loaded is PGRST202 on both until NOTIFY pgrst, 'reload schema'."""
    functions.create("SELECT 1")  # settles any reload still running: the next CREATE comes after the last load
    functions.create("CREATE FUNCTION public.{p}_late() RETURNS integer LANGUAGE sql AS 'SELECT 7'", reload=False)
    assert both(functions.name("late"), {}).body["code"] == "PGRST202"
    functions.reload()
    assert both(functions.name("late"), {}).body == b"7"


@needs_postgrest
def test_profiles_choose_the_schema(functions: Functions, both: Callable[..., Answer]):
    """Content-Profile picks the schema searched (PGRST202 in syncd_test, whose hint is null: no close name there);
    one not exposed is 406 PGRST106."""
    functions.create("CREATE FUNCTION public.{p}_one() RETURNS integer LANGUAGE sql AS 'SELECT 1'")
    elsewhere = both(functions.name("one"), {}, headers={"Content-Profile": "syncd_test"})
    assert (elsewhere.status, elsewhere.body["code"]) == (404, "PGRST202")
    assert elsewhere.body["message"].startswith("Could not find the function syncd_test.")
    assert both(functions.name("one"), {}, headers={"Content-Profile": "nope"}).status == 406


@needs_postgrest
def test_openapi_lists_the_functions_the_role_may_execute(functions: Functions, devserver: DevServer,
                                                          postgrest: RunningPostgrest):
    """GET / lists `/rpc/<name>` with GET's query parameters and POST's body schema as PostgREST 12.2.12 does: the
    comment as summary and description, required arguments, a VARIADIC one repeated, the last overload of a name;
    only the functions the role may execute (EXECUTE revoked from anon hides one from the anon key)."""
    functions.create("""
        CREATE FUNCTION public.{p}_add(a integer, b integer DEFAULT 10) RETURNS integer LANGUAGE sql AS 'SELECT a + b';
        COMMENT ON FUNCTION public.{p}_add(integer, integer) IS E'Adds.\n\nTwo numbers.';
        CREATE FUNCTION public.{p}_count(VARIADIC v integer[]) RETURNS integer LANGUAGE sql AS 'SELECT 1';
        CREATE FUNCTION public.{p}_whole(jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT $1';
        CREATE FUNCTION public.{p}_over(a integer) RETURNS text LANGUAGE sql AS $$SELECT 'int'$$;
        CREATE FUNCTION public.{p}_over(a text, b text[] DEFAULT '{}') RETURNS text LANGUAGE sql AS $$SELECT 'text'$$;
        CREATE FUNCTION public.{p}_secret() RETURNS void LANGUAGE sql AS '';
    """)
    functions.pg.execute(f"REVOKE EXECUTE ON FUNCTION public.{functions.name('secret')}() FROM PUBLIC, anon")
    for key in ("service_key", "anon_key"):
        described = []
        for server in (devserver, postgrest):
            with server.client(getattr(server, key)) as client:
                paths = client.get("/").json()["paths"]
            mine = f"/rpc/{functions.prefix}"
            described.append({path: item for path, item in paths.items() if path.startswith(mine)})
        assert described[0] == described[1]
        assert (f"/rpc/{functions.name('secret')}" in described[0]) == (key == "service_key")
    add = described[0][f"/rpc/{functions.name('add')}"]["post"]
    assert (add["summary"], add["description"]) == ("Adds.", "Two numbers.")
    assert add["parameters"][0]["schema"]["required"] == ["a"]


# -- the fuzzy hint, unit ------------------------------------------------------------------------------


@pytest.mark.parametrize(("candidates", "text", "expected"), [
    (["test", "another"], "testt", "test"),
    (["test", "another"], "other", "another"),
    (["test", "another"], "noclosealternative", None),
    (["(name, param, val)", "(attr, id)"], "(nam, pqaram, vall)", "(name, param, val)"),
    (["(name, param, val)", "(attr, id)"], "(param, val)", "(name, param, val)"),
    (["(name, param, val)", "(attr, id)"], "(attrs, id)", "(attr, id)"),
    (["(name, param, val)", "(attr, id)"], "(id)", "(attr, id)"),
    (["(name, param, val)", "(attr, id)"], "(noclosealternative)", None),
    (["Test"], "TEST", "Test"),
])
def test_fuzzy_best_match_as_postgrest_documents_it(candidates: list[str], text: str, expected: str | None):
    """The examples of PostgREST 12.2.12's noRpcHint doctests (and an exact match ignoring case)."""
    assert fuzzy.best_match(candidates, text) == expected
