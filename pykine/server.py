"""Assemble backend, engine, services and transport, and serve until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import resource
import signal
import socket
import ssl
from typing import TYPE_CHECKING

from pykine import __version__
from pykine.backends import open_backend
from pykine.backends.base import BackendError
from pykine.cli import Settings, fail
from pykine.engine.records import MemberRow
from pykine.engine.store import Engine
from pykine.engine.tokens import make_tokens
from pykine.logs import setup_logging
from pykine.services.auth import AuthService
from pykine.services.encode import Identity
from pykine.services.gateway import add_gateway_routes
from pykine.services.handlers import register
from pykine.services.health import EngineProbe, HealthService, Probe, add_http_routes, add_metrics_route
from pykine.services.kv import KVService
from pykine.services.lease import LeaseService
from pykine.services.maintenance import ClusterService, MaintenanceService
from pykine.services.validate import MAX_RECEIVE_BYTES
from pykine.services.watch import WatchService
from pykine.transport.grpc import CallLimits, Registry
from pykine.transport.http1 import Router
from pykine.transport.server import Server, ServerLimits
from pykine.transport.tls import ReloadingTls, TlsConfigError
from pykine.wire import health_pb2, rpc_pb2

if TYPE_CHECKING:
    from pykine.services.passthrough import Passthrough

log = logging.getLogger("pykine")


def split_listen_address(listen_address: str) -> tuple[str, int] | str:
    """kine's listen forms: (host, port) for host:port, tcp://, http:// and https://; the path for unix(s)://."""
    for prefix in ("unix://", "unixs://"):
        if listen_address.startswith(prefix):
            return listen_address[len(prefix) :]
    for prefix in ("tcp://", "http://", "https://"):
        if listen_address.startswith(prefix):
            listen_address = listen_address[len(prefix) :]
    host, sep, port = listen_address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise BackendError(f"cannot listen on {listen_address!r}: expected host:port or unix://path")
    return host, int(port)


def client_url(address: tuple[str, int] | str, port: int, tls: bool) -> str:
    """The URL clients reach us at, with the port actually bound."""
    if isinstance(address, str):
        return ("unixs://" if tls else "unix://") + address
    return f"{'https' if tls else 'http'}://{address[0]}:{port}"


def check_listen_address(listen_address: str) -> None:
    """Fail with one clear line if we cannot listen there."""
    address = split_listen_address(listen_address)
    if isinstance(address, str):
        directory = os.path.dirname(os.path.abspath(address))
        if not os.path.isdir(directory):
            raise BackendError(f"cannot listen on {listen_address}: directory {directory} does not exist")
        return
    host, port = address
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
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


def engine_servicers(engine: Engine, identity: Identity, settings: Settings) -> dict[str, object]:
    """etcd's six services on the engine, by service name."""
    return {
        "KV": KVService(engine, identity),
        "Watch": WatchService(engine, identity),
        "Lease": LeaseService(engine, identity),
        "Maintenance": MaintenanceService(engine, identity, settings.emulated_etcd_version),
        "Cluster": ClusterService(engine, identity),
        "Auth": AuthService(engine, identity),
    }


def register_services(registry: Registry, servicers: dict[str, object], health: HealthService) -> None:
    """Serve every etcd service, and gRPC health, over gRPC."""
    services = rpc_pb2.DESCRIPTOR.services_by_name
    for name, servicer in servicers.items():
        register(registry, services[name], servicer)
    register(registry, health_pb2.DESCRIPTOR.services_by_name["Health"], health)


async def listen(
    server: Server, listen_address: str, reuse_port: bool = False, tls: ssl.SSLContext | None = None
) -> int:
    """Listen on one of kine's address forms; the port bound (0 for a unix socket)."""
    address = split_listen_address(listen_address)
    try:
        if isinstance(address, str):
            await server.listen_unix(address, ssl_context=tls)
            return 0
        return await server.listen_tcp(*address, ssl_context=tls, reuse_port=reuse_port)
    except OSError as exc:
        raise BackendError(f"cannot listen on {listen_address}: {exc.strerror or exc}") from exc


def is_passthrough(endpoint: str) -> bool:
    """An http(s):// endpoint names etcd servers to forward to, not a datastore (kine's passthrough)."""
    return endpoint.startswith(("http://", "https://"))


