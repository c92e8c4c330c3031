"""etcdserverpb.Auth, and how every other service learns who is calling.

The store and its rules are in engine/auth.py; this layer decodes, asks the
store, encodes. Management calls need the root role once auth is enabled.
"""

from __future__ import annotations

import asyncio

from pykine.engine.auth import AuthInfo, AuthState, AuthStore, Permission, hash_password
from pykine.engine.store import Engine
from pykine.services.encode import Identity
from pykine.services.errors import etcd_errors
from pykine.transport.grpc import Call
from pykine.wire import rpc_pb2
from pykine.wire.auth_pb2 import Permission as WirePermission

# The metadata key etcd's clients send their token in.
TOKEN_KEY = "token"


async def caller(auth: AuthStore, call: Call) -> AuthInfo | None:
    """Who is calling (None with auth off: nobody needs to know)."""
    if not auth.enabled:
        return None
    token = call.metadata.get(TOKEN_KEY)
    return await auth.identify(token if isinstance(token, str) else None, call.peer.common_name)


class AuthService:
    def __init__(self, engine: Engine, identity: Identity) -> None:
        self.engine = engine
        self.auth = engine.auth
        self.identity = identity

    async def _header(self) -> rpc_pb2.ResponseHeader:
        """Auth answers carry the key-value store's revision, as etcd's do."""
        return self.identity.header(await self.engine.revision())

    async def _admin(self, call: Call) -> None:
        self.auth.check_admin(await caller(self.auth, call))

    @etcd_errors
    async def AuthEnable(self, request: rpc_pb2.AuthEnableRequest, call: Call) -> rpc_pb2.AuthEnableResponse:
        await self._admin(call)
        await self.auth.change(AuthState.enable)
        return rpc_pb2.AuthEnableResponse(header=await self._header())

    @etcd_errors
    async def AuthDisable(self, request: rpc_pb2.AuthDisableRequest, call: Call) -> rpc_pb2.AuthDisableResponse:
        await self._admin(call)
        await self.auth.change(AuthState.disable)
        return rpc_pb2.AuthDisableResponse(header=await self._header())

    @etcd_errors
    async def AuthStatus(self, request: rpc_pb2.AuthStatusRequest, call: Call) -> rpc_pb2.AuthStatusResponse:
        await self.auth.load()
        return rpc_pb2.AuthStatusResponse(
            header=await self._header(), enabled=self.auth.enabled, authRevision=self.auth.revision
        )

    @etcd_errors
    async def Authenticate(self, request: rpc_pb2.AuthenticateRequest, call: Call) -> rpc_pb2.AuthenticateResponse:
        token = await self.auth.authenticate(request.name, request.password)
        return rpc_pb2.AuthenticateResponse(header=await self._header(), token=token)

    @etcd_errors
    async def UserAdd(self, request: rpc_pb2.AuthUserAddRequest, call: Call) -> rpc_pb2.AuthUserAddResponse:
        await self._admin(call)
        no_password = request.options.no_password
        password = b"" if no_password else await _password_hash(request.password, request.hashedPassword)
        await self.auth.change(lambda state: state.add_user(request.name, password, no_password))
        return rpc_pb2.AuthUserAddResponse(header=await self._header())

    @etcd_errors
    async def UserGet(self, request: rpc_pb2.AuthUserGetRequest, call: Call) -> rpc_pb2.AuthUserGetResponse:
        await self._admin(call)
        await self.auth.load()
        roles = list(self.auth.state.user(request.name).roles)
        return rpc_pb2.AuthUserGetResponse(header=await self._header(), roles=roles)

    @etcd_errors
    async def UserList(self, request: rpc_pb2.AuthUserListRequest, call: Call) -> rpc_pb2.AuthUserListResponse:
        await self._admin(call)
        await self.auth.load()
        return rpc_pb2.AuthUserListResponse(header=await self._header(), users=sorted(self.auth.state.users))

    @etcd_errors
    async def UserDelete(self, request: rpc_pb2.AuthUserDeleteRequest, call: Call) -> rpc_pb2.AuthUserDeleteResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.delete_user(request.name))
        self.auth.tokens.forget_user(request.name)
        return rpc_pb2.AuthUserDeleteResponse(header=await self._header())

    @etcd_errors
    async def UserChangePassword(
        self, request: rpc_pb2.AuthUserChangePasswordRequest, call: Call
    ) -> rpc_pb2.AuthUserChangePasswordResponse:
        await self._admin(call)
        password = await _password_hash(request.password, request.hashedPassword)
        await self.auth.change(lambda state: state.change_password(request.name, password))
        self.auth.tokens.forget_user(request.name)
        return rpc_pb2.AuthUserChangePasswordResponse(header=await self._header())

    @etcd_errors
    async def UserGrantRole(
        self, request: rpc_pb2.AuthUserGrantRoleRequest, call: Call
    ) -> rpc_pb2.AuthUserGrantRoleResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.grant_role(request.user, request.role))
        return rpc_pb2.AuthUserGrantRoleResponse(header=await self._header())

    @etcd_errors
    async def UserRevokeRole(
        self, request: rpc_pb2.AuthUserRevokeRoleRequest, call: Call
    ) -> rpc_pb2.AuthUserRevokeRoleResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.revoke_role(request.name, request.role))
        return rpc_pb2.AuthUserRevokeRoleResponse(header=await self._header())

    @etcd_errors
    async def RoleAdd(self, request: rpc_pb2.AuthRoleAddRequest, call: Call) -> rpc_pb2.AuthRoleAddResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.add_role(request.name))
        return rpc_pb2.AuthRoleAddResponse(header=await self._header())

    @etcd_errors
    async def RoleGet(self, request: rpc_pb2.AuthRoleGetRequest, call: Call) -> rpc_pb2.AuthRoleGetResponse:
        await self._admin(call)
        await self.auth.load()
        perms = [
            WirePermission(permType=perm.kind, key=perm.key, range_end=perm.range_end)
            for perm in self.auth.state.role(request.role)
        ]
        return rpc_pb2.AuthRoleGetResponse(header=await self._header(), perm=perms)

    @etcd_errors
    async def RoleList(self, request: rpc_pb2.AuthRoleListRequest, call: Call) -> rpc_pb2.AuthRoleListResponse:
        await self._admin(call)
        await self.auth.load()
        return rpc_pb2.AuthRoleListResponse(header=await self._header(), roles=sorted(self.auth.state.roles))

    @etcd_errors
    async def RoleDelete(self, request: rpc_pb2.AuthRoleDeleteRequest, call: Call) -> rpc_pb2.AuthRoleDeleteResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.delete_role(request.role))
        return rpc_pb2.AuthRoleDeleteResponse(header=await self._header())

    @etcd_errors
    async def RoleGrantPermission(
        self, request: rpc_pb2.AuthRoleGrantPermissionRequest, call: Call
    ) -> rpc_pb2.AuthRoleGrantPermissionResponse:
        await self._admin(call)
        perm = Permission(request.perm.permType, request.perm.key, request.perm.range_end)
        await self.auth.change(lambda state: state.grant_permission(request.name, perm))
        return rpc_pb2.AuthRoleGrantPermissionResponse(header=await self._header())

    @etcd_errors
    async def RoleRevokePermission(
        self, request: rpc_pb2.AuthRoleRevokePermissionRequest, call: Call
    ) -> rpc_pb2.AuthRoleRevokePermissionResponse:
        await self._admin(call)
        await self.auth.change(lambda state: state.revoke_permission(request.role, request.key, request.range_end))
        return rpc_pb2.AuthRoleRevokePermissionResponse(header=await self._header())


