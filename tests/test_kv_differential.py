"""KV semantics, request by request, against real etcd.

Every test sends the same requests to etcd 3.4 and to pykine and requires
identical responses and errors (only cluster/member ids and raft fields are
blanked). Revisions match exactly because both servers start empty and move
in lockstep.
"""

from __future__ import annotations

import itertools
from typing import Any

import grpc
import pytest
from harness import Pair, pb

Compare = pb.Compare
Range = pb.RangeRequest


def put(key: bytes, value: bytes = b"v", **options: Any) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, **options))


def get(key: bytes, **options: Any) -> pb.RequestOp:
    return pb.RequestOp(request_range=Range(key=key, **options))


def delete(key: bytes, **options: Any) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, **options))


def txn(compare: list[Any] | None = None, success: list[Any] | None = None, failure: list[Any] | None = None) -> Any:
    return pb.TxnRequest(compare=compare or [], success=success or [], failure=failure or [])


def nested(request: pb.TxnRequest) -> pb.RequestOp:
    return pb.RequestOp(request_txn=request)


def cmp(key: bytes, target: str, result: str, operand: Any = None, range_end: bytes = b"") -> Any:
    """A Compare; operand goes into the target_union member matching target."""
    field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value"}.get(
        target, "lease"
    )
    kwargs = {field: operand} if operand is not None else {}
    return Compare(
        key=key,
        range_end=range_end,
        target=getattr(Compare, target),
        result=getattr(Compare, result),
        **kwargs,
    )


def load(servers: Pair, keys: list[bytes], rounds: int = 1) -> None:
    """Write each key `rounds` times, so versions and revisions differ."""
    for round_ in range(rounds):
        for index, key in enumerate(keys):
            servers.kv("Put", pb.PutRequest(key=key, value=b"%d-%d" % (round_, (index * 7) % 5)))


KEYS = [b"a", b"a/1", b"a/2", b"a/3", b"b", b"b/x", b"c", b"\x00k", b"z\xff", b"\xff\xff"]


# -- Range -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,range_end",
    [
        (b"a", b""),  # one key
        (b"missing", b""),
        (b"a", b"\x00"),  # every key >= a
        (b"\x00", b"\x00"),  # every key
        (b"a/", b"a0"),  # a prefix
        (b"a", b"c"),
        (b"c", b"a"),  # end before start: nothing
        (b"b", b"b"),  # end equal to start: nothing
        (b"\xff", b"\x00"),
        (b"z", b"\xff\xff\xff"),
    ],
)
def test_range_end_rules(servers: Pair, key: bytes, range_end: bytes) -> None:
    load(servers, KEYS)
    servers.kv("Range", Range(key=key, range_end=range_end))


@pytest.mark.parametrize("limit", [0, 1, 2, 4, 5, 100, -1])
def test_range_limit_more_and_exact_count(servers: Pair, limit: int) -> None:
    load(servers, KEYS, rounds=2)
    servers.kv("Range", Range(key=b"a", range_end=b"b", limit=limit))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", limit=limit))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", limit=limit, keys_only=True))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", limit=limit, count_only=True))


def test_range_keys_only_and_count_only(servers: Pair) -> None:
    load(servers, KEYS)
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", keys_only=True))
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", count_only=True))
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", count_only=True, keys_only=True, limit=1))
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", count_only=True, min_mod_revision=5))
    servers.kv("Range", Range(key=b"a", count_only=True))
    servers.kv("Range", Range(key=b"nothing", count_only=True))


@pytest.mark.parametrize(
    "order,target",
    list(itertools.product(["NONE", "ASCEND", "DESCEND"], ["KEY", "VERSION", "CREATE", "MOD", "VALUE"])),
)
def test_range_sort(servers: Pair, order: str, target: str) -> None:
    # Fewer than 12 keys: etcd's sort is then stable, so ties keep key order.
    load(servers, KEYS[:6], rounds=1)
    load(servers, [b"a/2", b"b"], rounds=2)
    request = {"sort_order": getattr(Range, order), "sort_target": getattr(Range, target)}
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", **request))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", limit=3, **request))
    servers.kv("Range", Range(key=b"a", range_end=b"b", limit=2, keys_only=True, **request))


def test_range_serializable(servers: Pair) -> None:
    load(servers, KEYS)
    servers.kv("Range", Range(key=b"a", range_end=b"b", serializable=True))
    servers.kv("Range", Range(key=b"a", serializable=True, limit=1))


