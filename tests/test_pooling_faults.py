"""
End-to-end pooling under stress and faults: clients that leave at the worst
moment, pools that grow and shrink, the whole protocol forwarded without
lock-step, FIFO waiting, server connections that die, a backend restart,
nothing ever returned dirty, 200 clients on 5 connections, and PgBouncer's
cancel race.

Everything runs the proxy in-process on the reactor pytest-twisted spins, in
front of the suite's real PostgreSQL (C{pg_tls}); clients are blocking
(psycopg, or L{support.rawclient} for what drivers refuse to do) and run
with L{deferToThread}. Server-side observations go through a superuser
connection over the cluster's Unix socket, never through the proxy.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import pytest_twisted
from psycopg import pq
from support import rawclient
from support.pooling import dsn, pooled_route
from support.proxy import start_proxy
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.proxy._leg import Phase
from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    SUPERUSER,
)

# ---------------------------------------------------------------------------
# Helpers


def connect(proxy, pki, **kwargs) -> psycopg.Connection:
    """A psycopg client of the proxy; transaction mode wants no named statements."""
    conn = psycopg.connect(dsn(proxy, pki), **kwargs)
    conn.prepare_threshold = None
    return conn


def admin(cluster, dbname: str = "postgres") -> psycopg.Connection:
    """A superuser connection straight to the server, over its Unix socket."""
    return psycopg.connect(
        host=str(cluster.socket_dir),
        port=cluster.port,
        user=SUPERUSER,
        dbname=dbname,
        autocommit=True,
    )


def scalar(cluster, sql: str, params: Any = None, dbname: str = "postgres") -> Any:
    with admin(cluster, dbname) as conn:
        return conn.execute(sql, params).fetchone()[0]


POOLED_COUNT = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
    (POOL_USER, APP_DB),
)


def pooled_count(cluster) -> int:
    return int(scalar(cluster, *POOLED_COUNT))


async def server_baseline(cluster) -> int:
    """
    pool_user connections to APP_DB left by earlier tests, once those have
    finished closing (their proxies are stopped, but a backend takes a
    moment to go).
    """
    try:
        await until_in_thread(lambda: pooled_count(cluster) == 0, timeout=3)
    except AssertionError:
        pass
    return await deferToThread(pooled_count, cluster)


def pooled_pids(cluster) -> list[int]:
    with admin(cluster) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s",
            (POOL_USER, APP_DB),
        ).fetchall()
    return [r[0] for r in rows]


async def sleep(seconds: float) -> None:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    await d


async def until(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Poll C{check} on the reactor until it is truthy; fail after C{timeout}."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or check}")
        await sleep(0.02)


async def until_in_thread(check: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Like L{until}, for a blocking C{check} (a query to the server)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await deferToThread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout}s: {what or check}")
        await sleep(0.05)


def in_thread(
    f: Callable[..., Any], *args: Any, timeout: float = 20.0, **kwargs: Any
) -> defer.Deferred[Any]:
    """L{deferToThread}, failing (not hanging) the test if the proxy never answers."""
    return deferToThread(f, *args, **kwargs).addTimeout(timeout, reactor)


def the_pool(proxy) -> Any:
    return proxy.route().pools.pools[APP_DB]


def settled(pool) -> bool:
    """Every connection of C{pool} is back, idle, with nobody waiting."""
    return (
        pool.size == len(pool.idle) and not pool.busy and not pool.waiters and not pool.connecting
    )


def raw_login(proxy, pki, **params: str):
    """A raw TLS client of the proxy, logged in as SCRAM_USER to APP_DB."""
    sock = rawclient.connect(proxy.port())
    tls = rawclient.request_tls(sock, pki.cert("ca"))
    tls.sendall(rawclient.startup_message(SCRAM_USER, APP_DB, **params))
    while True:
        mtype, body = rawclient.read_message(tls)
        if mtype == b"R":
            code = wire.auth_code(body)
            if code == wire.AUTH_CLEARTEXT_PASSWORD:
                tls.sendall(rawclient.password_message(SCRAM_PASSWORD))
            elif code != wire.AUTH_OK:
                raise AssertionError(f"unexpected authentication request {code}")
        elif mtype == b"E":
            raise rawclient.ServerError(wire.parse_error_fields(body))
        elif mtype == b"Z":
            return tls


def reset_socket(conn: psycopg.Connection) -> None:
    """
    Drop C{conn}'s TCP connection with a reset: no Terminate, no TLS
    close_notify, no FIN. libpq's descriptor is swapped (atomically) for an
    unconnected socket, so libpq never writes into someone else's socket.
    """
    fd = conn.pgconn.socket
    original = socket.socket(fileno=os.dup(fd))
    original.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    os.dup2(placeholder.fileno(), fd)
    placeholder.close()
    original.close()  # the last reference: RST
    conn.close()


@pytest.fixture
def threads():
    """Up to 64 worker threads for L{deferToThread}, restored afterwards."""
    pool = reactor.getThreadPool()
    before = pool.max
    pool.adjustPoolsize(maxthreads=64)
    yield
    pool.adjustPoolsize(maxthreads=before)


# ---------------------------------------------------------------------------
# 1. A client that leaves during login


def backend_tcp_connections(port: int) -> int:
    """ESTABLISHED TCP connections to C{port} (the client end), from /proc."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@pytest.mark.parametrize("when", ["right-after-startup", "at-password-request"])
