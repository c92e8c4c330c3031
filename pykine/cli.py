"""The `pykine` command line, compatible with kine's flags.

Every flag can also come from the environment as PYKINE_<FLAG>, and, where
kine has the flag, as KINE_<FLAG>. A command-line flag wins over both.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn

from pykine import __version__
from pykine.backends.base import ConnectionOptions
from pykine.durations import parse_duration
from pykine.engine.tokens import TokenConfigError, load_jwt, parse_token_option
from pykine.transport.tls import TlsConfigError, TlsFiles, build_context

# Flags kine also has, so KINE_<FLAG> is honoured for them.
KINE_FLAGS = {
    "listen-address",
    "endpoint",
    "debug",
    "emulated-etcd-version",
    "compact-batch-size",
    "metrics-bind-address",
    "watch-progress-notify-interval",
    "ca-file",
    "cert-file",
    "key-file",
    "skip-verify",
    "datastore-max-idle-connections",
    "datastore-max-open-connections",
    "datastore-connection-max-lifetime",
    "identity-provider",
    "server-cert-file",
    "server-key-file",
    "trusted-ca-file",
}

# Listen schemes that promise TLS.
SECURE_SCHEMES = ("https://", "unixs://")


@dataclass(slots=True)
class Settings:
    listen_address: str
    endpoint: str
    log_format: str
    debug: bool
    emulated_etcd_version: str
    compact_batch_size: int
    metrics_bind_address: str
    watch_progress_notify_interval: float
    workers: int
    # etcd's --quota-backend-bytes: 0 is etcd's default (2 GiB), negative is no quota.
    quota_backend_bytes: int
    # TLS, pool and polling settings for a database-server datastore.
    connection: ConnectionOptions
    # Set by the supervisor for its workers: they share one port on purpose.
    reuse_port: bool
    # Client-facing TLS (and, with a trusted CA, required client certificates); None: plaintext.
    tls: TlsFiles | None = None
    # etcd's --auth-token (simple, or jwt,…) and --auth-token-ttl (seconds, for simple tokens).
    auth_token: str = "simple"
    auth_token_ttl: int = 300


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One clear line and exit code 2, instead of usage plus error."""
        self.exit(2, f"pykine: error: {message}\n")


def _env(flag: str) -> str | None:
    name = flag.upper().replace("-", "_")
    value = os.environ.get(f"PYKINE_{name}")
    if value is None and flag in KINE_FLAGS:
        value = os.environ.get(f"KINE_{name}")
    return value


def _env_bool(flag: str) -> bool:
    value = _env(flag)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    fail(f"environment value for --{flag} must be true or false, got {value!r}")


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"pykine: error: {message}\n")
    raise SystemExit(2)


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _integer(text: str) -> int:
    return _whole_number(text, -(2**31))


def _integer64(text: str) -> int:
    return _whole_number(text, -(2**63))


