"""Kerberos (GSSAPI) to PostgreSQL with a real MIT KDC and a PostgreSQL that admits GSSAPI only.

Configured as in the kine fork: the principal is the DSN's user (`user` or
`user%40REALM`, logging in as role `user`), the keytab comes from the DSN's
krb5_keytab or KRB5_KTNAME. pykine fills a private credential cache from the
keytab and replaces the ticket at half its life; these tests give principals
tickets of a few seconds, so that expiry and key rotation happen while pykine
serves, and check on the server (pg_stat_gssapi) and in the KDC's log that
GSSAPI was used, by whom, and when new tickets were fetched.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from dbauth import AuthPykine, Load, assert_absent, fresh_name, load, metrics, refused, round_trip
from harness import free_port
from kerberos import REALM, GssPostgres, Kdc, kinit, kinit_error

SHORT_LIFE = 4.0
ROTATION_LIFE = 10.0


@pytest.fixture(scope="module")
def kdc() -> Iterator[Kdc]:
    server = Kdc()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def gss_postgres(kdc: Kdc) -> Iterator[GssPostgres]:
    server = GssPostgres(kdc)
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def scratch() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="pykine-krb-test-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def principal_with_keytab(
    kdc: Kdc, server: GssPostgres, directory: str, max_life: str | None = None
) -> tuple[str, str]:
    """A new principal, its PostgreSQL role (the principal's user part) and a keytab for it: (principal, keytab)."""
    role = f"krb_{os.path.basename(directory)[-8:].lower()}"
    role = "".join(char if char.isalnum() else "_" for char in role)
    principal = kdc.add_principal(role, max_life)
    server.admin(f"CREATE ROLE {role} LOGIN CREATEDB")
    keytab = os.path.join(directory, "client.keytab")
    kdc.write_keytab(keytab, principal)
    return principal, keytab


def role_of(principal: str) -> str:
    return principal.partition("@")[0]


def endpoint(server: GssPostgres, user: str, database: str, keytab: str | None = None) -> str:
    query = f"?krb5_keytab={keytab}" if keytab else ""
    return f"postgres://{user}@127.0.0.1:{server.port}/{database}{query}"


def gss_checked(server: GssPostgres, database: str, principal: str) -> list[tuple[int, str, float, bool, str]]:
    """pykine's sessions on `database`, each required to be GSSAPI-authenticated as `principal`."""
    sessions = server.gss_sessions(database)
    assert sessions, "pykine has no session on its database"
    for _, role, _, authenticated, who in sessions:
        assert (role, authenticated, who) == (role_of(principal), True, principal), sessions
    return sessions


def test_principal_as_user_at_realm_with_keytab_in_the_dsn(kdc: Kdc, gss_postgres: GssPostgres, scratch: str) -> None:
    """user%40REALM and ?krb5_keytab=: pykine logs in as role `user` by GSSAPI; the credential cache is private
    (a 0700 directory, a 0600 file) and removed at exit; neither the keytab's path nor the DSN reach the log."""
    principal, keytab = principal_with_keytab(kdc, gss_postgres, scratch)
    database = fresh_name("krb")
    temporary = os.path.join(scratch, "tmp")
    os.mkdir(temporary)
    user = principal.replace("@", "%40")
    metrics_address = f"127.0.0.1:{free_port()}"
    server = AuthPykine(
        endpoint(gss_postgres, user, database, keytab),
        "--debug",
        f"--metrics-bind-address={metrics_address}",
        env={**kdc.env(), "TMPDIR": temporary},
    )
    try:
        server.start()
        round_trip(server)
        gss_checked(gss_postgres, database, principal)
        (cache_directory,) = os.listdir(temporary)
        cache = os.path.join(temporary, cache_directory, "ccache")
        assert stat.S_IMODE(os.stat(os.path.dirname(cache)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
        scraped = metrics(metrics_address) + metrics(server.address)
    finally:
        log = server.stop_and_clean()
    assert os.listdir(temporary) == [], "the credential cache outlived pykine"
    assert_absent([keytab, os.path.basename(scratch)], log=log, metrics=scraped)


@pytest.mark.parametrize("variable", ["KRB5_KTNAME", "KRB5_CLIENT_KTNAME"])
def test_bare_user_and_keytab_from_the_environment(
    variable: str, kdc: Kdc, gss_postgres: GssPostgres, scratch: str
) -> None:
    """A bare user takes the realm from the krb5 configuration; KRB5_KTNAME or MIT's KRB5_CLIENT_KTNAME
    (FILE: form) names the keytab."""
    principal, keytab = principal_with_keytab(kdc, gss_postgres, scratch)
    database = fresh_name("krb")
    server = AuthPykine(
        endpoint(gss_postgres, role_of(principal), database), env={**kdc.env(), variable: f"FILE:{keytab}"}
    )
    try:
        server.start()
        round_trip(server)
        gss_checked(gss_postgres, database, principal)
    finally:
        server.stop_and_clean()


def test_principal_missing_from_the_keytab(kdc: Kdc, gss_postgres: GssPostgres, scratch: str) -> None:
    """A principal the keytab has no key for: one clear line naming the principal, not the keytab's path."""
    _, keytab = principal_with_keytab(kdc, gss_postgres, scratch)
    missing = f"nosuchuser%40{REALM}"
    line = refused(endpoint(gss_postgres, missing, fresh_name("krb"), keytab), env=kdc.env())
    assert f"Keytab contains no suitable keys for nosuchuser@{REALM}" in line, line
    assert keytab not in line and scratch not in line, line


@pytest.mark.parametrize(
    ("case", "mentions"),
    [
        ("missing-keytab", "cannot read the keytab named by krb5_keytab: No such file or directory"),
        ("missing-keytab-env", "cannot read the keytab named by KRB5_KTNAME: No such file or directory"),
        ("mysql", "Kerberos (krb5_keytab) is supported for postgres endpoints only"),
        ("with-iam", "--identity-provider aws and Kerberos (krb5_keytab) exclude each other"),
        ("no-user", "Kerberos needs the principal as the endpoint's user"),
        ("empty-realm", "Kerberos needs the principal as the endpoint's user"),
        ("no-kdc", "Cannot contact any KDC for realm"),
    ],
)
def test_bad_kerberos_configuration(
    case: str, mentions: str, kdc: Kdc, gss_postgres: GssPostgres, scratch: str
) -> None:
    """Each mistake is one `pykine: error:` line, exit code 2, and no keytab path."""
    principal, keytab = principal_with_keytab(kdc, gss_postgres, scratch)
    user = role_of(principal)
    missing = os.path.join(scratch, "no-such.keytab")
    env, args = kdc.env(), []
    database = fresh_name("krb")
    target = endpoint(gss_postgres, user, database, keytab)
    if case == "missing-keytab":
        target = endpoint(gss_postgres, user, database, missing)
    elif case == "missing-keytab-env":
        target, env = endpoint(gss_postgres, user, database), {**env, "KRB5_KTNAME": missing}
    elif case == "mysql":
        target = f"mysql://someone@tcp(127.0.0.1:{free_port()})/{database}?krb5_keytab={keytab}"
    elif case == "with-iam":
        args = ["--identity-provider=aws"]
    elif case == "no-user":
        target = f"postgres://127.0.0.1:{gss_postgres.port}/{database}?krb5_keytab={keytab}"
    elif case == "empty-realm":
        target = endpoint(gss_postgres, "someone%40", database, keytab)
    elif case == "no-kdc":
        unreachable = os.path.join(scratch, "krb5.conf")
        with open(kdc.krb5_conf) as good, open(unreachable, "w") as bad:
            bad.write(good.read().replace(f":{kdc.port}", f":{free_port()}"))
        env = {"KRB5_CONFIG": unreachable}
    line = refused(target, *args, env=env)
    assert mentions in line, line
    assert keytab not in line and missing not in line and scratch not in line, line


def test_connections_keep_working_across_ticket_expiry(kdc: Kdc, gss_postgres: GssPostgres, scratch: str) -> None:
    """Tickets of SHORT_LIFE seconds, a pool that replaces its connections every second, and load for over
    three ticket lifetimes: every request succeeds, connections made after the first ticket expired are
    GSSAPI-authenticated, the connections from the start are still there, and pykine fetched a new ticket
    about every half life. A ticket from the start (the test's own kinit) no longer gets anyone in."""
    principal, keytab = principal_with_keytab(kdc, gss_postgres, scratch, max_life=f"{SHORT_LIFE:.0f}s")
    database = fresh_name("krb")
    own_cache = os.path.join(scratch, "own.ccache")
    server = AuthPykine(
        endpoint(gss_postgres, principal.replace("@", "%40"), database, keytab),
        "--datastore-connection-max-lifetime=1s",
        env=kdc.env(),
    )
    try:
        server.start()
        started = time.time()
        kinit(kdc, keytab, principal, own_cache)
        assert gss_postgres.connect_with_cache(own_cache, role_of(principal)) == ""
        first = gss_checked(gss_postgres, database, principal)
        result = load(server, seconds=3 * SHORT_LIFE, threads=2)
        last = gss_checked(gss_postgres, database, principal)
        expired = gss_postgres.connect_with_cache(own_cache, role_of(principal))
    finally:
        server.stop_and_clean()
    assert not result.failures, result.failures[:5]
    assert result.ok > 50, result
    assert {pid for pid, *_ in first} & {pid for pid, *_ in last}, "no connection from the start survived"
    assert any(start > started + 1.5 * SHORT_LIFE for _, _, start, _, _ in last), last
    issued = [at for at, outcome in kdc.events(principal, since=started) if outcome == "ISSUE"]
    assert len(issued) >= 5, issued  # the test's kinit, pykine's first ticket and one per half life since
    assert "Ticket expired" in expired, expired


def test_rotated_key_and_replaced_keytab_without_restart(kdc: Kdc, gss_postgres: GssPostgres, scratch: str) -> None:
    """The principal's key is rotated in the KDC (kvno goes up): pykine's next ticket fetch with the old keytab
    is refused (PREAUTH_FAILED) while it keeps serving on its current ticket; the new keytab is then moved
    over the old file, and the same pykine process fetches tickets with it and opens new connections."""
    principal, keytab = principal_with_keytab(kdc, gss_postgres, scratch, max_life=f"{ROTATION_LIFE:.0f}s")
    database = fresh_name("krb")
    old_copy, new_keytab = os.path.join(scratch, "old.keytab"), os.path.join(scratch, "new.keytab")
    shutil.copy(keytab, old_copy)
    server = AuthPykine(
        endpoint(gss_postgres, principal.replace("@", "%40"), database, keytab),
        "--datastore-connection-max-lifetime=1s",
        env=kdc.env(),
    )
    results: list[Load] = []
    stop = threading.Event()
    loader = threading.Thread(target=lambda: results.append(load(server, 6 * ROTATION_LIFE, threads=2, stop=stop)))
    try:
        server.start()
        round_trip(server)
        process = server.process
        loader.start()
        rotated = time.time()
        kdc.write_keytab(new_keytab, principal)  # a new random key, kvno + 1
        # pykine's next fetch (at half the ticket's life) uses the old key and is refused.
        deadline = time.time() + ROTATION_LIFE
        while "PREAUTH_FAILED" not in [outcome for _, outcome in kdc.events(principal, since=rotated)]:
            assert time.time() < deadline, "pykine did not try the old keytab after the rotation"
            time.sleep(0.1)
        os.replace(new_keytab, keytab)
        replaced = time.time()
        # Its next attempt reads the replaced file: a ticket is issued after the refusals.
        deadline = replaced + ROTATION_LIFE
        while True:
            outcomes = [outcome for _, outcome in kdc.events(principal, since=rotated)]
            if "ISSUE" in outcomes[outcomes.index("PREAUTH_FAILED") :]:
                break
            assert time.time() < deadline, "pykine did not fetch a ticket with the replaced keytab"
            time.sleep(0.1)
        time.sleep(2.5)  # the pool replaces its connections every second: new ones use the new ticket
        stop.set()
        loader.join()
        after = gss_checked(gss_postgres, database, principal)
        assert server.process is process and process.poll() is None, "pykine restarted"
    finally:
        stop.set()
        if loader.is_alive():
            loader.join()
        log = server.stop_and_clean()
    (result,) = results
    assert not result.failures, result.failures[:5]
    assert result.ok > 50, result
    assert any(start > replaced + 1 for _, _, start, _, _ in after), (replaced, after)
    # The rotation was real: the old key no longer gets a ticket, the file now holds one that does.
    assert kinit_error(kdc, old_copy, principal), "the old key still gets tickets"
    assert kinit_error(kdc, keytab, principal) == ""
    assert "Decrypt integrity check failed" in log or "Preauthentication failed" in log, log[-2000:]
    assert_absent([keytab, scratch], log=log)
