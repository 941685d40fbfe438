"""Values as PostgreSQL takes them (issue 11, kinds 1 and 5): JSON numbers keep every digit on the way to jsonb and
in verify's comparison, numeric text keeps every digit, and timestamps are parsed and rounded as PostgreSQL does.
Every expected value is asked of the real PostgreSQL behind the dev server (one round trip per test), never
written down from memory; the end-to-end tests run the real `syncd` against the dev server and the real PostgREST.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd.mapping import JsonText, RowError, TableMapping, encode_row
from syncd.target import exact_json
from syncd.timeparse import pg_timestamp
from syncd.verify import canonical
from tests.conftest import create_tables
from tests.e2e import App, free_port, on_both_servers, write_config
from tests.postgrest import Secondary

# JSON texts whose numbers float64 would change, or that Python's float refuses (1e400), next to plain ones.
JSON_TEXTS = [
    '{"amount": 12345678901234567.89}', '{"rate": 0.1000000000000000055511151231257827}', "1e400", "-0", "-0.0",
    "1.50", "1E-7", "1e2", "[1.0, 2.50, 3]", "123456789012345678901234567890", '{"a": {"b": [0.1, 1e-400]}}',
    "99999999999999999999.000000000000000000001", '{"x": 1, "y": "z"}', "0.1", "3.14", '"1.0"',
    "1" + "0" * 5000,
]
JSONB_PAIRS = [  # (a, b): verify must call them equal exactly when PostgreSQL's jsonb equality does
    ("1.0", "1"), ("1e2", "100"), ("1.50", "1.5"), ("-0", "0"), ('{"a": 1.0}', '{"a": 1}'),
    ("12345678901234567.89", "12345678901234567.90"), ("0.1000000000000000055511151231257827", "0.1"),
    ("1e400", "1e401"), ("[1, 2]", "[2, 1]"), ('{"a": 1, "b": 2}', '{"b": 2, "a": 1}'), ('"1"', "1"),
    ("1E-7", "0.0000001"), ("123456789012345678901234567890", "123456789012345678901234567891"),
]
NUMERIC_PAIRS = [  # (text in SQLite, text in PostgreSQL's numeric column)
    ("12345678901234567.89", "12345678901234567.89"), ("12345678901234567.89", "12345678901234567.00"),
    ("1.0", "1"), ("1e2", "100"), (" 2.50 ", "2.5"), ("0.1000000000000000055511151231257827", "0.1"),
    ("-0", "0"), ("99999999999999999999999", "99999999999999999999998"),
    ("0x1A", "26"), ("0o17", "15"), ("-0b101", "-5"), ("1_000.5", "1000.5"), ("0x1A", "27"),  # PostgreSQL 16 reads them
]


def mapped_json(text: str) -> object:
    """The value the `json` transform gives for `text`."""
    mapping = TableMapping(source="t", target="t", key=("id",), transforms={"doc": "json"})
    return mapping.map_row({"id": 1, "doc": text}, (1,))["doc"]


def test_json_numbers_arrive_as_jsonb_keeps_them(pg: psycopg.Connection):
    """The request body syncd builds for a `json` column makes PostgreSQL's jsonb hold what it holds for the app's
    own text: every digit, 1e400 included (PostgreSQL reads JSON numbers as numeric)."""
    bodies = [encode_row({"doc": mapped_json(text)}) for text in JSON_TEXTS]
    rows = pg.execute("SELECT t::jsonb::text, (b::jsonb -> 'doc')::text FROM unnest(%s::text[], %s::text[]) AS u(t, b)",
                      (JSON_TEXTS, bodies)).fetchall()
    assert [got for _, got in rows] == [expected for expected, _ in rows]


def test_json_that_float_keeps_stays_a_python_value():
    """Only texts whose numbers float64 would change travel as written; the common case stays parsed (fast)."""
    assert mapped_json('{"a": [1, 2.5, "x"], "b": -0.0}') == {"a": [1, 2.5, "x"], "b": -0.0}
    assert mapped_json("1.50") == JsonText("1.50")
    assert encode_row({"k": 1, "doc": JsonText(' {"n": 1e400} '.strip())}) == '{"k":1,"doc":{"n": 1e400}}'


@pytest.mark.parametrize("text", ["[1, NaN]", '{"a": Infinity}', '{"a": 1.50, "b": -Infinity}', '{"a": 1.50,}'])
def test_json_that_jsonb_refuses_is_still_a_row_error(text: str):
    """The exact path validates the whole text too: NaN, Infinity and broken JSON after an exact number are refused."""
    mapping = TableMapping(source="t", target="t", key=("id",), transforms={"doc": "json"})
    with pytest.raises(RowError, match=r"Infinity or NaN|invalid JSON"):
        mapping.map_row({"id": 1, "doc": text}, (1,))


def test_verify_compares_jsonb_numbers_as_postgresql_does(pg: psycopg.Connection):
    """verify's canonical jsonb values are equal exactly when PostgreSQL's jsonb equality says so; the secondary's
    side is read the way read_page reads it (Decimal, never float64)."""
    lefts, rights = [a for a, _ in JSONB_PAIRS], [b for _, b in JSONB_PAIRS]
    rows = pg.execute("SELECT a::jsonb = b::jsonb, to_json(b::jsonb)::text FROM unnest(%s::text[], %s::text[]) "
                      "AS u(a, b)", (lefts, rights)).fetchall()
    for (left, _), (pg_equal, served) in zip(JSONB_PAIRS, rows, strict=True):
        source, secondary = canonical("jsonb", mapped_json(left)), canonical("jsonb", exact_json(served.encode()))
        assert (source == secondary) is pg_equal, (left, served)


@pytest.mark.parametrize(("target_format", "texts"), [
    ("timestamp with time zone", ["Mon, 15 Jan 2024 10:30:00 GMT", "Tue, 16 Jan 2024 08:00:00 +0200"]),
    ("timestamp without time zone", ["Mon, 15 Jan 2024 10:30:00 GMT"]),
    ("date", ["2024-1-5", "2024-1-5 9:05", "2024-01-15T23:59:59+05", "2024-01-15"]),
])
def test_date_and_time_text_postgresql_reads_compares_as_what_it_stores(pg: psycopg.Connection, target_format: str,
                                                                        texts: list[str]):
    """JavaScript's Date.toUTCString() (RFC 2822) and dates without zero padding, which PostgreSQL reads: verify
    reads them to the value PostgreSQL stores (they were reported different forever, --repair or not)."""
    pg.execute("SET TimeZone = 'UTC'")
    pg_type = {"timestamp with time zone": "timestamptz", "timestamp without time zone": "timestamp",
               "date": "date"}[target_format]
    for text in texts:
        (served,) = pg.execute(f"SELECT to_json(%s::text::{pg_type}) #>> '{{}}'", (text,)).fetchone()
        assert canonical(target_format, text) == canonical(target_format, served), (text, served)


def test_verify_compares_numeric_text_exactly(pg: psycopg.Connection):
    """TEXT shipped to a numeric column: equal exactly when PostgreSQL's numeric equality says so (a change in the
    last of 19 digits is a difference; 1.0 and 1, 1e2 and 100 are one number)."""
    lefts, rights = [a for a, _ in NUMERIC_PAIRS], [b for _, b in NUMERIC_PAIRS]
    rows = pg.execute("SELECT a::numeric = b::numeric, to_json(b::numeric)::text FROM unnest(%s::text[], %s::text[]) "
                      "AS u(a, b)", (lefts, rights)).fetchall()
    for (left, _), (pg_equal, served) in zip(NUMERIC_PAIRS, rows, strict=True):
        assert (canonical("numeric", left) == canonical("numeric", exact_json(served.encode()))) is pg_equal, left


def test_real_values_compare_as_the_text_python_sends():
    """A SQLite REAL goes as its repr, which numeric parses exactly: 0.1 is 0.1 there, not 0.1000000000000000055."""
    assert canonical("numeric", 0.1) == canonical("numeric", exact_json(b"0.1"))
    assert canonical("numeric", 0.1) != canonical("numeric", exact_json(b"0.1000000000000000055511151231257827"))
    assert canonical("double precision", 0.1) == canonical("double precision", exact_json(b"0.1000000000000000055"))


# -- timestamps ---------------------------------------------------------------------------------------------

TIME_TEXTS = [
    "2024-01-01 00:00:00.1234565Z", "2024-01-01 00:00:00.1234575Z", "2024-01-15T10:30:00.1234567Z",
    "2024-01-01 23:59:59.9999996Z", "2024-01-15T10:30:00.0000005Z", "2024-01-15T10:30:00.0000015Z",
    "2024-01-01 00:00:00+05:30:15", "2024-01-15T10:30:00-03", "2024-01-15 10:30:00 +0530", "999-01-01",
    "0999-01-01 10:00", "0001-01-01 01:00:00+01", "2024-01-01t10:00:00z", "2024-01-15 24:00:00",
    "2024-01-15 23:59:60", "2024-01-15 10:30:00 UTC", "2024-1-5 1:2:3", "2024-01-15T10:30:00.", "infinity",
    " -Infinity ", "2024-01-15T10:30:00+15:59:59", "2024-01-15 24:00:00.0000001", "2024-01-15T10:30",
]


def postgresql_reads(pg: psycopg.Connection, texts: list[str]) -> list[tuple[str | None, str | None]]:
    """[(timestamptz as PostgREST sends it, timestamp as PostgREST sends it)] for each text, None where
    PostgreSQL refuses it: one round trip."""
    return pg.execute(
        "SELECT CASE WHEN pg_input_is_valid(t, 'timestamptz') THEN to_json(t::timestamptz) #>> '{}' END, "
        "CASE WHEN pg_input_is_valid(t, 'timestamp') THEN to_json(t::timestamp) #>> '{}' END "
        "FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n", (texts,)).fetchall()


def same_time(ours: str, theirs: str | None) -> bool:
    """Whether syncd's ISO text and PostgreSQL's JSON text name the same value (PostgreSQL writes '.5', Python
    '.500000'; both write 'infinity' as it is)."""
    if theirs is None or "infinity" in ours:
        return ours == theirs
    return datetime.fromisoformat(ours) == datetime.fromisoformat(theirs)


def assert_read_as_postgresql(pg: psycopg.Connection, texts: list[str]) -> None:
    """Every text syncd reads, PostgreSQL reads to the same instant (timestamptz, session TimeZone UTC) and the same
    wall time (timestamp)."""
    pg.execute("SET TimeZone = 'UTC'")
    for text, (with_zone, without) in zip(texts, postgresql_reads(pg, texts), strict=True):
        for flag, theirs in ((True, with_zone), (False, without)):
            try:
                ours = pg_timestamp(text, with_zone=flag)
            except ValueError:
                continue  # refused with a clear message: never a silently different value
            assert same_time(ours, theirs), (text, flag, ours, theirs)


def test_timestamps_are_read_and_rounded_as_postgresql_does(pg: psycopg.Connection):
    """Sub-microsecond digits round as PostgreSQL rounds (rint of the double: half to even), offsets with seconds,
    years before 1000, 24:00, second 60, infinity: each as PostgreSQL reads it; and each of these is read."""
    assert_read_as_postgresql(pg, TIME_TEXTS)
    for text in TIME_TEXTS:
        pg_timestamp(text, with_zone=True)


DIGITS = st.integers(0, 10**9).map(str)
TIME_TEXT = st.builds(
    "{}-{}-{}{}{}:{}{}{}{}".format,
    st.sampled_from(["2024", "0999", "999", "0001", "9999", "1970", "24", "10000", "0000"]),
    st.sampled_from(["01", "1", "02", "12", "13", "00"]), st.sampled_from(["01", "29", "30", "31", "9", "32"]),
    st.sampled_from(["T", " ", "t", "  ", "_"]), st.sampled_from(["00", "0", "23", "24", "9", "25"]),
    st.sampled_from(["00", "59", "60", "5"]), st.sampled_from(["", ":00", ":59", ":60", ":61", ":5"]),
    st.one_of(st.just(""), DIGITS.map(lambda d: "." + d), st.just(".")),
    st.sampled_from(["", "Z", "z", " UTC", "gmt", "+05:30", "-03", "+0530", "+05:30:15", "-15:59:59", "+16:00",
                     " +01", "+5", "ZZ", "+05:3"]),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(TIME_TEXT, min_size=150, max_size=150))
def test_timestamp_property_against_postgresql(pg: psycopg.Connection, texts: list[str]):
    """Generated ISO-like texts (valid and not): whatever syncd reads, PostgreSQL reads to the same value."""
    assert_read_as_postgresql(pg, texts)


# -- end to end ---------------------------------------------------------------------------------------------

FIDELITY_SCHEMA = """
CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT);
CREATE TABLE price (id INTEGER PRIMARY KEY, amount TEXT, cost DECIMAL(10,2));
CREATE TABLE ev (id INTEGER PRIMARY KEY, at TEXT, naive TEXT, conv TEXT);
"""
FIDELITY_TABLES = {
    "fid_docs": "CREATE TABLE fid_docs (id bigint PRIMARY KEY, body jsonb)",
    "fid_price": "CREATE TABLE fid_price (id bigint PRIMARY KEY, amount numeric, cost numeric)",
    "fid_ev": "CREATE TABLE fid_ev (id bigint PRIMARY KEY, at timestamptz, naive timestamp, conv timestamptz)",
}
FIDELITY_CONFIG = """
[[table]]
name = "docs"
target = "fid_docs"
[table.columns.body]
transform = "json"