def open_passthrough(settings: Settings) -> Passthrough:
    """The forwarder to the etcd endpoints, with --ca-file/--cert-file/--key-file for TLS to them."""
    # Imported here: grpcio is only needed by a passthrough.
    from pykine.client.connection import Connection, TLSConfig
    from pykine.client.errors import ConfigError
    from pykine.services.passthrough import Passthrough

    options = settings.connection
    tls = None
    if options.ca_file or options.cert_file or options.key_file:
        tls = TLSConfig(options.ca_file, options.cert_file, options.key_file)
    try:
        # The callers' own etcd clients retry an UNAVAILABLE answer: pass it on at once.
        return Passthrough(Connection(settings.endpoint, tls, timeout=None, wait_for_endpoints=False))
    except ConfigError as error:
        raise BackendError(f"passthrough endpoint: {error}") from None


async def serve(settings: Settings) -> None:
    if not settings.reuse_port:
        check_listen_address(settings.listen_address)
    address = split_listen_address(settings.listen_address)
    engine: Engine | None = None
    passthrough: Passthrough | None = None
    if is_passthrough(settings.endpoint):
        passthrough = open_passthrough(settings)
        backend_name = settings.endpoint
    else:
        backend = open_backend(settings.endpoint, settings.connection)
        backend_name = backend.name
        engine = Engine(
            backend,
            compact_batch_size=settings.compact_batch_size,
            progress_interval=settings.watch_progress_notify_interval,
            quota_bytes=settings.quota_backend_bytes,
            tokens=make_tokens(settings.auth_token, backend, settings.auth_token_ttl),
        )
        await engine.start()

    registry = Registry()
    router = Router()
    # Gateway bodies may be well past the gRPC limit (base64, JSON): read them, so that the limit's
    # own error answers, as etcd's gateway (which reads any body) does.
    limits = ServerLimits(calls=CallLimits(max_receive_message=MAX_RECEIVE_BYTES), http_body=8 * MAX_RECEIVE_BYTES)
    server = Server(registry, router, limits)
    metrics_server: Server | None = None
    try:
        tls = ReloadingTls(settings.tls) if settings.tls is not None else None
        # Two servers on one port would split clients between datastores;
        # only the workers of one supervisor share a port, on purpose.
        port = await listen(
            server, settings.listen_address, settings.reuse_port, tls.listening_context if tls else None
        )
        if settings.metrics_bind_address:
            metrics_router = Router()
            add_metrics_route(metrics_router)
            metrics_server = Server(Registry(), metrics_router)
            await listen(metrics_server, settings.metrics_bind_address)
    except (BackendError, TlsConfigError):
        await server.shutdown(0)
        await close_core(engine, passthrough)
        raise
    url = client_url(address, port, tls is not None)
    health = HealthService()
    if engine is not None:
        cluster_id = await engine.backend.cluster_id()
        identity = Identity(cluster_id=cluster_id, member_id=engine.backend.member_id() or member_id(cluster_id, url))
        await engine.join(MemberRow(identity.member_id, socket.gethostname(), url))
        servicers = engine_servicers(engine, identity, settings)
        probe: Probe = EngineProbe(engine, settings.emulated_etcd_version)
    else:
        assert passthrough is not None
        servicers = passthrough.servicers()
        probe = passthrough

    def auth_enabled() -> bool:
        """For the gateway's CommonName guard; a passthrough's etcd decides itself (no name reaches it)."""
        return engine is not None and engine.auth.enabled

    register_services(registry, servicers, health)
    add_http_routes(router, probe)
    add_gateway_routes(router, servicers, MAX_RECEIVE_BYTES, auth_enabled)
    await server.start()
    if metrics_server is not None:
        await metrics_server.start()
    if passthrough is not None:
        log.info("pykine %s serving the etcd API on %s, forwarding every call to %s", __version__, url, backend_name)
    else:
        log.info(
            "pykine %s serving etcd %s API on %s, datastore %s",
            __version__,
            settings.emulated_etcd_version,
            url,
            backend_name,
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    health.set_serving(False)
    await server.shutdown(grace=2)
    if metrics_server is not None:
        await metrics_server.shutdown(grace=0)
    await close_core(engine, passthrough)


async def close_core(engine: Engine | None, passthrough: Passthrough | None) -> None:
    if engine is not None:
        await engine.close()
    if passthrough is not None:
        await passthrough.close()


def raise_open_file_limit() -> None:
    """Use the hard limit on open files, as Go programs (etcd, kine) do: each client is a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(settings: Settings) -> None:
    setup_logging(settings.log_format, settings.debug)
    raise_open_file_limit()
    try:
        import uvloop
    except ImportError:  # uvloop is optional: plain asyncio works the same, a little slower
        uvloop = None
    try:
        if uvloop is not None:
            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except (BackendError, TlsConfigError) as exc:
        fail(str(exc))
