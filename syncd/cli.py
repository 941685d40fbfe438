"""The `syncd` command line: parse, validate, call one library function, print. No logic of its own.

Defaults shown in `--help` come from where they are defined (the config model, the modules that use them),
never from a second copy here. Mistakes an operator can fix are one message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import apsw

from syncd import __version__, auth, capture, sqlite, state, status, tenants, timeparse
from syncd import replay as operations
from syncd.config import Config, ConfigError, WorkerConfig, default_config_file, load_config
from syncd.progress import Progress
from syncd.redact import mask_url, redact
from syncd.source import LockWait
from syncd.target import PostgrestTarget, TargetError, open_target
from syncd.tenants import TenantFile
from syncd.verify import PAGE

if TYPE_CHECKING:
    from syncd.onboard import Sources, Table
    from syncd.target_schema import TargetTable

# Mistakes an operator can fix: printed as one clear message, never as a traceback.
USER_ERRORS = (ConfigError, capture.CaptureError, sqlite.SourceFileError, sqlite.ForeignCollation, apsw.SQLError,
               TargetError)
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what add_subparsers returns
EXIT_BUG = 70  # sysexits.h EX_SOFTWARE
LOCK_WAIT = 300.0  # seconds a command waits for the app's lock by default
READ_LOCK_WAIT = 5.0  # seconds a command without --lock-wait (status) waits: it reports, it does not queue
LOCK_WAITS: list[LockWait] = []  # this process's, to say who held the lock when one gives up


def load(args: argparse.Namespace, **overrides: object) -> Config:
    """The configuration for a command: its --config and --db, then `overrides` (dotted keys). Raises ConfigError."""
    return load_config(args.config or default_config_file(), overrides={"source.path": args.db, **overrides})


def open_source(args: argparse.Namespace, config: Config, *, readonly: bool = False) -> apsw.Connection:
    """The app's file (its state file attached) for a command: while another process holds the lock, wait up to
    --lock-wait seconds, saying on stderr who holds it (`source.LockWait`)."""
    conn = sqlite.connect(config.source.path, readonly=readonly)
    waits = LockWait(config.source.path, getattr(args, "lock_wait", READ_LOCK_WAIT),
                     lambda line: print(line, file=sys.stderr, flush=True))
    conn.set_busy_handler(waits)  # before the first statement: attaching the state file reads the app's file too
    LOCK_WAITS.append(waits)
    state.attach(conn, config.source.path)
    return conn


def secondary(config: Config) -> PostgrestTarget:
    """The PostgREST client for a command, after warning on stderr when the key would travel in clear."""
    if config.target.in_clear:
        print(f"warning: {config.target.in_clear}", file=sys.stderr)
    return open_target(config)


def bad_argument(flag: str, problem: str) -> ConfigError:
    """The ConfigError for a bad flag value: `flag: problem`."""
    return ConfigError("invalid arguments (1 problem):", [f"{flag}: {problem}"])


def chosen_files(args: argparse.Namespace, config: Config) -> list[TenantFile] | None:
    """Multi-file mode: the files matching source.glob (every shard's), narrowed by --file/--tenant; None in
    single-file mode (where --file/--tenant are refused). Raises ConfigError when no file is left."""
    name, tenant = getattr(args, "file", None), getattr(args, "tenant", None)
    if config.source.glob is None:
        if name is not None or tenant is not None:
            raise bad_argument("--file" if name is not None else "--tenant",
                               "only in multi-file mode (source.glob); this configuration serves source.path")
        return None
    from syncd.fleet import glob_root

    found = tenants.discover(config.source.glob, glob_root(config), tenants.TenantPattern.parse(config.source.tenant))
    try:
        return tenants.select(found, name=name, tenant=tenant)
    except ValueError as exc:
        raise bad_argument("--file" if name is not None else "--tenant", str(exc)) from None


def per_file(command: Callable[[argparse.Namespace, Config], int]) -> Callable[[argparse.Namespace], int]:
    """A command for one file, run for the file of single-file mode, or in multi-file mode for every file matching
    source.glob (or those --file/--tenant name), each under a header line; one file's failure is printed and the
    others go on. The exit code is the worst. With --json, one object: {"files": [{"file", "tenant", "result"}]}."""
    def run(args: argparse.Namespace) -> int:
        config = load(args)
        files = chosen_files(args, config)
        if files is None:
            return command(args, config)
        codes: list[int] = []
        results: list[dict[str, object]] = []
        as_json = bool(getattr(args, "json", False))
        for file in files:
            if file.tenant is None:
                print(f"error: {file.name}: its name gives no tenant by source.tenant; skipped", file=sys.stderr)
                codes.append(1)
                continue
            if not as_json:
                print(f"== {file.name} (tenant {file.tenant})", flush=True)
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out) if as_json else contextlib.nullcontext():
                    codes.append(command(args, config.for_file(file.path, file.tenant)))
            except (*USER_ERRORS, apsw.Error) as exc:
                print(f"error: {file.name}: {redact(str(exc))}", file=sys.stderr)
                codes.append(2 if isinstance(exc, USER_ERRORS) else 1)
                continue
            if as_json:
                results.append({"file": file.name, "tenant": file.tenant, "result": json.loads(out.getvalue())})
        if as_json:
            print(json.dumps({"files": results}, indent=2))
        return max(codes, default=0)

    run.__doc__ = command.__doc__
    return run


@per_file
def install(args: argparse.Namespace, config: Config) -> int:
    """`syncd install`: create syncd's tables and the triggers; print what changed."""
    report = capture.install(open_source(args, config), config)
    print(f"installed in {config.source.path}: {len(report.created)} trigger(s) created, "
          f"{len(report.replaced)} replaced, {len(report.unchanged)} unchanged")
    for name in report.created + report.replaced:
        print(f"  {name}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.unshipped:
        tables = ", ".join(map(repr, report.unshipped))
        print(f"note: {len(report.unshipped)} table(s) already hold rows, written before syncd was installed "
              f"({tables}): they reach the secondary after `{suggest(args, 'resync', '--all')}` (every table, "
              f"parents before children), or one table's after `{suggest(args, 'resync', '--table', 'T')}`",
              file=sys.stderr)
    return 0


@per_file
def uninstall(args: argparse.Namespace, config: Config) -> int:
    """`syncd uninstall`: remove the triggers (and, as asked, archive or drop syncd's tables)."""
    report = capture.uninstall(open_source(args, config), drop_outbox=args.drop_outbox, force=args.force,
                               archive=args.archive)
    if not report.found:
        print(f"syncd is not installed in {config.source.path}: nothing to remove")
        return 0
    if args.archive:
        print(f"archived the outbox, dead letters, journal and meta to {args.archive}")
    print(f"removed {len(report.dropped_triggers)} trigger(s)"
          + (f" and {', '.join(report.dropped_tables)}" if report.dropped_tables else
             "; the outbox and dead letters stay (use --drop-outbox to remove them)"))
    return 0


def show_status(args: argparse.Namespace) -> int:
    """`syncd status`: exit 0 when healthy, 1 when something needs an operator. In multi-file mode: totals and
    the files that need attention or are behind (`syncd.fleet_status`), unless --file/--tenant name one file."""
    config = load(args)
    files = chosen_files(args, config)
    if files is not None and not (len(files) == 1 and (args.file or args.tenant)):
        from syncd import fleet_status

        fleet = fleet_status.collect(config, files, lambda narrowed: open_source(args, narrowed, readonly=True),
                                     max_lag=args.max_lag)
        print(json.dumps(fleet.as_dict(), indent=2) if args.json else fleet_status.render(fleet))
        return 0 if fleet.healthy else 1
    if files is not None:
        assert files[0].tenant is not None
        config = config.for_file(files[0].path, files[0].tenant)
    result = status.collect(open_source(args, config, readonly=True), config, max_lag=args.max_lag)
    print(json.dumps(result.as_dict(), indent=2) if args.json else status.render(result))
    return 0 if result.healthy else 1


def run(args: argparse.Namespace) -> int:
    """`syncd run`: the daemon, until a signal (or, with --once, until the outbox is empty)."""
    from syncd import daemon

    overrides: dict[str, object] = {f"worker.{k}": getattr(args, k) for k in WORKER_FLAGS}
    if args.shard is not None:
        overrides["source.shard"] = args.shard
    return daemon.run(load(args, **overrides), once=args.once, log_format=args.log_format,
                      reload=lambda: load(args, **overrides))


WORKER_FLAGS = ("batch_size", "poll_interval", "shutdown_timeout", "metrics_addr")


def worker_help(key: str) -> str:
    """A [worker] key's flag help: its description and default, from the config model."""
    field = WorkerConfig.model_fields[key]
    return f"{field.description} (default {field.default}; [worker] {key})"


def add_run_command(commands: Commands) -> None:
    """Register `run`, its [worker] flags described from the config model."""
    p = commands.add_parser("run", help="drain the outbox to the secondary (the daemon)",
                            description="Ship every captured change to PostgREST: wake on commits, batch, retry "
                                        "transient failures forever, dead-letter rows the secondary refuses, "
                                        "serve /metrics, /healthz and /readyz.")
    add_config_options(p, lock_wait=False, files=False)
    p.add_argument("--once", action="store_true", help="drain until the outbox is empty, then exit")
    p.add_argument("--batch-size", dest="batch_size", type=int, help=worker_help("batch_size"))
    p.add_argument("--poll-interval", dest="poll_interval", type=float, help=worker_help("poll_interval"))
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float, help=worker_help("shutdown_timeout"))
    p.add_argument("--metrics-addr", dest="metrics_addr", help=worker_help("metrics_addr"))
    p.add_argument("--shard", metavar="I/N", help="multi-file mode: serve shard I of N (overrides source.shard)")
    p.add_argument("--log-format", choices=("json", "console"), default="json", help="log lines for machines or people")
    p.set_defaults(run=run)


@per_file
def replay(args: argparse.Namespace, config: Config) -> int:
    """`syncd replay`: dead letters, or the keys shipped in a time window, back into the outbox."""
    if args.id and not args.dead_letters:
        raise bad_argument("--id", "dead letter ids go with --dead-letters; --since replays by time")
    if args.until is not None and args.since is None:
        raise bad_argument("--until", "only with --since (the window's end)")
    conn = open_source(args, config)
    if args.table is not None and (problem := operations.unknown_table(conn, config, args.table, args.dead_letters)):
        raise bad_argument("--table", problem)
    if args.dead_letters:
        with Progress("replay") as progress:
            result = operations.replay_dead_letters(conn, table=args.table, ids=args.id or (), dry_run=args.dry_run,
                                                    progress=progress)
        what = "dead letter(s)"
    else:
        with Progress("replay") as progress:
            try:
                result = operations.replay_window(conn, args.since, args.until, table=args.table,
                                                  dry_run=args.dry_run, progress=progress)
            except ValueError as exc:
                raise bad_argument("--since/--until", str(exc)) from None
        what = "shipped key(s) from the journal"
    verb = "would re-enqueue" if result.dry_run else "re-enqueued"
    print(f"{verb} {result.keys} {what}" + ("" if result.dry_run else "; `syncd run` ships them"))
    return 0


@per_file
def resync(args: argparse.Namespace, config: Config) -> int:
    """`syncd resync` / `backfill`: every key of a table (--table), or of every configured table in foreign-key
    order, parents first (--all: the first copy), into the outbox."""
    from syncd.plan import ship_order  # here: the plan's imports are more than other commands need

    conn = open_source(args, config)
    if args.all:
        if args.where:
            raise bad_argument("--where", "only with --table (a condition is on one table's columns)")
        tables = ship_order(conn, config, [t.name for t in config.tables])
    else:
        tables = [args.table]
    verb = "would enqueue" if args.dry_run else "enqueued"
    total = 0
    for table in tables:
        with Progress(f"resync {table}") as progress:
            try:
                result = operations.resync_table(conn, config, table, where=args.where, dry_run=args.dry_run,
                                                 progress=progress)
            except ValueError as exc:
                raise bad_argument("--where", str(exc)) from None
        total += result.keys
        print(f"{verb} {result.keys} key(s) of {table}" + ("" if result.dry_run or args.all else
                                                            f"; `{suggest(args, 'run')}` ships them"))
    if args.all:
        print(f"{verb} {total} key(s) of {len(tables)} table(s), parents before children"
              + ("" if args.dry_run else f"; `{suggest(args, 'run')}` ships them in that order"))
    return 0


def suggest(args: argparse.Namespace, *words: str) -> str:
    """A syncd command line to print for the operator to paste: `words` (shell-quoted), with the --config and
    --db this command was given, so that it finds the same files from wherever it is pasted."""
    line = ["syncd", *words]
    if getattr(args, "config", None):
        line += ["--config", str(args.config)]
    if getattr(args, "db", None):
        line += ["--db", str(args.db)]
    return shlex.join(line)


def add_operation_commands(commands: Commands) -> None:
    """Register `replay`, `resync` and its alias `backfill`."""
    p = commands.add_parser("replay", help="re-enqueue dead letters, or keys shipped in a time window",
                            description="Put keys back into the outbox: dead letters after their cause was "
                                        "fixed, or every key shipped in a window (a secondary restored from an "
                                        "older backup). The current row is read at ship time, never stale data.")
    add_config_options(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dead-letters", action="store_true", help="replay dead letters")
    source.add_argument("--since", help="replay keys shipped since TIME (ISO 8601, or 90s, 15m, 2h, 7d ago)")
    p.add_argument("--until", help="with --since: only keys shipped before TIME")
    p.add_argument("--table", help="only this table")
    p.add_argument("--id", type=positive_int, action="append", help="with --dead-letters: only these dead letter ids")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    p.set_defaults(run=replay)
    for name in ("resync", "backfill"):
        p = commands.add_parser(name, help="enqueue every key of a table (initial backfill or full resync)",
                                description="Enqueue every key of a table in chunks, each its own short "
                                            "transaction, while the app writes and the daemon ships.")
        add_config_options(p)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--table", help="the SQLite table")
        which.add_argument("--all", action="store_true",
                           help="every configured table, parents before children (foreign keys, `after`): the "
                                "first copy")
        p.add_argument("--where", help="only rows matching this SQL condition on the table")
        p.add_argument("--dry-run", action="store_true", help="count, change nothing")
        p.set_defaults(run=resync)


def jwt_secret(args: argparse.Namespace) -> str | None:
    """The JWT secret from --secret or $SUPABASE_JWT_SECRET, None when neither is given; ConfigError when short."""
    secret = args.secret or os.environ.get("SUPABASE_JWT_SECRET")
    if secret and len(secret) < auth.MIN_SECRET_LENGTH:
        raise bad_argument("--secret", f"shorter than {auth.MIN_SECRET_LENGTH} characters; PostgREST refuses it")
    return secret or None


def required_jwt_secret(args: argparse.Namespace) -> str:
    """The JWT secret (see `jwt_secret`); ConfigError when it is missing."""
    secret = jwt_secret(args)
    if secret is None:
        raise bad_argument("--secret", "missing; pass --secret or set SUPABASE_JWT_SECRET (try: syncd jwt gen)")
    return secret


def duration(flag: str, text: str) -> float:
    """A duration flag's value in seconds ('90s', '2h'); ConfigError naming the flag otherwise."""
    try:
        return timeparse.parse_duration(text)
    except ValueError as exc:
        raise bad_argument(flag, str(exc)) from None


def lifetime(text: str) -> float:
    """A token's --expires-in in seconds: a duration of at least one second (a token born expired is no use)."""
    seconds = duration("--expires-in", text)
    if seconds < 1:
        raise bad_argument("--expires-in", f"{text!r} would make a token that has expired when it is printed; "
                                           "give a lifetime such as 15m, 1h or 10y")
    return seconds


def jwt_gen(args: argparse.Namespace) -> int:
    """`syncd jwt gen`: a new secret and its anon and service_role keys."""
    try:
        secret = auth.generate_secret(args.secret_length)
    except ValueError as exc:
        raise bad_argument("--secret-length", str(exc)) from None
    seconds = lifetime(args.expires_in)
    print(auth.render_keys(secret, auth.mint_token(secret, "anon", expires_in=seconds),
                           auth.mint_token(secret, "service_role", expires_in=seconds)))
    return 0


def jwt_sign(args: argparse.Namespace) -> int:
    """`syncd jwt sign`: one token for a role."""
    secret = required_jwt_secret(args)
    claims: dict[str, Any] = {k: v for k, v in (("sub", args.sub), ("email", args.email)) if v}
    aud = args.aud or ("authenticated" if args.role == "authenticated" else None)
    if aud:
        claims["aud"] = aud
    claims.update(extra_claims(args.claim))
    print(auth.mint_token(secret, args.role, expires_in=lifetime(args.expires_in), **claims))
    return 0


SIGNED_BY_FLAGS = {"role": "--role", "sub": "--sub", "email": "--email", "aud": "--aud", "exp": "--expires-in",
                   "iat": "--expires-in", "iss": "(always supabase)"}


def extra_claims(given: Sequence[str]) -> dict[str, str]:
    """`jwt sign --claim KEY=VALUE ...` as claims (each value a string). Raises ConfigError naming --claim for one
    without `=`, an empty key, a claim another flag sets, or a key given twice."""
    claims: dict[str, str] = {}
    for item in given:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise bad_argument("--claim", f"{item!r} is not KEY=VALUE (e.g. tenant_id=acme)")
        if key in SIGNED_BY_FLAGS:
            raise bad_argument("--claim", f"{key!r} is set by {SIGNED_BY_FLAGS[key]}, not by --claim")
        if key in claims:
            raise bad_argument("--claim", f"{key!r} is given twice")
        claims[key] = value
    return claims


def jwt_verify(args: argparse.Namespace) -> int:
    """`syncd jwt verify`: a token's signature, role and expiry; exit 1 when it would be refused."""
    report = auth.inspect_token(args.token, jwt_secret(args))
    print(report.render())
    return 0 if report.ok else 1


@per_file
def run_check(args: argparse.Namespace, config: Config) -> int:
    """`syncd check`: every check with its fix; exit 1 on any error."""
    from syncd import check

    findings = check.run_checks(config, open_source(args, config, readonly=True), pg_url=args.pg_url)
    print(check.render(findings))
    return 0 if check.passed(findings) else 1


@per_file
def run_verify(args: argparse.Namespace, config: Config) -> int:
    """`syncd verify`: compare (and with --repair, enqueue the differences); exit 1 when not equal."""
    from syncd import verify

    if args.dry_run and not args.repair:
        raise bad_argument("--dry-run", "only with --repair (verify alone changes nothing)")
    with secondary(config) as target:
        result = verify.verify(open_source(args, config, readonly=not args.repair), config, target,
                               tables=args.table,
                               repair=args.repair, dry_run=args.dry_run, page=args.page_size, progress=Progress)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.render())
    return 0 if result.equal else 1


@per_file
def run_cutover(args: argparse.Namespace, config: Config) -> int:
    """`syncd cutover`: ready to switch the app to the secondary? Exit 1 with the reasons when not."""
    from syncd import cutover

    timeout = duration("--timeout", args.timeout)
    with secondary(config) as target:
        readiness = cutover.check_readiness(open_source(args, config, readonly=True), config, target,
                                            timeout=timeout,
                                            progress=Progress)
    print(cutover.render(readiness, config))
    return 0 if readiness.ready else 1


def add_verify_commands(commands: Commands) -> None:
    """Register `verify` and `cutover`."""
    p = commands.add_parser("verify", help="compare the source and the secondary row by row; --repair fixes",
                            description="Stream both sides in key order (keyset pagination), hash each row after "
                                        "mapping, and report counts and the keys missing, extra and different "
                                        "in the secondary, with examples. Exit 0 when equal, 1 when not. "
                                        "--repair enqueues the differing keys (extra rows get deleted).")
    add_config_options(p)
    p.add_argument("--table", action="append", help="only this table (repeatable)")
    p.add_argument("--repair", action="store_true", help="enqueue every differing key; `syncd run` ships them")
    p.add_argument("--dry-run", action="store_true", help="with --repair: count what would be enqueued")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--page-size", dest="page_size", type=positive_int, default=PAGE,
                   help=f"rows per read (default {PAGE})")
    p.set_defaults(run=run_verify)
    p = commands.add_parser("cutover", help="wait for an empty outbox, verify, and say how to switch the app",
                            description="The seed's Phase 3, checked: wait until the daemon has drained the "
                                        "outbox, refuse while dead letters remain or a table is halted, verify "
                                        "every table, then print exactly what to change in the application's "
                                        "environment (DB_BACKEND=supabase). Writes nothing. Exit 0 when ready, "
                                        "1 with the reasons when not.")
    add_config_options(p)
    p.add_argument("--timeout", default="10m", help="how long to wait for the outbox to drain (default 10m)")
    p.set_defaults(run=run_cutover)


