"""Leases against real etcd, and lease expiry, restarts and several instances on pykine.

The differential tests send identical requests to etcd and pykine and require
identical answers, except where etcd itself is not deterministic: server-chosen
lease IDs are random, lease and key lists come in map order, and the remaining
TTL is truncated at whatever instant each server reads its clock.

Expiry is never timed: tests poll with generous bounds and only print how long
after the deadline the keys went.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from aetcd.rpc import kv_pb2
from harness import (
    KeepAliveStream,
    Outcome,
    Pair,
    PykineServer,
    Server,
    WatchSession,
    call,
    default_endpoint,
    normalise,
    pb,
)

# Bound for anything that waits on an expiry: far above any sane delay, and only hit on failure.
EXPIRY_BOUND = 15.0
NOT_FOUND = (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found")


# -- helpers -------------------------------------------------------------------------------------------------


def lease(server: Server, method: str, request: Any) -> Any:
    """A Lease call that must succeed on one server."""
    outcome = call(server, "Lease", method, request)
    assert outcome.ok, f"{method} {request!r} on {server.name}: {outcome.code} {outcome.details}"
    return outcome.response


def kv(server: Server, method: str, request: Any) -> Any:
    """A KV call that must succeed on one server."""
    outcome = call(server, "KV", method, request)
    assert outcome.ok, f"{method} {request!r} on {server.name}: {outcome.code} {outcome.details}"
    return outcome.response


def lease_ids(server: Server) -> list[int]:
    return sorted(status.ID for status in lease(server, "LeaseLeases", pb.LeaseLeasesRequest()).leases)


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def keys_under(server: Server, prefix: bytes, revision: int = 0) -> list[bytes]:
    response = kv(server, "Range", pb.RangeRequest(key=prefix, range_end=prefix_end(prefix), revision=revision))
    return [item.key for item in response.kvs]


def revision_of(server: Server) -> int:
    return kv(server, "Range", pb.RangeRequest(key=b"\x00", count_only=True)).header.revision


def put_op(key: bytes, value: bytes = b"v", lease_id: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease_id))


def same_error(servers: Pair, service: str, method: str, request: Any, expected: tuple[Any, str]) -> None:
    """Both servers refuse the request alike, with the error etcd is known to give."""
    outcome = servers.same(service, method, request)
    assert (outcome.code, outcome.details) == expected, f"{method} {request!r}: {outcome.code} {outcome.details}"


def same_time_to_live(servers: Pair, request: Any, ids: tuple[int, int] | None = None) -> tuple[Any, Any]:
    """TimeToLive on both: equal apart from key order and a remaining TTL at most 1 apart.

    Only a running TTL may differ: -1 (no such lease) must match exactly.

    ids gives (etcd's, pykine's) lease ID when they differ (server-chosen IDs).
    """
    answers: list[Any] = []
    for server, lease_id in zip(servers_of(servers), ids or (request.ID, request.ID), strict=True):
        asked = pb.LeaseTimeToLiveRequest(ID=lease_id, keys=request.keys)
        answers.append(lease(server, "LeaseTimeToLive", asked))
    want, got = (normalise(answer) for answer in answers)
    close = want.TTL == got.TTL or (min(want.TTL, got.TTL) >= 0 and abs(want.TTL - got.TTL) <= 1)
    assert close, f"TimeToLive {request!r}: etcd TTL {want.TTL}, pykine TTL {got.TTL}"
    for answer in (want, got):
        answer.TTL = 0
        keys = sorted(answer.keys)
        del answer.keys[:]
        answer.keys.extend(keys)
        if ids is not None:
            answer.ID = 0
    assert got == want, f"TimeToLive {request!r}\n--- etcd:\n{want}\n--- pykine:\n{got}"
    return answers[0], answers[1]


def same_lease_list(servers: Pair) -> list[int]:
    """LeaseLeases on both: same header, same IDs (etcd lists them in map order)."""
    want, got = (normalise(lease(server, "LeaseLeases", pb.LeaseLeasesRequest())) for server in servers_of(servers))
    want_ids, got_ids = sorted(s.ID for s in want.leases), sorted(s.ID for s in got.leases)
    assert (got.header, got_ids) == (want.header, want_ids), f"LeaseLeases: etcd {want}, pykine {got}"
    return got_ids


def servers_of(servers: Pair) -> tuple[Server, Server]:
    return servers.etcd, servers.pykine


def timed_grant(servers: Pair, request: Any) -> tuple[list[int], dict[str, float]]:
    """Grant on both, noting when each answered (the deadline is at most that + TTL).

    Returns each server's lease ID (etcd's, pykine's) and the answer times; the
    answers must agree apart from a server-chosen ID.
    """
    answers, answered = [], {}
    for server in servers_of(servers):
        answers.append(normalise(lease(server, "LeaseGrant", request)))
        answered[server.name] = time.monotonic()
    ids = [answer.ID for answer in answers]
    if request.ID == 0:
        for answer in answers:
            answer.ID = 0
    assert answers[1] == answers[0], f"LeaseGrant {request!r}\n--- etcd:\n{answers[0]}\n--- pykine:\n{answers[1]}"
    return ids, answered


def wait_until(checks: dict[str, Callable[[], bool]], bound: float = EXPIRY_BOUND) -> dict[str, float]:
    """Poll every check until each has held once; returns when (monotonic) each first held."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + bound
    while len(seen) < len(checks):
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.monotonic()
        if len(seen) < len(checks):
            missing = sorted(set(checks) - set(seen))
            assert time.monotonic() < deadline, f"still waiting after {bound}s for: {missing}"
            time.sleep(0.05)
    return seen


