"""A network partition of a 3-node dqlite cluster: the minority side stops acknowledging writes and reads.

Each pykine runs in a network namespace of its own, joined to the others by
veth pairs on a bridge (a private /24 that exists only for the test; the
test process reaches every pykine from the bridge). The partition cuts the
leader off from the other two nodes with blackhole routes on both sides, so
the test still talks to all three:

- through the cut-off leader, no write is acknowledged and no read is answered
  (linearizable reads pass a write barrier, which needs a quorum): each ends
  in an error, never in a stale or lost answer;
- the majority elects a leader and serves writes after about a second;
- once the partition heals, the old leader follows again and serves what the
  majority wrote.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import grpc
import pytest
from harness import PykineServer, call, pb

BOUND = 30.0


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class Hosts:
    """Three network namespaces on a bridge, each with one address; removed by destroy()."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"pkbr{self.tag}"
        self.namespaces = [f"pykine-{self.tag}-{n}" for n in range(3)]
        self.addresses = [f"{self.subnet}.{n + 1}" for n in range(3)]

    def create(self) -> Hosts:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for n, (namespace, address) in enumerate(zip(self.namespaces, self.addresses, strict=True)):
            outside, inside = f"pk{self.tag}o{n}", f"pk{self.tag}i{n}"
            sh("ip", "netns", "add", namespace)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", inside, "netns", namespace)
            sh("ip", "link", "set", outside, "master", self.bridge)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
            sh("ip", "-n", namespace, "link", "set", inside, "up")
            sh("ip", "-n", namespace, "link", "set", "lo", "up")
        return self

    def cut(self, alone: int, heal: bool = False) -> None:
        """Blackhole routes between host `alone` and the others, both ways (or remove them)."""
        verb = "del" if heal else "add"
        for other in range(3):
            if other != alone:
                sh("ip", "-n", self.namespaces[alone], "route", verb, "blackhole", f"{self.addresses[other]}/32")
                sh("ip", "-n", self.namespaces[other], "route", verb, "blackhole", f"{self.addresses[alone]}/32")

    def destroy(self) -> None:
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


class HostedPykine(PykineServer):
    """pykine inside one of the test's network namespaces, serving on its address there."""

    def __init__(self, workdir: str, namespace: str, address: str, *args: str, endpoint: str) -> None:
        super().__init__(workdir, f"--peer-bind-address={address}:2380", *args, endpoint=endpoint)
        self.namespace = namespace
        self.address = self.listen_address = f"{address}:2379"

    def command(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *super().command()]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    hosts = Hosts()
    try:
        yield hosts.create()
    finally:
        hosts.destroy()


def put(server: PykineServer, key: bytes, timeout: float = 5) -> grpc.StatusCode | None:
    try:
        server.stub("KV").Put(pb.PutRequest(key=key, value=b"v"), timeout=timeout)
    except grpc.RpcError as error:
        return error.code()
    return None


def test_the_minority_side_stops_answering(hosts: Hosts) -> None:
    workdir = tempfile.mkdtemp(prefix="pykine-partition-")
    first = hosts.addresses[0]
    servers = [
        HostedPykine(
            os.path.join(workdir, str(n)),
            namespace,
            address,
            endpoint=f"dqlite://{workdir}/node-{n}" + (f"?join={first}:2380" if n else ""),
        )
        for n, (namespace, address) in enumerate(zip(hosts.namespaces, hosts.addresses, strict=True))
    ]
    try:
        for server in servers:
            os.makedirs(server.workdir)
            server.start(timeout=BOUND)
        deadline = time.monotonic() + BOUND
        while servers[0].log().count("is now a voter") < 2:  # the leader's process promoted both
            assert time.monotonic() < deadline, servers[0].log()
            time.sleep(0.2)
        assert put(servers[0], b"before") is None
        leader = servers[0]  # it bootstrapped the cluster and leads it

        hosts.cut(0)
        cut_at = time.monotonic()
        # The majority elects a leader among themselves and serves writes again.
        while put(servers[1], b"majority", timeout=2) is not None:
            assert time.monotonic() - cut_at < BOUND, servers[1].log()
            time.sleep(0.1)
        print(f"\n[dqlite partition] the majority served writes {time.monotonic() - cut_at:.2f}s after the cut")
        # The cut-off old leader acknowledges no write and answers no read, not even one it could
        # answer from its own (stale) state.
        for attempt in range(3):
            assert put(leader, b"minority/%d" % attempt) is not None
            stale = call(leader, "KV", "Range", pb.RangeRequest(key=b"majority"), timeout=5)
            assert not stale.ok, f"a stale read was answered: {stale.response}"

        hosts.cut(0, heal=True)
        deadline = time.monotonic() + BOUND
        while True:
            healed = call(leader, "KV", "Range", pb.RangeRequest(key=b"majority"), timeout=5)
            if healed.ok and healed.response.count == 1:
                break
            assert time.monotonic() < deadline, leader.log()
            time.sleep(0.2)
        assert put(leader, b"after") is None
        keys = call(servers[2], "KV", "Range", pb.RangeRequest(key=b"\x00", range_end=b"\x00")).response.kvs
        assert {kv.key for kv in keys} == {b"before", b"majority", b"after"}
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
