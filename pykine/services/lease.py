"""etcdserverpb.Lease: grant, revoke, keep-alive stream, time-to-live, list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pykine.engine.store import Engine
from pykine.services import auth, validate
from pykine.services.encode import Identity
from pykine.services.errors import etcd_errors
from pykine.transport.grpc import Call
from pykine.wire import rpc_pb2


class LeaseService:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self.engine = engine
        self.identity = identity

    @etcd_errors
    async def LeaseGrant(self, request: rpc_pb2.LeaseGrantRequest, call: Call) -> rpc_pb2.LeaseGrantResponse:
        validate.check_size(request)
        if auth.needs_check(self.engine, call):
            await auth.check_token(self.engine, call)
        result = await self.engine.lease_grant(request)
        return rpc_pb2.LeaseGrantResponse(header=self.identity.header(result.revision), ID=result.id, TTL=result.ttl)

    @etcd_errors
    async def LeaseRevoke(self, request: rpc_pb2.LeaseRevokeRequest, call: Call) -> rpc_pb2.LeaseRevokeResponse:
        if auth.needs_check(self.engine, call):
            await auth.check_lease_revoke(self.engine, call, request.ID)
        result = await self.engine.lease_revoke(request)
        return rpc_pb2.LeaseRevokeResponse(header=self.identity.header(result.revision))

    async def LeaseKeepAlive(
        self, requests: AsyncIterator[Any], call: Call
    ) -> AsyncIterator[rpc_pb2.LeaseKeepAliveResponse]:
        """Each request renews its lease and is answered with the TTL (0: no such lease)."""
        async for request in requests:
            result = await self.engine.lease_keep_alive(request)
            yield rpc_pb2.LeaseKeepAliveResponse(
                header=self.identity.header(result.revision), ID=result.id, TTL=result.ttl
            )

    @etcd_errors
    async def LeaseTimeToLive(
        self, request: rpc_pb2.LeaseTimeToLiveRequest, call: Call
    ) -> rpc_pb2.LeaseTimeToLiveResponse:
        info = await self.engine.lease_time_to_live(request)
        return rpc_pb2.LeaseTimeToLiveResponse(
            header=self.identity.header(info.revision),
            ID=info.id,
            TTL=info.ttl,
            grantedTTL=info.granted_ttl,
            keys=info.keys,
        )

    @etcd_errors
    async def LeaseLeases(self, request: rpc_pb2.LeaseLeasesRequest, call: Call) -> rpc_pb2.LeaseLeasesResponse:
        revision, ids = await self.engine.lease_ids()
        return rpc_pb2.LeaseLeasesResponse(
            header=self.identity.header(revision), leases=[rpc_pb2.LeaseStatus(ID=lease_id) for lease_id in ids]
        )