@pytest.fixture
def clean(servers: Pair) -> Pair:
    """The shared pair with no keys and no leases, still in lockstep.

    servers already deleted every key, which detaches them from their leases,
    so these revokes delete nothing and leave both revisions alone.
    """
    for server in servers_of(servers):
        for lease_id in lease_ids(server):
            call(server, "Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease_id))
    assert revision_of(servers.etcd) == revision_of(servers.pykine)
    return servers


# -- 1. differential: grant ------------------------------------------------------------------------------------


def test_grant_with_server_chosen_id(clean: Pair) -> None:
    """etcd picks a random positive ID; all else in the answer must match, and the ID must work."""
    request = pb.LeaseGrantRequest(TTL=60)
    want, got = (normalise(lease(server, "LeaseGrant", request)) for server in servers_of(clean))
    ids = (want.ID, got.ID)
    assert got.ID > 0 and want.ID > 0
    want.ID = got.ID = 0
    assert got == want, f"LeaseGrant {request!r}\n--- etcd:\n{want}\n--- pykine:\n{got}"
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(keys=True), ids)
    assert lease_ids(clean.etcd) == [ids[0]] and lease_ids(clean.pykine) == [ids[1]]
    # Server-chosen IDs do not repeat.
    again = lease(clean.pykine, "LeaseGrant", request).ID
    assert again > 0 and again != ids[1]
    lease(clean.etcd, "LeaseGrant", request)


def test_grant_with_client_chosen_id_and_duplicate(clean: Pair) -> None:
    """A client-chosen ID is kept; granting it again is ErrLeaseExist, whatever the TTL."""
    granted = clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7001, TTL=60)).response
    assert (granted.ID, granted.TTL) == (7001, 60)
    exists = (grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: lease already exists")
    same_error(clean, "Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7001, TTL=60), exists)
    same_error(clean, "Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7001, TTL=5), exists)
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7001))
    # A very large client-chosen ID is fine too.
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=2**63 - 1, TTL=60))
    assert same_lease_list(clean) == [7001, 2**63 - 1]


def test_grant_with_negative_client_id(clean: Pair) -> None:
    """etcd takes any non-zero int64 as a client-chosen ID, negative ones included."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=-5, TTL=60))
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=-5))
    clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=-5))


@pytest.mark.parametrize("ttl", [0, 1, -1, -100, 2, 3])
def test_grant_small_ttl_is_raised_to_the_minimum(clean: Pair, ttl: int) -> None:
    """etcd raises any TTL below its minimum (2 s with default election settings) to the minimum."""
    granted_ttl = clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7100, TTL=ttl)).response.TTL
    assert granted_ttl == max(ttl, 2)
    # Sampled right after the grant; same_time_to_live allows the truncation to differ by 1.
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7100))


def test_grant_too_large_ttl(clean: Pair) -> None:
    """etcd's limit is 9,000,000,000 s: that is granted, one more is ErrLeaseTTLTooLarge."""
    too_large = (grpc.StatusCode.OUT_OF_RANGE, "etcdserver: too large lease TTL")
    same_error(clean, "Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7200, TTL=9_000_000_001), too_large)
    same_error(clean, "Lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=2**62), too_large)
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7200, TTL=9_000_000_000))
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7200))
    assert same_lease_list(clean) == [7200]


