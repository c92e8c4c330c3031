"""etcd's JSON gateway on the client port: the v3 API as JSON over HTTP, as etcd 3.4 serves it.

etcd 3.4 serves a grpc-gateway (v1) translation of its gRPC services under
`/v3/` (and `/v3beta/`): POST a JSON request to `/v3/kv/range` and get the
RangeResponse back as JSON. Patroni, tooz/etcd3gw, APISIX and curl users talk
only to that. Here each route calls the same servicer method the gRPC
transport calls, with a `GatewayCall` standing in for the gRPC call (headers,
peer), so the two can never disagree.

JSON as grpc-gateway writes it: proto field names, int64 as strings, bytes as
base64, enums by name, zero values left out, compact, with Go's escaping of
<, > and &. Requests may use proto or camelCase names; unknown fields are
ignored. Errors: `{"error","message","code"}` with grpc-gateway's HTTP status
for the gRPC code. The token travels in the `Authorization` header.

Streaming calls (`watch`, `lease/keepalive`) take a body of one or more JSON
requests and answer with one `{"result":…}` line per message, sent as it
happens (chunked). A watch stays open after the requests end, until the
client goes; a keep-alive stream ends with its requests, as over gRPC.

To send more requests on an open stream, a client upgrades the route to a
WebSocket, as etcd's websocket proxy allows: the messages it sends form the
request stream (one JSON value may span messages, one message may hold
several), and each answer comes back as one text message. As in etcd, a bad
first request is answered with an error and the end of the stream; a bad
later one ends only the requests. etcd's proxy forwards no token (it turns
`Sec-WebSocket-Protocol: Bearer, <token>` into `Authorization: Bearer
<token>`, which etcd refuses), so auth cannot work there; pykine takes the
token from the `Authorization` header, that subprotocol, or a `token` cookie.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from pykine.services import gojson, jsonpb
from pykine.services.encode import Encoded
from pykine.transport.grpc import RpcError, Status, too_large
from pykine.transport.http1 import Handler, HttpRequest, HttpResponse, Peer, Router, WebSocketHandler, text_response
from pykine.transport.websocket import WebSocket
from pykine.wire import rpc_pb2

PREFIXES = ("/v3/", "/v3beta/")

# (path under the prefix, service, method); etcd 3.4's gateway paths, aliases included.
ROUTES: list[tuple[str, str, str]] = [
    ("kv/range", "KV", "Range"),
    ("kv/put", "KV", "Put"),
    ("kv/deleterange", "KV", "DeleteRange"),
    ("kv/txn", "KV", "Txn"),
    ("kv/compaction", "KV", "Compact"),
    ("lease/grant", "Lease", "LeaseGrant"),
    ("lease/revoke", "Lease", "LeaseRevoke"),
    ("kv/lease/revoke", "Lease", "LeaseRevoke"),
    ("lease/timetolive", "Lease", "LeaseTimeToLive"),
    ("kv/lease/timetolive", "Lease", "LeaseTimeToLive"),
    ("lease/leases", "Lease", "LeaseLeases"),
    ("kv/lease/leases", "Lease", "LeaseLeases"),
    ("maintenance/alarm", "Maintenance", "Alarm"),
    ("maintenance/status", "Maintenance", "Status"),
    ("maintenance/defragment", "Maintenance", "Defragment"),
    ("maintenance/hash", "Maintenance", "Hash"),
    ("maintenance/transfer-leadership", "Maintenance", "MoveLeader"),
    ("cluster/member/add", "Cluster", "MemberAdd"),
    ("cluster/member/remove", "Cluster", "MemberRemove"),
    ("cluster/member/update", "Cluster", "MemberUpdate"),
    ("cluster/member/list", "Cluster", "MemberList"),
    ("cluster/member/promote", "Cluster", "MemberPromote"),
    ("auth/enable", "Auth", "AuthEnable"),
    ("auth/disable", "Auth", "AuthDisable"),
    ("auth/status", "Auth", "AuthStatus"),  # etcd 3.5's (3.4's gateway has none)
    ("auth/authenticate", "Auth", "Authenticate"),
    ("auth/user/add", "Auth", "UserAdd"),
    ("auth/user/get", "Auth", "UserGet"),
    ("auth/user/list", "Auth", "UserList"),
    ("auth/user/delete", "Auth", "UserDelete"),
    ("auth/user/changepw", "Auth", "UserChangePassword"),
    ("auth/user/grant", "Auth", "UserGrantRole"),
    ("auth/user/revoke", "Auth", "UserRevokeRole"),
    ("auth/role/add", "Auth", "RoleAdd"),
    ("auth/role/get", "Auth", "RoleGet"),
    ("auth/role/list", "Auth", "RoleList"),
    ("auth/role/delete", "Auth", "RoleDelete"),
    ("auth/role/grant", "Auth", "RoleGrantPermission"),
    ("auth/role/revoke", "Auth", "RoleRevokePermission"),
]

# grpc-gateway v1's HTTP status for each gRPC code.
HTTP_STATUS = {
    Status.OK: 200,
    Status.CANCELLED: 408,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.UNAUTHENTICATED: 401,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 412,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 501,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
}
JSON = "application/json"
# What grpc-gateway adds to a successful answer.
SUCCESS_HEADERS = [("Grpc-Metadata-Content-Type", "application/grpc")]


class GatewayCall:
    """What a servicer may ask of its call, answered from the HTTP request."""

    def __init__(self, request: HttpRequest, token: str | None = None) -> None:
        self._headers = request.headers
        self._token = token
        self.peer: Peer = request.peer

    def header(self, *names: bytes) -> str | None:
        """gRPC metadata the gateway forwards: the `Authorization` header is etcd's token."""
        if self._token is not None and (b"token" in names or b"authorization" in names):
            return self._token
        wanted = {b"authorization" if name == b"token" else name for name in names}
        for name, value in self._headers:
            if name.lower() in wanted:
                return value.decode("latin-1")
        return None

    @property
    def metadata(self) -> dict[str, str | bytes]:
        """The gRPC metadata etcd's gateway would pass on: the token."""
        token = self.header(b"token")
        return {"token": token} if token is not None else {}


