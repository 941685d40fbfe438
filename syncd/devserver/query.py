"""PostgREST's URL grammar (filters, logic trees, select, order, limit) turned into SQL.

Only what a writing client and the seed's queries use is supported; anything else is a PGRST100
parse error, as PostgREST answers for syntax it does not understand. Values always travel as
untyped query parameters so PostgreSQL casts them to the column's type (and a bad value is 22P02).

Column names are read as PostgREST 12's parser (ApiRequest/QueryParams.hs, `pFieldName`) reads them, the same
in filters, logic trees, select, order, on_conflict and columns: either a double-quoted name, inside which a
backslash takes the next character as it is (`"i\\"d"` is `i"d`), or words of letters, digits, `_`, `$` and
spaces (trimmed) joined by `-`. Like PostgREST, on_conflict, columns and a filter's key end at the first
character that cannot continue them. JSON paths (`->`, `->>`) and resource embedding are not supported.
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
NAME_CHARS = set("0123456789_ $")  # besides letters: the characters of an unquoted name
SPACES = " \t"


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
        elif key == "limit":
            query.limit = parse_count(value)
        elif key == "offset":
            query.offset = max(0, parse_count(value) or 0)
        elif key == "on_conflict":
            query.on_conflict = parse_columns(key, value)
        elif key == "columns":
            query.columns = list(dict.fromkeys(parse_columns(key, value)))  # a set in PostgREST
        elif key in LOGIC_KEYS:
            negated, conjunction = key.startswith("not."), key.removeprefix("not.")
            query.where.append(parse_logic(conjunction, value, negated))
        else:
            query.where.append(parse_filter(parse_key(key), value))
    return query


class Scanner:
    """One query parameter's text, read left to right as PostgREST's parser reads it. Its errors are PGRST100
    `failed to parse <what> (<whole>)`, saying where and what was expected; `whole` is the parameter's text when
    `text` is only a part of it (one condition of a logic tree)."""

    def __init__(self, text: str, what: str, whole: str | None = None) -> None:
        self.text = text
        self.what = what
        self.whole = whole
        self.pos = 0

    def error(self, expecting: str) -> errors.ApiError:
        """The PGRST100 for what stands at the current position."""
        found = repr(self.text[self.pos]) if self.pos < len(self.text) else "end of input"
        part = f" of {self.text!r}" if self.whole is not None else ""
        return self.fail(f"unexpected {found} at column {self.pos + 1}{part}, expecting {expecting}")

    def fail(self, details: str) -> errors.ApiError:
        """A PGRST100 with these details."""
        return errors.parse_error(f"failed to parse {self.what} ({self.text if self.whole is None else self.whole})",
                                  details)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, token: str) -> bool:
        return self.text.startswith(token, self.pos)

    def take(self, token: str) -> bool:
        """Step over `token` when it comes next; whether it did."""
        if self.peek(token):
            self.pos += len(token)
            return True
        return False

    def skip_spaces(self) -> bool:
        """Step over spaces and tabs; whether there were any."""
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in SPACES:
            self.pos += 1
        return self.pos > start

    def rest(self) -> str:
        return self.text[self.pos:]

    def name(self) -> str:
        """PostgREST's `pFieldName`: a double-quoted name (a backslash takes the next character as it is), or words
        joined by `-` (not by `->`). Raises ApiError PGRST100 when neither comes next."""
        if self.peek('"'):
            return self.quoted()
        words = [self.word()]
        while self.peek("-") and not self.peek("->"):
            self.pos += 1
            words.append(self.word())
        return "-".join(words)

    def quoted(self) -> str:
        """`"a \\"b\\" c"` -> `a "b" c`. Raises ApiError PGRST100 without the closing quote."""
        chars: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                return "".join(chars)
            if char == "\\" and self.pos < len(self.text):
                char = self.text[self.pos]
                self.pos += 1
            chars.append(char)
        raise self.error("a closing '\"'")

    def word(self) -> str:
        """PostgREST's `pIdentifier`: letters, digits, `_`, `$` and spaces, trimmed (so possibly empty). Raises
        ApiError PGRST100 when none comes next."""
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalpha() or self.text[self.pos] in NAME_CHARS):
            self.pos += 1
        if self.pos == start:
            raise self.error('a column name (letters, digits, "_ $", or in double quotes)')
        return self.text[start:self.pos].strip()

    def field(self) -> str:
        """PostgREST's `pField` without JSON paths: spaces, a name, spaces. Raises ApiError PGRST100 for a JSON path
        (`->`, `->>`), which the dev server does not support."""
        self.skip_spaces()
        name = self.name()
        self.no_json_path()
        self.skip_spaces()
        return name

    def no_json_path(self) -> None:
        """Raises ApiError PGRST100 when a JSON path (`->`, `->>`) comes next."""
        if self.peek("->"):
            raise self.fail("JSON paths (-> and ->>) are not supported by the syncd dev server")

    def alias(self) -> str | None:
        """`name:` (a single colon) before a select item -> name, else None and nothing read."""
        start = self.pos
        try:
            name = self.name()
        except errors.ApiError:
            name = None
        if name is not None and self.peek(":") and not self.peek("::"):
            self.pos += 1
            return name
        self.pos = start
        return None


def parse_key(key: str) -> str:
    """A filter's key -> its column: `name` or `"quoted name"`. As in PostgREST, reading stops at the first character
    that cannot continue the key (`"a"x` is a). Raises ApiError PGRST100 when it does not start with a name or has a
    JSON path, PGRST108 for `resource.column` (the dev server embeds nothing)."""
    scan = Scanner(key, "tree path")
    path = [scan.name()]
    while scan.take("."):
        path.append(scan.name())
    scan.no_json_path()
    if len(path) > 1:
        raise errors.not_embedded(path[0])
    return path[0]


def parse_columns(name: str, text: str) -> list[str]:
    """`on_conflict=` or `columns=` -> the column names in order. As in PostgREST, reading stops at the first
    character that cannot continue the list (`a,b;c` is a and b). Raises ApiError PGRST100 when it does not start
    with a name, or a comma or a name is missing after spaces."""
    scan = Scanner(text, f"{name} parameter")
    names = [scan.name()]
    while True:
        start = scan.pos
        scan.skip_spaces()
        if not scan.take(","):
            if scan.pos != start:
                raise scan.error("','")
            return names
        scan.skip_spaces()
        names.append(scan.name())


def parse_count(value: str) -> int | None:
    """The value of `limit` or `offset` -> an integer (spaces around it and a sign allowed), or None for anything
    else, which PostgREST 12 ignores (it reads both with Haskell's `readMaybe`; measured: `limit=x` and
    `limit=1.5` give every row). A negative limit is refused later (416 PGRST103); a negative offset is 0."""
    text = value.strip(SPACES)
    return int(text) if re.fullmatch(r"-?[0-9]+", text) else None


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
        nested = LOGIC_ITEM.fullmatch(item.strip(SPACES))
        if nested:
            children.append(parse_logic(nested["op"], nested["body"], bool(nested["not"])))
            continue
        column, rest = split_column(item, text)
        leaf = parse_filter(column, rest)
        leaf.value = unquote(leaf.value) if leaf.operator != "in" else leaf.value
        children.append(leaf)
    if not children:
        raise errors.parse_error(f"failed to parse logic tree ({text})", "empty logic tree")
    return Logic(conjunction, children, negated)


def split_column(item: str, text: str) -> tuple[str, str]:
    """One condition of the logic tree `text`, `col.op.value` or `"col.with.dots".op.value` (spaces around the column
    allowed) -> (column, "op.value"). Raises ApiError PGRST100 without a column and a `.` after it."""
    scan = Scanner(item, "logic tree", whole=text)
    column = scan.field()
    if not scan.take("."):
        raise scan.error("'.'")
    return column, scan.rest()


def split_top_level(text: str) -> list[str]:
    """Split on commas outside parentheses and double quotes (with backslash escapes in quotes)."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
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
    """`select=` -> SelectItems, `[alias:]column[::cast]` or `*` each. As in PostgREST 12, a text that does not
    start with an item (empty, `:x`, `*x`) selects every column and the rest is ignored. Raises ApiError PGRST200
    for a resource embedding (not supported), PGRST100 for a malformed item."""
    scan = Scanner(text, "select parameter")
    if not starts_item(text):
        return [SelectItem("*")]
    items = [select_item(scan)]
    while True:
        scan.skip_spaces()
        if not scan.take(","):
            return items
        items.append(select_item(scan))


