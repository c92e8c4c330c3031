"""pykine.client against real etcd and against pykine: the same tests, run on both.

Each test takes `target`, a running server of each kind (pykine on the
datastore PYKINE_TEST_BACKEND names), and its own key prefix. What the client
promises (K8E's compare-and-swap semantics, typed errors, watch resumption)
must hold on both, since the client rides on etcd's API alone. One test
also runs a script of calls on both and compares every outcome.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import certs
import pytest
from harness import ROOT, EtcdServer, PykineServer, Server, free_port

from pykine.client import (
    AlreadyExistsError,
    Client,
    ClientError,
    CompactedError,
    ConfigError,
    EtcdError,
    Event,
    NotFoundError,
    RevisionMismatchError,
    SyncClient,
    TLSConfig,
    UnavailableError,
    Value,
)

_prefixes = itertools.count()


@pytest.fixture(scope="module", params=["etcd", "pykine"])
def target(request: pytest.FixtureRequest) -> Iterator[Server]:
    workdir = tempfile.mkdtemp(prefix="pykine-client-")
    server: Server = EtcdServer(workdir) if request.param == "etcd" else PykineServer(workdir)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    return f"/client-test/{next(_prefixes)}/"


def endpoint(server: Server) -> str:
    return f"http://{server.address}"


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_create_get_update_delete(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client([endpoint(target)]) as client:
            created = await client.create(prefix + "a", b"one")
            value = await client.get(prefix + "a")
            assert value == Value((prefix + "a").encode(), b"one", created)
            updated = await client.update(prefix + "a", created, b"two")
            assert updated > created
            assert await client.get(prefix + "a") == Value((prefix + "a").encode(), b"two", updated)
            deleted = await client.delete(prefix + "a", updated)
            assert deleted > updated
            with pytest.raises(NotFoundError, match="not found"):
                await client.get(prefix + "a")
            # Update with revision 0 is a create, as in K8E (ModRevision == 0: absent).
            assert await client.update(prefix + "a", 0, b"again") > deleted

    run(scenario())


def test_compare_and_swap_conflicts_report_the_current_value(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            key = prefix + "k"
            first = await client.create(key, b"1")
            with pytest.raises(AlreadyExistsError) as exists:
                await client.create(key, b"other")
            assert exists.value.current == Value(key.encode(), b"1", first)
            second = await client.update(key, first, b"2")
            with pytest.raises(RevisionMismatchError) as stale:
                await client.update(key, first, b"lost")
            assert stale.value.expected == first
            assert stale.value.current == Value(key.encode(), b"2", second)
            assert f"expected at revision {first} but is at revision {second}" in str(stale.value)
            with pytest.raises(RevisionMismatchError) as stale_delete:
                await client.delete(key, first)
            assert stale_delete.value.current == Value(key.encode(), b"2", second)
            await client.delete(key, second)
            with pytest.raises(RevisionMismatchError) as gone:
                await client.update(key, second, b"3")
            assert gone.value.current is None
            assert "does not exist" in str(gone.value)
            assert await client.list(prefix) == []  # the failed swaps wrote nothing

    run(scenario())


def test_list_is_a_prefix_range_at_a_revision(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            first = await client.create(prefix + "b", b"b1")
            await client.create(prefix + "a", b"a1")
            # Neighbours of the prefix stay out: the prefix without its slash, and the next byte.
            await client.create(prefix.rstrip("/"), b"parent")
            await client.create(prefix.rstrip("/") + "0", b"sibling")
            before = await client.list(prefix)
            assert [(value.key, value.data) for value in before] == [
                ((prefix + "a").encode(), b"a1"),
                ((prefix + "b").encode(), b"b1"),
            ]
            await client.update(prefix + "b", first, b"b2")
            now = await client.list(prefix)
            assert [value.data for value in now] == [b"a1", b"b2"]
            assert await client.list(prefix, max(value.modified for value in before)) == before
            assert await client.list(prefix, first) == [Value((prefix + "b").encode(), b"b1", first)]
            assert await client.list(prefix.encode()) == now  # bytes work as keys too

    run(scenario())


def test_list_below_compaction_or_past_the_head_is_an_error(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            old, head = await compacted_history(client, target, prefix + "x")
            with pytest.raises(CompactedError, match="required revision has been compacted"):
                await client.list(prefix, old)
            with pytest.raises(EtcdError, match="future revision") as future:
                await client.list(prefix, head + 1000)
            assert future.value.code == 11  # OUT_OF_RANGE
            assert await client.list(prefix, head) == [Value((prefix + "x").encode(), b"2", head)]

    run(scenario())


async def compacted_history(client: Client, target: Server, key: str) -> tuple[int, int]:
    """The key created, then updated, and history compacted at the update: (creation, update) revisions."""
    from aetcd.rpc import rpc_pb2

    old = await client.create(key, b"1")
    head = await client.update(key, old, b"2")
    target.stub("KV").Compact(rpc_pb2.CompactionRequest(revision=head, physical=True), timeout=10)
    return old, head


def test_watch_from_a_revision_sees_every_change_in_order(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            start = await client.create(prefix + "a", b"1")
            events: list[Event] = []

            async def consume() -> None:
                async for event in client.watch(prefix, start):
                    events.append(event)
                    if event.kind == "delete":
                        return

            watching = asyncio.create_task(consume())
            second = await client.update(prefix + "a", start, b"2")
            await client.create(prefix.rstrip("/") + "0", b"not watched")
            third = await client.create(prefix + "b", b"3")
            gone = await client.delete(prefix + "a", second)
            await asyncio.wait_for(watching, 10)
            key_a, key_b = (prefix + "a").encode(), (prefix + "b").encode()
            assert events == [
                Event("put", Value(key_a, b"1", start)),
                Event("put", Value(key_a, b"2", second)),
                Event("put", Value(key_b, b"3", third)),
                Event("delete", Value(key_a, b"", gone)),
            ]
            assert [event.revision for event in events] == [start, second, third, gone]

    run(scenario())


def test_watch_below_compaction_raises_compacted(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            old, head = await compacted_history(client, target, prefix + "a")
            with pytest.raises(CompactedError) as compacted:
                async for _ in client.watch(prefix, old):
                    pass
            assert compacted.value.compact_revision == head

    run(scenario())


def test_closing_a_watch_ends_it(target: Server, prefix: str) -> None:
    async def scenario() -> None:
        async with Client(endpoint(target)) as client:
            watch = client.watch(prefix)
            waiting = asyncio.create_task(anext(watch))  # type: ignore[arg-type]
            await asyncio.sleep(0.3)
            revision = await client.create(prefix + "a", b"1")
            event = await asyncio.wait_for(waiting, 10)
            assert event == Event("put", Value((prefix + "a").encode(), b"1", revision))
            await watch.aclose()  # type: ignore[attr-defined]

    run(scenario())


def test_unreachable_endpoints_raise_unavailable(target: Server, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        async with Client([dead], timeout=2) as client:  # retried until the timeout, then UNAVAILABLE
            with pytest.raises(UnavailableError) as unavailable:
                await client.list(prefix)
            assert unavailable.value.endpoint == dead.removeprefix("http://")
            with pytest.raises(UnavailableError):
                await client.create(prefix + "a", b"1")
            with pytest.raises(UnavailableError):
                async for _ in client.watch(prefix):
                    pass
        # A dead endpoint first: reads and writes that never left go to the next one.
        async with Client([dead, endpoint(target)], timeout=5) as client:
            revision = await client.create(prefix + "a", b"1")
            assert await client.list(prefix) == [Value((prefix + "a").encode(), b"1", revision)]

    run(scenario())


async def watch_across(client: Client, prefix: str, outage: Callable[[], None]) -> None:
    """Three writes, then `outage` (in a thread) once the watch has seen them, then three more:
    the watch sees all six, once each, in order."""
    seen: list[int] = []

    async def consume() -> None:
        async for event in client.watch(prefix):
            seen.append(event.revision)
            if len(seen) == 6:
                return

    watching = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    written = [await client.create(prefix + f"{n}", b"v") for n in range(3)]
    while len(seen) < 3:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(outage)
    written += [await client.create(prefix + f"{n}", b"v") for n in range(3, 6)]
    await asyncio.wait_for(watching, 60)
    assert seen == written


def test_a_watch_resumes_on_the_next_endpoint(target: Server, prefix: str) -> None:
    """Two endpoints on the same data: the first goes away mid-watch, and no event is lost or repeated.

    Against pykine the second endpoint is another pykine on the same datastore;
    against etcd, the first is a pykine passthrough in front of it.
    """
    workdir = tempfile.mkdtemp(prefix="pykine-client-failover-")
    if isinstance(target, PykineServer):
        front = PykineServer(workdir, endpoint=target.endpoint)
    else:
        front = PykineServer(workdir, endpoint=endpoint(target))
    front.start()
    try:

        async def scenario() -> None:
            async with Client([endpoint(front), endpoint(target)], timeout=10) as client:
                await watch_across(client, prefix, front.stop)

        run(scenario())
    finally:
        front.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_watch_on_one_endpoint_resumes_after_a_restart(target: Server, prefix: str) -> None:
    """The server goes away and comes back on the same address: the watch waits for it and misses nothing."""

    def restart() -> None:
        target.stop()
        target.start()

    async def scenario() -> None:
        async with Client(endpoint(target), timeout=60) as client:
            await watch_across(client, prefix, restart)

    run(scenario())


def test_watch_cancellations_keep_their_status() -> None:
    """etcd puts grpc-go's text of a status in cancel_reason; the client raises that status."""
    from pykine.client.storage import _cancellation
    from pykine.wire import rpc_pb2

    denied = rpc_pb2.WatchResponse(
        canceled=True, cancel_reason="rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    )
    error = _cancellation(denied, "e:1")
    assert (type(error), error.code, error.message) == (EtcdError, 7, "etcdserver: permission denied")
    compacted = _cancellation(rpc_pb2.WatchResponse(canceled=True, compact_revision=5), "e:1")
    assert isinstance(compacted, CompactedError) and compacted.compact_revision == 5
    no_leader = rpc_pb2.WatchResponse(canceled=True, cancel_reason="rpc error: code = Unavailable desc = no leader")
    assert isinstance(_cancellation(no_leader, "e:1"), UnavailableError)
    assert _cancellation(rpc_pb2.WatchResponse(canceled=True, cancel_reason="odd"), "e:1").code == 2


def test_closing_a_sync_client_ends_a_watch_in_another_thread(target: Server, prefix: str) -> None:
    client = SyncClient(endpoint(target))
    outcome: list[BaseException] = []

    def watch() -> None:
        try:
            for _ in client.watch(prefix):
                pass
        except BaseException as error:  # what the watching thread is told
            outcome.append(error)

    watcher = threading.Thread(target=watch)
    watcher.start()
    client.create(prefix + "a", b"1")
    client.close()
    watcher.join(timeout=30)
    assert not watcher.is_alive(), "the watch outlived its client"
    assert len(outcome) == 1 and isinstance(outcome[0], ClientError), outcome
    with pytest.raises(ClientError, match="closed"):
        client.get(prefix + "a")


def test_sync_client(target: Server, prefix: str) -> None:
    with SyncClient(endpoint(target)) as client:
        revision = client.create(prefix + "a", b"1")
        assert client.get(prefix + "a") == Value((prefix + "a").encode(), b"1", revision)
        with pytest.raises(AlreadyExistsError):
            client.create(prefix + "a", b"2")
        events = client.watch(prefix, revision)
        assert next(events) == Event("put", Value((prefix + "a").encode(), b"1", revision))
        changes: list[int] = []
        writer = threading.Thread(target=lambda: changes.append(client.update(prefix + "a", revision, b"2")))
        writer.start()
        assert next(events).value.data == b"2"
        writer.join()
        events.close()
        assert [value.data for value in client.list(prefix)] == [b"2"]
        client.delete(prefix + "a", changes[0])
        assert client.list(prefix) == []


SCRIPT = [
    ("create", "k", b"1"),
    ("create", "k", b"again"),
    ("get", "k"),
    ("update", "k", 1, b"stale"),
    ("update", "k", "current", b"2"),
    ("get", "missing"),
    ("delete", "k", 1),
    ("list",),
    ("delete", "k", "current"),
    ("delete", "k", "current"),
    ("list",),
]


def test_same_outcomes_on_etcd_and_pykine(tmp_path: Path) -> None:
    """The script's results, revisions relative to the first write, and error types and texts, compared."""
    etcd = EtcdServer(str(tmp_path))
    pykine = PykineServer(str(tmp_path))
    etcd.start()
    pykine.start()
    try:
        outcomes = [run(_play(server)) for server in (etcd, pykine)]
    finally:
        pykine.stop()
        etcd.stop()
    assert outcomes[0] == outcomes[1]


async def _play(server: Server) -> list[object]:
    outcomes: list[object] = []
    async with Client(endpoint(server)) as client:
        base = await client.create("/base", b"") - 1
        current = 0
        for step in SCRIPT:
            call, args = step[0], list(step[1:])
            args = [current if arg == "current" else arg for arg in args]
            try:
                result = await getattr(client, call)(*(args or ["/"]))
            except (AlreadyExistsError, NotFoundError, RevisionMismatchError) as error:
                outcomes.append((type(error).__name__, str(error).replace(str(base), "B")))
                continue
            if isinstance(result, int):
                current = result
                outcomes.append(result - base)
            elif isinstance(result, Value):
                current = result.modified
                outcomes.append((result.key, result.data, result.modified - base))
            else:
                outcomes.append([(value.key, value.data, value.modified - base) for value in result])
    return outcomes


def test_tls_with_client_certificates(tmp_path: Path, prefix: str) -> None:
    """Both kinds of server require a client certificate; TLSConfig gives the CA, certificate and key."""
    authority = certs.Authority(str(tmp_path), "client")
    server_pair = authority.issue("server", "server", server=True)
    client_pair = authority.issue("client", "client", server=False)
    etcd = EtcdServer(str(tmp_path))
    etcd.extra_args = [
        f"--cert-file={server_pair.cert}",
        f"--key-file={server_pair.key}",
        "--client-cert-auth",
        f"--trusted-ca-file={authority.cert}",
    ]
    pykine = PykineServer(
        str(tmp_path),
        f"--server-cert-file={server_pair.cert}",
        f"--server-key-file={server_pair.key}",
        f"--trusted-ca-file={authority.cert}",
    )
    tls = TLSConfig(authority.cert, client_pair.cert, client_pair.key)
    etcd.client_scheme = "https"
    for server in (etcd, pykine):
        server.credentials = _credentials(authority.cert, client_pair)
        server.start()
        try:

            async def scenario(server: Server = server) -> None:
                async with Client(f"https://{server.address}", tls) as client:
                    revision = await client.create(prefix + "a", b"1")
                    assert await client.get(prefix + "a") == Value((prefix + "a").encode(), b"1", revision)
                # Without a client certificate the handshake is refused: unavailable, not empty.
                async with Client(f"https://{server.address}", TLSConfig(authority.cert), timeout=5) as client:
                    with pytest.raises(UnavailableError):
                        await client.list(prefix)

            run(scenario())
        finally:
            server.stop()


def _credentials(ca: str, pair: certs.Pair):  # type: ignore[no-untyped-def]
    import grpc

    return grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), Path(pair.key).read_bytes(), Path(pair.cert).read_bytes()
    )


