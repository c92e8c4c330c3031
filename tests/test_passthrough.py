"""pykine with an http(s):// endpoint: a proxy in front of real etcd.

The server suites also run whole through a passthrough (`make test-passthrough`:
PYKINE_TEST_BACKEND=etcd). This module covers what only a proxy has: TLS on
both sides, several etcd endpoints and the loss of some, streams and their
cancellation reaching etcd, etcd's JSON gateway in front, and bad endpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import certs
import grpc
import pytest
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc
from harness import ROOT, EtcdServer, PykineServer, etcdctl, free_port


@pytest.fixture
def upstream() -> Iterator[EtcdServer]:
    workdir = tempfile.mkdtemp(prefix="pykine-upstream-")
    etcd = EtcdServer(workdir)
    etcd.start()
    yield etcd
    etcd.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def proxy(upstream: EtcdServer) -> Iterator[PykineServer]:
    workdir = tempfile.mkdtemp(prefix="pykine-proxy-")
    pykine = PykineServer(workdir, endpoint=f"http://{upstream.address}")
    pykine.start()
    yield pykine
    pykine.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def metric(address: str, name: str) -> float:
    """One unlabelled sample from a server's /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {address}/metrics")


def test_answers_are_etcds_own(upstream: EtcdServer, proxy: PykineServer) -> None:
    """Headers (cluster and member ids included), errors and their messages come from etcd unchanged."""
    proxy.stub("KV").Put(pb.PutRequest(key=b"k", value=b"v"), timeout=10)
    direct = upstream.stub("KV").Range(pb.RangeRequest(key=b"k"), timeout=10)
    through = proxy.stub("KV").Range(pb.RangeRequest(key=b"k"), timeout=10)
    assert through == direct  # nothing normalised: these are etcd's bytes
    status = proxy.stub("Maintenance").Status(pb.StatusRequest(), timeout=10)
    assert status.version == upstream.stub("Maintenance").Status(pb.StatusRequest(), timeout=10).version
    members = proxy.stub("Cluster").MemberList(pb.MemberListRequest(), timeout=10)
    assert [list(member.clientURLs) for member in members.members] == [[f"http://{upstream.address}"]]
    for server in (upstream, proxy):
        with pytest.raises(grpc.RpcError) as failed:
            server.stub("KV").Range(pb.RangeRequest(key=b"k", revision=10_000), timeout=10)
        assert failed.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert failed.value.details() == "etcdserver: mvcc: required revision is a future revision"
    # etcd's /health and /version, answered through the proxy.
    with urllib.request.urlopen(f"http://{proxy.address}/health", timeout=10) as answer:
        assert answer.read() == b'{"health":"true"}'
    with urllib.request.urlopen(f"http://{proxy.address}/version", timeout=10) as answer:
        assert answer.read().decode().startswith(f'{{"etcdserver":"{status.version}"')
    with urllib.request.urlopen(f"http://{proxy.address}/metrics", timeout=10) as answer:
        assert 'pykine_passthrough_call_seconds_count{method="/etcdserverpb.KV/Range"} 2.0' in answer.read().decode()


def test_gateway_in_front_of_etcd(upstream: EtcdServer, proxy: PykineServer) -> None:
    """pykine's JSON gateway serves etcd's answers: the same documents as etcd's own gateway."""

    def post(server: EtcdServer | PykineServer, path: str, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{server.address}{path}", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    assert post(proxy, "/v3/kv/put", b'{"key":"Zm9v","value":"YmFy"}')[0] == 200
    for path, body in [
        ("/v3/kv/range", b'{"key":"Zm9v"}'),
        ("/v3/kv/range", b'{"key":"Zm9v","revision":"999"}'),
        ("/v3/lease/leases", b"{}"),
    ]:
        assert post(proxy, path, body) == post(upstream, path, body), path
    # A streaming route: the watch answers come from etcd, one JSON line each.
    request = urllib.request.Request(
        f"http://{proxy.address}/v3/watch", data=b'{"create_request":{"key":"Zm9v"}}', method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as stream:
        assert b'"created":true' in stream.readline()
        proxy.stub("KV").Put(pb.PutRequest(key=b"foo", value=b"baz"), timeout=10)
        assert b'"value":"YmF6"' in stream.readline()


def test_watch_and_keep_alive_streams_are_forwarded_and_cancelled(upstream: EtcdServer, proxy: PykineServer) -> None:
    """Each stream through pykine is one stream on etcd; when the caller goes, so does etcd's watcher."""
    watchers = "etcd_debugging_mvcc_watcher_total"
    before = metric(upstream.address, watchers)
    requests: list[pb.WatchRequest] = [pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"w"))]
    stream = proxy.stub("Watch").Watch(iter(requests), timeout=30)
    created = next(stream)
    assert created.created
    assert metric(upstream.address, watchers) == before + 1
    proxy.stub("KV").Put(pb.PutRequest(key=b"w", value=b"1"), timeout=10)
    event = next(stream)
    assert [(e.kv.key, e.kv.value) for e in event.events] == [(b"w", b"1")]
    stream.cancel()
    deadline = time.monotonic() + 10
    while metric(upstream.address, watchers) != before:
        assert time.monotonic() < deadline, "etcd's watcher outlived the cancelled stream"
        time.sleep(0.1)
    # Keep-alive: each request refreshes the lease on etcd and answers with its TTL.
    lease = proxy.stub("Lease").LeaseGrant(pb.LeaseGrantRequest(TTL=30), timeout=10)
    answers = proxy.stub("Lease").LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease.ID)] * 3), timeout=30)
    assert [(answer.ID, answer.TTL) for answer in answers] == [(lease.ID, 30)] * 3
    live = upstream.stub("Lease").LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease.ID), timeout=10)
    assert live.TTL > 25


