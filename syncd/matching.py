"""`syncd init --target` / `--pg-url`: which of the secondary's tables and columns each SQLite table and column ships
into, and with which transform, decided from names and types and said for each (issue 24).

Names (`relation`): a source and a target name match when they are the same (strongest), the same but for letter
case, or the same words in another style (`api_endpoint`, `apiEndpoint`, `APIEndpoint`, `apiendpoint`), one the
plural of the other (`entry` / `entries`, English rules of `plural`), and, for columns, one without a suffix people
add to say the kind (`extra_json` / `extras`, `created_at` / `created`: SUFFIXES). The plural rules are a small
explicit English set (`plural`, `plurals`), not a library: inflection (the Rails port) has had no release since
2020, inflect is built for prose; a name needs only "is one the plural of the other", tested by examples and
hypothesis; a target table may carry the
`--target-prefix` (`app_artifacts` for `artifact`). `assign` gives each source name the target of its strongest
match; two targets at the same strength, or two sources on one target at the same strength, are ambiguous: left
out with the candidates named, never chosen.

Types (`choose_transform`): the target's type chooses the transform (syncd/mapping.py CONVERTERS): jsonb/json ->
`json`, boolean -> `bool`, timestamptz/timestamp -> `timestamp`, bytea -> `bytea`, pgvector's vector -> `vector`;
any other type takes the value as it is. A value the target would refuse is found from the source's declared type
(a BLOB into text) and from a sample of the values (SAMPLE_ROWS, each run through the transform as `syncd run`
would, then tested against the type: a non-number into integer): such a column is left out with an example.
"""

from __future__ import annotations

import difflib
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path

import apsw

from syncd import casting
from syncd.mapping import RowError, TableMapping
from syncd.onboard import Column, Table, toml_string
from syncd.sqlite import quote_ident
from syncd.target_schema import TargetColumn, TargetTable

__all__ = ["SUFFIXES", "Choice", "ColumnDecision", "TableDecision", "assign", "choose_transform", "decide", "plural",
           "plurals", "relation", "render_config", "render_grants"]

SUFFIXES = ("_json", "_jsonb", "_at", "_ts")  # what a column name may add to say its kind
SAMPLE_ROWS = 1000  # non-NULL values of a column read to see whether the target takes them
# Words whose plural is not one of the rules' (and words with no plural: the same word).
IRREGULAR = {"person": "people", "child": "children", "man": "men", "woman": "women", "mouse": "mice",
             "goose": "geese", "foot": "feet", "tooth": "teeth", "datum": "data", "medium": "media",
             "criterion": "criteria", "phenomenon": "phenomena", "leaf": "leaves", "life": "lives",
             "knife": "knives", "wife": "wives", "half": "halves", "shelf": "shelves", "self": "selves",
             "matrix": "matrices", "vertex": "vertices", "appendix": "appendices", "quiz": "quizzes",
             "ox": "oxen", "cactus": "cacti", "radius": "radii", "syllabus": "syllabi"}
UNCOUNTABLE = frozenset({"evidence", "information", "data", "metadata", "news", "series", "species", "equipment",
                         "feedback", "software", "hardware", "staff", "sheep", "fish", "deer", "advice", "knowledge",
                         "music", "money", "research", "traffic", "audio", "media", "history", "inventory"})
INTEGER_RANGES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}
NUMBERS = {"numeric", "real", "double precision", "money"}
TEXTS = {"text", "character varying", "character", "citext", "name", "bpchar"}
TRANSFORM_OF_TYPE = {"json": "json", "jsonb": "json", "boolean": "bool", "timestamp with time zone": "timestamp",
                     "timestamp without time zone": "timestamp", "bytea": "bytea", "vector": "vector"}
CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# ---- names -----------------------------------------------------------------------------------------------


