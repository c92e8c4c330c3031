"""Benchmark pykine against real etcd with Kubernetes' request shapes.

Builds bench/loadgen (a Go program on the real etcd client) into a cache outside the
repository, then for each selected server in turn: starts it fresh in a temporary directory on
a free loopback port, measures the time from spawn until Maintenance.Status answers, runs the
load generator against it, samples its memory, stops it. Prints a table and writes the results
to bench/results/<YYYY-MM-DD>.json.

    .venv/bin/python bench/run.py [--objects 2000] [--clients 16] [--servers etcd,pykine]

New servers are new entries in SERVERS: a ServerSpec says how to launch the server and may
prepare its database in setup() and drop it in teardown(). pykine-pg and pykine-mysql use the
servers at PYKINE_BENCH_POSTGRES / PYKINE_BENCH_MYSQL (default: the standard loopback ports),
each run in a fresh database of its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gobuild  # bench/ is on sys.path: this file runs as a script
import grpc

ROOT = Path(__file__).resolve().parent.parent
LOADGEN_SOURCE = ROOT / "bench" / "loadgen" / "main.go"
RESULTS = ROOT / "bench" / "results"
# The Go build cache the Go client tests use too: outside the repository, kept between runs.
PHASES = ("create", "get", "update", "list", "count", "watch", "delete")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- servers -----------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """How to run one server under test. Subclass for servers that need more than a command."""

    name: str
    description: str

    def setup(self, workdir: Path) -> None:
        """Prepare what the server needs (a database, say) before it is spawned."""

    def command(self, workdir: Path, address: str, pki: Pki | None) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self, workdir: Path) -> None:
        """Wait, once the server answers, until it is what the row describes (a cluster formed, say)."""

    def teardown(self, workdir: Path) -> None:
        """Undo setup(); the workdir itself is removed by the caller."""

    def version(self) -> str:
        return ""


@dataclass
class EtcdSpec(ServerSpec):
    """Real etcd, one member, data in the workdir, client and peer URLs on loopback."""

    binary: str = "etcd"

    def command(self, workdir: Path, address: str, pki: Pki | None) -> list[str]:
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"{'https' if pki else 'http'}://{address}"
        tls = []
        if pki:
            tls = [
                f"--cert-file={pki.server_cert}",
                f"--key-file={pki.server_key}",
                "--client-cert-auth",
                f"--trusted-ca-file={pki.ca}",
            ]
        return [
            shutil.which(self.binary) or self.binary,
            "--name=default",
            f"--data-dir={workdir / 'etcd-data'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--logger=zap",
            "--log-level=error",
            *tls,
        ]

    def version(self) -> str:
        try:
            done = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return ""
        return done.stdout.splitlines()[0] if done.stdout else ""


@dataclass
class PykineSpec(ServerSpec):
    """pykine from this repository; `endpoint` is a DSN template, {workdir} filled in."""

    endpoint: str = "sqlite://{workdir}/state.db"
    args: Sequence[str] = ()

    def command(self, workdir: Path, address: str, pki: Pki | None) -> list[str]:
        tls = []
        if pki:
            tls = [
                f"--server-cert-file={pki.server_cert}",
                f"--server-key-file={pki.server_key}",
                f"--trusted-ca-file={pki.ca}",
            ]
        return [
            sys.executable,
            "-m",
            "pykine",
            f"--listen-address={address}",
            f"--endpoint={self.endpoint.format(workdir=workdir)}",
            *self.args,
            *tls,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def version(self) -> str:
        import pykine

        return f"pykine {pykine.__version__}"


@dataclass
class PykineServerSpec(PykineSpec):
    """pykine on a database server: a fresh database per run (pykine creates it), dropped afterwards."""

    server: str = ""

    def setup(self, workdir: Path) -> None:
        self.database = f"pykine_bench_{os.getpid()}_{int(time.time())}"
        self.endpoint = f"{self.server}/{self.database}"

    def teardown(self, workdir: Path) -> None:
        import databases  # tests/databases.py: the suite's own way to drop a database

        kind = "postgres" if self.server.startswith("postgres") else "mysql"
        databases.drop_database(kind, self.server, self.database)


@dataclass
class PykineNatsClusterSpec(PykineSpec):
    """pykine on a bucket with 3 replicas on a 3-node NATS cluster started for the run (tests/natscluster.py).

    The cluster's processes are not pykine's children: its CPU and memory are not in the row.
    """

    def setup(self, workdir: Path) -> None:
        from natscluster import NatsCluster

        self.cluster = NatsCluster(3).start()
        self.endpoint = self.cluster.endpoint("bench").replace("bucket=", "viewDir={workdir}&bucket=")

    def teardown(self, workdir: Path) -> None:
        self.cluster.destroy()


@dataclass
class PykineDqliteSpec(PykineSpec):
    """pykine on dqlite: the node in the pykine process, bootstrapping a cluster of its own.

    With `nodes` above 1, that many more pykine processes join the cluster
    (their CPU and memory are not in the row) and the measured one leads it:
    every write is replicated to a quorum before it is acknowledged.
    """

    nodes: int = 1
    options: str = ""

    def setup(self, workdir: Path) -> None:
        self.peers = [f"127.0.0.1:{free_port()}" for _ in range(self.nodes)]
        self.endpoint = f"dqlite://{workdir}/dqlite-0{self.options}"
        self.args = (f"--peer-bind-address={self.peers[0]}",)
        self.helpers: list[subprocess.Popen[bytes]] = []
        for number, peer in enumerate(self.peers[1:], 1):
            command = [
                sys.executable, "-m", "pykine", f"--listen-address=127.0.0.1:{free_port()}",
                f"--endpoint=dqlite://{workdir}/dqlite-{number}?join={self.peers[0]}",
                f"--peer-bind-address={peer}",
            ]  # fmt: skip
            with open(workdir / f"dqlite-{number}.log", "ab") as log:
                self.helpers.append(
                    subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=self.env())
                )

    def ready(self, workdir: Path) -> None:
        """Until every node votes (the measured process's node, which bootstrapped, leads)."""
        import asyncio

        from pykine.backends import dqlitewire as wire
        from pykine.backends.dqliteclient import connect_leader

        async def voters() -> int:
            connection = await connect_leader(self.peers[:1], "pykine")
            try:
                return sum(role == wire.VOTER for _, _, role in await connection.cluster())
            finally:
                await connection.close()

        deadline = time.monotonic() + START_TIMEOUT
        while asyncio.run(voters()) < self.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the dqlite cluster never had {self.nodes} voters")
            time.sleep(0.2)

    def teardown(self, workdir: Path) -> None:
        for helper in self.helpers:
            helper.terminate()
        for helper in self.helpers:
            try:
                helper.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()


@dataclass
class PykinePassthroughSpec(PykineSpec):
    """pykine as a passthrough proxy (an http:// endpoint) in front of a real etcd started for the run.

    The etcd's CPU and memory are not in the row; its throughput through pykine, against the
    etcd row's (the same etcd, direct), is the proxy's overhead.
    """

    def setup(self, workdir: Path) -> None:
        upstream = workdir / "upstream"
        upstream.mkdir()
        address = f"127.0.0.1:{free_port()}"
        command = EtcdSpec("upstream", "").command(upstream, address, None)
        with open(upstream / "etcd.log", "ab") as log:
            self.upstream = subprocess.Popen(command, cwd=upstream, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_open(address) and status_ok(address, None)):
            if self.upstream.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the upstream etcd did not start")
            time.sleep(0.05)
        self.endpoint = f"http://{address}"

    def teardown(self, workdir: Path) -> None:
        self.upstream.terminate()
        try:
            self.upstream.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.upstream.kill()
            self.upstream.wait()


# The first selected server is the baseline the others are compared with.
SERVERS: list[ServerSpec] = [
    EtcdSpec("etcd", "etcd 3.4 (Debian), one member, data in a temporary directory"),
    PykineSpec("pykine", "pykine on SQLite (WAL, synchronous=FULL), file in a temporary directory"),
    PykineSpec(
        "pykine-2w",
        "pykine on SQLite with --workers 2: two serving processes on one port and one file",
        args=("--workers=2",),
    ),
    PykineServerSpec(
        "pykine-pg",
        "pykine on PostgreSQL (the machine's server, default settings: fsync on)",
        server=os.environ.get("PYKINE_BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432"),
    ),
    PykineServerSpec(
        "pykine-mysql",
        "pykine on MariaDB (the machine's server, default settings: InnoDB flush at each commit)",
        server=os.environ.get("PYKINE_BENCH_MYSQL", "mysql://root@tcp(127.0.0.1:3306)"),
    ),
    PykineSpec(
        "pykine-nats",
        "pykine on NATS JetStream: its embedded nats-server (a child process, counted in the row), one replica",
        endpoint="nats://?bucket=bench&dataDir={workdir}/nats&viewDir={workdir}",
    ),
    PykineNatsClusterSpec(
        "pykine-nats-r3",
        "pykine on a 3-node NATS cluster on loopback, 3 replicas (the cluster's CPU and memory not counted)",
    ),
    PykineDqliteSpec("pykine-dqlite", "pykine on dqlite: a 1-node cluster, the node inside the pykine process"),
    PykineDqliteSpec(
        "pykine-dqlite-3",
        "pykine on a 3-node dqlite cluster on loopback, leading it; the other two nodes are pykine processes"
        " (their CPU and memory not counted)",
        nodes=3,
    ),
    PykineDqliteSpec(
        "pykine-dqlite-3-lr",
        "as pykine-dqlite-3, with leaderReads=true: reads without the ReadIndex barrier (k8s-dqlite's consistency)",
        nodes=3,
        options="?leaderReads=true",
    ),
    PykinePassthroughSpec(
        "pykine-passthrough",
        "pykine forwarding every call to a real etcd 3.4 behind it (http:// endpoint); the etcd's CPU not counted",
    ),
]


# --- process sampling --------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (a server may run workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and friends in bytes, summed over the process tree; empty once it is gone."""
    values: dict[str, int] = {}
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                for line in status:
                    name, _, rest = line.partition(":")
                    parts = rest.split()
                    if name.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
                        values[name] = values.get(name, 0) + int(parts[0]) * 1024
        except OSError:
            pass
    return values


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process tree from /proc/<pid>/stat."""
    total, seen = 0.0, False
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        seen = True
    return total if seen else None


class RssSampler(threading.Thread):
    """Polls a process's VmRSS until stopped; keeps the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = proc_status(self.pid).get("VmRSS", 0)
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# --- running one server ------------------------------------------------------------------------


# The phases whose operations the server CPU per operation divides by (list counted by pages, watch by writes).
OP_PHASES = ("create", "get", "update", "list_page", "count", "watch_write", "delete")


@dataclass(frozen=True)
class Pki:
    """Certificates for --tls: both servers require a client certificate (etcd's --client-cert-auth)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def make(cls, directory: Path) -> Pki:
        import certs  # tests/certs.py: the suite's own certificate maker

        authority = certs.Authority(str(directory), "bench")
        server = authority.issue("server", "bench-server", server=True)
        client = authority.issue("client", "bench-client", server=False)
        return cls(authority.cert, server.cert, server.key, client.cert, client.key)

    def channel(self, address: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            Path(self.ca).read_bytes(), Path(self.client_key).read_bytes(), Path(self.client_cert).read_bytes()
        )
        return grpc.secure_channel(address, credentials)

    def loadgen_args(self) -> list[str]:
        return [f"-cacert={self.ca}", f"-cert={self.client_cert}", f"-key={self.client_key}"]


def status_ok(address: str, pki: Pki | None) -> bool:
    """One Maintenance.Status call on a fresh channel (so no reconnect backoff delays the answer)."""
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

    with pki.channel(address) if pki else grpc.insecure_channel(address) as channel:
        try:
            rpc_pb2_grpc.MaintenanceStub(channel).Status(rpc_pb2.StatusRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False


def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Running:
    spec: ServerSpec
    workdir: Path
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path
    start_seconds: float = 0.0

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start(spec: ServerSpec, workdir: Path, pki: Pki | None) -> Running:
    """Spawn the server and wait until Status answers; start_seconds is spawn to first answer."""
    spec.setup(workdir)
    address = f"127.0.0.1:{free_port()}"
    log_path = workdir / f"{spec.name}.log"
    command = spec.command(workdir, address, pki)
    with open(log_path, "ab") as log:
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=spec.env())
    running = Running(spec, workdir, address, process, log_path)
    deadline = began + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with {process.returncode} while starting:\n{running.log_tail()}")
        if port_open(address) and status_ok(address, pki):
            running.start_seconds = time.perf_counter() - began
            spec.ready(workdir)
            return running
        if time.perf_counter() > deadline:
            stop(running)
            raise RuntimeError(f"{spec.name} did not answer Status within {START_TIMEOUT}s:\n{running.log_tail()}")
        time.sleep(0.01)


def stop(running: Running) -> int | None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns the exit code."""
    process = running.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    running.spec.teardown(running.workdir)
    return process.returncode


# --- the load generator ------------------------------------------------------------------------


def build_loadgen() -> Path:
    """Build bench/loadgen against Debian's etcd client sources (cached by source hash)."""
    try:
        return gobuild.build(LOADGEN_SOURCE, "loadgen")
    except gobuild.GoBuildError as error:
        raise SystemExit(f"bench: {error}") from None


@dataclass
class Options:
    objects: int
    clients: int
    conns: int
    value_size: int
    phase_seconds: float
    hot_keys: int
    phases: list[str]
    pki: Pki | None = None

    def loadgen_args(self) -> list[str]:
        return [
            *(self.pki.loadgen_args() if self.pki else []),
            f"-objects={self.objects}",
            f"-clients={self.clients}",
            f"-conns={self.conns}",
            f"-value-size={self.value_size}",
            f"-phase-seconds={self.phase_seconds}",
            f"-hot-keys={self.hot_keys}",
            f"-phases={','.join(self.phases)}",
        ]

    def loadgen_timeout(self) -> float:
        """Generous: time-bounded phases, plus creates and deletes at a pessimistic 20 ops/s, plus a watch tail."""
        timed = sum(1 for phase in self.phases if phase not in ("create", "delete"))
        return 120 + timed * self.phase_seconds * 2 + 2 * self.objects / 20


@dataclass
class Measurement:
    server: str
    description: str
    version: str
    start_seconds: float | None = None
    peak_rss_bytes: int | None = None
    vm_hwm_bytes: int | None = None
    polled_rss_bytes: int | None = None
    rss_samples: int = 0
    server_cpu_seconds: float | None = None
    loadgen_wall_seconds: float | None = None
    loadgen_cpu_seconds: float | None = None
    loadgen_exit: int | None = None
    server_exit: int | None = None
    error: str | None = None
    log_tail: str = ""
    loadgen: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str) -> dict[str, Any] | None:
        for phase in self.loadgen.get("phases", []):
            if phase["name"] == name:
                return phase
        return None


