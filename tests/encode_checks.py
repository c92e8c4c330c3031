"""The hand-assembled RangeResponse bytes are exactly what protobuf itself writes.

Run by tests/test_encode.py in a process of its own: pykine's wire modules
cannot share a protobuf pool with aetcd's, which the rest of the suite loads.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pykine.engine.records import KeyValueRow
from pykine.engine.results import RangeResult
from pykine.services.encode import EncodedKeyValues, encoded_range_response, range_response
from pykine.wire import rpc_pb2

rows = st.builds(
    KeyValueRow,
    key=st.binary(min_size=1, max_size=40),
    create_revision=st.integers(1, 2**62),
    mod_revision=st.integers(1, 2**62),
    version=st.integers(1, 2**40),
    value=st.binary(max_size=3000),
    lease=st.integers(0, 2**62),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(rows, max_size=20, unique_by=lambda row: (row.key, row.mod_revision)),
    st.booleans(),
    st.integers(0, 2**40),
    st.integers(1, 2**40),
)
def check_encoded_range_response_matches_protobuf(
    kvs: list[KeyValueRow], more: bool, count: int, revision: int
) -> None:
    header = rpc_pb2.ResponseHeader(cluster_id=7, member_id=8, revision=revision, raft_term=1)
    result = RangeResult(revision, kvs, count, more)
    expected = range_response(result, header).SerializeToString()
    known = EncodedKeyValues()
    assert encoded_range_response(result, header, known) == expected  # every row encoded here
    cached = RangeResult(revision, [known.get((kv.key, kv.mod_revision)) or kv for kv in kvs], count, more)
    assert encoded_range_response(cached, header, known) == expected  # rows given as their cached fields


def check_the_budget_bounds_the_cache() -> None:
    known = EncodedKeyValues(budget=10_000)
    for index in range(100):
        known.field(KeyValueRow(b"k%d" % index, 1, index + 1, 1, b"x" * 500, 0))
    assert known.get((b"k0", 1)) is None  # the oldest went first
    assert known.get((b"k99", 100)) is not None
    assert sum(1 for index in range(100) if known.get((b"k%d" % index, index + 1))) <= 10_000 // 500


if __name__ == "__main__":
    check_encoded_range_response_matches_protobuf()
    check_the_budget_bounds_the_cache()
    print("ok")
