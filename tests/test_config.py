"""syncd.config: layering (flags > environment > file > defaults), validation messages, secrets, shipped files."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from syncd.config import (
    ColumnConfig,
    Config,
    ConfigError,
    EnvironmentSettings,
    SourceConfig,
    TableConfig,
    TargetConfig,
    WorkerConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
DEMO_DIR = ROOT / "syncd" / "demo"
MIGRATIONS = ROOT / "deploy" / "supabase" / "migrations"
SECRET = "TOPSECRET-4f1c9a7e-this-must-never-be-printed"
JWT_SECRET = "JWTSECRET-b7d2e85f-0123456789abcdef-never-printed"


def write(directory: Path, text: str, name: str = "syncd.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env=kwargs.pop("env", {}), **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


# ---- Layers ---------------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    config = load_config(env={})
    assert config.source.path == Path("app.sqlite3")
    assert config.target.url == "http://127.0.0.1:54321/rest/v1"
    assert config.target.schema_name == "public"
    assert (config.target.service_key, config.target.jwt_secret, config.target.effective_apikey) == (None, None, None)
    assert config.tables == []
    assert config.table("artifact") is None
    assert load_config(env={}) == Config()


def test_file_only(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [source]
        path = "data/app.sqlite3"
        [target]
        url = "https://example.supabase.co/rest/v1/"
        schema = "api"
        [[table]]
        name = "artifact"
        target = "artifacts"
        key = ["id"]
        exclude = ["scratch"]
        [table.columns.extra_json]
        rename = "extras"
        transform = "json"
        [[table]]
        name = "document"
        [[table]]
        name = "fact"
        after = ["document", "artifact"]
    """)
    config = load_config(path, env={})
    assert config.source.path == tmp_path / "data" / "app.sqlite3"  # relative to the file, not the cwd
    assert config.target.url == "https://example.supabase.co/rest/v1"
    assert config.target.schema_name == "api"
    artifact = config.table("artifact")
    assert artifact is not None
    assert (artifact.target_name, artifact.key, artifact.exclude) == ("artifacts", ["id"], ["scratch"])
    assert artifact.columns == {"extra_json": ColumnConfig(rename="extras", transform="json")}
    document = config.table("document")
    assert document is not None
    assert (document.target_name, document.key, document.columns) == ("document", None, {})
    assert config.tables[2].after == ["document", "artifact"]


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[source]\npath = "file.sqlite3"\n[target]\nurl = "http://file:1/rest/v1"\nschema = "f"\n')
    env = {"SYNCD_DB": "env.sqlite3", "SYNCD_TARGET_URL": "http://env:2/api", "SUPABASE_SCHEMA": "e",
           "SUPABASE_SERVICE_KEY": SECRET, "SUPABASE_JWT_SECRET": JWT_SECRET, "UNRELATED": "x"}
    config = load_config(path, env=env)
    assert config.source.path == Path("env.sqlite3")  # from the environment: relative to the cwd, as given
    assert config.target.url == "http://env:2/api"
    assert config.target.schema_name == "e"
    assert config.target.service_key is not None and config.target.service_key.get_secret_value() == SECRET
    assert config.target.jwt_secret is not None and config.target.jwt_secret.get_secret_value() == JWT_SECRET


def test_flags_beat_environment_and_none_flags_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, '[source]\npath = "file.sqlite3"\n[target]\nschema = "f"\n')
    config = load_config(path, env={"SYNCD_DB": "env.sqlite3", "SUPABASE_SCHEMA": "e"},
                         overrides={"source.path": "flag.sqlite3", "target.schema": None, "target.url": None})
    assert config.source.path == Path("flag.sqlite3")
    assert config.target.schema_name == "e"
    assert config.target.url == "http://127.0.0.1:54321/rest/v1"
    assert load_config(env={}, overrides={"target.schema_name": "by_field_name"}).target.schema_name == "by_field_name"


@pytest.mark.parametrize("supabase_url", ["http://localhost:54321", "http://localhost:54321/",
                                          "http://localhost:54321/rest/v1", "http://localhost:54321/rest/v1/"])
def test_supabase_url_gets_rest_path_once(supabase_url: str) -> None:
    assert load_config(env={"SUPABASE_URL": supabase_url}).target.url == "http://localhost:54321/rest/v1"