# -- 1. differential: revoke -----------------------------------------------------------------------------------


def test_revoke(clean: Pair) -> None:
    """Revoke deletes the attached keys at one revision, in the header; unknown leases are ErrLeaseNotFound."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7300, TTL=60))
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7301, TTL=60))
    for key in (b"rv/a", b"rv/b", b"rv/c"):
        clean.kv("Put", pb.PutRequest(key=key, value=b"x", lease=7300))
    clean.kv("Put", pb.PutRequest(key=b"rv/other", value=b"y"))
    before = clean.kv("Range", pb.RangeRequest(key=b"rv/", range_end=b"rv0")).header.revision
    revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7300)).response
    assert revoked.header.revision == before + 1
    after = clean.kv("Range", pb.RangeRequest(key=b"rv/", range_end=b"rv0"))
    assert [item.key for item in after.kvs] == [b"rv/other"]
    assert after.header.revision == before + 1
    # A lease without keys: revoking it deletes nothing, so the revision stays.
    revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7301)).response
    assert revoked.header.revision == before + 1
    for lease_id in (7300, 7301, 424242, 0, -1):
        same_error(clean, "Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease_id), NOT_FOUND)
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7300, keys=True))
    assert same_lease_list(clean) == []


# -- 1. differential: keep-alive ------------------------------------------------------------------------------


def test_keep_alive_stream(clean: Pair) -> None:
    """Each keep-alive is answered with the granted TTL, or TTL 0 for an unknown lease or ID 0."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7400, TTL=30))
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7401, TTL=0))
    clean.kv("Put", pb.PutRequest(key=b"ka/a", value=b"x", lease=7400))
    streams = [KeepAliveStream(server) for server in servers_of(clean)]
    try:
        for lease_id in (7400, 7401, 999_999, 0, 7400, -3):
            want, got = (normalise(stream.keep_alive(lease_id)) for stream in streams)
            assert got == want, f"keep-alive {lease_id}\n--- etcd:\n{want}\n--- pykine:\n{got}"
        assert (got.ID, got.TTL) == (-3, 0)
        # Revoked on the side, the lease answers TTL 0 on the same stream.
        clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7400))
        want, got = (normalise(stream.keep_alive(7400)) for stream in streams)
        assert got == want and got.TTL == 0, f"keep-alive after revoke\n--- etcd:\n{want}\n--- pykine:\n{got}"
    finally:
        for stream in streams:
            stream.close()
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7401, keys=True))


# -- 1. differential: time-to-live and list ------------------------------------------------------------------


def test_time_to_live(clean: Pair) -> None:
    """TTL -1 for an unknown lease; keys only when asked; attached keys listed (compared sorted)."""
    for lease_id in (123_456, 0, -7):
        for keys in (False, True):
            _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=lease_id, keys=keys))
            assert got.TTL == -1
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7500, TTL=100))
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7501, TTL=100))
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7500, keys=True))
    assert (got.grantedTTL, list(got.keys)) == (100, [])
    for key in (b"ttl/z", b"ttl/a", b"ttl/m", b"ttl/\x00bin"):
        clean.kv("Put", pb.PutRequest(key=key, value=b"x", lease=7500))
    clean.kv("Put", pb.PutRequest(key=b"ttl/other", value=b"x", lease=7501))
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7500, keys=True))
    assert sorted(got.keys) == [b"ttl/\x00bin", b"ttl/a", b"ttl/m", b"ttl/z"]
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7500, keys=False))
    assert list(got.keys) == []
    # Deleting a key detaches it.
    clean.kv("DeleteRange", pb.DeleteRangeRequest(key=b"ttl/m"))
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7500, keys=True))
    assert sorted(got.keys) == [b"ttl/\x00bin", b"ttl/a", b"ttl/z"]


