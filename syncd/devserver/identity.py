"""Who is calling: the JWT check and role choice of PostgREST, and the apikey check of Supabase's gateway."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jwt

from syncd.auth import ALGORITHM
from syncd.devserver import errors
from syncd.devserver.errors import ApiError

CLOCK_SKEW_SECONDS = 30


@dataclass(frozen=True)
class Identity:
    """Who a request runs as: the database role, the JWT claims (what `request.jwt.claims` is set to), and whether
    that is the anonymous role."""

    role: str
    claims: dict[str, Any]
    anonymous: bool

    def claims_json(self) -> str:
        """The claims as compact JSON: the value of `request.jwt.claims`."""
        return json.dumps(self.claims, separators=(",", ":"))


def identify(authorization: str | None, secret: str, anon_role: str) -> Identity:
    """The role a request runs as: the token's `role` claim, or the anonymous role without a token. Like PostgREST
    12 (measured), an Authorization header of another scheme (`Basic ...`) or `Bearer` without a token counts as no
    token at all. Raises ApiError 401 PGRST301 for a token that does not verify."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Identity(anon_role, {"role": anon_role}, anonymous=True)
    claims = decode(token.strip(), secret)
    role = claims.get("role")
    if not isinstance(role, str) or not role:
        return Identity(anon_role, claims, anonymous=True)
    return Identity(role, claims, anonymous=role == anon_role)


def decode(token: str, secret: str) -> dict[str, Any]:
    """Verify an HS256 token with 30 s of clock skew; map each failure to PostgREST's PGRST301 text."""
    parts = token.count(".") + 1
    if parts != 3:
        raise errors.jwt_error(f"JWSError (CompactDecodeError Invalid number of parts: Expected 3 parts; got {parts})")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], leeway=CLOCK_SKEW_SECONDS,
                            options={"verify_aud": False, "require": []})
    except jwt.ExpiredSignatureError:
        raise errors.jwt_error("JWT expired") from None
    except jwt.ImmatureSignatureError as exc:
        raise errors.jwt_error("JWTIssuedAtFuture" if "iat" in str(exc) else "JWTNotYetValid") from None
    except jwt.InvalidSignatureError:
        raise errors.jwt_error("JWSError JWSInvalidSignature") from None
    except jwt.InvalidAlgorithmError:
        raise errors.jwt_error("JWSError JWSInvalidSignature") from None
    except jwt.PyJWTError:
        raise errors.jwt_error("JWSError (CompactDecodeError Invalid token)") from None
    if not isinstance(claims, dict):
        raise errors.jwt_error("Parsing claims failed")
    return claims


def check_apikey(apikey: str | None, secret: str) -> None:
    """Supabase's gateway: the `apikey` header is mandatory and must be one of the project's keys.

    Any token signed with the project's secret counts as a project key (the gateway compares
    strings; the dev server has no list of consumers, so it accepts what the secret signed).
    """
    if not apikey:
        raise ApiError(401, None, "No API key found in request", gateway=True,
                       hint=None, headers={})
    try:
        jwt.decode(apikey, secret, algorithms=[ALGORITHM], options={"verify_exp": False, "verify_aud": False,
                                                                     "verify_iat": False, "verify_nbf": False})
    except jwt.PyJWTError:
        raise ApiError(401, None, "Invalid API key", gateway=True) from None
