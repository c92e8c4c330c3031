"""dqlite: pykine's SQL schema, replicated by Raft, with the node inside the pykine process.

Each pykine process hosts one dqlite node (backends/dqlitenode.py) and talks
to the cluster's leader over dqlite's wire protocol (backends/dqliteclient.py),
as any other client would. Everything else is remote.py's: the schema and
statements are SQLite's (a Dialect with fewer parameters per statement and no
row locks), a write batch is one BEGIN IMMEDIATE ... COMMIT (dqlite has a
single write lock for the whole cluster, so commits follow revision order
across instances), and reads run in a transaction on the leader.

The data directory holds raft's files and `pykine-dqlite.json`, the node's
record: its id and address, the cluster it belongs to and the last known
members. The first node of a cluster bootstraps; later nodes join through
any member (`join=`), as spares, and the leader's process assigns roles
(backends/dqliteroles.py). Design and measurements: docs/dqlite-research.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pykine.backends import dqliteroles as roles
from pykine.backends import dqlitewire as wire
from pykine.backends.base import BackendError, ConnectionOptions, StorageStatus
from pykine.backends.dqliteclient import Connection, NoLeader, connect_leader
from pykine.backends.dqlitenode import BOOTSTRAP_ID, DqliteNode, generate_node_id
from pykine.backends.remote import RemoteSQLBackend
from pykine.backends.sqltext import DQLITE, Statements, member_rows
from pykine.engine.records import KnownRows, LeaseRow, MemberRow, RangeQuery, RangeRows, ReadSet, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")

DATABASE = "pykine"
RECORD = "pykine-dqlite.json"
# etcd's default peer port, on loopback: a single node needs no other address.
DEFAULT_PEER_ADDRESS = "127.0.0.1:2380"
# How long start-up waits for a leader (a restarting cluster needs a quorum of its nodes back).
START_TIMEOUT = 60.0
# How long a request looks for a leader (an election takes about a second) before failing UNAVAILABLE.
LEADER_TIMEOUT = 10.0
# How long a transaction retries while another connection holds the write lock (dqlite does not wait).
BUSY_TIMEOUT = 5.0
# dqlite's failure codes: not the leader (the transaction was rolled back), leadership lost
# while a commit was in flight (its outcome is unknown), unknown statement or database
# (the connection's state was lost with a leadership change).
NOT_LEADER, LEADERSHIP_LOST, NOT_FOUND = 10250, 10506, 12
# raft's "not leader" leaking through untranslated during a leadership transfer (not applied).
RAFT_NOT_LEADER = 7
BUSY = 5
# A member that has not answered for this long is replaced (its role passes to a spare).
OFFLINE_GRACE = 5.0
ROLES_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
# A request the leader has not acknowledged at the TCP level within this long fails, so a leader cut
# off by the network is left for the new one within about two seconds, not TCP's minutes.
USER_TIMEOUT_MS = 2000
READ_BEGIN = "BEGIN"
# ReadIndex by write: a commit the leader makes after a read arrived proves it still leads.
READ_BARRIER = "UPDATE meta SET value = value + 1 WHERE name = 'read_barrier'"
ADD_READ_BARRIER = "INSERT INTO meta (name, value) VALUES ('read_barrier', 0) ON CONFLICT DO NOTHING"
# Set while a read that must be linearizable runs (its sessions then pass a barrier first).
LINEARIZABLE: ContextVar[bool] = ContextVar("pykine_dqlite_linearizable", default=False)


class Retry(Exception):
    """The transaction was not applied and may run again on a new leader connection."""


# -- configuration -----------------------------------------------------------------------------


def peer_address(text: str, flag: str) -> str:
    """An IPv4 literal with a port: libdqlite 1.11 can bind and dial nothing else."""
    host, sep, port = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        valid = bool(sep) and port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        valid = False
    if not valid:
        raise BackendError(f"{flag} must be an IPv4 address and port like 10.0.0.1:2380, got {text!r}")
    return text


@dataclass(frozen=True)
class DqliteConfig:
    data_dir: str
    join: tuple[str, ...]
    bind: str
    advertise: str
    voters: int = 3
    standbys: int = 0
    # One-way network latency raft assumes; election timeouts are a multiple of it.
    latency_ms: int = 20
    start_timeout: float = START_TIMEOUT
    # Serve reads as dqlite's leader does, without confirming its leadership first (k8s-dqlite's behaviour).
    leader_reads: bool = False


def parse_dsn(dsn: str, options: ConnectionOptions) -> DqliteConfig:
    """dqlite://<data dir>?join=a:p,b:p&voters=3&standbys=0&latency=20ms&startTimeout=60s&leaderReads=false."""
    rest = dsn.partition("://")[2]
    path, _, query = rest.partition("?")
    if not path:
        raise BackendError("dqlite endpoint needs a data directory: dqlite://<data-dir>[?join=host:port,...]")
    values: dict[str, Any] = {}
    join: list[str] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "join":
            join += [peer_address(item, "join address") for item in value.split(",") if item]
        elif name in ("voters", "standbys"):
            if not value.isdigit():
                raise BackendError(f"dqlite option {name} must be a number, got {value!r}")
            values[name] = int(value)
        elif name == "leaderReads":
            if value not in ("true", "false"):
                raise BackendError(f"dqlite option leaderReads must be true or false, got {value!r}")
            values["leader_reads"] = value == "true"
        elif name in ("latency", "startTimeout"):
            from pykine.durations import parse_duration

            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise BackendError(f"dqlite option {name}: {exc}") from None
            if name == "latency":
                values["latency_ms"] = max(1, round(seconds * 1000))
            else:
                values["start_timeout"] = seconds
        else:
            raise BackendError(
                f"unknown dqlite option {name!r} (known: join, voters, standbys, latency, startTimeout, leaderReads)"
            )
    voters = values.get("voters", 3)
    if voters < 1 or voters % 2 == 0:
        raise BackendError(f"dqlite option voters must be odd, got {voters}")
    bind = peer_address(options.peer_bind_address or DEFAULT_PEER_ADDRESS, "--peer-bind-address")
    advertise = peer_address(options.peer_advertise_address or bind, "--peer-advertise-address")
    if ipaddress.IPv4Address(advertise.rpartition(":")[0]).is_unspecified:
        raise BackendError(f"--peer-advertise-address must be an address other nodes can dial, not {advertise}")
    return DqliteConfig(path, tuple(join), bind, advertise, **values)


