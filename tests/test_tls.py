"""Client-facing TLS and mTLS with every client the suite uses, and certificate reload.

A pykine serving TLS (server certificate only) and one requiring client
certificates (--trusted-ca-file, like etcd's --client-cert-auth) are each
tried by etcdctl, the real Go client (tests/go/tlsprobe), aetcd, grpcio and
curl: with and without a client certificate, trusting the wrong CA, with a
client certificate from the wrong CA and with an expired one. Every client
must succeed where TLS allows it and fail where it does not, and the server
keeps serving everyone else afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import aetcd
import aetcd.client
import certs
import grpc
import pytest
import websockets.sync.client
from aetcd.rpc import kv_pb2
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from cryptography.hazmat.primitives import serialization
from harness import PykineServer, free_port
from test_bad_input import assert_refused, run_pykine

from bench import gobuild
from pykine.transport.grpc import Call, Method, Registry
from pykine.transport.http1 import HttpRequest, HttpResponse, Router
from pykine.transport.server import Server
from pykine.transport.tls import ReloadingTls, TlsFiles

ROOT = Path(__file__).resolve().parent.parent
TLS_PROBE = ROOT / "tests" / "go" / "tlsprobe" / "main.go"
# Long enough for a loaded CI machine to finish a good handshake, short for the refusals.
ATTEMPT_TIMEOUT = 4


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: str
    wrong_ca: str
    server: certs.Pair
    alice: certs.Pair
    stranger: certs.Pair  # a client certificate the wrong CA signed
    expired: certs.Pair  # alice's, expired yesterday
    good: certs.Authority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    good = certs.Authority(str(directory), "good")
    wrong = certs.Authority(str(directory), "wrong")
    return Pki(
        directory=directory,
        ca=good.cert,
        wrong_ca=wrong.cert,
        server=good.issue("server", "pykine-server", server=True),
        alice=good.issue("alice", "alice", server=False),
        stranger=wrong.issue("stranger", "stranger", server=False),
        expired=good.issue("alice-expired", "alice", server=False, expired=True),
        good=good,
    )


def start_tls_server(workdir: Path, pki: Pki, mutual: bool, server: certs.Pair | None = None) -> PykineServer:
    server = server or pki.server
    args = [f"--server-cert-file={server.cert}", f"--server-key-file={server.key}"]
    if mutual:
        args.append(f"--trusted-ca-file={pki.ca}")
    pykine = PykineServer(str(workdir), *args)
    client = pki.alice if mutual else None
    pykine.credentials = grpc_credentials(pki.ca, client)
    pykine.start()
    return pykine


def grpc_credentials(ca: str, client: certs.Pair | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(client.key).read_bytes() if client else None,
        certificate_chain=Path(client.cert).read_bytes() if client else None,
    )


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PykineServer]:
    server = start_tls_server(tmp_path_factory.mktemp("tls"), pki, mutual=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PykineServer]:
    server = start_tls_server(tmp_path_factory.mktemp("mtls"), pki, mutual=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tlsprobe() -> str:
    try:
        return str(gobuild.build(TLS_PROBE, "tlsprobe", timeout=280))
    except gobuild.GoBuildError as error:
        pytest.fail(str(error))


# -- one attempt per client: (succeeded, what it said) --------------------------------


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[bool, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def with_etcdctl(server: PykineServer, ca: str, client: certs.Pair | None, _: str) -> tuple[bool, str]:
    base = [
        "etcdctl",
        f"--endpoints=https://{server.address}",
        f"--cacert={ca}",
        "--dial-timeout=2s",
        f"--command-timeout={ATTEMPT_TIMEOUT}s",
    ]
    if client:
        base += [f"--cert={client.cert}", f"--key={client.key}"]
    env = dict(os.environ, ETCDCTL_API="3")
    ok, said = run([*base, "put", "tls/etcdctl", "v"], env)
    if not ok:
        return ok, said
    ok, said = run([*base, "get", "tls/etcdctl", "--print-value-only"], env)
    return ok and said == "v", said


def with_go(server: PykineServer, ca: str, client: certs.Pair | None, probe: str) -> tuple[bool, str]:
    command = [probe, f"-endpoint=https://{server.address}", f"-cacert={ca}", f"-timeout={ATTEMPT_TIMEOUT}s"]
    if client:
        command += [f"-cert={client.cert}", f"-key={client.key}"]
    ok, said = run(command)
    return ok and said == "ok", said


def with_grpcio(server: PykineServer, ca: str, client: certs.Pair | None, _: str) -> tuple[bool, str]:
    with grpc.secure_channel(server.address, grpc_credentials(ca, client)) as channel:
        kv = pb_grpc.KVStub(channel)
        try:
            kv.Put(pb.PutRequest(key=b"tls/grpcio", value=b"v"), timeout=ATTEMPT_TIMEOUT)
            got = kv.Range(pb.RangeRequest(key=b"tls/grpcio"), timeout=ATTEMPT_TIMEOUT)
        except grpc.RpcError as error:
            return False, f"{error.code()}: {error.details()}"
    return [kv.value for kv in got.kvs] == [b"v"], str(got)


def with_aetcd(server: PykineServer, ca: str, client: certs.Pair | None, _: str) -> tuple[bool, str]:
    """aetcd 1.0 opens only plaintext channels; the same client on a TLS channel of grpcio's."""
    credentials = grpc_credentials(ca, client)

    def secure_channel(target: str, options: object = None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(target, credentials, options=options)  # type: ignore[arg-type]

    async def attempt() -> tuple[bool, str]:
        host, port = server.address.rsplit(":", 1)
        etcd = aetcd.Client(host=host, port=int(port), timeout=ATTEMPT_TIMEOUT)
        try:
            await etcd.put(b"tls/aetcd", b"v")
            got = await etcd.get(b"tls/aetcd")
        except Exception as error:
            return False, repr(error)
        finally:
            await etcd.close()
        return got is not None and got.value == b"v", repr(got)

    with mock.patch.object(aetcd.client.rpc, "insecure_channel", secure_channel):
        return asyncio.run(attempt())


def with_curl(server: PykineServer, ca: str, client: certs.Pair | None, _: str) -> tuple[bool, str]:
    said = []
    for version in ("--http1.1", "--http2"):
        command = ["curl", "-sS", version, "--max-time", str(ATTEMPT_TIMEOUT), "--cacert", ca]
        if client:
            command += ["--cert", client.cert, "--key", client.key]
        ok, answer = run([*command, "-w", " %{http_version}", f"https://{server.address}/health"])
        if not ok:
            return False, answer
        said.append(answer)
    return said == ['{"health":"true"} 1.1', '{"health":"true"} 2'], repr(said)


CLIENTS: dict[str, Callable[[PykineServer, str, certs.Pair | None, str], tuple[bool, str]]] = {
    "etcdctl": with_etcdctl,
    "go": with_go,
    "grpcio": with_grpcio,
    "aetcd": with_aetcd,
    "curl": with_curl,
}

# (case, mutual TLS on the server, CA the client trusts, client certificate, should succeed)
CASES = [
    ("tls-no-client-cert", False, "ca", None, True),
    ("mtls-client-cert", True, "ca", "alice", True),
    ("mtls-no-client-cert", True, "ca", None, False),
    ("mtls-wrong-ca-trusted", True, "wrong_ca", "alice", False),
    ("mtls-cert-from-wrong-ca", True, "ca", "stranger", False),
    ("mtls-expired-client-cert", True, "ca", "expired", False),
    ("tls-wrong-ca-trusted", False, "wrong_ca", None, False),
]


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize(("case", "mutual", "trust", "certificate", "succeeds"), CASES, ids=[c[0] for c in CASES])
def test_clients(
    request: pytest.FixtureRequest,
    pki: Pki,
    tlsprobe: str,
    client: str,
    case: str,
    mutual: bool,
    trust: str,
    certificate: str | None,
    succeeds: bool,
) -> None:
    server: PykineServer = request.getfixturevalue("mtls_server" if mutual else "tls_server")
    pair = getattr(pki, certificate) if certificate else None
    ok, said = CLIENTS[client](server, getattr(pki, trust), pair, tlsprobe)
    assert ok is succeeds, f"{client} {case}: {'failed' if succeeds else 'succeeded'}: {said}"
    # A refused handshake harms nobody else: the test's own mTLS/TLS channel still works.
    assert server.stub("Maintenance").Status(pb.StatusRequest(), timeout=10).version


def test_client_urls_are_https(mtls_server: PykineServer) -> None:
    members = mtls_server.stub("Cluster").MemberList(pb.MemberListRequest(), timeout=10).members
    assert [list(member.clientURLs) for member in members] == [[f"https://{mtls_server.address}"]]
    assert f"serving etcd 3.5.13 API on https://{mtls_server.address}" in mtls_server.log()


def handshake(address: str, ca: str, version: ssl.TLSVersion, client: certs.Pair | None = None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = version
    context.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer what the server must refuse
    if client:
        context.load_cert_chain(client.cert, client.key)
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return context.wrap_socket(sock, server_hostname=host)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_refused(tls_server: PykineServer, pki: Pki, version: ssl.TLSVersion) -> None:
    """The handshake fails (asyncio's TLS closes without sending the alert, so the client sees EOF)."""
    with pytest.raises(ssl.SSLError) as refused:
        handshake(tls_server.address, pki.ca, version).close()
    assert isinstance(refused.value, ssl.SSLEOFError) or "VERSION" in str(refused.value).upper(), refused.value
    assert tls_server.stub("Maintenance").Status(pb.StatusRequest(), timeout=10).version


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_12_and_13_served(tls_server: PykineServer, pki: Pki, version: ssl.TLSVersion) -> None:
    with handshake(tls_server.address, pki.ca, version) as sock:
        assert sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"health":"true"}')


def test_unixs_listener(pki: Pki) -> None:
    """unixs://path: TLS over a unix socket; the member's client URL says unixs."""
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="pk-", dir="/tmp") as directory:
        sock = os.path.join(directory, "pykine.sock")
        pykine = PykineServer(
            directory,
            f"--server-cert-file={pki.server.cert}",
            f"--server-key-file={pki.server.key}",
            f"--trusted-ca-file={pki.ca}",
        )
        pykine.listen_address = f"unixs://{sock}"
        pykine.address = f"unix:{sock}"
        pykine.credentials = grpc_credentials(pki.ca, pki.alice)
        # The name to check the certificate against: a unix socket has none.
        pykine.channel_options = [("grpc.ssl_target_name_override", "localhost")]
        pykine.start()
        try:
            members = pykine.stub("Cluster").MemberList(pb.MemberListRequest(), timeout=10).members
            assert [list(member.clientURLs) for member in members] == [[f"unixs://{sock}"]]
            curl = ["curl", "-sS", "--unix-socket", sock, "--cacert", pki.ca]
            ok, said = run([*curl, "--cert", pki.alice.cert, "--key", pki.alice.key, "https://localhost/health"])
            assert ok and said == '{"health":"true"}', said
            ok, said = run([*curl, "https://localhost/health"])
            assert not ok, said
        finally:
            pykine.stop()


