"""The secondary: the PostgREST client (bulk upserts and deletes by key), and the one place that classifies failures.

Every answer and every exception of the secondary becomes a `TargetError` of one of five kinds here;
no other module looks at a status code. The worker acts on the kind (DESIGN.md, "Failure model"):
transient -> retry with backoff (honouring `retry_after`); auth -> refresh the token and retry at once;
config -> stop shipping that table and report loudly; schema -> the secondary lacks the table or a column:
halt that table (never its rows) until its schema matches again; row -> bisect the batch down to the
failing rows.

    Transport failures (classify_exception)                        kind
    httpx.HTTPError
    ├── TransportError
    │   ├── TimeoutException: Connect/Read/Write/PoolTimeout       transient (*)
    │   ├── NetworkError: ConnectError, ReadError, WriteError, ...  transient
    │   ├── RemoteProtocolError (connection reset, no answer)      transient
    │   ├── ProxyError                                             transient
    │   ├── LocalProtocolError (e.g. a newline in the key)         config
    │   └── UnsupportedProtocol (the URL's scheme)                 config
    ├── DecodingError                                              transient
    ├── TooManyRedirects                                           config
    └── HTTPStatusError                                            as its response, below

    (*) A timeout after the request was sent may have been applied. That is fine: upserts and deletes
        by key are idempotent, so sending the same request again converges to the same rows.

    Answers (classify)                                             kind
    2xx                                                            success: None
    408, 429, 500, 502, 503, 504                                   transient, with Retry-After
    PGRST000/001/002 (503), PGRST003 (504), any status             transient, with Retry-After
    57014 statement timeout (500)                                  transient, .statement_timeout: halve the batch
    a class 21/22/23/42 code with any status, 5xx included         row (the codes of the next lines excepted)
        (PostgREST 12 answers 21000, one key twice, with 500)
    any other 5xx (40001, 40P01, 53xxx, XX000, ...)                transient
    401 PGRST301/PGRST303 whose message says "expired"             auth: renewed once and resent here
    401/403 otherwise: bad signature, gateway's "Invalid API key"  config
        or "No API key found in request" (bodies without a code),
        42501 missing privilege or RLS denial
    404 (body {}), PGRST205, 42P01: table not in the schema cache  schema: run the migrations, reload the cache
    PGRST204, 42703: a column not in the table                     schema: add the column (or exclude it)
    404 with another body (not PostgREST: a proxy, a wrong path)   config: check the URL
    42P10: no unique constraint matches on_conflict                config: give the key columns one
    405 (read-only transaction, not insertable), 406 (PGRST106     config
        schema not exposed)
    3xx (redirects are not followed: the URL is wrong)             config
    any other 4xx: 23503 FK (.foreign_key, may be only a matter    row
        of order), 23505, 23502, 23514, 22P02 and 22xxx,
        PGRST102 bad body, 21000, 413, 414
    a delete key too long for any URL (raised before sending)      row
    a row that JSON cannot carry (NaN, lone surrogate; raised      row
        before sending)

A body that is not JSON (a proxy's HTML page) is classified by its status alone, and a short prefix of
its text goes into the message. Messages never contain the bearer token or the apikey.

An `auth` answer (the token expired) is handled here, where it arises: the token source renews the token
once and the request is sent again at once; only when it cannot be renewed (a fixed key) does the caller see
the error. `open_target` builds the client and its token source from the configuration, for every command.
"""

from __future__ import annotations

import copy
import email.utils
import functools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from decimal import Decimal
from typing import Literal, cast
from urllib.parse import quote, unquote

import httpx

from syncd import __version__
from syncd.auth import MintedTokens, StaticToken, TokenSource, is_api_key
from syncd.config import Config, ConfigError
from syncd.mapping import encode_row
from syncd.redact import MASK, mask_url, redact, register

Kind = Literal["transient", "auth", "config", "schema", "row"]

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"PGRST000", "PGRST001", "PGRST002", "PGRST003", "57014"})
EXPIRED_CODES = frozenset({"PGRST301", "PGRST303"})
ROW_CLASSES = frozenset({"21", "22", "23", "42"})
MISSING_TABLE_CODES = frozenset({"PGRST205", "42P01"})
MISSING_COLUMN_CODES = frozenset({"PGRST204", "42703"})
NOT_ROW_CODES = MISSING_TABLE_CODES | MISSING_COLUMN_CODES | {"42501", "42P10"}  # the table, the role, the key
CONFIG_EXCEPTIONS = (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.TooManyRedirects)

