"""
Cancels across instances (issue 15, item 2) with the suite's PostgreSQL:
two pgtls instances (C{[cluster] instance = 1} and C{2}, one peers list)
behind a test load balancer (L{support.steer}); a client's session is
on instance 1, and the new connection libpq's cancel makes is sent to
instance 2, which passes the request to instance 1: the client's query is
cancelled. With PROXY headers on the listeners, the request is passed on
behind a header that names the client. A forged key naming instance 1 is
passed on once and dropped there. Pass-through and pooled routes, libpq's
encrypted PQcancelCreate (psycopg's C{cancel_safe()}) and its plaintext
PQcancel (psql's Ctrl-C; psycopg's C{cancel()} holds the GIL while it
waits, which would freeze the in-process instances and balancer).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support.dsn import app_dsn
from support.logcapture import captured
from support.net import free_ports
from support.pooling import admin, pooled_route
from support.proxy import RunningProxy, route, start_proxy
from support.steer import SteeredBalancer
from support.waiting import in_thread, sleep, until, until_in_thread
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import SCRAM_PASSWORD
from pgtls_twisted.testing.pki import PKI

CANCELED = "canceling statement due to user request"


@asynccontextmanager
async def two_instances(
    pki: PKI, pg_tls: Any, tmp_path: Path, proxy_protocol: bool
) -> AsyncIterator[tuple[RunningProxy, RunningProxy, SteeredBalancer]]:
    """Instances 1 and 2, each with a pass-through and a pooled route, behind a balancer."""
    ports = free_ports(4)
    listener = {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]} if proxy_protocol else {}
    # The peers list names each instance's pass-through listener: any
    # listener of an instance serves every cancel of that instance.
    peers = [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[2]}"]
    instances = []
    for instance in (1, 2):
        app = route(pki, pg_tls, listener=listener)
        pool = pooled_route(pki, pg_tls)
        app["listener"]["bind_address"] = peers[instance - 1]
        pool["listener"].update(listener, bind_address=f"127.0.0.1:{ports[2 * instance - 1]}")
        directory = tmp_path / f"instance-{instance}"
        directory.mkdir()
        instances.append(
            start_proxy([app, pool], directory, cluster={"instance": instance, "peers": peers})
        )
    one, two = instances
    balancer = SteeredBalancer(one.port("app"), proxy=proxy_protocol)
    try:
        yield one, two, balancer
    finally:
        await balancer.close()
        for proxy in instances:
            await proxy.stop()


class _Psql(protocol.ProcessProtocol):
    """psql running one query; its output once it has ended."""

    def __init__(self) -> None:
        self.out = b""
        self.ended: defer.Deferred[bytes] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(self.out)


async def _cancelled_by_psql(
    pki: PKI,
    pg: Any,
    balancer: SteeredBalancer,
    session: RunningProxy,
    other: RunningProxy,
    name: str,
) -> str:
    """psql's query on C{session}, and its Ctrl-C (libpq's PQcancel) sent to C{other}."""
    psql = _Psql()
    env = dict(os.environ, PGPASSWORD=SCRAM_PASSWORD)
    args = ["psql", app_dsn(balancer.port, pki, password=None), "-c", "SELECT pg_sleep(30)"]
    process = reactor.spawnProcess(psql, "psql", args, env=env)
    await until(lambda: session.route(name).clients, 10, "psql's session")
    await until_in_thread(lambda: _active(pg), 10, "psql's query")
    await sleep(0.3)  # on its way to the server
    balancer.target = other.port(name)
    process.signalProcess(signal.SIGINT)
    return (await psql.ended).decode()


async def _cancelled_by_psycopg(
    pki: PKI,
    pg: Any,
    balancer: SteeredBalancer,
    session: RunningProxy,
    other: RunningProxy,
    name: str,
) -> str:
    """psycopg's query on C{session}, and its C{cancel_safe()} (PQcancelCreate) sent to C{other}."""
    conn = await deferToThread(
        psycopg.connect, app_dsn(balancer.port, pki), autocommit=True, connect_timeout=10
    )
    try:
        assert len(session.route(name).clients) == 1

        def sleeping() -> str:
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as e:
                return str(e)
            return "not cancelled"

        query = deferToThread(sleeping)
        await until_in_thread(lambda: _active(pg), 10, "the query")
        await sleep(0.3)
        balancer.target = other.port(name)
        await deferToThread(conn.cancel_safe)
        result = await query
        # The session goes on.
        row = await deferToThread(lambda: conn.execute("SELECT 42").fetchone())
        assert row == (42,)
        return result
    finally:
        await deferToThread(conn.close)


