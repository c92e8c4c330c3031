"""Bad requests and bad command lines: pykine must refuse them as etcd does and keep serving.

Requests go to real etcd and pykine alike wherever etcd defines the answer; after every bad
request both servers must still take a normal Put and Range.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd.rpc import rpc_pb2 as pb
from harness import ROOT, Outcome, Pair, PykineServer, Server, call, free_port, normalise, pair

Code = grpc.StatusCode

MAX_REQUEST_BYTES = 1536 * 1024  # etcd's default --max-request-bytes
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES + 512 * 1024  # etcd's gRPC receive limit

EMPTY_KEY = (Code.INVALID_ARGUMENT, "etcdserver: key is not provided")
KEY_NOT_FOUND = (Code.INVALID_ARGUMENT, "etcdserver: key not found")
VALUE_PROVIDED = (Code.INVALID_ARGUMENT, "etcdserver: value is provided")
LEASE_PROVIDED = (Code.INVALID_ARGUMENT, "etcdserver: lease is provided")
TOO_MANY_OPS = (Code.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")
DUPLICATE_KEY = (Code.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request")
TOO_LARGE = (Code.INVALID_ARGUMENT, "etcdserver: request is too large")
INVALID_SORT = (Code.INVALID_ARGUMENT, "etcdserver: invalid sort option")

_serial = itertools.count()


@pytest.fixture(scope="module")
def servers() -> Iterator[Pair]:
    with pair() as both:
        yield both


def assert_serving(servers: Pair) -> None:
    """Both servers still answer a normal Put and Range identically."""
    key = b"still-serving/%d" % next(_serial)
    put = servers.same("KV", "Put", pb.PutRequest(key=key, value=b"yes"))
    assert put.ok
    got = servers.same("KV", "Range", pb.RangeRequest(key=key))
    assert [kv.value for kv in got.response.kvs] == [b"yes"]


def assert_same_error(servers: Pair, service: str, method: str, request: Any, label: str) -> Outcome:
    """Like Pair.same for refusals, without printing a megabyte-sized request on failure."""
    want, got = servers.both(service, method, request)
    assert not want.ok, f"{label}: etcd accepted it"
    assert (got.code, got.details) == (want.code, want.details), (
        f"{label}: etcd said {want.code} {want.details!r}, pykine said {got.code} {got.details!r}"
    )
    return got


def put_op(key: bytes, value: bytes = b"v") -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))


def delete_op(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))


def range_op(key: bytes) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key))


def nested(success: list[pb.RequestOp], failure: list[pb.RequestOp] | None = None) -> pb.RequestOp:
    return pb.RequestOp(request_txn=pb.TxnRequest(success=success, failure=failure or []))


def value_compare(key: bytes, value: bytes = b"x") -> pb.Compare:
    return pb.Compare(key=key, target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=value)


# (id, method, request, the error etcd gives)
REFUSED: list[tuple[str, str, Any, tuple[Code, str]]] = [
    ("range-empty-key", "Range", pb.RangeRequest(key=b""), EMPTY_KEY),
    ("range-empty-key-with-end", "Range", pb.RangeRequest(key=b"", range_end=b"z"), EMPTY_KEY),
    ("put-empty-key", "Put", pb.PutRequest(key=b"", value=b"v"), EMPTY_KEY),
    ("delete-empty-key", "DeleteRange", pb.DeleteRangeRequest(key=b""), EMPTY_KEY),
    ("delete-empty-key-with-end", "DeleteRange", pb.DeleteRangeRequest(key=b"", range_end=b"\x00"), EMPTY_KEY),
    ("txn-compare-empty-key", "Txn", pb.TxnRequest(compare=[value_compare(b"")]), EMPTY_KEY),
    ("txn-success-range-empty-key", "Txn", pb.TxnRequest(success=[range_op(b"")]), EMPTY_KEY),
    ("txn-failure-put-empty-key", "Txn", pb.TxnRequest(failure=[put_op(b"")]), EMPTY_KEY),
    ("txn-delete-empty-key", "Txn", pb.TxnRequest(success=[delete_op(b"")]), EMPTY_KEY),
    ("txn-nested-empty-key", "Txn", pb.TxnRequest(success=[nested([put_op(b"")])]), EMPTY_KEY),
    ("txn-empty-op", "Txn", pb.TxnRequest(success=[pb.RequestOp()]), KEY_NOT_FOUND),
    ("put-ignore-value-with-value", "Put", pb.PutRequest(key=b"k", value=b"v", ignore_value=True), VALUE_PROVIDED),
    (
        "txn-put-ignore-value-with-value",
        "Txn",
        pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"k", value=b"v", ignore_value=True))]),
        VALUE_PROVIDED,
    ),
    ("put-ignore-value-missing-key", "Put", pb.PutRequest(key=b"never-written", ignore_value=True), KEY_NOT_FOUND),
    ("put-ignore-lease-with-lease", "Put", pb.PutRequest(key=b"k", lease=7, ignore_lease=True), LEASE_PROVIDED),
    (
        "txn-129-success-ops",
        "Txn",
        pb.TxnRequest(success=[put_op(b"many/%d" % i) for i in range(129)]),
        TOO_MANY_OPS,
    ),
    ("txn-129-failure-ops", "Txn", pb.TxnRequest(failure=[range_op(b"r/%d" % i) for i in range(129)]), TOO_MANY_OPS),
    (
        "txn-129-compares",
        "Txn",
        pb.TxnRequest(compare=[value_compare(b"c/%d" % i) for i in range(129)]),
        TOO_MANY_OPS,
    ),
    ("txn-duplicate-put", "Txn", pb.TxnRequest(success=[put_op(b"d"), put_op(b"d", b"w")]), DUPLICATE_KEY),
    (
        "txn-duplicate-put-in-failure",
        "Txn",
        pb.TxnRequest(failure=[put_op(b"e"), range_op(b"e"), put_op(b"e")]),
        DUPLICATE_KEY,
    ),
    ("txn-put-and-delete-same-key", "Txn", pb.TxnRequest(success=[put_op(b"d"), delete_op(b"d")]), DUPLICATE_KEY),
    (
        "txn-put-inside-deleted-range",
        "Txn",
        pb.TxnRequest(success=[delete_op(b"a", b"c"), put_op(b"b")]),
        DUPLICATE_KEY,
    ),
    (
        "txn-nested-put-duplicates-outer-put",
        "Txn",
        pb.TxnRequest(success=[put_op(b"n"), nested([put_op(b"n")])]),
        DUPLICATE_KEY,
    ),
    (
        "txn-nested-put-inside-outer-delete",
        "Txn",
        pb.TxnRequest(success=[delete_op(b"n", b"o"), nested([], [put_op(b"n/x")])]),
        DUPLICATE_KEY,
    ),
]


@pytest.mark.parametrize(
    ("method", "request_", "expected"), [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused_like_etcd(servers: Pair, method: str, request_: Any, expected: tuple[Code, str]) -> None:
    """etcd's validation errors, code and exact message, and nothing written."""
    before = servers.same("KV", "Range", pb.RangeRequest(key=b"\x00", range_end=b"\x00", count_only=True))
    outcome = servers.same("KV", method, request_)
    assert (outcome.code, outcome.details) == expected
    after = servers.same("KV", "Range", pb.RangeRequest(key=b"\x00", range_end=b"\x00", count_only=True))
    assert after.response.header.revision == before.response.header.revision
    assert_serving(servers)


