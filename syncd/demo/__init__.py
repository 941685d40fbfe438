"""The demo: everything that exists to show syncd at work, and nothing syncd itself needs.

- `syncd.demo.command`: the `syncd demo` command (dev server, demo app, `syncd run`, an outage, a live view,
  `syncd verify`). `add_arguments` and `main` here are its entry points, as `syncd.cli` calls them.
- `syncd.demo.app`: the demo application, a stand-in for a real app writing to its SQLite file; `python -m
  syncd.demo.app` is the compose / Kubernetes app container.
- `schema.sql` (the demo app's SQLite schema) and `mapping.toml` (syncd's configuration for it: the mapping
  to the tables of deploy/supabase/migrations), package data read through `importlib.resources`.

Dependencies point one way: the demo uses syncd's modules, no syncd module but the CLI's `demo` command uses
the demo, and the demo never imports `syncd.cli`. Importing this package loads nothing else: the app container
(`python -m syncd.demo.app`) stays free of the command's imports, and `syncd --help` stays fast.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `syncd demo` flags (--rate, --duration, --outage, ...) to `parser`; see `command.add_arguments`."""
    from syncd.demo import command

    command.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run `syncd demo` with the flags parsed by `add_arguments`; the exit code (0: `syncd verify` found the
    secondary equal). Raises `syncd.config.ConfigError` for a bad flag, as `command.main` does."""
    from syncd.demo import command

    return command.main(args)
