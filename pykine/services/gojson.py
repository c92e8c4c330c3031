"""The texts Go's encoding/json gives for a malformed body, which etcd's gateway returns as they are.

etcd's gateway reads a request with a json.Decoder, so a client sending bad
JSON gets Go's words ("invalid character 'b' looking for beginning of object
key string"). Clients and people match on them; this module finds the first
syntax error the way Go's scanner does and words it the same way. Only the
syntax is checked here: the value itself is then parsed by protobuf.
"""

from __future__ import annotations

WHITESPACE = " \t\r\n"


# strconv.Quote's escapes, which Go's quoteChar uses for a character in an error.
_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v", "\\": "\\\\"}


def _quote(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    if char in _ESCAPES:
        return f"'{_ESCAPES[char]}'"
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"'\\x{ord(char):02x}'"
    return f"'{char}'"


class _Error(Exception):
    pass


def _invalid(char: str, context: str) -> _Error:
    return _Error(f"invalid character {_quote(char)} {context}")


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def peek(self) -> str:
        if self.at >= len(self.text):
            raise _Error("unexpected EOF")
        return self.text[self.at]

    def skip_space(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in WHITESPACE:
            self.at += 1

    def value(self) -> None:
        self.skip_space()
        char = self.peek()
        if char == "{":
            self.at += 1
            self.object()
        elif char == "[":
            self.at += 1
            self.array()
        elif char == '"':
            self.at += 1
            self.string()
        elif char == "-" or char.isdigit():
            self.number()
        elif char in "tfn":
            self.literal({"t": "true", "f": "false", "n": "null"}[char])
        else:
            raise _invalid(char, "looking for beginning of value")

    def object(self) -> None:
        self.skip_space()
        if self.peek() == "}":
            self.at += 1
            return
        while True:
            self.skip_space()
            char = self.peek()
            if char != '"':
                raise _invalid(char, "looking for beginning of object key string")
            self.at += 1
            self.string()
            self.skip_space()
            char = self.peek()
            if char != ":":
                raise _invalid(char, "after object key")
            self.at += 1
            self.value()
            self.skip_space()
            char = self.peek()
            self.at += 1
            if char == "}":
                return
            if char != ",":
                raise _invalid(char, "after object key:value pair")

    def array(self) -> None:
        self.skip_space()
        if self.peek() == "]":
            self.at += 1
            return
        while True:
            self.value()
            self.skip_space()
            char = self.peek()
            self.at += 1
            if char == "]":
                return
            if char != ",":
                raise _invalid(char, "after array element")

    def string(self) -> None:
        while True:
            char = self.peek()
            self.at += 1
            if char == '"':
                return
            if char == "\\":
                escaped = self.peek()
                self.at += 1
                if escaped == "u":
                    for _ in range(4):
                        digit = self.peek()
                        if digit not in "0123456789abcdefABCDEF":
                            raise _invalid(digit, "in \\u hexadecimal character escape")
                        self.at += 1
                elif escaped not in '"\\/bfnrt':
                    raise _invalid(escaped, "in string escape code")
            elif ord(char) < 0x20:
                raise _invalid(char, "in string literal")

    def number(self) -> None:
        if self.peek() == "-":
            self.at += 1
        char = self.peek()
        if not char.isdigit():
            raise _invalid(char, "in numeric literal")
        self.at += 1
        if char != "0":
            self._digits()
        if self.at < len(self.text) and self.text[self.at] == ".":
            self.at += 1
            char = self.peek()
            if not char.isdigit():
                raise _invalid(char, "after decimal point in numeric literal")
            self._digits()
        if self.at < len(self.text) and self.text[self.at] in "eE":
            self.at += 1
            if self.peek() in "+-":
                self.at += 1
            char = self.peek()
            if not char.isdigit():
                raise _invalid(char, "in exponent of numeric literal")
            self._digits()

    def _digits(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isdigit():
            self.at += 1

    def literal(self, word: str) -> None:
        for expected in word:
            char = self.peek()
            if char != expected:
                raise _invalid(char, f"in literal {word} (expecting {_quote(expected)})")
            self.at += 1


def syntax_error(text: str) -> str | None:
    """Go's message for the first JSON value in `text`, or None if it is well formed (what follows is ignored)."""
    try:
        _Scanner(text).value()
    except _Error as error:
        return str(error)
    return None


def value_end(text: str) -> int | str:
    """Where the first JSON value in `text` ends, or Go's words for why it is none ("unexpected EOF": cut short)."""
    scanner = _Scanner(text)
    try:
        scanner.value()
    except _Error as error:
        return str(error)
    return scanner.at


def json_type(value: object) -> str:
    """Go's name for a JSON value's kind, as in "cannot unmarshal number into ..."."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def unmarshal_error(text: str) -> str | None:
    """json.Unmarshal's message for `text` if it is not exactly one JSON value, else None."""
    end = value_end(text)
    if end == "unexpected EOF":
        # Go then feeds its scanner one space: a number cut short fails on that space.
        end = value_end(text + " ")
        return "unexpected end of JSON input" if end == "unexpected EOF" or isinstance(end, int) else end
    if isinstance(end, str):
        return end
    rest = text[end:].lstrip(WHITESPACE)
    if rest:
        return f"invalid character {_quote(rest[0])} after top-level value"
    return None


BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
BASE64_VALUES = {char: value for value, char in enumerate(BASE64_ALPHABET)}


def base64_decode(text: str) -> bytes | str:
    """The bytes, as Go's base64.StdEncoding decodes them (padding required, CR/LF skipped), or its error."""
    source = text.encode()
    out = bytearray()
    at = 0
    while True:
        quantum: list[int] = []
        while len(quantum) < 4:
            if at == len(source):
                if not quantum:
                    return bytes(out)
                return f"illegal base64 data at input byte {at - len(quantum)}"
            char = source[at]
            at += 1
            if char in BASE64_VALUES:
                quantum.append(BASE64_VALUES[char])
                continue
            if char in b"\r\n":
                continue
            if char != ord("=") or len(quantum) < 2:
                return f"illegal base64 data at input byte {at - 1}"
            if len(quantum) == 2:  # a second "=" must follow
                while at < len(source) and source[at] in b"\r\n":
                    at += 1
                if at == len(source):
                    return f"illegal base64 data at input byte {len(source)}"
                if source[at] != ord("="):
                    return f"illegal base64 data at input byte {at - 1}"
                at += 1
            while at < len(source) and source[at] in b"\r\n":
                at += 1
            if at < len(source):
                return f"illegal base64 data at input byte {at}"
            bits = 0
            for value in quantum:
                bits = bits << 6 | value
            bits <<= 6 * (4 - len(quantum))
            out += bits.to_bytes(3, "big")[: len(quantum) - 1]
            return bytes(out)
        bits = quantum[0] << 18 | quantum[1] << 12 | quantum[2] << 6 | quantum[3]
        out += bits.to_bytes(3, "big")
