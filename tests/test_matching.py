"""The pure parts of `init --target`: English plurals, name relations, the assignment that refuses to guess, and the
reading of PostgREST's OpenAPI description into tables (syncd.matching, syncd.target_schema)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.matching import assign, plural, plurals, relation, snake, table_relation
from syncd.target_schema import base_type, from_openapi


@pytest.mark.parametrize(("word", "expected"), [
    ("artifact", "artifacts"), ("entry", "entries"), ("log_entry", "log_entries"), ("key", "keys"),
    ("status", "statuses"), ("box", "boxes"), ("match", "matches"), ("dish", "dishes"), ("analysis", "analyses"),
    ("evidence", "evidence"), ("metadata", "metadata"), ("user_data", "user_data"), ("day", "days"),
    ("category", "categories"), ("quiz", "quizes"),
])
def test_plural_rules(word: str, expected: str) -> None:
    """The rules' plural of each word (an irregular one has its own as well: `plurals`)."""
    assert plural(word) == expected


def test_irregular_words_have_both_plurals() -> None:
    """person may be persons or people; quiz quizzes too (a table of either name matches)."""
    assert plurals("person") == {"persons", "people"} and "quizzes" in plurals("quiz")
    assert plurals("team_child") == {"team_childs", "team_children"}


@given(st.from_regex(r"[a-z]{2,12}(_[a-z]{2,12}){0,2}", fullmatch=True))
def test_a_word_and_its_plural_always_relate(word: str) -> None:
    """Whatever the word, it names the same table as its plural, both ways round, and the plural keeps its head."""
    for many in plurals(word):
        assert relation(word, many) is not None and relation(many, word) is not None
        assert many.rsplit("_", 1)[0] == word.rsplit("_", 1)[0] or "_" not in word


@pytest.mark.parametrize(("source", "target", "strength"), [
    ("artifact", "artifact", 0), ("Artifact", "artifact", 1), ("APIEndpoint", "api_endpoint", 2),
    ("apiendpoint", "api_endpoints", 3), ("logentry", "log_entries", 3), ("createdAt", "created_at", 2),
])
def test_table_names_relate_by_case_style_and_plural(source: str, target: str, strength: int) -> None:
    """The strength says how close: same, case, style, plural."""
    found = relation(source, target)
    assert found is not None and found[0] == strength


@pytest.mark.parametrize(("source", "target"), [
    ("extra_json", "extras"), ("extra_json", "extra"), ("created_at", "created"), ("created", "created_at"),
    ("updated_ts", "updated"), ("payload_jsonb", "payload"),
])
def test_column_names_relate_without_their_suffix(source: str, target: str) -> None:
    """A suffix that says the kind is dropped on either side, and only for columns."""
    assert relation(source, target, ("_json", "_jsonb", "_at", "_ts")) is not None
    assert relation(source, target) is None  # tables: no suffix is dropped


def test_unrelated_names_do_not_relate() -> None:
    """Similar is not related: tagrow is not tags, section is not document_sections."""
    assert relation("tagrow", "tags") is None and relation("section", "document_sections") is None
    assert snake("APIEndpoint") == "api_endpoint" and snake("Log-Entry") == "log_entry"


def test_the_prefix_counts_only_when_given() -> None:
    """app_accounts is account's table with --target-prefix app_ only; a name without the prefix stays closer."""
    assert table_relation("")("account", "app_accounts") is None
    with_prefix = table_relation("app_")
    prefixed, plain = with_prefix("category", "app_categories"), with_prefix("category", "categories")
    assert prefixed is not None and plain is not None and plain[0] < prefixed[0]


def test_assign_never_guesses() -> None:
    """Two targets at the same strength: ambiguous with both; two sources on one target: the closer takes it, at the
    same strength neither does; each answer says why."""
    choices = assign(["extra_json"], ["extra", "extras"], lambda s, t: relation(s, t, ("_json",)))
    assert choices["extra_json"].target is None and choices["extra_json"].candidates == ["extra", "extras"]
    choices = assign(["tag", "tags"], ["tags"], relation)
    assert choices["tags"].target == "tags" and choices["tag"].target is None and choices["tag"].taken_by == "tags"
    choices = assign(["entry", "entrie"], ["entries"], lambda s, t: (3, "x") if t == "entries" else None)
    assert choices["entry"].target is None and choices["entry"].taken_by == "entrie"
    assert choices["entrie"].candidates == ["entries"]


def test_base_type_drops_schema_and_modifiers() -> None:
    """PostgREST 12 writes an extension's type qualified with its modifier; format_type writes modifiers."""
    assert [base_type(t) for t in ("public.vector(384)", "character varying(20)", "numeric(10,2)[]", "text",
                                   "timestamp(3) with time zone")] == \
        ["vector", "character varying", "numeric[]", "text", "timestamp with time zone"]


def test_openapi_gives_types_keys_not_null_defaults_and_foreign_keys() -> None:
    """A definition as PostgREST v12 writes it: `required`, `<pk/>`, `<fk .../>`; a NOT NULL string column without a
    default is certainly unfilled, an integer or jsonb one may have a default PostgREST does not show."""
    spec = {"definitions": {"facts": {"required": ["id", "name", "n", "doc"], "properties": {
        "id": {"format": "text", "type": "string", "description": "Note:\nThis is a Primary Key.<pk/>"},
        "artifact_id": {"format": "text", "type": "string",
                        "description": "Note:\nThis is a Foreign Key to `artifacts.id`.<fk table='artifacts' "
                                       "column='id'/>"},
        "name": {"format": "text", "type": "string"},
        "made": {"format": "timestamp with time zone", "type": "string", "default": "now()"},
        "n": {"format": "integer", "type": "integer"},
        "doc": {"format": "jsonb"}}}}}
    table = from_openapi(spec)["facts"]
    assert table.key == ["id"] and table.column("artifact_id").references == "artifacts"  # type: ignore[union-attr]
    fed = {c.name: c.fed for c in table.columns}
    assert fed == {"id": False, "artifact_id": True, "name": False, "made": True, "n": None, "doc": None}
