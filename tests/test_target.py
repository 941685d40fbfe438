"""The PostgREST client: classification of every answer and exception, URL building, and the real dev server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from urllib.parse import parse_qsl

import httpx
import psycopg
import pytest

from syncd import auth
from syncd.devserver.query import parse_in_list, parse_logic
from syncd.target import PostgrestTarget, TargetError, classify, classify_exception, parse_retry_after
from tests.conftest import DevServer

URL = "http://target.test/rest/v1"
Configure = Callable[..., dict[str, object]]


def answer(status: int, body: object = None, headers: dict[str, str] | None = None, *,
           text: str | bytes | None = None, method: str = "POST", table: str = "items") -> httpx.Response:
    request = httpx.Request(method, f"{URL}/{table}")
    if text is not None:
        return httpx.Response(status, content=text, headers=headers, request=request)
    content = b"" if body is None else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers, request=request)


def pgrst(code: str | None, message: str, details: str | None = None, hint: str | None = None) -> dict[str, object]:
    return {"code": code, "details": details, "hint": hint, "message": message}


def error_of(response: httpx.Response) -> TargetError:
    error = classify(response)
    assert error is not None
    return error


# -- classification of answers ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204])
def test_success_is_not_an_error(status: int):
    """Every 2xx, including v12's 200 for an upsert of existing rows, classifies as None."""
    assert classify(answer(status)) is None


@pytest.mark.parametrize(("status", "body", "kind", "code"), [
    (408, None, "transient", None),
    (429, {"message": "Too many requests"}, "transient", None),
    (500, pgrst("XX000", "internal error"), "transient", "XX000"),
    (500, pgrst("40001", "could not serialize access"), "transient", "40001"),
    (500, pgrst("40P01", "deadlock detected"), "transient", "40P01"),
    (502, None, "transient", None),
    (503, pgrst("PGRST000", "Could not connect with the database"), "transient", "PGRST000"),
    (503, pgrst("PGRST001", "Database client error"), "transient", "PGRST001"),
    (503, pgrst("PGRST002", "Could not query the database for the schema cache"), "transient", "PGRST002"),
    (504, pgrst("PGRST003", "Timed out acquiring connection from connection pool."), "transient", "PGRST003"),
    (503, pgrst("53300", "too many connections"), "transient", "53300"),
    (507, None, "transient", None),
    (401, pgrst("PGRST301", "JWT expired"), "auth", "PGRST301"),
    (401, pgrst("PGRST303", "JWT expired"), "auth", "PGRST303"),
    (401, pgrst("PGRST301", "JWSError JWSInvalidSignature"), "config", "PGRST301"),
    (401, pgrst("PGRST302", "Anonymous access is disabled"), "config", "PGRST302"),
    (401, {"message": "Invalid API key"}, "config", None),
    (401, {"message": "No API key found in request"}, "config", None),
    (401, pgrst("42501", "permission denied for table items"), "config", "42501"),
    (403, pgrst("42501", 'new row violates row-level security policy for table "items"'), "config", "42501"),
    (404, {}, "schema", None),
    (404, pgrst("PGRST205", "Could not find the table 'public.items' in the schema cache"), "schema", "PGRST205"),
    (404, pgrst("42P01", 'relation "public.items" does not exist'), "schema", "42P01"),
    (404, {"message": "Not Found"}, "config", None),
    (400, pgrst("42P10", "there is no unique or exclusion constraint matching the ON CONFLICT specification"),
     "config", "42P10"),
    (406, pgrst("PGRST106", "The schema must be one of the following: public"), "config", "PGRST106"),
    (405, pgrst("25006", "cannot execute INSERT in a read-only transaction"), "config", "25006"),
    (301, None, "config", None),
    (409, pgrst("23503", "insert or update on table violates foreign key constraint"), "row", "23503"),
    (409, pgrst("23505", "duplicate key value violates unique constraint"), "row", "23505"),
    (400, pgrst("23502", 'null value in column "name" violates not-null constraint'), "row", "23502"),
    (400, pgrst("23514", 'new row violates check constraint "items_qty_check"'), "row", "23514"),
    (400, pgrst("22P02", 'invalid input syntax for type integer: "abc"'), "row", "22P02"),
    (400, pgrst("22003", "integer out of range"), "row", "22003"),
    (400, pgrst("42703", 'column "nope" of relation "items" does not exist'), "schema", "42703"),
    (400, pgrst("PGRST204", "Could not find the 'nope' column of 'items' in the schema cache"), "schema", "PGRST204"),
    (400, pgrst("PGRST102", "All object keys must match"), "row", "PGRST102"),
    (400, pgrst("21000", "DELETE requires a WHERE clause"), "row", "21000"),
    (413, None, "row", None),
    (414, None, "row", None),
    # the PostgreSQL code decides before the HTTP status: PostgREST 12.2.12 answers 21000 with 500 (measured)
    (500, pgrst("21000", "ON CONFLICT DO UPDATE command cannot affect row a second time"), "row", "21000"),
    (500, pgrst("22008", "date/time field value out of range"), "row", "22008"),
    (502, pgrst("23505", "duplicate key value violates unique constraint"), "row", "23505"),
    (500, pgrst("42883", "operator does not exist: text = integer"), "row", "42883"),
    (500, pgrst("42P01", 'relation "public.items" does not exist'), "schema", "42P01"),
    (500, pgrst("42501", "permission denied for table items"), "config", "42501"),
    (500, pgrst("0A000", "feature not supported"), "transient", "0A000"),
])
def test_answers_are_classified_per_the_failure_model(status: int, body: object, kind: str, code: str | None):
    """Each status/code combination of POSTGREST.md lands in the failure model's class."""
    error = error_of(answer(status, body))
    assert (error.kind, error.status, error.code) == (kind, status, code)