[[table]]
name = "price"
target = "fid_price"

[[table]]
name = "ev"
target = "fid_ev"
[table.columns.conv]
transform = "timestamp"
"""


@pytest.fixture
def fidelity_app(tmp_path: Path, secondary: Secondary, pg: psycopg.Connection) -> App:
    """An app with a jsonb, a numeric and a timestamp table, shipping to `secondary`."""
    create_tables(secondary, FIDELITY_TABLES)
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).executescript("PRAGMA journal_mode=WAL;" + FIDELITY_SCHEMA)
    config = tmp_path / "syncd.toml"
    write_config(config, db, secondary, f"127.0.0.1:{free_port()}")
    config.write_text(config.read_text().split("[[table]]")[0] + FIDELITY_CONFIG)
    app = App(db, config, "")
    assert app.syncd("install").returncode == 0
    return app


def run_once(app: App) -> None:
    result = app.syncd("run", "--once")
    assert result.returncode == 0, result.stderr



@on_both_servers
def test_numbers_ship_and_verify_exactly(fidelity_app: App, pg: psycopg.Connection):
    """Field case 02: JSON numbers reach jsonb as the app wrote them, numeric text every digit; verify calls that
    equal, and a change in PostgreSQL's last digit different."""
    db = fidelity_app.connect()
    db.executemany("INSERT INTO docs VALUES (?, ?)", list(enumerate(JSON_TEXTS[:12], 1)))
    db.execute("INSERT INTO price VALUES (1, '12345678901234567.89', NULL)")
    # a REAL (DECIMAL's affinity stores 1/3 as a double) into numeric: the shortest digits, whichever path renders it
    db.executemany("INSERT INTO price VALUES (?, NULL, ?)", [(2, 1.0 / 3), (3, 123.456 / 7), (4, 0.1)])
    run_once(fidelity_app)
    kept = pg.execute("SELECT t::jsonb::text FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n",
                      (JSON_TEXTS[:12],)).fetchall()
    assert pg.execute("SELECT body::text FROM fid_docs ORDER BY id").fetchall() == kept
    assert pg.execute("SELECT amount::text, cost::text FROM fid_price ORDER BY id").fetchall() == [
        ("12345678901234567.89", None), (None, "0.3333333333333333"), (None, "17.63657142857143"), (None, "0.1")]
    assert fidelity_app.syncd("verify").returncode == 0
    pg.execute("""UPDATE fid_docs SET body = '{"amount": 12345678901234567.90}' WHERE id = 1""")
    pg.execute("UPDATE fid_price SET amount = 12345678901234567.00 WHERE id = 1")
    report = json.loads(fidelity_app.syncd("verify", "--json").stdout)
    assert {t["table"]: t["different"] for t in report["tables"]} == {"docs": 1, "price": 1, "ev": 0}


