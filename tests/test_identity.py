"""
Pools that keep the client's identity (C{identity = "client"}): pooled
connections log in as the client's own role, with what pgtls kept of its
password at its first login (checked by the real server), so later logins
open no temporary connection, and libpq's C{channel_binding=require}
works through pgtls. Real psycopg clients, TLS on both legs.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.admin import psql, scrape
from support.dsn import admin_dsn, app_dsn
from support.pooling import admin
from support.proxy import route, start_proxy
from support.waiting import in_thread, sleep, until

from pgtls_twisted.testing.cluster import (
    APP_DB,
    MD5_PASSWORD,
    MD5_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
)

METRICS = {"bind_address": "127.0.0.1:0"}


def identity_route(pki: Any, cluster: Any, **pool: Any) -> dict[str, Any]:
    table = route(pki, cluster, name="own")
    table["pool"] = {"identity": "client", "max_size": 3, "acquire_timeout": "10s", **pool}
    return table


@pytest.fixture
def logged_connections(pg_tls):
    """
    Count the server's C{connection authorized} log lines of a user from
    now on (C{log_connections} turned on for the cluster).
    """
    with admin(pg_tls) as su:
        su.execute("ALTER SYSTEM SET log_connections = on")
        su.execute("SELECT pg_reload_conf()")
    start = len(pg_tls.log_path.read_text(errors="replace"))

    def count(user: str) -> int:
        text = pg_tls.log_path.read_text(errors="replace")[start:]
        return len(re.findall(rf"connection authorized: user={user}\b", text))

    yield count
    with admin(pg_tls) as su:
        su.execute("ALTER SYSTEM RESET log_connections")
        su.execute("SELECT pg_reload_conf()")


def who(dsn: str, **kwargs: Any) -> tuple[str, str]:
    with psycopg.connect(dsn, autocommit=True, **kwargs) as conn:
        return conn.execute("SELECT current_user, session_user").fetchone()


@pytest_twisted.ensureDeferred
async def test_queries_run_as_the_client(pki, pg_tls, tmp_path, logged_connections):
    proxy = start_proxy([identity_route(pki, pg_tls)], tmp_path, metrics=METRICS)
    dsn = app_dsn(proxy, pki)
    try:
        assert await in_thread(who, dsn) == (SCRAM_USER, SCRAM_USER)
        # The first login went to the server (a temporary connection), and
        # so did the pooled connection, as the client's role.
        cold = logged_connections(SCRAM_USER)
        assert cold == 2
        # Warm: no temporary connection; the idle pooled one serves.
        assert await in_thread(who, dsn) == (SCRAM_USER, SCRAM_USER)
        assert logged_connections(SCRAM_USER) == cold
        md5 = app_dsn(proxy, pki, user=MD5_USER, password=MD5_PASSWORD)
        assert await in_thread(who, md5) == (MD5_USER, MD5_USER)
        assert await in_thread(who, md5) == (MD5_USER, MD5_USER)
        assert logged_connections(MD5_USER) == 2

        def roles() -> list[tuple[str, int]]:
            with admin(pg_tls) as su:
                return su.execute(
                    "SELECT usename, count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND usename IN (%s, %s)"
                    " GROUP BY usename ORDER BY usename",
                    (APP_DB, MD5_USER, SCRAM_USER),
                ).fetchall()

        assert await in_thread(roles) == [(MD5_USER, 1), (SCRAM_USER, 1)]
        page = await scrape(proxy)
        for answer, count in (("server", 2), ("cache", 2), ("cache_refused", 0)):
            assert page.value("pgtls_pool_logins_total", route="own", answer=answer) == count
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_channel_binding_on_a_warm_cache(pki, pg_tls, tmp_path):
    proxy = start_proxy([identity_route(pki, pg_tls)], tmp_path)
    strict = app_dsn(proxy, pki, channel_binding="require", require_auth="scram-sha-256")
    try:
        # Cold: pgtls must ask for the password once, which libpq refuses.
        with pytest.raises(psycopg.OperationalError, match="requested a cleartext password"):
            await in_thread(who, strict)
        await in_thread(who, app_dsn(proxy, pki))
        # Warm: SCRAM-SHA-256-PLUS, bound to pgtls's own certificate.
        assert await in_thread(who, strict) == (SCRAM_USER, SCRAM_USER)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_wrong_password_on_a_warm_cache(pki, pg_tls, tmp_path, logged_connections):
    proxy = start_proxy([identity_route(pki, pg_tls)], tmp_path)
    try:
        await in_thread(who, app_dsn(proxy, pki))
        before = pg_tls.log_path.read_text(errors="replace")
        for user in (SCRAM_USER, MD5_USER):
            dsn = app_dsn(proxy, pki, user=user, password="wrong")
            if user == MD5_USER:
                await in_thread(who, app_dsn(proxy, pki, user=MD5_USER, password=MD5_PASSWORD))
                before = pg_tls.log_path.read_text(errors="replace")
            with pytest.raises(psycopg.OperationalError) as info:
                await in_thread(who, dsn)
            assert f'FATAL:  password authentication failed for user "{user}"' in str(info.value)
        # Nothing reached the server: no new log line at all.
        assert pg_tls.log_path.read_text(errors="replace") == before
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_password_change_ttl_and_forget(pki, pg_tls, tmp_path):
    """The old password works until the TTL, or FORGET; the new one once the keys are gone."""
    user, old, new = "ident_user", "old_pw", "new_pw"
    with admin(pg_tls) as su:
        su.execute(f"DROP ROLE IF EXISTS {user}")
        su.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{old}'")
        su.execute(f"GRANT CONNECT ON DATABASE {APP_DB} TO {user}")
    proxy = start_proxy([identity_route(pki, pg_tls, auth_cache_ttl="2s")], tmp_path)

    def login(password: str) -> str:
        try:
            return who(app_dsn(proxy, pki, user=user, password=password))[0]
        except psycopg.OperationalError as e:
            # (libpq gives no SQLSTATE for a failed connection: the text
            # is PostgreSQL's for 28P01.)
            if "password authentication failed" in str(e):
                return "refused 28P01"
            return str(e)

    try:
        assert await in_thread(login, old) == user
        with admin(pg_tls) as su:
            su.execute(f"ALTER ROLE {user} PASSWORD '{new}'")
        # Within the TTL the cached keys still open a session...
        assert await in_thread(login, old) == user
        # ...and the new password is refused until they are gone.
        assert await in_thread(login, new) == "refused 28P01"
        await sleep(2.2)
        assert await in_thread(login, old) == "refused 28P01"
        assert await in_thread(login, new) == user
        # FORGET: the next login goes to the server at once.
        with admin(pg_tls) as su:
            su.execute(f"ALTER ROLE {user} PASSWORD '{old}'")
        assert proxy.service.requestForget(user) == ["1 cached logins forgotten"]
        assert await in_thread(login, new) == "refused 28P01"
        assert await in_thread(login, old) == user
    finally:
        await proxy.stop()
        with admin(pg_tls) as su:
            su.execute(f"DROP OWNED BY {user}")
            su.execute(f"DROP ROLE IF EXISTS {user}")


@pytest_twisted.ensureDeferred
async def test_ttl_zero_checks_every_login(pki, pg_tls, tmp_path, logged_connections):
    proxy = start_proxy([identity_route(pki, pg_tls, auth_cache_ttl="0s")], tmp_path)
    try:
        for _ in range(3):
            assert await in_thread(who, app_dsn(proxy, pki)) == (SCRAM_USER, SCRAM_USER)
        # Three temporary connections, one pooled one.
        assert logged_connections(SCRAM_USER) == 4
        assert SCRAM_PASSWORD  # (the password the dsn carries)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_refused_keys_are_forgotten(pki, pg_tls, tmp_path):
    """
    A new pooled connection logs in with the cached keys; after a password
    change the server refuses them: the client waiting for it gets 28P01
    from pgtls saying so, the keys are gone, and the next login goes to
    the server again.
    """
    user, old, new = "ident_evict", "old_pw", "new_pw"
    with admin(pg_tls) as su:
        su.execute(f"DROP ROLE IF EXISTS {user}")
        su.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{old}'")
    proxy = start_proxy([identity_route(pki, pg_tls)], tmp_path)

    def session(password: str) -> str:
        try:
            with psycopg.connect(
                app_dsn(proxy, pki, user=user, password=password), autocommit=True
            ) as conn:
                return conn.execute("SELECT current_user").fetchone()[0]
        except psycopg.Error as e:
            return str(e)

    try:
        assert await in_thread(session, old) == user
        with admin(pg_tls) as su:
            su.execute(f"ALTER ROLE {user} PASSWORD '{new}'")
            su.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (user,),
            )
        pool = proxy.route().pools.pools[(user, APP_DB)]
        await until(lambda: pool.size == 0)
        # Warm: pgtls lets the old password in, but the new pooled
        # connection's login with the old keys is refused by the server.
        text = await in_thread(session, old)
        assert "log in again" in text, text
        assert proxy.route().pools.logins.secret(user, APP_DB) is None
        assert await in_thread(session, old) != user
        assert await in_thread(session, new) == user
    finally:
        await proxy.stop()
        with admin(pg_tls) as su:
            su.execute(f"DROP ROLE IF EXISTS {user}")


@pytest_twisted.ensureDeferred
async def test_forget_on_the_console(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [identity_route(pki, pg_tls)],
        tmp_path,
        admin={"auth": "backend", "users": [SCRAM_USER]},
    )
    try:
        await in_thread(who, app_dsn(proxy, pki))
        out, err, code = await psql(admin_dsn(proxy, pki), f"FORGET {SCRAM_USER}")
        assert code == 0, err
        assert "1 cached logins forgotten" in err
        assert proxy.route().pools.logins.secret(SCRAM_USER, APP_DB) is None
        out, err, code = await psql(admin_dsn(proxy, pki), "FORGET ALL")
        assert code == 0 and "0 cached logins forgotten" in err
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_no_secret_reaches_a_log(pki, pg_tls, tmp_path, events):
    proxy = start_proxy([identity_route(pki, pg_tls)], tmp_path)
    try:
        for _ in range(2):
            await in_thread(who, app_dsn(proxy, pki))
        await in_thread(who, app_dsn(proxy, pki, user=MD5_USER, password=MD5_PASSWORD))
        logins = proxy.route().pools.logins
        secrets = [SCRAM_PASSWORD, MD5_PASSWORD]
        keys = logins.secret(SCRAM_USER, APP_DB)
        for raw in (keys.client_key, keys.server_key, keys.stored_key):
            secrets += [raw.hex(), base64.b64encode(raw).decode(), repr(raw)]
        secrets.append(logins.secret(MD5_USER, APP_DB).inner.decode())
        text = "\n".join(repr(e) for e in events)
        assert events and not [s for s in secrets if s in text]
    finally:
        await proxy.stop()
