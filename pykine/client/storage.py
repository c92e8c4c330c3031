"""A storage client with compare-and-swap: K8E's five calls, plus a watch, for Python programs.

Every call is one etcd request, so it behaves the same against pykine and
against etcd:

- `list(prefix, revision)` is a prefix range at a revision (0: the latest);
- `get(key)` is a range of one key;
- `create(key, data)` is a txn that puts only if `ModRevision(key) == 0`;
- `update(key, revision, data)` and `delete(key, revision)` are txns on
  `ModRevision(key) == revision` whose else branch reads the key, so a
  mismatch reports what is there now;
- `watch(prefix, revision)` is a watch stream that resumes after its last
  event on another endpoint when its endpoint goes away.

`Value.modified` is the key's mod revision: the `revision` to pass to
update() and delete().
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc.aio

from pykine.client.connection import Connection, TLSConfig
from pykine.client.errors import (
    OUT_OF_RANGE,
    UNAVAILABLE,
    UNKNOWN,
    AlreadyExistsError,
    ClientError,
    CompactedError,
    EtcdError,
    NotFoundError,
    RevisionMismatchError,
    UnavailableError,
    status_error,
)
from pykine.wire import kv_pb2, rpc_pb2

Key = str | bytes

# A refused watch's cancel_reason, as grpc-go formats a status.
GO_STATUS = re.compile(r"rpc error: code = (\w+) desc = (.*)", re.DOTALL)
CODES_BY_GO_NAME = {
    name: code
    for code, name in enumerate(
        [
            "OK",
            "Canceled",
            "Unknown",
            "InvalidArgument",
            "DeadlineExceeded",
            "NotFound",
            "AlreadyExists",
            "PermissionDenied",
            "ResourceExhausted",
            "FailedPrecondition",
            "Aborted",
            "OutOfRange",
            "Unimplemented",
            "Internal",
            "Unavailable",
            "DataLoss",
            "Unauthenticated",
        ]
    )
}
# Pauses between a failed watch and the next try: doubled each time, up to the maximum.
RETRY_PAUSE = 0.05
MAX_RETRY_PAUSE = 2.0
# etcd's metadata for "end this stream when the member loses its leader" (Go's WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)

RANGE = "/etcdserverpb.KV/Range"
TXN = "/etcdserverpb.KV/Txn"
WATCH = "/etcdserverpb.Watch/Watch"


@dataclass(frozen=True, slots=True)
class Value:
    """A key's data and its mod revision (`modified`), for compare-and-swap."""

    key: bytes
    data: bytes
    modified: int


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by watch(): `kind` is "put" or "delete"; a deletion's value has no data."""

    kind: str
    value: Value

    @property
    def revision(self) -> int:
        return self.value.modified


def as_bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """The key and range end of every key starting with `prefix`: etcd's "\\0" to "\\0" for all keys."""
    if not prefix:
        return b"\0", b"\0"
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return prefix, b"\0"
    return prefix, trimmed[:-1] + bytes([trimmed[-1] + 1])


def _value(kv: kv_pb2.KeyValue) -> Value:
    return Value(kv.key, kv.value, kv.mod_revision)


