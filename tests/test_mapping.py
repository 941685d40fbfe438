"""syncd.mapping: SQLite rows -> JSON-ready rows for PostgREST, and the RowError of every value that cannot go."""

from __future__ import annotations

import json
import math
import sqlite3
import struct
from pathlib import Path

import pytest

from syncd.config import ColumnConfig, TableConfig, load_config
from syncd.keys import InvalidText
from syncd.mapping import RowError, TableMapping

ROOT = Path(__file__).resolve().parents[1]
KEY = ("a1",)


def single(transform: str | None) -> TableMapping:
    """A mapping of table 'artifact' whose column 'c' has `transform`."""
    return TableMapping(source="artifact", target="artifacts", key=("id",), exclude=frozenset(), renames={},
                        transforms={"c": transform} if transform else {})


def convert(transform: str | None, value: object) -> object:
    return single(transform).map_row({"id": "a1", "c": value}, KEY)["c"]


def failure(transform: str | None, value: object) -> RowError:
    with pytest.raises(RowError) as caught:
        single(transform).map_row({"id": "a1", "c": value}, KEY)
    assert caught.value.column == "c"
    message = str(caught.value)
    assert "'artifact'" in message and "'c'" in message and "('a1',)" in message
    return caught.value


# ---- Values without transform ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -(2**63), 2**63 - 1, 1.5, -0.0, "text", "", None])
def test_plain_values_pass_unchanged(value: object):
    """Ints (64-bit), finite floats, text and NULL go as they are, with their type."""
    out = convert(None, value)
    assert out == value and type(out) is type(value)


def test_integer_beyond_64_bits_is_refused():
    """An int outside 64 bits cannot be a SQLite value nor a bigint: RowError, not a silent change."""
    assert "beyond 64 bits" in str(failure(None, 2**63))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_float_is_refused(value: float):
    """NaN and ±Infinity cannot be written as JSON: RowError telling to fix SQLite."""
    message = str(failure(None, value))
    assert "JSON cannot carry Infinity" in message and "fix the value in SQLite" in message


def test_blob_without_transform_names_the_fix():
    """A BLOB in a column without transform asks for transform bytea (or vector) in that column's section."""
    message = str(failure(None, b"\x00\x01"))
    assert 'transform = "bytea"' in message and '"vector"' in message and "[table.columns.c]" in message


def test_invalid_utf8_shows_a_short_hex_prefix_only():
    """Invalid UTF-8 text names the column, shows the first bytes in hex and never the whole value."""
    value = InvalidText(b"ab\xff" + b"z" * 200)
    message = str(failure(None, value))
    assert "invalid UTF-8 in column 'c'" in message and "fix the value in SQLite" in message
    assert "0x6162ff7a" in message and value.hex() not in message and "203 bytes" in message


def test_unexpected_python_type_is_a_row_error():
    """A value of a type SQLite never returns is a RowError, not a crash."""
    assert "cannot be carried" in str(failure(None, object()))


# ---- Renames, exclude, keys -----------------------------------------------------------------------------


def test_rename_exclude_and_transform_together():
    """Excluded columns are dropped, renames and transforms applied, the row's column order kept."""
    mapping = TableMapping(source="artifact", target="artifacts", key=("id",), exclude=frozenset({"secret"}),
                           renames={"extra_json": "extras", "flag": "is_flag"},
                           transforms={"extra_json": "json", "flag": "bool"})
    row = {"flag": 1, "id": "a1", "secret": "s", "extra_json": '{"k": [1]}', "name": "n"}
    out = mapping.map_row(row, KEY)
    assert list(out.items()) == [("is_flag", True), ("id", "a1"), ("extras", {"k": [1]}), ("name", "n")]


def test_unconfigured_column_colliding_with_a_rename_is_refused():
    """A column named like another column's rename target would overwrite it: RowError naming both."""
    mapping = TableMapping(source="artifact", target="artifacts", key=("id",), exclude=frozenset(),
                           renames={"extra_json": "extras"}, transforms={})
    with pytest.raises(RowError, match=r"'extras'.*'extra_json'"):
        mapping.map_row({"id": "a1", "extra_json": "{}", "extras": "x"}, KEY)


