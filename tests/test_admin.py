"""
The admin console: psql (and psycopg) against pgtls itself, over the same
listeners and the same authentication as every session.
"""

from __future__ import annotations

import os

import psycopg
import pytest_twisted
from support.pooling import pooled_route
from support.proxy import route, start_proxy
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_PASSWORD, SCRAM_USER


def admin_dsn(proxy, pki, name=None, **extra):
    params = dict(
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        dbname="pgtls",
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )
    params.update(extra)
    return proxy.dsn(name, **params)


async def psql(dsn, sql):
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        "psql", [dsn, "-X", "-A", "-F", "|", "-c", sql], env=dict(os.environ), reactor=reactor
    )
    return out.decode(), err.decode(), code


def query(dsn, sql):
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql)
        columns = [d.name for d in cur.description] if cur.description else []
        return columns, cur.fetchall() if cur.description else []


@pytest_twisted.ensureDeferred
async def test_show_commands_through_psql(pki, pg_tls, tmp_path):
    proxy = start_proxy(
        [route(pki, pg_tls), pooled_route(pki, pg_tls)],
        tmp_path,
        admin={"users": [SCRAM_USER]},
    )
    try:
        # A pooled client, so SHOW POOLS has a row.
        client = await deferToThread(
            psycopg.connect, dsn_for(proxy, pki, "pool-transaction"), autocommit=True
        )
        await deferToThread(client.execute, "SELECT 1")
        for command in ("ROUTES", "POOLS", "CLIENTS", "SERVERS", "STATS", "CONFIG", "VERSION"):
            out, err, code = await psql(admin_dsn(proxy, pki), f"SHOW {command}")
            assert code == 0, (command, err)
            print(command, out)
        out, _, _ = await psql(admin_dsn(proxy, pki), "SHOW POOLS")
        header = out.splitlines()[0].split("|")
        assert header[:4] == ["database", "user", "cl_active", "cl_waiting"]
        assert APP_DB in out
        await deferToThread(client.close)
    finally:
        await proxy.stop()


def dsn_for(proxy, pki, name):
    from pgtls_twisted.testing.cluster import APP_DB

    return proxy.dsn(
        name,
        user=SCRAM_USER,
        password=SCRAM_PASSWORD,
        dbname=APP_DB,
        sslmode="verify-full",
        sslrootcert=pki.cert("ca"),
        connect_timeout=10,
    )


@pytest_twisted.ensureDeferred
async def test_metrics_smoke(pki, pg_tls, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families
    from twisted.web.client import Agent, readBody

    proxy = start_proxy(
        [route(pki, pg_tls), pooled_route(pki, pg_tls)],
        tmp_path,
        metrics={"bind_address": "127.0.0.1:0"},
    )
    try:
        client = await deferToThread(
            psycopg.connect, dsn_for(proxy, pki, "pool-transaction"), autocommit=True
        )
        await deferToThread(client.execute, "SELECT 1")
        port = proxy.service._metricsService.port.getHost().port
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        body = (await readBody(response)).decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        print(sorted(families))
        print(body[:3000])
        await deferToThread(client.close)
    finally:
        await proxy.stop()
