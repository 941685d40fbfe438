"""The request body built by SQLite (json_object) and by the Python mapping, which stays the reference: for random
rows of every storage class, random column names, renames, exclusions and transforms, a row SQLite renders gives
exactly the JSON value `map_row` gives, and a row `map_row` refuses (or renders otherwise) is one SQLite hands to
`map_row` (hypothesis, property-based)."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import apsw
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from syncd.keys import InvalidText
from syncd.mapping import RowError, TableMapping
from syncd.sqlite import quote_ident, register_functions

TRANSFORMS = [None, None, "bool", "bytea", "json", "timestamp", "vector"]

names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                max_size=8)
floats = st.one_of(st.floats(allow_nan=False), st.sampled_from([0.0, -0.0, 1.0, 0.1, 1e308, -1e-308, 5e-324]),
                   st.floats(min_value=-1e15, max_value=1e15),  # where SQLite's printf may write them (real_sql)
                   st.builds(lambda n, k: n / 2**k, st.integers(-10**15, 10**15), st.integers(0, 52)))  # ties
texts = st.one_of(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
                  st.sampled_from(["1", "0", "true", "FALSE", " t", "f", "T", "yes", "", "é", "\u2028"]))
values = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1), floats, texts,
                   st.binary(max_size=8), st.binary(min_size=1, max_size=6).map(lambda b: ("invalid-utf8", b)))


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], TableMapping, list[list[object]]]:
    columns = draw(st.lists(names, min_size=1, max_size=5, unique_by=str.lower))
    key = columns[0]
    others = columns[1:]
    exclude = draw(st.sets(st.sampled_from(others))) if others else set()
    renames = {c: draw(names) for c in others if c not in exclude and draw(st.booleans())}
    transforms = {c: t for c in others if c not in exclude and (t := draw(st.sampled_from(TRANSFORMS)))}
    try:
        mapping = TableMapping(source="t", target="t", key=(key,), exclude=frozenset(exclude), renames=renames,
                               transforms=transforms)
    except ValueError:  # an inconsistent mapping (two columns under one name): the config refuses it anyway
        mapping = TableMapping(source="t", target="t", key=(key,))
    rows = draw(st.lists(st.lists(values, min_size=len(columns) - 1, max_size=len(columns) - 1), min_size=1,
                         max_size=4))
    return columns, mapping, rows


def store(columns: list[str], rows: list[list[object]]) -> apsw.Connection:
    db = apsw.Connection(":memory:")
    register_functions(db)
    names = ", ".join(quote_ident(c) for c in columns)
    db.execute(f"CREATE TABLE t ({names}, PRIMARY KEY ({quote_ident(columns[0])}))")
    for i, row in enumerate(rows):
        params, placeholders = [i], ["?"]
        for value in row:
            if isinstance(value, tuple):  # text that is not UTF-8, as an app can store it
                params.append(value[1])
                placeholders.append("CAST(? AS TEXT)")
            else:
                params.append(value)
                placeholders.append("?")
        db.execute(f"INSERT INTO t VALUES ({', '.join(placeholders)})", params)
    return db


def python_rows(db: apsw.Connection, columns: list[str]) -> list[dict[str, object]]:
    """The rows as syncd reads them for map_row: TEXT as bytes where it is not UTF-8 (InvalidText)."""
    select = ", ".join(f"typeof({quote_ident(c)}), CAST({quote_ident(c)} AS BLOB)" for c in columns)
    out = []
    for values in db.execute(f"SELECT {select} FROM t ORDER BY {quote_ident(columns[0])}"):
        row: dict[str, object] = {}
        for i, column in enumerate(columns):
            kind, raw = values[2 * i], values[2 * i + 1]
            row[column] = value_of(kind, raw)
        out.append(row)
    return out


def value_of(kind: str, raw: object) -> object:
    if kind == "text":
        try:
            return bytes(raw).decode("utf-8")  # type: ignore[arg-type]
        except UnicodeDecodeError:
            return InvalidText(raw)  # type: ignore[arg-type]
    if kind == "null":
        return None
    return raw if kind == "blob" else (int(raw) if kind == "integer" else float(raw))  # type: ignore[arg-type]


def exact(value: object) -> object:
    """JSON values compared exactly: a float by its bits (0.0 and -0.0 differ, as they would in PostgreSQL)."""
    if isinstance(value, float):
        return ("float", math.copysign(1.0, value), value.hex())
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables())
def test_sql_and_python_render_the_same_json(table: tuple[list[str], TableMapping, list[list[object]]]):
    columns, mapping, rows = table
    db = store(columns, rows)
    rendering = mapping.sql_rendering(columns)
    if rendering is None:  # a transform or a name collision SQL leaves to Python: nothing to compare
        event("left to Python")
        return
    json_sql, python_when = rendering
    references = python_rows(db, columns)
    sql = f"SELECT CASE WHEN {python_when} THEN NULL ELSE {json_sql} END FROM t ORDER BY {quote_ident(columns[0])}"
    try:
        rendered = [value for (value,) in db.execute(sql)]
    except UnicodeDecodeError:  # text that is not UTF-8 in the JSON: the whole chunk takes map_row
        event("not UTF-8: left to Python")
        return
    for reference, text in zip(references, rendered, strict=True):
        try:
            expected = mapping.map_row(reference, (reference[columns[0]],))
        except RowError:
            assert text is None, f"SQL rendered a row map_row refuses: {reference!r} -> {text}"
            continue
        event("compared" if text is not None else "row left to Python")
        if text is not None:
            assert exact(json.loads(text)) == exact(json.loads(json.dumps(expected, ensure_ascii=False))), \
                (reference, text, expected)
            # and the same decimals: a numeric or text column of the secondary keeps the digits as sent
            assert json.loads(text, parse_float=Decimal) == json.loads(json.dumps(expected, ensure_ascii=False),
                                                                       parse_float=Decimal), (reference, text, expected)


def test_a_real_is_rendered_with_the_shortest_digits_that_give_its_double_back() -> None:
    """SQLite's json_object writes 1.0/3 as 0.33333333333333332 (17 digits): the SQL rendering sends what Python,
    JavaScript and PostgreSQL's float8 print, so a numeric column holds the same decimal whichever path a row takes."""
    db = store(["id", "price"], [[1.0 / 3], [123.456 / 7], [0.1], [1e16], [2.5e-310]])
    mapping = TableMapping(source="t", target="t", key=("id",))
    json_sql, _ = mapping.sql_rendering(["id", "price"])  # type: ignore[misc]
    texts = [text for (text,) in db.execute(f"SELECT {json_sql} FROM t ORDER BY id")]
    assert texts == ['{"id":0,"price":0.3333333333333333}', '{"id":1,"price":17.63657142857143}',
                     '{"id":2,"price":0.1}', '{"id":3,"price":1e+16}', '{"id":4,"price":2.5e-310}']


