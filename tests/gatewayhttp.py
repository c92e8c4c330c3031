"""HTTP helpers for the JSON gateway tests: one request to real etcd and to pykine, answers compared."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


@contextmanager
def auth_on(servers: Pair) -> Iterator[tuple[str, str]]:
    """Auth on for both servers with a root user: root's tokens (etcd's, pykine's). Off again afterwards."""
    same(servers, "/v3/auth/user/add", '{"name":"root","password":"pw"}')
    same(servers, "/v3/auth/user/grant", '{"user":"root","role":"root"}')
    same(servers, "/v3/auth/enable", "{}")
    try:
        tokens = []
        for server in (servers.etcd, servers.pykine):
            status, _, body = post(server, "/v3/auth/authenticate", '{"name":"root","password":"pw"}')
            assert status == 200, body
            tokens.append(json.loads(body)["token"])
        yield tokens[0], tokens[1]
    finally:
        for server in (servers.etcd, servers.pykine):
            status, _, body = post(server, "/v3/auth/authenticate", '{"name":"root","password":"pw"}')
            if status == 200:
                post(server, "/v3/auth/disable", "{}", token=json.loads(body)["token"])
            post(server, "/v3/auth/user/delete", '{"name":"root"}')
