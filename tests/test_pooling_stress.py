"""
End-to-end pooling under load: pools that grow and shrink (on demand,
idle reaping, C{min_size}, C{max_lifetime}), the whole protocol forwarded
without lock-step, FIFO waiting and clients that give up, nothing ever
returned dirty, and 200 clients on 5 connections. The pool under faults is
in test_pooling_faults.

As there, the proxy runs in-process in front of the real C{pg_tls};
clients are blocking and run with L{deferToThread}; server-side
observations bypass the proxy (L{support.pooling}).
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Any

import psycopg
import pytest
import pytest_twisted
from psycopg import pq
from support import rawclient
from support.pooling import (
    POOLED_COUNT,
    admin,
    connect,
    hold_transactions,
    pooled_count,
    pooled_pids,
    pooled_route,
    raw_login,
    reset_socket,
    scalar,
    server_baseline,
    settled,
    the_pool,
)
from support.proxy import start_proxy
from support.waiting import in_thread, sleep, until, until_in_thread
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_USER,
)

# ---------------------------------------------------------------------------
# 2. Pools on demand, idle reaping, min_size, max_lifetime


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
    of C{names} queues in turn, from its login on (a psycopg client that
    records when its first query is answered, or a raw "quitter" that sends
    a query and returns its socket). Returns the holder, the running clients and the quitters.
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
        # Session mode: its login itself queues (for its server's PID).
        tls = raw_login(proxy, pki, ready=False)
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
