"""`pykine client …`: the storage client's calls from a shell, for debugging and scripts.

    pykine client [--endpoints E,…] [--ca-file F --cert-file F --key-file F] COMMAND …
      get KEY                      the key's data (-w json: key, data, modified)
      list PREFIX [--revision N]   every key under PREFIX (key line, then data line)
      create KEY DATA              prints the new revision
      update KEY REVISION DATA     compare-and-swap on the key's mod revision
      delete KEY REVISION          compare-and-delete
      watch PREFIX [--revision N]  one change per line pair, until interrupted

DATA `-` reads standard input. A failed call prints one `pykine client: error:`
line and exits 1 (2 for bad usage or configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import NoReturn

from pykine.client.connection import TLSConfig
from pykine.client.errors import ClientError, ConfigError
from pykine.client.storage import Client, Event, Value

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(message, 2)


def fail(message: str, code: int) -> NoReturn:
    print(f"pykine client: error: {message}", file=sys.stderr)
    sys.exit(code)


def _revision(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a revision is a whole number, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pykine client", description="Call etcd or pykine with the storage client.")
    parser.add_argument(
        "--endpoints",
        default=os.environ.get("PYKINE_CLIENT_ENDPOINTS", DEFAULT_ENDPOINTS),
        help=f"comma-separated http(s)://host:port (default {DEFAULT_ENDPOINTS}; env PYKINE_CLIENT_ENDPOINTS)",
    )
    parser.add_argument("--ca-file", default="", help="CA to verify the endpoints with (TLS)")
    parser.add_argument("--cert-file", default="", help="client certificate (mTLS)")
    parser.add_argument("--key-file", default="", help="client certificate's key (mTLS)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    parser.add_argument("-w", "--write-out", choices=("simple", "json"), default="simple", help="output format")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("get", help="a key's data").add_argument("key")
    listing = commands.add_parser("list", help="every key under a prefix")
    listing.add_argument("prefix")
    listing.add_argument("--revision", type=_revision, default=0, help="as of this revision (default: now)")
    create = commands.add_parser("create", help="store a new key")
    create.add_argument("key")
    create.add_argument("data", help="the data, or - for standard input")
    update = commands.add_parser("update", help="replace a key's data if it is at REVISION")
    update.add_argument("key")
    update.add_argument("revision", type=_revision)
    update.add_argument("data", help="the data, or - for standard input")
    delete = commands.add_parser("delete", help="delete a key if it is at REVISION")
    delete.add_argument("key")
    delete.add_argument("revision", type=_revision)
    watch = commands.add_parser("watch", help="print changes under a prefix")
    watch.add_argument("prefix")
    watch.add_argument("--revision", type=_revision, default=0, help="from this revision (default: from now)")
    for command in (listing, create, update, delete, watch, commands.choices["get"]):
        # Also after the command, as etcdctl takes it; the main parser's default stands otherwise.
        command.add_argument("-w", "--write-out", choices=("simple", "json"), default=argparse.SUPPRESS)
    return parser


def _data(text: str) -> bytes:
    return sys.stdin.buffer.read() if text == "-" else os.fsencode(text)


class Output:
    def __init__(self, form: str) -> None:
        self.json = form == "json"
        self.out = sys.stdout.buffer

    def value(self, value: Value, kind: str = "") -> None:
        if self.json:
            document: dict[str, object] = {"kind": kind} if kind else {}
            document.update(
                key=value.key.decode("utf-8", "replace"),
                data=value.data.decode("utf-8", "replace"),
                modified=value.modified,
            )
            self.out.write(json.dumps(document).encode() + b"\n")
        else:
            head = f"{kind.upper()} " if kind else ""
            self.out.write(head.encode() + value.key + b"\n" + value.data + b"\n")
        self.out.flush()

    def revision(self, revision: int) -> None:
        self.out.write(b'{"revision":%d}\n' % revision if self.json else b"%d\n" % revision)


async def run(args: argparse.Namespace) -> None:
    tls = None
    if args.ca_file or args.cert_file or args.key_file:
        tls = TLSConfig(args.ca_file, args.cert_file, args.key_file)
    output = Output(args.write_out)
    async with Client(args.endpoints, tls, timeout=args.timeout) as client:
        if args.command == "get":
            output.value(await client.get(args.key))
        elif args.command == "list":
            for value in await client.list(args.prefix, args.revision):
                output.value(value)
        elif args.command == "create":
            output.revision(await client.create(args.key, _data(args.data)))
        elif args.command == "update":
            output.revision(await client.update(args.key, args.revision, _data(args.data)))
        elif args.command == "delete":
            output.revision(await client.delete(args.key, args.revision))
        else:
            event: Event
            async for event in client.watch(args.prefix, args.revision):
                output.value(event.value, event.kind)


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(args))
    except ConfigError as error:
        fail(str(error), 2)
    except ClientError as error:
        fail(str(error), 1)
