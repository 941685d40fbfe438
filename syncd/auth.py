"""JSON Web Tokens as Supabase and PostgREST use them: HS256, a `role` claim, short or long lifetimes.

Minting lives here so that the dev server, the daemon (which mints its own short-lived service_role
tokens from the JWT secret) and the `jwt` tooling all sign the same way; so do the reports of `syncd jwt`
(`render_keys`, `TokenReport.render`).
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt

from syncd import redact
from syncd.timeparse import format_age

ALGORITHM = "HS256"
MIN_SECRET_LENGTH = 32
MAX_SECRET_LENGTH = 4096  # a secret is one line of a .env file; a billion characters is a typo
# Supabase's demo keys are valid for ten years; the keys the dev server prints follow suit.
LONG_LIVED_SECONDS = 10 * 365 * 24 * 3600


def generate_secret(length: int = 64) -> str:
    """A random JWT secret of `length` letters and digits (PostgREST needs at least 32; at most MAX_SECRET_LENGTH).
    Raises ValueError outside those bounds."""
    if length < MIN_SECRET_LENGTH:
        raise ValueError(f"a JWT secret needs at least {MIN_SECRET_LENGTH} characters, not {length}")
    if length > MAX_SECRET_LENGTH:
        raise ValueError(f"give at most {MAX_SECRET_LENGTH} characters, not {length} (64 is plenty for HS256)")
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def mint_token(secret: str, role: str, *, expires_in: float = LONG_LIVED_SECONDS,
               now: float | None = None, **claims: Any) -> str:
    """Sign an HS256 token carrying `role`, `iss=supabase`, `iat` and `exp` plus any extra claims."""
    issued = int(time.time() if now is None else now)
    payload = {"role": role, "iss": "supabase", "iat": issued, "exp": issued + int(expires_in), **claims}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


# Supabase's API keys that are not JWTs (https://supabase.com/docs/guides/api/api-keys): they go in the `apikey`
# header, and the gateway turns them into a role's token for PostgREST; sent as `Authorization: Bearer`, they reach
# PostgREST as a malformed JWT (only some gateway versions tolerate that).
SECRET_KEY_PREFIX = "sb_secret_"  # acts as service_role (bypasses RLS): a server's key
PUBLISHABLE_KEY_PREFIX = "sb_publishable_"  # acts as anon: the browser's key


def is_api_key(key: str) -> bool:
    """Whether `key` is one of Supabase's opaque API keys (secret or publishable), not a JWT."""
    return key.startswith((SECRET_KEY_PREFIX, PUBLISHABLE_KEY_PREFIX))


@dataclass(frozen=True)
class KeyInfo:
    """What kind of key syncd sends, and the role it acts as (never the key itself).

    kind: minted (syncd signs service_role tokens with the JWT secret) | jwt | secret (sb_secret_...) | publishable
    (sb_publishable_...) | opaque (neither a JWT nor a Supabase API key) | none. role: the database role PostgREST
    runs its requests as (a JWT's `role` claim, anon without one), None when it cannot be told."""

    kind: str
    role: str | None

    def describe(self) -> str:
        """In a few words, for `status` and `check`."""
        names = {"minted": "short-lived tokens minted from the JWT secret", "jwt": "a JWT",
                 "secret": "a Supabase secret key (sb_secret_...)",
                 "publishable": "a Supabase publishable key (sb_publishable_...)",
                 "opaque": "a key that is neither a JWT nor a Supabase API key", "none": "no key"}
        return names[self.kind] + (f", role {self.role}" if self.role else "")


def key_info(service_key: str | None, *, minted: bool = False) -> KeyInfo:
    """The kind and role of the key syncd sends (see KeyInfo); reads a JWT's claims without verifying them."""
    if minted:
        return KeyInfo("minted", "service_role")
    if not service_key:
        return KeyInfo("none", None)
    if service_key.startswith(SECRET_KEY_PREFIX):
        return KeyInfo("secret", "service_role")
    if service_key.startswith(PUBLISHABLE_KEY_PREFIX):
        return KeyInfo("publishable", "anon")
    try:
        claims = jwt.decode(service_key, options={"verify_signature": False})
    except jwt.PyJWTError:
        return KeyInfo("opaque", None)
    role = claims.get("role") if isinstance(claims, dict) else None
    return KeyInfo("jwt", role if isinstance(role, str) else "anon")


class TokenSource(Protocol):
    """Where the daemon's bearer token comes from: a fixed key, or tokens it mints itself."""

    def token(self) -> str:
        """The bearer token to send now."""
        ...

    def refresh(self) -> bool:
        """Force a new token after a 401 "JWT expired"; False if this source cannot make one."""
        ...


