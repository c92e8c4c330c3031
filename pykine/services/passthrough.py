"""Passthrough: every etcd call forwarded to real etcd endpoints, as kine does for an http(s):// endpoint.

No engine and no datastore: each method of etcd's six services forwards the
request it received to the etcd endpoints through `pykine.client`'s
connection, and answers with etcd's response bytes, or etcd's status code and
message, unchanged. pykine's own transport, TLS termination, JSON gateway and
/metrics stay in front.

- Unary calls keep the caller's deadline and its metadata (the auth token,
  etcd's `hasleader`); a read that meets an unavailable endpoint is tried on
  the next, a write only if it never left (as etcd's Go client does).
- Watch and LeaseKeepAlive are forwarded stream for stream: each request as
  it comes, each answer as it comes, the caller's half-close and cancellation
  passed on, and an upstream failure (etcd stopping, losing its leader with
  `hasleader` set) ends the caller's stream with etcd's status, as through
  etcd's own grpc-proxy. Snapshot streams the same way.

Not forwarded: the TLS identity of the caller (a client certificate's
CommonName ends here, as at any TLS-terminating proxy; use a token), and the
few requests that make etcd 3.4 panic and stop serving everyone: a range with
an unknown sort option (refused as etcd 3.5 refuses it) and a txn that
deletes every key from some key on and then puts one of them with
ignore_value or ignore_lease (refused as pykine's own engine refuses it, with
etcd's "key not found").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc.aio
from google.protobuf.descriptor import MethodDescriptor

from pykine.client.connection import Connection, Metadata
from pykine.client.errors import EtcdError, UnavailableError
from pykine.metrics import PASSTHROUGH_SECONDS
from pykine.services.encode import Encoded
from pykine.services.errors import ERR_INVALID_SORT_OPTION, ERR_KEY_NOT_FOUND
from pykine.services.health import HEALTH_TIMEOUT, cluster_version
from pykine.services.validate import SORT_ORDERS, SORT_TARGETS
from pykine.transport.grpc import RpcError, Status, parse_timeout
from pykine.wire import rpc_pb2

log = logging.getLogger(__name__)

SERVICES = ("KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth")

# Calls that change nothing, so that etcd's Go client retries them on another endpoint.
REPEATABLE = {
    "Range",
    "LeaseTimeToLive",
    "LeaseLeases",
    "Status",
    "Hash",
    "HashKV",
    "MemberList",
    "AuthStatus",
    "UserGet",
    "UserList",
    "RoleGet",
    "RoleList",
}

# Request headers that belong to the hop, not to etcd.
_HOP_HEADERS = ("user-agent", "grpc-")


# What gRPC allows as a metadata key, and as a value that is not binary (-bin).
_KEY = re.compile(r"[0-9a-z_.-]+")
_TEXT = re.compile(r"[ -~]*")


def forwarded_metadata(call: Any) -> Metadata:
    """The caller's metadata for etcd: not the hop's own headers, nor what gRPC would refuse to send."""
    return [
        (name, value)
        for name, value in call.metadata.items()
        if not name.startswith(_HOP_HEADERS)
        and _KEY.fullmatch(name)
        and (isinstance(value, bytes) or _TEXT.fullmatch(value))
    ]


def caller_timeout(call: Any) -> float | None:
    """The seconds left of the caller's deadline (None: none), so that etcd gives up when the caller does."""
    value = call.header(b"grpc-timeout")
    return None if value is None else parse_timeout(value.encode("latin-1"))


def check_range(request: rpc_pb2.RangeRequest) -> None:
    if request.sort_order not in SORT_ORDERS or request.sort_target not in SORT_TARGETS:
        raise ERR_INVALID_SORT_OPTION


def check_txn(request: rpc_pb2.TxnRequest) -> None:
    for branch in (request.success, request.failure):
        _check_branch(branch, [])


def _check_branch(ops: Any, deleted: list[bytes]) -> list[bytes]:
    """Walk one branch in order, knowing the open-ended deletes before each op; those it may make (nested too).

    Only a delete to the end of the keyspace (range end "\\0") matters: etcd's
    duplicate-key check takes it for an empty interval and lets a later put of
    a key it removes through, and the apply then panics on ignore_value or
    ignore_lease. Any other overlap etcd refuses itself ("duplicate key").
    """
    deleted = list(deleted)
    for op in ops:
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range(op.request_range)
        elif kind == "request_delete_range":
            if op.request_delete_range.range_end == b"\0":
                deleted.append(op.request_delete_range.key)
        elif kind == "request_put":
            put = op.request_put
            if (put.ignore_value or put.ignore_lease) and any(start <= put.key for start in deleted):
                raise ERR_KEY_NOT_FOUND
        elif kind == "request_txn":
            nested = op.request_txn
            after_success = _check_branch(nested.success, deleted)
            if nested.compare:  # either branch may run, depending on the data
                after_success += _check_branch(nested.failure, deleted)[len(deleted) :]
            deleted = after_success  # with no compares only the success branch runs
    return deleted