def websocket_token(request: HttpRequest) -> str | None:
    """A WebSocket client's token: the `Authorization` header, a `Bearer, <token>` subprotocol, or a `token` cookie."""
    found: dict[bytes, str] = {}
    for name, value in request.headers:
        found.setdefault(name.lower(), value.decode("latin-1"))
    if token := found.get(b"authorization"):
        return token
    protocol, _, token = found.get(b"sec-websocket-protocol", "").partition("Bearer,")
    if token.strip() and not protocol.strip():
        return token.strip()
    for cookie in found.get(b"cookie", "").split(";"):
        name, _, value = cookie.strip().partition("=")
        if name == "token" and value:
            return value
    return None


def to_json(message: Message) -> bytes:
    """grpc-gateway's JSON: proto names, no zero values, compact, Go's HTML-safe escaping."""
    return jsonpb.encode(message)


def error_response(status: Status, message: str) -> HttpResponse:
    body = json.dumps({"error": message, "message": message, "code": int(status)}, separators=(",", ":"))
    return HttpResponse(HTTP_STATUS.get(status, 500), body.encode(), content_type=JSON)


def parse_request(body: bytes, message: Message) -> str | None:
    """Fill `message` from JSON (proto or camelCase names, unknown fields ignored); the error, if any.

    Errors carry the texts Go gives, as etcd's gateway returns them (gojson.py, jsonpb.py).
    """
    text = body.decode("utf-8", "replace")  # Go takes invalid UTF-8 in strings as U+FFFD
    if not text.strip():
        return None  # an empty body is an empty request, as with grpc-gateway
    try:
        document = jsonpb.DECODER.raw_decode(text.lstrip())[0]
    except ValueError:
        # Only bad input pays for finding the error the way Go does.
        return gojson.syntax_error(text) or "invalid JSON"
    return jsonpb.fill(document, message)


def route(
    method: Callable[[Any, Any], Awaitable[Any]], request_class: type[Message], response_class: Any, max_message: int
) -> Handler:
    async def handle(request: HttpRequest) -> HttpResponse:
        message = request_class()
        problem = parse_request(request.body, message)
        if problem is not None:
            return error_response(Status.INVALID_ARGUMENT, problem)
        return await unary_call(method, message, GatewayCall(request), response_class, max_message)

    return handle


