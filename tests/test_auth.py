"""Auth beyond one etcd member: instances sharing a datastore, TLS identities, JWT tokens, bad flags.

tests/test_auth_differential.py compares pykine's auth with real etcd's call
by call; this module covers what a single etcd cannot show: every instance on
one datastore enforces the same store, tokens issued by one instance work on
the others, and changes reach the others quickly.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import certs
import grpc
import pytest
from aetcd.rpc import auth_pb2, rpc_pb2_grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Outcome, PykineServer, call, default_endpoint, free_port, pb
from test_bad_input import assert_refused, run_pykine

READWRITE = auth_pb2.Permission.READWRITE
# How long a change may take to reach another instance (pykine polls the store every 50 ms).
PROPAGATION = 5.0


def as_user(server: PykineServer, token: str, service: str, method: str, request: object) -> Outcome:
    try:
        stub = getattr(server.stub(service), method)
        return Outcome(response=stub(request, timeout=10, metadata=(("token", token),)))
    except grpc.RpcError as error:
        return Outcome(code=error.code(), details=error.details())


def login(server: PykineServer, name: str, password: str) -> str:
    outcome = call(server, "Auth", "Authenticate", pb.AuthenticateRequest(name=name, password=password))
    assert outcome.ok, outcome
    return outcome.response.token


def admin(server: PykineServer, token: str, method: str, request: object) -> None:
    outcome = as_user(server, token, "Auth", method, request)
    assert outcome.ok, (method, outcome)


def set_up_users(server: PykineServer) -> str:
    """root, and alice who may read and write under app/; auth enabled. Returns root's token."""
    for method, request in (
        ("UserAdd", pb.AuthUserAddRequest(name="root", password="rootpw")),
        ("UserGrantRole", pb.AuthUserGrantRoleRequest(user="root", role="root")),
        ("RoleAdd", pb.AuthRoleAddRequest(name="app")),
        (
            "RoleGrantPermission",
            pb.AuthRoleGrantPermissionRequest(
                name="app",
                perm=auth_pb2.Permission(permType=auth_pb2.Permission.READWRITE, key=b"app/", range_end=b"app0"),
            ),
        ),
        ("UserAdd", pb.AuthUserAddRequest(name="alice", password="alicepw")),
        ("UserGrantRole", pb.AuthUserGrantRoleRequest(user="alice", role="app")),
        ("AuthEnable", pb.AuthEnableRequest()),
    ):
        outcome = call(server, "Auth", method, request)
        assert outcome.ok, (method, outcome)
    return login(server, "root", "rootpw")


@pytest.fixture
def two() -> Iterator[tuple[PykineServer, PykineServer]]:
    workdir = tempfile.mkdtemp(prefix="pykine-auth-")
    endpoint = default_endpoint(workdir)
    first = PykineServer(os.path.join(workdir, "a"), endpoint=endpoint)
    second = PykineServer(os.path.join(workdir, "b"), endpoint=endpoint)
    for server in (first, second):
        os.mkdir(server.workdir)
        server.start()
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


