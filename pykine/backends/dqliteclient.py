"""An asyncio client for dqlite: one connection to the leader, found by asking the nodes.

Only the leader serves SQL (followers answer "not leader" to reads too), so a
connection is made by asking known nodes who leads, as go-dqlite's connector
does: a node that names itself is kept; one that names another sends us there
(and that one must name itself). Requests go one at a time on a connection,
or several written at once (`pipeline`); statements are prepared once per
connection. The codec is backends/dqlitewire.py.

libdqlite 1.11 aborts its whole process (the node's host, often a pykine) when
a client runs a write through QUERY or a row-returning statement through EXEC
(docs/dqlite-research.md, 2.7), so this client sends only reads as queries,
everything else as executions, and refuses RETURNING outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
from collections.abc import Sequence
from typing import Any

from pykine.backends import dqlitewire as wire

DIAL_TIMEOUT = 5.0
READ = re.compile(r"\s*(SELECT|WITH)\b", re.IGNORECASE)
WRITE_WORD = re.compile(r"\b(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
# Prepared statements kept per connection; the least recently used beyond this are finalized.
PREPARED_LIMIT = 512


class NoLeader(Exception):
    """No node named a leader that accepted us."""


def is_query(sql: str) -> bool:
    """Whether `sql` is a pure read, which alone may go through QUERY; RETURNING is refused for both kinds."""
    if "RETURNING" in sql.upper():
        raise ValueError("dqlite 1.11 cannot run statements with RETURNING safely")
    found = READ.match(sql)
    return found is not None and (found[1].upper() == "SELECT" or WRITE_WORD.search(sql) is None)


class Connection:
    """One connection to a dqlite node, after the handshake."""

    def __init__(self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.address = address
        self._reader = reader
        self._writer = writer
        self._decoder = wire.Decoder()
        self._received: list[tuple[int, bytes]] = []
        # Executions sent without waiting: their responses come first, and are checked then.
        self._deferred = 0
        self._lock = asyncio.Lock()
        # Statement text -> (id, whether it is a read), checked once when prepared.
        self._prepared: dict[str, tuple[int, bool]] = {}
        # Our own handle on the socket, for the option set before every read (asyncio's
        # wrapper makes a new socket object on each call).
        transport_socket = writer.get_extra_info("socket")
        self._socket = socket.socket(fileno=os.dup(transport_socket.fileno())) if transport_socket else None

    @classmethod
    async def dial(cls, address: str) -> Connection:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), DIAL_TIMEOUT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(wire.handshake())
        return cls(address, reader, writer)

    async def _receive(self) -> tuple[int, bytes]:
        while True:
            kind, body = await self._next_message()
            if not self._deferred:
                return kind, body
            self._deferred -= 1
            if kind != wire.RESULT:
                # Which state the deferred statement left behind is unknown: the connection is done for.
                failure = wire.Reader(body)
                detail = f"{failure.uint64()}: {failure.text()}" if kind == wire.FAILURE else f"response {kind}"
                raise ConnectionError(f"a deferred dqlite statement failed ({detail})")

    async def _next_message(self) -> tuple[int, bytes]:
        while not self._received:
            if self._socket is not None:
                # dqlite sets no TCP_NODELAY: without an immediate ACK from us, its next small
                # response waits for our delayed ACK (40 ms) behind Nagle's algorithm.
                with contextlib.suppress(OSError):
                    self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionError(f"dqlite node {self.address} closed the connection")
            self._received.extend(self._decoder.feed(data))
        return self._received.pop(0)

    async def call(self, request: bytes, expected: int) -> wire.Reader:
        """Send one request and read its response, which must be of type `expected` (a FAILURE raises)."""
        async with self._lock:
            self._writer.write(request)
            kind, body = await self._receive()
        return wire.check(kind, body, expected)

    async def rows(self, request: bytes) -> list[tuple[Any, ...]]:
        """A QUERY or QUERY_SQL, with every ROWS message it is answered with."""
        async with self._lock:
            self._writer.write(request)
            collected: list[tuple[Any, ...]] = []
            while True:
                kind, body = await self._receive()
                wire.check(kind, body, wire.ROWS)
                batch = wire.parse_rows(body)
                collected += batch.rows
                if not batch.more:
                    return collected

    async def _statement(self, sql: str, read: bool) -> int:
        """The id of `sql` prepared on this connection (prepared now if it is new), if it is of the kind wanted."""
        found = self._prepared.pop(sql, None)
        if found is None:
            if len(self._prepared) >= PREPARED_LIMIT:
                oldest = next(iter(self._prepared))
                await self.call(wire.finalize(0, self._prepared.pop(oldest)[0]), wire.EMPTY)
            kind = is_query(sql)
            if kind == read:
                _, statement, _ = wire.parse_stmt((await self.call(wire.prepare(0, sql), wire.STMT)).body)
                found = statement, kind
            else:
                found = -1, kind
        if found[1] != read:
            what = "not a read, refusing to send it as a dqlite query" if read else "a read, refusing to execute it"
            raise ValueError(f"{what}: {sql[:60]}")
        self._prepared[sql] = found  # (re)inserted last: the dict's order is recency
        return found[0]

    async def query(self, sql: str, values: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a read, through a prepared statement."""
        return await self.rows(wire.query(0, await self._statement(sql, True), values))

    async def execute(self, sql: str, values: Sequence[Any] = ()) -> tuple[int, int]:
        """(last insert rowid, rows changed) of a statement that returns no rows, prepared."""
        request = wire.execute(0, await self._statement(sql, False), values)
        return wire.parse_result((await self.call(request, wire.RESULT)).body)

    async def execute_later(self, sql: str) -> None:
        """Send an execution (a read transaction's COMMIT) without waiting: the next request checks it."""
        statement = await self._statement(sql, False)
        async with self._lock:
            self._writer.write(wire.execute(0, statement))
            self._deferred += 1

    async def pipeline(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Execute statements in order, all written at once: one round trip for many.

        Every response is read before the first failure is raised, so the
        connection stays in step; a failed statement does not stop the ones
        after it, so callers run pipelines inside a transaction they roll back.
        """
        requests = [wire.execute(0, await self._statement(sql, False), values) for sql, values in statements]
        failure: Exception | None = None
        async with self._lock:
            self._writer.write(b"".join(requests))
            for _ in requests:
                kind, body = await self._receive()
                try:
                    wire.check(kind, body, wire.RESULT)
                except wire.DqliteFailure as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure

    async def leader(self) -> tuple[int, str]:
        return wire.parse_server((await self.call(wire.leader(), wire.SERVER)).body)

    async def exec_sql(self, sql: str, values: Sequence[Any] = ()) -> tuple[int, int]:
        """(last insert rowid, rows changed) of a statement that returns no rows."""
        return wire.parse_result((await self.call(wire.exec_sql(0, sql, values), wire.RESULT)).body)

    async def query_sql(self, sql: str, values: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self.rows(wire.query_sql(0, sql, values))

    async def cluster(self) -> list[tuple[int, str, int]]:
        return wire.parse_servers((await self.call(wire.cluster(), wire.SERVERS)).body)

    async def close(self) -> None:
        if self._socket is not None:
            self._socket.close()  # our duplicate of the descriptor only
            self._socket = None
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def connect_leader(addresses: Sequence[str], database: str, client_id: int = 0) -> Connection:
    """A connection to the current leader with `database` open; NoLeader if no node leads now."""
    order = list(addresses)
    random.shuffle(order)
    errors = []
    for address in order:
        try:
            connection = await _via(address)
        except (OSError, TimeoutError, ConnectionError, wire.DqliteFailure, wire.ProtocolError) as exc:
            errors.append(f"{address}: {exc or type(exc).__name__}")
            continue
        if connection is None:
            errors.append(f"{address}: knows no leader")
            continue
        try:
            await connection.call(wire.client(client_id), wire.WELCOME)
            await connection.call(wire.open_database(database), wire.DB)
        except BaseException:
            await connection.close()
            raise
        return connection
    raise NoLeader("no dqlite leader: " + "; ".join(errors))


async def _via(address: str) -> Connection | None:
    """A connection to the leader as `address` names it, or None if it names none."""
    connection = await Connection.dial(address)
    try:
        _, leader = await connection.leader()
    except BaseException:
        await connection.close()
        raise
    if leader == address:
        return connection
    await connection.close()
    if not leader:
        return None
    other = await Connection.dial(leader)
    try:
        _, named = await other.leader()
    except BaseException:
        await other.close()
        raise
    if named == leader:
        return other
    await other.close()
    return None
