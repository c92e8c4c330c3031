"""What the database-server backends (PostgreSQL, MySQL/MariaDB) share.

Several pykine instances may serve one database, so everything here is
written for that:

- **Commit order.** A write batch first locks the revision counter's row
  (SELECT ... FOR UPDATE) and holds it until it commits. The next batch, from
  any instance, can read the counter only after that commit, and both servers
  make a commit visible before they release its locks; so commits become
  visible in revision order and no watcher can see revision N+1 before N.
  Revisions need no gap-filling rows.
- **Reads** of more than one statement run in one read-only snapshot
  transaction (REPEATABLE READ), so a response's header revision is the one
  its rows were read at.
- **Duties done once.** Lease expiry runs only in the instance holding the
  datastore's duty lock (a session-level lock on a connection of its own);
  when that instance goes away, the server drops the lock and another takes it.

A subclass supplies connections (`_read_session`, `_write_session`,
`_single`), the duty lock, the schema lock, notifications of other instances'
commits and the maintenance calls its server has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, Protocol, TypeVar

from pykine.backends.base import Backend, BackendError, ConnectionOptions, DocumentChange, Plan
from pykine.backends.sqltext import (
    INITIAL_META,
    SCHEMA_VERSION,
    CountCache,
    Statements,
    assemble_snapshot,
    history_change,
    key_chunks,
    known_rows,
    member_params,
    member_rows,
    place_rows,
    range_rows,
    snapshot_queries,
    upgrade_statements,
    write_statements,
)
from pykine.engine.records import (
    HistoryRows,
    KeySpan,
    KeyValueRow,
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
R = TypeVar("R")
log = logging.getLogger(__name__)

# A batch that lost a deadlock or serialization race is rolled back; its plan is pure, so it runs again.
COMMIT_ATTEMPTS = 3


class Session(Protocol):
    """One connection inside one transaction (or one autocommit statement)."""

    async def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None: ...

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """Run each statement for each of its rows, in order (pipelined where the driver can)."""


class RemoteSQLBackend(Backend):
    SQL: ClassVar[Statements]
    # How often to look for other instances' commits when the server cannot tell us.
    default_poll_interval: ClassVar[float]

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.poll_interval = options.poll_interval or self.default_poll_interval
        # Write batches, compaction steps and lease renewal take turns, one transaction at a time.
        self._writer_lock = asyncio.Lock()
        self._commits = asyncio.Event()
        # Tells this instance's own notifications from other instances'.
        self.instance_id = f"{random.getrandbits(64):016x}"
        self._duty_connection: Any = None
        self._counts = CountCache()

    # -- what a server backend supplies -------------------------------------------------

    @abstractmethod
    def _read_session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A read-only transaction on one consistent snapshot."""

    @abstractmethod
    def _write_session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A read-write transaction; committed when the block ends without an exception."""

    @abstractmethod
    def _single(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A connection for single autocommit statements (each statement is its own snapshot)."""

    @abstractmethod
    def _schema_session(self) -> contextlib.AbstractAsyncContextManager[Session]:
        """A connection holding the schema lock, so instances starting together take turns."""

    @abstractmethod
    def _is_retryable(self, exc: BaseException) -> bool:
        """Whether a failed transaction lost a deadlock or serialization race (and was rolled back)."""

    @abstractmethod
    async def _connect_duty(self) -> Any:
        """A dedicated connection for the duty lock."""

    @abstractmethod
    async def _try_duty_lock(self, connection: Any) -> bool:
        """Take the duty lock on `connection` without waiting; True if now held."""

    @abstractmethod
    async def _ping(self, connection: Any) -> None:
        """Raise if `connection` no longer works (its locks are then gone)."""

    @abstractmethod
    async def _close_connection(self, connection: Any) -> None: ...

    def _commit_notice(self, revision: int) -> list[tuple[str, list[Any]]]:
        """Statements that tell other instances about a commit, run inside it (where the server can)."""
        return []

    # -- schema --------------------------------------------------------------------------

    async def _init_schema(self) -> None:
        async with self._schema_session() as session:
            for statement in self.SQL.schema:
                await session.execute(statement)
            found = await session.rows(self.SQL.meta, ("schema_version",))
            if not found:
                meta = dict(INITIAL_META, cluster_id=random.getrandbits(63) or 1)
                await session.execute_all([(self.SQL.insert_meta, list(meta.items()))])
                return
            stored = int(found[0][0])
            if stored > SCHEMA_VERSION:
                raise BackendError(f"schema version {stored} is newer than this pykine supports ({SCHEMA_VERSION})")
            for statement, params in upgrade_statements(self.SQL, stored):
                await session.execute(statement, params)

    # -- reads ---------------------------------------------------------------------------

    async def _revisions(self, session: Session, statement: str | None = None) -> tuple[int, int]:
        revision, compact = (await session.rows(statement or self.SQL.revisions))[0]
        return int(revision), int(compact)

    async def _meta(self, session: Session, name: str) -> int:
        return int((await session.rows(self.SQL.meta, (name,)))[0][0])

    async def cluster_id(self) -> int:
        async with self._single() as session:
            return await self._meta(session, "cluster_id")

    async def revisions(self) -> tuple[int, int]:
        async with self._single() as session:
            return await self._revisions(session)

    async def read_range(self, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        if query.span.single_key and not (query.revision or query.count_only or query.filtered):
            # Kubernetes' Get: one statement, so one snapshot, and no transaction to open.
            async with self._single() as session:
                row = (await session.rows(self.SQL.get(query.keys_only), (query.span.start,)))[0]
            rows = [KeyValueRow._make(row[2:])] if row[2] is not None else []
            return RangeRows(int(row[0]), int(row[1]), rows, len(rows))
        async with self._read_session() as session:
            return await self._range(session, query, known)

    async def _range(self, session: Session, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        revision, compact = await self._revisions(session)
        if query.revision > revision or 0 < query.revision < compact or query.span.empty:
            return RangeRows(revision, compact, [], 0)
        count_sql, rows_sql, count_params, rows_params = self.SQL.range(query, revision)
        count = None
        if count_sql:
            count = self._counts.get(count_sql, count_params, revision)
            if count is None:
                found = int((await session.rows(count_sql, count_params))[0][0])
                count = self._counts.put(count_sql, count_params, revision, found)
        if query.count_only:
            return RangeRows(revision, compact, [], count or 0)
        current = not (query.revision and query.revision < revision)
        if known is not None and current and query.whole_rows_in_key_order:
            rows = await self._rows_or_known(session, query, known)
            return RangeRows(revision, compact, rows, count if count is not None else len(rows))
        return range_rows(query, revision, compact, count, await session.rows(rows_sql, rows_params))

    async def _rows_or_known(self, session: Session, query: RangeQuery, known: KnownRows) -> list[KeyValueRow | bytes]:
        """As SQLiteBackend._rows_or_known: the pairs from the kv_keys index, whole rows only where unknown."""
        sql, params = self.SQL.versions(query)
        versions = [(bytes(key), int(mod_revision)) for key, mod_revision in await session.rows(sql, params)]
        rows, missing = known_rows(versions, known)
        for chunk in key_chunks(missing, self.SQL.dialect.in_chunk):
            place_rows(rows, missing, await session.rows(self.SQL.latest_keys(len(chunk)), chunk))
        return rows

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        async with self._read_session() as session:
            return await self._snapshot(session, reads)

    async def _snapshot(self, session: Session, reads: ReadSet, counters: str | None = None) -> Snapshot:
        revision, compact = await self._revisions(session, counters)
        queries = snapshot_queries(self.SQL, reads, revision, compact)
        return assemble_snapshot(revision, compact, [(q, await session.rows(q.statement, q.params)) for q in queries])

    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        async with self._read_session() as session:
            _, compact = await self._revisions(session)
            if first < compact:
                return HistoryRows(compact, [])
            statement, params = self.SQL.history(span)
            rows = await session.rows(statement, [first, last, *params])
            return HistoryRows(compact, [history_change(row) for row in rows])

    # -- writes ----------------------------------------------------------------------------

    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        """Lock the revision row first: commits then follow revision order across instances."""

        async def attempt() -> tuple[WriteSet, T]:
            async with self._writer_lock, self._write_session() as session:
                snapshot = await self._snapshot(session, reads, self.SQL.lock_revisions)
                write_set, outcome = plan(snapshot)
                statements = write_statements(self.SQL, snapshot, write_set)
                if write_set.revision != snapshot.revision:
                    statements += self._commit_notice(write_set.revision)
                await session.execute_all(statements)
            return write_set, outcome

        return await self._retrying(attempt, "write batch")

    async def _retrying(self, attempt: Callable[[], Awaitable[R]], what: str) -> R:
        """Run a transaction again when it lost a deadlock or serialization race (it was rolled back)."""
        for number in range(1, COMMIT_ATTEMPTS + 1):
            try:
                return await attempt()
            except Exception as exc:
                if number == COMMIT_ATTEMPTS or not self._is_retryable(exc):
                    raise
                log.info("%s lost a lock race, running it again: %s", what, exc)
        raise AssertionError("unreachable")

    # -- leases -------------------------------------------------------------------------------

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        async with self._read_session() as session:
            revision, _ = await self._revisions(session)
            rows = await session.rows(self.SQL.lease, (lease_id,))
            if not rows:
                return revision, None, []
            keys = [row[0] for row in await session.rows(self.SQL.lease_key_names, (lease_id,))] if with_keys else []
            return revision, LeaseRow._make(rows[0]), keys

    async def lease_ids(self) -> tuple[int, list[int]]:
        async with self._read_session() as session:
            revision, _ = await self._revisions(session)
            return revision, [row[0] for row in await session.rows(self.SQL.lease_ids)]

    async def due_leases(self, now: float, limit: int) -> list[int]:
        async with self._single() as session:
            return [row[0] for row in await session.rows(self.SQL.due_leases, (now, limit))]

    async def renew_leases(self, now: float) -> None:
        async with self._writer_lock, self._write_session() as session:
            await session.execute(self.SQL.renew_leases, (now,))

    async def claim_duties(self) -> bool:
        """Hold the duty lock on a connection of our own; a lost connection has lost the lock."""
        connection = self._duty_connection
        try:
            if connection is not None:
                await self._ping(connection)
                return True
            connection = await self._connect_duty()
            if await self._try_duty_lock(connection):
                self._duty_connection = connection
                return True
            await self._close_connection(connection)
            return False
        except Exception as exc:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await self._close_connection(connection)
            if self._duty_connection is not None:
                log.warning("lost the datastore's duty lock: %s", exc)
            self._duty_connection = None
            return False

    # -- members -------------------------------------------------------------------------------

    async def heartbeat(self, member: MemberRow, now: float) -> None:
        async with self._single() as session:
            await session.execute(self.SQL.upsert_member, member_params(member, now))

    async def members(self, since: float) -> list[MemberRow]:
        async with self._single() as session:
            return member_rows(await session.rows(self.SQL.members, (since,)))

    async def alarms(self) -> list[tuple[int, int]]:
        async with self._single() as session:
            return [(int(row[0]), int(row[1])) for row in await session.rows(self.SQL.alarms)]

    async def set_alarm(self, member_id: int, alarm: int, raised: bool) -> None:
        async with self._single() as session:
            await session.execute(self.SQL.insert_alarm if raised else self.SQL.delete_alarm, (member_id, alarm))

    async def read_document(self, name: str) -> tuple[int, bytes]:
        async with self._single() as session:
            rows = await session.rows(self.SQL.document, (name,))
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else (0, b"")

    async def update_document(self, name: str, change: DocumentChange) -> tuple[int, bytes]:
        async def attempt() -> tuple[int, bytes]:
            async with self._write_session() as session:
                await session.execute(self.SQL.insert_document, (name, b""))
                row = (await session.rows(self.SQL.lock_document, (name,)))[0]
                revision, value = int(row[0]), bytes(row[1])
                new = change(value)
                if new is None:
                    return revision, value
                await session.execute(self.SQL.set_document, (revision + 1, new, name))
                return revision + 1, new

        return await self._retrying(attempt, "a document change")

    async def leave(self, member_id: int) -> None:
        async with self._single() as session:
            await session.execute(self.SQL.delete_member, (member_id,))

    # -- compaction ----------------------------------------------------------------------------

    async def compaction_progress(self) -> tuple[int, int]:
        async with self._read_session() as session:
            return await self._meta(session, "compact_revision"), await self._meta(session, "compacted_through")

    async def compact_step(self, target: int, max_revisions: int) -> int:
        """One short transaction; the progress row's lock makes instances take turns."""
        async with self._writer_lock, self._write_session() as session:
            done = int((await session.rows(self.SQL.lock_compaction))[0][0])
            upto = min(target, done + max_revisions)
            if upto > done:
                await session.execute(self.SQL.compact_superseded, (done, upto))
                await session.execute(self.SQL.compact_tombstones, (done, upto))
                await session.execute(self.SQL.set_meta, (upto, "compacted_through"))
        return max(upto, done)

    # -- other instances' commits ------------------------------------------------------------------

    async def wait_for_commits(self) -> None:
        """Return when another instance may have committed: a notification, or the poll interval."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._commits.wait(), self.poll_interval)
        self._commits.clear()

    async def close_duty_connection(self) -> None:
        if self._duty_connection is not None:
            with contextlib.suppress(Exception):
                await self._close_connection(self._duty_connection)
            self._duty_connection = None
