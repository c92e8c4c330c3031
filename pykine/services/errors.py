"""etcd's error table (codes and exact messages) and the mapping from engine errors.

Clients match these messages byte for byte, so they are part of the contract.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from pykine.engine.errors import (
    CompactedError,
    EngineError,
    FutureRevisionError,
    KeyNotFoundError,
    KeyTooLongError,
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseTTLTooLargeError,
    UnavailableError,
)
from pykine.services.handlers import MalformedRequest

log = logging.getLogger(__name__)

Code = grpc.StatusCode


class EtcdError(Exception):
    """An error etcd defines: a gRPC status code and its exact message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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

ENGINE_ERRORS: dict[type[EngineError], EtcdError] = {
    CompactedError: ERR_COMPACTED,
    FutureRevisionError: ERR_FUTURE_REV,
    LeaseNotFoundError: ERR_LEASE_NOT_FOUND,
    KeyNotFoundError: ERR_KEY_NOT_FOUND,
    LeaseExistsError: ERR_LEASE_EXISTS,
    LeaseTTLTooLargeError: ERR_LEASE_TTL_TOO_LARGE,
}


def to_etcd_error(error: EngineError) -> EtcdError:
    if isinstance(error, UnavailableError):
        return EtcdError(Code.UNAVAILABLE, f"pykine: datastore unavailable: {error}")
    if isinstance(error, KeyTooLongError):
        return EtcdError(Code.INVALID_ARGUMENT, str(error))
    return ENGINE_ERRORS[type(error)]


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def etcd_errors(method: Handler) -> Handler:
    """Turn etcd and engine errors into gRPC statuses; log anything else."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await context.abort(Code.INTERNAL, f"grpc: error unmarshalling request: {request.reason}")
        try:
            return await method(self, request, context)
        except EtcdError as error:
            await context.abort(error.code, error.message)
        except EngineError as error:
            etcd = to_etcd_error(error)
            await context.abort(etcd.code, etcd.message)
        except Exception as error:  # a bug: answer clearly and keep serving
            if isinstance(error, grpc.aio.AbortError):
                raise
            log.exception("%s failed", method.__name__)
            await context.abort(Code.INTERNAL, f"pykine: internal error: {error}")

    return wrapper  # type: ignore[return-value]
