"""HTTP/1.1 on the client port, through h11, with a router other layers add to.

etcd answers `/health`, `/version` and `/metrics` (and its JSON gateway) on
the same port as gRPC. The listener hands every connection that does not
open with the HTTP/2 preface to an `Http1Connection`, which parses requests
with h11 (a sans-IO state machine, so this module stays small) and looks the
handler up in a `Router`. Handlers know nothing of h11:

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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11

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


def text_response(status: int, text: str) -> HttpResponse:
    return HttpResponse(status, (text + "\n").encode())


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

    def websocket_handler(self, request: HttpRequest) -> WebSocketHandler | None:
        if not self._websockets or not websocket.is_upgrade(request.headers):
            return None
        return self._websockets.get(request.path)

    async def dispatch(self, request: HttpRequest) -> HttpResponse:
        return self.finish(await self._route(request))

    def finish(self, response: HttpResponse) -> HttpResponse:
        """The headers every answer carries."""
        if self.cors_headers:
            response.headers[:0] = self.cors_headers
        response.headers.append(("Date", formatdate(usegmt=True)))
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


class Http1Connection:
    """One HTTP/1.1 connection: h11 for the protocol, the router for the answers."""

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
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: h11.Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._websocket: WebSocket | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False

    @property
    def awaiting_input(self) -> bool:
        """A request has started but is not complete: a client that stalls here is dropped."""
        return self._task is None and (self._h11.their_state is h11.SEND_BODY or bool(self._h11.trailing_data[0]))

    @property
    def busy(self) -> bool:
        """Serving a request a stop should let finish (a WebSocket stream need not)."""
        return not self.idle and self._websocket is None

    @property
    def idle(self) -> bool:
        """Between requests: closing now loses nothing."""
        return self._task is None and self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]

    def receive(self, data: bytes) -> None:
        if self._websocket is not None:
            self._websocket.receive(data)
            return
        self._h11.receive_data(data)
        self._process()

    def eof(self) -> None:
        if self._websocket is not None:
            self._websocket.eof()
            return
        self._h11.receive_data(b"")
        self._process()

    def set_writable(self, writable: bool) -> None:
        if self._websocket is not None:
            self._websocket.set_writable(writable)
        if writable:
            self._writable.set()
        else:
            self._writable.clear()

    def _process(self) -> None:
        while self._task is None and not self.closed:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as error:
                self._refuse(error.error_status_hint, str(error))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if sum(len(name) + len(value) for name, value in event.headers) > MAX_HEADER_BYTES:
                    self._refuse(431, "request header fields too large")
                    return
                self._request = event
                self._body = []
                self._body_size = 0
            elif isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > self.max_body:
                    self._refuse(413, "request body too large")
                    return
                self._body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                self._task = asyncio.get_running_loop().create_task(self._serve(self._request, b"".join(self._body)))
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _refuse(self, status: int, reason: str) -> None:
        """A request h11 cannot parse: answer if HTTP still allows it, then close."""
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                body = (reason + "\n").encode()
                self._send(
                    h11.Response(
                        status_code=status,
                        reason=_reason(status),
                        headers=[
                            ("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))),
                            ("Connection", "close"),
                        ],
                    )
                )
                self._send(h11.Data(data=body))
                self._send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
        self.close()

    async def _serve(self, request: h11.Request, body: bytes) -> None:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        http_request = HttpRequest(
            request.method.decode("ascii"), path, query, [(k, v) for k, v in request.headers], body, self.peer
        )
        upgrade = self.router.websocket_handler(http_request)
        try:
            if upgrade is None:
                response = await self.router.dispatch(http_request)
            else:
                refusal = await self._serve_websocket(http_request, upgrade)
                if refusal is None:
                    return
                response = refusal
        except Exception:
            log.exception("HTTP %s %s failed", http_request.method, path)
            response = text_response(500, "internal server error")
        try:
            await self._write_response(response)
        except (h11.LocalProtocolError, ConnectionError):
            self.close()
            return
        finally:
            self._task = None
        if self.closed:
            return
        if self._h11.our_state is h11.MUST_CLOSE or self._h11.their_state is h11.MUST_CLOSE:
            self.close()
            return
        try:
            self._h11.start_next_cycle()
        except h11.LocalProtocolError:
            self.close()
            return
        self._process()

    async def _serve_websocket(self, request: HttpRequest, handler: WebSocketHandler) -> HttpResponse | None:
        """Upgrade and hand the connection to `handler` until the WebSocket closes; a refusal to answer instead."""
        answer = websocket.handshake(request.method, request.headers)
        if isinstance(answer, int):
            response = text_response(answer, _reason(answer).decode())
            response.headers += [("Sec-Websocket-Version", "13"), ("X-Content-Type-Options", "nosniff")]
            return self.router.finish(response)
        self._send(h11.InformationalResponse(status_code=101, headers=answer, reason=b"Switching Protocols"))
        socket = self._websocket = WebSocket(self.transport, self.max_body, self._h11.trailing_data[0])
        try:
            await handler(request, socket)
        except Exception:
            log.exception("WebSocket on %s failed", request.path)
            socket.close(1011, "internal error")
        finally:
            self.close()
        return None

    async def _write_response(self, response: HttpResponse) -> None:
        headers = list(response.headers)
        if response.content_type is not None:
            headers.append(("Content-Type", response.content_type))
        body = response.body
        if isinstance(body, bytes):
            headers.append(("Content-Length", str(len(body))))
            self._send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
            if body:
                self._send(h11.Data(data=body))
            self._send(h11.EndOfMessage())
            return
        self._send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
        async for chunk in body:
            if self.closed:
                return
            if chunk:
                self._send(h11.Data(data=chunk))
            await self._writable.wait()
        self._send(h11.EndOfMessage())

    def _send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data and not self.closed:
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
