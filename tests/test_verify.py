"""`syncd verify` finds every kind of difference and `--repair` fixes them; `syncd cutover` refuses until
the two sides are equal. Against real PostgreSQL behind the dev server, with the real `syncd` process; the tests
that read the secondary's answers (pages, OpenAPI, row errors) run against the real PostgREST too, the one that
needs the fault API does not."""

from __future__ import annotations

import json
import random
import re
import struct
import subprocess
import uuid

import psycopg
import pytest

from syncd.config import TableConfig
from syncd.keys import decode_key
from syncd.mapping import TableMapping
from syncd.verify import Scratch, canonical, outbox_key
from tests.e2e import App, assert_converged, dead_letters, on_both_servers, pending, write_mixed_workload
from tests.postgrest import Secondary

WORDS_SCHEMA = """
CREATE TABLE words (n INTEGER PRIMARY KEY, word TEXT, cnt INTEGER, score REAL, amount REAL, tags TEXT, at INTEGER,
                    naive TEXT, day TEXT, vec BLOB, raw BLOB, uid TEXT, ok INTEGER, note TEXT);
"""
WORDS_CONFIG = """
[[table]]
name = "words"
target = "e2e_words"
[table.columns.tags]
transform = "json"
[table.columns.at]
transform = "timestamp"
[table.columns.naive]
transform = "timestamp"
[table.columns.vec]
transform = "vector"
[table.columns.raw]
transform = "bytea"
[table.columns.ok]
transform = "bool"
"""
WORDS = ["a", "B", "b", "Z", "_x", "é", "e", "É", "a,b", 'say "hi"', "x(y)", "1", "10", "9", "ß", "日本", "", " "]


