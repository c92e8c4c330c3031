"""Database credentials that change while pykine runs: AWS RDS IAM tokens and Kerberos tickets.

A password is read once; these are not. An RDS IAM token is a SigV4-presigned
URL that the server checks only while a connection authenticates, and it is
valid for 15 minutes, so every new connection gets a newly signed token and
established connections keep working after theirs has expired. A Kerberos
ticket-granting ticket lives as long as the KDC allows; libpq reads it from a
credential cache, which pykine fills from a keytab and refills before the
ticket expires.

Both plug into the drivers' per-connection hooks, which the pools consult for
every connection they open (psycopg_pool's callable `kwargs`, asyncmy's
`password_creator`), and so do the connections pykine opens itself (schema,
LISTEN, duty lock). Configuration follows the kine fork (loft-sh/kine):
`--identity-provider aws`; the Kerberos principal as the DSN's user (`user` or
`user%40REALM`) with the keytab from the DSN's `krb5_keytab` or `KRB5_KTNAME`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pykine import redaction
from pykine.backends.base import BackendError, ConnectionOptions

log = logging.getLogger(__name__)

AWS = "aws"
IDENTITY_PROVIDERS = (AWS,)

# kine's region rule: the label before .rds.amazonaws.com in the endpoint's host name.
RDS_HOST = re.compile(r"(?:^|\.)(?P<region>[^.]+)\.rds\.amazonaws\.com(?:\.cn)?\.?$", re.IGNORECASE)

KEYTAB_PARAMETER = "krb5_keytab"
KEYTAB_VARIABLES = ("KRB5_KTNAME", "KRB5_CLIENT_KTNAME")
# A ticket is replaced once half its life has passed; failed attempts are retried with growing pauses.
REFRESH_FRACTION = 0.5
RETRY_FIRST, RETRY_MOST = 1.0, 30.0
# A connection needing a ticket closer than this (or this share of its life) to expiry fetches one first.
EXPIRY_MARGIN, EXPIRY_MARGIN_FRACTION = 60.0, 0.1
TLS_SSLMODES = ("require", "verify-ca", "verify-full")


def failure(message: str) -> BackendError:
    """A start-up or connection error on one line (libpq's can span several), every known secret masked."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    return BackendError(redaction.redact(line))


class Credentials:
    """Connection arguments that are the same for every connection: the DSN's own (password or none)."""

    async def start(self) -> None:
        """Get what the first connection needs."""

    async def connect_arguments(self) -> dict[str, Any]:
        """Extra driver arguments for one new connection (psycopg keyword arguments)."""
        return {}

    async def close(self) -> None:
        """Stop any background refresh and remove what start made."""


# -- AWS RDS IAM ---------------------------------------------------------------------------


def rds_region(host: str) -> str | None:
    """The region in an RDS or Aurora endpoint name (db.abc123.eu-west-1.rds.amazonaws.com)."""
    match = RDS_HOST.search(host)
    return match["region"] if match else None


class RdsTokens(Credentials):
    """Signs an RDS IAM authentication token for each new connection.

    botocore's generator signs locally (no network) with credentials from the
    standard chain: environment, shared config and credentials profile, web
    identity, container and instance roles; refreshable ones are refreshed by
    botocore before they expire.
    """

    def __init__(self, host: str, port: int, user: str) -> None:
        if not host or host.startswith("/"):
            raise failure("--identity-provider aws needs a TCP host name in the endpoint")
        if not user:
            raise failure("--identity-provider aws needs the database user in the endpoint (user@host)")
        try:
            import botocore.exceptions
            import botocore.session
        except ImportError:
            raise failure("--identity-provider aws needs botocore: pip install 'pykine[aws]'") from None
        self.host, self.port, self.user = host, port, user
        # botocore says at INFO where it found credentials; a start-up error must stay pykine's one line.
        logging.getLogger("botocore").setLevel(logging.WARNING)
        session = botocore.session.get_session()
        try:
            # AWS_REGION is what the other SDKs (kine's Go SDK among them) read; botocore reads
            # AWS_DEFAULT_REGION and the profile's region.
            self.region = rds_region(host) or os.environ.get("AWS_REGION") or session.get_config_variable("region")
            if not self.region:
                raise failure(
                    "--identity-provider aws: no AWS region: the endpoint host is not *.rds.amazonaws.com"
                    " and the AWS configuration names none (AWS_REGION, AWS_DEFAULT_REGION, or region in the profile)"
                )
            if session.get_credentials() is None:
                raise failure(
                    "--identity-provider aws: no AWS credentials found (environment, shared credentials"
                    " or config profile, web identity, container or instance role)"
                )
            self._client = session.create_client("rds", region_name=self.region)
        except botocore.exceptions.BotoCoreError as exc:
            raise failure(f"--identity-provider aws: {exc}") from exc
        self._errors: tuple[type[Exception], ...] = (botocore.exceptions.BotoCoreError,)

    def sign(self) -> str:
        """A new token; botocore may refresh credentials here, so this may block: call it off the loop."""
        try:
            token: str = self._client.generate_db_auth_token(
                DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.region
            )
        except self._errors as exc:
            raise failure(f"--identity-provider aws: cannot sign a token: {exc}") from exc
        return token

    async def token(self) -> str:
        """A new token for one connection (asyncmy's password_creator)."""
        return await asyncio.to_thread(self.sign)

    async def connect_arguments(self) -> dict[str, Any]:
        return {"password": await self.token()}


# -- Kerberos --------------------------------------------------------------------------------


def take_keytab(dsn: str) -> tuple[str, str, str]:
    """(the DSN without krb5_keytab, the keytab name or "", where it came from), as the kine fork reads it:
    the DSN's krb5_keytab first, then KRB5_KTNAME (and MIT's KRB5_CLIENT_KTNAME); a FILE: prefix is dropped."""
    parts = urlsplit(dsn)
    params = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(name, value) for name, value in params if name != KEYTAB_PARAMETER]
    keytab, source = next((value for name, value in params if name == KEYTAB_PARAMETER), ""), KEYTAB_PARAMETER
    if keytab:
        redaction.register(keytab)
    if len(kept) != len(params):
        dsn = urlunsplit(parts._replace(query=urlencode(kept)))
    if not keytab:
        for variable in KEYTAB_VARIABLES:
            keytab, source = os.environ.get(variable, ""), variable
            if keytab:
                break
    if keytab:
        redaction.register(keytab)
    keytab = keytab.removeprefix("FILE:")
    if keytab:
        redaction.register(keytab)
    return dsn, keytab, source


