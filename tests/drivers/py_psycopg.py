"""
psycopg 3 in its default settings: C{prepare_threshold=5}, so a statement
run a sixth time on a connection becomes a named prepared statement
(C{_pg3_N}); the pipeline scenario uses C{Connection.pipeline()}.
"""

from __future__ import annotations

import threading
import time

import psycopg
from harness import (
    LEAK_CHECK,
    NOTIFY_PAYLOADS,
    Settings,
    client_b,
    copy_rows,
    expect_error,
    expect_notifications,
    leak_statements,
    run_in_threads,
)


def connect(s: Settings, leak: bool = False, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(s.dsn(leak), **kwargs)


def many(s: Settings) -> None:
    table = s.table("many")
    with connect(s) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (client int, i int, v int)")

    def client(c: int) -> None:
        with connect(s) as conn:
            for i in range(s.repeat):
                with conn.transaction():
                    v = conn.execute("SELECT %s::int + 1", (i,)).fetchone()[0]
                    assert v == i + 1, (c, i, v)
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (c, i, v))

    run_in_threads(client, s.clients)
    with connect(s) as conn:
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        assert count == s.clients * s.repeat, count


def pipeline(s: Settings) -> None:
    with connect(s) as conn:
        # A long pipeline of one statement crosses the threshold inside it,
        # between explicitly named (prepare=True) and unnamed ones.
        with conn.pipeline():
            curs = [
                conn.execute("SELECT %s::int * 2", (i,), prepare={3: True, 7: False}.get(i))
                for i in range(30)
            ]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(30)]
        conn.commit()

        def failing() -> None:
            with conn.pipeline():
                conn.execute("SELECT %s::int", (1,), prepare=True)
                conn.execute("SELECT %s::int + 1", (1,), prepare=False)
                conn.execute("SELECT 1 / %s::int", (0,))
                conn.execute("SELECT %s::int * 2", (5,))

        expect_error("22012", failing, "a pipeline with a division by zero")
        conn.rollback()
        with conn.pipeline():
            again = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(10)]
            named = conn.execute("SELECT %s::int", (7,), prepare=True)
        assert [c.fetchone()[0] for c in again] == [i * 2 for i in range(10)]
        assert named.fetchone()[0] == 7
        conn.commit()


def copy(s: Settings) -> None:
    table = s.table("copy")
    data = copy_rows()
    with connect(s) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t text)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, t) FROM STDIN") as cp:
                cp.write(data)
            out = bytearray()
            with cur.copy(f"COPY (SELECT id, t FROM {table} ORDER BY id) TO STDOUT") as cp:
                for chunk in cp:
                    out += chunk
        assert out.decode() == data, "COPY TO gave back something else"
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1000
        conn.commit()


def failed_tx(s: Settings) -> None:
    table = s.table("tx")
    with connect(s) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        conn.commit()
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
        expect_error(
            "23505", lambda: conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,)), "duplicate"
        )
        expect_error("25P02", lambda: conn.execute("SELECT 1"), "a statement after the error")
        conn.rollback()
        for i in range(s.repeat):
            assert conn.execute("SELECT %s::int", (i,)).fetchone()[0] == i
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
        conn.commit()


def cancel(s: Settings) -> None:
    with connect(s) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        start = time.monotonic()
        expect_error("57014", lambda: conn.execute("SELECT pg_sleep(10)"), "pg_sleep(10)")
        assert time.monotonic() - start < 8, "the cancel took effect only at the end"
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def listen(s: Settings) -> None:
    channel = s.table("chan")
    with connect(s, autocommit=True) as listener, connect(s, autocommit=True) as notifier:
        listener.execute(f"LISTEN {channel}")
        for payload in NOTIFY_PAYLOADS:
            time.sleep(0.3)  # the listener is idle, between transactions
            notifier.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            got = list(listener.notifies(timeout=5, stop_after=1))
            expect_notifications([(n.channel, n.payload) for n in got], channel, payload)
        assert listener.execute("SELECT 1").fetchone()[0] == 1


def leak(s: Settings) -> None:
    with connect(s, leak=True, autocommit=True) as a:
        for statement in leak_statements(s.lock_key):
            a.execute(statement)
    with connect(s, leak=True) as b:
        client_b(lambda: b.execute(LEAK_CHECK).fetchone())


SCENARIOS = {
    "many": many,
    "pipeline": pipeline,
    "copy": copy,
    "failed_tx": failed_tx,
    "cancel": cancel,
    "listen": listen,
    "leak": leak,
}
