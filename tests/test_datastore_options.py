"""kine's datastore flags on real database servers: TLS to PostgreSQL and MariaDB, and the connection pool's bounds.

The TLS servers are our own (see databases.py), started so that they accept
nothing but TLS from 127.0.0.1: a pykine that serves requests has therefore
spoken TLS to them, and one that may not or cannot must refuse to start with
one clear line. Their certificates come from a throwaway CA made here with the
openssl command. The pool tests load pykine from many threads while counting
its sessions on the server; besides the pool, a PostgreSQL instance holds a
LISTEN connection and the duty-lock connection, a MySQL one the duty-lock
connection only (remote.py, postgres.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import databases
import pytest
from harness import ROOT, PykineServer, call, pb

LOAD_THREADS = 8
LOAD_SECONDS = 3.0
POOL_LIMIT = 2
# Sessions an instance holds beside its pool: PostgreSQL's LISTEN and duty-lock connections, MySQL's duty lock.
EXTRA_SESSIONS = {"postgres": 2, "mysql": 1}


# -- certificates ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: str  # the CA that signed the server's certificate
    server_cert: str  # for 127.0.0.1 (subjectAltName IP:127.0.0.1 only)
    server_key: str
    other_ca: str  # a CA that signed nothing here


def openssl(directory: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def make_ca(directory: str, name: str) -> None:
    openssl(
        directory,
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=pykine test {name}"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt"),
        *("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    """A CA, a server certificate it signed for IP 127.0.0.1, and an unrelated CA."""
    directory = tempfile.mkdtemp(prefix="pykine-certs-")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    openssl(
        directory,
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key"),
        *("-out", "server.csr"),
    )
    with open(os.path.join(directory, "server.ext"), "w") as ext:
        ext.write(
            "subjectAltName = IP:127.0.0.1\n"
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
            "authorityKeyIdentifier = keyid\n"
        )
    openssl(
        directory,
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"),
        *("-days", "2", "-extfile", "server.ext", "-out", "server.crt"),
    )
    names = ("ca.crt", "server.crt", "server.key", "other-ca.crt")
    try:
        yield Certificates(*(os.path.join(directory, name) for name in names))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- database servers that accept TLS only ------------------------------------------------------


class TLSPostgres(databases.OwnedPostgres):
    """PostgreSQL with ssl=on whose pg_hba.conf admits hostssl from 127.0.0.1 and nothing else."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        super().__init__()

    def initialise(self) -> None:
        super().initialise()
        # PostgreSQL wants its key owned by the server's user and private to it.
        for source in (self.certificates.server_cert, self.certificates.server_key):
            target = os.path.join(self.directory, os.path.basename(source))
            shutil.copy(source, target)
            os.chmod(target, 0o600)
            if os.geteuid() == 0:
                shutil.chown(target, "postgres", "postgres")
        # Rewritten in place, so it keeps its owner (the postgres user).
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write("hostssl all all 127.0.0.1/32 trust\n")

    def command(self) -> list[str]:
        return [
            *super().command(),
            *("-c", "ssl=on"),
            *("-c", f"ssl_cert_file={os.path.join(self.directory, 'server.crt')}"),
            *("-c", f"ssl_key_file={os.path.join(self.directory, 'server.key')}"),
        ]


class TLSMariaDB(databases.OwnedMariaDB):
    """MariaDB with require_secure_transport, which it enforces only with grant tables (root has no password)."""

    def __init__(self, certificates: Certificates) -> None:
        self.certificates = certificates
        super().__init__()

    def command(self) -> list[str]:
        return [
            *(arg for arg in super().command() if arg != "--skip-grant-tables"),
            f"--ssl-cert={self.certificates.server_cert}",
            f"--ssl-key={self.certificates.server_key}",
            "--require-secure-transport=ON",
        ]


