"""JSON Web Tokens as Supabase and PostgREST use them: HS256, a `role` claim, short or long lifetimes.

Minting lives here so that the dev server, the daemon (which mints its own short-lived service_role
tokens from the JWT secret) and the `jwt` tooling all sign the same way.
"""

from __future__ import annotations

import secrets
import string
import time
from typing import Any

import jwt

ALGORITHM = "HS256"
MIN_SECRET_LENGTH = 32
# Supabase's demo keys are valid for ten years; the keys the dev server prints follow suit.
LONG_LIVED_SECONDS = 10 * 365 * 24 * 3600


def generate_secret(length: int = 64) -> str:
    """A random JWT secret of `length` letters and digits (PostgREST needs at least 32)."""
    if length < MIN_SECRET_LENGTH:
        raise ValueError(f"a JWT secret needs at least {MIN_SECRET_LENGTH} characters, not {length}")
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def mint_token(secret: str, role: str, *, expires_in: float = LONG_LIVED_SECONDS,
               now: float | None = None, **claims: Any) -> str:
    """Sign an HS256 token carrying `role`, `iss=supabase`, `iat` and `exp` plus any extra claims."""
    issued = int(time.time() if now is None else now)
    payload = {"role": role, "iss": "supabase", "iat": issued, "exp": issued + int(expires_in), **claims}
    return jwt.encode(payload, secret, algorithm=ALGORITHM)