def healthcheck(args: argparse.Namespace) -> int:
    """`syncd healthcheck`: exit 0 when the daemon's /healthz answers 200, 1 otherwise (the reason on stderr)."""
    from syncd import healthcheck as probe

    healthy, seen = probe.probe(probe.metrics_address(args.metrics_addr))
    print(seen, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def add_healthcheck_command(commands: Commands) -> None:
    """Register `healthcheck`."""
    p = commands.add_parser("healthcheck", help="exit 0 when the daemon on this host is alive (/healthz), 1 if not",
                            description="Ask /healthz of the daemon running beside this command (the image's "
                                        "HEALTHCHECK). Its address: --metrics-addr, else $SYNCD_METRICS_ADDR, else "
                                        "[worker] metrics_addr of the configuration file, else 127.0.0.1:9464; a "
                                        "wildcard host is asked on loopback. Loads nothing else.")
    p.add_argument("--metrics-addr", dest="metrics_addr", help="host:port the daemon serves /healthz on")
    p.set_defaults(run=healthcheck)


def add_check_command(commands: Commands) -> None:
    """Register `check`."""
    p = commands.add_parser("check", help="check config, key, connectivity and the secondary's tables before a run",
                            description="Check the configuration, the SQLite side, the key (role, expiry), "
                                        "connectivity, and that every mapped table and column exists in the "
                                        "secondary with a compatible type and a unique key; with --pg-url also "
                                        "RLS policies that read request.jwt.claim.*. Exit 1 when anything is an "
                                        "error; each problem comes with its fix. Writes nothing.")
    add_config_options(p)
    p.add_argument("--pg-url", help="the secondary's PostgreSQL URL, to inspect RLS policies (optional)")
    p.set_defaults(run=run_check)


def add_jwt_commands(commands: Commands) -> None:
    """Register `jwt` and its verbs `gen`, `sign`, `verify`."""
    p = commands.add_parser("jwt", help="JWT secrets and keys for PostgREST / Supabase (gen, sign, verify)",
                            description="What the seed's tools/gen_jwt.py did: a secret with the PostgREST setting "
                                        "line and anon/service_role keys; sign a token for a role; verify one.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    gen = verbs.add_parser("gen", help="a new secret, its PGRST_JWT_SECRET line, anon and service_role keys")
    gen.add_argument("--secret-length", type=int, default=64, help="characters of the secret (>= 32, default 64)")
    gen.add_argument("--expires-in", default="10y", help="lifetime of the two keys (default 10y)")
    gen.set_defaults(run=jwt_gen)
    sign = verbs.add_parser("sign", help="sign a token for a role with the JWT secret")
    sign.add_argument("--role", required=True, help="anon, authenticated, service_role...")
    sign.add_argument("--sub", help="the user id (auth.uid())")
    sign.add_argument("--email", help="the email claim")
    sign.add_argument("--aud", help="audience (default 'authenticated' for role authenticated)")
    sign.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE",
                      help="another claim, a string (repeatable), e.g. tenant_id=acme for init --glob's RLS policy")
    sign.add_argument("--expires-in", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    sign.add_argument("--secret", help="the JWT secret (default: $SUPABASE_JWT_SECRET)")
    sign.set_defaults(run=jwt_sign)
    verify = verbs.add_parser("verify", help="check a token's signature, role and expiry")
    verify.add_argument("token", help="the JWT")
    verify.add_argument("--secret", help="the JWT secret (default: $SUPABASE_JWT_SECRET); without it the "
                                         "signature is not checked")
    verify.set_defaults(run=jwt_verify)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small: use 1 or more")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 up")
    return value


def add_config_options(p: argparse.ArgumentParser, *, lock_wait: bool = True, wait: float = LOCK_WAIT,
                       files: bool = True) -> None:
    """--config and --db, which every command that reads the app's file takes; --lock-wait (default `wait`
    seconds) for a command (not the daemon, which waits as long as it takes)."""
    p.add_argument("--config", type=Path,
                   help="TOML configuration file (default: $SYNCD_CONFIG, else ./syncd.toml, else "
                        "/etc/syncd/syncd.toml)")
    p.add_argument("--db", help="the application's SQLite file (overrides source.path and $SYNCD_DB)")
    if files:
        p.add_argument("--file", metavar="NAME", help="multi-file mode (source.glob): only this file (its name as "
                       "status shows it, or its path; default every file)")
        p.add_argument("--tenant", metavar="ID", help="multi-file mode (source.glob): only the file of this tenant")
    if lock_wait:
        p.add_argument("--lock-wait", type=seconds, default=wait, metavar="SECONDS",
                       help="while the application holds the file's lock, wait this long, saying every few seconds "
                            f"which process holds it (default {wait:.0f})")


def add_capture_commands(commands: Commands) -> None:
    """Register `install`, `uninstall` and `status`."""
    p = commands.add_parser("install", help="create the outbox and the capture triggers (idempotent)",
                            description="Create syncd's tables and the triggers of every configured table in one "
                                        "transaction. Refuses, without touching the file, tables it cannot capture.")
    add_config_options(p)
    p.set_defaults(run=install)
    p = commands.add_parser("uninstall", help="remove the capture triggers",
                            description="Remove every syncd trigger. The outbox and dead letters stay unless "
                                        "--drop-outbox; a non-empty outbox is only dropped with --force.")
    add_config_options(p)
    p.add_argument("--drop-outbox", action="store_true", help="also drop the outbox, dead letters, journal, meta")
    p.add_argument("--force", action="store_true", help="drop them even when changes are still pending")
    p.add_argument("--archive", type=Path, metavar="PATH",
                   help="copy syncd's tables into a new SQLite file PATH, then drop them (Phase 4 clean-up)")
    p.set_defaults(run=uninstall)
    p = commands.add_parser("status", help="pending changes, dead letters, lease and trigger health",
                            description="Report per table what is pending and how old, dead letters, last "
                                        "shipment and errors, the daemon's lease and trigger health. Exit code 0 "
                                        "when healthy, 1 when something needs an operator.")
    add_config_options(p, wait=READ_LOCK_WAIT)  # a report: a monitoring script must not hang behind the app
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-lag", type=seconds, default=status.DEFAULT_MAX_LAG_SECONDS,
                   help="pending changes older than this many seconds are a problem "
                        f"(default {status.DEFAULT_MAX_LAG_SECONDS:g})")
    p.set_defaults(run=show_status)


