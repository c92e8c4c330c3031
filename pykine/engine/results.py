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


OpResult = RangeResult | PutResult | DeleteResult | TxnResult
WriteResult = PutResult | DeleteResult | TxnResult | CompactResult