HINT_DENIED = ("Try: check the service key or JWT secret (and the apikey on Supabase), "
               "and the role's grants and RLS policies on the table.")
HINT_MISSING_TABLE = ("The table is not in the schema cache. Try: run the migrations that create it, "
                      "then NOTIFY pgrst, 'reload schema'.")
HINT_MISSING_COLUMN = ("The secondary lacks a column syncd ships. Try: add it there, then NOTIFY pgrst, "
                       "'reload schema' (or exclude the column in the config); shipping resumes by itself.")
HINT_PLAIN_HTTP = ("The server answered plain HTTP on an https:// URL. Try: use http:// for that port, or the port "
                   "where it speaks TLS.")
HINT_NOT_POSTGREST = "Try: check the target URL (a 404 that is not PostgREST's: the path, or a proxy in front)."
HINT_NO_UNIQUE = "Try: give the target table's key columns a primary key or unique constraint (on_conflict needs one)."
HINT_NOT_WRITABLE = "Try: point syncd at a writable primary and a table (not a read-only view)."
HINT_SCHEMA = "Try: add the schema to PostgREST's db-schemas (Supabase: API settings, exposed schemas)."
HINT_REDIRECT = "Try: check the target URL (https, host, and the /rest/v1 path)."
HINT_TIMEOUT = "(the request may have been applied; retrying is safe, upserts and deletes by key are idempotent)"

# Characters left readable in the query; everything else is percent-encoded. `+` and `;` must never
# travel raw: PostgREST's query parser reads `+` as a space and splits parameters on `;`.
QUERY_SAFE = "(),."
# Names PostgREST reads as its own parameters when they appear as a filter's key.
RESERVED_PARAMS = frozenset({"select", "columns", "on_conflict", "order", "limit", "offset", "and", "or"})
PLAIN_CHARS = frozenset("0123456789_$ ")
TEXT_PREFIX = 200
KEY_PREFIX = 80


