"""A real Patroni cluster for the tests: PostgreSQL nodes, each managed by a Patroni process, with pykine as DCS.

Patroni talks to pykine through its etcd3 module, that is etcd's JSON gateway. PostgreSQL refuses to run
as root, so when the tests run as root every node runs as the postgres user (databases._as_postgres_user),
Patroni included: it starts postgres itself. Its files live in one temporary directory that the postgres
user owns node by node; everything the cluster started is killed, and the directory removed, at the end.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psutil
import psycopg
from databases import _as_postgres_user
from harness import PykineServer, Server, free_port
from patroni.config import Config

T = TypeVar("T")

SUPERUSER = ("postgres", "superuser-secret")
REPLICATION = ("replicator", "replication-secret")
# Patroni's REST API and etcd's gateway on loopback: no proxy, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def postgres_bin_dir() -> str:
    """The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (Debian package postgresql)")
    return os.path.dirname(max(found, key=lambda path: int(path.split("/")[4])))


def _give_to_postgres(path: str) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


@functools.cache
def patroni_python() -> tuple[list[str], dict[str, str]]:
    """How the postgres user can run Python with Patroni: the interpreter and its flags, and the environment.

    This venv's own interpreter when the postgres user may execute it. Otherwise (a venv on a Python under
    /root, which only root may enter) a system Python of the same version, with this venv's site-packages on
    PYTHONPATH and without its own site directories (-S), whose packages (e.g. Debian's pyOpenSSL) would
    otherwise mix with the venv's: Patroni and its dependencies are then the very files the venv has.
    """
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    paths = sysconfig.get_paths()
    site = os.pathsep.join(dict.fromkeys((paths["purelib"], paths["platlib"])))
    candidates: list[tuple[list[str], dict[str, str]]] = [([sys.executable, "-s"], {})]
    for name in dict.fromkeys((f"/usr/bin/python{version}", "/usr/bin/python3", shutil.which(f"python{version}"))):
        if name and os.path.exists(name):
            candidates.append(([name, "-S"], {"PYTHONPATH": site}))
    probe = "import sys, patroni.__main__, patroni.dcs.etcd3, psycopg; print('%d.%d' % sys.version_info[:2])"
    failures = []
    for python, extra in candidates:
        result = subprocess.run(
            _as_postgres_user([*python, "-c", probe]),
            env={**os.environ, **extra, "PYTHONDONTWRITEBYTECODE": "1"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode == 0 and result.stdout.strip() == version:
            return python, extra
        failures.append(f"{python} {extra}: rc={result.returncode} {result.stdout.strip()} {result.stderr.strip()}")
    raise RuntimeError("no Python the postgres user can run Patroni with:\n" + "\n".join(failures))


def http_get(url: str, timeout: float = 3) -> tuple[int | None, Any]:
    """GET a JSON document: (status, body), or (None, None) when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except (OSError, ValueError):  # refused, reset, timed out
        return None, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def gateway(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One POST to pykine's JSON gateway, as etcd's own clients send it."""
    request = urllib.request.Request(
        f"http://{server.address}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with _OPENER.open(request, timeout=10) as answer:
        return json.loads(answer.read())


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def wait_for(what: str, check: Callable[[], T | None], timeout: float, explain: Callable[[], str]) -> T:
    """Poll `check` until it returns something other than None (or False); fail with `explain()` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{explain()}")
        time.sleep(0.2)


def _kill_group(pgid: int) -> None:
    """SIGKILL a whole process group: never ours, never init's."""
    if pgid > 1 and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


class PatroniNode:
    """One PostgreSQL server and the Patroni process that manages it."""

    def __init__(self, workdir: str, name: str, scope: str, dcs: Server, timeouts: dict[str, int]) -> None:
        self.name = name
        self.scope = scope
        self.dcs = dcs
        self.timeouts = timeouts
        self.directory = os.path.join(workdir, name)
        os.mkdir(self.directory, 0o700)
        _give_to_postgres(self.directory)
        self.data_dir = os.path.join(self.directory, "data")
        self.config_path = os.path.join(self.directory, "patroni.yml")
        self.log_path = os.path.join(self.directory, "patroni.log")
        self.pg_port = free_port()
        self.api_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        """patroni.yml (as JSON, which YAML reads): the fastest timings Patroni allows, trust on loopback."""
        parameters = {
            "max_connections": 25,  # the least Patroni accepts
            "shared_buffers": "16MB",
            "max_wal_senders": 5,
            "max_replication_slots": 5,
            "wal_level": "replica",
            "hot_standby": "on",
        }
        return {
            "scope": self.scope,
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.api_port}", "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"hosts": [self.dcs.address], "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    **self.timeouts,
                    "postgresql": {"use_pg_rewind": False, "use_slots": True, "parameters": parameters},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": self.data_dir,
                "bin_dir": postgres_bin_dir(),
                "pgpass": os.path.join(self.directory, "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER[0], "password": SUPERUSER[1]},
                    "replication": {"username": REPLICATION[0], "password": REPLICATION[1]},
                },
                "parameters": {"unix_socket_directories": self.directory},
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    f"host replication {REPLICATION[0]} 127.0.0.1/32 trust",
                ],
                "basebackup": [{"checkpoint": "fast"}],
            },
            "watchdog": {"mode": "off"},
        }

    def start(self) -> None:
        with open(self.config_path, "w") as config:
            json.dump(self.config(), config, indent=1)
        _give_to_postgres(self.config_path)
        python, extra = patroni_python()
        env = {key: value for key, value in os.environ.items() if not key.startswith("PATRONI_")}
        env |= {**extra, "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": self.directory}
        with open(self.log_path, "ab") as log:
            # A session of its own: its process group is runuser, Patroni and Patroni's short-lived children
            # (initdb, pg_basebackup), which one killpg reaches; runuser would not pass SIGKILL on.
            self.process = subprocess.Popen(
                _as_postgres_user([*python, "-m", "patroni", self.config_path]),
                cwd=self.directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def api(self, path: str) -> tuple[int | None, Any]:
        """Patroni's REST API: (status, JSON body), or (None, None) when it does not answer."""
        return http_get(f"http://127.0.0.1:{self.api_port}{path}")

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, from postmaster.pid in the data directory."""
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as pid_file:
                pid = int(pid_file.readline())
            process = psutil.Process(pid)
            return pid if process.cwd() == self.data_dir else None  # not a stale file with a reused pid
        except (OSError, ValueError, psutil.Error):
            return None

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.pg_port,
            user=SUPERUSER[0],
            password=SUPERUSER[1],
            dbname="postgres",
            connect_timeout=3,
            autocommit=True,
        )

    def kill(self) -> None:
        """kill -9 for the whole node, as when its machine dies: Patroni's process group, then the postmaster's.

        Patroni starts postgres in a session of its own (as pg_ctl does), so one killpg does not reach both.
        """
        postmaster = self.postmaster_pid()
        if self.process is not None and self.process.returncode is None:  # not reaped: its pid is still its group's
            _kill_group(self.process.pid)
            self.process.wait(timeout=30)
        if postmaster is not None:
            with contextlib.suppress(ProcessLookupError):
                _kill_group(os.getpgid(postmaster))

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return log.read()[-3000:]
        except OSError:
            return "(no log)"


def strays(directory: str) -> list[psutil.Process]:
    """Live processes that belong to `directory`: working there (postgres and its backends) or naming it."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            cwd, cmdline = process.cwd(), process.cmdline()
        except (psutil.Error, OSError):
            continue
        if cwd == directory or cwd.startswith(directory + os.sep) or any(directory in part for part in cmdline):
            found.append(process)
    return found


def sweep(directory: str) -> list[str]:
    """SIGKILL whatever still belongs to `directory`, until nothing does; what it found, described."""
    seen: list[str] = []
    for _ in range(10):
        found = strays(directory)
        if not found:
            break
        for process in found:
            with contextlib.suppress(psutil.Error):
                seen.append(f"{process.pid} {' '.join(process.cmdline())}")
                process.kill()
        psutil.wait_procs(found, timeout=5)
    return seen


class PatroniCluster:
    """pykine on SQLite, and Patroni nodes that use it as their DCS."""

    def __init__(self, workdir: str, names: tuple[str, ...], scope: str, timeouts: dict[str, int]) -> None:
        self.workdir = workdir
        self.scope = scope
        self.prefix = f"/service/{scope}/"
        pykine_dir = os.path.join(workdir, "pykine")
        os.mkdir(pykine_dir)
        self.pykine = PykineServer(pykine_dir, endpoint=f"sqlite://{os.path.join(pykine_dir, 'state.db')}")
        self.nodes = [PatroniNode(workdir, name, scope, self.pykine, timeouts) for name in names]
        self.strays: list[str] = []  # processes the final sweep had to kill

    def node(self, name: str) -> PatroniNode:
        return next(node for node in self.nodes if node.name == name)

    def explain(self) -> str:
        """For failure messages: each node's status and log tail, and pykine's log tail."""
        parts = []
        for node in self.nodes:
            status = node.api("/patroni") if node.alive() else ("dead", None)
            parts.append(f"--- {node.name}: {status}\n{node.log()}")
        parts.append(f"--- pykine:\n{self.pykine.log()}")
        return "\n".join(parts)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None and node.process.returncode >= 0:
                raise AssertionError(f"Patroni {node.name} exited with {node.process.returncode}\n{self.explain()}")

    # pykine's view, through the JSON gateway.

    def range(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(key[:-1] + chr(ord(key[-1]) + 1))
        return gateway(self.pykine, "/v3/kv/range", body).get("kvs", [])

    def leader_key(self) -> tuple[str, str] | None:
        """The leader key's value (a member name) and its lease, as pykine has it."""
        kvs = self.range(self.prefix + "leader")
        return (unb64(kvs[0].get("value", "")), kvs[0].get("lease", "0")) if kvs else None

    def member_keys(self) -> list[str]:
        """The names of the members pykine has keys for."""
        members = self.prefix + "members/"
        return sorted(unb64(kv["key"]).removeprefix(members) for kv in self.range(members, True))

    def lease(self, lease_id: str) -> dict[str, Any]:
        return gateway(self.pykine, "/v3/lease/timetolive", {"ID": lease_id, "keys": True})

    def stop(self) -> None:
        """Kill every node, stop pykine, then kill anything left that belongs to the cluster's directory."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.kill()
        self.pykine.stop()
        self.strays = sweep(self.workdir)


@contextlib.contextmanager
def patroni_cluster(names: tuple[str, ...], scope: str, timeouts: dict[str, int]) -> Iterator[PatroniCluster]:
    """pykine and one Patroni node per name, started; everything stopped and removed afterwards."""
    workdir = tempfile.mkdtemp(prefix="pykine-patroni-cluster-")
    os.chmod(workdir, 0o755)  # the postgres user must reach its nodes' directories
    cluster: PatroniCluster | None = None
    try:
        cluster = PatroniCluster(workdir, names, scope, timeouts)
        cluster.pykine.start()
        for node in cluster.nodes:
            node.start()
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        else:
            sweep(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


def patroni_minimum_timeouts() -> dict[str, int]:
    """The fastest timings Patroni accepts (it raises smaller ones): ttl 20, loop_wait 1, retry_timeout 3."""
    timeouts = {"ttl": 1, "loop_wait": 1, "retry_timeout": 1}
    Config._validate_and_adjust_timeouts(object.__new__(Config), timeouts)
    return timeouts
