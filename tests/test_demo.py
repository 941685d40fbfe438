"""`syncd demo` and the demo application (syncd.demo.app): what each seed method writes, that every row the
workload writes maps and ships without a dead letter, and the whole demo, headless, through an outage."""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import re
import sqlite3
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import psycopg
import pytest

from syncd.config import ConfigError, load_config
from syncd.demo import command as demo
from syncd.demo.app import DEMO_USERS, EMBEDDING_DIMENSIONS, DemoApp, Workload, schema_sql, users_sql
from syncd.devserver.launcher import RunningDevServer
from syncd.mapping import TableMapping
from tests.e2e import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO_PACKAGE = ROOT / "syncd" / "demo"
DEMO_CONFIG = DEMO_PACKAGE / "mapping.toml"
DEMO_DATA = ("schema.sql", "mapping.toml")
TARGETS = ("artifacts", "evidence", "facts", "documents", "document_sections", "document_tables", "api_endpoints",
           "logs", "tags", "tag_prompts", "search_chunks", "entities", "structure", "metric_hits", "summaries",
           "cipher_memory", "user_prefs", "skills_registry")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[DemoApp]:
    the_app = DemoApp.open(tmp_path / "app.sqlite3")
    yield the_app
    the_app.conn.close()


def rows(app: DemoApp, sql: str, *params: object) -> list[tuple[object, ...]]:
    return app.conn.execute(sql, params).fetchall()


def count(app: DemoApp, table: str) -> int:
    return app.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# ---- package data ------------------------------------------------------------------------------------------


def test_packaged_schema_and_mapping_are_the_only_copies() -> None:
    """The schema and the mapping are read from the package (importlib.resources, as installs without the
    repository do) and exist once: no other file of the repository has the bytes of either."""
    package = resources.files("syncd.demo")
    data = {name: package.joinpath(name).read_bytes() for name in DEMO_DATA}
    assert schema_sql() == data["schema.sql"].decode("utf-8") == (DEMO_PACKAGE / "schema.sql").read_text("utf-8")
    assert data["mapping.toml"].decode("utf-8") == DEMO_CONFIG.read_text(encoding="utf-8")
    assert data["mapping.toml"].decode("utf-8").endswith(demo.mapping_tables())
    sizes = {len(content) for content in data.values()}
    copies: list[str] = []
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if not d.startswith(".") and d != "__pycache__"
                             and not d.endswith(".egg-info") and d not in ("build", "dist")]
        for name in files:
            path = Path(directory) / name
            if path.parent == DEMO_PACKAGE and name in DEMO_DATA:
                continue
            if path.stat().st_size in sizes and path.read_bytes() in data.values():
                copies.append(path.relative_to(ROOT).as_posix())
    assert copies == [], f"copies of the demo's package data: {copies}"


