"""The test database servers' check of an RDS IAM token, run by PAM (pam_exec expose_authtok).

The token arrives on standard input, the user PAM authenticates in PAM_USER.
It is accepted only if it is a SigV4-presigned `connect` URL for that user,
signed with a key the test configured, for the host and region the test
expects, and not older than the configured age (the test's stand-in for the
15 minutes AWS allows). This is our own reading of AWS's Signature Version 4,
written without botocore, so that pykine's tokens are checked by independent
code. Each check appends one JSON line to the configured log, which the tests
read. Standard library only: it runs under the system Python as the database
server's user.

Usage: iam_checker.py CONFIG.json (keys, endpoints, max_age, log)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import time
from calendar import timegm
from urllib.parse import parse_qsl, quote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "rds-db"
# Presigned URLs carry no payload hash; botocore signs "UNSIGNED-PAYLOAD", AWS's Go SDK the hash of nothing.
PAYLOAD_HASHES = ("UNSIGNED-PAYLOAD", hashlib.sha256(b"").hexdigest())
# How far in the future a token's date may be (clocks are the same machine's here).
FUTURE_SKEW = 5


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _encode(text: str) -> str:
    """SigV4's URI encoding: everything but the unreserved characters."""
    return quote(text, safe="-_.~")


def expected_signature(secret: str, host: str, params: list[tuple[str, str]], payload_hash: str) -> str:
    named = dict(params)
    day, region, service, terminator = named["X-Amz-Credential"].split("/")[1:]
    query = "&".join(f"{_encode(name)}={_encode(value)}" for name, value in sorted(params) if name != "X-Amz-Signature")
    canonical = "\n".join(["GET", "/", query, f"host:{host}", "", "host", payload_hash])
    scope = f"{day}/{region}/{service}/{terminator}"
    to_sign = "\n".join([ALGORITHM, named["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(("AWS4" + secret).encode(), day)
    for part in (region, service, terminator):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def check(token: str, user: str, config: dict, now: float) -> tuple[dict, str]:
    """(what the token says, "" if it is valid or why not)."""
    seen: dict = {}
    host, slash, query = token.partition("/?")
    if not slash:
        return seen, "not a presigned URL"
    params = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    named = dict(params)
    if len(named) != len(params):
        return seen, "repeated parameter"
    try:
        key_id, day, region, service, terminator = named["X-Amz-Credential"].split("/")
        seen = {
            "host": host,
            "key_id": key_id,
            "region": region,
            "db_user": named["DBUser"],
            "date": timegm(time.strptime(named["X-Amz-Date"], "%Y%m%dT%H%M%SZ")),
            "expires": int(named["X-Amz-Expires"]),
        }
        fields_ok = (
            named["Action"] == "connect"
            and named["X-Amz-Algorithm"] == ALGORITHM
            and named["X-Amz-SignedHeaders"] == "host"
            and (service, terminator) == (SERVICE, "aws4_request")
            and day == named["X-Amz-Date"][:8]
        )
        signature = named["X-Amz-Signature"]
    except (KeyError, ValueError):
        return seen, "missing or malformed field"
    if not fields_ok:
        return seen, "not an rds-db connect token"
    if seen["db_user"] != user:
        return seen, f"token for {seen['db_user']!r}, authenticating {user!r}"
    if config["endpoints"].get(host) != region:
        return seen, f"unexpected host or region {host} {region}"
    if key_id not in config["keys"]:
        return seen, "unknown access key"
    if not any(
        hmac.compare_digest(signature, expected_signature(config["keys"][key_id], host, params, payload))
        for payload in PAYLOAD_HASHES
    ):
        return seen, "signature mismatch"
    if seen["date"] > now + FUTURE_SKEW:
        return seen, "dated in the future"
    if not 0 < seen["expires"] <= 900 or now - seen["date"] > min(seen["expires"], config["max_age"]):
        return seen, "expired"
    return seen, ""


def main() -> int:
    with open(sys.argv[1]) as file:
        config = json.load(file)
    token = sys.stdin.buffer.read().rstrip(b"\0\r\n").decode("utf-8", "replace")
    now = time.time()
    user = os.environ.get("PAM_USER", "")
    try:
        seen, reason = check(token, user, config, now)
    except Exception as exc:  # a checker that crashes must still refuse, and say why
        seen, reason = {}, f"checker error: {exc!r}"
    entry = {
        "time": now,
        "user": user,
        "service": os.environ.get("PAM_SERVICE", ""),
        "ppid": os.getppid(),
        "token": token,
        "ok": not reason,
        "reason": reason,
        **seen,
    }
    descriptor = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(descriptor, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(descriptor)
    return 0 if entry["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
