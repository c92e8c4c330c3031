"""etcd's apply rules, evaluated in memory against a prefetched snapshot.

A write batch reads every key it may touch inside its database transaction,
then runs each request here in arrival order. Later requests see what earlier
ones changed, each request that changes something takes the next revision, and
the resulting WriteSet is stored atomically. Read-only txns use the same code
against a read snapshot.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pykine.engine.errors import (
    CompactedError,
    EngineError,
    FutureRevisionError,
    KeyNotFoundError,
    KeyTooLongError,
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseTTLTooLargeError,
)
from pykine.engine.records import (
    Change,
    KeySpan,
    KeyValueRow,
    LeaseRow,
    RangeQuery,
    ReadSet,
    Snapshot,
    SnapshotRead,
    SortSpec,
    WriteSet,
)
from pykine.engine.results import (
    CompactResult,
    DeleteResult,
    LeaseResult,
    OpResult,
    PutResult,
    RangeResult,
    TxnResult,
    WriteResult,
)
from pykine.wire import rpc_pb2

Compare = rpc_pb2.Compare
RangeRequest = rpc_pb2.RangeRequest

SORT_FIELDS = {
    RangeRequest.KEY: "key",
    RangeRequest.VERSION: "version",
    RangeRequest.CREATE: "create_revision",
    RangeRequest.MOD: "mod_revision",
    RangeRequest.VALUE: "value",
}

# Which oneof member of Compare.target_union each target reads.
COMPARE_OPERANDS = {
    Compare.VERSION: ("version", "version"),
    Compare.CREATE: ("create_revision", "create_revision"),
    Compare.MOD: ("mod_revision", "mod_revision"),
    Compare.VALUE: ("value", "value"),
    Compare.LEASE: ("lease", "lease"),
}

EMPTY_ROW = KeyValueRow(b"", 0, 0, 0, b"", 0)

# etcd's bounds on lease TTLs: its minimum follows from the default election
# timeout (TTLs below it are raised to it), its maximum is fixed.
MIN_LEASE_TTL = 2
MAX_LEASE_TTL = 9_000_000_000


def sort_spec(request: Any) -> SortSpec | None:
    """etcd sorts ascending by default when the target is not the key."""
    order = request.sort_order
    if request.sort_target != RangeRequest.KEY and order == RangeRequest.NONE:
        order = RangeRequest.ASCEND
    if order == RangeRequest.NONE:
        return None
    if request.sort_target == RangeRequest.KEY and order == RangeRequest.ASCEND:
        return None  # rows already come in key order
    return SortSpec(SORT_FIELDS[request.sort_target], order == RangeRequest.DESCEND)


def has_filters(request: Any) -> bool:
    return bool(
        request.min_mod_revision
        or request.max_mod_revision
        or request.min_create_revision
        or request.max_create_revision
    )


def range_query(request: Any) -> RangeQuery:
    """Translate a RangeRequest into the backend's query with etcd's rules."""
    filtered = has_filters(request)
    limit = request.limit if request.limit > 0 else 0
    return RangeQuery(
        span=KeySpan.from_request(request.key, request.range_end),
        revision=request.revision if request.revision > 0 else 0,
        # One extra row tells whether the limit cut the result (`more`).
        limit=limit + 1 if limit else 0,
        keys_only=request.keys_only,
        count_only=request.count_only,
        need_count=bool(limit) or filtered,
        # With no order and no filters, etcd limits in key order first and sorts after.
        sort=sort_spec(request) if request.sort_order != RangeRequest.NONE or filtered else None,
        min_mod_revision=request.min_mod_revision,
        max_mod_revision=request.max_mod_revision,
        min_create_revision=request.min_create_revision,
        max_create_revision=request.max_create_revision,
    )


def finish_range(request: Any, revision: int, rows: list[KeyValueRow], count: int) -> RangeResult:
    """Apply the limit to rows the backend filtered (and sorted, if an order was given)."""
    if request.sort_order == RangeRequest.NONE and request.sort_target != RangeRequest.KEY:
        index = KeyValueRow._fields.index(SORT_FIELDS[request.sort_target])
        rows = sorted(rows, key=lambda row: row[index])
    more = False
    if request.limit > 0 and len(rows) > request.limit:
        rows = rows[: request.limit]
        more = True
    return RangeResult(revision, rows, count, more)


def shape_rows(request: Any, revision: int, rows: list[KeyValueRow]) -> RangeResult:
    """etcd's Range post-processing over all live rows of the span, in key order."""
    count = len(rows)
    if request.count_only:
        return RangeResult(revision, [], count, False)
    if request.sort_order == RangeRequest.NONE and not has_filters(request) and request.limit > 0:
        rows = rows[: request.limit + 1]  # etcd reads only what the limit needs
    if request.max_mod_revision:
        rows = [r for r in rows if r.mod_revision <= request.max_mod_revision]
    if request.min_mod_revision:
        rows = [r for r in rows if r.mod_revision >= request.min_mod_revision]
    if request.max_create_revision:
        rows = [r for r in rows if r.create_revision <= request.max_create_revision]
    if request.min_create_revision:
        rows = [r for r in rows if r.create_revision >= request.min_create_revision]
    spec = sort_spec(request) if request.sort_order != RangeRequest.NONE else None
    if spec is not None:
        index = KeyValueRow._fields.index(spec.field)
        rows = sorted(rows, key=lambda row: row[index], reverse=spec.descending)
    if request.keys_only:
        rows = [r._replace(value=b"") for r in rows]
    return finish_range(request, revision, rows, count)


