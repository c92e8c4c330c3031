"""Cluster and Maintenance calls beyond KV, against real etcd: member changes, MoveLeader, hashes.

pykine's members are the instances serving one datastore, not raft peers, so
member changes cannot be made through the API. Every request etcd would
refuse gets etcd's exact refusal (bad URLs, unknown members, promoting a
voting member, a bad leader transferee); a change etcd would make gets a
FAILED_PRECONDITION that says why pykine does not.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import databases
import grpc
import pytest
from harness import Outcome, Pair, PykineServer, call, normalise, pb

MEMBERS_ARE_INSTANCES = (
    "etcdserver: pykine members are the instances serving one datastore:"
    " start or stop an instance instead of reconfiguring members"
)
UNKNOWN_ID = 12345


def own_id(servers: Pair, which: str) -> int:
    server = getattr(servers, which)
    return call(server, "Maintenance", "Status", pb.StatusRequest()).response.header.member_id


def same_error(want: Outcome, got: Outcome) -> None:
    assert not want.ok and (got.code, got.details) == (want.code, want.details), (want, got)


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("MemberAdd", pb.MemberAddRequest(peerURLs=["not a url"])),
        ("MemberAdd", pb.MemberAddRequest()),
        ("MemberAdd", pb.MemberAddRequest(peerURLs=["http://127.0.0.1:1", "ftp://127.0.0.1:2"])),
        ("MemberAdd", pb.MemberAddRequest(peerURLs=["http://127.0.0.1:1/path"])),
        ("MemberRemove", pb.MemberRemoveRequest(ID=UNKNOWN_ID)),
        ("MemberUpdate", pb.MemberUpdateRequest(ID=UNKNOWN_ID, peerURLs=["http://127.0.0.1:1"])),
        ("MemberPromote", pb.MemberPromoteRequest(ID=UNKNOWN_ID)),
    ],
    ids=["add-not-a-url", "add-no-url", "add-bad-scheme", "add-with-path", "remove", "update", "promote"],
)
def test_member_requests_etcd_refuses(servers: Pair, method: str, request_: object) -> None:
    servers.same("Cluster", method, request_)


def test_promoting_a_voting_member(servers: Pair) -> None:
    want = call(servers.etcd, "Cluster", "MemberPromote", pb.MemberPromoteRequest(ID=own_id(servers, "etcd")))
    got = call(servers.pykine, "Cluster", "MemberPromote", pb.MemberPromoteRequest(ID=own_id(servers, "pykine")))
    same_error(want, got)


@pytest.mark.parametrize("target", [0, UNKNOWN_ID])
def test_move_leader_to_a_non_member(servers: Pair, target: int) -> None:
    servers.same("Maintenance", "MoveLeader", pb.MoveLeaderRequest(targetID=target))


def test_move_leader_to_the_leader(servers: Pair) -> None:
    want = call(servers.etcd, "Maintenance", "MoveLeader", pb.MoveLeaderRequest(targetID=own_id(servers, "etcd")))
    got = call(servers.pykine, "Maintenance", "MoveLeader", pb.MoveLeaderRequest(targetID=own_id(servers, "pykine")))
    assert want.ok and got.ok, (want, got)
    assert got.response == want.response


@pytest.mark.parametrize(
    "request_",
    [
        pb.MemberAddRequest(peerURLs=["http://127.0.0.1:2380"]),
        pb.MemberAddRequest(peerURLs=["https://10.0.0.1:2380"], isLearner=True),
    ],
)
def test_adding_a_member_is_refused_with_a_reason(servers: Pair, request_: pb.MemberAddRequest) -> None:
    got = call(servers.pykine, "Cluster", "MemberAdd", request_)
    assert (got.code, got.details) == (grpc.StatusCode.FAILED_PRECONDITION, MEMBERS_ARE_INSTANCES)


@pytest.mark.parametrize("method", ["MemberRemove", "MemberUpdate"])
def test_changing_a_member_is_refused_with_a_reason(servers: Pair, method: str) -> None:
    me = own_id(servers, "pykine")
    request_ = getattr(pb, f"{method}Request")(ID=me)
    got = call(servers.pykine, "Cluster", method, request_)
    assert (got.code, got.details) == (grpc.StatusCode.FAILED_PRECONDITION, MEMBERS_ARE_INSTANCES)
    members = call(servers.pykine, "Cluster", "MemberList", pb.MemberListRequest()).response.members
    assert [member.ID for member in members] == [me]


# -- Hash and HashKV ----------------------------------------------------------------------


def test_hash_kv_errors_and_compact_revision_as_etcd(servers: Pair) -> None:
    for n in range(4):
        servers.kv("Put", pb.PutRequest(key=b"h/%d" % n, value=b"v"))
    current = servers.kv("Range", pb.RangeRequest(key=b"h/0")).header.revision
    servers.same("Maintenance", "HashKV", pb.HashKVRequest(revision=current + 100))
    etcd, pykine = servers.both("Maintenance", "HashKV", pb.HashKVRequest())
    assert pykine.response.compact_revision == etcd.response.compact_revision
    servers.kv("Compact", pb.CompactionRequest(revision=current - 1))
    servers.same("Maintenance", "HashKV", pb.HashKVRequest(revision=current - 2))
    servers.same("Maintenance", "HashKV", pb.HashKVRequest(revision=current - 1))
    etcd, pykine = servers.both("Maintenance", "HashKV", pb.HashKVRequest(revision=current))
    assert etcd.ok and pykine.ok, (etcd, pykine)
    assert pykine.response.compact_revision == etcd.response.compact_revision == current - 1
    assert pykine.response.header.revision == etcd.response.header.revision == current
    etcd, pykine = servers.both("Maintenance", "Hash", pb.HashRequest())
    assert pykine.response.header.revision == etcd.response.header.revision == current


def hash_kv(server: PykineServer, revision: int = 0) -> int:
    return call(server, "Maintenance", "HashKV", pb.HashKVRequest(revision=revision)).response.hash


def hashes(server: PykineServer) -> tuple[int, int]:
    """(HashKV, Hash) now."""
    return hash_kv(server), call(server, "Maintenance", "Hash", pb.HashRequest()).response.hash


def write_history(server: PykineServer) -> int:
    """The same writes, deletes, leases and txns in the same order: the same revisions anywhere."""
    kv = server.stub("KV")
    lease = server.stub("Lease").LeaseGrant(pb.LeaseGrantRequest(ID=4242, TTL=600), timeout=10).ID
    for n in range(30):
        kv.Put(pb.PutRequest(key=b"hist/%d" % (n % 7), value=b"value %d" % n, lease=lease if n % 3 else 0), timeout=10)
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"hist/1", range_end=b"hist/3"), timeout=10)
    ops = [pb.RequestOp(request_put=pb.PutRequest(key=b"hist/t%d" % n, value=b"\x00\xff" * n)) for n in range(3)]
    return kv.Txn(pb.TxnRequest(success=ops), timeout=10).header.revision


def test_hashes_are_the_same_on_every_backend_and_every_instance(tmp_path: Path) -> None:
    """Same history, same hashes: SQLite, PostgreSQL and MariaDB, and two instances of one datastore."""
    endpoints = {
        "sqlite": f"sqlite://{tmp_path / 'state.db'}",
        "postgres": databases.database_endpoint("postgres", f"pykine_hash_{secrets.token_hex(4)}"),
        "mysql": databases.database_endpoint("mysql", f"pykine_hash_{secrets.token_hex(4)}"),
    }
    seen: dict[str, tuple[object, ...]] = {}
    for name, endpoint in endpoints.items():
        workdir = tmp_path / name
        workdir.mkdir()
        first = PykineServer(str(workdir), endpoint=endpoint)
        second = PykineServer(str(workdir), endpoint=endpoint)
        first.start()
        try:
            last = write_history(first)
            middle = hash_kv(first, last - 5)
            whole = hashes(first)
            second.start()
            assert hashes(second) == whole, name  # another instance on the same datastore
            assert hash_kv(second, last - 5) == middle, name
            first.stub("KV").Put(pb.PutRequest(key=b"hist/0", value=b"changed"), timeout=10)
            changed = hashes(first)
            assert changed[0] != whole[0] and changed[1] != whole[1], name
            assert hash_kv(first, last) == whole[0], name  # an old revision's hash does not move
            assert hash_kv(first, last - 5) == middle, name
            first.stub("KV").Compact(pb.CompactionRequest(revision=last - 5, physical=True), timeout=30)
            after_compaction = hash_kv(second, last)
            assert after_compaction != whole[0]  # the window now starts at the compaction
            assert hash_kv(first, last) == after_compaction  # however far physical compaction has gone
            seen[name] = (middle, whole, changed, after_compaction)
        finally:
            second.stop()
            first.stop()
    assert seen["postgres"] == seen["sqlite"] and seen["mysql"] == seen["sqlite"], seen


# -- alarms ---------------------------------------------------------------------------------


def alarm(action: int, member: int = 0, kind: int = 0) -> pb.AlarmRequest:
    return pb.AlarmRequest(action=action, memberID=member, alarm=kind)


def same_with_own_ids(servers: Pair, service: str, method: str, make: object) -> Outcome:
    """Each server gets the request made with its own member id; answers compare with ids blanked."""
    ids = {which: own_id(servers, which) for which in ("etcd", "pykine")}
    want = call(servers.etcd, service, method, make(ids["etcd"]))  # type: ignore[operator]
    got = call(servers.pykine, service, method, make(ids["pykine"]))  # type: ignore[operator]
    assert (got.code, got.details) == (want.code, want.details), (want, got)
    if want.ok:
        for outcome, which in ((want, "etcd"), (got, "pykine")):
            for member in getattr(outcome.response, "alarms", []):
                if member.memberID == ids[which]:
                    member.memberID = 1
        assert normalise(got.response) == normalise(want.response), (want, got)
    return got


def http_health(server: PykineServer) -> tuple[int, bytes, str | None]:
    try:
        with urllib.request.urlopen(f"http://{server.address}/health", timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("X-Content-Type-Options")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("X-Content-Type-Options")


def test_alarms_as_etcd(servers: Pair) -> None:
    GET, ACTIVATE, DEACTIVATE = pb.AlarmRequest.GET, pb.AlarmRequest.ACTIVATE, pb.AlarmRequest.DEACTIVATE
    put = pb.PutRequest(key=b"alarm/k", value=b"v")
    nested_put = pb.TxnRequest(
        success=[pb.RequestOp(request_txn=pb.TxnRequest(success=[pb.RequestOp(request_put=put)]))]
    )
    try:
        servers.same("Maintenance", "Alarm", alarm(GET))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(ACTIVATE, me, pb.NOSPACE))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(ACTIVATE, me, pb.NOSPACE))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(GET))
        assert http_health(servers.pykine) == http_health(servers.etcd) == (503, b'{"health":"false"}\n', "nosniff")
        # Under NOSPACE: what costs space is refused, the rest goes on.
        servers.same("KV", "Put", put)
        servers.same("KV", "Txn", pb.TxnRequest(failure=[pb.RequestOp(request_put=put)]))
        servers.same("KV", "Txn", nested_put)
        servers.same("KV", "DeleteRange", pb.DeleteRangeRequest(key=b"alarm/k"))
        servers.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=60))
        servers.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=5))
        revision = servers.kv("Range", pb.RangeRequest(key=b"alarm/k")).header.revision
        servers.same("KV", "Compact", pb.CompactionRequest(revision=revision))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(DEACTIVATE, me, pb.NOSPACE))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(DEACTIVATE, me, pb.NOSPACE))

        # Under CORRUPT: every write, compaction and lease change is refused; reads go on.
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(ACTIVATE, me, pb.CORRUPT))
        servers.same("KV", "Put", put)
        servers.same("KV", "DeleteRange", pb.DeleteRangeRequest(key=b"alarm/k"))
        servers.same("KV", "Txn", nested_put)
        servers.same("KV", "Txn", pb.TxnRequest())
        servers.same("KV", "Range", pb.RangeRequest(key=b"alarm/k"))
        servers.same("KV", "Compact", pb.CompactionRequest(revision=revision))
        servers.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=60))
        servers.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=5))
        same_with_own_ids(servers, "Maintenance", "Alarm", lambda me: alarm(DEACTIVATE, me, pb.CORRUPT))
        servers.same("KV", "Put", put)

        # Any member id, NONE stored like a type, GET filtered by type.
        servers.same("Maintenance", "Alarm", alarm(ACTIVATE, 777, pb.NOSPACE))
        servers.same("Maintenance", "Alarm", alarm(ACTIVATE, 778, pb.CORRUPT))
        servers.same("Maintenance", "Alarm", alarm(GET, 0, pb.CORRUPT))
        servers.same("Maintenance", "Alarm", alarm(ACTIVATE, 779, pb.NONE))
        servers.same("Maintenance", "Alarm", alarm(DEACTIVATE, 780, pb.NOSPACE))
        for member, kind in ((777, pb.NOSPACE), (778, pb.CORRUPT), (779, pb.NONE)):
            servers.same("Maintenance", "Alarm", alarm(DEACTIVATE, member, kind))
        servers.same("Maintenance", "Alarm", alarm(GET))
        assert http_health(servers.pykine) == http_health(servers.etcd) == (200, b'{"health":"true"}', None)
    finally:
        for server in (servers.etcd, servers.pykine):
            for raised in call(server, "Maintenance", "Alarm", alarm(GET)).response.alarms:
                call(server, "Maintenance", "Alarm", alarm(DEACTIVATE, raised.memberID, raised.alarm))


def test_unknown_alarm_action_is_refused(servers: Pair) -> None:
    """etcd 3.4 crashes on this request; pykine answers it."""
    got = call(servers.pykine, "Maintenance", "Alarm", pb.AlarmRequest(action=7))
    assert (got.code, got.details) == (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: unknown alarm action")


def test_etcdctl_endpoint_hashkv(servers: Pair) -> None:
    """`etcdctl endpoint hashkv` prints pykine's HashKV, as it prints etcd's."""
    servers.kv("Put", pb.PutRequest(key=b"hashkv/a", value=b"1"))
    for server in (servers.etcd, servers.pykine):
        done = subprocess.run(
            ["etcdctl", f"--endpoints={server.address}", "endpoint", "hashkv", "-w", "json"],
            env=dict(os.environ, ETCDCTL_API="3"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        [answer] = json.loads(done.stdout)
        expected = call(server, "Maintenance", "HashKV", pb.HashKVRequest()).response
        assert answer["HashKV"]["hash"] == expected.hash
        assert answer["HashKV"]["compact_revision"] == expected.compact_revision
