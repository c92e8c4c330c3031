"""pykine's command line: flags, PYKINE_/KINE_ environment variables, log format, listen forms.

kine users configure it through flags or KINE_* variables; pykine must honour both, with
flags winning, so it can be dropped into a kine deployment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from harness import ROOT, free_port

import pykine


def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any PYKINE_/KINE_ settings, plus the given ones."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYKINE_", "KINE_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(overrides)
    return env


class Pykine:
    """`python -m pykine` with exactly the given flags and environment; stdout and stderr kept apart."""

    def __init__(self, workdir: Path, *args: str, target: str, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.args = list(args)
        self.target = target  # where clients connect, in gRPC's spelling
        self.env = env if env is not None else clean_env()
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stdout_path = workdir / "pykine.stdout"
        self.stderr_path = workdir / "pykine.stderr"

    def start(self, timeout: float = 30.0) -> Pykine:
        with open(self.stdout_path, "ab") as stdout, open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pykine", *self.args],
                cwd=self.workdir,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
            )
        self.channel = grpc.insecure_channel(self.target)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"pykine exited with {self.process.returncode}: {self.stderr()}")
            try:
                self.maintenance().Status(pb.StatusRequest(), timeout=1)
                return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pykine did not answer on {self.target}: {self.stderr()}") from None
                time.sleep(0.05)

    def kv(self) -> pb_grpc.KVStub:
        assert self.channel is not None
        return pb_grpc.KVStub(self.channel)

    def maintenance(self) -> pb_grpc.MaintenanceStub:
        assert self.channel is not None
        return pb_grpc.MaintenanceStub(self.channel)

    def cluster(self) -> pb_grpc.ClusterStub:
        assert self.channel is not None
        return pb_grpc.ClusterStub(self.channel)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was never started)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pykine-cli-") as path:
        yield Path(path)


@pytest.fixture
def running(workdir: Path) -> Iterator[list[Pykine]]:
    """Servers a test starts; all are stopped afterwards, whatever happens."""
    servers: list[Pykine] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def launch(running: list[Pykine], workdir: Path, *args: str, target: str, env: dict[str, str] | None = None) -> Pykine:
    server = Pykine(workdir, *args, target=target, env=env)
    running.append(server)
    return server.start()


def launch_local(running: list[Pykine], workdir: Path, *args: str, env: dict[str, str] | None = None) -> Pykine:
    """A pykine on a free loopback port with its database in workdir."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    return launch(running, workdir, f"--listen-address={address}", db_flag(workdir), *args, target=address, env=env)


def round_trip(server: Pykine, key: bytes = b"cli/key", value: bytes = b"cli-value") -> None:
    """A write and a read through the server prove it is really the one answering."""
    server.kv().Put(pb.PutRequest(key=key, value=value), timeout=10)
    got = server.kv().Range(pb.RangeRequest(key=key), timeout=10)
    assert [kv.value for kv in got.kvs] == [value]


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def db_flag(workdir: Path) -> str:
    return f"--endpoint=sqlite://{workdir}/state.db"


@pytest.mark.parametrize("variable", ["PYKINE_LISTEN_ADDRESS", "KINE_LISTEN_ADDRESS"])
def test_listen_address_from_environment(workdir: Path, running: list[Pykine], variable: str) -> None:
    """Both spellings of the variable move the listener, with no flag given."""
    port = free_port()
    env = clean_env(**{variable: f"127.0.0.1:{port}"})
    server = launch(running, workdir, db_flag(workdir), target=f"127.0.0.1:{port}", env=env)
    round_trip(server)
    members = server.cluster().MemberList(pb.MemberListRequest(), timeout=10).members
    assert [list(member.clientURLs) for member in members] == [[f"http://127.0.0.1:{port}"]]


def test_pykine_variable_wins_over_kine_variable(workdir: Path, running: list[Pykine]) -> None:
    """PYKINE_* is pykine's own name, so it beats the kine-compatible KINE_* one."""
    mine, kines = free_port(), free_port()
    env = clean_env(PYKINE_LISTEN_ADDRESS=f"127.0.0.1:{mine}", KINE_LISTEN_ADDRESS=f"127.0.0.1:{kines}")
    server = launch(running, workdir, db_flag(workdir), target=f"127.0.0.1:{mine}", env=env)
    round_trip(server)
    assert refuses_connections(kines)


