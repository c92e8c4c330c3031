"""The JSON gateway against etcd 3.4's: the same HTTP requests to both, the same answers.

Bodies are compared as JSON after blanking what must differ (cluster and
member ids, raft term); status codes and content types must match exactly.
Requests go in both spellings grpc-gateway accepts (proto names and
camelCase).
"""

from __future__ import annotations

import base64
import json
import socket

import databases
import pytest
from gatewayhttp import auth_on, both_streams, post, same, same_lines
from harness import Pair

# etcd's gRPC receive limit: --max-request-bytes (1.5 MiB) and 512 KiB more for the envelope.
MAX_RECEIVE_BYTES = 2 << 20


@pytest.mark.parametrize("prefix", ["/v3", "/v3beta"])
def test_kv_in_both_spellings(servers: Pair, prefix: str) -> None:
    same(servers, f"{prefix}/kv/put", '{"key":"Zm9v","value":"YmFy","prev_kv":true}')
    same(servers, f"{prefix}/kv/put", '{"key":"Zm9v","value":"YmF6","prevKv":true}')
    same(servers, f"{prefix}/kv/put", '{"key":"Zm9vMg==","value":"eA==","lease":"0"}')
    same(servers, f"{prefix}/kv/range", '{"key":"Zm9v"}')
    same(servers, f"{prefix}/kv/range", '{"key":"Zm9v","range_end":"Zm9w","keys_only":true}')
    same(servers, f"{prefix}/kv/range", '{"key":"Zm9v","rangeEnd":"Zm9w","countOnly":true}')
    same(servers, f"{prefix}/kv/range", '{"key":"AA==","range_end":"AA==","sort_order":"DESCEND","sort_target":"KEY"}')
    same(servers, f"{prefix}/kv/range", '{"key":"AA==","rangeEnd":"AA==","limit":"1","sortOrder":"ASCEND"}')
    same(
        servers,
        f"{prefix}/kv/txn",
        '{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmF6"}],'
        '"success":[{"requestPut":{"key":"Zm9v","value":"cQ=="}},{"request_range":{"key":"Zm9v"}}],'
        '"failure":[{"requestDeleteRange":{"key":"Zm9v"}}]}',
    )
    same(
        servers, f"{prefix}/kv/txn", '{"compare":[{"key":"Zm9v","target":"VERSION","result":"GREATER","version":"9"}]}'
    )
    same(servers, f"{prefix}/kv/deleterange", '{"key":"Zm9v","range_end":"Zm9w","prev_kv":true}')
    revision = same(servers, f"{prefix}/kv/range", '{"key":"Zm9v"}')["header"]["revision"]
    same(servers, f"{prefix}/kv/compaction", json.dumps({"revision": revision, "physical": True}))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v3/kv/range", "{}"),
        ("/v3/kv/range", ""),
        ("/v3/kv/range", '{"nope":1}'),  # unknown fields are ignored
        ("/v3/kv/put", "{}"),
        ("/v3/kv/range", '{"key":"Zm9v","revision":"99999"}'),
        ("/v3/kv/compaction", '{"revision":"99999"}'),
        ("/v3/kv/txn", '{"success":[{"requestPut":{"key":"YQ=="}},{"requestPut":{"key":"YQ=="}}]}'),
        ("/v3/lease/revoke", '{"ID":"5"}'),
        ("/v3/kv/lease/revoke", '{"ID":5}'),
        ("/v3/auth/authenticate", '{"name":"x","password":"y"}'),
        ("/v3/cluster/member/remove", '{"ID":"5"}'),
        ("/v3/cluster/member/add", '{"peerURLs":["not a url"]}'),
        ("/v3alpha/kv/range", '{"key":"Zm9v"}'),
        ("/v3/nope", "{}"),
        ("/v3beta/kv/nope", "{}"),
        ("/v3/", ""),
        # Malformed bodies: Go's own words, as etcd's gateway passes them on.
        ("/v3/kv/range", "{bad json"),
        ("/v3/kv/range", "[1]"),
        ("/v3/kv/range", '"text"'),
        ("/v3/kv/range", "null"),
        ("/v3/kv/range", '{"key":5}'),
        ("/v3/kv/range", '{"key":"!!!"}'),
        ("/v3/kv/range", '{"key":"Zm9v"} trailing'),
        ("/v3/kv/range", '{"key":'),
        ("/v3/kv/range", '{"key":"Zm9v",}'),
        ("/v3/kv/range", '{"key":"Zm9v" "x"}'),
        ("/v3/kv/range", '{"key":tru}'),
        ("/v3/kv/range", '{"key":"Zm9v\\q"}'),
        ("/v3/kv/range", '{"limit":-}'),
        ("/v3/kv/txn", '{"success":[{"requestPut":{"key":7}}]}'),
        ("/v3/kv/txn", '{"success":[{"requestPut":{"key":"a$b"}}]}'),
        # Wrong types and values, as golang/protobuf's jsonpb over encoding/json words them (jsonpb.py).
        ("/v3/kv/range", '{"key":"YQ==","limit":"x"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":true}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"1.5"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":1.5}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":[1]}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":{}}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"99999999999999999999"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":" 5"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"5 "}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"0x10"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"1e3"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":1e3}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":""}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"-"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"\\"5\\""}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"null"}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":-5}'),
        ("/v3/kv/range", '{"key":"YQ==","keys_only":"true"}'),
        ("/v3/kv/range", '{"key":"YQ==","keys_only":1}'),
        ("/v3/kv/range", '{"key":"YQ==","sort_order":"NOPE"}'),
        ("/v3/kv/range", '{"key":"YQ==","sort_order":"7"}'),
        ("/v3/kv/range", '{"key":"YQ==","sort_order":true}'),
        ("/v3/kv/range", '{"key":"YQ==","sort_order":1.5}'),
        ("/v3/kv/range", '{"key":"YQ==","sort_order":99999999999}'),
        ("/v3/kv/range", '{"key":"YQ==","serializable":null}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":null}'),
        ("/v3/kv/range", '{"key":["YQ=="]}'),
        ("/v3/kv/range", '{"key":[97,98]}'),
        ("/v3/kv/range", '{"key":[97,300]}'),
        ("/v3/kv/range", '{"key":[97,1.5]}'),
        ("/v3/kv/range", '{"key":"YQ"}'),
        ("/v3/kv/range", '{"key":"YQ="}'),
        ("/v3/kv/range", '{"key":"YQ==x"}'),
        ("/v3/kv/range", '{"key":"Y"}'),
        ("/v3/kv/range", '{"key":"YQ=\\n="}'),
        ("/v3/kv/range", '{"key":"Y==="}'),
        ("/v3/kv/range", '{"key":"YQ==\\r\\n"}'),
        ("/v3/kv/range", '{"key":"YWJj\\nZGVm"}'),
        ("/v3/kv/range", '{"key":"YWJ"}'),
        ("/v3/kv/range", '{"key":"YWJjZA="}'),
        ("/v3/kv/range", '{"key":"=YWJ"}'),
        ("/v3/kv/range", '{"key":"YW=="}'),
        ("/v3/kv/range", '{"key":""}'),
        ("/v3/kv/range", '{"key":"é"}'),
        ("/v3/kv/txn", '{"compare":"x"}'),
        ("/v3/kv/txn", '{"compare":[{"key":"YQ==","target":"NOPE"}]}'),
        ("/v3/kv/txn", '{"compare":[5]}'),
        ("/v3/kv/txn", '{"compare":[{"key":"YQ==","result":"EQUAL","target":"VERSION","version":"x"}]}'),
        ("/v3/kv/txn", '{"success":[{"request_put":{"key":"YQ==","value":5}}]}'),
        ("/v3/kv/txn", '{"success":{"request_put":{}}}'),
        ("/v3/kv/put", '{"key":"YQ==","value":"Yg==","lease":"abc"}'),
        ("/v3/kv/put", '{"key":"YQ==","value":"Yg==","prev_kv":"yes"}'),
        ("/v3/lease/grant", '{"TTL":"ten"}'),
        ("/v3/lease/revoke", '{"ID":"1.0"}'),
        ("/v3/cluster/member/remove", '{"ID":-1}'),
        ("/v3/cluster/member/remove", '{"ID":"-1"}'),
        ("/v3/cluster/member/add", '{"peerURLs":"http://x"}'),
        ("/v3/cluster/member/add", '{"peerURLs":[5]}'),
        ("/v3/cluster/member/add", '{"peerURLs":["http://127.0.0.1:1"],"isLearner":"true"}'),
        ("/v3/maintenance/alarm", '{"action":"NOPE"}'),
        ("/v3/maintenance/alarm", '{"action":"GET","alarm":"NOPE"}'),
        ("/v3/auth/role/grant", '{"name":"r","perm":{"permType":"NOPE"}}'),
        ("/v3/auth/role/grant", '{"name":"r","perm":"x"}'),
        ("/v3/watch", '{"create_request":{"key":"YQ==","filters":["NOPE"]}}'),
        ("/v3/watch", '{"create_request":{"key":"YQ==","filters":"NOPUT"}}'),
        ("/v3/watch", '{"create_request":{"key":"YQ==","start_revision":"x"}}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":NaN}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":01}'),
        ("/v3/kv/range", '{"key":"YQ==","limit":"01"}'),
        # A streaming call's first request that is not one: the decoder's error, gRPC code Unknown.
        ("/v3/watch", "{bad"),
        ("/v3/watch", "[1]"),
        ("/v3/watch", '{"create_request":{"key":5}}'),
        ("/v3/lease/keepalive", '{"ID":5'),
        ("/v3/lease/keepalive", '{"ID":"x"}'),
    ],
)
def test_errors(servers: Pair, path: str, body: str) -> None:
    same(servers, path, body)


