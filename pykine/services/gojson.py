"""The texts Go's encoding/json gives for a malformed body, which etcd's gateway returns as they are.

etcd's gateway reads a request with a json.Decoder, so a client sending bad
JSON gets Go's words ("invalid character 'b' looking for beginning of object
key string"). Clients and people match on them; this module finds the first
syntax error the way Go's scanner does and words it the same way. Only the
syntax is checked here: the value itself is then parsed by protobuf.
"""

from __future__ import annotations

WHITESPACE = " \t\r\n"


def _quote(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
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


BASE64 = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n")


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


def base64_error(text: str) -> str | None:
    """Go's base64.StdEncoding error for the first character it cannot take."""
    for index, char in enumerate(text):
        if char not in BASE64:
            return f"illegal base64 data at input byte {index}"
    return None
