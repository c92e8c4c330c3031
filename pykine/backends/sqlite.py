"""SQLite: the embedded default datastore.

One writer thread owns the only writing connection, so a whole write batch
(snapshot read, plan, insert, commit) costs one thread hop. Readers use their
own connections on a small pool; in WAL mode they never wait for the writer.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pykine.backends.base import Backend, BackendError, Plan, StorageStatus
from pykine.engine.records import (
    Change,
    HistoryRows,
    KeySpan,
    KeyValueRow,
    LeaseRow,
    RangeQuery,
    RangeRows,
    ReadSet,
    Snapshot,
    SnapshotRead,
    WriteSet,
)

T = TypeVar("T")

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- The live state: one row per existing key.
CREATE TABLE IF NOT EXISTS kv (
    key BLOB PRIMARY KEY,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    lease INTEGER NOT NULL
) WITHOUT ROWID;
-- Keys and revisions alone: exact counts, at the current revision or an older
-- one, read this small index instead of rows with their values.
CREATE INDEX IF NOT EXISTS kv_keys ON kv (key, mod_revision);

-- Every change: one row per key per revision; deleted rows are tombstones.
CREATE TABLE IF NOT EXISTS kv_history (
    revision INTEGER NOT NULL,
    sub INTEGER NOT NULL,
    key BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    lease INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    PRIMARY KEY (revision, sub)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_history_key ON kv_history (key, revision);

-- Keys by lease, for revoke and expiry: cost follows the lease's keys only.
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;

CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_expiry ON lease (expires_at);
"""

# Revision 1 is the empty store, as in etcd; -1 means never compacted.
INITIAL_META = {
    "schema_version": SCHEMA_VERSION,
    "revision": 1,
    "compact_revision": -1,
    "compacted_through": 0,
}

KV_COLUMNS = "key, create_revision, mod_revision, version, value, lease"
KEYS_ONLY_COLUMNS = "key, create_revision, mod_revision, version, x'', lease"
GET_COLUMNS = "kv.key, kv.create_revision, kv.mod_revision, kv.version, kv.value, kv.lease"
KEYS_ONLY_GET_COLUMNS = "kv.key, kv.create_revision, kv.mod_revision, kv.version, x'', kv.lease"

# The state at an older revision R, in proportion to what changed since R
# rather than to the whole history: the live rows not changed after R, plus,
# for each key changed after R, its newest history row at or below R unless
# that is a tombstone. "Newest" orders by (revision, sub): one revision can
# hold two rows of a key (a txn that puts, then deletes it). The keys changed
# since R come from the primary key's revision range: the bounded BETWEEN and
# the unary + on key steer SQLite's planner away from scanning the span in
# the key index, which would cost the span's whole history.
# It ends in a WHERE clause that filters extend with AND.
STATE_AT = """(
    SELECT key, create_revision, mod_revision, version, value, lease FROM kv
    WHERE {span} AND mod_revision <= ?
    UNION ALL
    SELECT old.key, old.create_revision, old.revision, old.version, old.value, old.lease
    FROM (SELECT DISTINCT key FROM kv_history WHERE revision > ? AND revision <= ? AND {changed_span}) AS changed
    JOIN kv_history AS old ON old.key = changed.key
    WHERE (old.revision, old.sub) = (
        SELECT revision, sub FROM kv_history
        WHERE key = changed.key AND revision <= ? ORDER BY revision DESC, sub DESC LIMIT 1
    ) AND old.deleted = 0
) WHERE 1"""


def _state_at(span: KeySpan, revision: int, current: int) -> tuple[str, list[Any]]:
    where, params = _span_sql(span)
    changed_where, _ = _span_sql(span, "+key")
    sql = STATE_AT.format(span=where, changed_span=changed_where)
    return sql, [*params, revision, revision, current, *params, revision]


SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

IN_CHUNK = 500


def _span_sql(span: KeySpan, column: str = "key") -> tuple[str, list[Any]]:
    if span.single_key:
        return f"{column} = ?", [span.start]
    if span.end is None:
        return f"{column} >= ?", [span.start]
    return f"{column} >= ? AND {column} < ?", [span.start, span.end]


