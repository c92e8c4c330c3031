"""MySQL 8 and MariaDB 10.11, through asyncmy (async, a pool).

Commit order, snapshots and duties follow remote.py: write batches lock the
revision row with SELECT ... FOR UPDATE, reads run in START TRANSACTION WITH
CONSISTENT SNAPSHOT. MySQL has no notifications, so instances look for each
other's commits by polling the revision row (--datastore-poll-interval).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote

import asyncmy
from asyncmy.connection import Connection
from asyncmy.errors import MySQLError, OperationalError

from pykine import redaction
from pykine.backends import identity
from pykine.backends.base import BackendError, ConnectionOptions, StorageStatus
from pykine.backends.remote import RemoteSQLBackend
from pykine.backends.sqltext import MYSQL, MYSQL_MAX_KEY_BYTES, Statements

DEFAULT_DATABASE = "kubernetes"
DEFAULT_PORT = 3306
# "IF NOT EXISTS" statements that find what they would create leave notes, which asyncmy logs as warnings.
QUIET = "SET SESSION sql_notes = 0"
# Server error codes of a transaction that lost a lock race.
DEADLOCK, LOCK_WAIT_TIMEOUT = 1213, 1205
# kine's form is mysql://user:pass@tcp(host:port)/db; the plain URL form works too.
DSN = re.compile(
    r"mysql://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@]*))?@)?"
    r"(?:tcp\((?P<tcp>[^)]*)\)|unix\((?P<unix>[^)]*)\)|(?P<plain>[^/?]*))"
    r"(?:/(?P<database>[^?]*))?(?:\?(?P<query>.*))?$"
)


def lock_name(purpose: str, database: str) -> str:
    """MySQL's named locks are server-wide: name them after the database (at most 64 characters)."""
    name = f"pykine.{purpose}.{database}"
    return name if len(name) <= 64 else f"pykine.{purpose}." + hashlib.sha1(database.encode()).hexdigest()


def parse_dsn(dsn: str, options: ConnectionOptions) -> dict[str, Any]:
    """asyncmy connection arguments (without the database) and the database name, from a kine MySQL DSN."""
    match = DSN.match(dsn)
    if match is None:
        raise identity.failure(f"cannot parse mysql endpoint {dsn!r} (expected mysql://user:pass@tcp(host:port)/db)")
    if match["password"]:
        redaction.register(match["password"])
    args: dict[str, Any] = {
        "user": unquote(match["user"] or "root"),
        "password": unquote(match["password"] or ""),
        "database": match["database"] or DEFAULT_DATABASE,
    }
    if match["unix"]:
        args["unix_socket"] = match["unix"]
    else:
        address = match["tcp"] if match["tcp"] is not None else match["plain"]
        host, sep, port = (address or "").rpartition(":")
        if not sep:
            host, port = address or "", ""
        if port and not port.isdigit():
            raise BackendError(f"mysql endpoint port must be a number, got {port!r}")
        args["host"] = host.strip("[]") or "127.0.0.1"
        args["port"] = int(port or DEFAULT_PORT)
    query = dict(parse_qsl(match["query"] or ""))
    if identity.KEYTAB_PARAMETER in query:
        raise BackendError(f"Kerberos ({identity.KEYTAB_PARAMETER}) is supported for postgres endpoints only")
    tls = query.get("tls", "")
    context = tls_context(options, tls)
    if context is not None:
        args["ssl"] = context
    return args