# The checks each method's requests get before they leave (see above).
CHECKS: dict[str, Callable[[Any], None]] = {"Range": check_range, "Txn": check_txn}


def _status(error: EtcdError) -> RpcError:
    try:
        return RpcError(Status(error.code), error.message)
    except ValueError:
        return RpcError(Status.UNKNOWN, error.message)


@contextlib.contextmanager
def _upstream_errors(connection: Connection, index: int) -> Iterator[None]:
    """A failed stream ends the caller's with etcd's status and message; when etcd was unavailable,
    the caller's next stream goes to the next endpoint."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        failure = connection.error(error, index)
        if isinstance(failure, UnavailableError):
            connection.fail_over(index)
        raise _status(failure) from None


class Passthrough:
    """Servicers for etcd's six services that forward to `connection`'s endpoints."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def servicers(self) -> dict[str, object]:
        """One object per service, with a forwarding method per RPC, for the transport and the gateway."""
        servicers: dict[str, object] = {}
        for name in SERVICES:
            service = rpc_pb2.DESCRIPTOR.services_by_name[name]
            servicers[name] = SimpleNamespace(**{method.name: self._forwarder(method) for method in service.methods})
        return servicers

    def _forwarder(self, method: MethodDescriptor) -> Callable[..., Any]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        if method.client_streaming:
            return self._bidirectional(path)
        if method.server_streaming:
            return self._server_streaming(path)
        return self._unary(path, method.name in REPEATABLE, CHECKS.get(method.name))

    def _unary(
        self, path: str, repeatable: bool, check: Callable[[Any], None] | None
    ) -> Callable[[Any, Any], Awaitable[Encoded]]:
        connection = self.connection
        timing = PASSTHROUGH_SECONDS.labels(path)

        async def forward(request: Any, call: Any) -> Encoded:
            if check is not None:
                check(request)
            started = time.perf_counter()
            try:
                answer = await connection.unary(
                    path,
                    request.SerializeToString(),
                    repeatable=repeatable,
                    metadata=forwarded_metadata(call),
                    timeout=caller_timeout(call),
                )
            except EtcdError as error:
                raise _status(error) from None
            finally:
                timing.observe(time.perf_counter() - started)
            return Encoded(answer)

        return forward

    def _server_streaming(self, path: str) -> Callable[[Any, Any], AsyncIterator[Encoded]]:
        connection = self.connection

        async def forward(request: Any, call: Any) -> AsyncIterator[Encoded]:
            upstream, index = connection.server_stream(
                path, request.SerializeToString(), forwarded_metadata(call), caller_timeout(call)
            )
            try:
                with _upstream_errors(connection, index):
                    async for answer in upstream:
                        yield Encoded(answer)
            finally:
                upstream.cancel()

        return forward

    def _bidirectional(self, path: str) -> Callable[[AsyncIterator[Any], Any], AsyncIterator[Encoded]]:
        connection = self.connection

        async def forward(requests: AsyncIterator[Any], call: Any) -> AsyncIterator[Encoded]:
            upstream, index = connection.stream(path, forwarded_metadata(call), caller_timeout(call))

            async def send() -> None:
                async for request in requests:
                    await upstream.write(request.SerializeToString())
                await upstream.done_writing()

            sending = asyncio.create_task(send())
            try:
                with _upstream_errors(connection, index):
                    async for answer in upstream:
                        yield Encoded(answer)
            finally:
                sending.cancel()
                upstream.cancel()
                try:
                    await sending
                except (asyncio.CancelledError, Exception) as error:
                    # The call's end already says what happened: a write to an ended call is no news.
                    log.debug("%s: forwarding requests ended: %r", path, error)

        return forward

    # -- /health and /version ------------------------------------------------------

    async def _status(self) -> rpc_pb2.StatusResponse:
        answer = await self.connection.unary(
            "/etcdserverpb.Maintenance/Status", b"", repeatable=True, timeout=HEALTH_TIMEOUT
        )
        return rpc_pb2.StatusResponse.FromString(answer)

    async def healthy(self) -> bool:
        """etcd's own test: a leader, and no alarm raised."""
        if not (await self._status()).leader:
            return False
        alarms = await self.connection.unary(
            "/etcdserverpb.Maintenance/Alarm",
            rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET).SerializeToString(),
            repeatable=True,
            timeout=HEALTH_TIMEOUT,
        )
        return not rpc_pb2.AlarmResponse.FromString(alarms).alarms

    async def versions(self) -> tuple[str, str]:
        version = (await self._status()).version
        return version, cluster_version(version)

    async def close(self) -> None:
        await self.connection.close()
