"""PostgREST's error answers: the JSON body, the status for each SQLSTATE, and its own PGRST codes.

Every failure of a request becomes an `ApiError` here and nowhere else, so a client mistake is always
a PostgREST-shaped 4xx and never a Python traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import psycopg


@dataclass
class ApiError(Exception):
    """A PostgREST error answer: HTTP status, code (a SQLSTATE or PGRSTnnn; None for a bare `{}` or a gateway
    answer), message, details, hint and extra headers."""

    status: int
    code: str | None
    message: str
    details: str | None = None
    hint: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Supabase's gateway answers some errors with a bare {"message": ...} body.
    gateway: bool = False

    def body(self) -> bytes:
        """The JSON body: PostgREST's {code, details, hint, message}, `{}` without code and message, or the gateway's
        {message}."""
        if self.gateway:
            return json.dumps({"message": self.message}).encode()
        if self.code is None and not self.message:
            return b"{}"
        payload = {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}
        return json.dumps(payload).encode()


def status_for_sqlstate(sqlstate: str, message: str, authenticated: bool) -> int:
    """PostgREST v12's mapping from a PostgreSQL SQLSTATE to an HTTP status (Error.hs, pgErrorStatus)."""
    exact = {
        "23503": 409, "23505": 409, "25006": 405, "53400": 500, "57P01": 503, "P0001": 400,
        "42883": 404, "42P01": 404, "42P17": 500,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    prefixes = {
        "08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500,
        "39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500,
        "F0": 500, "HV": 500, "P0": 500, "XX": 500,
    }
    if sqlstate[:2] in prefixes:
        return prefixes[sqlstate[:2]]
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    return 400


def from_database(exc: psycopg.Error, authenticated: bool) -> ApiError:
    """Pass a PostgreSQL error through as PostgREST does: its SQLSTATE, message, detail and hint."""
    diag = exc.diag
    sqlstate = diag.sqlstate or exc.sqlstate or "XX000"
    message = diag.message_primary or str(exc).strip()
    status = status_for_sqlstate(sqlstate, message, authenticated)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return ApiError(status, sqlstate, message, diag.message_detail, diag.message_hint, headers)


def database_unreachable(retry_after: int = 1) -> ApiError:
    """PGRST000: PostgREST lost its database and answers 503 with its reconnect backoff."""
    return ApiError(503, "PGRST000", "Could not connect with the database",
                    "connection to the database failed", None, {"Retry-After": str(retry_after)})


def pool_timeout() -> ApiError:
    """PGRST003 (504): no pooled connection came within the pool timeout."""
    return ApiError(504, "PGRST003", "Timed out acquiring connection from connection pool.")


def invalid_body(message: str = "Empty or invalid json", details: str | None = None) -> ApiError:
    """PGRST102 (400): the body is not JSON, or not of the shape expected."""
    return ApiError(400, "PGRST102", message, details)


def parse_error(message: str, details: str | None = None) -> ApiError:
    """PGRST100 (400): a query parameter PostgREST cannot parse."""
    return ApiError(400, "PGRST100", message, details)


def unknown_column(column: str, table: str) -> ApiError:
    """PGRST204 (400): the body or `columns` names a column the table lacks in the schema cache."""
    return ApiError(400, "PGRST204", f"Could not find the '{column}' column of '{table}' in the schema cache")


def unknown_table() -> ApiError:
    """404 with the body `{}`: PostgREST v12's answer for a table missing from the schema cache."""
    return ApiError(404, None, "")


def schema_not_exposed(schemas: list[str]) -> ApiError:
    """PGRST106 (406): the profile header names a schema that is not exposed."""
    return ApiError(406, "PGRST106", f"The schema must be one of the following: {', '.join(schemas)}")


def jwt_error(description: str) -> ApiError:
    """PGRST301 (401) with PostgREST's `description` of the JWT failure and its WWW-Authenticate header."""
    header = f'Bearer error="invalid_token", error_description="{description}"'
    return ApiError(401, "PGRST301", description, headers={"WWW-Authenticate": header})


def not_embedded(name: str) -> ApiError:
    """PGRST108 (400): a filter or order addresses `name.column` or `name(column)`, but `name` is not embedded in the
    request (the dev server embeds nothing)."""
    return ApiError(400, "PGRST108", f"'{name}' is not an embedded resource in this request", None,
                    f"Verify that '{name}' is included in the 'select' query parameter.")
