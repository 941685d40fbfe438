"""The dev server as a process: one JSON line when ready, clean shutdown, secrets and data options."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from tests.conftest import MIGRATIONS, ROOT, start_devserver


def socket_dir(pg_url: str) -> Path:
    return Path(parse_qs(urlsplit(pg_url).query)["host"][0])


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_throwaway_database_is_removed_on_stop(stop_signal: signal.Signals, monkeypatch: pytest.MonkeyPatch):
    """A throwaway server prints one JSON line with working keys, and leaves nothing behind on stop."""
    monkeypatch.delenv("SYNCD_TEST_PG_URL", raising=False)
    server = start_devserver()
    data = socket_dir(server.pg_url)
    assert data.exists()
    claims = jwt.decode(server.service_key, server.jwt_secret, algorithms=["HS256"])
    assert claims["role"] == "service_role" and claims["iss"] == "supabase"
    assert jwt.decode(server.anon_key, server.jwt_secret, algorithms=["HS256"])["role"] == "anon"
    client = server.client(server.service_key)  # left open: an idle keep-alive connection at shutdown
    assert client.get("/artifacts").status_code == 200
    server.process.send_signal(stop_signal)
    assert server.process.wait(timeout=60) == 0
    assert server.process.stdout is not None and server.process.stdout.read() == ""
    assert not data.exists()
    server.stderr.seek(0)
    assert "Traceback" not in server.stderr.read()
    client.close()


def test_data_dir_keeps_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SYNCD_TEST_PG_URL", raising=False)
    server = start_devserver("--data-dir", str(tmp_path / "pg"))
    created = server.client(server.service_key).post("/documents", json={"id": "d1", "path": "kept", "type": "pdf"})
    assert created.status_code == 201, created.text
    assert server.stop() == 0
    assert (tmp_path / "pg" / "PG_VERSION").exists()
    again = start_devserver("--data-dir", str(tmp_path / "pg"))
    try:
        assert again.client(again.service_key).get("/documents?select=path").json() == [{"path": "kept"}]
    finally:
        again.stop()


def test_secret_comes_from_supabase_jwt_secret(devserver, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SUPABASE_JWT_SECRET", "s" * 40)
    server = start_devserver("--pg-url", devserver.pg_url)
    try:
        assert server.jwt_secret == "s" * 40
        assert httpx.get(f"{server.url}/artifacts", headers={"Authorization": f"Bearer {server.anon_key}"}).is_success
    finally:
        server.stop()


def test_short_secret_is_refused_with_a_clear_message(devserver):
    result = subprocess.run([sys.executable, "-m", "syncd", "dev-server", "--pg-url", devserver.pg_url,
                             "--jwt-secret", "short"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "at least 32 characters" in result.stderr and result.stdout == ""


def test_every_command_has_help_and_is_documented():
    """Every subcommand answers --help, and the README documents each one (sqlite-utils checks the same)."""
    from syncd.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    readme = (ROOT / "README.md").read_text()
    assert {"install", "uninstall", "status", "dev-server"} <= set(commands)
    for name in commands:
        result = subprocess.run([sys.executable, "-m", "syncd", name, "--help"], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and f"usage: syncd {name}" in result.stdout
        assert f"syncd {name}" in readme
    dev_help = subprocess.run([sys.executable, "-m", "syncd", "dev-server", "--help"], capture_output=True,
                              text=True, timeout=60).stdout
    for flag in ("--host", "--port", "--prefix", "--pg-url", "--data-dir", "--migrations", "--jwt-secret",
                 "--require-apikey", "--faults"):
        assert flag in dev_help


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in readme


def test_default_migrations_are_the_projects(devserver):
    """The shared server applied deploy/supabase/migrations: the seed's tables are served."""
    spec = httpx.get(f"{devserver.url}/", headers={"Authorization": f"Bearer {devserver.service_key}"}).json()
    assert {"artifacts", "facts", "cipher_memory", "user_prefs", "skills_registry", "search_chunks"} <= set(
        spec["definitions"])
    assert sorted(p.name for p in MIGRATIONS.glob("*.sql"))[0] == "000_roles_and_auth.sql"