class Client:
    """An asyncio storage client for etcd or pykine endpoints (`http://host:port`, `https://…`, or `host:port`).

    `timeout` bounds each call (seconds, None: no bound). Use it as an async
    context manager, or call close().
    """

    def __init__(
        self, endpoints: str | Sequence[str], tls: TLSConfig | None = None, *, timeout: float | None = 30.0
    ) -> None:
        self.connection = Connection(endpoints, tls, timeout)
        self.closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed = True
        await self.connection.close()

    async def _range(self, request: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        answer = await self.connection.unary(RANGE, request.SerializeToString(), repeatable=True)
        return rpc_pb2.RangeResponse.FromString(answer)

    async def _txn(self, request: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        answer = await self.connection.unary(TXN, request.SerializeToString(), repeatable=False)
        return rpc_pb2.TxnResponse.FromString(answer)

    async def list(self, prefix: Key, revision: int = 0) -> list[Value]:
        """Every key under `prefix` as of `revision` (0: now), in key order; CompactedError below the compaction."""
        start, end = prefix_range(as_bytes(prefix))
        response = await self._range(rpc_pb2.RangeRequest(key=start, range_end=end, revision=revision))
        return [_value(kv) for kv in response.kvs]

    async def get(self, key: Key) -> Value:
        """The key now; NotFoundError if there is none."""
        name = as_bytes(key)
        response = await self._range(rpc_pb2.RangeRequest(key=name))
        if not response.kvs:
            raise NotFoundError(name)
        return _value(response.kvs[0])

    async def create(self, key: Key, data: bytes) -> int:
        """Store a new key; its revision. AlreadyExistsError if the key exists."""
        name = as_bytes(key)
        response = await self._swap(name, 0, rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=name, value=data)))
        if not response.succeeded:
            raise AlreadyExistsError(name, self._current(response))
        return response.header.revision

    async def update(self, key: Key, revision: int, data: bytes) -> int:
        """Replace the key's data if it is still at `revision`; the new revision. RevisionMismatchError if not."""
        name = as_bytes(key)
        put = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=name, value=data))
        response = await self._swap(name, revision, put)
        if not response.succeeded:
            raise RevisionMismatchError(name, revision, self._current(response))
        return response.header.revision

    async def delete(self, key: Key, revision: int) -> int:
        """Delete the key if it is still at `revision`; the deletion's revision. RevisionMismatchError if not."""
        name = as_bytes(key)
        response = await self._swap(name, revision, rpc_pb2.RequestOp(request_delete_range={"key": name}))
        if not response.succeeded:
            raise RevisionMismatchError(name, revision, self._current(response))
        return response.header.revision

    async def _swap(self, key: bytes, revision: int, then: rpc_pb2.RequestOp) -> rpc_pb2.TxnResponse:
        """`then` if the key's mod revision is `revision` (0: absent); otherwise read the key."""
        compare = rpc_pb2.Compare(
            key=key,
            result=rpc_pb2.Compare.EQUAL,
            target=rpc_pb2.Compare.MOD,
            mod_revision=revision,
        )
        read = rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))
        return await self._txn(rpc_pb2.TxnRequest(compare=[compare], success=[then], failure=[read]))

    @staticmethod
    def _current(response: rpc_pb2.TxnResponse) -> Value | None:
        """The key as the failed txn's else branch read it."""
        kvs = response.responses[0].response_range.kvs if response.responses else []
        return _value(kvs[0]) if kvs else None

    async def watch(self, prefix: Key, revision: int = 0) -> AsyncIterator[Event]:
        """Changes under `prefix` from `revision` on (0: from now), until the iterator is closed.

        The watch requires a leader, as Kubernetes' do, so a member cut off
        from its quorum ends it instead of going quiet. When its endpoint
        fails, the watch resumes (on the next endpoint, pausing longer each
        time) after the last revision it delivered, so no event is lost or
        repeated; UnavailableError once no endpoint has served it for the
        client's timeout. CompactedError when `revision` (or the resume point)
        has been compacted.
        """
        start, end = prefix_range(as_bytes(prefix))
        connection = self.connection
        next_revision = revision
        pause = RETRY_PAUSE
        give_up: float | None = None  # while failing: when to stop trying
        while True:
            create = rpc_pb2.WatchCreateRequest(
                key=start, range_end=end, start_revision=next_revision, progress_notify=True
            )
            call, index = connection.stream(WATCH, metadata=REQUIRE_LEADER)
            endpoint = connection.targets[index]
            try:
                await call.write(rpc_pb2.WatchRequest(create_request=create).SerializeToString())
                async for answer in call:
                    response = rpc_pb2.WatchResponse.FromString(answer)
                    if response.canceled:
                        raise _cancellation(response, endpoint)
                    give_up, pause = None, RETRY_PAUSE  # served: a later failure starts a new streak
                    for event in response.events:
                        kind = "delete" if event.type == kv_pb2.Event.DELETE else "put"
                        yield Event(kind, _value(event.kv))
                        next_revision = event.kv.mod_revision + 1
                    if not response.events and (next_revision == 0 or not response.created):
                        # Created from now, or a progress notice: every change up to the header was delivered.
                        next_revision = max(next_revision, response.header.revision + 1)
                failure: EtcdError = UnavailableError(UNAVAILABLE, "the watch stream ended", endpoint)
            except grpc.aio.AioRpcError as error:
                failure = connection.error(error, index)
                if not isinstance(failure, UnavailableError):
                    raise failure from None
            except asyncio.CancelledError:
                if self.closed:  # grpc cancels the calls of a closed channel
                    raise ClientError("the client was closed during the watch") from None
                raise
            finally:
                call.cancel()
            now = time.monotonic()
            if give_up is None and connection.timeout is not None:
                give_up = now + connection.timeout
            if give_up is not None and now >= give_up:
                raise failure
            connection.fail_over(index)
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RETRY_PAUSE)


def _cancellation(response: rpc_pb2.WatchResponse, endpoint: str) -> EtcdError:
    """The error for a watch etcd canceled: compacted, or the status grpc-go's text names (etcd's cancel_reason)."""
    reason = response.cancel_reason or "the server canceled the watch"
    if response.compact_revision:
        return CompactedError(OUT_OF_RANGE, reason, endpoint, response.compact_revision)
    status = GO_STATUS.fullmatch(reason)
    if status is None:
        return EtcdError(UNKNOWN, reason, endpoint)
    return status_error(CODES_BY_GO_NAME.get(status[1], UNKNOWN), status[2], endpoint)
