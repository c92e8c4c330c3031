"""The transport on its own (no etcd in it): a small test service served in-process, real clients.

grpcio is the strict independent client for gRPC; raw sockets play the slow
and broken clients; HTTP/1.1 goes through plain sockets so every byte is seen.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from pykine.transport.grpc import Call, CallLimits, Method, Registry, RpcError, Status
from pykine.transport.http1 import HttpRequest, HttpResponse, Router
from pykine.transport.server import Server, ServerLimits

MAX_MESSAGE = 5 << 20


class Raw(bytes):
    """Messages are plain bytes here; the transport only needs SerializeToString."""

    def SerializeToString(self) -> bytes:
        return bytes(self)


def decode(data: bytes) -> Raw:
    if data.startswith(b"\xff"):
        raise ValueError("not a message")
    return Raw(data)


class EchoService:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.started = threading.Event()

    async def Echo(self, request: Raw, call: Call) -> Raw:
        return request

    async def Fail(self, request: Raw, call: Call) -> Raw:
        raise RpcError(Status.FAILED_PRECONDITION, request.decode())

    async def Crash(self, request: Raw, call: Call) -> Raw:
        raise RuntimeError("a bug")

    async def Unencodable(self, request: Raw, call: Call) -> Raw:
        return "not a message"  # type: ignore[return-value]  # a servicer bug the call must survive

    async def Metadata(self, request: Raw, call: Call) -> Raw:
        return Raw(repr(sorted(call.metadata.items())).encode())

    async def Hang(self, request: Raw, call: Call) -> Raw:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        return request

    async def Count(self, request: Raw, call: Call) -> AsyncIterator[Raw]:
        for index in range(int(request)):
            yield Raw(b"%d" % index)

    async def Chat(self, requests: AsyncIterator[Raw], call: Call) -> AsyncIterator[Raw]:
        async for request in requests:
            yield request

    async def Sum(self, requests: AsyncIterator[Raw], call: Call) -> Raw:
        return Raw(b"%d" % sum([len(request) async for request in requests]))

    async def Forever(self, requests: AsyncIterator[Raw], call: Call) -> AsyncIterator[Raw]:
        yield Raw(b"hello")
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        yield Raw(b"never")


class Served:
    """A transport Server on its own event loop thread."""

    def __init__(self, limits: ServerLimits) -> None:
        self.service = EchoService()
        registry = Registry()
        streaming = {"Count": (False, True), "Chat": (True, True), "Sum": (True, False), "Forever": (True, True)}
        for name in ("Echo", "Fail", "Crash", "Unencodable", "Metadata", "Hang", "Count", "Chat", "Sum", "Forever"):
            client_streaming, server_streaming = streaming.get(name, (False, False))
            registry.add(
                "test.Test", name, Method(getattr(self.service, name), decode, client_streaming, server_streaming)
            )
        router = Router()

        async def hello(request: HttpRequest) -> HttpResponse:
            return HttpResponse(200, b"hello " + request.body, content_type="text/plain")

        router.add(("GET", "POST"), "/hello", hello)
        self.server = Server(registry, router, limits)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.port = self.loop.run_until_complete(self.server.listen_tcp("127.0.0.1", 0))
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )

    def method(self, name: str, kind: str = "unary_unary") -> Any:
        return getattr(self.channel, kind)(f"/test.Test/{name}")

    def shutdown(self, grace: float) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self.loop).result(30)

    def stop(self) -> None:
        self.channel.close()
        if not self.server.stopping:
            self.shutdown(0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served() -> Iterator[Served]:
    serving = Served(
        ServerLimits(calls=CallLimits(max_receive_message=MAX_MESSAGE), input_timeout=0.5, sweep_interval=0.1)
    )
    yield serving
    serving.stop()


def error_of(function: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        function(*args, **kwargs)
    return raised.value.code(), raised.value.details()


def test_unary_echo_and_4_mib_messages_both_ways(served: Served) -> None:
    echo = served.method("Echo")
    assert echo(b"hi", timeout=5) == b"hi"
    assert echo(b"", timeout=5) == b""
    big = bytes(range(256)) * (4 << 12)  # 4 MiB
    assert echo(big, timeout=30) == big


def test_many_messages_on_one_stream(served: Served) -> None:
    chat = served.method("Chat", "stream_stream")
    replies = list(chat(iter([b"%d" % i for i in range(10_000)]), timeout=120))
    assert replies == [b"%d" % i for i in range(10_000)]
    count = served.method("Count", "unary_stream")
    assert list(count(b"10000", timeout=120))[-1] == b"9999"
    total = served.method("Sum", "stream_unary")
    assert total(iter([b"x" * 1000] * 10_000), timeout=120) == b"10000000"


def test_errors_carry_status_and_percent_encoded_message(served: Served) -> None:
    message = "cannot do that: 100% naïve ☃\nsecond line"
    assert error_of(served.method("Fail"), message.encode(), timeout=5) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        message,
    )
    assert error_of(served.method("Crash"), b"", timeout=5) == (grpc.StatusCode.UNKNOWN, "a bug")
    code, _ = error_of(served.method("Unencodable"), b"", timeout=5)
    assert code == grpc.StatusCode.UNKNOWN


def test_transport_errors_are_grpc_gos(served: Served) -> None:
    assert error_of(served.channel.unary_unary("/test.Test/Nope"), b"", timeout=5) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "unknown method Nope for service test.Test",
    )
    assert error_of(served.channel.unary_unary("/no.Such/Thing"), b"", timeout=5) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "unknown service no.Such",
    )
    assert error_of(served.method("Echo"), b"\xff garbage", timeout=5) == (
        grpc.StatusCode.INTERNAL,
        "grpc: error unmarshalling request: not a message",
    )
    code, details = error_of(served.method("Echo"), b"x" * (MAX_MESSAGE + 1), timeout=30)
    assert (code, details) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"grpc: received message larger than max ({MAX_MESSAGE + 1} vs. {MAX_MESSAGE})",
    )
    # A bad message in a stream ends that call only; the connection serves on.
    chat = served.method("Chat", "stream_stream")
    code, details = error_of(lambda: list(chat(iter([b"ok", b"\xff"]), timeout=5)))
    assert code == grpc.StatusCode.INTERNAL
    assert served.method("Echo")(b"after", timeout=5) == b"after"


def test_metadata_reaches_the_handler(served: Served) -> None:
    answer = served.method("Metadata")(b"", metadata=[("token", "abc"), ("hasleader", "true")], timeout=5)
    assert b"('hasleader', 'true')" in answer and b"('token', 'abc')" in answer


def test_deadline_ends_the_call_and_cancels_the_handler(served: Served) -> None:
    code, _ = error_of(served.method("Hang"), b"", timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served.service.cancelled.wait(5)


def test_client_cancel_reaches_the_handler(served: Served) -> None:
    future = served.method("Hang").future(b"", timeout=30)
    assert served.service.started.wait(5)
    future.cancel()
    assert served.service.cancelled.wait(5)
    assert served.method("Echo")(b"still", timeout=5) == b"still"


def test_graceful_shutdown_finishes_calls_and_ends_streams(served: Served) -> None:
    forever = served.method("Forever", "stream_stream")
    responses = forever(iter([]), timeout=30)
    assert next(responses) == b"hello"
    served.shutdown(0.2)
    code, _ = error_of(lambda: next(responses))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert served.service.cancelled.wait(5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=2).close()


def http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_http1_routes_404_405_and_keep_alive(served: Served) -> None:
    answer = http(served.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nhello ")
    answer = http(served.port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n") and answer.endswith(b"404 page not found\n")
    answer = http(served.port, b"DELETE /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n") and b"\r\nAllow: GET, POST\r\n" in answer
    two = (
        b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
        b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = http(served.port, two)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b"hello one" in answer
    answer = http(served.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    answer = http(served.port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize("stall", [b"PRI * HTTP/2.0\r\n", b"GET /hello HTTP/1.1\r\nHost:", b""])
def test_slow_clients_are_dropped(served: Served, stall: bytes) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
        sock.sendall(stall)
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 5