def test_lease_leases(clean: Pair) -> None:
    """LeaseLeases lists every live lease (compared as sorted ID lists)."""
    assert same_lease_list(clean) == []
    ids = [7600, 3, 2**40, 7601, 12]
    for lease_id in ids:
        clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=lease_id, TTL=60))
    assert same_lease_list(clean) == sorted(ids)
    clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=3))
    assert same_lease_list(clean) == sorted(set(ids) - {3})


# -- 1. differential: puts with leases -----------------------------------------------------------------------


def test_put_with_unknown_lease(clean: Pair) -> None:
    """Put and txn Put naming a lease that does not exist are ErrLeaseNotFound; nothing is written."""
    same_error(clean, "KV", "Put", pb.PutRequest(key=b"ul/a", value=b"x", lease=424242), NOT_FOUND)
    same_error(clean, "KV", "Txn", pb.TxnRequest(success=[put_op(b"ul/a", lease_id=424242)]), NOT_FOUND)
    same_error(
        clean, "KV", "Txn", pb.TxnRequest(success=[put_op(b"ul/a"), put_op(b"ul/b", lease_id=424242)]), NOT_FOUND
    )
    # Single-key Kubernetes shape, lease unknown.
    create = pb.TxnRequest(
        compare=[pb.Compare(key=b"ul/a", target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=0)],
        success=[put_op(b"ul/a", lease_id=424242)],
    )
    same_error(clean, "KV", "Txn", create, NOT_FOUND)
    # A revoked lease is unknown too.
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7700, TTL=60))
    clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7700))
    same_error(clean, "KV", "Put", pb.PutRequest(key=b"ul/a", value=b"x", lease=7700), NOT_FOUND)
    assert clean.kv("Range", pb.RangeRequest(key=b"ul/", range_end=b"ul0")).count == 0


def test_txn_unknown_lease_on_the_branch_not_taken(clean: Pair) -> None:
    """etcd checks only the ops of the branch a txn takes."""
    clean.kv("Put", pb.PutRequest(key=b"nt/a", value=b"x"))
    compare = pb.Compare(key=b"nt/a", target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=b"x")
    for ops in ([put_op(b"nt/a", lease_id=424242)], [put_op(b"nt/b"), put_op(b"nt/c", lease_id=424242)]):
        clean.kv("Txn", pb.TxnRequest(compare=[compare], success=[put_op(b"nt/ok")], failure=ops))
        clean.kv("Txn", pb.TxnRequest(compare=[compare], success=[put_op(b"nt/a", b"x")], failure=ops))


def test_ignore_lease_keeps_the_lease(clean: Pair) -> None:
    """Put with ignore_lease keeps the key attached; ignore_lease with a lease is refused."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7800, TTL=60))
    clean.kv("Put", pb.PutRequest(key=b"il/a", value=b"1", lease=7800))
    clean.kv("Put", pb.PutRequest(key=b"il/a", value=b"2", ignore_lease=True, prev_kv=True))
    assert clean.kv("Range", pb.RangeRequest(key=b"il/a")).kvs[0].lease == 7800
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7800, keys=True))
    assert list(got.keys) == [b"il/a"]
    clean.kv("Txn", pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"il/a", ignore_lease=True))]))
    provided = (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: lease is provided")
    same_error(clean, "KV", "Put", pb.PutRequest(key=b"il/a", value=b"3", lease=7800, ignore_lease=True), provided)
    missing = (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key not found")
    same_error(clean, "KV", "Put", pb.PutRequest(key=b"il/none", value=b"3", ignore_lease=True), missing)
    revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7800)).response
    assert clean.kv("Range", pb.RangeRequest(key=b"il/a")).count == 0
    assert revoked.header.revision == clean.kv("Range", pb.RangeRequest(key=b"il/a")).header.revision


def test_plain_put_detaches_the_key(clean: Pair) -> None:
    """A Put without a lease detaches the key: TimeToLive no longer lists it and a revoke leaves it."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7900, TTL=60))
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=7901, TTL=60))
    clean.kv("Put", pb.PutRequest(key=b"dt/a", value=b"1", lease=7900))
    clean.kv("Put", pb.PutRequest(key=b"dt/b", value=b"1", lease=7900))
    clean.kv("Put", pb.PutRequest(key=b"dt/a", value=b"2", prev_kv=True))
    # Moving a key to another lease detaches it from the first.
    clean.kv("Put", pb.PutRequest(key=b"dt/b", value=b"2", lease=7901, prev_kv=True))
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7900, keys=True))
    assert list(got.keys) == []
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=7901, keys=True))
    assert list(got.keys) == [b"dt/b"]
    before = clean.kv("Range", pb.RangeRequest(key=b"dt/", range_end=b"dt0")).header.revision
    revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7900)).response
    assert revoked.header.revision == before
    remaining = clean.kv("Range", pb.RangeRequest(key=b"dt/", range_end=b"dt0"))
    assert [(item.key, item.lease) for item in remaining.kvs] == [(b"dt/a", 0), (b"dt/b", 7901)]
    clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=7901))
    remaining = clean.kv("Range", pb.RangeRequest(key=b"dt/", range_end=b"dt0"))
    assert [item.key for item in remaining.kvs] == [b"dt/a"]


