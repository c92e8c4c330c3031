"""gRPC channels to a list of etcd endpoints, with TLS and failover.

One grpc.aio channel per endpoint, made when first needed. Calls go to the
current endpoint; when it is unavailable, the next one becomes current and
the call is tried there, as etcd's Go client does: a read (`repeatable`) on
any UNAVAILABLE, a write only when the request never left (the connection
could not be made), so that a write is never applied twice. When every
endpoint has failed so, the storage client tries again until the call's
deadline; the passthrough answers at once (its callers retry).

Messages cross this layer as bytes: the storage client serialises its own
requests, and pykine's passthrough forwards the bytes it received untouched.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from pykine.client.errors import ConfigError, EtcdError, UnavailableError, status_error

# etcd's Go client lifts gRPC's receive limit (large lists) and send limit (the server enforces its own).
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # Probe an idle connection, so a watch on a dead endpoint fails over instead of hanging.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # a watch sends nothing after its create request
    # Reconnect to an endpoint that went away within a second or two of its return (gRPC's default
    # backoff grows to two minutes, during which calls to it fail without trying).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
# Pauses between rounds of retries over every endpoint: doubled each time, up to the maximum.
RETRY_PAUSE = 0.05
MAX_RETRY_PAUSE = 1.0

Metadata = Sequence[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS to the endpoints: the CA to verify them with, and a client certificate for mTLS."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """Read and check the files now, so a mistake is a ConfigError and not a failed handshake later."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("TLS: a client certificate needs both cert_file and key_file")
        ca, cert, key = (_read(path) for path in (self.ca_file, self.cert_file, self.key_file))
        context = ssl.create_default_context()
        try:
            if ca is not None:
                context.load_verify_locations(cadata=ca.decode("latin-1"))
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, ValueError) as error:
            files = ", ".join(name for name in (self.ca_file, self.cert_file, self.key_file) if name)
            raise ConfigError(f"TLS: bad certificate or key in {files}: {error}") from None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _read(path: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"TLS: cannot read {path}: {error.strerror}") from None


def parse_endpoints(endpoints: str | Sequence[str]) -> tuple[list[str], str]:
    """gRPC targets (host:port) and the scheme they share ("http", "https", or "" when none is given).

    `http://host:port`, `https://host:port` or `host:port`, one or a comma-separated list.
    """
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    items = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not items:
        raise ConfigError("no endpoints given")
    targets: list[str] = []
    schemes: set[str] = set()
    for endpoint in items:
        scheme, separator, address = endpoint.rpartition("://")
        if separator and scheme not in ("http", "https"):
            raise ConfigError(f"endpoint {endpoint!r}: the scheme must be http:// or https://")
        address = address.rstrip("/")
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or "/" in address:
            raise ConfigError(f"endpoint {endpoint!r} is not host:port")
        if scheme:
            schemes.add(scheme)
        targets.append(address)
    if len(schemes) > 1:
        raise ConfigError("endpoints mix http:// and https://")
    return targets, schemes.pop() if schemes else ""


class Connection:
    """Channels to the endpoints, the current one first; calls in bytes."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        tls: TLSConfig | None = None,
        timeout: float | None = 30.0,
        wait_for_endpoints: bool = True,
    ) -> None:
        """`timeout` bounds each call (None: no bound). `wait_for_endpoints`: a call that finds no endpoint
        it may use (none reachable, or a read meeting UNAVAILABLE everywhere) tries again until its
        deadline, as etcd's Go client does; without, it fails at once (for a proxy whose callers retry)."""
        self.targets, scheme = parse_endpoints(endpoints)
        self.wait_for_endpoints = wait_for_endpoints
        self.credentials: grpc.ChannelCredentials | None = None
        if tls is not None:
            if scheme == "http":
                raise ConfigError("TLS settings given for http:// endpoints: name them https://")
            self.credentials = tls.credentials()
        elif scheme == "https":
            self.credentials = grpc.ssl_channel_credentials()  # the system's CAs
        self.timeout = timeout
        self.current = 0
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._unary: dict[tuple[int, str], grpc.aio.UnaryUnaryMultiCallable] = {}

    def channel(self, index: int) -> grpc.aio.Channel:
        channel = self._channels.get(index)
        if channel is None:
            target = self.targets[index]
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)
            self._channels[index] = channel
        return channel

    def fail_over(self, index: int) -> None:
        """Endpoint `index` failed: the next one is current (unless another call already moved on)."""
        if self.current == index:
            self.current = (index + 1) % len(self.targets)

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    async def unary(
        self,
        path: str,
        request: bytes,
        *,
        repeatable: bool,
        metadata: Metadata | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Call `path` ("/etcdserverpb.KV/Range") with a serialised request; the serialised response.

        With `wait_for_endpoints`, rounds of retries go on, with growing pauses,
        until the deadline; otherwise the call fails after one round.
        """
        deadline = self._deadline(timeout)
        pause = RETRY_PAUSE
        while True:
            failure: EtcdError | None = None
            for _ in self.targets:
                index = self.current
                method = self._unary.get((index, path))
                if method is None:
                    method = self._unary[index, path] = self.channel(index).unary_unary(path)
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    return await method(request, timeout=remaining, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    failure = self.error(error, index)
                    if not isinstance(failure, UnavailableError):
                        raise failure from None
                    self.fail_over(index)  # later calls go elsewhere, whether or not this one may be retried
                    if not (repeatable or never_sent(error)):
                        raise failure from None
            assert failure is not None
            if not self.wait_for_endpoints or (deadline is not None and time.monotonic() + pause >= deadline):
                raise failure
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_PAUSE)

    def stream(
        self, path: str, metadata: Metadata | None = None, timeout: float | None = None
    ) -> tuple[grpc.aio.StreamStreamCall, int]:
        """A bidirectional stream on the current endpoint, and that endpoint's index (for fail_over)."""
        index = self.current
        call = self.channel(index).stream_stream(path)(metadata=metadata, timeout=timeout)
        return call, index

    def server_stream(
        self, path: str, request: bytes, metadata: Metadata | None = None, timeout: float | None = None
    ) -> tuple[grpc.aio.UnaryStreamCall, int]:
        index = self.current
        call = self.channel(index).unary_stream(path)(request, metadata=metadata, timeout=timeout)
        return call, index

    def error(self, error: grpc.aio.AioRpcError, index: int) -> EtcdError:
        """The typed error for a failed call on endpoint `index`."""
        return status_error(error.code().value[0], error.details() or "", self.targets[index])

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._unary.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)


def never_sent(error: grpc.aio.AioRpcError) -> bool:
    """Whether the call failed for want of a connection, so its request cannot have reached etcd."""
    details = (error.details() or "").lower()
    return "failed to connect" in details or "dns resolution failed" in details or "name resolution" in details
