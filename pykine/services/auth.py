"""etcdserverpb.Auth, and how every other service learns who is calling.

The store and its rules are in engine/auth.py; this layer decodes, asks the
store, encodes. Management calls need the root role once auth is enabled.
"""

from __future__ import annotations

import asyncio

import bcrypt

from pykine.engine.auth import AuthInfo, AuthState, AuthStore, Permission, hash_password
from pykine.engine.errors import AuthError
from pykine.engine.store import Engine
from pykine.services.encode import Identity
from pykine.services.errors import AUTH_ERRORS, EtcdError, as_go_error_text, etcd_errors, unmapped
from pykine.transport.grpc import Call, Status
from pykine.wire import rpc_pb2
from pykine.wire.auth_pb2 import Permission as WirePermission

# A hashedPassword that is no bcrypt hash would fail every later login.
ERR_BAD_HASHED_PASSWORD = EtcdError(Status.INVALID_ARGUMENT, "etcdserver: hashed password is not a bcrypt hash")
# The metadata keys etcd takes a token from: its gRPC clients' and its gateway's.
TOKEN_HEADERS = (b"token", b"authorization")


async def caller(auth: AuthStore, call: Call) -> AuthInfo | None:
    """Who is calling: a token sent is always checked; else the client certificate's name."""
    return await auth.identify(call.header(*TOKEN_HEADERS), call.peer.common_name)


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
        await self.auth.tokens.forget(None)  # as etcd: no token outlives disabling
        return rpc_pb2.AuthDisableResponse(header=await self._header())

    @etcd_errors
    async def AuthStatus(self, request: rpc_pb2.AuthStatusRequest, call: Call) -> rpc_pb2.AuthStatusResponse:
        await self.auth.load()
        return rpc_pb2.AuthStatusResponse(
            header=await self._header(), enabled=self.auth.enabled, authRevision=self.auth.revision
        )

    @etcd_errors
    async def Authenticate(self, request: rpc_pb2.AuthenticateRequest, call: Call) -> rpc_pb2.AuthenticateResponse:
        if self.auth.enabled:  # disabled, etcd says so first, whatever token came along
            await caller(self.auth, call)
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
        info = await caller(self.auth, call)
        if not (info is not None and info.user == request.name and info.user in self.auth.state.users):
            self.auth.check_admin(info)  # anyone may read their own user
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
        await self.auth.tokens.forget(request.name)
        return rpc_pb2.AuthUserDeleteResponse(header=await self._header())

    @etcd_errors
    async def UserChangePassword(
        self, request: rpc_pb2.AuthUserChangePasswordRequest, call: Call
    ) -> rpc_pb2.AuthUserChangePasswordResponse:
        await self._admin(call)
        password = await _password_hash(request.password, request.hashedPassword)
        await self.auth.change(lambda state: state.change_password(request.name, password))
        await self.auth.tokens.forget(request.name)
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
        info = await caller(self.auth, call)
        user = self.auth.state.users.get(info.user) if info is not None else None
        if not (user is not None and request.role in user.roles):
            self.auth.check_admin(info)  # anyone may read the roles they have
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
        try:
            await asyncio.to_thread(bcrypt.checkpw, b"", hashed.encode())
        except ValueError:
            raise ERR_BAD_HASHED_PASSWORD from None
        return hashed.encode()
    return await asyncio.to_thread(hash_password, password)


# -- the checks other services make -------------------------------------------------------
#
# Each is called when auth is enabled or the call carries a token (`needs_check`): etcd checks a
# token whenever one is sent, even with auth disabled.


def needs_check(engine: Engine, call: Call) -> bool:
    return engine.auth.enabled or call.header(*TOKEN_HEADERS) is not None


async def _lease_keys_writable(engine: Engine, info: AuthInfo | None, lease_id: int) -> None:
    """etcd's checkLeasePuts: a lease binds keys together, so using or revoking it needs write access to all."""
    if not lease_id or not engine.auth.enabled or engine.auth.is_root(info):
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
    """Every compare reads; every op is checked as its own call would be.

    Unlike etcd 3.4, which checks no op of a nested txn (a hole later releases
    closed), nested txns are checked like the outer one.
    """
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


async def check_token(engine: Engine, call: Call) -> None:
    """Only a token that was sent is checked (Compact, LeaseGrant: no permission is needed)."""
    await caller(engine.auth, call)


async def check_lease_revoke(engine: Engine, call: Call, lease_id: int) -> None:
    """WRITE on every key of the lease; a lease with no keys needs nothing, not even a token."""
    await _lease_keys_writable(engine, await caller(engine.auth, call), lease_id)


async def check_unmapped(engine: Engine, call: Call, admin: bool) -> None:
    """Hash, HashKV, Defragment (root) and Alarm (a valid token, if one is sent): with the auth
    package's own errors, as etcd 3.4 returns them."""
    try:
        info = await caller(engine.auth, call)
        if admin:
            engine.auth.check_admin(info)
    except AuthError as error:
        raise unmapped(error) from None


async def watch_refusal(engine: Engine, call: Call, key: bytes, range_end: bytes) -> str | None:
    """Why a watch may not be created, as the cancel_reason etcd sends (None: it may)."""
    try:
        await check_range(engine, call, key, range_end)
    except AuthError as error:
        return as_go_error_text(AUTH_ERRORS[error.reason])
    return None