@pytest.mark.parametrize("variable", ["PYKINE_LISTEN_ADDRESS", "KINE_LISTEN_ADDRESS"])
def test_flag_wins_over_environment(workdir: Path, running: list[Pykine], variable: str) -> None:
    """An explicit --listen-address overrides whatever the environment says."""
    flag_port, env_port = free_port(), free_port()
    env = clean_env(**{variable: f"127.0.0.1:{env_port}"})
    server = launch(
        running,
        workdir,
        f"--listen-address=127.0.0.1:{flag_port}",
        db_flag(workdir),
        target=f"127.0.0.1:{flag_port}",
        env=env,
    )
    round_trip(server)
    assert refuses_connections(env_port)


@pytest.mark.parametrize("variable", ["PYKINE_ENDPOINT", "KINE_ENDPOINT"])
def test_endpoint_from_environment(workdir: Path, running: list[Pykine], variable: str) -> None:
    """The variable picks the SQLite file: it is created, and the data is there after a restart."""
    path = workdir / "from-env.db"
    port = free_port()
    env = clean_env(**{variable: f"sqlite://{path}?_busy_timeout=5000"})
    server = launch(running, workdir, f"--listen-address=127.0.0.1:{port}", target=f"127.0.0.1:{port}", env=env)
    round_trip(server, b"env/key", b"kept")
    assert server.stop() == 0
    assert path.is_file() and path.stat().st_size > 0
    assert not (workdir / "db").exists(), "the default database was created as well"

    again = launch(running, workdir, f"--listen-address=127.0.0.1:{port}", target=f"127.0.0.1:{port}", env=env)
    got = again.kv().Range(pb.RangeRequest(key=b"env/key"), timeout=10)
    assert [kv.value for kv in got.kvs] == [b"kept"]


def test_endpoint_flag_wins_over_environment(workdir: Path, running: list[Pykine]) -> None:
    """--endpoint beats PYKINE_ENDPOINT: only the flag's file is created."""
    port = free_port()
    env = clean_env(PYKINE_ENDPOINT=f"sqlite://{workdir}/env.db")
    server = launch(
        running,
        workdir,
        f"--listen-address=127.0.0.1:{port}",
        f"--endpoint=sqlite://{workdir}/flag.db",
        target=f"127.0.0.1:{port}",
        env=env,
    )
    round_trip(server)
    assert (workdir / "flag.db").is_file()
    assert not (workdir / "env.db").exists()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "3.5.13"),
        (["--emulated-etcd-version=3.5.21"], {}, "3.5.21"),
        ([], {"PYKINE_EMULATED_ETCD_VERSION": "3.6.1"}, "3.6.1"),
        ([], {"KINE_EMULATED_ETCD_VERSION": "3.5.17"}, "3.5.17"),
        (["--emulated-etcd-version=3.5.21"], {"KINE_EMULATED_ETCD_VERSION": "3.5.17"}, "3.5.21"),
    ],
    ids=["default", "flag", "pykine-env", "kine-env", "flag-beats-env"],
)
def test_emulated_etcd_version(
    workdir: Path, running: list[Pykine], args: list[str], env: dict[str, str], expected: str
) -> None:
    """The version Status reports is what clients gate features on; every source of it must work."""
    server = launch_local(running, workdir, *args, env=clean_env(**env))
    assert server.maintenance().Status(pb.StatusRequest(), timeout=10).version == expected


def _json_lines(text: str) -> list[dict[str, object]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stderr line {number} is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--log-format=json", "--debug"], {}), ([], {"PYKINE_LOG_FORMAT": "json", "PYKINE_DEBUG": "true"})],
    ids=["flags", "environment"],
)
def test_json_logs(workdir: Path, running: list[Pykine], args: list[str], env: dict[str, str]) -> None:
    """With JSON logging every stderr line, from start through requests and errors to SIGTERM, is JSON."""
    server = launch_local(running, workdir, *args, env=clean_env(**env))
    round_trip(server)
    with pytest.raises(grpc.RpcError):
        server.kv().Range(pb.RangeRequest(key=b""), timeout=10)  # an error answer, in case it is logged
    server.kv().Compact(pb.CompactionRequest(revision=2), timeout=10)
    assert server.stop() == 0

    entries = _json_lines(server.stderr())
    assert server.stdout() == ""
    assert len(entries) >= 2
    for entry in entries:
        assert {"time", "level", "msg"} <= entry.keys(), entry
    messages = [str(entry["msg"]) for entry in entries]
    assert any("serving" in message and server.target in message for message in messages), messages
    assert any("shutting down" in message for message in messages), messages


