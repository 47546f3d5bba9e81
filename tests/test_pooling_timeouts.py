"""
The pool's client timeouts end to end (L{pgtls_twisted.pool._timeouts}):
real psycopg clients (and one raw one) on a pooled route in front of the
real server, in transaction and session mode. Each timeout must reach the
client with PostgreSQL's own SQLSTATE, leave the pool's server connection
usable (or close it when it cannot be), be counted, and be logged.
"""

from __future__ import annotations

import time

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.admin import Scrape
from support.pooling import admin, connect, pooled_pids, pooled_route, raw_login
from support.proxy import running
from support.waiting import in_thread, until_in_thread

from pgtls_twisted.ops._metrics import POOL_TIMEOUTS
from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import APP_DB

MODES = ["transaction", "session"]


def fired(proxy, mode: str) -> dict[str, float]:
    """C{pgtls_pool_timeouts_total} of the route, by timeout."""
    page = Scrape(proxy.route().metrics.text().decode())
    labels = {"route": f"pool-{mode}", "database": APP_DB}
    return {t: page.value("pgtls_pool_timeouts_total", timeout=t, **labels) for t in POOL_TIMEOUTS}


def only(timeout: str) -> dict[str, float]:
    return {t: 1.0 if t == timeout else 0.0 for t in POOL_TIMEOUTS}


def logged(events, timeout: str) -> list[dict]:
    return [e for e in events if e.get("timeout") == timeout]


