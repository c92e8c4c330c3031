"""The HTTP/1.1 connection without sockets: bytes in, bytes out, through a transport that records.

Requests arrive split at every possible place and pipelined, with chunked
bodies, `Expect: 100-continue`, HEAD, HTTP/1.0, and garbage; the answers must
be well-formed HTTP that h11 (an independent, strict parser) reads back.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykine.transport.http1 import Http1Connection, HttpRequest, HttpResponse, Router


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def router() -> Router:
    routes = Router()

    async def echo(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, f"{request.method} {request.path} {request.query} ".encode() + request.body)

    async def stream(request: HttpRequest) -> HttpResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for index in range(3):
                yield f"line {index}\n".encode()

        return HttpResponse(200, chunks())

    routes.add(("GET", "POST", "HEAD"), "/echo", echo)
    routes.add(("GET", "POST"), "/stream", stream)
    return routes


def run(pieces: list[bytes], eof: bool = True) -> Recorder:
    """Feed the pieces one by one, let the connection answer, and return what it wrote."""

    async def main() -> Recorder:
        transport = Recorder()
        connection = Http1Connection(router(), transport, max_body=1000)
        for piece in pieces:
            connection.receive(piece)
            await asyncio.sleep(0)
        if eof:
            connection.eof()
        for _ in range(50):
            await asyncio.sleep(0)
        connection.close()
        return transport

    return asyncio.run(main())


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The answers in `data`, as h11 reads them in the part of a client (method and target do not matter)."""
    client = h11.Connection(h11.CLIENT)

    def ask() -> None:
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())

    ask()
    client.receive_data(bytes(data))
    client.receive_data(b"")
    answers: list[tuple[int, dict[str, str], bytes]] = []
    current: Any = None
    body = b""
    while True:
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:  # closed where another answer could have begun
            return answers
        if isinstance(event, h11.Response):
            current, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            headers = {name.decode(): value.decode() for name, value in current.headers}
            answers.append((current.status_code, headers, body))
            if client.their_state is h11.MUST_CLOSE or client.our_state is h11.MUST_CLOSE:
                return answers
            client.start_next_cycle()
            ask()
        elif not isinstance(event, h11.InformationalResponse):
            return answers


PIPELINE = (
    b"POST /echo?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n2\r\n!!\r\n0\r\n\r\n"
    b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)


def check_pipeline(written: bytes) -> None:
    answers = responses(written)
    assert [(status, body) for status, _, body in answers] == [
        (200, b"POST /echo a=1 one"),
        (200, b"POST /echo  two!!"),
        (200, b"line 0\nline 1\nline 2\n"),
        (404, b"404 page not found\n"),
    ]
    assert answers[2][1]["transfer-encoding"] == "chunked" and answers[3][1]["connection"] == "close"


def test_pipelined_requests_in_one_piece() -> None:
    transport = run([PIPELINE])
    check_pipeline(bytes(transport.written))
    assert transport.closed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), unique=True, max_size=12))
def test_pipelined_requests_split_anywhere(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(PIPELINE)]
    transport = run([PIPELINE[start:end] for start, end in itertools.pairwise(bounds)])
    check_pipeline(bytes(transport.written))


def test_expect_continue_head_and_http10() -> None:
    written = bytes(
        run([b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", b"hi"]).written
    )
    assert written.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert responses(written)[0][2] == b"POST /echo  hi"
    written = bytes(run([b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n"]).written)
    assert b"Content-Length: 12\r\n" in written and written.endswith(b"\r\n\r\n")
    written = bytes(run([b"GET /stream HTTP/1.0\r\n\r\n"], eof=False).written)
    assert b"Transfer-Encoding" not in written and b"Connection: close\r\n" in written
    assert written.endswith(b"\r\n\r\nline 0\nline 1\nline 2\n")


def test_an_upgrade_nobody_takes_is_an_ordinary_request() -> None:
    written = bytes(
        run(
            [
                b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n"
            ]
        ).written
    )
    assert [body for _, _, body in responses(written)] == [b"GET /echo  ", b"GET /echo after "]


@pytest.mark.parametrize(
    ("pieces", "answer"),
    [
        ([b"\x16\x03\x01 not http\r\n\r\n"], b"HTTP/1.1 400 Bad Request\r\n"),
        ([b"GET /echo HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"], b"HTTP/1.1 431 "),
        ([b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000], b"HTTP/1.1 413 "),
        ([b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab"], b""),  # cut short: closed
        ([b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"], b"HTTP/1.1 400 "),
        ([b"GET /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], b"HTTP/1.1 400 "),
    ],
)
def test_unreadable_requests_are_refused_and_closed(pieces: list[bytes], answer: bytes) -> None:
    transport = run(pieces)
    assert bytes(transport.written).startswith(answer) and transport.closed
    if answer:
        assert b"Connection: close\r\n" in transport.written


def test_answers_before_a_bad_request_are_written_first() -> None:
    written = bytes(run([b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\nBAD REQUEST LINE\x00\r\n\r\n"]).written)
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and b"HTTP/1.1 400 Bad Request\r\n" in written


def test_many_pipelined_requests_pause_reading() -> None:
    async def main() -> tuple[bool, int]:
        transport = Recorder()
        connection = Http1Connection(router(), transport)
        connection.receive(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" * 40)
        paused = not transport.reading
        for _ in range(200):
            await asyncio.sleep(0)
        connection.close()
        return paused and transport.reading, bytes(transport.written).count(b"HTTP/1.1 200 OK")

    assert asyncio.run(main()) == (True, 40)