# -- reload ---------------------------------------------------------------------------


def served_certificate(address: str, ca: str, client: certs.Pair) -> str:
    with handshake(address, ca, ssl.TLSVersion.TLSv1_3, client) as sock:
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return certs.common_name(der)


def replace_file(source: str, target: str) -> None:
    """Atomically, as tools that rotate certificates do (write beside, then rename)."""
    shutil.copyfile(source, target + ".new")
    os.replace(target + ".new", target)


class Load:
    """Requests on fresh connections, on one long-lived gRPC channel and on one kept-alive HTTP/1.1 socket."""

    def __init__(self, server: PykineServer, pki: Pki) -> None:
        self.server = server
        self.pki = pki
        self.done = threading.Event()
        self.failures: list[str] = []
        self.counts = {"fresh": 0, "channel": 0, "keepalive": 0}
        self.threads = [threading.Thread(target=target) for target in (self._fresh, self._channel, self._keepalive)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)

    def _fresh(self) -> None:
        while not self.done.is_set():
            ok, said = with_grpcio(self.server, self.pki.ca, self.pki.alice, "")
            self._count("fresh", ok, said)

    def _channel(self) -> None:
        credentials = grpc_credentials(self.pki.ca, self.pki.alice)
        with grpc.secure_channel(self.server.address, credentials) as channel:
            kv = pb_grpc.KVStub(channel)
            while not self.done.is_set():
                try:
                    kv.Put(pb.PutRequest(key=b"tls/load", value=b"v"), timeout=10)
                    self._count("channel", True, "")
                except grpc.RpcError as error:
                    self._count("channel", False, str(error))

    def _keepalive(self) -> None:
        with handshake(self.server.address, self.pki.ca, ssl.TLSVersion.TLSv1_3, self.pki.alice) as sock:
            reader = sock.makefile("rb")
            while not self.done.is_set():
                try:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    status = reader.readline()
                    length = 0
                    while (line := reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    body = reader.read(length)
                    self._count("keepalive", status.startswith(b"HTTP/1.1 200") and b"true" in body, repr(status))
                except OSError as error:
                    self._count("keepalive", False, repr(error))
                    return
                time.sleep(0.01)

    def _count(self, kind: str, ok: bool, said: str) -> None:
        self.counts[kind] += 1
        if not ok:
            self.failures.append(f"{kind}: {said}")


def test_certificate_reload_under_load(pki: Pki, tmp_path: Path) -> None:
    """Rotated files apply to new connections within seconds; nothing in flight fails."""
    live = certs.Pair(str(tmp_path / "live.pem"), str(tmp_path / "live.key"))
    shutil.copyfile(pki.server.cert, live.cert)
    shutil.copyfile(pki.server.key, live.key)
    rotated = pki.good.issue("rotated", "pykine-server-rotated", server=True)
    server = start_tls_server(tmp_path, pki, mutual=True, server=live)
    try:
        assert served_certificate(server.address, pki.ca, pki.alice) == "pykine-server"
        with Load(server, pki) as load:
            time.sleep(1)
            # The key first, then the certificate: for a moment they do not match.
            replace_file(rotated.key, live.key)
            time.sleep(0.3)
            replace_file(rotated.cert, live.cert)
            rotated_at = time.monotonic()
            while served_certificate(server.address, pki.ca, pki.alice) != "pykine-server-rotated":
                assert time.monotonic() - rotated_at < 10, "the rotated certificate was not served"
                time.sleep(0.1)
            applied_after = time.monotonic() - rotated_at
            time.sleep(1)
        assert not load.failures, load.failures[:5]
        assert min(load.counts.values()) > 10, load.counts
        assert applied_after < 5
        assert "TLS certificate files reloaded" in server.log()
    finally:
        server.stop()
    print(json.dumps({"applied_after_seconds": round(applied_after, 2), **load.counts}))


# -- the transport on its own: the client's identity, CA rotation ------------------------


class InProcess:
    """A transport Server with TLS on its own loop thread, answering with the peer's CommonName."""

    def __init__(self, files: TlsFiles) -> None:
        self.tls = ReloadingTls(files, check_interval=0.05)

        async def who(request: bytes, call: Call) -> pb.RangeResponse:
            name = (call.peer.common_name or "-").encode()
            return pb.RangeResponse(kvs=[kv_pb2.KeyValue(key=name)])

        async def who_http(request: HttpRequest) -> HttpResponse:
            return HttpResponse(200, (request.peer.common_name or "-").encode())

        registry = Registry()
        registry.add("test.Test", "Who", Method(who, bytes))
        router = Router()
        router.add("GET", "/who", who_http)
        self.server = Server(registry, router)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.port = self.loop.run_until_complete(
                self.server.listen_tcp("127.0.0.1", 0, ssl_context=self.tls.listening_context)
            )
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def who(channel: grpc.Channel) -> str:
    answer = channel.unary_unary("/test.Test/Who", response_deserializer=pb.RangeResponse.FromString)(
        b"", timeout=ATTEMPT_TIMEOUT
    )
    return answer.kvs[0].key.decode()


def test_peer_common_name_and_ca_rotation(pki: Pki, tmp_path: Path) -> None:
    """Handlers see the verified CommonName (gRPC and HTTP); a rotated CA applies to new handshakes only."""
    trusted = str(tmp_path / "trusted.pem")
    shutil.copyfile(pki.ca, trusted)
    served = InProcess(TlsFiles(pki.server.cert, pki.server.key, trusted))
    try:
        alice = grpc.secure_channel(served.address, grpc_credentials(pki.ca, pki.alice))
        assert who(alice) == "alice"
        for version in ("--http1.1", "--http2"):
            curl = ["curl", "-sS", version, "--cacert", pki.ca, "--cert", pki.alice.cert, "--key", pki.alice.key]
            ok, said = run([*curl, f"https://{served.address}/who"])
            assert ok and said == "alice", said

        replace_file(pki.wrong_ca, trusted)  # from now on only the wrong CA's clients are let in
        time.sleep(0.1)
        with grpc.secure_channel(served.address, grpc_credentials(pki.ca, pki.stranger)) as stranger:
            assert who(stranger) == "stranger"
        with (
            grpc.secure_channel(served.address, grpc_credentials(pki.ca, pki.alice)) as fresh_alice,
            pytest.raises(grpc.RpcError),
        ):
            who(fresh_alice)
        assert who(alice) == "alice"  # the connection made before the rotation keeps working

        Path(trusted).write_text("not a certificate\n")  # a broken file: the last good files stay in use
        time.sleep(0.1)
        with grpc.secure_channel(served.address, grpc_credentials(pki.ca, pki.stranger)) as stranger:
            assert who(stranger) == "stranger"
        assert served.tls.reloads == 1
        alice.close()
    finally:
        served.stop()


# -- mistakes: one line, exit code 2 -----------------------------------------------------


def encrypted_copy(pair: certs.Pair, directory: Path) -> str:
    key = serialization.load_pem_private_key(Path(pair.key).read_bytes(), password=None)
    path = directory / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return str(path)


@pytest.mark.parametrize(
    "mistake",
    [
        "cert-without-key",
        "key-without-cert",
        "ca-without-cert",
        "missing-cert",
        "missing-key",
        "key-of-another-cert",
        "cert-file-is-garbage",
        "unreadable-ca",
        "missing-ca",
        "encrypted-key",
        "https-without-cert",
        "unixs-without-cert",
    ],
)
def test_tls_mistakes(pki: Pki, tmp_path: Path, mistake: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    missing = str(tmp_path / "missing.pem")
    cert, key, ca = f"--server-cert-file={pki.server.cert}", f"--server-key-file={pki.server.key}", pki.ca
    listen = f"--listen-address=127.0.0.1:{free_port()}"
    args, mentions = {
        "cert-without-key": ([cert], "--server-key-file"),
        "key-without-cert": ([key], "--server-cert-file"),
        "ca-without-cert": ([f"--trusted-ca-file={ca}"], "--server-cert-file"),
        "missing-cert": ([f"--server-cert-file={missing}", key], missing),
        "missing-key": ([cert, f"--server-key-file={missing}"], missing),
        "key-of-another-cert": ([cert, f"--server-key-file={pki.alice.key}"], "does not match"),
        "cert-file-is-garbage": ([f"--server-cert-file={garbage}", key], str(garbage)),
        "unreadable-ca": ([cert, key, f"--trusted-ca-file={garbage}"], str(garbage)),
        "missing-ca": ([cert, key, f"--trusted-ca-file={missing}"], missing),
        "encrypted-key": ([cert, f"--server-key-file={encrypted_copy(pki.server, tmp_path)}"], "encrypted"),
        "https-without-cert": ([f"--listen-address=https://127.0.0.1:{free_port()}"], "--server-cert-file"),
        "unixs-without-cert": ([f"--listen-address=unixs://{tmp_path}/s.sock"], "--server-cert-file"),
    }[mistake]
    result = run_pykine(listen, f"--endpoint=sqlite://{tmp_path}/state.db", *args, cwd=tmp_path)
    assert_refused(result, mentions)
    assert not (tmp_path / "state.db").exists()


def test_tls_flags_from_environment(pki: Pki, tmp_path: Path) -> None:
    """KINE_ and PYKINE_ variables set the TLS files like the other flags."""
    server = PykineServer(str(tmp_path))
    server.credentials = grpc_credentials(pki.ca, pki.alice)
    environment = {
        "KINE_SERVER_CERT_FILE": pki.server.cert,
        "PYKINE_SERVER_KEY_FILE": pki.server.key,
        "KINE_TRUSTED_CA_FILE": pki.ca,
    }
    with mock.patch.dict(os.environ, environment):
        server.start()
    try:
        ok, said = with_grpcio(server, pki.ca, None, "")
        assert not ok, said  # the CA from the environment made client certificates required
        ok, said = with_grpcio(server, pki.ca, pki.alice, "")
        assert ok, said
    finally:
        server.stop()


def test_gateway_websocket_over_tls(mtls_server: PykineServer, pki: Pki) -> None:
    """wss://: the JSON gateway's watch stream upgraded to a WebSocket on the TLS port, with mTLS."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.alice.cert, pki.alice.key)
    base = f"wss://{mtls_server.address}/v3"
    with websockets.sync.client.connect(f"{base}/watch", ssl=context, open_timeout=10) as watch:
        watch.send('{"create_request":{"key":"d3Nz"}}')
        assert json.loads(watch.recv(timeout=10))["result"]["created"] is True
        with websockets.sync.client.connect(f"{base}/kv/put", ssl=context, open_timeout=10) as put:
            put.send('{"key":"d3Nz","value":"dGxz"}')
            assert "header" in json.loads(put.recv(timeout=10))
        event = json.loads(watch.recv(timeout=10))["result"]["events"][0]
        assert (event["kv"]["key"], event["kv"]["value"]) == ("d3Nz", "dGxz")
