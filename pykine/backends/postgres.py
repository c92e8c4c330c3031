"""PostgreSQL, through psycopg 3 (async, binary results, prepared statements, a pool).

Commit order, snapshots and duties follow remote.py. Commits are announced
with NOTIFY inside their transaction (PostgreSQL delivers it on commit), and
each instance LISTENs on a connection of its own, so other instances' watchers
hear of a commit within milliseconds; a slow poll stays as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import AsyncConnection, IsolationLevel, sql
from psycopg_pool import AsyncConnectionPool

from pykine import redaction
from pykine.backends import identity
from pykine.backends.base import ConnectionOptions, StorageStatus
from pykine.backends.remote import RemoteSQLBackend
from pykine.backends.sqltext import POSTGRES, Statements

log = logging.getLogger(__name__)

DEFAULT_DATABASE = "kubernetes"
CHANNEL = "pykine_commits"
# Advisory lock keys (scoped to the database): schema creation, and the once-only duties.
SCHEMA_LOCK = 0x70796B696E65  # "pykine"
DUTY_LOCK = SCHEMA_LOCK + 1
# Pooled connections beyond the idle bound are closed after this long unused.
IDLE_TIMEOUT = 60.0
CONNECT_TIMEOUT = "5"
# How long a request waits for a pooled connection before failing UNAVAILABLE.
POOL_WAIT = 2.0
# How long the pool keeps retrying one lost connection (with growing pauses) before it gives
# up; a request that then needs a connection makes a fresh attempt at once. Without a bound,
# the pauses grow with the outage and delay recovery after the server is back.
RECONNECT_TIMEOUT = 3.0


def split_dsn(dsn: str, options: ConnectionOptions) -> tuple[str, str, str]:
    """(conninfo for our database, conninfo for the server's `postgres` database, our database's name).

    The database defaults to `kubernetes`, as in kine; kine's TLS flags become libpq's ssl parameters.
    """
    parts = urlsplit(dsn)
    if parts.password:
        redaction.register(parts.password)
    database = parts.path.lstrip("/") or DEFAULT_DATABASE
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    if options.ca_file:
        params["sslrootcert"] = options.ca_file
        params.setdefault("sslmode", "require" if options.skip_verify else "verify-full")
    elif options.skip_verify:
        params.setdefault("sslmode", "require")
    if options.cert_file:
        params["sslcert"] = options.cert_file
    if options.key_file:
        params["sslkey"] = options.key_file
    query = urlencode(params)
    ours = urlunsplit(("postgresql", parts.netloc, "/" + database, query, ""))
    server = urlunsplit(("postgresql", parts.netloc, "/postgres", query, ""))
    return ours, server, database


class _Session:
    def __init__(self, conn: AsyncConnection[Any]) -> None:
        self.conn = conn

    async def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await (await self.conn.execute(statement, params, binary=True)).fetchall()

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        await self.conn.execute(statement, params)

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        """One pipeline: the statements go out together and the batch waits for the server once."""
        async with self.conn.pipeline(), self.conn.cursor() as cursor:
            for statement, rows in statements:
                await cursor.executemany(statement, rows)


class PostgresBackend(RemoteSQLBackend):
    name = "postgres"
    SQL = Statements(POSTGRES)
    # The safety poll behind LISTEN/NOTIFY.
    default_poll_interval = 1.0

    def __init__(self, dsn: str, options: ConnectionOptions | None = None) -> None:
        super().__init__(options or ConnectionOptions())
        dsn, keytab, keytab_source = identity.take_keytab(dsn)
        self.conninfo, self._server_conninfo, self.database = split_dsn(dsn, self.options)
        # Per-connection credentials (an IAM token, a fresh Kerberos ticket), asked for every connection.
        self._credentials = identity.postgres_credentials(self.conninfo, self.options, keytab, keytab_source)
        self._pool: AsyncConnectionPool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pool_check: asyncio.Task[None] | None = None

    # -- connections -----------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._credentials.close()  # a Kerberos cache directory is not left behind
            raise
        self._listener = asyncio.create_task(self._listen(), name="pykine-postgres-listen")

    async def _start(self) -> None:
        idle, most = self.options.pool_bounds()
        try:
            await self._credentials.start()
            await self._create_database()
            await self._init_schema()
            self._pool = AsyncConnectionPool(
                self.conninfo,
                min_size=idle,
                max_size=most,
                max_idle=IDLE_TIMEOUT,
                max_lifetime=self.options.connection_max_lifetime or 3600.0,
                kwargs=self._connect_arguments,
                timeout=POOL_WAIT,
                reconnect_timeout=RECONNECT_TIMEOUT,
                open=False,
            )
            await self._pool.open(wait=True, timeout=30)
        except (psycopg.Error, OSError) as exc:
            raise identity.failure(f"cannot open postgres database {self.database}: {exc}") from exc

    async def _connect_arguments(self) -> dict[str, Any]:
        """psycopg keyword arguments for one new connection, pooled or not."""
        return {"autocommit": True, **await self._credentials.connect_arguments()}

    async def _connect(self, conninfo: str) -> AsyncConnection[Any]:
        return await AsyncConnection.connect(conninfo, **await self._connect_arguments())

    async def _create_database(self) -> None:
        async with await self._connect(self._server_conninfo) as conn:
            found = await (
                await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
            ).fetchone()
            if found is None:
                # Another instance was first (caught by the name check, or by the catalog's unique index).
                with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    @contextlib.asynccontextmanager
    async def _schema_session(self) -> AsyncIterator[_Session]:
        async with await self._connect(self.conninfo) as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            yield _Session(conn)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        await self.close_duty_connection()
        if self._pool is not None:
            await self._pool.close()
        await self._credentials.close()

    @contextlib.asynccontextmanager
    async def _connection(self, isolation: IsolationLevel, transaction: bool) -> AsyncIterator[_Session]:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                if conn.isolation_level != isolation:
                    await conn.set_isolation_level(isolation)
                if transaction:
                    async with conn.transaction():
                        yield _Session(conn)
                else:
                    yield _Session(conn)
        except psycopg.OperationalError:
            # The server may have restarted: have the pool replace its other idle connections too.
            if self._pool_check is None or self._pool_check.done():
                self._pool_check = asyncio.create_task(self._pool.check())
            raise

    def _read_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._connection(IsolationLevel.REPEATABLE_READ, True)

    def _write_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._connection(IsolationLevel.READ_COMMITTED, True)

    def _single(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._connection(IsolationLevel.READ_COMMITTED, False)

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected)

    # -- the duty lock -------------------------------------------------------------------

    async def _connect_duty(self) -> AsyncConnection[Any]:
        return await self._connect(self.conninfo)

    async def _try_duty_lock(self, connection: AsyncConnection[Any]) -> bool:
        row = await (await connection.execute("SELECT pg_try_advisory_lock(%s)", (DUTY_LOCK,))).fetchone()
        return bool(row and row[0])

    async def _ping(self, connection: AsyncConnection[Any]) -> None:
        await connection.execute("SELECT 1")

    async def _close_connection(self, connection: AsyncConnection[Any]) -> None:
        await connection.close()

    # -- notifications ---------------------------------------------------------------------

    def _commit_notice(self, revision: int) -> list[tuple[str, list[Any]]]:
        return [("SELECT pg_notify(%s, %s)", [(CHANNEL, f"{self.instance_id}:{revision}")])]

    async def _listen(self) -> None:
        """Wake the watch feed when another instance commits; reconnect after failures."""
        own = self.instance_id + ":"
        while True:
            try:
                async with await self._connect(self.conninfo) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Commits made while we were not listening: look once.
                    self._commits.set()
                    async for notice in conn.notifies():
                        if not notice.payload.startswith(own):
                            self._commits.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for commits failed, reconnecting: %s", exc)
                self._commits.set()
                await asyncio.sleep(0.5)

    # -- maintenance ---------------------------------------------------------------------------

    async def status(self) -> StorageStatus:
        async with self._single() as session:
            size = int((await session.rows("SELECT pg_database_size(current_database())"))[0][0])
        return StorageStatus(size, size)

    async def defragment(self) -> None:
        """VACUUM FULL rewrites the tables compactly, returning the space compaction freed.

        Like etcd's defragmentation, which blocks its member while it copies
        the database, it locks each table while rewriting it: requests wait.
        """
        async with self._single() as session:
            await session.execute("VACUUM FULL kv, kv_history, lease, meta, member, alarm")
