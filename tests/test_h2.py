"""pykine's HTTP/2 frame layer, driven without sockets by an independent, strict peer.

The `h2` library plays the client: it checks every frame we send against
RFC 9113 and raises on anything wrong, so these tests catch our mistakes as
well as exercising how we treat the client's frames. Raw bytes cover what
`h2` refuses to send (bad frames).
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykine.transport import h2 as server_h2
from pykine.transport.headers import HeaderDecodeError, HeaderDecoder, context_free_field, encode_block, split_block

REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/etcdserverpb.KV/Range"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]
RESPONSE = encode_block([(b":status", b"200"), (b"content-type", b"application/grpc")])
TRAILERS = encode_block([(b"grpc-status", b"0"), (b"grpc-message", b"")])


class Recorder:
    """A StreamHandler that records what the connection tells it."""

    def __init__(self) -> None:
        self.started: list[tuple[int, Any, bool]] = []
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: list[tuple[int, int]] = []
        self.writable: list[int] = []
        self.streams: dict[int, server_h2.Stream] = {}

    def stream_started(self, stream: server_h2.Stream, headers: Any, header_size: int, end_stream: bool) -> None:
        self.started.append((stream.id, headers, end_stream))
        self.streams[stream.id] = stream
        self.data[stream.id] = bytearray()
        if end_stream:
            self.ended.add(stream.id)

    def stream_data(self, stream: server_h2.Stream, data: bytes, end_stream: bool) -> None:
        self.data[stream.id] += data
        if end_stream:
            self.ended.add(stream.id)

    def stream_reset(self, stream: server_h2.Stream, code: int) -> None:
        self.resets.append((stream.id, code))

    def stream_writable(self, stream: server_h2.Stream) -> None:
        self.writable.append(stream.id)


class Pair:
    """Our server connection and an h2 client connection, joined by a byte pipe."""

    def __init__(self, limits: server_h2.Limits | None = None, client_settings: dict[int, int] | None = None):
        self.handler = Recorder()
        self.server = server_h2.Connection(self.handler, limits or server_h2.Limits())
        self.server.initiate()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.events: list[h2.events.Event] = []
        self.pump()

    def pump(self) -> list[h2.events.Event]:
        """Move bytes both ways until neither side has anything to say."""
        new: list[h2.events.Event] = []
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                self.server.receive(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                new += self.client.receive_data(to_client)
            if not to_server and not to_client:
                break
        self.events += new
        return new

    def request(self, body: bytes = b"", end_stream: bool = True) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, REQUEST, end_stream=not body and end_stream)
        if body:
            self.client.send_data(stream_id, body, end_stream=end_stream)
        self.pump()
        return stream_id

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)


def of_type(events: list[h2.events.Event], kind: type) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


def test_handshake_announces_our_settings_and_acknowledges_the_clients() -> None:
    pair = Pair()
    remote = pair.client.remote_settings
    assert remote[h2.settings.SettingCodes.HEADER_TABLE_SIZE] == 0
    assert remote[h2.settings.SettingCodes.ENABLE_PUSH] == 0
    assert remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 10_000
    assert remote[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 4 << 20
    assert of_type(pair.events, h2.events.SettingsAcknowledged)
    assert pair.client.outbound_flow_control_window == 16 << 20  # our connection window update
    assert not pair.server.awaiting_input


def test_unary_exchange_in_one_write() -> None:
    pair = Pair()
    stream_id = pair.request(b"\x00\x00\x00\x00\x03\x0a\x01a")
    [(started_id, headers, _)] = pair.handler.started
    assert started_id == stream_id
    assert dict(headers)[b":path"] == b"/etcdserverpb.KV/Range"
    assert pair.handler.data[stream_id] == b"\x00\x00\x00\x00\x03\x0a\x01a"
    assert stream_id in pair.handler.ended
    pair.server.send_response(pair.handler.streams[stream_id], RESPONSE, b"\x00\x00\x00\x00\x01x", TRAILERS)
    events = pair.pump()
    assert [type(e) for e in events] == [
        h2.events.ResponseReceived,
        h2.events.DataReceived,
        h2.events.TrailersReceived,
        h2.events.StreamEnded,
    ]
    assert events[2].headers == [(b"grpc-status", b"0"), (b"grpc-message", b"")]
    assert pair.server.idle


def test_ping_is_acknowledged_with_its_payload() -> None:
    pair = Pair()
    pair.client.ping(b"12345678")
    [ack] = of_type(pair.pump(), h2.events.PingAckReceived)
    assert ack.ping_data == b"12345678"


def test_continuation_frames_make_one_header_block() -> None:
    pair = Pair(server_h2.Limits(max_header_list_size=64 << 10))
    stream_id = pair.client.get_next_available_stream_id()
    big = b"x" * 40_000  # more than two frames of 16 KiB
    pair.client.send_headers(stream_id, [*REQUEST, (b"x-big", big)], end_stream=True)
    sent = pair.client.data_to_send()
    # HEADERS then CONTINUATION frames: check the framing really was split.
    kinds = []
    position = 0
    while position < len(sent):
        length = int.from_bytes(sent[position : position + 3], "big")
        kinds.append(sent[position + 3])
        position += 9 + length
    assert kinds.count(server_h2.CONTINUATION) >= 2
    pair.server.receive(sent)
    [(_, headers, _)] = pair.handler.started
    assert dict(headers)[b"x-big"] == big


def test_padding_and_priority_are_understood() -> None:
    pair = Pair()
    stream_id = pair.client.get_next_available_stream_id()
    pair.client.send_headers(stream_id, REQUEST, priority_weight=20, priority_depends_on=0)
    pair.client.prioritize(stream_id, weight=100)
    pair.client.send_data(stream_id, b"hello", pad_length=10, end_stream=True)
    pair.pump()
    assert pair.handler.data[stream_id] == b"hello"
    assert stream_id in pair.handler.ended
    assert pair.goaway() is None


def test_tiny_client_window_gets_every_byte_in_small_frames() -> None:
    pair = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
    stream_id = pair.request()
    stream = pair.handler.streams[stream_id]
    body = bytes(range(256)) * 400  # 100 KiB
    pair.server.send_headers(stream, RESPONSE)
    pair.server.send_data(stream, body)
    pair.server.send_headers(stream, TRAILERS, end_stream=True)
    received = bytearray()
    for _ in range(20_000):
        events = pair.pump()
        for event in of_type(events, h2.events.DataReceived):
            assert len(event.data) <= 10
            received += event.data
            pair.client.acknowledge_received_data(event.flow_controlled_length, stream_id)
        if of_type(events, h2.events.StreamEnded):
            break
    assert bytes(received) == body
    assert of_type(pair.events, h2.events.TrailersReceived)
    assert pair.server.idle


def test_a_stalled_reader_holds_back_only_its_stream() -> None:
    pair = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    slow = pair.request()
    pair.server.send_headers(pair.handler.streams[slow], RESPONSE)
    pair.server.send_data(pair.handler.streams[slow], b"z" * 200_000)
    pair.pump()
    assert pair.handler.streams[slow].queued == 200_000  # waits, counted, not sent
    # The client opens up the window for the next stream only.
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    pair.pump()
    fast = pair.request()
    pair.client.increment_flow_control_window(1000, stream_id=fast)
    pair.pump()
    pair.server.send_response(pair.handler.streams[fast], RESPONSE, b"\x00\x00\x00\x00\x01x", TRAILERS)
    events = pair.pump()
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == fast for e in events)
    assert pair.handler.streams[slow].queued == 200_000


def test_writable_is_signalled_when_the_queue_drains() -> None:
    pair = Pair(client_settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream_id = pair.request()
    stream = pair.handler.streams[stream_id]
    pair.server.send_headers(stream, RESPONSE)
    pair.server.send_data(stream, b"q" * (server_h2.LOW_WATER + 1000))
    pair.pump()
    assert pair.handler.writable == []
    pair.client.increment_flow_control_window(50_000, stream_id=stream_id)
    pair.pump()
    assert pair.handler.writable == [stream_id]


def test_client_reset_reaches_the_application() -> None:
    pair = Pair()
    stream_id = pair.request(b"partial", end_stream=False)
    pair.client.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    pair.pump()
    assert pair.handler.resets == [(stream_id, h2.errors.ErrorCodes.CANCEL)]
    assert pair.server.idle
    # Data that was already in flight for the reset stream is dropped quietly.
    pair.server.receive(server_h2.frame(server_h2.DATA, 0, stream_id, b"late"))
    assert pair.goaway() is None and not pair.server.closed


def test_response_before_the_request_ends_resets_with_no_error() -> None:
    pair = Pair()
    stream_id = pair.request(b"start", end_stream=False)
    pair.server.send_response(pair.handler.streams[stream_id], RESPONSE, b"", TRAILERS)
    events = pair.pump()
    [reset] = of_type(events, h2.events.StreamReset)
    assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert of_type(events, h2.events.StreamEnded)


def test_graceful_goaway_lets_open_streams_finish_and_refuses_new_ones() -> None:
    server, handler = raw_server()
    server.receive(server_h2.frame(server_h2.HEADERS, 0x5, 1, encode_block(REQUEST)))
    server.goaway()
    [(kind, _, _, payload)] = frames(server.data_to_send())
    assert kind == server_h2.GOAWAY
    assert struct.unpack(">LL", payload[:8]) == (1, server_h2.ErrorCode.NO_ERROR)
    # h2 closes its side on GOAWAY, so raw frames stand in for a client that goes on.
    server.receive(server_h2.frame(server_h2.HEADERS, 0x5, 3, encode_block(REQUEST)))
    assert [stream_id for stream_id, _, _ in handler.started] == [1]
    server.send_response(handler.streams[1], RESPONSE, b"", TRAILERS)
    sent = frames(server.data_to_send())
    assert [(kind, stream_id) for kind, _, stream_id, _ in sent] == [
        (server_h2.HEADERS, 1),
        (server_h2.DATA, 1),
        (server_h2.HEADERS, 1),
    ]
    assert sent[-1][1] & server_h2.END_STREAM
    assert server.idle


def test_streams_beyond_the_limit_are_refused() -> None:
    server, handler = raw_server(server_h2.Limits(max_concurrent_streams=2))
    for stream_id in (1, 3, 5):
        server.receive(server_h2.frame(server_h2.HEADERS, 0x4, stream_id, encode_block(REQUEST)))
    assert [(kind, stream_id, payload) for kind, _, stream_id, payload in frames(server.data_to_send())] == [
        (server_h2.RST_STREAM, 5, struct.pack(">L", server_h2.ErrorCode.REFUSED_STREAM))
    ]
    assert len(handler.started) == 2


def test_rapid_reset_flood_ends_the_connection() -> None:
    pair = Pair(server_h2.Limits(reset_budget=5))
    for _ in range(7):
        stream_id = pair.client.get_next_available_stream_id()
        pair.client.send_headers(stream_id, REQUEST)
        pair.client.reset_stream(stream_id)
    pair.pump()
    terminated = pair.goaway()
    assert terminated is not None and terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert pair.server.closed


def raw_server(limits: server_h2.Limits | None = None) -> tuple[server_h2.Connection, Recorder]:
    handler = Recorder()
    server = server_h2.Connection(handler, limits or server_h2.Limits())
    server.initiate()
    server.receive(server_h2.PREFACE + server_h2.frame(server_h2.SETTINGS, 0, 0))
    server.data_to_send()
    return server, handler


def frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    """The frames in the server's output as (type, flags, stream id, payload)."""
    found = []
    position = 0
    while position + 9 <= len(out):
        length = int.from_bytes(out[position : position + 3], "big")
        kind, flags, stream_id = out[position + 3], out[position + 4], struct.unpack_from(">L", out, position + 5)[0]
        found.append((kind, flags, stream_id, out[position + 9 : position + 9 + length]))
        position += 9 + length
    return found