@pytest_twisted.ensureDeferred
async def test_client_leaving_during_login_leaves_nothing(pki, pg_tls, tmp_path, when):
    pooled = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls)], tmp_path)
    route_ = proxy.route()
    baseline = await deferToThread(backend_tcp_connections, pg_tls.port)
    try:

        def start():
            sock = rawclient.connect(proxy.port())
            tls = rawclient.request_tls(sock, pki.cert("ca"))
            tls.sendall(rawclient.startup_message(SCRAM_USER, APP_DB))
            if when == "at-password-request":
                # pgtls runs SCRAM with the server itself and asks the TLS
                # client for its password in cleartext.
                mtype, body = rawclient.read_message(tls)
                assert mtype == b"R" and wire.auth_code(body) == wire.AUTH_CLEARTEXT_PASSWORD
            return tls

        tls = await in_thread(start)
        temp = None
        if when == "at-password-request":
            # The temporary login connection is open, waiting for the password
            # (and the /proc count sees it).
            (client,) = route_.clients
            temp = client.session.server
            assert temp is not None and temp.phase is not Phase.CLOSED
            assert await deferToThread(backend_tcp_connections, pg_tls.port) == baseline + 1
        tls.close()  # without a word

        await until(lambda: not route_.clients, what="route.clients empty")
        if temp is not None:
            await until(
                lambda: temp.phase is Phase.CLOSED, what="temporary server connection closed"
            )
        await until_in_thread(
            lambda: backend_tcp_connections(pg_tls.port) <= baseline,
            what="no TCP connection left to the server",
        )
        assert (
            await deferToThread(
                scalar,
                pg_tls,
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                (SCRAM_USER,),
            )
            == 0
        )
        # No pooled connection was opened for it (the pool object may exist:
        # it is looked up when the session starts).
        pool = route_.pools.pools.get(APP_DB)
        assert pool is None or (pool.size == 0 and not pool.waiters)
        assert await deferToThread(pooled_count, pg_tls) <= pooled
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# 2. Pools on demand, idle reaping, min_size, max_lifetime


async def hold_transactions(proxy, pki, n: int, timeout: float = 20.0) -> None:
    """n clients in concurrent transactions, so the pool opens n connections."""
    barrier = threading.Barrier(n, timeout=timeout)

    def client():
        with connect(proxy, pki) as conn:
            conn.execute("SELECT 1")
            barrier.wait()
            conn.commit()

    await defer.gatherResults(
        [in_thread(client, timeout=timeout) for _ in range(n)], consumeErrors=True
    )


@pytest.mark.parametrize("min_size", [0, 2])
@pytest_twisted.ensureDeferred
async def test_pools_on_demand_and_idle_reaping(pki, pg_tls, tmp_path, min_size):
    baseline = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, idle_timeout="1s", min_size=min_size)], tmp_path)
    pools = proxy.route().pools.pools
    try:
        await sleep(0.6)
        assert pools == {}, "no pool before the first client"
        assert await deferToThread(pooled_count, pg_tls) == baseline

        await hold_transactions(proxy, pki, 4)
        pool = pools[APP_DB]
        assert pool.size == 4 and len(pool.idle) == 4
        assert await deferToThread(pooled_count, pg_tls) == baseline + 4

        # The reaper runs every 0.5 s; idle for 1 s: closed, down to min_size.
        started = time.monotonic()
        await until_in_thread(
            lambda: pooled_count(pg_tls) == baseline + min_size,
            timeout=5,
            what=f"pool_user connections down to {min_size}",
        )
        reaped_after = time.monotonic() - started
        assert reaped_after >= 0.5
        if min_size:
            await sleep(2.5)
            assert await deferToThread(pooled_count, pg_tls) == baseline + min_size
            assert pools.get(APP_DB) is pool and pool.size == min_size
            # ...and those are good connections.
            rows = await in_thread(
                lambda: connect(proxy, pki, autocommit=True).execute("SELECT 42").fetchall()
            )
            assert rows == [(42,)]
        else:
            await until(lambda: APP_DB not in pools, timeout=3, what="empty idle pool dropped")
            assert pool.size == 0
            # And a new one is made on demand.
            rows = await in_thread(
                lambda: connect(proxy, pki, autocommit=True).execute("SELECT 42").fetchall()
            )
            assert rows == [(42,)]
            assert pools[APP_DB] is not pool
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_pool_dropped_while_clients_are_logged_in(pki, pg_tls, tmp_path):
    """
    Client A stays logged in, idle, while its pool has nothing open for
    longer than idle_timeout; then B arrives. max_size = 1 must still hold
    for the database, and idle connections must still be reaped and closed.
    """
    baseline = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1, idle_timeout="1s")], tmp_path)
    a = b = a_waits = first = None
    leaked = False
    try:
        a = await in_thread(connect, proxy, pki)
        await in_thread(lambda: (a.execute("SELECT 1"), a.commit()))
        first = the_pool(proxy)
        await until_in_thread(
            lambda: pooled_count(pg_tls) == baseline, what="idle connection reaped"
        )
        await sleep(1.5)  # the pool has been empty and unused for idle_timeout

        b = await in_thread(connect, proxy, pki)
        await in_thread(b.execute, "SELECT 1")  # B holds the one connection
        a_waits = in_thread(lambda: (a.execute("SELECT 1"), a.commit()))
        await sleep(0.5)
        assert await deferToThread(pooled_count, pg_tls) == baseline + 1, "max_size = 1"
        await in_thread(b.commit)
        await a_waits

        await until_in_thread(
            lambda: pooled_count(pg_tls) == baseline, what="idle connections reaped again"
        )
    finally:
        for conn in (b, a):
            if conn is not None:
                await in_thread(conn.close)
        if a_waits is not None:
            await defer.DeferredList([a_waits], consumeErrors=True)
        await proxy.stop()
        try:
            await until_in_thread(lambda: pooled_count(pg_tls) <= baseline, timeout=2)
        except AssertionError:
            leaked = True
        if first is not None:
            # Whatever the proxy left open must not outlive this test.
            first.close()
    assert not leaked, "server connections left open after the proxy stopped"


