"""The server side of one HTTP/2 connection (RFC 9113), sans I/O.

Bytes come in through `receive()`; what the connection wants to send
collects in an output buffer that the I/O layer takes with
`data_to_send()`. Nothing here touches a socket, a clock or the event loop,
so every rule is tested by feeding bytes (tests/test_h2.py drives it with the
`h2` library as an independent client).

The application (the gRPC layer) sees streams through four callbacks
(`StreamHandler`), chosen over event objects because building an object per
frame is most of what makes general HTTP/2 libraries slow in Python.

Flow control, both directions:

- receiving: we announce a stream window of `Limits.stream_window` and a
  connection window of `Limits.connection_window`. Connection credit is
  returned as data arrives (the stream windows bound what can be buffered);
  stream credit is returned when the application says it consumed the bytes
  (`acknowledge`), so a handler that stops reading stops its client.
  Updates are batched: one WINDOW_UPDATE per half window.
- sending: data waits in a per-stream queue until both the stream's and the
  connection's send windows allow it, and goes out in frames no larger than
  the peer's SETTINGS_MAX_FRAME_SIZE, streams taking turns. Trailers wait
  behind their stream's data. `Stream.queued` tells the application how much
  is waiting, so streaming senders can wait for `stream_writable`.

Errors: a connection error sends GOAWAY with the last stream id we processed
and closes (`closed` becomes true); a stream error sends RST_STREAM and tells
the application. The preface, frame sizes, stream id rules, CONTINUATION
sequences, padding, SETTINGS values and window overflows are all checked.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pykine.transport.headers import HeaderDecodeError, HeaderDecoder, HeaderList

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


_HEADER = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def frame_header(kind: int, flags: int, stream_id: int, size: int) -> bytes:
    return _HEADER.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server announces and enforces on each connection."""

    max_concurrent_streams: int = 10_000
    stream_window: int = 4 << 20
    connection_window: int = 16 << 20
    max_frame_size: int = DEFAULT_MAX_FRAME
    max_header_list_size: int = 16 << 10
    # RST_STREAMs a peer may send for streams it opened before we call it abuse
    # (a "rapid reset" flood): a budget that refills by one per 10 streams completed.
    reset_budget: int = 1000


