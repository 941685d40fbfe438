"""A small HTTP/1.1 server on asyncio and h11, with keep-alive.

Written on h11 rather than a framework because fault injection must be able to drop a connection
without any answer (a reset) or after the request was applied (a timeout): ASGI servers always
answer something once the application has run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote

import h11

MAX_BODY_BYTES = 512 * 1024 * 1024
READ_CHUNK = 256 * 1024


@dataclass
class Request:
    """One HTTP request as the handler sees it."""

    method: str
    path: str  # percent-decoded path without the query string
    query: str  # raw query string
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""


@dataclass
class Response:
    """One HTTP response; Date, Server and Content-Length are added when it is written."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Abort:
    """Close the connection without answering."""


Handler = Callable[[Request], Awaitable[Response | Abort]]


class HttpServer:
    """Serves `handler` over HTTP/1.1 with keep-alive; `connections` holds the tasks of the open connections
    (cancelled at shutdown)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on `host`:`port` (0: any free port) and serve each connection as a task."""
        return await asyncio.start_server(self._serve_connection, host, port, limit=READ_CHUNK)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await read_request(conn, reader, writer)
                if request is None:
                    return
                outcome = await self.handler(request)
                if isinstance(outcome, Abort):
                    writer.transport.abort()
                    return
                await write_response(conn, writer, outcome, head_only=request.method == "HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            with contextlib.suppress(Exception):
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    body = f'{{"message": "bad HTTP request: {exc}"}}'.encode()
                    await write_response(conn, writer, Response(exc.error_status_hint, body), head_only=False)
        except (ConnectionError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            pass
        except asyncio.CancelledError:
            # Shutdown cancels idle keep-alive connections. Ending normally is the point: Python 3.11's stream
            # callback asks a cancelled task for its exception and logs a traceback for it.
            pass
        finally:
            self.connections.discard(task)
            writer.close()


async def read_request(conn: h11.Connection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> Request | None:
    """The next request on the connection, or None once the client closed it; answers `Expect: 100-continue`. Raises
    h11.RemoteProtocolError (status hint 413) for a body over MAX_BODY_BYTES."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            data = await reader.read(READ_CHUNK)
            conn.receive_data(data)
            if not data and conn.their_state is h11.IDLE:
                return None
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return to_request(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


def to_request(head: h11.Request, body: bytes) -> Request:
    """An h11 request head and its body -> Request: path percent-decoded, query raw, header names in lower case,
    repeated headers joined with ", "."""
    target = head.target.decode("latin-1")
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(head.method.decode("ascii").upper(), unquote(path), query, headers, body)


async def write_response(conn: h11.Connection, writer: asyncio.StreamWriter, response: Response,
                         head_only: bool) -> None:
    """Send `response` with Content-Length, and Date and Server unless it has them (an upstream's answer), without
    the body for HEAD."""
    given = {name.lower() for name in response.headers}
    headers = [(name, value) for name, value in (("Date", formatdate(usegmt=True)), ("Server", "syncd-devserver"))
               if name.lower() not in given]
    headers += list(response.headers.items())
    headers.append(("Content-Length", str(len(response.body))))
    writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
    if response.body and not head_only:
        writer.write(conn.send(h11.Data(data=response.body)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()