def starts_item(text: str) -> bool:
    """Whether PostgREST's select parser reads a first item from `text` (spaces, a name, or a `*` that ends the
    item) rather than none at all."""
    head = text[:1]
    return head == '"' or head.isalpha() or head in NAME_CHARS or (head == "*" and text[1:2] in ("", ",", ")"))


def select_item(scan: Scanner) -> SelectItem:
    """The select item at the scanner, up to (not over) the `,` or `)` after it. Raises ApiError PGRST200 for a
    resource embedding (`rel(...)`, `rel!hint(...)`, `..rel(...)`), PGRST100 for anything else malformed, a cast
    with `$` included (dollar quoting)."""
    scan.skip_spaces()
    if scan.take(".."):
        raise embedding_not_supported(scan.name())
    if scan.take("*"):
        return end_of_item(scan, SelectItem("*"), "',' or end of input")
    alias = scan.alias()
    column = scan.field()
    if scan.peek("(") or scan.peek("!"):
        raise embedding_not_supported(column)
    cast = None
    if scan.take("::"):
        cast = scan.word()
        if not cast or "$" in cast:
            raise scan.fail(f"bad cast: {cast!r}; a type name of letters, digits, _ and spaces")
    return end_of_item(scan, SelectItem(column, alias, cast), "'::', ',' or end of input")