def dev_server(args: argparse.Namespace) -> int:
    """`syncd dev-server`: the PostgREST-compatible server, until SIGTERM/SIGINT. Exit 2 with one line on stderr
    (the flag, the problem, the fix) for a flag it cannot work with, or without its extra."""
    try:
        from syncd.devserver import options as devserver_options
        from syncd.devserver import server
    except ImportError as exc:
        print(f"error: the dev server needs its extra ({exc.name} is missing); try: pip install 'syncd[devserver]'",
              file=sys.stderr)
        return 2
    try:
        options = devserver_options.Options(
            host=args.host, port=args.port, prefix=devserver_options.parse_prefix(args.prefix),
            pg_url=args.pg_url, data_dir=args.data_dir, migrations=args.migrations, jwt_secret=args.jwt_secret,
            require_apikey=args.require_apikey, faults=args.faults,
            schemas=devserver_options.parse_schemas(args.schemas), anon_role=args.anon_role,
            pool_size=args.pool_size, pool_timeout=args.pool_timeout, max_rows=args.max_rows,
            upstream=args.upstream,
        )
        return server.run(options)
    except devserver_options.StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def add_dev_server(commands: Commands) -> None:
    """Register `dev-server`."""
    p = commands.add_parser(
        "dev-server", help="serve the PostgREST protocol over a real PostgreSQL, for tests and the demo",
        description="Start (or connect to) PostgreSQL, apply the migrations, and serve a PostgREST v12-"
                    "compatible API. Prints one JSON line with url, pg_url, jwt_secret, anon_key and "
                    "service_key when ready (with --upstream: url and upstream; the others are null); "
                    "SIGTERM/SIGINT stop it and remove temporary data.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=54321, help="port to listen on, 0 for any free port (default 54321)")
    p.add_argument("--prefix", default="/rest/v1", help="API path prefix (default /rest/v1)")
    p.add_argument("--pg-url", help="use this PostgreSQL instead of starting a throwaway one")
    p.add_argument("--data-dir", type=Path,
                   help="keep the throwaway PostgreSQL's data in DIR (new, empty or kept before; not with --pg-url)")
    p.add_argument("--migrations", type=Path, help="apply DIR/*.sql in name order (default: "
                   "./deploy/supabase/migrations, else that of syncd's source tree)")
    p.add_argument("--jwt-secret", help="HS256 secret (default: $SUPABASE_JWT_SECRET, else a random one)")
    p.add_argument("--require-apikey", action="store_true", help="demand the apikey header, as Supabase's gateway")
    p.add_argument("--faults", action="store_true", help="enable fault injection at /_dev/faults and /_dev/stats")
    p.add_argument("--schemas", default="public", help="exposed schemas, comma separated (default public)")
    p.add_argument("--anon-role", default="anon", help="role for requests without a token (default anon)")
    p.add_argument("--pool-size", type=int, default=10, help="database connections (default 10)")
    p.add_argument("--pool-timeout", type=float, default=10.0,
                   help="seconds to wait for a free connection before answering 504 PGRST003 (default 10)")
    p.add_argument("--max-rows", type=int, metavar="N",
                   help="cap every read at N rows without an error, as PostgREST's db-max-rows (Supabase: 1000)")
    p.add_argument("--upstream", metavar="URL",
                   help="start no PostgreSQL: pass every API request on to the PostgREST at URL (its root, or "
                        "https://PROJECT.supabase.co/rest/v1) through the fault API of --faults (always on)")
    p.set_defaults(run=dev_server)


def add_demo_command(commands: Commands) -> None:
    """Register `demo` (its flags are the demo package's)."""
    from syncd import demo

    p = commands.add_parser(
        "demo", help="the whole pipeline on this machine: app, syncd, secondary, an outage, live view, verify",
        description="Start the dev server over a throwaway PostgreSQL, create the demo app's SQLite database, "
                    "install syncd, run the daemon and the demo app (the seed's write methods at --rate), show "
                    "written, shipped, pending, lag and failures live, optionally take the secondary down "
                    "(--outage), then drain, stop and run `syncd verify`. Exit 0 only when verify finds the "
                    "secondary equal.")
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)


