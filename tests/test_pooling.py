"""
End-to-end pooling: real psycopg clients log in as themselves (verified by
the real server over a temporary connection), then run on pooled server
connections of the service user, in transaction and session mode.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
import pytest_twisted
from support.dsn import app_dsn
from support.pooling import pooled_count, pooled_route
from support.proxy import running, start_proxy
from support.waiting import sleep
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import (
    APP_DB,
    CERT_USER,
    MD5_PASSWORD,
    MD5_USER,
    POOL_USER,
    SCRAM_USER,
)


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest_twisted.ensureDeferred
async def test_login_as_self_run_as_service_user(pki, pg_tls, tmp_path, mode):
    proxy = start_proxy([pooled_route(pki, pg_tls, mode)], tmp_path)
    try:

        def run():
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                user = conn.execute("SELECT current_user").fetchone()[0]
                ssl = conn.execute(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                ).fetchone()[0]
                return user, ssl, conn.info.backend_pid != 0

        assert await deferToThread(run) == (POOL_USER, True, True)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_login_failures_are_the_servers_own(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls)], tmp_path)
    try:

        def attempt(**kw):
            try:
                psycopg.connect(app_dsn(proxy, pki, **kw)).close()
            except psycopg.OperationalError as e:
                return str(e)
            return None

        assert "password authentication failed" in await deferToThread(attempt, password="wrong")
        assert 'database "nope" does not exist' in await deferToThread(attempt, dbname="nope")
        assert "password authentication failed" in await deferToThread(
            attempt, user=MD5_USER, password="wrong"
        )
        ok = await deferToThread(attempt, user=MD5_USER, password=MD5_PASSWORD)
        assert ok is None
        unknown = await deferToThread(attempt, user="nobody_here", password="x")
        assert 'password authentication failed for user "nobody_here"' in unknown
        # pg_hba.conf says "cert" for this role: the server's own refusal.
        hba = await deferToThread(attempt, user=CERT_USER, password="x")
        assert "certificate" in hba
    finally:
        await proxy.stop()


@pytest.mark.parametrize("mode", ["transaction", "session"])
@pytest_twisted.ensureDeferred
async def test_pipeline_extended_protocol_and_copy(pki, pg_tls, tmp_path, mode):
    proxy = start_proxy([pooled_route(pki, pg_tls, mode)], tmp_path)
    table = f"copy_{mode}"
    try:

        def run():
            with psycopg.connect(app_dsn(proxy, pki)) as conn:
                with conn.pipeline():
                    curs = [conn.execute("SELECT %s::int + 1", (i,)) for i in range(50)]
                piped = [c.fetchone()[0] for c in curs]
                conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute(f"CREATE TABLE {table} (id int, t text)")
                with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                    for i in range(100_000):
                        copy.write_row((i, "x"))
                conn.commit()
                count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                out = []
                with conn.cursor().copy(
                    f"COPY (SELECT id FROM {table} ORDER BY id LIMIT 5) TO STDOUT"
                ) as copy:
                    for row in copy.rows():
                        out.append(row[0])
                conn.execute(f"DROP TABLE {table}")
                conn.commit()
                return piped, count, out

        piped, count, out = await deferToThread(run)
        assert piped == [i + 1 for i in range(50)]
        assert count == 100_000
        assert out == ["0", "1", "2", "3", "4"]
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_many_clients_share_max_size_connections(pki, pg_tls, tmp_path):
    """40 clients x 25 short transactions on max_size = 5."""
    baseline = await deferToThread(pooled_count, pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=5)], tmp_path)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], pooled_count(pg_tls) - baseline)
            stop.wait(0.05)

    try:
        await deferToThread(
            lambda: (
                psycopg.connect(app_dsn(proxy, pki), autocommit=True)
                .execute("CREATE TABLE IF NOT EXISTS pooled_counter (id int)")
                .connection.close()
            )
        )

        def client(n):
            with psycopg.connect(app_dsn(proxy, pki)) as conn:
                # Named prepared statements live in one server session: in
                # transaction mode they must be off (README, Pooling limits).
                conn.prepare_threshold = None
                for i in range(25):
                    conn.execute("INSERT INTO pooled_counter VALUES (%s)", (n * 1000 + i,))
                    conn.commit()

        watcher = deferToThread(watch)
        reactor.getThreadPool().adjustPoolsize(maxthreads=50)
        await defer.gatherResults([deferToThread(client, n) for n in range(40)], consumeErrors=True)
        stop.set()
        await watcher
        total = await deferToThread(
            lambda: (
                psycopg.connect(app_dsn(proxy, pki))
                .execute("SELECT count(*) FROM pooled_counter")
                .fetchone()[0]
            )
        )
        assert total >= 1000
        assert 0 < peak[0] <= 5
    finally:
        stop.set()
        await deferToThread(pg_tls.psql, "DROP TABLE IF EXISTS pooled_counter", dbname=APP_DB)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_session_state_is_gone_for_the_next_client(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, "session", max_size=1)], tmp_path)
    try:

        def first():
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                conn.execute("SET work_mem = '7MB'")
                conn.execute("CREATE TEMP TABLE mine (x int)")
                return conn.info.backend_pid

        def second():
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                mem = conn.execute("SHOW work_mem").fetchone()[0]
                temp = conn.execute(
                    "SELECT count(*) FROM pg_class WHERE relname = 'mine'"
                ).fetchone()[0]
                return mem, temp

        await deferToThread(first)
        mem, temp = await deferToThread(second)
        assert mem != "7MB" and temp == 0
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_transaction_mode_reapplies_client_parameters(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=2)], tmp_path)
    try:

        def run():
            a = psycopg.connect(
                app_dsn(proxy, pki, options=None, application_name="client-a"), autocommit=True
            )
            b = psycopg.connect(app_dsn(proxy, pki, application_name="client-b"), autocommit=True)
            a.execute("SET TimeZone = 'Asia/Tokyo'")
            seen = []
            for _ in range(5):
                seen.append(b.execute("SHOW TimeZone").fetchone()[0])
                seen.append(a.execute("SHOW TimeZone").fetchone()[0])
            names = {
                a.execute("SHOW application_name").fetchone()[0],
                b.execute("SHOW application_name").fetchone()[0],
            }
            a.close()
            b.close()
            return seen, names

        seen, names = await deferToThread(run)
        assert seen[1::2] == ["Asia/Tokyo"] * 5
        assert "Asia/Tokyo" not in seen[0::2]
        assert names == {"client-a", "client-b"}
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_acquire_timeout_names_the_pool(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [pooled_route(pki, pg_tls, "session", max_size=1, acquire_timeout="1s")], tmp_path
    )
    try:
        holder = await deferToThread(psycopg.connect, app_dsn(proxy, pki), autocommit=True)
        await deferToThread(holder.execute, "SELECT 1")

        def second():
            # Session mode: the client is given its server connection at
            # login (so that its BackendKeyData carries the server's PID).
            try:
                psycopg.connect(app_dsn(proxy, pki), autocommit=True).close()
            except psycopg.OperationalError as e:
                return str(e)
            return None

        text = await deferToThread(second)
        assert text is not None and f'pool "{POOL_USER}/{APP_DB}"' in text
        assert "no server connection available" in text
        await deferToThread(holder.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_cancel_reaches_the_attached_server(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls)], tmp_path)
    try:
        conn = await deferToThread(psycopg.connect, app_dsn(proxy, pki), autocommit=True)

        def slow():
            try:
                conn.execute("SELECT pg_sleep(20)")
            except psycopg.errors.QueryCanceled as e:
                return e
            return None

        running = deferToThread(slow)
        await sleep(0.5)
        await deferToThread(conn.cancel_safe)
        err = await running
        assert err is not None and "canceling statement due to user request" in str(err)
        assert (await deferToThread(lambda: conn.execute("SELECT 7").fetchone())) == (7,)
        await deferToThread(conn.close)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_aborted_and_dropped_clients_leave_nothing_behind(pki, pg_tls, tmp_path):
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=3)], tmp_path)
    try:
        await deferToThread(
            pg_tls.psql,
            "CREATE TABLE IF NOT EXISTS leftovers (x int); GRANT ALL ON leftovers TO PUBLIC",
            dbname=APP_DB,
        )

        def client(n):
            conn = psycopg.connect(app_dsn(proxy, pki))
            conn.execute("INSERT INTO leftovers VALUES (%s)", (n,))
            if n % 2:
                conn.rollback()
                conn.close()
            else:
                # Dropped mid-transaction, without a word.
                conn.pgconn.finish()

        await defer.gatherResults([deferToThread(client, n) for n in range(20)], consumeErrors=True)
        await sleep(0.5)
        count = await deferToThread(pg_tls.psql, "SELECT count(*) FROM leftovers", dbname=APP_DB)
        assert count == "0"
        idle_in_tx = await deferToThread(
            pg_tls.psql,
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{POOL_USER}' AND state LIKE 'idle in transaction%'",
        )
        assert idle_in_tx == "0"
    finally:
        await deferToThread(pg_tls.psql, "DROP TABLE IF EXISTS leftovers", dbname=APP_DB)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_query_log_has_statements_and_never_parameters(pki, pg_tls, tmp_path):
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    proxy = start_proxy([pooled_route(pki, pg_tls, log_queries=True)], tmp_path)
    try:

        def run():
            with psycopg.connect(app_dsn(proxy, pki), autocommit=True) as conn:
                conn.execute("SELECT 'simple'", prepare=False)
                conn.execute("SELECT %s::text", ("secret-parameter-value",))

        await deferToThread(run)
        await sleep(0.2)
    finally:
        globalLogPublisher.removeObserver(seen.append)
        await proxy.stop()
    logged = [e for e in seen if "statement" in e]
    texts = [e["statement"] for e in logged]
    assert "SELECT 'simple'" in texts
    assert any(t.startswith("SELECT $1::text") for t in texts)
    assert not any("secret-parameter-value" in repr(e) for e in seen)
    entry = logged[0]
    assert entry["user"] == SCRAM_USER and entry["database"] == APP_DB
    assert entry["route"] == "pool-transaction" and entry["client"].startswith("127.0.0.1:")
    assert entry["duration_ms"] >= 0


@pytest_twisted.ensureDeferred
async def test_cancel_from_an_unattached_client_does_nothing(pki, pg_tls, tmp_path):
    """
    Transaction mode, one server connection: B's query runs on it while A,
    logged in but between transactions, holds no server. A's cancel must
    not reach B's query.
    """
    async with running(tmp_path, [pooled_route(pki, pg_tls, max_size=1)]) as proxy:
        a = await deferToThread(psycopg.connect, app_dsn(proxy, pki), autocommit=True)
        b = await deferToThread(psycopg.connect, app_dsn(proxy, pki), autocommit=True)
        await deferToThread(a.execute, "SELECT 1")
        query = deferToThread(lambda: b.execute("SELECT pg_sleep(1.5), 'B done'").fetchone())
        await sleep(0.5)
        await deferToThread(a.cancel_safe)
        assert (await query)[1] == "B done"
        await deferToThread(a.close)
        await deferToThread(b.close)