def verify(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    result = app.syncd("verify", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def verify_json(app: App, *args: str) -> dict:
    result = verify(app, "--json", *args)
    return json.loads(result.stdout)


def table_report(report: dict, name: str) -> dict:
    return next(t for t in report["tables"] if t["table"] == name)


def ship(app: App) -> None:
    result = app.syncd("run", "--once")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def words_app(app: App, pg: psycopg.Connection) -> App:
    """The e2e app plus a table of every tricky type, whose INTEGER key is text in PostgreSQL: the two sides
    order the keys differently (1, 2, ..., 10 against '1', '10', ..., '2')."""
    pg.execute("TRUNCATE e2e_words")
    app.connect().executescript(WORDS_SCHEMA)
    app.config.write_text(app.config.read_text() + WORDS_CONFIG)
    assert app.syncd("install").returncode == 0
    rng = random.Random(7)
    db = app.connect()
    for i, word in enumerate(WORDS):
        vector = struct.pack("<3f", 0.1 * i, -1.5, 1e-3) if i % 2 else json.dumps([0.1, i, 2.5])
        db.execute("INSERT INTO words VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (
            i + 1, word, i if i % 3 else str(i), 0.1 * i, 1.25 * i, json.dumps({"z": 1, "a": [1.0, "é"], "i": i}),
            1_700_000_000 + i if i % 2 else f"2023-11-14T23:13:{i:02d}+01:00", f"2024-01-15 10:30:{i:02d}",
            f"2024-02-{i % 28 + 1:02d}", vector, bytes(rng.randrange(256) for _ in range(5)),
            str(uuid.UUID(int=i)).upper(), i % 2, 3.5 if i == 4 else f"note {i}"))
    return app


@on_both_servers
def test_equal_after_shipping_every_type_and_collation(words_app: App):
    """Values PostgreSQL spells differently (timestamps, jsonb key order, real, vector, uuid case, a number in
    a text column) compare equal, and keys ordered differently by the two sides are paged through correctly."""
    write_mixed_workload(words_app.connect(), 1, 300, random.Random(1))
    ship(words_app)
    result = verify(words_app, "--page-size", "4")
    assert result.returncode == 0, result.stdout
    assert "words -> e2e_words: equal (18 rows)" in result.stdout and "verify: 5 table(s) equal" in result.stdout
    report = verify_json(words_app)
    assert report["equal"] is True
    assert table_report(report, "words")["target_rows"] == len(WORDS)


@on_both_servers
def test_each_kind_of_difference_is_found_and_repaired(words_app: App, pg: psycopg.Connection):
    db = words_app.connect()
    db.executemany("INSERT INTO item (id, name, qty, doc_json) VALUES (?, ?, ?, ?)",
                   [(i, f"n{i}", i, json.dumps({"i": i})) for i in range(1, 41)])
    db.executemany("INSERT INTO pair VALUES (?, ?, 'v')", [(f"k,{i}", i) for i in range(10)])
    ship(words_app)
    pg.execute("DELETE FROM e2e_items WHERE id IN (3, 4)")  # missing
    pg.execute("INSERT INTO e2e_items (id, name) VALUES (1000, 'stray')")  # extra
    pg.execute("INSERT INTO e2e_pairs VALUES ('zz \"q\"', 1, 'stray')")  # extra, composite text key
    pg.execute("UPDATE e2e_items SET qty = 99 WHERE id = 5")  # changed value
    pg.execute("UPDATE e2e_items SET doc = to_jsonb(doc::text) WHERE id = 6")  # changed type: object -> string
    pg.execute("UPDATE e2e_words SET score = score + 1 WHERE word = 'É'")
    pg.execute("DELETE FROM e2e_words WHERE word = 'ß'")
    pg.execute("INSERT INTO e2e_words (n, word) VALUES ('100', 'stray')")

    result = verify(words_app, "--page-size", "7")
    assert result.returncode == 1
    out = result.stdout
    assert "item -> e2e_items: DIFFERENT: source 40 rows, secondary 39 rows" in out
    assert "2 missing in the secondary:" in out and "(id)=(3)" in out and "(id)=(4)" in out
    assert "1 extra in the secondary:" in out and "(id)=(1000)" in out
    assert "(id)=(5): qty 5 (source) vs 99 (secondary)" in out
    assert '(id)=(6): doc {"i": 6} (source) vs "{\\"i\\": 6}" (secondary)' in out
    assert '(a, b)=("zz \\"q\\"", 1)' in out
    assert '(n)=("15")' in out and '(n)=("8"): score' in out and '(n)=("100")' in out
    assert "verify: 3 of 5 table(s) differ; `syncd verify --repair` enqueues the differing keys" in out
    report = verify_json(words_app)
    items = table_report(report, "item")
    assert (items["missing"], items["extra"], items["different"], items["unshippable"]) == (2, 1, 2, 0)
    assert report["equal"] is False and table_report(report, "parent")["equal"] is True

    dry = verify(words_app, "--repair", "--dry-run")
    assert "repair: would enqueue 5 key(s)" in dry.stdout and "repair: would enqueue 3 key(s)" in dry.stdout
    assert pending(words_app) == 0
    repaired = verify(words_app, "--repair", "--table", "item", "--table", "pair", "--table", "words")
    assert repaired.returncode == 1 and "repair: enqueued 5 key(s); `syncd run` ships them" in repaired.stdout
    assert pending(words_app) == 5 + 1 + 3
    ship(words_app)
    assert verify(words_app).returncode == 0
    assert_converged(words_app, pg)
    assert dead_letters(words_app) == []


@on_both_servers
def test_unshippable_rows_are_reported_not_compared(app: App):
    keyed_by_email = app.config.read_text().replace('target = "e2e_items"', 'target = "e2e_items"\nkey = ["email"]')
    app.config.write_text(keyed_by_email)
    assert app.syncd("install").returncode == 0
    db = app.connect()
    db.execute("INSERT INTO item (id, name, doc_json, email) VALUES (1, 'ok', '{}', 'a@x'), (2, 'bad', '{not json', "
               "'b@x'), (3, 'no key', NULL, NULL)")
    ship(app)
    assert len(dead_letters(app)) == 2
    result = verify(app)
    assert result.returncode == 1
    assert "2 unshippable in the source (dead letters):" in result.stdout
    assert "1 row(s) with NULL in a key column (email)" in result.stdout
    assert '(email)=("b@x"): table \'item\'' in result.stdout and "invalid JSON" in result.stdout


def test_verify_reads_through_transient_failures(app: App, faults):
    app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(60)])
    ship(app)
    faults(error_rate=0.3, error_status=503, seed=11)
    result = verify(app, "--page-size", "10")
    assert result.returncode == 0 and "verify: 4 table(s) equal" in result.stdout


@on_both_servers
def test_verify_before_install_compares_and_repair_asks_for_install(app: App):
    db = app.connect()
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    assert app.syncd("uninstall", "--drop-outbox", "--force").returncode == 0
    result = verify(app, "--table", "parent")
    assert result.returncode == 1 and "1 missing in the secondary" in result.stdout
    refused = verify(app, "--repair")
    assert refused.returncode == 2 and "syncd is not installed" in refused.stderr


