"""One PostgREST request = one transaction under the caller's role.

`Api.handle` authenticates, finds the table in the schema cache, turns the URL and body into one SQL
statement, and runs it after `SET LOCAL ROLE` and `request.jwt.claims` (PostgREST does both with
`set_config(..., true)`, which is `SET LOCAL`). Every failure leaves as a PostgREST error body.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg_pool

from syncd.devserver import errors, openapi, query, rpc
from syncd.devserver.errors import ApiError
from syncd.devserver.http import Request, Response
from syncd.devserver.identity import Identity, check_apikey, identify
from syncd.devserver.schema import SchemaCache, Table
from syncd.devserver.sqltext import ident, raw

JSON = {"Content-Type": "application/json; charset=utf-8"}
OPENAPI = {"Content-Type": "application/openapi+json; charset=utf-8"}
SETUP_SQL = (
    "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
    " set_config('request.method', %s, true), set_config('request.path', %s, true),"
    " set_config('request.headers', %s, true)"
)
RANGE = re.compile(r"\s*(\d+)-(\d*)\s*")


@dataclass
class ApiSettings:
    """How the API behaves: the JWT secret it verifies tokens with, the exposed schemas (the first is the default),
    the role of a request without a token, whether Supabase's gateway apikey check applies, the URL the OpenAPI
    description names, and the cap on the rows of a read (`--max-rows`)."""

    jwt_secret: str
    schemas: list[str]
    anon_role: str = "anon"
    require_apikey: bool = False
    public_url: str = "http://127.0.0.1:54321/rest/v1"
    max_rows: int | None = None  # PostgREST's db-max-rows: every read capped at this many rows, without an error


@dataclass
class Outcome:
    """What the one SQL statement of a request returned."""

    affected: int
    inserted: int | None = None
    total: int | None = None
    body: str | None = None


def prefer(request: Request) -> dict[str, str]:
    """`Prefer: return=minimal, resolution=merge-duplicates` -> {"return": "minimal", ...}."""
    found = {}
    for item in request.headers.get("prefer", "").split(","):
        key, _, value = item.strip().partition("=")
        if key:
            found[key.strip()] = value.strip()
    return found


def error_response(error: ApiError) -> Response:
    """An ApiError as PostgREST answers it: status, JSON body and headers."""
    return Response(error.status, error.body(), {**JSON, **error.headers})


VISIBLE_SQL = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
  AND has_table_privilege(%(role)s, c.oid, 'SELECT, INSERT, UPDATE, DELETE')
"""


