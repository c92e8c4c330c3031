"""grpc.health.v1.Health, and the plain HTTP endpoints etcd serves on its client port.

gRPC health: the overall status ("") is SERVING while pykine serves; other
service names are unknown (NOT_FOUND), as with grpc-go's health server that
etcd registers. HTTP: `/health` reads the datastore's revision, so it fails
when the datastore does; `/version` and `/metrics` are etcd's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pykine.engine.store import Engine
from pykine.transport.grpc import Call, RpcError, Status
from pykine.transport.http1 import HttpRequest, HttpResponse, Router
from pykine.wire import health_pb2

HEALTH_TIMEOUT = 5.0

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus


class HealthService:
    def __init__(self) -> None:
        self.serving = True
        self._changed = asyncio.Event()

    def set_serving(self, serving: bool) -> None:
        self.serving = serving
        self._changed.set()
        self._changed = asyncio.Event()

    def _status(self, service: str) -> int:
        if service:
            raise RpcError(Status.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, call: Call) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._status(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, call: Call
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then each change (an unknown service stays SERVICE_UNKNOWN)."""
        if request.service:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            await asyncio.Event().wait()
        while True:
            changed = self._changed
            yield health_pb2.HealthCheckResponse(status=self._status(""))
            await changed.wait()


# etcd's default --cors '*': every HTTP answer on the client port carries these.
CORS_HEADERS = [
    ("Access-Control-Allow-Headers", "accept, content-type, authorization"),
    ("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE"),
    ("Access-Control-Allow-Origin", "*"),
]


def _json(status: int, document: dict[str, str], content_type: str = "application/json") -> HttpResponse:
    return HttpResponse(status, json.dumps(document, separators=(",", ":")).encode(), content_type=content_type)


async def metrics(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


def add_metrics_route(router: Router) -> None:
    router.add("GET", "/metrics", metrics)


class Probe(Protocol):
    """What /health and /version ask of whatever answers the calls: the engine, or the etcd behind a passthrough."""

    async def healthy(self) -> bool: ...

    async def versions(self) -> tuple[str, str]:
        """(server version, cluster version), as etcd's /version gives them."""
        ...


class EngineProbe:
    """Healthy while the datastore answers and no alarm is raised; the versions pykine emulates."""

    def __init__(self, engine: Engine, version: str) -> None:
        self.engine = engine
        self.version = version

    async def healthy(self) -> bool:
        await asyncio.wait_for(self.engine.revision(), HEALTH_TIMEOUT)
        return not await asyncio.wait_for(self.engine.alarms.current(), HEALTH_TIMEOUT)

    async def versions(self) -> tuple[str, str]:
        return self.version, cluster_version(self.version)


def cluster_version(version: str) -> str:
    return ".".join(version.split(".")[:2]) + ".0"


def add_http_routes(router: Router, probe: Probe) -> None:
    """/health, /version and /metrics, as on etcd's client port."""

    async def health(request: HttpRequest) -> HttpResponse:
        """etcd's answer, byte for byte: unhealthy with a raised alarm or a failing datastore.

        Go sniffs the content type of the healthy answer as plain text; the
        unhealthy one is Go's http.Error, which adds a newline and nosniff.
        """
        try:
            healthy = await probe.healthy()
        except Exception:
            healthy = False
        if healthy:
            return _json(200, {"health": "true"}, "text/plain; charset=utf-8")
        return HttpResponse(
            503,
            b'{"health":"false"}\n',
            content_type="text/plain; charset=utf-8",
            headers=[("X-Content-Type-Options", "nosniff")],
        )

    async def version_info(request: HttpRequest) -> HttpResponse:
        try:
            server, cluster = await probe.versions()
        except Exception as error:
            return _json(503, {"error": str(error)})
        return _json(200, {"etcdserver": server, "etcdcluster": cluster})

    router.cors_headers = CORS_HEADERS
    router.add("GET", "/health", health)
    router.add("GET", "/version", version_info)
    add_metrics_route(router)