HARD_REALS = [0.0, 1e-4, 9.999e-5, 0.5, -0.5, 100.0, 0.763774618976614, 0.1 + 0.2, 123456789012345.0,
              999999999999999.9, 1e15,
              0.07738113403320312, 8867262742899.562,  # 16 digits, ties at the 16th: SQLite would write ...13, ...563
              1797001776.3072073, 0.00030777988738688586, 1733344423.1234567]  # 17 digits
BY_PYTHON = [9.999e-5, 0.1 + 0.2, 999999999999999.9, 1e15, 0.07738113403320312, 8867262742899.562,
             1797001776.3072073, 0.00030777988738688586, 1733344423.1234567]


def test_reals_of_up_to_15_digits_are_written_by_sqlite_and_the_others_by_python_alike() -> None:
    """SQLite's printf writes a REAL whose shortest digits number at most 15 (`mapping.real_sql`); 16 or 17 digits
    (a tie at the 16th digit among them: SQLite rounds it away from zero, Python to even) or an exponent go to
    Python's repr. Either way the text is json.dumps's, digit for digit."""
    mapping = TableMapping(source="t", target="t", key=("id",))
    json_sql, _ = mapping.sql_rendering(["id", "v"])  # type: ignore[misc]
    db = store(["id", "v"], [[v] for v in HARD_REALS])
    called: list[float] = []
    db.create_scalar_function("syncd_real_json", lambda v: called.append(v) or repr(v), 1)
    texts = [text for (text,) in db.execute(f"SELECT {json_sql} FROM t ORDER BY id")]
    assert texts == [json.dumps({"id": i, "v": v}, separators=(",", ":")) for i, v in enumerate(HARD_REALS)]
    assert called == BY_PYTHON


def test_a_negative_zero_and_an_infinite_real_take_the_python_path_and_a_zero_does_not():
    mapping = TableMapping(source="t", target="t", key=("id",))
    db = store(["id", "v"], [[-0.0], [0.0], [1e308 * 10], [2.5]])
    _, python_when = mapping.sql_rendering(["id", "v"])  # type: ignore[misc]
    assert [v for (v,) in db.execute(f"SELECT {python_when} FROM t ORDER BY id")] == [1, 0, 1, 0]


def test_tables_with_a_transform_sql_cannot_do_exactly_are_left_to_python():
    for transform in ("json", "timestamp", "vector"):
        mapping = TableMapping(source="t", target="t", key=("id",), transforms={"v": transform})
        assert mapping.sql_rendering(["id", "v"]) is None
    assert TableMapping(source="t", target="t", key=("id",), transforms={"v": "bool"}).sql_rendering(["id", "v"])
