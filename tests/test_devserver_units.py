"""The dev server's pure parts: URL grammar, status mapping, fault draws, identity."""

from __future__ import annotations

import time

import pytest

from syncd import auth
from syncd.devserver import errors, query
from syncd.devserver.api import range_status
from syncd.devserver.errors import ApiError
from syncd.devserver.faults import Faults
from syncd.devserver.identity import identify


@pytest.mark.parametrize(("text", "expected"), [
    ("1,2,3", ["1", "2", "3"]),
    ('"a,b",c', ['"a,b"', "c"]),
    ("and(a.eq.1,b.eq.2),c.in.(1,2)", ["and(a.eq.1,b.eq.2)", "c.in.(1,2)"]),
    (r'"x\",y",z', [r'"x\",y"', "z"]),
    ("", [""]),
])
def test_split_top_level_respects_quotes_and_parentheses(text: str, expected: list[str]):
    assert query.split_top_level(text) == expected


def test_in_list_unquotes_and_unescapes():
    """Inside quotes, backslash escapes " and \\; `null` is the string 'null'."""
    assert query.parse_in_list(r'("a,b","say \"hi\"","back\\slash",null,plain)', "") == \
        ["a,b", 'say "hi"', "back\\slash", "null", "plain"]
    assert query.parse_in_list("()", "") == []


def test_logic_tree_parses_nested_negated_groups():
    tree = query.parse_logic("or", '(a.eq.1,not.and(b.gt.2,c.is.null),d.eq."x,y")')
    assert tree.conjunction == "or" and len(tree.children) == 3
    nested = tree.children[1]
    assert isinstance(nested, query.Logic) and nested.negated and nested.conjunction == "and"
    leaf = tree.children[2]
    assert isinstance(leaf, query.Filter) and leaf.value == "x,y"


def test_filter_with_fts_config_and_negation():
    leaf = query.parse_filter("body", "not.fts(english).revenue")
    assert (leaf.operator, leaf.modifier, leaf.value, leaf.negated) == ("fts", "english", "revenue", True)


def test_select_items_with_alias_and_cast():
    items = query.parse_select("id,label:name,qty::text,n:qty::bigint,*")
    assert [(i.column, i.alias, i.cast) for i in items] == [
        ("id", None, None), ("name", "label", None), ("qty", None, "text"), ("qty", "n", "bigint"), ("*", None, None)]


@pytest.mark.parametrize(("sqlstate", "message", "authenticated", "status"), [
    ("23503", "", True, 409), ("23505", "", True, 409), ("23502", "", True, 400), ("23514", "", True, 400),
    ("22P02", "", True, 400), ("42703", "", True, 400), ("42P10", "", True, 400), ("42501", "", True, 403),
    ("42501", "", False, 401), ("42P01", "", True, 404), ("42883", "", True, 404), ("08006", "", True, 503),
    ("53300", "", True, 503), ("57P01", "", True, 503), ("57014", "", True, 500), ("40001", "", True, 500),
    ("40P01", "", True, 500), ("53400", "", True, 500), ("XX000", "", True, 500),
    ("21000", "DELETE requires a WHERE clause", True, 400), ("21000", "more than one row", True, 500),
    ("PT418", "", True, 418),
])
def test_sqlstate_to_status_follows_postgrest(sqlstate: str, message: str, authenticated: bool, status: int):
    assert errors.status_for_sqlstate(sqlstate, message, authenticated) == status


def test_range_status_picks_200_206_and_416():
    assert range_status(0, 5, None) == (200, "0-4/*")
    assert range_status(0, 5, 5) == (200, "0-4/5")
    assert range_status(5, 5, 20) == (206, "5-9/20")
    assert range_status(0, 0, 0) == (200, "*/0")
    with pytest.raises(ApiError) as caught:
        range_status(30, 0, 20)
    assert caught.value.status == 416


def test_fault_draws_follow_the_rates():
    faults = Faults()
    faults.configure({"error_rate": 0.25, "reset_rate": 0.25, "timeout_rate": 0.25, "seed": 7})
    fates = [faults.draw() for _ in range(4000)]
    for fate in ("ok", "error", "reset", "timeout"):
        assert 800 < fates.count(fate) < 1200
    assert faults.stats()["faults"] == {f: fates.count(f) for f in ("error", "reset", "timeout")}


def test_down_overrides_every_rate():
    faults = Faults()
    faults.configure({"down": True, "error_rate": 1})
    assert {faults.draw() for _ in range(10)} == {"down"}


def test_identity_without_token_is_anonymous():
    who = identify(None, "s" * 32, "anon")
    assert who.role == "anon" and who.anonymous and who.claims == {"role": "anon"}


def test_identity_carries_all_claims():
    token = auth.mint_token("s" * 32, "authenticated", sub="u1", email="e@x")
    who = identify(f"Bearer {token}", "s" * 32, "anon")
    assert (who.role, who.anonymous, who.claims["sub"], who.claims["email"]) == ("authenticated", False, "u1", "e@x")


def test_mint_token_lifetime():
    now = time.time()
    claims = __import__("jwt").decode(auth.mint_token("s" * 32, "anon", expires_in=60, now=now), "s" * 32,
                                      algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 60


def test_generated_secret_is_long_enough():
    assert len(auth.generate_secret()) == 64
    with pytest.raises(ValueError):
        auth.generate_secret(16)
