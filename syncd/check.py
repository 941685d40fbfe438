"""`syncd check`: before starting or cutting over, find what would go wrong, each problem with its fix.

Configuration, the SQLite side (capturable tables, installed triggers), the key (whose role, when it
expires), connectivity, and per table: the target table and every mapped column exist in the secondary
with a compatible type (from PostgREST's OpenAPI description), NOT NULL columns are fed, and the key is
unique there (an empty upsert makes PostgreSQL plan ON CONFLICT without writing anything), and whether the
secondary caps the rows of a read (PostgREST's db-max-rows, Supabase's "Max rows"). With a
database URL it also flags RLS policies that read `request.jwt.claim.*`, which PostgREST v12 never sets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import apsw
import jwt

from syncd import capture, outbox, schema
from syncd.auth import TokenSource
from syncd.config import Config
from syncd.mapping import TableMapping
from syncd.redact import error_line, mask_url, register_connection
from syncd.target import PostgrestTarget, TargetError, open_target
from syncd.verify import PAGE, format_kind

EXPIRY_WARNING_DAYS = 30
NUMERIC = {"smallint", "integer", "bigint", "numeric", "real", "double precision"}
TEXTUAL = {"text", "character varying", "character", "citext", "uuid", "name"}
EXPECTED_FOR_TRANSFORM = {
    "json": {"json", "jsonb"},
    "bool": {"boolean"},
    "timestamp": {"timestamp with time zone", "timestamp without time zone", "date"},
    "bytea": {"bytea"},
}
POLICIES_SQL = """
SELECT schemaname, tablename, policyname FROM pg_policies
WHERE coalesce(qual, '') LIKE '%request.jwt.claim.%' OR coalesce(with_check, '') LIKE '%request.jwt.claim.%'
ORDER BY 1, 2, 3
"""


@dataclass
class Finding:
    """One result of `syncd check`: its level, what it is about, what was found, and the fix."""

    level: str  # ok | skip | warn | error
    subject: str
    message: str
    fix: str | None = None

    def line(self) -> str:
        """The finding as printed: `LEVEL subject: message`, and the fix on a second line when there is one."""
        text = f"{self.level.upper():5} {self.subject}: {self.message}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


def check_source(conn: apsw.Connection, config: Config) -> tuple[list[Finding], dict[str, capture.Capture]]:
    """The SQLite side: every configured table capturable and, once syncd is installed, its triggers in place.
    Returns (findings, {table name: Capture} of the tables that can be captured)."""
    findings, planned = [], {}
    for table in config.tables:
        try:
            planned[table.name] = capture.plan_table(conn, table)
        except capture.CaptureError as exc:
            findings.append(Finding("error", f"sqlite {table.name}", str(exc)))
    if not outbox.installed(conn):
        findings.append(Finding("warn", "sqlite", "syncd is not installed: changes are not captured yet",
                                "syncd install"))
    else:
        current = capture.existing_triggers(conn)
        for name, plan in planned.items():
            missing = [t for t in plan.triggers() if t not in current]
            if missing:
                findings.append(Finding("error", f"sqlite {name}", f"trigger(s) missing: {', '.join(missing)}",
                                        "syncd install"))
    if not findings:
        findings.append(Finding("ok", "sqlite", f"{len(planned)} table(s) capturable, triggers in place"))
    return findings, planned


def check_key(config: Config, now: float) -> list[Finding]:
    """Whose role the key carries and when it expires (a minted token is always fresh)."""
    if config.target.jwt_secret is not None:
        return [Finding("ok", "auth", "syncd mints its own short-lived service_role tokens from the JWT secret")]
    if config.target.service_key is None:
        return [Finding("error", "auth", "no service key and no JWT secret",
                        "set SUPABASE_SERVICE_KEY (or service_key_file), or SUPABASE_JWT_SECRET")]
    key = config.target.key
    if key.kind == "secret":
        return [Finding("ok", "auth", "a Supabase secret key (sb_secret_...): sent in the apikey header, acts as "
                                      "service_role")]
    if key.kind == "publishable":
        return [Finding("error", "auth", "a Supabase publishable key (sb_publishable_...): it acts as the anon role, "
                                         "the browser's, which RLS and the grants keep from writing what syncd ships",
                        "put a secret key (sb_secret_..., dashboard: Settings > API Keys) in SUPABASE_SERVICE_KEY")]
    try:
        claims = jwt.decode(config.target.service_key.get_secret_value(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return [Finding("warn", "auth", "the service key is neither a JWT nor a Supabase API key (sb_secret_...): "
                                        "its role cannot be read")]
    role = claims.get("role", "(none: the anonymous role)")
    findings = []
    if role == "(none: the anonymous role)" or role == "anon":
        findings.append(Finding("warn", "auth", "the key carries role 'anon': it is the anon (public) key, which "
                                                "may not write what syncd ships", "use the service_role key "
                                                "(SUPABASE_SERVICE_KEY), or set SUPABASE_JWT_SECRET"))
    elif role != "service_role":
        findings.append(Finding("warn", "auth", f"the key carries role {role!r}: RLS policies apply to syncd's "
                                                "writes", "use the service_role key (SUPABASE_SERVICE_KEY)"))
    exp = claims.get("exp")
    if isinstance(exp, int | float) and exp < now:
        findings.append(Finding("error", "auth", "the service key has expired",
                                "sign a new one (syncd jwt sign --role service_role) or set SUPABASE_JWT_SECRET"))
    elif isinstance(exp, int | float) and exp < now + EXPIRY_WARNING_DAYS * 86400:
        findings.append(Finding("warn", "auth", f"the service key expires in {(exp - now) / 86400:.1f} days",
                                "replace it before then, or set SUPABASE_JWT_SECRET so syncd mints its own"))
    return findings or [Finding("ok", "auth", f"key role {role}")]


def check_table(target: PostgrestTarget, spec: dict[str, object], mapping: TableMapping, shipped: schema.Shipped,
                pg_schema: str = "public", role: str | None = "service_role") -> list[Finding]:
    """The secondary's side of one table, from PostgREST's OpenAPI description `spec`: the target table and every
    shipped column exist (the comparison `syncd run` makes before its first request, with the same fix: the
    ALTER TABLE from the casting table of `syncd init`) with a compatible type, NOT NULL columns without default are
    fed, and the key can be used for upserts (probed with an empty one). `shipped`: what syncd ships of the table
    (schema.shipped_columns)."""
    subject = f"{mapping.source} -> {mapping.target}"
    mismatch = schema.compare(spec, mapping, shipped, pg_schema)
    if mismatch is not None and mismatch.missing_table:
        if role != "service_role":  # PostgREST describes only what the key's role may use: ask the table itself
            try:
                target.probe_conflict_key(mapping.target, mapping.target_key)
            except TargetError as error:
                if error.code == "42501" or error.status in (401, 403):
                    return [probe_refused(subject, mapping, error, role)]
        return [Finding("error", subject, "the target table is not in the secondary (or not exposed): syncd run "
                        "halts the table until it is", "create it (the SQL of syncd init, or your migrations); if it "
                        "exists, GRANT SELECT, INSERT, UPDATE, DELETE on it to the key's role (PostgREST hides the "
                        "tables a role may not use; `syncd init --pg-url URL --sql FILE` writes the GRANTs); then "
                        "NOTIFY pgrst, 'reload schema'")]
    definitions = spec.get("definitions") or {}
    assert isinstance(definitions, dict)
    definition = definitions.get(mapping.target)
    assert isinstance(definition, dict)  # schema.compare found the table's definition (else missing_table)
    properties: dict[str, dict[str, object]] = definition.get("properties", {})
    findings, fed = [], set()
    if mismatch is not None:
        excluded = ", ".join(f'"{mismatch.sources[c]}"' for c in mismatch.missing_columns)
        findings.append(Finding("error", subject, f"column(s) {', '.join(map(repr, mismatch.missing_columns))} do "
                                "not exist in the secondary: syncd run halts the table until they do (every row "
                                "would be refused with PGRST204)",
                                f"{mismatch.ddl()}; NOTIFY pgrst, 'reload schema' -- or exclude = [{excluded}]"))
    for name in shipped.names:
        column = shipped.sources[name]
        fed.add(name)
        if name not in properties:
            continue
        problem = type_problem(mapping.transforms.get(column), shipped.declared[name],
                               str(properties[name].get("format", "")))
        if problem:
            findings.append(Finding("warn", subject, f"column {column!r} -> {name!r}: {problem}",
                                    f"set [table.columns.{column}] transform, or change the column type"))
    if target.scope is not None:  # multi-file mode: syncd fills the tenant column of every row
        tenant_column = target.scope[0]
        fed.add(tenant_column)
        if tenant_column not in properties:
            findings.append(Finding("error", subject, f"the tenant column {tenant_column!r} (source.tenant_column) "
                                    "is not in the secondary's table: every upsert would be refused (PGRST204)",
                                    f"ALTER TABLE {mapping.target} ADD COLUMN {tenant_column} text NOT NULL, first in "
                                    "its primary key (the SQL of syncd init --glob); NOTIFY pgrst, 'reload schema'"))
    unfed = [c for c in definition.get("required", []) if c not in fed and "default" not in properties.get(c, {})]
    if unfed:
        # PostgREST describes a column filled by a sequence (serial, identity) as NOT NULL without a default too
        # (measured on 12.2.12), so this cannot be told for sure here; syncd run halts the table if it is so.
        findings.append(Finding("warn", subject, f"column(s) {', '.join(map(repr, unfed))} are NOT NULL without a "
                                "default in PostgREST's description, and the mapping never fills them: unless a "
                                "sequence fills them (serial, identity: PostgREST does not show such defaults), every "
                                "upsert is refused with 23502 and syncd run halts the table",
                                "give them a default there, or drop their NOT NULL, or map a source column to them"))
    try:
        target.probe_conflict_key(mapping.target, mapping.target_key)
    except TargetError as error:
        findings.append(probe_refused(subject, mapping, error, role))
    return findings or [Finding("ok", subject, f"{len(fed)} column(s) match, key unique")]


def probe_refused(subject: str, mapping: TableMapping, error: TargetError, role: str | None) -> Finding:
    """What the refusal of the empty upsert probe says, from the answer itself: 42P10 is the key (no unique
    constraint matches on_conflict); 42501, 401 and 403 are the key's role (no privilege, a key the server refuses:
    an empty upsert meets no RLS policy); anything else is reported as it was answered. `role`: the key's role as
    its JWT says (None when it cannot be read)."""
    key = ", ".join(mapping.target_key)
    who = f"role {role!r}" if role else "the key's role"
    if error.code == "42P10":
        return Finding("error", subject, f"key ({key}) cannot be used for upserts: {error.message}",
                       "add a unique constraint (or primary key) on those columns there")
    if error.code == "42501" and role == "anon":
        return Finding("error", subject, f"{who} has no privilege to write {mapping.target!r} ({error.message})",
                       "the key is the anon (public) key, which the browser gets: put the service_role key in "
                       "SUPABASE_SERVICE_KEY, or set SUPABASE_JWT_SECRET")
    if error.code == "42501":
        return Finding("error", subject, f"{who} has no privilege to write {mapping.target!r} ({error.message})",
                       f"use the service_role key (SUPABASE_SERVICE_KEY), or GRANT INSERT, UPDATE, DELETE ON "
                       f"{mapping.target} TO {role or 'that role'}")
    if error.status in (401, 403):
        return Finding("error", subject, f"the secondary refuses the key for writes ({error.message})",
                       "check the key: SUPABASE_SERVICE_KEY (the service_role key), or SUPABASE_JWT_SECRET")
    return Finding("error", subject, f"the upsert probe by key ({key}) was refused: {error.message}",
                   "see the answer above")



def check_read_cap(target: PostgrestTarget, tables: list[TableMapping], probe: int = PAGE) -> Finding:
    """Whether the secondary answers fewer rows than a read asks for: PostgREST's db-max-rows (Supabase's "Max rows",
    default 1000) caps every read without an error (PostgREST docs, "Configuration: db-max-rows"). Seen as a read of
    `probe` keys (verify's page size) answered with fewer rows while the count (Prefer: count=exact, in the same
    answer's Content-Range) says more match; measured on PostgREST 12.2.12: `206`, Content-Range 0-999/2500. Only a
    table holding more rows than the cap shows it: the tables are read in turn until one does. Costs a count of each
    table read."""
    largest = 0
    for mapping in tables:
        try:
            rows, total = target.read_page(mapping.target, mapping.target_key, mapping.target_key, limit=probe,
                                           count=True)
        except TargetError:
            continue  # the table's own finding says why it cannot be read
        if total is not None and len(rows) < min(probe, total):
            return Finding("ok", "reads", f"the secondary caps every read at {len(rows):,} rows (PostgREST "
                           "db-max-rows, Supabase Settings > API > Max rows), without an error; verify pages by the "
                           "rows it answers, so it needs more requests but compares every row")
        largest = max(largest, total if total is not None else len(rows))
    return Finding("ok", "reads", f"no cap on the rows of a read seen (the largest table holds {largest:,} rows; "
                   "a cap shows only on a table holding more rows than it)")


def type_problem(transform: str | None, declared: str, target_format: str) -> str | None:
    """A short reason when a source column of this declared type cannot land in a column of that type (`target_format`
    as PostgREST describes it: the real one says 'public.vector(3)', the dev server 'public.vector')."""
    is_vector = format_kind(target_format) == "vector"
    if transform == "vector":
        return None if is_vector else f"transform vector, but the target is {target_format}"
    if transform:
        expected = EXPECTED_FOR_TRANSFORM[transform]
        return None if target_format in expected else f"transform {transform}, but the target is {target_format}"
    affinity = declared.upper()
    if target_format in ("json", "jsonb"):  # whatever the declared type: without the transform the text is a string
        return f"target is {target_format}: text would be stored as a JSON string (transform = \"json\"?)"
    if target_format == "boolean":
        return "target is boolean: SQLite stores 0/1 (transform = \"bool\")"
    if target_format == "bytea" or is_vector:
        return f"target is {target_format}: needs transform = \"bytea\" or \"vector\""
    if "INT" in affinity and target_format not in NUMERIC | TEXTUAL:
        return f"SQLite INTEGER into {target_format}"
    return None


def check_policies(pg_url: str) -> list[Finding]:
    """Row-level security policies that read `request.jwt.claim.*` (PostgREST v12 sets only `request.jwt.claims`, so
    they never match), looked up in PostgreSQL's `pg_policies` at `pg_url`. Needs psycopg (the `postgres` extra):
    raises ImportError without it, psycopg.Error when the database cannot be reached or read."""
    import psycopg

    register_connection(pg_url)
    try:
        with psycopg.connect(pg_url, connect_timeout=10) as conn:
            rows = conn.execute(POLICIES_SQL).fetchall()
    except psycopg.Error as exc:
        reason = error_line(exc, 200)
        return [Finding("error", "policies", f"cannot read the policies through --pg-url {mask_url(pg_url)}: {reason}",
                        "give a postgresql:// URL of the secondary's database that this machine can reach, with a "
                        "user that may read pg_policies")]
    return [Finding("warn", f"policy {policy!r} on {schema}.{table}", "reads request.jwt.claim.*, which PostgREST "
                    "v12+ never sets: it never matches", "read current_setting('request.jwt.claims', true)::jsonb "
                    "->> 'role' (or auth.role(), auth.uid()) instead") for schema, table, policy in rows] \
        or [Finding("ok", "policies", "no policy reads request.jwt.claim.*")]


def run_checks(config: Config, conn: apsw.Connection, tokens: TokenSource | None = None, pg_url: str | None = None,
               now: float | None = None) -> list[Finding]:
    """Every check, in the order `syncd check` prints them (`tokens`: default the configuration's)."""
    now = time.time() if now is None else now
    findings = [Finding("ok", "config", "loaded and valid")]
    source, planned = check_source(conn, config)
    findings += source + check_key(config, now)
    if config.target.in_clear:
        findings.append(Finding("warn", "secondary", config.target.in_clear))
    with open_target(config, tokens) as target:
        try:
            spec = target.describe()
        except TargetError as error:
            return [*findings, Finding("error", "secondary", f"{config.target.url}: {error.message}",
                                       "check target.url, the network and the key")]
        findings.append(Finding("ok", "secondary", f"{config.target.url} answers"))
        readable = []
        for table in config.tables:
            if table.name in planned:
                mapping = TableMapping.from_config(table, planned[table.name].key)
                findings += check_table(target, spec, mapping, schema.shipped_columns(conn, mapping),
                                        config.target.schema_name, config.target.key.role)
                readable.append(mapping)
        findings.append(check_read_cap(target, readable))
    if pg_url:
        findings += check_policies(pg_url)
    else:
        findings.append(Finding("skip", "policies", "not checked (give --pg-url to look for request.jwt.claim.*)"))
    return findings


def render(findings: list[Finding]) -> str:
    """What `syncd check` prints: one finding a line (with its fix), then the count of errors and warnings."""
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    return "\n".join([*(finding.line() for finding in findings), f"{errors} error(s), {warnings} warning(s)"])


def passed(findings: list[Finding]) -> bool:
    """No finding is an error (warnings pass)."""
    return not any(f.level == "error" for f in findings)