def test_statement_timeout_is_transient_and_flagged():
    """57014 arrives as 500 and tells the worker to halve its batch."""
    error = error_of(answer(500, pgrst("57014", "canceling statement due to statement timeout")))
    assert error.kind == "transient" and error.statement_timeout and not error.foreign_key


def test_foreign_key_violation_is_flagged():
    """23503 is a row error the worker may retry, as the parent may still be on its way."""
    error = error_of(answer(409, pgrst("23503", "violates foreign key constraint")))
    assert error.kind == "row" and error.foreign_key and not error.statement_timeout


def test_message_says_method_table_status_code_message_and_details():
    """The operator reads what the secondary said, prefixed with the method and the table."""
    body = pgrst("23505", 'duplicate key value violates unique constraint "x"', "Key (id)=(1) already exists.")
    error = error_of(answer(409, body, table="artifacts"))
    assert error.message == ('POST artifacts: 409 23505 duplicate key value violates unique constraint "x" '
                             "(Key (id)=(1) already exists.)")
    assert str(error) == error.message


def test_message_carries_the_servers_hint():
    """PostgreSQL's hint is passed on to the operator."""
    error = error_of(answer(400, pgrst("22P02", "bad", hint="use an integer")))
    assert error.message.endswith("Hint: use an integer")


def test_message_decodes_the_percent_encoded_table_name():
    """The table in the message is the real name, not its URL form."""
    error = error_of(answer(409, pgrst("23505", "dup"), method="DELETE", table="my%20t%C3%A4ble"))
    assert error.message.startswith("DELETE my täble: 409 23505")


def test_missing_table_message_says_to_migrate_and_reload():
    """A 404 with v12's empty body still tells the operator what to run."""
    error = error_of(answer(404, {}))
    assert error.message.startswith("POST items: 404")
    assert "migrations" in error.message and "NOTIFY pgrst, 'reload schema'" in error.message


def test_no_unique_constraint_message_says_to_add_one():
    """42P10 names the fix: a unique constraint on the key columns."""
    error = error_of(answer(400, pgrst("42P10", "there is no unique or exclusion constraint")))
    assert "unique constraint" in error.message and "Try:" in error.message


def test_gateway_body_without_code_makes_a_message():
    """Supabase's bare {"message": ...} bodies are reported as they are."""
    error = error_of(answer(401, {"message": "Invalid API key"}))
    assert error.message.startswith("POST items: 401 Invalid API key")


def test_html_error_page_is_classified_by_status_with_a_short_prefix():
    """A proxy's HTML page does not crash classification and shows up, cut short, in the message."""
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 5000 + "</body></html>"
    error = error_of(answer(502, text=page, headers={"Content-Type": "text/html"}))
    assert error.kind == "transient" and error.code is None
    assert "502 Bad Gateway" in error.message and len(error.message) < 400


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b'"oops"', b"{not json"])
def test_bodies_that_are_not_a_json_object_do_not_crash(content: bytes):
    """Binary, array, string or broken JSON bodies fall back to the status."""
    error = error_of(answer(409, text=content))
    assert (error.kind, error.code) == ("row", None)


def test_answer_without_request_has_no_prefix():
    """A response built by hand (never sent) still classifies."""
    error = error_of(httpx.Response(503, json=pgrst("PGRST000", "down")))
    assert error.message.startswith("503 PGRST000")


def test_retry_after_in_seconds():
    """Retry-After delta-seconds becomes retry_after."""
    assert error_of(answer(503, pgrst("PGRST000", "down"), {"Retry-After": "3"})).retry_after == 3.0
    assert error_of(answer(429, None, {"Retry-After": "120"})).retry_after == 120.0


def test_retry_after_as_http_date_is_seconds_from_now():
    """An HTTP date becomes the seconds between now and then."""
    header = formatdate(time.time() + 90, usegmt=True)
    retry_after = error_of(answer(503, None, {"Retry-After": header})).retry_after
    assert retry_after is not None and 85 <= retry_after <= 90


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), (" 2 ", 2.0), ("0", 0.0), ("-5", 0.0), ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
    ("Thu, 01 Jan 2026 00:01:00 GMT", 60.0), ("soon", None), ("", None), (None, None), ("nan", None),
])
def test_parse_retry_after(value: str | None, expected: float | None):
    """Seconds or HTTP dates, never negative; anything unreadable is None."""
    assert parse_retry_after(value, now=1767225600.0) == expected  # 2026-01-01T00:00:00Z


def test_no_retry_after_means_none():
    """Without the header the worker uses its own backoff."""
    assert error_of(answer(504, pgrst("PGRST003", "pool"))).retry_after is None


