"""Property tests of the frame parser and the gRPC dispatcher: hostile input never breaks them.

Random bytes, and valid sessions with random mutations, are fed to a server
connection whose streams go to a real GrpcDispatcher (with unary and
streaming handlers). Whatever arrives, `receive` must not raise, every
answer must be a well-formed frame sequence, and once the connection is
gone no handler task may be left running.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykine.transport import h2
from pykine.transport.grpc import Call, CallLimits, GrpcDispatcher, Method, Registry
from pykine.transport.headers import encode_block
from pykine.transport.http1 import HttpRequest, HttpResponse, Router


class Raw(bytes):
    def SerializeToString(self) -> bytes:
        return bytes(self)


async def echo(request: Raw, call: Call) -> Raw:
    await asyncio.sleep(0)
    return request


async def chat(requests: AsyncIterator[Raw], call: Call) -> AsyncIterator[Raw]:
    async for request in requests:
        yield request


async def hello(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, b"hi")


def registry() -> Registry:
    found = Registry()
    found.add("t.T", "Echo", Method(echo, Raw))
    found.add("t.T", "Chat", Method(chat, Raw, client_streaming=True, server_streaming=True))
    return found


ROUTER = Router()
ROUTER.add("GET", "/hi", hello)
REGISTRY = registry()


def grpc_headers(path: bytes) -> bytes:
    """A request's block; it opens with a table size update to 0, as a client must once it has our SETTINGS."""
    return b"\x20" + encode_block(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"x"),
            (b"content-type", b"application/grpc"),
        ]
    )


def message(payload: bytes) -> bytes:
    return struct.pack(">BL", 0, len(payload)) + payload


VALID_SESSION = [
    h2.PREFACE,
    h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HL", h2.SETTINGS_INITIAL_WINDOW_SIZE, 100)),
    h2.frame(h2.SETTINGS, h2.ACK, 0),
    h2.frame(h2.HEADERS, h2.END_HEADERS, 1, grpc_headers(b"/t.T/Echo")),
    h2.frame(h2.DATA, h2.END_STREAM, 1, message(b"hello")),
    h2.frame(h2.HEADERS, 0, 3, grpc_headers(b"/t.T/Chat")[:10]),
    h2.frame(h2.CONTINUATION, h2.END_HEADERS, 3, grpc_headers(b"/t.T/Chat")[10:]),
    h2.frame(h2.DATA, 0, 3, message(b"one") + message(b"two")[:4]),
    h2.frame(h2.DATA, h2.PADDED, 3, b"\x02" + message(b"two")[4:] + b"\x00\x00"),
    h2.frame(h2.WINDOW_UPDATE, 0, 3, struct.pack(">L", 1000)),
    h2.frame(h2.PING, 0, 0, b"12345678"),
    h2.frame(h2.PRIORITY, 0, 5, struct.pack(">LB", 1, 10)),
    h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 5, encode_block([(b":method", b"GET"), (b":path", b"/hi")])),
    h2.frame(h2.RST_STREAM, 0, 3, struct.pack(">L", 8)),
    h2.frame(h2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20)),
    h2.frame(h2.GOAWAY, 0, 0, struct.pack(">LL", 0, 0)),
]


def check_output(data: bytes) -> None:
    """What we send is a sequence of complete frames within the default frame size."""
    position = 0
    while position < len(data):
        assert position + 9 <= len(data)
        length = int.from_bytes(data[position : position + 3], "big")
        assert length <= h2.DEFAULT_MAX_FRAME
        position += 9 + length
    assert position == len(data)


def run_session(chunks: list[bytes]) -> None:
    async def session() -> None:
        dispatcher = GrpcDispatcher(REGISTRY, CallLimits(max_receive_message=1 << 16), ROUTER)
        connection = h2.Connection(dispatcher, h2.Limits(max_concurrent_streams=8, reset_budget=4))
        dispatcher.attach(connection)
        connection.initiate()
        check_output(connection.data_to_send())
        for chunk in chunks:
            connection.receive(chunk)  # must never raise
            check_output(connection.data_to_send())
            await asyncio.sleep(0)
        for _ in range(3):
            await asyncio.sleep(0)
            check_output(connection.data_to_send())
        connection.connection_lost()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not dispatcher.tasks, f"{len(dispatcher.tasks)} handler tasks left running"

    asyncio.run(session())


def mutate(data: bytes, position: int, value: int) -> bytes:
    if not data:
        return data
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_bytes_after_the_preface(chunks: list[bytes]) -> None:
    run_session([h2.PREFACE, h2.frame(h2.SETTINGS, 0, 0), *chunks])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_from_the_start(data: bytes) -> None:
    run_session([data])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_SESSION) - 1), st.integers(0, 1 << 16), st.integers(0, 255))),
    st.lists(st.integers(0, len(VALID_SESSION) - 1), max_size=5),
    st.integers(1, 50),
)
def test_mutated_valid_sessions(mutations: list[tuple[int, int, int]], dropped: list[int], split: int) -> None:
    frames: list[Any] = list(VALID_SESSION)
    for index, position, value in mutations:
        frames[index] = mutate(frames[index], position, value)
    for index in dropped:
        if index:  # keep the preface most of the time so the frames are reached
            frames[index] = b""
    data = b"".join(frames)
    run_session([data[i : i + split] for i in range(0, len(data), split)])


def test_the_valid_session_is_served() -> None:
    """The seed session itself is fine: the echo and the HTTP request are answered."""

    async def session() -> bytes:
        dispatcher = GrpcDispatcher(REGISTRY, CallLimits(), ROUTER)
        connection = h2.Connection(dispatcher)
        dispatcher.attach(connection)
        connection.initiate()
        out = connection.data_to_send()
        for chunk in VALID_SESSION[:-1]:
            connection.receive(chunk)
        for _ in range(5):
            await asyncio.sleep(0)
        out += connection.data_to_send()
        assert not connection.closed
        return out

    out = asyncio.run(session())
    assert message(b"hello") in out and b"hi" in out