@pytest_twisted.ensureDeferred
async def test_max_lifetime_closes_old_connections_on_release(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1, max_lifetime="1s")], tmp_path)
    try:
        conn = await in_thread(connect, proxy, pki)

        def pid():
            value = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            conn.commit()
            return value

        first = await in_thread(pid)
        assert await in_thread(pid) == first, "a young connection is reused"
        await sleep(1.5)
        after = [await in_thread(pid) for _ in range(3)]
        # Documented: closed "when next released", so the transaction that
        # releases it may still run on it; never after that.
        assert after[0] in (first, after[1])
        assert first not in after[1:]
        assert after[1] == after[2], "the new connection is young and reused"
        await until_in_thread(
            lambda: first not in pooled_pids(pg_tls), what="the old backend is gone"
        )
        await in_thread(conn.close)
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# 3. The whole protocol, no lock-step


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest_twisted.ensureDeferred
async def test_full_protocol_is_forwarded(pki, pg_tls, tmp_path, mode):
    proxy = start_proxy([pooled_route(pki, pg_tls, mode, max_size=2)], tmp_path)
    try:

        def run():
            out: dict[str, Any] = {}
            with connect(proxy, pki, autocommit=True) as conn:
                # NoticeResponse
                notices: list[str] = []
                conn.add_notice_handler(lambda d: notices.append(d.message_primary))
                conn.execute("DO $$ BEGIN RAISE NOTICE 'hi'; END $$")
                out["notices"] = notices

                # An empty query: EmptyQueryResponse, then ReadyForQuery.
                out["empty"] = conn.execute("").pgresult.status

                # Flush: results of an unsynced pipeline, read before the Sync.
                with conn.pipeline() as p:
                    first = conn.execute("SELECT 1")
                    out["flushed"] = first.fetchone()  # sends Flush, no Sync yet
                    second = conn.execute("SELECT 2")
                    p.sync()
                    out["synced"] = second.fetchone()
                out["after_pipeline"] = conn.execute("SELECT 3").fetchone()

                # A large result (50 MiB), through flow control.
                total = 0
                with conn.cursor() as cur:
                    cur.execute("SELECT repeat('x', 1048576) FROM generate_series(1, 50)")
                    for (text,) in cur:
                        total += len(text)
                out["big"] = total

            # An error inside a transaction.
            with connect(proxy, pki) as conn:
                conn.execute("SELECT 1")
                try:
                    conn.execute("SELECT 1/0")
                except psycopg.errors.DivisionByZero:
                    out["error"] = "22012"
                out["status_after_error"] = conn.info.transaction_status
                try:
                    conn.execute("SELECT 1")
                except psycopg.errors.InFailedSqlTransaction:
                    out["in_failed"] = True
                conn.rollback()
                out["after_rollback"] = conn.execute("SELECT 'clean'").fetchone()
                conn.commit()
                out["status_end"] = conn.info.transaction_status
            return out

        out = await in_thread(run, timeout=60)
        assert out["notices"] == ["hi"]
        assert out["empty"] == pq.ExecStatus.EMPTY_QUERY
        assert out["flushed"] == (1,) and out["synced"] == (2,)
        assert out["after_pipeline"] == (3,)
        assert out["big"] == 50 * 1048576
        assert out["error"] == "22012"
        assert out["status_after_error"] == pq.TransactionStatus.INERROR
        assert out["in_failed"] is True
        assert out["after_rollback"] == ("clean",)
        assert out["status_end"] == pq.TransactionStatus.IDLE

        # Everything went back to the pool clean, and is reused as such.
        pool = the_pool(proxy)
        await until(lambda: settled(pool), what="pool settled")
        assert pool.size >= 1

        def reuse():
            # A transaction left open on the server would make psycopg's
            # BEGIN warn "there is already a transaction in progress".
            notices: list[str] = []
            with connect(proxy, pki) as conn:
                conn.add_notice_handler(lambda d: notices.append(d.message_primary))
                rows = conn.execute("SELECT 'reused'").fetchall()
                conn.commit()
            return rows, notices

        assert await in_thread(reuse) == ([("reused",)], [])
        assert (
            await deferToThread(
                scalar,
                pg_tls,
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE usename = %s AND datname = %s AND state <> 'idle'",
                (POOL_USER, APP_DB),
            )
            == 0
        )
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_notifications_in_session_mode(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, "session", max_size=2)], tmp_path)
    try:
        listener = await in_thread(connect, proxy, pki, autocommit=True)
        await in_thread(listener.execute, "LISTEN pgtls_faults")

        def notify():
            with connect(proxy, pki, autocommit=True) as conn:
                conn.execute("NOTIFY pgtls_faults, 'ping'")

        await in_thread(notify)

        def receive():
            return [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=1)]

        # The listener sat idle: the notification came with no request.
        assert await in_thread(receive) == [("pgtls_faults", "ping")]
        await in_thread(listener.close)
    finally:
        await proxy.stop()