def _filters_sql(query: RangeQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, bound in (
        ("mod_revision", ">=", query.min_mod_revision),
        ("mod_revision", "<=", query.max_mod_revision),
        ("create_revision", ">=", query.min_create_revision),
        ("create_revision", "<=", query.max_create_revision),
    ):
        if bound:
            clauses.append(f" AND {column} {op} ?")
            params.append(bound)
    return "".join(clauses), params


def _order_sql(query: RangeQuery) -> str:
    if query.sort is None:
        return " ORDER BY key"
    direction = "DESC" if query.sort.descending else "ASC"
    if query.sort.field == "key":
        return f" ORDER BY key {direction}"
    return f" ORDER BY {query.sort.field} {direction}, key"


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 30000,
        readers: int = 2,
    ) -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise BackendError(f"sqlite synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")

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

    async def start(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            await self._on(self._writer, self._init_schema)
        except (OSError, sqlite3.Error) as exc:
            raise BackendError(f"cannot open sqlite database {self.path}: {exc}") from exc

    def _init_schema(self) -> None:
        conn = self._connection()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"journal mode WAL not available (got {mode})")
        # Every statement of SCHEMA is idempotent; the script runs as one transaction.
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} COMMIT;")
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if found is None:
                meta = dict(INITIAL_META, cluster_id=random.getrandbits(63) or 1)
                conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", meta.items())
            elif found[0] > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {found[0]} is newer than this pykine supports ({SCHEMA_VERSION})"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._connections_lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- shared helpers ----------------------------------------------------------

    @staticmethod
    def _meta(conn: sqlite3.Connection, name: str) -> int:
        return conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0]

    def _revisions(self, conn: sqlite3.Connection) -> tuple[int, int]:
        rows = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('revision', 'compact_revision')"))
        return rows["revision"], rows["compact_revision"]

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

    async def read_range(self, query: RangeQuery) -> RangeRows:
        if query.span.single_key and not (query.revision or query.count_only or _filters_sql(query)[1]):
            # An indexed one-row read costs less than the hop to a reader thread: run it here.
            return self._get(query)
        return await self._on(self._readers, self._read_transaction, lambda conn: self._range(conn, query))

    def _get(self, query: RangeQuery) -> RangeRows:
        """One key at the current revision (Kubernetes' Get): one statement, so one snapshot."""
        columns = KEYS_ONLY_GET_COLUMNS if query.keys_only else GET_COLUMNS
        row = (
            self._connection()
            .execute(
                f"SELECT revision.value, compact.value, {columns}"
                " FROM meta AS revision JOIN meta AS compact LEFT JOIN kv ON kv.key = ?"
                " WHERE revision.name = 'revision' AND compact.name = 'compact_revision'",
                (query.span.start,),
            )
            .fetchone()
        )
        rows = [KeyValueRow._make(row[2:])] if row[2] is not None else []
        return RangeRows(row[0], row[1], rows, len(rows))

    def _range(self, conn: sqlite3.Connection, query: RangeQuery) -> RangeRows:
        revision, compact = self._revisions(conn)
        if query.revision > revision or 0 < query.revision < compact or query.span.empty:
            return RangeRows(revision, compact, [], 0)
        # Both sources end in a WHERE clause that filters can extend with AND.
        if query.revision and query.revision < revision:
            source, params = _state_at(query.span, query.revision, revision)
        else:
            span, params = _span_sql(query.span)
            source = f"kv WHERE {span}"
        count = 0
        if query.count_only or query.need_count:
            count = conn.execute(f"SELECT count(*) FROM {source}", params).fetchone()[0]
        if query.count_only:
            return RangeRows(revision, compact, [], count)
        filters, filter_params = _filters_sql(query)
        columns = KEYS_ONLY_COLUMNS if query.keys_only else KV_COLUMNS
        sql = f"SELECT {columns} FROM {source}{filters}{_order_sql(query)}"
        params.extend(filter_params)
        if query.limit:
            sql += " LIMIT ?"
            params.append(query.limit)
        rows = list(map(KeyValueRow._make, conn.execute(sql, params)))
        if not query.need_count:
            count = len(rows)
        return RangeRows(revision, compact, rows, count)

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        return await self._on(self._readers, self._read_transaction, lambda conn: self._snapshot(conn, reads))

    def _snapshot(self, conn: sqlite3.Connection, reads: ReadSet) -> Snapshot:
        revision, compact = self._revisions(conn)
        latest: dict[bytes, KeyValueRow] = {}
        singles: list[bytes] = []
        history: dict[SnapshotRead, list[KeyValueRow]] = {}
        for read in reads.spans:
            if read.revision and read.revision < revision:
                if read.revision >= compact and not read.span.empty:
                    source, params = _state_at(read.span, read.revision, revision)
                    sql = f"SELECT {KV_COLUMNS} FROM {source} ORDER BY key"
                    history[read] = list(map(KeyValueRow._make, conn.execute(sql, params)))
            elif read.span.single_key:
                singles.append(read.span.start)
            elif not read.span.empty:
                span, params = _span_sql(read.span)
                for row in conn.execute(f"SELECT {KV_COLUMNS} FROM kv WHERE {span}", params):
                    latest[row[0]] = KeyValueRow._make(row)
        for start in range(0, len(singles), IN_CHUNK):
            chunk = singles[start : start + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(f"SELECT {KV_COLUMNS} FROM kv WHERE key IN ({marks})", chunk):
                latest[row[0]] = KeyValueRow._make(row)
        for lease_id in reads.lease_keys:
            for row in conn.execute(f"SELECT {KV_COLUMNS} FROM kv WHERE lease = ?", (lease_id,)):
                latest[row[0]] = KeyValueRow._make(row)
        leases: dict[int, LeaseRow] = {}
        lease_ids = list(reads.leases)
        for start in range(0, len(lease_ids), IN_CHUNK):
            chunk = lease_ids[start : start + IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(f"SELECT id, ttl, expires_at FROM lease WHERE id IN ({marks})", chunk):
                leases[row[0]] = LeaseRow._make(row)
        return Snapshot(revision, compact, list(latest.values()), history, leases)

    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        return await self._on(
            self._readers, self._read_transaction, lambda conn: self._history(conn, first, last, span)
        )

    def _history(self, conn: sqlite3.Connection, first: int, last: int, span: KeySpan) -> HistoryRows:
        _, compact = self._revisions(conn)
        if first < compact:
            return HistoryRows(compact, [])
        where, params = _span_sql(span, "h.key")
        sql = (
            "SELECT h.key, h.create_revision, h.revision, h.version, h.value, h.lease, h.sub, h.deleted,"
            " p.create_revision, p.revision, p.version, p.value, p.lease"
            " FROM kv_history AS h LEFT JOIN kv_history AS p"
            " ON h.prev_revision > 0 AND p.key = h.key AND p.revision = h.prev_revision"
            f" WHERE h.revision >= ? AND h.revision <= ? AND {where}"
            " ORDER BY h.revision, h.sub"
        )
        changes = [
            Change(
                KeyValueRow(*row[:6]),
                row[6],
                bool(row[7]),
                KeyValueRow(row[0], *row[8:]) if row[9] is not None else None,
            )
            for row in conn.execute(sql, [first, last, *params])
        ]
        return HistoryRows(compact, changes)

    # -- writes --------------------------------------------------------------------

    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        return await self._on(self._writer, self._commit, reads, plan)

    def _commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            snapshot = self._snapshot(conn, reads)
            write_set, outcome = plan(snapshot)
            self._store(conn, snapshot, write_set)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return write_set, outcome

    @staticmethod
    def _store(conn: sqlite3.Connection, snapshot: Snapshot, write_set: WriteSet) -> None:
        if write_set.changes:
            conn.executemany(
                "INSERT INTO kv_history (revision, sub, key, create_revision, version, value, lease,"
                " deleted, prev_revision) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.kv.mod_revision,
                        c.sub,
                        c.kv.key,
                        c.kv.create_revision,
                        c.kv.version,
                        c.kv.value,
                        c.kv.lease,
                        c.deleted,
                        c.prev.mod_revision if c.prev else 0,
                    )
                    for c in write_set.changes
                ],
            )
            final = {c.kv.key: c for c in write_set.changes}
            deleted = [(key,) for key, c in final.items() if c.deleted]
            if deleted:
                conn.executemany("DELETE FROM kv WHERE key = ?", deleted)
            live = [c.kv for c in final.values() if not c.deleted]
            if live:
                conn.executemany(f"INSERT OR REPLACE INTO kv ({KV_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", live)
        if write_set.lease_puts:
            conn.executemany(
                "INSERT OR REPLACE INTO lease (id, ttl, expires_at) VALUES (?, ?, ?)", write_set.lease_puts
            )
        if write_set.lease_deletes:
            conn.executemany("DELETE FROM lease WHERE id = ?", [(lease_id,) for lease_id in write_set.lease_deletes])
        if write_set.revision != snapshot.revision:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (write_set.revision,))
        if write_set.compact_revision != snapshot.compact_revision:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'compact_revision'", (write_set.compact_revision,))

    # -- leases ----------------------------------------------------------------------

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        def read(conn: sqlite3.Connection) -> tuple[int, LeaseRow | None, list[bytes]]:
            revision, _ = self._revisions(conn)
            row = conn.execute("SELECT id, ttl, expires_at FROM lease WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                return revision, None, []
            keys = []
            if with_keys:
                keys = [key for (key,) in conn.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key", (lease_id,))]
            return revision, LeaseRow._make(row), keys

        return await self._on(self._readers, self._read_transaction, read)

    async def lease_ids(self) -> tuple[int, list[int]]:
        def read(conn: sqlite3.Connection) -> tuple[int, list[int]]:
            revision, _ = self._revisions(conn)
            return revision, [lease_id for (lease_id,) in conn.execute("SELECT id FROM lease ORDER BY id")]

        return await self._on(self._readers, self._read_transaction, read)

    async def due_leases(self, now: float, limit: int) -> list[int]:
        def read() -> list[int]:
            rows = self._connection().execute(
                "SELECT id FROM lease WHERE expires_at <= ? ORDER BY expires_at LIMIT ?", (now, limit)
            )
            return [lease_id for (lease_id,) in rows]

        return await self._on(self._readers, read)

    async def renew_leases(self, now: float) -> None:
        def renew() -> None:
            self._connection().execute("UPDATE lease SET expires_at = ? + ttl", (now,))

        await self._on(self._writer, renew)

    # -- compaction ------------------------------------------------------------------

    async def compaction_progress(self) -> tuple[int, int]:
        def read(conn: sqlite3.Connection) -> tuple[int, int]:
            return self._meta(conn, "compact_revision"), self._meta(conn, "compacted_through")

        return await self._on(self._readers, self._read_transaction, read)

    async def compact_step(self, target: int, max_revisions: int) -> int:
        return await self._on(self._writer, self._compact_step, target, max_revisions)

    def _compact_step(self, target: int, max_revisions: int) -> int:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = self._meta(conn, "compacted_through")
            upto = min(target, done + max_revisions)
            if upto > done:
                # A row at revision r in (done, upto] supersedes every older row
                # of its key; a tombstone at or below the target goes as well.
                conn.execute(
                    "DELETE FROM kv_history WHERE (revision, sub) IN ("
                    " SELECT old.revision, old.sub FROM kv_history AS cur"
                    " JOIN kv_history AS old ON old.key = cur.key"
                    " AND (old.revision < cur.revision OR (old.revision = cur.revision AND old.sub < cur.sub))"
                    " WHERE cur.revision > ? AND cur.revision <= ?)",
                    (done, upto),
                )
                conn.execute(
                    "DELETE FROM kv_history WHERE revision > ? AND revision <= ? AND deleted = 1",
                    (done, upto),
                )
                conn.execute("UPDATE meta SET value = ? WHERE name = 'compacted_through'", (upto,))
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

        await self._on(self._writer, vacuum)
