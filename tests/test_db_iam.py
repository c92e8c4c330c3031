"""AWS RDS IAM authentication (--identity-provider aws) against a real PostgreSQL and a real MariaDB.

The servers are our own (tests/iam.py): they pass each connection's password
to PAM, where an independent SigV4 verifier (tests/iam_checker.py) accepts a
token only if it is correctly signed with the test's secret key for the
expected user, host and region, and was signed moments ago. The verifier logs
what it saw, so the tests can require that every new connection, pooled or not,
presented a token signed at that connection's time, and that connections
outlive their token. The verifier treats a token as expired after
MAX_AGE seconds, standing in for the 15 minutes AWS allows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from dbauth import AuthPykine, assert_absent, fresh_name, load, metrics, refused, round_trip
from harness import free_port
from iam import ROLE, Checker, IamMariaDB, IamPostgres, pam_service

from pykine.backends.identity import rds_region
from pykine.backends.mysql import lock_name
from pykine.redaction import redact

KEY_ID = "AKIAPYKINETESTKEY001"
SECRET = "pykine-test-secret-" + uuid.uuid4().hex
PROFILE_KEY_ID = "AKIAPYKINETESTKEY002"
PROFILE_SECRET = "pykine-profile-secret-" + uuid.uuid4().hex
MAX_AGE = 3.0
# An RDS-style name: the token is signed for it (and its region); hostaddr takes the connection to 127.0.0.1.
RDS_HOST = "pykine-test.c0ffee123456.eu-west-3.rds.amazonaws.com"
CONFIG_REGION = "us-west-2"


def aws_env(secret: str = SECRET, region: str | None = CONFIG_REGION) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": secret}
    if region:
        env["AWS_REGION"] = region
    return env


@pytest.fixture(scope="module")
def checker() -> Iterator[Checker]:
    directory = tempfile.mkdtemp(prefix="pykine-iam-")
    try:
        yield Checker(directory, {KEY_ID: SECRET, PROFILE_KEY_ID: PROFILE_SECRET}, MAX_AGE)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def service(checker: Checker) -> Iterator[str]:
    with pam_service(checker) as name:
        yield name


@pytest.fixture(scope="module")
def iam_postgres(service: str, checker: Checker) -> Iterator[IamPostgres]:
    server = IamPostgres(service)
    try:
        server.start()
        checker.expect(f"{RDS_HOST}:{server.port}", "eu-west-3")
        checker.expect(f"127.0.0.1:{server.port}", CONFIG_REGION)
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def iam_mariadb(service: str, checker: Checker) -> Iterator[IamMariaDB]:
    server = IamMariaDB(service)
    try:
        server.start()
        checker.expect(f"127.0.0.1:{server.port}", CONFIG_REGION)
        yield server
    finally:
        server.destroy()


def postgres_endpoint(server: IamPostgres, name: str, password: str = "") -> str:
    user = f"{ROLE}:{password}" if password else ROLE
    return f"postgres://{user}@{RDS_HOST}:{server.port}/{name}?hostaddr=127.0.0.1"


def mysql_endpoint(server: IamMariaDB, name: str) -> str:
    return f"mysql://{ROLE}@tcp(127.0.0.1:{server.port})/{name}?tls=skip-verify"


def check_tokens(entries: list[dict[str, Any]], host: str, region: str, key_id: str = KEY_ID) -> None:
    """Every token was accepted, was signed for our user, host, region and key, and is dated at the moment
    its connection authenticated (X-Amz-Date has whole seconds). SigV4 is deterministic, so connections
    opened within the same second present the same token; one from an earlier second would show here."""
    assert entries, "no connection presented a token"
    refused_ones = [(entry["reason"], entry.get("host")) for entry in entries if not entry["ok"]]
    assert not refused_ones, refused_ones
    for entry in entries:
        assert (entry["user"], entry["db_user"], entry["key_id"]) == (ROLE, ROLE, key_id), entry
        assert (entry["host"], entry["region"]) == (host, region), entry
        assert entry["expires"] == 900, entry
        assert -1.0 <= entry["time"] - entry["date"] <= 2.0, entry
    dates = [entry["date"] for entry in entries]
    assert all(later >= earlier - 1 for earlier, later in itertools.pairwise(dates)), dates


# -- PostgreSQL -----------------------------------------------------------------------------------


def test_postgres_new_connections_get_fresh_tokens(iam_postgres: IamPostgres, checker: Checker) -> None:
    """Pooled connections are replaced every second for seven: each new one presents a new token signed
    for the RDS host's region (not the configured one), while the LISTEN and duty connections made at
    start keep working long after their tokens would have expired; an old token is refused."""
    name = fresh_name("iam")
    since = checker.mark()
    server = AuthPykine(
        postgres_endpoint(iam_postgres, name),
        "--identity-provider=aws",
        "--skip-verify",
        "--datastore-connection-max-lifetime=1s",
        env=aws_env(),
    )
    try:
        server.start()
        started = time.time()
        round_trip(server)
        result = load(server, seconds=7.0, threads=2)
        sessions = iam_postgres.admin(
            "SELECT a.pid, extract(epoch FROM a.backend_start)::float8, s.ssl FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.usename = %s AND a.datname = %s",
            (ROLE, name),
        )
    finally:
        log = server.stop_and_clean()
    assert not result.failures, result.failures[:5]
    assert result.ok > 50, result
    entries = checker.entries(since)
    check_tokens(entries, f"{RDS_HOST}:{iam_postgres.port}", "eu-west-3")
    # The pool's replacements authenticated with new tokens well after the first ones had expired.
    assert len(entries) >= 8, len(entries)
    assert max(entry["date"] for entry in entries) - min(entry["date"] for entry in entries) > 2 * MAX_AGE
    # Each live session presented its own token when it started (PAM runs in the session's backend).
    assert sessions and all(ssl for _, _, ssl in sessions), sessions
    by_backend = {entry["ppid"]: entry for entry in entries}
    for pid, backend_start, _ in sessions:
        assert pid in by_backend, (pid, sorted(by_backend))
        assert abs(by_backend[pid]["date"] - backend_start) <= 2.0, (by_backend[pid], backend_start)
    # Connections outlive their token: the ones made at start were still serving at the end.
    oldest = min(backend_start for _, backend_start, _ in sessions)
    assert oldest <= started + 1 and time.time() - oldest > MAX_AGE + 3, (oldest, started)
    # And a token cannot be used again once it is old: the verifier really enforces the age.
    with pytest.raises(psycopg.OperationalError, match="PAM authentication failed"):
        psycopg.connect(
            host=RDS_HOST,
            hostaddr="127.0.0.1",
            port=iam_postgres.port,
            user=ROLE,
            password=entries[0]["token"],
            dbname="postgres",
            sslmode="require",
        ).close()
    assert checker.entries()[-1]["reason"] == "expired"
    assert_absent([SECRET, *(entry["token"] for entry in entries)], log=log)


# -- MariaDB --------------------------------------------------------------------------------------


def kine_sessions(server: IamMariaDB) -> set[int]:
    """The ids of pykine's connections."""
    return {int(row[0]) for row in server.admin(f"SELECT ID FROM information_schema.PROCESSLIST WHERE USER = '{ROLE}'")}


