"""PostgREST's URL grammar (filters, logic trees, select, order, limit) turned into SQL.

Only what a writing client and the seed's queries use is supported; anything else is a PGRST100
parse error, as PostgREST answers for syntax it does not understand. Values always travel as
untyped query parameters so PostgreSQL casts them to the column's type (and a bad value is 22P02).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from syncd.devserver import errors
from syncd.devserver.schema import Table
from syncd.devserver.sqltext import ident

RESERVED = {"select", "order", "limit", "offset", "on_conflict", "columns"}
LOGIC_KEYS = {"and", "or", "not.and", "not.or"}
COMPARISONS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
               "like": "LIKE", "ilike": "ILIKE", "match": "~", "imatch": "~*",
               "isdistinct": "IS DISTINCT FROM", "cs": "@>", "cd": "<@", "ov": "&&"}
TEXT_SEARCH = {"fts": "to_tsquery", "plfts": "plainto_tsquery", "phfts": "phraseto_tsquery",
               "wfts": "websearch_to_tsquery"}
IS_VALUES = {"null": "NULL", "not_null": "NOT NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
OPERATOR = re.compile(r"(?P<op>[a-z]+)(?:\((?P<mod>[A-Za-z0-9_]+)\))?\.(?P<value>.*)", re.S)
LOGIC_ITEM = re.compile(r"(?P<not>not\.)?(?P<op>and|or)(?P<body>\(.*\))", re.S)
CAST = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]*(\[\])?")


@dataclass
class Filter:
    """One condition: `column=[not.]op[(modifier)].value`."""

    column: str
    operator: str
    value: str
    negated: bool = False
    modifier: str | None = None  # the text search configuration of fts(english)


@dataclass
class Logic:
    """A logic tree: `[not.]and=(...)` or `[not.]or=(...)` of conditions and nested trees."""

    conjunction: str  # "and" | "or"
    children: list[Filter | Logic]
    negated: bool = False


@dataclass
class SelectItem:
    """One item of `select=`: `[alias:]column[::cast]`."""

    column: str  # "*" for all columns
    alias: str | None = None
    cast: str | None = None


@dataclass
class OrderTerm:
    """One term of `order=`: `column[.asc|.desc][.nullsfirst|.nullslast]`."""

    column: str
    descending: bool = False
    nulls: str | None = None  # "FIRST" | "LAST"


@dataclass
class Query:
    """A request's query string, parsed: filters (AND-ed), select, order, limit, offset, on_conflict and columns."""

    where: list[Filter | Logic] = field(default_factory=list)
    select: list[SelectItem] | None = None
    order: list[OrderTerm] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    on_conflict: list[str] | None = None
    columns: list[str] | None = None


def parse(query_string: str) -> Query:
    """Read a request's query string the way PostgREST does (repeated filters are all applied)."""
    query = Query()
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        if key == "select":
            query.select = parse_select(value)
        elif key == "order":
            query.order = parse_order(value)
        elif key in ("limit", "offset"):
            setattr(query, key, parse_count(key, value))
        elif key in ("on_conflict", "columns"):
            setattr(query, key, [unquote(c.strip()) for c in split_top_level(value) if c.strip()])
        elif key in LOGIC_KEYS:
            negated, conjunction = key.startswith("not."), key.removeprefix("not.")
            query.where.append(parse_logic(conjunction, value, negated))
        else:
            query.where.append(parse_filter(key, value))
    return query


def parse_count(name: str, value: str) -> int:
    """The value of `limit` or `offset`. Raises ApiError PGRST100 unless it is a non-negative integer."""
    if not value.isdigit():
        raise errors.parse_error(f"failed to parse {name} parameter ({value})", "expecting a non-negative integer")
    return int(value)


