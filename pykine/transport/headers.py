"""HPACK through the `hpack` library, with a cache that keeps decoding cheap.

Decoding a header block with `hpack` costs 20 to 45 µs, as much as a whole
call should. Clients resend nearly the same block on every call, so decoded
results are cached, but only where that is correct: a block's meaning may
depend on the dynamic table (an indexed reference means whatever the table
holds at that moment), and a literal with incremental indexing changes it.

So the decoder splits each block into its field representations (RFC 7541,
section 6) and treats them by kind:

- *context-free* ones (a static-table index, or a literal without or never
  indexed whose name is literal or static) decode the same whatever the table
  holds; their results are cached by their bytes;
- everything else (a dynamic-table index, a literal that adds to the table, a
  table size update) goes through the one `hpack.Decoder` of the connection,
  in order, so its table stays exactly the peer's.

pykine announces SETTINGS_HEADER_TABLE_SIZE 0, so once the peer has seen it
every representation is context-free: a block whose only new field is a
changing `grpc-timeout` costs one small decode instead of a whole one. A
whole block made only of context-free fields is also cached as a unit.

Here, only representation boundaries (prefix integers, string lengths) are
parsed, and context-free fields are assembled from their string literals;
Huffman decoding and everything that touches the dynamic table is `hpack`'s.
"""

from __future__ import annotations

from collections.abc import Iterable

import hpack
from hpack.exceptions import HPACKError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]
HeaderList = tuple[Header, ...]

STATIC_TABLE: tuple[Header, ...] = HeaderTable.STATIC_TABLE
STATIC_TABLE_ENTRIES = len(STATIC_TABLE)
# RFC 7541 section 4.1: each entry counts 32 bytes beyond its name and value.
ENTRY_OVERHEAD = 32
# Cached blocks and fields are dropped when a cache grows past this: a client
# sending ever-new literals must not grow memory.
CACHE_LIMIT = 512


class HeaderDecodeError(Exception):
    """The block is not valid HPACK: a COMPRESSION_ERROR for the connection."""