# -- classification of exceptions ---------------------------------------------------------------------


TRANSIENT_EXCEPTIONS = [httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.CloseError, httpx.NetworkError,
                        httpx.RemoteProtocolError, httpx.ProxyError, httpx.DecodingError, httpx.TimeoutException,
                        httpx.ReadTimeout, httpx.ConnectTimeout, httpx.WriteTimeout, httpx.PoolTimeout]


@pytest.mark.parametrize("exc_type", TRANSIENT_EXCEPTIONS)
def test_transport_failures_are_transient(exc_type: type[httpx.RequestError]):
    """Refused, reset, unanswered or timed-out requests are retried."""
    exc = exc_type("boom", request=httpx.Request("DELETE", f"{URL}/pairs?a=in.(%22x%22)"))
    error = classify_exception(exc)
    assert (error.kind, error.status, error.code) == ("transient", None, None)
    assert error.message.startswith(f"DELETE pairs ({URL}): {exc_type.__name__}: boom")  # where it went


@pytest.mark.parametrize("exc_type", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout])
def test_timeouts_say_the_request_may_have_been_applied(exc_type: type[httpx.TimeoutException]):
    """The operator learns why retrying a maybe-applied request is safe."""
    error = classify_exception(exc_type("timed out"))
    assert "may have been applied" in error.message and "idempotent" in error.message


@pytest.mark.parametrize("exc_type", [httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.LocalProtocolError])
def test_client_side_mistakes_are_config(exc_type: type[httpx.RequestError]):
    """A bad scheme, a redirect loop or a malformed request will not heal by retrying."""
    assert classify_exception(exc_type("bad")).kind == "config"


def test_local_protocol_error_text_is_not_repeated():
    """h11 quotes the bad header value, which may be the token: it stays out of the message."""
    error = classify_exception(httpx.LocalProtocolError("Illegal header value b'Bearer SECRET\\n'"))
    assert "SECRET" not in error.message


def test_http_status_error_is_classified_by_its_response():
    """raise_for_status()'s exception classifies like the answer it carries."""
    response = answer(401, pgrst("PGRST301", "JWT expired"))
    exc = httpx.HTTPStatusError("401", request=response.request, response=response)
    assert classify_exception(exc).kind == "auth"


# -- requests, with a mock transport ------------------------------------------------------------------


class Recorder:
    """A MockTransport handler that records requests and answers with a fixed response."""

    def __init__(self, status: int = 204, body: object = None) -> None:
        self.requests: list[httpx.Request] = []
        self.status, self.body = status, body

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body) if self.body is not None else httpx.Response(self.status)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def target(recorder: Recorder) -> Iterator[PostgrestTarget]:
    with PostgrestTarget(URL, auth.StaticToken("TOKEN"), apikey="APIKEY",
                         transport=httpx.MockTransport(recorder)) as client:
        yield client


def query_of(request: httpx.Request) -> dict[str, str]:
    """The query as PostgREST decodes it (`+` is a space, so a literal one must arrive encoded)."""
    return dict(parse_qsl(request.url.query.decode("ascii"), keep_blank_values=True))


def in_list(request: httpx.Request, column: str) -> list[str]:
    value = query_of(request)[column]
    assert value.startswith("in.")
    return parse_in_list(value[3:], value)


def test_upsert_sends_one_post_with_prefer_and_compact_json(target: PostgrestTarget, recorder: Recorder):
    """One POST with on_conflict, merge-duplicates, minimal return and the exact compact UTF-8 body."""
    rows = [{"id": 1, "name": "é \"q\"", "doc": {"a": [1, 2]}}, {"id": 2, "name": "b", "doc": None}]
    target.upsert("items", ["id"], rows)
    [request] = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{URL}/items?on_conflict=id"
    assert request.headers["prefer"] == "resolution=merge-duplicates, return=minimal"
    assert request.headers["content-type"] == "application/json"
    assert request.content == '[{"id":1,"name":"é \\"q\\"","doc":{"a":[1,2]}},{"id":2,"name":"b","doc":null}]'.encode()


@pytest.mark.parametrize("status", [200, 201])
def test_upsert_accepts_200_and_201(recorder: Recorder, target: PostgrestTarget, status: int):
    """v12 answers 200 when every row existed, v11 always 201: both succeed."""
    recorder.status = status
    target.upsert("items", ["id"], [{"id": 1}])


def test_upsert_of_no_rows_sends_nothing(target: PostgrestTarget, recorder: Recorder):
    """An empty batch is not a request."""
    target.upsert("items", ["id"], [])
    assert recorder.requests == []


def test_on_conflict_quotes_names_with_commas_and_quotes(target: PostgrestTarget, recorder: Recorder):
    """PostgREST splits on_conflict on commas, so such names travel double-quoted and escaped."""
    target.upsert("items", ["a,b", 'say "x"', "plain_col"], [{"a,b": 1, 'say "x"': 2, "plain_col": 3}])
    assert query_of(recorder.requests[0])["on_conflict"] == '"a,b","say \\"x\\"",plain_col'


