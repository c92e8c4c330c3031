"""The JSON gateway against etcd 3.4's: the same HTTP requests to both, the same answers.

Bodies are compared as JSON after blanking what must differ (cluster and
member ids, raft term); status codes and content types must match exactly.
Requests go in both spellings grpc-gateway accepts (proto names and
camelCase).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from harness import Pair, Server

IDS = ("cluster_id", "member_id", "raft_term")


def post(server: Server, path: str, body: str | bytes, token: str | None = None, method: str = "POST") -> Any:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(f"http://{server.address}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", token)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.headers.get("Content-Type"), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type"), error.read()


def blank(document: Any, extra: tuple[str, ...] = ()) -> Any:
    """The document with ids (and `extra` fields) blanked, wherever they appear."""
    if isinstance(document, dict):
        return {key: ("*" if key in IDS + extra else blank(value, extra)) for key, value in document.items()}
    if isinstance(document, list):
        return [blank(item, extra) for item in document]
    return document


def same(servers: Pair, path: str, body: str, extra: tuple[str, ...] = (), token: tuple[str, str] | None = None) -> Any:
    """One request to both gateways; the answers must agree. Returns pykine's document."""
    want = post(servers.etcd, path, body, token[0] if token else None)
    got = post(servers.pykine, path, body, token[1] if token else None)
    assert (got[0], got[1]) == (want[0], want[1]), f"{path} {body}: etcd {want}, pykine {got}"
    if want[1] == "application/json":
        expected, actual = blank(json.loads(want[2]), extra), blank(json.loads(got[2]), extra)
        assert actual == expected, f"{path} {body}\n--- etcd: {want[2]!r}\n--- pykine: {got[2]!r}"
        return json.loads(got[2])
    assert got[2] == want[2], f"{path}: etcd {want[2]!r}, pykine {got[2]!r}"
    return None


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
    ],
)
def test_errors(servers: Pair, path: str, body: str) -> None:
    same(servers, path, body)


def test_wrong_http_method(servers: Pair) -> None:
    want = post(servers.etcd, "/v3/kv/range", b"", method="GET")
    got = post(servers.pykine, "/v3/kv/range", b"", method="GET")
    assert got[0] == want[0] == 405


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
    assert member["clientURLs"] == [f"http://{servers.pykine.address}"]


def test_auth_with_the_authorization_header(servers: Pair) -> None:
    """etcd's gateway takes the token in Authorization, without "Bearer"."""
    same(servers, "/v3/auth/user/add", '{"name":"root","password":"pw"}')
    same(servers, "/v3/auth/user/grant", '{"user":"root","role":"root"}')
    same(servers, "/v3/auth/role/add", '{"name":"reader"}')
    same(servers, "/v3/auth/role/grant", '{"name":"reader","perm":{"permType":"READ","key":"Zm9v","range_end":"Zm9w"}}')
    same(servers, "/v3/auth/user/add", '{"name":"alice","password":"apw"}')
    same(servers, "/v3/auth/user/grant", '{"user":"alice","role":"reader"}')
    same(servers, "/v3/auth/enable", "{}")
    try:
        tokens = []
        for server in (servers.etcd, servers.pykine):
            status, _, body = post(server, "/v3/auth/authenticate", '{"name":"root","password":"pw"}')
            assert status == 200, body
            tokens.append(json.loads(body)["token"])
        root = (tokens[0], tokens[1])
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
    finally:
        for server in (servers.etcd, servers.pykine):
            status, _, body = post(server, "/v3/auth/authenticate", '{"name":"root","password":"pw"}')
            if status == 200:
                post(server, "/v3/auth/disable", "{}", token=json.loads(body)["token"])
            post(server, "/v3/auth/user/delete", '{"name":"root"}')


class Stream:
    """A streaming gateway call: its answer lines, read as they come."""

    def __init__(self, server: Server, path: str, body: str) -> None:
        request = urllib.request.Request(f"http://{server.address}{path}", data=body.encode(), method="POST")
        self.answer = urllib.request.urlopen(request, timeout=30)

    def lines(self, count: int) -> list[Any]:
        return [json.loads(self.answer.readline()) for _ in range(count)]

    def close(self) -> None:
        self.answer.close()


def both_streams(servers: Pair, path: str, body: str) -> tuple[Stream, Stream]:
    return Stream(servers.etcd, path, body), Stream(servers.pykine, path, body)


def same_lines(streams: tuple[Stream, Stream], count: int, unordered: bool = False) -> None:
    """The next `count` lines agree; `unordered`: as sets (one event reaching several watchers of a
    stream comes in one response per watcher, in an order etcd does not fix)."""
    want, got = ([blank(line) for line in stream.lines(count)] for stream in streams)
    if unordered:
        want, got = (sorted(lines, key=lambda line: json.dumps(line, sort_keys=True)) for lines in (want, got))
    assert got == want, f"\n--- etcd: {want}\n--- pykine: {got}"


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
