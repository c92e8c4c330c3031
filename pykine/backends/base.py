"""The small interface every datastore implements.

A backend stores revisioned rows and answers reads in consistent snapshots.
It knows nothing of etcd's rules: the engine hands it a `plan`, a pure function
that turns the snapshot read inside the write transaction into a WriteSet, and
the backend stores that WriteSet atomically before it returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pykine.engine.records import (
    HistoryRows,
    KeySpan,
    KnownRows,
    LeaseRow,
    MemberRow,
    RangeQuery,
    RangeRows,
    ReadSet,
    Snapshot,
    WriteSet,
)

T = TypeVar("T")

Plan = Callable[[Snapshot], tuple[WriteSet, T]]
# Stored bytes in, new bytes (or None: keep them) out; see Backend.update_document.
DocumentChange = Callable[[bytes], bytes | None]


class BackendError(Exception):
    """The datastore could not be opened or failed a request."""


DEFAULT_POOL_SIZE = 8
DEFAULT_IDLE_CONNECTIONS = 2


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """How to reach a database server: kine's TLS, connection-pool and identity-provider flags, and the commit poll.

    For dqlite, also where this process's node listens for its peers and how they reach it.
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    skip_verify: bool = False
    # kine's meanings: 0 is the default for each; a negative max idle keeps no idle connections,
    # and a max open below 0 is the default too.
    max_idle_connections: int = 0
    max_open_connections: int = 0
    connection_max_lifetime: float = 0.0
    poll_interval: float = 0.0
    # "aws": a fresh RDS IAM token as the password of every new connection (backends/identity.py).
    identity_provider: str = ""
    peer_bind_address: str = ""
    peer_advertise_address: str = ""

    def pool_bounds(self) -> tuple[int, int]:
        """(connections kept open while idle, most pooled connections open at once)."""
        most = self.max_open_connections if self.max_open_connections > 0 else DEFAULT_POOL_SIZE
        idle = DEFAULT_IDLE_CONNECTIONS if self.max_idle_connections == 0 else max(0, self.max_idle_connections)
        return min(idle, most), most


@dataclass(slots=True)
class StorageStatus:
    db_size: int
    db_size_in_use: int
    # The member that leads, where the datastore has a leader (dqlite); 0: every instance takes writes.
    leader: int = 0


class Backend(ABC):
    """Storage for one pykine datastore."""

    #: A short name for logs and Status.
    name: str
    #: The longest key the datastore can index, if it has a limit.
    max_key_bytes: int | None = None

    @abstractmethod
    async def start(self) -> None:
        """Open connections and create or upgrade the schema."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; pending calls may fail."""

    @abstractmethod
    async def cluster_id(self) -> int:
        """A stable random id chosen when the datastore was created."""

    @abstractmethod
    async def revisions(self) -> tuple[int, int]:
        """(current revision, compact revision) from one snapshot."""

    @abstractmethod
    async def read_range(self, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        """Answer one range read from a single consistent snapshot.

        With `known`, a backend may return, for a row at the current state,
        the bytes `known((key, mod_revision))` gives instead of reading the row
        (the engine passes it only for reads that need no row fields).
        """

    @abstractmethod
    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        """Read several spans from one consistent snapshot (read-only txns)."""

    @abstractmethod
    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        """Every change with first <= revision <= last to a key in span, with its previous row."""

    @abstractmethod
    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        """Run `plan` on a snapshot taken under the write lock, then store its WriteSet.

        Nothing is visible to readers before this returns, and everything is
        durable when it does.
        """

    @abstractmethod
    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        """(current revision, the lease or None, its keys in key order if asked)."""

    @abstractmethod
    async def lease_ids(self) -> tuple[int, list[int]]:
        """(current revision, every lease id)."""

    @abstractmethod
    async def due_leases(self, now: float, limit: int) -> list[int]:
        """Up to `limit` leases whose deadline is at or before `now`, earliest first, from an index."""

    @abstractmethod
    async def renew_leases(self, now: float) -> None:
        """Give every lease its full TTL from `now` (done at start-up, as etcd does)."""

    @abstractmethod
    async def claim_duties(self) -> bool:
        """Whether this process runs the datastore's once-only duties (lease expiry).

        Takes the claim when nobody holds it; called periodically, so a claim
        lost with a process or connection passes to another process.
        """

    @abstractmethod
    async def wait_for_commits(self) -> None:
        """Return when another process may have committed (a notification or a poll interval)."""

    @abstractmethod
    async def heartbeat(self, member: MemberRow, now: float) -> None:
        """Record that `member` is serving, as of `now` (Unix time)."""

    @abstractmethod
    async def members(self, since: float) -> list[MemberRow]:
        """The members heard from at or after `since`, by id."""

    @abstractmethod
    async def leave(self, member_id: int) -> None:
        """Forget a member that stops serving."""

    @abstractmethod
    async def alarms(self) -> list[tuple[int, int]]:
        """The raised alarms as (member id, alarm type), by type then member."""

    @abstractmethod
    async def set_alarm(self, member_id: int, alarm: int, raised: bool) -> None:
        """Raise or clear one member's alarm (idempotent)."""

    @abstractmethod
    async def read_document(self, name: str) -> tuple[int, bytes]:
        """A shared document and its revision ((0, b"") if it was never written)."""

    @abstractmethod
    async def update_document(self, name: str, change: DocumentChange) -> tuple[int, bytes]:
        """Apply `change` to the document under its lock: no other instance changes it meanwhile.

        `change` gets the stored bytes and returns new ones (stored with the
        revision incremented) or None (nothing stored); what it raises
        propagates and nothing is stored. Returns the revision and bytes now.
        """

    @abstractmethod
    async def compact_step(self, target: int, max_revisions: int) -> int:
        """Delete history made obsolete by compaction, for at most `max_revisions`
        revisions, in one short transaction. Returns the revision done through."""

    @abstractmethod
    async def compaction_progress(self) -> tuple[int, int]:
        """(compact revision requested, revision physically compacted through)."""

    def member_id(self) -> int | None:
        """The member id this process serves as, where the datastore names its members (dqlite's node id)."""
        return None

    async def move_leader(self, member_id: int) -> bool:
        """Make `member_id` the datastore's leader, where it has one (dqlite); False: every instance leads."""
        return False

    async def remove_member(self, member_id: int) -> bool:
        """Take a member out of the datastore's own cluster; False where members are just the instances serving."""
        return False

    @abstractmethod
    async def status(self) -> StorageStatus:
        """Sizes reported by Maintenance.Status."""

    @abstractmethod
    async def defragment(self) -> None:
        """Return free space to the file system, where the datastore can."""