@on_both_servers
def test_text_that_is_not_utf8_is_unshippable_not_a_crash(app: App):
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(12)])
    db.execute("INSERT INTO parent VALUES (5000, CAST(X'66ff6f' AS TEXT))")
    ship(app)
    result = verify(app, "--table", "parent", "--page-size", "5")
    assert result.returncode == 1 and "1 unshippable in the source (dead letters):" in result.stdout
    assert "(id)=(5000): table 'parent'" in result.stdout and "invalid UTF-8 in column 'name'" in result.stdout
    assert "missing" not in result.stdout and "extra" not in result.stdout


@on_both_servers
def test_missing_target_table_or_column_is_not_verified(app: App):
    app.connect().execute("ALTER TABLE parent ADD COLUMN extra TEXT")
    app.config.write_text(app.config.read_text().replace('target = "e2e_children"', 'target = "nope"'))
    result = verify(app)
    assert result.returncode == 1
    assert "parent -> e2e_parents: NOT VERIFIED: column(s) 'extra' do not exist" in result.stdout
    assert "child -> nope: NOT VERIFIED: the table 'nope' is not in the secondary" in result.stdout


def test_cutover_refuses_until_equal_then_prints_the_switch(app: App, pg: psycopg.Connection, secondary: Secondary):
    db = app.connect()
    db.executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(20)])
    refused = app.syncd("cutover", "--timeout", "2s")
    assert refused.returncode == 1 and "20 change(s) pending and no daemon holds the lease" in refused.stdout
    ship(app)
    pg.execute("DELETE FROM e2e_parents WHERE id = 7")
    differs = app.syncd("cutover", "--timeout", "2s")
    assert differs.returncode == 1 and "(id)=(7)" in differs.stdout and "verify --repair" in differs.stdout
    db.execute("INSERT INTO item (id, name, qty) VALUES (1, 'n', -1)")  # refused by a CHECK: a dead letter
    assert app.syncd("verify", "--repair").returncode == 1
    ship(app)
    dead = app.syncd("cutover")
    assert dead.returncode == 1 and "item: 1 dead letter(s)" in dead.stdout
    assert "syncd replay --dead-letters --table item" in dead.stdout
    db.execute("DELETE FROM item")
    db.execute("DELETE FROM _syncd_dead_letter")
    daemon = app.start()
    try:
        ready = app.syncd("cutover", "--timeout", "60s")
    finally:
        daemon.terminate()
        daemon.wait(30)
    assert ready.returncode == 0, ready.stdout
    assert "READY to cut over" in ready.stdout and "DB_BACKEND=supabase" in ready.stdout
    if secondary.url.endswith("/rest/v1"):
        assert f"SUPABASE_URL={secondary.url.removesuffix('/rest/v1')}\n" in ready.stdout
    else:  # the real PostgREST serves at its root: there is no Supabase URL to derive from it
        assert f"SUPABASE_URL=<the URL whose /rest/v1 is {secondary.url}>\n" in ready.stdout
    assert "syncd uninstall --archive" in ready.stdout
    assert "eyJ" not in ready.stdout + ready.stderr  # no key or token printed


def test_verify_shows_no_secret_and_fails_clearly_when_the_secondary_is_down(app: App):
    app.config.write_text(re.sub(r'url = ".*"', 'url = "http://127.0.0.1:9/rest/v1"', app.config.read_text()))
    result = app.syncd("verify")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ConnectError" in result.stderr and "eyJ" not in result.stderr