def test_txn_puts_with_a_lease(clean: Pair) -> None:
    """Txn puts attach their keys like plain puts; revoke deletes them and no others, at one revision."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=8000, TTL=60))
    txn = pb.TxnRequest(
        success=[put_op(b"tx/a", lease_id=8000), put_op(b"tx/b", lease_id=8000), put_op(b"tx/c")],
    )
    clean.kv("Txn", txn)
    # Same key twice in a txn is refused by etcd; a later txn re-attaches one key elsewhere.
    clean.kv("Txn", pb.TxnRequest(success=[put_op(b"tx/c", b"w", lease_id=8000), put_op(b"tx/d", lease_id=8000)]))
    clean.kv("Txn", pb.TxnRequest(success=[put_op(b"tx/d", b"plain")]))
    _, got = same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=8000, keys=True))
    assert sorted(got.keys) == [b"tx/a", b"tx/b", b"tx/c"]
    clean.kv("Range", pb.RangeRequest(key=b"tx/", range_end=b"tx0"))
    before = revision_of(clean.pykine)
    revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=8000)).response
    assert revoked.header.revision == before + 1
    remaining = clean.kv("Range", pb.RangeRequest(key=b"tx/", range_end=b"tx0"))
    assert [item.key for item in remaining.kvs] == [b"tx/d"]


# -- 2. expiry, with and without keep-alive --------------------------------------------------------------------


def keys_gone(server: Server, prefix: bytes) -> Callable[[], bool]:
    """A check that holds once no key is left under the prefix."""
    return lambda: not keys_under(server, prefix)


def check_gone(servers: Pair, lease_id: int, prefix: bytes) -> None:
    """After expiry: no keys, not listed, TimeToLive -1 — on both."""
    for server in servers_of(servers):
        assert keys_under(server, prefix) == []
        assert lease_id not in lease_ids(server)
    _, got = same_time_to_live(servers, pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True))
    assert got.TTL == -1


def test_expiry_without_keep_alive(clean: Pair) -> None:
    """A TTL-2 lease nobody renews expires with its keys, on etcd and pykine alike, at one revision."""
    _, granted_at = timed_grant(clean, pb.LeaseGrantRequest(ID=8100, TTL=2))
    for key in (b"ex/a", b"ex/b", b"ex/c"):
        clean.kv("Put", pb.PutRequest(key=key, value=b"x", lease=8100))
    before = revision_of(clean.pykine)
    seen = wait_until({server.name: keys_gone(server, b"ex/") for server in servers_of(clean)})
    for name, when in seen.items():
        print(f"\n[expiry, no keep-alive] {name}: keys gone {when - granted_at[name] - 2:+.2f}s after the deadline")
    check_gone(clean, 8100, b"ex/")
    assert revision_of(clean.etcd) == revision_of(clean.pykine) == before + 1


def test_expiry_with_keep_alive(clean: Pair) -> None:
    """Renewed on the stream for ~5 s a TTL-2 lease keeps its keys; once renewals stop they go."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=8200, TTL=2))
    clean.kv("Put", pb.PutRequest(key=b"ka2/a", value=b"x", lease=8200))
    clean.kv("Put", pb.PutRequest(key=b"ka2/b", value=b"x", lease=8200))
    streams = [KeepAliveStream(server) for server in servers_of(clean)]
    last_renewal: dict[str, float] = {}
    try:
        until = time.monotonic() + 5
        while time.monotonic() < until:
            answers = []
            for server, stream in zip(servers_of(clean), streams, strict=True):
                answers.append(normalise(stream.keep_alive(8200)))
                last_renewal[server.name] = time.monotonic()
            want, got = answers
            assert got == want and got.TTL == 2, f"keep-alive\n--- etcd:\n{want}\n--- pykine:\n{got}"
            for server in servers_of(clean):
                assert keys_under(server, b"ka2/") == [b"ka2/a", b"ka2/b"], server.name
            time.sleep(0.4)
    finally:
        for stream in streams:
            stream.close()
    same_time_to_live(clean, pb.LeaseTimeToLiveRequest(ID=8200, keys=True))
    seen = wait_until({server.name: keys_gone(server, b"ka2/") for server in servers_of(clean)})
    for name, when in seen.items():
        print(f"\n[expiry after keep-alive] {name}: keys gone {when - last_renewal[name] - 2:+.2f}s after the deadline")
    check_gone(clean, 8200, b"ka2/")
    assert revision_of(clean.etcd) == revision_of(clean.pykine)


