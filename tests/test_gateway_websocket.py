"""Watch and keep-alive streams over a WebSocket, against etcd 3.4's websocket proxy.

etcd's gateway answers a streaming call's HTTP body only once it has read all
of it, so a client that wants to add or cancel watches on an open stream
upgrades to a WebSocket: each message it sends joins the request stream, and
each answer comes back as a text message. The same messages go to etcd and
to pykine; the answers must agree once ids are blanked.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from gatewayhttp import auth_on, blank, same
from harness import Pair, Server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def create(key: str, **options: Any) -> str:
    return json.dumps({"create_request": {"key": b64(key), **options}})


class Pairing:
    """One WebSocket to each server on the same path; what is sent goes to both."""

    def __init__(self, sockets: tuple[ClientConnection, ClientConnection]) -> None:
        self.sockets = sockets

    def send(self, message: str) -> None:
        for ws in self.sockets:
            ws.send(message)

    def answers(self, count: int, unordered: bool = False) -> list[Any]:
        """The next `count` messages from both, which must agree; pykine's."""
        want, got = ([blank(json.loads(ws.recv(timeout=10))) for _ in range(count)] for ws in self.sockets)
        if unordered:
            want, got = (sorted(items, key=lambda item: json.dumps(item, sort_keys=True)) for items in (want, got))
        assert got == want, f"\n--- etcd: {want}\n--- pykine: {got}"
        return got

    def quiet(self) -> None:
        """Neither server has anything more to say just now."""
        for ws in self.sockets:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)

    def ended(self) -> None:
        """Both servers ended the WebSocket (etcd drops the connection; pykine says goodbye first)."""
        for ws in self.sockets:
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)


@contextmanager
def paired(servers: Pair, path: str, **options: Any) -> Iterator[Pairing]:
    with ExitStack() as stack:
        sockets = tuple(
            stack.enter_context(connect(f"ws://{server.address}{path}", open_timeout=10, **options))
            for server in (servers.etcd, servers.pykine)
        )
        yield Pairing(sockets)  # type: ignore[arg-type]


def put(servers: Pair, key: str, value: str) -> None:
    same(servers, "/v3/kv/put", json.dumps({"key": b64(key), "value": b64(value)}))


def test_watches_added_and_cancelled_on_an_open_stream(servers: Pair) -> None:
    with paired(servers, "/v3/watch") as both:
        both.send(create("ws/a", prev_kv=True))
        both.answers(1)  # created, watch 0
        put(servers, "ws/a", "1")
        put(servers, "ws/a", "2")
        events = both.answers(2)
        assert [answer["result"]["events"][0]["kv"]["value"] for answer in events] == [b64("1"), b64("2")]
        assert events[1]["result"]["events"][0]["prev_kv"]["value"] == b64("1")
        both.send('{"create_request":')  # one request may span messages ...
        both.send('{"key":"' + b64("ws/b") + '"}}')
        both.answers(1)  # created, watch 1
        both.send(create("ws/c") + " " + create("ws/d", filters=["NOPUT"]))  # ... and one message hold two
        both.answers(2)  # created, watches 2 and 3
        both.send('{"cancel_request":{"watch_id":"0"}}')
        assert both.answers(1)[0]["result"]["canceled"] is True
        put(servers, "ws/a", "3")  # watch 0 is gone
        put(servers, "ws/b", "1")
        put(servers, "ws/d", "1")  # filtered out
        assert both.answers(1)[0]["result"]["watch_id"] == "1"
        both.send('{"progressRequest":{}}')
        assert both.answers(1)[0]["result"]["watch_id"] == "-1"
        both.quiet()


def test_a_bad_request_ends_only_the_requests(servers: Pair) -> None:
    """After a request that is not JSON, etcd reads no more requests but keeps the watches."""
    with paired(servers, "/v3/watch") as both:
        both.send(create("wsbad/a"))
        both.answers(1)
        both.send("{bad")
        both.send(create("wsbad/b"))  # never read
        put(servers, "wsbad/b", "1")
        put(servers, "wsbad/a", "1")
        assert both.answers(1)[0]["result"]["events"][0]["kv"]["key"] == b64("wsbad/a")
        both.quiet()


@pytest.mark.parametrize("first", ["{bad", "[1]", '{"create_request":{"key":5}}', "{}x"])
def test_a_bad_first_request_is_an_error(servers: Pair, first: str) -> None:
    with paired(servers, "/v3/watch") as both:
        both.send(first)
        if first == "{}x":  # an empty request first (a watch of nothing); the rest is not JSON
            both.quiet()
            return
        error = both.answers(1)[0]
        assert error["code"] == 2 and error["message"] == error["error"]
        both.ended()