@pytest.mark.pykine_engine
def test_auth_status_as_etcd_35_serves_it(servers: Pair) -> None:
    """etcd 3.5's route (3.4's gateway has none): the same answer as AuthStatus over gRPC."""
    status, content_type, body = post(servers.pykine, "/v3/auth/status", "{}")
    assert (status, content_type) == (200, "application/json")
    answer = json.loads(body)
    assert "enabled" not in answer and int(answer.get("authRevision", "0")) >= 0 and answer["header"]["revision"]


def test_wrong_http_method(servers: Pair) -> None:
    want = post(servers.etcd, "/v3/kv/range", b"", method="GET")
    got = post(servers.pykine, "/v3/kv/range", b"", method="GET")
    assert got[0] == want[0] == 405
    for method in ("GET", "PUT", "DELETE"):
        want = post(servers.etcd, "/v3/nope", b"", method=method)
        assert post(servers.pykine, "/v3/nope", b"", method=method) == want


def test_leases(servers: Pair) -> None:
    same(servers, "/v3/lease/grant", '{"TTL":"60","ID":"77"}')
    same(servers, "/v3/kv/put", '{"key":"bGVhc2Vk","value":"eA==","lease":"77"}')
    same(servers, "/v3/kv/lease/timetolive", '{"ID":77,"keys":true}', extra=("TTL",))
    same(servers, "/v3/lease/timetolive", '{"ID":"78"}')
    same(servers, "/v3/lease/leases", "{}")
    same(servers, "/v3/kv/lease/leases", "{}")
    same(servers, "/v3/lease/revoke", '{"ID":"77"}')
    same(servers, "/v3/kv/range", '{"key":"bGVhc2Vk"}')


