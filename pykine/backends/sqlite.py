"""SQLite: the embedded default datastore.

One writer thread owns the only writing connection, so a whole write batch
(snapshot read, plan, insert, commit) costs one thread hop. Readers use their
own connections; in WAL mode they never wait for the writer. The SQL itself
lives in sqltext.py, shared with the other relational backends.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pykine.backends.base import Backend, BackendError, DocumentChange, Plan, StorageStatus
from pykine.backends.sqltext import (
    INITIAL_META,
    SCHEMA_VERSION,
    SQLITE,
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

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Processes sharing the file (--workers) look for each other's commits this often.
POLL_INTERVAL = 0.02
log = logging.getLogger(__name__)
# The WAL is copied into the database file by a thread of its own this often
# (when anything was committed), never by a commit: SQLite's automatic
# checkpoint runs inside the commit that crosses 1,000 pages, which stalled
# every writer behind it (update p99 60 ms) and cost a quarter of the writer's
# time.
CHECKPOINT_INTERVAL = 0.2


SQL = Statements(SQLITE)


# A range read whose last run of the same shape took less than this runs on the
# event loop's thread. Handing a read to a reader thread and back costs the loop
# about 150 µs of CPU, and the sqlite3 module hands the GIL back and forth for
# every row it steps, so a contended reader thread is slower than the loop
# itself (measured: a 2,000-key count ran at 2,900/s through the thread pool and
# 5,100/s inline; 500-row list pages at 150/s and 245/s). Only long reads (big
# unpaginated lists, counts over huge prefixes) keep to the readers, so that they
# do not hold up everything else.
INLINE_READ_SECONDS = 0.01
# Write batches run on the event loop when a durable commit takes less than this
# on the datastore's disk (measured at start: 0.3 ms on the development machine's
# SSD); on slower disks the loop must not wait for fsync, and they run on the writer
# thread (see SQLiteBackend.commit).
INLINE_COMMIT_SECONDS = 0.002
READ_COSTS_KEPT = 4096


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30000,
        readers: int = 2,
        poll_interval: float = 0.0,
        inline_commits: bool | None = None,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise BackendError(f"sqlite synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._poll_interval = poll_interval or POLL_INTERVAL
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        # The writer's connection is used by the writer thread and, for the middle of
        # a commit, by the event loop (see commit); this lock makes them take turns.
        self._write_lock = asyncio.Lock()
        self._writer_connection: sqlite3.Connection | None = None
        # Whether write batches run on the event loop; None: decided at start by the disk's speed.
        self._inline_commits = inline_commits
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-checkpoint")
        self._checkpoints: asyncio.Task[None] | None = None
        self._commits = 0
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        # What the last read of each shape (span, kind, limit) cost, in seconds, and how often it ran.
        self._read_costs: dict[tuple[Any, ...], tuple[float, int]] = {}
        self._counts = CountCache()
        # The duty claim among processes sharing the file: a lock on a file beside it.
        self._duty_file: int | None = None

    # -- connections -----------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, cached_statements=512)
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    async def _on(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the writer thread, when no commit is using the writer's connection."""
        async with self._write_lock:
            return await self._on(self._writer, self._waiting, fn, *args)

    def _waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """fn on the writer thread, waiting for other processes' writes as long as the busy timeout.

        With commits on the loop the writer's connection does not wait (a
        batch that finds the database locked waits here instead), so the
        thread's jobs turn the timeout on for their duration.
        """
        if not self._inline_commits:
            return fn(*args)
        conn = self._connection()
        conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        try:
            return fn(*args)
        finally:
            conn.execute("PRAGMA busy_timeout = 0")

    async def start(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            await self._init_schema_taking_turns()
        except (OSError, sqlite3.Error) as exc:
            raise BackendError(f"cannot open sqlite database {self.path}: {exc}") from exc
        if self._inline_commits is None:
            self._inline_commits = await self._write(self._commit_seconds) < INLINE_COMMIT_SECONDS
        if self._inline_commits:  # the loop must never wait for another process's write
            await self._on(self._writer, lambda: self._connection().execute("PRAGMA busy_timeout = 0"))
        self._checkpoints = asyncio.get_running_loop().create_task(self._checkpoint_loop())

    async def _checkpoint_loop(self) -> None:
        """Checkpoint the WAL in the background (see CHECKPOINT_INTERVAL)."""
        done = 0
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            if self._commits == done:
                continue
            done = self._commits
            try:
                await self._on(self._checkpointer, self._checkpoint)
            except sqlite3.Error as exc:  # busy or I/O: the next round tries again
                log.warning("sqlite checkpoint failed: %s", exc)

    def _checkpoint(self) -> None:
        # PASSIVE: copies what no reader still needs, never waits for readers or the writer.
        self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    async def _init_schema_taking_turns(self) -> None:
        """_init_schema, again while another process creating the same file holds it (up to the busy timeout).

        Processes starting together on a new file (`--workers`) race to switch
        it to WAL; SQLite answers the loser SQLITE_BUSY at once, without its
        busy handler, so the wait is here.
        """
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        while True:
            try:
                await self._write(self._init_schema)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

    def _init_schema(self) -> None:
        conn = self._connection()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"journal mode WAL not available (got {mode})")
        conn.execute("PRAGMA wal_autocheckpoint = 0")  # the writer's connection: see CHECKPOINT_INTERVAL
        self._writer_connection = conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in SQL.schema:  # each is idempotent; together, one transaction
                conn.execute(statement)
            found = conn.execute(SQL.meta, ("schema_version",)).fetchone()
            if found is None:
                meta = dict(INITIAL_META, cluster_id=random.getrandbits(63) or 1)
                conn.executemany(SQL.insert_meta, meta.items())
            elif found[0] > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {found[0]} is newer than this pykine supports ({SCHEMA_VERSION})"
                )
            else:
                for statement, params in upgrade_statements(SQL, found[0]):
                    conn.execute(statement, params)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._duty_file is not None:
            os.close(self._duty_file)
            self._duty_file = None
        if self._checkpoints is not None:
            self._checkpoints.cancel()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- shared helpers ----------------------------------------------------------

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        return conn.execute(SQL.meta, (name,)).fetchone()[0]

    @staticmethod
    def _revisions(conn: sqlite3.Connection) -> tuple[int, int]:
        revision, compact = conn.execute(SQL.revisions).fetchone()
        return revision, compact

    def _read_transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn inside one deferred transaction: a consistent WAL snapshot."""
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    async def cluster_id(self) -> int:
        return await self._on(self._readers, lambda: self._meta(self._connection(), "cluster_id"))

    # -- reads -------------------------------------------------------------------

    async def revisions(self) -> tuple[int, int]:
        return await self._on(self._readers, lambda: self._revisions(self._connection()))

    async def read_range(self, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        if query.span.single_key and not (query.revision or query.count_only or query.filtered):
            # An indexed one-row read costs less than the hop to a reader thread: run it here.
            return self._get(query)
        # Pages of one list differ only in where they start: one shape.
        start = b"" if query.limit else query.span.start
        shape = (start, query.span.end, query.count_only, query.keys_only, query.limit, query.revision > 0)
        cost, runs = self._read_costs.get(shape, (0.0, 0))
        # Timed in a reader thread, a read looks dearer than it is (the GIL changes
        # hands per row), so one that is not far over the bound gets retried inline.
        if cost < INLINE_READ_SECONDS or (cost < 4 * INLINE_READ_SECONDS and runs % 32 == 31):
            return self._timed_range(shape, runs, query, known)
        return await self._on(self._readers, self._timed_range, shape, runs, query, known)

    def _timed_range(self, shape: tuple[Any, ...], runs: int, query: RangeQuery, known: KnownRows | None) -> RangeRows:
        """A range read, remembering what reads of its shape cost (see INLINE_READ_SECONDS)."""
        started = time.perf_counter()
        rows = self._read_transaction(lambda conn: self._range(conn, query, known))
        if len(self._read_costs) >= READ_COSTS_KEPT:
            self._read_costs.clear()
        self._read_costs[shape] = (time.perf_counter() - started, runs + 1)
        return rows

    def _get(self, query: RangeQuery) -> RangeRows:
        """One key at the current revision (Kubernetes' Get): one statement, so one snapshot."""
        row = self._connection().execute(SQL.get(query.keys_only), (query.span.start,)).fetchone()
        rows = [KeyValueRow._make(row[2:])] if row[2] is not None else []
        return RangeRows(row[0], row[1], rows, len(rows))

    def _range(self, conn: sqlite3.Connection, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        revision, compact = self._revisions(conn)
        if query.revision > revision or 0 < query.revision < compact or query.span.empty:
            return RangeRows(revision, compact, [], 0)
        count_sql, rows_sql, count_params, rows_params = SQL.range(query, revision)
        count = None
        if count_sql:
            count = self._counts.get(count_sql, count_params, revision)
            if count is None:
                count = self._counts.put(
                    count_sql, count_params, revision, conn.execute(count_sql, count_params).fetchone()[0]
                )
        if query.count_only:
            return RangeRows(revision, compact, [], count or 0)
        current = not (query.revision and query.revision < revision)
        if known is not None and current and query.whole_rows_in_key_order:
            rows = self._rows_or_known(conn, query, known)
            return RangeRows(revision, compact, rows, count if count is not None else len(rows))
        return range_rows(query, revision, compact, count, conn.execute(rows_sql, rows_params).fetchall())

    @staticmethod
    def _rows_or_known(conn: sqlite3.Connection, query: RangeQuery, known: KnownRows) -> list[KeyValueRow | bytes]:
        """The live rows of a range, as what the caller knows where it can, read only where not.

        The (key, mod_revision) pairs come from the covering index kv_keys, a
        fraction of the rows' size (a 500-key page of 1 KiB values: 0.3 ms
        against 2.5 ms); only rows the caller does not know are read whole,
        in the same snapshot.
        """
        sql, params = SQL.versions(query)
        rows, missing = known_rows(conn.execute(sql, params).fetchall(), known)
        for chunk in key_chunks(missing, SQL.dialect.in_chunk):
            place_rows(rows, missing, conn.execute(SQL.latest_keys(len(chunk)), chunk))
        return rows

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        return await self._on(self._readers, self._read_transaction, lambda conn: self._snapshot(conn, reads))

    def _snapshot(self, conn: sqlite3.Connection, reads: ReadSet) -> Snapshot:
        revision, compact = self._revisions(conn)
        queries = snapshot_queries(SQL, reads, revision, compact)
        return assemble_snapshot(
            revision, compact, [(q, conn.execute(q.statement, q.params).fetchall()) for q in queries]
        )

    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        def read(conn: sqlite3.Connection) -> HistoryRows:
            _, compact = self._revisions(conn)
            if first < compact:
                return HistoryRows(compact, [])
            sql, params = SQL.history(span)
            return HistoryRows(compact, [history_change(row) for row in conn.execute(sql, [first, last, *params])])

        return await self._on(self._readers, self._read_transaction, read)

    # -- writes --------------------------------------------------------------------

    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        """One write batch: BEGIN IMMEDIATE, snapshot, plan, statements, COMMIT.

        Where the disk syncs fast, the batch runs on the event loop: on the
        writer thread, the sqlite3 module hands the GIL over at every
        statement and row, and each time the thread waits for the busy loop
        to let go of it again (measured: updates 1,040/s on the writer
        thread, 1,440/s on the loop). Where a sync is slow (see
        INLINE_COMMIT_SECONDS) the loop must not wait for it, and the batch
        runs on the writer thread.
        """
        async with self._write_lock:
            if not self._inline_commits:
                return await self._on(self._writer, self._commit, reads, plan)
            conn = self._writer_connection
            assert conn is not None, "start() opens the writer's connection"
            try:
                conn.execute("BEGIN IMMEDIATE")  # busy_timeout 0 on this connection: never waits
            except sqlite3.OperationalError:  # another process is writing: wait for it on the writer thread
                await self._on(self._writer, self._waiting, conn.execute, "BEGIN IMMEDIATE")
            return self._apply(conn, reads, plan)

    def _commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        return self._apply(conn, reads, plan)

    def _apply(self, conn: sqlite3.Connection, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        """The body of a write batch, once BEGIN IMMEDIATE succeeded."""
        try:
            snapshot = self._snapshot(conn, reads)
            write_set, outcome = plan(snapshot)
            for sql, rows in write_statements(SQL, snapshot, write_set):
                conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._commits += 1
        return write_set, outcome

    def _commit_seconds(self) -> float:
        """What a durable commit costs on this disk: the median of a few that change nothing."""
        conn = self._connection()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            schema_version = self._meta(conn, "schema_version")
            conn.execute(SQL.set_meta, (schema_version, "schema_version"))
            conn.execute("COMMIT")
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    # -- leases ----------------------------------------------------------------------

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        def read(conn: sqlite3.Connection) -> tuple[int, LeaseRow | None, list[bytes]]:
            revision, _ = self._revisions(conn)
            row = conn.execute(SQL.lease, (lease_id,)).fetchone()
            if row is None:
                return revision, None, []
            keys = [key for (key,) in conn.execute(SQL.lease_key_names, (lease_id,))] if with_keys else []
            return revision, LeaseRow._make(row), keys

        return await self._on(self._readers, self._read_transaction, read)

    async def lease_ids(self) -> tuple[int, list[int]]:
        def read(conn: sqlite3.Connection) -> tuple[int, list[int]]:
            revision, _ = self._revisions(conn)
            return revision, [lease_id for (lease_id,) in conn.execute(SQL.lease_ids)]

        return await self._on(self._readers, self._read_transaction, read)

    async def due_leases(self, now: float, limit: int) -> list[int]:
        def read() -> list[int]:
            return [lease_id for (lease_id,) in self._connection().execute(SQL.due_leases, (now, limit))]

        return await self._on(self._readers, read)

    async def renew_leases(self, now: float) -> None:
        await self._write(lambda: self._connection().execute(SQL.renew_leases, (now,)))

    async def claim_duties(self) -> bool:
        if self._duty_file is None:
            descriptor = os.open(self.path + "-duties", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return False
            self._duty_file = descriptor
        return True

    async def wait_for_commits(self) -> None:
        await asyncio.sleep(self._poll_interval)

    # -- members ---------------------------------------------------------------------

    async def heartbeat(self, member: MemberRow, now: float) -> None:
        await self._write(lambda: self._connection().execute(SQL.upsert_member, member_params(member, now)))

    async def members(self, since: float) -> list[MemberRow]:
        return await self._on(
            self._readers, lambda: member_rows(self._connection().execute(SQL.members, (since,)).fetchall())
        )

    async def alarms(self) -> list[tuple[int, int]]:
        return await self._on(self._readers, lambda: self._connection().execute(SQL.alarms).fetchall())

    async def set_alarm(self, member_id: int, alarm: int, raised: bool) -> None:
        statement = SQL.insert_alarm if raised else SQL.delete_alarm
        await self._write(lambda: self._connection().execute(statement, (member_id, alarm)))

    async def read_document(self, name: str) -> tuple[int, bytes]:
        row = await self._on(self._readers, lambda: self._connection().execute(SQL.document, (name,)).fetchone())
        return (int(row[0]), bytes(row[1])) if row else (0, b"")

    async def update_document(self, name: str, change: DocumentChange) -> tuple[int, bytes]:
        return await self._write(self._update_document, name, change)

    def _update_document(self, name: str, change: DocumentChange) -> tuple[int, bytes]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SQL.insert_document, (name, b""))
            revision, value = conn.execute(SQL.lock_document, (name,)).fetchone()
            new = change(bytes(value))
            if new is None:
                conn.execute("COMMIT")
                return int(revision), bytes(value)
            conn.execute(SQL.set_document, (revision + 1, new, name))
            conn.execute("COMMIT")
            return int(revision) + 1, new
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def leave(self, member_id: int) -> None:
        await self._write(lambda: self._connection().execute(SQL.delete_member, (member_id,)))

    # -- compaction ------------------------------------------------------------------

    async def compaction_progress(self) -> tuple[int, int]:
        def read(conn: sqlite3.Connection) -> tuple[int, int]:
            return self._meta(conn, "compact_revision"), self._meta(conn, "compacted_through")

        return await self._on(self._readers, self._read_transaction, read)

    async def compact_step(self, target: int, max_revisions: int) -> int:
        return await self._write(self._compact_step, target, max_revisions)

    def _compact_step(self, target: int, max_revisions: int) -> int:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = self._meta(conn, "compacted_through")
            upto = min(target, done + max_revisions)
            if upto > done:
                conn.execute(SQL.compact_superseded, (done, upto))
                conn.execute(SQL.compact_tombstones, (done, upto))
                conn.execute(SQL.set_meta, (upto, "compacted_through"))
            conn.execute("COMMIT")
            return max(upto, done)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- maintenance -------------------------------------------------------------------

    async def status(self) -> StorageStatus:
        def read() -> StorageStatus:
            conn = self._connection()
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return StorageStatus(pages * page_size, (pages - free) * page_size)

        return await self._on(self._readers, read)

    async def defragment(self) -> None:
        def vacuum() -> None:
            conn = self._connection()
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await self._write(vacuum)