@pytest.mark.parametrize(
    "filters",
    [
        {"min_mod_revision": 6},
        {"max_mod_revision": 6},
        {"min_create_revision": 4},
        {"max_create_revision": 4},
        {"min_mod_revision": 4, "max_mod_revision": 9, "min_create_revision": 3, "max_create_revision": 8},
        {"min_mod_revision": 100},
        {"max_mod_revision": -1},
        {"min_create_revision": -5},
    ],
)
def test_range_revision_filters(servers: Pair, filters: dict[str, int]) -> None:
    base = servers.kv("Range", Range(key=b"x")).header.revision
    shifted = {name: value + base if value > 0 else value for name, value in filters.items()}
    load(servers, KEYS[:6])
    load(servers, [b"a/1", b"b"], rounds=2)
    for limit in (0, 1, 2):
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", limit=limit, **shifted))
        servers.kv("Range", Range(key=b"a", range_end=b"c", limit=limit, sort_order=Range.DESCEND, **shifted))
        servers.kv("Range", Range(key=b"a", range_end=b"c", limit=limit, keys_only=True, **shifted))


def test_range_at_historical_revisions(servers: Pair) -> None:
    start = servers.kv("Range", Range(key=b"x")).header.revision
    load(servers, KEYS[:5])
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a/", range_end=b"a0"))
    load(servers, [b"a/2", b"c"], rounds=2)
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"b"))
    end = servers.kv("Range", Range(key=b"x")).header.revision
    for revision in range(start, end + 2):
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=revision))
        servers.kv("Range", Range(key=b"a", range_end=b"b", revision=revision, limit=1))
        servers.kv("Range", Range(key=b"a/2", revision=revision))
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=revision, count_only=True))
        servers.kv(
            "Range",
            Range(
                key=b"\x00",
                range_end=b"\x00",
                revision=revision,
                sort_order=Range.DESCEND,
                sort_target=Range.MOD,
                min_create_revision=start + 2,
                limit=2,
                keys_only=True,
            ),
        )


def test_range_future_and_compacted_revisions(servers: Pair) -> None:
    load(servers, KEYS[:4], rounds=2)
    now = servers.kv("Range", Range(key=b"x")).header.revision
    servers.kv("Range", Range(key=b"a", revision=now + 1))  # ErrFutureRev
    servers.kv("Range", Range(key=b"a", revision=now + 1000))
    servers.kv("Compact", pb.CompactionRequest(revision=now - 3))
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", revision=now - 4))  # ErrCompacted
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", revision=now - 3))  # the compacted revision itself
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", revision=now - 2))
    servers.kv("Range", Range(key=b"a", range_end=b"\x00", revision=-7))  # <= 0 reads now


def test_reads_never_bump_the_revision(servers: Pair) -> None:
    load(servers, KEYS[:2])
    before = servers.kv("Range", Range(key=b"a")).header.revision
    for _ in range(3):
        servers.kv("Range", Range(key=b"/registry/pods", limit=1))
        servers.kv("Txn", txn([cmp(b"a", "MOD", "GREATER", 0)], [get(b"a")]))
    assert servers.kv("Range", Range(key=b"a")).header.revision == before


# -- Put and DeleteRange ---------------------------------------------------------


def test_put_versions_and_prev_kv(servers: Pair) -> None:
    for value in (b"one", b"two", b"two", b""):
        servers.kv("Put", pb.PutRequest(key=b"k", value=value, prev_kv=True))
    servers.kv("Range", Range(key=b"k"))
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"k"))
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"again", prev_kv=True))  # version starts over
    servers.kv("Range", Range(key=b"k"))


def test_put_ignore_value_and_ignore_lease(servers: Pair) -> None:
    servers.kv("Put", pb.PutRequest(key=b"missing", ignore_value=True))  # ErrKeyNotFound
    servers.kv("Put", pb.PutRequest(key=b"missing", ignore_lease=True))  # ErrKeyNotFound
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"kept"))
    servers.kv("Put", pb.PutRequest(key=b"k", ignore_value=True, prev_kv=True))
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"new", ignore_lease=True, prev_kv=True))
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"x", ignore_value=True))  # ErrValueProvided
    servers.kv("Put", pb.PutRequest(key=b"k", ignore_lease=True, lease=7))  # ErrLeaseProvided
    servers.kv("Range", Range(key=b"k"))


