"""
Session state in a transaction pool never reaches the next client: the
client that creates it is pinned to its server connection (or refused,
with C{pool.pinning = "refuse"}), and the connection is reset before
anyone else has it. Real psycopg clients in their default settings.
"""

from __future__ import annotations

import psycopg
import pytest
import pytest_twisted
from support.admin import scrape
from support.dsn import app_dsn
from support.pooling import pooled_route, the_pool
from support.proxy import start_proxy
from support.waiting import in_thread, until

from pgtls_twisted.ops._commands import client_pin
from pgtls_twisted.testing.cluster import APP_DB

METRICS = {"bind_address": "127.0.0.1:0"}

#: What client A does to its session, statement by statement.
SESSION_STATE = [
    "SET app.tenant_id = 'A'",
    "CREATE TEMP TABLE secrets (x int)",
    "INSERT INTO secrets VALUES (42)",
    "SELECT pg_advisory_lock(1)",
    "SET statement_timeout = '1ms'",
    "SET search_path = pg_temp, public",
]


def what_b_sees(conn: psycopg.Connection) -> dict[str, object]:
    """
    Everything of A's session that B must not see. (A custom setting that
    was ever set in a server session reads as C{''} after a reset, not
    NULL: PostgreSQL keeps the placeholder. The value is what matters.)
    """
    tenant = conn.execute("SELECT current_setting('app.tenant_id', true)").fetchone()[0]
    return {
        "tenant": tenant or None,
        "temp": conn.execute("SELECT to_regclass('pg_temp.secrets') IS NOT NULL").fetchone()[0],
        "lock": conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ).fetchone()[0],
        "timeout": conn.execute("SHOW statement_timeout").fetchone()[0],
        # Would time out under A's statement_timeout.
        "slow": conn.execute("SELECT pg_sleep(0.01)").fetchone() is not None,
        "prepared": conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0],
    }


CLEAN = {"tenant": None, "temp": False, "lock": 0, "timeout": "0", "slow": True, "prepared": 0}


@pytest_twisted.ensureDeferred
async def test_session_state_never_leaks(pki, pg_tls, tmp_path, events):
    """The issue's scenario, on a one-connection pool so that B gets A's connection."""
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path, metrics=METRICS)
    dsn = app_dsn(proxy, pki)

    def a_then_b():
        a = psycopg.connect(dsn, autocommit=True)
        pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        for sql in SESSION_STATE:
            a.execute(sql)
        # A keeps all of it, across transactions.
        assert a.execute("SELECT x FROM secrets").fetchone()[0] == 42
        assert a.execute("SELECT current_setting('app.tenant_id')").fetchone()[0] == "A"
        route = proxy.route()
        pins = [client_pin(c) for c in route.clients if c.session is not None]
        a.close()
        with psycopg.connect(dsn, autocommit=True) as b:
            same = b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
            return pins, same, what_b_sees(b)

    try:
        pins, same, seen = await in_thread(a_then_b, timeout=60)
        assert pins == ["SET app.tenant_id"]
        assert same  # the connection was reset and reused, not closed
        assert seen == CLEAN
        page = await scrape(proxy)
        assert (
            page.value(
                "pgtls_pool_pinned_clients_total",
                route="pool-transaction",
                database=APP_DB,
                reason="SET",
            )
            == 1
        )
        pinned = [e for e in events if "client pinned" in e.get("log_format", "")]
        assert len(pinned) == 1  # once per client, not per statement
    finally:
        await proxy.stop()


@pytest.mark.parametrize(
    "sql",
    [
        "LISTEN somewhere",
        "PREPARE p AS SELECT 1",
        "SELECT pg_advisory_lock(7)",
        "SELECT set_config('app.x', 'y', false)",
        "CREATE TEMPORARY TABLE t (x int)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "SET ROLE pool_user",
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_kind_pins(pki, pg_tls, tmp_path, sql):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)

    def run():
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as a:
            a.execute(sql)
            pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
            pins = [client_pin(c) for c in proxy.route().clients if c.session is not None]
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as b:
            same = b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
            return pins, same, what_b_sees(b)

    try:
        pins, same, seen = await in_thread(run, timeout=60)
        assert len(pins) == 1 and pins[0]
        assert same
        assert seen == CLEAN
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_unpinned_clients_share_connections(pki, pg_tls, tmp_path):
    """SET LOCAL, tracked parameters and _xact_ locks do not pin."""
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)

    def run():
        with psycopg.connect(app_dsn(proxy, pki)) as a:
            a.execute("SET LOCAL app.tenant_id = 'A'")
            a.execute("SELECT pg_advisory_xact_lock(3)")
            a.execute("SET application_name = 'a-app'")
            a.commit()
            pins = [client_pin(c) for c in proxy.route().clients if c.session is not None]
            name = a.execute("SHOW application_name").fetchone()[0]
            a.commit()
        return pins, name

    try:
        pins, name = await in_thread(run, timeout=60)
        assert pins == [""]
        assert name == "a-app"  # re-applied, as before
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_refuse_mode(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1, pinning="refuse")], tmp_path)

    def run():
        out = []
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as a:
            for sql, params in (
                ("SET app.tenant_id = 'A'", None),
                ("SELECT set_config(%s, %s, false)", ("app.x", "y")),
                ("LISTEN x", None),
            ):
                try:
                    a.execute(sql, params)
                    out.append("ran")
                except psycopg.errors.FeatureNotSupported as e:
                    out.append(e.diag.message_primary)
            # Not fatal: the client goes on, unpinned.
            out.append(a.execute("SELECT 1").fetchone()[0])
            out.append(a.execute("SELECT current_setting('app.tenant_id', true)").fetchone()[0])
        return out

    try:
        out = await in_thread(run, timeout=60)
        assert out[3:] == [1, None]
        assert all(isinstance(m, str) and m.startswith("pgtls: ") for m in out[:3]), out
        assert "SET app.tenant_id" in out[0]
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_listen_receives_notifications_while_idle(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=2)], tmp_path)

    def run():
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as listener:
            listener.execute("LISTEN news")
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as sender:
                for i in range(3):
                    sender.execute("SELECT pg_notify('news', %s)", (str(i),))
            got = []
            for note in listener.notifies(timeout=5, stop_after=3):
                got.append(note.payload)
            return got

    try:
        assert await in_thread(run, timeout=60) == ["0", "1", "2"]
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_pinned_connection_without_reset_query_is_closed(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1, reset_query="")], tmp_path)

    def run():
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as a:
            a.execute("SET app.tenant_id = 'A'")
            pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as b:
            return pid != b.execute("SELECT pg_backend_pid()").fetchone()[0], what_b_sees(b)

    try:
        other, seen = await in_thread(run, timeout=60)
        assert other and seen == CLEAN
        await until(lambda: the_pool(proxy).size <= 1)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_standard_conforming_strings_off_pins(pki, pg_tls, tmp_path):
    """
    With it off, a backslash escapes a quote in a plain literal, which
    pgtls's lexer does not follow: such a client keeps its connection.
    """
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)

    def run():
        with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as a:
            a.execute("SET standard_conforming_strings = off")
            return [client_pin(c) for c in proxy.route().clients if c.session is not None]

    try:
        assert await in_thread(run, timeout=60) == ["standard_conforming_strings = off"]
    finally:
        await proxy.stop()
