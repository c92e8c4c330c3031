"""etcd's error table (codes and exact messages) and the mapping from engine errors.

Clients match these messages byte for byte, so they are part of the contract.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pykine.engine import auth
from pykine.engine.errors import (
    AuthError,
    CompactedError,
    CorruptError,
    EngineError,
    FutureRevisionError,
    KeyNotFoundError,
    KeyTooLongError,
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseTTLTooLargeError,
    NoSpaceError,
    UnavailableError,
)
from pykine.transport.grpc import Call, RpcError
from pykine.transport.grpc import Status as Code

log = logging.getLogger(__name__)


class EtcdError(RpcError):
    """An error etcd defines: a gRPC status code and its exact message."""


ERR_EMPTY_KEY = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: key is not provided")
ERR_KEY_NOT_FOUND = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: key not found")
ERR_VALUE_PROVIDED = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: value is provided")
ERR_LEASE_PROVIDED = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: lease is provided")
ERR_TOO_MANY_OPS = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")
ERR_DUPLICATE_KEY = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request")
ERR_INVALID_SORT_OPTION = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: invalid sort option")
ERR_REQUEST_TOO_LARGE = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: request is too large")
ERR_COMPACTED = EtcdError(Code.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
ERR_FUTURE_REV = EtcdError(Code.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")
ERR_LEASE_NOT_FOUND = EtcdError(Code.NOT_FOUND, "etcdserver: requested lease not found")
ERR_LEASE_EXISTS = EtcdError(Code.FAILED_PRECONDITION, "etcdserver: lease already exists")
ERR_LEASE_TTL_TOO_LARGE = EtcdError(Code.OUT_OF_RANGE, "etcdserver: too large lease TTL")

ERR_NO_SPACE = EtcdError(Code.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
ERR_CORRUPT = EtcdError(Code.DATA_LOSS, "etcdserver: corrupt cluster")
# etcd 3.4 crashes on an alarm action it does not know; pykine refuses it.
ERR_UNKNOWN_ALARM_ACTION = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: unknown alarm action")
ERR_MEMBER_BAD_URLS = EtcdError(Code.INVALID_ARGUMENT, "etcdserver: given member URLs are invalid")
ERR_MEMBER_NOT_FOUND = EtcdError(Code.NOT_FOUND, "etcdserver: member not found")
ERR_MEMBER_NOT_LEARNER = EtcdError(Code.FAILED_PRECONDITION, "etcdserver: can only promote a learner member")
ERR_BAD_LEADER_TRANSFEREE = EtcdError(Code.FAILED_PRECONDITION, "etcdserver: bad leader transferee")
# pykine's own, in etcd's form: its members are the instances serving one datastore, not raft peers.
ERR_MEMBERS_ARE_INSTANCES = EtcdError(
    Code.FAILED_PRECONDITION,
    "etcdserver: pykine members are the instances serving one datastore:"
    " start or stop an instance instead of reconfiguring members",
)

AUTH_ERRORS: dict[str, EtcdError] = {
    auth.NOT_ENABLED: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: authentication is not enabled"),
    auth.AUTH_FAILED: EtcdError(
        Code.INVALID_ARGUMENT, "etcdserver: authentication failed, invalid user ID or password"
    ),
    auth.INVALID_TOKEN: EtcdError(Code.UNAUTHENTICATED, "etcdserver: invalid auth token"),
    auth.OLD_REVISION: EtcdError(Code.INVALID_ARGUMENT, "etcdserver: revision of auth store is old"),
    auth.PERMISSION_DENIED: EtcdError(Code.PERMISSION_DENIED, "etcdserver: permission denied"),
    auth.USER_EMPTY: EtcdError(Code.INVALID_ARGUMENT, "etcdserver: user name is empty"),
    auth.USER_EXISTS: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: user name already exists"),
    auth.USER_NOT_FOUND: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: user name not found"),
    auth.ROLE_EMPTY: EtcdError(Code.INVALID_ARGUMENT, "etcdserver: role name is empty"),
    auth.ROLE_EXISTS: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: role name already exists"),
    auth.ROLE_NOT_FOUND: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: role name not found"),
    auth.ROLE_NOT_GRANTED: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: role is not granted to the user"),
    auth.PERMISSION_NOT_GRANTED: EtcdError(
        Code.FAILED_PRECONDITION, "etcdserver: permission is not granted to the role"
    ),
    auth.ROOT_USER_MISSING: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: root user does not exist"),
    auth.ROOT_ROLE_MISSING: EtcdError(Code.FAILED_PRECONDITION, "etcdserver: root user does not have root role"),
    auth.INVALID_MANAGEMENT: EtcdError(Code.INVALID_ARGUMENT, "etcdserver: invalid auth management"),
    # etcd 3.4 passes this one through unmapped.
    auth.NO_PASSWORD_USER: EtcdError(
        Code.UNKNOWN, "auth: authentication failed, password was given for no password user"
    ),
}
# The auth package's own errors, as etcd 3.4's Maintenance calls and Alarm return them, unmapped.
RAW_AUTH_ERRORS: dict[str, EtcdError] = {
    auth.INVALID_TOKEN: EtcdError(Code.UNKNOWN, "auth: invalid auth token"),
    auth.PERMISSION_DENIED: EtcdError(Code.UNKNOWN, "auth: permission denied"),
    auth.USER_EMPTY: EtcdError(Code.UNKNOWN, "auth: user name is empty"),
    auth.OLD_REVISION: EtcdError(Code.UNKNOWN, "auth: revision in header is old"),
}


def unmapped(error: AuthError) -> EtcdError:
    return RAW_AUTH_ERRORS.get(error.reason) or AUTH_ERRORS[error.reason]


def as_go_error_text(error: EtcdError) -> str:
    """grpc-go's text for a status error, which etcd puts in a refused watch's cancel_reason."""
    code = "".join(part.capitalize() for part in error.status.name.split("_"))
    return f"rpc error: code = {code} desc = {error.message}"


ENGINE_ERRORS: dict[type[EngineError], EtcdError] = {
    CompactedError: ERR_COMPACTED,
    FutureRevisionError: ERR_FUTURE_REV,
    LeaseNotFoundError: ERR_LEASE_NOT_FOUND,
    KeyNotFoundError: ERR_KEY_NOT_FOUND,
    LeaseExistsError: ERR_LEASE_EXISTS,
    LeaseTTLTooLargeError: ERR_LEASE_TTL_TOO_LARGE,
    NoSpaceError: ERR_NO_SPACE,
    CorruptError: ERR_CORRUPT,
}


def to_etcd_error(error: EngineError) -> EtcdError:
    if isinstance(error, UnavailableError):
        return EtcdError(Code.UNAVAILABLE, f"pykine: datastore unavailable: {error}")
    if isinstance(error, KeyTooLongError):
        return EtcdError(Code.INVALID_ARGUMENT, str(error))
    if isinstance(error, AuthError):
        return AUTH_ERRORS[error.reason]
    return ENGINE_ERRORS[type(error)]


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def etcd_errors(method: Handler) -> Handler:
    """Turn engine errors into etcd's statuses; log anything else and answer INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, call: Call) -> Any:
        try:
            return await method(self, request, call)
        except RpcError:
            raise
        except EngineError as error:
            raise to_etcd_error(error) from None
        except Exception as error:  # a bug: answer clearly and keep serving
            log.exception("%s failed", method.__name__)
            raise EtcdError(Code.INTERNAL, f"pykine: internal error: {error}") from None

    return wrapper  # type: ignore[return-value]
