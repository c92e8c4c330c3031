"""Concurrent writers: group commit, one revision each, and atomic compare-and-swap."""

from __future__ import annotations

import re
import tempfile
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from aetcd.rpc import kv_pb2 as mvccpb
from harness import PykineServer, free_port, pb


@pytest.fixture
def server() -> Iterator[PykineServer]:
    workdir = tempfile.mkdtemp(prefix="pykine-concurrency-")
    metrics_port = free_port()
    pykine = PykineServer(workdir, f"--metrics-bind-address=127.0.0.1:{metrics_port}")
    pykine.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    pykine.start()
    try:
        yield pykine
    finally:
        pykine.stop()


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


@pytest.mark.pykine_engine
def test_concurrent_puts_are_group_committed_with_one_revision_each(server: PykineServer) -> None:
    writers, per_writer = 32, 40
    kv = server.stub("KV")

    def write(writer: int) -> list[int]:
        return [
            kv.Put(pb.PutRequest(key=b"w/%02d/%03d" % (writer, n), value=b"%d" % n), timeout=30).header.revision
            for n in range(per_writer)
        ]

    with ThreadPoolExecutor(writers) as pool:
        revisions = [rev for batch in pool.map(write, range(writers)) for rev in batch]

    total = writers * per_writer
    # Every put got its own revision, and together they fill 2..total+1 with no gap.
    assert sorted(revisions) == list(range(2, total + 2))
    listing = kv.Range(pb.RangeRequest(key=b"w/", range_end=b"w0"), timeout=30)
    assert listing.count == total
    assert {kv_.mod_revision for kv_ in listing.kvs} == set(revisions)

    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()  # type: ignore[attr-defined]
    batches = _metric(text, "pykine_write_batch_requests_count")
    requests = _metric(text, "pykine_write_batch_requests_sum")
    assert requests == total
    assert batches < total, f"{total} concurrent puts took {batches:.0f} transactions: no group commit"


def test_compare_and_swap_has_exactly_one_winner_per_revision(server: PykineServer) -> None:
    """Kubernetes' GuaranteedUpdate loop from many clients: no lost update."""
    key = b"/registry/counter"
    kv = server.stub("KV")
    kv.Put(pb.PutRequest(key=key, value=b"0"), timeout=10)
    clients, increments = 8, 25

    def increment(_: int) -> list[int]:
        wins: list[int] = []
        current = kv.Range(pb.RangeRequest(key=key), timeout=10).kvs[0]
        while len(wins) < increments:
            update = pb.TxnRequest(
                compare=[pb.Compare(key=key, target=pb.Compare.MOD, mod_revision=current.mod_revision)],
                success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"%d" % (int(current.value) + 1)))],
                failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
            )
            response = kv.Txn(update, timeout=10)
            if response.succeeded:
                wins.append(response.header.revision)
                current = mvccpb.KeyValue(
                    key=key, value=b"%d" % (int(current.value) + 1), mod_revision=response.header.revision
                )
            else:
                current = response.responses[0].response_range.kvs[0]
        return wins

    with ThreadPoolExecutor(clients) as pool:
        wins = [rev for batch in pool.map(increment, range(clients)) for rev in batch]

    final = kv.Range(pb.RangeRequest(key=key), timeout=10).kvs[0]
    assert int(final.value) == clients * increments
    assert final.version == clients * increments + 1
    assert len(set(wins)) == len(wins) == clients * increments
    assert final.mod_revision == max(wins)
