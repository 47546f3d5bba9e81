"""
Helpers shared by the pooling tests: a pooled route, its clients (psycopg
and raw), the pool itself, and what the server sees, through a superuser
connection over the cluster's Unix socket rather than through the proxy.

Everything that talks to a socket blocks: from a test that runs the
reactor, call it with L{support.waiting.in_thread}.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Any

import psycopg
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from pgtls_twisted.protocol import _wire as wire
from pgtls_twisted.testing.cluster import (
    APP_DB,
    POOL_PASSWORD,
    POOL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    SUPERUSER,
)
from support import rawclient
from support.dsn import app_dsn
from support.proxy import route
from support.waiting import in_thread, until_in_thread


def pooled_route(pki: Any, cluster: Any, mode: str = "transaction", **pool: Any) -> dict[str, Any]:
    """A route in front of C{cluster} pooling as the cluster's service user."""
    table = route(pki, cluster, name=f"pool-{mode}")
    table["pool"] = {
        "mode": mode,
        "service_user": POOL_USER,
        "service_password": POOL_PASSWORD,
        "max_size": 5,
        "acquire_timeout": "10s",
        **pool,
    }
    return table


def connect(proxy, pki, **kwargs) -> psycopg.Connection:
    """A psycopg client of the proxy; transaction mode wants no named statements."""
    conn = psycopg.connect(app_dsn(proxy, pki), **kwargs)
    conn.prepare_threshold = None
    return conn


def admin(cluster, dbname: str = "postgres") -> psycopg.Connection:
    """A superuser connection straight to the server, over its Unix socket."""
    return psycopg.connect(
        host=str(cluster.socket_dir),
        port=cluster.port,
        user=SUPERUSER,
        dbname=dbname,
        autocommit=True,
    )


def scalar(cluster, sql: str, params: Any = None, dbname: str = "postgres") -> Any:
    with admin(cluster, dbname) as conn:
        return conn.execute(sql, params).fetchone()[0]


POOLED_COUNT = (
    "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND datname = %s",
    (POOL_USER, APP_DB),
)


def pooled_count(cluster) -> int:
    return int(scalar(cluster, *POOLED_COUNT))


async def server_baseline(cluster) -> int:
    """
    pool_user connections to APP_DB left by earlier tests, once those have
    finished closing (their proxies are stopped, but a backend takes a
    moment to go).
    """
    try:
        await until_in_thread(lambda: pooled_count(cluster) == 0, timeout=3)
    except AssertionError:
        pass
    return await deferToThread(pooled_count, cluster)


def pooled_pids(cluster) -> list[int]:
    with admin(cluster) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s",
            (POOL_USER, APP_DB),
        ).fetchall()
    return [r[0] for r in rows]


def the_pool(proxy) -> Any:
    return proxy.route().pools.pools[APP_DB]


def settled(pool) -> bool:
    """Every connection of C{pool} is back, idle, with nobody waiting."""
    return (
        pool.size == len(pool.idle) and not pool.busy and not pool.waiters and not pool.connecting
    )


def raw_login(proxy, pki, ready: bool = True, **params: str):
    """
    A raw TLS client of the proxy, logged in as SCRAM_USER to APP_DB: up to
    ReadyForQuery, or (C{ready=False}) only up to AuthenticationOk (a
    session-mode login then waits for its server connection).
    """
    sock = rawclient.connect(proxy.port())
    tls = rawclient.request_tls(sock, pki.cert("ca"))
    tls.sendall(rawclient.startup_message(SCRAM_USER, APP_DB, **params))
    while True:
        mtype, body = rawclient.read_message(tls)
        if mtype == b"R":
            code = wire.auth_code(body)
            if code == wire.AUTH_CLEARTEXT_PASSWORD:
                tls.sendall(rawclient.password_message(SCRAM_PASSWORD))
            elif code == wire.AUTH_OK:
                if not ready:
                    return tls
            else:
                raise AssertionError(f"unexpected authentication request {code}")
        elif mtype == b"E":
            raise rawclient.ServerError(wire.parse_error_fields(body))
        elif mtype == b"Z":
            return tls


def reset_socket(conn: psycopg.Connection) -> None:
    """
    Drop C{conn}'s TCP connection with a reset: no Terminate, no TLS
    close_notify, no FIN. libpq's descriptor is swapped (atomically) for an
    unconnected socket, so libpq never writes into someone else's socket.
    """
    fd = conn.pgconn.socket
    original = socket.socket(fileno=os.dup(fd))
    original.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    os.dup2(placeholder.fileno(), fd)
    placeholder.close()
    original.close()  # the last reference: RST
    conn.close()


async def hold_transactions(proxy, pki, n: int, timeout: float = 20.0) -> None:
    """n clients in concurrent transactions, so the pool opens n connections."""
    barrier = threading.Barrier(n, timeout=timeout)

    def client():
        with connect(proxy, pki) as conn:
            conn.execute("SELECT 1")
            barrier.wait()
            conn.commit()

    await defer.gatherResults(
        [in_thread(client, timeout=timeout) for _ in range(n)], consumeErrors=True
    )
