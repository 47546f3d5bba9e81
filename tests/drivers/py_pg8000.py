"""
pg8000 (its native API) in its default settings: C{run()} uses unnamed
statements, C{prepare()} a named one (C{pg8000_statement_N}), which the
C{many} scenario uses as an application would for a hot statement.
pg8000 has no cancel and no pipeline; notifications are read with the
responses to the listener's next query.
"""

from __future__ import annotations

import io
import ssl
import time

import pg8000.native
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


def connect(s: Settings, leak: bool = False) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        s.user,
        host=s.host,
        port=s.leak_port if leak else s.port,
        database=s.dbname,
        password=s.password,
        ssl_context=ssl.create_default_context(cafile=s.ca),
        timeout=30,
    )


def many(s: Settings) -> None:
    table = s.table("many")
    conn = connect(s)
    conn.run(f"DROP TABLE IF EXISTS {table}")
    conn.run(f"CREATE TABLE {table} (client int, i int, v int)")
    conn.close()

    def client(c: int) -> None:
        conn = connect(s)
        try:
            plus_one = conn.prepare("SELECT CAST(:v AS int) + 1")
            for i in range(s.repeat):
                conn.run("START TRANSACTION")
                ((v,),) = plus_one.run(v=i)
                assert v == i + 1, (c, i, v)
                conn.run(f"INSERT INTO {table} VALUES (:c, :i, :v)", c=c, i=i, v=v)
                conn.run("COMMIT")
            plus_one.close()
        finally:
            conn.close()

    run_in_threads(client, s.clients)
    conn = connect(s)
    try:
        assert conn.run(f"SELECT count(*) FROM {table}") == [[s.clients * s.repeat]]
    finally:
        conn.close()


def copy(s: Settings) -> None:
    table = s.table("copy")
    data = copy_rows()
    conn = connect(s)
    try:
        conn.run(f"DROP TABLE IF EXISTS {table}")
        conn.run(f"CREATE TABLE {table} (id int PRIMARY KEY, t text)")
        conn.run(f"COPY {table} (id, t) FROM STDIN", stream=io.StringIO(data))
        out = io.StringIO()
        conn.run(f"COPY (SELECT id, t FROM {table} ORDER BY id) TO STDOUT", stream=out)
        assert out.getvalue() == data, "COPY TO gave back something else"
        assert conn.run(f"SELECT count(*) FROM {table}") == [[1000]]
    finally:
        conn.close()


def failed_tx(s: Settings) -> None:
    table = s.table("tx")
    conn = connect(s)
    try:
        conn.run(f"DROP TABLE IF EXISTS {table}")
        conn.run(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        conn.run("START TRANSACTION")
        conn.run(f"INSERT INTO {table} VALUES (:id)", id=1)
        expect_error(
            "23505", lambda: conn.run(f"INSERT INTO {table} VALUES (:id)", id=1), "duplicate"
        )
        expect_error("25P02", lambda: conn.run("SELECT 1"), "a statement after the error")
        conn.run("ROLLBACK")
        for i in range(s.repeat):
            assert conn.run("SELECT CAST(:v AS int)", v=i) == [[i]]
        assert conn.run(f"SELECT count(*) FROM {table}") == [[0]]
    finally:
        conn.close()


def listen(s: Settings) -> None:
    channel = s.table("chan")
    listener, notifier = connect(s), connect(s)
    try:
        listener.run(f"LISTEN {channel}")
        for payload in NOTIFY_PAYLOADS:
            time.sleep(0.3)  # the listener is idle, between transactions
            notifier.run("SELECT pg_notify(:c, :p)", c=channel, p=payload)
            time.sleep(0.2)
            listener.run("SELECT 1")  # pg8000 reads what arrived meanwhile
            got = [(c, p) for _pid, c, p in listener.notifications]
            listener.notifications.clear()
            expect_notifications(got, channel, payload, "with the next query's results")
    finally:
        listener.close()
        notifier.close()


def leak(s: Settings) -> None:
    a = connect(s, leak=True)
    try:
        for statement in leak_statements(s.lock_key):
            a.run(statement)
    finally:
        a.close()
    b = connect(s, leak=True)
    try:
        client_b(lambda: b.run(LEAK_CHECK)[0])
    finally:
        b.close()


SCENARIOS = {
    "many": many,
    "copy": copy,
    "failed_tx": failed_tx,
    "listen": listen,
    "leak": leak,
}