class Api:
    """The PostgREST API over a pool of `authenticator` connections: one request, one transaction under the caller's
    role."""

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, settings: ApiSettings) -> None:
        self.pool = pool
        self.settings = settings
        self.cache = SchemaCache(settings.schemas)

    async def handle(self, request: Request) -> Response:
        """Answer one API request (its path below the prefix); an ApiError becomes PostgREST's error answer."""
        try:
            return await self.dispatch(request)
        except ApiError as error:
            return error_response(error)

    async def dispatch(self, request: Request) -> Response:
        """Authenticate, choose the schema and the table, and run the method's handler (`GET /` answers the OpenAPI
        description). Raises ApiError."""
        authorization = request.headers.get("authorization")
        if self.settings.require_apikey:
            apikey = request.headers.get("apikey")
            check_apikey(apikey, self.settings.jwt_secret)
            authorization = authorization or f"Bearer {apikey}"
        identity = identify(authorization, self.settings.jwt_secret, self.settings.anon_role)
        schema = self.schema_of(request)
        if request.path.rstrip("/") == "":
            if request.method not in ("GET", "HEAD"):
                raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
            visible, routines = await self.visible(schema, identity.role)
            document = openapi.describe(self.cache, schema, self.settings.public_url, visible, routines)
            return Response(200, json.dumps(document).encode(), OPENAPI)
        if request.path.startswith(rpc.PREFIX):
            return await self.invoke(request, schema, identity)
        handler = {"GET": self.read, "HEAD": self.read, "POST": self.insert,
                   "PATCH": self.update, "DELETE": self.delete}.get(request.method)
        if handler is None:
            raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {request.method}")
        q = query.parse(request.query)
        name = request.path.strip("/")
        table = self.cache.table(schema, name)
        if table is None:
            raise missing_table(request, schema, name, q)
        return await handler(request, table, identity, q)

    async def visible(self, schema: str, role: str) -> tuple[set[str], list[rpc.Routine]]:
        """The tables of `schema` that `role` may read or write, and the functions it may execute: PostgREST's default
        `openapi-mode` (follow-privileges) describes only those
        (https://postgrest.org/en/v12/references/configuration.html). Like PostgREST 12.2.12 the functions are read
        afresh, not from the schema cache (its accessibleFuncs)."""
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(VISIBLE_SQL, {"role": role, "schema": schema})).fetchall()
            routines = await rpc.load(conn, [schema], executable_by=role)
            await conn.rollback()
        return {name for (name,) in rows}, [r for overloads in routines.values() for r in overloads]

    def schema_of(self, request: Request) -> str:
        """The schema a request addresses: its Accept-Profile (GET, HEAD) or Content-Profile (writes) header, default
        the first exposed one. Raises ApiError 406 PGRST106 for one not exposed."""
        header = "accept-profile" if request.method in ("GET", "HEAD") else "content-profile"
        schema = request.headers.get(header, self.settings.schemas[0]).strip()
        if schema not in self.settings.schemas:
            raise errors.schema_not_exposed(self.settings.schemas)
        return schema

    # -- reads ------------------------------------------------------------------------------------

    async def read(self, request: Request, table: Table, identity: Identity, q: query.Query) -> Response:
        """GET, HEAD: the filtered, ordered page as a JSON array, with Content-Range (and the total under Prefer:
        count=exact)."""
        offset, limit = self.page_bounds(request, q, self.settings.max_rows)
        params: list[object] = []
        page = (f"SELECT {query.select_sql(q.select, table)} FROM {table.qualified}"
                f" WHERE {query.where_sql(q.where, table, params)}{query.order_sql(q.order, table)}")
        page += f" LIMIT {limit}" if limit is not None else ""
        page += f" OFFSET {offset}" if offset else ""
        total_sql = "NULL::bigint"
        if prefer(request).get("count") == "exact":
            count_params: list[object] = []
            total_sql = (f"(SELECT count(*) FROM {table.qualified}"
                         f" WHERE {query.where_sql(q.where, table, count_params)})")
            params = count_params + params
        sql = (f"SELECT count(*), NULL, {total_sql}, coalesce(json_agg(_pgrst_t), '[]')::text"
               f" FROM ({page}) AS _pgrst_t")
        outcome = await self.run(request, identity, sql, params)
        applied = {"Preference-Applied": "count=exact"} if prefer(request).get("count") == "exact" else {}
        status, content_range = range_status(offset, outcome.affected, outcome.total, applied)
        headers = {**JSON, "Content-Range": content_range, **applied}
        return Response(status, (outcome.body or "[]").encode(), headers)

    @staticmethod
    def page_bounds(request: Request, q: query.Query, max_rows: int | None = None) -> tuple[int, int | None]:
        """(offset, limit or None) from `offset`, `limit`, a `Range: first-last` header in items and `max_rows`,
        whichever is narrowest. Raises ApiError 416 PGRST103 for a negative limit or a Range whose last item comes
        before its first (PostgREST 12's answers, measured)."""
        offset, limit = q.offset, q.limit
        if limit is not None and limit < 0:
            raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                           "Limit should be greater than or equal to zero.")
        match = RANGE.fullmatch(request.headers.get("range", ""))
        if match and request.headers.get("range-unit", "items") == "items":
            offset = max(offset, int(match[1]))
            if match[2]:
                span = int(match[2]) - int(match[1]) + 1
                if span < 1:
                    raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                                   "The lower boundary must be lower than or equal to the upper boundary in the "
                                   "Range header.")
                limit = span if limit is None else min(limit, span)
        if max_rows is not None:
            limit = max_rows if limit is None else min(limit, max_rows)
        return offset, limit

    # -- writes -----------------------------------------------------------------------------------

    async def insert(self, request: Request, table: Table, identity: Identity, q: query.Query) -> Response:
        """POST: insert one object or an array of them (an upsert with Prefer: resolution=...); 201, or 200 when an
        upsert inserted nothing."""
        payload = parse_body(request.body)
        rows = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(row, dict) for row in rows):
            raise errors.invalid_body("All object keys must match")
        columns = q.columns if q.columns is not None else keys_of(rows)
        check_columns(columns, table)
        prefs = prefer(request)
        resolution = prefs.get("resolution")
        representation = prefs.get("return") == "representation"
        source = self.insert_source(table, columns, prefs.get("missing") == "default")
        column_list = f" ({', '.join(map(ident, columns))})" if columns else ""
        insert = f"INSERT INTO {table.qualified} AS _pgrst_target{column_list} {source}"
        insert += conflict_clause(table, columns, q.on_conflict, resolution)
        text = request.body.decode("utf-8")
        body_json = text if isinstance(payload, list) else f"[{text}]"
        if representation or resolution == "merge-duplicates":
            body_sql = representation_sql(q, table) if representation else "NULL"
            sql = (f"WITH _pgrst_rows AS ({insert} RETURNING _pgrst_target.*,"
                   f" (_pgrst_target.xmax = 0) AS _pgrst_inserted)"
                   f" SELECT count(*), count(*) FILTER (WHERE _pgrst_inserted), NULL, {body_sql} FROM _pgrst_rows")
            outcome = await self.run(request, identity, sql, [body_json])
        else:
            outcome = await self.run(request, identity, insert, [body_json])
            outcome.inserted = outcome.affected
        # PostgREST 12 answers 200 only for a merge that inserted nothing (ignore-duplicates: 201 always; measured).
        status = 200 if resolution == "merge-duplicates" and not outcome.inserted else 201
        return self.write_response(status, outcome, prefs, representation, counted=False)

    @staticmethod
    def insert_source(table: Table, columns: list[str], missing_default: bool) -> str:
        """The SELECT that feeds the INSERT from the JSON body (the `%s` parameter) through
        `json_populate_recordset`; with `missing_default` (Prefer: missing=default) a key absent from an object takes
        the column's default instead of NULL."""
        names = ", ".join(f"_pgrst_rec.{ident(c)}" for c in columns)
        if not missing_default:
            return f"SELECT {names} FROM json_populate_recordset(NULL::{table.qualified}, %s::json) AS _pgrst_rec"
        exprs = []
        for name in columns:
            default = table.columns[name].default
            value = f"_pgrst_rec.{ident(name)}"
            key = name.replace("'", "''").replace("%", "%%")
            exprs.append(f"CASE WHEN _pgrst_obj::jsonb ? '{key}' THEN {value} ELSE {raw(default)} END"
                         if default is not None else value)
        return (f"SELECT {', '.join(exprs)} FROM json_array_elements(%s::json) AS _pgrst_obj,"
                f" LATERAL json_populate_record(NULL::{table.qualified}, _pgrst_obj) AS _pgrst_rec")

    async def update(self, request: Request, table: Table, identity: Identity, q: query.Query) -> Response:
        """PATCH: update the filtered rows from the body's one object; a filter is required (400 21000)."""
        row = parse_body(request.body)
        if not isinstance(row, dict):
            raise errors.invalid_body("A PATCH body must be a single JSON object")
        check_columns(list(row), table)
        if not q.where:
            raise ApiError(400, "21000", "UPDATE requires a WHERE clause")
        prefs = prefer(request)
        representation = prefs.get("return") == "representation"
        if not row:
            return Response(204, b"", {"Content-Range": "*/*"})
        params: list[object] = [request.body.decode("utf-8")]
        assignments = ", ".join(f"{ident(c)} = _pgrst_body.{ident(c)}" for c in row)
        sql = (f"UPDATE {table.qualified} SET {assignments}"
               f" FROM (SELECT * FROM json_populate_record(NULL::{table.qualified}, %s::json)) AS _pgrst_body"
               f" WHERE {query.where_sql(q.where, table, params)}")
        outcome = await self.run(request, identity, self.returning(sql, table, q, representation), params)
        return self.write_response(200 if representation else 204, outcome, prefs, representation)

    async def delete(self, request: Request, table: Table, identity: Identity, q: query.Query) -> Response:
        """DELETE: delete the filtered rows; a filter is required (400 21000)."""
        if not q.where:
            raise ApiError(400, "21000", "DELETE requires a WHERE clause")
        prefs = prefer(request)
        representation = prefs.get("return") == "representation"
        params: list[object] = []
        sql = f"DELETE FROM {table.qualified} WHERE {query.where_sql(q.where, table, params)}"
        outcome = await self.run(request, identity, self.returning(sql, table, q, representation), params)
        return self.write_response(200 if representation else 204, outcome, prefs, representation, counted=False)

    @staticmethod
    def returning(sql: str, table: Table, q: query.Query, representation: bool) -> str:
        """`sql` (an UPDATE or DELETE) as it is, or with `representation` wrapped so that it also gives the changed
        rows as the JSON body."""
        if not representation:
            return sql
        return (f"WITH _pgrst_rows AS ({sql} RETURNING {table.qualified}.*)"
                f" SELECT count(*), NULL, NULL, {representation_sql(q, table)} FROM _pgrst_rows")

    @staticmethod
    def write_response(status: int, outcome: Outcome, prefs: dict[str, str], representation: bool,
                       counted: bool = True) -> Response:
        """The answer to a write: `status`, Content-Range (of the rows affected when `counted`, else `*/*`: PostgREST
        12 counts them for PATCH only, measured), Preference-Applied for the preferences honoured, and with
        `representation` the rows as the body."""
        applied = [f"{k}={prefs[k]}" for k in ("resolution", "missing", "return") if k in prefs]
        headers = {"Content-Range": f"0-{outcome.affected - 1}/*" if counted and outcome.affected else "*/*"}
        if applied:
            headers["Preference-Applied"] = ", ".join(applied)
        if representation:
            return Response(status, (outcome.body or "[]").encode(), {**JSON, **headers})
        return Response(status, b"", headers)

    # -- function calls ---------------------------------------------------------------------------

    async def invoke(self, request: Request, schema: str, identity: Identity) -> Response:
        """POST, GET or HEAD /rpc/<function> (rpc.py): 200 with the function's JSON and Content-Range `0-0/*` (or the
        rows of a set), 204 without a body for `void`; Content-Profile as PostgREST sends it (measured on 12.2.12):
        when the request named a profile or more than one schema is exposed. Raises ApiError: 405 PGRST101 for
        another method, 404 `{}` for a deeper path, and those of rpc.find and of the call itself."""
        if request.method not in ("POST", "GET", "HEAD"):
            raise ApiError(405, "PGRST101", f"Cannot use the {request.method} method on RPC")
        name = request.path[len(rpc.PREFIX):]
        if "/" in name:
            raise errors.unknown_table()
        if request.method == "POST":
            if request.query:
                raise rpc.unsupported("a query string")
            payload = parse_body(request.body) if request.body else {}  # PostgREST reads an empty body as {}
            args = rpc.post_arguments(payload, request.body.decode("utf-8"))
        else:
            args = rpc.get_arguments(request.query)
        routine = rpc.find(self.cache.routines, schema, name, args)
        sql, params = rpc.statement(routine, args)
        outcome = await self.run(request, identity, sql, params, read_only=rpc.read_only(routine, args),
                                 search_path=rpc.search_path(schema))
        _, content_range = range_status(0, outcome.affected, None)
        if routine.void:
            return Response(204, b"", {"Content-Range": content_range})
        headers = {**JSON, "Content-Range": content_range}
        if len(self.settings.schemas) > 1 or {"accept-profile", "content-profile"} & request.headers.keys():
            headers["Content-Profile"] = schema
        return Response(200, (outcome.body or "null").encode(), headers)

    # -- the transaction --------------------------------------------------------------------------

    async def run(self, request: Request, identity: Identity, sql: str, params: list[Any], read_only: bool = False,
                  search_path: str | None = None) -> Outcome:
        """Run one statement in its own transaction as the caller's role (READ ONLY with `read_only`; with
        `search_path` set to that list, as PostgREST sets it for a function call); classify what goes wrong."""
        setup = [identity.role, identity.claims_json(), request.method, request.path,
                 json.dumps(request.headers)]
        try:
            async with self.pool.connection() as conn, conn.transaction():
                if read_only:
                    await conn.execute("SET TRANSACTION READ ONLY")
                if search_path is not None:
                    await conn.execute("SELECT set_config('search_path', %s, true)", [search_path])
                await conn.execute(SETUP_SQL, setup)
                cursor = await conn.execute(sql, params)
                row = await cursor.fetchone() if cursor.description else None
                if row is None:
                    return Outcome(affected=max(cursor.rowcount, 0))
                return Outcome(row[0], row[1], row[2], row[3])
        except psycopg_pool.PoolTimeout:
            raise errors.pool_timeout() from None
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None:  # the connection itself failed: PostgREST's PGRST000
                raise errors.database_unreachable() from None
            raise errors.from_database(exc, authenticated=not identity.anonymous) from None
        except psycopg.Error as exc:
            if exc.sqlstate is None:  # refused before sending, e.g. a NUL byte, which PostgreSQL rejects as 22021
                raise ApiError(400, "22021", str(exc)) from None
            raise errors.from_database(exc, authenticated=not identity.anonymous) from None


