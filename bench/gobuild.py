"""Build a one-file Go program on the real etcd Go client from Debian's sources.

Debian's golang-etcd-server-dev ships the client as GOPATH sources, so the
program is built in GOPATH mode with the module proxy off: nothing is fetched.
Used by the benchmark's load generator and by the Go client tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

GOCODE = Path("/usr/share/gocode")
CLIENTV3 = GOCODE / "src" / "go.etcd.io" / "etcd" / "clientv3"
GOCACHE = os.environ.get("GOCACHE") or os.path.join(tempfile.gettempdir(), "pykine-go-build-cache")
BINARIES = Path(tempfile.gettempdir()) / "pykine-go-binaries"


class GoBuildError(RuntimeError):
    """Go or the etcd client sources are missing, or the build failed."""


def build(source: Path, name: str, timeout: float = 600) -> Path:
    """Build `source` (a main package in one file) as `name`; cached by the source's hash."""
    go = shutil.which("go")
    if go is None:
        raise GoBuildError("`go` is not installed (make system-deps installs golang-go)")
    if not CLIENTV3.is_dir():
        raise GoBuildError(f"{CLIENTV3} is missing (make system-deps installs golang-etcd-server-dev)")
    code = source.read_bytes()
    binary = BINARIES / f"{name}-{hashlib.sha256(code + go.encode()).hexdigest()[:16]}"
    if binary.exists():
        return binary
    BINARIES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gopath-", dir=BINARIES) as gopath:
        package = Path(gopath) / "src" / name
        package.mkdir(parents=True)
        (package / "main.go").write_bytes(code)
        output = Path(gopath) / name
        env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}{os.pathsep}{GOCODE}", GOCACHE=GOCACHE)
        env.update(GOFLAGS="", GOPROXY="off")
        built = subprocess.run(
            [go, "build", "-o", str(output), name],
            cwd=gopath,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if built.returncode != 0:
            raise GoBuildError(f"go build of {source} failed:\n{built.stdout}\n{built.stderr}")
        os.replace(output, binary)
    return binary
