"""HTTP/1.1 on the client port, parsed by httptools, with a router other layers add to.

etcd answers `/health`, `/version` and `/metrics` (and its JSON gateway) on
the same port as gRPC. The listener hands every connection that does not
open with the HTTP/2 preface to an `Http1Connection`, which parses requests
with httptools (llhttp, the strict C parser of Node.js, fed bytes and
calling back, so it is tested without sockets) and looks the handler up in
a `Router`. Answers are written here: a status line, headers, and the body
as it is or chunked, in one write where it can (h11 did this before, and
cost about as much CPU per gateway call as the call itself). Handlers know
nothing of either:

    async def handler(request: HttpRequest) -> HttpResponse

A response body is bytes, or an async iterator of chunks for a streaming
answer (sent with chunked encoding). Requests are served one at a time per
connection, as HTTP/1.1 requires; bodies are bounded by `max_body`.

A path may also take WebSocket upgrades (`Router.add_websocket`): after the
101 answer the connection belongs to a `WebSocket` and its handler,

    async def handler(request: HttpRequest, socket: WebSocket) -> None

until either side closes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

from pykine.transport import websocket
from pykine.transport.websocket import WebSocket

log = logging.getLogger(__name__)

# The request line and headers of one request, at most (whole or still arriving).
MAX_HEADER_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is at the other end of a connection, for handlers (gRPC and HTTP alike)."""

    # The socket address (a (host, port) tuple, or a path for a unix socket).
    address: Any = None
    # The CommonName of the client certificate TLS verified, if the client presented one.
    common_name: str | None = None


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    peer: Peer = field(default_factory=Peer)


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes | AsyncIterator[bytes] = b""
    content_type: str | None = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
WebSocketHandler = Callable[[HttpRequest, WebSocket], Awaitable[None]]
# Looks at a request before its handler (HTTP or WebSocket) and may answer it instead.
Guard = Callable[[HttpRequest], "HttpResponse | None"]


