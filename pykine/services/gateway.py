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
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from pykine.services import gojson
from pykine.services.encode import Encoded
from pykine.transport.grpc import RpcError, Status
from pykine.transport.http1 import HttpRequest, HttpResponse, Peer, Router
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

    def __init__(self, request: HttpRequest) -> None:
        self._headers = request.headers
        self.peer: Peer = request.peer

    def header(self, *names: bytes) -> str | None:
        """gRPC metadata the gateway forwards: the `Authorization` header is etcd's token."""
        wanted = {b"authorization" if name == b"token" else name for name in names}
        for name, value in self._headers:
            if name.lower() in wanted:
                return value.decode("latin-1")
        return None


def to_json(message: Message) -> bytes:
    """grpc-gateway's JSON: proto names, no zero values, compact, Go's HTML-safe escaping."""
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def error_response(status: Status, message: str) -> HttpResponse:
    body = json.dumps({"error": message, "message": message, "code": int(status)}, separators=(",", ":"))
    return HttpResponse(HTTP_STATUS.get(status, 500), body.encode(), content_type=JSON)


def parse_request(body: bytes, message: Message) -> str | None:
    """Fill `message` from JSON (proto or camelCase names, unknown fields ignored); the error, if any.

    Errors carry the texts Go gives, as etcd's gateway returns them (gojson.py).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid character in string literal"
    if not text.strip():
        return None  # an empty body is an empty request, as with grpc-gateway
    try:
        document = json.JSONDecoder(parse_constant=_not_json).raw_decode(text.lstrip())[0]
    except ValueError:
        # Only bad input pays for finding the error the way Go does.
        return gojson.syntax_error(text) or "invalid JSON"
    if document is None:
        return None
    if not isinstance(document, dict):
        return f"json: cannot unmarshal {gojson.json_type(document)} into Go value of type map[string]json.RawMessage"
    problem = _bytes_problem(document, message.DESCRIPTOR)
    if problem is not None:
        return problem
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        return str(exc)
    return None


def _not_json(name: str) -> Any:
    """Python reads NaN and Infinity; JSON (and Go) do not."""
    raise ValueError(name)


def _bytes_problem(document: dict[str, Any], descriptor: Any) -> str | None:
    """Go's error for a bytes field that is not base64 text, anywhere in the request."""
    for field in descriptor.fields:
        value = document.get(field.name, document.get(field.json_name))
        if value is None:
            continue
        values = value if field.is_repeated and isinstance(value, list) else [value]
        for item in values:
            if field.type == field.TYPE_BYTES:
                if not isinstance(item, str):
                    return f"json: cannot unmarshal {gojson.json_type(item)} into Go value of type []uint8"
                problem = gojson.base64_error(item)
                if problem is not None:
                    return problem
            elif field.type == field.TYPE_MESSAGE and isinstance(item, dict):
                problem = _bytes_problem(item, field.message_type)
                if problem is not None:
                    return problem
    return None


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def route(method: Callable[[Any, Any], Awaitable[Any]], request_class: type[Message], response_class: Any) -> Handler:
    async def handle(request: HttpRequest) -> HttpResponse:
        message = request_class()
        problem = parse_request(request.body, message)
        if problem is not None:
            return error_response(Status.INVALID_ARGUMENT, problem)
        try:
            response = await method(message, GatewayCall(request))
        except RpcError as error:
            return error_response(error.status, error.message)
        if isinstance(response, Encoded):  # KV.Range answers pre-encoded bytes for gRPC
            response = response_class.FromString(bytes(response))
        return HttpResponse(200, to_json(response), content_type=JSON, headers=list(SUCCESS_HEADERS))

    return handle


# Streaming routes: (path, service, method).
STREAM_ROUTES: list[tuple[str, str, str]] = [
    ("watch", "Watch", "Watch"),
    ("lease/keepalive", "Lease", "LeaseKeepAlive"),
]


def parse_requests(body: bytes, request_class: type[Message]) -> tuple[list[Message], str | None]:
    """The JSON requests a streaming call's body holds, one after another."""
    messages: list[Message] = []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], f"invalid JSON: {exc}"
    decoder = json.JSONDecoder()
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return messages, None
        problem = gojson.syntax_error(text[position:])
        if problem is not None:
            return [], problem
        document, position = decoder.raw_decode(text, position)
        message = request_class()
        problem = parse_request(json.dumps(document).encode(), message)
        if problem is not None:
            return [], problem
        messages.append(message)


def stream_route(method: Callable[[Any, Any], Any], request_class: type[Message]) -> Handler:
    async def handle(request: HttpRequest) -> HttpResponse:
        messages, problem = parse_requests(request.body, request_class)
        if problem is not None:
            return error_response(Status.INVALID_ARGUMENT, problem)

        async def requests() -> Any:
            for message in messages:
                yield message

        responses = method(requests(), GatewayCall(request))

        async def body() -> Any:
            try:
                async for response in responses:
                    yield b'{"result":' + to_json(response) + b"}\n"
            except RpcError as error:
                yield stream_error(error) + b"\n"
            finally:
                await responses.aclose()

        return HttpResponse(200, body(), content_type=JSON, headers=list(SUCCESS_HEADERS))

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


def add_gateway_routes(router: Router, servicers: dict[str, object]) -> None:
    """Every unary route etcd's gateway has, onto the servicers the gRPC transport serves."""
    services: dict[str, ServiceDescriptor] = dict(rpc_pb2.DESCRIPTOR.services_by_name)
    for path, service, name in ROUTES:
        servicer = servicers.get(service)
        implementation = getattr(servicer, name, None)
        if implementation is None:
            continue
        descriptor = services[service].methods_by_name[name]
        handler = route(implementation, GetMessageClass(descriptor.input_type), GetMessageClass(descriptor.output_type))
        for prefix in PREFIXES:
            router.add("POST", prefix + path, handler)
    for path, service, name in STREAM_ROUTES:
        implementation = getattr(servicers.get(service), name, None)
        if implementation is None:
            continue
        descriptor = services[service].methods_by_name[name]
        streaming = stream_route(implementation, GetMessageClass(descriptor.input_type))
        for prefix in PREFIXES:
            router.add("POST", prefix + path, streaming)
