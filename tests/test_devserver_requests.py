"""Conformance of the dev server's request forms with PostgREST v12 (shared/POSTGREST.md), against
real PostgreSQL: every write is checked in the database itself, not only in the HTTP answer."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest

from tests.conftest import DevServer, reload_schema

pytestmark = pytest.mark.usefixtures("clean")
UPSERT = {"Prefer": "resolution=merge-duplicates, return=minimal"}


def rows(pg: psycopg.Connection, sql: str) -> list[tuple[object, ...]]:
    return pg.execute(sql).fetchall()


def test_bulk_insert_is_201_with_empty_body_and_writes_every_row(service: httpx.Client, pg: psycopg.Connection):
    """A bulk POST inserts all rows in one go and answers 201 with no body and no Content-Type."""
    r = service.post("/items", json=[{"id": i, "name": f"n{i}"} for i in range(3)])
    assert r.status_code == 201
    assert r.content == b"" and "content-type" not in r.headers
    assert rows(pg, "SELECT id, name, note FROM items ORDER BY id") == [(0, "n0", "none"), (1, "n1", "none"),
                                                                         (2, "n2", "none")]


def test_single_object_body_inserts_one_row(service: httpx.Client, pg: psycopg.Connection):
    """A JSON object (not an array) is one row."""
    assert service.post("/items", json={"id": 1, "name": "one"}).status_code == 201
    assert rows(pg, "SELECT name FROM items") == [("one",)]


def test_upsert_answers_201_when_a_row_is_new_and_200_when_all_existed(service: httpx.Client,
                                                                       pg: psycopg.Connection):
    """v12's rule: 201 if at least one row was inserted, 200 if every row already existed."""
    first = service.post("/items?on_conflict=id", json=[{"id": 1, "name": "a"}], headers=UPSERT)
    again = service.post("/items?on_conflict=id", json=[{"id": 1, "name": "b"}], headers=UPSERT)
    mixed = service.post("/items?on_conflict=id", json=[{"id": 1, "name": "c"}, {"id": 2, "name": "d"}],
                         headers=UPSERT)
    assert (first.status_code, again.status_code, mixed.status_code) == (201, 200, 201)
    assert rows(pg, "SELECT id, name FROM items ORDER BY id") == [(1, "c"), (2, "d")]


def test_upsert_of_an_empty_array_is_200(service: httpx.Client):
    assert service.post("/items?on_conflict=id", json=[], headers=UPSERT).status_code == 200


def test_upsert_updates_only_the_payload_columns(service: httpx.Client, pg: psycopg.Connection):
    """ON CONFLICT DO UPDATE sets the payload's columns only; other columns keep their values."""
    pg.execute("INSERT INTO items (id, name, qty, note) VALUES (1, 'a', 5, 'keep')")
    service.post("/items?on_conflict=id", json=[{"id": 1, "name": "b"}], headers=UPSERT)
    assert rows(pg, "SELECT name, qty, note FROM items") == [("b", 5, "keep")]


def test_upsert_on_a_composite_key(service: httpx.Client, pg: psycopg.Connection):
    body = [{"a": "x", "b": 1, "v": "one"}, {"a": "x", "b": 2, "v": "two"}]
    service.post("/pairs?on_conflict=a,b", json=body, headers=UPSERT)
    r = service.post("/pairs?on_conflict=a,b", json=[{"a": "x", "b": 2, "v": "deux"}], headers=UPSERT)
    assert r.status_code == 200
    assert rows(pg, "SELECT a, b, v FROM pairs ORDER BY b") == [("x", 1, "one"), ("x", 2, "deux")]


def test_ignore_duplicates_keeps_existing_rows(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'old')")
    prefer = {"Prefer": "resolution=ignore-duplicates"}
    r = service.post("/items?on_conflict=id", json=[{"id": 1, "name": "new"}], headers=prefer)
    assert r.status_code == 201  # PostgREST 12 answers 200 only for a merge that inserted nothing (measured)
    r = service.post("/items?on_conflict=id", json=[{"id": 1, "name": "new"}, {"id": 2, "name": "n2"}],
                     headers=prefer)
    assert r.status_code == 201
    assert rows(pg, "SELECT id, name FROM items ORDER BY id") == [(1, "old"), (2, "n2")]