def test_packaged_files_go_into_the_wheel() -> None:
    """Without package-data a wheel (the container image's install) would lack them: the app could not start."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(DEMO_DATA) <= set(pyproject["tool"]["setuptools"]["package-data"]["syncd.demo"])


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth: `import a.b` gives a.b, `from a import b` gives a and a.b."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_demo_uses_syncd_and_syncd_does_not_use_the_demo() -> None:
    """No import cycle: the demo never imports syncd.cli (which imports the demo), and no syncd module but the
    CLI imports the demo. Importing the demo app (the app container) loads neither the command nor the CLI."""
    for path in sorted((ROOT / "syncd").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        imported = imported_modules(path)
        if path.is_relative_to(DEMO_PACKAGE):
            assert "syncd.cli" not in imported, f"{relative} imports syncd.cli"
        elif relative != "syncd/cli.py":
            assert not {m for m in imported if m == "syncd.demo" or m.startswith("syncd.demo.")}, relative
    loaded = subprocess.run([sys.executable, "-c", "import sys, syncd.demo.app; print(sorted(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout
    assert "'syncd.cli'" not in loaded and "'syncd.demo.command'" not in loaded


# ---- the seed's write methods ------------------------------------------------------------------------------


def test_the_app_opens_its_file_as_a_real_app_does(tmp_path: Path) -> None:
    """WAL, foreign keys on, the demo schema created when the file is new and left alone after."""
    app = DemoApp.open(tmp_path / "app.sqlite3")
    assert app.conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert app.conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    app.add_document("a.pdf", "pdf")
    assert count(DemoApp.open(tmp_path / "app.sqlite3"), "document") == 1


def test_artifact_evidence_fact(app: DemoApp) -> None:
    """add_artifact stores JSON text and a BLOB digest; facts point at evidence; deleting cascades."""
    artifact = app.add_artifact("q3.pdf", "uploads/q3.pdf", "pdf", report_week="2024-W03", sha256=b"\x01" * 32,
                                extras={"pages": 3, "labels": ["é"]})
    evidence = app.add_evidence(artifact, locator="page 2", preview="Revenue", content_type="table",
                                coordinates={"page": 2, "bbox": [1.5, 2, 3, 4]}, full_data={"rows": [[1]]})
    fact = app.add_fact(artifact, entity="Acme", content="revenue 5", metrics={"revenue": 5.25},
                        evidence_id=evidence)
    assert rows(app, "SELECT filename, status, sha256, extra_json FROM artifact") == [
        ("q3.pdf", "queued", b"\x01" * 32, '{"pages":3,"labels":["é"]}')]
    assert rows(app, "SELECT evidence_id, metrics FROM fact WHERE id = ?", fact) == [(evidence, '{"revenue":5.25}')]
    assert app.update_artifact(artifact, status="processed")
    assert rows(app, "SELECT status, extra_json FROM artifact") == [("processed", '{"pages":3,"labels":["é"]}')]
    assert app.delete_artifact(artifact)
    assert (count(app, "evidence"), count(app, "fact")) == (0, 0)
    assert app.rows_written == 5  # 3 inserts, 1 update, 1 delete (cascades are SQLite's, not the app's)


def test_documents_and_what_is_extracted(app: DemoApp) -> None:
    """Sections, tables, APIs (0/1 boolean), logs (unix seconds), tags, entities (replaced), structure (upsert)."""
    doc = app.add_document("specs/api.openapi", "openapi", title="API", created_at="2024-01-15 10:30:00")
    app.add_section(doc, 0, "Intro", page=1, bbox=[0, 0, 1, 1])
    app.add_table(doc, 0, {"columns": ["a"], "rows": [[1]]}, page=2)
    app.add_api(doc, "GET", "/v1/x", tags=["x"], deprecated=True)
    app.add_log("started", document_id=doc, ts=1_700_000_000, attrs={"ms": 1.5})
    app.add_tag(doc, "finance", score=0.875)
    app.save_tag_prompt(doc, "Tag it", examples=[{"tags": ["a"]}])
    app.store_entities(doc, [{"label": "ORG", "text": "Acme"}, {"label": "GPE", "text": "Paris"}])
    app.store_entities(doc, [{"label": "ORG", "text": "Initech"}])
    app.store_structure(doc, {"title": "A"})
    app.store_structure(doc, {"title": "B"})
    app.store_metric_hits(doc, [{"type": "revenue", "value": "1,000", "position": 3}])
    app.store_summary("document", doc, "bullet", "All good.", artifact_ids=["a1"])
    assert rows(app, "SELECT deprecated, tags FROM api_endpoint") == [(1, '["x"]')]
    assert rows(app, "SELECT ts, attrs FROM log") == [(1_700_000_000, '{"ms":1.5}')]
    assert rows(app, "SELECT text, source_index FROM entity") == [("Initech", 0)]
    assert rows(app, "SELECT hierarchy FROM structure") == [('{"title":"B"}',)]
    assert rows(app, "SELECT artifact_ids, evidence_ids FROM summary") == [('["a1"]', "[]")]
    assert app.delete_document(doc)
    assert sum(count(app, t) for t in ("document_section", "api_endpoint", "log", "entity", "structure")) == 0


def test_search_chunks_hold_float32_embeddings(app: DemoApp) -> None:
    """store_search_chunks writes a 384-float32 little-endian BLOB; reset_search_chunks deletes by parent."""
    doc = app.add_document("a.pdf", "pdf")
    vector = [i / EMBEDDING_DIMENSIONS for i in range(EMBEDDING_DIMENSIONS)]
    app.store_search_chunks(["one", "two"], [vector, vector], document_id=doc, meta={"model": "m"})
    blob = rows(app, "SELECT embedding FROM search_chunk WHERE chunk_index = 1")[0][0]
    assert len(blob) == 4 * EMBEDDING_DIMENSIONS
    assert struct.unpack("<2f", blob[4:12]) == pytest.approx(vector[1:3])
    assert app.reset_search_chunks(document_id=doc) == 2


def test_cipher_memory_prefs_skills(app: DemoApp) -> None:
    """add_memory (JSON embedding), set_user_pref (columns or JSON), register/update_skill; reset keeps them."""
    user = DEMO_USERS[0][0]
    memory = app.add_memory("insight", {"text": "dark mode"}, {"source": "chat"}, user_id=user,
                            embedding=[0.5] * EMBEDDING_DIMENSIONS)
    assert len(json.loads(rows(app, "SELECT embedding FROM cipher_memory")[0][0])) == EMBEDDING_DIMENSIONS
    app.set_user_pref(user, "default_model", "gpt-4")
    app.set_user_pref(user, "theme", "dark")
    app.set_user_pref(user, "page_size", 25)
    assert rows(app, "SELECT preferences, theme, language FROM user_pref") == [
        ('{"default_model":"gpt-4","page_size":25}', "dark", "en")]
    skill = app.register_skill("web_search", "Search", {"q": {"type": "string"}}, {"steps": []}, created_by=user)
    before = rows(app, "SELECT updated_at FROM skill")[0][0]
    assert app.update_skill(skill, enabled=False)
    assert rows(app, "SELECT enabled FROM skill") == [(0,)]
    assert rows(app, "SELECT updated_at FROM skill")[0][0] >= before
    app.add_artifact("a.pdf", "a.pdf", "pdf")
    app.reset()
    assert (count(app, "artifact"), count(app, "cipher_memory"), count(app, "skill")) == (0, 1, 1)
    assert app.delete_memory(memory)


# ---- the workload --------------------------------------------------------------------------------------------


def run_workload(app: DemoApp, calls: int, seed: int = 1) -> Workload:
    """Every operation at least twice, then weighted random calls."""
    workload = Workload(app, random.Random(seed))
    for name in workload.operations:
        workload.step(name)
        workload.step(name)
    for _ in range(calls):
        workload.step()
    return workload


def test_every_row_the_workload_writes_maps(app: DemoApp) -> None:
    """Every row of every table goes through syncd/demo/mapping.toml's mapping without a RowError."""
    run_workload(app, 600)
    config = load_config(DEMO_CONFIG, env={})
    mapped = 0
    for table in config.tables:
        primary_key = [r[1] for r in sorted(rows(app, f"PRAGMA table_info({table.name})"), key=lambda r: r[5])
                       if r[5]]
        mapping = TableMapping.from_config(table, table.key or primary_key)
        cursor = app.conn.execute(f"SELECT * FROM {table.name}")
        columns = [d[0] for d in cursor.description]
        for values in cursor:
            row = dict(zip(columns, values, strict=True))
            mapping.map_row(row, tuple(row[k] for k in mapping.key))
            mapped += 1
    assert mapped > 300
    assert all(count(app, table.name) for table in config.tables if table.name != "structure")


