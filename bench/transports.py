"""What a gRPC call costs the server on each serving stack, with a trivial handler.

Each stack serves /etcdserverpb.KV/Range with a canned RangeResponse from a
process of its own; nghttp2's h2load (an independent C client) sends the same
calls to each; the server's CPU time over the run, divided by the calls, is
the figure. This is how pykine chose its own transport over grpcio:

    .venv/bin/python bench/transports.py [--calls 20000] [--connections 4] [--streams 16]

Stacks: pykine's transport (uvloop), grpcio's asyncio server (uvloop), and
grpcio's threaded server. Needs h2load (Debian: nghttp2-client).
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every stack answers with the same canned message.
ANSWER = """
from pykine.wire import rpc_pb2

ANSWER = rpc_pb2.RangeResponse(header=rpc_pb2.ResponseHeader(cluster_id=1, member_id=2, revision=3, raft_term=1))
"""

# grpcio's registration of a Range handler, for both of its servers.
GRPCIO = """
import grpc

def range_handlers(range_):
    handler = grpc.unary_unary_rpc_method_handler(
        range_,
        request_deserializer=rpc_pb2.RangeRequest.FromString,
        response_serializer=rpc_pb2.RangeResponse.SerializeToString,
    )
    return (grpc.method_handlers_generic_handler("etcdserverpb.KV", {"Range": handler}),)
"""

SERVERS = {
    "pykine": ANSWER
    + """
import asyncio, uvloop
from pykine.transport.grpc import Method, Registry
from pykine.transport.http1 import Router
from pykine.transport.server import Server

async def range_(request, call):
    return ANSWER

async def main():
    registry = Registry()
    registry.add("etcdserverpb.KV", "Range", Method(range_, rpc_pb2.RangeRequest.FromString))
    server = Server(registry, Router())
    await server.listen_tcp("127.0.0.1", PORT)
    await server.start()
    await asyncio.Event().wait()

uvloop.run(main())
""",
    "grpcio-aio": ANSWER
    + GRPCIO
    + """
import uvloop

async def range_(request, context):
    return ANSWER

async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(range_handlers(range_))
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    await server.start()
    await server.wait_for_termination()

uvloop.run(main())
""",
    "grpcio-threads": ANSWER
    + GRPCIO
    + """
from concurrent import futures

def range_(request, context):
    return ANSWER

server = grpc.server(futures.ThreadPoolExecutor(8))
server.add_generic_rpc_handlers(range_handlers(range_))
server.add_insecure_port(f"127.0.0.1:{PORT}")
server.start()
server.wait_for_termination()
""",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def measure(name: str, calls: int, connections: int, streams: int, body: str) -> tuple[float, float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-c", f"PORT = {port}\n" + SERVERS[name]], env=env)
    try:
        wait_for_port(port, time.monotonic() + 20)
        url = f"http://127.0.0.1:{port}/etcdserverpb.KV/Range"
        load = ["h2load", "-c", str(connections), "-m", str(streams), "-d", body]
        load += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        subprocess.run([*load, "-n", "500", url], capture_output=True, check=True)  # warm up
        before = cpu_seconds(server.pid)
        started = time.monotonic()
        out = subprocess.run([*load, "-n", str(calls), url], capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - started
        used = cpu_seconds(server.pid) - before
        if f"{calls} succeeded" not in out:
            raise SystemExit(f"{name}: not every call succeeded:\n{out}")
        return used / calls * 1e6, calls / wall
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    parser.add_argument("--stacks", default=",".join(SERVERS))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pykine.wire import rpc_pb2

    payload = rpc_pb2.RangeRequest(key=b"/registry/pods/default/example").SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as handle:
        handle.write(struct.pack(">BL", 0, len(payload)) + payload)
    try:
        print(f"{'stack':16} {'server CPU per call':>20} {'calls/s':>10}")
        for name in args.stacks.split(","):
            per_call, rate = measure(name, args.calls, args.connections, args.streams, handle.name)
            print(f"{name:16} {per_call:17.1f} µs {rate:10.0f}")
    finally:
        os.unlink(handle.name)


if __name__ == "__main__":
    main()
