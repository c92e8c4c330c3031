"""gRPC over the HTTP/2 connection of `h2.py`: calls, messages, statuses.

`GrpcDispatcher` is the StreamHandler of one connection. Each request stream
becomes a `Call`: its headers name a registered `Method`, its DATA is cut
into length-prefixed messages (gRPC's framing: a compressed flag and a
4-byte length), and the method's handler runs as an asyncio task. Handlers
know nothing of HTTP/2:

- unary:            ``async def handler(request, call) -> response``
- server streaming: ``def handler(request, call) -> AsyncIterator[response]``
- client streaming: ``async def handler(requests, call) -> response``
- bidirectional:    ``def handler(requests, call) -> AsyncIterator[response]``

`requests` is an async iterator of decoded messages. A handler ends its call
with an error by raising `RpcError`; the transport writes the status as
trailers (or as a trailers-only response when nothing was sent yet), with the
message percent-encoded as gRPC requires. Statuses and messages that belong
to the transport (unknown methods, undecodable or oversized messages,
deadlines) are those grpc-go, and so etcd, sends.

Most calls are unary and fit the windows: their response goes out as one
write of HEADERS, DATA and trailers whose header blocks are computed once.
Streaming responses wait while their stream has more than `h2.LOW_WATER`
bytes queued, so a slow reader holds back its own stream only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pykine.transport import h2
from pykine.transport.headers import HeaderList, encode_block
from pykine.transport.http1 import Peer, Router
from pykine.transport.plain import PlainRequest

log = logging.getLogger(__name__)

_PREFIX = struct.Struct(">BL")
# Messages from this size on are sent without first copying them behind their prefix.
LARGE_MESSAGE = 64 << 10


class Status(IntEnum):
    """gRPC status codes."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """Ends a call with this status and message."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Method:
    """A method served: its handler and how its messages are decoded."""

    handler: Callable[..., Any]
    decode: Callable[[bytes], Any]
    client_streaming: bool = False
    server_streaming: bool = False


