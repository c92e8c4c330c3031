"""Three pykine processes forming one dqlite cluster on loopback, with faults.

Each process hosts a node; the first bootstraps the cluster and the others
join it, then the leader's process makes them voters. Writers put keys
through all three processes while the faults happen:

- kill -9 of the process whose node leads: no acknowledged write is lost, the
  survivors serve again after an election (the window is printed, not
  asserted), lease expiry passes to the new leader's process, and the killed
  node rejoins and catches up: after it is back, another node is killed and
  the cluster still has a quorum with it;
- every process killed, then all started again: the data is intact;
- a node removed with `etcdctl member remove` (its process stops) and a new
  node added in its place; the removed node's directory is refused.

Bad starts get one clear line and exit code 2, and change nothing on disk: a
join address where no cluster answers, a data directory pykine did not make
or one that belongs to another cluster, and a restart without a quorum.

The concurrency and linearizability checks on three dqlite instances are
those of test_multi_instance.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from databases import free_port
from dbauth import refused
from harness import PykineServer, WatchSession, call, etcdctl, pb

from pykine.backends import dqlitewire as wire
from pykine.backends.dqliteclient import connect_leader

BOUND = 30.0
VALUE = b"v" * 100


class Cluster:
    """Three pykine processes on one dqlite cluster kept in a directory of its own."""

    def __init__(self, size: int = 3) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pykine-dqlite-cluster-")
        self.endpoint = f"dqlite://{os.path.join(self.workdir, 'nodes')}"
        self.servers = [self.server(str(n)) for n in range(size)]

    def server(self, name: str, *args: str, endpoint: str | None = None) -> PykineServer:
        os.makedirs(os.path.join(self.workdir, name), exist_ok=True)
        return PykineServer(os.path.join(self.workdir, name), *args, endpoint=endpoint or self.endpoint)

    def start(self) -> Cluster:
        for server in self.servers:
            server.start()
        return self

    def peer(self, server: PykineServer) -> str:
        assert server.dqlite_node is not None
        return server.dqlite_node[1]

    def state(self) -> tuple[str, list[tuple[int, str, int]]]:
        """(the leader's peer address, every node as (id, address, role)), asked of the running nodes."""

        async def ask() -> tuple[str, list[tuple[int, str, int]]]:
            running = [self.peer(s) for s in self.servers if s.process is not None]
            connection = await connect_leader(running, "pykine")
            try:
                return connection.address, await connection.cluster()
            finally:
                await connection.close()

        return asyncio.run(ask())

    def wait_for_voters(self, count: int) -> list[tuple[int, str, int]]:
        deadline = time.monotonic() + BOUND
        while True:
            try:
                _, nodes = self.state()
                if sum(role == wire.VOTER for _, _, role in nodes) == count:
                    return nodes
            except Exception:
                pass
            assert time.monotonic() < deadline, f"never {count} voters"
            time.sleep(0.2)

    def leader(self) -> PykineServer:
        address, _ = self.state()
        return next(server for server in self.servers if self.peer(server) == address)

    def destroy(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.destroy()


class Writers:
    """A thread per server putting new keys, recording each acknowledged revision and when it came."""

    def __init__(self, servers: list[PykineServer]) -> None:
        self.acknowledged: dict[bytes, int] = {}
        self.successes: dict[int, list[float]] = {index: [] for index in range(len(servers))}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(index, server.stub("KV")), daemon=True)
            for index, server in enumerate(servers)
        ]

    def _run(self, index: int, kv: object) -> None:
        number = 0
        while not self._stop.is_set():
            key = b"w/%d/%06d" % (index, number)
            number += 1
            try:
                revision = kv.Put(pb.PutRequest(key=key, value=VALUE), timeout=5).header.revision  # type: ignore[attr-defined]
            except grpc.RpcError:
                time.sleep(0.02)
                continue
            except ValueError:  # its server was killed and its channel closed
                return
            with self._lock:
                self.acknowledged[key] = revision
                self.successes[index].append(time.monotonic())

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=BOUND)


def all_keys(server: PykineServer) -> dict[bytes, int]:
    outcome = call(server, "KV", "Range", pb.RangeRequest(key=b"w/", range_end=b"w0"), timeout=BOUND)
    assert outcome.ok, f"{server.log_path}: {outcome.code} {outcome.details}"
    return {kv.key: kv.mod_revision for kv in outcome.response.kvs}


