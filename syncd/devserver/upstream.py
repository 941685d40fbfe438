"""`syncd dev-server --upstream URL`: the dev server's fault injection in front of any PostgREST, Supabase included.

No PostgreSQL is started: every API request (method, path below the prefix, raw query, headers, body) is passed on
to URL and its answer (status, headers, body, byte for byte: a compressed body stays compressed) comes back, unless
the fault drawn for it answers instead. Only hop-by-hop headers (RFC 9110 7.6.1) and Host are not copied; the
Authorization and apikey headers pass on unchanged and are never written anywhere else. TLS certificates of an https
upstream are verified (httpx's default, with the system's or certifi's CA bundle).
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx

from syncd.devserver.http import Request, Response

# Headers of one hop, never forwarded (RFC 9110 7.6.1), plus those httpx and the dev server's HTTP layer set anew.
HOP_HEADERS = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})
PATH_SAFE = "/-._~!$&'()*+,;=:@"  # RFC 3986 pchar besides letters and digits: left as they are
TIMEOUT = httpx.Timeout(120.0, connect=10.0)  # seconds; above Supabase's 60 s statement timeout


class Upstream:
    """Passes API requests on to one PostgREST API URL over one pooled, keep-alive httpx client."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=True)

    async def handle(self, request: Request) -> Response:
        """The upstream's answer to `request` (its path below the prefix). An upstream that cannot be reached or
        does not answer in time is 502 / 504 with a gateway's `{"message": ...}` body naming the URL and the error
        (never a header of the request)."""
        try:
            reply = await self.client.send(self.outgoing(request), stream=True)
            try:
                body = b"".join([chunk async for chunk in reply.aiter_raw()])
            finally:
                await reply.aclose()
        except httpx.TimeoutException as exc:
            return gateway_error(504, f"upstream {self.url} did not answer in time ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return gateway_error(502, f"upstream {self.url} unreachable: {type(exc).__name__}: {exc}")
        headers = {name: value for name, value in reply.headers.items() if name.lower() not in HOP_HEADERS}
        return Response(reply.status_code, body, headers)

    def outgoing(self, request: Request) -> httpx.Request:
        """`request` addressed to the upstream: URL + path (percent-encoded again) + the raw query, its headers
        without the hop-by-hop ones, its body."""
        target = self.url + quote(request.path, safe=PATH_SAFE)
        if request.query:
            target += "?" + request.query
        # The HTTP layer read header values as latin-1; the same bytes go on.
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.items()
                   if name not in HOP_HEADERS]
        return self.client.build_request(request.method, target, headers=headers, content=request.body)

    async def close(self) -> None:
        await self.client.aclose()


def gateway_error(status: int, message: str) -> Response:
    """A gateway's own answer, `{"message": ...}` as Supabase's gateway words its errors."""
    return Response(status, json.dumps({"message": message}).encode(), {"Content-Type": "application/json"})