def _prefix_integer(block: bytes, position: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 section 5.1: the integer starting at `position` and the offset after it."""
    limit = (1 << prefix_bits) - 1
    value = block[position] & limit
    position += 1
    if value < limit:
        return value, position
    shift = 0
    while True:
        if position >= len(block) or shift > 28:
            raise HeaderDecodeError("truncated or oversized integer in header block")
        byte = block[position]
        position += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _skip_string(block: bytes, position: int) -> int:
    if position >= len(block):
        raise HeaderDecodeError("truncated header block")
    length, position = _prefix_integer(block, position, 7)
    position += length
    if position > len(block):
        raise HeaderDecodeError("truncated header block")
    return position


def split_block(block: bytes) -> list[tuple[int, int, bool]]:
    """Each representation of a block as (start, end, context_free).

    Raises HeaderDecodeError if a table size update follows a field, which
    RFC 7541 section 4.2 forbids, or if a representation is cut short.
    """
    parts: list[tuple[int, int, bool]] = []
    position = 0
    seen_field = False
    size = len(block)
    while position < size:
        start = position
        first = block[position]
        if first & 0x80:  # indexed field
            index, position = _prefix_integer(block, position, 7)
            context_free = 0 < index <= STATIC_TABLE_ENTRIES
            seen_field = True
        elif first & 0x40:  # literal with incremental indexing: changes the table
            index, position = _prefix_integer(block, position, 6)
            if index == 0:
                position = _skip_string(block, position)
            position = _skip_string(block, position)
            context_free = False
            seen_field = True
        elif first & 0x20:  # dynamic table size update
            if seen_field:
                raise HeaderDecodeError("table size update after a header field")
            _, position = _prefix_integer(block, position, 5)
            context_free = False
        else:  # literal without indexing (0000) or never indexed (0001)
            index, position = _prefix_integer(block, position, 4)
            if index == 0:
                position = _skip_string(block, position)
            position = _skip_string(block, position)
            context_free = index <= STATIC_TABLE_ENTRIES
            seen_field = True
        parts.append((start, position, context_free))
    return parts


def _string(block: bytes, position: int) -> tuple[bytes, int]:
    """RFC 7541 section 5.2: a string literal (Huffman-coded or not) and the offset after it."""
    huffman = block[position] & 0x80
    length, position = _prefix_integer(block, position, 7)
    end = position + length
    data = block[position:end]
    if huffman:
        try:
            data = decode_huffman(data)
        except HPACKError as error:
            raise HeaderDecodeError(str(error) or type(error).__name__) from None
    return data, end


def context_free_field(piece: bytes) -> Header:
    """Decode one context-free representation (as split_block marks them) without the table.

    Most such fields are found in the cache; the ones that change on every
    call (above all `grpc-timeout`) come here. Through `hpack.Decoder` one
    costs about 9 µs, mostly its general machinery; here the Huffman decoding
    is still hpack's, and the field costs about 2 µs.
    """
    if piece[0] & 0x80:  # an index into the static table
        index, _ = _prefix_integer(piece, 0, 7)
        return STATIC_TABLE[index - 1]
    index, position = _prefix_integer(piece, 0, 4)
    if index:
        name = STATIC_TABLE[index - 1][0]
    else:
        name, position = _string(piece, position)
    value, _ = _string(piece, position)
    return name, value


class HeaderDecoder:
    """One connection's HPACK decoder with the cache described above."""

    def __init__(self, max_header_list_size: int) -> None:
        # hpack checks the list size per call; we check the whole block ourselves.
        self._decoder = hpack.Decoder(max_header_list_size=1 << 30)
        self.max_header_list_size = max_header_list_size
        self._blocks: dict[bytes, tuple[HeaderList, int]] = {}
        self._fields: dict[bytes, Header] = {}

    def set_max_table_size(self, size: int) -> None:
        """The SETTINGS_HEADER_TABLE_SIZE we announced, once the peer acknowledged it."""
        self._decoder.max_allowed_table_size = size

    def decode(self, block: bytes) -> tuple[HeaderList, int]:
        """The header list and its size (RFC 7541's measure) for one complete block."""
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        headers: list[Header] = []
        fields = self._fields
        run_start = -1  # start of a run of representations for the real decoder
        all_context_free = True
        for start, end, context_free in split_block(block):
            if not context_free:
                all_context_free = False
                if run_start < 0:
                    run_start = start
                continue
            if run_start >= 0:
                headers.extend(self._decode(block[run_start:start]))
                run_start = -1
            piece = block[start:end]
            field = fields.get(piece)
            if field is None:
                field = context_free_field(piece)
                if len(fields) >= CACHE_LIMIT:
                    fields.clear()
                fields[piece] = field
            headers.append(field)
        if run_start >= 0:
            headers.extend(self._decode(block[run_start:]))
        result = tuple(headers)
        size = sum(len(name) + len(value) + ENTRY_OVERHEAD for name, value in result)
        if all_context_free:
            if len(self._blocks) >= CACHE_LIMIT:
                self._blocks.clear()
            self._blocks[block] = (result, size)
        return result, size

    def _decode(self, piece: bytes) -> list[Header]:
        try:
            return [(bytes(name), bytes(value)) for name, value in self._decoder.decode(piece, raw=True)]
        except HPACKError as error:
            raise HeaderDecodeError(str(error) or type(error).__name__) from None
        except (IndexError, ValueError) as error:  # hpack lets a few malformed inputs escape as these
            raise HeaderDecodeError(f"malformed header block: {error}") from None


_ENCODER = hpack.Encoder()


def encode_block(headers: Iterable[Header]) -> bytes:
    """A header block that never touches the peer's dynamic table.

    Every field is sent "never indexed" (static names still by index), so a
    block can be computed once and sent on any stream at any time.
    """
    fields = [hpack.NeverIndexedHeaderTuple(name, value) for name, value in headers]
    return _ENCODER.encode(fields, huffman=True)
