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
from syncd.devserver.schema import Column, SchemaCache, Table

INTEGER_TYPES = {"smallint", "integer", "bigint"}
NUMBER_TYPES = {"numeric", "real", "double precision"}
LITERAL_DEFAULT = re.compile(r"^'((?:[^']|'')*)'::[\w .\[\]\"]+$")


def describe(cache: SchemaCache, schema: str, public_url: str, visible: set[str] | None = None) -> dict[str, Any]:
    """The Swagger 2.0 document PostgREST v12 serves at `GET /` for `schema`: the paths and definitions of its
    tables (those in `visible` when given: the ones the request's role may use), host and base path taken from
    `public_url`."""
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
                  **{f"/{t.name}": paths_of(t) for t in tables}},
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