async def unary_call(
    method: Callable[[Any, Any], Awaitable[Any]],
    message: Message,
    call: GatewayCall,
    response_class: Any,
    max_message: int,
) -> HttpResponse:
    size = message.ByteSize()
    if size > max_message:  # etcd's gateway passes the request on over gRPC, whose limit then answers
        return error_response(Status.RESOURCE_EXHAUSTED, too_large(size, max_message))
    try:
        response = await method(message, call)
    except RpcError as error:
        return error_response(error.status, error.message)
    if isinstance(response, Encoded):  # KV.Range answers pre-encoded bytes for gRPC
        response = response_class.FromString(bytes(response))
    return HttpResponse(200, to_json(response), content_type=JSON, headers=list(SUCCESS_HEADERS))


# Streaming routes: (path, service, method).
STREAM_ROUTES: list[tuple[str, str, str]] = [
    ("watch", "Watch", "Watch"),
    ("lease/keepalive", "Lease", "LeaseKeepAlive"),
]


class RequestReader:
    """Requests read one JSON value at a time from arriving bytes, as Go's json.Decoder reads a stream."""

    def __init__(self, chunks: AsyncIterator[bytes], request_class: type[Message]) -> None:
        self._chunks = chunks
        self._request_class = request_class
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""
        self._ended = False

    async def next(self) -> Message | None:
        """The next request, or None once the input ends; ValueError (Go's words) for a bad one."""
        while True:
            text = self._text = self._text.lstrip()
            if text:
                end = gojson.value_end(text)
                complete = isinstance(end, int) and (end < len(text) or self._ended or text[0] in '{["tfn')
                if complete:
                    assert isinstance(end, int)
                    self._text = text[end:]
                    message = self._request_class()
                    problem = jsonpb.fill(jsonpb.DECODER.decode(text[:end]), message)
                    if problem is not None:
                        raise ValueError(problem)
                    return message
                if isinstance(end, str) and (end != "unexpected EOF" or self._ended):
                    raise ValueError(end)
            elif self._ended:
                return None
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._text += self._utf8.decode(b"", final=True)
                self._ended = True
            else:
                self._text += self._utf8.decode(chunk)

    async def rest(self, first: Message) -> AsyncIterator[Message]:
        """`first`, then the requests after it, up to the end or the first bad one (which etcd ignores)."""
        yield first
        while True:
            try:
                message = await self.next()
            except ValueError:
                return
            if message is None:
                return
            yield message


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _lines(socket: WebSocket) -> AsyncIterator[bytes]:
    """A WebSocket's messages as the request body etcd's websocket proxy makes of them."""
    async for message in socket.messages():
        yield message + b"\n"


async def _no_requests() -> AsyncIterator[Message]:
    return
    yield


async def _results(responses: Any, response_class: Any) -> AsyncIterator[bytes]:
    """A streaming call's answers, one `{"result":…}` JSON line each, or the error that ended it."""
    try:
        async for response in responses:
            if isinstance(response, Encoded):  # a passthrough forwards etcd's bytes
                response = response_class.FromString(bytes(response))
            yield b'{"result":' + to_json(response) + b"}\n"
    except RpcError as error:
        yield stream_error(error) + b"\n"
    finally:
        await responses.aclose()


async def open_stream(
    reader: RequestReader, method: Callable[[Any, Any], Any], call: GatewayCall, response_class: Any
) -> Any:
    """The call's answers as JSON lines, or the error response for a first request that is not one."""
    try:
        first = await reader.next()
    except ValueError as problem:
        # grpc-gateway passes the decoder's error on as it is: gRPC code Unknown.
        return error_response(Status.UNKNOWN, str(problem))
    requests = _no_requests() if first is None else reader.rest(first)
    return _results(method(requests, call), response_class)


def stream_route(method: Callable[[Any, Any], Any], request_class: type[Message], response_class: Any) -> Handler:
    async def handle(request: HttpRequest) -> HttpResponse:
        reader = RequestReader(_one(request.body), request_class)
        answers = await open_stream(reader, method, GatewayCall(request), response_class)
        if isinstance(answers, HttpResponse):
            return answers
        return HttpResponse(200, answers, content_type=JSON, headers=list(SUCCESS_HEADERS))

    return handle


def stream_socket(
    method: Callable[[Any, Any], Any], request_class: type[Message], response_class: Any
) -> WebSocketHandler:
    """A streaming route over a WebSocket: requests as messages, each answer a text message."""

    async def handle(request: HttpRequest, socket: WebSocket) -> None:
        reader = RequestReader(_lines(socket), request_class)
        answers = await open_stream(reader, method, GatewayCall(request, websocket_token(request)), response_class)
        if isinstance(answers, HttpResponse):
            assert isinstance(answers.body, bytes)
            await socket.send(answers.body)
            return
        async for line in answers:
            await socket.send(line[:-1])

    return handle