def test_map_key_uses_target_names_and_transforms():
    """map_key renames key columns and applies their transforms like map_row; target_key agrees."""
    mapping = TableMapping(source="doc", target="docs", key=("doc", "digest"), exclude=frozenset(),
                           renames={"doc": "document_id"}, transforms={"digest": "bytea"})
    assert mapping.target_key == ["document_id", "digest"]
    assert mapping.map_key(("d1", b"\xab")) == {"document_id": "d1", "digest": "\\xab"}
    assert mapping.map_row({"doc": "d1", "digest": b"\xab"}, ("d1", b"\xab")) == mapping.map_key(("d1", b"\xab"))


def test_map_key_null_is_refused():
    """A NULL key value cannot identify the row in the secondary."""
    mapping = single(None)
    with pytest.raises(RowError, match=r"NULL in key column 'id'.*give it a key in SQLite") as caught:
        mapping.map_key((None,))
    assert caught.value.column == "id"


def test_map_key_value_that_cannot_be_carried_is_refused():
    """A key value JSON cannot carry raises RowError, as in map_row."""
    with pytest.raises(RowError, match="JSON cannot carry Infinity"):
        single(None).map_key((math.inf,))


def test_from_config_reads_columns_and_target():
    """from_config takes target, exclude, renames and transforms from the TableConfig, the key from the caller."""
    table = TableConfig(name="artifact", target="artifacts", exclude=["tmp"],
                        columns={"extra_json": ColumnConfig(rename="extras", transform="json"),
                                 "created_at": ColumnConfig(transform="timestamp")})
    mapping = TableMapping.from_config(table, ["id"])
    assert (mapping.source, mapping.target, mapping.key, mapping.exclude) == ("artifact", "artifacts", ("id",),
                                                                              frozenset({"tmp"}))
    assert dict(mapping.renames) == {"extra_json": "extras"}
    assert dict(mapping.transforms) == {"extra_json": "json", "created_at": "timestamp"}


def test_from_config_refuses_an_excluded_primary_key():
    """A primary key (passed by the caller) that the config excludes would make rows unidentifiable."""
    with pytest.raises(ValueError, match=r"'id'.*remove them from exclude"):
        TableMapping.from_config(TableConfig(name="t", exclude=["id"]), ["id"])


@pytest.mark.parametrize(("renames", "transforms", "match"), [
    ({}, {"c": "yaml"}, "unknown transform"),
    ({"a": "x", "b": "x"}, {}, "both ship as 'x'"),
])
def test_inconsistent_mapping_is_refused(renames: dict[str, str], transforms: dict[str, str], match: str):
    """Unknown transforms and two columns shipped under one name are refused when the mapping is built."""
    with pytest.raises(ValueError, match=match):
        TableMapping(source="t", target="t", key=("id",), exclude=frozenset(), renames=renames,
                     transforms=transforms)


# ---- json -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ('{"a": [1, "x"]}', {"a": [1, "x"]}),
    ('"text"', "text"),
    ("null", None),
    ("", None),
    (" \n\t", None),
    (None, None),
    (3, 3),
    (2.5, 2.5),
    (b'{"a": 1}', {"a": 1}),
    ("123456789012345678901234567890", 123456789012345678901234567890),
])
def test_json_accepted(value: object, expected: object):
    """JSON text (or a BLOB of it) becomes its value, empty text null, numbers pass."""
    assert convert("json", value) == expected


def test_json_invalid_names_the_parser_position():
    """Invalid JSON gives the parser's message with its position and the fix."""
    message = str(failure("json", '{"a": }'))
    assert "invalid JSON" in message and "line 1 column 7" in message and 'transform = "json"' in message


@pytest.mark.parametrize(("value", "words"), [
    ("NaN", "holds NaN"), ("[1, Infinity]", "holds Infinity"), ('{"x": -Infinity}', "holds -Infinity"),
    (math.inf, "JSON cannot carry"), (math.nan, "JSON cannot carry"),
])
def test_json_non_finite_is_refused(value: object, words: str):
    """NaN/Infinity, whether in the text or as a REAL, cannot be carried."""
    assert words in str(failure("json", value))