def init(args: argparse.Namespace) -> int:
    """`syncd init`: the config and the secondary's DDL from the SQLite file's catalog; with --apply, run the DDL;
    with --target or --pg-url alone, the mapping onto the tables the secondary already has (`init_onto_target`)."""
    from syncd import onboard

    onto = onto_target(args)
    if not args.schema or len(args.schema.encode()) > onboard.PG_NAME_BYTES or not args.schema.isprintable():
        raise bad_argument("--schema", f"{args.schema!r} is not a PostgreSQL schema name (1 to 63 bytes, printable)")
    if args.sql is None and not onto:
        args.sql = Path("schema.sql")
    paths = [(flag, path) for flag, path in (("--out", args.out), ("--sql", args.sql)) if path is not None]
    existing = [f"{flag} {path}" for flag, path in paths if path.exists()]
    if existing:
        raise bad_argument(existing[0].split()[0], f"{' and '.join(existing)} already exist(s); init never overwrites "
                                                   "a file: move them away or give other paths")
    if args.sql is not None and args.out.absolute() == args.sql.absolute():
        raise bad_argument("--sql", "the same file as --out; give two paths")
    for flag, path in paths:
        folder = path.absolute().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise bad_argument(flag, f"cannot write {path}: {folder} is not a directory this user may write to")
    sources, files = init_sources(args)
    db: Path = args.db if sources is None else files[0].path
    flag = "--db" if sources is None else "--glob"
    try:
        conn = sqlite.connect(db, readonly=True, setting=flag)
    except sqlite.SourceFileError as exc:
        raise bad_argument(flag, str(exc).removeprefix(f"{flag}: ")) from None
    try:
        tables = onboard.read_catalog(conn, args.tables or (), args.exclude or ())
        if onto:
            return init_onto_target(args, conn, tables, db)
        synced = sum(t.refused is None for t in tables)
        if not synced:
            reasons = "; ".join(f"{t.name}: {t.refused}" for t in tables) or "it has no tables"
            raise bad_argument(flag, f"no table of {db} can be synced ({reasons}); nothing was written")
        notes = onboard.decide_foreign_keys(tables, args.foreign_keys)
        if sources is not None:
            notes += tenant_notes(tables, files, args)
            tenancy = onboard.Tenancy(args.tenant_column, args.tenant_claim)
            secondary_tables = [onboard.with_tenant(t, args.tenant_column) if t.refused is None else t for t in tables]
            sql = onboard.render_sql(secondary_tables, args.schema, db, tenancy)
        else:
            secondary_tables = tables
            sql = onboard.render_sql(tables, args.schema, db)
        config_text = onboard.render_config(tables, db, args.out, args.schema, consistency=args.consistency,
                                            sources=sources)
        if args.consistency == "snapshot":
            from syncd.snapshot import function_sql

            sql += "\n" + function_sql(args.schema)
        if args.apply:
            onboard.apply_sql(sql, args.pg_url, secondary_tables, args.schema)
    except onboard.OnboardError as exc:
        raise ConfigError(str(exc)) from None
    try:
        onboard.write_new(((args.sql, sql), (args.out, config_text)))
    except OSError as exc:
        raise ConfigError(f"--out/--sql: cannot write the files ({exc.strerror}: {exc.filename})"
                          + ("; the SQL was applied already" if args.apply else "")) from None
    print(f"wrote {args.out}: {synced} table(s) synced" + (f", {len(tables) - synced} left out (listed at its end "
                                                           "with the reason)" if synced < len(tables) else ""))
    print(f"wrote {args.sql}: the secondary's tables in schema {args.schema!r}")
    for note in notes:
        print(note)
    if args.apply:
        print(f"applied it to {mask_url(args.pg_url)} in one transaction")
    config = shlex.join(["--config", str(args.out)])
    print("next: " + ("" if args.apply else f"apply {args.sql} (psql -f, or copy it into supabase/migrations/), then ")
          + f"`syncd install {config}`, then `syncd resync --all {config}` (the rows already in the file, parents "
          f"first), then `syncd run {config}`")
    return 0