def test_put_with_unknown_lease(servers: Pair) -> None:
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"v", lease=12345))  # ErrLeaseNotFound
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"v", lease=12345, ignore_value=True))
    servers.kv("Range", Range(key=b"k"))


@pytest.mark.parametrize(
    "key,range_end",
    [(b"a", b""), (b"a/", b"a0"), (b"a", b"\x00"), (b"\x00", b"\x00"), (b"nope", b""), (b"c", b"a")],
)
def test_delete_range(servers: Pair, key: bytes, range_end: bytes) -> None:
    load(servers, KEYS)
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=key, range_end=range_end, prev_kv=True))
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=key, range_end=range_end))  # now a no-op
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


# -- Txn ----------------------------------------------------------------------------


TARGETS = ["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
RESULTS = ["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]


@pytest.mark.parametrize("target", TARGETS)
def test_txn_compare_every_target_and_result(servers: Pair, target: str) -> None:
    load(servers, [b"k", b"r/1", b"r/2"], rounds=2)
    now = servers.kv("Range", Range(key=b"k")).kvs[0]
    operands = {
        "VERSION": [0, 1, now.version, 3],
        "CREATE": [0, now.create_revision, now.create_revision + 1],
        "MOD": [0, now.mod_revision - 1, now.mod_revision, now.mod_revision + 1],
        "VALUE": [b"", now.value, b"1-0", b"zzz"],
        "LEASE": [0, 1],
    }[target]
    for result in RESULTS:
        for operand in [*operands, None]:
            for key, range_end in [(b"k", b""), (b"missing", b""), (b"r/", b"r0"), (b"r/", b"\x00"), (b"q", b"r")]:
                compare = cmp(key, target, result, operand, range_end)
                servers.kv("Txn", txn([compare], [get(b"k", keys_only=True)], [get(b"r/1", count_only=True)]))


def test_txn_compare_operand_of_another_target_reads_as_zero(servers: Pair) -> None:
    load(servers, [b"k"])
    mismatched = Compare(key=b"k", target=Compare.MOD, result=Compare.GREATER, version=100000)
    servers.kv("Txn", txn([mismatched], [get(b"k")], [put(b"f")]))
    value_vs_int = Compare(key=b"k", target=Compare.VALUE, result=Compare.GREATER, mod_revision=5)
    servers.kv("Txn", txn([value_vs_int], [get(b"k")], [put(b"f")]))


def test_txn_several_compares_must_all_hold(servers: Pair) -> None:
    load(servers, [b"a", b"b"])
    good = cmp(b"a", "VERSION", "EQUAL", 1)
    bad = cmp(b"b", "VERSION", "EQUAL", 9)
    for compares in ([good], [good, bad], [bad, good], [good, good]):
        servers.kv("Txn", txn(compares, [put(b"s")], [put(b"f")]))


def test_txn_ops_see_earlier_ops(servers: Pair) -> None:
    load(servers, [b"a", b"b/1"])
    servers.kv(
        "Txn",
        txn(
            [],
            [
                put(b"b/2", b"x"),
                get(b"b/", range_end=b"b0"),
                delete(b"a", prev_kv=True),
                get(b"a"),
                put(b"c", b"y", prev_kv=True),
                get(b"\x00", range_end=b"\x00", count_only=True),
                delete(b"b/", range_end=b"b0"),
                get(b"\x00", range_end=b"\x00", keys_only=True, sort_order=Range.DESCEND),
            ],
        ),
    )
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


def test_txn_nested(servers: Pair) -> None:
    load(servers, [b"a", b"b"])
    inner_ok = txn([cmp(b"a", "VERSION", "EQUAL", 1)], [put(b"n1"), get(b"n1")], [put(b"n2")])
    # Nested compares are judged before the txn runs: this one cannot see x.
    inner_sees_old = txn([cmp(b"x", "VERSION", "EQUAL", 0)], [put(b"n3"), get(b"x")], [put(b"n4")])
    deep = txn([], [nested(txn([], [nested(txn([cmp(b"b", "MOD", "GREATER", 0)], [delete(b"b")]))]))])
    servers.kv("Txn", txn([], [put(b"x"), nested(inner_ok), nested(inner_sees_old), nested(deep), get(b"n")]))
    servers.kv("Txn", txn([cmp(b"a", "VALUE", "EQUAL", b"no")], [put(b"s")], [nested(inner_ok), get(b"a")]))
    servers.kv("Txn", txn([], [nested(txn([], [get(b"a")]))]))  # read-only nested
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


def test_txn_reads_at_fixed_revisions(servers: Pair) -> None:
    load(servers, [b"a", b"b"], rounds=2)
    now = servers.kv("Range", Range(key=b"a")).header.revision
    servers.kv("Txn", txn([], [get(b"a", revision=now - 2), get(b"\x00", range_end=b"\x00", revision=now - 1)]))
    # A put, then a read at the revision before it: the read sees the old state.
    servers.kv("Txn", txn([], [put(b"a", b"new"), get(b"a", revision=now), get(b"a")]))
    now += 1
    servers.kv("Txn", txn([], [put(b"c"), get(b"a", revision=now + 1)]))  # ErrFutureRev
    servers.kv("Txn", txn([], [get(b"a", revision=now + 1)]))
    servers.kv("Compact", pb.CompactionRequest(revision=now - 1))
    servers.kv("Txn", txn([], [put(b"c"), get(b"a", revision=now - 2)]))  # ErrCompacted
    servers.kv("Txn", txn([], [get(b"a", revision=now - 1)]))


def test_txn_errors_leave_nothing_behind(servers: Pair) -> None:
    load(servers, [b"a"])
    servers.kv("Txn", txn([], [put(b"x"), put(b"y", lease=999)]))  # ErrLeaseNotFound
    servers.kv("Txn", txn([], [put(b"x"), put(b"gone", ignore_value=True)]))  # ErrKeyNotFound
    servers.kv("Txn", txn([], [put(b"gone", ignore_lease=True, lease=0), put(b"y", lease=999)]))
    # Checks follow only the branch that runs.
    servers.kv("Txn", txn([cmp(b"a", "VERSION", "EQUAL", 1)], [put(b"x")], [put(b"y", lease=999)]))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


@pytest.mark.parametrize(
    "success",
    [
        [put(b"k"), put(b"k")],
        [put(b"k"), delete(b"k")],
        [delete(b"a", range_end=b"z"), put(b"k")],
        [put(b"k"), nested(txn([], [put(b"k")]))],
        [nested(txn([], [put(b"k")])), nested(txn([], [put(b"k")]))],
        [nested(txn([], [put(b"k")], [put(b"k")]))],  # then/else may share a key
        [delete(b"k"), delete(b"k")],  # two deletes are fine
        [delete(b"a", range_end=b"\x00"), put(b"k")],
        [nested(txn([], [delete(b"k")])), put(b"k")],
        [get(b"k"), put(b"k"), get(b"k")],
    ],
)
def test_txn_duplicate_keys(servers: Pair, success: list[Any]) -> None:
    servers.kv("Txn", txn([], success))
    servers.kv("Txn", txn([], [], success))


@pytest.mark.parametrize("count", [128, 129])
def test_txn_too_many_ops(servers: Pair, count: int) -> None:
    ops = [put(b"k%03d" % index) for index in range(count)]
    servers.kv("Txn", txn([], ops))
    servers.kv("Txn", txn([], [], [get(b"k%03d" % index) for index in range(count)]))
    servers.kv("Txn", txn([cmp(b"k%03d" % index, "VERSION", "GREATER", 0) for index in range(count)]))
    servers.kv("Range", Range(key=b"k", range_end=b"l", count_only=True))


def test_txn_revision_accounting(servers: Pair) -> None:
    """One revision per txn that changes something, none otherwise."""
    load(servers, [b"a"])
    servers.kv("Txn", txn())  # empty
    servers.kv("Txn", txn([cmp(b"a", "VERSION", "EQUAL", 5)], [put(b"x")]))  # failed compare, no failure ops
    servers.kv("Txn", txn([], [delete(b"missing")]))  # a delete of nothing
    servers.kv("Txn", txn([], [get(b"a"), delete(b"missing"), get(b"a")]))
    servers.kv("Txn", txn([], [put(b"x"), put(b"y"), delete(b"a"), get(b"x")]))  # exactly one revision
    servers.kv("Txn", txn([], [delete(b"missing"), put(b"z"), delete(b"nothing")]))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


def test_txn_empty_request_op(servers: Pair) -> None:
    servers.kv("Txn", txn([], [pb.RequestOp()]))  # etcd: key not found
    servers.kv("Txn", txn([Compare(key=b"")], [put(b"k")]))  # ErrEmptyKey
    servers.kv("Txn", txn([], [put(b"")]))


# -- Kubernetes request shapes ------------------------------------------------------


def test_kubernetes_create_update_delete(servers: Pair) -> None:
    key = b"/registry/pods/default/web"
    create = txn([cmp(key, "MOD", "EQUAL", 0)], [put(key, b"v1")])
    servers.kv("Txn", create)
    servers.kv("Txn", create)  # already exists: succeeded=false
    current = servers.kv("Range", Range(key=key, limit=1)).kvs[0].mod_revision
    for revision in (current, current, current + 1):  # the second one conflicts
        servers.kv("Txn", txn([cmp(key, "MOD", "EQUAL", revision)], [put(key, b"v2")], [get(key)]))
    current = servers.kv("Range", Range(key=key, limit=1)).kvs[0].mod_revision
    servers.kv("Txn", txn([cmp(key, "MOD", "EQUAL", current - 1)], [delete(key)], [get(key)]))
    servers.kv("Txn", txn([cmp(key, "MOD", "EQUAL", current)], [delete(key)], [get(key)]))
    servers.kv("Txn", txn([cmp(key, "MOD", "EQUAL", current)], [delete(key)], [get(key)]))  # gone: 0 kvs
    servers.kv("Range", Range(key=b"/registry/pods", limit=1))  # current revision probe


def test_kubernetes_paginated_list(servers: Pair) -> None:
    for index in range(23):
        servers.kv("Put", pb.PutRequest(key=b"/registry/cm/ns/%03d" % index, value=b"x" * index))
    revision = servers.kv("Range", Range(key=b"/registry/cm/", range_end=b"/registry/cm0", limit=1)).header.revision
    servers.kv("Put", pb.PutRequest(key=b"/registry/cm/ns/050", value=b"late"))
    key = b"/registry/cm/"
    while True:
        response = servers.kv("Range", Range(key=key, range_end=b"/registry/cm0", limit=5, revision=revision))
        if not response.more:
            break
        key = response.kvs[-1].key + b"\x00"
    servers.kv("Range", Range(key=b"/registry/cm/", range_end=b"/registry/cm0", count_only=True))


def test_kubernetes_compaction_flow(servers: Pair) -> None:
    """compact_rev_key is an ordinary key; pykine's own bookkeeping lives elsewhere."""
    key = b"compact_rev_key"
    load(servers, KEYS[:3], rounds=2)
    for version in range(3):
        now = servers.kv("Range", Range(key=b"x")).header.revision
        response = servers.kv(
            "Txn", txn([cmp(key, "VERSION", "EQUAL", version)], [put(key, str(now).encode())], [get(key)])
        )
        servers.kv("Txn", txn([cmp(key, "VERSION", "EQUAL", version)], [put(key, b"stale")], [get(key)]))
        servers.kv("Compact", pb.CompactionRequest(revision=now))
        load(servers, KEYS[:3])
        assert response.succeeded
    servers.kv("Range", Range(key=key))


# -- Compaction ------------------------------------------------------------------------


def test_compaction_errors_and_reads(servers: Pair) -> None:
    load(servers, KEYS[:4], rounds=3)
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a/1"))
    now = servers.kv("Range", Range(key=b"x")).header.revision
    servers.kv("Compact", pb.CompactionRequest(revision=now + 1))  # ErrFutureRev
    servers.kv("Compact", pb.CompactionRequest(revision=now - 5, physical=True))
    servers.kv("Compact", pb.CompactionRequest(revision=now - 5))  # ErrCompacted
    servers.kv("Compact", pb.CompactionRequest(revision=now - 6))
    for revision in range(now - 6, now + 2):
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=revision))
    servers.kv("Compact", pb.CompactionRequest(revision=now))  # up to the current revision, tombstone included
    for revision in range(now - 1, now + 1):
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=revision))
    servers.kv("Range", Range(key=b"a/1"))


