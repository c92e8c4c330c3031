"""Server-side TLS for the client port: one context, reloaded when its files change.

Certificates are rotated in place (k3s does it; etcd reloads its files on
every handshake), so the files are looked at again on each handshake, at
most once per `check_interval`. When they changed and load cleanly, a fresh
context is built and each later handshake is switched to it from the SNI
callback, which OpenSSL runs for every ClientHello, with or without a server
name. Connections already open keep the context they started with. Files
caught half-written fail to load; the last good context stays in use and the
next handshake tries again.

TLS 1.2 and 1.3 only. ALPN offers `h2` (gRPC) and `http/1.1` (the plain
HTTP routes) on the same port. With a trusted CA, clients must present a
certificate it signed (etcd's --client-cert-auth); the verified certificate's
CommonName is what `common_name` returns.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ALPN_PROTOCOLS = ["h2", "http/1.1"]


class TlsConfigError(Exception):
    """A certificate, key or CA file that cannot serve; the message says which and why."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert_file: str
    key_file: str
    # Empty: clients are not asked for a certificate.
    trusted_ca_file: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(path for path in (self.cert_file, self.key_file, self.trusted_ca_file) if path)


def _read_check(path: str, what: str) -> None:
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                raise TlsConfigError(f"{what} {path} is empty")
    except OSError as exc:
        raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _no_passphrase() -> str:
    # A server restarted unattended cannot be asked for one; without this OpenSSL prompts on the tty.
    raise TlsConfigError("the key file is encrypted; give an unencrypted key")


def build_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context from the files, or TlsConfigError naming the file at fault."""
    _read_check(files.cert_file, "certificate file")
    _read_check(files.key_file, "key file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    try:
        context.load_cert_chain(files.cert_file, files.key_file, password=_no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsConfigError(f"key file {files.key_file} does not match certificate {files.cert_file}") from exc
        raise TlsConfigError(
            f"cannot load certificate {files.cert_file} with key {files.key_file}: {exc.reason or exc}"
        ) from exc
    if files.trusted_ca_file:
        _read_check(files.trusted_ca_file, "trusted CA file")
        try:
            context.load_verify_locations(cafile=files.trusted_ca_file)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"cannot load trusted CA file {files.trusted_ca_file}: {exc.reason or exc}") from exc
        if not context.get_ca_certs():
            raise TlsConfigError(f"trusted CA file {files.trusted_ca_file} holds no CA certificate")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _signature(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is rewritten or replaced by a rename."""
    signature = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            signature.append((0, 0, 0))
        else:
            signature.append((info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(signature)


class ReloadingTls:
    """The context to listen with; later handshakes use the newest files that load."""

    def __init__(self, files: TlsFiles, check_interval: float = 1.0) -> None:
        self.files = files
        self.check_interval = check_interval
        self._signature = _signature(files.paths)
        self.listening_context = build_context(files)
        self.listening_context.sni_callback = self._on_client_hello
        self.current = self.listening_context
        self._checked = time.monotonic()
        self.reloads = 0

    def _on_client_hello(self, ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        self.maybe_reload()
        if self.current is not self.listening_context:
            ssl_object.context = self.current

    def maybe_reload(self) -> None:
        """Build a new context if the files changed since the last successful load."""
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return
        self._checked = now
        signature = _signature(self.files.paths)
        if signature == self._signature:
            return
        try:
            fresh = build_context(self.files)
        except TlsConfigError as exc:
            log.warning("TLS files changed but cannot be used yet, keeping the previous ones: %s", exc)
            return
        self.current = fresh
        self._signature = signature
        self.reloads += 1
        log.info("TLS certificate files reloaded")


def common_name(ssl_object: Any) -> str | None:
    """The verified client certificate's CommonName, if the client presented one."""
    if ssl_object is None:
        return None
    certificate = ssl_object.getpeercert()
    if not certificate:
        return None
    for entry in certificate.get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None
