"""WebSocket (RFC 6455) on an HTTP/1.1 connection, for handlers that stream both ways.

etcd 3.4 puts a websocket proxy in front of its JSON gateway: a client that
upgrades `/v3/watch` to a WebSocket sends each request as a message and gets
each answer as a text message, and can keep sending requests on the same
watch. A plain HTTP/1.1 body cannot do that (etcd reads it whole). The frame
protocol is wsproto's (sans-IO); this module only does the opening
handshake's arithmetic and ties wsproto to the asyncio transport. No
extensions (compression) are offered, as etcd offers none.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

# Unread messages beyond this many bytes stop reading from the socket until the handler catches up.
QUEUE_HIGH_WATER = 1 << 20


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    return {token.strip().lower() for key, value in headers if key.lower() == name for token in value.split(b",")}


def is_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request asks to become a WebSocket (what the handshake must then check is `accept`'s job)."""
    return b"websocket" in _tokens(headers, b"upgrade") and b"upgrade" in _tokens(headers, b"connection")


def handshake(method: str, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | int:
    """The 101 answer's headers for a valid opening handshake, else the HTTP status that refuses it."""
    if method != "GET":
        return 405
    if b"13" not in _tokens(headers, b"sec-websocket-version"):
        return 400
    key = next((value.strip() for name, value in headers if name.lower() == b"sec-websocket-key"), b"")
    if not key:
        return 400
    accept = generate_accept_token(key)
    answer = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", accept)]
    # A client offering the "Bearer" subprotocol (to carry a token) gets it confirmed, or it would give up.
    offered = next((value for name, value in headers if name.lower() == b"sec-websocket-protocol"), b"")
    if offered.startswith(b"Bearer"):
        answer.append((b"Sec-WebSocket-Protocol", b"Bearer"))
    return answer


class WebSocket:
    """The server end of one WebSocket: whole messages in, text messages out."""

    def __init__(self, transport: asyncio.Transport, max_message: int, received: bytes = b"") -> None:
        self.transport = transport
        self.max_message = max_message
        self._protocol = Connection(ConnectionType.SERVER)
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._messages: deque[bytes] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = False
        if received:
            self.receive(received)

    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        self._protocol.receive_data(data)
        for event in self._protocol.events():
            if isinstance(event, Message):
                self._add(event)
            elif isinstance(event, Ping):
                self._write(self._protocol.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._protocol.state is ConnectionState.REMOTE_CLOSING:
                    self._write(self._protocol.send(event.response()))
                self.close()
                return

    def eof(self) -> None:
        self.close()

    def _add(self, event: Message) -> None:
        data = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
        self._partial_size += len(data)
        if self._partial_size > self.max_message:
            self.close(CloseReason.MESSAGE_TOO_BIG, "message too big")
            return
        self._partial.append(data)
        if not event.message_finished:
            return
        message = b"".join(self._partial)
        self._partial, self._partial_size = [], 0
        self._messages.append(message)
        self._queued += len(message)
        if self._queued > QUEUE_HIGH_WATER:
            self.transport.pause_reading()
        self._arrived.set()

    async def messages(self) -> AsyncIterator[bytes]:
        """Each message the client sends (text or binary, as bytes), until it closes."""
        while True:
            while self._messages:
                message = self._messages.popleft()
                self._queued -= len(message)
                if self._queued <= QUEUE_HIGH_WATER and not self.closed:
                    self.transport.resume_reading()
                yield message
            if self.closed:
                return
            self._arrived.clear()
            await self._arrived.wait()

    async def send(self, text: bytes) -> None:
        """One text message (the handler's bytes must be UTF-8), once the socket can take more."""
        await self._writable.wait()
        if not self.closed:
            self._write(self._protocol.send(TextMessage(data=text.decode())))

    def set_writable(self, writable: bool) -> None:
        if writable:
            self._writable.set()
        else:
            self._writable.clear()

    def _write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Say goodbye if the protocol still allows it, and drop the connection."""
        if self.closed:
            return
        self.closed = True
        if self._protocol.state is ConnectionState.OPEN:
            self._write(self._protocol.send(CloseConnection(code=code, reason=reason)))
        self._arrived.set()
        self._writable.set()
        self.transport.close()