class KeytabTickets(Credentials):
    """Keeps a Kerberos ticket-granting ticket for one principal in a private credential cache.

    libpq (bundled in psycopg-binary with its own MIT krb5) does the GSSAPI
    exchange with the server and takes the initiator's ticket from the default
    credential cache, KRB5CCNAME. Two copies of krb5 in one process share no
    MEMORY: cache, so the cache is a FILE: in a directory only this process
    can read, and KRB5CCNAME names it. Filling it is `kinit -k -t` done in
    process, through pykrb5 (krb5_get_init_creds_keytab), which reports MIT's
    own errors ("Keytab contains no suitable keys for ..."); python-gssapi's
    credential-store acquisition reports that same mistake as "No credentials
    cache found".

    Renewal: once half the ticket's life has passed a new ticket is fetched
    from the keytab (rather than renewing the old one), so tickets need not be
    renewable and a keytab replaced after a key rotation is read at the next
    refresh, without a restart. The new cache is written beside the old one and
    renamed over it, so libpq never reads a half-written cache. Established
    connections are not affected: the server checks a ticket only at
    authentication.
    """

    def __init__(self, principal: str, role: str, keytab: str, source: str, arguments: dict[str, str]) -> None:
        try:
            import krb5
        except ImportError:
            raise failure("Kerberos authentication needs pykrb5: pip install 'pykine[kerberos]'") from None
        self._krb5 = krb5
        self.principal = principal
        self.arguments = {"user": role, **arguments}
        self.keytab = keytab
        self.source = source
        self._directory = ""
        self._starts = self._expires = 0.0
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def cache_path(self) -> str:
        return os.path.join(self._directory, "ccache")

    async def start(self) -> None:
        if self.keytab.startswith("/") or ":" not in self.keytab:
            try:
                with open(self.keytab, "rb"):
                    pass
            except OSError as exc:
                raise failure(f"kerberos: cannot read the keytab named by {self.source}: {exc.strerror}") from None
        self._lock = asyncio.Lock()
        self._directory = tempfile.mkdtemp(prefix="pykine-krb5-")  # mode 0700
        os.environ["KRB5CCNAME"] = "FILE:" + self.cache_path
        await self._refresh()
        self._task = asyncio.create_task(self._keep_fresh(), name="pykine-kerberos-refresh")

    def _fetch(self) -> tuple[float, float]:
        """Blocking: a ticket from the keytab into a new cache renamed over the current one; (start, end)."""
        krb5 = self._krb5
        try:
            context = krb5.init_context()
            principal = krb5.parse_name_flags(context, self.principal.encode())
            keytab = krb5.kt_resolve(context, self.keytab.encode())
            options = krb5.get_init_creds_opt_alloc(context)
            creds = krb5.get_init_creds_keytab(context, principal, options, keytab=keytab)
            staging = self.cache_path + ".new"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            cache = krb5.cc_resolve(context, ("FILE:" + staging).encode())
            krb5.cc_initialize(context, cache, creds.client)
            krb5.cc_store_cred(context, cache, creds)
        except krb5.Krb5Error as exc:
            # str() ends with the numeric code; the message before it is MIT's own.
            text = str(exc).removesuffix(f" {exc.err_code}")
            raise failure(f"kerberos: cannot get a ticket for {self.principal} from the keytab: {text}") from None
        except ValueError as exc:
            raise failure(f"kerberos: bad principal {self.principal!r}: {exc}") from None
        try:
            os.replace(staging, self.cache_path)
        except OSError as exc:
            raise failure(f"kerberos: cannot store the ticket: {exc.strerror}") from None
        times = creds.times
        return float(times.starttime or times.authtime), float(times.endtime)

    async def _refresh(self, unless_after: float | None = None) -> None:
        """Fetch a ticket, unless one expiring after `unless_after` arrived while we waited for the lock."""
        assert self._lock is not None
        async with self._lock:
            if unless_after is not None and self._expires > unless_after:
                return
            self._starts, self._expires = await asyncio.to_thread(self._fetch)
        log.debug(
            "kerberos: ticket for %s valid until %s",
            self.principal,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._expires)),
        )

    def _refresh_at(self) -> float:
        return self._starts + (self._expires - self._starts) * REFRESH_FRACTION

    async def _keep_fresh(self) -> None:
        """Replace the ticket at half its life; on failure retry, 1 s at first, then up to every 30 s."""
        failures = 0
        while True:
            await asyncio.sleep(max(0.0, self._refresh_at() - time.time()))
            try:
                await self._refresh()
                failures = 0
            except Exception as exc:  # keep trying: the current ticket still serves until it expires
                failures += 1
                pause = min(RETRY_MOST, RETRY_FIRST * 2 ** (failures - 1))
                left = self._expires - time.time()
                state = f"the current ticket expires in {left:.0f} s" if left > 0 else "the current ticket has expired"
                log.warning("%s (%s; retrying in %.0f s)", exc, state, pause)
                await asyncio.sleep(pause)

    async def connect_arguments(self) -> dict[str, Any]:
        """The role to log in as (libpq takes the ticket from the cache); first a new ticket if the current
        one is about to expire, in case the refresh task was held up (a suspended machine, say)."""
        margin = min(EXPIRY_MARGIN, (self._expires - self._starts) * EXPIRY_MARGIN_FRACTION)
        if time.time() >= self._expires - margin:
            await self._refresh(unless_after=self._expires)
        return self.arguments

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._directory:
            if os.environ.get("KRB5CCNAME") == "FILE:" + self.cache_path:
                del os.environ["KRB5CCNAME"]
            shutil.rmtree(self._directory, ignore_errors=True)


