"""Run by test_jsonpb.py in a process of its own (pykine's and aetcd's descriptors cannot share one).

jsonpb.encode against protobuf's json_format (proto names, zero values left
out) followed by Go's escaping, on generated messages of every shape the
gateway answers with; and jsonpb.fill reading back what encode wrote.
"""

from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from pykine.services import jsonpb
from pykine.wire import auth_pb2, kv_pb2, rpc_pb2

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12) | st.sampled_from(
    ["<a>&b", "\u2028\u2029", '\x00\x01\n\t"\\', "é€😀"]
)
INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
UINT64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def key_values() -> st.SearchStrategy[kv_pb2.KeyValue]:
    return st.builds(
        kv_pb2.KeyValue,
        key=st.binary(max_size=8),
        create_revision=INT64,
        mod_revision=INT64,
        version=INT64,
        value=st.binary(max_size=8),
        lease=INT64,
    )


def header() -> st.SearchStrategy[rpc_pb2.ResponseHeader]:
    return st.builds(rpc_pb2.ResponseHeader, cluster_id=UINT64, member_id=UINT64, revision=INT64, raft_term=UINT64)


MESSAGES = st.one_of(
    st.builds(
        rpc_pb2.RangeResponse,
        header=header(),
        kvs=st.lists(key_values(), max_size=3),
        more=st.booleans(),
        count=INT64,
    ),
    st.builds(
        rpc_pb2.WatchResponse,
        header=header(),
        watch_id=INT64,
        created=st.booleans(),
        canceled=st.booleans(),
        cancel_reason=TEXT,
        events=st.lists(
            st.builds(kv_pb2.Event, type=st.sampled_from([0, 1, 7]), kv=key_values(), prev_kv=key_values()),
            max_size=2,
        ),
    ),
    st.builds(
        rpc_pb2.MemberListResponse,
        header=header(),
        members=st.lists(
            st.builds(
                rpc_pb2.Member, ID=UINT64, name=TEXT, peerURLs=st.lists(TEXT, max_size=2), isLearner=st.booleans()
            ),
            max_size=2,
        ),
    ),
    st.builds(
        rpc_pb2.AuthRoleGetResponse,
        header=header(),
        perm=st.lists(
            st.builds(auth_pb2.Permission, permType=st.sampled_from([0, 1, 2]), key=st.binary(max_size=4)), max_size=2
        ),
    ),
    st.builds(rpc_pb2.LeaseTimeToLiveResponse, header=header(), ID=INT64, TTL=INT64, grantedTTL=INT64),
    st.builds(
        rpc_pb2.AlarmResponse,
        alarms=st.lists(
            st.builds(rpc_pb2.AlarmMember, memberID=UINT64, alarm=st.sampled_from([0, 1, 2, 9])), max_size=2
        ),
    ),
)


def reference(message: Message) -> bytes:
    document = json_format.MessageToDict(message, preserving_proto_field_name=True)
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text.encode()


@settings(max_examples=400, deadline=None)
@given(MESSAGES)
def check_encode(message: Message) -> None:
    encoded = jsonpb.encode(message)
    assert json.loads(encoded) == json.loads(reference(message)), (encoded, reference(message))
    assert not any(char in encoded for char in (b"<", b">", b"&", "\u2028".encode()))
    again = type(message)()
    assert jsonpb.fill(jsonpb.DECODER.decode(encoded.decode()), again) is None
    assert again == message


if __name__ == "__main__":
    check_encode()
    print("ok")