@dataclass
class NodeRecord:
    """What the data directory remembers besides raft's files (written whole, then renamed into place)."""

    id: int
    address: str
    cluster_id: int = 0
    # Set until the leader has added this node, so that a crash before then adds it on restart.
    joining: bool = False
    members: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, data_dir: str) -> NodeRecord | None:
        path = os.path.join(data_dir, RECORD)
        try:
            with open(path, encoding="utf-8") as file:
                return cls(**json.load(file))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise BackendError(f"{path} is damaged ({exc}): refusing to start") from None

    def save(self, data_dir: str) -> None:
        path = os.path.join(data_dir, RECORD)
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            json.dump(asdict(self), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(path + ".tmp", path)


def open_record(config: DqliteConfig) -> NodeRecord:
    """This node's record: read back, or made for a new node (bootstrapping or joining)."""
    os.makedirs(config.data_dir, exist_ok=True)
    record = NodeRecord.load(config.data_dir)
    if record is not None:
        if record.address != config.advertise:
            raise BackendError(
                f"this dqlite node was created with address {record.address}, not {config.advertise}:"
                " a node keeps its address (start it with --peer-advertise-address as before)"
            )
        return record
    if any(name != RECORD + ".tmp" for name in os.listdir(config.data_dir)):
        raise BackendError(f"{config.data_dir} holds files pykine did not create: refusing to start a node there")
    if config.join:
        node_id = generate_node_id()
        record = NodeRecord(node_id, config.advertise, joining=True, members=list(config.join))
    else:
        record = NodeRecord(BOOTSTRAP_ID, config.advertise, members=[config.advertise])
    record.save(config.data_dir)
    return record


# -- connections and sessions -----------------------------------------------------------------------


def _needs_new_connection(exc: BaseException) -> bool:
    """Whether the connection's transaction is gone with a leadership change or the connection itself."""
    if isinstance(exc, wire.DqliteFailure):
        return exc.code in (NOT_LEADER, NOT_FOUND, RAFT_NOT_LEADER)
    return isinstance(exc, OSError | ConnectionError | TimeoutError | wire.ProtocolError | NoLeader)


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, wire.DqliteFailure) and exc.code & 0xFF == BUSY