def eventually(check: object, what: str) -> Outcome:
    deadline = time.monotonic() + PROPAGATION
    while True:
        outcome = check()  # type: ignore[operator]
        if outcome is not None:
            return outcome
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_every_instance_enforces_one_store(two: tuple[PykineServer, PykineServer]) -> None:
    first, second = two
    root = set_up_users(first)
    put = pb.PutRequest(key=b"app/x", value=b"1")

    # Enabling through the first instance reaches the second: no token is refused there too.
    def refused_on_second() -> Outcome | None:
        outcome = call(second, "KV", "Put", put)
        return None if outcome.ok else outcome

    refused = eventually(refused_on_second, "enabling auth never reached the second instance")
    assert (refused.code, refused.details) == (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty")
    # A token from one instance works on the other.
    alice = login(first, "alice", "alicepw")
    assert as_user(second, alice, "KV", "Put", put).ok
    denied = as_user(second, alice, "KV", "Put", pb.PutRequest(key=b"other", value=b"1"))
    assert (denied.code, denied.details) == (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")

    # A change through the first instance reaches the second: as with etcd's simple tokens,
    # alice's token stays valid and the revoked permission stops applying at once.
    revoke = pb.AuthRoleRevokePermissionRequest(role="app", key=b"app/", range_end=b"app0")
    admin(first, root, "RoleRevokePermission", revoke)

    def denied_on_second() -> Outcome | None:
        outcome = as_user(second, alice, "KV", "Put", put)
        return None if outcome.ok else outcome

    outcome = eventually(denied_on_second, "the revocation never reached the second instance")
    assert (outcome.code, outcome.details) == (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")

    # Deleting alice through the second instance ends her token on the first.
    root_second = login(second, "root", "rootpw")
    admin(second, root_second, "UserDelete", pb.AuthUserDeleteRequest(name="alice"))

    def invalid_on_first() -> Outcome | None:
        outcome = as_user(first, alice, "KV", "Range", pb.RangeRequest(key=b"app/x"))
        return outcome if outcome.code == grpc.StatusCode.UNAUTHENTICATED else None

    outcome = eventually(invalid_on_first, "the deleted user's token still works on the first instance")
    assert outcome.details == "etcdserver: invalid auth token"
    admin(first, root, "UserAdd", pb.AuthUserAddRequest(name="alice", password="alicepw"))

    # Both instances list the same users and roles.
    users = [
        as_user(server, token, "Auth", "UserList", pb.AuthUserListRequest())
        for server, token in ((first, login(first, "root", "rootpw")), (second, root_second))
    ]
    assert [list(outcome.response.users) for outcome in users] == [["alice", "root"]] * 2

    # Disabling through the second instance opens the first.
    admin(second, root_second, "AuthDisable", pb.AuthDisableRequest())
    assert eventually(lambda: ((o := call(first, "KV", "Put", put)).ok and o) or None, "disable on first").ok


@pytest.mark.pykine_engine
def test_client_certificate_common_name_is_the_user(tmp_path: Path) -> None:
    """With --trusted-ca-file and no token, the verified certificate's CommonName is the user, as in etcd."""
    authority = certs.Authority(str(tmp_path), "auth")
    server_pair = authority.issue("server", "server", server=True)
    root_pair = authority.issue("root", "root", server=False)
    alice_pair = authority.issue("alice", "alice", server=False)
    pykine = PykineServer(
        str(tmp_path),
        f"--server-cert-file={server_pair.cert}",
        f"--server-key-file={server_pair.key}",
        f"--trusted-ca-file={authority.cert}",
    )

    def credentials(pair: certs.Pair) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            Path(authority.cert).read_bytes(), Path(pair.key).read_bytes(), Path(pair.cert).read_bytes()
        )

    pykine.credentials = credentials(root_pair)
    pykine.start()
    try:
        set_up_users(pykine)
        # The test's channel presents root's certificate: root may do anything, with no token.
        assert call(pykine, "KV", "Put", pb.PutRequest(key=b"anything", value=b"1")).ok
        assert call(pykine, "Auth", "UserList", pb.AuthUserListRequest()).ok
        with grpc.secure_channel(pykine.address, credentials(alice_pair)) as channel:
            kv = rpc_pb2_grpc.KVStub(channel)
            assert kv.Put(pb.PutRequest(key=b"app/cert", value=b"1"), timeout=10).header.revision > 0
            with pytest.raises(grpc.RpcError) as denied:
                kv.Put(pb.PutRequest(key=b"other", value=b"1"), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        pykine.stop()


@pytest.mark.pykine_engine
def test_jwt_tokens(tmp_path: Path) -> None:
    """--auth-token jwt: tokens verify on every instance holding the public key; a forged one is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "jwt.key", tmp_path / "jwt.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    endpoint = default_endpoint(str(tmp_path))
    signer = PykineServer(
        str(tmp_path),
        f"--auth-token=jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=1m",
        endpoint=endpoint,
    )
    verifier = PykineServer(str(tmp_path), f"--auth-token=jwt,pub-key={public},sign-method=ES256", endpoint=endpoint)
    signer.start()
    verifier.start()
    try:
        set_up_users(signer)
        alice = login(signer, "alice", "alicepw")
        assert alice.count(".") == 2  # header.claims.signature
        put = pb.PutRequest(key=b"app/jwt", value=b"1")
        assert eventually(lambda: ((o := as_user(verifier, alice, "KV", "Put", put)).ok and o) or None, "jwt").ok
        forged = alice[:-4] + ("AAAA" if not alice.endswith("AAAA") else "BBBB")
        refused = as_user(verifier, forged, "KV", "Put", put)
        assert (refused.code, refused.details) == (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
        # The verifier has no private key: it cannot issue tokens.
        outcome = call(verifier, "Auth", "Authenticate", pb.AuthenticateRequest(name="alice", password="alicepw"))
        assert not outcome.ok
    finally:
        verifier.stop()
        signer.stop()


def test_simple_tokens_live_while_used(tmp_path: Path) -> None:
    """--auth-token-ttl: a simple token used within the TTL lives on; one left unused expires, as in etcd."""
    server = PykineServer(str(tmp_path), "--auth-token-ttl=1")
    server.start()
    try:
        set_up_users(server)
        alice = login(server, "alice", "alicepw")
        read = pb.RangeRequest(key=b"app/x")
        for _ in range(4):  # 2.4 s in all, more than the TTL, but never 1 s without a use
            time.sleep(0.6)
            assert as_user(server, alice, "KV", "Range", read).ok
        time.sleep(1.5)
        expired = as_user(server, alice, "KV", "Range", read)
        assert (expired.code, expired.details) == (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
    finally:
        server.stop()


def fresh_token_works(server: PykineServer) -> str:
    """alice logs in and reads with her token; the token.

    A token's expiry is in whole seconds (as etcd's): issued late in a second, a 1 s token may
    expire before a slow machine uses it, so a few logins are allowed, each failing only so.
    """
    for _ in range(5):
        token = login(server, "alice", "alicepw")
        outcome = as_user(server, token, "KV", "Range", pb.RangeRequest(key=b"app/x"))
        if outcome.ok:
            return token
        assert (outcome.code, outcome.details) == (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
    raise AssertionError("five fresh tokens in a row were refused")


def test_expired_jwt_is_an_invalid_token(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    server = PykineServer(str(tmp_path), f"--auth-token=jwt,priv-key={secret},sign-method=HS256,ttl=1s")
    server.start()
    try:
        set_up_users(server)
        alice = fresh_token_works(server)
        time.sleep(2.1)
        expired = as_user(server, alice, "KV", "Range", pb.RangeRequest(key=b"app/x"))
        assert (expired.code, expired.details) == (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token")
        fresh_token_works(server)  # a new login works again
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("option", "mentions"),
    [
        ("opaque", "--auth-token must be simple or jwt"),
        ("jwt,sign-method=RS256", "needs pub-key"),
        ("jwt,pub-key=/nonexistent/key.pub,sign-method=RS256", "cannot read pub-key"),
        ("jwt,pub-key={garbage},priv-key={garbage},sign-method=RS256", "do not work with RS256"),
        ("jwt,pub-key={garbage},sign-method=XX999", "sign-method must be one of"),
        ("simple,ttl=5m", "takes no options"),
    ],
)
def test_bad_auth_token_flags(tmp_path: Path, option: str, mentions: str) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    result = run_pykine(
        f"--listen-address=127.0.0.1:{free_port()}",
        f"--endpoint=sqlite://{tmp_path}/state.db",
        f"--auth-token={option.format(garbage=garbage)}",
        cwd=tmp_path,
    )
    assert_refused(result, mentions)


def test_etcdctl_user_flag_end_to_end(tmp_path: Path) -> None:
    server = PykineServer(str(tmp_path))
    server.start()
    try:
        set_up_users(server)
        base = ["etcdctl", f"--endpoints={server.address}", "--command-timeout=10s"]
        env = dict(os.environ, ETCDCTL_API="3")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=60, check=False)

        assert run("--user=alice:alicepw", "put", "app/ctl", "v").stdout.strip() == "OK"
        assert run("--user=alice:alicepw", "get", "app/ctl", "--print-value-only").stdout.strip() == "v"
        denied = run("--user=alice:alicepw", "put", "elsewhere", "v")
        assert denied.returncode != 0 and "etcdserver: permission denied" in denied.stderr
        wrong = run("--user=alice:nope", "get", "app/ctl")
        assert wrong.returncode != 0 and "authentication failed, invalid user ID or password" in wrong.stderr
        listed = run("--user=root:rootpw", "role", "get", "app")
        assert "[app/, app0)" in listed.stdout, listed
    finally:
        server.stop()


@pytest.mark.pykine_engine
def test_hashed_passwords(tmp_path: Path) -> None:
    """etcd 3.5's hashedPassword: a bcrypt hash made by the client (Go writes $2a$); anything else is refused."""
    import bcrypt

    server = PykineServer(str(tmp_path))
    server.start()
    try:
        go_style = bcrypt.hashpw(b"secret", bcrypt.gensalt(10)).replace(b"$2b$", b"$2a$", 1).decode()
        assert call(server, "Auth", "UserAdd", pb.AuthUserAddRequest(name="carol", hashedPassword=go_style)).ok
        bad = call(server, "Auth", "UserAdd", pb.AuthUserAddRequest(name="dave", hashedPassword="plain text"))
        assert (bad.code, bad.details) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: hashed password is not a bcrypt hash",
        )
        set_up_users(server)
        assert login(server, "carol", "secret")
        users = as_user(server, login(server, "root", "rootpw"), "Auth", "UserList", pb.AuthUserListRequest())
        assert list(users.response.users) == ["alice", "carol", "root"]
    finally:
        server.stop()