class Registry:
    """The methods served, by path ("/package.Service/Method")."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}
        self.services: set[str] = set()

    def add(self, service: str, name: str, method: Method) -> None:
        self.methods[f"/{service}/{name}"] = method
        self.services.add(service)

    def lookup(self, path: str) -> Method:
        method = self.methods.get(path)
        if method is not None:
            return method
        # grpc-go's words (and codes) for a path it cannot route.
        service, slash, name = path.removeprefix("/").rpartition("/")
        if not slash or not path.startswith("/"):
            raise RpcError(Status.RESOURCE_EXHAUSTED, f"malformed method name: {json.dumps(path)}")
        if service in self.services:
            raise RpcError(Status.UNIMPLEMENTED, f"unknown method {name} for service {service}")
        raise RpcError(Status.UNIMPLEMENTED, f"unknown service {service}")


def too_large(length: int, limit: int) -> str:
    """grpc-go's words for a request over the receive limit, which etcd's clients see."""
    return f"grpc: received message larger than max ({length} vs. {limit})"


@dataclass(frozen=True, slots=True)
class CallLimits:
    max_receive_message: int = 4 << 20


def encode_message(payload: bytes) -> bytes:
    return _PREFIX.pack(0, len(payload)) + payload


def _percent_encode(message: str) -> str:
    """grpc-message encoding: bytes outside printable ASCII, and '%', as %XX."""
    if all(" " <= char <= "~" and char != "%" for char in message):
        return message
    return "".join(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}" for byte in message.encode())


RESPONSE_HEADERS = encode_block([(b":status", b"200"), (b"content-type", b"application/grpc")])


@functools.lru_cache(maxsize=256)
def trailers_block(status: Status, message: str, trailers_only: bool) -> bytes:
    """The block that ends a call; with the response headers when it is the only one."""
    fields = [(b"grpc-status", b"%d" % status), (b"grpc-message", _percent_encode(message).encode())]
    if trailers_only:
        fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), *fields]
    return encode_block(fields)


OK_TRAILERS = trailers_block(Status.OK, "", False)

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float | None:
    """grpc-timeout in seconds: at most 8 digits and a unit; None if malformed.

    Like grpc-go, a sign is accepted (a negative timeout has already expired).
    """
    digits, unit = value[:-1], value[-1:]
    scale = _TIMEOUT_UNITS.get(unit)
    magnitude = digits[1:] if digits[:1] in (b"+", b"-") else digits
    if scale is None or not 0 < len(magnitude) <= 8 or not magnitude.isdigit():
        return None
    return int(digits) * scale


_END = object()  # end of the request stream


# Request bytes a streaming call may have waiting, decoded but not yet taken by its
# handler, before the stream's flow-control credit is held back.
QUEUE_LIMIT = 1 << 20


class RequestStream:
    """The decoded requests of a client-streaming call, as an async iterator."""

    __slots__ = ("_call", "_items", "_waiter", "waiting_bytes")

    def __init__(self, call: Call) -> None:
        self._call = call
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.waiting_bytes = 0

    def put(self, item: Any) -> None:
        if item is not _END:
            self.waiting_bytes += item[1]
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(item)
            raise StopAsyncIteration
        message, size = item
        self.waiting_bytes -= size
        if self.waiting_bytes < QUEUE_LIMIT:
            self._call.release_credit()
        return message


class Call:
    """One gRPC call on one stream: what the handler may see (`metadata`, `peer`) and its I/O."""

    __slots__ = (
        "_buffer",
        "_deadline",
        "_dispatcher",
        "_headers",
        "_metadata",
        "_withheld",
        "_writable",
        "done",
        "headers_sent",
        "method",
        "path",
        "requests",
        "stream",
        "task",
    )

    def __init__(self, dispatcher: GrpcDispatcher, stream: h2.Stream, method: Method, path: str, headers: HeaderList):
        self._dispatcher = dispatcher
        self.stream = stream
        self.method = method
        self.path = path
        self._headers = headers
        self._metadata: dict[str, str | bytes] | None = None
        self._buffer = bytearray()
        self._deadline: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._withheld = 0
        self.requests: RequestStream | None = RequestStream(self) if method.client_streaming else None
        self.task: asyncio.Task[None] | None = None
        self.headers_sent = False
        self.done = False

    def header(self, *names: bytes) -> str | None:
        """The first of these request headers that was sent, without decoding all the metadata."""
        for name, value in self._headers:
            if name in names:
                return value.decode("latin-1")
        return None

    @property
    def metadata(self) -> dict[str, str | bytes]:
        """Custom request headers; `-bin` ones decoded from base64, as gRPC defines."""
        if self._metadata is None:
            metadata: dict[str, str | bytes] = {}
            for name, value in self._headers:
                if name.startswith(b":") or name in (b"content-type", b"te", b"grpc-timeout", b"grpc-encoding"):
                    continue
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    try:
                        metadata[key] = base64.b64decode(value + b"=" * (-len(value) % 4))
                    except ValueError:
                        continue
                else:
                    metadata[key] = value.decode("latin-1")
            self._metadata = metadata
        return self._metadata

    @property
    def peer(self) -> Peer:
        return self._dispatcher.peer

    # -- input ---------------------------------------------------------------------

    def data(self, data: bytes, end_stream: bool) -> None:
        # Credit goes back as bytes arrive (a message may be larger than the
        # stream window), unless this call's handler has fallen behind.
        if self.requests is not None and self.requests.waiting_bytes >= QUEUE_LIMIT:
            self._withheld += len(data)
        elif data:
            self._dispatcher.consumed(self.stream, len(data))
        buffer = self._buffer
        if buffer or len(data) < 5:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        position = 0
        method = self.method
        limit = self._dispatcher.limits.max_receive_message
        while len(view) - position >= 5:
            compressed, length = _PREFIX.unpack_from(view, position)
            if compressed > 1:
                self.fail(Status.INTERNAL, f"grpc: received unexpected payload format {compressed}")
                return
            if length > limit:
                self.fail(Status.RESOURCE_EXHAUSTED, too_large(length, limit))
                return
            end = position + 5 + length
            if end > len(view):
                break
            if compressed:
                self.fail(Status.INTERNAL, "grpc: compressed flag set with identity or empty encoding")
                return
            try:
                message = method.decode(bytes(view[position + 5 : end]))
            except Exception as error:  # protobuf's DecodeError, or anything a decoder raises
                self.fail(Status.INTERNAL, f"grpc: error unmarshalling request: {error}")
                return
            position = end
            if self.requests is not None:
                self.requests.put((message, 5 + length))
            elif self.task is None:
                self.start(message)
            # Further messages on a unary call are ignored.
        if view is buffer:
            del buffer[:position]
        elif position < len(view):
            buffer += view[position:]
        if end_stream:
            # grpc-go's answers to a request that ends inside a message, or before one.
            if buffer and (self.requests is not None or self.task is None):  # after a unary's message: ignored
                self.fail(Status.UNKNOWN, "unexpected EOF")
            elif self.requests is not None:
                self.requests.put(_END)
            elif self.task is None:
                self.fail(Status.UNKNOWN, "EOF")

    def release_credit(self) -> None:
        if self._withheld:
            self._dispatcher.consumed(self.stream, self._withheld)
            self._withheld = 0

    # -- running -------------------------------------------------------------------

    def start(self, request: Any) -> None:
        """Run the handler; `request` is the message, or the RequestStream for client streaming."""
        run = self._stream_responses if self.method.server_streaming else self._unary_response
        self.task = self._dispatcher.spawn(run(request))

    def set_deadline(self, seconds: float) -> None:
        self._deadline = asyncio.get_running_loop().call_later(seconds, self.expire)

    def expire(self) -> None:
        self.fail(Status.DEADLINE_EXCEEDED, "context deadline exceeded")

    async def _unary_response(self, request: Any) -> None:
        with self._errors_end_the_call():
            response = await self.method.handler(request, self)
            if not self.done:
                payload = response.SerializeToString()  # before closing: a failure here still ends the call
                self._close()
                self._dispatcher.respond(self.stream, payload)

    async def _stream_responses(self, request: Any) -> None:
        responses: AsyncIterator[Any] = self.method.handler(request, self)
        with self._errors_end_the_call():
            try:
                async for response in responses:
                    if self.done:
                        break
                    await self.send(response)
            finally:
                if hasattr(responses, "aclose"):
                    await responses.aclose()
            self.finish(Status.OK, "")

    @contextlib.contextmanager
    def _errors_end_the_call(self) -> Iterator[None]:
        """A handler's RpcError becomes its status; another error is a bug: UNKNOWN (as grpc-go), and logged."""
        try:
            yield
        except RpcError as error:
            self.finish(error.status, error.message)
        except Exception as error:
            if not self.done:
                log.error("%s failed", self.path, exc_info=error)
                self.finish(Status.UNKNOWN, str(error))

    # -- output --------------------------------------------------------------------

    async def send(self, response: Any) -> None:
        """Send one message of a streaming response, waiting while the stream's queue is long."""
        dispatcher = self._dispatcher
        stream = self.stream
        if not self.headers_sent:
            self.headers_sent = True
            dispatcher.connection.send_headers(stream, RESPONSE_HEADERS)
        dispatcher.connection.send_data(stream, encode_message(response.SerializeToString()))
        while (stream.queued > h2.LOW_WATER or not dispatcher.connection.writable) and not self.done:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def writable(self) -> None:
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, status: Status, message: str) -> None:
        """End the call with a status (no effect once it has ended)."""
        if self.done:
            return
        self._close()
        connection = self._dispatcher.connection
        connection.send_headers(self.stream, trailers_block(status, message, not self.headers_sent), end_stream=True)

    def fail(self, status: Status, message: str) -> None:
        """End the call from the transport's side, stopping its handler."""
        if self.done:
            return
        self.finish(status, message)
        if self.task is not None:
            self.task.cancel()

    def _close(self) -> None:
        self.done = True
        if self._deadline is not None:
            self._deadline.cancel()
        self.writable()
        self.stream.app = None

    def cancelled(self) -> None:
        """The stream was reset by the peer or the connection is gone."""
        if self.done:
            return
        self._close()
        if self.task is not None:
            self.task.cancel()