def onto_target(args: argparse.Namespace) -> bool:
    """Whether `init` maps onto the secondary's existing tables (--target, or --pg-url without --apply) instead of
    writing DDL. Raises ConfigError naming the flag for a combination that means nothing."""
    onto = args.target is not None or (bool(args.pg_url) and not args.apply)
    if args.apply and not args.pg_url:
        raise bad_argument("--apply", "--apply runs the SQL on the PostgreSQL that --pg-url names: give both")
    if args.apply and args.target is not None:
        raise bad_argument("--apply", "with --target the tables exist already and init writes no DDL to apply; leave "
                                      "--apply out")
    if args.target is not None and args.pg_url:
        raise bad_argument("--pg-url", "give one of --target (PostgREST's description) and --pg-url (PostgreSQL's "
                                       "catalog) to read the secondary's tables, not both")
    if args.target_prefix and not onto:
        raise bad_argument("--target-prefix", "only with --target or --pg-url (without --apply): it names the "
                                              "secondary's existing tables")
    if onto and args.glob is not None:
        raise bad_argument("--glob", "multi-file mode writes its own tables (the tenant column in every key): leave "
                                     "--target/--pg-url out")
    if onto and args.consistency == "snapshot":
        raise bad_argument("--consistency", "snapshot mode needs syncd_apply's SQL, which init writes only without "
                                            "--target/--pg-url")
    return onto