def test_compaction_on_a_fresh_store(fresh: Pair) -> None:
    fresh.kv("Compact", pb.CompactionRequest(revision=0))
    fresh.kv("Compact", pb.CompactionRequest(revision=0))  # ErrCompacted: 0 is now compacted
    fresh.kv("Compact", pb.CompactionRequest(revision=1))
    fresh.kv("Compact", pb.CompactionRequest(revision=-3))
    fresh.kv("Range", Range(key=b"a", revision=1))


# -- Maintenance and Cluster -----------------------------------------------------------


def test_fresh_store_starts_at_revision_one(fresh: Pair) -> None:
    response = fresh.kv("Range", Range(key=b"/registry/health"))
    assert response.header.revision == 1
    fresh.kv("Put", pb.PutRequest(key=b"a", value=b"1"))
    fresh.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a"))


@pytest.mark.pykine_engine
def test_status_alarm_and_member_list(servers: Pair) -> None:
    load(servers, KEYS[:3])
    etcd, pykine = servers.both("Maintenance", "Status", pb.StatusRequest())
    assert pykine.ok, pykine.details
    assert pykine.response.header.revision == etcd.response.header.revision
    major, minor, patch = (int(part) for part in pykine.response.version.split(".")[:3])
    assert (major, minor, patch) >= (3, 5, 13)
    assert pykine.response.dbSize > 0
    assert 0 < pykine.response.dbSizeInUse <= pykine.response.dbSize
    assert pykine.response.leader == pykine.response.header.member_id != 0
    assert not pykine.response.errors

    servers.same("Maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET))

    etcd, pykine = servers.both("Cluster", "MemberList", pb.MemberListRequest())
    assert pykine.ok, pykine.details
    assert pykine.response.header.revision == etcd.response.header.revision == 0
    [member] = pykine.response.members
    assert pykine.response.header.member_id == member.ID
    assert member.clientURLs == [f"http://{servers.pykine.address}"]
    assert not member.isLearner


def test_defragment_keeps_data(servers: Pair) -> None:
    load(servers, KEYS, rounds=3)
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a", range_end=b"b"))
    servers.same("Maintenance", "Defragment", pb.DefragmentRequest())
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))


