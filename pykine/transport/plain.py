"""Plain HTTP requests that arrive over HTTP/2, for the same router as HTTP/1.1.

A client speaking HTTP/2 (prior knowledge, or ALPN `h2` over TLS) may ask
for `/health` or `/metrics` as well as make gRPC calls; anything on a
connection that is not `application/grpc` comes here and is answered by the
HTTP router, so every route works the same over both protocol versions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pykine.transport import h2
from pykine.transport.headers import HeaderList, encode_block
from pykine.transport.http1 import HttpRequest, HttpResponse, Router, text_response

if TYPE_CHECKING:
    from pykine.transport.grpc import GrpcDispatcher

log = logging.getLogger(__name__)

MAX_BODY = 4 << 20


class PlainRequest:
    """One HTTP request on one HTTP/2 stream: its body, then the router's answer."""

    __slots__ = ("_body", "_dispatcher", "_headers", "_size", "_writable", "done", "stream", "task")

    def __init__(self, dispatcher: GrpcDispatcher, stream: h2.Stream, headers: HeaderList) -> None:
        self._dispatcher = dispatcher
        self.stream = stream
        self._headers = headers
        self._body: list[bytes] = []
        self._size = 0
        self._writable: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.done = False

    def data(self, data: bytes, end_stream: bool) -> None:
        self._dispatcher.consumed(self.stream, len(data))
        if self.done or self.task is not None:  # answered or refused already: the rest is dropped
            return
        self._size += len(data)
        if self._size > MAX_BODY:
            self.task = self._dispatcher.spawn(self._answer(text_response(413, "request body too large")))
            return
        self._body.append(data)
        if end_stream:
            self.task = self._dispatcher.spawn(self._serve(self._dispatcher.router))

    async def _serve(self, router: Router | None) -> None:
        pseudo = {name: value for name, value in self._headers if name.startswith(b":")}
        target = pseudo.get(b":path", b"/").decode("latin-1")
        path, _, query = target.partition("?")
        request = HttpRequest(
            pseudo.get(b":method", b"GET").decode("latin-1"),
            path,
            query,
            [(name, value) for name, value in self._headers if not name.startswith(b":")],
            b"".join(self._body),
            self._dispatcher.peer,
        )
        if router is None:
            response = text_response(404, "404 page not found")
        else:
            try:
                response = await router.dispatch(request)
            except Exception:
                log.exception("HTTP %s %s failed", request.method, path)
                response = text_response(500, "internal server error")
        await self._answer(response, head_only=request.method == "HEAD")

    async def _answer(self, response: HttpResponse, head_only: bool = False) -> None:
        connection = self._dispatcher.connection
        stream = self.stream
        fields = [(b":status", b"%d" % response.status)]
        if response.content_type is not None:
            fields.append((b"content-type", response.content_type.encode()))
        fields += [(name.lower().encode(), value.encode()) for name, value in response.headers]
        body = response.body
        if isinstance(body, bytes):
            fields.append((b"content-length", b"%d" % len(body)))
        connection.send_headers(stream, encode_block(fields), end_stream=head_only)
        if head_only:
            self.done = True
            return
        if isinstance(body, bytes):
            connection.send_data(stream, body)
        else:
            async for chunk in body:
                if self.done:
                    return
                connection.send_data(stream, chunk)
                while (stream.queued > h2.LOW_WATER or not connection.writable) and not self.done:
                    self._writable = asyncio.get_running_loop().create_future()
                    await self._writable
        self.done = True
        connection.end_stream(stream)

    def writable(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def cancelled(self) -> None:
        self.done = True
        self.writable()
        if self.task is not None:
            self.task.cancel()