def compare_row(compare: Any, row: KeyValueRow) -> bool:
    target = COMPARE_OPERANDS.get(compare.target)
    result = 0
    if target is not None:
        operand_name, row_field = target
        is_value = compare.target == Compare.VALUE
        operand: Any = b"" if is_value else 0
        if compare.WhichOneof("target_union") == operand_name:
            operand = getattr(compare, operand_name)
        actual = getattr(row, row_field)
        result = (actual > operand) - (actual < operand)
    if compare.result == Compare.EQUAL:
        return result == 0
    if compare.result == Compare.NOT_EQUAL:
        return result != 0
    if compare.result == Compare.GREATER:
        return result > 0
    if compare.result == Compare.LESS:
        return result < 0
    return True


def single_key(request: Any) -> bytes | None:
    """The key of a txn in Kubernetes' shape, or None.

    Kubernetes' create, update, delete and compaction txns compare one key and
    then put, delete or read that same key with no options that change the
    rules. Such txns take a fast path that skips the general machinery.
    """
    if len(request.compare) != 1:
        return None
    compare = request.compare[0]
    key = compare.key
    if compare.range_end:
        return None
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put":
            put = op.request_put
            if put.key != key or put.ignore_value or put.ignore_lease:
                return None
        elif kind == "request_delete_range":
            if op.request_delete_range.key != key or op.request_delete_range.range_end:
                return None
        elif kind != "request_range" or len(op.request_range.ListFields()) != 1 or op.request_range.key != key:
            return None
    return key


def is_write(request: Any) -> bool:
    """Whether a txn's branches hold any put or delete (etcd's isTxnReadonly)."""
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind in ("request_put", "request_delete_range"):
            return True
        if kind == "request_txn" and is_write(op.request_txn):
            return True
    return False


@dataclass(frozen=True, slots=True)
class ExpireLease:
    """Internal request: revoke a lease if it is still past its deadline."""

    lease_id: int
    now: float


def collect_reads(request: Any, reads: ReadSet) -> None:
    """Add what evaluating `request` may read to `reads`."""
    if isinstance(request, rpc_pb2.PutRequest):
        reads.spans.add(SnapshotRead(KeySpan(request.key, request.key + b"\x00"), 0))
        if request.lease:
            reads.leases.add(request.lease)
    elif isinstance(request, rpc_pb2.DeleteRangeRequest):
        reads.spans.add(SnapshotRead(KeySpan.from_request(request.key, request.range_end), 0))
    elif isinstance(request, rpc_pb2.RangeRequest):
        span = KeySpan.from_request(request.key, request.range_end)
        reads.spans.add(SnapshotRead(span, 0))
        if request.revision > 0:
            reads.spans.add(SnapshotRead(span, request.revision))
            reads.historical = True
    elif isinstance(request, rpc_pb2.TxnRequest):
        key = single_key(request)
        if key is not None:
            reads.spans.add(SnapshotRead(KeySpan(key, key + b"\x00"), 0))
            reads.leases.update(
                op.request_put.lease
                for op in (*request.success, *request.failure)
                if op.WhichOneof("request") == "request_put" and op.request_put.lease
            )
            return
        for compare in request.compare:
            reads.spans.add(SnapshotRead(KeySpan.from_request(compare.key, compare.range_end), 0))
        for op in (*request.success, *request.failure):
            kind = op.WhichOneof("request")
            if kind is not None:
                collect_reads(getattr(op, kind), reads)
    elif isinstance(request, rpc_pb2.LeaseGrantRequest | rpc_pb2.LeaseKeepAliveRequest):
        reads.leases.add(request.ID)
    elif isinstance(request, rpc_pb2.LeaseRevokeRequest):
        reads.leases.add(request.ID)
        reads.lease_keys.add(request.ID)
    elif isinstance(request, ExpireLease):
        reads.leases.add(request.lease_id)
        reads.lease_keys.add(request.lease_id)