class TargetError(Exception):
    """A failed request to the secondary, classified once: the worker acts on `kind` alone."""

    def __init__(self, kind: Kind, message: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"TargetError({self.kind!r}, {self.message!r}, status={self.status}, code={self.code!r})"

    @property
    def foreign_key(self) -> bool:
        """An FK violation: perhaps only a matter of order (the parent is still in the outbox)."""
        return self.code == "23503"

    @property
    def unique_violation(self) -> bool:
        """A unique constraint other than the conflict key refused the row (an upsert resolves the key's own
        conflicts): perhaps only a matter of order (the row that holds the value gives it up later in the batch,
        or in a later one)."""
        return self.code == "23505"

    @property
    def statement_timeout(self) -> bool:
        """The statement hit PostgreSQL's statement_timeout: the batch was too big."""
        return self.code == "57014"


# -- classification -----------------------------------------------------------------------------------


def classify(response: httpx.Response) -> TargetError | None:
    """The TargetError for a PostgREST answer, or None when it succeeded (2xx)."""
    if response.is_success:
        return None
    body = error_body(response)
    code = body.get("code")
    # classified on the text as sent; redacted only for the message (a redaction can cut "JWT expired" in two)
    kind, advice = kind_of(response.status_code, code, body.get("message") or "", postgrest=not (
        body.get("message") and code is None and response.status_code == 404) and not asked_root(response))
    message = where(response) + describe(response.status_code, shown(body))
    if advice:
        message = f"{message} {advice}"
    return TargetError(kind, message, status=response.status_code, code=code,
                       retry_after=parse_retry_after(response.headers.get("retry-after")))


def classify_exception(exc: httpx.HTTPError) -> TargetError:
    """The TargetError for a request that got no answer (or an HTTPStatusError's answer)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return classify(exc.response) or TargetError("transient", where(exc) + str(exc))
    if isinstance(exc, httpx.LocalProtocolError):
        # h11 quotes the offending header value, which may be the token itself
        detail = "the request was malformed (a header value with a newline or a non-ASCII character?)"
    else:
        detail = redact(str(exc)) or "no detail"
    message = f"{where(exc, with_url=True)}{type(exc).__name__}: {detail}"
    if isinstance(exc, httpx.TimeoutException):
        message = f"{message} {HINT_TIMEOUT}"
    if isinstance(exc, CONFIG_EXCEPTIONS):
        return TargetError("config", f"{message} {HINT_REDIRECT}")
    if isinstance(exc, httpx.ConnectError) and "WRONG_VERSION_NUMBER" in str(exc).upper():
        return TargetError("config", f"{message} {HINT_PLAIN_HTTP}")
    return TargetError("transient", message)


def kind_of(status: int, code: str | None, text: str, postgrest: bool = True) -> tuple[Kind, str | None]:
    """The kind of an error answer, and what the operator should do about it (config and schema errors).
    `postgrest`: the body is PostgREST's (a JSON object with a code, or v12's empty `{}` for a missing table)."""
    if code in TRANSIENT_CODES:
        return "transient", None
    if about_the_rows(code):  # before the status: PostgREST 12 answers 21000 (one key twice) with HTTP 500
        return "row", None
    if (status in TRANSIENT_STATUSES or status >= 500) and code not in NOT_ROW_CODES:
        return "transient", None
    if status == 401 and code in EXPIRED_CODES and "expired" in text.lower():
        return "auth", None
    if status in (401, 403) or code == "42501":
        return "config", HINT_DENIED
    if status == 404 and not postgrest:
        return "config", HINT_NOT_POSTGREST
    if status == 404 or code in MISSING_TABLE_CODES:
        return "schema", HINT_MISSING_TABLE
    if code in MISSING_COLUMN_CODES:
        return "schema", HINT_MISSING_COLUMN
    if code == "42P10":
        return "config", HINT_NO_UNIQUE
    if status == 405:
        return "config", HINT_NOT_WRITABLE
    if status == 406 or code == "PGRST106":
        return "config", HINT_SCHEMA
    if status < 400:
        return "config", HINT_REDIRECT
    return "row", None


def about_the_rows(code: str | None) -> bool:
    """Whether a PostgreSQL SQLSTATE is about the rows sent, whatever HTTP status carried it: class 21 (cardinality:
    21000, one conflict key twice in an upsert), 22 (data exception), 23 (integrity constraint), 42 (syntax or
    access) but for the 42 codes that are about the table, the columns, the key or the role (classified apart).
    Source: PostgreSQL's errcodes table (Appendix A); PostgREST 12 maps codes it does not know, 21000 among them,
    to 500 (measured on 12.2.12)."""
    if not code or len(code) != 5 or code in NOT_ROW_CODES:
        return False
    return code[:2] in ROW_CLASSES


def error_body(response: httpx.Response) -> dict[str, str]:
    """PostgREST's code/message/details/hint as text, as sent (not redacted: see `shown`); a body that is not a JSON
    object (a proxy's page) gives a message only: its first TEXT_PREFIX characters, whitespace collapsed."""
    try:
        body = response.json()
    except ValueError:  # also UnicodeDecodeError
        body = None
    if not isinstance(body, dict):
        text = " ".join(response.text.split()) if body is None else json.dumps(body)
        return {"message": text[:TEXT_PREFIX]} if text else {}
    fields = {name: body.get(name) for name in ("code", "message", "details", "hint")}
    return {name: value if isinstance(value, str) else json.dumps(value)
            for name, value in fields.items() if value not in (None, "")}


def excerpt(response: httpx.Response, length: int = 80) -> str:
    """The start of an answer's text for a message: whitespace collapsed, redacted, then cut to `length`."""
    return redact(" ".join(response.text.split()))[:length]


def shown(body: Mapping[str, str]) -> dict[str, str]:
    """`body` fit for a message: every field redacted (a cut that left PARTIAL_RUN characters of a key is caught
    too: `syncd.redact`)."""
    return {name: redact(value) for name, value in body.items()}


def describe(status: int, body: Mapping[str, str]) -> str:
    """`409 23505 duplicate key ... (Key (id)=(1) already exists.) Hint: ...`"""
    parts = [str(status), body.get("code"), body.get("message")]
    if body.get("details"):
        parts.append(f"({body['details']})")
    if body.get("hint"):
        parts.append(f"Hint: {body['hint']}")
    return " ".join(part for part in parts if part)


def where(source: httpx.Response | httpx.HTTPError, *, with_url: bool = False) -> str:
    """`POST items: ` from the request behind an answer or exception (`with_url`: `POST items (http://host/rest/v1):
    `, for a request that got no answer); empty when there is none."""
    try:
        request = source.request
    except RuntimeError:  # built by hand, never sent
        return ""
    table, url = table_of(request.url), str(request.url.copy_with(query=None, fragment=None))
    if not table:  # the API's root: its URL is the whole story
        return f"{request.method} {mask_url(url)}: "
    if with_url:
        return f"{request.method} {table} ({mask_url(url.rsplit('/', 1)[0])}): "
    return f"{request.method} {table}: "


def asked_root(response: httpx.Response) -> bool:
    """Whether the request was for the API's root (the OpenAPI description), where PostgREST never answers 404."""
    try:
        return not table_of(response.request.url)
    except RuntimeError:  # built by hand, never sent
        return False


def table_of(url: httpx.URL | str) -> str:
    """The table a request URL addresses (the last path segment, unquoted)."""
    raw_path = httpx.URL(url).raw_path
    return unquote(raw_path.split(b"?", 1)[0].rsplit(b"/", 1)[-1].decode("ascii"))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; never negative, None if unreadable."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


# -- URLs and bodies ----------------------------------------------------------------------------------


def encode(text: str) -> str:
    """Percent-encode for the path or query; as per-character encoding, lengths add up over concatenation."""
    return quote(text, safe=QUERY_SAFE)


def plain(name: str) -> bool:
    """Whether PostgREST's parser reads `name` unquoted: letters, digits, `_ $`, inner spaces, `-` between."""
    parts = name.split("-")
    return all(part and part == part.strip() and all(c.isalpha() or c in PLAIN_CHARS for c in part)
               for part in parts)


def quoted(text: str) -> str:
    """`"text"` with `\\` and `"` escaped by a backslash, as PostgREST reads quoted values and names."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def field(name: str) -> str:
    """A column name for on_conflict and logic trees; quoted only when PostgREST needs it."""
    return name if plain(name) else quoted(name)


def literal(value: object) -> str:
    """A key value, always quoted (a quoted element is never read as a separator, NULL or a nested list)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int):
        text = str(int(value))
    elif isinstance(value, float):
        text = repr(float(value))
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"a key value must be str, int, float or bool, not {type(value).__name__}")
    return quoted(text)