def test_table_name_is_percent_encoded_in_the_path(target: PostgrestTarget, recorder: Recorder):
    """Spaces, slashes, quotes and non-ASCII letters in a table name stay one path segment."""
    target.upsert('my "t"/é', ["id"], [{"id": 1}])
    assert recorder.requests[0].url.raw_path.startswith(b"/rest/v1/my%20%22t%22%2F%C3%A9?")


def test_unencodable_row_is_a_row_error_before_sending(target: PostgrestTarget, recorder: Recorder):
    """NaN has no JSON form: the batch is bisected to that row, nothing is sent."""
    with pytest.raises(TargetError) as raised:
        target.upsert("items", ["id"], [{"id": 1, "qty": float("nan")}])
    assert raised.value.kind == "row" and "items" in raised.value.message
    assert recorder.requests == []


def test_every_request_carries_token_and_apikey(target: PostgrestTarget, recorder: Recorder):
    """Authorization and apikey on writes; no Content-Profile for the public schema."""
    target.upsert("items", ["id"], [{"id": 1}])
    target.delete("items", ["id"], [{"id": 1}])
    for request in recorder.requests:
        assert request.headers["authorization"] == "Bearer TOKEN"
        assert request.headers["apikey"] == "APIKEY"
        assert "content-profile" not in request.headers


def test_other_schema_sends_content_profile(recorder: Recorder):
    """Writes into a schema other than public name it in Content-Profile, without an apikey if none is set."""
    with PostgrestTarget(URL, auth.StaticToken("T"), schema="syncd_test",
                         transport=httpx.MockTransport(recorder)) as client:
        client.upsert("items", ["id"], [{"id": 1}])
        client.delete("items", ["id"], [{"id": 1}])
    assert [r.headers["content-profile"] for r in recorder.requests] == ["syncd_test", "syncd_test"]
    assert all("apikey" not in r.headers for r in recorder.requests)


def test_token_is_asked_for_on_every_request(recorder: Recorder):
    """A minted token renewed between two requests is the one sent with the second."""
    clock = [1_700_000_000.0]
    tokens = auth.MintedTokens("s" * 40, lifetime=300, renew_before=60, clock=lambda: clock[0])
    with PostgrestTarget(URL, tokens, transport=httpx.MockTransport(recorder)) as client:
        client.upsert("items", ["id"], [{"id": 1}])
        clock[0] += 250
        client.upsert("items", ["id"], [{"id": 1}])
    first, second = (r.headers["authorization"] for r in recorder.requests)
    assert first != second and second == f"Bearer {tokens.token()}"


class Renewable:
    """A token source whose tokens expire until it is told to renew."""

    def __init__(self, renews: bool = True) -> None:
        self.renews, self.refreshed, self.current = renews, 0, "old"

    def token(self) -> str:
        return self.current

    def refresh(self) -> bool:
        self.refreshed += 1
        if self.renews:
            self.current = f"new{self.refreshed}"
        return self.renews


def expire_old_tokens(recorder: Recorder) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        recorder.requests.append(request)
        if request.headers["authorization"] == "Bearer old":
            return httpx.Response(401, json=pgrst("PGRST301", "JWT expired"))
        return httpx.Response(201)
    return answer


def test_expired_token_is_renewed_and_the_request_repeated(recorder: Recorder):
    """401 "JWT expired": renewed once, the same request sent again at once, the renewal announced."""
    tokens, renewed = Renewable(), []
    with PostgrestTarget(URL, tokens, transport=httpx.MockTransport(expire_old_tokens(recorder)),
                         on_renewed=lambda table, error: renewed.append((table, error.kind))) as client:
        client.upsert("items", ["id"], [{"id": 1}])
    assert tokens.refreshed == 1 and renewed == [("items", "auth")]
    assert [r.headers["authorization"] for r in recorder.requests] == ["Bearer old", "Bearer new1"]
    assert recorder.requests[0].content == recorder.requests[1].content


def test_a_token_that_cannot_be_renewed_raises_auth(recorder: Recorder):
    """A fixed key that expired: one request, one try to renew, then the caller gets the auth error."""
    tokens = Renewable(renews=False)
    with PostgrestTarget(URL, tokens, transport=httpx.MockTransport(expire_old_tokens(recorder))) as client, \
            pytest.raises(TargetError) as raised:
        client.delete("items", ["id"], [{"id": 1}])
    assert raised.value.kind == "auth" and tokens.refreshed == 1 and len(recorder.requests) == 1


def test_error_answer_raises_without_the_token_or_apikey(recorder: Recorder, target: PostgrestTarget):
    """Even a body that echoes the secrets does not carry them into the exception."""
    recorder.status, recorder.body = 400, pgrst("22P02", "invalid input: TOKEN and APIKEY")
    with pytest.raises(TargetError) as raised:
        target.upsert("items", ["id"], [{"id": 1}])
    assert raised.value.kind == "row"
    assert "TOKEN" not in str(raised.value) and "APIKEY" not in repr(raised.value)


def test_transport_exception_becomes_transient_without_its_chain(target: PostgrestTarget):
    """The httpx exception (holding the request and its Authorization header) is not chained."""
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    target._client = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(TargetError) as raised:
        target.delete("items", ["id"], [{"id": 1}])
    assert raised.value.kind == "transient" and "Connection refused" in raised.value.message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_url_must_be_http_without_query():
    """A target URL with another scheme or a query string is refused up front."""
    for url in ("ftp://h/rest/v1", "http://h/rest/v1?x=1"):
        with pytest.raises(ValueError, match="target URL"):
            PostgrestTarget(url, auth.StaticToken("T"))