# -- 3. revoke with 1,000 keys ---------------------------------------------------------------------------------


def test_revoke_thousand_keys_at_one_revision(clean: Pair) -> None:
    """1,000 attached keys go at ONE revision: one header step, 1,000 DELETE events at that revision."""
    clean.same("Lease", "LeaseGrant", pb.LeaseGrantRequest(ID=8300, TTL=600))
    keys = [b"big/%04d" % number for number in range(1000)]
    for start in range(0, len(keys), 100):  # etcd allows 128 ops per txn
        ops = [put_op(key, b"value-" + key, 8300) for key in keys[start : start + 100]]
        clean.kv("Txn", pb.TxnRequest(success=ops))
    before = clean.kv("Range", pb.RangeRequest(key=b"big/", range_end=b"big0", count_only=True))
    assert before.count == 1000
    sessions = [WatchSession(server) for server in servers_of(clean)]
    try:
        for session in sessions:
            session.create(key=b"big/", range_end=b"big0", prev_kv=True)
            assert session.next().created
        revoked = clean.same("Lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=8300)).response
        revision = before.header.revision + 1
        assert revoked.header.revision == revision
        after = clean.kv("Range", pb.RangeRequest(key=b"big/", range_end=b"big0", count_only=True))
        assert (after.count, after.header.revision) == (0, revision)
        events_by_server = []
        for server, session in zip(servers_of(clean), sessions, strict=True):
            events: list[Any] = []
            responses = 0
            while len(events) < 1000:
                response = session.next()
                if response.events:
                    responses += 1
                    assert {event.kv.mod_revision for event in response.events} == {revision}, server.name
                events.extend(response.events)
            extra = [event for response in session.drain(quiet=0.5) for event in response.events]
            assert extra == [], f"{server.name}: {len(extra)} events beyond the 1,000"
            print(f"\n[revoke 1,000 keys] {server.name}: 1,000 DELETE events in {responses} response(s)")
            assert len(events) == 1000
            assert all(event.type == kv_pb2.Event.DELETE for event in events), server.name
            assert all(event.kv.mod_revision == revision for event in events), server.name
            assert [event.kv.key for event in events] == keys, server.name
            assert all(event.HasField("prev_kv") for event in events), server.name
            assert all(
                (event.prev_kv.key, event.prev_kv.value, event.prev_kv.lease) == (key, b"value-" + key, 8300)
                for event, key in zip(events, keys, strict=True)
            ), server.name
            events_by_server.append(events)
        assert events_by_server[1] == events_by_server[0]
    finally:
        for session in sessions:
            session.close()


# -- 4. restart with live leases -------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", ["sigterm", "kill-9"])
def test_restart_keeps_leases_and_renews_them(stop: str) -> None:
    """After a restart (clean or kill -9) leases and attachments survive, TTLs start afresh, expiry still works."""
    workdir = tempfile.mkdtemp(prefix="pykine-lease-restart-")
    server: PykineServer | None = PykineServer(workdir)
    try:
        assert server is not None
        server.start()
        lease(server, "LeaseGrant", pb.LeaseGrantRequest(ID=9001, TTL=6))
        lease(server, "LeaseGrant", pb.LeaseGrantRequest(ID=9002, TTL=600))
        kv(server, "Put", pb.PutRequest(key=b"rs/a", value=b"1", lease=9001))
        kv(server, "Put", pb.PutRequest(key=b"rs/b", value=b"1", lease=9001))
        kv(server, "Put", pb.PutRequest(key=b"rs/long", value=b"1", lease=9002))
        granted_by = time.monotonic()  # the 9001 deadline was set before this: at most granted_by + 6
        time.sleep(2.5)
        if stop == "sigterm":
            server.stop(signal.SIGTERM)
        else:
            server.kill()
        server = PykineServer(workdir)
        server.start()
        asked_at = time.monotonic()
        info = lease(server, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=9001, keys=True))
        unrenewed = granted_by + 6 - asked_at  # the most it could have left had it not been renewed
        print(f"\n[restart {stop}] TTL after restart {info.TTL}s of 6; without renewal at most {unrenewed:.2f}s")
        assert (info.ID, info.grantedTTL, sorted(info.keys)) == (9001, 6, [b"rs/a", b"rs/b"])
        left = info.TTL
        assert left > unrenewed, f"TTL {left} not renewed (at most {unrenewed:.2f}s left without renewal)"
        assert lease_ids(server) == [9001, 9002]
        long = lease(server, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=9002, keys=True))
        assert (long.grantedTTL, list(long.keys)) == (600, [b"rs/long"])
        stored = kv(server, "Range", pb.RangeRequest(key=b"rs/", range_end=b"rs0"))
        assert [(item.key, item.lease) for item in stored.kvs] == [(b"rs/a", 9001), (b"rs/b", 9001), (b"rs/long", 9002)]
        before = stored.header.revision
        # Not kept alive: it still expires, at one revision, and only its own keys go.
        wait_until({"expiry after restart": lambda: keys_under(server, b"rs/") == [b"rs/long"]})
        assert lease_ids(server) == [9002]
        assert lease(server, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=9001)).TTL == -1
        assert revision_of(server) == before + 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- 5. Kubernetes-style flow ----------------------------------------------------------------------------------