# -- units ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "a", "b"), [
    ("timestamp with time zone", "2023-11-14T23:13:20+01:00", "2023-11-14T22:13:20+00:00"),
    ("timestamp with time zone", "2023-11-14 22:13:20", "2023-11-14T22:13:20Z"),
    ("timestamp without time zone", "2024-01-15T10:30:00+00:00", "2024-01-15T10:30:00"),
    ("date", "2024-02-01T00:00:00+00:00", "2024-02-01"),
    ("bigint", "5", 5), ("integer", 5.0, 5), ("numeric", 1.0, 1), ("numeric", "2.50", 2.5),
    ("real", 0.1, 0.10000000149011612), ("boolean", 1, True), ("boolean", "f", False),
    ("jsonb", {"z": 1, "a": [1.0, "é"]}, {"a": [1, "é"], "z": 1}),
    ("vector", "[0.1,2,3]", "[0.100000001,2,3]"), ("extensions.vector", [0.1, 2, 3], "[0.1,2,3]"),
    ("uuid", "0000000A-0000-0000-0000-000000000000", "0000000a-0000-0000-0000-000000000000"),
    ("uuid", "{b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a12}", "b1eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"),
    ("uuid", "c2eebc999c0b4ef8bb6d6bb9bd380a13", "c2eebc99-9c0b-4ef8-bb6d-6bb9bd380a13"),
    ("uuid", "A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    ("bytea", "\\xABCD", "\\xabcd"), ("text", 3.5, "3.5"), ("text", 7, "7"),
])
def test_canonical_values_that_postgresql_holds_alike(fmt: str, a: object, b: object):
    assert canonical(fmt, a) == canonical(fmt, b)


@pytest.mark.parametrize(("fmt", "a", "b"), [
    ("jsonb", {"i": 6}, '{"i": 6}'), ("bigint", 5, 6), ("text", "a", "A"), ("boolean", True, 0),
    ("timestamp with time zone", "2023-11-14T22:13:20+01:00", "2023-11-14T22:13:20+00:00"),
    ("real", 0.1, 0.2), ("vector", "[1,2]", "[1,2,3]"), ("text", None, ""),
    ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12"),
])
def test_canonical_values_that_differ(fmt: str, a: object, b: object):
    assert canonical(fmt, a) != canonical(fmt, b)


def test_scratch_joins_find_each_kind_whatever_the_order_of_arrival():
    scratch = Scratch()
    try:
        scratch.add_source([('["b"]', b"1", "'b'"), ('["a"]', b"2", "'a'"), ('["c"]', b"3", "'c'"),
                            ('["d"]', None, "bad row")])
        scratch.add_target([('["c"]', b"3", '["c"]'), ('["x"]', b"9", '["x"]'), ('["a"]', b"0", '["a"]'),
                            ('["d"]', b"4", '["d"]')])
        from syncd import verify as module

        assert scratch.count(module.MISSING) == 1 and next(scratch.rows(module.MISSING))[1] == "'b'"
        assert [r[0] for r in scratch.rows(module.EXTRA)] == ['["x"]']
        assert [r[0] for r in scratch.rows(module.DIFFERENT)] == ['["a"]']
        assert scratch.count(module.UNSHIPPABLE) == 1
        assert sorted(r[1] for r in scratch.rows(module.MISSING_OR_DIFFERENT)) == ["'a'", "'b'"]
    finally:
        scratch.close()


@pytest.mark.parametrize("key", [(5,), ("it's, (odd)",), ("", -3), ("é", 2**62), (2.5, "a'b")])
def test_extra_keys_spelt_for_the_outbox_map_back_to_the_same_key(key: tuple[object, ...]):
    names = ["a", "b"][:len(key)]
    mapping = TableMapping.from_config(TableConfig(name="t", key=names), names)
    okey = outbox_key(mapping, list(key), json.dumps)
    assert okey is not None and decode_key(okey) == key


def test_blob_keys_are_spelt_as_blobs_and_unspellable_keys_refused():
    bytea = TableMapping.from_config(TableConfig(name="t", key=["k"], columns={"k": {"transform": "bytea"}}), ["k"])
    assert outbox_key(bytea, ["\\x00ff"], json.dumps) == "X'00ff'" and decode_key("X'00ff'") == (b"\x00\xff",)
    assert outbox_key(bytea, ["not hex"], json.dumps) is None  # maps back to other bytes
    plain = TableMapping.from_config(TableConfig(name="t", key=["k"]), ["k"])
    assert outbox_key(plain, [None], json.dumps) is None


def test_key_canonicals_follow_postgresqls_equality_for_citext_and_character():
    """Issue 19, point 7: citext keys compare by lower(), character(n) ignoring trailing spaces; as values a citext
    compares as stored."""
    from syncd.verify import canonicalizer, key_kind
    assert canonicalizer("citext", key=True)("ABC") == canonicalizer("public.citext", key=True)("abc") == "abc"
    assert canonicalizer("citext")("ABC") == "ABC"
    assert canonicalizer("character(4)", key=True)("ab  ") == canonicalizer("character", key=True)("ab") == "ab"
    assert key_kind("public.citext") == "folded" and key_kind("text") == "text" and key_kind("inet") == "json"