def test_syncd_target_url_is_used_as_is_and_wins_over_supabase_url() -> None:
    assert load_config(env={"SYNCD_TARGET_URL": "http://pgrst:3000"}).target.url == "http://pgrst:3000"
    env = {"SUPABASE_URL": "http://supabase:8000", "SYNCD_TARGET_URL": "http://pgrst:3000/"}
    assert load_config(env=env).target.url == "http://pgrst:3000"


def test_syncd_config_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    from_env = write(tmp_path, '[target]\nschema = "from_env"\n', "env.toml")
    explicit = write(tmp_path, '[target]\nschema = "explicit"\n', "explicit.toml")
    assert load_config(env={"SYNCD_CONFIG": str(from_env)}).target.schema_name == "from_env"
    assert load_config(explicit, env={"SYNCD_CONFIG": str(from_env)}).target.schema_name == "explicit"


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in EnvironmentSettings.variable_names():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_none_reads_os_environ_and_a_mapping_replaces_it(clean_environ: pytest.MonkeyPatch) -> None:
    monkeypatch = clean_environ
    monkeypatch.setenv("SUPABASE_SCHEMA", "from_os")
    monkeypatch.setenv("supabase_url", "http://lowercase-is-not-read:1")
    assert load_config().target.schema_name == "from_os"
    assert load_config().target.url == "http://127.0.0.1:54321/rest/v1"
    assert load_config(env={}).target.schema_name == "public"


def test_empty_environment_values_count_as_unset(clean_environ: pytest.MonkeyPatch) -> None:
    assert load_config(env={"SUPABASE_SCHEMA": "", "SUPABASE_URL": ""}) == Config()
    clean_environ.setenv("SUPABASE_SCHEMA", "")
    assert load_config().target.schema_name == "public"


def test_models_accept_field_names_and_aliases() -> None:
    assert TargetConfig(schema="a").schema_name == TargetConfig(schema_name="a").schema_name == "a"
    config = Config(tables=[TableConfig(name="t")], source=SourceConfig(path=Path("x.sqlite3")))
    assert config.table("t") == TableConfig(name="t")
    assert Config.model_validate({"table": [{"name": "t"}]}) == Config.model_validate({"tables": [{"name": "t"}]})


def test_effective_apikey_defaults_to_the_service_key() -> None:
    target = load_config(env={"SUPABASE_SERVICE_KEY": SECRET}).target
    assert target.effective_apikey == target.service_key
    target = load_config(env={"SUPABASE_SERVICE_KEY": SECRET}, overrides={"target.apikey": "anon"}).target
    assert target.effective_apikey is not None and target.effective_apikey.get_secret_value() == "anon"


# ---- Secrets in files -----------------------------------------------------------------------------


def test_secret_files_are_read_and_stripped(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "key").write_text(f"  {SECRET}\n")
    jwt_file = tmp_path / "jwt"
    jwt_file.write_text(f"{JWT_SECRET}\r\n")
    path = write(tmp_path, '[target]\nservice_key_file = "secrets/key"\n')
    target = load_config(path, env={"SUPABASE_JWT_SECRET_FILE": str(jwt_file)}).target
    assert target.service_key is not None and target.service_key.get_secret_value() == SECRET
    assert target.jwt_secret is not None and target.jwt_secret.get_secret_value() == JWT_SECRET
    assert target.service_key_file == tmp_path / "secrets" / "key"  # relative to the config file


def test_missing_secret_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[target]\njwt_secret_file = "nowhere/jwt"\n',
                         env={"SUPABASE_SERVICE_KEY_FILE": "/no/such/key"})
    assert message.startswith(f"invalid configuration in {tmp_path / 'syncd.toml'} (2 problems):\n")
    assert f"target.jwt_secret_file: cannot read {str(tmp_path / 'nowhere' / 'jwt')!r}" in message
    assert "target.service_key_file (set by SUPABASE_SERVICE_KEY_FILE): cannot read '/no/such/key'" in message


def test_empty_or_short_secret_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "short").write_text("short-jwt-secret\n")
    message = load_error(tmp_path, '[target]\nservice_key_file = "empty"\njwt_secret_file = "short"\n')
    assert "target.service_key_file: " in message and "is empty; put the service_key in it" in message
    assert "target.jwt_secret_file: the JWT secret in" in message and "at least 32 characters" in message
    assert "short-jwt-secret" not in message


