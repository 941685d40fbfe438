"""Quoting for SQL text that is later sent with psycopg parameters (where `%` must be doubled)."""

from __future__ import annotations


def ident(name: str) -> str:
    """A double-quoted identifier; any name works (quotes, dots, spaces, non-ASCII, `%`)."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def raw(text: str) -> str:
    """Trusted SQL text (a default expression from pg_catalog) made safe for psycopg's `%s` parser."""
    return text.replace("%", "%%")