def k8s_create(key: bytes, value: bytes, lease_id: int) -> pb.TxnRequest:
    """The apiserver's create: put only if the key has never been modified (does not exist)."""
    return pb.TxnRequest(
        compare=[pb.Compare(key=key, target=pb.Compare.MOD, result=pb.Compare.EQUAL, mod_revision=0)],
        success=[put_op(key, value, lease_id)],
    )


def test_kubernetes_style_lease_flow(clean: Pair) -> None:
    """Events objects created with a TTL-3 lease (server-chosen ID) vanish on expiry, watchers see prev_kv."""
    prefix = b"/registry/events/default/"
    names = [b"pod-a.1", b"pod-b.2", b"pod-c.3"]
    sessions = [WatchSession(server) for server in servers_of(clean)]
    try:
        for session in sessions:
            session.create(key=prefix, range_end=prefix_end(prefix), prev_kv=True)
            assert session.next().created
        ids, granted_at = timed_grant(clean, pb.LeaseGrantRequest(TTL=3))
        assert ids[0] > 0 and ids[1] > 0
        for name in names:
            answers: list[Outcome] = []
            for server, lease_id in zip(servers_of(clean), ids, strict=True):
                answers.append(call(server, "KV", "Txn", k8s_create(prefix + name, b"event " + name, lease_id)))
            want, got = (normalise(answer.response) for answer in answers)
            assert answers[0].ok and answers[1].ok and got == want and got.succeeded, f"\n{answers}"
            # A second create of the same object fails its compare.
            answers = [
                call(server, "KV", "Txn", k8s_create(prefix + name, b"again", lease_id))
                for server, lease_id in zip(servers_of(clean), ids, strict=True)
            ]
            want, got = (normalise(answer.response) for answer in answers)
            assert answers[0].ok and answers[1].ok and got == want and not got.succeeded, f"\n{answers}"
        for server, lease_id in zip(servers_of(clean), ids, strict=True):
            stored = kv(server, "Range", pb.RangeRequest(key=prefix, range_end=prefix_end(prefix)))
            assert [(item.key, item.lease) for item in stored.kvs] == [(prefix + name, lease_id) for name in names]
        seen = wait_until({server.name: keys_gone(server, prefix) for server in servers_of(clean)})
        for name, when in seen.items():
            print(f"\n[kubernetes flow] {name}: objects gone {when - granted_at[name] - 3:+.2f}s after the deadline")
        streams: list[list[Any]] = []
        for server, session, lease_id in zip(servers_of(clean), sessions, ids, strict=True):
            events = [event for response in session.drain(quiet=0.5) for event in response.events]
            puts = [event for event in events if event.type == kv_pb2.Event.PUT]
            deletes = [event for event in events if event.type == kv_pb2.Event.DELETE]
            assert [event.kv.key for event in puts] == [prefix + name for name in names], server.name
            assert [event.kv.key for event in deletes] == [prefix + name for name in names], server.name
            assert len({event.kv.mod_revision for event in deletes}) == 1, server.name
            assert [(event.prev_kv.value, event.prev_kv.lease) for event in deletes] == [
                (b"event " + name, lease_id) for name in names
            ], server.name
            for event in events:
                for item in (event.kv, event.prev_kv):
                    item.lease = 0
            streams.append(events)
        assert streams[1] == streams[0], f"\n--- etcd:\n{streams[0]}\n--- pykine:\n{streams[1]}"
        for server, lease_id in zip(servers_of(clean), ids, strict=True):
            assert lease(server, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease_id)).TTL == -1
            assert lease_id not in lease_ids(server)
    finally:
        for session in sessions:
            session.close()


