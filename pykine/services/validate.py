"""Request checks etcd makes before a request reaches its store."""

from __future__ import annotations

from typing import Any

from pykine.services.errors import (
    ERR_DUPLICATE_KEY,
    ERR_EMPTY_KEY,
    ERR_INVALID_SORT_OPTION,
    ERR_KEY_NOT_FOUND,
    ERR_LEASE_PROVIDED,
    ERR_REQUEST_TOO_LARGE,
    ERR_TOO_MANY_OPS,
    ERR_VALUE_PROVIDED,
)
from pykine.wire import rpc_pb2

# etcd's defaults: --max-txn-ops and --max-request-bytes.
MAX_TXN_OPS = 128
MAX_REQUEST_BYTES = 1536 * 1024
# gRPC itself refuses messages beyond this, as etcd configures it.
MAX_RECEIVE_BYTES = MAX_REQUEST_BYTES + 512 * 1024

SORT_ORDERS = set(rpc_pb2.RangeRequest.SortOrder.values())
SORT_TARGETS = set(rpc_pb2.RangeRequest.SortTarget.values())


# etcd measures a write inside its raft envelope: a request header holding a
# 64-bit id (field tag, length, id tag, ~9-byte varint) plus the request's own
# field tag and length prefix.
RAFT_HEADER_BYTES = 2 + 1 + 1 + 9 + 1


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def check_size(request: Any) -> None:
    size = request.ByteSize()
    if size + RAFT_HEADER_BYTES + _varint_size(size) > MAX_REQUEST_BYTES:
        raise ERR_REQUEST_TOO_LARGE


def check_range(request: Any) -> None:
    if not request.key:
        raise ERR_EMPTY_KEY
    if request.sort_order not in SORT_ORDERS or request.sort_target not in SORT_TARGETS:
        raise ERR_INVALID_SORT_OPTION


def check_put(request: Any) -> None:
    if not request.key:
        raise ERR_EMPTY_KEY
    if request.ignore_value and request.value:
        raise ERR_VALUE_PROVIDED
    if request.ignore_lease and request.lease:
        raise ERR_LEASE_PROVIDED


def check_delete(request: Any) -> None:
    if not request.key:
        raise ERR_EMPTY_KEY


def check_txn(request: Any, max_ops: int = MAX_TXN_OPS) -> None:
    """Op counts, keys and op shapes, then overlapping writes in each branch."""
    _check_txn_shape(request, max_ops)
    _check_writes(request.success)
    _check_writes(request.failure)


def _check_txn_shape(request: Any, max_ops: int) -> None:
    if max(len(request.compare), len(request.success), len(request.failure)) > max_ops:
        raise ERR_TOO_MANY_OPS
    for compare in request.compare:
        if not compare.key:
            raise ERR_EMPTY_KEY
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range(op.request_range)
        elif kind == "request_put":
            check_put(op.request_put)
        elif kind == "request_delete_range":
            check_delete(op.request_delete_range)
        elif kind == "request_txn":
            _check_txn_shape(op.request_txn, max_ops)
        else:
            raise ERR_KEY_NOT_FOUND  # an empty op, as etcd answers it


class _Deletes:
    """Delete intervals of a branch; a point [k] or [start, end) by byte order."""

    def __init__(self) -> None:
        self.intervals: list[tuple[bytes, bytes | None]] = []

    def add(self, key: bytes, range_end: bytes) -> None:
        self.intervals.append((key, range_end or None))

    def covers(self, key: bytes) -> bool:
        for start, end in self.intervals:
            if (end is None and key == start) or (end is not None and start <= key < end):
                return True
        return False


def _check_writes(ops: Any) -> tuple[set[bytes], _Deletes]:
    """No key may be put twice, or put and deleted, on one path (etcd's checkIntervals)."""
    deletes = _Deletes()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            deletes.add(op.request_delete_range.key, op.request_delete_range.range_end)
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        then_puts, then_deletes = _check_writes(op.request_txn.success)
        else_puts, else_deletes = _check_writes(op.request_txn.failure)
        for key in then_puts:
            if key in puts or deletes.covers(key):
                raise ERR_DUPLICATE_KEY
            puts.add(key)
        for key in else_puts:
            # then and else exclude each other, so they may share a key
            if (key in puts and key not in then_puts) or deletes.covers(key):
                raise ERR_DUPLICATE_KEY
            puts.add(key)
        deletes.intervals.extend(then_deletes.intervals)
        deletes.intervals.extend(else_deletes.intervals)
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        key = op.request_put.key
        if key in puts or deletes.covers(key):
            raise ERR_DUPLICATE_KEY
        puts.add(key)
    return puts, deletes