def target_tables(args: argparse.Namespace) -> tuple[dict[str, TargetTable], str]:
    """The secondary's tables in --schema for `init --target` / `--pg-url`, and where they were read (masked).
    --target reads PostgREST's OpenAPI with the URL and key `syncd run` would use (its flag, then SYNCD_TARGET_URL or
    SUPABASE_URL; SUPABASE_SERVICE_KEY(_FILE) or SUPABASE_JWT_SECRET(_FILE)); --pg-url reads PostgreSQL's catalog.
    Raises ConfigError naming the flag."""
    from syncd import target_schema

    if args.pg_url:
        try:
            return (target_schema.read_catalog(args.pg_url, args.schema),
                    f"PostgreSQL's catalog at {mask_url(args.pg_url)}")
        except target_schema.TargetSchemaError as exc:
            raise ConfigError(str(exc)) from None
    environment = {name: value for name, value in os.environ.items() if name != "SYNCD_CONFIG"}  # no config yet
    try:
        config = load_config(None, env=environment, overrides={"target.schema": args.schema,
                                                                **({"target.url": args.target} if args.target else {})})
        with secondary(config) as target:
            tables = target_schema.read_openapi(target)
    except ConfigError as exc:
        raise ConfigError(f"--target: {exc}") from None
    except TargetError as exc:
        raise bad_argument("--target", f"{mask_url(config.target.url)}: {exc.message}") from None
    if not tables:
        raise bad_argument("--target", f"{mask_url(config.target.url)} describes no table in schema {args.schema!r} to "
                                       "this key (PostgREST lists only the tables the key's role may use): give the "
                                       "service_role key, or --schema, or read the catalog with --pg-url")
    return tables, f"PostgREST's description at {mask_url(config.target.url)}"