class ConnectionViolation(Exception):
    """A connection error: GOAWAY with this code, then close."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Stream:
    """One request stream. `app` belongs to the application."""

    __slots__ = (
        "app",
        "id",
        "local_closed",
        "pending",
        "queued",
        "recv_window",
        "remote_closed",
        "send_window",
        "unacknowledged",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacknowledged = 0  # consumed bytes whose credit is not yet returned
        self.pending: deque[memoryview | bytes] = deque()  # memoryview: data; bytes: a whole frame to send as is
        self.queued = 0  # data bytes in pending
        self.remote_closed = False
        self.local_closed = False  # END_STREAM queued or sent by us
        self.app: object = None


class StreamHandler(Protocol):
    """The application of HTTP/2: what the connection tells it about streams."""

    def stream_started(self, stream: Stream, headers: HeaderList, header_size: int, end_stream: bool) -> None: ...

    def stream_data(self, stream: Stream, data: bytes, end_stream: bool) -> None: ...

    def stream_reset(self, stream: Stream, code: int) -> None:
        """The peer reset the stream, or the connection is gone."""

    def stream_writable(self, stream: Stream) -> None:
        """Queued output of the stream went below the low-water mark (or the connection resumed)."""


# A streaming sender waits while more than this is queued on its stream.
LOW_WATER = 64 << 10


class Connection:
    """One server-side HTTP/2 connection."""

    def __init__(self, handler: StreamHandler, limits: Limits = Limits()) -> None:
        self.handler = handler
        self.limits = limits
        self.streams: dict[int, Stream] = {}
        self.closed = False  # after a connection error or our final GOAWAY
        self.goaway_sent = False
        self.last_stream_id = 0
        self.on_output: object = None  # called (no arguments) when output appears outside receive()
        self._out: list[bytes | memoryview] = []
        self._flush_pending = False
        self._buffer = b""
        self._preface_seen = False
        self._settings_seen = False
        # A header block in progress: (stream id, flags of HEADERS, fragments, size).
        self._continuation: tuple[int, int, list[bytes]] | None = None
        self._continuation_size = 0
        self._decoder = HeaderDecoder(limits.max_header_list_size)
        self._settings_acks_awaited = 1  # our initial SETTINGS
        self._peer_initial_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._send_window = DEFAULT_WINDOW
        self._recv_unacknowledged = 0
        self._blocked: dict[int, Stream] = {}
        self.writable = True
        self._resets_left = limits.reset_budget
        self._completed = 0

    # -- setup and output -----------------------------------------------------------

    def initiate(self) -> None:
        """Queue our SETTINGS and the connection window beyond the default."""
        limits = self.limits
        settings = b"".join(
            _SETTING.pack(ident, value)
            for ident, value in (
                (SETTINGS_HEADER_TABLE_SIZE, 0),
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_MAX_CONCURRENT_STREAMS, limits.max_concurrent_streams),
                (SETTINGS_INITIAL_WINDOW_SIZE, limits.stream_window),
                (SETTINGS_MAX_FRAME_SIZE, limits.max_frame_size),
                (SETTINGS_MAX_HEADER_LIST_SIZE, limits.max_header_list_size),
            )
        )
        self._out.append(frame(SETTINGS, 0, 0, settings))
        if limits.connection_window > DEFAULT_WINDOW:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(limits.connection_window - DEFAULT_WINDOW)))

    def data_to_send(self) -> bytes:
        self._flush_pending = False
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _emit(self, chunk: bytes) -> None:
        self._out.append(chunk)
        if not self._flush_pending:
            self._flush_pending = True
            if self.on_output is not None:
                self.on_output()  # type: ignore[operator]

    @property
    def awaiting_input(self) -> bool:
        """Whether part of a frame, a header block or the preface is still to come."""
        return bool(self._buffer) or self._continuation is not None or not self._settings_seen

    # -- input ----------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Process bytes from the peer. Output collects for data_to_send()."""
        if self.closed:
            return
        self._flush_pending = True  # the caller flushes after we return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        position = 0
        try:
            if not self._preface_seen:
                if len(data) < len(PREFACE):
                    if not PREFACE.startswith(data):
                        raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                    self._buffer = data
                    return
                if not data.startswith(PREFACE):
                    raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                self._preface_seen = True
                position = len(PREFACE)
            size = len(data)
            max_frame = self.limits.max_frame_size
            unpack = _HEADER.unpack_from
            while size - position >= 9 and not self.closed:
                high, low, kind, flags, stream_id = unpack(data, position)
                length = (high << 16) | low
                if length > max_frame:
                    raise ConnectionViolation(
                        ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds the maximum"
                    )
                end = position + 9 + length
                if end > size:
                    break
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, data[position + 9 : end])
                position = end
        except ConnectionViolation as violation:
            self.close(violation.code, violation.message)
            return
        if position < len(data):
            self._buffer = data[position:]
        if self._recv_unacknowledged >= self.limits.connection_window // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacknowledged)))
            self._recv_unacknowledged = 0

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if not self._settings_seen:
            if kind != SETTINGS or flags & ACK:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
            self._settings_seen = True
        if self._continuation is not None and kind != CONTINUATION:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continue(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "PING payload must be 8 bytes")
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif kind == PRIORITY:
            if not stream_id:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._reset(stream_id, ErrorCode.FRAME_SIZE_ERROR)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)
        elif kind == GOAWAY:
            if stream_id:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY too short")
            # The client stops opening streams; ours run to their end and it closes.
        elif kind == PUSH_PROMISE:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "clients cannot push")
        # Frames of unknown types are ignored (RFC 9113 section 5.5).

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_unacknowledged += length  # padding and all count for flow control
        if flags & PADDED:
            payload = self._unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we closed or reset: the data is dropped
        if stream.remote_closed:
            self._reset(stream_id, ErrorCode.STREAM_CLOSED)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            return
        # Padding is consumed at once; the application acknowledges the rest.
        if length != len(payload):
            self.acknowledge(stream, length - len(payload))
        end_stream = bool(flags & END_STREAM)
        if end_stream:
            stream.remote_closed = True
        self.handler.stream_data(stream, payload, end_stream)
        if end_stream and stream.local_closed and not stream.pending:
            self._forget(stream)

    def _unpad(self, payload: bytes) -> bytes:
        if not payload:
            raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "padded frame without pad length")
        pad = payload[0]
        if pad >= len(payload):
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "padding exceeds the frame")
        return payload[1 : len(payload) - pad]

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            payload = self._unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "stream depends on itself")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self._continuation = (stream_id, flags, [payload])
            self._continuation_size = len(payload)
            self._check_block_size()

    def _continue(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a header block in progress")
        self._continuation[2].append(payload)
        self._continuation_size += len(payload)
        self._check_block_size()
        if flags & END_HEADERS:
            block_stream, block_flags, fragments = self._continuation
            self._continuation = None
            self._header_block(block_stream, block_flags, b"".join(fragments))

    def _check_block_size(self) -> None:
        """A header block may be larger than the list we accept, but not without bound (CONTINUATION floods)."""
        if self._continuation_size > 4 * self.limits.max_header_list_size:
            raise ConnectionViolation(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        try:
            headers, header_size = self._decoder.decode(block)
        except HeaderDecodeError as error:
            raise ConnectionViolation(ErrorCode.COMPRESSION_ERROR, str(error)) from None
        end_stream = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: they must end the request
            if stream.remote_closed:
                self._reset(stream_id, ErrorCode.STREAM_CLOSED)
            elif not end_stream:
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)
            else:
                stream.remote_closed = True
                self.handler.stream_data(stream, b"", True)
                if stream.local_closed and not stream.pending:
                    self._forget(stream)
            return
        if not stream_id & 1:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "clients must use odd stream ids")
        if stream_id <= self.last_stream_id:
            return  # a stream already closed or reset; its block was decoded to keep HPACK in step
        self.last_stream_id = stream_id
        if self.goaway_sent:
            return  # not processed, as our GOAWAY's last stream id told the client
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.REFUSED_STREAM)))
            return
        stream = Stream(stream_id, self._peer_initial_window, self.limits.stream_window)
        stream.remote_closed = end_stream
        self.streams[stream_id] = stream
        self.handler.stream_started(stream, headers, header_size, end_stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ConnectionViolation(ErrorCode.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if stream_id > self.last_stream_id:
                    raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
                return
            if not increment:
                self._reset(stream_id, ErrorCode.PROTOCOL_ERROR)
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                self._reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
                return
        if self._blocked:
            self._send_blocked()

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._settings_acks_awaited:
                self._settings_acks_awaited -= 1
                # The peer now knows our table size: from here on it must use none.
                self._decoder.set_max_table_size(0)
            return
        if len(payload) % 6:
            raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
        for offset in range(0, len(payload), 6):
            ident, value = _SETTING.unpack_from(payload, offset)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionViolation(ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionViolation(ErrorCode.FLOW_CONTROL_ERROR, "stream window over 2^31-1")
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif ident == SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: our blocks never use the peer's table. The rest
            # concern pushing and the peer's receiving, which needs nothing here.
        self._out.append(frame(SETTINGS, ACK, 0))
        if self._blocked:
            self._send_blocked()

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionViolation(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        if stream_id > self.last_stream_id:
            raise ConnectionViolation(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self._blocked.pop(stream_id, None)
        self._resets_left -= 1
        if self._resets_left < 0:
            raise ConnectionViolation(ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset")
        self.handler.stream_reset(stream, _U32.unpack(payload)[0])

    # -- output for the application ---------------------------------------------------

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        """Send a header block (split into CONTINUATION frames if it must be)."""
        if stream.local_closed or self.closed:
            return
        frames = self._header_frames(stream.id, block, end_stream)
        if end_stream:
            stream.local_closed = True
        if stream.pending:
            stream.pending.append(frames)
            return
        self._emit(frames)
        if end_stream:
            self._finish(stream)

    def _header_frames(self, stream_id: int, block: bytes, end_stream: bool) -> bytes:
        limit = self._peer_max_frame
        flags = END_STREAM if end_stream else 0
        if len(block) <= limit:
            return frame_header(HEADERS, flags | END_HEADERS, stream_id, len(block)) + block
        pieces = [block[i : i + limit] for i in range(0, len(block), limit)]
        out = [frame(HEADERS, flags, stream_id, pieces[0])]
        out += [frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1]]
        out.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
        return b"".join(out)

    def end_stream(self, stream: Stream) -> None:
        """End our side with an empty DATA frame (a response without trailers)."""
        if stream.local_closed or self.closed:
            return
        stream.local_closed = True
        end = frame(DATA, END_STREAM, stream.id)
        if stream.pending:
            stream.pending.append(end)
            return
        self._emit(end)
        self._finish(stream)

    def send_data(self, stream: Stream, data: bytes) -> None:
        """Queue data on the stream; it is sent as the windows allow."""
        if stream.local_closed or self.closed or not data:
            return
        size = len(data)
        if (
            not stream.pending
            and self.writable
            and size <= self._send_window
            and size <= stream.send_window
            and size <= self._peer_max_frame
        ):
            self._send_window -= size
            stream.send_window -= size
            self._emit(frame_header(DATA, 0, stream.id, size) + data)
            return
        stream.pending.append(memoryview(data))
        stream.queued += size
        self._blocked[stream.id] = stream
        self._send_blocked()

    def send_response(self, stream: Stream, headers: bytes, data: bytes, trailers: bytes) -> None:
        """Headers, one body and trailers: in one write when the windows allow, as most answers are."""
        size = len(data)
        if (
            stream.local_closed
            or self.closed
            or not self.writable
            or size > self._send_window
            or size > stream.send_window
            or size > self._peer_max_frame
            or len(headers) > self._peer_max_frame
            or len(trailers) > self._peer_max_frame
        ):
            self.send_headers(stream, headers)
            self.send_data(stream, data)
            self.send_headers(stream, trailers, end_stream=True)
            return
        self._send_window -= size
        stream.send_window -= size
        stream.local_closed = True
        sid = stream.id
        self._emit(
            frame_header(HEADERS, END_HEADERS, sid, len(headers))
            + headers
            + frame_header(DATA, 0, sid, size)
            + data
            + frame_header(HEADERS, END_HEADERS | END_STREAM, sid, len(trailers))
            + trailers
        )
        self._finish(stream)

    def _send_blocked(self) -> None:
        """Move queued data into frames while windows allow, one frame per stream per turn."""
        progress = True
        while progress and self._blocked and self.writable and not self.closed:
            progress = False
            for stream in list(self._blocked.values()):
                pending = stream.pending
                head = pending[0]
                if type(head) is bytes:  # a header block (or the ending frame) waiting behind data
                    pending.popleft()
                    self._emit(head)
                    progress = True
                elif self._send_window > 0 and stream.send_window > 0:
                    size = min(len(head), self._send_window, stream.send_window, self._peer_max_frame)
                    self._emit(frame_header(DATA, 0, stream.id, size))
                    self._out.append(head[:size])  # a view: copied once, when the output is joined
                    self._send_window -= size
                    stream.send_window -= size
                    stream.queued -= size
                    if size == len(head):
                        pending.popleft()
                    else:
                        pending[0] = head[size:]
                    progress = True
                    if stream.queued < LOW_WATER <= stream.queued + size:
                        self.handler.stream_writable(stream)
                if not pending:
                    del self._blocked[stream.id]
                    if stream.local_closed:
                        self._finish(stream)

    def _finish(self, stream: Stream) -> None:
        """Our side of the stream is done: forget it, asking the peer to stop sending if it has not."""
        if not stream.remote_closed:
            self._emit(frame(RST_STREAM, 0, stream.id, _U32.pack(ErrorCode.NO_ERROR)))
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self.streams.pop(stream.id, None) is not None:
            self._completed += 1
            if self._completed % 10 == 0 and self._resets_left < self.limits.reset_budget:
                self._resets_left += 1

    def reset(self, stream: Stream, code: ErrorCode) -> None:
        """Abort a stream from our side (no callback to the application)."""
        if self.streams.pop(stream.id, None) is None or self.closed:
            return
        self._blocked.pop(stream.id, None)
        stream.local_closed = True
        self._emit(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))

    def _reset(self, stream_id: int, code: ErrorCode) -> None:
        """A stream error found in the peer's frames: reset it and tell the application."""
        stream = self.streams.pop(stream_id, None)
        self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))
        if stream is not None:
            self._blocked.pop(stream_id, None)
            stream.local_closed = True
            self.handler.stream_reset(stream, code)

    def acknowledge(self, stream: Stream, size: int) -> None:
        """The application consumed `size` bytes of the stream: return the credit (batched)."""
        if stream.remote_closed or stream.id not in self.streams:
            return  # no more data will come: no update needed
        stream.unacknowledged += size
        if stream.unacknowledged >= self.limits.stream_window // 2:
            stream.recv_window += stream.unacknowledged
            self._emit(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.unacknowledged)))
            stream.unacknowledged = 0

    def set_writable(self, writable: bool) -> None:
        """The I/O layer's buffer is below (True) or above (False) its high-water mark."""
        self.writable = writable
        if writable:
            if self._blocked:
                self._send_blocked()
            for stream in list(self.streams.values()):
                if stream.queued < LOW_WATER:
                    self.handler.stream_writable(stream)

    # -- closing ------------------------------------------------------------------------

    def goaway(self, message: str = "") -> None:
        """Graceful: no new streams; those already open run to their end."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        payload = _GOAWAY.pack(self.last_stream_id, ErrorCode.NO_ERROR) + message.encode()[:256]
        self._emit(frame(GOAWAY, 0, 0, payload))

    def close(self, code: ErrorCode, message: str) -> None:
        """A connection error: GOAWAY with the code and reason, and every open stream is reset."""
        if self.closed:
            return
        self.goaway_sent = True
        self._emit(frame(GOAWAY, 0, 0, _GOAWAY.pack(self.last_stream_id, code) + message.encode()[:256]))
        self.closed = True
        self.connection_lost()

    def connection_lost(self) -> None:
        """The transport is gone: every open stream ends."""
        self.closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for stream in streams:
            self.handler.stream_reset(stream, ErrorCode.CANCEL)

    @property
    def idle(self) -> bool:
        return not self.streams