def test_delete_quotes_every_value_in_the_in_list(target: PostgrestTarget, recorder: Recorder):
    """Commas, quotes, backslashes, parentheses, non-ASCII, `+`, `;` and `null` come back unchanged."""
    values = ["a,b", 'say "hi"', "back\\slash", "(x)", "é", "1+1;x=2&y", "null", "a.b:c", " sp "]
    assert target.delete("items", ["id"], [{"id": v} for v in values]) == 1
    [request] = recorder.requests
    assert request.method == "DELETE"
    assert in_list(request, "id") == values
    raw = request.url.query.decode("ascii")
    assert '"' not in raw and "+" not in raw and ";" not in raw and "&" not in raw[len("id="):]


def test_delete_renders_numbers_and_booleans(target: PostgrestTarget, recorder: Recorder):
    """ints and floats by repr, booleans as true/false, each quoted."""
    target.delete("items", ["id"], [{"id": 1}, {"id": -2}, {"id": 2.5}, {"id": 1e20}, {"id": True}, {"id": False}])
    assert query_of(recorder.requests[0])["id"] == 'in.("1","-2","2.5","1e+20","true","false")'


def test_delete_refuses_a_null_key(target: PostgrestTarget, recorder: Recorder):
    """A None key is a caller bug, never rendered as a filter."""
    with pytest.raises(TypeError):
        target.delete("items", ["id"], [{"id": None}])
    assert recorder.requests == []


def test_composite_delete_uses_an_or_of_ands(target: PostgrestTarget, recorder: Recorder):
    """Each key becomes and(k1.eq."v",k2.eq."w") inside one or=(...)."""
    target.delete("pairs", ["a", "b"], [{"a": "x,y", "b": 1}, {"a": 'q"', "b": 2}])
    assert query_of(recorder.requests[0]) == {"or": '(and(a.eq."x,y",b.eq."1"),and(a.eq."q\\"",b.eq."2"))'}


def test_composite_delete_decodes_back_to_the_keys(target: PostgrestTarget, recorder: Recorder):
    """The dev server's own parser reads the or-tree back into exactly the keys sent."""
    keys = [{"a": v, "b": i} for i, v in enumerate(["a,b", 'say "hi"', "back\\slash", "(x)", "é"])]
    target.delete("pairs", ["a", "b"], keys)
    tree = parse_logic("or", query_of(recorder.requests[0])["or"])
    decoded = [{leaf.column: leaf.value for leaf in branch.children} for branch in tree.children]
    assert decoded == [{"a": k["a"], "b": str(k["b"])} for k in keys]


@pytest.mark.parametrize(("column", "expected"), [
    ("a.b", '("a.b".in.("1"))'), ("order", "(order.in.(\"1\"))"), ('we"ird', '("we\\"ird".in.("1"))'),
])
def test_single_key_postgrest_would_misread_goes_in_a_logic_tree(target: PostgrestTarget, recorder: Recorder,
                                                                 column: str, expected: str):
    """A key column with a dot, a quote or a reserved name is filtered through or=(...), quoted as needed."""
    target.delete("items", [column], [{column: 1}])
    assert query_of(recorder.requests[0]) == {"or": expected}


def test_plain_column_with_spaces_is_a_direct_filter(target: PostgrestTarget, recorder: Recorder):
    """PostgREST reads letters, digits, inner spaces, `_`, `$` and `-` as a name: no quoting needed."""
    target.delete("items", ["my col-é$"], [{"my col-é$": 1}])
    assert query_of(recorder.requests[0]) == {"my col-é$": 'in.("1")'}


def test_empty_key_list_sends_nothing(target: PostgrestTarget, recorder: Recorder):
    """No keys: no request at all, and certainly no unfiltered DELETE."""
    assert target.delete("items", ["id"], []) == 0
    assert recorder.requests == []


@pytest.mark.parametrize("key", [["id"], ["a", "b"]])
def test_delete_splits_keys_over_urls_within_the_limit(recorder: Recorder, key: list[str]):
    """Many keys and a 300-byte limit: several requests, each URL short enough, every key exactly once."""
    keys = [{column: f"v,{i}\"é" for column in key} for i in range(120)]
    with PostgrestTarget(URL, auth.StaticToken("T"), max_url_bytes=300,
                         transport=httpx.MockTransport(recorder)) as client:
        sent = client.delete("items", key, keys)
    assert sent == len(recorder.requests) > 1
    assert all(len(str(r.url)) <= 300 for r in recorder.requests)
    if key == ["id"]:
        seen = [v for r in recorder.requests for v in in_list(r, "id")]
    else:
        trees = [parse_logic("or", query_of(r)["or"]) for r in recorder.requests]
        seen = [branch.children[0].value for tree in trees for branch in tree.children]
    assert seen == [k[key[0]] for k in keys]


