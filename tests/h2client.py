"""A raw HTTP/2 client on the `h2` library, for sending exactly the bytes a test means.

grpcio hides what a server sends (and refuses to send bad requests), so
wire-level comparisons with etcd use this instead: one request per
connection, every response header, data byte, trailer and reset recorded.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class Answer:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> tuple[bytes | None, bytes | None]:
        """(grpc-status, grpc-message), from the trailers or a trailers-only response."""
        fields = dict(self.trailers or self.headers)
        return fields.get(b"grpc-status"), fields.get(b"grpc-message")


def grpc_frame(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    return struct.pack(">BL", flag, len(payload) if length is None else length) + payload


def request_headers(path: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *(extra or []),
    ]


def exchange(
    address: str,
    headers: list[tuple[bytes, bytes]],
    body: list[bytes] | None = None,
    end_stream: bool = True,
    timeout: float = 5.0,
) -> Answer:
    """Send one request (body as DATA frames; END_STREAM on the last unless told not to) and read its answer."""
    host, _, port = address.rpartition(":")
    answer = Answer()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        connection.initiate_connection()
        connection.increment_flow_control_window(1 << 24)
        body = body or []
        connection.send_headers(1, headers, end_stream=end_stream and not body)
        for index, chunk in enumerate(body):
            last = index == len(body) - 1
            connection.send_data(1, chunk, end_stream=end_stream and last)
        sock.sendall(connection.data_to_send())
        while not answer.ended and answer.reset is None:
            try:
                data = sock.recv(1 << 16)
            except TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = list(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    answer.data += event.data
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = list(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    answer.ended = True
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = event.error_code
                elif isinstance(event, h2.events.ConnectionTerminated):
                    answer.reset = -1
            pending = connection.data_to_send()
            if pending:
                sock.sendall(pending)
    return answer