# ---------------------------------------------------------------------------
# 4. Waiting: FIFO, and clients that give up


async def queue_behind_a_holder(proxy, pki, names, served):
    """
    One client holds the only server connection (session mode); then each
    of C{names} queues in turn (a psycopg client that records when its first
    query is answered, or a raw "quitter" that sends a query and returns its
    socket). Returns the holder, the running clients and the quitters.
    """
    holder = await in_thread(connect, proxy, pki, autocommit=True)
    await in_thread(holder.execute, "SELECT 1")
    pool = the_pool(proxy)
    assert len(pool.busy) == 1
    lock = threading.Lock()

    def client(name):
        with connect(proxy, pki, autocommit=True) as conn:
            conn.execute("SELECT %s", (name,))
            with lock:
                served.append(name)
            time.sleep(0.05)

    def quitter_queues(name):
        tls = raw_login(proxy, pki)
        # Its query, if it ever ran, would leave a row behind.
        tls.sendall(rawclient.query_message(f"INSERT INTO quitters VALUES ('{name}')"))
        return tls

    running, quitters = [], []
    for name in names:
        before = len(pool.waiters)
        if name.startswith("quitter"):
            quitters.append(await in_thread(quitter_queues, name))
        else:
            running.append(in_thread(client, name))
        await until(lambda b=before: len(pool.waiters) == b + 1, what=f"{name} queued")
    return holder, running, quitters


@pytest_twisted.ensureDeferred
async def test_waiters_are_served_in_fifo_order(pki, pg_tls, tmp_path):
    baseline = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, "session", max_size=1)], tmp_path)
    running: list[defer.Deferred[Any]] = []
    try:
        served: list[str] = []
        names = ["first", "second", "third"]
        holder, running, _ = await queue_behind_a_holder(proxy, pki, names, served)
        pool = the_pool(proxy)
        await sleep(0.3)
        assert served == [] and len(pool.waiters) == 3 and pool.size == 1
        await in_thread(holder.close)
        await defer.gatherResults(running, consumeErrors=True)
        assert served == names
        await until(lambda: settled(pool), what="pool settled")
        assert pool.size == 1 and len(pool.idle) == 1
        assert await deferToThread(pooled_count, pg_tls) == baseline + 1
        await until(lambda: not proxy.route().clients, what="all clients gone")
    finally:
        await proxy.stop()
        await defer.DeferredList(running, consumeErrors=True)