@pytest.fixture(scope="module")
def tls_postgres(certificates: Certificates) -> Iterator[TLSPostgres]:
    server = TLSPostgres(certificates)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def tls_mariadb(certificates: Certificates) -> Iterator[TLSMariaDB]:
    server = TLSMariaDB(certificates)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# -- helpers --------------------------------------------------------------------------------------


def fresh_name(purpose: str) -> str:
    return f"pykine_{purpose}_{uuid.uuid4().hex[:12]}"


def serves(endpoint: str, *args: str) -> None:
    """Start pykine with `args`, write a key and read it back: the datastore is reachable that way."""
    server = PykineServer(tempfile.mkdtemp(prefix="pykine-options-"), *args, endpoint=endpoint)
    try:
        server.start()
        put = call(server, "KV", "Put", pb.PutRequest(key=b"tls/key", value=b"over TLS"))
        assert put.ok, put
        got = call(server, "KV", "Range", pb.RangeRequest(key=b"tls/key"))
        assert got.ok, got
        assert [(kv.key, kv.value) for kv in got.response.kvs] == [(b"tls/key", b"over TLS")]
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


def refused(endpoint: str, *args: str) -> str:
    """Run pykine, which must exit with code 2 and one `pykine: error:` line; return that line."""
    done = subprocess.run(
        [sys.executable, "-m", "pykine", "--listen-address=127.0.0.1:0", f"--endpoint={endpoint}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykine: error: "), done.stderr
    return lines[0]


# -- TLS to PostgreSQL ----------------------------------------------------------------------------


def test_postgres_ca_file_verifies_the_server(tls_postgres: TLSPostgres, certificates: Certificates) -> None:
    """--ca-file means verify-full: the chain and the IP in the certificate's subjectAltName."""
    serves(f"{tls_postgres.url}/{fresh_name('tls')}", f"--ca-file={certificates.ca}")


def test_postgres_skip_verify_alone_uses_tls(tls_postgres: TLSPostgres) -> None:
    """--skip-verify without a CA is sslmode=require: encrypted, unverified."""
    serves(f"{tls_postgres.url}/{fresh_name('tls')}", "--skip-verify")


def test_postgres_without_tls_is_refused(tls_postgres: TLSPostgres) -> None:
    """The server admits only hostssl, so a plain connection fails and pykine says so on one line."""
    line = refused(f"{tls_postgres.url}/{fresh_name('tls')}?sslmode=disable")
    assert "no encryption" in line, line


def test_postgres_ca_file_of_another_ca_is_refused(tls_postgres: TLSPostgres, certificates: Certificates) -> None:
    """A CA that did not sign the server's certificate must not be trusted."""
    line = refused(f"{tls_postgres.url}/{fresh_name('tls')}", f"--ca-file={certificates.other_ca}")
    assert "certificate verify failed" in line, line


# -- TLS to MariaDB ---------------------------------------------------------------------------------


def test_mariadb_skip_verify_uses_tls(tls_mariadb: TLSMariaDB) -> None:
    serves(f"{tls_mariadb.url}/{fresh_name('tls')}", "--skip-verify")


def test_mariadb_ca_file_verifies_the_server(tls_mariadb: TLSMariaDB, certificates: Certificates) -> None:
    """Python's ssl checks the chain and matches 127.0.0.1 against the certificate's IP subjectAltName."""
    serves(f"{tls_mariadb.url}/{fresh_name('tls')}", f"--ca-file={certificates.ca}")


def test_mariadb_without_tls_is_refused(tls_mariadb: TLSMariaDB) -> None:
    """MariaDB 10.11 answers a plain connection under require_secure_transport with error 1045, access denied."""
    line = refused(f"{tls_mariadb.url}/{fresh_name('tls')}")
    assert "1045" in line and "Access denied" in line, line


def test_mariadb_ca_file_of_another_ca_is_refused(tls_mariadb: TLSMariaDB, certificates: Certificates) -> None:
    line = refused(f"{tls_mariadb.url}/{fresh_name('tls')}", f"--ca-file={certificates.other_ca}")
    assert "certificate verify failed" in line, line


# -- the connection pool ----------------------------------------------------------------------------


@dataclass
class Load:
    """What the load threads did, and the session counts sampled meanwhile."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


@contextlib.contextmanager
def session_counter(kind: str, name: str) -> Iterator[Callable[[], int]]:
    """Counts database `name`'s sessions; it connects to no database itself, so it does not count itself."""
    base = databases.server_url(kind)
    if kind == "postgres":
        import psycopg

        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            yield lambda: int(conn.execute(query, (name,)).fetchone()[0])  # type: ignore[index]
        return
    quoted = name.replace("'", "''")
    statement = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{quoted}'"
    yield lambda: int(databases.run_sql(f"{base}/information_schema", statement)[0][0])


def load(server: PykineServer, count: Callable[[], int]) -> Load:
    """Puts and ranges from LOAD_THREADS threads for LOAD_SECONDS, counting sessions all the while."""
    result = Load()
    lock = threading.Lock()
    deadline = time.monotonic() + LOAD_SECONDS

    def work(thread: int) -> None:
        prefix = f"load/{thread}/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        i = 0
        while time.monotonic() < deadline:
            for outcome in (
                call(server, "KV", "Put", pb.PutRequest(key=prefix + str(i % 16).encode(), value=b"x" * 64)),
                call(server, "KV", "Range", pb.RangeRequest(key=prefix, range_end=end)),
            ):
                with lock:
                    if outcome.ok:
                        result.ok += 1
                    else:
                        result.failures.append(f"{outcome.code} {outcome.details}")
            i += 1

    def sample() -> None:
        while time.monotonic() < deadline:
            result.counts.append(count())
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(LOAD_THREADS)]
    threads.append(threading.Thread(target=sample))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