def test_a_secret_and_its_file_together_are_an_error(tmp_path: Path) -> None:
    message = load_error(tmp_path, f'[target]\nservice_key = "{SECRET}"\nservice_key_file = "/run/k"\n')
    assert "target.service_key_file: '/run/k' is set and so is service_key; use only one" in message
    assert SECRET not in message


def test_a_higher_layer_replaces_the_other_form_of_a_secret(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET)
    path = write(tmp_path, '[target]\nservice_key = "from-file"\n')
    target = load_config(path, env={"SUPABASE_SERVICE_KEY_FILE": str(key_file)}).target
    assert target.service_key is not None and target.service_key.get_secret_value() == SECRET


# ---- Messages for bad input -----------------------------------------------------------------------

ARTIFACT = '[[table]]\nname = "artifact"\n'


@pytest.mark.parametrize(("text", "expected"), [
    (ARTIFACT + '[table.columns.extra_json]\ntransform = "jsn"\n',
     "table[0] (artifact).columns.extra_json.transform: 'jsn' is not valid; "
     "use one of json, bool, timestamp, bytea, vector"),
    (ARTIFACT + 'colums = {}\n', "table[0] (artifact).colums: unknown key 'colums' (did you mean 'columns'?)"),
    ('[target]\nservce_key = "x"\n', "target.servce_key: unknown key 'servce_key' (did you mean 'service_key'?)"),
    ('[sauce]\npath = "x"\n', "sauce: unknown key 'sauce' (did you mean 'source'?)"),
    ('[foo]\n', "foo: unknown key 'foo'; valid keys here: source, target, worker, table"),
    (ARTIFACT + '[table.columns.x]\nrenam = "y"\n',
     "table[0] (artifact).columns.x.renam: unknown key 'renam' (did you mean 'rename'?)"),
    (ARTIFACT + 'key = []\n', "table[0] (artifact).key: [] is not valid; list at least one column"),
    (ARTIFACT + 'key = ["id", "id"]\n', "table[0] (artifact).key: ['id', 'id'] is not valid; 'id' listed more"),
    (ARTIFACT + 'key = "id"\n', "table[0] (artifact).key: 'id' is not valid; expected a valid list"),
    (ARTIFACT + 'key = ["id"]\nexclude = ["scratch", "id"]\n',
     "table[0] (artifact).exclude[1]: 'id' is a key column; a key is always shipped, remove it from exclude"),
    (ARTIFACT + 'exclude = ["x"]\n[table.columns.x]\ntransform = "json"\n',
     "table[0] (artifact).columns.x: 'x' is also in exclude and is never shipped"),
    (ARTIFACT + '[table.columns.a]\nrename = "c"\n[table.columns.b]\nrename = "c"\n',
     "table[0] (artifact).columns.b.rename: 'c' is already the target name of column 'a'; choose another name"),
    (ARTIFACT + 'key = ["id"]\n[table.columns.uuid]\nrename = "id"\n',
     "table[0] (artifact).columns.uuid.rename: 'id' is already the target name of column 'id'"),
    (ARTIFACT + '[table.columns.a]\ntransform = "json"\n[table.columns.b]\nrename = "a"\n',
     "table[0] (artifact).columns.b.rename: 'a' is already the target name of column 'a'"),
    (ARTIFACT + ARTIFACT, "table[1] (artifact).name: 'artifact' is already configured by table[0]"),
    (ARTIFACT + 'target = "t"\n[[table]]\nname = "other"\ntarget = "t"\n',
     "table[1] (other).target: 't' is already the target of table[0] (artifact)"),
    (ARTIFACT + 'after = ["documnt"]\n[[table]]\nname = "document"\n',
     "table[0] (artifact).after[0]: 'documnt' is not a configured table; did you mean 'document'?"),
    (ARTIFACT + 'after = ["zzz"]\n', "table[0] (artifact).after[0]: 'zzz' is not a configured table; "
                                      "use one of artifact"),
    (ARTIFACT + 'after = ["artifact"]\n', "table[0] (artifact).after[0]: 'artifact' is this table itself"),
    (ARTIFACT + 'after = ["b"]\n[[table]]\nname = "b"\nafter = ["artifact"]\n',
     "table[0] (artifact).after: artifact -> b -> artifact wait for each other"),
    ('[[table]]\nname = "_syncd_outbox"\n',
     "table[0] (_syncd_outbox).name: '_syncd_outbox' is not valid; names starting with _syncd_"),
    ('[[table]]\nname = ""\n', "table[0].name: '' is not valid; give the SQLite table's name"),
    ('[[table]]\ntarget = "x"\n', "table[0].name: missing; this key is required"),
    ('[target]\nurl = "ftp://example.com/rest/v1"\n', "target.url: 'ftp://example.com/rest/v1' is not valid; "
                                                      "use an http:// or https:// URL with a host"),
    ('[target]\nurl = "http://"\n', "target.url: 'http://' is not valid; use an http:// or https://"),
    ('[target]\nurl = "localhost:54321"\n', "target.url: 'localhost:54321' is not valid; use an http://"),
    ('[target]\nschema = ""\n', "target.schema: '' is not valid; give the exposed schema's name"),
    ('[target]\njwt_secret = "too-short"\n', "target.jwt_secret: *** is not valid; too short: PostgREST demands "
                                             "at least 32 characters"),
    ('[target]\napikey = ""\n', "target.apikey: *** is not valid; it is empty"),
    ('[source]\npath = 3\n', "source.path: 3 is not valid; expected a path (a string)"),
    ('table = "artifact"\n', "table: 'artifact' is not valid; expected a valid list"),
])
def test_bad_input_names_key_value_and_fix(tmp_path: Path, text: str, expected: str) -> None:
    message = load_error(tmp_path, text)
    assert expected in message
    assert message.startswith(f"invalid configuration in {tmp_path / 'syncd.toml'} (1 problem):\n")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, """
            [target]
            url = "ftp://x"
            [[table]]
            name = "a"
            key = []
            [table.columns.c]
            transform = "jsn"
            [[table]]
            name = "b"
            after = ["nope"]
        """), env={"SUPABASE_JWT_SECRET": "short"}, overrides={"source.pth": "x"})
    error = caught.value
    assert len(error.problems) == 6
    assert str(error).splitlines()[1:] == [f"  {problem}" for problem in error.problems]
    assert str(error).splitlines()[0].endswith("(6 problems):")
    assert "source.pth (set on the command line): unknown key 'pth' (did you mean 'path'?)" in error.problems
    assert "target.jwt_secret (set by SUPABASE_JWT_SECRET): *** is not valid; too short: PostgREST demands at " \
           "least 32 characters" in error.problems


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=re.escape("target.url (set by SUPABASE_URL): 'ftp://x/rest/v1' is not")):
        load_config(env={"SUPABASE_URL": "ftp://x"})


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[source]\npath = "a.sqlite3"\n\n[target\nurl = "x"\n')
    assert message.startswith(f"{tmp_path / 'syncd.toml'}:4: invalid TOML at line 4, column ")


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {tmp_path / 'nope.toml'}")):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match=re.escape("config file not found: /no/such.toml")):
        load_config(env={"SYNCD_CONFIG": "/no/such.toml"})


# ---- Secrets never printed ------------------------------------------------------------------------


def test_secrets_absent_from_repr_str_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, f'[target]\nservice_key = "{SECRET}"\njwt_secret = "{JWT_SECRET}"\napikey = "{SECRET}"\n')
    config = load_config(path, env={})
    assert config.target.service_key is not None and config.target.service_key.get_secret_value() == SECRET
    for text in (repr(config), str(config), config.model_dump_json(), repr(config.target), str(config.target)):
        assert SECRET not in text and JWT_SECRET not in text