def test_split_urls_fill_up_to_the_limit(recorder: Recorder):
    """Splitting packs greedily: no two consecutive requests would have fitted in one."""
    with PostgrestTarget(URL, auth.StaticToken("T"), max_url_bytes=200,
                         transport=httpx.MockTransport(recorder)) as client:
        client.delete("items", ["id"], [{"id": i} for i in range(500)])
    lengths = [len(str(r.url)) for r in recorder.requests]
    assert all(200 - 12 < n <= 200 for n in lengths[:-1])


def test_key_too_long_for_any_url_is_a_row_error(recorder: Recorder):
    """A key that alone overflows the limit fails as a row error naming the table; nothing is sent."""
    with PostgrestTarget(URL, auth.StaticToken("T"), max_url_bytes=300,
                         transport=httpx.MockTransport(recorder)) as client, pytest.raises(TargetError) as raised:
        client.delete("items", ["id"], [{"id": "ok"}, {"id": "x" * 400}])
    assert raised.value.kind == "row"
    assert "items" in raised.value.message and "too long for a URL" in raised.value.message
    assert recorder.requests == []


@pytest.mark.parametrize("status", [200, 204])
def test_delete_accepts_200_and_204(recorder: Recorder, target: PostgrestTarget, status: int):
    """204 (no body) and 200 (a representation) both mean deleted."""
    recorder.status = status
    assert target.delete("items", ["id"], [{"id": 1}]) == 1


# -- against the real dev server ----------------------------------------------------------------------


@pytest.fixture
def live(devserver: DevServer, clean: None) -> Iterator[PostgrestTarget]:
    with PostgrestTarget(devserver.url, auth.StaticToken(devserver.service_key)) as client:
        yield client


def live_error(call: Callable[[], object]) -> TargetError:
    with pytest.raises(TargetError) as raised:
        call()
    return raised.value


def test_live_upsert_inserts_then_updates(devserver: DevServer, live: PostgrestTarget, pg: psycopg.Connection,
                                          faults: Configure):
    """First upsert inserts (201), the second merges (200); only the sent columns change."""
    live.upsert("items", ["id"], [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}])
    live.upsert("items", ["id"], [{"id": 1, "name": "A", "qty": 10}, {"id": 2, "name": "B", "qty": 20}])
    assert pg.execute("SELECT id, name, qty, note FROM items ORDER BY id").fetchall() == [
        (1, "A", 10, "none"), (2, "B", 20, "none")]
    assert httpx.get(f"{devserver.root}/_dev/stats").json()["requests"] == {"POST": {"201": 1, "200": 1}}


def test_live_upsert_composite_key_and_other_schema(devserver: DevServer, live: PostgrestTarget,
                                                    pg: psycopg.Connection):
    """on_conflict with two columns, and Content-Profile into syncd_test."""
    live.upsert("pairs", ["a", "b"], [{"a": "x,y", "b": 1, "v": "1"}])
    live.upsert("pairs", ["a", "b"], [{"a": "x,y", "b": 1, "v": "2"}])
    with PostgrestTarget(devserver.url, auth.StaticToken(devserver.service_key), schema="syncd_test") as other:
        other.upsert("items", ["id"], [{"id": 7, "label": "é"}])
    assert pg.execute("SELECT a, b, v FROM pairs").fetchall() == [("x,y", 1, "2")]
    assert pg.execute("SELECT id, label FROM syncd_test.items").fetchall() == [(7, "é")]


AWKWARD = ["a,b", 'say "hi"', "back\\slash", "(x)", "é", "null", "1+1;x", " "]


def test_live_delete_single_key_with_awkward_values(live: PostgrestTarget, pg: psycopg.Connection):
    """A single text key column (people.email, unique): awkward strings delete exactly their rows."""
    rows = [{"id": i, "email": v} for i, v in enumerate([*AWKWARD, "keep,1", 'keep"2', "a", "b"])]
    live.upsert("people", ["id"], rows)
    assert live.delete("people", ["email"], [{"email": v} for v in AWKWARD]) == 1
    assert pg.execute("SELECT email FROM people ORDER BY id").fetchall() == [("keep,1",), ('keep"2',), ("a",), ("b",)]


def test_live_delete_by_awkward_text_key(live: PostgrestTarget, pg: psycopg.Connection):
    """A text key column: each awkward string matches only its own row."""
    live.upsert("pairs", ["a", "b"], [{"a": v, "b": 1, "v": "x"} for v in [*AWKWARD, "a", "b", "hi"]])
    assert live.delete("pairs", ["a", "b"], [{"a": v, "b": 1} for v in AWKWARD]) == 1
    assert sorted(pg.execute("SELECT a FROM pairs").fetchall()) == [("a",), ("b",), ("hi",)]


def test_live_delete_composite_leaves_other_halves(live: PostgrestTarget, pg: psycopg.Connection):
    """(a, b) must match together: same a with another b survives."""
    live.upsert("pairs", ["a", "b"], [{"a": a, "b": b, "v": None} for a in ("é", "(x)") for b in (1, 2)])
    live.delete("pairs", ["a", "b"], [{"a": "é", "b": 1}, {"a": "(x)", "b": 2}])
    assert sorted(pg.execute("SELECT a, b FROM pairs").fetchall()) == [("(x)", 1), ("é", 2)]