def test_maintenance_and_cluster(servers: Pair) -> None:
    same(servers, "/v3/maintenance/alarm", "{}")
    same(servers, "/v3/maintenance/alarm", '{"action":"GET"}')
    same(servers, "/v3/maintenance/defragment", "{}")
    status = same(
        # What describes the server rather than the data differs by nature.
        servers,
        "/v3/maintenance/status",
        "{}",
        extra=("version", "dbSize", "dbSizeInUse", "leader", "raftIndex", "raftTerm", "raftAppliedIndex"),
    )
    assert status["header"]["revision"]
    members = same(servers, "/v3/cluster/member/list", "{}", extra=("members",))
    [member] = members["members"]
    # pykine lists itself; a passthrough lists the etcd behind it.
    listed = servers.pykine.endpoint if databases.BACKEND == "etcd" else f"http://{servers.pykine.address}"
    assert member["clientURLs"] == [listed]


def test_auth_with_the_authorization_header(servers: Pair) -> None:
    """etcd's gateway takes the token in Authorization, without "Bearer"."""
    same(servers, "/v3/auth/role/add", '{"name":"reader"}')
    same(servers, "/v3/auth/role/grant", '{"name":"reader","perm":{"permType":"READ","key":"Zm9v","range_end":"Zm9w"}}')
    same(servers, "/v3/auth/user/add", '{"name":"alice","password":"apw"}')
    same(servers, "/v3/auth/user/grant", '{"user":"alice","role":"reader"}')
    with auth_on(servers) as root:
        same(servers, "/v3/kv/range", '{"key":"Zm9v"}')  # no token: user name is empty
        same(servers, "/v3/kv/range", '{"key":"Zm9v"}', token=("garbage", "garbage"))
        same(servers, "/v3/kv/put", '{"key":"Zm9v","value":"eA=="}', token=root)
        same(servers, "/v3/auth/role/get", '{"role":"reader"}', token=root)
        same(servers, "/v3/auth/user/get", '{"name":"alice"}', token=root)
        same(servers, "/v3/auth/user/list", "{}", token=root)
        same(servers, "/v3/auth/role/list", "{}", token=root)
        alice = []
        for server in (servers.etcd, servers.pykine):
            alice.append(
                json.loads(post(server, "/v3/auth/authenticate", '{"name":"alice","password":"apw"}')[2])["token"]
            )
        same(servers, "/v3/kv/range", '{"key":"Zm9v"}', token=(alice[0], alice[1]))
        same(servers, "/v3/kv/put", '{"key":"Zm9v","value":"eA=="}', token=(alice[0], alice[1]))
        same(servers, "/v3/auth/role/revoke", '{"role":"reader","key":"Zm9v","range_end":"Zm9w"}', token=root)
        same(servers, "/v3/auth/user/revoke", '{"name":"alice","role":"reader"}', token=root)
        same(servers, "/v3/auth/user/changepw", '{"name":"alice","password":"new"}', token=root)
        same(servers, "/v3/auth/user/delete", '{"name":"alice"}', token=root)
        same(servers, "/v3/auth/role/delete", '{"role":"reader"}', token=root)