# PostgREST's OpenAPI describes only what the key's role may use (PostgREST's openapi-mode, default follow-privileges).
HIDDEN_BY_GRANTS = (": PostgREST describes only the tables the key's role may use, so a table that exists "
                    "without a GRANT to it looks absent; read PostgreSQL's catalog instead (--pg-url URL --sql "
                    "grants.sql writes the GRANTs) or grant them first")


def init_onto_target(args: argparse.Namespace, conn: apsw.Connection, tables: list[Table], db: Path) -> int:
    """`init --target` / `--pg-url`: the mapping of the file's tables onto the secondary's (syncd.matching), written
    as a commented config; with --sql, the GRANTs syncd's key needs (no DDL: the tables exist)."""
    from syncd import matching, onboard

    targets, origin = target_tables(args)
    decisions = matching.decide(conn, tables, targets, args.target_prefix or "")
    synced = [d for d in decisions if d.target is not None]
    flag = "--pg-url" if args.pg_url else "--target"
    unseen = HIDDEN_BY_GRANTS if flag == "--target" and any(d.reason.startswith("no table in the secondary")
                                                             for d in decisions) else ""
    if not synced:
        reasons = "; ".join(f"{d.table.name}: {d.reason}" for d in decisions) or "it has no tables"
        raise bad_argument(flag, f"no table of {db} can ship into a table of the secondary ({reasons}){unseen}; "
                                 "nothing was written")
    unmatched = sorted(set(targets) - {d.target for d in synced})
    files = [(args.out, matching.render_config(decisions, db, args.out, args.schema, origin=origin,
                                                     url=args.target or None, unmatched_targets=unmatched))]
    if args.sql is not None:
        files.append((args.sql, matching.render_grants(decisions, args.schema, db)))
    try:
        onboard.write_new(files)
    except OSError as exc:
        raise ConfigError(f"--out/--sql: cannot write the files ({exc.strerror}: {exc.filename})") from None
    left = len(decisions) - len(synced)
    print(f"wrote {args.out}: {len(synced)} table(s) mapped onto the secondary's tables ({origin})"
          + (f", {left} left out (listed at its end with the reason)" if left else ""))
    if args.sql is not None:
        print(f"wrote {args.sql}: only the GRANTs syncd's key needs on those tables (no table is created)")
    for decision in decisions:
        if decision.target is None:
            print(f"left out: {decision.table.name}: {decision.reason}")
        for column in decision.columns:
            if decision.target is not None and column.target is None:
                print(f"left out: {decision.table.name}.{column.source}: {column.reason}")
        for warning in decision.warnings:
            print(f"warning: {decision.table.name}: {warning}")
    if unseen:
        print(f"note{unseen}")
    config = shlex.join(["--config", str(args.out)])
    grants = f"apply {args.sql} where the key's role lacks those GRANTs (psql -f), then " if args.sql else ""
    print(f"next: {grants}`syncd check {config}`, then `syncd install {config}`, then `syncd resync --all {config}` "
          f"(the rows already in the file, parents first), then `syncd run {config}`")
    return 0


def init_sources(args: argparse.Namespace) -> tuple[Sources | None, list[TenantFile]]:
    """`init --glob`: the [source] to write (onboard.Sources) and the matching files, sorted; (None, []) with --db.
    Raises ConfigError naming the flag: tenant flags without --glob, snapshot mode with it, no matching file, a bad
    --tenant pattern or column name."""
    from syncd import onboard

    given = [flag for flag, value, default in (("--tenant", args.tenant, "{stem}"),
                                               ("--tenant-column", args.tenant_column, "tenant_id"),
                                               ("--tenant-claim", args.tenant_claim, "tenant_id")) if value != default]
    if args.glob is None:
        if given:
            raise bad_argument(given[0], "only with --glob (multi-file mode: one file per tenant)")
        return None, []
    if args.consistency == "snapshot":
        raise bad_argument("--consistency", "snapshot mode serves one file; it is refused with --glob")
    if not any(c in args.glob for c in "*?["):
        raise bad_argument("--glob", f"{args.glob!r} has no wildcard (*, ? or [...]); for one file give --db")
    for flag, name in (("--tenant-column", args.tenant_column), ("--tenant-claim", args.tenant_claim)):
        if not name or len(name.encode()) > onboard.PG_NAME_BYTES or not name.isprintable() or \
                name.startswith(capture.OWNED_PREFIX):
            raise bad_argument(flag, f"{name!r} is not a usable name (1 to 63 bytes, printable)")
    try:
        pattern = tenants.TenantPattern.parse(args.tenant)
    except ValueError as exc:
        raise bad_argument("--tenant", str(exc)) from None
    files = tenants.discover(args.glob, Path.cwd(), pattern)
    if not files:
        raise bad_argument("--glob", f"no file matches {args.glob!r} (relative to {Path.cwd()}); nothing was written")
    return onboard.Sources(args.glob, args.tenant, args.tenant_column), files


