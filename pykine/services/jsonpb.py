"""JSON as etcd 3.4's gateway reads and writes it: requests (Go's error texts included) and answers.

etcd's gateway decodes a request with golang/protobuf's jsonpb on top of
encoding/json, and clients see those libraries' words when a request is
wrong ("json: cannot unmarshal bool into Go value of type int64"). What they
accept differs from protobuf's Python json_format in ways clients notice:
int64 fields take numbers or strings whose inside is a JSON number (" 5" is
5, "1e3" is refused); enums take names (unknown ones refused) or any number;
bytes take base64 text (padding required) or an array of byte values;
unknown fields are ignored; null leaves a field unset. This module walks the
message descriptor in field order, the order jsonpb reports errors in.

Answers are written as jsonpb writes them with proto names: set fields only
(zero values left out), int64 as strings, bytes as base64, enums by name,
compact, with encoding/json's escaping of <, >, &, U+2028 and U+2029. Done by
hand rather than through json_format.MessageToDict and json.dumps, which
cost more than the rest of a gateway call.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from pykine.services import gojson


class Number:
    """A JSON number that is not an integer literal, kept as written: Go's errors quote it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _not_json(name: str) -> Any:
    """Python reads NaN and Infinity; JSON (and Go) do not."""
    raise ValueError(name)


# Parses request JSON: floats stay as written, NaN/Infinity are errors.
DECODER = json.JSONDecoder(parse_float=Number, parse_constant=_not_json)


class Refused(Exception):
    """A value Go would not take; the message is Go's."""


def fill(document: Any, message: Message) -> str | None:
    """Set `message` from one parsed JSON value (DECODER's); Go's error text, if any."""
    try:
        _message(document, message)
    except Refused as refused:
        return str(refused)
    return None


def _kind(value: Any) -> str:
    if isinstance(value, Number):
        return "number"
    return gojson.json_type(value)


def _cannot(value: Any, go_type: str) -> Refused:
    return Refused(f"json: cannot unmarshal {_kind(value)} into Go value of type {go_type}")


def _message(value: Any, message: Message) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _cannot(value, "map[string]json.RawMessage")
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        raw = value.get(field.name)
        if raw is None:
            raw = value.get(field.json_name)
            if raw is None:
                continue
        if field.is_repeated:
            if isinstance(raw, str) and field.type == FieldDescriptor.TYPE_ENUM:
                _enum(field.enum_type, raw)  # jsonpb looks the name up before it sees the list
                raise Refused(f'invalid target "slice" for enum {go_type_name(field.enum_type)}')
            if not isinstance(raw, list):
                raise _cannot(raw, "[]json.RawMessage")
            target = getattr(message, field.name)
            for item in raw:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    _message(item, target.add())
                elif item is not None:
                    target.append(_scalar(field, item))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            child = getattr(message, field.name)
            child.SetInParent()
            _message(raw, child)
        else:
            setattr(message, field.name, _scalar(field, raw))


# Go's integer types by protobuf field type: name and range.
_INTEGERS: dict[int, tuple[str, int, int]] = {
    FieldDescriptor.TYPE_INT64: ("int64", -(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: ("int64", -(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: ("int64", -(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: ("uint64", 0, (1 << 64) - 1),
    FieldDescriptor.TYPE_INT32: ("int32", -(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: ("int32", -(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: ("int32", -(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: ("uint32", 0, (1 << 32) - 1),
}


def _scalar(field: FieldDescriptor, raw: Any) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(raw, str):
            raise _cannot(raw, "string")
        return raw
    if kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(raw, bool):
            raise _cannot(raw, "bool")
        return raw
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes(raw)
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum(field.enum_type, raw)
    if kind in _INTEGERS:
        go_type, low, high = _INTEGERS[kind]
        if isinstance(raw, str):  # jsonpb drops the quotes and reads what is inside as JSON
            raw = _inside_quotes(raw)
            if raw is None:
                return 0
        return _integer(raw, go_type, low, high)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if isinstance(raw, str):
            raw = _inside_quotes(raw)
        if isinstance(raw, Number):
            return float(raw.text)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        raise _cannot(raw, "float64" if kind == FieldDescriptor.TYPE_DOUBLE else "float32")
    raise _cannot(raw, "unknown")  # no other field types in the API


def _inside_quotes(value: str) -> Any:
    """What json.Unmarshal makes of a quoted number's inside (Go drops the quotes, not the escapes)."""
    text = json.dumps(value, ensure_ascii=False)[1:-1]  # the escapes, as a client would most likely write them
    problem = gojson.unmarshal_error(text)
    if problem is not None:
        raise Refused(problem)
    return DECODER.decode(text)


def _integer(raw: Any, go_type: str, low: int, high: int) -> int:
    if isinstance(raw, Number):
        raise Refused(f"json: cannot unmarshal number {raw.text} into Go value of type {go_type}")
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise _cannot(raw, go_type)
    if not low <= raw <= high:
        raise Refused(f"json: cannot unmarshal number {raw} into Go value of type {go_type}")
    return raw


def go_type_name(enum: EnumDescriptor) -> str:
    """The Go type etcd's generated code gives an enum: etcdserverpb.RangeRequest_SortOrder."""
    package = enum.file.package
    return package + "." + enum.full_name[len(package) + 1 :].replace(".", "_")


def _enum(enum: EnumDescriptor, raw: Any) -> int:
    if isinstance(raw, str):
        value = enum.values_by_name.get(raw)
        if value is None:
            raise Refused(f"unknown value {json.dumps(raw, ensure_ascii=False)} for enum {go_type_name(enum)}")
        return value.number
    return _integer(raw, go_type_name(enum), -(1 << 31), (1 << 31) - 1)


def _bytes(raw: Any) -> bytes:
    if isinstance(raw, str):
        decoded = gojson.base64_decode(raw)
        if isinstance(decoded, str):
            raise Refused(decoded)
        return decoded
    if isinstance(raw, list):  # encoding/json fills a []byte from an array of numbers too
        return bytes(_integer(item, "uint8", 0, 255) for item in raw if item is not None)
    raise _cannot(raw, "[]uint8")


# Field types jsonpb writes as JSON strings (64-bit integers) or as bare numbers.
_QUOTED = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
_BARE = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_FIXED32,
}
_STRING = json.JSONEncoder(ensure_ascii=False).encode


def encode(message: Message) -> bytes:
    """The message as etcd's gateway writes it."""
    text = _object(message)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (
            text.replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    return text.encode()


def _object(message: Message) -> str:
    members = []
    for field, value in message.ListFields():
        if field.is_repeated:
            text = "[" + ",".join(_value(field, item) for item in value) + "]"
        else:
            text = _value(field, value)
        members.append('"' + field.name + '":' + text)
    return "{" + ",".join(members) + "}"


def _value(field: FieldDescriptor, value: Any) -> str:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _object(value)
    if kind in _QUOTED:
        return f'"{value}"'
    if kind == FieldDescriptor.TYPE_BYTES:
        return '"' + base64.b64encode(value).decode() + '"'
    if kind == FieldDescriptor.TYPE_STRING:
        return _STRING(value)
    if kind == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if kind == FieldDescriptor.TYPE_ENUM:
        named = field.enum_type.values_by_number.get(value)
        return f'"{named.name}"' if named is not None else str(value)
    if kind in _BARE:
        return str(value)
    return json.dumps(value)  # float and double: none in etcd's answers
