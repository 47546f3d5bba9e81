"""
asyncpg in its default settings: every statement with parameters goes
through its statement cache, so it is a named prepared statement
(C{__asyncpg_stmt_N__}) from its first execution. C{executemany} is its
pipeline (Bind/Execute for every row, one Sync); a task cancelled during
a query sends a CancelRequest.
"""

from __future__ import annotations

import asyncio
import io
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from harness import (
    LEAK_CHECK,
    NOTIFY_PAYLOADS,
    Settings,
    client_b_async,
    copy_rows,
    expect_error_async,
    expect_notifications,
    leak_statements,
)


async def connect(s: Settings, leak: bool = False) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=s.host,
        port=s.leak_port if leak else s.port,
        user=s.user,
        password=s.password,
        database=s.dbname,
        ssl=ssl.create_default_context(cafile=s.ca),
        timeout=30,
    )


def blocking(scenario: Callable[[Settings], Awaitable[None]]) -> Callable[[Settings], None]:
    """The scenario, on an event loop of its own (the harness runs each in a thread)."""
    return lambda s: asyncio.run(scenario(s))


async def many(s: Settings) -> None:
    table = s.table("many")
    conn = await connect(s)
    await conn.execute(f"DROP TABLE IF EXISTS {table}")
    await conn.execute(f"CREATE TABLE {table} (client int, i int, v int)")
    await conn.close()

    async def client(c: int) -> None:
        conn = await connect(s)
        try:
            for i in range(s.repeat):
                async with conn.transaction():
                    v = await conn.fetchval("SELECT $1::int + 1", i)
                    assert v == i + 1, (c, i, v)
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, $2, $3)", c, i, v)
        finally:
            await conn.close()

    await asyncio.gather(*(client(c) for c in range(s.clients)))
    conn = await connect(s)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == s.clients * s.repeat
    finally:
        await conn.close()


async def pipeline(s: Settings) -> None:
    table = s.table("pipe")
    insert = f"INSERT INTO {table} VALUES ($1)"
    conn = await connect(s)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        await conn.executemany(insert, [(i,) for i in range(20)])
        await conn.execute("SELECT 1")  # no parameters: the simple query protocol
        await conn.executemany(insert, [(i,) for i in range(20, 40)])
        bad = [(i,) for i in range(40, 50)] + [(45,)] + [(i,) for i in range(50, 60)]
        await expect_error_async(
            "23505", lambda: conn.executemany(insert, bad), "executemany with a duplicate"
        )
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 40
        for i in range(s.repeat):
            assert await conn.fetchval("SELECT $1::int * 2", i) == i * 2
    finally:
        await conn.close()


async def copy(s: Settings) -> None:
    table = s.table("copy")
    data = copy_rows()
    conn = await connect(s)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, t text)")
        await conn.copy_to_table(table, source=io.BytesIO(data.encode()), columns=["id", "t"])
        out = io.BytesIO()
        await conn.copy_from_query(f"SELECT id, t FROM {table} ORDER BY id", output=out)
        assert out.getvalue().decode() == data, "COPY TO gave back something else"
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 1000
    finally:
        await conn.close()


async def failed_tx(s: Settings) -> None:
    table = s.table("tx")
    insert = f"INSERT INTO {table} VALUES ($1)"
    conn = await connect(s)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        tx = conn.transaction()
        await tx.start()
        await conn.execute(insert, 1)
        await expect_error_async("23505", lambda: conn.execute(insert, 1), "duplicate")
        await expect_error_async(
            "25P02", lambda: conn.fetchval("SELECT $1::int", 1), "a statement after the error"
        )
        await tx.rollback()
        for i in range(s.repeat):
            assert await conn.fetchval("SELECT $1::int", i) == i
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
    finally:
        await conn.close()


async def cancel(s: Settings) -> None:
    conn = await connect(s)
    try:
        start = time.monotonic()
        try:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10)"), 0.5)
        except asyncio.TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(10) returned within 0.5s")
        # The next query waits for the cancelled one: until pg_sleep's end
        # if the cancel never reached the server.
        assert await conn.fetchval("SELECT 1") == 1
        assert time.monotonic() - start < 8, "the cancel took effect only at the end"
    finally:
        await conn.close()


async def listen(s: Settings) -> None:
    channel = s.table("chan")
    listener, notifier = await connect(s), await connect(s)
    try:
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def received(_conn: Any, _pid: int, ch: str, payload: str) -> None:
            queue.put_nowait((ch, payload))

        await listener.add_listener(channel, received)
        for payload in NOTIFY_PAYLOADS:
            await asyncio.sleep(0.3)  # the listener is idle, between transactions
            await notifier.execute("SELECT pg_notify($1, $2)", channel, payload)
            try:
                got = [await asyncio.wait_for(queue.get(), 5)]
            except asyncio.TimeoutError:
                got = []
            expect_notifications(got, channel, payload)
        assert await listener.fetchval("SELECT 1") == 1
    finally:
        await listener.close()
        await notifier.close()


async def leak(s: Settings) -> None:
    a = await connect(s, leak=True)
    try:
        for statement in leak_statements(s.lock_key):
            await a.execute(statement)
    finally:
        await a.close()
    b = await connect(s, leak=True)
    try:
        await client_b_async(lambda: b.fetchrow(LEAK_CHECK))
    finally:
        await b.close()


SCENARIOS = {
    name: blocking(f)
    for name, f in {
        "many": many,
        "pipeline": pipeline,
        "copy": copy,
        "failed_tx": failed_tx,
        "cancel": cancel,
        "listen": listen,
        "leak": leak,
    }.items()
}