# -- choosing ------------------------------------------------------------------------------


def check_provider(options: ConnectionOptions) -> None:
    if options.identity_provider and options.identity_provider not in IDENTITY_PROVIDERS:
        raise failure(f"unknown identity provider {options.identity_provider!r} (supported: aws)")


def postgres_credentials(conninfo: str, options: ConnectionOptions, keytab: str, keytab_source: str) -> Credentials:
    """How pykine authenticates to PostgreSQL: an IAM token, a Kerberos ticket, or what the DSN says.

    With Kerberos the login role is the principal's user part: the kine fork sends `user` for
    `user%40REALM`, for pg_hba's `gss include_realm=0` (or a pg_ident map) to match.
    """
    from psycopg.conninfo import conninfo_to_dict

    check_provider(options)
    try:
        settings = conninfo_to_dict(conninfo)
    except Exception as exc:
        raise failure(f"cannot parse postgres endpoint: {exc}") from None
    if settings.get("password"):
        redaction.register(str(settings["password"]))
    user = str(settings.get("user") or "")
    if keytab:
        if options.identity_provider:
            raise failure(
                f"--identity-provider {options.identity_provider} and Kerberos ({keytab_source}) exclude each other"
            )
        role, at, realm = user.partition("@")
        if not role or (at and not realm) or "@" in realm:
            raise failure(f"Kerberos needs the principal as the endpoint's user (user or user%40REALM), got {user!r}")
        # libpq's own default, said out loud: psycopg warns when GSS encryption came from the default.
        arguments = {} if settings.get("gssencmode") else {"gssencmode": "prefer"}
        return KeytabTickets(user, role, keytab, keytab_source, arguments)
    if options.identity_provider == AWS:
        sslmode = str(settings.get("sslmode") or os.environ.get("PGSSLMODE", ""))
        if sslmode not in TLS_SSLMODES:
            raise failure(
                "--identity-provider aws needs TLS to the database, as AWS requires: set --ca-file or"
                " --skip-verify, or sslmode=require, verify-ca or verify-full in the endpoint"
            )
        host = str(settings.get("host") or "")
        if "," in host:
            raise failure("--identity-provider aws needs a single host in the endpoint")
        port = str(settings.get("port") or "5432")
        if not port.isdigit():
            raise failure(f"postgres endpoint port must be a number, got {port!r}")
        return RdsTokens(host, int(port), user)
    return Credentials()


def mysql_token_source(args: dict[str, Any], options: ConnectionOptions) -> RdsTokens | None:
    """The IAM token signer for a MySQL endpoint's connection arguments, if IAM is asked for."""
    check_provider(options)
    if options.identity_provider != AWS:
        return None
    if args.get("ssl") is None:
        raise failure(
            "--identity-provider aws needs TLS to the database, as AWS requires: set --ca-file or"
            " --skip-verify, or tls=true in the endpoint"
        )
    return RdsTokens(str(args.get("host", "")), int(args.get("port", 0)), str(args["user"]))