def end_of_item(scan: Scanner, item: SelectItem, expecting: str) -> SelectItem:
    """`item` when a `,`, a `)` or the end comes next. Raises ApiError PGRST100 otherwise."""
    if scan.at_end() or scan.peek(",") or scan.peek(")"):
        return item
    raise scan.error(expecting)


def embedding_not_supported(name: str) -> errors.ApiError:
    """PGRST200 for a select item that embeds the resource `name`."""
    return errors.ApiError(400, "PGRST200", f"Could not find a relationship for '{name}' in the schema cache",
                           "resource embedding is not supported by the syncd dev server")


def parse_order(text: str) -> list[OrderTerm]:
    """`order=` -> OrderTerms, `column[.asc|.desc][.nullsfirst|.nullslast]` each, in that order. Raises ApiError
    PGRST100 for a missing column or an unknown or misplaced modifier, PGRST108 for `resource(column)` (the dev
    server embeds nothing)."""
    scan = Scanner(text, "order")
    terms = [order_term(scan)]
    while scan.take(","):
        terms.append(order_term(scan))
    return terms


def order_term(scan: Scanner) -> OrderTerm:
    """The order term at the scanner, up to (not over) the `,` after it. Raises ApiError as `parse_order`."""
    column = scan.field()
    if scan.peek("("):
        raise errors.not_embedded(column)
    term = OrderTerm(column)
    for direction in ("asc", "desc"):
        if scan.take(f".{direction}"):
            term.descending = direction == "desc"
            break
    for nulls in ("nullsfirst", "nullslast"):
        if scan.take(f".{nulls}"):
            term.nulls = nulls.removeprefix("nulls").upper()
            break
    if not (scan.at_end() or scan.peek(",")):
        raise scan.error("'.asc', '.desc', '.nullsfirst', '.nullslast' (in that order), ',' or end of input")
    return term


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
    parts: list[str] = []
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