def plural(word: str) -> str:
    """The English plural of a lower-case word (its last `_` part in a compound name) by the rules: uncountable words
    stay, -s/-x/-z/-ch/-sh -> -es, consonant + y -> -ies, -is -> -es, else -s (IRREGULAR plurals: `plurals`)."""
    head, _, last = word.rpartition("_")
    head = head + "_" if head else ""
    if last in UNCOUNTABLE or any(last.endswith(w) and len(last) > len(w) + 2 for w in ("data", "evidence")):
        return word
    if last.endswith("is") and len(last) > 3:
        return head + last[:-2] + "es"
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return head + last + "es"
    if last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        return head + last[:-1] + "ies"
    return head + last + "s"


def plurals(word: str) -> set[str]:
    """The plurals a name may use: the rules' (`plural`) and, for an irregular word, its own (person: persons and
    people, so that a secondary with both tables is ambiguous, not guessed)."""
    head, _, last = word.rpartition("_")
    found = {plural(word)}
    if last in IRREGULAR:
        found.add((head + "_" if head else "") + IRREGULAR[last])
    return found


def snake(name: str) -> str:
    """`APIEndpoint` -> `api_endpoint`, `createdAt` -> `created_at`, `Log-Entry` -> `log_entry`."""
    return CAMEL.sub("_", name).replace("-", "_").replace(" ", "_").lower()


def forms(name: str, suffixes: Sequence[str]) -> list[tuple[str, str]]:
    """(snake form, how it was made) of `name`: itself, then without each suffix it ends with."""
    base = snake(name)
    return [(base, "")] + [(base[:-len(s)], f"without its {s} suffix") for s in suffixes
                           if base.endswith(s) and len(base) > len(s)]


def relation(source: str, target: str, suffixes: Sequence[str] = ()) -> tuple[int, str] | None:
    """How `source` names the same thing as `target`, as (strength, words): 0 the same name, 1 the same but for
    letter case, 2 the same words in another style, 3 one the plural of the other or a suffix dropped; None when
    they are unrelated."""
    if source == target:
        return 0, "same name"
    if source.lower() == target.lower():
        return 1, "same name in another letter case"
    best: tuple[int, str] | None = None
    for a, how_a in forms(source, suffixes):
        for b, how_b in forms(target, suffixes):
            flat_a, flat_b = a.replace("_", ""), b.replace("_", "")
            how = "; ".join(filter(None, [f"{source} {how_a}" if how_a else "", f"{target} {how_b}" if how_b else ""]))
            if flat_a == flat_b:
                found = (2 if not how else 3, how or "same words in another style")
            elif flat_b in {p.replace("_", "") for p in plurals(a)}:
                styled = "" if b in plurals(a) else ", its words written another way"
                found = (3, "; ".join(filter(None, [how, f"{target} is the plural{styled}"])))
            elif flat_a in {p.replace("_", "") for p in plurals(b)}:
                styled = "" if a in plurals(b) else ", its words written another way"
                found = (3, "; ".join(filter(None, [how, f"{source} is the plural{styled}"])))
            else:
                continue
            if best is None or found[0] < best[0]:
                best = found
    return best


@dataclass
class Choice:
    """What `assign` chose for one source name: its target and the rule (None: none), or why not: the candidates
    of an ambiguous match, or the source that took the only candidate."""

    target: str | None = None
    rule: str = ""
    candidates: list[str] = field(default_factory=list)
    taken_by: str | None = None


