"""The transport's answers on the wire, byte for byte beside real etcd's.

Raw HTTP/2 requests (tests/h2client.py) and raw HTTP/1.1 requests go to etcd
and to pykine; statuses, messages, resets, response headers and HTTP bodies
must be the same. Where pykine answers differently on purpose, the test says
so and checks pykine's answer on its own.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest
from aetcd.rpc import rpc_pb2 as pb
from h2client import Answer, exchange, grpc_frame, request_headers
from harness import Pair, pair

RANGE = b"/etcdserverpb.KV/Range"
KEY_A = pb.RangeRequest(key=b"a").SerializeToString()


@pytest.fixture(scope="module")
def servers() -> Iterator[Pair]:
    with pair() as both:
        yield both


def both(servers: Pair, *args: object, **kwargs: object) -> tuple[Answer, Answer]:
    return (
        exchange(servers.etcd.address, *args, **kwargs),  # type: ignore[arg-type]
        exchange(servers.pykine.address, *args, **kwargs),  # type: ignore[arg-type]
    )


CASES: dict[str, tuple[list[tuple[bytes, bytes]], list[bytes], bool]] = {
    "success": (request_headers(RANGE), [grpc_frame(KEY_A)], True),
    "any method with gRPC's content type": (
        [(b":method", b"GET"), *request_headers(RANGE)[1:]],
        [grpc_frame(KEY_A)],
        True,
    ),
    "unknown method": (request_headers(b"/etcdserverpb.KV/Nope"), [grpc_frame(KEY_A)], True),
    "unknown service": (request_headers(b"/foo.Bar/Baz"), [grpc_frame(KEY_A)], True),
    "malformed method name": (request_headers(b"/KV"), [grpc_frame(KEY_A)], True),
    "method split at the last slash": (request_headers(RANGE + b"/extra"), [grpc_frame(KEY_A)], True),
    "empty method": (request_headers(b"/etcdserverpb.KV/"), [grpc_frame(KEY_A)], True),
    "unknown method, stream left open": (request_headers(b"/etcdserverpb.KV/Nope"), [], False),
    "compressed flag without encoding": (request_headers(RANGE), [grpc_frame(KEY_A, flag=1)], True),
    "payload format 2": (request_headers(RANGE), [grpc_frame(KEY_A, flag=2)], True),
    "gzip encoding": (request_headers(RANGE, [(b"grpc-encoding", b"gzip")]), [grpc_frame(KEY_A, flag=1)], True),
    "identity encoding": (request_headers(RANGE, [(b"grpc-encoding", b"identity")]), [grpc_frame(KEY_A)], True),
    "message over the limit": (request_headers(RANGE), [grpc_frame(b"x" * 1000, length=3_000_000)], False),
    "message at the limit is read": (
        request_headers(RANGE, [(b"grpc-timeout", b"1S")]),
        [grpc_frame(b"x" * 1000, length=2_097_153)],
        False,
    ),
    "message cut short": (request_headers(RANGE), [grpc_frame(b"\x0a\x01", length=10)], True),
    "prefix cut short": (request_headers(RANGE), [b"\x00\x00\x00"], True),
    "no message": (request_headers(RANGE), [b""], True),
    "two messages": (request_headers(RANGE), [grpc_frame(KEY_A) + grpc_frame(b"\x0a\x01b")], True),
    "trailing garbage": (request_headers(RANGE), [grpc_frame(KEY_A) + b"\x00\x00\x00"], True),
    "undecodable": (request_headers(RANGE), [grpc_frame(b"\x0a\x05a")], True),
    "malformed timeout": (request_headers(RANGE, [(b"grpc-timeout", b"abc")]), [grpc_frame(KEY_A)], True),
    "timeout of nine digits": (
        request_headers(RANGE, [(b"grpc-timeout", b"123456789n")]),
        [grpc_frame(KEY_A)],
        True,
    ),
    "long timeout": (request_headers(RANGE, [(b"grpc-timeout", b"99999999H")]), [grpc_frame(KEY_A)], True),
    "health": (request_headers(b"/grpc.health.v1.Health/Check"), [grpc_frame(b"")], True),
    "health of an unknown service": (
        request_headers(b"/grpc.health.v1.Health/Check"),
        [grpc_frame(b"\x0a\x03foo")],
        True,
    ),
}

# What grpc-go's messages name that protobuf's Python runtime names differently.
UNDECODABLE = b"grpc: error unmarshalling request: "


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_answer_as_etcd(servers: Pair, case: str) -> None:
    headers, body, end_stream = CASES[case]
    want, got = both(servers, headers, body, end_stream=end_stream, timeout=3)
    assert got.reset == want.reset, f"etcd reset {want.reset}, pykine {got.reset}"
    want_status, want_message = want.status
    got_status, got_message = got.status
    assert got_status == want_status, f"etcd {want.status}, pykine {got.status}"
    if want_message is not None and want_message.startswith(UNDECODABLE):
        assert got_message is not None and got_message.startswith(UNDECODABLE)  # the reason is the runtime's
    else:
        assert got_message == want_message
    assert [name for name, _ in got.headers] == [name for name, _ in want.headers]
    assert got.trailers == want.trailers
    if want.data:
        assert pb.RangeResponse.FromString(got.data[5:]).kvs == pb.RangeResponse.FromString(want.data[5:]).kvs


def test_non_grpc_requests_over_http2_reach_the_http_routes(servers: Pair) -> None:
    """etcd resets these on a plain-text port; pykine serves its HTTP routes over HTTP/2 as well."""
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/health"), (b":authority", b"x")]
    answer = exchange(servers.pykine.address, headers)
    assert dict(answer.headers)[b":status"] == b"200"
    assert answer.data == b'{"health":"true"}'
    curl = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", f"http://{servers.pykine.address}/health"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert curl.stdout == b'{"health":"true"}'


def http1(address: str, request: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def parse_http(answer: bytes) -> tuple[bytes, set[bytes], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    names = {line.split(b":", 1)[0].lower() for line in lines} - {b"connection", b"date"}
    return status, names, body


HTTP_REQUESTS = {
    "health": b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "health with a query": b"GET /health?serializable=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "not found": b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "root": b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "wrong method": b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "preflight": b"OPTIONS /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "gRPC over HTTP/1.1": (
        b"POST /etcdserverpb.KV/Range HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    ),
}


@pytest.mark.parametrize("case", sorted(HTTP_REQUESTS))
def test_http1_answers_like_etcd(servers: Pair, case: str) -> None:
    want = parse_http(http1(servers.etcd.address, HTTP_REQUESTS[case]))
    got = parse_http(http1(servers.pykine.address, HTTP_REQUESTS[case]))
    assert got == want


def test_version_and_metrics_documents(servers: Pair) -> None:
    import json

    for server in (servers.etcd, servers.pykine):
        status, names, body = parse_http(
            http1(server.address, b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        assert status == b"HTTP/1.1 200 OK" and b"content-type" in names
        assert set(json.loads(body)) == {"etcdserver", "etcdcluster"}
        status, names, body = parse_http(
            http1(server.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        assert status == b"HTTP/1.1 200 OK"
        assert b"# TYPE process_cpu_seconds_total counter" in body
