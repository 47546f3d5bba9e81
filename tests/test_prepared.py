"""
Named prepared statements through a transaction pool, with real psycopg
clients in their default settings (C{prepare_threshold=5}: every statement
run five times is prepared under a name such as C{_pg3_0}, the same name
in every client).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest_twisted
from support.dsn import app_dsn
from support.pooling import admin, pooled_pids, pooled_route, scalar, server_baseline, the_pool
from support.proxy import start_proxy
from support.waiting import in_thread
from twisted.internet import defer

from pgtls_twisted.testing.cluster import APP_DB, POOL_USER

COUNT_SERVICE = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
    (POOL_USER, APP_DB),
)


def client(proxy, pki, **kwargs) -> psycopg.Connection:
    """A psycopg client in its default settings (autocommit off, prepare_threshold 5)."""
    return psycopg.connect(app_dsn(proxy, pki), **kwargs)


@pytest_twisted.ensureDeferred
async def test_hundred_psycopg_clients_on_five_connections(pki, pg_tls, tmp_path):
    """The issue's scenario: 100 clients x 20 transactions, max_size = 5, defaults."""
    baseline = await server_baseline(pg_tls)
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=5, acquire_timeout="60s")], tmp_path)
    most = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            most[0] = max(most[0], int(scalar(pg_tls, *COUNT_SERVICE)) - baseline)
            stop.wait(0.05)

    def run(i: int) -> int:
        total = 0
        with client(proxy, pki) as conn:
            for j in range(20):
                with conn.transaction():
                    total += conn.execute("SELECT %s::int + 1", (j,)).fetchone()[0]
                    conn.execute("SELECT now(), %s::text", (str(i),)).fetchone()
        return total

    try:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results = await defer.gatherResults(
            [in_thread(run, i, timeout=120) for i in range(100)], consumeErrors=True
        )
        stop.set()
        assert results == [sum(range(1, 21))] * 100
        assert 0 < most[0] <= 5
    finally:
        stop.set()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_pipeline_prepares_and_shares(pki, pg_tls, tmp_path):
    """A 50-query pipeline crosses the threshold; a second client reuses the statement."""
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)

    def run():
        out = []
        for _ in range(2):
            with client(proxy, pki, autocommit=True) as conn:
                with conn.pipeline():
                    cursors = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
                out.append([c.fetchone()[0] for c in cursors])
                names = conn.execute(
                    "SELECT name FROM pg_prepared_statements WHERE statement LIKE %s",
                    ("SELECT $1::int * 2%",),
                ).fetchall()
                out.append(names)
        return out

    try:
        first, names1, second, names2 = await in_thread(run, timeout=60)
        assert first == second == [i * 2 for i in range(50)]
        # One statement on the one server connection, under pgtls's name.
        assert len(names1) == 1 and names1[0][0].startswith("pgtls_")
        assert names2 == names1
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_pipeline_with_errors_stays_in_sync(pki, pg_tls, tmp_path):
    """Errors inside pipelines of named and unnamed statements, with injected Parses."""
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=2)], tmp_path)

    def run():
        seen = []
        with client(proxy, pki, autocommit=True) as conn:
            for i in range(6):  # prepared from the 5th on
                conn.execute("SELECT %s::int", (i,))
            for round_ in range(3):
                try:
                    with conn.pipeline():
                        conn.execute("SELECT %s::int", (1,))
                        conn.execute("SELECT 1/%s::int", (0,))  # fails
                        conn.execute("SELECT %s::int", (2,))
                except psycopg.errors.DivisionByZero:
                    seen.append("error")
                seen.append(conn.execute("SELECT %s::int", (round_,)).fetchone()[0])
            # A failing statement prepared by name: its Parse fails, so the
            # name is not registered, and the next try prepares it again.
            for _ in range(7):
                try:
                    conn.execute("SELECT * FROM no_such_table_x")
                except psycopg.errors.UndefinedTable:
                    pass
            seen.append(conn.execute("SELECT %s::int", (9,)).fetchone()[0])
        return seen

    try:
        assert await in_thread(run, timeout=60) == ["error", 0, "error", 1, "error", 2, 9]
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_lru_limit_and_discard_all(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [pooled_route(pki, pg_tls, max_size=1, max_prepared_statements=3)], tmp_path
    )

    def run():
        with client(proxy, pki, autocommit=True, prepare_threshold=0) as conn:
            for i in range(10):
                conn.execute(f"SELECT {i} + %s::int", (1,))
        with client(proxy, pki, autocommit=True, prepare_threshold=0) as conn:
            # Attached again: the extra statements were closed first.
            count = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
            conn.execute("SELECT 100 + %s::int", (1,))
            conn.execute("DISCARD ALL")
            after = conn.execute("SELECT 200 + %s::int", (1,)).fetchone()[0]
            again = conn.execute("SELECT 100 + %s::int", (1,)).fetchone()[0]
        return count, after, again

    try:
        count, after, again = await in_thread(run, timeout=60)
        # The limit, plus the count query itself (prepared in this transaction).
        assert count <= 4
        assert (after, again) == (201, 101)
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_feature_off_pins_named_statements(pki, pg_tls, tmp_path, events):
    proxy = start_proxy(
        [pooled_route(pki, pg_tls, max_size=2, max_prepared_statements=0)], tmp_path
    )

    def run():
        with client(proxy, pki, autocommit=True) as conn:
            return [conn.execute("SELECT %s::int", (i,)).fetchone()[0] for i in range(8)]

    try:
        assert await in_thread(run, timeout=60) == list(range(8))
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_injected_parse_error_is_the_clients_error(pki, pg_tls, tmp_path):
    """
    A statement prepared on one server connection is injected on the next;
    if its Parse fails there (the table went away), the client gets that
    error for its own statement, and goes on.
    """
    proxy = start_proxy([pooled_route(pki, pg_tls, max_size=1)], tmp_path)
    dsn = app_dsn(proxy, pki)

    def run():
        with admin(pg_tls, APP_DB) as su:
            su.execute("CREATE TABLE IF NOT EXISTS inj (x int)")
            su.execute("GRANT ALL ON inj TO PUBLIC")
        out = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(6):  # prepared by name from the fifth
                conn.execute("SELECT count(*) FROM inj WHERE x > %s", (0,))
            # Its server connection goes; the next one lacks the statement.
            with admin(pg_tls, APP_DB) as su:
                pids = pooled_pids(pg_tls)
                for pid in pids:
                    su.execute("SELECT pg_terminate_backend(%s)", (pid,))
                su.execute("DROP TABLE inj")
            # pgtls notices the idle connection closing and drops it.
            deadline = time.monotonic() + 10
            while the_pool(proxy).size and time.monotonic() < deadline:
                time.sleep(0.05)
            try:
                conn.execute("SELECT count(*) FROM inj WHERE x > %s", (0,))
            except psycopg.errors.UndefinedTable as e:
                out.append(e.sqlstate)
            with admin(pg_tls, APP_DB) as su:
                su.execute("CREATE TABLE inj (x int)")
                su.execute("GRANT ALL ON inj TO PUBLIC")
            out.append(conn.execute("SELECT count(*) FROM inj WHERE x > %s", (0,)).fetchone()[0])
            out.append(conn.execute("SELECT 1").fetchone()[0])
        return out

    try:
        assert await in_thread(run, timeout=60) == ["42P01", 0, 1]
    finally:
        await proxy.stop()