def parse_filter(column: str, text: str) -> Filter:
    """`column=[not.]op.value` -> Filter. Raises ApiError PGRST100 for an unknown operator, a (config) on other than
    full-text search, a bad `is` value or a malformed `in` list."""
    negated = text.startswith("not.")
    body = text[4:] if negated else text
    match = OPERATOR.fullmatch(body)
    if match is None or match["op"] not in {*COMPARISONS, *TEXT_SEARCH, "in", "is"}:
        raise errors.parse_error(f"failed to parse filter ({text})", "unknown operator or missing '.'")
    op, value = match["op"], match["value"]
    if match["mod"] and op not in TEXT_SEARCH:
        raise errors.parse_error(f"failed to parse filter ({text})", "only full-text search takes a (config)")
    if op == "is" and value.lower() not in IS_VALUES:
        raise errors.parse_error(f"failed to parse filter ({text})",
                                 "expecting null, not_null, true, false or unknown")
    if op == "in":
        parse_in_list(value, text)  # validate now, so a bad list is a 400 before any SQL runs
    return Filter(column, op, value, negated, match["mod"])


def parse_logic(conjunction: str, text: str, negated: bool = False) -> Logic:
    """The value of `and=` or `or=`, `(cond,cond,...)` -> Logic, nested trees included. Raises ApiError PGRST100 when
    it is malformed or empty."""
    if not (text.startswith("(") and text.endswith(")")):
        raise errors.parse_error(f"failed to parse logic tree ({text})", 'expecting "("')
    children: list[Filter | Logic] = []
    for item in split_top_level(text[1:-1]):
        nested = LOGIC_ITEM.fullmatch(item)
        if nested:
            children.append(parse_logic(nested["op"], nested["body"], bool(nested["not"])))
            continue
        column, rest = split_column(item)
        if rest is None or not column:
            raise errors.parse_error(f"failed to parse logic tree ({text})", f"bad condition: {item}")
        leaf = parse_filter(column, rest)
        leaf.value = unquote(leaf.value) if leaf.operator != "in" else leaf.value
        children.append(leaf)
    if not children:
        raise errors.parse_error(f"failed to parse logic tree ({text})", "empty logic tree")
    return Logic(conjunction, children, negated)


def split_column(item: str) -> tuple[str, str | None]:
    """`col.op.value` or `"col.with.dots".op.value` -> (column, "op.value"); rest None when malformed."""
    if item.startswith('"'):
        end = re.match(r'"((?:[^"\\]|\\.)*)"\.', item)
        return (unquote(item[:end.end() - 1]), item[end.end():]) if end else ("", None)
    column, dot, rest = item.partition(".")
    return column, rest if dot else None