def assign(sources: Sequence[str], targets: Sequence[str],
           related: Callable[[str, str], tuple[int, str] | None]) -> dict[str, Choice]:
    """Each source's target: the one of its strongest relation. Two targets at that strength: ambiguous (no target,
    both candidates). Two sources whose strongest candidate is one target: the stronger takes it, the other has none
    (`taken_by`); at equal strength neither does (ambiguous, each naming the other)."""
    proposals: dict[str, tuple[int, str, str]] = {}
    choices = {s: Choice() for s in sources}
    for source in sources:
        found = [(r[0], r[1], t) for t in targets if (r := related(source, t)) is not None]
        if not found:
            continue
        strongest = min(f[0] for f in found)
        best = [f for f in found if f[0] == strongest]
        if len(best) > 1:
            choices[source].candidates = sorted(t for _, _, t in best)
        else:
            proposals[source] = best[0]
    for target in dict.fromkeys(p[2] for p in proposals.values()):
        rivals = sorted((p[0], s) for s, p in proposals.items() if p[2] == target)
        if len(rivals) > 1 and rivals[0][0] == rivals[1][0]:
            tied = [s for strength, s in rivals if strength == rivals[0][0]]
            for source in tied:
                choices[source].candidates = [target]
                choices[source].taken_by = " or ".join(s for s in tied if s != source)
            rivals = [r for r in rivals if r[1] not in tied]
            winner = None
        else:
            tied = []
            winner = rivals[0][1]
            choices[winner].target, choices[winner].rule = target, proposals[winner][1]
        for _, loser in rivals[1 if winner else 0:]:
            choices[loser].taken_by = winner or " or ".join(tied)
    return choices


def table_relation(prefix: str) -> Callable[[str, str], tuple[int, str] | None]:
    """`relation` for table names, where the target may also carry `prefix` (matched in any letter case)."""
    def related(source: str, target: str) -> tuple[int, str] | None:
        found = relation(source, target)
        if prefix and target.lower().startswith(prefix.lower()) and len(target) > len(prefix):
            unprefixed = relation(source, target[len(prefix):])
            if unprefixed is not None:
                prefixed = (unprefixed[0] + 1, f"the prefix {prefix} dropped"
                            + ("" if unprefixed[0] == 0 else f"; {unprefixed[1]}"))
                found = prefixed if found is None or prefixed[0] < found[0] else found
        return found
    return related


# ---- types -----------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """The transform a source column takes into a target column, or why it cannot land there (`problem`); `note`:
    what the decision rests on, for the comment."""

    transform: str | None = None
    problem: str | None = None
    note: str = ""


def choose_transform(column: Column, target: TargetColumn) -> Fit:
    """The transform from the target's type (TRANSFORM_OF_TYPE), or a problem the declared types show alone: the
    target is generated; a BLOB into a type that takes no bytes; numbers into a date."""
    kind = target.base
    declared = column.declared or "(no type)"
    source_affinity = casting.affinity(column.declared)
    if target.generated:
        return Fit(problem=f"{target.name} is a generated column there: PostgreSQL refuses any value sent to it")
    transform = TRANSFORM_OF_TYPE.get(kind)
    if transform is None and kind.endswith("[]"):
        return Fit(note=f"{declared} -> {target.type}: sent as it is (PostgreSQL reads an array literal '{{a,b}}')")
    if source_affinity == "BLOB" and transform not in ("bytea", "vector", "json"):
        return Fit(problem=f"{declared} -> {target.type}: a BLOB reaches PostgreSQL only as bytea or vector")
    if kind == "date" and source_affinity in ("INTEGER", "REAL"):
        return Fit(problem=f"{declared} -> date: PostgreSQL refuses numbers as dates")
    if transform:
        return Fit(transform, note=f"{declared} -> {target.type}: transform {transform}")
    return Fit(note=f"{declared} -> {target.type}" + ("" if kind in TEXTS else ": sent as it is"))


def refusal(value: object, kind: str) -> str | None:
    """Why PostgreSQL refuses this mapped value (what syncd sends) in a column of type `kind` (base type), or None.
    Only what can be told here: texts and JSON take anything; the rest is PostgreSQL's to judge."""
    if kind in INTEGER_RANGES:
        number = value
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                return "not an integer"
        if isinstance(number, bool) or not isinstance(number, int):
            return "not an integer"  # a float, 1.0 included: PostgreSQL refuses its text '1.0' as an integer
        return None if -INTEGER_RANGES[kind] <= number < INTEGER_RANGES[kind] else f"beyond {kind}"
    if kind in NUMBERS:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return None
        try:
            Decimal(str(value).strip())
        except InvalidOperation:
            return "not a number"
        return None
    if kind == "uuid":
        try:
            return None if str(uuid.UUID(str(value))) == value else "a uuid PostgreSQL rewrites (lower case, hyphens)"
        except ValueError:
            return "not a uuid"
    if kind == "date":
        try:
            date.fromisoformat(str(value)[:10])
        except ValueError:
            return "not a date"
    return None


