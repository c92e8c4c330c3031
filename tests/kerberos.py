"""A real MIT KDC and a PostgreSQL that authenticates TCP clients with GSSAPI, both owned by the test.

The KDC (Debian's krb5-kdc) serves realm PYKINE.TEST on a free loopback port,
with its database, stash, configuration and log in a private directory;
principals and keytabs are made with kadmin.local. Its krb5.conf (KRB5_CONFIG)
is given to the KDC, the database server and pykine alike; it sets a one-second
clock skew, so that a ticket stops working when it expires rather than five
minutes later, and turns off DNS canonicalisation, so that the service
principal is postgres/127.0.0.1.

The KDC's log shows every ticket it issued and every request it refused; the
tests read it to see when pykine fetched tickets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import databases
import psycopg

REALM = "PYKINE.TEST"


def _tool(name: str) -> str:
    return shutil.which(name) or os.path.join("/usr/sbin", name)


class Kdc:
    """krb5kdc for REALM on 127.0.0.1:<free port>, started and stopped by the test."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="pykine-kdc-")
        os.chmod(self.directory, 0o755)  # the database server (another user) reads krb5.conf
        self.port = databases.free_port()
        self.krb5_conf = os.path.join(self.directory, "krb5.conf")
        self.kdc_conf = os.path.join(self.directory, "kdc.conf")
        self.log_path = os.path.join(self.directory, "kdc.log")
        self.process: subprocess.Popen[bytes] | None = None
        with open(self.krb5_conf, "w") as conf:
            conf.write(
                "[libdefaults]\n"
                f"  default_realm = {REALM}\n"
                "  dns_lookup_kdc = false\n  dns_lookup_realm = false\n"
                "  rdns = false\n  dns_canonicalize_hostname = false\n"
                "  clockskew = 1\n"
                "[realms]\n"
                f"  {REALM} = {{\n    kdc = 127.0.0.1:{self.port}\n  }}\n"
            )
        os.chmod(self.krb5_conf, 0o644)
        with open(self.kdc_conf, "w") as conf:
            conf.write(
                "[kdcdefaults]\n"
                f"  kdc_listen = 127.0.0.1:{self.port}\n  kdc_tcp_listen = 127.0.0.1:{self.port}\n"
                "[realms]\n"
                f"  {REALM} = {{\n"
                f"    database_name = {os.path.join(self.directory, 'principal')}\n"
                f"    key_stash_file = {os.path.join(self.directory, 'stash')}\n"
                f"    acl_file = {os.path.join(self.directory, 'kadm5.acl')}\n"
                "    max_life = 1h\n  }\n"
                "[logging]\n"
                f"  kdc = FILE:{self.log_path}\n"
                f"  admin_server = FILE:{os.path.join(self.directory, 'kadmin.log')}\n"
                f"  default = FILE:{os.path.join(self.directory, 'krb5.log')}\n"
            )
        with open(os.path.join(self.directory, "kadm5.acl"), "w"):
            pass
        self._run(_tool("kdb5_util"), "create", "-s", "-r", REALM, "-P", uuid.uuid4().hex, "-W")

    def env(self) -> dict[str, str]:
        """The variables that point krb5 (client, server or KDC) at this realm."""
        return {"KRB5_CONFIG": self.krb5_conf, "KRB5_KDC_PROFILE": self.kdc_conf}

    def _run(self, *command: str) -> str:
        done = subprocess.run(command, env={**os.environ, **self.env()}, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def start(self) -> None:
        with open(os.path.join(self.directory, "krb5kdc.out"), "ab") as out:
            self.process = subprocess.Popen(
                [_tool("krb5kdc"), "-n", "-r", REALM, "-P", os.path.join(self.directory, "krb5kdc.pid")],
                env={**os.environ, **self.env()},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        databases.wait_until_answers(self.port, self.process, os.path.join(self.directory, "krb5kdc.out"))

    def admin(self, query: str) -> str:
        """One kadmin.local command; fails the test if kadmin reports an error."""
        output = self._run(_tool("kadmin.local"), "-r", REALM, "-q", query)
        if re.search(r"\b(error|not found|no such|cannot|unable)\b", output, re.IGNORECASE):
            raise RuntimeError(f"kadmin.local {query!r}: {output}")
        return output

    def add_principal(self, name: str, max_life: str | None = None) -> str:
        """A principal with a random key (max_life like "6s" caps its tickets' lifetime); its full name.

        Pre-authentication is required, as in most realms, so the KDC checks the client's key before it
        issues a ticket, and its log tells a stale keytab (PREAUTH_FAILED) from a good one (ISSUE)."""
        principal = f"{name}@{REALM}"
        self.admin(f"addprinc -randkey +requires_preauth {f'-maxlife {max_life} ' if max_life else ''}{principal}")
        return principal

    def write_keytab(self, path: str, principal: str) -> None:
        """Give `principal` a new random key (its kvno goes up) and write that key to the keytab at `path`."""
        self.admin(f"ktadd -k {path} {principal}")

    def events(self, principal: str, since: float = 0.0) -> list[tuple[float, str]]:
        """(time, outcome) of the KDC's answers to `principal`'s initial-ticket requests: ISSUE, PREAUTH_FAILED,
        ...; the log has whole seconds, so `since` is rounded down."""
        found = []
        with open(self.log_path, errors="replace") as log:
            for line in log:
                match = re.search(r"AS_REQ .*?: (?P<outcome>[A-Z_]+): (?:authtime \d+, .*?, )?(?P<who>\S+) for", line)
                if match and match["who"] == principal:
                    stamp = time.mktime(time.strptime(f"{time.localtime().tm_year} {line[:15]}", "%Y %b %d %H:%M:%S"))
                    if stamp >= int(since):
                        found.append((stamp, match["outcome"]))
        return found

    def destroy(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.directory, ignore_errors=True)


class GssPostgres(databases.OwnedPostgres):
    """PostgreSQL that admits TCP clients by GSSAPI only (pg_hba `gss include_realm=0`, as the kine fork
    expects), with the service key postgres/127.0.0.1 in krb_server_keyfile."""

    def __init__(self, kdc: Kdc) -> None:
        self.kdc = kdc
        super().__init__()

    def initialise(self) -> None:
        super().initialise()
        keytab = os.path.join(self.directory, "server.keytab")
        self.kdc.write_keytab(keytab, self.kdc.add_principal("postgres/127.0.0.1"))
        os.chmod(keytab, 0o600)
        if os.geteuid() == 0:
            shutil.chown(keytab, "postgres", "postgres")
        with open(os.path.join(self.data, "pg_hba.conf"), "w") as hba:
            hba.write(f"local all all trust\nhost all all 127.0.0.1/32 gss include_realm=0 krb_realm={REALM}\n")

    def command(self) -> list[str]:
        return [*super().command(), "-c", f"krb_server_keyfile={os.path.join(self.directory, 'server.keytab')}"]

    def env(self) -> dict[str, str]:
        # The replay cache goes in the server's own directory, not /var/tmp.
        return {**os.environ, "KRB5_CONFIG": self.kdc.krb5_conf, "KRB5RCACHEDIR": self.directory}

    def admin(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A statement as the superuser over the Unix socket (trusted, no Kerberos)."""
        with psycopg.connect(host=self.directory, port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def gss_sessions(self, database: str) -> list[tuple[int, str, float, bool, str]]:
        """(pid, role, backend_start, gss_authenticated, principal) of the sessions on `database`."""
        return [
            (int(pid), str(role), float(start), bool(authenticated), str(principal or ""))
            for pid, role, start, authenticated, principal in self.admin(
                "SELECT a.pid, a.usename, extract(epoch FROM a.backend_start)::float8, g.gss_authenticated,"
                " g.principal FROM pg_stat_activity a JOIN pg_stat_gssapi g USING (pid) WHERE a.datname = %s",
                (database,),
            )
        ]

    def connect_with_cache(self, cache: str, role: str) -> str:
        """Connect over TCP (GSSAPI) in a separate process whose only credentials are `cache`;
        "" if that worked, else libpq's error."""
        program = (
            "import sys, psycopg\n"
            "try:\n"
            f"    psycopg.connect(host='127.0.0.1', port={self.port}, user={role!r}, dbname='postgres',"
            " gssencmode='prefer').close()\n"
            "except psycopg.Error as exc:\n"
            "    print(exc)\n"
        )
        env = {**os.environ, **self.kdc.env(), "KRB5CCNAME": f"FILE:{cache}"}
        env.pop("KRB5_CLIENT_KTNAME", None)
        done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr).strip()


def kinit(kdc: Kdc, keytab: str, principal: str, cache: str) -> None:
    """kinit -k -t: the test's own ticket from a keytab, independent of pykine."""
    subprocess.run(
        ["kinit", "-k", "-t", keytab, "-c", f"FILE:{cache}", principal],
        env={**os.environ, **kdc.env()},
        check=True,
        capture_output=True,
        timeout=60,
    )


def kinit_error(kdc: Kdc, keytab: str, principal: str) -> str:
    """What kinit says when it cannot get a ticket from `keytab` ("" if it can)."""
    cache = os.path.join(tempfile.mkdtemp(prefix="pykine-kinit-"), "ccache")
    try:
        done = subprocess.run(
            ["kinit", "-k", "-t", keytab, "-c", f"FILE:{cache}", principal],
            env={**os.environ, **kdc.env()},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return "" if done.returncode == 0 else done.stderr.strip()
    finally:
        shutil.rmtree(os.path.dirname(cache), ignore_errors=True)