def test_write_forever_keeps_its_rate(app: DemoApp) -> None:
    """About `rate` calls per second until stopped, each reported to on_write."""
    import threading

    stop = threading.Event()
    seen: list[tuple[str, int]] = []
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    made = Workload(app, random.Random(2)).write_forever(40, stop, lambda name, n: seen.append((name, n)))
    elapsed = time.monotonic() - started
    assert 0.6 * 40 * elapsed <= made <= 40 * elapsed + 2 and len(seen) == made
    assert sum(n for _, n in seen) == app.rows_written


@contextlib.contextmanager
def demo_tables(pg: psycopg.Connection) -> Iterator[None]:
    """The demo's users in auth.users and its tables empty, for the block; emptied again afterwards."""
    def empty() -> None:
        pg.execute(f"TRUNCATE {', '.join(f'public.{t}' for t in TARGETS)} CASCADE")
        pg.execute("DELETE FROM auth.users WHERE id = ANY(%s::uuid[])", ([u for u, _ in DEMO_USERS],))

    empty()
    pg.execute(users_sql())
    try:
        yield
    finally:
        empty()


@pytest.fixture
def secondary(devserver: RunningDevServer, pg: psycopg.Connection) -> Iterator[RunningDevServer]:
    """The shared dev server with the demo's users and empty demo tables (emptied again afterwards)."""
    with demo_tables(pg):
        yield devserver