def _duration_or_zero(text: str) -> float:
    return 0.0 if text == "0" else _duration(text)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pykine",
        description="An etcd v3 API server backed by ordinary databases.",
        epilog="`pykine client …` calls etcd or pykine with the storage client (pykine client --help).",
    )
    parser.add_argument(
        "--listen-address",
        default=_env("listen-address") or "127.0.0.1:2379",
        help="host:port or unix://path to serve gRPC on (default 127.0.0.1:2379)",
    )
    parser.add_argument(
        "--endpoint",
        default=_env("endpoint") or "",
        help="datastore DSN; empty means SQLite at ./db/state.db, or sqlite://path.db?options; "
        "http(s)://etcd:2379[,…] forwards every call to those etcd endpoints",
    )
    parser.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=_env("log-format") or "plain",
        help="log line format (default plain)",
    )
    parser.add_argument("--debug", action="store_true", default=_env_bool("debug"), help="log at debug level")
    parser.add_argument(
        "--emulated-etcd-version",
        default=_env("emulated-etcd-version") or "3.5.13",
        help="etcd version reported by Maintenance.Status (default 3.5.13)",
    )
    parser.add_argument(
        "--compact-batch-size",
        type=_positive_int,
        default=_env("compact-batch-size") or "1000",
        help="revisions compacted per transaction (default 1000)",
    )
    parser.add_argument(
        "--metrics-bind-address",
        default=_env("metrics-bind-address") or "",
        help="host:port to serve Prometheus /metrics on (default: off)",
    )
    parser.add_argument(
        "--watch-progress-notify-interval",
        type=_duration,
        default=_env("watch-progress-notify-interval") or "5s",
        help="how often watches that asked for progress notifications get one (default 5s)",
    )
    parser.add_argument(
        "--quota-backend-bytes",
        type=_integer64,
        default=_env("quota-backend-bytes") or "0",
        help="raise the NOSPACE alarm when the datastore grows past this many bytes"
        " (etcd's flag: 0 means 2 GiB, negative means no quota)",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=_env("workers") or "1",
        help="serving processes sharing the port and the datastore (default 1)",
    )
    parser.add_argument(
        "--auth-token",
        default=_env("auth-token") or "simple",
        help="auth tokens, as etcd: simple, or jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256[,ttl=5m]",
    )
    parser.add_argument(
        "--auth-token-ttl",
        type=_positive_int,
        default=_env("auth-token-ttl") or "300",
        help="seconds a simple token stays valid without being used (default 300)",
    )
    client_tls = parser.add_argument_group("client TLS (TLS 1.2+, files reloaded when they change)")
    for flag, what in (
        ("server-cert-file", "certificate to serve clients with (turns TLS on)"),
        ("server-key-file", "key of --server-cert-file"),
        ("trusted-ca-file", "CA that must have signed every client's certificate (turns mTLS on)"),
    ):
        client_tls.add_argument(f"--{flag}", default=_env(flag) or "", help=what)
    datastore = parser.add_argument_group("database servers (postgres://, mysql://) and etcd (https://)")
    for flag, what in (
        ("ca-file", "CA certificate to verify the database server (or etcd) with"),
        ("cert-file", "client certificate to present to the database server (or etcd)"),
        ("key-file", "key of the client certificate"),
    ):
        datastore.add_argument(f"--{flag}", default=_env(flag) or "", help=what)
    datastore.add_argument(
        "--skip-verify",
        action="store_true",
        default=_env_bool("skip-verify"),
        help="use TLS but do not verify the database server's certificate",
    )
    datastore.add_argument(
        "--datastore-max-idle-connections",
        type=_integer,
        default=_env("datastore-max-idle-connections") or "0",
        help="pooled connections kept open while idle; negative: none (default 0: 2)",
    )
    datastore.add_argument(
        "--datastore-max-open-connections",
        type=_integer,
        default=_env("datastore-max-open-connections") or "0",
        help="most pooled connections open at once (default 0: 8); PostgreSQL adds 2 of its own"
        " (LISTEN, duty lock), MySQL 1 (duty lock)",
    )
    datastore.add_argument(
        "--datastore-connection-max-lifetime",
        type=_duration_or_zero,
        default=_env("datastore-connection-max-lifetime") or "0",
        help="replace connections older than this, like 30m (default 0: 1h)",
    )
    datastore.add_argument(
        "--datastore-poll-interval",
        type=_duration,
        default=_env("datastore-poll-interval") or None,
        help="how often to look for other instances' commits where the database cannot notify"
        " (default: mysql 50ms, sqlite shared by --workers 20ms, postgres 1s behind LISTEN/NOTIFY)",
    )
    datastore.add_argument(
        "--identity-provider",
        default=_env("identity-provider") or "",
        help="temporary database credentials: aws signs an RDS IAM token for every new connection"
        " (needs TLS to the database; default: none)",
    )
    dqlite = parser.add_argument_group("dqlite (dqlite://<data-dir>)")
    dqlite.add_argument(
        "--peer-bind-address",
        default=_env("peer-bind-address") or "",
        help="IPv4 address:port this process's dqlite node listens on for its peers (default 127.0.0.1:2380)",
    )
    dqlite.add_argument(
        "--peer-advertise-address",
        default=_env("peer-advertise-address") or "",
        help="address:port the other nodes reach this node at (default: --peer-bind-address)",
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"pykine {__version__}")
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    if args.log_format not in ("plain", "json"):
        fail(f"--log-format must be plain or json, got {args.log_format!r}")
    if args.metrics_bind_address and not re.fullmatch(r".*:\d+", args.metrics_bind_address):
        fail(f"--metrics-bind-address must be host:port, got {args.metrics_bind_address!r}")
    if not re.fullmatch(r"\d+\.\d+\.\d+", args.emulated_etcd_version):
        fail(f"--emulated-etcd-version must look like 3.5.13, got {args.emulated_etcd_version!r}")
    if args.identity_provider not in ("", "aws"):
        fail(f"--identity-provider must be aws, got {args.identity_provider!r}")
    if args.workers > 1 and re.fullmatch(r"nats://(\?.*)?", args.endpoint):
        fail("--workers needs a NATS DSN with a host: an embedded NATS server belongs to one process")
    if args.workers > 1 and args.endpoint.startswith("dqlite://"):
        fail("--workers does not apply to dqlite: the dqlite node belongs to one process")
    if (args.peer_bind_address or args.peer_advertise_address) and not args.endpoint.startswith("dqlite://"):
        fail("--peer-bind-address and --peer-advertise-address apply to dqlite:// endpoints only")
    if args.skip_verify and args.endpoint.startswith(("http://", "https://")):
        fail("--skip-verify does not apply to a passthrough: give etcd's CA with --ca-file")
    tls = _client_tls(args)
    if tls is None and args.listen_address.startswith(SECURE_SCHEMES):
        fail(f"--listen-address {args.listen_address} needs --server-cert-file and --server-key-file")
    return Settings(
        listen_address=args.listen_address,
        endpoint=args.endpoint,
        log_format=args.log_format,
        debug=args.debug,
        emulated_etcd_version=args.emulated_etcd_version,
        compact_batch_size=args.compact_batch_size,
        metrics_bind_address=args.metrics_bind_address,
        watch_progress_notify_interval=args.watch_progress_notify_interval,
        workers=args.workers,
        quota_backend_bytes=args.quota_backend_bytes,
        connection=ConnectionOptions(
            ca_file=args.ca_file,
            cert_file=args.cert_file,
            key_file=args.key_file,
            skip_verify=args.skip_verify,
            max_idle_connections=args.datastore_max_idle_connections,
            max_open_connections=args.datastore_max_open_connections,
            connection_max_lifetime=args.datastore_connection_max_lifetime,
            poll_interval=args.datastore_poll_interval or 0.0,
            identity_provider=args.identity_provider,
            peer_bind_address=args.peer_bind_address,
            peer_advertise_address=args.peer_advertise_address,
        ),
        reuse_port=args.reuse_port,
        tls=tls,
        auth_token=_auth_token(args.auth_token),
        auth_token_ttl=args.auth_token_ttl,
    )


def _auth_token(option: str) -> str:
    """Checked now (JWT keys read and tried), so that a mistake is one line at start-up."""
    try:
        kind, settings = parse_token_option(option)
        if kind == "jwt":
            load_jwt(settings)
    except TokenConfigError as exc:
        fail(str(exc))
    return option


def _client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The client TLS files, checked now so that every mistake is one line at start-up."""
    if not (args.server_cert_file or args.server_key_file or args.trusted_ca_file):
        return None
    if not args.server_cert_file:
        fail("--server-key-file and --trusted-ca-file need --server-cert-file")
    if not args.server_key_file:
        fail("--server-cert-file needs --server-key-file")
    files = TlsFiles(args.server_cert_file, args.server_key_file, args.trusted_ca_file)
    try:
        build_context(files)
    except TlsConfigError as exc:
        fail(f"client TLS: {exc}")
    return files


def main(argv: list[str] | None = None) -> None:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["client"]:
        from pykine.client.command import main as client_main

        client_main(arguments[1:])
        return
    settings = parse_settings(argv)
    if settings.workers > 1:
        from pykine.workers import supervise

        supervise(settings, sys.argv[1:] if argv is None else argv)
        return
    from pykine.server import run

    run(settings)
