"""Real servers for the tests: etcd 3.4 from Debian and pykine, side by side.

Clients use aetcd's protobuf stubs, which were generated from etcd's own
declarations, so every test also checks pykine's wire contract.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import databases
import grpc
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUBS = {
    "Auth": pb_grpc.AuthStub,
    "KV": pb_grpc.KVStub,
    "Maintenance": pb_grpc.MaintenanceStub,
    "Cluster": pb_grpc.ClusterStub,
    "Lease": pb_grpc.LeaseStub,
    "Watch": pb_grpc.WatchStub,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a loopback port with a gRPC channel to it."""

    name = "server"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        # TLS credentials for the test's own channel; None: plaintext.
        self.credentials: grpc.ChannelCredentials | None = None
        self.channel_options: list[tuple[str, str]] = []
        self.channel: grpc.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self.log_path = os.path.join(workdir, f"{self.name}.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), *self.channel_options]
        if self.credentials is None:
            self.channel = grpc.insecure_channel(self.address, options=options)
        else:
            self.channel = grpc.secure_channel(self.address, self.credentials, options=options)
        self._stubs = {}
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log()}")
            try:
                self.stub("Maintenance").Status(pb.StatusRequest(), timeout=1)
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    self.stop()  # not left running behind the failed test
                    raise RuntimeError(f"{self.name} did not start: {self.log()}") from None
                time.sleep(0.05)

    def stub(self, service: str) -> Any:
        if service not in self._stubs:
            self._stubs[service] = STUBS[service](self.channel)
        return self._stubs[service]

    def log(self) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """kill -9: no chance to flush anything."""
        self.stop(signal.SIGKILL)


class EtcdServer(Server):
    name = "etcd"

    def __init__(self, workdir: str, *extra_args: str) -> None:
        super().__init__(workdir)
        self.peer_port = free_port()
        self.extra_args = list(extra_args)
        self.client_scheme = "http"  # https with --cert-file and --key-file in extra_args
        # A member of a cluster of several: its name and the whole --initial-cluster.
        self.member_name = "default"
        self.initial_cluster = ""

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"{self.client_scheme}://{self.address}"
        return [
            shutil.which("etcd") or "etcd",
            f"--name={self.member_name}",
            f"--data-dir={os.path.join(self.workdir, 'etcd-data')}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.initial_cluster or f'default={peer}'}",
            "--logger=zap",
            "--log-level=error",
            *self.extra_args,
        ]