async def _password_hash(password: str, hashed: str) -> bytes:
    """A bcrypt hash: the client's own (etcd 3.5's hashedPassword) or one made off the event loop."""
    if hashed:
        return hashed.encode()
    return await asyncio.to_thread(hash_password, password)


# -- the checks other services make when auth is enabled ------------------------------------


async def _lease_keys_writable(engine: Engine, info: AuthInfo | None, lease_id: int) -> None:
    """etcd's checkLeasePuts: a lease binds keys together, so using or revoking it needs write access to all."""
    if not lease_id or engine.auth.is_root(info):
        return
    for key in await engine.lease_keys(lease_id):
        engine.auth.check_range(info, key, b"", write=True)


async def check_range(engine: Engine, call: Call, key: bytes, range_end: bytes) -> None:
    engine.auth.check_range(await caller(engine.auth, call), key, range_end, write=False)


async def check_put(engine: Engine, call: Call, request: rpc_pb2.PutRequest) -> None:
    info = await caller(engine.auth, call)
    engine.auth.check_range(info, request.key, b"", write=True)
    await _lease_keys_writable(engine, info, request.lease)
    if request.prev_kv:
        engine.auth.check_range(info, request.key, b"", write=False)


async def check_delete(engine: Engine, call: Call, request: rpc_pb2.DeleteRangeRequest) -> None:
    info = await caller(engine.auth, call)
    engine.auth.check_range(info, request.key, request.range_end, write=True)
    if request.prev_kv:
        engine.auth.check_range(info, request.key, request.range_end, write=False)


async def check_txn(engine: Engine, call: Call, request: rpc_pb2.TxnRequest) -> None:
    info = await caller(engine.auth, call)
    await _check_txn(engine, info, request)


async def _check_txn(engine: Engine, info: AuthInfo | None, request: rpc_pb2.TxnRequest) -> None:
    """Every compare reads; every op is checked as its own call would be, nested txns included."""
    auth = engine.auth
    for compare in request.compare:
        auth.check_range(info, compare.key, compare.range_end, write=False)
    for op in (*request.success, *request.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            auth.check_range(info, op.request_range.key, op.request_range.range_end, write=False)
        elif kind == "request_put":
            auth.check_range(info, op.request_put.key, b"", write=True)
            await _lease_keys_writable(engine, info, op.request_put.lease)
        elif kind == "request_delete_range":
            delete = op.request_delete_range
            if delete.prev_kv:
                auth.check_range(info, delete.key, delete.range_end, write=False)
            auth.check_range(info, delete.key, delete.range_end, write=True)
        elif kind == "request_txn":
            await _check_txn(engine, info, op.request_txn)


async def check_lease_revoke(engine: Engine, call: Call, lease_id: int) -> None:
    info = await caller(engine.auth, call)
    engine.auth.checked_user(info)
    await _lease_keys_writable(engine, info, lease_id)


async def check_admin(engine: Engine, call: Call) -> None:
    engine.auth.check_admin(await caller(engine.auth, call))
