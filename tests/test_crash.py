"""kill -9 during concurrent writes: every acknowledged Put must survive a restart.

An etcd client treats an OK answer as durable, so pykine may only answer once the write is
committed. Unacknowledged writes may or may not survive; acknowledged ones always must.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from aetcd.rpc import rpc_pb2 as pb
from aetcd.rpc import rpc_pb2_grpc as pb_grpc
from harness import PykineServer

KEYS = 2000
WRITERS = 16
# Kill once this many puts are acknowledged, so most of the rest are still to come or in flight.
KILL_AFTER = 400
PREFIX = b"crash/"


class Writers:
    """WRITERS threads, each with its own connection, putting distinct keys until one fails."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.lock = threading.Lock()
        self.acked: dict[bytes, tuple[bytes, int]] = {}  # key -> (value, revision of its Put)
        self.failures = 0
        self.started = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(index,)) for index in range(WRITERS)]

    def _write(self, index: int) -> None:
        channel = grpc.insecure_channel(self.address)
        stub = pb_grpc.KVStub(channel)
        try:
            self.started.wait()
            for number in range(index, KEYS, WRITERS):
                key = PREFIX + b"%05d" % number
                value = b"value-%d-" % number + bytes(range(256))
                try:
                    response = stub.Put(pb.PutRequest(key=key, value=value), timeout=30)
                except grpc.RpcError:
                    with self.lock:
                        self.failures += 1
                    return  # the server is gone; this writer's later keys are never sent
                with self.lock:
                    self.acked[key] = (value, response.header.revision)
        finally:
            channel.close()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.started.set()

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a writer hung after the server died"


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pykine-crash-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _all_keys(server: PykineServer) -> dict[bytes, pb.KeyValue]:
    response = server.stub("KV").Range(pb.RangeRequest(key=PREFIX, range_end=b"crash0"), timeout=30)
    return {kv.key: kv for kv in response.kvs}


def test_acknowledged_puts_survive_kill_9(workdir: str) -> None:
    """Kill -9 mid-write, restart on the same file: every OK'd Put is there, at its revision."""
    server = PykineServer(workdir)
    writers = Writers(server.address)
    try:
        server.start()
        writers.start()
        deadline = time.monotonic() + 120
        while writers.acked_count() < KILL_AFTER:
            assert time.monotonic() < deadline, f"only {writers.acked_count()} puts acknowledged in time"
            time.sleep(0.001)
        server.kill()
        writers.join()
    finally:
        server.stop()

    acked = dict(writers.acked)
    assert len(acked) >= KILL_AFTER
    assert len(acked) < KEYS, "every put finished before the kill; the test did not crash mid-write"
    assert writers.failures > 0

    revisions = [revision for _, revision in acked.values()]
    assert len(set(revisions)) == len(revisions), "two acknowledged puts were given the same revision"
    assert min(revisions) >= 2  # revision 1 is the empty store

    restarted = PykineServer(workdir, endpoint=server.endpoint)
    try:
        restarted.start()
        stored = _all_keys(restarted)
        missing = sorted(key for key in acked if key not in stored)
        assert not missing, f"{len(missing)} acknowledged keys lost, e.g. {missing[:5]}"
        for key, (value, revision) in acked.items():
            kv = stored[key]
            assert kv.value == value, key
            assert kv.mod_revision == revision == kv.create_revision, key
            assert kv.version == 1, key
        assert len(stored) <= KEYS

        header = restarted.stub("KV").Range(pb.RangeRequest(key=b"anything"), timeout=30).header
        assert header.revision >= len(acked) + 1
        assert header.revision >= max(revisions)

        # The restarted store keeps counting from where it was, and keeps taking writes.
        after = restarted.stub("KV").Put(pb.PutRequest(key=b"after-crash", value=b"ok"), timeout=30)
        assert after.header.revision == header.revision + 1
        again = restarted.stub("KV").Range(pb.RangeRequest(key=b"after-crash"), timeout=30)
        assert [kv.value for kv in again.kvs] == [b"ok"]
    finally:
        restarted.stop()