def split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses and double quotes (with backslash escapes in quotes)."""
    parts, current, depth, quoted, escaped = [], [], 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted or depth != 0:
        raise errors.parse_error(f"failed to parse ({text})", "unbalanced quotes or parentheses")
    parts.append("".join(current))
    return parts


def unquote(element: str) -> str:
    """`"a,b"` -> `a,b`; inside quotes `\\"` and `\\\\` stand for `"` and `\\`."""
    if len(element) >= 2 and element[0] == '"' and element[-1] == '"':
        return re.sub(r"\\(.)", r"\1", element[1:-1], flags=re.S)
    return element


def parse_in_list(value: str, text: str) -> list[str]:
    """`(a,"b,c")` -> ["a", "b,c"], `()` -> []. Raises ApiError PGRST100 without the parentheses (`text`, the whole
    filter, is quoted in the message)."""
    if not (value.startswith("(") and value.endswith(")")):
        raise errors.parse_error(f"failed to parse filter ({text})", 'expecting "(" and ")" around the list')
    inner = value[1:-1]
    if inner == "":
        return []
    return [unquote(element) for element in split_top_level(inner)]


def parse_select(text: str) -> list[SelectItem]:
    """`select=` -> SelectItems. Raises ApiError PGRST200 for a resource embedding (not supported), PGRST100 for a
    malformed item."""
    items = []
    for raw_item in split_top_level(text):
        item = raw_item.strip()
        if "(" in item:
            name = item.split("(", 1)[0].split(":")[-1].split("!")[0]
            raise errors.ApiError(400, "PGRST200", f"Could not find a relationship for '{name}' in the schema cache",
                                  "resource embedding is not supported by the syncd dev server")
        head, _, cast = item.partition("::")
        alias, _, column = head.rpartition(":")
        if not column or (cast and not CAST.fullmatch(cast)):
            raise errors.parse_error(f"failed to parse select parameter ({text})", f"bad item: {item}")
        items.append(SelectItem(column, alias or None, cast or None))
    return items


def parse_order(text: str) -> list[OrderTerm]:
    """`order=` -> OrderTerms. Raises ApiError PGRST100 for an unknown modifier or a missing column."""
    terms = []
    for raw_term in split_top_level(text):
        column, *modifiers = raw_term.strip().split(".")
        term = OrderTerm(column)
        for modifier in modifiers:
            if modifier in ("asc", "desc"):
                term.descending = modifier == "desc"
            elif modifier in ("nullsfirst", "nullslast"):
                term.nulls = modifier.removeprefix("nulls").upper()
            else:
                raise errors.parse_error(f"failed to parse order ({text})", f"unexpected '{modifier}'")
        if not column:
            raise errors.parse_error(f"failed to parse order ({text})", "missing column")
        terms.append(term)
    return terms


# -- SQL ---------------------------------------------------------------------------------------------


def where_sql(items: list[Filter | Logic], table: Table, params: list[object]) -> str:
    """The WHERE condition (without the keyword) for all filters, AND-ed; appends values to params.

    Columns are qualified with the schema-qualified table, so an unknown one fails in PostgreSQL
    with PostgREST's own message (`column t.x does not exist`, 42703).
    """
    return " AND ".join(condition_sql(item, table, params) for item in items) or "TRUE"


def condition_sql(item: Filter | Logic, table: Table, params: list[object]) -> str:
    """SQL of one filter or logic tree (negated with `NOT (...)`); appends its values to `params`."""
    if isinstance(item, Logic):
        joiner = f" {item.conjunction.upper()} "
        sql = "(" + joiner.join(condition_sql(child, table, params) for child in item.children) + ")"
    else:
        sql = filter_sql(item, table, params)
    return f"NOT ({sql})" if item.negated else sql


def filter_sql(item: Filter, table: Table, params: list[object]) -> str:
    """SQL of one filter on the table's qualified column, with `%s` placeholders; appends the values to `params`."""
    column = f"{table.qualified}.{ident(item.column)}"
    op = item.operator
    if op == "is":
        return f"{column} IS {IS_VALUES[item.value.lower()]}"
    if op == "in":
        values = parse_in_list(item.value, item.value)
        if not values:
            return "FALSE"
        params.extend(values)
        return f"{column} IN ({', '.join(['%s'] * len(values))})"
    if op in TEXT_SEARCH:
        known = table.columns.get(item.column)
        is_vector = known is not None and known.type == "tsvector"
        config = "%s::regconfig, " if item.modifier else ""
        document = column if is_vector else f"to_tsvector({config}{column})"
        params.extend([item.modifier] * (bool(item.modifier) * (1 if is_vector else 2)))
        params.append(item.value)
        return f"{document} @@ {TEXT_SEARCH[op]}({config}%s)"
    value = item.value.replace("*", "%") if op in ("like", "ilike") else item.value
    params.append(value)
    return f"{column} {COMPARISONS[op]} %s"


def select_sql(items: list[SelectItem] | None, table: Table, source: str | None = None) -> str:
    """The select list over `source` (default: the table itself); `*` expands to the cached columns."""
    source = source or table.qualified
    everything = [SelectItem(name) for name in table.columns]
    parts = []
    for item in items or [SelectItem("*")]:
        if item.column == "*":
            parts.extend(f"{source}.{ident(each.column)}" for each in everything)
            continue
        expr = f"{source}.{ident(item.column)}"
        if item.cast:
            expr = f"CAST({expr} AS {item.cast})"
        name = item.alias or (item.column if item.cast else None)
        parts.append(f"{expr} AS {ident(name)}" if name else expr)
    return ", ".join(parts)


def order_sql(terms: list[OrderTerm], table: Table) -> str:
    """` ORDER BY ...` for the terms, or empty text without any."""
    if not terms:
        return ""
    rendered = []
    for term in terms:
        sql = f"{table.qualified}.{ident(term.column)} {'DESC' if term.descending else 'ASC'}"
        rendered.append(sql + (f" NULLS {term.nulls}" if term.nulls else ""))
    return " ORDER BY " + ", ".join(rendered)