def measure(spec: ServerSpec, loadgen: Path, options: Options) -> Measurement:
    result = Measurement(spec.name, spec.description, spec.version())
    workdir = Path(tempfile.mkdtemp(prefix=f"pykine-bench-{spec.name}-"))
    running: Running | None = None
    try:
        print(f"bench: starting {spec.name}", file=sys.stderr, flush=True)
        running = start(spec, workdir, options.pki)
        result.start_seconds = running.start_seconds
        pid = running.process.pid
        cpu_before = proc_cpu_seconds(pid) or 0.0
        sampler = RssSampler(pid)
        sampler.start()
        out_path = workdir / "loadgen.json"
        command = [str(loadgen), f"-endpoint={running.address}", f"-out={out_path}", *options.loadgen_args()]
        print(f"bench: {spec.name} answered in {running.start_seconds:.2f}s: {' '.join(command)}", file=sys.stderr)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)  # stderr: its per-phase lines
        try:
            result.loadgen_exit = process.wait(timeout=options.loadgen_timeout())
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            result.error = f"loadgen did not finish within {options.loadgen_timeout():.0f}s"
        result.loadgen_wall_seconds = time.perf_counter() - began
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.loadgen_cpu_seconds = (children_after.ru_utime - children_before.ru_utime) + (
            children_after.ru_stime - children_before.ru_stime
        )
        cpu_after = proc_cpu_seconds(pid)
        if cpu_after is not None:
            result.server_cpu_seconds = cpu_after - cpu_before
        sampler.stop()
        status = proc_status(pid)
        result.vm_hwm_bytes = status.get("VmHWM")
        result.polled_rss_bytes = sampler.peak or None
        result.rss_samples = sampler.samples
        result.peak_rss_bytes = max(result.vm_hwm_bytes or 0, sampler.peak) or None
        if running.process.poll() is not None:
            result.error = f"{spec.name} exited with {running.process.returncode} during the run"
        if out_path.exists():
            result.loadgen = json.loads(out_path.read_text())
        elif result.error is None:
            result.error = f"loadgen exited {result.loadgen_exit} without writing results"
        if result.loadgen_exit not in (0, None) and result.error is None:
            result.error = f"loadgen exited {result.loadgen_exit}"
    except RuntimeError as error:
        result.error = str(error)
    finally:
        if running is not None:
            result.server_exit = stop(running)
            result.log_tail = running.log_tail()
            if result.error is not None:
                result.error += f"\n{spec.name} log:\n{result.log_tail}"
        shutil.rmtree(workdir, ignore_errors=True)
    return result