def duty_holder(server: IamMariaDB, database: str) -> int | None:
    """The connection holding pykine's duty lock for `database` (a named lock held for the process's life)."""
    rows = server.admin(f"SELECT IS_USED_LOCK('{lock_name('duties', database)}')")
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def test_mysql_new_connections_get_fresh_tokens(iam_mariadb: IamMariaDB, checker: Checker) -> None:
    """Once the first tokens are too old to use, the server drops pykine's pooled connections: the ones
    asyncmy opens instead present new tokens (mysql_clear_password over TLS, from password_creator), signed
    for the configured region, while the duty-lock connection made at start keeps working."""
    name = fresh_name("iam")
    since = checker.mark()
    server = AuthPykine(mysql_endpoint(iam_mariadb, name), "--identity-provider=aws", env=aws_env())
    try:
        server.start()
        round_trip(server)
        started = time.time()
        duty = duty_holder(iam_mariadb, name)
        assert duty is not None
        time.sleep(MAX_AGE + 1)
        dropped = time.time()
        for session in kine_sessions(iam_mariadb) - {duty}:
            iam_mariadb.admin(f"KILL CONNECTION {session}")
        time.sleep(0.5)
        result = load(server, seconds=2.0, threads=3)
        still_holding = duty_holder(iam_mariadb, name)
    finally:
        log = server.stop_and_clean()
    assert not result.failures, result.failures[:5]
    assert result.ok >= 20, result
    entries = checker.entries(since)
    check_tokens(entries, f"127.0.0.1:{iam_mariadb.port}", CONFIG_REGION)
    # The connections opened once the server dropped the others: a pool connection opened while the first
    # tokens were just turning old may present one signed a moment before, which the server still accepted.
    later = [entry for entry in entries if entry["time"] > dropped]
    assert later and all(entry["date"] > started + MAX_AGE for entry in later), later
    assert still_holding == duty, (duty, still_holding)
    assert_absent([SECRET, *(entry["token"] for entry in entries)], log=log)