def sample(conn: apsw.Connection, table: str, column: str, limit: int = SAMPLE_ROWS) -> list[object]:
    """Up to `limit` non-NULL values of the column (the first rows SQLite reads; no ORDER BY, so no sort)."""
    q = quote_ident(column)
    return [row[0] for row in conn.execute(f"SELECT {q} FROM {quote_ident(table)} WHERE {q} IS NOT NULL LIMIT ?",
                                           (limit,))]


def check_values(values: Sequence[object], table: str, column: str, fit: Fit, target: TargetColumn) -> Fit:
    """`fit` with a problem when a sampled value would be refused: by the transform (its own message) or by the
    target's type (`refusal`); with a note of how many values were sampled when the target is stricter than text."""
    mapping = TableMapping(table, table, (column,), transforms={column: fit.transform} if fit.transform else {})
    for value in values:
        try:
            shipped = mapping.map_row({column: value}, ())[column]
        except RowError as exc:  # "table 't', key (), column 'c': problem; fix"
            problem = str(exc).split(": ", 1)[-1].rsplit("; ", 1)[0]
            return Fit(problem=f"a sampled value cannot be shipped ({problem})")
        why = refusal(shipped, target.base) if shipped is not None else None
        if why:
            shown = repr(value)[:40]
            return Fit(problem=f"{target.type} would refuse the sampled value {shown} ({why})")
    if fit.transform or target.base not in TEXTS:
        fit.note += f"; {len(values)} value(s) sampled fit" if values else "; no value to sample yet"
    return fit


# ---- the decisions -----------------------------------------------------------------------------------------


@dataclass
class ColumnDecision:
    """One source column: the target column it ships into and how (None: left out, with `reason`)."""

    source: str
    target: str | None
    rule: str = ""
    transform: str | None = None
    note: str = ""
    reason: str = ""


@dataclass
class TableDecision:
    """One source table: its target table (None: not synced, with `reason`), its columns, the key as SQLite names
    it (None: the SQLite PRIMARY KEY), the tables it ships after (the target's foreign keys), and warnings."""

    table: Table
    target: str | None = None
    rule: str = ""
    columns: list[ColumnDecision] = field(default_factory=list)
    key: list[str] | None = None
    after: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reason: str = ""

    @property
    def excluded(self) -> list[str]:
        return [c.source for c in self.columns if c.target is None]


def why_no_target(name: str, choice: Choice, suffixes: Sequence[str] = ()) -> str:
    """The reason a table or column has no target: ambiguous, taken, or nothing of that name."""
    if choice.taken_by and choice.candidates:
        return (f"ambiguous: {choice.candidates[0]} matches {name} as well as {choice.taken_by}; say which in the "
                "config")
    if choice.candidates:
        return f"ambiguous: {' and '.join(choice.candidates)} both match it; say which in the config"
    if choice.taken_by:
        return f"its only match is taken by {choice.taken_by}, a closer name"
    return "no name there is the same, in another case or style, its plural or singular" + (
        ", or the same without a suffix" if suffixes else "")


