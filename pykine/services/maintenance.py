"""etcdserverpb.Maintenance and etcdserverpb.Cluster: the instances sharing a datastore as members."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from pykine.engine.store import Engine
from pykine.services import auth
from pykine.services.encode import Identity
from pykine.services.errors import (
    ERR_BAD_LEADER_TRANSFEREE,
    ERR_MEMBER_BAD_URLS,
    ERR_MEMBER_NOT_FOUND,
    ERR_MEMBER_NOT_LEARNER,
    ERR_MEMBERS_ARE_INSTANCES,
    ERR_UNKNOWN_ALARM_ACTION,
    etcd_errors,
)
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
            leader=sizes.leader or self.identity.member_id,
            raftIndex=revision,
            raftTerm=self.identity.raft_term,
            raftAppliedIndex=revision,
        )

    @etcd_errors
    async def Alarm(self, request: rpc_pb2.AlarmRequest, call: Call) -> rpc_pb2.AlarmResponse:
        """etcd's alarm store, shared by the instances of the datastore (engine/alarms.py).

        As in etcd 3.4: GET lists every alarm, or those of one type; ACTIVATE
        answers the alarm (whether or not it was raised already); DEACTIVATE
        answers it only if it was raised. No member id is checked, NONE is
        stored like any type, and the response carries no header.
        """
        if auth.needs_check(self.engine, call):
            await auth.check_unmapped(self.engine, call, admin=False)
        alarms = self.engine.alarms
        wanted = (request.memberID, request.alarm)
        if request.action == rpc_pb2.AlarmRequest.GET:
            found = [raised for raised in await alarms.current() if request.alarm in (0, raised[1])]
        elif request.action == rpc_pb2.AlarmRequest.ACTIVATE:
            await alarms.set(*wanted, raised=True)
            found = [wanted]
        elif request.action == rpc_pb2.AlarmRequest.DEACTIVATE:
            found = [wanted] if wanted in await alarms.current() else []
            if found:
                await alarms.set(*wanted, raised=False)
        else:
            raise ERR_UNKNOWN_ALARM_ACTION
        return rpc_pb2.AlarmResponse(
            alarms=[rpc_pb2.AlarmMember(memberID=member, alarm=alarm) for member, alarm in found]
        )

    @etcd_errors
    async def Hash(self, request: rpc_pb2.HashRequest, call: Call) -> rpc_pb2.HashResponse:
        """A digest of the live keys (engine/hashing.py); not etcd's bbolt-page hash."""
        if auth.needs_check(self.engine, call):
            await auth.check_unmapped(self.engine, call, admin=True)
        result = await self.engine.hash_state()
        return rpc_pb2.HashResponse(header=self.identity.header(result.current_revision), hash=result.hash)

    @etcd_errors
    async def HashKV(self, request: rpc_pb2.HashKVRequest, call: Call) -> rpc_pb2.HashKVResponse:
        """A digest of every key revision up to `revision` above the compact revision (engine/hashing.py)."""
        if auth.needs_check(self.engine, call):
            await auth.check_unmapped(self.engine, call, admin=True)
        result = await self.engine.hash_kv(request.revision)
        return rpc_pb2.HashKVResponse(
            header=self.identity.header(result.current_revision),
            hash=result.hash,
            compact_revision=result.compact_revision,
        )

    @etcd_errors
    async def MoveLeader(self, request: rpc_pb2.MoveLeaderRequest, call: Call) -> rpc_pb2.MoveLeaderResponse:
        """On dqlite, Raft leadership moves to the target's node. Elsewhere every instance already
        serves writes: moving to any member is done at once, as etcd does for its own leader. A
        target that is not a member is refused as etcd refuses it."""
        if request.targetID not in {member.id for member in await self.engine.members()}:
            raise ERR_BAD_LEADER_TRANSFEREE
        await self.engine.move_leader(request.targetID)
        return rpc_pb2.MoveLeaderResponse()

    @etcd_errors
    async def Defragment(self, request: rpc_pb2.DefragmentRequest, call: Call) -> rpc_pb2.DefragmentResponse:
        """VACUUM the SQLite file; like etcd 3.4, the answer carries no header."""
        if auth.needs_check(self.engine, call):
            await auth.check_unmapped(self.engine, call, admin=True)
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

    # Membership changes: the checks etcd makes first, then pykine's reason it makes no change.

    @etcd_errors
    async def MemberAdd(self, request: rpc_pb2.MemberAddRequest, call: Call) -> rpc_pb2.MemberAddResponse:
        if not valid_urls(request.peerURLs):
            raise ERR_MEMBER_BAD_URLS
        raise ERR_MEMBERS_ARE_INSTANCES

    @etcd_errors
    async def MemberRemove(self, request: rpc_pb2.MemberRemoveRequest, call: Call) -> rpc_pb2.MemberRemoveResponse:
        """On dqlite, members are its nodes and leave its Raft cluster; elsewhere they are just instances."""
        await self._member(request.ID)
        if not await self.engine.remove_member(request.ID):
            raise ERR_MEMBERS_ARE_INSTANCES
        members = [member for member in await self.engine.members() if member.id != request.ID]
        return rpc_pb2.MemberRemoveResponse(
            header=self.identity.header(0),
            members=[rpc_pb2.Member(ID=m.id, name=m.name, clientURLs=[m.client_url]) for m in members],
        )

    @etcd_errors
    async def MemberUpdate(self, request: rpc_pb2.MemberUpdateRequest, call: Call) -> rpc_pb2.MemberUpdateResponse:
        await self._member(request.ID)
        raise ERR_MEMBERS_ARE_INSTANCES

    @etcd_errors
    async def MemberPromote(self, request: rpc_pb2.MemberPromoteRequest, call: Call) -> rpc_pb2.MemberPromoteResponse:
        """No pykine member is a learner, so every member gets etcd's answer for a voting member."""
        await self._member(request.ID)
        raise ERR_MEMBER_NOT_LEARNER

    async def _member(self, member_id: int) -> None:
        if member_id not in {member.id for member in await self.engine.members()}:
            raise ERR_MEMBER_NOT_FOUND


def valid_urls(urls: Sequence[str]) -> bool:
    """etcd's test for member URLs: at least one, each scheme://host:port with no path."""
    if not urls:
        return False
    for url in urls:
        parts = urlsplit(url)
        # Go's net.SplitHostPort, which etcd applies, wants a port separator and nothing more.
        if parts.scheme not in ("http", "https", "unix", "unixs") or parts.path or ":" not in parts.netloc:
            return False
    return True