def test_secrets_absent_from_errors_and_their_tracebacks(tmp_path: Path) -> None:
    short = "SHORTJWT-9a8b7c6d"
    path = write(tmp_path, f"""
        [target]
        service_key = "{SECRET}"
        service_key_file = "/run/key"
        jwt_secret = "{short}"
        servce_key = "{SECRET}"
        apikey = 12345678987654321
        [[table]]
        name = "t"
        [table.columns.c]
        transform = "{SECRET}"
    """)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, overrides={"target.apikey": None})
    text = "".join(traceback.format_exception(caught.value))
    assert "target.jwt_secret: *** is not valid" in text
    assert "target.apikey: *** is not valid" in text
    assert "unknown key 'servce_key'" in text
    assert short not in text and "12345678987654321" not in text
    # Not a secret key, yet the value is the service key pasted there: redacted all the same.
    assert SECRET not in text and "transform: '<redacted>' is not valid" in text


# ---- The shipped files ----------------------------------------------------------------------------


def test_example_toml_names_every_worker_key() -> None:
    """example.toml is the reference of the file's keys: every [worker] key is there with its default."""
    text = (CONFIG_DIR / "example.toml").read_text(encoding="utf-8")
    for name, field in WorkerConfig.model_fields.items():
        default = f'"{field.default}"' if isinstance(field.default, str) else repr(field.default)
        assert f"# {name} = {default}" in text, name


