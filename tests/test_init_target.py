"""`syncd init --target` / `--pg-url` onto the tables a secondary already has (issue 24, part 2): the seed's own
application (PMOVES-DoX, tests/fixtures/pmoves_dox) mapped with no hand edit, then checked, installed, written by its
own write patterns, shipped and verified equal, against the dev server and the real PostgREST; and each kind of
match and mismatch (plural, suffix, prefix, key, no target table, a NOT NULL column the source lacks, a type that
refuses the values, an ambiguous name), the same through PostgREST's description and PostgreSQL's catalog.

One dev server of its own (1-2 s to start) holds both secondaries' tables: the PMOVES migration in public, as a
Supabase project has it, and the mismatch tables in the schema `init_target`."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from syncd.cli import main
from syncd.config import load_config
from tests.conftest import MIGRATIONS, DevServer, start_devserver
from tests.postgrest import SKIP_REASON, RunningPostgrest, Secondary, binary, start_postgrest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pmoves_dox"
SCHEMA = "init_target"
PMOVES_TARGETS = ["artifacts", "documents", "evidence", "facts", "api_endpoints", "log_entries", "tag_prompts",
                  "summaries"]
MISMATCH_PG = f"""
CREATE SCHEMA {SCHEMA};
GRANT USAGE ON SCHEMA {SCHEMA} TO service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA {SCHEMA} GRANT ALL ON TABLES TO service_role;
SET search_path TO {SCHEMA};
CREATE TABLE categories (id bigint PRIMARY KEY, label text);
CREATE TABLE boxes (id bigint PRIMARY KEY, size integer);
CREATE TABLE events (id bigint PRIMARY KEY, created timestamptz, data jsonb, happened_at timestamptz, live boolean);
CREATE TABLE app_accounts (id bigint PRIMARY KEY, name text);
CREATE TABLE invoices (id bigint PRIMARY KEY, total double precision, currency text NOT NULL,
                       issued timestamptz NOT NULL DEFAULT now());
