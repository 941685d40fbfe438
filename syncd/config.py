"""syncd's configuration: what to read, where to ship it, and how each table maps.

One `Config` comes from up to four layers, highest first: command-line flags (`overrides`), the
environment (the variable names Supabase users already know), a TOML file, and the defaults.
`load_config` merges them, validates the result with the pydantic models below and reads secrets that
live in files. Every problem found is reported at once in one `ConfigError`, one line per problem,
each naming the key (`table[0] (artifact).columns.extra_json.transform`), the bad value and a fix.
Secret values (service key, JWT secret, apikey) never appear in a repr, a dump or an error message.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from syncd.auth import MIN_SECRET_LENGTH, KeyInfo, key_info
from syncd.redact import redact, register

__all__ = [
    "TRANSFORMS",
    "ColumnConfig",
    "Config",
    "ConfigError",
    "EnvironmentSettings",
    "SourceConfig",
    "TableConfig",
    "TargetConfig",
    "Transform",
    "WorkerConfig",
    "differences",
    "load_config",
]

Transform = Literal["json", "bool", "timestamp", "bytea", "vector"]
TRANSFORMS: tuple[str, ...] = get_args(Transform)
DEFAULT_URL = "http://127.0.0.1:54321/rest/v1"
REST_PATH = "/rest/v1"
RESERVED_PREFIXES = ("_syncd_", "sqlite_")
SECRET_KEYS = frozenset({"service_key", "jwt_secret", "apikey"})
# (secret, file holding it): a layer that sets one of a pair overrides the other from lower layers.
SECRET_FILE_PAIRS = (("service_key", "service_key_file"), ("jwt_secret", "jwt_secret_file"))
MASK = "***"

# A list of problems found by one model validator: (location below the model, message).
Problem = tuple[tuple[str | int, ...], str]
_PROBLEMS = "syncd_problems"
# (index in the table list, name, target name, after): what the checks across tables need.
TableEntry = tuple[int, str, str, Sequence[str]]


class ConfigError(Exception):
    """The configuration cannot be used. `str()` is the whole message; `problems` holds one line each."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__("\n".join([message, *(f"  {problem}" for problem in self.problems)]))


def _raise_problems(problems: list[Problem]) -> None:
    """Report several problems of one model at once, each at its own key (see `_describe`)."""
    if problems:
        summary = "; ".join(message for _, message in problems)
        raise PydanticCustomError(_PROBLEMS, "{summary}", {"summary": summary, "problems": problems})


class ColumnConfig(BaseModel):
    """How one SQLite column is shipped: under another name, through a transform, or both."""

    model_config = ConfigDict(extra="forbid")

    rename: str | None = None
    transform: Transform | None = None

    @field_validator("rename")
    @classmethod
    def _rename_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("give the target column's name, or leave rename out")
        return value


class TableConfig(BaseModel):
    """The mapping of one SQLite table onto its target table."""

    model_config = ConfigDict(extra="forbid")

    name: str
    target: str | None = None
    key: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    columns: dict[str, ColumnConfig] = Field(default_factory=dict)
    after: list[str] = Field(default_factory=list)

    @property
    def target_name(self) -> str:
        """The target table's name: `target`, or the SQLite name when it is not set."""
        return self.target or self.name

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not value:
            raise ValueError("give the SQLite table's name")
        if value.startswith(RESERVED_PREFIXES):
            raise ValueError("names starting with _syncd_ (syncd's own) or sqlite_ (SQLite's) cannot be synced")
        return value

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is not None and not value:
            raise ValueError("give the target table's name, or leave target out to use the SQLite name")
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError('list at least one column, e.g. key = ["id"], or leave key out for the primary key')
        duplicates = sorted({column for column in value if value.count(column) > 1})
        if duplicates:
            raise ValueError(f"{', '.join(map(repr, duplicates))} listed more than once; list each column once")
        return value

    @model_validator(mode="after")
    def _check_columns(self) -> TableConfig:
        _raise_problems([*self._excluded_key_problems(), *self._excluded_configured_problems(),
                         *self._rename_problems(), *self._self_after_problems()])
        return self

    def _excluded_key_problems(self) -> list[Problem]:
        return [(("exclude", i), f"{column!r} is a key column; a key is always shipped, remove it from exclude")
                for i, column in enumerate(self.exclude) if column in (self.key or [])]

    def _excluded_configured_problems(self) -> list[Problem]:
        return [(("columns", column), f"{column!r} is also in exclude and is never shipped; remove it from exclude "
                                      f"or remove [table.columns.{column}]")
                for column in self.columns if column in self.exclude]

    def _rename_problems(self) -> list[Problem]:
        # Columns that keep their name claim it first, so the message lands on the rename that collides.
        shipped = {column: column for column in self.key or [] if column not in self.columns}
        shipped |= {column: column for column, spec in self.columns.items() if spec.rename is None}
        problems: list[Problem] = []
        for column, spec in self.columns.items():
            if spec.rename is None or column in self.exclude:
                continue
            owner = shipped.setdefault(spec.rename, column)
            if owner != column:
                problems.append((("columns", column, "rename"),
                                 f"{spec.rename!r} is already the target name of column {owner!r}; "
                                 "choose another name"))
        return problems

    def _self_after_problems(self) -> list[Problem]:
        return [(("after", i), f"{table!r} is this table itself; list only other tables")
                for i, table in enumerate(self.after) if table == self.name]