class StaticToken:
    """A fixed key (SUPABASE_SERVICE_KEY): sent as is; once it expires only the operator can replace it."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("the service key is empty")
        self._key = key
        redact.register(key)

    def __repr__(self) -> str:
        return "StaticToken(<redacted>)"

    def token(self) -> str:
        """The key, as given."""
        return self._key

    def refresh(self) -> bool:
        """Always False: a fixed key cannot be renewed (only the operator can replace it)."""
        return False


class MintedTokens:
    """Short-lived HS256 tokens minted from the JWT secret, renewed `renew_before` seconds ahead of expiry."""

    def __init__(self, secret: str, *, role: str = "service_role", lifetime: float = 300.0,
                 renew_before: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(f"the JWT secret needs at least {MIN_SECRET_LENGTH} characters, not {len(secret)}")
        if not 0 <= renew_before < lifetime:
            raise ValueError(f"renew_before ({renew_before}) must be at least 0 and less than lifetime ({lifetime})")
        self._secret = secret
        redact.register(secret)
        self.role = role
        self.lifetime = lifetime
        self.renew_before = renew_before
        self._clock = clock
        self._lock = threading.Lock()  # one worker thread may refresh while another reads the token
        self._current = ""
        self._expires_at = float("-inf")

    def __repr__(self) -> str:
        return f"MintedTokens(role={self.role!r}, lifetime={self.lifetime})"

    def token(self) -> str:
        """The current token; a new one is minted first when there is none yet or the current one expires within
        `renew_before` seconds."""
        with self._lock:
            if self._clock() >= self._expires_at - self.renew_before:
                self._mint()
            return self._current

    def refresh(self) -> bool:
        """Mint a new token now (after a 401 "JWT expired"); always True."""
        with self._lock:
            self._mint()
        return True

    def _mint(self) -> None:
        now = self._clock()
        # jti makes two tokens minted within the same second differ, so refresh() really yields a new one
        self._current = mint_token(self._secret, self.role, expires_in=self.lifetime, now=now,
                                   jti=secrets.token_hex(8))
        redact.register(self._current, token=True)
        self._expires_at = int(now) + int(self.lifetime)


def render_keys(secret: str, anon: str, service: str) -> str:
    """What `syncd jwt gen` prints (the seed's tools/gen_jwt.py layout): the secret, its PostgREST setting,
    the anon and service_role keys, and the .env.local lines."""
    return (f"Generated JWT Secret ({len(secret)} chars):\n{secret}\n\nPostgREST Configuration:\n"
            f"PGRST_JWT_SECRET={secret}\n\nAnon Key (role=anon):\n{anon}\n\n"
            f"Service Role Key (role=service_role):\n{service}\n\nFor .env.local:\nSUPABASE_JWT_SECRET={secret}\n"
            f"SUPABASE_ANON_KEY={anon}\nSUPABASE_SERVICE_KEY={service}")


@dataclass
class TokenReport:
    """What `syncd jwt verify` says about a token: its claims, its signature and whether it expired."""

    claims: dict[str, Any]
    signature: str  # "valid" | "INVALID" | "not checked (no secret given)"
    expired: bool
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """A token PostgREST would take: readable, not expired, and not a bad signature."""
        return self.problem is None and self.signature != "INVALID" and not self.expired

    def render(self, now: float | None = None) -> str:
        """The lines `syncd jwt verify` prints: signature, role, the identifying claims, times, expiry."""
        if self.problem:
            return f"INVALID: {self.problem}"
        now = time.time() if now is None else now
        claims = self.claims
        lines = [f"signature: {self.signature}",
                 f"role:      {claims.get('role', '(none: PostgREST uses the anonymous role)')}"]
        lines += [f"{name + ':':10} {claims[name]}" for name in ("sub", "aud", "email", "iss") if name in claims]
        lines += [f"{name + ':':10} {datetime.fromtimestamp(claims[name], UTC).isoformat()}"
                  for name in ("iat", "exp") if isinstance(claims.get(name), int | float)]
        if self.expired:
            lines.append(f"EXPIRED {format_age(now - claims['exp'])} ago: PostgREST answers 401 PGRST301 "
                         "'JWT expired'; sign a new one (syncd jwt sign)")
        elif "exp" not in claims:
            lines.append("expires:   never (no exp claim)")
        return "\n".join(lines)


def inspect_token(token: str, secret: str | None, now: float | None = None) -> TokenReport:
    """What `syncd jwt verify` reports about `token`: its claims (read without checking), its signature checked
    against `secret` ("not checked" without one; exp, aud, iat and nbf are not checked there) and whether its `exp`
    is before `now` (unix seconds, default the current time). Never raises: a token that is not a JWT gives a report
    whose `problem` says so."""
    now = time.time() if now is None else now
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        return TokenReport({}, "INVALID", False, f"not a JWT: {exc}")
    signature = "not checked (no secret given)"
    if secret:
        try:
            jwt.decode(token, secret, algorithms=[ALGORITHM], options={
                "verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False})
            signature = "valid"
        except jwt.PyJWTError:
            signature = "INVALID"
    exp = claims.get("exp")
    return TokenReport(claims, signature, isinstance(exp, int | float) and exp < now)