def test_tls_on_both_sides(tmp_path: Path) -> None:
    """Clients reach pykine over mTLS; pykine reaches etcd over mTLS with --ca-file/--cert-file/--key-file."""
    authority = certs.Authority(str(tmp_path), "both")
    server_pair = authority.issue("server", "server", server=True)
    client_pair = authority.issue("client", "client", server=False)
    (tmp_path / "etcd").mkdir()
    etcd = EtcdServer(str(tmp_path / "etcd"))
    etcd.client_scheme = "https"
    etcd.extra_args = [
        f"--cert-file={server_pair.cert}",
        f"--key-file={server_pair.key}",
        "--client-cert-auth",
        f"--trusted-ca-file={authority.cert}",
    ]
    credentials = grpc.ssl_channel_credentials(
        Path(authority.cert).read_bytes(), Path(client_pair.key).read_bytes(), Path(client_pair.cert).read_bytes()
    )
    etcd.credentials = credentials
    pykine = PykineServer(
        str(tmp_path),
        f"--ca-file={authority.cert}",
        f"--cert-file={client_pair.cert}",
        f"--key-file={client_pair.key}",
        f"--server-cert-file={server_pair.cert}",
        f"--server-key-file={server_pair.key}",
        f"--trusted-ca-file={authority.cert}",
        endpoint=f"https://{etcd.address}",
    )
    pykine.credentials = credentials
    etcd.start()
    try:
        pykine.start()
        pykine.stub("KV").Put(pb.PutRequest(key=b"secure", value=b"yes"), timeout=10)
        assert etcd.stub("KV").Range(pb.RangeRequest(key=b"secure"), timeout=10).kvs[0].value == b"yes"
        tls = [f"--cacert={authority.cert}", f"--cert={client_pair.cert}", f"--key={client_pair.key}"]
        got = etcdctl(pykine, *tls, "get", "secure", "--print-value-only")
        assert got.stdout == "yes\n", got.stderr
        pykine.stop()
        # Without the client certificate etcd refuses pykine: every call is UNAVAILABLE, never an empty answer.
        pykine.extra_args = [arg for arg in pykine.extra_args if not arg.startswith(("--cert-file", "--key-file"))]
        channel = start_without_etcd(pykine, credentials)
        try:
            with pytest.raises(grpc.RpcError) as refused:
                rpc_pb2_grpc.KVStub(channel).Range(pb.RangeRequest(key=b"secure"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            channel.close()
    finally:
        pykine.stop()
        etcd.stop()


class EtcdCluster:
    """Three etcd members on loopback."""

    def __init__(self, workdir: str, size: int = 3) -> None:
        self.members = [EtcdServer(os.path.join(workdir, f"m{n}")) for n in range(size)]
        peers = ",".join(f"m{n}=http://127.0.0.1:{member.peer_port}" for n, member in enumerate(self.members))
        for n, member in enumerate(self.members):
            os.makedirs(member.workdir)
            member.member_name = f"m{n}"
            member.initial_cluster = peers

    def start(self) -> None:
        """All at once: a member waits for a quorum before it answers."""
        threads = [threading.Thread(target=member.start, kwargs={"timeout": 60}) for member in self.members]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for member in self.members:
            member.stub("KV").Range(pb.RangeRequest(key=b"ready"), timeout=30)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def wait_for_a_leader(member: EtcdServer, lost_id: int) -> None:
    """Until `member` knows a leader other than the member that is gone."""
    deadline = time.monotonic() + 30
    while True:
        try:
            status = member.stub("Maintenance").Status(pb.StatusRequest(), timeout=5)
            if status.leader and status.leader != lost_id:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the surviving members elected no leader"
        time.sleep(0.1)


def test_several_endpoints_and_the_loss_of_the_leader(tmp_path: Path) -> None:
    """Three etcd members behind one pykine: calls move on when a member dies; with quorum gone, a watch
    that requires a leader ends with etcd's own error, through pykine as directly."""
    cluster = EtcdCluster(str(tmp_path))
    cluster.start()
    # Member 0 first, then 2: once 0 is gone, pykine's calls and streams go to member 2, the survivor.
    endpoints = ",".join(f"http://{cluster.members[n].address}" for n in (0, 2, 1))
    pykine = PykineServer(str(tmp_path), endpoint=endpoints)
    try:
        pykine.start()
        kv = pykine.stub("KV")
        kv.Put(pb.PutRequest(key=b"a", value=b"1"), timeout=10)
        # Member 0 leads, so that losing it also means an election.
        dead = cluster.members[0].stub("Maintenance").Status(pb.StatusRequest(), timeout=10).header.member_id
        leader = cluster.members[0].stub("Maintenance").Status(pb.StatusRequest(), timeout=10).leader
        if leader != dead:
            [leading] = [
                m
                for m in cluster.members
                if m.stub("Maintenance").Status(pb.StatusRequest()).header.member_id == leader
            ]
            leading.stub("Maintenance").MoveLeader(pb.MoveLeaderRequest(targetID=dead), timeout=30)
        cluster.members[0].kill()  # the endpoint pykine uses first
        # A stream on the dead member ends UNAVAILABLE, and the next one goes to the next endpoint.
        create = [pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"a"))]
        with pytest.raises(grpc.RpcError) as lost:
            next(pykine.stub("Watch").Watch(iter(create), timeout=20))
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        again = pykine.stub("Watch").Watch(iter(create), timeout=20)
        assert next(again).created
        again.cancel()
        wait_for_a_leader(cluster.members[2], dead)  # if 0 led, the others elect one
        kv.Put(pb.PutRequest(key=b"a", value=b"2"), timeout=20)
        assert kv.Range(pb.RangeRequest(key=b"a"), timeout=20).kvs[0].value == b"2"
        survivor = cluster.members[2]
        require_leader = [("hasleader", "true")]
        streams = {
            "direct": survivor.stub("Watch").Watch(
                iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"a"))]),
                metadata=require_leader,
                timeout=60,
            ),
            "pykine": pykine.stub("Watch").Watch(
                iter([pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"a"))]),
                metadata=require_leader,
                timeout=60,
            ),
        }
        for stream in streams.values():
            assert next(stream).created
        cluster.members[1].kill()  # no quorum: member 2 loses its leader
        outcomes = {}
        for name, stream in streams.items():
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:
                    pass
            outcomes[name] = (ended.value.code(), ended.value.details())
        assert outcomes["pykine"] == outcomes["direct"] == (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader")
    finally:
        pykine.stop()
        cluster.stop()


def run_pykine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pykine", f"--listen-address=127.0.0.1:{free_port()}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT),
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--endpoint=http://etcd"], "passthrough endpoint: endpoint 'http://etcd' is not host:port"),
        (["--endpoint=http://a:1,https://b:2"], "passthrough endpoint: endpoints mix http:// and https://"),
        (["--endpoint=https://a:1", "--ca-file=/nonexistent/ca.pem"], "cannot read /nonexistent/ca.pem"),
        (["--endpoint=https://a:1", "--skip-verify"], "--skip-verify does not apply to a passthrough"),
        (["--endpoint=http://a:1", "--ca-file=/etc/hostname"], "TLS settings given for http:// endpoints"),
    ],
)
def test_bad_passthrough_settings_are_refused(args: list[str], message: str) -> None:
    done = run_pykine(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "pykine: error:" in done.stderr, done.stderr


def start_without_etcd(pykine: PykineServer, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """Start a pykine whose etcd does not answer it (harness's start waits for an answer); a channel to it."""
    with open(pykine.log_path, "ab") as log:
        pykine.process = subprocess.Popen(
            pykine.command(), cwd=pykine.workdir, env=pykine.env(), stdout=log, stderr=subprocess.STDOUT
        )
    if credentials is None:
        channel = grpc.insecure_channel(pykine.address)
    else:
        channel = grpc.secure_channel(pykine.address, credentials)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def test_an_unreachable_etcd_is_unavailable_not_empty(tmp_path: Path) -> None:
    """pykine starts (etcd may come later), and meanwhile every call is UNAVAILABLE with the reason."""
    pykine = PykineServer(str(tmp_path), endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        channel = start_without_etcd(pykine)
        with pytest.raises(grpc.RpcError) as failed:
            rpc_pb2_grpc.KVStub(channel).Range(pb.RangeRequest(key=b"k"), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Connection refused" in (failed.value.details() or ""), failed.value.details()
        for path in ("/health", "/version"):
            with pytest.raises(urllib.error.HTTPError) as unhealthy:
                urllib.request.urlopen(f"http://{pykine.address}{path}", timeout=10)
            assert unhealthy.value.code == 503, path
        channel.close()
    finally:
        pykine.stop()


def test_requests_that_crash_etcd_34_are_refused_in_front_of_it(upstream: EtcdServer, proxy: PykineServer) -> None:
    """etcd 3.4 panics on these (taking every client down); through pykine they get etcd 3.5's or pykine's answer."""
    kv = proxy.stub("KV")
    kv.Put(pb.PutRequest(key=b"a", value=b"kept"), timeout=10)
    delete_a = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"a"))
    # Every key from "a" on: etcd's duplicate-key check sees an empty interval, its apply deletes "a".
    delete_from_a = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"a", range_end=b"\0"))
    keep_value = pb.RequestOp(request_put=pb.PutRequest(key=b"a", ignore_value=True))
    keep_lease = pb.RequestOp(request_put=pb.PutRequest(key=b"a", value=b"v", ignore_lease=True))
    absent = pb.Compare(key=b"a", target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)  # false: "a" exists
    crashing = [
        pb.TxnRequest(success=[delete_from_a, keep_value]),
        pb.TxnRequest(failure=[delete_from_a, keep_lease]),
        # The delete in a nested txn, the put after it in the outer branch, and the other way round.
        pb.TxnRequest(success=[pb.RequestOp(request_txn=pb.TxnRequest(success=[delete_from_a])), keep_value]),
        pb.TxnRequest(
            success=[pb.RequestOp(request_txn=pb.TxnRequest(compare=[absent], failure=[delete_from_a])), keep_value]
        ),
        pb.TxnRequest(success=[delete_from_a, pb.RequestOp(request_txn=pb.TxnRequest(success=[keep_lease]))]),
    ]
    for request in crashing:
        with pytest.raises(grpc.RpcError) as refused:
            kv.Txn(request, timeout=10)
        assert (refused.value.code(), refused.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: key not found",
        )
    # An overlap etcd sees is etcd's to refuse, in its own words.
    with pytest.raises(grpc.RpcError) as duplicate:
        kv.Txn(pb.TxnRequest(success=[delete_a, keep_value]), timeout=10)
    assert duplicate.value.details() == "etcdserver: duplicate key given in txn request"
    bad_sort = pb.RangeRequest(key=b"a", sort_order=pb.RangeRequest.ASCEND, sort_target=9)
    for call in (
        lambda: kv.Range(bad_sort, timeout=10),
        lambda: kv.Txn(pb.TxnRequest(failure=[pb.RequestOp(request_range=bad_sort)]), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.details() == "etcdserver: invalid sort option"
    # What etcd handles stays etcd's: ignore_value with no delete before it, or after a delete in the branch
    # of a nested txn that cannot run (with no compares, only the success branch runs).
    assert kv.Txn(pb.TxnRequest(success=[keep_value]), timeout=10).succeeded
    never_runs = pb.RequestOp(request_txn=pb.TxnRequest(failure=[delete_from_a]))
    assert kv.Txn(pb.TxnRequest(success=[never_runs, keep_value]), timeout=10).succeeded
    assert upstream.stub("KV").Range(pb.RangeRequest(key=b"a"), timeout=10).kvs[0].value == b"kept"


def test_snapshot_streams_etcds_database(upstream: EtcdServer, proxy: PykineServer, tmp_path: Path) -> None:
    """Maintenance.Snapshot, a server stream, through pykine: etcdctl saves a file etcdctl accepts."""
    for n in range(50):
        proxy.stub("KV").Put(pb.PutRequest(key=b"snap/%d" % n, value=b"v" * 100), timeout=10)
    saved = etcdctl(proxy, "snapshot", "save", str(tmp_path / "snap.db"))
    assert saved.returncode == 0, saved.stderr
    status = etcdctl(proxy, "snapshot", "status", str(tmp_path / "snap.db"), "-w", "json")  # reads the file only
    assert status.returncode == 0, status.stderr
    revision = upstream.stub("KV").Range(pb.RangeRequest(key=b"snap/0"), timeout=10).header.revision
    assert json.loads(status.stdout)["revision"] == revision