def test_the_workload_ships_without_a_dead_letter(tmp_path: Path, secondary: RunningDevServer,
                                                  pg: psycopg.Connection) -> None:
    """Through syncd install + run --once into the migrations' tables: nothing refused, every row there."""
    app = DemoApp.open(tmp_path / "app.sqlite3")
    config = tmp_path / "syncd.toml"
    demo.write_config(config, tmp_path / "app.sqlite3", secondary, f"127.0.0.1:{free_port()}")
    syncd = [sys.executable, "-m", "syncd"]
    assert subprocess.run([*syncd, "install", "--config", str(config)], capture_output=True).returncode == 0
    workload = run_workload(app, 300, seed=3)
    workload.step("reset")  # deletes, shipped in the same runs as the inserts before them
    run_workload(app, 300, seed=4)
    shipped = subprocess.run([*syncd, "run", "--once", "--config", str(config)], capture_output=True, text=True,
                             timeout=120)
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    assert app.conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (0,)
    assert app.conn.execute("SELECT tbl, code, message FROM _syncd_dead_letter").fetchall() == []
    for table in load_config(config).tables:
        assert pg.execute(f"SELECT count(*) FROM public.{table.target_name}").fetchone()[0] == count(app, table.name)


# ---- python -m syncd.demo.app --------------------------------------------------------------------------------


def test_demoapp_module_creates_its_database_and_writes(tmp_path: Path) -> None:
    """The compose file's app container: python -m syncd.demo.app --db PATH --rate N (here with --duration)."""
    db = tmp_path / "new" / "app.sqlite3"
    db.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "syncd.demo.app", "--db", str(db), "--rate", "50", "--duration", "1s"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "stopped after" in done.stdout
    assert sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 18
    users = subprocess.run([sys.executable, "-m", "syncd.demo.app", "--users-sql"], capture_output=True, text=True)
    assert users.stdout.strip() == users_sql() and all(user in users.stdout for user, _ in DEMO_USERS)


# ---- syncd demo: its pure parts, then the real thing -----------------------------------------------------------


def test_quantile_interpolates_like_prometheus() -> None:
    """histogram_quantile: linear inside the bucket holding the rank; None without samples; the bucket as text."""
    cumulative = [(0.1, 50.0), (1.0, 90.0), (10.0, 100.0), (float("inf"), 100.0)]
    assert demo.quantile(0.5, cumulative) == pytest.approx(0.1)
    assert demo.quantile(0.7, cumulative) == pytest.approx(0.55)
    assert demo.quantile(0.99, cumulative) == pytest.approx(9.1)
    assert demo.quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert (demo.bucket_text(0.5, cumulative), demo.bucket_text(0.99, cumulative)) == ("0 ms–100 ms", "1.0 s–10.0 s")


def test_an_outage_goes_down_then_over_even_when_shorter_than_a_tick() -> None:
    """The secondary is always taken down before it is brought back."""
    outage = demo.Outage(start=2, length=0.1)
    assert outage.due(1.9) is None
    outage.state = outage.due(5) or ""
    assert outage.state == "down"
    assert outage.due(5) == "over"


def test_bad_arguments_are_named() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    with pytest.raises(ConfigError, match="--outage"):
        demo.read_settings(parser.parse_args(["--outage", "soon"]))
    with pytest.raises(ConfigError, match="--rate"):
        demo.read_settings(parser.parse_args(["--rate", "0"]))


def test_the_demo_runs_headless_through_an_outage_and_ends_equal(tmp_path: Path) -> None:
    """The real `syncd demo`: the backlog grows while the secondary is down, drains after, verify is equal."""
    done = subprocess.run([sys.executable, "-m", "syncd", "demo", "--headless", "--duration", "6s", "--outage", "2s",
                           "--outage-at", "2s", "--rate", "30", "--seed", "7", "--dir", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=180)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "the secondary is DOWN" in out and "the secondary is back up" in out
    pending_while_down = [int(m) for m in re.findall(r"pending (\d+) .*SECONDARY DOWN", out)]
    assert max(pending_while_down) > 10  # the backlog grew (about 30 calls/s for 2 s)
    assert re.search(r"failures .*transient [1-9]", out)
    assert "backlog caught up" in out and "dead letters: 0" in out
    assert "result: the secondary equals the app's database" in out
    assert "Query the secondary" in out and "/metrics" in out
