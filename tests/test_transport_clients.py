"""pykine's transport under independent HTTP/2 clients: nghttp2's tools, many connections, TLS with ALPN.

nghttp and h2load (Debian's nghttp2-client) are strict, widely used HTTP/2
implementations that share no code with ours or with the Python `h2` library.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import certs
import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from h2client import grpc_frame, request_headers
from harness import PykineServer

RANGE_BODY = grpc_frame(pb.RangeRequest(key=b"a").SerializeToString())


@pytest.fixture(scope="module")
def pykine() -> Iterator[PykineServer]:
    workdir = tempfile.mkdtemp(prefix="pykine-clients-")
    server = PykineServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def body_file() -> Iterator[str]:
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(RANGE_BODY)
    yield handle.name
    os.unlink(handle.name)


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)
    assert done.returncode == 0, f"{command[0]} failed: {done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_nghttp_health_and_grpc_call(pykine: PykineServer, body_file: str) -> None:
    out = run(["nghttp", "-nv", f"http://{pykine.address}/health"])
    assert ":status: 200" in out
    out = run(
        [
            "nghttp",
            "-v",
            "-d",
            body_file,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://{pykine.address}/etcdserverpb.KV/Range",
        ]
    )
    assert "grpc-status: 0" in out and "recv DATA frame" in out


def test_h2load_many_streams_on_few_connections(pykine: PykineServer, body_file: str) -> None:
    out = run(
        [
            "h2load",
            "-n",
            "4000",
            "-c",
            "4",
            "-m",
            "32",
            "-d",
            body_file,
            "-H",
            "content-type: application/grpc",
            f"http://{pykine.address}/etcdserverpb.KV/Range",
        ]
    )
    assert "4000 succeeded, 0 failed, 0 errored, 0 timeout" in out
    out = run(["h2load", "-n", "2000", "-c", "10", "-m", "10", f"http://{pykine.address}/health"])
    assert "2000 succeeded, 0 failed, 0 errored, 0 timeout" in out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_thousand_connections_at_once(pykine: PykineServer) -> None:
    """1,000 clients connect, each makes a call while all are open; then they idle together."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert pykine.process is not None
    before = rss_kib(pykine.process.pid)
    host, _, port = pykine.address.rpartition(":")
    selector = selectors.DefaultSelector()
    clients: list[tuple[socket.socket, h2.connection.H2Connection]] = []
    try:
        for _ in range(1000):
            sock = socket.create_connection((host, int(port)), timeout=30)
            connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            connection.initiate_connection()
            sock.sendall(connection.data_to_send())
            clients.append((sock, connection))
        for index, (sock, connection) in enumerate(clients):
            connection.send_headers(1, request_headers(b"/etcdserverpb.KV/Range"))
            connection.send_data(1, RANGE_BODY, end_stream=True)
            sock.sendall(connection.data_to_send())
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, index)
        answered: set[int] = set()
        while len(answered) < len(clients):
            ready = selector.select(timeout=60)
            assert ready, f"only {len(answered)} of 1000 connections answered"
            for key, _ in ready:
                sock, connection = clients[key.data]
                data = sock.recv(65536)
                assert data, "a connection was closed"
                for event in connection.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived):
                        assert dict(event.headers)[b"grpc-status"] == b"0"
                    if isinstance(event, h2.events.StreamEnded):
                        answered.add(key.data)
                pending = connection.data_to_send()
                if pending:
                    sock.setblocking(True)
                    sock.sendall(pending)
                    sock.setblocking(False)
        after = rss_kib(pykine.process.pid)
        print(f"\nmemory per idle HTTP/2 connection: {(after - before) / len(clients):.1f} KiB")
        # Still all open and served: one more call on the last connection.
        assert pykine.stub("KV").Range(pb.RangeRequest(key=b"a"), timeout=10).header.revision >= 1
    finally:
        selector.close()
        for sock, _ in clients:
            sock.close()


def test_tls_with_alpn_serves_grpc_and_http(tmp_path: Path) -> None:
    """The transport on TLS: ALPN h2 for gRPC (grpcio), http/1.1 for the routes (curl), one port."""
    import asyncio
    import threading

    from pykine.transport.grpc import Call, Method, Registry
    from pykine.transport.http1 import HttpRequest, HttpResponse, Router
    from pykine.transport.server import Server

    authority = certs.Authority(str(tmp_path), "alpn")
    pair = authority.issue("server", "localhost", server=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    cert = Path(authority.cert)

    async def echo(request: bytes, call: Call) -> pb.RangeResponse:
        return pb.RangeResponse(count=len(pb.RangeRequest.FromString(request).key))

    async def health(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, b"tls ok")

    registry = Registry()
    registry.add("etcdserverpb.KV", "Range", Method(echo, bytes))
    router = Router()
    router.add("GET", "/health", health)
    server = Server(registry, router)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = 0

    def serve() -> None:
        nonlocal port
        asyncio.set_event_loop(loop)
        port = loop.run_until_complete(server.listen_tcp("127.0.0.1", 0, ssl_context=context))
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            answer = pb_grpc.KVStub(channel).Range(pb.RangeRequest(key=b"four"), timeout=10)
            assert answer.count == 4
        curl = run(["curl", "-sS", "--http1.1", "--cacert", str(cert), f"https://localhost:{port}/health"])
        assert curl == "tls ok"
        curl = run(["curl", "-sS", "--http2", "--cacert", str(cert), f"https://localhost:{port}/health"])
        assert curl == "tls ok"
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
