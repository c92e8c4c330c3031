"""The client's errors: one type per failure a caller handles differently.

A call that etcd (or pykine) answered with a gRPC status raises `EtcdError`
with that code and message; the two a storage client must tell apart,
unavailable and compacted, have their own subclasses. The compare-and-swap
outcomes are not transport errors and stand on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pykine.client.storage import Value

# gRPC status codes by number, for messages.
CODE_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
UNKNOWN = 2
UNAVAILABLE = 14
OUT_OF_RANGE = 11
# etcd's text for a read or watch below the compacted revision (ErrGRPCCompacted).
COMPACTED_MESSAGE = "etcdserver: mvcc: required revision has been compacted"


class ClientError(Exception):
    """Anything the client raises."""


class ConfigError(ClientError):
    """Bad endpoints or TLS files, found before any call is made."""


class EtcdError(ClientError):
    """A call ended with a gRPC status: `code` (a number) and etcd's `message`."""

    def __init__(self, code: int, message: str, endpoint: str = "") -> None:
        where = f" from {endpoint}" if endpoint else ""
        super().__init__(f"{CODE_NAMES.get(code, code)}{where}: {message}")
        self.code = code
        self.message = message
        self.endpoint = endpoint


class UnavailableError(EtcdError):
    """No endpoint could serve the call (down, unreachable, no leader); it may not have been applied."""


class CompactedError(EtcdError):
    """The revision asked for is older than the compacted revision; `compact_revision` when etcd says it."""

    def __init__(self, code: int, message: str, endpoint: str = "", compact_revision: int = 0) -> None:
        super().__init__(code, message, endpoint)
        self.compact_revision = compact_revision


class AlreadyExistsError(ClientError):
    """create() found the key already there; `current` is what it holds."""

    def __init__(self, key: bytes, current: Value | None = None) -> None:
        at = f" (at revision {current.modified})" if current is not None else ""
        super().__init__(f"key {key!r} already exists{at}")
        self.key = key
        self.current = current


class NotFoundError(ClientError):
    """get() found no such key."""

    def __init__(self, key: bytes) -> None:
        super().__init__(f"key {key!r} not found")
        self.key = key


class RevisionMismatchError(ClientError):
    """update() or delete() was given a revision the key no longer has; `current` is the key now (None: gone)."""

    def __init__(self, key: bytes, expected: int, current: Value | None) -> None:
        now = f"is at revision {current.modified}" if current is not None else "does not exist"
        super().__init__(f"key {key!r} was expected at revision {expected} but {now}")
        self.key = key
        self.expected = expected
        self.current = current


def status_error(code: int, message: str, endpoint: str = "") -> EtcdError:
    """The typed error for a gRPC status."""
    if code == UNAVAILABLE:
        return UnavailableError(code, message, endpoint)
    if code == OUT_OF_RANGE and message == COMPACTED_MESSAGE:
        return CompactedError(code, message, endpoint)
    return EtcdError(code, message, endpoint)
