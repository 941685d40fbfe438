"""Redaction: no secret leaves syncd in any text it writes (log lines, error messages, `status`, `/readyz`, dead
letters, check findings), not even in part. The secrets are registered where they enter the process (the
configuration, every token syncd mints); `redact` replaces each of them, and any run of PARTIAL_RUN or more of
their characters (a server that echoes a key cut short, a proxy's error page), with `<redacted>`.

Logs go through `processor` (a structlog processor); texts from the secondary are redacted before they are cut
short (`syncd.target`), so a cut never leaves half a key.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["MASK", "USERINFO_PASSWORD", "connection_passwords", "error_line", "mask_url", "processor", "redact",
           "register", "register_connection"]

MASK = "<redacted>"
PARTIAL_RUN = 12  # characters of a secret in a row that count as leaking it
RECENT_TOKENS = 16  # minted tokens remembered (each lives minutes)
SHORTEST = 8  # a shorter "secret" (a test's "k") would redact ordinary words; config refuses keys this short

_lock = threading.Lock()
_secrets: set[str] = set()
_tokens: deque[str] = deque(maxlen=RECENT_TOKENS)
_windows: set[str] = set()
# A URL's user and password run to the authority's last "@" (RFC 3986 has no "@" in a host; a password with an
# unencoded "@" is still a password, although libpq splits at the first one and names the rest as the host).
USERINFO = re.compile(r"(//)([^/?#\s]+)@")
USERINFO_PASSWORD = re.compile(r"(?P<head>//[^:/?#\s]*):(?P<password>[^/?#\s]*)@")
PASSWORD_SETTING = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def register(*secrets: str | None, token: bool = False) -> None:
    """Remember secrets to redact from now on (`token`: a minted token: only the most recent are kept)."""
    with _lock:
        for secret in secrets:
            if not secret or len(secret) < SHORTEST:
                continue
            if token:
                _tokens.append(secret)
            else:
                _secrets.add(secret)
        _rebuild()


def _rebuild() -> None:
    _windows.clear()
    for secret in (*_secrets, *_tokens):
        for start in range(len(secret) - PARTIAL_RUN + 1):
            _windows.add(secret[start:start + PARTIAL_RUN])


def redact(text: str) -> str:
    """`text` with every registered secret, every run of PARTIAL_RUN of its characters, and the user and password of
    any URL in it replaced."""
    text = USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    with _lock:
        secrets = sorted((*_secrets, *_tokens), key=len, reverse=True)
        windows = frozenset(_windows)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if not windows or len(text) < PARTIAL_RUN:
        return text
    marked = bytearray(len(text))
    for start in range(len(text) - PARTIAL_RUN + 1):
        if text[start:start + PARTIAL_RUN] in windows:
            marked[start:start + PARTIAL_RUN] = b"\x01" * PARTIAL_RUN
    if not any(marked):
        return text
    out, i = [], 0
    while i < len(text):
        if marked[i]:
            while i < len(text) and marked[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mask_url(url: str) -> str:
    """`url` without its user and password (`https://<redacted>@host/...`), and without a `password=` setting (a
    libpq keyword string `host=h password=x`, or `?password=x` in a URL's query), for messages. Never raises."""
    url = PASSWORD_SETTING.sub(lambda m: f"{m['head']}{MASK}", url)
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:  # an unbalanced [IPv6 literal, a port that is not a number
        return USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", url)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def register_connection(pg_url: str) -> None:
    """Redact from now on every password `pg_url` (a PostgreSQL connection string) carries."""
    register(*connection_passwords(pg_url))


def error_line(error: BaseException, limit: int) -> str:
    """`error`'s text on one line, every known secret masked, cut at `limit` characters (a driver's message, e.g.
    psycopg's, may spread over lines and quote the connection string)."""
    return redact(" ".join(str(error).split()))[:limit]


def connection_passwords(pg_url: str) -> list[str]:
    """The passwords a PostgreSQL connection string carries, in any of libpq's forms (`user:PASSWORD@`,
    `?password=`, the keyword string's `password=`, quoted or not), to register for redaction. Never raises."""
    found = [text for m in USERINFO_PASSWORD.finditer(pg_url) for text in (m["password"], unquote(m["password"]))]
    found += [piece for password in found for piece in password.split("@")[1:]]  # what libpq calls the host
    for match in PASSWORD_SETTING.finditer(pg_url):
        value = match["password"]
        if value.startswith("'") and value.endswith("'") and len(value) > 1:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        found.append(unquote(value))
    return [password for password in found if password]


def processor(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: every string in the event (keys' values, nested lists and dicts) redacted."""
    for key, value in event_dict.items():
        event_dict[key] = _redact_value(value)
    return event_dict


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value