def unary_socket(
    method: Callable[[Any, Any], Awaitable[Any]], request_class: type[Message], response_class: Any, max_message: int
) -> WebSocketHandler:
    """A unary route over a WebSocket, as etcd's proxy serves it: the first message's answer, then goodbye."""

    async def handle(request: HttpRequest, socket: WebSocket) -> None:
        try:
            message = await RequestReader(_lines(socket), request_class).next()
        except ValueError as problem:
            response = error_response(Status.INVALID_ARGUMENT, str(problem))
        else:
            if message is None:
                return
            call = GatewayCall(request, websocket_token(request))
            response = await unary_call(method, message, call, response_class, max_message)
        assert isinstance(response.body, bytes)
        await socket.send(response.body)

    return handle


def stream_error(error: RpcError) -> bytes:
    """grpc-gateway's error object inside a stream."""
    status = HTTP_STATUS.get(error.status, 500)
    document = {
        "error": {
            "grpc_code": int(error.status),
            "http_code": status,
            "message": error.message,
            "http_status": HTTPStatus(status).phrase,
        }
    }
    return json.dumps(document, separators=(",", ":")).encode()


async def _not_found(request: HttpRequest) -> HttpResponse:
    """grpc-gateway's answer for a path under /v3/ it has no route for."""
    response = text_response(404, "Not Found")
    response.headers.append(("X-Content-Type-Options", "nosniff"))
    return response


def common_name_guard(auth_enabled: Callable[[], bool]) -> Callable[[HttpRequest], HttpResponse | None]:
    """etcd refuses gateway requests from a client certificate with a CommonName while auth is on.

    Over gRPC that name is the user; etcd's gateway calls its own gRPC server,
    so the name would be lost, and it says so rather than serve the request as
    nobody (and pykine rather than as the named user, unlike etcd).
    """

    def guard(request: HttpRequest) -> HttpResponse | None:
        if request.peer.common_name and auth_enabled():
            response = text_response(400, COMMON_NAME_REFUSAL)
            response.headers.append(("X-Content-Type-Options", "nosniff"))
            return response
        return None

    return guard


COMMON_NAME_REFUSAL = "CommonName of client sending a request against gateway will be ignored and not used as expected"


def add_gateway_routes(
    router: Router, servicers: dict[str, object], max_message: int, auth_enabled: Callable[[], bool]
) -> None:
    """Every route etcd's gateway has, onto the servicers the gRPC transport serves.

    `max_message` is the gRPC transport's limit on a request, which etcd's gateway requests meet too;
    `auth_enabled` tells whether auth is on now.
    """
    guard = common_name_guard(auth_enabled)
    for prefix in PREFIXES:
        router.add_guard(prefix, guard)
        router.add(("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"), prefix, _not_found, prefix=True)
    services: dict[str, ServiceDescriptor] = dict(rpc_pb2.DESCRIPTOR.services_by_name)
    for path, service, name in ROUTES:
        servicer = servicers.get(service)
        implementation = getattr(servicer, name, None)
        if implementation is None:
            continue
        descriptor = services[service].methods_by_name[name]
        request_class = GetMessageClass(descriptor.input_type)
        response_class = GetMessageClass(descriptor.output_type)
        handler = route(implementation, request_class, response_class, max_message)
        socket_handler = unary_socket(implementation, request_class, response_class, max_message)
        for prefix in PREFIXES:
            router.add("POST", prefix + path, handler)
            router.add_websocket(prefix + path, socket_handler)
    for path, service, name in STREAM_ROUTES:
        implementation = getattr(servicers.get(service), name, None)
        if implementation is None:
            continue
        descriptor = services[service].methods_by_name[name]
        request_class = GetMessageClass(descriptor.input_type)
        response_class = GetMessageClass(descriptor.output_type)
        streaming = stream_route(implementation, request_class, response_class)
        socket_handler = stream_socket(implementation, request_class, response_class)
        for prefix in PREFIXES:
            router.add("POST", prefix + path, streaming)
            router.add_websocket(prefix + path, socket_handler)