def test_txn_limits_and_allowed_overlaps(servers: Pair) -> None:
    """The accepting side of the same rules: 128 ops is fine; then and else may share a key."""
    accepted = [
        pb.TxnRequest(success=[put_op(b"ops/%03d" % i) for i in range(128)]),
        pb.TxnRequest(compare=[value_compare(b"c/%d" % i) for i in range(128)], failure=[range_op(b"ops/000")]),
        pb.TxnRequest(success=[nested([put_op(b"both")], [put_op(b"both")])]),
        pb.TxnRequest(success=[range_op(b"r"), range_op(b"r"), delete_op(b"gone"), delete_op(b"gone")]),
        pb.TxnRequest(success=[delete_op(b"p", b"q"), nested([range_op(b"p/1")])]),
    ]
    for request in accepted:
        outcome = servers.same("KV", "Txn", request)
        assert outcome.ok
    assert_serving(servers)


@pytest.mark.parametrize("size", [MAX_REQUEST_BYTES + 1, MAX_REQUEST_BYTES + 100_000, MAX_MESSAGE_BYTES - 1000])
def test_value_over_request_limit(servers: Pair, size: int) -> None:
    """Over 1.5 MiB but under gRPC's 2 MiB: etcd's ErrRequestTooLarge, not a gRPC error."""
    outcome = assert_same_error(servers, "KV", "Put", pb.PutRequest(key=b"big", value=b"x" * size), f"{size} bytes")
    assert (outcome.code, outcome.details) == TOO_LARGE
    txn = pb.TxnRequest(success=[put_op(b"big/%d" % i, b"y" * (size // 4)) for i in range(4)])
    outcome = assert_same_error(servers, "KV", "Txn", txn, f"txn of {txn.ByteSize()} bytes")
    assert (outcome.code, outcome.details) == TOO_LARGE
    assert not servers.same("KV", "Range", pb.RangeRequest(key=b"big", range_end=b"bih")).response.kvs
    assert_serving(servers)


def test_put_of_exactly_the_request_limit() -> None:
    """etcd counts its raft envelope too, so a PutRequest of exactly 1.5 MiB is already too large.

    Own servers: if pykine accepted the Put, the shared pair's revisions would drift apart.
    """
    request = pb.PutRequest(key=b"edge", value=b"z" * MAX_REQUEST_BYTES)
    while request.ByteSize() != MAX_REQUEST_BYTES:  # settle the length prefix's own size
        request.value = b"z" * (len(request.value) + MAX_REQUEST_BYTES - request.ByteSize())
    with pair() as fresh:
        want, got = fresh.both("KV", "Put", request)
        assert (want.code, want.details) == TOO_LARGE
        assert (got.code, got.details) == (want.code, want.details), (
            f"PutRequest of {request.ByteSize()} bytes: etcd said {want.code} {want.details!r}, "
            f"pykine said {got.code} {got.details!r}"
        )


def test_message_over_grpc_limit(servers: Pair) -> None:
    """Over 2 MiB gRPC itself refuses the message: RESOURCE_EXHAUSTED from both (wording differs)."""
    requests = [
        ("Put", pb.PutRequest(key=b"huge", value=b"x" * (MAX_MESSAGE_BYTES + 10))),
        ("Put", pb.PutRequest(key=b"huge", value=b"x" * (3 * 1024 * 1024))),
        ("Txn", pb.TxnRequest(success=[put_op(b"huge/%d" % i, b"y" * (600 * 1024)) for i in range(4)])),
    ]
    for method, request in requests:
        want, got = servers.both("KV", method, request)
        assert want.code == Code.RESOURCE_EXHAUSTED
        assert got.code == want.code, f"{method} of {request.ByteSize()} bytes: etcd {want.code}, pykine {got.code}"
        assert_serving(servers)


BINARY_KEYS = [
    b"\x00",
    b"\x00\x00",
    b"\x00\xff",
    b"a\x00",
    b"a\x00b",
    b"a\x00\xff",
    b"a\xff",
    b"\x7f\x80",
    b"\xfe\xff\xff",
    b"\xff",
    b"\xff\x00",
    b"\xff\xff",
    b"\xff\xff\xff",
]
BINARY_VALUES = [b"\x00", b"", b"\xff", b"nul\x00in\x00middle", bytes(range(256)), b"\xff\x00" * 100]


def test_binary_keys_and_values(servers: Pair) -> None:
    """Keys and values are bytes, not text: NUL and 0xff round-trip and order as etcd orders them."""
    for index, key in enumerate(BINARY_KEYS):
        # Distinct values: etcd's sort is not stable, so ties in a sort by value have no set order.
        value = b"" if index == 1 else BINARY_VALUES[index % len(BINARY_VALUES)] + bytes([index])
        assert servers.same("KV", "Put", pb.PutRequest(key=key, value=value, prev_kv=True)).ok
        got = servers.same("KV", "Range", pb.RangeRequest(key=key))
        assert [(kv.key, kv.value) for kv in got.response.kvs] == [(key, value)]
    servers.same("KV", "Put", pb.PutRequest(key=b"a\x00", value=b"\xff\xfe\x00", prev_kv=True))

    ranges = [
        pb.RangeRequest(key=b"\x00", range_end=b"\x00"),
        pb.RangeRequest(key=b"\x00", range_end=b"\x01"),
        pb.RangeRequest(key=b"\x00", range_end=b"\x00\x01"),
        pb.RangeRequest(key=b"a\x00", range_end=b"a\x01"),
        pb.RangeRequest(key=b"a\x00", range_end=b"a\x00\xff"),
        pb.RangeRequest(key=b"\xff", range_end=b"\x00"),
        pb.RangeRequest(key=b"\xff", range_end=b"\xff\x00"),
        pb.RangeRequest(key=b"\xff\xff", range_end=b"\x00"),
        pb.RangeRequest(key=b"\xfe", range_end=b"\xff\xff"),
        pb.RangeRequest(key=b"\xff", range_end=b"\x01"),
        pb.RangeRequest(key=b"\x7f", range_end=b"\x81"),
        pb.RangeRequest(key=b"\x00", range_end=b"\x00", keys_only=True, limit=3),
        pb.RangeRequest(key=b"\x00", range_end=b"\x00", count_only=True),
        pb.RangeRequest(
            key=b"\x00", range_end=b"\x00", sort_order=pb.RangeRequest.DESCEND, sort_target=pb.RangeRequest.KEY
        ),
        pb.RangeRequest(
            key=b"\x00", range_end=b"\x01", sort_order=pb.RangeRequest.ASCEND, sort_target=pb.RangeRequest.VALUE
        ),
        pb.RangeRequest(
            key=b"\x7f", range_end=b"\x00", sort_order=pb.RangeRequest.DESCEND, sort_target=pb.RangeRequest.VALUE
        ),
    ]
    for request in ranges:
        assert servers.same("KV", "Range", request).ok
    everything = servers.same("KV", "Range", pb.RangeRequest(key=b"\x00", range_end=b"\x00"))
    keys = [kv.key for kv in everything.response.kvs]
    assert keys == sorted(keys) and set(BINARY_KEYS) <= set(keys)

    txns = [
        pb.TxnRequest(compare=[value_compare(b"a\x00", b"\xff\xfe\x00")], success=[range_op(b"a\x00")]),
        pb.TxnRequest(
            compare=[pb.Compare(key=b"\xff", target=pb.Compare.VALUE, result=pb.Compare.GREATER, value=b"\xfe\xff")],
            success=[put_op(b"\xff\x00", b"\x00\x00")],
            failure=[range_op(b"\xff\x00")],
        ),
        pb.TxnRequest(
            compare=[
                pb.Compare(
                    key=b"\x00", range_end=b"\x01", target=pb.Compare.VERSION, result=pb.Compare.GREATER, version=0
                )
            ],
            success=[range_op(b"\x00\x00")],
        ),
        pb.TxnRequest(compare=[value_compare(b"\x00\xff", b"\x00")], failure=[put_op(b"\x00\xff", b"\x00")]),
    ]
    for request in txns:
        assert servers.same("KV", "Txn", request).ok

    deleted = servers.same("KV", "DeleteRange", pb.DeleteRangeRequest(key=b"a\x00", range_end=b"a\x01", prev_kv=True))
    assert deleted.response.deleted == 3
    deleted = servers.same("KV", "DeleteRange", pb.DeleteRangeRequest(key=b"\xff", range_end=b"\x00", prev_kv=True))
    assert deleted.response.deleted == 4
    assert servers.same("KV", "Range", pb.RangeRequest(key=b"\x00", range_end=b"\x00")).ok
    assert_serving(servers)


GARBAGE = [
    b"\xff\xff\xff",  # a field tag that does not end
    b"\x0a\xff\xff\xff\xff\xff",  # key with an unterminated length
    b"\x0a\x10abc",  # key longer than the message
    b"\x08",  # key declared as a varint
    b"\x0a\x01",  # truncated key
    b"\x12",  # range_end with no length
]


def _raw_range(server: Server, payload: bytes) -> tuple[Code | None, bytes | None]:
    assert server.channel is not None
    rpc = server.channel.unary_unary("/etcdserverpb.KV/Range", request_serializer=None, response_deserializer=None)
    try:
        return None, rpc(payload, timeout=10)
    except grpc.RpcError as error:
        return error.code(), None


def test_malformed_bytes_do_not_crash(servers: Pair) -> None:
    """Undecodable request bytes get a gRPC error, and the server goes on serving."""
    for payload in GARBAGE:
        code, answer = _raw_range(servers.pykine, payload)
        assert code is not None and code != Code.OK, f"{payload!r} was answered with {answer!r}"
        assert code != Code.UNAVAILABLE, f"{payload!r} took pykine down"
        assert servers.pykine.process is not None and servers.pykine.process.poll() is None
    assert_serving(servers)


def test_malformed_bytes_status_code_matches_etcd(servers: Pair) -> None:
    """Clients branch on the code: undecodable bytes must get etcd's code (the text is gRPC's own)."""
    answers = {
        payload: (_raw_range(servers.etcd, payload)[0], _raw_range(servers.pykine, payload)[0]) for payload in GARBAGE
    }
    assert all(want is not None for want, _ in answers.values())
    mismatched = {payload: pair_ for payload, pair_ in answers.items() if pair_[0] != pair_[1]}
    assert not mismatched, "etcd vs pykine codes: " + ", ".join(
        f"{payload!r}: {want} vs {got}" for payload, (want, got) in mismatched.items()
    )
    assert_serving(servers)


def test_unknown_fields_and_empty_message(servers: Pair) -> None:
    """Bytes that do decode are answered normally: unknown fields are skipped, empty means empty key."""
    servers.same("KV", "Put", pb.PutRequest(key=b"a", value=b"known"))
    for payload in (b"\x0a\x01a\x98\x01\x05", b"\x0a\x01a\xfa\x01\x03xyz"):
        (want_code, want), (got_code, got) = _raw_range(servers.etcd, payload), _raw_range(servers.pykine, payload)
        assert want_code is None and got_code is None, f"{payload!r}: etcd {want_code}, pykine {got_code}"
        assert want is not None and got is not None
        expected, actual = normalise(pb.RangeResponse.FromString(want)), normalise(pb.RangeResponse.FromString(got))
        assert actual == expected
        assert [kv.value for kv in actual.kvs] == [b"known"]
    want_code, _ = _raw_range(servers.etcd, b"")
    got_code, _ = _raw_range(servers.pykine, b"")
    assert want_code == got_code == Code.INVALID_ARGUMENT
    assert_serving(servers)


@pytest.mark.parametrize(
    "request_",
    [
        pb.RangeRequest(key=b"a", sort_order=7),
        pb.RangeRequest(key=b"a", sort_order=-1),
        pb.RangeRequest(key=b"a", sort_order=pb.RangeRequest.ASCEND, sort_target=9),
        pb.RangeRequest(key=b"a", sort_target=5),
    ],
    ids=["order-7", "order-negative", "target-9", "target-5-no-order"],
)
def test_invalid_sort_option(servers: Pair, request_: pb.RangeRequest) -> None:
    """An out-of-range sort enum gets etcd 3.5's ErrInvalidSortOption, alone and inside a Txn.

    Only pykine is asked: etcd 3.4 has no such check (it ignores a bad order and panics, taking the
    whole server down, on a bad target); 3.5, whose API pykine emulates, refuses both.
    """
    outcome = call(servers.pykine, "KV", "Range", request_)
    assert (outcome.code, outcome.details) == INVALID_SORT
    outcome = call(servers.pykine, "KV", "Txn", pb.TxnRequest(success=[pb.RequestOp(request_range=request_)]))
    assert (outcome.code, outcome.details) == INVALID_SORT
    assert_serving(servers)


# ---- the command line -------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYKINE_", "KINE_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_pykine(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pykine", *args],
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], mentions: str) -> None:
    """Exactly one line, `pykine: error: ...`, on stderr; nothing on stdout; exit code 2."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}, stderr {result.stderr!r}"
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("pykine: error: "), lines[0]
    assert mentions in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="pykine-cli-bad-") as path:
        yield Path(path)


@pytest.mark.parametrize(
    ("endpoint", "mentions"),
    [
        ("foo://x", "foo"),
        ("postgres://u@h/db", "postgres"),
        ("mysql://u@tcp(h)/db", "mysql"),
        ("not-a-dsn", "not-a-dsn"),
        ("sqlite://state.db?no_such_option=1", "no_such_option"),
    ],
)
def test_unusable_endpoint(scratch: Path, endpoint: str, mentions: str) -> None:
    """A DSN pykine cannot serve is a clear startup error, not a traceback or a silent default."""
    result = run_pykine(f"--listen-address=127.0.0.1:{free_port()}", f"--endpoint={endpoint}", cwd=scratch)
    assert_refused(result, mentions)
    assert not (scratch / "db").exists()


def test_database_path_under_a_file(scratch: Path) -> None:
    """A database whose parent directory is a regular file cannot be opened (root ignores modes)."""
    (scratch / "plain-file").write_text("not a directory")
    path = scratch / "plain-file" / "state.db"
    result = run_pykine(f"--listen-address=127.0.0.1:{free_port()}", f"--endpoint=sqlite://{path}", cwd=scratch)
    assert_refused(result, str(path))


@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_database_path_that_is_not_a_database(scratch: Path, kind: str) -> None:
    """A directory, or a file of random bytes, where the database should be is refused, and left alone."""
    path = scratch / "state.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(bytes(range(256)) * 40)
    result = run_pykine(f"--listen-address=127.0.0.1:{free_port()}", f"--endpoint=sqlite://{path}", cwd=scratch)
    assert_refused(result, str(path))
    if kind == "garbage":
        assert path.read_bytes() == bytes(range(256)) * 40


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--no-such-flag"], "--no-such-flag"),
        (["--log-format=xml"], "--log-format"),
        (["--compact-batch-size=0"], "--compact-batch-size"),
        (["--compact-batch-size=many"], "--compact-batch-size"),
        (["stray-argument"], "stray-argument"),
    ],
)
def test_bad_flags(scratch: Path, args: list[str], mentions: str) -> None:
    """Flag mistakes get one line, not argparse's usage block."""
    result = run_pykine(f"--listen-address=127.0.0.1:{free_port()}", *args, cwd=scratch)
    assert_refused(result, mentions)


def test_bad_boolean_environment_value(scratch: Path) -> None:
    """A PYKINE_ variable that cannot mean true or false is refused like a bad flag."""
    env = _clean_env()
    env["PYKINE_DEBUG"] = "maybe"
    result = run_pykine(f"--listen-address=127.0.0.1:{free_port()}", cwd=scratch, env=env)
    assert_refused(result, "maybe")


@pytest.mark.parametrize("kind", ["port-in-use", "unix-socket-in-missing-dir", "malformed"])
def test_unusable_listen_address(scratch: Path, kind: str) -> None:
    """An address pykine cannot listen on is one clear line too (gRPC's own log must not leak)."""
    holder = socket.socket()
    try:
        if kind == "port-in-use":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            address = f"127.0.0.1:{holder.getsockname()[1]}"
        elif kind == "unix-socket-in-missing-dir":
            address = f"unix://{scratch}/missing/pykine.sock"
        else:
            address = "nonsense:::1"
        result = run_pykine(f"--listen-address={address}", f"--endpoint=sqlite://{scratch}/state.db", cwd=scratch)
        assert_refused(result, address)
    finally:
        holder.close()


def test_second_server_on_the_same_address(scratch: Path) -> None:
    """A second pykine on a taken port must fail to start, not share the port with the first.

    Sharing (SO_REUSEPORT) would split clients between two servers with different data.
    """
    first = PykineServer(str(scratch), endpoint=f"sqlite://{scratch}/first.db")
    try:
        first.start()
        second = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pykine",
                f"--listen-address={first.address}",
                f"--endpoint=sqlite://{scratch}/second.db",
            ],
            cwd=scratch,
            env=_clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert second.stderr is not None
            # Its first stderr line is either the refusal or the "serving" announcement.
            ready, _, _ = select.select([second.stderr], [], [], 30)
            first_line = second.stderr.readline() if ready else ""
            serving = "serving" in first_line
        finally:
            if serving or not first_line:
                second.terminate()  # it is running (or silent): stop it
            try:
                rest_out, rest_err = second.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                second.kill()
                rest_out, rest_err = second.communicate()
        assert first_line, f"no answer from the second pykine within 30 s: {rest_err!r}"
        assert not serving, f"a second pykine started on {first.address}, already served by the first: {first_line!r}"
        result = subprocess.CompletedProcess(second.args, second.returncode, rest_out, first_line + rest_err)
        assert_refused(result, first.address)
        assert call(first, "KV", "Range", pb.RangeRequest(key=b"k")).ok
    finally:
        first.stop()


def test_ignore_value_after_a_delete_in_the_same_txn(servers: Pair) -> None:
    """etcd 3.4 crashes on this txn (its pre-check passes, the apply panics); pykine refuses it whole.

    A delete of [a, "\\0") is an empty interval to etcd's duplicate-key check, so the txn is valid.
    Only pykine is asked: the request would stop etcd.
    """
    assert call(servers.pykine, "KV", "Put", pb.PutRequest(key=b"a", value=b"kept")).ok
    delete_then_put = pb.TxnRequest(
        success=[
            pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"a", range_end=b"\x00")),
            pb.RequestOp(request_put=pb.PutRequest(key=b"a", ignore_value=True)),
        ]
    )
    outcome = call(servers.pykine, "KV", "Txn", delete_then_put)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key not found")
    kept = call(servers.pykine, "KV", "Range", pb.RangeRequest(key=b"a")).response
    assert [kv.value for kv in kept.kvs] == [b"kept"]
    # Keep the shared pair in lockstep: the same put on etcd.
    assert call(servers.etcd, "KV", "Put", pb.PutRequest(key=b"a", value=b"kept")).ok