def check_nothing_lost(writers: Writers, server: PykineServer) -> dict[bytes, int]:
    stored = all_keys(server)
    lost = {key: revision for key, revision in writers.acknowledged.items() if stored.get(key) != revision}
    assert not lost, f"{len(lost)} acknowledged writes lost or changed, e.g. {list(lost.items())[:3]}"
    return stored


def wait_until_serving(server: PykineServer) -> None:
    deadline = time.monotonic() + BOUND
    while not call(server, "KV", "Put", pb.PutRequest(key=b"probe", value=b"x"), timeout=5).ok:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)


def test_killing_the_leader_loses_no_acknowledged_write(cluster: Cluster) -> None:
    nodes = cluster.wait_for_voters(3)
    assert len(nodes) == 3
    leader = cluster.leader()
    survivors = [server for server in cluster.servers if server is not leader]
    watch = WatchSession(survivors[0])
    watch.create(key=b"w/", range_end=b"w0", start_revision=1)
    assert watch.next(timeout=BOUND).created
    # Lease expiry is the leader's process's duty; this lease must still expire after the kill.
    assert "now expires leases" in leader.log() and "now expires leases" not in survivors[1].log()
    granted = call(survivors[1], "Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=3))
    assert granted.ok, granted
    leased = pb.PutRequest(key=b"w/lease", value=b"v", lease=granted.response.ID)
    assert call(survivors[1], "KV", "Put", leased).ok
    with Writers(cluster.servers) as writers:
        time.sleep(2)
        killed_at = time.monotonic()
        leader.kill()
        time.sleep(6)
    # The window: the longest time a survivor's writer went without an acknowledgement across the kill.
    gaps = []
    for index, server in enumerate(cluster.servers):
        if server is leader:
            continue
        times = writers.successes[index]
        before = [t for t in times if t <= killed_at]
        after = [t for t in times if t > killed_at]
        assert after, f"survivor {server.log_path} never acknowledged a write after the kill:\n{server.log()}"
        gaps.append(after[0] - (before[-1] if before else killed_at))
    print(f"\n[dqlite leader kill -9] writes through survivors paused {max(gaps):.2f}s; "
          f"{len(writers.acknowledged)} writes acknowledged")  # fmt: skip
    deadline = time.monotonic() + BOUND
    while call(survivors[1], "KV", "Range", pb.RangeRequest(key=b"w/lease")).response.count:
        assert time.monotonic() < deadline, "the lease never expired after the leader's process died"
        time.sleep(0.1)
    assert any("now expires leases" in server.log() for server in survivors)
    check_nothing_lost(writers, survivors[1])

    # The watcher saw one gap-free sequence: every write, the lease's key and its expiry.
    last = call(survivors[1], "KV", "Range", pb.RangeRequest(key=b"w/")).response.header.revision
    seen: list[int] = []
    while not seen or seen[-1] < last:
        response = watch.next(timeout=BOUND)
        assert not response.canceled, response
        seen += [event.kv.mod_revision for event in response.events]
    watch.close()
    assert seen == list(range(2, last + 1)), "the watch skipped or repeated revisions"

    # The killed node comes back, catches up, and counts for the quorum again.
    leader.start()
    cluster.wait_for_voters(3)
    assert check_nothing_lost(writers, leader) == all_keys(survivors[0])
    # Every process names the same Raft leader in Maintenance.Status, as etcd's members do.
    leading = call(cluster.leader(), "Maintenance", "Status", pb.StatusRequest()).response.header.member_id
    for server in cluster.servers:
        assert call(server, "Maintenance", "Status", pb.StatusRequest()).response.leader == leading
    time.sleep(1)  # the restarted node has the log by now; take another node away to prove it
    other = survivors[0] if cluster.leader() is not survivors[0] else survivors[1]
    other.kill()
    remaining = next(server for server in cluster.servers if server.process is not None and server is not leader)
    wait_until_serving(remaining)
    check_nothing_lost(writers, leader)
    check_nothing_lost(writers, remaining)


def test_move_leader_hands_raft_leadership_over(cluster: Cluster) -> None:
    """etcdctl move-leader, sent through any member, makes the target's node the Raft leader."""
    cluster.wait_for_voters(3)
    endpoints = ",".join(server.address for server in cluster.servers)
    for target in cluster.servers:
        member = call(target, "Maintenance", "Status", pb.StatusRequest()).response.header.member_id
        moved = etcdctl(cluster.servers[0], f"--endpoints={endpoints}", "move-leader", f"{member:x}")
        assert moved.returncode == 0, moved
        assert cluster.leader() is target
        for server in cluster.servers:
            assert call(server, "Maintenance", "Status", pb.StatusRequest()).response.leader == member
        assert call(target, "KV", "Put", pb.PutRequest(key=b"moved", value=b"%x" % member)).ok


def test_a_full_restart_keeps_the_data_and_a_removed_node_is_replaced(cluster: Cluster) -> None:
    cluster.wait_for_voters(3)
    with Writers(cluster.servers) as writers:
        time.sleep(2)
    assert len(writers.acknowledged) > 10
    for server in cluster.servers:
        server.kill()
    # One node cannot elect a leader alone: it says so instead of serving stale data or bootstrapping anew.
    dsn, address = cluster.servers[0].dqlite_node or ("", "")
    line = refused(f"{dsn}?startTimeout=3s", f"--peer-bind-address={address}")
    assert "no dqlite leader within 3s" in line and "needs a majority of its voters running" in line, line
    # All start at once, as after a power cut.
    failures: list[BaseException] = []

    def start(server: PykineServer) -> None:
        try:
            server.start(timeout=BOUND)
        except BaseException as exc:
            failures.append(exc)

    starters = [threading.Thread(target=start, args=(server,)) for server in cluster.servers]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    assert not failures, failures
    for server in cluster.servers:
        check_nothing_lost(writers, server)

    # Remove a node that does not lead: its process stops by itself, as a removed etcd member does.
    leader = cluster.leader()
    removed = next(server for server in cluster.servers if server is not leader)
    member = call(removed, "Maintenance", "Status", pb.StatusRequest()).response.header.member_id
    listed = etcdctl(leader, "member", "list")
    assert f"{member:x}" in listed.stdout, listed
    result = etcdctl(leader, "member", "remove", f"{member:x}")
    assert result.returncode == 0 and "removed from cluster" in result.stdout, result
    assert removed.process is not None
    removed.process.wait(timeout=BOUND)
    assert "was removed from the cluster: stopping" in removed.log()
    assert f"{member:x}" not in etcdctl(leader, "member", "list").stdout

    # Its data directory is refused from now on, with a clear reason.
    with pytest.raises(RuntimeError, match=r"is not a member of the cluster .*it was removed"):
        removed.start(timeout=BOUND)

    # A new node joins in its place and becomes a voter; writes go through it.
    joins = ",".join(cluster.peer(server) for server in cluster.servers if server is not removed)
    address = f"127.0.0.1:{free_port()}"
    newcomer = cluster.server(
        "new",
        f"--peer-bind-address={address}",
        endpoint=f"dqlite://{os.path.join(cluster.workdir, 'new-node')}?join={joins}",
    )
    cluster.servers[cluster.servers.index(removed)] = newcomer
    newcomer.dqlite_node = ("", address)
    newcomer.start(timeout=BOUND)
    nodes = cluster.wait_for_voters(3)
    assert address in {node_address for _, node_address, _ in nodes}
    assert call(newcomer, "KV", "Put", pb.PutRequest(key=b"w/new", value=b"x")).ok
    check_nothing_lost(writers, newcomer)


def test_bad_starts_are_refused_and_change_nothing(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    line = refused(
        f"dqlite://{tmp_path}/joiner?join={nowhere}&startTimeout=2s", f"--peer-bind-address=127.0.0.1:{free_port()}"
    )
    assert f"cannot join: none of {nowhere} answered as a dqlite leader within 2s" in line, line

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "1-8").write_bytes(b"raft segment")
    line = refused(f"dqlite://{foreign}", f"--peer-bind-address=127.0.0.1:{free_port()}")
    assert "holds files pykine did not create: refusing to start" in line, line
    assert os.listdir(foreign) == ["1-8"] and (foreign / "1-8").read_bytes() == b"raft segment"

    # A node of cluster A started with join= pointing at cluster B.
    first, second = (PykineServer(str(tmp_path), endpoint=f"dqlite://{tmp_path}/{name}") for name in "ab")
    try:
        first.start()
        assert call(first, "KV", "Put", pb.PutRequest(key=b"mine", value=b"a")).ok
        first.stop()
        second.start()
        dsn, address = first.dqlite_node or ("", "")
        line = refused(f"{dsn}?join={second.dqlite_node[1] if second.dqlite_node else ''}&startTimeout=2s",
                       f"--peer-bind-address={address}")  # fmt: skip
        assert "belongs to cluster" in line and "refusing to start" in line, line
        first.start()
        assert call(first, "KV", "Range", pb.RangeRequest(key=b"mine")).response.kvs[0].value == b"a"
        assert not call(second, "KV", "Range", pb.RangeRequest(key=b"mine")).response.kvs
    finally:
        first.stop()
        second.stop()