def test_return_representation_gives_the_stored_rows(service: httpx.Client):
    """return=representation answers the rows as stored, defaults included, honouring select."""
    r = service.post("/items?select=id,note", json=[{"id": 7, "name": "x"}],
                     headers={"Prefer": "return=representation"})
    assert r.status_code == 201
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == [{"id": 7, "note": "none"}]


def test_columns_parameter_skips_the_key_check_and_missing_default_fills_defaults(service: httpx.Client,
                                                                                  pg: psycopg.Connection):
    """With ?columns=, objects may differ; absent keys become NULL, or the default with missing=default."""
    body = [{"id": 1, "name": "a", "note": "given"}, {"id": 2, "name": "b"}]
    assert service.post("/items?columns=id,name,note", json=body).status_code == 201
    body = [{"id": 3, "name": "c", "note": "given"}, {"id": 4, "name": "d"}]
    r = service.post("/items?columns=id,name,note", json=body, headers={"Prefer": "missing=default"})
    assert r.status_code == 201
    assert rows(pg, "SELECT id, note FROM items ORDER BY id") == [(1, "given"), (2, None), (3, "given"),
                                                                  (4, "none")]


def test_json_and_array_columns_round_trip(service: httpx.Client, pg: psycopg.Connection):
    doc = {"nested": [1, 2, {"k": "v"}], "text": "ü"}
    service.post("/items", json=[{"id": 1, "name": "j", "doc": doc, "tags": ["a", "b,c"]}])
    assert rows(pg, "SELECT doc, tags FROM items") == [(doc, ["a", "b,c"])]
    assert service.get("/items?select=doc,tags").json() == [{"doc": doc, "tags": ["a", "b,c"]}]


