"""
SQLAlchemy 2 in its default settings (its QueuePool of 5 + 10 overflow,
reset on return by ROLLBACK), on psycopg 3 (whose C{prepare_threshold=5}
it keeps, and whose C{executemany} is pipelined) and on asyncpg (its
dialect prepares every statement, with a cache of 100 per connection).
SQLAlchemy has no COPY, cancel or LISTEN of its own: those belong to the
drivers, tested on their own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from harness import (
    LEAK_CHECK,
    Settings,
    client_b,
    client_b_async,
    expect_error,
    expect_error_async,
    leak_statements,
    run_in_threads,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def url(s: Settings, dialect: str, leak: bool) -> str:
    port = s.leak_port if leak else s.port
    return f"postgresql+{dialect}://{s.user}:{s.password}@{s.host}:{port}/{s.dbname}"


def engine(s: Settings, leak: bool = False) -> Engine:
    connect_args = {"sslmode": "verify-full", "sslrootcert": s.ca, "connect_timeout": 10}
    return create_engine(url(s, "psycopg", leak), connect_args=connect_args)


def async_engine(s: Settings, leak: bool = False) -> AsyncEngine:
    connect_args = {"ssl": ssl.create_default_context(cafile=s.ca), "timeout": 30}
    return create_async_engine(url(s, "asyncpg", leak), connect_args=connect_args)


def blocking(scenario: Callable[[Settings], Awaitable[None]]) -> Callable[[Settings], None]:
    return lambda s: asyncio.run(scenario(s))


def created(table: str, columns: str) -> list[Any]:
    return [text(f"DROP TABLE IF EXISTS {table}"), text(f"CREATE TABLE {table} ({columns})")]


def recreate(db: Engine, table: str, columns: str) -> None:
    with db.begin() as c:
        for statement in created(table, columns):
            c.execute(statement)


async def recreate_async(db: AsyncEngine, table: str, columns: str) -> None:
    async with db.begin() as c:
        for statement in created(table, columns):
            await c.execute(statement)


PLUS_ONE = text("SELECT CAST(:v AS int) + 1")
ECHO = text("SELECT CAST(:v AS int)")


# -- on psycopg ---------------------------------------------------------------


def many(s: Settings) -> None:
    table = s.table("many")
    insert = text(f"INSERT INTO {table} VALUES (:c, :i, :v)")
    db = engine(s)
    try:
        recreate(db, table, "client int, i int, v int")

        def client(ci: int) -> None:
            for i in range(s.repeat):
                with db.begin() as c:
                    v = c.execute(PLUS_ONE, {"v": i}).scalar_one()
                    assert v == i + 1, (ci, i, v)
                    c.execute(insert, {"c": ci, "i": i, "v": v})

        run_in_threads(client, s.clients)
        with db.connect() as c:
            count = c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            assert count == s.clients * s.repeat, count
    finally:
        db.dispose()


def pipeline(s: Settings) -> None:
    table = s.table("pipe")
    insert = text(f"INSERT INTO {table} VALUES (:id)")
    db = engine(s)
    try:
        recreate(db, table, "id int PRIMARY KEY")
        with db.begin() as c:
            c.execute(insert, [{"id": i} for i in range(20)])
        bad = [{"id": i} for i in range(20, 30)] + [{"id": 25}] + [{"id": i} for i in range(30, 40)]

        def failing() -> None:
            with db.begin() as c:
                c.execute(insert, bad)

        expect_error("23505", failing, "executemany with a duplicate")
        with db.connect() as c:
            assert c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 20
            for i in range(s.repeat):
                assert c.execute(ECHO, {"v": i}).scalar_one() == i
    finally:
        db.dispose()


def failed_tx(s: Settings) -> None:
    table = s.table("tx")
    insert = text(f"INSERT INTO {table} VALUES (:id)")
    db = engine(s)
    try:
        recreate(db, table, "id int PRIMARY KEY")
        with db.connect() as c:
            c.execute(insert, {"id": 1})
            expect_error("23505", lambda: c.execute(insert, {"id": 1}), "duplicate")
            expect_error("25P02", lambda: c.execute(text("SELECT 1")), "after the error")
            c.rollback()
            for i in range(s.repeat):
                assert c.execute(ECHO, {"v": i}).scalar_one() == i
            assert c.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() == 0
            c.commit()
    finally:
        db.dispose()


def leak(s: Settings) -> None:
    first = engine(s, leak=True)
    try:
        with first.connect().execution_options(isolation_level="AUTOCOMMIT") as a:
            for statement in leak_statements(s.lock_key):
                a.execute(text(statement))
    finally:
        first.dispose()
    second = engine(s, leak=True)
    try:
        with second.connect() as b:
            client_b(lambda: b.execute(text(LEAK_CHECK)).one())
    finally:
        second.dispose()


ON_PSYCOPG = {"many": many, "pipeline": pipeline, "failed_tx": failed_tx, "leak": leak}


# -- on asyncpg ---------------------------------------------------------------


async def many_async(s: Settings) -> None:
    table = s.table("many")
    insert = text(f"INSERT INTO {table} VALUES (:c, :i, :v)")
    db = async_engine(s)
    try:
        await recreate_async(db, table, "client int, i int, v int")

        async def client(ci: int) -> None:
            for i in range(s.repeat):
                async with db.begin() as c:
                    v = (await c.execute(PLUS_ONE, {"v": i})).scalar_one()
                    assert v == i + 1, (ci, i, v)
                    await c.execute(insert, {"c": ci, "i": i, "v": v})

        await asyncio.gather(*(client(ci) for ci in range(s.clients)))
        async with db.connect() as c:
            count = (await c.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            assert count == s.clients * s.repeat, count
    finally:
        await db.dispose()


async def pipeline_async(s: Settings) -> None:
    table = s.table("pipe")
    insert = text(f"INSERT INTO {table} VALUES (:id)")
    db = async_engine(s)
    try:
        await recreate_async(db, table, "id int PRIMARY KEY")
        async with db.begin() as c:
            await c.execute(insert, [{"id": i} for i in range(20)])
        bad = [{"id": i} for i in range(20, 30)] + [{"id": 25}] + [{"id": i} for i in range(30, 40)]

        async def failing() -> None:
            async with db.begin() as c:
                await c.execute(insert, bad)

        await expect_error_async("23505", failing, "executemany with a duplicate")
        async with db.connect() as c:
            assert (await c.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() == 20
            for i in range(s.repeat):
                assert (await c.execute(ECHO, {"v": i})).scalar_one() == i
    finally:
        await db.dispose()


async def failed_tx_async(s: Settings) -> None:
    table = s.table("tx")
    insert = text(f"INSERT INTO {table} VALUES (:id)")
    db = async_engine(s)
    try:
        await recreate_async(db, table, "id int PRIMARY KEY")
        async with db.connect() as c:
            await c.execute(insert, {"id": 1})
            await expect_error_async("23505", lambda: c.execute(insert, {"id": 1}), "duplicate")
            await expect_error_async("25P02", lambda: c.execute(ECHO, {"v": 1}), "after the error")
            await c.rollback()
            for i in range(s.repeat):
                assert (await c.execute(ECHO, {"v": i})).scalar_one() == i
            assert (await c.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one() == 0
            await c.commit()
    finally:
        await db.dispose()


async def leak_async(s: Settings) -> None:
    first = async_engine(s, leak=True)
    try:
        async with first.connect() as a:
            a = await a.execution_options(isolation_level="AUTOCOMMIT")
            for statement in leak_statements(s.lock_key):
                await a.execute(text(statement))
    finally:
        await first.dispose()
    second = async_engine(s, leak=True)
    try:
        async with second.connect() as b:

            async def check() -> Any:
                return (await b.execute(text(LEAK_CHECK))).one()

            await client_b_async(check)
    finally:
        await second.dispose()


ON_ASYNCPG = {
    "many": blocking(many_async),
    "pipeline": blocking(pipeline_async),
    "failed_tx": blocking(failed_tx_async),
    "leak": blocking(leak_async),
}
