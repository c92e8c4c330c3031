"""The space quota and alarms on each backend: fill, see NOSPACE, compact and defragment, disarm, write again.

Also: an alarm raised through one instance holds on another instance of the
same datastore, and survives restarts (it is stored in the datastore).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import databases
import grpc
import pytest
from harness import PykineServer, call, default_endpoint, etcdctl, pb

# Room above the empty datastore's size: database servers grow in larger steps (InnoDB by megabytes).
MARGIN = {
    "sqlite": 400_000,
    "postgres": 800_000,
    "mysql": 3_000_000,
    "nats": 400_000,
    "dqlite": 400_000,
    "etcd": 400_000,  # a passthrough: the quota is the etcd's behind it
}
VALUE = 1500
MAX_WRITES = 20_000


def health(server: PykineServer) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{server.address}/health", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def workdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pykine-quota-") as path:
        yield path


def test_fill_the_quota_then_recover(workdir: str) -> None:
    endpoint = default_endpoint(workdir)
    probe = PykineServer(workdir, endpoint=endpoint)
    probe.start()
    empty = call(probe, "Maintenance", "Status", pb.StatusRequest()).response.dbSize
    probe.stop()

    quota = empty + MARGIN[databases.BACKEND]
    server = PykineServer(workdir, f"--quota-backend-bytes={quota}", endpoint=endpoint)
    server.start()
    try:
        kv = server.stub("KV")
        refused = None
        for n in range(MAX_WRITES):
            try:
                kv.Put(pb.PutRequest(key=b"q/%d" % (n % 5), value=os.urandom(VALUE)), timeout=30)
            except grpc.RpcError as error:
                refused = (error.code(), error.details())
                break
        assert refused == (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"), refused

        member = call(server, "Maintenance", "Status", pb.StatusRequest()).response.header.member_id
        alarms = call(server, "Maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET)).response.alarms
        assert [(alarm.memberID, alarm.alarm) for alarm in alarms] == [(member, pb.NOSPACE)]
        listed = etcdctl(server, "alarm", "list")
        assert listed.returncode == 0 and "alarm:NOSPACE" in listed.stdout, listed
        assert health(server) == (503, b'{"health":"false"}\n')

        # What stays possible: reads, deletes, compaction, defragmentation, disarming.
        revision = kv.Range(pb.RangeRequest(key=b"q/0"), timeout=10).header.revision
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"q/4"), timeout=10)
        kv.Compact(pb.CompactionRequest(revision=revision, physical=True), timeout=60)
        defragmented = etcdctl(server, "defrag")
        assert defragmented.returncode == 0, defragmented
        disarmed = etcdctl(server, "alarm", "disarm")
        assert disarmed.returncode == 0 and "alarm:NOSPACE" in disarmed.stdout, disarmed

        assert kv.Put(pb.PutRequest(key=b"q/after", value=b"fits again"), timeout=10).header.revision > revision
        assert not call(server, "Maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET)).response.alarms
        assert health(server) == (200, b'{"health":"true"}')
        assert "is healthy" in etcdctl(server, "endpoint", "health").stderr
    finally:
        server.stop()


def test_alarms_are_shared_by_instances_and_survive_restarts(workdir: str) -> None:
    endpoint = default_endpoint(workdir)
    first = PykineServer(workdir, endpoint=endpoint)
    second = PykineServer(workdir, endpoint=endpoint)
    first.start()
    second.start()
    try:
        member = call(first, "Maintenance", "Status", pb.StatusRequest()).response.header.member_id
        raise_corrupt = pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=member, alarm=pb.CORRUPT)
        assert call(first, "Maintenance", "Alarm", raise_corrupt).ok
        deadline = time.monotonic() + 10
        while True:  # the other instance hears of it within its refresh interval
            outcome = call(second, "KV", "Put", pb.PutRequest(key=b"shared", value=b"x"))
            if not outcome.ok:
                break
            assert time.monotonic() < deadline, "the second instance never refused writes"
            time.sleep(0.1)
        assert (outcome.code, outcome.details) == (grpc.StatusCode.DATA_LOSS, "etcdserver: corrupt cluster")
        assert call(second, "KV", "Range", pb.RangeRequest(key=b"shared")).ok  # reads go on

        second.stop()
        second.start()
        listed = call(second, "Maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET)).response.alarms
        assert [(alarm.memberID, alarm.alarm) for alarm in listed] == [(member, pb.CORRUPT)]
        outcome = call(second, "KV", "DeleteRange", pb.DeleteRangeRequest(key=b"shared"))
        assert (outcome.code, outcome.details) == (grpc.StatusCode.DATA_LOSS, "etcdserver: corrupt cluster")

        clear = pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=member, alarm=pb.CORRUPT)
        assert list(call(second, "Maintenance", "Alarm", clear).response.alarms) == [
            pb.AlarmMember(memberID=member, alarm=pb.CORRUPT)
        ]
        assert call(second, "KV", "Put", pb.PutRequest(key=b"shared", value=b"y")).ok
    finally:
        second.stop()
        first.stop()