def _active(cluster: Any) -> bool:
    """(Blocking.) Whether the test's pg_sleep(30) runs at the server."""
    with admin(cluster) as look:
        row = look.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'"
        ).fetchone()
    return row is not None and row[0] == 1


@pytest.mark.parametrize("proxy_protocol", [False, True], ids=["plain", "proxy-protocol"])
@pytest.mark.parametrize("name", ["app", "pool-transaction"])
@pytest.mark.parametrize("client", ["psql", "psycopg"])
@pytest_twisted.ensureDeferred
async def test_a_cancel_on_the_wrong_instance_cancels_the_right_query(
    pki: PKI, pg_tls: Any, tmp_path: Path, proxy_protocol: bool, name: str, client: str
) -> None:
    async with two_instances(pki, pg_tls, tmp_path, proxy_protocol) as (one, two, balancer):
        balancer.target = one.port(name)
        cancelled = _cancelled_by_psql if client == "psql" else _cancelled_by_psycopg
        with captured() as events:
            started = time.monotonic()
            result = await cancelled(pki, pg_tls, balancer, one, two, name)
        assert CANCELED in result, result
        assert time.monotonic() - started < 15
        # The session's connection reached instance 1; the cancel's, instance 2.
        assert balancer.routed == [one.port(name), two.port(name)]

        lines = [formatEvent(e) for e in events]
        passed = [line for line in lines if "cancel request passed to instance 1" in line]
        assert len(passed) == 1, lines
        assert f"at 127.0.0.1:{one.port('app')}" in passed[0]
        assert any("cancel request forwarded to route=" in line for line in lines), lines
        if proxy_protocol:
            # Both instances saw the cancel's client (the balancer named it
            # to instance 2, and instance 2 to instance 1), each through
            # the one that passed the connection on.
            client = f" open peer=127.0.0.1:{balancer.clients[-1]} route="
            opened = [line for line in lines if client in line and " via=127.0.0.1:" in line]
            assert len(opened) == 2, lines
        assert _outcomes(two) == {"peer": 1}
        assert _outcomes(one) == {"forwarded": 1}


def _outcomes(proxy: RunningProxy) -> dict[str, int]:
    """Cancel requests by outcome, summed over the instance's routes."""
    found: dict[str, int] = {}
    for name in ("app", "pool-transaction"):
        for outcome, count in proxy.route(name).metrics.stats[name].cancels.items():
            if count:
                found[outcome] = found.get(outcome, 0) + count
    return found


@pytest_twisted.ensureDeferred
async def test_a_forged_key_is_passed_on_once_and_dropped(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    """No answer, no second hop: instance 1 finds no such session and ignores it."""
    async with two_instances(pki, pg_tls, tmp_path, proxy_protocol=False) as (one, two, _):
        request = wire.CancelRequest(4242, b"\x01forged-key")

        def send() -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", two.port("app")), timeout=10) as s:
                s.sendall(request.encode())
                return s.recv(100)

        assert await in_thread(send) == b""
        await until(lambda: _outcomes(one), 5, "instance 1 to see it")
        assert _outcomes(two) == {"peer": 1}
        assert _outcomes(one) == {"ignored": 1}
