"""The `syncd` command line: parse, validate, call, print. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from syncd import __version__

Command = Callable[[argparse.Namespace], int]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncd", description="Keep PostgreSQL (PostgREST / Supabase) in "
                                     "step with an application's SQLite file.")
    parser.add_argument("--version", action="version", version=f"syncd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_dev_server(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