def test_bad_configuration_is_refused_before_any_call(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"cannot read .*missing\.pem"):
        Client("https://127.0.0.1:2379", TLSConfig(ca_file=missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="bad certificate or key"):
        Client("https://127.0.0.1:2379", TLSConfig(ca_file=str(garbage)))
    with pytest.raises(ConfigError, match="both cert_file and key_file"):
        Client("https://127.0.0.1:2379", TLSConfig(cert_file=str(garbage)))
    authority = certs.Authority(str(tmp_path), "mismatch")
    one, other = authority.issue("one", "one", server=False), authority.issue("two", "two", server=False)
    with pytest.raises(ConfigError, match="bad certificate or key"):
        Client("https://127.0.0.1:2379", TLSConfig(authority.cert, one.cert, other.key))
    with pytest.raises(ConfigError, match="TLS settings given for http:// endpoints"):
        Client("http://127.0.0.1:2379", TLSConfig(ca_file=authority.cert))
    for endpoints, problem in [
        ([], "no endpoints"),
        ("etcd", "not host:port"),
        ("unix:///tmp/etcd.sock", "http:// or https://"),
        (["http://a:1", "https://b:2"], "mix"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            Client(endpoints)


def test_importable_without_the_server_dependencies() -> None:
    """The client needs grpcio and protobuf only: the server's libraries are made unimportable here."""
    program = textwrap.dedent(
        """
        import sys
        blocked = ("uvloop", "psycopg", "psycopg_pool", "asyncmy", "nats", "bcrypt", "jwt", "httptools",
                   "hpack", "wsproto", "prometheus_client", "msgpack")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import pykine.client
        from pykine.client import SyncClient
        with SyncClient("127.0.0.1:1", timeout=2) as client:
            try:
                client.list("/")
            except pykine.client.UnavailableError as error:
                print("unavailable:", error.endpoint)
        print(sorted(name for name in sys.modules if name.startswith("pykine")))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "unavailable: 127.0.0.1:1" in result.stdout
    loaded = result.stdout.strip().splitlines()[-1]
    assert "pykine.server" not in loaded and "pykine.engine" not in loaded and "pykine.transport" not in loaded


def pykine_client(server: Server, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pykine", "client", f"--endpoints={endpoint(server)}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )


def test_the_client_subcommand(target: Server, prefix: str) -> None:
    created = pykine_client(target, "create", prefix + "a", "hello")
    assert created.returncode == 0, created.stderr
    revision = int(created.stdout)
    got = pykine_client(target, "get", prefix + "a", "-w", "json")
    assert json.loads(got.stdout) == {"key": prefix + "a", "data": "hello", "modified": revision}
    assert pykine_client(target, "get", prefix + "a").stdout == f"{prefix}a\nhello\n"
    stale = pykine_client(target, "update", prefix + "a", str(revision + 100), "lost")
    assert stale.returncode == 1
    assert stale.stderr == (
        f"pykine client: error: key {(prefix + 'a').encode()!r} was expected at revision {revision + 100}"
        f" but is at revision {revision}\n"
    )
    updated = pykine_client(target, "update", prefix + "a", str(revision), "-", stdin="from stdin")
    assert updated.returncode == 0, updated.stderr
    assert pykine_client(target, "list", prefix).stdout == f"{prefix}a\nfrom stdin\n"
    assert pykine_client(target, "list", prefix, "--revision", str(revision)).stdout == f"{prefix}a\nhello\n"
    assert pykine_client(target, "delete", prefix + "a", updated.stdout.strip()).returncode == 0
    missing = pykine_client(target, "get", prefix + "a")
    name = (prefix + "a").encode()
    assert (missing.returncode, missing.stderr) == (1, f"pykine client: error: key {name!r} not found\n")
    exists = pykine_client(target, "create", prefix + "b", "1"), pykine_client(target, "create", prefix + "b", "2")
    assert exists[1].returncode == 1 and "already exists" in exists[1].stderr
    bad = pykine_client(target, "update", prefix + "b", "abc", "x")
    assert bad.returncode == 2 and "a revision is a whole number, not 'abc'" in bad.stderr


def test_the_client_subcommand_watches(target: Server, prefix: str) -> None:
    first = int(pykine_client(target, "create", prefix + "a", "1").stdout)
    command = [sys.executable, "-m", "pykine", "client", f"--endpoints={endpoint(target)}", "-w", "json"]
    watch = subprocess.Popen(
        [*command, "watch", prefix, "--revision", str(first)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        assert watch.stdout is not None
        put = {"kind": "put", "key": prefix + "a", "data": "1", "modified": first}
        assert json.loads(watch.stdout.readline()) == put
        deleted = int(pykine_client(target, "delete", prefix + "a", str(first)).stdout)
        assert json.loads(watch.stdout.readline()) == {**put, "kind": "delete", "data": "", "modified": deleted}
    finally:
        watch.terminate()
        watch.wait(timeout=30)


def test_the_client_subcommand_reports_unreachable_endpoints() -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "pykine", "client", f"--endpoints=127.0.0.1:{port}", "--timeout=2", "list", "/"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"pykine client: error: UNAVAILABLE from 127.0.0.1:{port}: "), done.stderr
    assert done.stdout == ""