def etcdctl(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """Real etcdctl (API 3) against one server, its output captured."""
    return subprocess.run(
        ["etcdctl", f"--endpoints={server.address}", "--command-timeout=20s", *args],
        env=dict(os.environ, ETCDCTL_API="3"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def default_endpoint(workdir: str) -> str:
    """The datastore for a workdir; servers started on one workdir share it, as with SQLite.

    PYKINE_TEST_BACKEND=postgres or mysql puts it on a database server instead (see databases.py).
    """
    if databases.BACKEND == "sqlite":
        return f"sqlite://{os.path.join(workdir, 'state.db')}"
    if databases.BACKEND == "dqlite":
        return f"dqlite://{os.path.join(workdir, 'dqlite')}"
    if databases.BACKEND == "etcd":
        return upstream_etcd(os.path.join(workdir, "upstream-etcd"))
    name = "pykine_test_" + hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
    return databases.database_endpoint(databases.BACKEND, name)


# PYKINE_TEST_BACKEND=etcd: the real etcd a passthrough pykine forwards to, by endpoint. It runs
# while a pykine pointed at it runs, and keeps its data directory between runs, like a datastore.
_upstreams: dict[str, EtcdServer] = {}
_upstream_users: dict[str, set[int]] = {}
# pykine flags that, in passthrough, belong to the etcd behind it, with etcd 3.4's names.
UPSTREAM_FLAGS = {
    "--quota-backend-bytes=": "--quota-backend-bytes=",
    "--auth-token=": "--auth-token=",
    "--auth-token-ttl=": "--auth-token-ttl=",
    "--watch-progress-notify-interval=": "--experimental-watch-progress-notify-interval=",
}


def upstream_args(pykine_args: list[str]) -> list[str]:
    upstream = []
    for arg in pykine_args:
        for flag, etcd in UPSTREAM_FLAGS.items():
            if arg.startswith(flag):
                upstream.append(etcd + arg.removeprefix(flag))
    return upstream


def upstream_etcd(directory: str) -> str:
    """The endpoint of the upstream etcd kept in `directory` (started by the first pykine that uses it)."""
    for endpoint, server in _upstreams.items():
        if server.workdir == directory:
            return endpoint
    os.makedirs(directory, exist_ok=True)
    server = EtcdServer(directory)
    endpoint = f"http://{server.address}"
    _upstreams[endpoint] = server
    return endpoint


class PykineServer(Server):
    name = "pykine"

    def start(self, timeout: float = 30.0) -> None:
        upstream = _upstreams.get(self.endpoint)
        if upstream is not None:
            users = _upstream_users.setdefault(self.endpoint, set())
            if upstream.process is None:
                upstream.extra_args = upstream_args(self.extra_args)
                upstream.start()
            users.add(id(self))
        super().start(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        upstream = _upstreams.get(self.endpoint)
        users = _upstream_users.get(self.endpoint, set())
        if upstream is not None and id(self) in users:
            users.discard(id(self))
            if not users:
                upstream.stop()

    def __init__(self, workdir: str, *extra_args: str, endpoint: str | None = None) -> None:
        super().__init__(workdir)
        self.endpoint = endpoint if endpoint is not None else default_endpoint(workdir)
        self.extra_args = list(extra_args)
        self.listen_address = self.address
        # A test dqlite datastore is a directory of nodes; this server's node, once chosen.
        self.dqlite_node: tuple[str, str] | None = None

    def command(self) -> list[str]:
        endpoint, peer = self.endpoint, []
        if endpoint.startswith("dqlite://") and not any(arg.startswith("--peer-") for arg in self.extra_args):
            if self.dqlite_node is None:
                self.dqlite_node = databases.dqlite_node(endpoint.removeprefix("dqlite://"))
            endpoint, address = self.dqlite_node
            peer = [f"--peer-bind-address={address}"]
        return [
            sys.executable,
            "-m",
            "pykine",
            f"--listen-address={self.listen_address}",
            f"--endpoint={endpoint}",
            *peer,
            *self.extra_args,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        return env


@dataclass
class Outcome:
    """A response, or the gRPC error a call ended with."""

    response: Any = None
    code: grpc.StatusCode | None = None
    details: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


def call(server: Server, service: str, method: str, request: Any, timeout: float = 30) -> Outcome:
    try:
        return Outcome(response=getattr(server.stub(service), method)(request, timeout=timeout))
    except grpc.RpcError as error:
        return Outcome(code=error.code(), details=error.details())


def normalise(message: Any) -> Any:
    """Blank out what must differ between servers: ids and raft fields."""
    copy = type(message)()
    copy.CopyFrom(message)
    if copy.HasField("header"):
        for name in ("cluster_id", "member_id", "raft_term"):
            setattr(copy.header, name, 0)
    return copy


class Pair:
    """Real etcd and pykine, fresh, driven in lockstep."""

    def __init__(self, *pykine_args: str, etcd_args: tuple[str, ...] = ()) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pykine-pair-")
        self.etcd = EtcdServer(self.workdir, *etcd_args)
        self.pykine = PykineServer(self.workdir, *pykine_args)

    def start(self) -> Pair:
        self.etcd.start()
        self.pykine.start()
        return self

    def stop(self) -> None:
        self.pykine.stop()
        self.etcd.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def both(self, service: str, method: str, request: Any) -> tuple[Outcome, Outcome]:
        return call(self.etcd, service, method, request), call(self.pykine, service, method, request)

    def same(self, service: str, method: str, request: Any) -> Outcome:
        """Send one request to both servers and require identical answers."""
        want, got = self.both(service, method, request)
        assert (got.code, got.details) == (want.code, want.details), (
            f"{method} {request!r}: etcd said {want.code} {want.details!r}, pykine said {got.code} {got.details!r}"
        )
        if want.ok:
            expected, actual = normalise(want.response), normalise(got.response)
            assert actual == expected, f"{method} {request!r}\n--- etcd:\n{expected}\n--- pykine:\n{actual}"
        return got

    def kv(self, method: str, request: Any) -> Any:
        """A KV call on both; returns pykine's response (or Outcome for errors)."""
        outcome = self.same("KV", method, request)
        return outcome.response if outcome.ok else outcome

    def wipe(self) -> None:
        """Delete every key on both, keeping revisions in lockstep."""
        self.same("KV", "DeleteRange", pb.DeleteRangeRequest(key=b"\x00", range_end=b"\x00"))


@contextlib.contextmanager
def pair(*pykine_args: str, etcd_args: tuple[str, ...] = ()) -> Iterator[Pair]:
    servers = Pair(*pykine_args, etcd_args=etcd_args)
    try:
        yield servers.start()
    finally:
        servers.stop()


class BidiStream:
    """A bidirectional gRPC stream: requests go in through a queue, a thread reads the responses."""

    kind = "stream"

    def __init__(self, open_call: Any, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self._call = open_call(self._feed(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _feed(self) -> Iterator[Any]:
        while (request := self._requests.get()) is not None:
            yield request

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
        except grpc.RpcError as error:
            self.responses.put(error)

    def send(self, request: Any) -> None:
        self._requests.put(request)

    def next(self, timeout: float = 10) -> Any:
        """The next response; fails the test if none comes in time or the stream broke."""
        try:
            response = self.responses.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {self.kind} response within {timeout}s") from None
        if isinstance(response, grpc.RpcError):
            raise AssertionError(f"{self.kind} stream failed: {response.code()} {response.details()}")
        return response

    def close(self) -> None:
        self._call.cancel()
        self._requests.put(None)


class WatchSession(BidiStream):
    """One Watch stream."""

    kind = "watch"

    def __init__(self, server: Server, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        super().__init__(server.stub("Watch").Watch, metadata)

    def create(self, **options: Any) -> None:
        self.send(pb.WatchRequest(create_request=pb.WatchCreateRequest(**options)))

    def cancel(self, watch_id: int) -> None:
        self.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id)))

    def request_progress(self) -> None:
        self.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def drain(self, quiet: float = 0.3, limit: float = 10.0) -> list[Any]:
        """Every response that arrives until the stream is quiet for `quiet` seconds (or `limit` passes)."""
        got: list[Any] = []
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                response = self.responses.get(timeout=quiet)
            except queue.Empty:
                return got
            if isinstance(response, grpc.RpcError):
                raise AssertionError(f"watch stream failed: {response.code()} {response.details()}")
            got.append(response)
        return got


class KeepAliveStream(BidiStream):
    """One LeaseKeepAlive stream; it answers requests in order."""

    kind = "keep-alive"

    def __init__(self, server: Server) -> None:
        super().__init__(server.stub("Lease").LeaseKeepAlive)

    def keep_alive(self, lease_id: int, timeout: float = 10) -> Any:
        """Renew one lease and wait for its answer."""
        self.send(pb.LeaseKeepAliveRequest(ID=lease_id))
        return self.next(timeout)
