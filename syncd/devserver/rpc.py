"""`POST /rpc/<function>` (and GET, HEAD): PostgREST 12's function calls, as the source of v12.2.12 plans them.

The schema cache holds every function of the exposed schemas that PostgREST would load (`load`, PostgREST's own
catalog query: `prokind = 'f'`, not returning `trigger`, all arguments named but at most one json, jsonb, text, xml or
bytea one). A call picks the function by name and by the body's keys (`find`: every required argument given, the
others only among those with defaults; else the one with a single json/jsonb argument, which takes the whole body),
and runs it in one statement (`statement`) that passes the keys present as `name := value`, each value read from the
body by `json_to_record` with the argument's type, so a bad value fails as PostgreSQL casts it (400 22P02). The body
of the answer is made by the same SQL as PostgREST's: a scalar's JSON (`json_agg(...)->0`), an array for a set, 204
for `void` (measured, Content-Range `0-0/*` and no Content-Type). Errors of the lookup are PGRST202 (404, with the
fuzzy "Perhaps you meant" hint) and PGRST203 (300); everything raised inside the function passes through as for
tables (P0001 400, 23505 409, 42501 401/403...). A volatile function runs in a read-write transaction when POSTed,
anything else read-only, as PostgREST does.

Not supported (a 400 PGRST100 saying so, rather than an answer that differs): query parameters on POST (`select`,
filters, `limit`...), filters and `select`/`order`/`limit`/`offset` on GET, `Prefer: params=single-object`. Request
bodies are read as JSON whatever their Content-Type (PostgREST also takes text/plain, xml, octet-stream and forms).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import psycopg

from syncd.devserver import errors, fuzzy
from syncd.devserver.errors import ApiError
from syncd.devserver.sqltext import ident, raw

PREFIX = "/rpc/"
SINGLE_JSON_TYPES = ("json", "jsonb")

# PostgREST 12.2.12's funcsSqlQuery (src/PostgREST/SchemaCache.hs), its isolation level and settings left out and
# the argument records split into parallel arrays.
ROUTINES_SQL = """
WITH
base_types AS (
  WITH RECURSIVE recurse AS (
    SELECT oid, typbasetype, COALESCE(NULLIF(typbasetype, 0), oid) AS base FROM pg_type
    UNION
    SELECT t.oid, b.typbasetype, COALESCE(NULLIF(b.typbasetype, 0), b.oid) AS base
    FROM recurse t JOIN pg_type b ON t.typbasetype = b.oid
  )
  SELECT oid, base FROM recurse WHERE typbasetype = 0
),
arguments AS (
  SELECT oid,
    array_agg(COALESCE(name, '') ORDER BY idx) AS names,
    array_agg(type::regtype::text ORDER BY idx) AS types,
    array_agg(CASE type
        WHEN 'bit'::regtype THEN 'bit varying'
        WHEN 'bit[]'::regtype THEN 'bit varying[]'
        WHEN 'character'::regtype THEN 'character varying'
        WHEN 'character[]'::regtype THEN 'character varying[]'
        ELSE type::regtype::text END ORDER BY idx) AS read_types,
    array_agg(idx <= (pronargs - pronargdefaults) ORDER BY idx) AS required,
    array_agg(COALESCE(mode = 'v', FALSE) ORDER BY idx) AS variadic,
    CASE COUNT(*) - COUNT(name)
      WHEN 0 THEN true
      WHEN 1 THEN (array_agg(type))[1] IN ('bytea'::regtype, 'json'::regtype, 'jsonb'::regtype, 'text'::regtype,
                                           'xml'::regtype)
      ELSE false
    END AS callable
  FROM pg_proc, unnest(proargnames, proargtypes, proargmodes) WITH ORDINALITY AS _ (name, type, mode, idx)
  WHERE type IS NOT NULL
  GROUP BY oid
)
SELECT pn.nspname, p.proname, d.description,
  COALESCE(a.names, '{}'), COALESCE(a.types, '{}'), COALESCE(a.read_types, '{}'), COALESCE(a.required, '{}'),
  COALESCE(a.variadic, '{}'),
  tn.nspname, COALESCE(comp.relname, t.typname), p.proretset,
  (t.typtype = 'c' OR COALESCE(proargmodes::text[] && '{t,b,o}', false)),
  bt.oid <> bt.base, p.provolatile