@pytest_twisted.ensureDeferred
async def test_queued_client_that_gives_up_leaves_the_queue(pki, pg_tls, tmp_path):
    await deferToThread(
        pg_tls.psql,
        "DROP TABLE IF EXISTS quitters; CREATE TABLE quitters (name text);"
        " GRANT ALL ON quitters TO PUBLIC",
        dbname=APP_DB,
    )
    proxy = start_proxy([pooled_route(pki, pg_tls, "session", max_size=1)], tmp_path)
    running: list[defer.Deferred[Any]] = []
    try:
        served: list[str] = []
        names = ["first", "quitter-close", "second", "quitter-reset", "quitter-terminate"]
        holder, running, quitters = await queue_behind_a_holder(proxy, pki, names, served)
        pool = the_pool(proxy)
        (server,) = pool.busy
        for name, tls in zip([n for n in names if n.startswith("quitter")], quitters, strict=True):
            before = len(pool.waiters)
            if name == "quitter-reset":
                tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif name == "quitter-terminate":
                tls.sendall(wire.TERMINATE)
            tls.close()  # no TLS close_notify: the socket just goes
            await until(
                lambda b=before: len(pool.waiters) == b - 1, timeout=2, what=f"{name} dequeued"
            )
        assert len(pool.waiters) == 2 and pool.size == 1

        await in_thread(holder.close)
        await defer.gatherResults(running, consumeErrors=True)
        assert served == ["first", "second"]
        await until(lambda: settled(pool), what="pool settled")
        # The quitters' queries never ran, and no connection was spent on
        # them: the one server connection served everybody.
        assert pool.idle == [server]
        rows = await deferToThread(scalar, pg_tls, "SELECT count(*) FROM quitters", None, APP_DB)
        assert rows == 0
    finally:
        await proxy.stop()
        await defer.DeferredList(running, consumeErrors=True)
        await deferToThread(pg_tls.psql, "DROP TABLE IF EXISTS quitters", dbname=APP_DB)


# ---------------------------------------------------------------------------
# 5. Faults: a server connection dies, the backend restarts

ADMIN_SHUTDOWN = "terminating connection due to administrator command"


@pytest.mark.parametrize("moment", ["idle-in-transaction", "mid-query"])
@pytest_twisted.ensureDeferred
async def test_server_connection_killed_while_attached(pki, pg_tls, tmp_path, moment):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)
    try:
        conn = await in_thread(connect, proxy, pki)
        pid = (await in_thread(lambda: conn.execute("SELECT pg_backend_pid()").fetchone()))[0]

        def next_statement():
            try:
                conn.execute("SELECT pg_sleep(5)" if moment == "mid-query" else "SELECT 1")
            except psycopg.OperationalError as e:
                return e
            return None

        if moment == "mid-query":
            failing = in_thread(next_statement)
            await sleep(0.3)
        await deferToThread(scalar, pg_tls, "SELECT pg_terminate_backend(%s)", (pid,))
        if moment == "idle-in-transaction":
            await sleep(0.3)
            failing = in_thread(next_statement)
        err = await failing
        assert err is not None, "the statement succeeded on a dead connection"
        assert ADMIN_SHUTDOWN in str(err)
        # The server's own FATAL, relayed before the client's connection ends.
        assert isinstance(err, psycopg.errors.AdminShutdown), repr(err)
        assert err.sqlstate == "57P01"
        assert conn.closed
        await until(lambda: not proxy.route().clients, what="client connection ended")
        pool = the_pool(proxy)
        await until(lambda: pool.size == 0, what="dead connection forgotten")

        # A new client is served, on a new server connection.
        def fresh():
            with connect(proxy, pki, autocommit=True) as other:
                return other.execute("SELECT pg_backend_pid()").fetchone()[0]

        assert await in_thread(fresh) != pid
        await in_thread(conn.close)
    finally:
        await proxy.stop()


def all_alive(pool) -> bool:
    return all(server.leg.phase is not Phase.CLOSED for server in pool.idle)


@pytest.mark.parametrize(
    "how",
    [
        "released",
        "min_size",
        "waiter-left",
    ],
)
@pytest_twisted.ensureDeferred
async def test_idle_connections_that_died_are_not_handed_out(pki, pg_tls, tmp_path, how):
    """
    Idle connections got there in one of three ways: released by a client
    ("released"); opened for min_size ("min_size"); opened for a client that
    left the queue before the connection was ready ("waiter-left", with the
    default min_size = 0, made certain by a relay that takes 0.3 s to open
    each backend connection). The server then kills them all; pgtls must
    notice, and hand none of them out.
    """
    from support.relay import SlowRelay

    relay = None
    table = pooled_route(pki, pg_tls, max_size=3, min_size=2 if how == "min_size" else 0)
    if how == "waiter-left":
        relay = SlowRelay(reactor, pg_tls.host, pg_tls.port, 0.3)
        table["backend"]["address"] = relay.address
    existing = set(await deferToThread(pooled_pids, pg_tls))
    proxy = start_proxy([table], tmp_path)
    try:
        if how == "waiter-left":
            tls = await in_thread(raw_login, proxy, pki)
            pool = the_pool(proxy)
            await in_thread(tls.sendall, rawclient.query_message("SELECT 1"))
            await until(lambda: pool.waiters and pool.connecting, what="a connection opening")
            tls.close()
            await until(lambda: not pool.waiters, what="the client left the queue")
            expected = 1
        else:
            await hold_transactions(proxy, pki, 1)
            pool = the_pool(proxy)
            expected = 2 if how == "min_size" else 1
        await until(lambda: settled(pool) and pool.size == expected, what="pool filled")
        pids = await until_in_thread(
            lambda: (p := set(pooled_pids(pg_tls)) - existing) and len(p) == expected and p
        )
        await deferToThread(
            scalar,
            pg_tls,
            "SELECT count(pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid",
            (sorted(pids),),
        )
        await until_in_thread(
            lambda: not pids & set(pooled_pids(pg_tls)), what="backends terminated"
        )
        await until(lambda: all_alive(pool), timeout=2, what="dead idle connections dropped")
        # More clients at once than the pool had connections: each is served.
        await hold_transactions(proxy, pki, 3, timeout=10)
        await until(lambda: settled(pool) and all_alive(pool), what="pool settled")
    finally:
        await proxy.stop()
        if relay is not None:
            await relay.stop()


