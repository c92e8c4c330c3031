"""Engine results to etcd protobuf responses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pykine.engine.records import KeyValueRow
from pykine.engine.results import DeleteResult, OpResult, PutResult, RangeResult, TxnResult
from pykine.wire import kv_pb2, rpc_pb2

KeyValue = kv_pb2.KeyValue
ResponseHeader = rpc_pb2.ResponseHeader


@dataclass(frozen=True, slots=True)
class Identity:
    """Who answers: fixed ids that go into every outer response header."""

    cluster_id: int
    member_id: int
    raft_term: int = 1

    def header(self, revision: int) -> rpc_pb2.ResponseHeader:
        return ResponseHeader(
            cluster_id=self.cluster_id,
            member_id=self.member_id,
            revision=revision,
            raft_term=self.raft_term,
        )


def key_value(row: KeyValueRow) -> kv_pb2.KeyValue:
    return KeyValue(
        key=row.key,
        create_revision=row.create_revision,
        mod_revision=row.mod_revision,
        version=row.version,
        value=row.value,
        lease=row.lease,
    )


def _fill_kvs(target: Any, rows: list[KeyValueRow]) -> None:
    target.extend(map(key_value, rows))


def range_response(result: RangeResult, header: rpc_pb2.ResponseHeader) -> rpc_pb2.RangeResponse:
    response = rpc_pb2.RangeResponse(header=header, more=result.more, count=result.count)
    _fill_kvs(response.kvs, result.kvs)
    return response


def put_response(result: PutResult, header: rpc_pb2.ResponseHeader) -> rpc_pb2.PutResponse:
    response = rpc_pb2.PutResponse(header=header)
    if result.prev_kv is not None:
        response.prev_kv.CopyFrom(key_value(result.prev_kv))
    return response


def delete_response(result: DeleteResult, header: rpc_pb2.ResponseHeader) -> rpc_pb2.DeleteRangeResponse:
    response = rpc_pb2.DeleteRangeResponse(header=header, deleted=result.deleted)
    _fill_kvs(response.prev_kvs, result.prev_kvs)
    return response


def txn_response(result: TxnResult, header: rpc_pb2.ResponseHeader) -> rpc_pb2.TxnResponse:
    """Ops inside a txn carry a header holding only the revision, as in etcd."""
    response = rpc_pb2.TxnResponse(header=header, succeeded=result.succeeded)
    for op in result.responses:
        _add_op(response.responses.add(), op)
    return response


def _add_op(target: rpc_pb2.ResponseOp, op: OpResult) -> None:
    inner = ResponseHeader(revision=op.revision) if op.revision is not None else ResponseHeader()
    if isinstance(op, RangeResult):
        target.response_range.CopyFrom(range_response(op, inner))
    elif isinstance(op, PutResult):
        target.response_put.CopyFrom(put_response(op, inner))
    elif isinstance(op, DeleteResult):
        target.response_delete_range.CopyFrom(delete_response(op, inner))
    else:
        target.response_txn.CopyFrom(txn_response(op, inner))
