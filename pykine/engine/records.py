"""Plain records shared by the engine and the backends.

Rows travel as NamedTuples so backends can build them straight from database
tuples and services can encode them without intermediate copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class KeyValueRow(NamedTuple):
    """One key as etcd reports it (column order matches the SQL selects)."""

    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int


# What a caller already holds, encoded, of a (key, mod_revision) pair (None: nothing).
# A key's state at a mod revision never changes, so such an encoding never goes stale.
KnownRows = Callable[[tuple[bytes, int]], "bytes | None"]


class KeySpan(NamedTuple):
    """A half-open key interval [start, end); end None means no upper bound."""

    start: bytes
    end: bytes | None

    @classmethod
    def from_request(cls, key: bytes, range_end: bytes) -> KeySpan:
        """Apply etcd's range_end rules: empty is one key, "\\0" is open-ended."""
        if not range_end:
            return cls(key, key + b"\x00")
        if range_end == b"\x00":
            return cls(key, None)
        return cls(key, range_end)

    @property
    def single_key(self) -> bool:
        return self.end is not None and self.end == self.start + b"\x00"

    @property
    def empty(self) -> bool:
        return self.end is not None and self.end <= self.start

    def contains(self, key: bytes) -> bool:
        return key >= self.start and (self.end is None or key < self.end)


class Change(NamedTuple):
    """One key changed by a committed revision (a history row)."""

    kv: KeyValueRow
    sub: int
    deleted: bool
    prev: KeyValueRow | None


@dataclass(slots=True)
class SortSpec:
    """ORDER BY a KeyValueRow field; ties always fall back to key order."""

    field: str
    descending: bool


@dataclass(slots=True)
class RangeQuery:
    """A read the backend answers in one consistent snapshot.

    `limit` counts rows to return (0: all). Filters are inclusive bounds
    (0: none). `need_count` asks for the exact number of live keys in the
    span at the revision, before filters and limit.
    """

    span: KeySpan
    revision: int = 0
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False
    need_count: bool = False
    sort: SortSpec | None = None
    min_mod_revision: int = 0
    max_mod_revision: int = 0
    min_create_revision: int = 0
    max_create_revision: int = 0

    @property
    def whole_rows_in_key_order(self) -> bool:
        """Rows as stored, in key order: what a caller's encoded rows (KnownRows) can stand in for."""
        return self.sort is None and not (self.keys_only or self.count_only or self.filtered)

    @property
    def filtered(self) -> bool:
        return bool(
            self.min_mod_revision or self.max_mod_revision or self.min_create_revision or self.max_create_revision
        )


@dataclass(slots=True)
class RangeRows:
    """A backend's answer to a RangeQuery.

    When the query's revision lies outside [compact_revision, revision] the
    backend returns no rows; the engine turns that into the etcd error.
    """

    revision: int
    compact_revision: int
    # A row is bytes where the caller said it already holds that (key, mod_revision) encoded.
    rows: list[KeyValueRow] | list[KeyValueRow | bytes]
    count: int


class SnapshotRead(NamedTuple):
    """A span a write batch (or read-only txn) needs, at a revision (0 = latest)."""

    span: KeySpan
    revision: int


class MemberRow(NamedTuple):
    """A pykine instance serving the datastore, as MemberList shows it."""

    id: int
    name: str
    client_url: str


class LeaseRow(NamedTuple):
    """A lease: its granted TTL in seconds and its deadline (Unix time)."""

    id: int
    ttl: int
    expires_at: float


@dataclass(slots=True)
class ReadSet:
    """Everything a batch may read, collected before its transaction starts."""

    spans: set[SnapshotRead] = field(default_factory=set)
    # Lease rows to load (to check they exist, renew or revoke them).
    leases: set[int] = field(default_factory=set)
    # Leases whose attached keys must be loaded (revoke and expiry).
    lease_keys: set[int] = field(default_factory=set)
    # Reads history at a fixed revision.
    historical: bool = False

    def update(self, other: ReadSet) -> None:
        self.spans |= other.spans
        self.leases |= other.leases
        self.lease_keys |= other.lease_keys
        self.historical |= other.historical


@dataclass(slots=True)
class Snapshot:
    """The state a batch is evaluated against, read inside its transaction."""

    revision: int
    compact_revision: int
    latest: list[KeyValueRow]
    history: dict[SnapshotRead, list[KeyValueRow]] = field(default_factory=dict)
    leases: dict[int, LeaseRow] = field(default_factory=dict)


@dataclass(slots=True)
class WriteSet:
    """What a batch changes: the backend stores it atomically or not at all."""

    revision: int
    compact_revision: int
    changes: list[Change]
    lease_puts: list[LeaseRow] = field(default_factory=list)
    lease_deletes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class HistoryRows:
    """Changes in a revision window, in commit order, read in one snapshot.

    When the window starts below the compact revision the backend returns no
    changes: those events are gone.
    """

    compact_revision: int
    changes: list[Change]
