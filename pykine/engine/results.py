"""What the engine returns for each request; the services encode these."""

from __future__ import annotations

from dataclasses import dataclass

from pykine.engine.records import KeyValueRow


@dataclass(slots=True)
class RangeResult:
    revision: int
    kvs: list[KeyValueRow]
    count: int
    more: bool


@dataclass(slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValueRow | None


@dataclass(slots=True)
class DeleteResult:
    revision: int
    deleted: int
    prev_kvs: list[KeyValueRow]


@dataclass(slots=True)
class TxnResult:
    """revision is None for a nested txn: etcd sends those an empty header."""

    revision: int | None
    succeeded: bool
    responses: list[OpResult]


@dataclass(slots=True)
class CompactResult:
    revision: int


@dataclass(slots=True)
class LeaseResult:
    """Grant, revoke and keep-alive answers; ttl is 0 for a keep-alive of an unknown lease."""

    revision: int
    id: int
    ttl: int


@dataclass(slots=True)
class LeaseInfo:
    """TimeToLive: ttl is -1 for an unknown lease, as in etcd."""

    revision: int
    id: int
    ttl: int
    granted_ttl: int
    keys: list[bytes]


OpResult = RangeResult | PutResult | DeleteResult | TxnResult
WriteResult = PutResult | DeleteResult | TxnResult | CompactResult | LeaseResult
