"""pykine on a 3-node NATS cluster (3 replicas) through the faults a cluster lives with.

- kill -9 of the stream's JetStream leader under load, through three pykine
  instances: no acknowledged write is lost, pykine carries on by itself once
  NATS has a new leader, and every instance's watch delivers one identical,
  gap-free sequence. The time without acknowledged writes is printed (a
  measurement, not an assertion).
- kill -9 of every node at once, then a restart: every acknowledged write is
  still there, and the running pykine instances serve again without a restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest
from harness import PykineServer, WatchSession, call, pb
from natscluster import NatsCluster
from test_outage import PREFIX, PREFIX_END, TIMEOUT, Attempt, Load, alive, recover, watched_events

BUCKET = "faults"


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    nodes = NatsCluster(3).start()
    try:
        yield nodes
    finally:
        nodes.destroy()


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pykine-nats-faults-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_instances(cluster: NatsCluster, workdir: str, count: int) -> list[PykineServer]:
    servers = []
    for n in range(count):
        os.mkdir(os.path.join(workdir, str(n)))
        servers.append(PykineServer(os.path.join(workdir, str(n)), endpoint=cluster.endpoint(BUCKET)))
        servers[-1].start()
    return servers


def check_history(servers: list[PykineServer], watches: list[WatchSession], puts: list[Attempt]) -> int:
    """Every instance has every acknowledged put at its revision, and every watch the same gap-free events."""
    finals = [
        call(server, "KV", "Range", pb.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=TIMEOUT)
        for server in servers
    ]
    assert all(final.ok for final in finals), finals
    last = max(final.response.header.revision for final in finals)
    finals = [
        call(server, "KV", "Range", pb.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=TIMEOUT)
        for server in servers
    ]
    states = [{kv.key: (kv.value, kv.mod_revision) for kv in final.response.kvs} for final in finals]
    assert all(state == states[0] for state in states), "instances disagree on the final state"
    acked = [a for a in puts if a.revision is not None]
    lost = [a for a in acked if states[0].get(a.key) != (a.value, a.revision)]
    assert not lost, f"{len(lost)} acknowledged puts lost or changed, e.g. {lost[:3]}"
    sequences = [[(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in watched_events(w, last)] for w in watches]
    for n, sequence in enumerate(sequences):
        assert sequence == sequences[0], f"instance {n}'s watch saw another sequence"
        assert [revision for *_, revision in sequence] == list(range(2, last + 1)), f"instance {n}: gaps"
    return last


def longest_wait(puts: list[Attempt], after: float) -> tuple[float, float]:
    """The longest time after `after` with no put acknowledged anywhere, and when it began."""
    ends = sorted(a.ended for a in puts if a.revision is not None and a.ended >= after)
    assert ends, "no put was acknowledged after the fault"
    gaps = [(later - earlier, earlier) for earlier, later in zip([after, *ends], ends, strict=False)]
    return max(gaps)


@contextlib.contextmanager
def under_load(
    cluster: NatsCluster, workdir: str, instances: int, acks: int
) -> Iterator[tuple[list[PykineServer], list[WatchSession], list[Load]]]:
    """`instances` pykine instances, each with a watch from revision 1 and a load of its own, `acks` puts in."""
    servers = start_instances(cluster, workdir, instances)
    watches: list[WatchSession] = []
    loads: list[Load] = []
    try:
        for server in servers:
            watches.append(WatchSession(server))
            watches[-1].create(key=PREFIX, range_end=PREFIX_END, start_revision=1)
            assert watches[-1].next().created
        loads = [Load(server.address, tag=b"i%d" % n) for n, server in enumerate(servers)]
        for load in loads:
            load.start()
        for load in loads:
            load.wait_for_acks(acks, timeout=30)
        yield servers, watches, loads
    finally:
        for load in loads:
            load.halt.set()
        for watch in watches:
            watch.close()
        for server in servers:
            server.stop()


def test_leader_kill_under_load(cluster: NatsCluster, workdir: str) -> None:
    with under_load(cluster, workdir, 3, 100) as (servers, watches, loads):
        leader = cluster.stream_leader(f"PYKINE_{BUCKET}")
        killed = time.monotonic()
        cluster.kill_node(leader)
        for load in loads:
            load.wait_for_acks(100, timeout=60, since=killed)
        cluster.start_node(leader)
        restarted = time.monotonic()
        for load in loads:
            load.wait_for_acks(100, timeout=60, since=restarted)
        for load in loads:
            load.stop()
        for server in servers:
            alive(server)
        puts = [a for load in loads for a in load.attempts if a.value is not None]
        last = check_history(servers, watches, puts)
        window, began = longest_wait(puts, killed)
        failed = [a for a in puts if a.code is not None]
        print(
            f"\n[leader kill] node n{leader} killed; {sum(a.revision is not None for a in puts)} puts acknowledged,"
            f" {len(failed)} failed ({sorted({a.code.name for a in failed if a.code})}); no put acknowledged for"
            f" {window:.2f}s from {began - killed:.2f}s after the kill; {last - 1} revisions, identical on 3 watches"
        )


def test_whole_cluster_restart_keeps_every_write(cluster: NatsCluster, workdir: str) -> None:
    with under_load(cluster, workdir, 2, 150) as (servers, watches, loads):
        for n in range(3):
            cluster.kill_node(n)
        down = time.monotonic()
        time.sleep(2)
        for n in range(3):
            cluster.start_node(n)
        for server in servers:
            took, _ = recover(server)
            print(f"\n[cluster restart] {server.workdir}: serving again {took:.1f}s after the probe began")
        for load in loads:
            load.wait_for_acks(100, timeout=60, since=down)
            load.stop()
        for server in servers:
            alive(server)
        puts = [a for load in loads for a in load.attempts if a.value is not None]
        last = check_history(servers, watches, puts)
        print(f"[cluster restart] {sum(a.revision is not None for a in puts)} puts acknowledged, {last - 1} revisions")