@pytest.mark.parametrize("min_size", [0, 3])
@pytest_twisted.ensureDeferred
async def test_backend_restart(pki, pg_tls, tmp_path, threads, min_size):
    """
    With min_size = 3 the first client makes the pool open three
    connections, two of them straight into idle; the clients below use at
    most two distinct ones, so at least one idle connection has never been
    attached when the server restarts.
    """
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=3, min_size=min_size)], tmp_path)
    try:
        await hold_transactions(proxy, pki, 1)
        pool = the_pool(proxy)
        await until(lambda: settled(pool) and pool.size == max(1, min_size), what="pool filled")
        before = set(pool.idle)
        # A client that stays logged in across the restart, idle between
        # transactions (so holding no server connection)...
        survivor = await in_thread(connect, proxy, pki, autocommit=True)
        await in_thread(survivor.execute, "SELECT 1")
        # ...and one inside a transaction, attached to a server connection.
        attached = await in_thread(connect, proxy, pki)
        await in_thread(attached.execute, "SELECT 1")

        started = time.monotonic()
        await deferToThread(pg_tls.restart)
        restart_time = time.monotonic() - started

        # The server's FATAL and close reached the pooled connections: none
        # of the old ones is left.
        await until(
            lambda: not before & (set(pool.idle) | pool.busy) and all_alive(pool),
            timeout=2,
            what="dead connections dropped",
        )

        def in_transaction():
            try:
                attached.execute("SELECT 1")
            except psycopg.OperationalError as e:
                return e
            return None

        err = await in_thread(in_transaction)
        assert err is not None and ADMIN_SHUTDOWN in str(err)
        assert attached.closed

        # Served as soon as the server is back: new clients, several at
        # once, and the client that was idle across the restart.
        def fresh():
            with connect(proxy, pki, autocommit=True) as conn:
                return conn.execute("SELECT 'fresh'").fetchone()[0]

        assert await in_thread(fresh) == "fresh"
        await hold_transactions(proxy, pki, 3, timeout=10)
        assert (await in_thread(lambda: survivor.execute("SELECT 'still here'").fetchone())) == (
            "still here",
        )
        await in_thread(survivor.close)
        await until(lambda: settled(pool), what="pool settled")
        print(f"\nrestart took {restart_time:.1f}s")
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_clients_asking_while_the_server_is_down(pki, pg_tls, tmp_path):
    """
    Three logged-in clients, idle between transactions, each send a query
    while the server is down (max_size = 1). The one whose request made the
    pool try to connect gets pgtls's FATAL 08001 and is disconnected: the
    "first failure". The others must be served once the server is back, or
    told why at once; not left waiting until acquire_timeout.

    A relay that takes 0.3 s to open each backend connection (then finds the
    server down) makes sure the second and third client queue while the
    first attempt is under way, as they would behind any slow connect.
    """
    from support.relay import SlowRelay

    relay = SlowRelay(reactor, pg_tls.host, pg_tls.port, 0.3)
    table = pooled_route(pki, pg_tls, max_size=1, acquire_timeout="5s")
    table["backend"]["address"] = relay.address
    proxy = start_proxy([table], tmp_path)
    running: list[defer.Deferred[Any]] = []
    try:
        clients = [await in_thread(connect, proxy, pki, autocommit=True) for _ in range(3)]
        await in_thread(clients[0].execute, "SELECT 1")
        pool = the_pool(proxy)
        await until(lambda: settled(pool), what="pool settled")
        started = time.monotonic()

        def ask(conn):
            try:
                conn.execute("SELECT 1")
                outcome = "served"
            except psycopg.OperationalError as e:
                outcome = e.sqlstate or str(e)
            return outcome, time.monotonic() - started

        await deferToThread(pg_tls.stop)
        try:
            for conn in clients:
                running.append(in_thread(ask, conn))
                await sleep(0.02)
            await until(lambda: len(pool.waiters) == 3, what="all three queued")
            await sleep(0.4)
        finally:
            await deferToThread(pg_tls.start)
        back = time.monotonic() - started
        outcomes = await defer.gatherResults(running, consumeErrors=True)
        print(f"\nserver back after {back:.2f}s; outcomes {outcomes}")
        assert outcomes[0][0] == "08001"
        assert all(outcome in ("served", "08001") for outcome, _ in outcomes), outcomes
        assert all(at < back + 2.0 for _, at in outcomes), outcomes
        # And a new client is served.
        assert (
            await in_thread(
                lambda: connect(proxy, pki, autocommit=True).execute("SELECT 5").fetchone()
            )
        ) == (5,)
    finally:
        if not pg_tls.running:
            await deferToThread(pg_tls.start)
        await proxy.stop()
        await relay.stop()
        await defer.DeferredList(running, consumeErrors=True)


