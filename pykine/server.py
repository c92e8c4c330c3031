"""Assemble backend, engine and gRPC services, and serve until signalled."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pykine import __version__
from pykine.backends import open_backend
from pykine.backends.base import BackendError
from pykine.cli import Settings, fail
from pykine.engine.records import MemberRow
from pykine.engine.store import Engine
from pykine.logs import setup_logging
from pykine.metrics import serve_metrics
from pykine.services.encode import Identity
from pykine.services.handlers import service_handler
from pykine.services.kv import KVService
from pykine.services.lease import LeaseService
from pykine.services.maintenance import ClusterService, MaintenanceService
from pykine.services.validate import MAX_RECEIVE_BYTES
from pykine.services.watch import WatchService

log = logging.getLogger("pykine")


def grpc_address(listen_address: str) -> str:
    """kine's listen forms (host:port, tcp://, unix://) in gRPC's spelling."""
    for prefix in ("tcp://", "http://"):
        if listen_address.startswith(prefix):
            return listen_address[len(prefix) :]
    if listen_address.startswith("unix://"):
        return "unix:" + listen_address[len("unix://") :]
    return listen_address


def client_url(address: str, port: int) -> str:
    """The URL clients reach us at, with the port gRPC actually bound."""
    if address.startswith("unix:"):
        return "unix://" + address[len("unix:") :]
    host = address.rsplit(":", 1)[0]
    return f"http://{host}:{port}"


def check_listen_address(listen_address: str) -> None:
    """Fail with one clear line before gRPC logs its own complaint."""
    address = grpc_address(listen_address)
    if address.startswith("unix:"):
        path = address[len("unix:") :].removeprefix("//")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise BackendError(f"cannot listen on {listen_address}: directory {directory} does not exist")
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BackendError(f"cannot listen on {listen_address!r}: expected host:port or unix://path")
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, OverflowError) as exc:
        raise BackendError(f"cannot listen on {listen_address}: {exc}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise BackendError(f"cannot listen on {listen_address}: {exc.strerror}") from exc


def member_id(cluster_id: int, url: str) -> int:
    """Stable for a datastore and address, so restarts keep the same member."""
    digest = hashlib.blake2b(f"{cluster_id}/{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1 or 1


async def serve(settings: Settings) -> None:
    if not settings.reuse_port:
        check_listen_address(settings.listen_address)
    address = grpc_address(settings.listen_address)
    if settings.metrics_bind_address:
        try:
            serve_metrics(settings.metrics_bind_address)
        except OSError as exc:
            raise BackendError(f"cannot serve metrics on {settings.metrics_bind_address}: {exc.strerror}") from exc
    backend = open_backend(settings.endpoint, settings.connection)
    engine = Engine(
        backend,
        compact_batch_size=settings.compact_batch_size,
        progress_interval=settings.watch_progress_notify_interval,
    )
    await engine.start()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", 2**31 - 1),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            # Two servers on one port would split clients between datastores;
            # only the workers of one supervisor share a port, on purpose.
            ("grpc.so_reuseport", int(settings.reuse_port)),
        ]
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        await engine.close()
        raise BackendError(f"cannot listen on {settings.listen_address}: {exc}") from exc
    url = client_url(address, port)
    cluster_id = await backend.cluster_id()
    identity = Identity(cluster_id=cluster_id, member_id=member_id(cluster_id, url))
    await engine.join(MemberRow(identity.member_id, socket.gethostname(), url))
    server.add_generic_rpc_handlers(
        (
            service_handler("KV", KVService(engine, identity)),
            service_handler("Watch", WatchService(engine, identity)),
            service_handler("Lease", LeaseService(engine, identity)),
            service_handler("Maintenance", MaintenanceService(engine, identity, settings.emulated_etcd_version)),
            service_handler("Cluster", ClusterService(engine, identity)),
        )
    )
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    log.info(
        "pykine %s serving etcd %s API on %s, datastore %s",
        __version__,
        settings.emulated_etcd_version,
        url,
        backend.name,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=2)
    await engine.close()


def run(settings: Settings) -> None:
    setup_logging(settings.log_format, settings.debug)
    try:
        import uvloop
    except ImportError:  # uvloop is optional: plain asyncio works the same, a little slower
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except BackendError as exc:
        fail(str(exc))