def test_live_delete_of_2000_keys_splits_and_removes_all(live: PostgrestTarget, pg: psycopg.Connection):
    """2,000 text keys exceed 8 KiB of URL: several requests, every row gone, the rest untouched."""
    pg.execute("INSERT INTO pairs SELECT 'key ' || i || ', \"é\"', i, 'v' FROM generate_series(0, 2000) i")
    keys = [{"a": f'key {i}, "é"', "b": i} for i in range(2000)]
    assert live.delete("pairs", ["a", "b"], keys) > 1
    assert pg.execute("SELECT a, b FROM pairs").fetchall() == [('key 2000, "é"', 2000)]


def test_live_delete_of_2000_single_keys(live: PostgrestTarget, pg: psycopg.Connection):
    """The in-list form splits too: 2,000 ids, all deleted, one kept."""
    pg.execute("INSERT INTO items (id, name) SELECT i, 'n' FROM generate_series(1, 2001) i")
    assert live.delete("items", ["id"], [{"id": i} for i in range(1, 2001)]) > 1
    assert pg.execute("SELECT id FROM items").fetchall() == [(2001,)]


def test_live_foreign_key_violation(live: PostgrestTarget):
    """A child without its parent: a row error flagged as FK."""
    error = live_error(lambda: live.upsert("children", ["id"], [{"id": 1, "parent_id": 99, "name": "c"}]))
    assert (error.kind, error.status, error.code, error.foreign_key) == ("row", 409, "23503", True)
    assert error.message.startswith("POST children: 409 23503")


def test_live_check_violation(live: PostgrestTarget):
    """qty < 0 breaks a CHECK constraint: a row error."""
    error = live_error(lambda: live.upsert("items", ["id"], [{"id": 1, "name": "a", "qty": -1}]))
    assert (error.kind, error.code) == ("row", "23514")


def test_live_unique_violation_on_another_column(live: PostgrestTarget):
    """A duplicate email under a different id: a row error."""
    live.upsert("people", ["id"], [{"id": 1, "email": "a@x"}])
    error = live_error(lambda: live.upsert("people", ["id"], [{"id": 2, "email": "a@x"}]))
    assert (error.kind, error.status, error.code) == ("row", 409, "23505")


def test_live_unknown_column(live: PostgrestTarget):
    """A column missing from the target: PGRST204, the table's schema (not the rows')."""
    error = live_error(lambda: live.upsert("items", ["id"], [{"id": 1, "name": "a", "nope": 1}]))
    assert (error.kind, error.status, error.code) == ("schema", 400, "PGRST204")


def test_live_unknown_table(live: PostgrestTarget):
    """A table missing from the schema cache: the table's schema, with the reload hint."""
    error = live_error(lambda: live.upsert("no_such_table", ["id"], [{"id": 1}]))
    assert (error.kind, error.status) == ("schema", 404)
    assert "reload schema" in error.message


def test_live_on_conflict_without_unique_constraint(live: PostgrestTarget):
    """on_conflict on a non-unique column: config (42P10)."""
    error = live_error(lambda: live.upsert("items", ["name"], [{"id": 1, "name": "a"}]))
    assert (error.kind, error.code) == ("config", "42P10")


def test_live_schema_not_exposed(devserver: DevServer, clean: None):
    """Content-Profile naming an unexposed schema: 406 PGRST106, config."""
    with PostgrestTarget(devserver.url, auth.StaticToken(devserver.service_key), schema="hidden") as client:
        error = live_error(lambda: client.upsert("items", ["id"], [{"id": 1}]))
    assert (error.kind, error.status, error.code) == ("config", 406, "PGRST106")


def test_live_statement_timeout(live: PostgrestTarget):
    """57014 from PostgreSQL: transient, and the worker is told to halve the batch."""
    error = live_error(lambda: live.upsert("raiser", ["id"], [{"id": 1, "code": "57014"}]))
    assert (error.kind, error.status, error.statement_timeout) == ("transient", 500, True)


def test_live_anonymous_write_is_refused_as_config(devserver: DevServer, clean: None):
    """The anon key may read items but not write: 401 42501, config (not a row problem)."""
    with PostgrestTarget(devserver.url, auth.StaticToken(devserver.anon_key)) as client:
        error = live_error(lambda: client.upsert("items", ["id"], [{"id": 1, "name": "a"}]))
    assert (error.kind, error.code) == ("config", "42501")


@pytest.mark.parametrize("source", ["static", "minted"])
def test_live_expired_token_is_auth(devserver: DevServer, clean: None, source: str):
    """A token past exp (beyond the 30 s skew): 401 PGRST301 "JWT expired", kind auth."""
    if source == "static":
        tokens: auth.TokenSource = auth.StaticToken(
            auth.mint_token(devserver.jwt_secret, "service_role", expires_in=-120))
    else:
        tokens = auth.MintedTokens(devserver.jwt_secret, clock=lambda: time.time() - 3600)
    with PostgrestTarget(devserver.url, tokens) as client:
        error = live_error(lambda: client.delete("items", ["id"], [{"id": 1}]))
    assert (error.kind, error.status, error.code) == ("auth", 401, "PGRST301")