def decide(conn: apsw.Connection, tables: Sequence[Table], targets: dict[str, TargetTable], prefix: str = ""
           ) -> list[TableDecision]:
    """The decision for each table `onboard.read_catalog` read, onto the secondary's `targets`."""
    synced = [t for t in tables if t.refused is None]
    choices = assign([t.name for t in synced], sorted(targets), table_relation(prefix))
    decisions = []
    for table in tables:
        if table.refused is not None:
            decisions.append(TableDecision(table, reason=table.refused))
            continue
        choice = choices[table.name]
        if choice.target is None:
            near = difflib.get_close_matches(snake(table.name), sorted(targets), n=2, cutoff=0.5)
            hint = f" (closest names there: {', '.join(near)})" if near and not choice.candidates else ""
            decisions.append(TableDecision(table, reason=f"no table in the secondary matches {table.name!r}: "
                                           + why_no_target(table.name, choice) + hint))
            continue
        decisions.append(decide_table(conn, table, targets[choice.target], choice.rule))
    order_after(decisions, targets)
    return decisions


def decide_table(conn: apsw.Connection, table: Table, target: TargetTable, rule: str) -> TableDecision:
    """One table onto its target: columns (`assign` with SUFFIXES), their transforms and sampled values, the key
    from the target's PRIMARY KEY, and the target's NOT NULL columns nothing fills."""
    decision = TableDecision(table, target.name, rule)
    choices = assign([c.name for c in table.columns], [c.name for c in target.columns],
                     lambda s, t: relation(s, t, SUFFIXES))
    for column in table.columns:
        choice = choices[column.name]
        if choice.target is None:
            decision.columns.append(ColumnDecision(column.name, None, reason=f"no column of {target.name} matches "
                                                   f"it: {why_no_target(column.name, choice, SUFFIXES)}"))
            continue
        there = target.column(choice.target)
        assert there is not None
        fit = choose_transform(column, there)
        if fit.problem is None and (fit.transform or there.base not in TEXTS):
            fit = check_values(sample(conn, table.name, column.name), table.name, column.name, fit, there)
        if fit.problem is not None:
            decision.columns.append(ColumnDecision(column.name, None, reason=f"into {there.name}: {fit.problem}"))
        else:
            decision.columns.append(ColumnDecision(column.name, there.name, choice.rule, fit.transform, fit.note))
    decision.reason = key_problem(decision, target) or unfed_problem(decision, target)
    if decision.reason:
        decision.target = None
    return decision


def key_problem(decision: TableDecision, target: TargetTable) -> str:
    """Why the target's PRIMARY KEY cannot be the key (sets `decision.key` when it is not SQLite's own): none
    there, a key column no source column ships into, or source columns that are no key in SQLite."""
    shipped = {c.target: c.source for c in decision.columns if c.target is not None}
    if not target.key:
        return (f"{target.name} has no PRIMARY KEY in the secondary: an upsert needs one (on_conflict, 42P10); add it "
                "there")
    unfed = [k for k in target.key if k not in shipped]
    if unfed:
        return f"{target.name}'s PRIMARY KEY column(s) {', '.join(unfed)} match no shipped column of SQLite"
    key = [shipped[k] for k in target.key]
    table = decision.table
    if sorted(key) == sorted(table.key):
        decision.key = None if table.key_declared else table.key
        return ""
    if sorted(key) in [sorted(u) for u in table.unique] and all((c := table.column(k)) and c.not_null for k in key):
        decision.key = key
        return ""
    return (f"{target.name}'s PRIMARY KEY ({', '.join(target.key)}) is ({', '.join(key)}) in SQLite, which is not a "
            "key there: two SQLite rows could land on one row")


def unfed_problem(decision: TableDecision, target: TargetTable) -> str:
    """Why every upsert would be refused (23502): a NOT NULL column without a default that nothing ships into; a
    column whose default the description cannot show becomes a warning."""
    shipped = {c.target for c in decision.columns if c.target is not None}
    unfed = [c for c in target.columns if c.not_null and c.name not in shipped]
    certain = [c.name for c in unfed if c.fed is False]
    for column in unfed:
        if column.fed is None:
            decision.warnings.append(f"{target.name}.{column.name} is NOT NULL and PostgREST shows no default for it "
                                     f"({column.type}: it shows none for sequences, identity, json/jsonb and arrays); "
                                     "if it has none, every upsert is refused (23502): init --pg-url reads the catalog "
                                     "and tells")
    if certain:
        return (f"{target.name} has NOT NULL column(s) {', '.join(certain)} without a default that SQLite has no "
                "column for: every upsert would be refused (23502); give them a default there, or drop NOT NULL")
    return ""