class SourceConfig(BaseModel):
    """The application's SQLite file (`path`), or in multi-file mode every file matching `glob` (one per tenant,
    each with the same schema; see `syncd.tenants`)."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Path("app.sqlite3")
    glob: str | None = Field(None, description="serve every file matching this pattern (relative to the config, "
                                               "like path, which it excludes), e.g. tenants/*.sqlite3")
    tenant: str = Field("{stem}", description="a file's tenant id from its name: {stem}, {name}, {parent}, or a "
                                              "pattern of the file name with named parts, e.g. tenant-{id}.db")
    tenant_column: str = Field("tenant_id", description="the target tables' column holding the tenant id (part of "
                                                        "their key)")
    auto_install: bool = Field(False, description="install capture in a matching file that appears while the "
                                                  "daemon runs (it changes the app's file)")
    shard: str | None = Field(None, description="i/N: serve only the files whose name hashes to shard i of N")

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: Path) -> Path:
        if value == Path("."):
            raise ValueError("give the path of the application's SQLite file")
        return value

    @field_validator("glob")
    @classmethod
    def _check_glob(cls, value: str | None) -> str | None:
        if value is not None and not any(c in value for c in "*?["):
            raise PydanticCustomError("glob", "give a pattern with *, ? or [...] (e.g. tenants/*.sqlite3); for one "
                                              "file set source.path instead")
        return value

    @field_validator("tenant_column")
    @classmethod
    def _check_tenant_column(cls, value: str) -> str:
        if not value or value.startswith(RESERVED_PREFIXES):
            raise PydanticCustomError("tenant_column", "give the name of the target tables' tenant column, e.g. "
                                                       "tenant_id")
        return value

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, value: str) -> str:
        from syncd.tenants import TenantPattern  # tenants reads this module's types

        TenantPattern.parse(value)  # raises ValueError with the fix
        return value

    @field_validator("shard")
    @classmethod
    def _check_shard(cls, value: str | None) -> str | None:
        if value is not None:
            match = re.fullmatch(r"(\d+)/(\d+)", value.strip())
            if match is None or not 0 <= int(match[1]) < int(match[2]):
                raise PydanticCustomError("shard", "write i/N with 0 <= i < N, e.g. 0/4 for the first of 4 processes")
        return value

    @property
    def shard_of(self) -> tuple[int, int]:
        """(i, N) of `shard`; (0, 1) when unset."""
        if self.shard is None:
            return 0, 1
        index, count = self.shard.strip().split("/")
        return int(index), int(count)

    @model_validator(mode="after")
    def _check_one_source(self) -> SourceConfig:
        if self.glob is not None and "path" in self.model_fields_set:
            raise PydanticCustomError("source", "set source.path (one file) or source.glob (many files), not both")
        return self


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1."""
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TargetConfig(BaseModel):
    """The PostgREST / Supabase endpoint and the credentials syncd uses there."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    url: str = DEFAULT_URL
    schema_name: str = Field("public", alias="schema")
    service_key: SecretStr | None = None
    jwt_secret: SecretStr | None = None
    apikey: SecretStr | None = None
    # After load_config these keep the path the secret was read from (e.g. to re-read a rotated one).
    service_key_file: Path | None = None
    jwt_secret_file: Path | None = None

    @property
    def key(self) -> KeyInfo:
        """The kind of key syncd sends and the role it acts as (auth.key_info; never the key itself)."""
        return key_info(self.service_key.get_secret_value() if self.service_key else None,
                        minted=self.jwt_secret is not None)

    @property
    def effective_apikey(self) -> SecretStr | None:
        """The `apikey` header's value: apikey when set, else the service key."""
        return self.apikey or self.service_key

    @property
    def in_clear(self) -> str | None:
        """The warning when the key would travel unencrypted (`http://` to a host other than loopback), else
        None."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or is_loopback(parts.hostname or ""):
            return None
        return (f"target.url is http:// to {parts.hostname}, not a loopback address: the service key (or the "
                "tokens syncd mints) and every row travel unencrypted; use https:// (or a tunnel) beyond this host")

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        url = value.strip().rstrip("/")  # a newline or space from how a variable was set is not part of the URL
        if any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError(f"it holds a space or a control character; use http:// or https:// with a host, "
                             f"e.g. {DEFAULT_URL!r}")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError:
            raise ValueError(f"that is not a URL; use http:// or https:// with a host, e.g. {DEFAULT_URL!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"use an http:// or https:// URL with a host, e.g. {DEFAULT_URL!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("remove the user and password (user:...@): syncd authenticates with the service key or "
                             "the JWT secret, and a password in the URL would be sent instead of them")
        if parts.query or parts.fragment:
            raise ValueError("leave out the query and fragment; syncd appends the table paths itself")
        return url

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not value:
            raise ValueError("give the exposed schema's name, e.g. 'public'")
        if not value.isprintable() or not value.isascii():
            raise ValueError("give the schema's name alone (it travels in the Accept-Profile header: printable ASCII, "
                             "no newline)")
        return value

    @field_validator("service_key", "jwt_secret", "apikey")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("it is empty; set a value or leave the key out")
        if value is not None and any(ord(c) < 32 or c == "\x7f" for c in value.get_secret_value()):
            raise ValueError("it holds a line break or another control character; a key is one line (check how the "
                             "variable or file was written)")
        return value

    @field_validator("service_key", "apikey")
    @classmethod
    def _check_header_value(cls, value: SecretStr | None) -> SecretStr | None:
        text = value.get_secret_value() if value is not None else ""
        if not all(33 <= ord(c) < 127 for c in text):  # it travels in an HTTP header (RFC 9110: visible ASCII)
            raise ValueError("it holds a space or a character that is not ASCII; a key is one word of ASCII (a JWT, "
                             "eyJ..., or sb_secret_...): copy it again from the dashboard")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _check_jwt_secret(cls, value: SecretStr | None) -> SecretStr | None:
        problem = _jwt_secret_problem(value.get_secret_value()) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _check_secret_sources(self) -> TargetConfig:
        _raise_problems([((file_key,), f"{str(getattr(self, file_key))!r} is set and so is {secret}; use only one")
                         for secret, file_key in SECRET_FILE_PAIRS
                         if getattr(self, secret) is not None and getattr(self, file_key) is not None])
        return self


def _jwt_secret_problem(secret: str) -> str | None:
    if len(secret) < MIN_SECRET_LENGTH:
        return f"too short: PostgREST demands at least {MIN_SECRET_LENGTH} characters"
    return None


class WorkerConfig(BaseModel):
    """`[worker]`: how `syncd run` drains (every key has a command-line flag of the same name)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(500, ge=1, le=100_000, description="outbox entries claimed per batch")
    poll_interval: float = Field(1.0, gt=0, le=3600, description="seconds between checks when nothing wakes us")
    shutdown_timeout: float = Field(10.0, ge=0, le=3600, description="seconds to finish the request in flight")
    request_timeout: float = Field(30.0, gt=0, le=3600, description="seconds to wait for the secondary's answer")
    max_backoff: float = Field(30.0, gt=0, le=3600, description="cap of the exponential backoff, in seconds")
    fk_retries: int = Field(5, ge=0, le=1000, description="tries of a row refused by a foreign key before it "
                                                            "is dead-lettered (its parent may still be queued)")
    journal_retention_days: float = Field(7.0, ge=0, le=3650, description="how long shipped keys are kept")
    lease_seconds: float = Field(30.0, ge=2, le=3600, description="lease lifetime; a dead holder's expires")
    max_in_flight: int = Field(8, ge=1, le=64, description="batches on their way to the secondary at once (their "
                                                           "keys never overlap; parents still land first)")
    batch_bytes: int = Field(4 * 2**20, ge=1024, le=2**30, description="most bytes of JSON in one request; a "
                                                                       "batch is split to stay under it")
    metrics_addr: str = Field("127.0.0.1:9464", description="host:port of /metrics, /healthz, /readyz")
    on_source_replaced: Literal["reconcile", "halt"] = Field(
        "reconcile", description="when the database file is replaced (a restore): reconcile every table with the "
                                 "secondary, or halt every table until SIGHUP")
    consistency: Literal["key", "snapshot"] = Field(
        "key", description="what a reader of the secondary may see: key (each row converges; a transaction's rows "
                           "land in several requests) or snapshot (every state is one the file had; one "
                           "transaction per snapshot through POST /rpc/syncd_apply)")
    schema_recheck_interval: float = Field(10.0, gt=0, le=3600, description="seconds between reads of the "
                                           "secondary's schema while a table is halted for a schema mismatch")
    drain_threads: int = Field(4, ge=1, le=64, description="in multi-file mode (source.glob): files drained at once; "
                                                           "the rest wait their turn")
    nice: int = Field(0, ge=0, le=19, description="CPU priority of syncd run, as a Unix nice value (0-19): above 0 "
                                                  "the app gets a busy core first, but on a loaded machine an app's "
                                                  "DEFERRED read-then-write transactions may fail; 0 leaves it")

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_true_as_a_number(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would take true as 1 for an int or float setting
            raise PydanticCustomError("number", "true and false are not numbers; give a number")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _check_addr(cls, value: str) -> str:
        if "://" in value:
            raise PydanticCustomError("addr", "give host:port without a scheme, e.g. 127.0.0.1:9464")
        host, _, port = value.rpartition(":")
        if not (port.isascii() and port.isdigit()):  # str.isdigit takes '٣' (3) too
            raise PydanticCustomError("addr", "use host:port with a port from 0 to 65535, e.g. 127.0.0.1:9464 or "
                                              "[::1]:9464")
        if host.startswith("[") != host.endswith("]") or ("[" in host.strip("[]") or "]" in host.strip("[]")):
            raise PydanticCustomError("addr", "write an IPv6 address in brackets: [::1]:9464")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise PydanticCustomError("addr", "use host:port with a port from 0 to 65535, e.g. 127.0.0.1:9464 or "
                                              "[::1]:9464")
        if ":" in host and not host.startswith("["):
            raise PydanticCustomError("addr", "write an IPv6 address in brackets: [::1]:9464")
        return value


class Config(BaseModel):
    """The whole configuration: `[source]`, `[target]`, `[worker]` and one `[[table]]` per synced table."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: SourceConfig = Field(default_factory=SourceConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    tables: list[TableConfig] = Field(default_factory=list, alias="table")

    _tenant: str | None = PrivateAttr(None)

    def table(self, name: str) -> TableConfig | None:
        """The mapping of SQLite table `name`, or None when it is not configured."""
        return next((table for table in self.tables if table.name == name), None)

    @property
    def tenant(self) -> str | None:
        """The tenant id of the one file this configuration is for (`for_file`); None in single-file mode."""
        return self._tenant

    def for_file(self, path: Path, tenant: str) -> Config:
        """This multi-file configuration narrowed to one of its files: `source.path` is the file, and every
        request to the secondary is scoped to `tenant` (`open_target`)."""
        narrowed = self.model_copy(update={"source": self.source.model_copy(update={"path": path})})
        narrowed._tenant = tenant
        return narrowed

    @model_validator(mode="after")
    def _check_tables(self) -> Config:
        _raise_problems(_table_set_problems([(i, t.name, t.target_name, t.after) for i, t in enumerate(self.tables)]))
        problems: list[Problem] = []
        if self.source.glob is not None and self.worker.consistency == "snapshot":
            problems.append((("worker", "consistency"), "snapshot mode serves one file; with source.glob use "
                                                         "consistency = \"key\""))
        for index, table in enumerate(self.tables):
            if self.source.glob is not None and self.source.tenant_column in {
                    spec.rename or column for column, spec in table.columns.items()} | set(table.key or ()):
                problems.append((("table", index), f"the column {self.source.tenant_column!r} is source.tenant_column "
                                                   "(syncd fills it with the file's tenant id); rename the source's "
                                                   "column, or choose another source.tenant_column"))
        _raise_problems(problems)
        return self


def _table_set_problems(entries: Sequence[TableEntry]) -> list[Problem]:
    """Problems that only show across [[table]] entries: duplicates, unknown or cyclic `after`."""
    return [*_duplicate_problems(entries), *_after_problems(entries), *_cycle_problems(entries)]


def _duplicate_problems(entries: Sequence[TableEntry]) -> list[Problem]:
    problems: list[Problem] = []
    names: dict[str, TableEntry] = {}
    targets: dict[str, TableEntry] = {}
    for entry in entries:
        index, name, target, _ = entry
        if (first := names.setdefault(name, entry)) is not entry:
            problems.append((("table", index, "name"), f"{name!r} is already configured by table[{first[0]}]; "
                                                       "merge the two [[table]] entries"))
        elif (first := targets.setdefault(target, entry)) is not entry:
            # Two sources in one target table could never converge: each would delete the other's rows.
            problems.append((("table", index, "target"), f"{target!r} is already the target of table[{first[0]}] "
                                                         f"({first[1]}); give each table its own target"))
    return problems


def _after_problems(entries: Sequence[TableEntry]) -> list[Problem]:
    names = list(dict.fromkeys(name for _, name, _, _ in entries))
    return [(("table", index, "after", j), f"{other!r} is not a configured table; {_one_of(other, names)}")
            for index, _, _, after in entries for j, other in enumerate(after) if other not in names]


def _cycle_problems(entries: Sequence[TableEntry]) -> list[Problem]:
    cycle = _find_cycle({name: [other for other in after if other != name] for _, name, _, after in entries})
    if cycle is None:
        return []
    index = next(index for index, name, _, _ in entries if name == cycle[0])
    return [(("table", index, "after"), f"{' -> '.join(cycle)} wait for each other (each is listed in the next "
                                        "one's after); remove one of these after entries")]


def _raw_table_entries(data: Mapping[str, Any]) -> list[TableEntry]:
    """The entries of the tables in unvalidated input, as far as their name, target and after are usable."""
    tables = data.get("table", data.get("tables"))
    entries: list[TableEntry] = []
    for index, table in enumerate(tables if isinstance(tables, list) else []):
        name = table.get("name") if isinstance(table, dict) else None
        if isinstance(name, str) and name:
            target = table.get("target") if isinstance(table.get("target"), str) else None
            after = table.get("after") if isinstance(table.get("after"), list) else []
            entries.append((index, name, target or name, [other for other in after if isinstance(other, str)]))
    return entries


def _one_of(value: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(value, valid, n=1)
    options = f"use one of {', '.join(valid)}" if valid else "configure that table first"
    return f"did you mean {match[0]!r}?" if match else options


def _find_cycle(edges: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in the directed graph `edges` as [a, b, ..., a], or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for successor in edges.get(node, ()):
            if found := visit(successor, [*path, node]):
                return found
        done.add(node)
        return None

    return next((cycle for start in edges if (cycle := visit(start, []))), None)


# ---- The environment layer -------------------------------------------------------------------------


class EnvironmentSettings(BaseSettings):
    """The environment variables syncd reads (exact names, no prefix, no .env files)."""

    model_config = SettingsConfigDict(case_sensitive=True, env_ignore_empty=True, extra="ignore")

    config: str | None = Field(None, validation_alias="SYNCD_CONFIG")
    db: str | None = Field(None, validation_alias="SYNCD_DB")
    supabase_url: str | None = Field(None, validation_alias="SUPABASE_URL")
    target_url: str | None = Field(None, validation_alias="SYNCD_TARGET_URL")
    schema_name: str | None = Field(None, validation_alias="SUPABASE_SCHEMA")
    service_key: SecretStr | None = Field(None, validation_alias="SUPABASE_SERVICE_KEY")
    jwt_secret: SecretStr | None = Field(None, validation_alias="SUPABASE_JWT_SECRET")
    service_key_file: str | None = Field(None, validation_alias="SUPABASE_SERVICE_KEY_FILE")
    jwt_secret_file: str | None = Field(None, validation_alias="SUPABASE_JWT_SECRET_FILE")
    metrics_addr: str | None = Field(None, validation_alias="SYNCD_METRICS_ADDR")

    @classmethod
    def variable_names(cls) -> list[str]:
        """The names of the environment variables syncd reads (SYNCD_CONFIG, SYNCD_DB, SUPABASE_URL, ...)."""
        return [str(field.validation_alias) for field in cls.model_fields.values()]

    def layer(self) -> list[tuple[str, object, str]]:
        """(dotted key, value, origin) for every variable that is set, in order of increasing priority."""
        entries: list[tuple[str, object, str]] = [
            ("source.path", self.db, "SYNCD_DB"),
            ("target.url", _rest_url(self.supabase_url), "SUPABASE_URL"),
            ("target.url", self.target_url, "SYNCD_TARGET_URL"),
            ("target.schema", self.schema_name, "SUPABASE_SCHEMA"),
            ("target.service_key", self.service_key, "SUPABASE_SERVICE_KEY"),
            ("target.jwt_secret", self.jwt_secret, "SUPABASE_JWT_SECRET"),
            ("target.service_key_file", self.service_key_file, "SUPABASE_SERVICE_KEY_FILE"),
            ("target.jwt_secret_file", self.jwt_secret_file, "SUPABASE_JWT_SECRET_FILE"),
            ("worker.metrics_addr", self.metrics_addr, "SYNCD_METRICS_ADDR"),
        ]
        return [(key, value, f"set by {name}") for key, value, name in entries if value is not None]


class _MappingEnvironmentSettings(EnvironmentSettings):
    """The same variables, taken only from the keyword arguments (load_config's `env` mapping)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the keyword arguments: not os.environ, a .env file or a secrets directory (pydantic-settings' other
        sources)."""
        return (init_settings,)


def _read_environment(env: Mapping[str, str] | None) -> EnvironmentSettings:
    if env is None:
        return EnvironmentSettings()
    known = EnvironmentSettings.variable_names()
    # Empty values count as unset, as env_ignore_empty does for os.environ (compose's `KEY=${KEY:-}`).
    values = {name: env[name] for name in known if env.get(name)}
    return _MappingEnvironmentSettings(**values)  # type: ignore[arg-type]  # pydantic's plugin reads **values as BaseSettings' _-options; they are the fields' environment names


def _rest_url(supabase_url: str | None) -> str | None:
    """SUPABASE_URL names the project; PostgREST lives under /rest/v1 there."""
    if supabase_url is None:
        return None
    url = supabase_url.rstrip("/")
    return url if url.endswith(REST_PATH) else url + REST_PATH


# ---- Layers: file, environment, flags -------------------------------------------------------------

# Model field names accepted in dotted overrides, written as the file's key names.
_KEY_ALIASES = {"schema_name": "schema", "tables": "table"}
# Keys holding paths: relative ones in the file are relative to the file's directory.
_PATH_KEYS = (("source", "path"), ("source", "glob"), ("target", "service_key_file"), ("target", "jwt_secret_file"))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (it is not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    _resolve_paths(data, path.absolute().parent)
    return data


def _toml_error(path: Path, exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError has no lineno attribute; the position is only in its message.
    match = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", str(exc))
    if match is None:
        return f"{path}: invalid TOML: {exc}"
    reason, line, column = match.groups()
    return f"{path}:{line}: invalid TOML at line {line}, column {column}: {reason}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for section, key in _PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str):
            table[key] = str(base / Path(table[key]).expanduser())


def _override_layer(overrides: Mapping[str, object]) -> list[tuple[str, object, str]]:
    return [(_canonical_key(key), value, "set on the command line")
            for key, value in overrides.items() if value is not None]


def _canonical_key(dotted: str) -> str:
    return ".".join(_KEY_ALIASES.get(part, part) for part in dotted.split("."))


def _apply_layer(data: dict[str, Any], origins: dict[str, str], layer: list[tuple[str, object, str]]) -> None:
    keys = {key for key, _, _ in layer}
    for secret, file_key in SECRET_FILE_PAIRS:
        secret, file_key = f"target.{secret}", f"target.{file_key}"
        if (secret in keys) != (file_key in keys):
            _pop_dotted(data, file_key if secret in keys else secret)
    for key, value, origin in layer:
        if _set_dotted(data, key, value):
            origins[key] = origin


def _set_dotted(data: dict[str, Any], dotted: str, value: object) -> bool:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return False  # the file's section is not a table: validation reports it there
    node[leaf] = value
    return True


def _pop_dotted(data: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: object = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


# ---- Validation and its messages ------------------------------------------------------------------


def _validate(data: dict[str, Any], origins: Mapping[str, str], path: Path | None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        # `from None`: pydantic's own message shows input values, secrets included.
        errors = exc.errors()
        problems = [line for error in errors for line in _describe(error, data, origins)]
        if not any(error["loc"] == () for error in errors):
            # Config's own checks did not run (a field failed first): run them on what is usable.
            problems += [_line(loc, message, data, origins)
                         for loc, message in _table_set_problems(_raw_table_entries(data))]
        raise ConfigError(_header(path, len(problems)), problems) from None


def _header(path: Path | None, count: int) -> str:
    where = f" in {path}" if path is not None else ""
    return f"invalid configuration{where} ({count} problem{'s' if count != 1 else ''}):"


def _describe(error: Mapping[str, Any], data: Mapping[str, Any], origins: Mapping[str, str]) -> list[str]:
    loc = tuple(error["loc"])
    if error["type"] == _PROBLEMS:
        return [_line((*loc, *below), message, data, origins) for below, message in error["ctx"]["problems"]]
    return [_line(loc, _detail(error, loc), data, origins)]


def _line(loc: tuple[str | int, ...], detail: str, data: Mapping[str, Any], origins: Mapping[str, str]) -> str:
    where = _format_loc(loc, data)
    origin = origins.get(".".join(map(str, loc)))
    if origin:
        where += f" ({origin})"
    return f"{where}: {detail}" if where else detail


def _format_loc(loc: tuple[str | int, ...], data: Mapping[str, Any]) -> str:
    text = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            name = _table_name(data, part) if position == 1 and loc[0] in ("table", "tables") else None
            text += f" ({name})" if name else ""
        else:
            text += f".{part}" if text else part
    return text


def _table_name(data: Mapping[str, Any], index: int) -> str | None:
    tables = data.get("table", data.get("tables"))
    if isinstance(tables, list) and index < len(tables) and isinstance(tables[index], dict):
        name = tables[index].get("name")
        return name if isinstance(name, str) and name else None
    return None


def _detail(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return "missing; this key is required"
    value = MASK if SECRET_KEYS.intersection(map(str, loc)) else redact(repr(error.get("input")))
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"{value} is not valid; use one of {', '.join(options)}"
    if kind == "value_error":
        return f"{value} is not valid; {error['ctx']['error']}"
    if kind == "path_type":
        return f"{value} is not valid; expected a path (a string)"
    message = str(error["msg"])
    message = message.replace("Input should be ", "expected ", 1)
    return f"{value} is not valid; {message[:1].lower()}{message[1:]}"


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    key = str(loc[-1])
    known = _known_keys(loc[:-1])
    match = difflib.get_close_matches(key, known, n=1)
    if match:
        return f"unknown key {key!r} (did you mean {match[0]!r}?)"
    return f"unknown key {key!r}; valid keys here: {', '.join(known)}"


def _known_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The key names accepted at `loc`, found by walking Config's fields."""
    annotation: object = Config
    parts = list(loc)
    while parts:
        model = _as_model(annotation)
        field = _field(model, parts.pop(0)) if model else None
        if field is None:
            return []
        annotation = field.annotation
        while get_origin(annotation) in (list, dict) and parts:
            parts.pop(0)  # a list index or a dict key (a column name)
            annotation = get_args(annotation)[-1]
    model = _as_model(annotation)
    return [field.alias or name for name, field in model.model_fields.items()] if model else []


def _as_model(annotation: object) -> type[BaseModel] | None:
    if get_origin(annotation) in (Union, UnionType):
        return next(filter(None, map(_as_model, get_args(annotation))), None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _field(model: type[BaseModel], key: str | int) -> FieldInfo | None:
    return next((field for name, field in model.model_fields.items() if key in (name, field.alias)), None)


# ---- Secrets in files ----------------------------------------------------------------------------


def _load_secret_files(config: Config, origins: Mapping[str, str], path: Path | None) -> Config:
    update: dict[str, SecretStr] = {}
    problems: list[str] = []
    for secret, file_key in SECRET_FILE_PAIRS:
        file_path = getattr(config.target, file_key)
        if file_path is None:
            continue
        try:
            update[secret] = _read_secret(secret, file_path)
        except ValueError as exc:
            origin = origins.get(f"target.{file_key}")
            problems.append(f"target.{file_key}{f' ({origin})' if origin else ''}: {exc}")
    if problems:
        raise ConfigError(_header(path, len(problems)), problems)
    return config.model_copy(update={"target": config.target.model_copy(update=update)}) if update else config


def _read_secret(secret: str, path: Path) -> SecretStr:
    """The secret in `path`, without the newline (and other whitespace) around it."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{str(path)!r} is not UTF-8 text; put the {secret} in it as text") from None
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r} ({exc.strerror}); mount the secret there or fix the path") \
            from None
    if not value:
        raise ValueError(f"{str(path)!r} is empty; put the {secret} in it")
    problem = _jwt_secret_problem(value) if secret == "jwt_secret" else None
    if problem:
        raise ValueError(f"the JWT secret in {str(path)!r} is {problem}")
    return SecretStr(value)


# ---- Entry point ---------------------------------------------------------------------------------


DEFAULT_CONFIG_FILES = (Path("syncd.toml"), Path("/etc/syncd/syncd.toml"))  # after --config and SYNCD_CONFIG


def default_config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The configuration a command reads when given no --config: SYNCD_CONFIG's file, else the first of
    ./syncd.toml (where `syncd init` writes it) and /etc/syncd/syncd.toml (the image's) that exists; None for none
    (the environment and the defaults alone)."""
    named = (os.environ if env is None else env).get("SYNCD_CONFIG")
    if named:
        return Path(named)
    return next((path for path in DEFAULT_CONFIG_FILES if path.is_file()), None)


def load_config(path: Path | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Merge flags (`overrides`, dotted keys) > environment (`env`, default os.environ) > TOML file > defaults.

    Without `path`, SYNCD_CONFIG names the file; without either, only the environment and the defaults
    count. Raises ConfigError listing every problem.
    """
    environment = _read_environment(env)
    if path is None and environment.config:
        path = Path(environment.config)
    data = _read_file(Path(path)) if path is not None else {}
    origins: dict[str, str] = {}
    _apply_layer(data, origins, environment.layer())
    _apply_layer(data, origins, _override_layer(overrides or {}))
    for secret in ("service_key", "jwt_secret", "apikey"):  # whatever happens next, they never appear in output
        value = (data.get("target") or {}).get(secret) if isinstance(data.get("target"), dict) else None
        register(value.get_secret_value() if isinstance(value, SecretStr) else value if isinstance(value, str)
                 else None)
    config = _load_secret_files(_validate(data, origins, path), origins, path)
    target = config.target
    register(*(s.get_secret_value() for s in (target.service_key, target.jwt_secret, target.apikey) if s))
    return config


def differences(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configurations (`target.service_key`, `table[0].exclude`),
    secrets compared by value but never shown; tables compared by name."""
    def flatten(value: object, prefix: str) -> dict[str, object]:
        if isinstance(value, SecretStr):
            return {prefix: value.get_secret_value()}
        if isinstance(value, BaseModel):
            return {k: v for name in type(value).model_fields
                    for k, v in flatten(getattr(value, name), f"{prefix}.{name}" if prefix else name).items()}
        return {prefix: value}

    before = {**flatten(old.source, "source"), **flatten(old.target, "target"), **flatten(old.worker, "worker")}
    after = {**flatten(new.source, "source"), **flatten(new.target, "target"), **flatten(new.worker, "worker")}
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    old_tables, new_tables = {t.name: t for t in old.tables}, {t.name: t for t in new.tables}
    changed += [f"table ({name})" for name in sorted(old_tables.keys() | new_tables.keys())
                if old_tables.get(name) != new_tables.get(name)]
    return changed