def text_response(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, (text + "\n").encode())


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second rather than once a request."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class Router:
    """Exact paths and path prefixes, each with the methods it accepts."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Handler]] = {}
        self._prefixes: list[tuple[str, dict[str, Handler]]] = []
        self._websockets: dict[str, WebSocketHandler] = {}
        self._guards: list[tuple[str, Guard]] = []
        # Headers every answer carries; with them set, OPTIONS (a CORS preflight) is answered for any path.
        self.cors_headers: list[tuple[str, str]] = []

    def add(self, methods: str | tuple[str, ...], path: str, handler: Handler, prefix: bool = False) -> None:
        """Route `path` (or every path under it, with `prefix`) for these methods to `handler`."""
        if isinstance(methods, str):
            methods = (methods,)
        if prefix:
            table = next((t for p, t in self._prefixes if p == path), None)
            if table is None:
                table = {}
                self._prefixes.append((path, table))
                self._prefixes.sort(key=lambda entry: -len(entry[0]))
        else:
            table = self._exact.setdefault(path, {})
        for method in methods:
            table[method] = handler

    def add_websocket(self, path: str, handler: WebSocketHandler) -> None:
        """Let `path` be upgraded to a WebSocket served by `handler` (plain requests still go to `add`'s)."""
        self._websockets[path] = handler

    def add_guard(self, prefix: str, guard: Guard) -> None:
        """Have `guard` see every request under `prefix` first (a refused upgrade is answered, not upgraded)."""
        self._guards.append((prefix, guard))

    def _refusal(self, request: HttpRequest) -> HttpResponse | None:
        for prefix, guard in self._guards:
            if request.path.startswith(prefix) and (refusal := guard(request)) is not None:
                return refusal
        return None

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        if not self._websockets or not websocket.is_upgrade(request.headers) or self._refusal(request):
            return None
        return self._websockets.get(request.path)

    async def dispatch(self, request: HttpRequest) -> HttpResponse:
        if (refusal := self._refusal(request)) is not None:
            return self.finish(refusal)
        return self.finish(await self._route(request))

    def finish(self, response: HttpResponse) -> HttpResponse:
        """The headers every answer carries."""
        if self.cors_headers:
            response.headers[:0] = self.cors_headers
        response.headers.append(("Date", http_date()))
        return response

    async def _route(self, request: HttpRequest) -> HttpResponse:
        if request.method == "OPTIONS" and self.cors_headers:
            return HttpResponse(200, content_type=None)
        table = self._exact.get(request.path)
        if table is None:
            table = next((t for p, t in self._prefixes if request.path.startswith(p)), None)
        if table is None:
            response = text_response(404, "404 page not found")
            response.headers.append(("X-Content-Type-Options", "nosniff"))
            return response
        handler = table.get(request.method)
        if handler is None:
            response = text_response(405, "Method Not Allowed")
            response.headers += [("Allow", ", ".join(sorted(table))), ("X-Content-Type-Options", "nosniff")]
            return response
        return await handler(request)


# Go's net/http words for the requests it cannot read (etcd's answers to them).
_MALFORMED = (400, "400 Bad Request")
_HEADERS_TOO_LARGE = (431, "431 Request Header Fields Too Large")
_BODY_TOO_LARGE = (413, "413 Request Entity Too Large")
# Complete requests waiting behind the one being served beyond this stop reading from the client.
MAX_PIPELINED = 16


class _Refused(Exception):
    """Raised in a parser callback: the request is refused with this (status, text)."""


@dataclass(slots=True)
class _Arrived:
    """A complete request and how its connection goes on after it."""

    request: HttpRequest
    keep_alive: bool
    http10: bool
    upgrade: bool


class Http1Connection:
    """One HTTP/1.1 connection: httptools for the requests, the router for the answers."""

    def __init__(
        self,
        router: Router,
        transport: asyncio.Transport,
        peer: Peer | None = None,
        max_body: int = 4 << 20,
    ) -> None:
        self.router = router
        self.transport = transport
        self.peer = peer or Peer()
        self.max_body = max_body
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_message = False
        # Requests parsed, not yet served; bytes after an upgrade request, kept until it is answered.
        self._arrived: deque[_Arrived] = deque()
        self._held: bytes | None = None
        self._refusal: tuple[int, str] | None = None
        self._eof = False
        self._task: asyncio.Task[None] | None = None
        self._websocket: WebSocket | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    @property
    def awaiting_input(self) -> bool:
        """A request has started but is not complete: a client that stalls here is dropped."""
        return self._task is None and self._in_message

    @property
    def idle(self) -> bool:
        """Between requests: closing now loses nothing."""
        return self._task is None and not self._in_message and not self._arrived

    @property
    def busy(self) -> bool:
        """Serving a request a stop should let finish (a WebSocket stream need not)."""
        return not self.idle and self._websocket is None

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self._websocket is not None:
            self._websocket.receive(data)
            return
        if self.closed or self._refusal is not None:
            return
        if self._held is not None or self._parser is None:
            self._held = (self._held or b"") + data
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # The upgrade request is complete; what follows waits until it is answered.
            self._held = data[upgrade.args[0] :]
            self._parser = None
        except httptools.HttpParserCallbackError as error:
            refused = error.__context__
            self._refusal = refused.args[0] if isinstance(refused, _Refused) else _MALFORMED
        except httptools.HttpParserError:
            self._refusal = _MALFORMED
        if len(self._arrived) > MAX_PIPELINED:
            self.transport.pause_reading()
        self._serve_next()

    def eof(self) -> None:
        if self._websocket is not None:
            self._websocket.eof()
            return
        self._eof = True
        if self._in_message and self._refusal is None:
            self._refusal = _MALFORMED  # cut short
        self._serve_next()

    def set_writable(self, writable: bool) -> None:
        if self._websocket is not None:
            self._websocket.set_writable(writable)
        if writable:
            self._writable.set()
        else:
            self._writable.clear()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_header_bytes(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._count_header_bytes(len(name) + len(value))

    def _count_header_bytes(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _Refused(_HEADERS_TOO_LARGE)

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.max_body:
            raise _Refused(_BODY_TOO_LARGE)
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        self._in_message = False
        path, _, query = self._url.decode("latin-1").partition("?")
        request = HttpRequest(
            parser.get_method().decode("ascii", "replace"), path, query, self._headers, b"".join(self._body), self.peer
        )
        http10 = parser.get_http_version() == "1.0"
        self._arrived.append(_Arrived(request, parser.should_keep_alive(), http10, parser.should_upgrade()))

    # -- serving -----------------------------------------------------------------------

    def _serve_next(self) -> None:
        if self._task is not None or self.closed:
            return
        if self._arrived:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        elif self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._eof and not self._in_message:
            self.close()

    async def _serve(self) -> None:
        try:
            while self._arrived and not self.closed:
                arrived = self._arrived.popleft()
                if len(self._arrived) == MAX_PIPELINED:
                    self.transport.resume_reading()
                if not await self._answer(arrived):
                    self.close()
                    return
        finally:
            self._task = None
        self._serve_next()

    async def _answer(self, arrived: _Arrived) -> bool:
        """Serve one request; whether the connection goes on after it."""
        request = arrived.request
        upgrade = self.router.websocket_handler(request) if arrived.upgrade else None
        try:
            if upgrade is None:
                response = await self.router.dispatch(request)
            else:
                refusal = await self._serve_websocket(request, upgrade)
                if refusal is None:
                    return False
                response = refusal
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = text_response(500, "internal server error")
        keep_alive = arrived.keep_alive
        try:
            await self._write_response(response, keep_alive, arrived.http10, request.method == "HEAD")
        except ConnectionError:
            return False
        if arrived.upgrade and not self.closed:
            # Not upgraded: go on reading HTTP with a fresh parser from what came after.
            held, self._held = self._held or b"", None
            self._parser = httptools.HttpRequestParser(self)
            if held:
                self.receive(held)
        return keep_alive and not self.closed

    async def _serve_websocket(self, request: HttpRequest, handler: WebSocketHandler) -> HttpResponse | None:
        """Upgrade and hand the connection to `handler` until the WebSocket closes; a refusal to answer instead."""
        answer = websocket.handshake(request.method, request.headers)
        if isinstance(answer, int):
            response = text_response(answer, _reason(answer).decode())
            response.headers += [("Sec-Websocket-Version", "13"), ("X-Content-Type-Options", "nosniff")]
            return self.router.finish(response)
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines += [name + b": " + value + b"\r\n" for name, value in answer]
        self.transport.write(b"".join(lines) + b"\r\n")
        held, self._held = self._held or b"", None
        socket = self._websocket = WebSocket(self.transport, self.max_body, held)
        try:
            await handler(request, socket)
        except Exception:
            log.exception("WebSocket on %s failed", request.path)
            socket.close(1011, "internal error")
        finally:
            self.close()
        return None

    # -- output ------------------------------------------------------------------------

    def _head(self, response: HttpResponse, framing: bytes, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {response.status} {_reason(response.status).decode()}\r\n"]
        for name, value in response.headers:
            if not (name.isprintable() and value.isprintable()):  # no header splitting, whatever a handler sends
                raise ValueError(f"header {name!r} is not printable")
            lines.append(f"{name}: {value}\r\n")
        if response.content_type is not None:
            lines.append(f"Content-Type: {response.content_type}\r\n")
        if not keep_alive:
            lines.append("Connection: close\r\n")
        return "".join(lines).encode("latin-1") + framing + b"\r\n"

    async def _write_response(self, response: HttpResponse, keep_alive: bool, http10: bool, head_only: bool) -> None:
        body = response.body
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
            self._write(self._head(response, framing, keep_alive) + (b"" if head_only else body))
            return
        chunked = not http10  # an HTTP/1.0 client reads to the end of the connection instead
        framing = b"Transfer-Encoding: chunked\r\n" if chunked else b""
        self._write(self._head(response, framing, keep_alive and chunked))
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunk and not head_only:
                    self._write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                await self._writable.wait()
        finally:
            if hasattr(body, "aclose"):
                await body.aclose()
        if chunked and not head_only:
            self._write(b"0\r\n\r\n")
        if not chunked:
            self.close()

    def _refuse(self, status: int, text: str) -> None:
        """A request that cannot be read: answer as Go's net/http does, then close."""
        body = text.encode()
        self._write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n%s"
            % (status, _reason(status), body)
        )
        self.close()

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writable.set()
        if self._websocket is not None:
            self._websocket.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self.transport.close()