def test_reads_of_one_revision_in_every_form_agree(servers: Pair) -> None:
    """Keys-only, paged, filtered and whole reads of the same rows (pykine caches encoded rows)."""
    for index in range(5):
        servers.kv("Put", pb.PutRequest(key=b"form/%d" % index, value=b"value %d" % index))
    whole = pb.RangeRequest(key=b"form/", range_end=b"form0")
    for request in (
        pb.RangeRequest(key=b"form/", range_end=b"form0", keys_only=True),
        whole,
        pb.RangeRequest(key=b"form/", range_end=b"form0", limit=2),
        pb.RangeRequest(key=b"form/", range_end=b"form0", keys_only=True, limit=3),
        whole,
        pb.RangeRequest(key=b"form/", range_end=b"form0", min_mod_revision=1),
        pb.RangeRequest(key=b"form/1"),
        whole,
    ):
        servers.same("KV", "Range", request)
    counted = pb.RangeRequest(key=b"form/", range_end=b"form0", count_only=True)
    assert servers.same("KV", "Range", counted).response.count == 5
    servers.kv("Put", pb.PutRequest(key=b"form/2", value=b"changed"))
    assert [kv.value for kv in servers.same("KV", "Range", whole).response.kvs][2] == b"changed"
    servers.kv("Put", pb.PutRequest(key=b"form/5", value=b"new"))
    assert servers.same("KV", "Range", counted).response.count == 6  # (pykine caches counts per revision)
    servers.same("KV", "Range", pb.RangeRequest(key=b"form/", range_end=b"form0", limit=1))
    servers.kv("DeleteRange", pb.DeleteRangeRequest(key=b"form/0"))
    assert servers.same("KV", "Range", counted).response.count == 5


def test_health_service_like_etcds(servers: Pair) -> None:
    """grpc.health.v1 through grpcio's own health client: SERVING overall, unknown names refused alike."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answers = []
    for server in (servers.etcd, servers.pykine):
        assert server.channel is not None
        stub = health_pb2_grpc.HealthStub(server.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        answers.append((refused.value.code(), refused.value.details()))
    assert answers[1] == answers[0]


def test_put_then_delete_of_one_key_in_one_revision(servers: Pair) -> None:
    """Sibling nested txns may put a key and then delete it: two changes of one key at one revision."""
    servers.kv("Put", pb.PutRequest(key=b"k", value=b"before"))
    response = servers.kv(
        "Txn",
        txn([], [nested(txn([], [put(b"k", b"during"), put(b"n", b"new")])), nested(txn([], [delete(b"k")]))]),
    )
    revision = response.header.revision
    servers.kv("Put", pb.PutRequest(key=b"later", value=b"x"))
    for at in (revision - 1, revision, revision + 1):
        servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=at))
    servers.kv("Compact", pb.CompactionRequest(revision=revision, physical=True))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00", revision=revision))
    servers.kv("Range", Range(key=b"\x00", range_end=b"\x00"))