def tenant_notes(tables: Sequence[Table], files: Sequence[TenantFile], args: argparse.Namespace) -> list[str]:
    """`init --glob`'s notes: how many files matched, those whose name gives no tenant id, those whose schema
    differs from the first's (at most 5 named of each), and a source column replaced by the tenant id."""
    from syncd import onboard

    said = [f"note: {len(files)} file(s) match {args.glob}; the catalog is {files[0].name}'s"]
    nameless = [f.name for f in files if f.tenant is None]
    if nameless:
        said.append(f"note: {len(nameless)} file(s) give no tenant id by --tenant {args.tenant!r} (not served until "
                    f"renamed): {', '.join(nameless[:5])}{' ...' if len(nameless) > 5 else ''}")
    differing: list[str] = []
    for file in files[1:]:
        try:
            other = sqlite.connect(file.path, readonly=True, setting="--glob")
            try:
                problems = onboard.shape_differences(tables, other)
            finally:
                other.close()
        except (sqlite.SourceFileError, apsw.Error) as exc:
            problems = [f"cannot be read ({exc})"]
        if problems:
            differing.append(f"{file.name}: {'; '.join(problems[:3])}")
    if differing:
        said.append(f"warning: {len(differing)} file(s) differ from {files[0].name} in the synced tables (their "
                    "rows would be refused or halted until migrated): " + " | ".join(differing[:5])
                    + (" ..." if len(differing) > 5 else ""))
    replaced = [t.name for t in tables if t.refused is None and t.column(args.tenant_column) is not None]
    if replaced:
        said.append(f"note: {', '.join(replaced)} have a column {args.tenant_column!r} of their own: the secondary's "
                    "holds the file's tenant id instead (give --tenant-column another name to keep both)")
    return said


def add_init_command(commands: Commands) -> None:
    """Register `init`."""
    p = commands.add_parser("init", help="write the config and the secondary's SQL from an existing SQLite file",
                            description="Read the SQLite file's catalog (read-only) and write a commented config "
                                        "(one [[table]] per table with a key, transforms from the declared types, "
                                        "the tables left out with the reason) and the secondary's idempotent DDL "
                                        "(types from the casting table, keys, UNIQUE, foreign keys, their indexes, "
                                        "row-level security for service_role, grants). With --target or --pg-url "
                                        "(no --apply): map onto the secondary's existing tables instead (names "
                                        "matched by case, plural, suffix and --target-prefix, transforms from their "
                                        "types, the key from their PRIMARY KEY, every decision a comment, what does "
                                        "not match listed with the reason), and write no DDL. Never overwrites a "
                                        "file.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", type=Path, help="the application's SQLite file")
    source.add_argument("--glob", help="multi-file mode: the tenants' files, e.g. 'tenants/*.sqlite3' (quoted), each "
                                       "with the same schema; the catalog is read from the first")
    p.add_argument("--tenant", default="{stem}", help="with --glob: the tenant id from a file's name (default "
                                                      "{stem}; {name}, {parent}, or e.g. 'tenant-{id}.db')")
    p.add_argument("--tenant-column", default="tenant_id",
                   help="with --glob: the secondary's column holding the tenant id, first in every key (default "
                        "tenant_id)")
    p.add_argument("--tenant-claim", default="tenant_id",
                   help="with --glob: the JWT claim naming the tenant whose rows an authenticated user may read "
                        "(default tenant_id; `syncd jwt sign --claim tenant_id=ID` signs one)")
    p.add_argument("--out", type=Path, default=Path("syncd.toml"), help="the config to write (default syncd.toml)")
    p.add_argument("--sql", type=Path,
                   help="the SQL to write (default schema.sql; drops into supabase/migrations/ as is); with --target "
                        "or --pg-url (no --apply) written only when given, and then only the GRANTs syncd's key needs "
                        "on the matched tables: no table is created")
    p.add_argument("--target", nargs="?", const="", metavar="URL",
                   help="map onto the tables the secondary already has instead of writing DDL: read them from "
                        "PostgREST's OpenAPI at URL (the API root, e.g. https://PROJECT.supabase.co/rest/v1; without "
                        "URL: SYNCD_TARGET_URL or SUPABASE_URL) with the key `syncd run` uses (SUPABASE_SERVICE_KEY, "
                        "SUPABASE_SERVICE_KEY_FILE, SUPABASE_JWT_SECRET or SUPABASE_JWT_SECRET_FILE)")
    p.add_argument("--target-prefix", metavar="P",
                   help="with --target or --pg-url: the secondary's tables may carry this prefix (app_ matches "
                        "app_artifacts to artifact)")
    p.add_argument("--tables", nargs="+", metavar="T", help="only these tables (default: every table)")
    p.add_argument("--exclude", nargs="+", metavar="T", help="leave these tables out")
    p.add_argument("--schema", default="public", help="the secondary's schema (default public)")
    p.add_argument("--foreign-keys", choices=("auto", "enforce", "comment"), default="auto",
                   help="auto (default): enforce the foreign keys no row of the file breaks, comment out the others; "
                        "comment: write every one as a comment (an app that deletes parents rows still reference); "
                        "enforce: write every one as a constraint")
    p.add_argument("--consistency", choices=("key", "snapshot"), default="key",
                   help="key (default): each row converges; snapshot: every state of the secondary is one the file "
                        "had (writes [worker] consistency = \"snapshot\" and adds syncd_apply's SQL to the SQL)")
    p.add_argument("--apply", action="store_true", help="also run the SQL on --pg-url, in one transaction")
    p.add_argument("--pg-url", help="the secondary's PostgreSQL URL (postgresql://...): with --apply, where the SQL "
                                    "runs; without it, read the tables the secondary already has from its catalog "
                                    "(as --target does from PostgREST) and map onto them instead of writing DDL")
    p.set_defaults(run=init)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every command, its flags and help."""
    parser = argparse.ArgumentParser(prog="syncd", description="Keep PostgreSQL (PostgREST / Supabase) in "
                                     "step with an application's SQLite file.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_capture_commands(commands)
    add_run_command(commands)
    add_operation_commands(commands)
    add_jwt_commands(commands)
    add_check_command(commands)
    add_healthcheck_command(commands)
    add_verify_commands(commands)
    add_dev_server(commands)
    add_demo_command(commands)
    add_init_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the command; its exit code (2 for a mistake an operator can fix, printed as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except apsw.BusyError as exc:  # a lock held past --lock-wait: the command ran into it, nothing changed
        print(f"error: {LOCK_WAITS[-1].describe() if LOCK_WAITS else exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except (apsw.NotADBError, apsw.CorruptError) as exc:  # the header looked like SQLite's (sqlite.check), the rest not
        print(f"error: source.path: the app's SQLite file is damaged or not a database (SQLite: {exc}); syncd changed "
              "nothing. `sqlite3 FILE 'PRAGMA integrity_check'` tells what is wrong; restore the file from a backup",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # not a mistake of the operator's: a bug, said as one
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        print(f"error: internal error in syncd {__version__} (a bug, not something you did wrong): please report it "
              "with the traceback above", file=sys.stderr)
        return EXIT_BUG