def keyset_terms(key: Sequence[str], after: Sequence[object]) -> list[str]:
    """The logic-tree terms of "key > after" for a (composite) key: `a.gt.x`, `and(a.eq.x,b.gt.y)`, ..."""
    terms = []
    for i, column in enumerate(key):
        parts = [f"{field(c)}.eq.{literal(v)}" for c, v in zip(key[:i], after[:i], strict=True)]
        parts.append(f"{field(column)}.gt.{literal(after[i])}")
        terms.append(parts[0] if len(parts) == 1 else f"and({','.join(parts)})")
    return terms


def encode_rows(table: str, rows: Sequence[Mapping[str, object] | str]) -> bytes:
    """The JSON array body of an upsert, as UTF-8 bytes; a row given as text is a JSON object already (SQLite
    rendered it) and goes in as it is. Raises TargetError of kind row when a row cannot be sent as JSON (NaN or
    Infinity, a lone surrogate, a value JSON has no type for)."""
    try:
        texts = [row for row in rows if isinstance(row, str)]
        if len(texts) == len(rows):
            return ("[" + ",".join(texts) + "]").encode()
        text = ",".join(row if isinstance(row, str) else encode_row(row) for row in rows)
        return ("[" + text + "]").encode()
    except (TypeError, ValueError) as exc:  # NaN/Infinity, a lone surrogate, a value JSON has no type for
        raise TargetError("row", f"POST {table}: a row cannot be sent as JSON: {exc}") from None




def show_key(key: Sequence[str], values: Mapping[str, object]) -> str:
    """`(a, b)=('x', 1)`, cut short: the operator needs to recognise the key, not read all of it."""
    text = f"({', '.join(key)})=({', '.join(repr(values[column]) for column in key)})"
    return text if len(text) <= KEY_PREFIX else text[:KEY_PREFIX] + "..."


def content_range(header: str) -> tuple[int | None, int | None, int | None]:
    """PostgREST's `Content-Range` of a read: '0-999/2500' -> (0, 999, 2500); '0-999/*' (no count asked) ->
    (0, 999, None); '*/0' (no rows) -> (None, None, 0); anything else -> (None, None, None). Offsets are of the
    rows matching the request's filters (RFC 9110 14.4 with PostgREST's item unit, docs "Pagination and Count")."""
    span, _, total = header.strip().partition("/")
    first, dash, last = span.partition("-")
    bounds = (int(first), int(last)) if dash and first.isdigit() and last.isdigit() else (None, None)
    return (*bounds, int(total) if total.isdigit() else None)


def exact_json(body: bytes) -> object:
    """A read's JSON body with every number exact: a number with a fraction or an exponent as Decimal (numeric and
    jsonb send all their digits, which float64 would round), an integer as int, even one longer than the 4300 digits
    `int()` takes (then as Decimal). None when the body is not JSON."""
    try:
        return json.loads(body, parse_float=Decimal)
    except ValueError:  # not JSON, or an integer past int()'s digit limit: try once more with Decimal integers
        pass
    try:
        return json.loads(body, parse_float=Decimal, parse_int=Decimal)
    except ValueError:
        return None


