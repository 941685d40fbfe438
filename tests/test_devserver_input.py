"""Bad input to the dev server.

Flags: every mistaken one is one line on stderr naming the flag and the fix, exit code 2, never a traceback;
found before a throwaway PostgreSQL starts where it can be, and a throwaway one is removed again otherwise.
Query parameters: column names are read as PostgREST 12 reads them, double-quoted with backslash escapes
(`"i\\"d"`) in order, select, filters, logic trees, on_conflict and columns alike.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from syncd import cli
from syncd.devserver import options, postgres, query
from syncd.devserver.errors import ApiError
from tests.conftest import DevServer, start_devserver

SECRET = "s3cret-pw"
BAD_MIGRATION = "CREATE TABLE public.before_the_error (x int);\n\nCREAT TABLE oops (y int);\n"


# -- flags ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A file, a directory holding something, and a path that does not exist."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    return {"file": tmp_path / "a-file", "full": tmp_path / "full", "missing": tmp_path / "missing"}


def one_error_line(stderr: str, words: tuple[str, ...]) -> str:
    """The single `error: ...` line of `stderr`, after checking it holds every one of `words` and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# (flags with {busy}, {closed}, {file}, {full}, {missing} filled in) -> words the one error line must hold
REFUSED_BEFORE_START = [
    (("--port", "99999"), ("--port 99999", "0 to 65535", "0: any free port")),
    (("--port", "-1"), ("--port -1", "0 to 65535")),
    (("--port", "{busy}"), ("--port {busy}", "127.0.0.1:{busy}", "already in use", "another port or 0")),
    (("--host", "nosuchhost.invalid"), ("--host nosuchhost.invalid", "cannot resolve", "127.0.0.1")),
    (("--host", "192.0.2.1"), ("--host 192.0.2.1", "not an address of this machine")),
    (("--host", ""), ("--host", "empty", "127.0.0.1")),
    (("--pool-size", "0"), ("--pool-size 0", "1 or more")),
    (("--pool-size", "-4"), ("--pool-size -4", "1 or more")),
    (("--pool-timeout", "nan"), ("--pool-timeout nan", "above 0")),
    (("--pool-timeout", "0"), ("--pool-timeout 0", "above 0")),
    (("--pool-timeout", "-1"), ("--pool-timeout -1", "above 0")),
    (("--pool-timeout", "inf"), ("--pool-timeout inf", "above 0")),
    (("--schemas", ""), ("--schemas", "at least one schema")),
    (("--schemas", " , "), ("--schemas", "at least one schema")),
    (("--anon-role", ""), ("--anon-role", "empty")),
    (("--prefix", "http://localhost:54321/rest/v1"), ("--prefix", "only the path", "/rest/v1")),
    (("--prefix", "/rest//v1"), ("--prefix", "empty, '.' and '..'")),
    (("--prefix", "/rest/../v1"), ("--prefix", "'..'")),
    (("--prefix", "/rest v1"), ("--prefix", "' '", "URL path")),
    (("--prefix", "/rest?v=1"), ("--prefix", "'?'", "URL path")),
    (("--prefix", "/rest%20v1"), ("--prefix", "'%'", "URL path")),
    (("--migrations", "{missing}"), ("--migrations {missing}", "no such directory")),
    (("--migrations", "{file}"), ("--migrations {file}", "not a directory")),
    (("--data-dir", "{file}"), ("--data-dir {file}", "is a file")),
    (("--data-dir", "{file}/pg"), ("--data-dir {file}/pg", "{file} is a file")),
    (("--data-dir", "{full}"), ("--data-dir {full}", "neither empty nor a PostgreSQL data directory")),
    (("--jwt-secret", "short"), ("--jwt-secret", "at least 32 characters", "random")),
    (("--jwt-secret", ""), ("--jwt-secret", "empty")),
    (("--pg-url", "postgresql://u@127.0.0.1:{closed}/x", "--data-dir", "{missing}"), ("--data-dir", "--pg-url")),
    (("--pg-url", f"postgresql://nobody:{SECRET}@127.0.0.1:{{closed}}/x"),
     ("--pg-url", "cannot connect to postgresql://nobody:***@127.0.0.1:{closed}/x", "Connection refused",
      "check the host, port, user")),
    (("--pg-url", f"host=127.0.0.1 port={{closed}} password={SECRET}"), ("--pg-url", "password=***")),
    (("--pg-url", "nonsense"), ("--pg-url nonsense", "not a PostgreSQL URL", "postgresql://")),
    (("--pg-url", f"postgresql://u:{SECRET}%zz@h/x"), ("--pg-url postgresql://u:***@h/x", "not a PostgreSQL URL")),
]