# ---------------------------------------------------------------------------
# 6. Nothing is ever returned dirty

ACTIONS = ("commit", "rollback", "close", "finish", "reset")


@pytest_twisted.ensureDeferred
async def test_nothing_returns_to_the_pool_dirty(pki, pg_tls, tmp_path, threads):
    await deferToThread(
        pg_tls.psql,
        "DROP TABLE IF EXISTS dirty_check; CREATE TABLE dirty_check (v int);"
        " GRANT ALL ON dirty_check TO PUBLIC",
        dbname=APP_DB,
    )
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=4)], tmp_path)
    rng = random.Random(20240611)
    plan = {n: rng.choice(ACTIONS) for n in range(100)}
    try:

        def client(n):
            conn = connect(proxy, pki)
            conn.execute("INSERT INTO dirty_check VALUES (%s)", (n,))
            action = plan[n]
            if action == "commit":
                conn.commit()
                conn.close()
            elif action == "rollback":
                conn.rollback()
                conn.close()
            elif action == "close":
                conn.close()  # Terminate inside the transaction
            elif action == "finish":
                conn.pgconn.finish()
            else:
                reset_socket(conn)

        await defer.gatherResults(
            [in_thread(client, n, timeout=60) for n in range(100)], consumeErrors=True
        )
        pool = the_pool(proxy)
        await until(lambda: settled(pool), what="every connection idle again")
        assert 1 <= pool.size <= 4

        def check():
            with admin(pg_tls, APP_DB) as conn:
                values = {r[0] for r in conn.execute("SELECT v FROM dirty_check").fetchall()}
                stuck = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                    " AND state LIKE 'idle in transaction%%'",
                    (POOL_USER,),
                ).fetchone()[0]
            return values, stuck

        values, stuck = await deferToThread(check)
        assert values == {n for n, a in plan.items() if a == "commit"}
        assert stuck == 0
        assert await deferToThread(pooled_count, pg_tls) >= pool.size
    finally:
        await deferToThread(pg_tls.psql, "DROP TABLE IF EXISTS dirty_check", dbname=APP_DB)
        await proxy.stop()


# ---------------------------------------------------------------------------
# 7. The proof: 200 clients x 50 transactions on max_size = 5


@pytest_twisted.ensureDeferred
async def test_200_clients_50_transactions_on_5_connections(pki, pg_tls, tmp_path, threads):
    clients, transactions = 200, 50
    await deferToThread(
        pg_tls.psql,
        "DROP TABLE IF EXISTS isolation_rows;"
        " CREATE TABLE isolation_rows (client int, n int, doomed bool);"
        " CREATE INDEX ON isolation_rows (client);"
        " GRANT ALL ON isolation_rows TO PUBLIC",
        dbname=APP_DB,
    )
    baseline = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=5, acquire_timeout="60s")], tmp_path)
    peak = [0]
    samples = [0]
    stop = threading.Event()

    def watch():
        with admin(pg_tls) as conn:
            while not stop.is_set():
                count = conn.execute(*POOLED_COUNT).fetchone()[0]
                peak[0] = max(peak[0], count - baseline)
                samples[0] += 1
                stop.wait(0.05)

    def client(c):
        committed = 0
        with connect(proxy, pki) as conn:
            for i in range(transactions):
                doomed = i % 5 == 4
                xid, pid = conn.execute(
                    "INSERT INTO isolation_rows VALUES (%s, %s, %s)"
                    " RETURNING pg_current_xact_id()::text, pg_backend_pid()",
                    (c, i, doomed),
                ).fetchone()
                mine, others_doomed, xid2, pid2 = conn.execute(
                    "SELECT count(*) FILTER (WHERE client = %s),"
                    " count(*) FILTER (WHERE client <> %s AND doomed),"
                    " pg_current_xact_id()::text, pg_backend_pid()"
                    " FROM isolation_rows",
                    (c, c),
                ).fetchone()
                # The same server transaction throughout; my committed rows
                # and my uncommitted one; never another's uncommitted rows.
                assert (xid2, pid2) == (xid, pid), (c, i)
                assert mine == committed + 1, (c, i, mine, committed)
                assert others_doomed == 0, (c, i, others_doomed)
                if doomed:
                    conn.rollback()
                else:
                    conn.commit()
                    committed += 1
        return committed

    watcher = deferToThread(watch)
    started = time.monotonic()
    try:
        # At most 48 clients at a time, so the watcher always has a thread.
        semaphore = defer.DeferredSemaphore(48)
        results = await defer.gatherResults(
            [semaphore.run(in_thread, client, c, timeout=120) for c in range(clients)],
            consumeErrors=True,
        )
        elapsed = time.monotonic() - started
        stop.set()
        await watcher
        expected = transactions - transactions // 5
        assert results == [expected] * clients
        total = await deferToThread(
            scalar, pg_tls, "SELECT count(*) FROM isolation_rows", None, APP_DB
        )
        assert total == clients * expected
        assert samples[0] > 10
        assert 0 < peak[0] <= 5, peak[0]
        pool = the_pool(proxy)
        await until(lambda: settled(pool), what="pool settled")
        print(
            f"\n200 clients x 50 transactions: {elapsed:.1f}s, "
            f"peak {peak[0]} pool_user connections over {samples[0]} samples"
        )
        assert elapsed < 90
    finally:
        stop.set()
        await deferToThread(pg_tls.psql, "DROP TABLE IF EXISTS isolation_rows", dbname=APP_DB)
        await proxy.stop()