def order_after(decisions: list[TableDecision], targets: dict[str, TargetTable]) -> None:
    """`after` for each synced table: the synced tables its target's foreign keys point to (a self-reference and a
    foreign key SQLite declares too need none), unless that closes a cycle (then noted: config refuses cycles)."""
    source_of = {d.target: d.table.name for d in decisions if d.target is not None}
    edges: dict[str, list[str]] = {}
    for decision in decisions:
        if decision.target is None:
            continue
        declared = {fk.parent for fk in decision.table.foreign_keys}
        parents = {source_of[c.references] for c in targets[decision.target].columns
                   if c.references in source_of and c.references != decision.target}
        decision.after = sorted(p for p in parents - declared if p != decision.table.name)
        edges[decision.table.name] = decision.after + sorted(declared)
    for decision in decisions:
        for parent in list(decision.after):
            if reaches(edges, parent, decision.table.name):
                decision.after.remove(parent)
                edges[decision.table.name].remove(parent)
                decision.warnings.append(f"the secondary's foreign key to {parent}'s table closes a cycle: no "
                                         "`after` for it (syncd ships each table in its own request)")


def reaches(edges: dict[str, list[str]], start: str, goal: str) -> bool:
    """Whether `goal` is reachable from `start` along `edges` (table -> tables it ships after)."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(edges.get(node, ()))
    return False


# ---- the config -------------------------------------------------------------------------------------------


def render_config(decisions: Sequence[TableDecision], db: Path, out: Path, schema: str, *, origin: str,
                         url: str | None = None, unmatched_targets: Sequence[str] = ()) -> str:
    """The commented syncd.toml of `init --target` / `--pg-url` (the decisions of `decide`): [source], [target]
    (`url` when given on the command line), one [[table]] per matched table with each column's decision as a
    comment beside its setting, then the tables left out with the reason and the secondary's tables nothing ships
    into. `origin`: where the secondary's schema was read (for the header)."""
    synced = [d for d in decisions if d.target is not None]
    left = len(decisions) - len(synced)
    lines = [f"# syncd configuration, written by `syncd init` from {db.name} onto the tables the secondary already has "
             f"({origin}): {len(synced)} table(s) synced" + (f", {left} left out (at the end, with the reason)."
                                                              if left else "."),
             "# Each decision is the comment beside it. Nothing was guessed: a name that matches two ways is left out "
             "with both named.",
             "# The tables exist: no DDL to apply. Only GRANTs, where the key's role lacks them (a plain PostgreSQL; a "
             "Supabase project",
             "# grants service_role every table of public): `syncd init --sql FILE` writes them. Then syncd check, "
             "syncd install,",
             "# syncd resync --all, syncd run.",
             "", "[source]", f"path = {toml_string(os.path.relpath(db.absolute(), out.absolute().parent))}  # relative "
             "to this file", "", "[target]",
             *([f"url = {toml_string(url)}  # SYNCD_TARGET_URL or SUPABASE_URL override it"] if url else
               ["# The PostgREST endpoint: set SUPABASE_URL (the project's URL; /rest/v1 is added) or SYNCD_TARGET_URL",
                "# (the API URL as is), or write it here:", '# url = "https://PROJECT.supabase.co/rest/v1"']),
             f"schema = {toml_string(schema)}",
             "# The key is never written here: set SUPABASE_SERVICE_KEY (the service_role key) or",
             "# SUPABASE_SERVICE_KEY_FILE, or SUPABASE_JWT_SECRET (syncd then mints short-lived tokens itself).",
             "", "# Shipping order: parents before children, from SQLite's foreign keys and, as `after = [...]`, from "
             "the secondary's."]
    for decision in synced:
        lines += ["", *matched_section(decision)]
    for decision in decisions:
        if decision.target is None:
            lines += ["", *comment_lines(f"Not synced: {decision.table.name}: {decision.reason}"), "# [[table]]",
                      f"# name = {toml_string(decision.table.name)}", "# target = \"...\"  # the secondary's table"]
    if unmatched_targets:
        lines += ["", *comment_lines("Tables of the secondary no SQLite table ships into: "
                                     + ", ".join(unmatched_targets))]
    return "\n".join(lines) + "\n"


