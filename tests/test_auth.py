"""Token sources: a fixed key, and service_role tokens minted from the JWT secret and renewed ahead of expiry."""

from __future__ import annotations

import jwt
import pytest

from syncd import auth

SECRET = "s" * 40


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(token: str) -> dict[str, object]:
    return jwt.decode(token, SECRET, algorithms=[auth.ALGORITHM], options={"verify_exp": False})


def test_static_token_is_the_key_and_cannot_refresh():
    """A fixed key is sent as is, and refresh() admits it cannot make a new one."""
    source = auth.StaticToken("the-key")
    assert source.token() == "the-key"
    assert source.refresh() is False
    assert source.token() == "the-key"


def test_static_token_repr_hides_the_key():
    """The key never shows up in a repr (and so in a log line)."""
    assert "the-key" not in repr(auth.StaticToken("the-key"))


def test_static_token_refuses_an_empty_key():
    """An empty key is a configuration mistake caught at construction."""
    with pytest.raises(ValueError, match="empty"):
        auth.StaticToken("")


def test_minted_token_carries_service_role_and_the_lifetime():
    """Claims: role service_role, iat from the clock, exp - iat equal to the lifetime."""
    clock = FakeClock()
    payload = claims(auth.MintedTokens(SECRET, lifetime=300, clock=clock).token())
    assert payload["role"] == "service_role"
    assert payload["iat"] == int(clock.now)
    assert payload["exp"] - payload["iat"] == 300


def test_minted_token_is_reused_while_fresh():
    """Until renew_before seconds ahead of expiry the same token is handed out."""
    clock = FakeClock()
    source = auth.MintedTokens(SECRET, lifetime=300, renew_before=60, clock=clock)
    first = source.token()
    clock.now += 239
    assert source.token() == first


def test_minted_token_is_renewed_within_renew_before_of_expiry():
    """At renew_before seconds ahead of expiry a new token, valid from now, replaces the old one."""
    clock = FakeClock()
    source = auth.MintedTokens(SECRET, lifetime=300, renew_before=60, clock=clock)
    first = source.token()
    clock.now += 240
    second = source.token()
    assert second != first
    assert claims(second)["iat"] == int(clock.now)
    assert source.token() == second


def test_refresh_always_mints_a_new_token():
    """refresh() gives a different token even within the same second (the server said it expired)."""
    source = auth.MintedTokens(SECRET, clock=FakeClock())
    first = source.token()
    assert source.refresh() is True
    second = source.token()
    assert second != first
    assert source.refresh() is True
    assert source.token() != second


def test_minted_token_verifies_with_the_secret_only():
    """The token is HS256-signed with the given secret: another secret rejects it."""
    token = auth.MintedTokens(SECRET).token()
    assert jwt.decode(token, SECRET, algorithms=["HS256"])["role"] == "service_role"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "x" * 40, algorithms=["HS256"])


def test_minted_tokens_take_another_role():
    """The role claim follows the role argument."""
    assert claims(auth.MintedTokens(SECRET, role="authenticated").token())["role"] == "authenticated"


@pytest.mark.parametrize(("secret", "lifetime", "renew_before"),
                         [("short", 300, 60), (SECRET, 60, 60), (SECRET, 300, -1)])
def test_minted_tokens_refuse_bad_settings(secret: str, lifetime: float, renew_before: float):
    """A short secret, or a renewal window not inside the lifetime, is refused at construction."""
    with pytest.raises(ValueError):
        auth.MintedTokens(secret, lifetime=lifetime, renew_before=renew_before)


def test_minted_tokens_repr_hides_the_secret():
    """Neither the secret nor the current token appear in the repr."""
    source = auth.MintedTokens(SECRET)
    token = source.token()
    assert SECRET not in repr(source) and token not in repr(source)
