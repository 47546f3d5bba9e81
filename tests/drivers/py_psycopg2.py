"""
psycopg2 in its default settings: the simple query protocol with
parameters merged on the client, so no prepared statements; it is here as
the baseline most applications still run on. No pipeline mode.
"""

from __future__ import annotations

import io
import select
import threading
import time

import psycopg2
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


def connect(s: Settings, leak: bool = False) -> psycopg2.extensions.connection:
    return psycopg2.connect(s.dsn(leak))


def one(conn: psycopg2.extensions.connection, sql: str, params: tuple = ()) -> object:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def many(s: Settings) -> None:
    table = s.table("many")
    conn = connect(s)
    with conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (client int, i int, v int)")
    conn.close()

    def client(c: int) -> None:
        conn = connect(s)
        try:
            for i in range(s.repeat):
                with conn, conn.cursor() as cur:  # one transaction, committed at the end
                    cur.execute("SELECT %s::int + 1", (i,))
                    v = cur.fetchone()[0]
                    assert v == i + 1, (c, i, v)
                    cur.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (c, i, v))
        finally:
            conn.close()

    run_in_threads(client, s.clients)
    conn = connect(s)
    try:
        assert one(conn, f"SELECT count(*) FROM {table}") == s.clients * s.repeat
    finally:
        conn.close()


def copy(s: Settings) -> None:
    table = s.table("copy")
    data = copy_rows()
    conn = connect(s)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t text)")
            cur.copy_expert(f"COPY {table} (id, t) FROM STDIN", io.StringIO(data))
            out = io.StringIO()
            cur.copy_expert(f"COPY (SELECT id, t FROM {table} ORDER BY id) TO STDOUT", out)
        assert out.getvalue() == data, "COPY TO gave back something else"
        assert one(conn, f"SELECT count(*) FROM {table}") == 1000
        conn.commit()
    finally:
        conn.close()


def failed_tx(s: Settings) -> None:
    table = s.table("tx")
    conn = connect(s)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        cur = conn.cursor()
        cur.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
        expect_error(
            "23505", lambda: cur.execute(f"INSERT INTO {table} VALUES (%s)", (1,)), "duplicate"
        )
        expect_error("25P02", lambda: cur.execute("SELECT 1"), "a statement after the error")
        conn.rollback()
        for i in range(s.repeat):
            assert one(conn, "SELECT %s::int", (i,)) == i
        assert one(conn, f"SELECT count(*) FROM {table}") == 0
        conn.commit()
    finally:
        conn.close()


def cancel(s: Settings) -> None:
    conn = connect(s)
    try:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        start = time.monotonic()
        expect_error("57014", lambda: one(conn, "SELECT pg_sleep(10)"), "pg_sleep(10)")
        assert time.monotonic() - start < 8, "the cancel took effect only at the end"
        conn.rollback()
        assert one(conn, "SELECT 1") == 1
    finally:
        conn.close()


def listen(s: Settings) -> None:
    channel = s.table("chan")
    listener, notifier = connect(s), connect(s)
    try:
        listener.autocommit = notifier.autocommit = True
        with listener.cursor() as cur:
            cur.execute(f"LISTEN {channel}")
        for payload in NOTIFY_PAYLOADS:
            time.sleep(0.3)  # the listener is idle, between transactions
            with notifier.cursor() as cur:
                cur.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            deadline = time.monotonic() + 5
            while not listener.notifies and time.monotonic() < deadline:
                select.select([listener], [], [], max(0.0, deadline - time.monotonic()))
                listener.poll()
            got = [(n.channel, n.payload) for n in listener.notifies]
            del listener.notifies[:]
            expect_notifications(got, channel, payload)
        assert one(listener, "SELECT 1") == 1
    finally:
        listener.close()
        notifier.close()


def leak(s: Settings) -> None:
    a = connect(s, leak=True)
    try:
        a.autocommit = True
        with a.cursor() as cur:
            for statement in leak_statements(s.lock_key):
                cur.execute(statement)
    finally:
        a.close()
    b = connect(s, leak=True)
    try:

        def check() -> object:
            with b.cursor() as cur:
                cur.execute(LEAK_CHECK)
                return cur.fetchone()

        client_b(check)
    finally:
        b.close()


SCENARIOS = {
    "many": many,
    "copy": copy,
    "failed_tx": failed_tx,
    "cancel": cancel,
    "listen": listen,
    "leak": leak,
}
