"""What the database-authentication tests share: pykine started with an environment of its own, a
round trip, a steady load that records every failure, refusals, and looking for leaked secrets."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

from harness import ROOT, PykineServer, call, free_port, pb

# Variables that would let a test pykine find credentials or configuration of the machine it runs on.
FOREIGN_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "KRB5_CONFIG",
    "KRB5CCNAME",
    "KRB5_KTNAME",
    "KRB5_CLIENT_KTNAME",
    "KINE_IDENTITY_PROVIDER",
    "PYKINE_IDENTITY_PROVIDER",
    "PGSSLMODE",
)


def pykine_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without the machine's AWS and Kerberos settings, plus `extra`."""
    env = {name: value for name, value in os.environ.items() if name not in FOREIGN_VARIABLES}
    env.update(
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


class AuthPykine(PykineServer):
    """pykine with an environment of the test's choosing (credentials, Kerberos configuration)."""

    def __init__(self, endpoint: str, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__(tempfile.mkdtemp(prefix="pykine-dbauth-"), *args, endpoint=endpoint)
        self.extra_env = env or {}

    def env(self) -> dict[str, str]:
        return pykine_env(self.extra_env)

    def stop_and_clean(self) -> str:
        """Stop the server; its whole log."""
        self.stop()
        with open(self.log_path, errors="replace") as log:
            text = log.read()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return text


def fresh_name(purpose: str) -> str:
    return f"pykine_{purpose}_{uuid.uuid4().hex[:10]}"


def round_trip(server: PykineServer, key: bytes = b"auth/key") -> None:
    """A write and a read through pykine: the datastore took the credentials."""
    value = uuid.uuid4().hex.encode()
    put = call(server, "KV", "Put", pb.PutRequest(key=key, value=value))
    assert put.ok, put
    got = call(server, "KV", "Range", pb.RangeRequest(key=key))
    assert got.ok, got
    assert [(kv.key, kv.value) for kv in got.response.kvs] == [(key, value)]


@dataclass
class Load:
    ok: int = 0
    failures: list[str] = field(default_factory=list)


def load(
    server: PykineServer, seconds: float, threads: int = 3, pause: float = 0.01, stop: threading.Event | None = None
) -> Load:
    """Puts and ranges from a few threads for `seconds` (or until `stop` is set), `pause` apart; every failure
    is kept."""
    result = Load()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    stop = stop or threading.Event()

    def work(number: int) -> None:
        prefix = f"load/{number}/".encode()
        i = 0
        while time.monotonic() < deadline and not stop.is_set():
            for outcome in (
                call(server, "KV", "Put", pb.PutRequest(key=prefix + str(i % 8).encode(), value=b"v" * 32)),
                call(server, "KV", "Range", pb.RangeRequest(key=prefix, range_end=prefix[:-1] + b"0")),
            ):
                with lock:
                    if outcome.ok:
                        result.ok += 1
                    else:
                        result.failures.append(f"{outcome.code} {outcome.details}")
            i += 1
            time.sleep(pause)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return result


def refused(endpoint: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run pykine, which must exit with code 2 and one `pykine: error:` line; return that line."""
    done = subprocess.run(
        [sys.executable, "-m", "pykine", f"--listen-address=127.0.0.1:{free_port()}", f"--endpoint={endpoint}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=pykine_env(env or {}),
    )
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done
    assert len(lines) == 1 and lines[0].startswith("pykine: error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


def metrics(address: str) -> str:
    """The Prometheus text a server serves at http://address/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return response.read().decode()


def assert_absent(secrets: list[str], **texts: str) -> None:
    """None of `secrets` occurs in any of `texts` (named for the failure message)."""
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:6]}...) appears in {name}"


def self_signed_certificate(directory: str, owner: str | None = None) -> tuple[str, str]:
    """(certificate, key) for IP 127.0.0.1, readable by the database server's user only."""
    cert, key = os.path.join(directory, "server.crt"), os.path.join(directory, "server.key")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", key, "-out", cert),
        ],
        check=True,
        capture_output=True,
    )
    for path in (cert, key):
        os.chmod(path, 0o600)
        if owner is not None and os.geteuid() == 0:
            shutil.chown(path, owner, owner)
    return cert, key