def backend_pid(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def next_client(proxy, pki) -> int:
    """(Blocking.) The backend PID a new client is served by."""
    with connect(proxy, pki, autocommit=True) as conn:
        return backend_pid(conn)


def one_server(pki, cluster, mode: str, **timeout: str) -> list[dict]:
    """The routes of a test: one pooled route with one server connection."""
    return [pooled_route(pki, cluster, mode, max_size=1, **timeout)]


def activity(cluster, pid: int) -> tuple[str, bool] | None:
    """The server's C{state} of C{pid} and whether it has a transaction open."""
    with admin(cluster) as conn:
        row = conn.execute(
            "SELECT state, xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return None if row is None else (row[0], row[1])


def sqlstate_of(f, *args) -> tuple[str | None, str]:
    """(Blocking.) The SQLSTATE and message of the error C{f(*args)} must raise."""
    try:
        f(*args)
    except psycopg.Error as e:
        return e.sqlstate, str(e)
    raise AssertionError(f"{f} did not fail")


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_idle_transaction_timeout(pki, pg_tls, tmp_path, events, mode):
    async with running(
        tmp_path, one_server(pki, pg_tls, mode, idle_transaction_timeout="500ms")
    ) as proxy:
        idler = await in_thread(connect, proxy, pki)
        # psycopg's default: the statement opens a transaction, left open.
        pid = await in_thread(backend_pid, idler)
        started = time.monotonic()

        # The only server connection is the idler's: the next client waits for it.
        assert await in_thread(next_client, proxy, pki) == pid
        assert time.monotonic() - started >= 0.45
        state, text = await in_thread(sqlstate_of, idler.execute, "SELECT 1")
        assert state == "25P03", text
        assert "terminating connection due to idle-in-transaction timeout" in text
        await in_thread(idler.close)
        # Rolled back and returned: the same server connection, no
        # transaction open on it.
        assert await in_thread(activity, pg_tls, pid) == ("idle", False)
        assert fired(proxy, mode) == only("idle_transaction_timeout")
        (line,) = logged(events, "idle_transaction_timeout")
        assert line["pool"] == proxy.route().pools.pools[APP_DB].name
        assert line["elapsed"] >= 0.5


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_query_timeout_cancels(pki, pg_tls, tmp_path, events, mode):
    async with running(tmp_path, one_server(pki, pg_tls, mode, query_timeout="500ms")) as proxy:
        conn = await in_thread(connect, proxy, pki, autocommit=True)
        pid = await in_thread(backend_pid, conn)
        started = time.monotonic()
        state, text = await in_thread(sqlstate_of, conn.execute, "SELECT pg_sleep(20)")
        assert state == "57014", text
        # The server's own answer to the cancel: the client goes on.
        assert "canceling statement due to user request" in text
        assert 0.45 <= time.monotonic() - started < 5
        assert await in_thread(backend_pid, conn) == pid
        # Queries shorter than the timeout, one after another, are never cancelled.
        for _ in range(3):
            await in_thread(conn.execute, "SELECT pg_sleep(0.2)")
        await in_thread(conn.close)
        assert fired(proxy, mode) == only("query_timeout")
        (line,) = logged(events, "query_timeout")
        assert line["action"] == "cancel sent" and line["elapsed"] >= 0.5


def open_batch_then_wait(proxy, pki) -> tuple[int, list[bytes], dict[str, str]]:
    """
    (Blocking.) A raw client's extended batch left without its Sync: the
    server waits for input (a cancel does nothing then) and still owes a
    ReadyForQuery. Its backend PID, what it was sent, and the FATAL.
    """
    sock = raw_login(proxy, pki)
    try:
        ((pid,),) = rawclient.simple_query(sock, "SELECT pg_backend_pid()")
        sock.sendall(
            wire.message(b"P", b"\0SELECT 1\0\0\0")
            + wire.message(b"B", b"\0\0\0\0\0\0\0\0")
            + wire.message(b"E", b"\0\0\0\0\0")
            + wire.message(b"H", b"")
        )
        types = [rawclient.read_message(sock)[0] for _ in range(4)]
        return int(pid), types, rawclient.read_fatal(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_query_timeout_closes_what_the_cancel_did_not_end(
    pki, pg_tls, tmp_path, events, mode
):
    async with running(tmp_path, one_server(pki, pg_tls, mode, query_timeout="500ms")) as proxy:
        started = time.monotonic()
        pid, types, fatal = await in_thread(open_batch_then_wait, proxy, pki)
        assert types == [b"1", b"2", b"D", b"C"]
        assert (fatal["C"], fatal["M"]) == ("57014", "pgtls: query_timeout")
        # Cancelled at 0.5 s, closed after as long again.
        assert time.monotonic() - started >= 0.95
        # Its server connection was closed, not handed on; the pool opens another.
        await until_in_thread(lambda: pid not in pooled_pids(pg_tls), what="server closed")
        assert await in_thread(next_client, proxy, pki) != pid
        assert fired(proxy, mode) == only("query_timeout")  # counted once
        assert [e["action"] for e in logged(events, "query_timeout")] == ["cancel sent"]
        assert any("after the cancel" in e.get("log_format", "") for e in events)


@pytest.mark.parametrize("mode", MODES)
@pytest_twisted.ensureDeferred
async def test_client_idle_timeout(pki, pg_tls, tmp_path, events, mode):
    async with running(
        tmp_path, one_server(pki, pg_tls, mode, client_idle_timeout="500ms")
    ) as proxy:
        conn = await in_thread(connect, proxy, pki, autocommit=True)

        def busy() -> int:
            # Never quiet for 0.5 s: a query, a transaction and a long
            # query are not idleness (idle_transaction_timeout is off).
            pid = backend_pid(conn)
            for _ in range(2):
                time.sleep(0.3)
                conn.execute("SELECT 1")
            conn.execute("BEGIN")
            time.sleep(0.7)
            conn.execute("COMMIT")
            conn.execute("SELECT pg_sleep(0.7)")
            return pid

        pid = await in_thread(busy)
        await in_thread(time.sleep, 0.8)
        state, text = await in_thread(sqlstate_of, conn.execute, "SELECT 1")
        assert state == "57P05", text
        assert "terminating connection due to idle-session timeout" in text
        await in_thread(conn.close)

        # Session mode: reset and returned; transaction mode: never held.
        assert await in_thread(next_client, proxy, pki) == pid
        assert fired(proxy, mode) == only("client_idle_timeout")
        (line,) = logged(events, "client_idle_timeout")
        assert line["elapsed"] >= 0.5
