"""etcdserverpb.Maintenance and etcdserverpb.Cluster: the instances sharing a datastore as members, no alarms."""

from __future__ import annotations

from pykine.engine.store import Engine
from pykine.services.encode import Identity
from pykine.services.errors import etcd_errors
from pykine.transport.grpc import Call
from pykine.wire import rpc_pb2


class MaintenanceService:
    def __init__(self, engine: Engine, identity: Identity, version: str) -> None:
        self.engine = engine
        self.identity = identity
        self.version = version

    @etcd_errors
    async def Status(self, request: rpc_pb2.StatusRequest, call: Call) -> rpc_pb2.StatusResponse:
        revision = await self.engine.revision()
        sizes = await self.engine.status()
        return rpc_pb2.StatusResponse(
            header=self.identity.header(revision),
            version=self.version,
            dbSize=sizes.db_size,
            dbSizeInUse=sizes.db_size_in_use,
            leader=self.identity.member_id,
            raftIndex=revision,
            raftTerm=self.identity.raft_term,
            raftAppliedIndex=revision,
        )

    @etcd_errors
    async def Alarm(self, request: rpc_pb2.AlarmRequest, call: Call) -> rpc_pb2.AlarmResponse:
        """pykine raises no alarms (no space quota, no corruption check), so the list is empty.

        etcd 3.4 sends this response without a header; so does pykine.
        """
        return rpc_pb2.AlarmResponse()

    @etcd_errors
    async def Defragment(self, request: rpc_pb2.DefragmentRequest, call: Call) -> rpc_pb2.DefragmentResponse:
        """VACUUM the SQLite file; like etcd 3.4, the answer carries no header."""
        await self.engine.defragment()
        return rpc_pb2.DefragmentResponse()


class ClusterService:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self.engine = engine
        self.identity = identity

    @etcd_errors
    async def MemberList(self, request: rpc_pb2.MemberListRequest, call: Call) -> rpc_pb2.MemberListResponse:
        """Every instance serving the datastore, as etcd lists its members (by id).

        Cluster headers in etcd 3.4 carry ids and term but no revision.
        """
        members = [
            rpc_pb2.Member(ID=member.id, name=member.name, clientURLs=[member.client_url])
            for member in await self.engine.members()
        ]
        return rpc_pb2.MemberListResponse(header=self.identity.header(0), members=members)