# -- 6. two pykine processes on one database ------------------------------------------------------------------


def test_two_instances_expire_a_lease_once() -> None:
    """Two pykine processes on one datastore both try to expire a lease; its keys are deleted exactly once."""
    workdir = tempfile.mkdtemp(prefix="pykine-lease-two-")
    endpoint = default_endpoint(workdir)
    instances: list[PykineServer] = []
    try:
        for name in ("a", "b"):
            os.mkdir(os.path.join(workdir, name))
            instances.append(PykineServer(os.path.join(workdir, name), endpoint=endpoint))
            instances[-1].start()
        first, second = instances
        # Some unrelated history first, so revisions are not trivially small.
        kv(second, "Put", pb.PutRequest(key=b"two/other", value=b"x"))
        lease(first, "LeaseGrant", pb.LeaseGrantRequest(ID=9100, TTL=2))
        granted_at = time.monotonic()
        for key in (b"two/a", b"two/b", b"two/c"):
            kv(first, "Put", pb.PutRequest(key=key, value=b"x", lease=9100))
        before = revision_of(first)
        assert revision_of(second) == before
        seen = wait_until(
            {server.log_path: lambda s=server: keys_under(s, b"two/") == [b"two/other"] for server in instances}
        )
        print(f"\n[two instances] keys gone {min(seen.values()) - granted_at - 2:+.2f}s after the deadline")
        time.sleep(1.5)  # both expiry loops get several more chances to (wrongly) delete again
        for server in instances:
            assert revision_of(server) == before + 1, server.log_path
            assert keys_under(server, b"two/", revision=before) == [b"two/a", b"two/b", b"two/c", b"two/other"]
            assert keys_under(server, b"two/", revision=before + 1) == [b"two/other"]
            future = call(server, "KV", "Range", pb.RangeRequest(key=b"two/", revision=before + 2))
            assert future.code == grpc.StatusCode.OUT_OF_RANGE, future
            assert lease(server, "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=9100)).TTL == -1
            assert 9100 not in lease_ids(server)
        for server in instances:
            assert "lease expiry failed" not in server.log(), server.log()
    finally:
        for server in instances:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
