"""Database servers that accept RDS IAM tokens the way AWS's do, checked by our own SigV4 verifier.

AWS's servers check an IAM token with a plugin of their own. Ours hand the
password to PAM: PostgreSQL's `pam` method in pg_hba.conf, MariaDB's PAM
plugin with pam_use_cleartext_plugin (the client sends the token with
mysql_clear_password, as it does to RDS). The PAM service runs
iam_checker.py through pam_exec with expose_authtok, so every token a new
connection presents is verified (signature, user, host, region, age) and
logged for the tests to read. Both servers accept TLS connections only.

The PAM service is a file in /etc/pam.d: its name is unique to the test run,
and it is removed when the fixture ends. MariaDB's `auth_pam` (version 2)
needs its setuid helper, auth_pam_tool, which some images strip; `auth_pam_v1`
runs PAM inside the server (root here), which is all the test needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import databases
import psycopg
from dbauth import self_signed_certificate

HERE = os.path.dirname(os.path.abspath(__file__))
PAM_DIRECTORY = "/etc/pam.d"
ROLE = "kine"


def system_python() -> str:
    """An interpreter the database server's user can run (a virtualenv under /root may be closed to it)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)


class Checker:
    """iam_checker.py, its configuration and its log, in a directory the database servers can read."""

    def __init__(self, directory: str, keys: dict[str, str], max_age: float) -> None:
        self.directory = directory
        os.chmod(directory, 0o755)
        self.script = os.path.join(directory, "iam_checker.py")
        shutil.copy(os.path.join(HERE, "iam_checker.py"), self.script)
        os.chmod(self.script, 0o644)
        self.config_path = os.path.join(directory, "checker.json")
        self.log_path = os.path.join(directory, "checks.log")
        with open(self.log_path, "w"):
            pass
        os.chmod(self.log_path, 0o666)  # PostgreSQL's backends run the checker as the postgres user
        self.config: dict[str, Any] = {"keys": keys, "endpoints": {}, "max_age": max_age, "log": self.log_path}
        self._write()

    def _write(self) -> None:
        with open(self.config_path + ".new", "w") as file:
            json.dump(self.config, file)
        os.chmod(self.config_path + ".new", 0o644)
        os.replace(self.config_path + ".new", self.config_path)

    def expect(self, host_port: str, region: str) -> None:
        """Accept tokens for `host_port` signed for `region`."""
        self.config["endpoints"][host_port] = region
        self._write()

    def mark(self) -> int:
        """A position in the log, for `entries(since=...)`."""
        return len(self.entries())

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        """Every check since `since`, in order."""
        with open(self.log_path) as log:
            return [json.loads(line) for line in log.read().splitlines()[since:]]


@contextlib.contextmanager
def pam_service(checker: Checker) -> Iterator[str]:
    """A PAM service that lets in exactly the connections whose token the checker accepts; its name."""
    name = f"pykine-iam-test-{uuid.uuid4().hex[:12]}"
    path = os.path.join(PAM_DIRECTORY, name)
    with open(path, "x") as service:
        service.write(
            "# Written by pykine's tests (tests/iam.py), removed when they end.\n"
            f"auth required pam_exec.so expose_authtok quiet {system_python()} -I {checker.script}"
            f" {checker.config_path}\n"
            "account required pam_permit.so\n"
        )
    try:
        yield name
    finally:
        os.unlink(path)


class IamPostgres(databases.OwnedPostgres):
    """PostgreSQL with ssl=on that admits TCP clients through PAM over TLS only, and a login role `kine`."""

    def __init__(self, service: str) -> None:
        self.service = service
        super().__init__()

    def initialise(self) -> None:
        super().initialise()
        self_signed_certificate(self.directory, owner="postgres")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write(f"local all all trust\nhostssl all all 127.0.0.1/32 pam pamservice={self.service}\n")

    def command(self) -> list[str]:
        return [
            *super().command(),
            *("-c", "ssl=on"),
            *("-c", f"ssl_cert_file={os.path.join(self.directory, 'server.crt')}"),
            *("-c", f"ssl_key_file={os.path.join(self.directory, 'server.key')}"),
        ]

    def start(self) -> None:
        super().start()
        self.admin(f"CREATE ROLE {ROLE} LOGIN CREATEDB")

    def admin(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A statement as the superuser, over the Unix socket (trusted, no PAM)."""
        with psycopg.connect(host=self.directory, port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []


class IamMariaDB(databases.OwnedMariaDB):
    """MariaDB with grant tables, TLS required, and a user `kine` identified via PAM."""

    def __init__(self, service: str) -> None:
        self.service = service
        super().__init__()

    def initialise(self) -> None:
        super().initialise()
        self_signed_certificate(self.directory)

    def command(self) -> list[str]:
        return [
            *(arg for arg in super().command() if arg != "--skip-grant-tables"),
            "--plugin-load-add=auth_pam_v1",
            "--pam-use-cleartext-plugin=ON",
            f"--ssl-cert={os.path.join(self.directory, 'server.crt')}",
            f"--ssl-key={os.path.join(self.directory, 'server.key')}",
            "--require-secure-transport=ON",
        ]

    def start(self) -> None:
        super().start()
        self.admin(f"CREATE USER IF NOT EXISTS '{ROLE}'@'%' IDENTIFIED VIA pam USING '{self.service}'")
        self.admin(f"GRANT ALL PRIVILEGES ON *.* TO '{ROLE}'@'%'")

    def admin(self, statement: str) -> list[tuple[Any, ...]]:
        """A statement as root over the Unix socket (root has no password there)."""
        return databases.run_sql(f"mysql://root@unix({os.path.join(self.directory, 'mysqld.sock')})/mysql", statement)