def test_watch_stream(servers: Pair) -> None:
    """Created, events with prev_kv, a NOPUT filter on a second watch of the stream, progress, one JSON line each."""
    body = (
        '{"create_request":{"key":"dy8=","range_end":"dzA=","prev_kv":true}}'
        '{"create_request":{"key":"dy8=","rangeEnd":"dzA=","filters":["NOPUT"],"watch_id":"7"}}'
    )
    streams = both_streams(servers, "/v3/watch", body)
    try:
        same_lines(streams, 2)  # both created
        same(servers, "/v3/kv/put", '{"key":"dy9h","value":"MQ=="}')
        same(servers, "/v3/kv/put", '{"key":"dy9h","value":"Mg=="}')
        same_lines(streams, 2)  # the two puts, for the first watch only
        same(servers, "/v3/kv/deleterange", '{"key":"dy9h"}')
        same_lines(streams, 2, unordered=True)  # the delete, for both
    finally:
        for stream in streams:
            stream.close()


def test_watch_from_the_past(servers: Pair) -> None:
    first = same(servers, "/v3/kv/put", '{"key":"cC9h","value":"MQ=="}')["header"]["revision"]
    same(servers, "/v3/kv/put", '{"key":"cC9i","value":"Mg=="}')
    body = json.dumps({"create_request": {"key": "cC8=", "range_end": "cDA=", "start_revision": first}})
    streams = both_streams(servers, "/v3/watch", body)
    try:
        same_lines(streams, 2)  # created, then both past events in one response
    finally:
        for stream in streams:
            stream.close()