class GrpcDispatcher:
    """The h2 StreamHandler: gRPC streams become calls, other requests go to the HTTP router."""

    def __init__(
        self, registry: Registry, limits: CallLimits, router: Router | None = None, peer: Peer | None = None
    ) -> None:
        self.registry = registry
        self.router = router
        self.limits = limits
        self.peer = peer or Peer()
        self.connection: h2.Connection = None  # type: ignore[assignment]  # set by attach()
        self.tasks: set[asyncio.Task[None]] = set()

    def attach(self, connection: h2.Connection) -> None:
        self.connection = connection

    # -- StreamHandler -------------------------------------------------------------

    def stream_started(self, stream: h2.Stream, headers: HeaderList, header_size: int, end_stream: bool) -> None:
        path = b""
        content_type = b""
        timeout = b""
        encoding = b""
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"grpc-encoding":
                encoding = value
        connection = self.connection
        if not (
            content_type == b"application/grpc" or content_type.startswith((b"application/grpc+", b"application/grpc;"))
        ):
            # Not gRPC: for the HTTP routes. (etcd resets such streams on
            # plain-text ports; over TLS it serves HTTP/2 requests as pykine does.)
            plain = PlainRequest(self, stream, headers)
            stream.app = plain
            if end_stream:
                plain.data(b"", True)
            return
        path_text = path.decode("latin-1")
        try:
            if header_size > connection.limits.max_header_list_size:
                raise RpcError(Status.RESOURCE_EXHAUSTED, "header list size exceeds the limit")
            target = self.registry.lookup(path_text)
            if encoding and encoding != b"identity":
                raise RpcError(
                    Status.UNIMPLEMENTED,
                    f'grpc: Decompressor is not installed for grpc-encoding "{encoding.decode("latin-1")}"',
                )
        except RpcError as error:
            connection.send_headers(stream, trailers_block(error.status, error.message, True), end_stream=True)
            return
        deadline = parse_timeout(timeout) if timeout else None
        if timeout and deadline is None:
            connection.reset(stream, h2.ErrorCode.PROTOCOL_ERROR)  # as grpc-go answers a malformed timeout
            return
        call = Call(self, stream, target, path_text, headers)
        stream.app = call
        if deadline is not None:
            call.set_deadline(deadline)
        if call.requests is not None:
            call.start(call.requests)
        if end_stream:
            call.data(b"", True)

    def stream_data(self, stream: h2.Stream, data: bytes, end_stream: bool) -> None:
        call = stream.app
        if call is None:  # the call already ended: its credit comes back at once
            if data:
                self.connection.acknowledge(stream, len(data))
            return
        call.data(data, end_stream)  # type: ignore[attr-defined]

    def stream_reset(self, stream: h2.Stream, code: int) -> None:
        call = stream.app
        if call is not None:
            call.cancelled()  # type: ignore[attr-defined]

    def stream_writable(self, stream: h2.Stream) -> None:
        call = stream.app
        if call is not None:
            call.writable()  # type: ignore[attr-defined]

    # -- for calls -----------------------------------------------------------------

    def spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def consumed(self, stream: h2.Stream, size: int) -> None:
        self.connection.acknowledge(stream, size)

    def respond(self, stream: h2.Stream, payload: bytes) -> None:
        """A unary call's answer: one write for the usual small one; a large one is not copied to frame it."""
        connection = self.connection
        if len(payload) < LARGE_MESSAGE:
            connection.send_response(stream, RESPONSE_HEADERS, encode_message(payload), OK_TRAILERS)
            return
        connection.send_headers(stream, RESPONSE_HEADERS)
        connection.send_data(stream, _PREFIX.pack(0, len(payload)))
        connection.send_data(stream, payload)
        connection.send_headers(stream, OK_TRAILERS, end_stream=True)

    @property
    def busy(self) -> bool:
        """Whether a request other than a server-streaming call is in flight."""
        return any(
            not (isinstance(stream.app, Call) and stream.app.method.server_streaming)
            for stream in self.connection.streams.values()
        )
