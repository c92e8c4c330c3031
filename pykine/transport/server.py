"""The client port: accept connections, tell HTTP/2 from HTTP/1.1, move bytes.

One listener serves gRPC and plain HTTP, as etcd's client port does. Each
accepted connection starts undecided: if its first bytes are the HTTP/2
preface (h2c with prior knowledge, or TLS with ALPN `h2`, whose clients send
the same preface) it becomes an HTTP/2 connection whose streams go to the
gRPC dispatcher; anything else is HTTP/1.1 for the router.

This is the only module here that touches sockets and the event loop's
transports; `h2.py` and `grpc.py` are driven through it. Output is written
once per input chunk, and output produced by finishing calls is gathered
and written once per loop iteration. When the socket's write buffer is full
the connection stops reading, so a client that does not read cannot make
the server buffer without bound.

A sweeper closes connections that stall in the middle of something (a
partial preface, frame, header block or HTTP/1.1 request) for longer than
`ServerLimits.input_timeout`: the slow-client (slowloris) bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass, field

from pykine.transport import h2
from pykine.transport.grpc import CallLimits, GrpcDispatcher, Registry
from pykine.transport.http1 import Http1Connection, Peer, Router
from pykine.transport.tls import common_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    h2: h2.Limits = field(default_factory=h2.Limits)
    calls: CallLimits = field(default_factory=CallLimits)
    input_timeout: float = 30.0
    # The largest HTTP/1.1 request body read; a larger one is answered 413 and its connection closed.
    http_body: int = 4 << 20
    sweep_interval: float = 5.0
    backlog: int = 4096


class ClientConnection(asyncio.Protocol):
    """One accepted connection, HTTP/2 or HTTP/1.1 once its first bytes tell."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.h2: h2.Connection | None = None
        self.dispatcher: GrpcDispatcher | None = None
        self.http1: Http1Connection | None = None
        self._undecided = b""
        self._flush_scheduled = False
        self.receives = 0  # for the sweeper: has anything arrived since it last looked?
        self.swept_receives = -1
        self.stalled_sweeps = 0
        self.closed = False
        self.peer = Peer()

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        self.peer = Peer(transport.get_extra_info("peername"), common_name(ssl_object))
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._start_h2()

    def data_received(self, data: bytes) -> None:
        self.receives += 1
        if self.h2 is not None:
            self._h2_receive(data)
        elif self.http1 is not None:
            self.http1.receive(data)
        else:
            self._sniff(data)

    def eof_received(self) -> bool | None:
        if self.http1 is not None:
            self.http1.eof()
        return None

    def pause_writing(self) -> None:
        self.transport.pause_reading()
        if self.h2 is not None:
            self.h2.set_writable(False)
        elif self.http1 is not None:
            self.http1.set_writable(False)

    def resume_writing(self) -> None:
        if not self.closed:
            self.transport.resume_reading()
        if self.h2 is not None:
            self.h2.set_writable(True)
            self._flush()
        elif self.http1 is not None:
            self.http1.set_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.h2 is not None:
            self.h2.connection_lost()
        if self.http1 is not None:
            self.http1.close()

    # -- deciding --------------------------------------------------------------------

    def _sniff(self, data: bytes) -> None:
        data = self._undecided + data
        if h2.PREFACE.startswith(data[: len(h2.PREFACE)]):
            if len(data) < len(h2.PREFACE):
                self._undecided = data
                return
            self._undecided = b""
            self._start_h2()
            self._h2_receive(data)
            return
        self._undecided = b""
        self.http1 = Http1Connection(self.server.router, self.transport, self.peer, self.server.limits.http_body)
        self.http1.receive(data)

    def _start_h2(self) -> None:
        self.dispatcher = GrpcDispatcher(self.server.registry, self.server.limits.calls, self.server.router, self.peer)
        self.h2 = h2.Connection(self.dispatcher, self.server.limits.h2)
        self.dispatcher.attach(self.h2)
        self.h2.on_output = self._schedule_flush
        self.h2.initiate()
        if self.server.stopping:
            self.h2.goaway()
        self._flush()

    # -- HTTP/2 ----------------------------------------------------------------------

    def _h2_receive(self, data: bytes) -> None:
        connection = self.h2
        assert connection is not None
        try:
            connection.receive(data)
        except Exception:  # a bug in the frame layer must cost one connection, not the server
            log.exception("HTTP/2 connection failed")
            connection.close(h2.ErrorCode.INTERNAL_ERROR, "internal error")
        self._flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        connection = self.h2
        if connection is None or self.closed:
            return
        data = connection.data_to_send()
        if data:
            self.transport.write(data)
        if connection.closed or (connection.goaway_sent and connection.idle and self.server.stopping):
            self.close()

    # -- both ------------------------------------------------------------------------

    @property
    def awaiting_input(self) -> bool:
        if self.h2 is not None:
            return self.h2.awaiting_input
        if self.http1 is not None:
            return self.http1.awaiting_input
        return True

    @property
    def busy(self) -> bool:
        """Whether a request that should finish before a stop is in flight (streams need not)."""
        if self.dispatcher is not None:
            return self.dispatcher.busy
        return self.http1 is not None and self.http1.busy

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()


class Server:
    """Listeners, their connections, and a graceful stop."""

    def __init__(self, registry: Registry, router: Router, limits: ServerLimits | None = None) -> None:
        self.registry = registry
        self.router = router
        self.limits = limits or ServerLimits()
        self.connections: set[ClientConnection] = set()
        self.stopping = False
        self._servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def listen_tcp(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False
    ) -> int:
        """Bind host:port (accepting starts with `start`); returns the port bound (useful with port 0)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ClientConnection(self),
            host.strip("[]") or None,
            port,
            ssl=ssl_context,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=self.limits.backlog,
            start_serving=False,
        )
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def listen_unix(self, path: str, ssl_context: ssl.SSLContext | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a socket left by an earlier run
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(
            lambda: ClientConnection(self), path, ssl=ssl_context, backlog=self.limits.backlog, start_serving=False
        )
        self._servers.append(server)

    async def start(self) -> None:
        """Accept connections on every listener (bound but not yet accepting until now)."""
        for server in self._servers:
            await server.start_serving()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections stalled mid-input for longer than the input timeout."""
        interval = self.limits.sweep_interval
        limit = max(1, round(self.limits.input_timeout / interval))
        while True:
            await asyncio.sleep(interval)
            for connection in list(self.connections):
                if connection.awaiting_input and connection.receives == connection.swept_receives:
                    connection.stalled_sweeps += 1
                    if connection.stalled_sweeps >= limit:
                        log.debug("closing a connection stalled mid-request")
                        connection.close()
                else:
                    connection.stalled_sweeps = 0
                connection.swept_receives = connection.receives

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let calls in flight finish for up to `grace` seconds, then close.

        Every HTTP/2 connection gets a GOAWAY at once, so clients open no new
        streams here. Streaming calls (watches, keep-alives, which never end
        by themselves) do not hold the stop up: like a stopping etcd, which
        closes its connections without a word, pykine then closes every
        connection, and their clients reconnect elsewhere.
        """
        self.stopping = True
        for server in self._servers:
            server.close()
        for connection in list(self.connections):
            if connection.h2 is not None:
                connection.h2.goaway()
                connection._flush()
            elif connection.http1 is not None and connection.http1.idle:
                connection.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline and any(connection.busy for connection in self.connections):
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