@pytest.mark.parametrize("value", [InvalidText(b'{"a": "\xff"}'), b'"\xff"'])
def test_json_invalid_utf8_is_refused(value: bytes):
    """Text or a BLOB that is not UTF-8 cannot be parsed as JSON."""
    assert "invalid UTF-8" in str(failure("json", value))


# ---- bool -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (0, False), (1, True), (0.0, False), (1.0, True), ("0", False), ("1", True), ("true", True), ("FALSE", False),
    (" t ", True), ("F", False), (None, None),
])
def test_bool_accepted(value: object, expected: bool | None):
    """0/1 and the texts 0, 1, true, false, t, f (any case, stripped) become booleans."""
    out = convert("bool", value)
    assert out is expected


@pytest.mark.parametrize("value", [2, -1, 0.5, "yes", "", b"\x01", InvalidText(b"\xff")])
def test_bool_refused(value: object):
    """Anything else is a RowError listing the accepted forms."""
    message = str(failure("bool", value))
    assert "'true', 'false'" in message or "invalid UTF-8" in message


# ---- timestamp ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (1705314600, "2024-01-15T10:30:00+00:00"),
    (1705314600.5, "2024-01-15T10:30:00.500000+00:00"),
    (0, "1970-01-01T00:00:00+00:00"),
    (-1, "1969-12-31T23:59:59+00:00"),
    ("1705314600", "2024-01-15T10:30:00+00:00"),
    ("2024-01-15T10:30:00Z", "2024-01-15T10:30:00+00:00"),
    ("2024-01-15T10:30:00.123Z", "2024-01-15T10:30:00.123000+00:00"),
    ("2024-01-15T12:30:00+02:00", "2024-01-15T10:30:00+00:00"),
    ("2024-01-15 10:30:00", "2024-01-15T10:30:00+00:00"),
    ("2024-01-15", "2024-01-15T00:00:00+00:00"),
    (" 2024-01-15T10:30:00z ", "2024-01-15T10:30:00+00:00"),
    ("2024-01-15T10:30:00.1234567Z", "2024-01-15T10:30:00.123457+00:00"),  # rounded, as PostgreSQL rounds
    ("2024-01-01 00:00:00+05:30:15", "2023-12-31T18:29:45+00:00"),
    ("0999-01-01", "0999-01-01T00:00:00+00:00"),
    ("2024-01-15 24:00:00", "2024-01-16T00:00:00+00:00"),
    (" -Infinity", "-infinity"),
    (None, None),
])
def test_timestamp_accepted(value: object, expected: str | None):
    """Unix seconds and ISO 8601 text become ISO 8601 in UTC; offsets are converted to +00:00."""
    assert convert("timestamp", value) == expected


@pytest.mark.parametrize(("value", "words"), [
    ("yesterday", "is not a time"),
    ("2024-13-01", "is not a time"),
    (math.nan, "Infinity"),
    (1e20, "outside the years"),
    (10**30, "outside the years"),
    ("9" * 5000, "outside the years"),
    ("0001-01-01T00:00:00+02:00", "outside the years"),
    ("2024-01-15 BC", "as PostgreSQL does"),
    ("2024-01-15T10:30:00 Europe/Paris", "as PostgreSQL does"),
    (b"\x00", "is not a time"),
])
def test_timestamp_refused(value: object, words: str):
    """Unparsable, non-finite and out-of-range times are RowErrors."""
    assert words in str(failure("timestamp", value))


# ---- bytea ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (b"\x00\xab\xff", "\\x00abff"),
    (b"", "\\x"),
    ("hé", "\\x68c3a9"),
    (InvalidText(b"a\xff"), "\\x61ff"),
    (None, None),
])
def test_bytea_accepted(value: object, expected: str | None):
    """BLOBs and text become PostgreSQL hex text: a backslash, x, lowercase hex."""
    assert convert("bytea", value) == expected