# --- report ------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}"


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def table(results: list[Measurement]) -> str:
    """Per phase, one row per server; ratios are server ÷ baseline (the first server)."""
    base = results[0]
    names: list[str] = []
    for measurement in results:
        for phase in measurement.loadgen.get("phases", []):
            if phase["name"] not in names:
                names.append(phase["name"])
    header = (
        f"{'phase':<12} {'server':<14} {'ops':>8} {'ops/s':>10} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'ops/s ratio':>11} {'p50 ratio':>9} {'p99 ratio':>9} {'errors':>6} {'client cpu':>10}"
    )
    lines = [header, "-" * len(header)]
    for name in names:
        reference = base.phase(name) or {}
        for index, measurement in enumerate(results):
            phase = measurement.phase(name)
            label = name if index == 0 else ""
            if phase is None:
                lines.append(f"{label:<12} {measurement.server:<14} {'(no result)':>8}")
                continue
            compare = index > 0
            seconds = phase.get("seconds") or 0
            cpu = phase.get("client_cpu_seconds")
            client = f"{cpu / seconds:.2f} core" if cpu is not None and seconds else "-"
            lines.append(
                f"{label:<12} {measurement.server:<14} {phase['ops']:>8} {number(phase['ops_per_sec']):>10} "
                f"{number(phase['p50_ms'], 2):>9} {number(phase['p99_ms'], 2):>9} "
                f"{ratio(phase['ops_per_sec'], reference.get('ops_per_sec')) if compare else '':>11} "
                f"{ratio(phase['p50_ms'], reference.get('p50_ms')) if compare else '':>9} "
                f"{ratio(phase['p99_ms'], reference.get('p99_ms')) if compare else '':>9} "
                f"{phase['errors']:>6} {client:>10}"
            )
    lines.append("")
    lines.append(
        f"{'server':<14} {'start':>8} {'peak RSS':>10} {'server cpu':>11} {'per op':>9} {'loadgen cpu':>12} "
        f"{'loadgen wall':>13} {'client load':>12}"
    )
    for measurement in results:
        wall, cpu = measurement.loadgen_wall_seconds, measurement.loadgen_cpu_seconds
        load = f"{cpu / wall:.2f} core" if cpu is not None and wall else "-"
        start_time = "-" if measurement.start_seconds is None else f"{measurement.start_seconds:.2f} s"
        server_cpu = "-" if measurement.server_cpu_seconds is None else f"{measurement.server_cpu_seconds:.1f} s"
        ops = sum(phase["ops"] for phase in measurement.loadgen.get("phases", []) if phase["name"] in OP_PHASES)
        per_op = "-"
        if measurement.server_cpu_seconds is not None and ops:
            per_op = f"{measurement.server_cpu_seconds / ops * 1e6:.0f} µs"
        lines.append(
            f"{measurement.server:<14} {start_time:>8} {mib(measurement.peak_rss_bytes):>10} {server_cpu:>11} "
            f"{per_op:>9} {number(cpu):>10} s {number(wall):>11} s {load:>12}"
        )
    cores = os.cpu_count() or 1
    lines.append(f"ratios: server / {base.server} (ops/s above 1 is faster, latency above 1 is slower)")
    lines.append(
        f"client cpu, client load: the load generator's own CPU time over wall time, in cores (this machine has "
        f"{cores}); server cpu: the server's CPU time while the load ran, and per operation of the phases (a list"
        f" page, a watch event's write, a GuaranteedUpdate with its get and retries); start: spawn until Status answers"
    )
    for measurement in results:
        if measurement.error:
            lines.append(f"\n{measurement.server} FAILED: {measurement.error}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": load,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2000, help="objects created, listed and deleted")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client goroutines")
    parser.add_argument("--conns", type=int, default=2, help="gRPC connections the clients share")
    parser.add_argument("--value-size", type=int, default=1024, help="bytes per value")
    parser.add_argument("--phase-seconds", type=float, default=10, help="length of each time-bounded phase")
    parser.add_argument("--hot-keys", type=int, default=0, help="keys the update clients share (0: one per client)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (all but create need its objects)",
    )
    names = [spec.name for spec in SERVERS]
    parser.add_argument(
        "--servers",
        default="etcd,pykine,pykine-pg,pykine-mysql,pykine-nats,pykine-nats-r3,pykine-dqlite,pykine-dqlite-3,pykine-passthrough",
        help=f"comma-separated, in order; the first is the baseline (known: {', '.join(names)})",
    )
    parser.add_argument("--tls", action="store_true", help="every server on TLS requiring client certificates (mTLS)")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/<YYYY-MM-DD>.json)")
    args = parser.parse_args(argv)
    for name in args.servers.split(","):
        if name not in names:
            parser.error(f"unknown server {name!r}; known: {', '.join(names)}")
    for phase in args.phases.split(","):
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    if min(args.objects, args.clients, args.conns) <= 0 or args.value_size < 0 or args.phase_seconds <= 0:
        parser.error("--objects, --clients, --conns and --phase-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        # This checkout's pykine (wire stubs, version) and tests/ (dropping benchmark databases).
        sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    options = Options(
        objects=args.objects,
        clients=args.clients,
        conns=args.conns,
        value_size=args.value_size,
        phase_seconds=args.phase_seconds,
        hot_keys=args.hot_keys,
        phases=args.phases.split(","),
    )
    if args.tls:
        options.pki = Pki.make(Path(tempfile.mkdtemp(prefix="pykine-bench-pki-")))
    specs = {spec.name: spec for spec in SERVERS}
    selected = [specs[name] for name in args.servers.split(",")]
    today = datetime.date.today().isoformat()
    out = args.out or RESULTS / f"{today}.json"
    started = datetime.datetime.now(datetime.UTC)
    host = machine()
    loadgen = build_loadgen()
    results = [measure(spec, loadgen, options) for spec in selected]
    report = table(results)
    print(report)
    document = {
        "date": today,
        "started": started.isoformat(timespec="seconds"),
        "machine": {**host, "load_average_at_end": os.getloadavg()},
        "options": {
            **{name: value for name, value in options.__dict__.items() if name != "pki"},
            "tls": options.pki is not None,
            "servers": [spec.name for spec in selected],
        },
        "baseline": selected[0].name,
        "servers": {result.server: result.__dict__ for result in results},
        "table": report.splitlines(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nbench: results written to {out}", file=sys.stderr)
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
