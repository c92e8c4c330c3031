"""Keeping credentials out of what pykine prints: log lines, error messages, /metrics.

Passwords and keytab paths are registered where they are read, and every log
line and start-up error passes through `redact`. IAM tokens are recognised by
their shape instead: a new one is signed for every connection, and any text
holding one is masked whole. URL user-info and conninfo passwords are masked
by shape too, so a DSN that was never registered stays safe as well.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

MASK = "***"
# Shorter registered values would mask ordinary words; the patterns below still catch them in DSNs.
MIN_SECRET_LENGTH = 4

_secrets: set[str] = set()

# scheme://user:password@ (kine's MySQL form too: mysql://user:password@tcp(host:port)/db).
_URL_PASSWORD = re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*(?=@)")
# libpq key=value conninfo: password=secret or password='se cret'.
_CONNINFO_PASSWORD = re.compile(r"(?P<keep>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s'\"]+)", re.IGNORECASE)
# An RDS IAM token is a presigned URL: host:port/?Action=connect&...&X-Amz-Signature=...
_IAM_TOKEN = re.compile(r"[^\s'\"]*X-Amz-(?:Algorithm|Credential|Signature|Security-Token)=[^\s'\"]*")


def register(*values: str) -> None:
    """Remember values that must never be printed (with their percent-encoded and decoded forms)."""
    for value in values:
        for form in {value, unquote(value), quote(value, safe="")}:
            if len(form) >= MIN_SECRET_LENGTH:
                _secrets.add(form)


def redact(text: str) -> str:
    """`text` with every registered secret, IAM token and DSN password replaced by ***."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    text = _IAM_TOKEN.sub(MASK, text)
    text = _URL_PASSWORD.sub(lambda match: match["keep"] + MASK, text)
    return _CONNINFO_PASSWORD.sub(lambda match: match["keep"] + MASK, text)
