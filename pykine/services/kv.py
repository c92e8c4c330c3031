"""etcdserverpb.KV."""

from __future__ import annotations

from pykine.engine.store import Engine
from pykine.services import auth, encode, validate
from pykine.services.encode import Identity
from pykine.services.errors import etcd_errors
from pykine.transport.grpc import Call
from pykine.wire import rpc_pb2


class KVService:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self.engine = engine
        self.identity = identity
        self.known = encode.EncodedKeyValues()

    @etcd_errors
    async def Range(self, request: rpc_pb2.RangeRequest, call: Call) -> encode.Encoded | rpc_pb2.RangeResponse:
        validate.check_range(request)
        if auth.needs_check(self.engine, call):
            await auth.check_range(self.engine, call, request.key, request.range_end)
        if request.keys_only:  # rows without their values must not enter the cache of whole ones
            result = await self.engine.range(request)
            return encode.range_response(result, self.identity.header(result.revision))
        result = await self.engine.range(request, self.known.get)
        return encode.encoded_range_response(result, self.identity.header(result.revision), self.known)

    @etcd_errors
    async def Put(self, request: rpc_pb2.PutRequest, call: Call) -> rpc_pb2.PutResponse:
        validate.check_put(request)
        validate.check_size(request)
        if auth.needs_check(self.engine, call):
            await auth.check_put(self.engine, call, request)
        result = await self.engine.put(request)
        return encode.put_response(result, self.identity.header(result.revision))

    @etcd_errors
    async def DeleteRange(self, request: rpc_pb2.DeleteRangeRequest, call: Call) -> rpc_pb2.DeleteRangeResponse:
        validate.check_delete(request)
        validate.check_size(request)
        if auth.needs_check(self.engine, call):
            await auth.check_delete(self.engine, call, request)
        result = await self.engine.delete_range(request)
        return encode.delete_response(result, self.identity.header(result.revision))

    @etcd_errors
    async def Txn(self, request: rpc_pb2.TxnRequest, call: Call) -> rpc_pb2.TxnResponse:
        validate.check_txn(request)
        validate.check_size(request)
        if auth.needs_check(self.engine, call):
            await auth.check_txn(self.engine, call, request)
        result = await self.engine.txn(request)
        assert result.revision is not None
        return encode.txn_response(result, self.identity.header(result.revision))

    @etcd_errors
    async def Compact(self, request: rpc_pb2.CompactionRequest, call: Call) -> rpc_pb2.CompactionResponse:
        validate.check_size(request)
        if auth.needs_check(self.engine, call):
            await auth.check_token(self.engine, call)
        result = await self.engine.compact(request)
        return rpc_pb2.CompactionResponse(header=self.identity.header(result.revision))
