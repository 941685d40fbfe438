"""The package's structure holds as README's Layout says: the import graph (every import, lazy ones
included, read from the source) has no cycle, each concept's owner is the only module that reaches it, and
only the command line imports the wiring of `run` and the demo."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "syncd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(module: str) -> set[str]:
    """The package's modules that `module` imports anywhere in its source (top level, in functions, lazily)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return (found & MODULES.keys()) - {module}


GRAPH = {module: imports(module) for module in MODULES}


def test_the_import_graph_has_no_cycle():
    sorter = graphlib.TopologicalSorter({m: {d for d in deps if d != "syncd"} for m, deps in GRAPH.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


@pytest.mark.parametrize("module", ["syncd.outbox", "syncd.keys", "syncd.lease"])
def test_the_outbox_and_its_keys_import_neither_capture_nor_mapping(module: str):
    assert not GRAPH[module] & {"syncd.capture", "syncd.mapping"}


def test_only_the_command_line_imports_the_wiring_of_run():
    assert {m for m, deps in GRAPH.items() if "syncd.daemon" in deps} == {"syncd.cli"}


def test_no_core_module_imports_the_demo():
    users = {m for m, deps in GRAPH.items() if any(d == "syncd.demo" or d.startswith("syncd.demo.") for d in deps)}
    assert {m for m in users if not m.startswith("syncd.demo")} == {"syncd.cli"}


def code_strings(module: str) -> list[str]:
    """Every string literal of a module but its docstrings (SQL is in those, prose is in docstrings)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_syncds_tables_are_written_by_their_owner_only():
    """SQL that reads or writes _syncd_outbox, _syncd_dead_letter or _syncd_meta of the app's file, or the state
    file's tables (st.journal and st.journal_batches, st.meta, st.acked), lives in syncd.outbox (and syncd.state,
    which creates the state file); capture's trigger bodies are the one exception (they append to the outbox in the
    app's own transaction)."""
    tables = ("_syncd_outbox", "_syncd_dead_letter", "_syncd_journal", "_syncd_meta", "st.journal", "st.meta",
              "st.acked")
    owners = {"syncd.outbox", "syncd.capture", "syncd.state"}
    strays = {module for module in MODULES if module not in owners and not module.startswith("syncd.devserver")
              and any(t in text for text in code_strings(module) for t in tables)}
    assert not strays, f"{sorted(strays)} touch syncd's tables; go through syncd.outbox"
