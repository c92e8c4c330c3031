"""Cluster and Maintenance calls beyond KV, against real etcd: member changes, MoveLeader, hashes.

pykine's members are the instances serving one datastore, not raft peers, so
member changes cannot be made through the API. Every request etcd would
refuse gets etcd's exact refusal (bad URLs, unknown members, promoting a
voting member, a bad leader transferee); a change etcd would make gets a
FAILED_PRECONDITION that says why pykine does not.
"""

from __future__ import annotations

import grpc
import pytest
from harness import Outcome, Pair, call, pb

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