class _Revisioning:
    """Revision bookkeeping for one request: etcd's storeTxnWrite."""

    __slots__ = ("before", "begin", "sub")

    def __init__(self, begin: int) -> None:
        self.begin = begin
        self.sub = 0
        # Each changed key's row before this revision: watch events report it
        # as prev_kv (etcd reads it at revision - 1), even if an earlier op of
        # the same txn changed the key already.
        self.before: dict[bytes, KeyValueRow | None] = {}

    def record(self, changes: list[Change], row: KeyValueRow, deleted: bool, current: KeyValueRow | None) -> None:
        prev = self.before.setdefault(row.key, current)
        changes.append(Change(row, self.sub, deleted, prev))
        self.sub += 1

    @property
    def changed(self) -> bool:
        return self.sub > 0

    @property
    def read_revision(self) -> int:
        return self.begin + 1 if self.sub else self.begin


class BatchState:
    """The latest state of every key a batch may touch, updated as it applies."""

    def __init__(self, snapshot: Snapshot, max_key_bytes: int | None = None) -> None:
        self.max_key_bytes = max_key_bytes
        self.revision = snapshot.revision
        self.compact_revision = snapshot.compact_revision
        self.kvs: dict[bytes, KeyValueRow] = {row.key: row for row in snapshot.latest}
        self.history = snapshot.history
        self.leases = dict(snapshot.leases)
        self.changes: list[Change] = []
        self._lease_puts: dict[int, LeaseRow] = {}
        self._lease_deletes: set[int] = set()

    def write_set(self) -> WriteSet:
        return WriteSet(
            self.revision,
            self.compact_revision,
            self.changes,
            list(self._lease_puts.values()),
            sorted(self._lease_deletes),
        )

    def apply(self, request: Any) -> WriteResult | EngineError:
        """Run one request; an etcd error leaves the state untouched."""
        try:
            if isinstance(request, rpc_pb2.PutRequest):
                self._check_put(request, lease_first=True)
                return self._commit(lambda rev: self._put(rev, request))
            if isinstance(request, rpc_pb2.DeleteRangeRequest):
                return self._commit(lambda rev: self._delete(rev, request))
            if isinstance(request, rpc_pb2.TxnRequest):
                return self._txn(request)
            if isinstance(request, rpc_pb2.CompactionRequest):
                return self._compact(request)
            if isinstance(request, rpc_pb2.LeaseGrantRequest):
                return self._grant(request)
            if isinstance(request, rpc_pb2.LeaseRevokeRequest):
                if request.ID not in self.leases:
                    raise LeaseNotFoundError()
                return self._revoke(request.ID)
            if isinstance(request, rpc_pb2.LeaseKeepAliveRequest):
                return self._keep_alive(request.ID)
            if isinstance(request, ExpireLease):
                lease = self.leases.get(request.lease_id)
                if lease is None or lease.expires_at > request.now:
                    return LeaseResult(self.revision, request.lease_id, 0)  # renewed or gone meanwhile
                return self._revoke(request.lease_id)
        except EngineError as error:
            return error
        raise TypeError(f"not a write request: {type(request).__name__}")

    # -- reads over the in-memory state -------------------------------------

    def rows_in(self, span: KeySpan) -> list[KeyValueRow]:
        if span.single_key:
            row = self.kvs.get(span.start)
            return [row] if row is not None else []
        if span.empty:
            return []
        return sorted((row for key, row in self.kvs.items() if span.contains(key)), key=_row_key)

    def _range(self, rev: _Revisioning, request: Any, pinned: RangeResult | None) -> RangeResult:
        if pinned is not None:
            pinned.revision = rev.read_revision
            return pinned
        span = KeySpan.from_request(request.key, request.range_end)
        return shape_rows(request, rev.read_revision, self.rows_in(span))

    def _pin_range(self, request: Any) -> RangeResult | None:
        """Check a range at a fixed revision and read it before any op applies.

        As in etcd's txn checks, a negative revision below the compact revision
        is ErrCompacted; any other negative one reads the current state.
        """
        if request.revision == 0:
            return None
        if request.revision > self.revision:
            raise FutureRevisionError()
        if request.revision < self.compact_revision:
            raise CompactedError()
        if request.revision < 0:
            return None
        span = KeySpan.from_request(request.key, request.range_end)
        if request.revision == self.revision or span.empty:
            rows = self.rows_in(span)
        else:
            rows = self.history[SnapshotRead(span, request.revision)]
        return shape_rows(request, 0, rows)

    def _compare(self, compare: Any) -> bool:
        rows = self.rows_in(KeySpan.from_request(compare.key, compare.range_end))
        if not rows:
            # A value compare on a missing key always fails, even NOT_EQUAL.
            return compare.target != Compare.VALUE and compare_row(compare, EMPTY_ROW)
        return all(compare_row(compare, row) for row in rows)

    # -- writes --------------------------------------------------------------

    def _commit(self, run: Any) -> Any:
        rev = _Revisioning(self.revision)
        result = run(rev)
        if rev.changed:
            self.revision = rev.begin + 1
        return result

    def _check_put(self, request: Any, lease_first: bool) -> None:
        if self.max_key_bytes is not None and len(request.key) > self.max_key_bytes:
            raise KeyTooLongError(self.max_key_bytes)
        missing_key = (request.ignore_value or request.ignore_lease) and request.key not in self.kvs
        missing_lease = request.lease != 0 and request.lease not in self.leases
        if lease_first and missing_lease:
            raise LeaseNotFoundError()
        if missing_key:
            raise KeyNotFoundError()
        if missing_lease:
            raise LeaseNotFoundError()

    def _put(self, rev: _Revisioning, request: Any) -> PutResult:
        prev = self.kvs.get(request.key)
        revision = rev.begin + 1
        row = KeyValueRow(
            request.key,
            prev.create_revision if prev else revision,
            revision,
            prev.version + 1 if prev else 1,
            prev.value if request.ignore_value and prev else request.value,
            prev.lease if request.ignore_lease and prev else request.lease,
        )
        self.kvs[request.key] = row
        rev.record(self.changes, row, False, prev)
        return PutResult(revision, prev if request.prev_kv else None)

    def _delete(self, rev: _Revisioning, request: Any) -> DeleteResult:
        rows = self.rows_in(KeySpan.from_request(request.key, request.range_end))
        for row in rows:
            self._delete_key(rev, row.key)
        return DeleteResult(rev.read_revision, len(rows), rows if request.prev_kv else [])

    def _delete_key(self, rev: _Revisioning, key: bytes) -> None:
        row = self.kvs.pop(key)
        rev.record(self.changes, KeyValueRow(key, 0, rev.begin + 1, 0, b"", 0), True, row)

    def _single_key_txn(self, request: Any, key: bytes) -> TxnResult:
        """etcd's txn rules, specialised to one compare and plain ops on one key."""
        compare = request.compare[0]
        row = self.kvs.get(key)
        if row is None:
            succeeded = compare.target != Compare.VALUE and compare_row(compare, EMPTY_ROW)
        else:
            succeeded = compare_row(compare, row)
        ops = request.success if succeeded else request.failure
        for op in ops:
            if op.WhichOneof("request") == "request_put":
                lease = op.request_put.lease
                if lease and lease not in self.leases:
                    raise LeaseNotFoundError()
        rev = _Revisioning(self.revision)
        responses: list[OpResult] = []
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_put":
                responses.append(self._put(rev, op.request_put))
            elif kind == "request_delete_range":
                responses.append(self._delete(rev, op.request_delete_range))
            else:
                current = self.kvs.get(key)
                rows = [current] if current is not None else []
                responses.append(RangeResult(rev.read_revision, rows, len(rows), False))
        if rev.changed:
            self.revision = rev.begin + 1
        return TxnResult(self.revision, succeeded, responses)

    def _txn(self, request: Any) -> TxnResult:
        key = single_key(request)
        if key is not None:
            return self._single_key_txn(request, key)
        path = self._compare_path(request)
        ops = list(_ops_on_path(request, iter(path)))
        deleted: list[KeySpan] = []
        for op in ops:
            kind = op.WhichOneof("request")
            if kind == "request_put":
                put = op.request_put
                self._check_put(put, lease_first=False)
                # etcd 3.4 checks ignore_* against the state before the txn, then panics
                # when an earlier delete in the txn removed the key; refuse it instead.
                if (put.ignore_value or put.ignore_lease) and any(span.contains(put.key) for span in deleted):
                    raise KeyNotFoundError()
            elif kind == "request_delete_range":
                delete = op.request_delete_range
                deleted.append(KeySpan.from_request(delete.key, delete.range_end))
        pins = iter([self._pin_range(op.request_range) for op in ops if op.WhichOneof("request") == "request_range"])
        result = self._commit(lambda rev: self._apply_ops(rev, request, iter(path), pins))
        result.revision = self.revision
        return result

    def _compare_path(self, request: Any) -> list[bool]:
        """Every compare on the chosen path, judged against the pre-txn state."""
        succeeded = all(self._compare(compare) for compare in request.compare)
        path = [succeeded]
        for op in request.success if succeeded else request.failure:
            if op.WhichOneof("request") == "request_txn":
                path.extend(self._compare_path(op.request_txn))
        return path

    def _apply_ops(
        self,
        rev: _Revisioning,
        request: Any,
        path: Iterator[bool],
        pins: Iterator[RangeResult | None],
    ) -> TxnResult:
        succeeded = next(path)
        responses: list[OpResult] = []
        for op in request.success if succeeded else request.failure:
            kind = op.WhichOneof("request")
            if kind == "request_range":
                responses.append(self._range(rev, op.request_range, next(pins)))
            elif kind == "request_put":
                responses.append(self._put(rev, op.request_put))
            elif kind == "request_delete_range":
                responses.append(self._delete(rev, op.request_delete_range))
            elif kind == "request_txn":
                responses.append(self._apply_ops(rev, op.request_txn, path, pins))
        return TxnResult(None, succeeded, responses)

    # -- leases ----------------------------------------------------------------

    def _save_lease(self, lease: LeaseRow) -> None:
        self.leases[lease.id] = lease
        self._lease_puts[lease.id] = lease
        self._lease_deletes.discard(lease.id)

    def _grant(self, request: Any) -> LeaseResult:
        if request.TTL > MAX_LEASE_TTL:
            raise LeaseTTLTooLargeError()
        lease_id = request.ID
        if lease_id == 0:
            lease_id = random.getrandbits(63) or 1
            # A clash with a lease this batch did not load has odds of 1 in 2**63.
            while lease_id in self.leases:
                lease_id = random.getrandbits(63) or 1
        elif lease_id in self.leases:
            raise LeaseExistsError()
        ttl = max(request.TTL, MIN_LEASE_TTL)
        self._save_lease(LeaseRow(lease_id, ttl, time.time() + ttl))
        return LeaseResult(self.revision, lease_id, ttl)

    def _keep_alive(self, lease_id: int) -> LeaseResult:
        lease = self.leases.get(lease_id)
        if lease is None:
            return LeaseResult(self.revision, lease_id, 0)
        self._save_lease(lease._replace(expires_at=time.time() + lease.ttl))
        return LeaseResult(self.revision, lease_id, lease.ttl)

    def _revoke(self, lease_id: int) -> LeaseResult:
        """Delete the lease and every key attached to it, all at one revision."""
        attached = sorted(key for key, row in self.kvs.items() if row.lease == lease_id)
        rev = _Revisioning(self.revision)
        for key in attached:
            self._delete_key(rev, key)
        if rev.changed:
            self.revision = rev.begin + 1
        del self.leases[lease_id]
        self._lease_puts.pop(lease_id, None)
        self._lease_deletes.add(lease_id)
        return LeaseResult(self.revision, lease_id, 0)

    def _compact(self, request: Any) -> CompactResult:
        if request.revision <= self.compact_revision:
            raise CompactedError()
        if request.revision > self.revision:
            raise FutureRevisionError()
        self.compact_revision = request.revision
        return CompactResult(self.revision)


def _ops_on_path(request: Any, path: Iterator[bool]) -> Iterable[Any]:
    """The ops a txn will run, nested txns included, in execution order."""
    for op in request.success if next(path) else request.failure:
        yield op
        if op.WhichOneof("request") == "request_txn":
            yield from _ops_on_path(op.request_txn, path)


def _row_key(row: KeyValueRow) -> bytes:
    return row.key