def test_keepalives_on_one_socket(servers: Pair) -> None:
    same(servers, "/v3/lease/grant", '{"TTL":"60","ID":"4242"}')
    try:
        with paired(servers, "/v3/lease/keepalive") as both:
            both.send('{"ID":"4242"}')
            assert both.answers(1)[0]["result"]["TTL"] == "60"
            both.send('{"ID":"4242"}{"ID":"4243"}')
            assert [answer["result"].get("TTL") for answer in both.answers(2)] == ["60", None]
            both.quiet()
    finally:
        same(servers, "/v3/lease/revoke", '{"ID":"4242"}')


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v3/kv/put", json.dumps({"key": b64("wsu"), "value": b64("v")})),
        ("/v3/kv/range", json.dumps({"key": b64("wsu")})),
        ("/v3beta/kv/range", json.dumps({"key": b64("wsu")})),
        ("/v3/kv/put", "{}"),
        ("/v3/kv/range", "{bad"),
        ("/v3/kv/deleterange", json.dumps({"key": b64("wsu")})),
    ],
)
def test_unary_call_over_a_websocket(servers: Pair, path: str, message: str) -> None:
    """etcd's proxy serves every gateway route: one message in, its answer out, and the socket ends."""
    with paired(servers, path) as both:
        both.send(message)
        both.answers(1)
        both.ended()


def raw_upgrade(server: Server, path: str, headers: dict[str, str], method: str = "GET") -> tuple[int, Any, bytes]:
    """An upgrade request by hand: the status, the answer's headers but its Date, the body."""
    host, port = server.address.rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {server.address}", "Connection: Upgrade", "Upgrade: websocket"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        length = int(fields.get("Content-Length", "0"))
        while len(body) < length:
            body += sock.recv(65536)
    fields.pop("Date")
    return int(head.split()[1]), sorted(fields.items()), body


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {"Sec-WebSocket-Version": "13"}),  # no key
        ("GET", {"Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}),
        ("GET", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}),  # no version
        ("POST", {"Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}),
    ],
)
def test_bad_handshakes(servers: Pair, method: str, headers: dict[str, str]) -> None:
    want = raw_upgrade(servers.etcd, "/v3/watch", headers, method)
    got = raw_upgrade(servers.pykine, "/v3/watch", headers, method)
    assert got == want
    assert want[0] in (400, 405)


def test_a_token_reaches_pykine_over_a_websocket(servers: Pair) -> None:
    """etcd's proxy forwards no usable token, so with auth on its WebSocket streams are refused.

    pykine takes the token from the upgrade's Authorization header, a `Bearer, <token>` subprotocol or
    a `token` cookie; without one, both refuse alike.
    """
    with auth_on(servers) as tokens:
        with paired(servers, "/v3/watch") as both:
            both.send(create("wsauth"))
            refusal = both.answers(1)[0]["result"]
            assert refusal["canceled"] is True and "user name is empty" in refusal["cancel_reason"]
        ways: list[tuple[str, dict[str, Any]]] = []
        for token in tokens:
            ways.append(("Authorization", {"additional_headers": {"Authorization": token}}))
            ways.append(("subprotocol", {"subprotocols": ["Bearer", token]}))
            ways.append(("cookie", {"additional_headers": {"Cookie": f"token={token}"}}))
        for index, (way, options) in enumerate(ways):
            server = servers.etcd if index < 3 else servers.pykine
            with connect(f"ws://{server.address}/v3/watch", open_timeout=10, **options) as ws:
                ws.send(create("wsauth"))
                answer = json.loads(ws.recv(timeout=10))["result"]
                if server is servers.etcd:
                    assert answer["canceled"] is True, (way, answer)
                else:
                    assert answer.get("canceled") is None and answer["created"] is True, (way, answer)


def test_fragments_binary_messages_and_pings(servers: Pair) -> None:
    """A request in fragments or in a binary message reads as any other; a ping gets its pong."""
    with paired(servers, "/v3/watch") as both:
        for ws in both.sockets:
            assert ws.ping(b"hello").wait(10)
            ws.send(['{"create_request":', '{"key":"' + b64("wsf/a") + '"}}'])  # one message in two fragments
        both.answers(1)
        both.send(create("wsf/b").encode())  # type: ignore[arg-type]  # a binary message
        both.answers(1)
        put(servers, "wsf/b", "1")
        assert both.answers(1)[0]["result"]["watch_id"] == "1"


def test_a_message_past_the_limit_closes_the_socket(servers: Pair) -> None:
    """etcd reads messages of any size; pykine stops at its HTTP body limit with close code 1009."""
    with connect(f"ws://{servers.pykine.address}/v3/watch", open_timeout=10, max_size=None) as ws:
        ws.send(b"x" * ((16 << 20) + 1))  # one byte past the limit: all of it is read, the close is clean
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    same(servers, "/v3/kv/range", json.dumps({"key": b64("wsbig")}))