def test_mysql_replayed_token_is_refused(iam_mariadb: IamMariaDB, checker: Checker) -> None:
    """The verifier refuses a token older than MAX_AGE on MariaDB too, so fresh tokens are what let pykine in."""
    import asyncio

    import asyncmy

    from pykine.backends.base import ConnectionOptions
    from pykine.backends.mysql import parse_dsn

    since = checker.mark()
    server = AuthPykine(mysql_endpoint(iam_mariadb, fresh_name("iam")), "--identity-provider=aws", env=aws_env())
    try:
        server.start()
        round_trip(server)
    finally:
        server.stop_and_clean()
    token = checker.entries(since)[0]["token"]
    time.sleep(MAX_AGE + 1)
    args = parse_dsn(mysql_endpoint(iam_mariadb, "mysql"), ConnectionOptions())

    async def connect() -> None:
        conn = await asyncmy.connect(**dict(args, password=token))
        await conn.ensure_closed()

    with pytest.raises(asyncmy.errors.OperationalError, match="Access denied"):
        asyncio.run(connect())
    assert checker.entries()[-1]["reason"] == "expired"


def test_mysql_credentials_from_a_profile(iam_mariadb: IamMariaDB, checker: Checker) -> None:
    """The standard chain's shared credentials and config files (AWS_PROFILE), region from the profile,
    and the provider from KINE_IDENTITY_PROVIDER as kine reads it."""
    directory = tempfile.mkdtemp(prefix="pykine-aws-profile-")
    try:
        credentials, config = os.path.join(directory, "credentials"), os.path.join(directory, "config")
        with open(credentials, "w") as file:
            file.write(
                f"[pykine-test]\naws_access_key_id = {PROFILE_KEY_ID}\naws_secret_access_key = {PROFILE_SECRET}\n"
            )
        with open(config, "w") as file:
            file.write(f"[profile pykine-test]\nregion = {CONFIG_REGION}\n")
        env = {
            "AWS_PROFILE": "pykine-test",
            "AWS_SHARED_CREDENTIALS_FILE": credentials,
            "AWS_CONFIG_FILE": config,
            "KINE_IDENTITY_PROVIDER": "aws",
        }
        since = checker.mark()
        server = AuthPykine(mysql_endpoint(iam_mariadb, fresh_name("iam")), env=env)
        try:
            server.start()
            round_trip(server)
        finally:
            log = server.stop_and_clean()
        check_tokens(checker.entries(since), f"127.0.0.1:{iam_mariadb.port}", CONFIG_REGION, PROFILE_KEY_ID)
        assert_absent([PROFILE_SECRET], log=log)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_wrong_secret_is_refused(
    kind: str, checker: Checker, iam_postgres: IamPostgres, iam_mariadb: IamMariaDB
) -> None:
    """A token signed with the wrong secret key is refused by the server, and pykine says so on one line,
    showing neither the key nor the token."""
    wrong = "wrong-secret-" + uuid.uuid4().hex
    since = checker.mark()
    if kind == "postgres":
        endpoint = postgres_endpoint(iam_postgres, fresh_name("iam")) + "&sslmode=require"
        mentions = f'PAM authentication failed for user "{ROLE}"'
    else:
        endpoint = mysql_endpoint(iam_mariadb, fresh_name("iam"))
        mentions = f"Access denied for user '{ROLE}'"
    line = refused(endpoint, env={**aws_env(secret=wrong), "PYKINE_IDENTITY_PROVIDER": "aws"})
    assert mentions in line, line
    entries = checker.entries(since)
    assert entries and all(entry["reason"] == "signature mismatch" for entry in entries), entries
    assert_absent([wrong, *(entry["token"] for entry in entries)], error=line)


@pytest.mark.parametrize(
    "endpoint",
    [
        "postgres://kine@127.0.0.1:{postgres}/db",
        "postgres://kine@127.0.0.1:{postgres}/db?sslmode=prefer",
        "mysql://kine@tcp(127.0.0.1:{mysql})/db",
        "mysql://kine@tcp(127.0.0.1:{mysql})/db?tls=false",
    ],
)
def test_iam_without_tls_is_refused_before_connecting(
    endpoint: str, iam_postgres: IamPostgres, iam_mariadb: IamMariaDB, checker: Checker
) -> None:
    """AWS requires TLS with IAM: pykine refuses to start without it and sends no token anywhere."""
    since = checker.mark()
    line = refused(
        endpoint.format(postgres=iam_postgres.port, mysql=iam_mariadb.port), "--identity-provider=aws", env=aws_env()
    )
    assert "--identity-provider aws needs TLS to the database" in line, line
    assert checker.entries(since) == []