# -- the client ---------------------------------------------------------------------------------------


DESCRIPTION_SHARED_FOR = 1.0  # seconds a description read for one tenant serves the others


class SharedDescription:
    """The OpenAPI description the scoped views of one target share: the document and when it was read
    (monotonic seconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.document: dict[str, object] | None = None
        self.read_at = 0.0


class PostgrestTarget:
    """Writes to one PostgREST (or Supabase /rest/v1) endpoint; every failure raises a TargetError."""

    def __init__(self, url: str, tokens: TokenSource, *, schema: str = "public", apikey: str | None = None,
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None,
                 max_url_bytes: int = 8192, on_renewed: Callable[[str, TargetError], None] | None = None) -> None:
        """`url` is the PostgREST root (Supabase: .../rest/v1); `timeout` is in seconds, `max_url_bytes` the
        longest URL a DELETE may use. `on_renewed(table, error)` is told each time an expired token was renewed
        and a request to `table` (as named in the secondary) sent again. Raises ValueError when `url` is not
        http(s) or has a query or fragment."""
        base = httpx.URL(url.rstrip("/"))
        if base.scheme not in ("http", "https") or base.query or base.fragment:
            raise ValueError(f"the target URL must be http(s)://host/path without a query, not {url!r}")
        # httpx normalises the host and port; measuring URLs against the normalised base keeps them exact
        self.base = str(base)
        self.schema = schema
        self.max_url_bytes = max_url_bytes
        self.on_renewed = on_renewed
        self._tokens = tokens
        self._apikey = apikey
        self.timeout = timeout
        self._transport = transport
        self._client_made = threading.Lock()
        self.scope: tuple[str, str] | None = None  # (tenant column, tenant id): multi-file mode (`scoped`)
        self.owner = True  # closes the HTTP client (a scoped view shares its owner's)
        self.shared_description: SharedDescription | None = None  # scoped views: one description for all tenants

    def scoped(self, column: str, tenant: str) -> PostgrestTarget:
        """A view of this target for one tenant (multi-file mode), sharing its HTTP client and token: every row
        upserted carries `column` = `tenant` and upserts on the key with `column` added; deletes, reads, verify and
        reconcile see only the rows where `column` = `tenant`. Closing the view leaves the client open."""
        if self.shared_description is None:
            self.shared_description = SharedDescription()
        view = copy.copy(self)
        view.__dict__["_client"] = self._client  # made now: views made later must share the same one
        view.scope, view.owner = (column, tenant), False
        return view

    def scoped_key(self, key: Sequence[str]) -> list[str]:
        """`key` with the tenant column first (the secondary's key in multi-file mode)."""
        if self.scope is None or self.scope[0] in key:
            return list(key)
        return [self.scope[0], *key]

    def scope_filter(self) -> str:
        """The query term restricting a request to the tenant (`col=in.("value")`), or '' without a scope. `in` with
        a quoted element, because PostgREST strips double quotes only inside a list: `eq."b"` compares to the text
        `"b"` with its quotes."""
        if self.scope is None:
            return ""
        column, tenant = self.scope
        return f"{encode(field(column))}=in.({encode(literal(tenant))})"

    def scoped_row(self, row: Mapping[str, object]) -> dict[str, object]:
        """One row as it is shipped: with the tenant column set in multi-file mode (over a same-named source
        column's value), else as it is."""
        return dict(row) if self.scope is None else {**row, self.scope[0]: self.scope[1]}

    def scoped_rows(self, rows: Sequence[Mapping[str, object] | str]) -> Sequence[Mapping[str, object] | str]:
        """`rows` with the tenant column set (last, so it wins over a same-named column of the source's)."""
        if self.scope is None:
            return rows
        column, tenant = self.scope
        member = json.dumps(column) + ":" + json.dumps(tenant)
        return [f"{row[:-1]},{member}}}" if isinstance(row, str) and row != "{}" else
                ("{" + member + "}" if isinstance(row, str) else {**row, column: tenant}) for row in rows]

    @functools.cached_property
    def _client(self) -> httpx.Client:
        """The HTTP client, made at the first request (its TLS context costs ~40 ms of a start that may send none:
        `run --once` with an empty outbox); TLS certificates are always verified."""
        with self._client_made:  # two shipping threads' first requests make one client
            client = cast(httpx.Client | None, self.__dict__.get("_client"))
            if client is None:
                client = self.__dict__["_client"] = httpx.Client(
                    verify=True, timeout=self.timeout, transport=self._transport,
                    headers={"User-Agent": f"syncd/{__version__}"})
            return client

    def __repr__(self) -> str:
        return f"PostgrestTarget({self.base!r}, schema={self.schema!r})"

    def __enter__(self) -> PostgrestTarget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client and its connections (a scoped view: nothing, its owner closes them)."""
        if self.owner and "_client" in self.__dict__:
            self._client.close()

    def upsert(self, table: str, key: Sequence[str], rows: Sequence[Mapping[str, object] | str]) -> None:
        """Insert or update `rows` (dicts, or JSON objects' text) by `key` in one statement (all or none); no
        request for no rows."""
        if not rows:
            return
        url = self.table_url(table)
        key, rows = self.scoped_key(key), self.scoped_rows(rows)
        if key:
            url += "?on_conflict=" + encode(",".join(field(column) for column in key))
        headers = {"Prefer": "resolution=merge-duplicates, return=minimal", "Content-Type": "application/json"}
        self.send("POST", url, headers, encode_rows(table, rows))

    def delete(self, table: str, key: Sequence[str], keys: Sequence[Mapping[str, object]]) -> int:
        """Delete the rows whose `key` columns hold these values ({key column: value} each), in as few requests
        as the URL limit allows; returns how many requests that took. Raises ValueError without key columns."""
        if not keys:
            return 0
        if not key:
            raise ValueError(f"deleting from {table} needs at least one key column")
        urls = self.delete_urls(table, key, keys)
        for url in urls:
            self.send("DELETE", url, {}, None)
        return len(urls)

    def table_url(self, table: str) -> str:
        """The URL of `table` (percent-encoded) below the base URL."""
        return f"{self.base}/{quote(table, safe='')}"

    def delete_urls(self, table: str, key: Sequence[str], keys: Sequence[Mapping[str, object]]) -> list[str]:
        """Filtered DELETE URLs covering every key once, each at most max_url_bytes long."""
        start = self.table_url(table) + "?" + (f"{scope}&" if (scope := self.scope_filter()) else "")
        if len(key) == 1:
            column = key[0]
            items = [encode(literal(values[column])) for values in keys]
            if plain(column) and column not in RESERVED_PARAMS:
                head, tail = encode(column) + "=" + encode("in.("), encode(")")
            else:  # PostgREST would read it as an embedding path or its own parameter: use a logic tree
                head, tail = "or=" + encode(f"({field(column)}.in.("), encode("))")
        else:
            items = [encode("and(" + ",".join(f"{field(c)}.eq.{literal(values[c])}" for c in key) + ")")
                     for values in keys]
            head, tail = "or=" + encode("("), encode(")")
        fixed = len(start) + len(head) + len(tail)
        for values, item in zip(keys, items, strict=True):
            if fixed + len(item) > self.max_url_bytes:
                raise TargetError("row", f"DELETE {table}: the key {show_key(key, values)} is too long for a URL "
                                         f"({fixed + len(item)} bytes, the limit is {self.max_url_bytes})")
        return [start + head + ",".join(chunk) + tail for chunk in self.pack(items, fixed)]

    def pack(self, items: list[str], fixed: int) -> list[list[str]]:
        """Consecutive items, comma-separated, in chunks that keep `fixed` plus the chunk within the limit."""
        chunks: list[list[str]] = [[]]
        size = fixed
        for item in items:
            if chunks[-1] and size + 1 + len(item) > self.max_url_bytes:
                chunks.append([])
                size = fixed
            size += len(item) + (1 if chunks[-1] else 0)
            chunks[-1].append(item)
        return chunks

    def describe(self) -> dict[str, object]:
        """PostgREST's OpenAPI (Swagger 2.0) description of the schema: tables, columns, formats, keys. The views of
        one target (`scoped`: the tenants of multi-file mode, which share the secondary's tables) share one reading
        for up to DESCRIPTION_SHARED_FOR seconds, so that a thousand files opening do not fetch it a thousand times;
        the document is shared: read it, never change it."""
        shared = self.shared_description
        if shared is None:
            return self.fetch_description()
        with shared.lock:  # one fetch at a time: the threads waiting for it take its answer
            if shared.document is None or time.monotonic() - shared.read_at >= DESCRIPTION_SHARED_FOR:
                shared.document, shared.read_at = self.fetch_description(), time.monotonic()
            return shared.document

    def fetch_description(self) -> dict[str, object]:
        """GET the OpenAPI description from PostgREST (see `describe`)."""
        headers = {"Accept": "application/openapi+json"}
        if self.schema != "public":
            headers["Accept-Profile"] = self.schema
        response = self.send("GET", self.base + "/", headers, None)
        try:
            document = response.json()
        except ValueError:
            raise TargetError("config", f"GET {mask_url(self.base)}/: not an OpenAPI document "
                                        f"({excerpt(response)!r}); is the URL the PostgREST root (…/rest/v1)?",
                              status=response.status_code) from None
        return document if isinstance(document, dict) else {}

    def read_page(self, table: str, columns: Sequence[str] | None, key: Sequence[str], *, limit: int,
                  after: Sequence[object] | None = None, equal: Sequence[object] | None = None,
                  count: bool = False) -> tuple[list[dict[str, object]], int | None]:
        """Up to `limit` rows in key order: those whose key comes after `after` (keyset pagination, in the
        secondary's own collation) or equals `equal`; `columns` None (or a name PostgREST cannot take unquoted)
        selects all. Returns (rows as {column: value}, the count of all rows matching, without `limit`, when
        `count` and the server gave it, else None). Numbers with a fraction are Decimal (`exact_json`). Fewer rows
        than `limit` do not mean the end: PostgREST's db-max-rows (Supabase "Max rows") caps every read without an
        error; the count tells."""
        select = ",".join(columns) if columns is not None and all(map(plain, columns)) else "*"
        query = [f"select={encode(select)}", "order=" + encode(",".join(f"{field(c)}.asc" for c in key)),
                 f"limit={limit}"]
        if self.scope is not None:
            query.append(self.scope_filter())
        if after is not None:
            query.append("or=" + encode(f"({','.join(keyset_terms(key, after))})"))
        if equal is not None:
            terms = [f"{field(c)}.eq.{literal(v)}" for c, v in zip(key, equal, strict=True)]
            query.append("and=" + encode(f"({','.join(terms)})"))
        headers = {"Accept": "application/json"}
        if count:
            headers["Prefer"] = "count=exact"
        if self.schema != "public":
            headers["Accept-Profile"] = self.schema
        response = self.send("GET", f"{self.table_url(table)}?{'&'.join(query)}", headers, None)
        rows = exact_json(response.content)
        if not isinstance(rows, list):
            raise TargetError("config", f"GET {table}: expected a JSON array, got {excerpt(response)!r}",
                              status=response.status_code)
        return rows, content_range(response.headers.get("content-range", ""))[2]

    def ping(self, table: str) -> None:
        """The cheapest authenticated read of a table (no rows): reachability, key and grants in one answer."""
        headers = {"Accept": "application/json"}
        if self.schema != "public":
            headers["Accept-Profile"] = self.schema
        scope = self.scope_filter()
        self.send("GET", f"{self.table_url(table)}?limit=0" + (f"&{scope}" if scope else ""), headers, None)

    def call(self, function: str, body: bytes) -> bytes:
        """Call a function of the secondary's schema: POST /rpc/{function} with `body`, a JSON object of its named
        arguments (PostgREST's convention: each key an argument, cast to its type); the answer's body (a function
        returning jsonb answers its value). Raises TargetError; PostgREST answers 404 PGRST202 for a function it
        does not know (or has not loaded into its schema cache yet)."""
        headers = {"Content-Type": "application/json", "Prefer": "return=representation"}
        return self.send("POST", f"{self.base}/rpc/{encode(function)}", headers, body).content

    def probe_conflict_key(self, table: str, key: Sequence[str]) -> None:
        """Upsert no rows by `key`: PostgreSQL still plans ON CONFLICT and answers 42P10 when no unique
        constraint matches those columns. Writes nothing."""
        columns = encode(",".join(field(column) for column in self.scoped_key(key)))
        url = f"{self.table_url(table)}?on_conflict={columns}&columns={columns}"
        headers = {"Prefer": "resolution=merge-duplicates, return=minimal", "Content-Type": "application/json"}
        self.send("POST", url, headers, b"[]")

    def send(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> httpx.Response:
        """One request; a 401 "JWT expired" renews the token once and sends the request again at once.
        Raises TargetError for every failure (classified, secrets redacted)."""
        try:
            return self.send_once(method, url, headers, body)
        except TargetError as error:
            if error.kind != "auth" or not self._tokens.refresh():
                raise
            if self.on_renewed is not None:
                self.on_renewed(table_of(url), error)
            return self.send_once(method, url, headers, body)

    def send_once(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> httpx.Response:
        """One request with the current token, no renewal: the response when it is a 2xx, else raises the classified
        TargetError (token and apikey redacted)."""
        token = self._tokens.token()
        try:
            response = self.exchange(method, url, {**self.headers(token), **headers}, body)
        except httpx.HTTPError as exc:
            # from None: the chained httpx exception holds the request, and with it the Authorization header
            raise self.redacted(classify_exception(exc), token) from None
        error = classify(response)
        if error is not None:
            raise self.redacted(error, token)
        return response

    def exchange(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None) -> httpx.Response:
        """Send a request and read its whole answer within `timeout` seconds from the start: httpx's timeouts are
        per network operation, so an answer trickled a byte at a time would outlast any of them (encode/httpx#1450).
        The answer is read as it arrives and abandoned once the deadline has passed (after at most one more read,
        itself bounded by `timeout`): raises httpx.ReadTimeout, a transient failure like any other timeout."""
        deadline = time.monotonic() + self.timeout
        with self._client.stream(method, url, headers=headers, content=body) as streamed:
            if streamed.is_stream_consumed:  # answered from memory (a test's transport): nothing to wait for
                return streamed
            raw = []
            for chunk in streamed.iter_raw():
                raw.append(chunk)
                self.check_deadline(deadline, streamed.request)
            self.check_deadline(deadline, streamed.request)  # the headers alone may have taken that long
        # Built again from the raw bytes and the original headers, so that it decodes (gzip...) exactly once.
        return httpx.Response(streamed.status_code, headers=streamed.headers, content=b"".join(raw),
                              request=streamed.request, extensions=streamed.extensions)

    def check_deadline(self, deadline: float, request: httpx.Request) -> None:
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout(f"the answer did not arrive whole within {self.timeout:g} s (request_timeout "
                                    "bounds each request as a whole)", request=request)

    def headers(self, token: str) -> dict[str, str]:
        """The headers of every request: the bearer token, the apikey when there is one, and Content-Profile for a
        schema other than public (PostgREST takes a write's schema from it). A Supabase API key (sb_secret_...,
        sb_publishable_...) is no JWT: it goes in `apikey` alone, as Supabase documents, and the gateway gives
        PostgREST the role's token (https://supabase.com/docs/guides/api/api-keys)."""
        if is_api_key(token):
            headers = {"apikey": token}
        else:
            headers = {"Authorization": f"Bearer {token}"}
            if self._apikey:
                headers["apikey"] = self._apikey
        if self.schema != "public":
            headers["Content-Profile"] = self.schema
        return headers

    def redacted(self, error: TargetError, token: str) -> TargetError:
        """The error with any echo of the token or apikey, whole or in part, blanked out (no secret in a message,
        ever)."""
        register(token, self._apikey)
        message = redact(error.message)
        for secret in (token, self._apikey):  # this request's own, even one too short for the registry
            if secret:
                message = message.replace(secret, MASK)
        error.message = message
        error.args = (error.message,)
        return error


# -- built from the configuration ---------------------------------------------------------------------


def token_source(config: Config) -> TokenSource:
    """Mint short-lived service_role tokens when the JWT secret is known, else send the service key.
    Raises ConfigError when there is neither."""
    target = config.target
    if target.jwt_secret is not None:
        return MintedTokens(target.jwt_secret.get_secret_value())
    if target.service_key is not None:
        return StaticToken(target.service_key.get_secret_value())
    raise ConfigError("invalid configuration (1 problem):", [
        "target.service_key: missing; set SUPABASE_SERVICE_KEY (or service_key_file), or SUPABASE_JWT_SECRET "
        "so syncd mints its own service_role tokens"])


def open_target(config: Config, tokens: TokenSource | None = None,
                on_renewed: Callable[[str, TargetError], None] | None = None) -> PostgrestTarget:
    """The PostgREST client every command that talks to the secondary uses, built from the configuration
    (`tokens`: default `token_source(config)`). Raises ConfigError when no credential is configured."""
    apikey = config.target.effective_apikey
    target = PostgrestTarget(config.target.url, tokens or token_source(config), schema=config.target.schema_name,
                             apikey=apikey.get_secret_value() if apikey else None,
                             timeout=config.worker.request_timeout, on_renewed=on_renewed)
    if config.tenant is None:
        return target
    scoped = target.scoped(config.source.tenant_column, config.tenant)
    scoped.owner = True  # the only view of its own client: closing it closes the client
    return scoped