def comment_lines(text: str, width: int = 116) -> list[str]:
    """`text` as TOML comment lines of at most about `width` characters (a line break in a name stays a comment)."""
    words = " ".join(text.split()).split(" ")
    lines = [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) + 1 > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return [f"# {line}" for line in lines]


def matched_section(decision: TableDecision) -> list[str]:
    """One [[table]] of `init --target`: the match, the key, `after`, `exclude` with each reason, and each shipped
    column's rule, rename and transform."""
    table = decision.table
    assert decision.target is not None
    key = decision.key or table.key
    lines = [*comment_lines(f"{table.name} -> {decision.target}: {decision.rule}"),
             *comment_lines(f"key: ({', '.join(key)}), the PRIMARY KEY of {decision.target} there"
                            + (", SQLite's PRIMARY KEY too" if decision.key is None else
                               ", a UNIQUE set over NOT NULL columns in SQLite")),
             *(line for warning in decision.warnings for line in comment_lines(f"warning: {warning}")),
             "[[table]]", f"name = {toml_string(table.name)}"]
    if decision.target != table.name:
        lines.append(f"target = {toml_string(decision.target)}")
    if decision.key is not None:
        lines.append(f"key = [{', '.join(toml_string(c) for c in decision.key)}]")
    if decision.after:
        lines.append(f"after = [{', '.join(toml_string(t) for t in decision.after)}]  # the secondary's foreign keys "
                     "point there; SQLite declares none")
    left = [c for c in decision.columns if c.target is None]
    if left:
        lines += [line for c in left for line in comment_lines(f"left out: {c.source}: {c.reason}")]
        lines.append(f"exclude = [{', '.join(toml_string(c.source) for c in left)}]")
    for column in decision.columns:
        if column.target is None:
            continue
        said = comment_lines(f"{column.source} -> {column.target}: {column.rule} ({column.note})")
        if column.target == column.source and column.transform is None:
            lines += said
            continue
        lines += [*said, f"[table.columns.{toml_string(column.source)}]"]
        if column.target != column.source:
            lines.append(f"rename = {toml_string(column.target)}")
        if column.transform:
            lines.append(f"transform = {toml_string(column.transform)}")
    return lines


def render_grants(decisions: Sequence[TableDecision], schema: str, db: Path) -> str:
    """`init --target --sql FILE`: no DDL (the tables exist), only the privileges syncd's key needs on the matched
    tables, for a PostgreSQL where the migration granted none (Supabase grants them to service_role by default)."""
    s = quote_ident(schema)
    out = [f"-- The privileges syncd needs on the secondary's tables it ships {db.name} into, written by",
           "-- `syncd init --target` (or --pg-url): the tables exist already, so nothing is created or altered.",
           "-- Supabase grants these to service_role by default; a plain PostgreSQL whose migration granted nothing",
           "-- needs them.",
           f"GRANT USAGE ON SCHEMA {s} TO service_role;"]
    out += [f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {s}.{quote_ident(d.target)} TO service_role;"
            for d in decisions if d.target is not None]
    return "\n".join([*out, "NOTIFY pgrst, 'reload schema';"]) + "\n"