@pytest.mark.parametrize(("flags", "words"), REFUSED_BEFORE_START,
                         ids=[" ".join(flags) for flags, _ in REFUSED_BEFORE_START])
def test_bad_flag_is_one_line_and_exit_2_before_anything_starts(
        flags: tuple[str, ...], words: tuple[str, ...], busy_port: int, closed_port: int, places: dict[str, Path],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """In-process (fast): exit 2, one line with the flag and the fix, no password, no throwaway PostgreSQL."""
    monkeypatch.delenv("SUPABASE_JWT_SECRET", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a throwaway PostgreSQL would go
    fill = {"busy": busy_port, "closed": closed_port, **places}
    code = cli.main(["dev-server", "--port", "0", *(flag.format(**fill) for flag in flags)])
    out, err = capsys.readouterr()
    line = one_error_line(err, tuple(word.format(**fill) for word in words))
    assert code == 2 and out == ""
    assert SECRET not in line
    assert not list(tmp_path.glob("syncd-pg-*"))


def test_short_secret_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("SUPABASE_JWT_SECRET", "short")
    assert cli.main(["dev-server", "--port", "0"]) == 2
    one_error_line(capsys.readouterr().err, ("SUPABASE_JWT_SECRET", "at least 32 characters"))


def run_devserver(*flags: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`python -m syncd dev-server --port 0 FLAGS` as a process, with its temporary files under `tmp`."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("SUPABASE_JWT_SECRET", None)
    return subprocess.run([sys.executable, "-m", "syncd", "dev-server", "--port", "0", *flags], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("flags", "words"), [
    (("--pg-url", f"postgresql://nobody:{SECRET}@127.0.0.1:{{closed}}/x"), ("--pg-url", "nobody:***@", "connect")),
    (("--port", "99999"), ("--port 99999", "0 to 65535")),
    (("--port", "{busy}"), ("--port {busy}", "already in use")),
], ids=["unreachable-pg-url", "port-out-of-range", "port-in-use"])
def test_reported_inputs_as_a_process(flags: tuple[str, ...], words: tuple[str, ...], busy_port: int,
                                      closed_port: int, tmp_path: Path):
    """The three inputs of the defect report, as the real command: exit 2, one line, no traceback, no password."""
    fill = {"busy": busy_port, "closed": closed_port}
    result = run_devserver(*(flag.format(**fill) for flag in flags), tmp=tmp_path)
    line = one_error_line(result.stderr, tuple(word.format(**fill) for word in words))
    assert result.returncode == 2 and result.stdout == "" and SECRET not in line


@pytest.mark.parametrize(("files", "words"), [
    ({"001_ok.sql": "SELECT 1;", "002_bad.sql": BAD_MIGRATION},
     ("--migrations", "002_bad.sql failed", 'syntax error at or near "CREAT"', "SQLSTATE 42601", "line 3")),
    ({}, ("--migrations", "no role 'authenticator'", "000_roles_and_auth.sql")),
], ids=["failing-migration", "no-roles"])
def test_migration_problems_name_the_file_and_remove_the_throwaway_database(files: dict[str, str],
                                                                            words: tuple[str, ...], tmp_path: Path):
    """Found once PostgreSQL runs: still one line and exit 2, and the throwaway server is gone afterwards."""
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for name, sql in files.items():
        (migrations / name).write_text(sql)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = run_devserver("--migrations", str(migrations), tmp=scratch)
    one_error_line(result.stderr, words)
    assert result.returncode == 2 and result.stdout == ""
    assert not list(scratch.glob("syncd-pg-*"))  # pgserver's own .lockfile may stay


def test_missing_schema_and_anon_role_are_warnings_as_postgrest_starts_too(devserver: DevServer):
    """PostgREST 12 starts with an exposed schema or anon role the database lacks; so does the dev server, saying so."""
    server = start_devserver("--pg-url", devserver.pg_url, "--schemas", "public,no_such_schema", "--anon-role",
                             "no_such_role")
    try:
        server.stderr.seek(0)
        log = server.stderr.read()
        assert "warning: --schemas: no schema 'no_such_schema'" in log
        assert "warning: --anon-role no_such_role: no such role" in log
        assert "Traceback" not in log
    finally:
        server.stop()


@pytest.mark.parametrize(("text", "prefix"), [
    ("/rest/v1", "/rest/v1"), ("rest/v1", "/rest/v1"), ("/rest/v1/", "/rest/v1"), ("/", ""), ("", ""),
    ("/api-2/v_1.0~x", "/api-2/v_1.0~x"),
])
def test_prefix_forms_that_are_fine(text: str, prefix: str):
    assert options.parse_prefix(text) == prefix


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgres://u@h/db", "postgres://u@h/db"),
    ("postgresql://u:p%40w@h/db?password=again&sslmode=require",
     "postgresql://u:***@h/db?password=***&sslmode=require"),
    ("host=h password='a b' user=u", "host=h password=*** user=u"),
    ("postgresql://u:Sec@ret-password@h:5432/db", "postgresql://u:***@h:5432/db"),  # an unencoded "@"
])
def test_passwords_are_masked_in_urls(url: str, shown: str):
    assert options.mask_url(url) == shown


def test_errors_name_the_flag_for_each_bind_failure():
    """EACCES cannot be provoked as root; the message is checked here instead."""
    denied = options.listen_error("127.0.0.1", 80, OSError(errno.EACCES, "Permission denied"))
    assert "--port 80" in str(denied) and "above 1023" in str(denied)
    v6 = options.listen_error("::1", 5, OSError(errno.EADDRINUSE, "Address in use"))
    assert "[::1]:5" in str(v6)


def test_connect_failure_keeps_libpq_reason_short():
    exc = psycopg.OperationalError('connection failed: connection to server at "h", port 5432 failed: FATAL:  '
                                   'password authentication failed for user "u"')
    assert postgres.connect_failure(exc) == 'password authentication failed for user "u"'


# -- quoted column names in query parameters ------------------------------------------------------------------------


def error_of(call: object, *args: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call(*args)  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize(("text", "terms"), [
    (r'"i\"d".asc', [('i"d', False, None)]),
    (r'"i\"d"', [('i"d', False, None)]),
    (r'"a.b".desc.nullslast,"i\\d"', [("a.b", True, "LAST"), ("i\\d", False, None)]),
    ('" x, y ".asc.nullsfirst', [(" x, y ", False, "FIRST")]),
    ("x y .desc", [("x y", True, None)]),
    ("a-b,$c", [("a-b", False, None), ("$c", False, None)]),
])
def test_order_reads_quoted_names(text: str, terms: list[tuple[str, bool, str | None]]):
    assert [(t.column, t.descending, t.nulls) for t in query.parse_order(text)] == terms


@pytest.mark.parametrize(("text", "code"), [
    ("v.nullsfirst.desc", "PGRST100"), ("v.desc.desc", "PGRST100"), ('"unterminated.asc', "PGRST100"),
    (r'"i\"d"x.asc', "PGRST100"), ("", "PGRST100"), ("v,", "PGRST100"), ("v.sideways", "PGRST100"),
    ("v->k.asc", "PGRST100"), ("rel(v).asc", "PGRST108"),
])
def test_order_refuses_what_postgrest_refuses(text: str, code: str):
    assert error_of(query.parse_order, text).code == code


@pytest.mark.parametrize(("text", "items"), [
    (r'"i\"d",v', [('i"d', None, None), ("v", None, None)]),
    (r'al:"i\"d"::text', [('i"d', "al", "text")]),
    (r'"a:b":"i\"d"', [('i"d', "a:b", None)]),
    ('"a,b","a(b)"', [("a,b", None, None), ("a(b)", None, None)]),
    (' v :: text , "x y" ', [("v", None, "text"), ("x y", None, None)]),
    ("", [("*", None, None)]), (":v", [("*", None, None)]),  # PostgREST reads no item and selects everything
])
def test_select_reads_quoted_names(text: str, items: list[tuple[str, str | None, str | None]]):
    assert [(i.column, i.alias, i.cast) for i in query.parse_select(text)] == items


@pytest.mark.parametrize(("text", "code"), [
    ("x:*", "PGRST100"), ("v::text[]", "PGRST100"), ("v::$x", "PGRST100"), (r'"i\"d"x', "PGRST100"),
    ("v,", "PGRST100"), ("rel(*)", "PGRST200"), ("a:rel!inner(*)", "PGRST200"),
])
def test_select_refuses_what_postgrest_refuses(text: str, code: str):
    assert error_of(query.parse_select, text).code == code


@pytest.mark.parametrize(("text", "names"), [
    (r'"i\"d",v', ['i"d', "v"]), (r'"i\"d" , v ,"a,b"', ['i"d', "v", "a,b"]),
    (r'"i\"d",v;x', ['i"d', "v"]),  # PostgREST stops at the first character that cannot continue the list
    (r'"i\"d"x', ['i"d']),
])
def test_on_conflict_and_columns_read_quoted_names(text: str, names: list[str]):
    assert query.parse_columns("on_conflict", text) == names


@pytest.mark.parametrize(("key", "column"), [
    (r'"i\"d"', 'i"d'), ('"a.b"', "a.b"), (" v ", "v"), ("a-b", "a-b"), (r'"i\\d"', "i\\d"),
])
def test_filter_keys_read_quoted_names(key: str, column: str):
    assert query.parse_key(key) == column


def test_filter_key_with_an_embedded_resource_is_pgrst108():
    assert error_of(query.parse_key, "rel.v").code == "PGRST108"


def test_logic_tree_reads_quoted_names_with_spaces_around():
    tree = query.parse_logic("or", r'( "i\"d" .eq.k1,and("a.b".eq.x, v.is.null))')
    leaf, nested = tree.children
    assert isinstance(leaf, query.Filter) and (leaf.column, leaf.value) == ('i"d', "k1")
    assert isinstance(nested, query.Logic)
    assert [c.column for c in nested.children if isinstance(c, query.Filter)] == ["a.b", "v"]


@pytest.fixture(scope="module")
def quoted_table(devserver: DevServer) -> Iterator[str]:
    """public.quoted_cols, whose columns all need quoting, with rows k1 and k2, in the shared dev server's cache."""
    with psycopg.connect(devserver.pg_url, autocommit=True) as pg:
        pg.execute('CREATE TABLE public.quoted_cols ("i""d" text PRIMARY KEY, "a.b" text, "a,b" text, "i\\d" text,'
                   " v text)")
        pg.execute("GRANT ALL ON public.quoted_cols TO service_role")
        pg.execute("INSERT INTO public.quoted_cols VALUES ('k1', 'x', 'p', 'b1', 'v1'), ('k2', 'x', 'q', 'b2', NULL)")
        pg.execute("NOTIFY pgrst, 'reload schema'")
        with devserver.client(devserver.service_key) as client:
            for _ in range(200):
                if client.get("/quoted_cols").status_code == 200:
                    break
                time.sleep(0.05)
        yield "quoted_cols"
        pg.execute("DROP TABLE public.quoted_cols")
        pg.execute("NOTIFY pgrst, 'reload schema'")


@pytest.mark.parametrize(("params", "expected"), [
    (r'select="i\"d"&order="i\"d".desc', [{'i"d': "k2"}, {'i"d': "k1"}]),
    (r'select="i\"d"&order="a.b".asc,"i\"d".desc.nullsfirst', [{'i"d': "k2"}, {'i"d': "k1"}]),
    (r'select="i\"d"&order=v.desc.nullslast', [{'i"d': "k1"}, {'i"d': "k2"}]),
    (r'select=key:"i\"d","a,b"&"i\"d"=eq.k1', [{"key": "k1", "a,b": "p"}]),
    (r'select="i\\d"&order="i\\d".desc', [{"i\\d": "b2"}, {"i\\d": "b1"}]),
    (r'select="i\"d"::text&or=("i\"d".eq.k2,"a,b".eq.nope)', [{'i"d': "k2"}]),
    (r'select="i\"d"&"a.b"=eq.x&and=("i\"d".gt.k1)', [{'i"d': "k2"}]),
], ids=["order-desc", "order-two-terms", "order-plain", "filter", "backslash", "or-tree", "and-tree"])
def test_quoted_names_over_http(devserver: DevServer, quoted_table: str, params: str, expected: list[dict]):
    """The defect: `order="i\\"d".asc` answered 42703; every parameter that takes a column now reads it quoted."""
    with devserver.client(devserver.service_key) as client:
        r = client.get(f"/{quoted_table}?{params}")
    assert r.status_code == 200, r.text
    assert r.json() == expected


def test_quoted_names_in_on_conflict_and_columns_over_http(devserver: DevServer, quoted_table: str):
    headers = {"Prefer": "resolution=merge-duplicates, return=representation"}
    with devserver.client(devserver.service_key) as client:
        r = client.post(rf'/{quoted_table}?on_conflict="i\"d"&columns="i\"d",v&select="i\"d",v',
                        json=[{'i"d': "k1", "v": "new"}], headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == [{'i"d': "k1", "v": "new"}]
        r = client.patch(rf'/{quoted_table}?"i\"d"=eq.k1', json={"v": "v1"})
        assert r.status_code == 204, r.text


def test_verify_compares_a_table_whose_key_needs_quoting(devserver: DevServer, tmp_path: Path):
    """End to end, as the defect report: install, ship, then `syncd verify` finds the secondary equal."""
    with psycopg.connect(devserver.pg_url, autocommit=True) as pg:
        pg.execute('DROP TABLE IF EXISTS public.qk_verify')
        pg.execute('CREATE TABLE public.qk_verify ("i""d" text PRIMARY KEY, v text)')
        pg.execute("GRANT ALL ON public.qk_verify TO service_role")
        pg.execute("NOTIFY pgrst, 'reload schema'")
        db = tmp_path / "app.sqlite3"
        with sqlite3.connect(db) as source:
            source.execute('CREATE TABLE qk_verify ("i""d" TEXT PRIMARY KEY, v TEXT)')
        config = tmp_path / "syncd.toml"
        config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "{devserver.url}"\n'
                          f'service_key = "{devserver.service_key}"\n[[table]]\nname = "qk_verify"\n')
        with devserver.client(devserver.service_key) as client:
            for _ in range(200):
                if client.get("/qk_verify").status_code == 200:
                    break
                time.sleep(0.05)

        def syncd(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(config)],
                                  capture_output=True, text=True, timeout=60)

        try:
            assert syncd("install").returncode == 0
            with sqlite3.connect(db) as source:
                source.execute("INSERT INTO qk_verify VALUES ('k1', 'v1'), ('k\"2', 'v2')")
            shipped = syncd("run", "--once", "--metrics-addr", "127.0.0.1:0")
            assert shipped.returncode == 0, shipped.stderr
            verified = syncd("verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert "qk_verify -> qk_verify: equal (2 rows)" in verified.stdout
        finally:
            pg.execute("DROP TABLE public.qk_verify")
            pg.execute("NOTIFY pgrst, 'reload schema'")