FROM pg_proc p
LEFT JOIN arguments a ON a.oid = p.oid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
JOIN base_types bt ON bt.oid = p.prorettype
JOIN pg_type t ON t.oid = bt.base
JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_class comp ON comp.oid = t.typrelid
LEFT JOIN pg_description AS d ON d.objoid = p.oid
WHERE t.oid <> 'trigger'::regtype AND COALESCE(a.callable, true) AND prokind = 'f' AND pn.nspname = ANY(%s)
"""


@dataclass(frozen=True)
class Param:
    """One input argument: its name ('' when unnamed), its type as `regtype::text` gives it ("integer", "jsonb"),
    the type its value is read as from the body (character and bit widened to their varying forms, so any length is
    accepted), whether it lacks a default, and whether it is VARIADIC."""

    name: str
    type: str
    read_type: str
    required: bool
    variadic: bool


@dataclass(frozen=True)
class Routine:
    """One function of an exposed schema, as PostgREST's schema cache knows it: its input arguments, its return type
    (schema and name, whether a set, whether composite: a table type, or TABLE/OUT/INOUT arguments; whether a domain
    over a composite) and its volatility ('i', 's' or 'v')."""

    schema: str
    name: str
    description: str | None
    params: tuple[Param, ...]
    return_schema: str
    return_type: str
    setof: bool
    composite: bool
    composite_alias: bool
    volatility: str

    @property
    def qualified(self) -> str:
        """`"schema"."name"`, quoted for SQL sent through psycopg."""
        return f"{ident(self.schema)}.{ident(self.name)}"

    @property
    def scalar(self) -> bool:
        """Whether it returns one value (or a set of values) rather than rows."""
        return not self.composite

    @property
    def void(self) -> bool:
        return not self.setof and not self.composite and (self.return_schema, self.return_type) == (
            "pg_catalog", "void")

    def sort_key(self) -> tuple[Any, ...]:
        """PostgREST's order of overloads (Routine's Ord): fewer arguments first, then description and arguments."""
        return (len(self.params), self.description is not None, self.description or "",
                [(p.name, p.type, p.read_type, p.required, p.variadic) for p in self.params])


Routines = dict[tuple[str, str], list[Routine]]


async def load(conn: psycopg.AsyncConnection, schemas: list[str], executable_by: str | None = None) -> Routines:
    """The callable functions of `schemas` by (schema, name), overloads in PostgREST's order; with `executable_by`
    only those that role may execute. Runs on `conn` inside the caller's transaction (the schema cache's one
    snapshot)."""
    sql, arguments = ROUTINES_SQL, list[object]([schemas])
    if executable_by is not None:
        sql, arguments = sql + " AND has_function_privilege(%s, p.oid, 'execute')", [schemas, executable_by]
    rows = await (await conn.execute(sql, arguments)).fetchall()
    routines: Routines = {}
    for (schema, name, description, names, types, read_types, required, variadic, return_schema, return_type,
         setof, composite, composite_alias, volatility) in rows:
        params = tuple(Param(*fields) for fields in zip(names, types, read_types, required, variadic, strict=True))
        routines.setdefault((schema, name), []).append(Routine(
            schema, name, description, params, return_schema, return_type, setof, composite, composite_alias,
            volatility))
    for overloads in routines.values():
        overloads.sort(key=Routine.sort_key)
    return routines


@dataclass(frozen=True)
class Arguments:
    """What a call passes: the argument names given (sorted, as PostgREST's set of keys lists them), the JSON text the
    values are read from, whether that text is an object (else an array, whose first object is used), and whether the
    call is a POST (only a POST may fall back to the function with one json/jsonb argument)."""

    keys: tuple[str, ...]
    body: str
    is_object: bool
    post: bool


def post_arguments(payload: Any, text: str) -> Arguments:
    """The arguments of a POST from its parsed JSON body `payload` (an empty body counts as `{}`) and its `text`, as
    PostgREST 12 reads them: an object's keys; an array's keys when all its elements are objects with the same keys
    (its first one is used), none for `[]`; none for any other JSON value, whose text becomes `[]`. Raises ApiError
    400 PGRST102 "All object keys must match" for an array of other elements or of differing keys."""
    if isinstance(payload, dict):
        return Arguments(tuple(sorted(payload)), text, text.lstrip(" \t\r\n").startswith("{"), post=True)
    if isinstance(payload, list) and payload:
        first = payload[0]
        if not isinstance(first, dict) or any(not isinstance(o, dict) or o.keys() != first.keys() for o in payload):
            raise errors.invalid_body("All object keys must match")
        return Arguments(tuple(sorted(first)), text, is_object=False, post=True)
    return Arguments((), "[]", is_object=False, post=True)


def get_arguments(query_string: str) -> Arguments:
    """The arguments of a GET or HEAD: each query parameter a text value (the last of a repeated one). Raises ApiError
    400 PGRST100 for what the dev server does not support there: a parameter PostgREST reserves (select, order, limit,
    offset, columns, on_conflict, and, or), or a value that PostgREST reads as a filter on the result (`a=eq.5`)."""
    values: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        operator, dot, _ = value.removeprefix("not.").partition(".")
        if key in RESERVED or (dot and operator.split("(")[0] in FILTER_OPERATORS):
            raise unsupported(f"'{key}={value}'")
        values[key] = value
    return Arguments(tuple(sorted(values)), json.dumps(values), is_object=True, post=False)


RESERVED = {"select", "order", "limit", "offset", "columns", "on_conflict", "and", "or", "not.and", "not.or"}
FILTER_OPERATORS = {"eq", "neq", "gt", "gte", "lt", "lte", "like", "ilike", "match", "imatch", "isdistinct", "cs",
                    "cd", "ov", "sl", "sr", "nxr", "nxl", "adj", "fts", "plfts", "phfts", "wfts", "in", "is", "all",
                    "any"}


def unsupported(what: str) -> ApiError:
    """PGRST100 (400) for a part of a function call the dev server does not implement."""
    return errors.parse_error(f"{what} on /rpc is not supported by the syncd dev server",
                              "call the function with its arguments only (a JSON object body, or GET query "
                              "parameters)")


def find(routines: Routines, schema: str, name: str, args: Arguments) -> Routine:
    """The function `args` call, chosen as PostgREST 12.2.12's findProc does: among the overloads of `name` those
    whose arguments the keys fit, else (POST only) those with a single json or jsonb argument. Raises ApiError 404
    PGRST202 when none fits, 300 PGRST203 when more than one does."""
    overloads = routines.get((schema, name), [])
    fitting = [r for r in overloads if fits(r, args.keys)]
    single_json = [r for r in overloads if r not in fitting and args.post and len(r.params) == 1
                   and r.params[0].type in SINGLE_JSON_TYPES]
    chosen = fitting or single_json
    if len(chosen) > 1:
        raise ambiguous(chosen)
    if not chosen:
        raise not_found(routines, schema, name, args, overloads)
    return chosen[0]


def fits(routine: Routine, keys: tuple[str, ...]) -> bool:
    """Whether `keys` give every required argument of `routine` and otherwise only arguments with defaults."""
    given = set(keys)
    required = {p.name for p in routine.params if p.required}
    optional = {p.name for p in routine.params if not p.required}
    if not routine.params:
        return not given
    if not optional:
        return given == required
    return given - optional == required


def ambiguous(routines: list[Routine]) -> ApiError:
    """PGRST203 (300): more than one overload fits (PostgREST's text, measured)."""
    listed = ", ".join(f"{r.schema}.{r.name}({', '.join(f'{p.name} => {p.type}' for p in r.params)})"
                       for r in routines)
    return ApiError(300, "PGRST203", f"Could not choose the best candidate function between: {listed}", None,
                    "Try renaming the parameters or the function itself in the database so function overloading "
                    "can be resolved")


def not_found(routines: Routines, schema: str, name: str, args: Arguments, overloads: list[Routine]) -> ApiError:
    """PGRST202 (404) as PostgREST 12.2.12 words it (measured): the function with the keys given, and as the hint the
    closest function name of the schema, or, when the name exists, the closest argument list of its overloads."""
    function = f"{schema}.{name}"
    listed = ", ".join(args.keys)
    if args.keys:
        message = f"Could not find the function {function}({listed}) in the schema cache"
        searched = f" with parameter{'s' if len(args.keys) > 1 else ''} {listed}"
    else:
        message = f"Could not find the function {function} without parameters in the schema cache"
        searched = " without parameters"
    if args.post:
        searched += " or with a single unnamed json/jsonb parameter"
    details = f"Searched for the function {function}{searched}, but no matches were found in the schema cache."
    if overloads:
        lists = [f"({', '.join(sorted(p.name for p in r.params))})" for r in overloads]
        guess = fuzzy.best_match(lists, f"({listed})")
        suggestion = name + guess if guess is not None else None
    else:
        suggestion = fuzzy.best_match([n for (s, n) in routines if s == schema], name)
    hint = f"Perhaps you meant to call the function {schema}.{suggestion}" if suggestion is not None else None
    return ApiError(404, "PGRST202", message, details, hint)


def statement(routine: Routine, args: Arguments) -> tuple[str, list[Any]]:
    """The one statement of the call and its parameters, PostgREST 12.2.12's callPlanToQuery and prepareCall: it
    gives (rows in the page: 1 for a function not returning a set, else the rows returned; NULL; NULL; the JSON body
    as text)."""
    call, params = call_sql(routine, args)
    if routine.scalar:
        body = "_postgrest_t.pgrst_scalar"
        body_sql = (f"coalesce(json_agg({body}), '[]')" if routine.setof
                    else f"coalesce(json_agg({body})->0, 'null')")
    else:
        body_sql = "coalesce(json_agg(_postgrest_t), '[]')" if routine.setof else \
            "coalesce(json_agg(_postgrest_t)->0, 'null')"
    page = "pg_catalog.count(_postgrest_t)" if routine.setof else "1"
    sql = (f"WITH pgrst_source AS ({call}) SELECT {page}, NULL, NULL, {body_sql}::text"
           f" FROM (SELECT pgrst_source.* FROM pgrst_source) _postgrest_t")
    return sql, params


def call_sql(routine: Routine, args: Arguments) -> tuple[str, list[Any]]:
    """`SELECT ... FROM fn(...)`: the only argument cast from the whole body for a function with one unnamed (or,
    as chosen by `find`, one json) argument; else each argument given as `name := pgrst_body.name`, read from the
    body by json_to_record(set) with the argument's type."""
    columns = "pgrst_call.pgrst_scalar" if routine.scalar else "pgrst_call.*"
    given = [p for p in routine.params if p.name in args.keys]
    if len(routine.params) == 1 and routine.params[0].name == "":
        return f"SELECT {columns} FROM {invocation(routine, f'%s::{raw(routine.params[0].type)}')}", [args.body]
    if not given:
        return f"SELECT {columns} FROM {invocation(routine, '')}", []
    names = ", ".join(ident(p.name) for p in given)
    typed = ", ".join(f"{ident(p.name)} {raw(p.read_type)}" for p in given)
    reader = "json_to_record" if args.is_object else "json_to_recordset"
    passed = ", ".join(f"{'VARIADIC ' if p.variadic else ''}{ident(p.name)} := pgrst_body.{ident(p.name)}"
                       for p in given)
    return (f"SELECT {columns} FROM (SELECT %s::json AS json_data) pgrst_payload,"
            f" LATERAL (SELECT {names} FROM {reader}(pgrst_payload.json_data) AS _({typed}) LIMIT 1) pgrst_body,"
            f" LATERAL {invocation(routine, passed)}"), [args.body]


def invocation(routine: Routine, arguments: str) -> str:
    """The call in FROM: a scalar's value as the column pgrst_scalar, else the function's rows."""
    if routine.scalar:
        return f"(SELECT {routine.qualified}({arguments}) pgrst_scalar) pgrst_call"
    return f"{routine.qualified}({arguments}) pgrst_call"


def search_path(schema: str) -> str:
    """The `search_path` PostgREST 12 sets for a request to `schema`: it, then its db-extra-search-path (`public`)."""
    return ", ".join('"' + name.replace('"', '""') + '"' for name in (schema, "public"))


def read_only(routine: Routine, args: Arguments) -> bool:
    """Whether the call runs in a read-only transaction: PostgREST writes only for a POST of a volatile function."""
    return not (args.post and routine.volatility == "v")