def test_watch_progress(servers: Pair) -> None:
    """A progress request on a synced stream (etcd 3.4 also answers one at once while catching up;
    pykine, like etcd 3.5, only once every watcher has been sent what precedes it)."""
    streams = both_streams(servers, "/v3/watch", '{"create_request":{"key":"cHI="}}{"progress_request":{}}')
    try:
        same_lines(streams, 2)  # created, progress (watch_id -1)
    finally:
        for stream in streams:
            stream.close()


def test_stream_ignores_requests_after_a_bad_one(servers: Pair) -> None:
    """grpc-gateway stops reading a stream's requests at the first bad one, and keeps the stream."""
    same(servers, "/v3/lease/grant", '{"TTL":"60","ID":"97"}')
    streams = both_streams(servers, "/v3/lease/keepalive", '{"ID":"97"} {"ID":x} {"ID":"97"}')
    try:
        same_lines(streams, 1)
        assert [stream.answer.readline() for stream in streams] == [b"", b""]  # ended with the good request
    finally:
        for stream in streams:
            stream.close()
    streams = both_streams(servers, "/v3/watch", '{"create_request":{"key":"Yg=="}} {"nope" {"create_request":{}}')
    try:
        same_lines(streams, 1)  # created; the watch stays
        same(servers, "/v3/kv/put", '{"key":"Yg==","value":"MQ=="}')
        same_lines(streams, 1)
    finally:
        for stream in streams:
            stream.close()
    same(servers, "/v3/lease/revoke", '{"ID":"97"}')


def test_keepalive_stream(servers: Pair) -> None:
    same(servers, "/v3/lease/grant", '{"TTL":"60","ID":"99"}')
    for path in ("/v3/lease/keepalive", "/v3beta/lease/keepalive"):
        streams = both_streams(servers, path, '{"ID":"99"}{"ID":"99"}{"ID":"98"}')
        try:
            same_lines(streams, 3)
            assert [stream.answer.readline() for stream in streams] == [b"", b""]  # ended with the requests
        finally:
            for stream in streams:
                stream.close()
    same(servers, "/v3/lease/revoke", '{"ID":"99"}')


@pytest.mark.parametrize("size", [1_400_000, 1_600_000, 2_200_000, 5_000_000])
def test_oversized_requests(servers: Pair, size: int) -> None:
    """Up to 1.5 MiB a put is served; past it etcd refuses it; past gRPC's 2 MiB the gRPC limit's words answer."""
    value = base64.b64encode(b"x" * size).decode()
    same(servers, "/v3/kv/put", json.dumps({"key": "YmlnCg==", "value": value}))
    same(servers, "/v3/kv/deleterange", '{"key":"YmlnCg=="}')


def test_body_past_the_http_limit(servers: Pair) -> None:
    """etcd reads any body; pykine stops at 8 times the gRPC limit, answers 413 and closes (its clients see
    a reset connection if they are still sending), and goes on serving everyone else."""
    host, port = servers.pykine.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        sock.sendall(b"x" * (8 * MAX_RECEIVE_BYTES + 1))  # all of it is read: the close is clean
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    same(servers, "/v3/kv/range", '{"key":"YmlnCg=="}')