def _keep_alive(connection: Connection) -> None:
    """Notice a leader that vanished without closing its sockets within seconds, not minutes."""
    sock = connection._socket
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


class LeaderPool:
    """Connections to the current leader; one that saw a leadership change or an error is dropped."""

    def __init__(self, addresses: Callable[[], Sequence[str]], size: int) -> None:
        self._addresses = addresses
        self._idle: list[Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    async def _connect(self) -> Connection:
        deadline = time.monotonic() + LEADER_TIMEOUT
        pause = 0.05
        while True:
            try:
                connection = await connect_leader(self._addresses(), DATABASE)
                _keep_alive(connection)
                return connection
            except (NoLeader, OSError, TimeoutError, wire.DqliteFailure, wire.ProtocolError) as exc:
                if self._closed or time.monotonic() + pause > deadline:
                    raise NoLeader(str(exc)) from None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    async def acquire(self) -> Connection:
        await self._slots.acquire()
        try:
            return self._idle.pop() if self._idle else await self._connect()
        except BaseException:
            self._slots.release()
            raise

    async def release(self, connection: Connection, spoiled: bool = False) -> None:
        """Return a connection; a spoiled one (its state unknown or on a former leader) is closed."""
        try:
            if spoiled or self._closed:
                await connection.close()
            else:
                self._idle.append(connection)
        finally:
            self._slots.release()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        connection = await self.acquire()
        try:
            yield connection
        except BaseException as exc:
            await self.release(connection, _spoils(exc))
            raise
        await self.release(connection)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


def _spoils(exc: BaseException) -> bool:
    """Whether a connection that raised `exc` must be closed: cancelled mid-request, or no longer the leader's."""
    return not isinstance(exc, Exception) or _needs_new_connection(exc)


class ReadBarriers:
    """etcd's ReadIndex on dqlite, whose leader serves reads without confirming that it still leads.

    Before a linearizable read runs on a connection to node A, a write must
    have committed on A after the read arrived: a commit needs a quorum in
    A's term, so no later leader existed then, and A's state includes every
    write acknowledged before the read began. The write goes through a
    connection of its own to A, and every read that arrived before it was
    sent shares it (as the NATS backend shares its STREAM.INFO).
    """

    def __init__(self) -> None:
        self._started: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._running: dict[str, asyncio.Future[None]] = {}
        self._connections: dict[str, Connection] = {}

    async def wait(self, address: str) -> None:
        wanted = self._started.get(address, 0) + 1
        while self._done.get(address, 0) < wanted:
            barrier = self._running.get(address)
            if barrier is None:
                number = self._started[address] = self._started.get(address, 0) + 1
                barrier = self._running[address] = asyncio.ensure_future(self._write(address, number))
            await asyncio.shield(barrier)

    async def _write(self, address: str, number: int) -> None:
        try:
            connection = self._connections.get(address)
            if connection is None:
                connection = await Connection.dial(address)
                _keep_alive(connection)
                await connection.call(wire.client(0), wire.WELCOME)
                await connection.call(wire.open_database(DATABASE), wire.DB)
                self._connections[address] = connection
            try:
                await _busy_retrying(partial(connection.execute, READ_BARRIER))
            except BaseException as exc:
                if _spoils(exc):
                    self._connections.pop(address, None)
                    await connection.close()
                raise
            self._done[address] = max(self._done.get(address, 0), number)
        finally:
            self._running.pop(address, None)

    async def close(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.close()


class _Session:
    """Statements on one leader connection, inside a transaction the caller opened."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await _busy_retrying(lambda: self.connection.query(statement, params))

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        await _busy_retrying(lambda: self.connection.execute(statement, params))

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        await self.connection.pipeline([(statement, row) for statement, rows in statements for row in rows])


class _AutocommitSession:
    """Each statement on its own, retried on a new leader connection when the leader changed.

    Used for reads of one statement and for idempotent writes (heartbeats,
    alarms, members), which may safely run twice.
    """

    def __init__(self, pool: LeaderPool, barriers: ReadBarriers | None) -> None:
        self.pool = pool
        self.barriers = barriers

    async def _run(self, use: Callable[[Connection], Awaitable[T]]) -> T:
        deadline = 0.0
        pause = 0.0005
        while True:
            connection = await self.pool.acquire()
            try:
                if self.barriers is not None and LINEARIZABLE.get():
                    await self.barriers.wait(connection.address)
                result = await use(connection)
            except BaseException as exc:
                await self.pool.release(connection, _spoils(exc))
                busy = _is_busy(exc)
                if not (busy or (isinstance(exc, Exception) and _needs_new_connection(exc))):
                    raise
                deadline = deadline or time.monotonic() + LEADER_TIMEOUT
                if time.monotonic() > deadline:
                    raise
                if busy:
                    await asyncio.sleep(pause * (0.5 + random.random()))
                    pause = min(pause * 2, 0.02)
                else:
                    log.debug("dqlite statement runs again on the new leader: %s", exc)
                continue
            await self.pool.release(connection)
            return result

    async def rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._run(lambda connection: connection.query(statement, params))

    async def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        await self._run(lambda connection: connection.execute(statement, params))

    async def execute_all(self, statements: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        for statement, rows in statements:
            for row in rows:
                await self.execute(statement, row)

    async def leader(self) -> int:
        """The leader's node id, as the leader itself says."""
        return (await self._run(lambda connection: connection.leader()))[0]


async def _busy_retrying(call: Callable[[], Awaitable[T]]) -> T:
    """Run `call` again, with growing jittered pauses, while dqlite answers BUSY (it never waits itself)."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.0005
    while True:
        try:
            return await call()
        except wire.DqliteFailure as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, 0.02)


async def _linearizable(read: Awaitable[T]) -> T:
    """Run a read that etcd would answer linearizably: its sessions pass a read barrier first."""
    token = LINEARIZABLE.set(True)
    try:
        return await read
    finally:
        LINEARIZABLE.reset(token)


# -- the backend ---------------------------------------------------------------------------------------


class DqliteBackend(RemoteSQLBackend):
    name = "dqlite"
    SQL = Statements(DQLITE)
    default_poll_interval = 0.02

    def __init__(self, dsn: str, options: ConnectionOptions | None = None) -> None:
        super().__init__(options or ConnectionOptions())
        self.config = parse_dsn(dsn, self.options)
        self.record: NodeRecord | None = None
        self._node: DqliteNode | None = None
        self._pool = LeaderPool(self._addresses, self.options.pool_bounds()[1])
        self._roles_task: asyncio.Task[None] | None = None
        self._barriers = ReadBarriers()
        # Voters in the configuration as last seen: with one, no other leader can exist.
        self._voters = 0

    def _addresses(self) -> list[str]:
        """Where to look for the leader: the members last seen, the join addresses and this node."""
        known = list(self.record.members) if self.record else []
        return list(dict.fromkeys([*known, *self.config.join, self.config.advertise]))

    # -- start and stop ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        self.record = record = open_record(config)
        self._node = await loop.run_in_executor(
            None, lambda: DqliteNode(record.id, config.bind, config.data_dir, network_latency_ms=config.latency_ms)
        )
        if config.bind != record.address:
            log.info("dqlite node %x listens on %s, advertised as %s", record.id, config.bind, record.address)
        await loop.run_in_executor(None, self._node.start)
        try:
            await self._join_cluster(record)
        except BaseException:
            await self.close()
            raise
        self._roles_task = asyncio.create_task(self._roles_loop(), name="pykine-dqlite-roles")

    async def _join_cluster(self, record: NodeRecord) -> None:
        """Find a leader, join if new, create the schema if the cluster is new, and check the cluster's id."""
        if not record.joining and self.config.join:
            await self._check_join_addresses(record)
        deadline = time.monotonic() + self.config.start_timeout
        announced = time.monotonic()
        while True:
            try:
                connection = await connect_leader(self._addresses(), DATABASE)
                break
            except NoLeader as exc:
                if time.monotonic() > deadline:
                    waited = f"within {self.config.start_timeout:g}s ({exc})"
                    if record.joining:
                        joining = ", ".join(self.config.join or record.members)
                        what = f"cannot join: none of {joining} answered as a dqlite leader {waited}"
                        raise BackendError(what) from None
                    raise BackendError(
                        f"no dqlite leader {waited}: a restarting cluster needs a majority of its voters running"
                    ) from None
                if time.monotonic() - announced > 5:
                    log.warning("waiting for a dqlite leader: %s", exc)
                    announced = time.monotonic()
                await asyncio.sleep(0.1)
        try:
            if record.joining:
                await self._add_self(connection, record)
            servers = await connection.cluster()
        finally:
            await connection.close()
        if record.id not in {node_id for node_id, _, _ in servers}:
            raise BackendError(
                f"dqlite node {record.id:x} is not a member of the cluster it reached"
                " (it was removed, or its data directory belongs to another cluster): refusing to start"
            )
        await self._init_schema()
        async with self._single() as session:
            await session.execute(ADD_READ_BARRIER)
        self._voters = sum(role == wire.VOTER for _, _, role in servers)
        cluster_id = await self.cluster_id()
        if record.cluster_id and record.cluster_id != cluster_id:
            raise BackendError(
                f"data directory {self.config.data_dir} belongs to cluster {record.cluster_id:x},"
                f" not to {cluster_id:x}: refusing to start"
            )
        record.cluster_id = cluster_id
        record.members = [address for _, address, _ in servers]
        record.save(self.config.data_dir)

    async def _check_join_addresses(self, record: NodeRecord) -> None:
        """A member restarted with `join=` must belong to the cluster those addresses lead, if they answer.

        Otherwise its data directory belongs to another cluster, which its own
        raft state might well go on serving (every cluster's first node has the
        same id, so the cluster ids are compared, not the node ids).
        """
        try:
            connection = await connect_leader(self.config.join, DATABASE)
        except (NoLeader, OSError, TimeoutError, wire.DqliteFailure, wire.ProtocolError):
            return  # not up yet, as in a full restart: the checks after finding a leader still run
        try:
            servers = await connection.cluster()
            rows = await connection.query("SELECT value FROM meta WHERE name = 'cluster_id'")
        except wire.DqliteFailure:
            rows = []  # no schema there yet
        finally:
            await connection.close()
        theirs = int(rows[0][0]) if rows else 0
        joined = ", ".join(self.config.join)
        if record.cluster_id and theirs and theirs != record.cluster_id:
            raise BackendError(
                f"data directory {self.config.data_dir} belongs to cluster {record.cluster_id:x}, not to"
                f" cluster {theirs:x} at {joined}: refusing to start"
            )
        if record.id not in {node_id for node_id, _, _ in servers}:
            raise BackendError(
                f"dqlite node {record.id:x} is not a member of the cluster at {joined}"
                " (it was removed, or its data directory belongs to another cluster): refusing to start"
            )

    async def _add_self(self, connection: Connection, record: NodeRecord) -> None:
        """Ask the leader to add this node (as a spare); a node added before a crash is not added twice."""
        deadline = time.monotonic() + self.config.start_timeout
        while True:
            servers = await connection.cluster()
            if record.id in {node_id for node_id, _, _ in servers}:
                break
            try:
                await connection.call(wire.add(record.id, record.address), wire.EMPTY)
                break
            except wire.DqliteFailure as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise BackendError(f"cannot join the dqlite cluster: {exc}") from None
                await asyncio.sleep(0.2)  # another configuration change is in progress
        log.info("dqlite node %x (%s) joined the cluster", record.id, record.address)
        record.joining = False
        record.save(self.config.data_dir)

    def _barriers_needed(self) -> ReadBarriers | None:
        return None if self._voters == 1 or self.config.leader_reads else self._barriers

    async def read_range(self, query: RangeQuery, known: KnownRows | None = None) -> RangeRows:
        return await _linearizable(super().read_range(query, known))

    async def read_snapshot(self, reads: ReadSet) -> Snapshot:
        return await _linearizable(super().read_snapshot(reads))

    async def read_lease(self, lease_id: int, with_keys: bool) -> tuple[int, LeaseRow | None, list[bytes]]:
        return await _linearizable(super().read_lease(lease_id, with_keys))

    async def lease_ids(self) -> tuple[int, list[int]]:
        return await _linearizable(super().lease_ids())

    async def close(self) -> None:
        if self._roles_task is not None:
            self._roles_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._roles_task
            self._roles_task = None
        await self.close_duty_connection()
        await self._barriers.close()
        await self._pool.close()
        node, self._node = self._node, None
        if node is not None:
            await asyncio.get_running_loop().run_in_executor(None, node.close)

    # -- sessions ----------------------------------------------------------------------------------

    async def _begin(self, begin: str) -> Connection:
        """A leader connection inside a new transaction, found again if the leader changed."""
        deadline = time.monotonic() + LEADER_TIMEOUT
        while True:
            connection = await self._pool.acquire()
            try:
                barriers = self._barriers_needed()
                if begin == READ_BEGIN and barriers is not None and LINEARIZABLE.get():
                    await barriers.wait(connection.address)
                await _busy_retrying(partial(connection.execute, begin))
                return connection
            except BaseException as exc:
                await self._pool.release(connection, _spoils(exc))
                if not (isinstance(exc, Exception) and _needs_new_connection(exc)) or time.monotonic() > deadline:
                    raise
                log.debug("dqlite transaction begins again on the new leader: %s", exc)

    @contextlib.asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[_Session]:
        """BEGIN ... COMMIT on one leader connection; Retry when it was rolled back by a leadership change."""
        connection = await self._begin(begin)
        try:
            yield _Session(connection)
        except BaseException as exc:
            spoiled = _spoils(exc)
            if not spoiled:
                try:
                    await connection.execute("ROLLBACK")
                except Exception:
                    spoiled = True
            await self._pool.release(connection, spoiled)
            if isinstance(exc, Exception) and _needs_new_connection(exc):
                raise Retry(f"the dqlite leader changed during a transaction (rolled back): {exc}") from exc
            raise
        if begin == READ_BEGIN:
            # Nothing to lose in a read transaction's end, so the reader need not wait for it.
            await connection.execute_later("COMMIT")
            await self._pool.release(connection)
            return
        try:
            await connection.execute("COMMIT")
        except BaseException as exc:
            # Closing the connection rolls back whatever is left; 10506 or a lost connection
            # leave the outcome unknown, which the caller reports as unavailable.
            await self._pool.release(connection, spoiled=True)
            if isinstance(exc, wire.DqliteFailure) and exc.code in (NOT_LEADER, RAFT_NOT_LEADER):
                raise Retry(f"dqlite refused the commit (not applied): {exc}") from exc
            raise
        await self._pool.release(connection)

    def _read_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._transaction(READ_BEGIN)

    def _write_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._transaction("BEGIN IMMEDIATE")

    def _schema_session(self) -> contextlib.AbstractAsyncContextManager[_Session]:
        return self._transaction("BEGIN IMMEDIATE")

    @contextlib.asynccontextmanager
    async def _single(self) -> AsyncIterator[_AutocommitSession]:
        yield _AutocommitSession(self._pool, self._barriers_needed())

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, Retry)

    # -- duties: held by the process whose node leads -------------------------------------------------

    async def _connect_duty(self) -> Connection:
        connection = await Connection.dial(self.config.advertise)
        _keep_alive(connection)
        return connection

    async def _try_duty_lock(self, connection: Connection) -> bool:
        assert self.record is not None
        return (await connection.leader())[0] == self.record.id

    async def _ping(self, connection: Connection) -> None:
        if not await self._try_duty_lock(connection):
            raise BackendError("this dqlite node no longer leads")

    async def _close_connection(self, connection: Connection) -> None:
        await connection.close()

    # -- members and roles ---------------------------------------------------------------------------

    def member_id(self) -> int | None:
        return self.record.id if self.record else None

    async def members(self, since: float) -> list[MemberRow]:
        """Every node in the Raft configuration, as etcd lists members that are down too."""
        async with self._pool.connection() as connection:
            servers = await connection.cluster()
        async with self._single() as session:
            rows = {row.id: row for row in member_rows(await session.rows(self.SQL.members, (0,)))}
        return [rows.get(node_id) or MemberRow(node_id, address, "") for node_id, address, _ in sorted(servers)]

    async def move_leader(self, member_id: int) -> bool:
        async with self._pool.connection() as connection:
            if (await connection.leader())[0] == member_id:
                return True
            await connection.call(wire.transfer(member_id), wire.EMPTY)
        log.info("moved dqlite leadership to node %x", member_id)
        return True

    async def remove_member(self, member_id: int) -> bool:
        """Take a node out of the Raft configuration for good (its process stops when it notices)."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        async with self._pool.connection() as connection:
            while True:
                try:
                    await connection.call(wire.remove(member_id), wire.EMPTY)
                    break
                except wire.DqliteFailure as exc:
                    if not _is_busy(exc) or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.2)  # another configuration change is in progress
        log.info("removed dqlite node %x from the cluster", member_id)
        return True

    async def _roles_loop(self) -> None:
        """Watch the configuration: stop if this node was removed; in the leader's process, assign roles."""
        offline_since: dict[int, float] = {}
        while True:
            await asyncio.sleep(ROLES_INTERVAL)
            try:
                async with self._pool.connection() as connection:
                    servers = [roles.Node(*server) for server in await connection.cluster()]
                    if self._removed(servers):
                        return
                    self._voters = sum(node.role == wire.VOTER for node in servers)
                    if self._duty_connection is None:
                        offline_since.clear()
                    else:
                        await self._adjust_roles(connection, servers, offline_since)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("checking the dqlite cluster's members failed: %s", exc)

    def _removed(self, servers: list[roles.Node]) -> bool:
        """As a removed etcd member does, stop serving once this node has left the configuration."""
        assert self.record is not None
        if self.record.id in {node.id for node in servers}:
            if [node.address for node in servers] != self.record.members:
                self.record.members = [node.address for node in servers]
                self.record.save(self.config.data_dir)
            return False
        log.error("dqlite node %x was removed from the cluster: stopping", self.record.id)
        os.kill(os.getpid(), signal.SIGTERM)
        return True

    async def _adjust_roles(
        self, connection: Connection, servers: list[roles.Node], offline_since: dict[int, float]
    ) -> None:
        assert self.record is not None
        answered = await asyncio.gather(*(roles.probe(node.address, PROBE_TIMEOUT) for node in servers))
        now = time.monotonic()
        for node, online in zip(servers, answered, strict=True):
            if online:
                offline_since.pop(node.id, None)
            else:
                offline_since.setdefault(node.id, now)
        offline = {node_id for node_id, since in offline_since.items() if now - since >= OFFLINE_GRACE}
        change = roles.adjust(servers, offline, self.record.id, self.config.voters, self.config.standbys)
        if change is not None:
            node_id, role = change
            await connection.call(wire.assign(node_id, role), wire.EMPTY)
            log.info("dqlite node %x is now a %s", node_id, roles.ROLE_NAMES[role])

    # -- maintenance ---------------------------------------------------------------------------------

    async def status(self) -> StorageStatus:
        """The pages in use, as both sizes: dqlite cannot VACUUM, so free pages are never returned,
        only reused; counting them would keep the space quota's alarm raised for good after one
        burst of writes, whatever compaction frees."""
        async with self._single() as session:
            rows = await session.rows(
                "SELECT (page_count - freelist_count) * page_size"
                " FROM pragma_page_count(), pragma_page_size(), pragma_freelist_count()"
            )
            leader = await session.leader()
        in_use = int(rows[0][0])
        return StorageStatus(in_use, in_use, leader)

    async def defragment(self) -> None:
        """dqlite cannot VACUUM (its database is replicated page by page); free pages are reused as it is."""
        log.info("defragment: dqlite cannot VACUUM; free pages are reused by later writes")