def goaway_code(server: server_h2.Connection) -> int | None:
    """The error code of the GOAWAY in the server's output, if any."""
    for kind, _, _, payload in frames(server.data_to_send()):
        if kind == server_h2.GOAWAY:
            return struct.unpack_from(">L", payload, 4)[0]
    return None


BAD_FRAMES = {
    "data on stream 0": (server_h2.frame(server_h2.DATA, 0, 0, b"x"), server_h2.ErrorCode.PROTOCOL_ERROR),
    "data on an idle stream": (server_h2.frame(server_h2.DATA, 0, 7, b"x"), server_h2.ErrorCode.PROTOCOL_ERROR),
    "even stream id": (
        server_h2.frame(server_h2.HEADERS, 0x5, 2, encode_block(REQUEST)),
        server_h2.ErrorCode.PROTOCOL_ERROR,
    ),
    "oversized frame": (
        server_h2.frame_header(server_h2.DATA, 0, 1, 20_000) + b"\x00" * 20_000,
        server_h2.ErrorCode.FRAME_SIZE_ERROR,
    ),
    "ping of 7 bytes": (server_h2.frame(server_h2.PING, 0, 0, b"1234567"), server_h2.ErrorCode.FRAME_SIZE_ERROR),
    "settings not multiple of 6": (
        server_h2.frame(server_h2.SETTINGS, 0, 0, b"\x00\x04\x00"),
        server_h2.ErrorCode.FRAME_SIZE_ERROR,
    ),
    "window too large": (
        server_h2.frame(server_h2.SETTINGS, 0, 0, struct.pack(">HL", 4, 1 << 31)),
        server_h2.ErrorCode.FLOW_CONTROL_ERROR,
    ),
    "window update of zero": (
        server_h2.frame(server_h2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),
        server_h2.ErrorCode.PROTOCOL_ERROR,
    ),
    "connection window overflow": (
        server_h2.frame(server_h2.WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF)),
        server_h2.ErrorCode.FLOW_CONTROL_ERROR,
    ),
    "push promise": (server_h2.frame(server_h2.PUSH_PROMISE, 0x4, 1, b"\x00\x00\x00\x02"), 0x1),
    "continuation without headers": (server_h2.frame(server_h2.CONTINUATION, 0x4, 1, b"\x88"), 0x1),
    "bad hpack": (
        server_h2.frame(server_h2.HEADERS, 0x5, 1, b"\xff\xff\xff\xff"),
        server_h2.ErrorCode.COMPRESSION_ERROR,
    ),
    "padding beyond the frame": (
        server_h2.frame(server_h2.HEADERS, 0x5 | 0x8, 1, b"\x09" + encode_block(REQUEST)[:3]),
        server_h2.ErrorCode.PROTOCOL_ERROR,
    ),
    "settings ack with payload": (
        server_h2.frame(server_h2.SETTINGS, 0x1, 0, b"\x00" * 6),
        server_h2.ErrorCode.FRAME_SIZE_ERROR,
    ),
    "rst on stream 0": (server_h2.frame(server_h2.RST_STREAM, 0, 0, b"\x00" * 4), server_h2.ErrorCode.PROTOCOL_ERROR),
    "goaway on a stream": (server_h2.frame(server_h2.GOAWAY, 0, 1, b"\x00" * 8), server_h2.ErrorCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_frames_end_the_connection_with_the_rfc_error(name: str) -> None:
    frame_bytes, code = BAD_FRAMES[name]
    server, _ = raw_server()
    server.receive(frame_bytes)
    assert goaway_code(server) == code
    assert server.closed
    server.receive(server_h2.frame(server_h2.PING, 0, 0, b"12345678"))  # nothing more is processed
    assert server.data_to_send() == b""


def test_a_bad_preface_is_refused() -> None:
    server = server_h2.Connection(Recorder())
    server.initiate()
    server.data_to_send()
    server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert goaway_code(server) == server_h2.ErrorCode.PROTOCOL_ERROR


def test_frames_split_at_every_byte_are_reassembled() -> None:
    block = encode_block(REQUEST)
    session = (
        server_h2.PREFACE
        + server_h2.frame(server_h2.SETTINGS, 0, 0)
        + server_h2.frame(server_h2.HEADERS, 0x4, 1, block)
        + server_h2.frame(server_h2.DATA, 0x1, 1, b"payload")
    )
    handler = Recorder()
    server = server_h2.Connection(handler)
    server.initiate()
    for index in range(len(session)):
        server.receive(session[index : index + 1])
        if index < len(server_h2.PREFACE):
            assert server.awaiting_input
    assert handler.data[1] == b"payload" and 1 in handler.ended


def test_stream_level_errors_reset_only_that_stream() -> None:
    pair = Pair()
    good = pair.request(end_stream=False)
    bad = pair.request(end_stream=False)
    # Trailers that do not end the stream are a stream error (RFC 9113 8.1).
    pair.server.receive(server_h2.frame(server_h2.HEADERS, 0x4, bad, encode_block([(b"x", b"y")])))
    pair.events += pair.client.receive_data(pair.server.data_to_send())
    assert (bad, server_h2.ErrorCode.PROTOCOL_ERROR) in pair.handler.resets
    assert good in pair.handler.streams and not pair.server.closed
    pair.client.send_data(good, b"still fine", end_stream=True)
    pair.pump()
    assert pair.handler.data[good] == b"still fine"


# -- HPACK: the decoded-block cache must follow the dynamic table ------------------------------


def test_cached_blocks_follow_changes_to_the_dynamic_table() -> None:
    """An indexed reference means what the table holds now, not when the block was first seen."""
    encoder = hpack.Encoder()
    decoder = HeaderDecoder(1 << 16)
    first = encoder.encode([(b"x-token", b"one")])  # literal with incremental indexing: table[62]
    assert decoder.decode(first)[0] == ((b"x-token", b"one"),)
    again = encoder.encode([(b"x-token", b"one")])  # now just "index 62"
    assert again == b"\xbe"
    assert decoder.decode(again)[0] == ((b"x-token", b"one"),)
    changed = encoder.encode([(b"x-token", b"two")])  # name from the table, value new: table[62] = two
    assert decoder.decode(changed)[0] == ((b"x-token", b"two"),)
    # The same bytes as before now mean the new entry; a cache keyed on bytes alone would say "one".
    assert encoder.encode([(b"x-token", b"two")]) == b"\xbe"
    assert decoder.decode(b"\xbe")[0] == ((b"x-token", b"two"),)


def test_context_free_fields_are_cached_and_mixed_blocks_stay_in_order() -> None:
    decoder = HeaderDecoder(1 << 16)
    plain = encode_block(REQUEST)
    assert decoder.decode(plain)[0] == tuple(REQUEST)
    assert decoder.decode(plain)[0] == tuple(REQUEST)  # from the cache, same answer
    encoder = hpack.Encoder()
    mixed = plain + encoder.encode([(b"x-a", b"1")]) + encode_block([(b"grpc-timeout", b"5S")])
    assert decoder.decode(mixed)[0] == (*REQUEST, (b"x-a", b"1"), (b"grpc-timeout", b"5S"))
    reuse = plain + encoder.encode([(b"x-a", b"1")])  # x-a is now an indexed reference
    assert decoder.decode(reuse)[0] == (*REQUEST, (b"x-a", b"1"))


def test_table_size_update_after_a_field_is_refused() -> None:
    decoder = HeaderDecoder(1 << 16)
    with pytest.raises(HeaderDecodeError):
        decoder.decode(b"\x88\x20")


def test_a_table_beyond_what_we_announced_is_refused_once_acknowledged() -> None:
    pair = Pair()
    # The client (h2) honoured our HEADER_TABLE_SIZE 0; a raw one that adds to the table is wrong.
    pair.server.receive(server_h2.frame(server_h2.HEADERS, 0x5, 101, b"\x3f\xe1\x1f"))  # size update to 4096
    assert goaway_code(pair.server) == server_h2.ErrorCode.COMPRESSION_ERROR


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=1, max_size=40),
    st.binary(max_size=300),
    st.booleans(),
    st.sampled_from(["never", "without"]),
)
def test_context_free_fields_decode_as_hpack_does(name: bytes, value: bytes, huffman: bool, kind: str) -> None:
    """The fast path for context-free fields agrees with hpack's own decoder, byte for byte."""
    encoder = hpack.Encoder()
    encoder.header_table_size = 0
    header = hpack.NeverIndexedHeaderTuple(name, value) if kind == "never" else hpack.HeaderTuple(name, value)
    block = encoder.encode([header], huffman=huffman)
    if block[0] & 0xE0 == 0x20:  # the encoder's own table size update comes first: not part of the field
        block = block[split_block(block)[0][1] :]
    [(_, _, context_free)] = split_block(block)
    expected = [(bytes(n), bytes(v)) for n, v in hpack.Decoder().decode(block, raw=True)]
    if context_free:
        assert [context_free_field(block)] == expected
    assert HeaderDecoder(1 << 20).decode(block)[0] == tuple(expected)
