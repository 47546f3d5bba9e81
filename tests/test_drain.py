"""
What a drain (SIGTERM's graceful shutdown) does to the connections it
finds just starting, in process: the cases a rolling deploy behind a
load balancer hits all the time (tests/test_rolling_deploy.py), each
made deterministic here.

* A connection the kernel had completed but pgtls had not accepted yet
  when the drain began is accepted and served, not reset by the close of
  the listening socket (a balancer already handed it a client, and
  cannot retry it elsewhere); a connect after that is refused (which a
  balancer retries).
* A transaction-mode client that has logged in but not yet had a
  transaction (its first query is on its way) gets that transaction, and
  is let go at its end; one that logs in during the drain too.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from support import rawclient
from support.dsn import app_dsn
from support.net import refused
from support.pooling import pooled_route
from support.proxy import start_proxy
from support.waiting import in_thread, until

from pgtls_twisted.testing.cluster import APP_DB, SCRAM_PASSWORD, SCRAM_USER
from pgtls_twisted.testing.pki import PKI

ADMIN_SHUTDOWN = "terminating connection due to administrator command"


def _served_once(sock: socket.socket, pki: PKI) -> tuple[list[Any], str]:
    """
    (Blocking.) On C{sock}: TLS, a login and one query: its rows, and the
    SQLSTATE pgtls then closes the connection with.
    """
    with sock:
        try:
            tls = rawclient.request_tls(sock, pki.cert("ca"))
        except ConnectionResetError:
            return [], "(reset)"
        with tls:
            rawclient.startup_cleartext(tls, SCRAM_USER, SCRAM_PASSWORD, APP_DB)
            rows = rawclient.simple_query(tls, "SELECT 42")
            return rows, rawclient.read_fatal(tls)["C"]


@pytest_twisted.ensureDeferred
async def test_connections_queued_when_the_drain_begins_are_served(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    """
    Transaction mode: each gets its login and its one transaction, then
    57P01; none is reset or refused (formerly: reset by the listener's
    close, or refused with 57P03, or let go as it logged in).
    """
    proxy = start_proxy([pooled_route(pki, pg_tls)], tmp_path, shutdown_timeout="10s")
    port = proxy.port()
    # Connected by the kernel, not accepted: the reactor has not run since.
    queued = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    stopped = proxy.service.shutdown(10.0)
    # The drain began: a new connect is refused at once (a balancer retries it elsewhere).
    refused_at_once = refused(port)
    outcomes = await in_thread(lambda: [_served_once(s, pki) for s in queued])
    assert outcomes == [([("42",)], "57P01")] * 3
    assert refused_at_once
    # They were this drain's clients: it ends when they are gone.
    await until(lambda: stopped.called, 10, "the drain to end")


def _connect(port: int, pki: PKI) -> psycopg.Connection:
    conn = psycopg.connect(app_dsn(port, pki), autocommit=False)
    conn.prepare_threshold = None
    return conn


def _one_transaction(conn: psycopg.Connection) -> Any:
    row = conn.execute("SELECT 41 + 1").fetchone()
    conn.execute("SELECT 2")
    conn.commit()
    return row


def _next_query_error(conn: psycopg.Connection) -> str:
    with pytest.raises(psycopg.OperationalError) as raised:
        conn.execute("SELECT 1")
    return str(raised.value)


@pytest_twisted.ensureDeferred
async def test_a_client_with_no_transaction_yet_gets_its_first(
    pki: PKI, pg_tls: Any, tmp_path: Path
) -> None:
    """
    Transaction mode: a client idle at the drain that has had no
    transaction gets one (a client that connects for one transaction);
    one that has had one is let go at once, as before.
    """
    proxy = start_proxy([pooled_route(pki, pg_tls)], tmp_path, shutdown_timeout="10s")
    port = proxy.port()
    fresh = await in_thread(_connect, port, pki)
    served = await in_thread(_connect, port, pki)
    try:
        assert await in_thread(_one_transaction, served) == (42,)
        stopped = proxy.service.shutdown(10.0)
        assert await in_thread(_one_transaction, fresh) == (42,)
        assert ADMIN_SHUTDOWN in await in_thread(_next_query_error, fresh)
        assert ADMIN_SHUTDOWN in await in_thread(_next_query_error, served)
        await until(lambda: stopped.called, 10, "the drain to end")
    finally:
        fresh.close()
        served.close()