def test_patch_updates_matching_rows(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    r = service.patch("/items?id=gte.2", json={"name": "processed"})
    assert r.status_code == 204
    assert rows(pg, "SELECT id, name FROM items ORDER BY id") == [(1, "a"), (2, "processed"), (3, "processed")]
    r = service.patch("/items?id=eq.1", json={"qty": 4}, headers={"Prefer": "return=representation"})
    assert r.status_code == 200 and r.json()[0]["qty"] == 4


def test_delete_by_in_list(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    r = service.delete("/items?id=in.(1,3)")
    assert r.status_code == 204 and r.content == b""
    assert rows(pg, "SELECT id FROM items") == [(2,)]


def test_in_list_values_with_commas_quotes_parentheses_and_non_ascii(service: httpx.Client,
                                                                     pg: psycopg.Connection):
    """Quoted in-list elements may hold , . : ( ) and quotes (backslash-escaped); `null` is a string."""
    names = ['a,b', 'say "hi"', "back\\slash", "(paren)", "dot.colon:", "Zürich 東京", "null", "plain"]
    with pg.cursor() as cur:
        cur.executemany("INSERT INTO items (id, name) VALUES (%s, %s)", list(enumerate(names)))
    quoted = ",".join('"' + n.replace("\\", "\\\\").replace('"', '\\"') + '"' for n in names[:-1])
    r = service.delete("/items", params={"name": f"in.({quoted})"})
    assert r.status_code == 204
    assert rows(pg, "SELECT name FROM items") == [("plain",)]


def test_empty_in_list_matches_nothing(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    assert service.delete("/items?id=in.()").status_code == 204
    assert rows(pg, "SELECT count(*) FROM items") == [(1,)]


def test_delete_by_composite_key_with_or_and(service: httpx.Client, pg: psycopg.Connection):
    """syncd's composite-key delete: or=(and(k1.eq.a,k2.eq.b),...), values may need quotes."""
    pg.execute("INSERT INTO pairs VALUES ('x', 1, ''), ('x', 2, ''), ('y,z', 1, ''), ('y,z', 2, '')")
    r = service.delete("/pairs", params={"or": '(and(a.eq.x,b.eq.1),and(a.eq."y,z",b.eq.2))'})
    assert r.status_code == 204
    assert rows(pg, "SELECT a, b FROM pairs ORDER BY a, b") == [("x", 2), ("y,z", 1)]


@pytest.mark.parametrize(("filter_", "expected"), [
    ("id=eq.2", [2]), ("id=neq.2", [1, 3, 4]), ("id=gt.2", [3, 4]), ("id=gte.2", [2, 3, 4]),
    ("id=lt.2", [1]), ("id=lte.2", [1, 2]), ("name=like.ap*", [1, 2]), ("name=ilike.AP*", [1, 2]),
    ("name=in.(apple,kiwi)", [1, 3]), ("qty=is.null", [4]), ("qty=not.is.null", [1, 2, 3]),
    ("body=fts.revenue", [1, 3]), ("body=fts(english).grew", [1]), ("id=not.in.(1,2)", [3, 4]),
    ("or=(id.eq.1,name.eq.kiwi)", [1, 3]), ("and=(id.gt.1,or(qty.is.null,qty.gte.3))", [3, 4]),
    ("not.or=(id.eq.1,id.eq.2)", [3, 4]), ("tags=cs.{red}", [1, 2]),
])
def test_filter_operators(service: httpx.Client, pg: psycopg.Connection, filter_: str, expected: list[int]):
    """Each filter operator of the seed's table, negation and logic trees select the right rows."""
    pg.execute("""INSERT INTO items (id, name, qty, body, tags) VALUES
        (1, 'apple', 1, 'revenue grew strongly', '{red}'), (2, 'apricot', 2, 'costs', '{red,green}'),
        (3, 'kiwi', 3, 'the revenues fell', '{}'), (4, 'lime', NULL, NULL, NULL)""")
    r = service.get(f"/items?select=id&order=id&{filter_}")
    assert r.status_code == 200, r.text
    assert [row["id"] for row in r.json()] == expected


def test_select_order_limit_offset(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name, qty) VALUES (1, 'a', 2), (2, 'b', NULL), (3, 'c', 1)")
    r = service.get("/items?select=id,label:name,qty::text&order=qty.desc.nullslast,id&limit=2&offset=1")
    assert r.json() == [{"id": 3, "label": "c", "qty": "1"}, {"id": 2, "label": "b", "qty": None}]


def test_count_exact_gives_content_range_and_206_for_a_partial_page(service: httpx.Client,
                                                                    pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) SELECT g, 'n' FROM generate_series(1, 25) g")
    count = {"Prefer": "count=exact"}
    partial = service.get("/items?select=id&order=id&limit=10&offset=10", headers=count)
    assert partial.status_code == 206 and partial.headers["content-range"] == "10-19/25"
    full = service.get("/items?select=id", headers=count)
    assert full.status_code == 200 and full.headers["content-range"] == "0-24/25"
    uncounted = service.get("/items?select=id&limit=5")
    assert uncounted.status_code == 200 and uncounted.headers["content-range"] == "0-4/*"
    empty = service.get("/items?id=gt.100", headers=count)
    assert empty.headers["content-range"] == "*/0" and empty.json() == []


def test_offset_past_the_end_is_416(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    r = service.get("/items?offset=5", headers={"Prefer": "count=exact"})
    assert r.status_code == 416 and r.json()["code"] == "PGRST103"


def test_keyset_pagination_as_verify_reads(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) SELECT g, 'n' FROM generate_series(1, 7) g")
    seen, last = [], 0
    while True:
        page = service.get(f"/items?select=id&order=id.asc&limit=3&id=gt.{last}").json()
        if not page:
            break
        seen += [row["id"] for row in page]
        last = page[-1]["id"]
    assert seen == list(range(1, 8))


def test_profiles_select_the_schema(service: httpx.Client, pg: psycopg.Connection):
    """Content-Profile on writes and Accept-Profile on reads choose an exposed schema."""
    r = service.post("/items", json=[{"id": 1, "label": "other"}], headers={"Content-Profile": "syncd_test"})
    assert r.status_code == 201
    assert rows(pg, "SELECT label FROM syncd_test.items") == [("other",)]
    assert rows(pg, "SELECT count(*) FROM public.items") == [(0,)]
    r = service.get("/items", headers={"Accept-Profile": "syncd_test"})
    assert r.json() == [{"id": 1, "label": "other"}]


def test_openapi_describes_formats_required_and_keys(service: httpx.Client):
    r = service.get("/", headers={"Accept": "application/openapi+json"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/openapi+json")
    spec = r.json()
    assert spec["swagger"] == "2.0" and spec["basePath"] == "/rest/v1"
    items = spec["definitions"]["items"]
    assert items["required"] == ["id", "name"]
    assert items["properties"]["id"]["format"] == "integer" and "<pk/>" in items["properties"]["id"]["description"]
    assert items["properties"]["made"]["format"] == "timestamp with time zone"
    assert items["properties"]["doc"]["format"] == "jsonb"
    assert items["properties"]["tags"]["format"] == "text[]"
    assert items["properties"]["note"]["default"] == "none"
    child = spec["definitions"]["children"]["properties"]["parent_id"]
    assert "<fk table='parents' column='id'/>" in child["description"]
    assert "/items" in spec["paths"]


def test_openapi_shows_pgvector_columns_schema_qualified(service: httpx.Client):
    spec = service.get("/").json()
    assert spec["definitions"]["search_chunks"]["properties"]["embedding"]["format"].endswith("vector")


def test_schema_cache_reloads_on_notify(service: httpx.Client, pg: psycopg.Connection, devserver: DevServer):
    """A table created after start is 404 until NOTIFY pgrst, 'reload schema'; then it is served."""
    pg.execute("DROP TABLE IF EXISTS public.late")
    reload_schema(devserver, "items")  # a reload that began before the DROP must not serve `late` once created
    pg.execute("CREATE TABLE public.late (id int PRIMARY KEY); GRANT ALL ON public.late TO service_role")
    assert service.get("/late").status_code == 404
    pg.execute("NOTIFY pgrst, 'reload schema'")
    for _ in range(100):
        if service.get("/late").status_code == 200:
            break
        time.sleep(0.05)
    assert service.get("/late").status_code == 200
    pg.execute("DROP TABLE public.late")
    pg.execute("NOTIFY pgrst, 'reload schema'")


def test_head_answers_headers_only(service: httpx.Client, pg: psycopg.Connection):
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    r = service.head("/items", headers={"Prefer": "count=exact"})
    assert r.status_code == 200 and r.content == b"" and r.headers["content-range"] == "0-0/1"


def test_keep_alive_serves_many_requests_on_one_connection(devserver: DevServer):
    with devserver.client(devserver.service_key) as client:
        statuses = {client.get("/items?limit=1").status_code for _ in range(20)}
    assert statuses == {200}


def test_quoted_identifiers_in_on_conflict_and_logic_trees(devserver: DevServer, pg: psycopg.Connection):
    """Column names with spaces, dots and commas work when double-quoted, as in PostgREST."""
    from syncd.auth import StaticToken
    from syncd.target import PostgrestTarget

    with PostgrestTarget(devserver.url, StaticToken(devserver.service_key)) as target:
        body = [{"my col": "x,y", "b.c": 1, "v,w": "one"}, {"my col": "z", "b.c": 2, "v,w": "two"}]
        target.upsert("odd names", ["my col", "b.c"], body)
        target.upsert("odd names", ["my col", "b.c"], [{"my col": "z", "b.c": 2, "v,w": "deux"}])
        assert rows(pg, 'SELECT "my col", "b.c", "v,w" FROM "odd names" ORDER BY 2') == [("x,y", 1, "one"),
                                                                                           ("z", 2, "deux")]
        target.delete("odd names", ["my col", "b.c"], [{"my col": "x,y", "b.c": 1}])
    assert rows(pg, 'SELECT "my col" FROM "odd names"') == [("z",)]


def test_limit_and_offset_are_read_as_postgrest_reads_them(service: httpx.Client, pg: psycopg.Connection):
    """PostgREST 12 (measured): a limit or offset that is not an integer is ignored, a negative offset is 0, and a
    negative limit is 416 PGRST103."""
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    assert [r["id"] for r in service.get("/items?select=id&order=id&limit=x").json()] == [1, 2, 3]
    assert [r["id"] for r in service.get("/items?select=id&order=id&limit=1&offset=-1").json()] == [1]
    r = service.get("/items?limit=-1")
    assert r.status_code == 416 and r.json()["details"] == "Limit should be greater than or equal to zero."


def test_authorization_of_another_scheme_is_anonymous(devserver: DevServer, pg: psycopg.Connection):
    """PostgREST 12 (measured) takes `Basic ...` or a bare `Bearer` as no token: the anonymous role reads."""
    pg.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
    for header in ("Basic eDp5", "Bearer"):
        r = httpx.get(f"{devserver.url}/items?select=id", headers={"Authorization": header})
        assert r.status_code == 200 and r.json() == [{"id": 1}], header