# ---------------------------------------------------------------------------
# 8. The cancel race


async def cancel_race(proxy, pki, delays, b_sleep=1.0, armed=None):
    """
    Client A runs C{pg_sleep(0.3)}; B queues for the same (only) server
    connection; A's cancel is fired C{delay} after A started. Returns the
    outcomes and how many releases came with a cancel still in flight.
    """
    a = await in_thread(connect, proxy, pki, autocommit=True)
    b = await in_thread(connect, proxy, pki, autocommit=True)
    await in_thread(a.execute, "SELECT 1")
    pool = the_pool(proxy)

    # Count the releases that came with a cancel still in flight: the
    # window this test is about (instrumentation of this instance only).
    guarded = [0]
    release = pool.release

    def watching_release(server):
        if server.cancels:
            guarded[0] += 1
        release(server)

    pool.release = watching_release
    if armed is not None:
        armed()

    def run_a():
        try:
            a.execute("SELECT pg_sleep(0.3)")
        except psycopg.errors.QueryCanceled:
            return "cancelled"
        return "done"

    def run_b():
        try:
            return b.execute(f"SELECT pg_sleep({b_sleep}), 'B done'").fetchone()[1]
        except psycopg.errors.QueryCanceled:
            return "B CANCELLED"

    outcomes = []
    for delay in delays:
        started = time.monotonic()
        running_a = in_thread(run_a)
        await until(lambda: pool.busy, what="A attached")
        running_b = in_thread(run_b)
        await until(lambda: pool.waiters, what="B queued")
        await sleep(max(0.0, delay - (time.monotonic() - started)))
        await in_thread(a.cancel_safe)
        outcomes.append((round(delay, 3), await running_a, await running_b))
    await in_thread(a.close)
    await in_thread(b.close)
    return outcomes, guarded[0]


@pytest_twisted.ensureDeferred
async def test_late_cancel_never_hits_the_next_client(pki, pg_tls, tmp_path):
    """
    Two rounds. First as it comes: A's cancel fired at delays around the end
    of A's query (with the race unguarded, B was cancelled here in about one
    run in two). Then made certain with a slow relay in front of the server:
    new backend connections take 0.2 s to open, so A's forwarded cancel is
    always still in flight when A's query ends with B next in line, and the
    cancel's bytes take 50 ms more to reach the server than B's query on the
    established connection, as on any network where a new connection is
    slower than an open one.
    """
    from support.relay import SlowRelay

    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)
    try:
        swept, guarded = await cancel_race(proxy, pki, [0.27 + i * 0.005 for i in range(12)])
    finally:
        await proxy.stop()
    print(f"\ncancel race, as it comes: {swept}, {guarded} guarded release(s)")

    relay = SlowRelay(reactor, pg_tls.host, pg_tls.port, 0.2)
    table = pooled_route(pki, pg_tls, max_size=1)
    table["backend"]["address"] = relay.address
    proxy = start_proxy([table], tmp_path)
    try:

        def slow_new_connections():
            relay.upstream_delay = 0.05

        certain, guarded = await cancel_race(
            proxy, pki, [0.1 + i * 0.03 for i in range(5)], armed=slow_new_connections
        )
    finally:
        await proxy.stop()
        await relay.stop()
    print(f"cancel race, slow backend: {certain}, {guarded} guarded release(s)")
    assert guarded == len(certain), "every round exercised the window"
    assert [o for o in swept + certain if o[2] != "B done"] == []