def test_plain_logs_by_default(workdir: Path, running: list[Pykine]) -> None:
    """Without the flag logs are for people: readable lines, not JSON."""
    port = free_port()
    server = launch(
        running, workdir, f"--listen-address=127.0.0.1:{port}", db_flag(workdir), target=f"127.0.0.1:{port}"
    )
    round_trip(server)
    assert server.stop() == 0
    lines = server.stderr().splitlines()
    assert any("serving" in line for line in lines), lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


def test_kine_log_format_variable_is_not_honoured(workdir: Path, running: list[Pykine]) -> None:
    """kine has no --log-format, so KINE_LOG_FORMAT means nothing; only PYKINE_LOG_FORMAT counts."""
    server = launch_local(running, workdir, env=clean_env(KINE_LOG_FORMAT="json"))
    assert server.stop() == 0
    first = server.stderr().splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


def test_unix_socket(running: list[Pykine]) -> None:
    """unix://path serves gRPC on a socket file; the member's client URL names it."""
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="pk-", dir="/tmp") as path:
        workdir = Path(path)
        sock = workdir / "pykine.sock"
        server = launch(running, workdir, f"--listen-address=unix://{sock}", db_flag(workdir), target=f"unix:{sock}")
        assert sock.is_socket()
        round_trip(server)
        members = server.cluster().MemberList(pb.MemberListRequest(), timeout=10).members
        assert [list(member.clientURLs) for member in members] == [[f"unix://{sock}"]]
        assert server.stop() == 0


def test_version() -> None:
    """--version prints the package version and exits 0, both as a module and as the console script."""
    for command in (
        [sys.executable, "-m", "pykine", "--version"],
        [str(Path(sys.executable).parent / "pykine"), "--version"],
    ):
        done = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"pykine {pykine.__version__}"
        assert re.fullmatch(r"\d+\.\d+\.\d+\S*", pykine.__version__)


def test_help_lists_every_flag() -> None:
    """--help is the documentation operators see; it must name every flag."""
    done = subprocess.run(
        [sys.executable, "-m", "pykine", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for flag in (
        "--listen-address",
        "--endpoint",
        "--log-format",
        "--debug",
        "--emulated-etcd-version",
        "--compact-batch-size",
        "--version",
    ):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("args", [[], ["--endpoint="], ["--endpoint=sqlite://"]], ids=["no-flag", "empty", "no-path"])
def test_default_endpoint_is_db_state_db_in_working_directory(
    workdir: Path, running: list[Pykine], args: list[str]
) -> None:
    """Like kine, no endpoint means SQLite at ./db/state.db, relative to where pykine runs."""
    port = free_port()
    server = launch(running, workdir, f"--listen-address=127.0.0.1:{port}", *args, target=f"127.0.0.1:{port}")
    round_trip(server, b"default/key", b"here")
    assert server.stop() == 0
    database = workdir / "db" / "state.db"
    assert database.is_file() and database.stat().st_size > 0

    again = launch(running, workdir, f"--listen-address=127.0.0.1:{port}", *args, target=f"127.0.0.1:{port}")
    got = again.kv().Range(pb.RangeRequest(key=b"default/key"), timeout=10)
    assert [kv.value for kv in got.kvs] == [b"here"]


def test_sigterm_ends_watch_streams_at_once(workdir: Path, running: list[Pykine]) -> None:
    """Like etcd on SIGTERM: open watch and keep-alive streams end at once, the process exits 0.

    Open streams must not hold the stop for the grace period meant for unary calls in flight
    (2 s), which would lengthen every restart of a Kubernetes API server's datastore.
    """
    from harness import KeepAliveStream, PykineServer, WatchSession

    server = launch_local(running, workdir)
    client = PykineServer(str(workdir))  # only its channel and stubs, on the running server
    client.address = server.target
    client.channel = grpc.insecure_channel(server.target)
    watches = [WatchSession(client) for _ in range(5)]
    for n, watch in enumerate(watches):
        watch.create(key=b"w/%d" % n, range_end=b"w0")
        assert watch.next().created
    granted = pb_grpc.LeaseStub(client.channel).LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=10)
    keepalive = KeepAliveStream(client)
    assert keepalive.keep_alive(granted.ID).TTL == 60
    assert server.process is not None
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=20)
    took = time.monotonic() - started
    assert code == 0, server.stderr()
    assert took < 1.5, f"exit took {took:.2f}s with streams open: held for the grace period"
    for watch in watches:
        with pytest.raises(AssertionError, match=r"stream failed: StatusCode\.UNAVAILABLE"):
            watch.next(timeout=10)
        watch.close()
    keepalive.close()
    client.channel.close()
