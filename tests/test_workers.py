"""--workers: several serving processes on one port and one datastore behave as one etcd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import grpc
import pytest
from harness import ROOT, BidiStream, PykineServer, pb, pb_grpc

CONNECTIONS = 12


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[1]) == supervisor:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def connections_per_worker(pids: list[int], port: int) -> dict[int, int]:
    """Established TCP connections on the server port, by the worker that holds the socket."""
    established = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on v4-mapped IPv6 sockets
        with open(path) as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
                    established.add(fields[9])
    counts = {}
    for pid in pids:
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")}
        counts[pid] = len(inodes & established)
    return counts


@pytest.fixture
def workers() -> Iterator[PykineServer]:
    server = PykineServer(tempfile.mkdtemp(prefix="pykine-workers-"), "--workers=2")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_workers_share_one_port_and_one_datastore(workers: PykineServer) -> None:
    assert workers.process is not None
    pids = worker_pids(workers.process.pid)
    assert len(pids) == 2
    # A local subchannel pool gives each channel its own TCP connection, which the kernel spreads over workers.
    channels = [
        grpc.insecure_channel(workers.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    try:
        kvs = [pb_grpc.KVStub(channel) for channel in channels]
        watches = [BidiStream(pb_grpc.WatchStub(channel).Watch) for channel in channels]
        for watch in watches:
            watch.send(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"w/", range_end=b"w0", prev_kv=True)))
            assert watch.next().created
        spread = connections_per_worker(pids, workers.port)
        assert all(count > 0 for count in spread.values()), f"connections all on one worker: {spread}"

        revisions = []
        for n in range(40):
            kv = kvs[n % CONNECTIONS]
            key = b"w/%d" % (n % 5)
            revisions.append(kv.Put(pb.PutRequest(key=key, value=b"%d" % n), timeout=10).header.revision)
        # Compare-and-swap across workers: exactly one of two racing creates wins.
        create = pb.TxnRequest(
            compare=[pb.Compare(key=b"w/once", target=pb.Compare.MOD, mod_revision=0)],
            success=[pb.RequestOp(request_put=pb.PutRequest(key=b"w/once", value=b"x"))],
        )
        outcomes = [kv.Txn(create, timeout=10).succeeded for kv in kvs]
        assert outcomes.count(True) == 1
        last = kvs[0].Range(pb.RangeRequest(key=b"w/once"), timeout=10).kvs[0].mod_revision
        assert revisions == list(range(2, 42)) and last == 42

        sequences = []
        for watch in watches:
            events = []
            while not events or events[-1].kv.mod_revision < last:
                events.extend(watch.next(timeout=15).events)
            sequences.append([(e.kv.key, e.kv.mod_revision, e.kv.value, e.prev_kv.value) for e in events])
        assert all(sequence == sequences[0] for sequence in sequences)
        assert [revision for _, revision, _, _ in sequences[0]] == list(range(2, 43))
        for watch in watches:
            watch.close()
    finally:
        for channel in channels:
            channel.close()
    workers.stop()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids), "workers outlived the supervisor"


@pytest.mark.parametrize("address", ["unix:///tmp/pykine-workers.sock", "127.0.0.1:0"])
def test_workers_need_a_fixed_tcp_port(address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pykine", f"--listen-address={address}", "--workers=2"],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("pykine: error: --workers needs"), result.stderr


def test_supervisor_stops_workers_on_sigterm(workers: PykineServer) -> None:
    assert workers.process is not None
    pids = worker_pids(workers.process.pid)
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=30) == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
