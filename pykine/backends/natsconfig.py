"""kine's NATS DSN, parsed: servers, credentials, bucket and the other query options."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from pykine.backends.base import BackendError
from pykine.durations import parse_duration

log = logging.getLogger(__name__)

BUCKET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
KNOWN_OPTIONS = {
    "snapshotEntries",
    "bucket",
    "replicas",
    "revHistory",
    "slowMethod",
    "credsFile",
    "nkeySeedFile",
    "dataDir",
    "viewDir",
    "noEmbed",
    "stdoutLogging",
}
# kine's DSN options that need kine's own process layout; refused with a reason rather than ignored.
REFUSED_OPTIONS = {
    "dontListen": "an embedded server runs as a separate process here, so it must listen (on loopback)",
    "serverConfig": "give the DSN the running server's host instead of a configuration for an embedded one",
    "contextFile": "give the DSN the servers and credentials (credsFile, nkeySeedFile, user:password@) instead",
}


@dataclass(slots=True)
class NatsConfig:
    """What a nats:// DSN says (kine's form: servers, then ?bucket=…&replicas=…)."""

    servers: list[str] = field(default_factory=list)
    bucket: str = "kine"
    replicas: int = 1
    slow_method: float = 0.5
    creds_file: str = ""
    nkey_seed_file: str = ""
    user: str = ""
    password: str = ""
    token: str = ""
    tls: bool = False
    data_dir: str = "./db/nats"
    view_dir: str = "./db"
    embedded_host: str = ""
    embedded_port: int = 0
    stdout_logging: bool = False
    # Log entries between snapshots of a view; a view further behind than this starts from the snapshot.
    snapshot_entries: int = 100_000

    @property
    def embedded(self) -> bool:
        return not self.servers


def parse_dsn(dsn: str) -> NatsConfig:
    """kine's NATS DSN: nats://[user:pass@|token@]host:port[,nats://host2:port…][?options]; no host: embedded."""
    first, *others = dsn.split(",")
    parts = urlsplit(first)
    config = NatsConfig(tls=parts.scheme == "tls")
    no_embed = False
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in REFUSED_OPTIONS:
            raise BackendError(f"nats option {name} is not supported: {REFUSED_OPTIONS[name]}")
        if name not in KNOWN_OPTIONS:
            raise BackendError(f"unknown nats option {name!r} (known: {', '.join(sorted(KNOWN_OPTIONS))})")
        if name == "bucket":
            if not BUCKET_NAME.match(value):
                raise BackendError(f"nats bucket must be letters, digits, '-' or '_', got {value!r}")
            config.bucket = value
        elif name == "replicas":
            if not value.isdigit() or not 1 <= int(value) <= 5:
                raise BackendError(f"invalid replicas {value!r}, must be >= 1 and <= 5")
            config.replicas = int(value)
        elif name == "revHistory":
            if not value.isdigit() or not 2 <= int(value) <= 64:
                raise BackendError(f"invalid revHistory {value!r}, must be >= 2 and <= 64")
            log.info("nats: revHistory is kine's; pykine keeps every revision until compaction, as etcd")
        elif name == "slowMethod":
            try:
                config.slow_method = parse_duration(value)
            except ValueError as exc:
                raise BackendError(f"invalid slowMethod duration: {exc}") from None
        elif name == "credsFile":
            config.creds_file = value
        elif name == "nkeySeedFile":
            config.nkey_seed_file = value
        elif name == "dataDir":
            config.data_dir = value
        elif name == "viewDir":
            config.view_dir = value
        elif name == "snapshotEntries":
            if not value.isdigit() or int(value) < 1:
                raise BackendError(f"invalid snapshotEntries {value!r}, must be a positive number of log entries")
            config.snapshot_entries = int(value)
        elif name == "noEmbed":
            no_embed = True
        elif name == "stdoutLogging":
            config.stdout_logging = True
    if parts.username:
        if parts.password is not None:
            config.user, config.password = unquote(parts.username), unquote(parts.password)
        else:
            config.token = unquote(parts.username)
    if not parts.hostname:
        if others:
            raise BackendError("a nats DSN with several servers must name a host in the first")
        if no_embed:
            raise BackendError("nats DSN has no host and noEmbed is set: there is no server to connect to")
        return config
    scheme = "tls" if config.tls else "nats"
    config.servers = [f"{scheme}://{parts.hostname}:{parts.port or 4222}"]
    for other in others:
        extra = urlsplit(other if "://" in other else f"{scheme}://{other}")
        if extra.scheme not in ("nats", "tls") or not extra.hostname:
            raise BackendError(f"invalid nats server {other!r} in the DSN")
        config.tls = config.tls or extra.scheme == "tls"
        config.servers.append(f"{extra.scheme}://{extra.hostname}:{extra.port or 4222}")
    return config