def test_live_refreshed_token_works_after_expiry(devserver: DevServer, clean: None, pg: psycopg.Connection):
    """The worker's auth path: refresh() after the 401, and the retry goes through."""
    clock = [time.time() - 3600]
    tokens = auth.MintedTokens(devserver.jwt_secret, clock=lambda: clock[0])
    with PostgrestTarget(devserver.url, tokens) as client:
        assert live_error(lambda: client.upsert("items", ["id"], [{"id": 1, "name": "a"}])).kind == "auth"
        clock[0] = time.time()
        assert tokens.refresh() is True
        client.upsert("items", ["id"], [{"id": 1, "name": "a"}])
    assert pg.execute("SELECT count(*) FROM items").fetchone() == (1,)


def test_live_forged_token_is_config(devserver: DevServer, clean: None):
    """A token signed with another secret: 401 PGRST301 without "expired", config; no secret in the message."""
    forged = auth.mint_token("f" * 40, "service_role")
    with PostgrestTarget(devserver.url, auth.StaticToken(forged)) as client:
        error = live_error(lambda: client.upsert("items", ["id"], [{"id": 1, "name": "a"}]))
    assert (error.kind, error.status, error.code) == ("config", 401, "PGRST301")
    assert forged not in error.message and "Try:" in error.message


def test_live_server_down_is_transient_with_retry_after(live: PostgrestTarget, faults: Configure):
    """503 PGRST000 with PostgREST's reconnect backoff in Retry-After."""
    faults(down=True, retry_after=3)
    error = live_error(lambda: live.upsert("items", ["id"], [{"id": 1, "name": "a"}]))
    assert (error.kind, error.status, error.code, error.retry_after) == ("transient", 503, "PGRST000", 3.0)


def test_live_connection_reset_is_transient(live: PostgrestTarget, faults: Configure):
    """The connection closed without an answer: transient, without a status."""
    faults(reset_rate=1)
    error = live_error(lambda: live.delete("items", ["id"], [{"id": 1}]))
    assert error.kind == "transient" and error.status is None


def test_live_rate_limit_is_transient(live: PostgrestTarget, faults: Configure):
    """429 from the server: transient."""
    faults(error_rate=1, error_status=429)
    error = live_error(lambda: live.upsert("items", ["id"], [{"id": 1, "name": "a"}]))
    assert (error.kind, error.status) == ("transient", 429)


def test_live_read_timeout_is_transient_and_the_retry_is_harmless(devserver: DevServer, clean: None,
                                                                  faults: Configure, pg: psycopg.Connection):
    """Applied but unanswered: transient; sending the same upsert again leaves the same single row."""
    faults(timeout_rate=1, delay_ms=1000)
    with PostgrestTarget(devserver.url, auth.StaticToken(devserver.service_key), timeout=0.3) as client:
        error = live_error(lambda: client.upsert("items", ["id"], [{"id": 1, "name": "a"}]))
        assert error.kind == "transient" and "may have been applied" in error.message
        faults(timeout_rate=0, delay_ms=0)
        client.upsert("items", ["id"], [{"id": 1, "name": "a"}])
    assert pg.execute("SELECT id, name FROM items").fetchall() == [(1, "a")]



# -- a request ends at its deadline (issue 19, point 8; ../shared/field-cases/26, encode/httpx#1450) ---------


class Trickle:
    """A loopback HTTP server answering every request with `body` after its headers, `pause` seconds between bytes
    (a slow-loris answer: each read is quick, the whole is not), gzip-encoded when `gzip`."""

    def __init__(self, body: bytes, pause: float, *, gzip: bool = False) -> None:
        import gzip as gzip_module
        import http.server
        import threading

        payload = gzip_module.compress(body) if gzip else body
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if gzip:
                    self.send_header("Content-Encoding", "gzip")
                self.end_headers()
                try:
                    for i in range(len(payload)):
                        self.wfile.write(payload[i:i + 1])
                        self.wfile.flush()
                        if outer.pause:
                            time.sleep(outer.pause)
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.pause = pause
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/rest/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_answer_trickled_a_byte_at_a_time_is_abandoned_at_the_request_deadline():
    trickle = Trickle(b"[]" + b" " * 60, pause=0.1)  # whole in about 6 s; every single read well under the timeout
    try:
        with PostgrestTarget(trickle.url, auth.StaticToken("TOKEN"), timeout=1.0) as target:
            started = time.monotonic()
            with pytest.raises(TargetError) as raised:
                target.send("POST", f"{trickle.url}/items", {}, b"[]")
            took = time.monotonic() - started
    finally:
        trickle.close()
    assert raised.value.kind == "transient" and "within 1 s" in raised.value.message
    assert took < 2.5, took  # the deadline, plus at most one read


def test_an_answer_within_the_deadline_is_read_whole_and_decoded_once():
    body = json.dumps([{"id": i} for i in range(200)]).encode()
    trickle = Trickle(body, pause=0.0, gzip=True)
    try:
        with PostgrestTarget(trickle.url, auth.StaticToken("TOKEN"), timeout=5.0) as target:
            response = target.send("POST", f"{trickle.url}/items", {}, b"[]")
    finally:
        trickle.close()
    assert response.status_code == 201 and response.json() == [{"id": i} for i in range(200)]