@pytest.mark.parametrize(
    ("args", "env", "mentions"),
    [
        (["--identity-provider=gcp"], {}, "--identity-provider must be aws, got 'gcp'"),
        ([], {"KINE_IDENTITY_PROVIDER": "vault"}, "--identity-provider must be aws, got 'vault'"),
        (["--identity-provider=aws", "--endpoint=sqlite://state.db"], aws_env(), "--identity-provider applies"),
        (["--identity-provider=aws"], aws_env(region=None), "no AWS region"),
        (["--identity-provider=aws"], {"AWS_REGION": CONFIG_REGION}, "no AWS credentials found"),
        (
            ["--identity-provider=aws", f"--endpoint=postgres://127.0.0.1:{free_port()}/db?sslmode=require"],
            aws_env(),
            "needs the database user",
        ),
    ],
    ids=["unknown-flag", "unknown-env", "sqlite", "no-region", "no-credentials", "no-user"],
)
def test_bad_iam_configuration(args: list[str], env: dict[str, str], mentions: str) -> None:
    """Each mistake is one `pykine: error:` line and exit code 2, before any database is contacted."""
    # A closed port: these must fail on configuration alone.
    default = f"postgres://kine@127.0.0.1:{free_port()}/db?sslmode=require"
    endpoint = next((arg.removeprefix("--endpoint=") for arg in args if arg.startswith("--endpoint=")), default)
    line = refused(endpoint, *(arg for arg in args if not arg.startswith("--endpoint=")), env=env)
    assert mentions in line, line


def test_region_from_rds_host_names() -> None:
    """kine's rule: the label before .rds.amazonaws.com, for instances, clusters, proxies and China."""
    assert rds_region("mydb.c1a2b3.eu-west-3.rds.amazonaws.com") == "eu-west-3"
    assert rds_region("aurora.cluster-ro-c1a2b3.us-east-1.rds.amazonaws.com") == "us-east-1"
    assert rds_region("proxy.proxy-c1a2b3.ap-south-1.rds.amazonaws.com") == "ap-south-1"
    assert rds_region("db.c1a2b3.cn-north-1.rds.amazonaws.com.cn") == "cn-north-1"
    assert rds_region("127.0.0.1") is None
    assert rds_region("db.example.com") is None


# -- secrets --------------------------------------------------------------------------------------


def test_secrets_stay_out_of_logs_and_metrics(iam_postgres: IamPostgres, checker: Checker) -> None:
    """With --debug, JSON logs and both /metrics endpoints: no token, no secret key and no DSN password."""
    password = "dsn-password-" + uuid.uuid4().hex
    metrics_address = f"127.0.0.1:{free_port()}"
    since = checker.mark()
    server = AuthPykine(
        postgres_endpoint(iam_postgres, fresh_name("iam"), password=password) + "&sslmode=require",
        "--identity-provider=aws",
        "--debug",
        "--log-format=json",
        f"--metrics-bind-address={metrics_address}",
        "--datastore-connection-max-lifetime=1s",
        env=aws_env(),
    )
    try:
        server.start()
        round_trip(server)
        load(server, seconds=2.0, threads=1)
        scraped = metrics(metrics_address) + metrics(server.address)
    finally:
        log = server.stop_and_clean()
    tokens = [entry["token"] for entry in checker.entries(since)]
    assert tokens and "pykine_write_batch_requests" in scraped
    assert '"level": "debug"' in log  # the debug lines were there to leak, and did not
    assert_absent([SECRET, password, *tokens], log=log, metrics=scraped)


@pytest.mark.parametrize(
    "endpoint",
    [
        "mysql://root:{password}@tcp(127.0.0.1:not-a-port)/db",
        "mysql://root:{password}@tcp(127.0.0.1:{port})/db",
        "postgres://kine:{password}@127.0.0.1:{port}/db",
        "postgres://kine:{password}@127.0.0.1:{port}/db?sslmode=bogus",
        "foo://kine:{password}@127.0.0.1/db",
    ],
)
def test_dsn_password_stays_out_of_error_lines(endpoint: str) -> None:
    """A DSN that fails (bad port, nothing listening, bad option, unknown scheme) is reported without its password."""
    password = "pw-" + uuid.uuid4().hex
    line = refused(endpoint.format(password=password, port=free_port()))
    assert password not in line, line


def test_redaction_of_credential_shapes() -> None:
    """What `redact` masks without being told: URL passwords, conninfo passwords, IAM tokens."""
    token = (
        "db.c1.eu-west-3.rds.amazonaws.com:5432/?Action=connect&DBUser=kine&X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20260101%2Feu-west-3%2Frds-db%2Faws4_request&X-Amz-Signature=abc123"
    )
    text = f"postgres://kine:hunter22@db/x password=hunter33 password='a b' token {token} end"
    masked = redact(text)
    for secret in ("hunter22", "hunter33", "'a b'", token, "abc123"):
        assert secret not in masked, masked
    assert masked.startswith("postgres://kine:***@db/x") and masked.endswith(" token *** end"), masked