@on_both_servers
def test_times_ship_and_verify_as_postgresql_rounds(fidelity_app: App, pg: psycopg.Connection):
    """Field case 11: 7 fractional digits (.NET's "o"), offsets with seconds, years before 1000 and infinity, with
    and without the timestamp transform: PostgreSQL rounds them, verify rounds them the same way, so equal, and
    `--repair` has nothing to enqueue."""
    times = ["2024-01-15T10:30:00.1234567Z", "2024-01-01 00:00:00.1234565+05:30:15", "0999-01-01T00:00:00Z",
             "infinity", "2024-01-15 23:59:59.9999999", "-infinity"]
    db = fidelity_app.connect()
    db.executemany("INSERT INTO ev VALUES (?, ?, ?, ?)", [(i, t, t, t) for i, t in enumerate(times, 1)])
    run_once(fidelity_app)
    pg.execute("SET TimeZone = 'UTC'")
    expected = pg.execute("SELECT t::timestamptz::text, t::timestamp::text, t::timestamptz::text "
                          "FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n) ORDER BY n", (times,)).fetchall()
    assert pg.execute("SELECT at::text, naive::text, conv::text FROM fid_ev ORDER BY id").fetchall() == expected
    verified = fidelity_app.syncd("verify", "--repair", "--json")
    assert verified.returncode == 0, verified.stdout
    assert all(t["repair"] == 0 for t in json.loads(verified.stdout)["tables"])
    pg.execute("UPDATE fid_ev SET at = at + interval '1 microsecond' WHERE id = 1")
    report = json.loads(fidelity_app.syncd("verify", "--json").stdout)
    assert {t["table"]: t["different"] for t in report["tables"]}["ev"] == 1
