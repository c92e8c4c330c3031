"""Failures the engine reports; the services map each to etcd's gRPC error."""


class EngineError(Exception):
    """A request failed for a reason etcd defines."""


class CompactedError(EngineError):
    """The requested revision has been compacted."""


class FutureRevisionError(EngineError):
    """The requested revision is newer than the store's."""


class LeaseNotFoundError(EngineError):
    """A put named a lease that does not exist."""


class KeyNotFoundError(EngineError):
    """ignore_value or ignore_lease on a key that does not exist."""


class KeyTooLongError(EngineError):
    """A put's key is longer than the datastore can index."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"pykine: key is longer than this datastore allows ({limit} bytes)")


class UnavailableError(EngineError):
    """The datastore failed; nothing of the request was applied."""


class LeaseExistsError(EngineError):
    """A grant named a lease id that is taken."""


class LeaseTTLTooLargeError(EngineError):
    """A grant asked for more than etcd's maximum TTL."""


class NoSpaceError(EngineError):
    """A write while the NOSPACE alarm is raised, or one that would pass the space quota."""


class CorruptError(EngineError):
    """A write while the CORRUPT alarm is raised."""


class AuthError(EngineError):
    """An auth failure etcd defines; `reason` names which (engine/auth.py)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