def loaded(kind: str, *args: str) -> Load:
    """Start pykine on a fresh database with `args`, load it, and stop it."""
    name = fresh_name("pool")
    endpoint = databases.database_endpoint(kind, name)
    server = PykineServer(tempfile.mkdtemp(prefix="pykine-pool-"), *args, endpoint=endpoint)
    try:
        server.start()
        with session_counter(kind, name) as count:
            result = load(server, count)
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    assert not result.failures, result.failures[:5]
    assert result.ok > 100, result
    assert result.counts, "no session count was taken"
    return result


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_the_load_needs_more_than_the_bound_by_default(kind: str) -> None:
    """Without a limit the same load opens more sessions, so the bounds below are the flags' doing."""
    result = loaded(kind)
    assert max(result.counts) > POOL_LIMIT + EXTRA_SESSIONS[kind], result.counts


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_max_open_connections_bounds_the_pool_under_load(kind: str) -> None:
    """Eight busy clients share two pooled connections: never more sessions, and every request succeeds."""
    result = loaded(kind, f"--datastore-max-open-connections={POOL_LIMIT}", "--datastore-max-idle-connections=1")
    most = max(result.counts)
    assert most <= POOL_LIMIT + EXTRA_SESSIONS[kind], (most, result.counts)
    # The counter counts the right sessions: at least one pooled connection beside the extras.
    assert most >= 1 + EXTRA_SESSIONS[kind], (most, result.counts)


def test_kine_environment_variable_bounds_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """KINE_DATASTORE_MAX_OPEN_CONNECTIONS works as the flag does, where kine users set it."""
    monkeypatch.setenv("KINE_DATASTORE_MAX_OPEN_CONNECTIONS", str(POOL_LIMIT))
    result = loaded("postgres")
    most = max(result.counts)
    assert most <= POOL_LIMIT + EXTRA_SESSIONS["postgres"], (most, result.counts)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_kine_negative_pool_values_are_accepted(kind: str) -> None:
    """kine takes a negative max idle (keep none idle) and max open (no limit: here the default); so does pykine."""
    result = loaded(kind, "--datastore-max-idle-connections=-1", "--datastore-max-open-connections=-1")
    assert max(result.counts) > POOL_LIMIT + EXTRA_SESSIONS[kind], result.counts