def test_bytea_refuses_numbers():
    """A number is not bytes: RowError naming the transform."""
    assert 'transform = "bytea"' in str(failure("bytea", 5))


# ---- vector ---------------------------------------------------------------------------------------------


def test_vector_from_float32_blob():
    """A BLOB of little-endian float32 becomes pgvector text."""
    assert convert("vector", struct.pack("<3f", 1.0, 2.5, -3.0)) == "[1,2.5,-3]"


def test_vector_values_round_trip_float32():
    """Each element is printed so that it parses back to the same float32."""
    blob = struct.pack("<2f", 0.1, 1e-7)
    text = convert("vector", blob)
    assert struct.pack("<2f", *json.loads(text)) == blob


def test_vector_from_json_text():
    """Text holding a JSON array of numbers gives the same form as the BLOB."""
    assert convert("vector", "[1, 2.5, -3]") == "[1,2.5,-3]"


@pytest.mark.parametrize(("value", "words"), [
    (b"", "multiple of 4"),
    (b"abc", "multiple of 4"),
    (struct.pack("<2f", 1.0, math.nan), "NaN"),
    (struct.pack("<f", math.inf), "NaN or Infinity"),
    ("[]", "non-empty JSON array"),
    ('{"a": 1}', "non-empty JSON array"),
    ('["a"]', "other than numbers"),
    ("[true]", "other than numbers"),
    ("[1, NaN]", "Infinity"),
    ("[1e39]", "float32 range"),
    ("[1,", "invalid JSON"),
    (5, "is not a vector"),
    (InvalidText(b"[\xff]"), "invalid UTF-8"),
])
def test_vector_refused(value: object, words: str):
    """Wrong lengths, non-numbers, empty arrays and non-finite values are RowErrors."""
    assert words in str(failure("vector", value))


# ---- Whole rows -----------------------------------------------------------------------------------------


def test_mapped_row_is_strict_json():
    """A row through every transform is accepted by json.dumps(allow_nan=False)."""
    mapping = TableMapping(source="t", target="t", key=("id",), exclude=frozenset(), renames={},
                           transforms={"j": "json", "b": "bool", "ts": "timestamp", "raw": "bytea", "v": "vector"})
    row = {"id": 2**63 - 1, "j": '{"x": [1.5, null]}', "b": "t", "ts": 1705314600.25, "raw": b"\x01",
           "v": struct.pack("<2f", 0.5, -1), "r": 1.25, "s": "é", "n": None}
    out = mapping.map_row(row, (2**63 - 1,))
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_many_plain_rows_map_correctly():
    """20,000 five-column rows without transforms come out equal to their input (the worker's hot path)."""
    mapping = TableMapping(source="t", target="t", key=("id",), exclude=frozenset(), renames={}, transforms={})
    rows = [{"id": i, "name": f"n{i}", "score": i * 0.5, "note": None, "page": -i} for i in range(20_000)]
    assert [mapping.map_row(row, (row["id"],)) for row in rows] == rows


def test_demo_config_builds_a_mapping_per_table():
    """Every table of syncd/demo/mapping.toml maps a row of its demo SQLite schema (key from config or primary key)."""
    config = load_config(ROOT / "syncd" / "demo" / "mapping.toml", env={})
    db = sqlite3.connect(":memory:")
    db.executescript((ROOT / "syncd" / "demo" / "schema.sql").read_text())
    assert config.tables
    for table in config.tables:
        info = db.execute(f"PRAGMA table_info({table.name})").fetchall()
        primary_key = [name for *_, name in sorted((pk, name) for _, name, _, _, _, pk in info if pk)]
        mapping = TableMapping.from_config(table, table.key or primary_key)
        row = {name: "k" if name in mapping.key else None for _, name, *_ in info}
        out = mapping.map_row(row, ("k",) * len(mapping.key))
        assert set(mapping.target_key) <= set(out) and len(out) == len(info) - len(mapping.exclude)
        assert mapping.map_key(("k",) * len(mapping.key)) == {column: "k" for column in mapping.target_key}