CREATE TABLE readings (id bigint PRIMARY KEY, value integer, flag boolean, note jsonb, payload text);
CREATE TABLE profiles (id bigint PRIMARY KEY, extra jsonb, extras jsonb, name text);
CREATE TABLE persons (id bigint PRIMARY KEY);
CREATE TABLE people (id bigint PRIMARY KEY);
CREATE TABLE memberships (user_id bigint, team_id bigint, role text, PRIMARY KEY (user_id, team_id));
CREATE TABLE app_categories (id bigint PRIMARY KEY);
"""
MISMATCH_SQLITE = """
CREATE TABLE category (id INTEGER PRIMARY KEY, label TEXT);
CREATE TABLE box (id INTEGER PRIMARY KEY, size INTEGER);
CREATE TABLE event (id INTEGER PRIMARY KEY, created_at TEXT, data_json TEXT, happened INTEGER, live INTEGER);
CREATE TABLE account (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE invoice (id INTEGER PRIMARY KEY, total REAL);
CREATE TABLE reading (id INTEGER PRIMARY KEY, value TEXT, flag INTEGER, note TEXT, payload BLOB);
CREATE TABLE profile (id INTEGER PRIMARY KEY, extra_json TEXT, name TEXT);
CREATE TABLE person (id INTEGER PRIMARY KEY);
CREATE TABLE membership (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, team_id INTEGER NOT NULL, role TEXT,
                         UNIQUE (user_id, team_id));
CREATE TABLE orphan (id INTEGER PRIMARY KEY);
INSERT INTO event VALUES (1, '2024-01-15T10:30:00Z', '{"a": [1, 2]}', 1700000000, 1);
INSERT INTO reading VALUES (1, '12', 1, '{"ok": true}', x'00ff'), (2, 'n/a', 0, NULL, NULL);
"""


@pytest.fixture(scope="module")
def migrations(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """000 (the API roles) of the project, then what a Supabase project has, the PMOVES migration and the mismatch
    tables."""
    directory = tmp_path_factory.mktemp("init_target_migrations")
    shutil.copy(MIGRATIONS / "000_roles_and_auth.sql", directory / "000_roles_and_auth.sql")
    shutil.copy(FIXTURE / "supabase_defaults.sql", directory / "001_supabase_defaults.sql")
    shutil.copy(FIXTURE / "supabase.sql", directory / "002_pmoves_dox.sql")
    (directory / "003_mismatches.sql").write_text(MISMATCH_PG)
    return directory


@pytest.fixture(scope="module")
def server(migrations: Path) -> Iterator[DevServer]:
    started = start_devserver("--schemas", f"public,{SCHEMA}", migrations=migrations)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def real(server: DevServer) -> Iterator[RunningPostgrest]:
    if binary() is None:
        pytest.skip(SKIP_REASON)
    started = start_postgrest(server, schemas=f"public,{SCHEMA}")
    yield started
    started.stop()


@pytest.fixture(params=[pytest.param("dev-server"),
                        pytest.param("postgrest", marks=pytest.mark.skipif(binary() is None, reason=SKIP_REASON))])
def target(request: pytest.FixtureRequest, server: DevServer) -> Secondary:
    """The dev server, then the real PostgREST over the same database."""
    return request.getfixturevalue("real") if request.param == "postgrest" else server


def syncd(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run a command in this process; (exit code, stdout + stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch, server: DevServer) -> None:
    """The environment `syncd run` reads its key from, and nothing else of syncd's."""
    for name in ("SYNCD_CONFIG", "SYNCD_TARGET_URL", "SUPABASE_URL", "SUPABASE_SERVICE_KEY", "SYNCD_DB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUPABASE_JWT_SECRET", server.jwt_secret)


# ---- the seed's application ------------------------------------------------------------------------------


def write_like_pmoves(db: Path) -> None:
    """What PMOVES-DoX's Database / ExtendedDatabase methods write (backend/app/database.py): JSON text dumped with
    ensure_ascii=False, ISO times with a Z, an artifact's extras merged by update_artifact, then reset()'s order
    of deletes (children first)."""
    conn = sqlite3.connect(db, isolation_level=None)
    dumps = json.dumps
    for n in range(12):
        conn.execute("INSERT INTO artifact VALUES (?, ?, ?, 'pdf', '2024-W03', 'queued', NULL, ?)",
                     (f"a{n}", f"r{n}.pdf", f"/data/r{n}.pdf", dumps({"pages": n, "lang": "dé"}, ensure_ascii=False)))
        conn.execute("INSERT INTO evidence VALUES (?, ?, ?, ?, 'text/plain', ?, ?)",
                     (f"e{n}", f"a{n}", f"page {n}", "préview", dumps([1, 2.5, 3]), dumps({"rows": [[1, "x"]]})))
        conn.execute("INSERT INTO fact VALUES (?, ?, '2024-W03', 'ACME', ?, ?)",
                     (f"f{n}", f"a{n}", dumps({"revenue": 12345678901234567.89 if n else 1.5}), f"e{n}"))
        conn.execute("INSERT INTO document VALUES (?, ?, 'openapi', ?, 'upload', '2024-01-15T10:30:00Z')",
                     (f"d{n}", f"/docs/{n}.json", f"Doc {n}"))
        conn.execute("INSERT INTO apiendpoint VALUES (?, ?, 'get', 'GET', ?, 'Get it', ?, ?, ?)",
                     (f"p{n}", f"d{n}", f"/items/{n}", dumps(["items"]), dumps([{"name": "id"}]), dumps({"200": {}})))
        conn.execute("INSERT INTO logentry VALUES (?, ?, '2024-01-15 10:30:00', 'ERROR', 'E42', 'api', 'boom', ?)",
                     (f"l{n}", f"d{n}", dumps({"n": n}) if n % 3 else ""))
        conn.execute("INSERT INTO tagprompt VALUES (?, ?, 'tag this', ?, '2024-01-15T10:30:00Z', NULL)",
                     (f"t{n}", f"d{n}", dumps(["a", "b"])))
        conn.execute("INSERT INTO summaries VALUES (?, 'workspace', 'workspace', 'bullet', 'ollama', NULL, 'text', ?, "
                     "?, '2024-01-15T10:30:00Z')", (f"s{n}", dumps([f"a{n}"]), dumps([])))
    conn.execute("UPDATE artifact SET extra_json = ?, status = 'completed' WHERE id = 'a1'",
                 (dumps({"pages": 1, "lang": "dé", "ocr": True}, ensure_ascii=False),))
    conn.execute("DELETE FROM evidence WHERE artifact_id = 'a2'")
    conn.execute("DELETE FROM fact WHERE artifact_id = 'a2'")
    conn.execute("DELETE FROM artifact WHERE id = 'a2'")
    conn.close()


@pytest.fixture
def empty_pmoves(server: DevServer) -> None:
    with psycopg.connect(server.pg_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(PMOVES_TARGETS)} CASCADE")


def test_the_seeds_application_ships_onto_its_own_migration_with_no_edit(
        tmp_path: Path, target: Secondary, capsys: pytest.CaptureFixture[str], keyed: None, empty_pmoves: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PMOVES-DoX's SQLite file and its Supabase migration: init --target writes a config that check passes, that
    installs, and whose shipping of the app's writes verify finds equal, nothing edited; against the dev server and
    the real PostgREST."""
    db = tmp_path / "db.sqlite3"
    sqlite3.connect(db).executescript((FIXTURE / "sqlite.sql").read_text())
    out = tmp_path / "syncd.toml"
    code, said = syncd(capsys, "init", "--db", str(db), "--out", str(out), "--target", target.url)
    assert code == 0, said
    config = load_config(out, env={})
    mapped = {t.name: t.target_name for t in config.tables}
    assert mapped == {"artifact": "artifacts", "evidence": "evidence", "fact": "facts", "document": "documents",
                      "apiendpoint": "api_endpoints", "logentry": "log_entries", "tagprompt": "tag_prompts",
                      "summaries": "summaries"}
    fact = config.table("fact")
    assert fact is not None and fact.exclude == ["evidence_id"] and fact.after == ["artifact"]
    assert fact.columns["metrics_json"].rename == "metrics" and fact.columns["metrics_json"].transform == "json"
    artifact = config.table("artifact")
    assert artifact is not None and artifact.columns["extra_json"].rename == "extras"
    assert "Not synced: tagrow" in out.read_text() and "search_chunks" in out.read_text()
    assert not (tmp_path / "schema.sql").exists()
    code, said = syncd(capsys, "check", "--config", str(out))
    assert code == 0 and "0 error(s)" in said, said
    assert syncd(capsys, "install", "--config", str(out))[0] == 0
    write_like_pmoves(db)
    # In its own process: `run` configures the process's logging onto its stderr, here capsys' file, which is closed
    # once this test ends (later tests of this worker would then log into a closed file).
    shipped = subprocess.run([sys.executable, "-m", "syncd", "run", "--once", "--config", str(out), "--metrics-addr",
                              "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    code, said = syncd(capsys, "verify", "--config", str(out))
    assert code == 0 and "8 table(s) equal" in said, said
    with psycopg.connect(target.pg_url) as conn:
        extras = conn.execute("SELECT extras FROM artifacts WHERE id = 'a1'").fetchone()
        assert extras == ({"pages": 1, "lang": "dé", "ocr": True},)
        assert conn.execute("SELECT count(*) FROM artifacts WHERE id = 'a2'").fetchone() == (0,)


def test_both_servers_and_the_catalog_give_the_same_config(tmp_path: Path, server: DevServer,
                                                            request: pytest.FixtureRequest,
                                                            capsys: pytest.CaptureFixture[str], keyed: None) -> None:
    """The decisions read from the dev server's OpenAPI, the real PostgREST's (when present) and PostgreSQL's
    catalog are the same: the config differs only in its header and [target]."""
    db = tmp_path / "db.sqlite3"
    sqlite3.connect(db).executescript((FIXTURE / "sqlite.sql").read_text())
    readers = [("--target", server.url), ("--pg-url", server.pg_url)]
    if binary() is not None:
        readers.append(("--target", request.getfixturevalue("real").url))
    written = []
    for n, (flag, value) in enumerate(readers):
        out = tmp_path / f"{n}.toml"
        code, said = syncd(capsys, "init", "--db", str(db), "--out", str(out), flag, value)
        assert code == 0, said
        written.append(out.read_text().split("# Shipping order", 1)[1])  # after the header and [target]
    assert all(text == written[0] for text in written[1:])


# ---- each kind of match and mismatch --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["--target", "--pg-url"])
def mismatches(request: pytest.FixtureRequest, server: DevServer, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[dict[str, object], str]:
    """init --target-prefix app_ of MISMATCH_SQLITE onto MISMATCH_PG's schema, through PostgREST's description or
    PostgreSQL's catalog: (the config as TOML data, its text, what init printed)."""
    work = tmp_path_factory.mktemp("mismatches")
    db = work / "app.db"
    sqlite3.connect(db).executescript(MISMATCH_SQLITE)
    out = work / "syncd.toml"
    value = server.url if request.param == "--target" else server.pg_url
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SUPABASE_JWT_SECRET", server.jwt_secret)
        env.delenv("SYNCD_CONFIG", raising=False)
        assert main(["init", "--db", str(db), "--out", str(out), "--schema", SCHEMA, "--target-prefix", "app_",
                     request.param, value]) == 0
    text = out.read_text()
    return tomllib.loads(text), text


def table(data: dict[str, object], name: str) -> dict[str, object]:
    tables = data.get("table")
    assert isinstance(tables, list)
    found = [t for t in tables if t["name"] == name]
    assert found, f"{name} not synced"
    return found[0]


def test_plural_table_names_match(mismatches: tuple[dict[str, object], str]) -> None:
    """category -> categories (consonant + y), box -> boxes (-x): plural matches, said in the comment."""
    data, text = mismatches
    assert table(data, "category")["target"] == "categories" and table(data, "box")["target"] == "boxes"
    assert "# category -> categories: categories is the plural" in text


def test_suffixes_and_types_choose_renames_and_transforms(mismatches: tuple[dict[str, object], str]) -> None:
    """created_at -> created and happened -> happened_at (timestamptz: timestamp), data_json -> data (jsonb: json),
    live INTEGER -> boolean (bool): each with the rule in its comment."""
    data, text = mismatches
    columns = table(data, "event")["columns"]
    assert columns == {"created_at": {"rename": "created", "transform": "timestamp"},
                       "data_json": {"rename": "data", "transform": "json"},
                       "happened": {"rename": "happened_at", "transform": "timestamp"},
                       "live": {"transform": "bool"}}
    assert "# data_json -> data: data_json without its _json suffix" in text


def test_a_prefix_of_the_secondary_is_dropped_when_asked(mismatches: tuple[dict[str, object], str]) -> None:
    """With --target-prefix app_: account -> app_accounts; category keeps categories (a name without the prefix is
    closer than app_categories)."""
    data, text = mismatches
    assert table(data, "account")["target"] == "app_accounts"
    assert "the prefix app_ dropped" in text and table(data, "category")["target"] == "categories"


def test_the_key_is_the_secondarys_primary_key(mismatches: tuple[dict[str, object], str]) -> None:
    """memberships' PRIMARY KEY (user_id, team_id) is a UNIQUE set of NOT NULL columns in SQLite: it is the key, and
    SQLite's id, which the secondary has not, is left out."""
    data, _ = mismatches
    membership = table(data, "membership")
    assert membership["key"] == ["user_id", "team_id"] and membership["exclude"] == ["id"]


def test_a_table_without_a_target_is_listed_with_the_reason(mismatches: tuple[dict[str, object], str]) -> None:
    """orphan has no table of a related name: not synced, commented out at the end with why."""
    _, text = mismatches
    assert "# Not synced: orphan: no table in the secondary matches 'orphan'" in text
    assert "# name = \"orphan\"" in text


def test_a_not_null_column_the_source_lacks_leaves_the_table_out(mismatches: tuple[dict[str, object], str]
                                                                 ) -> None:
    """invoices.currency is NOT NULL without a default and SQLite has no such column: every upsert would be refused,
    so invoice is not synced, the column named; issued (NOT NULL with a default) is no problem."""
    data, text = mismatches
    assert "invoice" not in {t["name"] for t in data["table"]}  # type: ignore[attr-defined]
    assert "Not synced: invoice: invoices has NOT NULL column(s) currency without a default" in text
    assert "issued" not in text


def test_a_type_that_refuses_the_values_leaves_the_column_out(mismatches: tuple[dict[str, object], str]
                                                              ) -> None:
    """reading.value is TEXT holding 'n/a' and readings.value is integer: left out with the sampled value; a BLOB into
    text: left out; flag and note get bool and json."""
    data, text = mismatches
    reading = table(data, "reading")
    assert reading["exclude"] == ["value", "payload"]
    assert reading["columns"] == {"flag": {"transform": "bool"}, "note": {"transform": "json"}}
    assert "integer would refuse the sampled value 'n/a' (not an integer)" in text
    assert "a BLOB reaches PostgreSQL only as bytea or vector" in text


def test_an_ambiguous_match_is_left_out_with_both_candidates(mismatches: tuple[dict[str, object], str]) -> None:
    """profile.extra_json matches extra and extras alike: left out, both named; person matches persons and people:
    not synced, both named."""
    data, text = mismatches
    assert table(data, "profile")["exclude"] == ["extra_json"]
    assert "ambiguous: extra and extras both match it" in text
    assert "Not synced: person: no table in the secondary matches 'person': ambiguous: people and persons" in text


def test_check_passes_on_what_init_wrote(mismatches: tuple[dict[str, object], str], tmp_path: Path,
                                         server: DevServer, capsys: pytest.CaptureFixture[str], keyed: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """syncd check finds no error in the mismatch config (what would have failed was left out)."""
    _, text = mismatches
    monkeypatch.setenv("SYNCD_TARGET_URL", server.url)  # --pg-url's config leaves the URL to the environment
    db = tmp_path / "app.db"
    sqlite3.connect(db).executescript(MISMATCH_SQLITE)
    out = tmp_path / "syncd.toml"
    out.write_text(text)  # its source.path is app.db beside it
    code, said = syncd(capsys, "check", "--config", str(out))
    assert code == 0 and "0 error(s)" in said, said


# ---- the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "flag"), [
    (["--target", "http://127.0.0.1:1", "--apply"], "--apply"),
    (["--target", "http://127.0.0.1:1", "--pg-url", "postgresql://x@127.0.0.1:1/db"], "--pg-url"),
    (["--target-prefix", "app_"], "--target-prefix"),
    (["--pg-url", "postgresql://x@127.0.0.1:1/db", "--consistency", "snapshot"], "--consistency"),
])
def test_flags_that_mean_nothing_together_name_the_flag(tmp_path: Path, args: list[str], flag: str,
                                                        capsys: pytest.CaptureFixture[str], keyed: None) -> None:
    """Each refused combination exits 2 with the flag first and writes nothing."""
    db = tmp_path / "app.db"
    sqlite3.connect(db).executescript(MISMATCH_SQLITE)
    code, said = syncd(capsys, "init", "--db", str(db), "--out", str(tmp_path / "s.toml"), *args)
    assert code == 2 and f"{flag}:" in said and not (tmp_path / "s.toml").exists(), said


def test_an_unreachable_target_says_so_without_the_password(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            keyed: None) -> None:
    """--pg-url that refuses: exit 2 naming the flag, the password masked; --target that does not answer: exit 2."""
    db = tmp_path / "app.db"
    sqlite3.connect(db).executescript(MISMATCH_SQLITE)
    secret = "s3cret-pass-word"
    code, said = syncd(capsys, "init", "--db", str(db), "--pg-url", f"postgresql://u:{secret}@127.0.0.1:1/db")
    assert code == 2 and "--pg-url" in said and secret not in said, said
    code, said = syncd(capsys, "init", "--db", str(db), "--target", "http://127.0.0.1:1")
    assert code == 2 and "--target" in said, said
    assert not (tmp_path / "syncd.toml").exists()


def test_a_table_the_keys_role_may_not_use_is_named_as_hidden_and_the_grants_are_written(
        tmp_path: Path, server: DevServer, target: Secondary, capsys: pytest.CaptureFixture[str], keyed: None) -> None:
    """A plain PostgreSQL whose migration granted nothing: PostgREST's description (openapi-mode follow-privileges)
    hides the table, so --target says why it sees none and how to go on; --pg-url --sql maps it and writes the
    GRANTs, and init's next step says to apply them; once applied, --target finds the same table. Against the dev
    server and the real PostgREST."""
    db = tmp_path / "app.db"
    sqlite3.connect(db).executescript("CREATE TABLE gadget (id INTEGER PRIMARY KEY, title TEXT);")
    with psycopg.connect(server.pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.gadgets")
        conn.execute("CREATE TABLE public.gadgets (id bigint PRIMARY KEY, title text)")
        conn.execute("REVOKE ALL ON public.gadgets FROM service_role, anon, authenticated")
        conn.execute("NOTIFY pgrst, 'reload schema'")
    try:
        code, said = syncd(capsys, "init", "--db", str(db), "--out", str(tmp_path / "a.toml"), "--target", target.url)
        assert code == 2 and "PostgREST describes only the tables the key's role may use" in said, said
        assert "--pg-url" in said and not (tmp_path / "a.toml").exists()
        grants = tmp_path / "grants.sql"
        code, said = syncd(capsys, "init", "--db", str(db), "--out", str(tmp_path / "b.toml"), "--pg-url",
                           server.pg_url, "--sql", str(grants))
        assert code == 0 and f"next: apply {grants}" in said, said
        assert "gadgets" in grants.read_text()
        with psycopg.connect(server.pg_url, autocommit=True) as conn:
            conn.execute(grants.read_text())
            conn.execute("NOTIFY pgrst, 'reload schema'")
        deadline = time.monotonic() + 10
        while True:
            code, said = syncd(capsys, "init", "--db", str(db), "--out", str(tmp_path / "c.toml"), "--target",
                               target.url)
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 0, said
        assert load_config(tmp_path / "c.toml", env={}).tables[0].target_name == "gadgets"
    finally:
        with psycopg.connect(server.pg_url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS public.gadgets")
            conn.execute("NOTIFY pgrst, 'reload schema'")
