"""The `syncd` command line: parse, validate, call, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import apsw

from syncd import __version__, auth, capture, sqlite, status, timeparse
from syncd import replay as operations
from syncd.config import Config, ConfigError, load_config
from syncd.progress import Progress
from syncd.target import TargetError

# Mistakes an operator can fix: printed as one clear message, never as a traceback.
USER_ERRORS = (ConfigError, capture.CaptureError, sqlite.DatabaseNotFound, apsw.BusyError, apsw.SQLError, TargetError)


def load(args: argparse.Namespace, **overrides: object) -> Config:
    return load_config(args.config, overrides={"source.path": args.db, **overrides})


def bad_argument(flag: str, problem: str) -> ConfigError:
    return ConfigError("invalid arguments (1 problem):", [f"{flag}: {problem}"])


def install(args: argparse.Namespace) -> int:
    config = load(args)
    report = capture.install(sqlite.connect(config.source.path), config)
    print(f"installed in {config.source.path}: {len(report.created)} trigger(s) created, "
          f"{len(report.replaced)} replaced, {len(report.unchanged)} unchanged")
    for name in report.created + report.replaced:
        print(f"  {name}")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def uninstall(args: argparse.Namespace) -> int:
    config = load(args)
    report = capture.uninstall(sqlite.connect(config.source.path), drop_outbox=args.drop_outbox, force=args.force,
                               archive=args.archive)
    if args.archive:
        print(f"archived the outbox, dead letters, journal and meta to {args.archive}")
    print(f"removed {len(report.dropped_triggers)} trigger(s)"
          + (f" and {', '.join(report.dropped_tables)}" if report.dropped_tables else
             "; the outbox and dead letters stay (use --drop-outbox to remove them)"))
    return 0


def show_status(args: argparse.Namespace) -> int:
    config = load(args)
    result = status.collect(sqlite.connect(config.source.path), config, max_lag=args.max_lag)
    print(json.dumps(result.as_dict(), indent=2) if args.json else status.render(result))
    return 0 if result.healthy else 1


def run(args: argparse.Namespace) -> int:
    from syncd import daemon

    config = load(args, **{f"worker.{k}": getattr(args, k) for k in WORKER_FLAGS})
    return daemon.run(config, once=args.once, log_format=args.log_format)


WORKER_FLAGS = ("batch_size", "poll_interval", "shutdown_timeout", "metrics_addr")


def add_run_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("run", help="drain the outbox to the secondary (the daemon)",
                            description="Ship every captured change to PostgREST: wake on commits, batch, retry "
                                        "transient failures forever, dead-letter rows the secondary refuses, "
                                        "serve /metrics, /healthz and /readyz.")
    add_config_options(p)
    p.add_argument("--once", action="store_true", help="drain until the outbox is empty, then exit")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="outbox entries per batch (default 500)")
    p.add_argument("--poll-interval", dest="poll_interval", type=float,
                   help="seconds between checks when no change wakes the loop (default 1)")
    p.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=float,
                   help="seconds to finish the request in flight at SIGTERM (default 10)")
    p.add_argument("--metrics-addr", dest="metrics_addr", help="host:port of /metrics (default 127.0.0.1:9464)")
    p.add_argument("--log-format", choices=("json", "console"), default="json", help="log lines for machines or people")
    p.set_defaults(run=run)


def replay(args: argparse.Namespace) -> int:
    config = load(args)
    conn = sqlite.connect(config.source.path)
    if args.dead_letters:
        with Progress("replay") as progress:
            result = operations.replay_dead_letters(conn, table=args.table, ids=args.id or (), dry_run=args.dry_run,
                                                    progress=progress)
        what = "dead letter(s)"
    else:
        now = time.time()
        try:
            since = operations.parse_time(args.since, now)
            until = operations.parse_time(args.until, now) if args.until else None
        except ValueError as exc:
            raise bad_argument("--since/--until", str(exc)) from None
        with Progress("replay") as progress:
            result = operations.replay_journal(conn, since, until, table=args.table, dry_run=args.dry_run,
                                               progress=progress)
        what = "shipped key(s) from the journal"
    verb = "would re-enqueue" if result.dry_run else "re-enqueued"
    print(f"{verb} {result.keys} {what}" + ("" if result.dry_run else "; `syncd run` ships them"))
    return 0


def resync(args: argparse.Namespace) -> int:
    config = load(args)
    table_config = config.table(args.table)
    if table_config is None:
        raise capture.CaptureError(f"table {args.table!r} is not configured; add a [[table]] section for it")
    conn = sqlite.connect(config.source.path)
    planned = capture.plan_table(conn, table_config)
    with Progress(f"resync {args.table}") as progress:
        result = operations.resync(conn, planned, where=args.where, dry_run=args.dry_run, progress=progress)
    verb = "would enqueue" if result.dry_run else "enqueued"
    print(f"{verb} {result.keys} key(s) of {args.table}" + ("" if result.dry_run else "; `syncd run` ships them"))
    return 0


def add_operation_commands(commands: argparse._SubParsersAction) -> None:
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
    p.add_argument("--id", type=int, action="append", help="with --dead-letters: only these dead letter ids")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    p.set_defaults(run=replay)
    for name in ("resync", "backfill"):
        p = commands.add_parser(name, help="enqueue every key of a table (initial backfill or full resync)",
                                description="Enqueue every key of a table in chunks, each its own short "
                                            "transaction, while the app writes and the daemon ships.")
        add_config_options(p)
        p.add_argument("--table", required=True, help="the SQLite table")
        p.add_argument("--where", help="only rows matching this SQL condition on the table")
        p.add_argument("--dry-run", action="store_true", help="count, change nothing")
        p.set_defaults(run=resync)


def jwt_secret(args: argparse.Namespace, required: bool) -> str | None:
    secret = args.secret or os.environ.get("SUPABASE_JWT_SECRET")
    if required and not secret:
        raise bad_argument("--secret", "missing; pass --secret or set SUPABASE_JWT_SECRET (try: syncd jwt gen)")
    if secret and len(secret) < auth.MIN_SECRET_LENGTH:
        raise bad_argument("--secret", f"shorter than {auth.MIN_SECRET_LENGTH} characters; PostgREST refuses it")
    return secret


def duration(flag: str, text: str) -> float:
    try:
        return timeparse.parse_duration(text)
    except ValueError as exc:
        raise bad_argument(flag, str(exc)) from None


def jwt_gen(args: argparse.Namespace) -> int:
    try:
        secret = auth.generate_secret(args.secret_length)
    except ValueError as exc:
        raise bad_argument("--secret-length", str(exc)) from None
    lifetime = duration("--expires-in", args.expires_in)
    anon = auth.mint_token(secret, "anon", expires_in=lifetime)
    service = auth.mint_token(secret, "service_role", expires_in=lifetime)
    print(f"Generated JWT Secret ({len(secret)} chars):\n{secret}\n\nPostgREST Configuration:\n"
          f"PGRST_JWT_SECRET={secret}\n\nAnon Key (role=anon):\n{anon}\n\n"
          f"Service Role Key (role=service_role):\n{service}\n\nFor .env.local:\nSUPABASE_JWT_SECRET={secret}\n"
          f"SUPABASE_ANON_KEY={anon}\nSUPABASE_SERVICE_KEY={service}")
    return 0


def jwt_sign(args: argparse.Namespace) -> int:
    secret = jwt_secret(args, required=True)
    claims: dict[str, object] = {k: v for k, v in (("sub", args.sub), ("email", args.email)) if v}
    aud = args.aud or ("authenticated" if args.role == "authenticated" else None)
    if aud:
        claims["aud"] = aud
    print(auth.mint_token(secret, args.role, expires_in=duration("--expires-in", args.expires_in), **claims))  # type: ignore[arg-type]
    return 0


def jwt_verify(args: argparse.Namespace) -> int:
    report = auth.inspect_token(args.token, jwt_secret(args, required=False))
    if report.problem:
        print(f"INVALID: {report.problem}")
        return 1
    claims = report.claims
    print(f"signature: {report.signature}")
    print(f"role:      {claims.get('role', '(none: PostgREST uses the anonymous role)')}")
    for name in ("sub", "aud", "email", "iss"):
        if name in claims:
            print(f"{name + ':':10} {claims[name]}")
    for name in ("iat", "exp"):
        if isinstance(claims.get(name), int | float):
            print(f"{name + ':':10} {datetime.fromtimestamp(claims[name], UTC).isoformat()}")
    if report.expired:
        ago = status.age(time.time() - claims["exp"])
        print(f"EXPIRED {ago} ago: PostgREST answers 401 PGRST301 'JWT expired'; sign a new one (syncd jwt sign)")
    elif "exp" not in claims:
        print("expires:   never (no exp claim)")
    return 0 if report.signature != "INVALID" and not report.expired else 1


def run_check(args: argparse.Namespace) -> int:
    from syncd import check, daemon

    config = load(args)
    findings = check.run_checks(config, sqlite.connect(config.source.path), daemon.token_source(config), args.pg_url)
    for finding in findings:
        print(finding.line())
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warn" for f in findings)
    print(f"{errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def run_verify(args: argparse.Namespace) -> int:
    from syncd import daemon, verify

    config = load(args)
    with daemon.open_target(config) as target:
        result = verify.verify(sqlite.connect(config.source.path), config, target, tables=args.table,
                               repair=args.repair, dry_run=args.dry_run, page=args.page_size, progress=Progress)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.render())
    return 0 if result.equal else 1


def run_cutover(args: argparse.Namespace) -> int:
    from syncd import cutover, daemon

    config = load(args)
    timeout = duration("--timeout", args.timeout)
    with daemon.open_target(config) as target:
        readiness = cutover.check_readiness(sqlite.connect(config.source.path), config, target, timeout=timeout,
                                            progress=Progress)
    if readiness.verification is not None:
        print(readiness.verification.render())
    if not readiness.ready:
        print("\nNOT READY to cut over:")
        for reason in readiness.reasons:
            print(f"  - {reason}")
        return 1
    print("\nREADY to cut over: the outbox is empty, no dead letters, every table equal.\n")
    print(cutover.instructions(config))
    return 0


def add_verify_commands(commands: argparse._SubParsersAction) -> None:
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
    p.add_argument("--page-size", dest="page_size", type=int, default=5000, help="rows per read (default 5000)")
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


def add_check_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("check", help="check config, key, connectivity and the secondary's tables before a run",
                            description="Check the configuration, the SQLite side, the key (role, expiry), "
                                        "connectivity, and that every mapped table and column exists in the "
                                        "secondary with a compatible type and a unique key; with --pg-url also "
                                        "RLS policies that read request.jwt.claim.*. Exit 1 when anything is an "
                                        "error; each problem comes with its fix. Writes nothing.")
    add_config_options(p)
    p.add_argument("--pg-url", help="the secondary's PostgreSQL URL, to inspect RLS policies (optional)")
    p.set_defaults(run=run_check)


def add_jwt_commands(commands: argparse._SubParsersAction) -> None:
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
    sign.add_argument("--expires-in", default="1h", help="lifetime, e.g. 15m, 1h, 7d (default 1h)")
    sign.add_argument("--secret", help="the JWT secret (default: $SUPABASE_JWT_SECRET)")
    sign.set_defaults(run=jwt_sign)
    verify = verbs.add_parser("verify", help="check a token's signature, role and expiry")
    verify.add_argument("token", help="the JWT")
    verify.add_argument("--secret", help="the JWT secret (default: $SUPABASE_JWT_SECRET); without it the "
                                         "signature is not checked")
    verify.set_defaults(run=jwt_verify)


def add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML configuration file (default: $SYNCD_CONFIG)")
    p.add_argument("--db", help="the application's SQLite file (overrides source.path and $SYNCD_DB)")


def add_capture_commands(commands: argparse._SubParsersAction) -> None:
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
    add_config_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--max-lag", type=float, default=status.DEFAULT_MAX_LAG_SECONDS,
                   help="pending changes older than this many seconds are a problem (default 300)")
    p.set_defaults(run=show_status)


def dev_server(args: argparse.Namespace) -> int:
    try:
        from syncd.devserver import server
    except ImportError as exc:
        print(f"error: the dev server needs its extra ({exc.name} is missing); try: pip install 'syncd[devserver]'",
              file=sys.stderr)
        return 2
    options = server.Options(
        host=args.host, port=args.port, prefix="/" + args.prefix.strip("/") if args.prefix.strip("/") else "",
        pg_url=args.pg_url, data_dir=args.data_dir, migrations=args.migrations, jwt_secret=args.jwt_secret,
        require_apikey=args.require_apikey, faults=args.faults,
        schemas=tuple(s.strip() for s in args.schemas.split(",") if s.strip()), anon_role=args.anon_role,
        pool_size=args.pool_size, pool_timeout=args.pool_timeout,
    )
    return server.run(options)


def add_dev_server(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "dev-server", help="serve the PostgREST protocol over a real PostgreSQL, for tests and the demo",
        description="Start (or connect to) PostgreSQL, apply the migrations, and serve a PostgREST v12-"
                    "compatible API. Prints one JSON line with url, pg_url, jwt_secret, anon_key and "
                    "service_key when ready; SIGTERM/SIGINT stop it and remove temporary data.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=54321, help="port to listen on, 0 for any free port (default 54321)")
    p.add_argument("--prefix", default="/rest/v1", help="API path prefix (default /rest/v1)")
    p.add_argument("--pg-url", help="use this PostgreSQL instead of starting a throwaway one")
    p.add_argument("--data-dir", type=Path, help="keep the throwaway PostgreSQL's data in DIR")
    p.add_argument("--migrations", type=Path, help="apply DIR/*.sql in name order (default deploy/supabase/migrations)")
    p.add_argument("--jwt-secret", help="HS256 secret (default: $SUPABASE_JWT_SECRET, else a random one)")
    p.add_argument("--require-apikey", action="store_true", help="demand the apikey header, as Supabase's gateway")
    p.add_argument("--faults", action="store_true", help="enable fault injection at /_dev/faults and /_dev/stats")
    p.add_argument("--schemas", default="public", help="exposed schemas, comma separated (default public)")
    p.add_argument("--anon-role", default="anon", help="role for requests without a token (default anon)")
    p.add_argument("--pool-size", type=int, default=10, help="database connections (default 10)")
    p.add_argument("--pool-timeout", type=float, default=10.0,
                   help="seconds to wait for a free connection before answering 504 PGRST003 (default 10)")
    p.set_defaults(run=dev_server)


def add_demo_command(commands: argparse._SubParsersAction) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncd", description="Keep PostgreSQL (PostgREST / Supabase) in "
                                     "step with an application's SQLite file.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_capture_commands(commands)
    add_run_command(commands)
    add_operation_commands(commands)
    add_jwt_commands(commands)
    add_check_command(commands)
    add_verify_commands(commands)
    add_dev_server(commands)
    add_demo_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
