"""`GET /`: the Swagger 2.0 description PostgREST v12 serves, built from the schema cache.

What clients read from it: `definitions.<table>.properties.<column>.format` (the PostgreSQL type),
`required` (the NOT NULL columns) and `<pk/>` / `<fk .../>` in a column's description.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from syncd import __version__
from syncd.devserver.rpc import Param, Routine
from syncd.devserver.schema import Column, SchemaCache, Table

INTEGER_TYPES = {"smallint", "integer", "bigint"}
STRING_TYPES = {"character varying", "character", "text"}
PRODUCES_RPC = ["application/json", "application/vnd.pgrst.object+json;nulls=stripped",
                "application/vnd.pgrst.object+json"]
NUMBER_TYPES = {"numeric", "real", "double precision"}
LITERAL_DEFAULT = re.compile(r"^'((?:[^']|'')*)'::[\w .\[\]\"]+$")


def describe(cache: SchemaCache, schema: str, public_url: str, visible: set[str] | None = None,
             routines: list[Routine] | None = None) -> dict[str, Any]:
    """The Swagger 2.0 document PostgREST v12 serves at `GET /` for `schema`: the paths and definitions of its
    tables (those in `visible` when given: the ones the request's role may use) and a `/rpc/<name>` path for each of
    `routines` (the last overload of a name wins, as in PostgREST), host and base path taken from `public_url`."""
    url = urlsplit(public_url)
    tables = [t for t in cache.in_schema(schema) if visible is None or t.name in visible]
    return {
        "swagger": "2.0",
        "info": {"title": "PostgREST API", "description": "syncd dev-server: a PostgREST v12-compatible API",
                 "version": f"12.2.3 (syncd {__version__})"},
        "host": url.netloc,
        "basePath": url.path or "/",
        "schemes": [url.scheme or "http"],
        "consumes": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "produces": ["application/json", "application/vnd.pgrst.object+json", "text/csv"],
        "paths": {"/": {"get": {"tags": ["Introspection"], "summary": "OpenAPI description (this document)",
                                "produces": ["application/openapi+json", "application/json"],
                                "responses": {"200": {"description": "OK"}}}},
                  **{f"/{t.name}": paths_of(t) for t in tables},
                  **{f"/rpc/{r.name}": rpc_paths_of(r) for r in routines or []}},
        "definitions": {t.name: definition_of(t) for t in tables},
    }


def paths_of(table: Table) -> dict[str, Any]:
    """The operations of one table: GET for all, POST, PATCH and DELETE too except for a materialized view."""
    ref = {"$ref": f"#/definitions/{table.name}"}
    ok = {"200": {"description": "OK", "schema": {"type": "array", "items": ref}},
          "206": {"description": "Partial Content"}}
    body = [{"name": table.name, "in": "body", "required": False, "schema": ref}]
    operations: dict[str, Any] = {"get": {"tags": [table.name], "responses": ok}}
    if table.kind in ("r", "p", "f", "v"):
        operations["post"] = {"tags": [table.name], "parameters": body,
                              "responses": {"201": {"description": "Created"}}}
        operations["patch"] = {"tags": [table.name], "parameters": body,
                               "responses": {"204": {"description": "No Content"}}}
        operations["delete"] = {"tags": [table.name], "responses": {"204": {"description": "No Content"}}}
    return operations


def rpc_paths_of(routine: Routine) -> dict[str, Any]:
    """GET and POST of one function as PostgREST 12.2.12 describes them (measured; OpenAPI.hs makeProcPathItem): the
    first line of its comment as the summary and the rest as the description, GET's query parameters, POST's body
    schema with the arguments as properties and those without a default as required."""
    operation: dict[str, Any] = {"tags": [f"(rpc) {routine.name}"], "produces": PRODUCES_RPC,
                                 "responses": {"200": {"description": "OK"}}}
    if routine.description is not None:
        summary, _, rest = routine.description.partition("\n")
        operation["summary"] = summary
        if rest.lstrip("\n"):
            operation["description"] = rest.lstrip("\n")
    body: dict[str, Any] = {"type": "object"}
    if routine.description is not None:
        body["description"] = routine.description
    if routine.params:
        body["properties"] = {p.name: rpc_property(p) for p in routine.params}
    required = [p.name for p in routine.params if p.required]
    if required:
        body["required"] = required
    get = dict(operation)
    if routine.params:
        get["parameters"] = [query_parameter(p) for p in routine.params]
    post = {**operation, "parameters": [{"in": "body", "name": "args", "required": True, "schema": body},
                                        {"$ref": "#/parameters/preferParams"}]}
    return {"get": get, "post": post}


def rpc_property(param: Param) -> dict[str, Any]:
    """One argument as a property of POST's body: its type as format, its Swagger type, an array's item type."""
    prop: dict[str, Any] = {"format": param.type}
    kind = swagger_type_named(param.type)
    if kind is not None:
        prop["type"] = kind
    if kind == "array":
        item = swagger_type_named(param.type[:-2])
        prop["items"] = {"type": item} if item is not None else {}
    return prop


def query_parameter(param: Param) -> dict[str, Any]:
    """One argument as a GET query parameter; a VARIADIC one repeats (collectionFormat multi)."""
    kind = swagger_type_named(param.type)
    described: dict[str, Any] = {"in": "query", "name": param.name, "required": param.required}
    if param.variadic:
        item = {"format": param.type[:-2]}
        item_kind = swagger_type_named(param.type[:-2])
        if item_kind is not None:
            item["type"] = item_kind
        return {**described, "type": kind or "string", "collectionFormat": "multi", "items": item}
    return {**described, "format": param.type, "type": "string" if kind in (None, "array") else kind}


def swagger_type_named(type_name: str) -> str | None:
    """PostgREST's toSwaggerType of a type's name: None for json and jsonb (any value)."""
    if type_name in STRING_TYPES:
        return "string"
    if type_name in INTEGER_TYPES:
        return "integer"
    if type_name in NUMBER_TYPES:
        return "number"
    if type_name == "boolean":
        return "boolean"
    if type_name in ("json", "jsonb"):
        return None
    return "array" if type_name.endswith("[]") else "string"


def definition_of(table: Table) -> dict[str, Any]:
    """One table's definition: its required (NOT NULL) columns and each column's property."""
    definition: dict[str, Any] = {
        "required": [c.name for c in table.columns.values() if not c.nullable],
        "properties": {c.name: property_of(c) for c in table.columns.values()},
        "type": "object",
    }
    if table.description:
        definition["description"] = table.description
    return definition


def property_of(column: Column) -> dict[str, Any]:
    """One column's property: format (its PostgreSQL type), description with the `<pk/>` and `<fk .../>` notes,
    default (none for a sequence's nextval or a generated column, as PostgREST 12.2.12 shows them), maxLength and
    Swagger type."""
    prop: dict[str, Any] = {"format": column.type}
    notes = []
    if column.primary_key:
        notes.append("This is a Primary Key.<pk/>")
    if column.references:
        ref_table, ref_col = column.references
        notes.append(f"This is a Foreign Key to `{ref_table}.{ref_col}`.<fk table='{ref_table}' column='{ref_col}'/>")
    description = "\n\n".join(filter(None, [column.description, "Note:\n" + "\n".join(notes) if notes else None]))
    if description:
        prop["description"] = description
    default = default_of(column)
    if default is not NO_DEFAULT:
        prop["default"] = default
    if column.max_length:
        prop["maxLength"] = column.max_length
    swagger_type = swagger_type_of(column)
    if swagger_type:
        prop["type"] = swagger_type
    if swagger_type == "array":
        prop["items"] = {"type": "string"}
    return prop


NO_DEFAULT = object()


def default_of(column: Column) -> Any:
    """A column's default as PostgREST 12.2.12 describes it (measured on the binary): none for a sequence's
    nextval (serial, identity) or a generated column; for a string column the literal without its cast, its quotes
    left doubled ('it''s' stays so), or the expression (now()); for a number or a boolean the expression when it is
    a JSON number or boolean (5, 1.5, true), else none ('-3'::integer); none for json, jsonb and arrays. NO_DEFAULT
    when there is none to show."""
    raw = column.default
    if raw is None or "nextval(" in raw:
        return NO_DEFAULT
    swagger = swagger_type_of(column)
    if swagger == "string":
        literal = LITERAL_DEFAULT.match(raw)
        return literal[1] if literal else raw
    try:
        value = json.loads(raw)
    except ValueError:
        return NO_DEFAULT
    if swagger == "boolean" and isinstance(value, bool):
        return value
    if swagger in ("integer", "number") and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return NO_DEFAULT


def swagger_type_of(column: Column) -> str | None:
    """A column's Swagger type: array, integer, number, boolean or string; None for json and jsonb (any value)."""
    if column.type.endswith("[]"):
        return "array"
    if column.type in INTEGER_TYPES:
        return "integer"
    if column.type in NUMBER_TYPES:
        return "number"
    if column.type == "boolean":
        return "boolean"
    if column.type in ("json", "jsonb"):
        return None  # any JSON value
    return "string"