def test_example_toml_loads_as_is() -> None:
    config = load_config(CONFIG_DIR / "example.toml", env={})
    assert config.source.path == CONFIG_DIR / "app.sqlite3"
    assert config.target == TargetConfig()
    assert [table.name for table in config.tables] == ["artifact", "document"]
    assert config.tables[0].columns["extra_json"] == ColumnConfig(rename="extras", transform="json")


def test_demo_toml_loads() -> None:
    config = load_config(DEMO_DIR / "mapping.toml", env={})
    assert config.source.path == DEMO_DIR / "demo.sqlite3"
    assert config.target.url == "http://127.0.0.1:54321/rest/v1"
    artifact = config.table("artifact")
    assert artifact is not None and artifact.target_name == "artifacts"
    assert artifact.columns["extra_json"] == ColumnConfig(rename="extras", transform="json")


def sqlite_columns() -> dict[str, list[str]]:
    db = sqlite3.connect(":memory:")
    db.executescript((DEMO_DIR / "schema.sql").read_text())
    tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {table: [row[1] for row in db.execute(f"PRAGMA table_info({table})")] for table in tables}


def test_demo_toml_matches_the_demo_sqlite_schema() -> None:
    config = load_config(DEMO_DIR / "mapping.toml", env={})
    schema = sqlite_columns()
    assert sorted(table.name for table in config.tables) == sorted(schema)
    for table in config.tables:
        named = [*(table.key or []), *table.exclude, *table.columns]
        assert set(named) <= set(schema[table.name]), table.name


def postgres_columns() -> dict[str, dict[str, str]]:
    """{table: {column: first word of its type}} from the migrations' CREATE TABLE statements."""
    text = "\n".join(path.read_text() for path in sorted(MIGRATIONS.glob("*.sql")))
    tables: dict[str, dict[str, str]] = {}
    for name, body in re.findall(r"CREATE TABLE IF NOT EXISTS public\.(\w+) \((.*?)\n\);", text, re.DOTALL):
        lines = (line.split("--")[0].split() for line in body.splitlines())
        tables[name] = {words[0]: re.sub(r"\W.*", "", words[1]) for words in lines if len(words) >= 2}
    return tables


TYPE_OF_TRANSFORM = {"json": "jsonb", "bool": "boolean", "timestamp": "timestamptz", "bytea": "bytea",
                     "vector": "vector"}


def test_demo_toml_matches_the_migrations() -> None:
    """Every target column gets the transform its PostgreSQL type needs, and no other column does."""
    config = load_config(DEMO_DIR / "mapping.toml", env={})
    schema = sqlite_columns()
    targets = postgres_columns()
    for table in config.tables:
        pg = targets[table.target_name]
        shipped = {}
        for column in schema[table.name]:
            spec = table.columns.get(column, ColumnConfig())
            shipped[spec.rename or column] = TYPE_OF_TRANSFORM.get(spec.transform or "", "")
        assert set(shipped) == set(pg), table.name
        expected = {column: kind if kind in TYPE_OF_TRANSFORM.values() else "" for column, kind in pg.items()}
        assert shipped == expected, table.name


def test_a_command_without_config_finds_the_one_init_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, point 1: --config > SYNCD_CONFIG > ./syncd.toml > /etc/syncd/syncd.toml, as README documents, so
    `syncd install` works as typed in the directory `syncd init` wrote to."""
    from syncd.config import default_config_file

    monkeypatch.chdir(tmp_path)
    assert default_config_file({}) in (None, Path("/etc/syncd/syncd.toml"))
    (tmp_path / "syncd.toml").write_text("")
    assert default_config_file({}) == Path("syncd.toml")
    assert default_config_file({"SYNCD_CONFIG": "/elsewhere.toml"}) == Path("/elsewhere.toml")
    db = tmp_path / "app.sqlite3"
    sqlite3.connect(db).execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    (tmp_path / "syncd.toml").write_text(f'[source]\npath = "{db}"\n\n[[table]]\nname = "t"\n')
    done = subprocess.run([sys.executable, "-m", "syncd", "install"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"})
    assert done.returncode == 0 and "installed in" in done.stdout, done.stderr
