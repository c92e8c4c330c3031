"""PostgreSQL, through psycopg 3 (async, binary), with the SQL shared with SQLite.

Several pykine instances may share one database. Each write batch takes the
revision counter's row with FOR UPDATE first and holds it until commit, so
commits are ordered by revision across instances: no commit with a lower
revision can become visible after a higher one, and nothing needs gap rows.
Reads of more than one statement run in REPEATABLE READ transactions, one
snapshot each.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection, IsolationLevel, sql
from psycopg_pool import AsyncConnectionPool

from pykine.backends.base import Backend, BackendError, Plan, StorageStatus
from pykine.backends.sqltext import (
    INITIAL_META,
    POSTGRES,
    SCHEMA_VERSION,
    Statements,
    assemble_snapshot,
    history_change,
    range_rows,
    snapshot_queries,
    write_statements,
)
from pykine.engine.records import (
    HistoryRows,
    KeySpan,
    LeaseRow,
    RangeQuery,
    RangeRows,
    ReadSet,
    Snapshot,
    WriteSet,
)

T = TypeVar("T")

SQL = Statements(POSTGRES)
DEFAULT_DATABASE = "kubernetes"
# Serialises schema creation among instances starting together.
SCHEMA_LOCK = 0x70796B696E65  # "pykine"


def split_dsn(dsn: str) -> tuple[str, str, str]:
    """(conninfo for our database, conninfo for the server's `postgres` database, our database's name).

    The database defaults to `kubernetes`, as in kine.
    """
    parts = urlsplit(dsn)
    database = parts.path.lstrip("/") or DEFAULT_DATABASE
    ours = urlunsplit(("postgresql", parts.netloc, "/" + database, parts.query, ""))
    server = urlunsplit(("postgresql", parts.netloc, "/postgres", parts.query, ""))
    return ours, server, database


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, dsn: str, *, max_connections: int = 8) -> None:
        self.conninfo, self._server_conninfo, self.database = split_dsn(dsn)
        self._max_connections = max_connections
        self._writer: AsyncConnection[Any] | None = None
        # Write batches, compaction steps and lease renewal take turns on the writer connection.
        self._writer_lock = asyncio.Lock()
        self._pool: AsyncConnectionPool | None = None

    # -- connections -----------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._create_database()
            self._writer = await AsyncConnection.connect(self.conninfo, autocommit=True)
            await self._init_schema(self._writer)
            self._pool = AsyncConnectionPool(
                self.conninfo,
                min_size=1,
                max_size=self._max_connections,
                kwargs={"autocommit": True},
                configure=self._configure,
                open=False,
            )
            await self._pool.open(wait=True, timeout=30)
        except (psycopg.Error, OSError) as exc:
            raise BackendError(f"cannot open postgres database {self.database}: {exc}") from exc

    @staticmethod
    async def _configure(conn: AsyncConnection[Any]) -> None:
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)

    async def _create_database(self) -> None:
        async with await AsyncConnection.connect(self._server_conninfo, autocommit=True) as conn:
            found = await (
                await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            ).fetchone()
            if found is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another instance was first
                    await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    async def _init_schema(self, conn: AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SQL.schema:
                await conn.execute(statement)
            found = await (await conn.execute(SQL.meta, ("schema_version",))).fetchone()
            if found is None:
                meta = dict(INITIAL_META, cluster_id=random.getrandbits(63) or 1)
                async with conn.cursor() as cursor:
                    await cursor.executemany(SQL.insert_meta, list(meta.items()))
            elif found[0] > SCHEMA_VERSION:
                raise BackendError(f"schema version {found[0]} is newer than this pykine supports ({SCHEMA_VERSION})")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._writer is not None:
            await self._writer.close()

    async def _read(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run fn in one REPEATABLE READ transaction: one snapshot."""
        assert self._pool is not None
        async with self._pool.connection() as conn, conn.transaction():
            return await fn(conn)

    @staticmethod
    async def _rows(conn: AsyncConnection[Any], statement: str, params: Any = ()) -> list[Any]:
        return await (await conn.execute(statement, params)).fetchall()

    @staticmethod
    async def _revisions(conn: AsyncConnection[Any]) -> tuple[int, int]:
        rows = dict(await (await conn.execute(SQL.revisions)).fetchall())
        return rows["revision"], rows["compact_revision"]

    async def _meta(self, conn: AsyncConnection[Any], name: str) -> int:
        row = await (await conn.execute(SQL.meta, (name,))).fetchone()
        assert row is not None
        return int(row[0])

    async def cluster_id(self) -> int:
        return await self._read(lambda conn: self._meta(conn, "cluster_id"))

    # -- reads --------------------------------------------------------------------------

    async def revisions(self) -> tuple[int, int]:
        return await self._read(self._revisions)

    async def read_range(self, query: RangeQuery) -> RangeRows:
        return await self._read(lambda conn: self._range(conn, query))

    async def _range(self, conn: AsyncConnection[Any], query: RangeQuery) -> RangeRows:
        revision, compact = await self._revisions(conn)
        if query.revision > revision or 0 < query.revision < compact or query.span.empty:
            return RangeRows(revision, compact, [], 0)
        count_sql, rows_sql, count_params, rows_params = SQL.range(query, revision)
        count = (await self._rows(conn, count_sql, count_params))[0][0] if count_sql else None
        if query.count_only:
            return RangeRows(revision, compact, [], count or 0)
        return range_rows(query, revision, compact, count, await self._rows(conn, rows_sql, rows_params))

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        return await self._read(lambda conn: self._snapshot(conn, reads))

    async def _snapshot(self, conn: AsyncConnection[Any], reads: ReadSet) -> Snapshot:
        revision, compact = await self._revisions(conn)
        queries = snapshot_queries(SQL, reads, revision, compact)
        return assemble_snapshot(
            revision, compact, [(q, await self._rows(conn, q.statement, q.params)) for q in queries]
        )

    async def read_history(self, first: int, last: int, span: KeySpan) -> HistoryRows:
        async def read(conn: AsyncConnection[Any]) -> HistoryRows:
            _, compact = await self._revisions(conn)
            if first < compact:
                return HistoryRows(compact, [])
            statement, params = SQL.history(span)
            rows = await self._rows(conn, statement, [first, last, *params])
            return HistoryRows(compact, [history_change(row) for row in rows])

        return await self._read(read)

    # -- writes ---------------------------------------------------------------------------

    async def commit(self, reads: ReadSet, plan: Plan[T]) -> tuple[WriteSet, T]:
        """Lock the revision row first: commits then follow revision order across instances."""
        conn = self._writer
        assert conn is not None
        async with self._writer_lock, conn.transaction():
            await conn.execute("SELECT value FROM meta WHERE name = 'revision' FOR UPDATE")
            snapshot = await self._snapshot(conn, reads)
            write_set, outcome = plan(snapshot)
            async with conn.cursor() as cursor:
                for statement, rows in write_statements(SQL, snapshot, write_set):
                    await cursor.executemany(statement, rows)
        return write_set, outcome

    # -- leases ---------------------------------------------------------------------------

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        async def read(conn: AsyncConnection[Any]) -> tuple[int, LeaseRow | None, list[bytes]]:
            revision, _ = await self._revisions(conn)
            rows = await self._rows(conn, SQL.lease, (lease_id,))
            if not rows:
                return revision, None, []
            keys = [row[0] for row in await self._rows(conn, SQL.lease_key_names, (lease_id,))] if with_keys else []
            return revision, LeaseRow._make(rows[0]), keys

        return await self._read(read)

    async def lease_ids(self) -> tuple[int, list[int]]:
        async def read(conn: AsyncConnection[Any]) -> tuple[int, list[int]]:
            revision, _ = await self._revisions(conn)
            return revision, [row[0] for row in await self._rows(conn, SQL.lease_ids)]

        return await self._read(read)

    async def due_leases(self, now: float, limit: int) -> list[int]:
        rows = await self._read(lambda conn: self._rows(conn, SQL.due_leases, (now, limit)))
        return [row[0] for row in rows]

    async def renew_leases(self, now: float) -> None:
        assert self._writer is not None
        async with self._writer_lock:
            await self._writer.execute(SQL.renew_leases, (now,))

    # -- compaction --------------------------------------------------------------------------

    async def compaction_progress(self) -> tuple[int, int]:
        async def read(conn: AsyncConnection[Any]) -> tuple[int, int]:
            return await self._meta(conn, "compact_revision"), await self._meta(conn, "compacted_through")

        return await self._read(read)

    async def compact_step(self, target: int, max_revisions: int) -> int:
        """One short transaction; the progress row's lock makes instances take turns."""
        conn = self._writer
        assert conn is not None
        async with self._writer_lock, conn.transaction():
            row = await (
                await conn.execute("SELECT value FROM meta WHERE name = 'compacted_through' FOR UPDATE")
            ).fetchone()
            assert row is not None
            done = int(row[0])
            upto = min(target, done + max_revisions)
            if upto > done:
                await conn.execute(SQL.compact_superseded, (done, upto))
                await conn.execute(SQL.compact_tombstones, (done, upto))
                await conn.execute(SQL.set_meta, (upto, "compacted_through"))
        return max(upto, done)

    # -- maintenance ---------------------------------------------------------------------------

    async def status(self) -> StorageStatus:
        rows = await self._read(lambda conn: self._rows(conn, "SELECT pg_database_size(current_database())"))
        size = int(rows[0][0])
        return StorageStatus(size, size)

    async def defragment(self) -> None:
        """Plain VACUUM: frees dead rows for reuse without locking writers out (not VACUUM FULL)."""
        assert self._pool is not None
        async with self._pool.connection() as conn:
            await conn.execute("VACUUM kv, kv_history, lease, meta")
