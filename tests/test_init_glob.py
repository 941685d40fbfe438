"""`syncd init --glob`: one config and one secondary for a directory of tenant files. The DDL puts the tenant column
first in every key, UNIQUE set and foreign key; its RLS policy lets an `authenticated` user read only the rows of
the tenant its JWT's claim names (measured through the real PostgREST and the dev server); `jwt sign --claim` signs
such a token; the flags' mistakes name the flag; files that differ or give no tenant id are said."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from syncd.config import load_config
from syncd.onboard import Column, ForeignKey, Table, with_tenant
from tests.postgrest import Secondary
from tests.test_init import SCHEMA, catalog_snapshot, forget_tables, ship_and_verify, syncd, wait_exposed

TABLES = ["ig_customer", "ig_invoice"]
TENANT_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE ig_customer (id INTEGER PRIMARY KEY, email TEXT UNIQUE, tenant_id TEXT);
CREATE TABLE ig_invoice (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES ig_customer (id), total REAL,
                         created DATETIME);
"""


def tenant_file(path: Path, rows: int, schema: str = TENANT_SCHEMA) -> Path:
    """A tenant's file: `rows` customers with one invoice each, the same ids in every tenant."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(schema)
    for i in range(1, rows + 1):
        conn.execute("INSERT INTO ig_customer VALUES (?, ?, 'the app''s own')", (i, f"c{i}@{path.stem}"))
        conn.execute("INSERT INTO ig_invoice VALUES (?, ?, ?, '2024-01-15 10:30:00')", (i, i, i * 1.5))
    conn.commit()
    conn.close()
    return path


def init_glob(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`syncd init --glob tenants/*.sqlite3 ...` run in `tmp_path` (the glob is relative to the working directory)."""
    return subprocess.run([sys.executable, "-m", "syncd", "init", "--glob", "tenants/*.sqlite3", "--schema", SCHEMA,
                           *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def sign(server: Secondary, *args: str) -> str:
    signed = subprocess.run([sys.executable, "-m", "syncd", "jwt", "sign", "--role", "authenticated", *args],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SUPABASE_JWT_SECRET": server.jwt_secret})
    assert signed.returncode == 0, signed.stderr
    return signed.stdout.strip()


def read_as(server: Secondary, token: str, table: str) -> tuple[int, object]:
    """GET /table as the holder of `token` (in SCHEMA): the status and the JSON answered."""
    answer = httpx.get(f"{server.url}/{table}?select=tenant_id,id&order=tenant_id,id", timeout=30,
                       headers={"Authorization": f"Bearer {token}", "Accept-Profile": SCHEMA})
    return answer.status_code, answer.json()


def test_tenants_ship_into_one_secondary_where_each_user_reads_only_its_tenant(tmp_path: Path, secondary: Secondary):
    """Three tenants with the same ids: init --glob --apply (no file edited), install, run --once over the glob,
    verify equal for every file; PostgreSQL holds every tenant's rows apart (the app's own tenant_id column carries
    the file's tenant id); through the server an authenticated user whose token's `org` claim is acme reads acme's
    rows only, one without the claim none, the service role all."""
    for name in ("acme", "globex", "initech"):
        tenant_file(tmp_path / "tenants" / f"{name}.sqlite3", 3)
    forget_tables(secondary, TABLES)
    made = init_glob(tmp_path, "--tenant-claim", "org", "--apply", "--pg-url", secondary.pg_url)
    assert made.returncode == 0, made.stderr
    assert "3 file(s) match" in made.stdout and "'tenant_id' of their own" in made.stdout
    wait_exposed(secondary, TABLES)
    config = tmp_path / "syncd.toml"
    installed = syncd(config, secondary, "install")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    copied = syncd(config, secondary, "resync", "--all")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    ship_and_verify(config, secondary)

    with psycopg.connect(secondary.pg_url) as pg:
        held = pg.execute(f"SELECT tenant_id, id, email FROM {SCHEMA}.ig_customer ORDER BY 1, 2").fetchall()
        invoices = pg.execute(f"SELECT tenant_id, id, customer_id FROM {SCHEMA}.ig_invoice ORDER BY 1, 2").fetchall()
    assert held == [(t, i, f"c{i}@{t}") for t in ("acme", "globex", "initech") for i in (1, 2, 3)]
    assert invoices == [(t, i, i) for t in ("acme", "globex", "initech") for i in (1, 2, 3)]

    acme = sign(secondary, "--sub", "u1", "--claim", "org=acme")
    for table in TABLES:
        assert read_as(secondary, acme, table) == (200, [{"tenant_id": "acme", "id": i} for i in (1, 2, 3)])
        assert read_as(secondary, sign(secondary, "--sub", "u2"), table) == (200, [])
        status, every = read_as(secondary, secondary.service_key, table)
        assert status == 200 and isinstance(every, list) and len(every) == 9
    refused = httpx.post(f"{secondary.url}/ig_customer", json={"tenant_id": "acme", "id": 9}, timeout=30,
                         headers={"Authorization": f"Bearer {acme}", "Content-Profile": SCHEMA})
    assert refused.status_code in (401, 403) and refused.json()["code"] == "42501", refused.text


def test_the_sql_is_idempotent_and_keys_carry_the_tenant(tmp_path: Path, secondary: Secondary):
    """Applied twice the SQL changes nothing; every key, UNIQUE set, foreign key and the index of a foreign key start
    with the tenant column; the policy names the claim."""
    tenant_file(tmp_path / "tenants" / "acme.sqlite3", 1)
    forget_tables(secondary, TABLES)
    made = init_glob(tmp_path, "--tenant-column", "org_id", "--apply", "--pg-url", secondary.pg_url)
    assert made.returncode == 0, made.stderr
    before = catalog_snapshot(secondary.pg_url)
    with psycopg.connect(secondary.pg_url) as pg:
        pg.execute((tmp_path / "schema.sql").read_text().encode())
    assert catalog_snapshot(secondary.pg_url) == before
    with psycopg.connect(secondary.pg_url) as pg:
        constraints = dict(pg.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = %s::regnamespace "
            "AND conrelid IN (%s::regclass, %s::regclass)",
            (SCHEMA, f"{SCHEMA}.ig_customer", f"{SCHEMA}.ig_invoice")).fetchall())
        policy = pg.execute("SELECT roles::text, cmd, qual FROM pg_policies WHERE schemaname = %s AND tablename = "
                            "'ig_invoice' AND policyname LIKE '%%tenant%%'", (SCHEMA,)).fetchone()
        index = pg.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = 'ig_invoice' AND "
                           "indexname LIKE '%%customer_id_idx'", (SCHEMA,)).fetchone()
    assert constraints["ig_customer_pkey"] == "PRIMARY KEY (org_id, id)"
    assert constraints["ig_customer_org_id_email_key"] == "UNIQUE (org_id, email) DEFERRABLE INITIALLY DEFERRED"
    assert constraints["ig_invoice_org_id_customer_id_fkey"] == \
        f"FOREIGN KEY (org_id, customer_id) REFERENCES {SCHEMA}.ig_customer(org_id, id)"
    assert policy[:2] == ("{authenticated}", "SELECT") and "'tenant_id'::text" in policy[2] and "org_id" in policy[2]
    assert index is not None and "(org_id, customer_id)" in index[0]
    config = load_config(tmp_path / "syncd.toml", env={})
    assert 'glob = "tenants/*.sqlite3"' in (tmp_path / "syncd.toml").read_text()  # relative to the config
    assert config.source.glob == str(tmp_path / "tenants/*.sqlite3") and config.source.tenant_column == "org_id"
    assert config.source.tenant == "{stem}" and sorted(t.name for t in config.tables) == TABLES


def test_files_that_differ_or_give_no_tenant_are_said(tmp_path: Path):
    """The catalog is the first file's; a file lacking a column, one declaring another type and one whose name gives
    no tenant id by --tenant are named in the notes (the files are still written)."""
    tenant_file(tmp_path / "tenants" / "tenant-1.sqlite3", 1)
    tenant_file(tmp_path / "tenants" / "tenant-2.sqlite3", 0, TENANT_SCHEMA.replace("total REAL,", ""))
    tenant_file(tmp_path / "tenants" / "tenant-3.sqlite3", 0, TENANT_SCHEMA.replace("email TEXT", "email BLOB"))
    tenant_file(tmp_path / "tenants" / "other.sqlite3", 1)
    made = init_glob(tmp_path, "--tenant", "tenant-{id}.sqlite3")
    assert made.returncode == 0, made.stderr
    assert "4 file(s) match" in made.stdout and "catalog is tenants/other.sqlite3's" in made.stdout
    assert "1 file(s) give no tenant id by --tenant 'tenant-{id}.sqlite3'" in made.stdout
    assert "tenants/other.sqlite3" in made.stdout.split("give no tenant id")[1].splitlines()[0]
    warning = next(line for line in made.stdout.splitlines() if line.startswith("warning:"))
    assert "2 file(s) differ" in warning and "ig_invoice.total is missing" in warning
    assert "ig_customer.email is declared BLOB, not TEXT" in warning
    assert load_config(tmp_path / "syncd.toml", env={}).source.tenant == "tenant-{id}.sqlite3"


@pytest.mark.parametrize(("args", "flag", "says"), [
    (["--glob", "tenants/*.db"], "--glob", "no file matches"),
    (["--glob", "tenants/acme.sqlite3"], "--glob", "no wildcard"),
    (["--glob", "tenants/*.sqlite3", "--consistency", "snapshot"], "--consistency", "refused with --glob"),
    (["--glob", "tenants/*.sqlite3", "--tenant", "{a}{b}"], "--tenant", "side by side"),
    (["--glob", "tenants/*.sqlite3", "--tenant-column", "_syncd_t"], "--tenant-column", "not a usable name"),
    (["--db", "tenants/acme.sqlite3", "--tenant-claim", "org"], "--tenant-claim", "only with --glob"),
    (["--db", "tenants/acme.sqlite3", "--glob", "tenants/*.sqlite3"], "--glob", "not allowed with"),
])
def test_usage_errors_name_the_flag(tmp_path: Path, args: list[str], flag: str, says: str):
    """A mistake with the multi-file flags is exit 2 naming the flag and the fix, with no file written."""
    tenant_file(tmp_path / "tenants" / "acme.sqlite3", 1)
    result = subprocess.run([sys.executable, "-m", "syncd", "init", "--out", "c.toml", "--sql", "s.sql", *args],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and flag in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.toml").exists() and not (tmp_path / "s.sql").exists()


@pytest.mark.parametrize(("claim", "says"), [
    ("tenant_id", "not KEY=VALUE"), ("=acme", "not KEY=VALUE"), ("role=service_role", "set by --role"),
    ("exp=1", "set by --expires-in"),
])
def test_jwt_sign_claims_are_checked(claim: str, says: str):
    """`jwt sign --claim`: KEY=VALUE only, never a claim another flag sets (a role claim here would sign a
    service_role token for a user)."""
    result = subprocess.run([sys.executable, "-m", "syncd", "jwt", "sign", "--role", "authenticated", "--claim", claim,
                             "--secret", "x" * 40], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--claim" in result.stderr and says in result.stderr, result.stderr


def test_jwt_sign_carries_each_claim_as_a_string():
    import jwt

    result = subprocess.run([sys.executable, "-m", "syncd", "jwt", "sign", "--role", "authenticated", "--claim",
                             "tenant_id=acme", "--claim", "plan=5", "--claim", "note=a=b", "--secret", "x" * 40],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), "x" * 40, algorithms=["HS256"], audience="authenticated")
    assert (claims["tenant_id"], claims["plan"], claims["note"], claims["role"]) == ("acme", "5", "a=b",
                                                                                      "authenticated")


def test_with_tenant_prefixes_every_key_and_replaces_a_column_of_that_name():
    table = Table("child", [Column("id", "INTEGER", "bigint", None, False), Column("Tenant_ID", "TEXT", "text", None,
                                                                                      False),
                            Column("p", "INTEGER", "bigint", None, False)],
                  key=["tenant_id", "id"], unique=[["p"]], foreign_keys=[ForeignKey(["p"], "parent", ["id"])])
    held = with_tenant(table, "tenant_id")
    assert [c.name for c in held.columns] == ["tenant_id", "id", "p"] and held.columns[0].not_null
    assert held.key == ["tenant_id", "id"] and held.unique == [["tenant_id", "p"]]
    assert (held.foreign_keys[0].columns, held.foreign_keys[0].parent_columns) == (["tenant_id", "p"],
                                                                                  ["tenant_id", "id"])
    assert held.notes == ["the source column 'tenant_id' is not shipped: syncd fills 'tenant_id' with the file's "
                          "tenant id"]
    assert len(table.columns) == 3 and table.unique == [["p"]]  # the catalog's table is left as it was
