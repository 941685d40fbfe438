"""`syncd check` reports each planted misconfiguration with its fix, and passes a healthy setup; against the dev
server and the real PostgREST (check reads their OpenAPI, probes upserts and tries the key)."""

from __future__ import annotations

import time

import psycopg
import pytest

from syncd import auth
from tests.conftest import DevServer, create_tables
from tests.e2e import App, on_both_servers, write_config
from tests.postgrest import SKIP_REASON, Secondary, binary


def check(app: App, *args: str) -> tuple[int, str]:
    result = app.syncd("check", *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


def edit_config(app: App, old: str, new: str) -> None:
    text = app.config.read_text()
    assert old in text
    app.config.write_text(text.replace(old, new))


def test_healthy_setup_passes(app: App, secondary: Secondary, pg: psycopg.Connection):
    code, out = check(app, "--pg-url", secondary.pg_url)
    assert code == 0, out
    assert "0 error(s), 0 warning(s)" in out and "item -> e2e_items: 7 column(s) match, key unique" in out
    assert "no policy reads request.jwt.claim.*" in out


@on_both_servers
def test_column_missing_in_the_secondary(app: App):
    app.connect().execute("ALTER TABLE item ADD COLUMN extra TEXT")
    app.connect().execute("ALTER TABLE item ADD COLUMN \"when made\" DATETIME")
    code, out = check(app)
    assert code == 1 and "column(s) 'extra', 'when made' do not exist in the secondary" in out, out
    # the same fix as the daemon's halt: the casting table of `syncd init` gives the types
    assert ('ALTER TABLE "public"."e2e_items" ADD COLUMN "extra" text, ADD COLUMN "when made" timestamptz' in out
            and 'exclude = ["extra", "when made"]' in out), out


@on_both_servers
def test_missing_transform_for_a_boolean_target(app: App):
    edit_config(app, '[table.columns.flag]\ntransform = "bool"\n', "")
    code, out = check(app)
    assert code == 0 and "WARN" in out and "target is boolean" in out and "transform" in out


@on_both_servers
def test_vector_transform_into_a_vector_column_passes(app: App):
    """A BLOB shipped with transform vector into a vector(3) column: nothing to warn about (the real PostgREST
    describes the column as 'public.vector(3)', the dev server as 'public.vector')."""
    app.connect().execute("CREATE TABLE words (n INTEGER PRIMARY KEY, vec BLOB)")
    app.config.write_text(app.config.read_text() + '[[table]]\nname = "words"\ntarget = "e2e_words"\n'
                          '[table.columns.vec]\ntransform = "vector"\n')
    assert app.syncd("install").returncode == 0
    code, out = check(app)
    assert code == 0 and "words -> e2e_words: 2 column(s) match, key unique" in out and "WARN" not in out, out


@on_both_servers
def test_a_not_null_column_the_mapping_never_fills_is_a_warning_that_names_sequences(app: App, secondary: Secondary):
    """PostgREST describes a serial or identity column as NOT NULL without a default too (12.2.12), so check cannot
    tell a column that would refuse every upsert from one a sequence fills: a warning naming both, never an error
    (syncd run halts the table on the 23502 itself)."""
    create_tables(secondary, {"e2e_tenanted": "CREATE TABLE e2e_tenanted (n bigint PRIMARY KEY, tenant text NOT "
                                              "NULL, serial_no bigserial, row_no bigint GENERATED ALWAYS AS IDENTITY)"})
    app.connect().execute("CREATE TABLE tenanted (n INTEGER PRIMARY KEY)")
    app.config.write_text(app.config.read_text() + '[[table]]\nname = "tenanted"\ntarget = "e2e_tenanted"\n')
    assert app.syncd("install").returncode == 0
    code, out = check(app)
    assert code == 0, out
    line = next(line for line in out.splitlines() if "tenanted -> e2e_tenanted" in line and "NOT NULL" in line)
    assert line.startswith("WARN") and "'tenant'" in line and "serial, identity" in line, out
    assert "'serial_no'" in line and "'row_no'" in line, line  # the real PostgREST shows no default for either


ON_POSTGREST = pytest.mark.skipif(binary() is None, reason=SKIP_REASON)


@pytest.mark.parametrize(("secondary", "role"), [("dev-server", "anon"), ("dev-server", "authenticated"),
                                                 pytest.param("postgrest", "anon", marks=ON_POSTGREST)],
                         indirect=["secondary"])
def test_a_key_without_the_privilege_to_write_is_diagnosed_as_the_key_never_as_the_schema(
        app: App, secondary: Secondary, pg: psycopg.Connection, role: str):
    """../shared/field-cases/28: the anon key (or a user's token) where the service_role key belongs. The probe's
    42501 is the key's role, with the fix for the key; never "add a unique constraint" to a schema that is right."""
    create_tables(secondary, {"e2e_guarded": "CREATE TABLE e2e_guarded (n bigint PRIMARY KEY)"})
    pg.execute("REVOKE ALL ON e2e_guarded FROM anon, authenticated")
    app.connect().execute("CREATE TABLE guarded (n INTEGER PRIMARY KEY)")
    write_config(app.config, app.db, secondary, app.metrics, key=secondary.token(role),
                 extra="")
    app.config.write_text(app.config.read_text() + '[[table]]\nname = "guarded"\ntarget = "e2e_guarded"\n')
    assert app.syncd("install").returncode == 0
    code, out = check(app)
    line = next(line for line in out.splitlines() if line.startswith("ERROR") and "guarded -> e2e_guarded" in line)
    assert code == 1 and f"role {role!r} has no privilege to write 'e2e_guarded'" in line and "42501" in line, out
    assert "unique constraint" not in out.lower()
    fix = out.splitlines()[out.splitlines().index(line) + 1]
    assert "service_role key" in fix and (("GRANT" in fix) == (role != "anon")), fix


@on_both_servers
def test_target_table_missing(app: App):
    edit_config(app, 'target = "e2e_parents"', 'target = "no_such_table"')
    code, out = check(app)
    assert code == 1 and "parent -> no_such_table: the target table is not in the secondary" in out


@on_both_servers
def test_key_that_is_not_unique_in_the_secondary(app: App, pg: psycopg.Connection):
    edit_config(app, 'target = "e2e_children"', 'target = "e2e_children"\nkey = ["name"]')
    code, out = check(app)
    assert code == 1 and "key (name) cannot be used for upserts" in out and "unique constraint" in out
    assert pg.execute("SELECT count(*) FROM e2e_children").fetchone() == (0,)  # the probe wrote nothing


def test_wrong_key_and_expiring_key(app: App, secondary: Secondary):
    forged = auth.mint_token("f" * 40, "service_role")
    write_config(app.config, app.db, secondary, app.metrics, key=forged)
    code, out = check(app)
    assert code == 1 and "ERROR secondary" in out and forged not in out
    soon = auth.mint_token(secondary.jwt_secret, "service_role", expires_in=2 * 86400)
    write_config(app.config, app.db, secondary, app.metrics, key=soon)
    code, out = check(app)
    assert code == 0 and "expires in 2.0 days" in out
    expired = auth.mint_token(secondary.jwt_secret, "service_role", now=time.time() - 3600, expires_in=60)
    write_config(app.config, app.db, secondary, app.metrics, key=expired)
    code, out = check(app)
    assert code == 1 and "the service key has expired" in out


@pytest.fixture
def seed_style_policy(pg: psycopg.Connection):
    pg.execute("""CREATE POLICY "seed style" ON public.e2e_parents FOR ALL
                  USING (current_setting('request.jwt.claim.role', true) = 'service_role')""")
    yield
    pg.execute('DROP POLICY "seed style" ON public.e2e_parents')


@pytest.mark.usefixtures("seed_style_policy")
def test_rls_policy_reading_request_jwt_claim_is_flagged(app: App, devserver: DevServer):
    code, out = check(app, "--pg-url", devserver.pg_url)
    assert "policy 'seed style' on public.e2e_parents: reads request.jwt.claim.*" in out
    assert "request.jwt.claims" in out and code == 0