def tls_context(options: ConnectionOptions, tls: str) -> ssl.SSLContext | None:
    """kine's --ca-file/--cert-file/--key-file/--skip-verify (or the DSN's tls=) as an SSL context."""
    wanted = options.ca_file or options.cert_file or options.skip_verify or tls in ("true", "skip-verify", "preferred")
    if not wanted:
        return None
    context = ssl.create_default_context(cafile=options.ca_file or None)
    if options.cert_file:
        context.load_cert_chain(options.cert_file, options.key_file or None)
    if options.skip_verify or tls in ("skip-verify", "preferred"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Session:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cursor:
            await cursor.execute(statement, params or None)
            return list(await cursor.fetchall())

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        async with self.conn.cursor() as cursor:
            await cursor.execute(statement, params or None)

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        async with self.conn.cursor() as cursor:
            for statement, rows in statements:
                await cursor.executemany(statement, rows)


class MySQLBackend(RemoteSQLBackend):
    name = "mysql"
    SQL = Statements(MYSQL)
    max_key_bytes = MYSQL_MAX_KEY_BYTES
    default_poll_interval = 0.05

    def __init__(self, dsn: str, options: ConnectionOptions | None = None) -> None:
        super().__init__(options or ConnectionOptions())
        args = parse_dsn(dsn, self.options)
        self.database: str = args.pop("database")
        self._connect_args = dict(args, charset="utf8mb4", binary_prefix=True, autocommit=True, connect_timeout=5)
        tokens = identity.mysql_token_source(args, self.options)
        if tokens is not None:
            # asyncmy asks for a password before every authentication, its pool's new connections included.
            self._connect_args["password_creator"] = tokens.token
        self._pool: Any = None

    # -- connections -------------------------------------------------------------------

    async def _connect(self, database: str | None = None) -> Connection:
        return await asyncmy.connect(**self._connect_args, database=database or self.database)

    async def start(self) -> None:
        idle, most = self.options.pool_bounds()
        try:
            server = await asyncmy.connect(**self._connect_args)
            try:
                async with server.cursor() as cursor:
                    await cursor.execute(QUIET)
                    await cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database.replace('`', '``')}`")
            finally:
                await server.ensure_closed()
            await self._init_schema()
            self._pool = await asyncmy.create_pool(
                minsize=idle,
                maxsize=most,
                # asyncmy replaces a connection that has been idle this long (it has no age limit).
                pool_recycle=int(self.options.connection_max_lifetime) or 3600,
                database=self.database,
                **self._connect_args,
            )
        except (MySQLError, OSError) as exc:
            raise identity.failure(f"cannot open mysql database {self.database}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _schema_session(self) -> AsyncIterator[_Session]:
        conn = await self._connect()
        try:
            session = _Session(conn)
            await session.execute(QUIET)
            # DDL commits implicitly in MySQL, so a named lock (not a transaction) keeps instances apart.
            await session.execute("SELECT GET_LOCK(%s, 60)", (lock_name("schema", self.database),))
            yield session
        finally:
            await conn.ensure_closed()  # closing the connection releases the lock

    async def close(self) -> None:
        await self.close_duty_connection()
        if self._pool is not None:
            self._pool.close()
            await self._pool.wait_closed()

    @contextlib.asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[_Session]:
        async with self._pool.acquire() as conn:
            session = _Session(conn)
            await session.execute(QUIET)
            await session.execute(begin)
            try:
                yield session
            except BaseException:
                with contextlib.suppress(MySQLError, OSError):
                    await session.execute("ROLLBACK")
                raise
            await session.execute("COMMIT")

    def _read_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._transaction("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")

    def _write_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        # REPEATABLE READ, whose snapshot starts at the first plain read: after the revision row's lock.
        return self._transaction("START TRANSACTION")

    @contextlib.asynccontextmanager
    async def _single(self) -> AsyncIterator[_Session]:
        async with self._pool.acquire() as conn:
            yield _Session(conn)

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, OperationalError) and bool(exc.args) and exc.args[0] in (DEADLOCK, LOCK_WAIT_TIMEOUT)

    # -- the duty lock ---------------------------------------------------------------------

    async def _connect_duty(self) -> Connection:
        return await self._connect()

    async def _try_duty_lock(self, connection: Connection) -> bool:
        rows = await _Session(connection).rows("SELECT GET_LOCK(%s, 0)", (lock_name("duties", self.database),))
        return bool(rows and rows[0][0] == 1)

    async def _ping(self, connection: Connection) -> None:
        await _Session(connection).rows("SELECT 1")

    async def _close_connection(self, connection: Connection) -> None:
        await connection.ensure_closed()

    # -- maintenance -------------------------------------------------------------------------

    async def status(self) -> StorageStatus:
        async with self._single() as session:
            rows = await session.rows(
                "SELECT COALESCE(SUM(data_length + index_length + data_free), 0), COALESCE(SUM(data_free), 0)"
                " FROM information_schema.tables WHERE table_schema = DATABASE()"
            )
        size, free = int(rows[0][0]), int(rows[0][1])
        return StorageStatus(size, size - free)

    async def defragment(self) -> None:
        """OPTIMIZE rebuilds InnoDB tables in place (online), returning their free space."""
        async with self._single() as session:
            await session.rows("OPTIMIZE TABLE kv, kv_history, lease, meta")
