"""The command line documents itself and README documents the command line (in the style of sqlite-utils'
test_docs.py): every command and flag has help text, and README names every command and every flag."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncd.casting import CASTS
from syncd.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """(command path, its parser, its help in the parent's list) for every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            yield action


ALL_COMMANDS = list(commands(build_parser()))
ALL_OPTIONS = [(path, action) for path, parser, _ in [((), build_parser(), None), *ALL_COMMANDS]
               for action in options(parser)]


def label(value: object) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return " ".join(value) or "syncd"
    return getattr(value, "dest", "")


@pytest.mark.parametrize(("path", "parser", "summary"), ALL_COMMANDS, ids=[" ".join(c[0]) for c in ALL_COMMANDS])
def test_every_command_has_help_and_is_in_the_readme(path: tuple[str, ...], parser: argparse.ArgumentParser,
                                                      summary: str | None):
    assert summary, f"`syncd {' '.join(path)}` has no help line in `syncd --help`"
    named = [f"syncd {' '.join(path)}", f"`{' '.join(path)}`"]
    assert any(name in README for name in named), f"README never names `syncd {' '.join(path)}`"


@pytest.mark.parametrize(("path", "action"), ALL_OPTIONS,
                         ids=[f"{' '.join(p) or 'syncd'} {a.option_strings[-1] if a.option_strings else a.dest}"
                              for p, a in ALL_OPTIONS])
def test_every_flag_has_help_and_is_in_the_readme(path: tuple[str, ...], action: argparse.Action):
    assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings or action.dest} has no help"
    if action.option_strings:
        flag = max(action.option_strings, key=len)
        assert re.search(re.escape(flag) + r"(?![\w-])", README), f"README never names {flag} of {label(path)}"


def test_the_listing_found_the_commands():
    """Guard the walk itself: the commands every operator knows are among those checked."""
    names = {" ".join(path) for path, _, _ in ALL_COMMANDS}
    assert {"install", "run", "status", "replay", "verify", "jwt gen", "dev-server", "demo"} <= names


def test_readme_shows_the_casting_table():
    """README's casting table is syncd/casting.py's CASTS, row for row (declared type, PostgreSQL type, transform)."""
    for declared, target, transform, why in CASTS:
        row = f"| {declared} | `{target}` | {f'`{transform}`' if transform else '-'} | {why} |"
        assert row in README, f"README's casting table lacks or differs in the row of {declared}"