def missing_table(request: Request, schema: str, name: str, q: query.Query) -> ApiError:
    """The answer for a table the schema cache lacks, as PostgREST 12 gives it (measured): a write that names columns
    (a POST's keys or `columns=`, a PATCH's keys) fails while planning, 404 with the body `{}`; everything else (GET,
    HEAD, DELETE, an empty POST array or PATCH object) reaches PostgreSQL, 404 `42P01` `relation "schema.name" does not
    exist` (PostgreSQL's text, unquoted). Raises ApiError 400 PGRST102 first for a body that is not JSON or whose
    objects' keys differ."""
    columns: list[str] = []
    if request.method == "POST":
        payload = parse_body(request.body)
        rows = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(row, dict) for row in rows):
            raise errors.invalid_body("All object keys must match")
        columns = q.columns if q.columns is not None else keys_of(rows)
    elif request.method == "PATCH":
        row = parse_body(request.body)
        columns = list(row) if isinstance(row, dict) else []
    if columns:
        return errors.unknown_table()
    return ApiError(404, "42P01", f'relation "{schema}.{name}" does not exist')


def parse_body(body: bytes) -> Any:
    """The request body as JSON. Raises ApiError 400 PGRST102 when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise errors.invalid_body() from None


def keys_of(rows: list[dict[str, Any]]) -> list[str]:
    """The common key set of a bulk body (PostgREST refuses bodies whose objects differ)."""
    if not rows:
        return []
    first = rows[0].keys()
    if any(row.keys() != first for row in rows[1:]):
        raise errors.invalid_body("All object keys must match")
    return list(first)


def check_columns(columns: list[str], table: Table) -> None:
    """Raises ApiError 400 PGRST204 for the first of `columns` that `table` lacks in the schema cache."""
    for column in columns:
        if column not in table.columns:
            raise errors.unknown_column(column, table.name)


def conflict_clause(table: Table, columns: list[str], on_conflict: list[str] | None,
                    resolution: str | None) -> str:
    """The ON CONFLICT clause of Prefer: resolution=merge-duplicates (update `columns`) or ignore-duplicates (do
    nothing), on `on_conflict` or else the primary key; empty without either."""
    if resolution not in ("merge-duplicates", "ignore-duplicates"):
        return ""
    target = on_conflict or table.primary_key
    target_sql = f" ({', '.join(map(ident, target))})" if target else ""
    if resolution == "ignore-duplicates" or not columns:
        return f" ON CONFLICT{target_sql} DO NOTHING"
    updates = ", ".join(f"{ident(c)} = EXCLUDED.{ident(c)}" for c in columns)
    return f" ON CONFLICT{target_sql} DO UPDATE SET {updates}"


def representation_sql(q: query.Query, table: Table) -> str:
    """SQL giving the `_pgrst_rows` of a write as JSON array text, through the request's `select`."""
    return (f"(SELECT coalesce(json_agg(_pgrst_t), '[]')::text FROM"
            f" (SELECT {query.select_sql(q.select, table, '_pgrst_rows')} FROM _pgrst_rows) AS _pgrst_t)")


def range_status(offset: int, page: int, total: int | None,
                 headers: dict[str, str] | None = None) -> tuple[int, str]:
    """PostgREST's Content-Range and its 200 / 206 / 416 choice; the 416 carries `headers` too."""
    shown = f"{offset}-{offset + page - 1}" if page else "*"
    content_range = f"{shown}/{'*' if total is None else total}"
    if total is None:
        return 200, content_range
    if offset > total:
        raise ApiError(416, "PGRST103", "Requested range not satisfiable",
                       f"An offset of {offset} was requested, but there are only {total} rows.",
                       headers={"Content-Range": f"*/{total}", **(headers or {})})
    return (206 if page < total else 200), content_range
